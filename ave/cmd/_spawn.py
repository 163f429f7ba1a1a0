"""Starting a command on a pty of its own, exec failures reaching the caller; reaping.

The parent forks; the child becomes a session leader whose controlling terminal is the
pty slave, restores default signal handling and execs. Whatever goes wrong in the child
before exec is written to a close-on-exec pipe: a successful exec closes the pipe empty,
a failure leaves a message there. The child always ends in ``os._exit``, so no error can
ever unwind into a second copy of the caller's code.
"""
from __future__ import annotations

import fcntl
import os
import signal
from typing import NoReturn

# Exit status of a child that failed before exec, as shells use for "cannot run".
_EXEC_FAILED = 127

# The parent may ignore or catch these; exec keeps ignored ones ignored, so the child
# puts them back to default before exec. SIGHUP matters most: an ignored SIGHUP would
# let the command outlive its terminal.
_DEFAULT_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM,
                    signal.SIGPIPE, signal.SIGCHLD, signal.SIGXFSZ)

_ALL_SIGNALS = signal.valid_signals()

_MAX_REPORT = 4096


class ExecFailed(Exception):
    """The child could not become the command; the message says which step failed."""


def start(argv: list[str], cwd: str) -> tuple[int, int]:
    """Fork ``argv`` onto a new pty; return the child's pid and the pty master.

    Raises ``ExecFailed`` (after reaping the child) when the command could not start.
    """
    master, slave = os.openpty()
    try:
        pid = _fork_exec(argv, cwd, slave)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return pid, master


def _fork_exec(argv: list[str], cwd: str, slave: int) -> int:
    report_r, report_w = os.pipe()
    try:
        try:
            pid = _fork_with_signals_blocked(argv, cwd, slave, report_w)
        finally:
            os.close(report_w)
        _await_exec(pid, report_r)
    finally:
        os.close(report_r)
    return pid


def _fork_with_signals_blocked(argv: list[str], cwd: str, slave: int,
                               report_w: int) -> int:
    # Blocking every signal across fork keeps the caller's Python handlers from ever
    # running in the child; the child unblocks only after restoring the defaults.
    saved = signal.pthread_sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
    try:
        pid = os.fork()
        if pid == 0:
            _become_command(argv, cwd, slave, report_w)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, saved)
    return pid


def _await_exec(pid: int, report_r: int) -> None:
    """Return once the child has exec'd (the pipe closes empty), else reap and raise."""
    try:
        failure = _read_report(report_r)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        reap(pid)
        raise
    if failure:
        reap(pid)
        raise ExecFailed(failure)


def _read_report(report_r: int) -> str:
    data = b''
    while chunk := os.read(report_r, _MAX_REPORT):
        data += chunk
    return data.decode('utf-8', 'replace')


def _become_command(argv: list[str], cwd: str, slave: int, report_w: int) -> NoReturn:
    """Child side: exec the command or report why not; never returns."""
    step = 'cannot prepare the terminal'
    try:
        _restore_default_signals()
        report_w = _above_stdio(report_w)
        os.login_tty(_above_stdio(slave))
        if cwd:
            step = f'cannot change directory to {cwd!r}'
            os.chdir(cwd)
        step = f'cannot run {argv[0]!r}'
        os.execvp(argv[0], argv)
    except Exception as exc:  # anything at all must reach the parent, not unwind here
        os.write(report_w, f'{step}: {_describe(exc)}'.encode('utf-8', 'replace'))
    finally:
        os._exit(_EXEC_FAILED)


def _restore_default_signals() -> None:
    for signum in _DEFAULT_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def _above_stdio(fd: int) -> int:
    """``fd``, or a close-on-exec copy above 2 that stdio set-up cannot clobber.

    Numbers 0-2 only come our way when the caller closed its own stdio.
    """
    if fd > 2:
        return fd
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)


def _describe(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def reap(pid: int) -> int | None:
    """The child's exit code (minus the signal number if killed), or None if lost.

    The status is lost when the caller ignores SIGCHLD (the kernel reaps for it) or
    reaps other processes' children itself.
    """
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status)
