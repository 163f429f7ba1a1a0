"""Forked processes for AVE services: plain children or daemons, optionally synchronized.

``os.fork`` is used directly so the child starts as an exact copy of the caller (open
sockets included) and the parent controls precisely which descriptors survive. With
``synchronize`` the parent learns, before ``start()`` returns, that the child has
installed its signal handlers and finished initializing, or why it failed.
"""
from __future__ import annotations

import gc
import json
import logging as logginglib
import os
import select
import signal
import sys
import time
import traceback
from typing import Any, Callable

import psutil

from ave.exceptions import AveException, Timeout

_SYNC_TIMEOUT = 30.0
_SYNC_LIMIT = 1024 * 1024
# Held back from the fork until the child's own handlers are in place; otherwise a
# signal sent right after start() would run the parent's handler in the child.
_DEFERRED_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP}


class StartError(AveException):
    """The child failed before it was ready; ``trace`` holds the child's traceback."""


def _set_proc_name(name: str) -> None:
    from ave._native import ffi, lib
    if lib.ave_set_proc_name(name.encode('utf-8')) != 0:
        raise OSError(ffi.errno, os.strerror(ffi.errno))


def _set_death_signal(signum: int) -> None:
    from ave._native import ffi, lib
    if lib.ave_set_death_signal(signum) != 0:
        raise OSError(ffi.errno, os.strerror(ffi.errno))


class Process:
    """One forked AVE process; subclass it or give it a ``target``."""

    def __init__(self, target: Callable | None = None, args: tuple | None = None,
                 logging: bool = False, proc_name: str | None = None) -> None:
        self.target = target if target is not None else self.run
        self.args = tuple(args) if args is not None else ()
        self.logging = logging
        self.proc_name = proc_name
        self.home: str | None = None
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.daemonized = False
        self.logger = logginglib.getLogger(proc_name or 'ave.process')

    @classmethod
    def adopt(cls, pid: int, proc_name: str | None = None) -> 'Process':
        """A handle on a running process this one did not start (a predecessor's child).

        It behaves like a daemon: it can be terminated and joined (joining waits for
        its end and returns None, as its exit code belongs to its real parent).
        """
        process = Process(proc_name=proc_name)
        process.pid = pid
        process.daemonized = True
        return process

    def run(self) -> None:
        """What the child does when no ``target`` was given; subclasses implement it."""
        raise NotImplementedError(f'{type(self).__name__} has neither a target nor run()')

    # -- parent side -------------------------------------------------------------------

    def start(self, daemonize: bool = False, synchronize: bool = False) -> int:
        """Fork the child and return its pid (for a daemon: the daemon's own pid).

        With ``synchronize`` this returns only after the child's ``close_fds()``,
        ``redirect()`` and ``initialize()`` ran; a failure there raises StartError here.
        """
        report_needed = synchronize or daemonize
        read_end, write_end = os.pipe2(os.O_CLOEXEC) if report_needed else (-1, -1)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
        pid = os.fork()
        if pid == 0:
            if report_needed:
                os.close(read_end)
            self._child_main(daemonize, synchronize, write_end, mask)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.daemonized = daemonize
        self.pid = None if daemonize else pid
        if not report_needed:
            return pid
        os.close(write_end)
        try:
            report = _read_report(read_end)
        finally:
            os.close(read_end)
            if daemonize:
                os.waitpid(pid, 0)
        if 'error' in report:
            if not daemonize:
                self.exit_code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            raise StartError({'message': report['error'], 'trace': report.get('trace', [])})
        self.pid = report['pid'] if daemonize else pid
        return self.pid

    def terminate(self) -> None:
        """Send SIGTERM; quietly does nothing if the process is already gone."""
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # already ended: terminating it is done

    def join(self, timeout: float | None = None) -> int | None:
        """Wait for the process to end and return its exit code (minus a signal number).

        A daemon is not our child, so its exit code cannot be known: joining one
        waits for it to disappear and returns None. Raises Timeout after ``timeout``.
        """
        if self.exit_code is not None:
            return self.exit_code
        if self.pid is None:
            raise AveException('cannot join a process that was never started')
        if not _wait_for_exit(self.pid, timeout):
            raise Timeout(f'process {self.pid} still running after {timeout} s')
        if self.daemonized:
            return None
        _, status = os.waitpid(self.pid, 0)
        self.exit_code = os.waitstatus_to_exitcode(status)
        return self.exit_code

    def is_alive(self) -> bool:
        """True while the process runs; reaps it (keeping the exit code) once it ended."""
        if self.pid is None or self.exit_code is not None:
            return False
        if self.daemonized:
            return _exists(self.pid)
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return True
        self.exit_code = os.waitstatus_to_exitcode(status)
        return False

    # -- child side --------------------------------------------------------------------

    def _child_main(self, daemonize: bool, synchronize: bool, report_fd: int,
                    mask: set) -> None:
        """Everything the child does; it never returns into the parent's code."""
        code = 1
        reported = report_fd < 0
        # A parent Control's signal wake-up descriptor is about to be closed here, and
        # its number may be reused: signals must not be written into it.
        signal.set_wakeup_fd(-1)
        try:
            if daemonize:
                os.setsid()
                if os.fork() != 0:
                    os._exit(0)
                os.setsid()  # the daemon leads a session of its own, away from any tty
            self.pid = os.getpid()
            if daemonize and not synchronize:
                _send_report(report_fd, {'pid': self.pid})
                reported = True
            self.close_fds([report_fd] if not reported else [])
            # Unreachable socket and selector objects of the parent would close their
            # descriptor numbers whenever the collector found them, by then perhaps
            # reused by the child. Freezing what exists now keeps the collector away
            # from them for good, at no cost (collecting them here took ~5 ms).
            gc.freeze()
            self.redirect()
            self.initialize()
            # Unblock explicitly: a parent that forks us from its own initialize()
            # has these blocked too, and restoring its mask would keep them blocked.
            signal.pthread_sigmask(signal.SIG_SETMASK, mask - _DEFERRED_SIGNALS)
            if not reported:
                _send_report(report_fd, {'pid': self.pid})
                reported = True
            self.target(*self.args)  # what it returns is ignored, as multiprocessing does
            code = 0
        except SystemExit as exit_request:
            code = _exit_code_of(exit_request.code)
        except BaseException as error:  # the child must report anything, then exit
            if not reported:
                _send_report(report_fd, {'error': f'{type(error).__name__}: {error}',
                                         'trace': _trace_rows(error)})
            else:
                self.log(''.join(traceback.format_exception(error)))
        finally:
            _flush_standard_streams()
            os._exit(code)

    def close_fds(self, exclude: list[int]) -> None:
        """Close every descriptor but 0, 1, 2 and ``exclude``.

        Subclasses that must keep descriptors (a listening socket, say) add them to
        ``exclude`` and call this implementation.
        """
        keep = sorted({0, 1, 2, *(fd for fd in exclude if fd >= 0)})
        low = 0
        for fd in keep:
            if fd > low:
                os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, _max_fd())

    def redirect(self) -> None:
        """Hook for subclasses to point inherited descriptors (stderr, say) at log files."""

    def initialize(self) -> None:
        """Install signal handlers, logging and process controls in the new child."""
        signal.signal(signal.SIGTERM, self.handle_SIGTERM)
        signal.signal(signal.SIGUSR1, self.handle_SIGUSR1)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self._configure_logging()
        self.perform_prctl()

    def perform_prctl(self, death_signal: int = 0) -> None:
        """Name the process (``proc_name``) and choose its parent-death signal."""
        if self.proc_name:
            _set_proc_name(self.proc_name)
        _set_death_signal(death_signal)

    def _configure_logging(self) -> None:
        self.logger = logginglib.getLogger(self.proc_name or 'ave.process')
        self.logger.propagate = False
        self.logger.handlers.clear()
        if self.logging:
            # Descriptor 2 itself, so that whatever redirect() put there gets the log.
            handler = logginglib.StreamHandler(open(2, 'w', buffering=1, closefd=False))
            handler.setFormatter(logginglib.Formatter(
                f'%(asctime)s {self.proc_name or "ave"}[{os.getpid()}] %(message)s'))
            self.logger.addHandler(handler)
            self.logger.setLevel(logginglib.INFO)
        else:
            self.logger.addHandler(logginglib.NullHandler())

    def log(self, message: str) -> None:
        """Write a time-stamped line to stderr if the process was made with logging."""
        if self.logging:
            self.logger.info(message)

    def handle_SIGTERM(self, signum: int, frame: Any) -> None:
        """Die at once, as SIGTERM's default would, skipping Python's exit handlers."""
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    def handle_SIGUSR1(self, signum: int, frame: Any) -> None:
        """Write the current stack to a hickup file and pass the signal to ave-* children."""
        try:
            self._write_hickup(frame)
        except OSError as error:
            self.log(f'could not write hickup file: {error}')
        for child in _named_children('ave-'):
            try:
                child.send_signal(signal.SIGUSR1)
            except psutil.Error:
                pass  # the child ended meanwhile; nothing to forward to

    def _write_hickup(self, frame: Any) -> str:
        home = self.home or os.path.expanduser('~')
        directory = os.path.join(home, '.ave', 'hickup')
        os.makedirs(directory, exist_ok=True)
        name = f'{time.strftime("%Y%m%d-%H%M%S")}-{self.proc_name or "ave"}-{os.getpid()}'
        path = os.path.join(directory, name)
        with open(path + '.tmp', 'w') as hickup:
            hickup.write(f'{self.proc_name or "ave"} pid {os.getpid()} at {time.ctime()}\n')
            hickup.write(''.join(traceback.format_stack(frame)))
        os.replace(path + '.tmp', path)  # readers never see a half-written file
        return path


def _read_report(fd: int) -> dict:
    """Read the child's one JSON report; an empty pipe means the child died early."""
    chunks = []
    size = 0
    deadline = time.monotonic() + _SYNC_TIMEOUT
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            raise Timeout(f'child did not finish initializing in {_SYNC_TIMEOUT} s')
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > _SYNC_LIMIT:
            raise StartError('child sent an oversize start-up report')
    if not chunks:
        return {'error': 'child exited before it finished initializing'}
    try:
        return json.loads(b''.join(chunks))
    except ValueError:
        return {'error': 'child sent an unreadable start-up report'}


def _send_report(fd: int, report: dict) -> None:
    try:
        os.write(fd, json.dumps(report).encode('utf-8'))
    finally:
        os.close(fd)


def _trace_rows(error: BaseException) -> list[list]:
    return [[f.filename, f.lineno, f.name, f.line]
            for f in traceback.extract_tb(error.__traceback__)]


def _exit_code_of(value: Any) -> int:
    """Mirror sys.exit(): None is success, an int is itself, anything else is failure."""
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value & 0xff
    return 1


def _flush_standard_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass  # the stream may be closed or replaced; exiting matters more


def _max_fd() -> int:
    try:
        return os.sysconf('SC_OPEN_MAX')
    except (OSError, ValueError):
        return 65536


def _exists(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for_exit(pid: int, timeout: float | None) -> bool:
    """Wait (without reaping) until ``pid`` has ended; False if ``timeout`` ran out."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(0, timeout) * 1000))
    finally:
        os.close(pidfd)


def _named_children(prefix: str) -> list[psutil.Process]:
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    named = []
    for child in children:
        try:
            if child.name().startswith(prefix):
                named.append(child)
        except psutil.Error:
            continue
    return named
