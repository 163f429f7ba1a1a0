"""Fixtures of the ave.cmd tests: owners for processes and for signal handling."""
import os
import signal

import psutil
import pytest


@pytest.fixture
def doomed():
    """Pids to SIGKILL at teardown, so a failed test leaves nothing running."""
    pids = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(autouse=True)
def _reap_children():
    """Kill and reap any direct child a test left behind (a bug, but not a hang)."""
    yield
    for child in psutil.Process().children():
        try:
            child.kill()
            os.waitpid(child.pid, 0)
        except (psutil.NoSuchProcess, ChildProcessError):
            pass


@pytest.fixture
def restore_signals():
    """Give a test free rein over signal handling; put everything back afterwards."""
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD,
               signal.SIGPIPE)
    saved = {signum: signal.getsignal(signum) for signum in handled}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for signum, handler in saved.items():
        signal.signal(signum, handler)
