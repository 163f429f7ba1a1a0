"""Following a started command to its end: output, exit, deadline, clean-up.

The rule for when output ends: a command's output is complete once the command itself
has exited and its terminal holds nothing more that can be read right away. Waiting for
end of file instead would hang on a descendant that kept the terminal open (a program
that daemonized badly), and stopping at the exit alone would lose output still buffered
in the pty.
"""
from __future__ import annotations

import logging
import math
import os
import select
import signal
import time

import psutil

from ave.cmd._output import Output, read_chunk
from ave.cmd._spawn import reap

log = logging.getLogger(__name__)

# Upper bound on reading after the command exited, for a descendant that keeps writing
# to a terminal it should have let go of.
_DRAIN_SECONDS = 1.0


def follow(pid: int, master: int, output: Output, deadline: float | None) -> bool:
    """Feed ``output`` until the child exits (True) or ``deadline`` passes (False)."""
    try:
        exited = os.pidfd_open(pid)
    except ProcessLookupError:
        # Exited and already reaped behind our back (the caller ignores SIGCHLD):
        # whatever it wrote is waiting in the pty.
        _drain(master, output)
        return True
    try:
        return _follow(exited, master, output, deadline)
    finally:
        os.close(exited)


def _follow(exited: int, master: int, output: Output, deadline: float | None) -> bool:
    poller = select.poll()
    poller.register(master, select.POLLIN)
    poller.register(exited, select.POLLIN)
    while (wait_ms := _ms_left(deadline)) != 0:
        for fd, _ in poller.poll(wait_ms):
            if fd == exited:
                _drain(master, output)
                return True
            data = read_chunk(master)
            if data:
                output.feed(data)
            else:
                # Every writer closed the terminal; the command may still be running.
                poller.unregister(master)
    return False


def _ms_left(deadline: float | None) -> int | None:
    if deadline is None:
        return None
    return max(0, math.ceil((deadline - time.monotonic()) * 1000))


def _drain(master: int, output: Output) -> None:
    ready = select.poll()
    ready.register(master, select.POLLIN)
    give_up = time.monotonic() + _DRAIN_SECONDS
    while ready.poll(0) and time.monotonic() < give_up:
        data = read_chunk(master)
        if not data:
            return
        output.feed(data)


def abort(pid: int) -> None:
    """Kill the command with everything it started on its terminal, and reap it."""
    strays = _left_the_group(pid)
    log.debug('killing process group %d and %d strays', pid, len(strays))
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group is gone already
        pass
    for proc in strays:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass  # it exited on its own meanwhile
    reap(pid)


def _left_the_group(pid: int) -> list[psutil.Process]:
    """Descendants that moved to another process group but are still in the session.

    Found before anything is killed: once their parents die they are no longer ours to
    find. Programs that started a session of their own daemonized on purpose and are
    left alone.
    """
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:  # already reaped by a caller that ignores SIGCHLD
        return []
    found = []
    for proc in descendants:
        try:
            if os.getsid(proc.pid) == pid and os.getpgid(proc.pid) != pid:
                found.append(proc)
        except ProcessLookupError:
            continue
    return found

