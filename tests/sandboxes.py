"""Helpers for tests that run commands in sandboxes (pytest puts this directory on sys.path)."""
import contextlib
from collections.abc import Iterator

import pytest

from ave.sandbox import Sandbox, install, probe

#: Why sandboxes cannot be made on this machine, or None when they can.
PROBLEM = probe()

requires_bwrap = pytest.mark.skipif(PROBLEM is not None, reason=f'no sandbox here: {PROBLEM}')


@contextlib.contextmanager
def installed(sandbox: Sandbox) -> Iterator[Sandbox]:
    """``sandbox`` as this process's sandbox for a while; the previous one afterwards."""
    previous = install(sandbox)
    try:
        yield sandbox
    finally:
        install(previous)
