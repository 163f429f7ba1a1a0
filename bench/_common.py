"""Helpers shared by the benchmarks: forked children that cannot outlive the run,
line-based messages between them, percentiles and plain-text tables.

A benchmark forks servers and clients and may be interrupted at any point; every
child therefore dies with its parent (``PR_SET_PDEATHSIG``, set through AVE's own
``ave._native``), carries an alarm as a last resort, and is registered so that one
``finally`` can stop and reap it.
"""
from __future__ import annotations

import json
import math
import os
import resource
import select
import signal
import sys
import time
import traceback
from typing import Any, Callable

from ave._native import ffi, lib


def raise_fd_limit() -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE to the hard one; children forked later inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when ``parent``, which forked it, ends.

    Covers the one case ``finally`` cannot: the benchmark itself being SIGKILLed.
    ``parent`` must be taken before the fork: a parent that died before the request
    took effect never triggers it, and ``os.getppid()`` read in the child could already
    name the process that adopted it.
    """
    if lib.ave_set_death_signal(signal.SIGKILL) != 0:
        raise OSError(ffi.errno, os.strerror(ffi.errno))
    if os.getppid() != parent:  # the parent ended before the request took effect
        os._exit(1)


class Children:
    """Every process the benchmark started, so that all can be stopped and reaped."""

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self.pids: list[int] = []

    def fork(self, function: Callable[..., Any], *args: Any) -> int:
        """Run ``function(*args)`` in a child; the child never returns into our code."""
        parent = os.getpid()
        pid = os.fork()
        if pid != 0:
            self.pids.append(pid)
            return pid
        code = 1
        try:
            prepare_child(self.lifetime, parent)
            function(*args)
            code = 0
        except BaseException:  # the child reports anything and exits, never unwinds
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def adopt(self, pid: int) -> None:
        """Register a child forked by someone else's code (an AVE Process, say)."""
        self.pids.append(pid)

    def stop(self, pid: int, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; the child is reaped either way."""
        if pid not in self.pids:
            return
        _signal(pid, signal.SIGTERM)
        if not _reap(pid, timeout):
            _signal(pid, signal.SIGKILL)
            _reap(pid, timeout)
        self.pids.remove(pid)

    def wait(self, pid: int, timeout: float) -> None:
        """Reap a child that is expected to exit by itself; stop it if it does not."""
        if pid in self.pids and _reap(pid, timeout):
            self.pids.remove(pid)
        else:
            self.stop(pid)

    def stop_all(self, timeout: float = 5.0) -> None:
        """Signal every child at once, then reap each within a shared deadline."""
        for pid in self.pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for pid in list(self.pids):
            if not _reap(pid, max(0.0, deadline - time.monotonic())):
                _signal(pid, signal.SIGKILL)
                _reap(pid, timeout)
            self.pids.remove(pid)


def prepare_child(lifetime: float, parent: int) -> None:
    """Make a fresh child mortal: Ctrl-C kills it quietly, and so do our death or the alarm."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent)
    signal.alarm(max(1, int(lifetime)))


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # already gone; reaping is all that is left


def _reap(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` for ``pid`` to end and reap it; False if it still runs."""
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True  # reaped elsewhere, or never ours to reap
        if done:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def send_message(fd: int, message: Any) -> None:
    """Write one JSON message as a line; a message is far below the pipe's atomic size."""
    os.write(fd, json.dumps(message).encode('utf-8') + b'\n')


def receive_message(fd: int, timeout: float) -> Any:
    """Read one line-framed JSON message within ``timeout``.

    Lines, not end-of-file, delimit messages: other children may hold copies of the
    pipe's write end, so EOF can come late or never.
    """
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    data = b''
    while not data.endswith(b'\n'):
        remaining = deadline - time.monotonic()
        if not poller.poll(max(0.0, remaining) * 1000):
            raise TimeoutError(f'no message within {timeout:.0f} s')
        chunk = os.read(fd, 65536)
        if not chunk:
            raise EOFError('a child exited without a message '
                           '(its traceback, if any, is above)')
        data += chunk
    return json.loads(data)


def describe(error: BaseException) -> str:
    """An exception as one line for a report: its type and its message."""
    return f'{type(error).__name__}: {error}'


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile: a value that was actually measured, never interpolated."""
    if not samples:
        raise ValueError('no samples')
    ordered = sorted(samples)
    rank = math.ceil(fraction * len(ordered))
    return ordered[min(len(ordered), max(1, rank)) - 1]


def render_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned values, one space-padded line per row."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:]))
        return '  '.join([first, *rest]).rstrip()

    rule = '  '.join('-' * width for width in widths)
    return '\n'.join([line(header), rule, *(line(row) for row in rows)])
