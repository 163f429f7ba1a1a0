"""Starting a command on a pty of its own, exec failures reaching the caller; reaping.

The child is made by ``ave_spawn`` in ``native/spawn.c``: vfork, then a new session
whose controlling terminal is the pty slave, default signal handling, no descriptors
but the terminal, the requested directory, exec. Only system calls run in the child,
never Python, so no error can unwind into a second copy of the caller's code, and
starting a command is safe while other threads run. When the child cannot become the
command, the parent learns the step and the errno from the helper, after the child
has been reaped.
"""
from __future__ import annotations

import os

from ave._native import ffi, lib


class ExecFailed(Exception):
    """The child could not become the command; the message says which step failed."""


def start(argv: list[str], cwd: str) -> tuple[int, int]:
    """Start ``argv`` on a new pty; return the child's pid and the pty master.

    The master is close-on-exec. Raises ``ExecFailed`` (the child already reaped) when
    the command could not start.
    """
    master, slave = os.openpty()
    try:
        pid = _spawn(argv, cwd, slave)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return pid, master


def _spawn(argv: list[str], cwd: str, tty: int) -> int:
    # The C strings must outlive the call: ``strings`` holds them.
    strings = [ffi.new('char[]', os.fsencode(arg)) for arg in argv]
    c_argv = ffi.new('char *[]', [*strings, ffi.NULL])
    c_cwd = ffi.new('char[]', os.fsencode(cwd))
    failure = ffi.new('struct ave_spawn_failure *')
    pid = lib.ave_spawn(c_argv, tty, c_cwd, failure)
    if pid < 0:
        raise ExecFailed(f'{_step(failure.step, argv[0], cwd)}: '
                         f'{os.strerror(failure.error or ffi.errno)}')
    return int(pid)


def _step(step: int, program: str, cwd: str) -> str:
    if step == lib.AVE_SPAWN_DIRECTORY:
        return f'cannot change directory to {cwd!r}'
    if step == lib.AVE_SPAWN_EXEC:
        return f'cannot run {program!r}'
    if step == lib.AVE_SPAWN_OK:
        return 'cannot start a process'
    return 'cannot prepare the terminal'


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
