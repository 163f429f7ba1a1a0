"""Run external commands on a pseudoterminal of their own.

Each command runs as the leader of a new session whose controlling terminal is a fresh
pty, which is what makes it behave as it would in a terminal (line-buffered output,
stdout and stderr interleaved in write order) and what makes it and everything it
started easy to get rid of: they share the terminal and the process group, so closing
the terminal hangs them up and a timeout kills the group. A program that daemonizes
properly (a new session, detached from the terminal) outlives the call; one that does
not (adb starting its server, for instance) dies with it.

Output is returned as text: UTF-8 with undecodable bytes replaced by U+FFFD. The
terminal does its usual output processing, so lines end in ``\\r\\n``. ``max_output``
(an AVE extension of the reference signature) bounds what is kept of it, for commands
whose output would not fit in memory; ``ave.cmd.tail`` is the helper that does it.

The command starts with every signal at its default action and none blocked, in a
new session, with no descriptor of the caller's but its terminal. It is started
without copying the caller (``native/spawn.c``: vfork), so a call is cheap and safe
from any thread while others run.

Requires Linux 5.3 or later (``pidfd_open``). Before 5.9 (``close_range``) descriptors
the caller made inheritable on purpose pass on to the command.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable, TextIO

from ave.cmd import _follow, _spawn
from ave.cmd._output import Output
from ave.exceptions import RunError, Timeout

__all__ = ['argv_of', 'check_timeout', 'run', 'run_bg']

Command = str | list[str] | tuple[str, ...]
Path = str | os.PathLike[str]


def run(cmd: Command, timeout: float = 0, debug: bool = False, cwd: Path = '',
        output_file: TextIO | None = None, *,
        max_output: int | None = None,
        started: Callable[[int], object] | None = None) -> tuple[int, str]:
    """Run ``cmd`` to completion and return ``(exit_code, output)``.

    ``cmd`` is a list of arguments, or a string split on whitespace (no shell quoting).
    ``exit_code`` is minus the signal number when a signal killed the command.
    ``timeout`` in seconds (0: none): on expiry the command's process group, and any
    descendant still on its terminal, is killed and ``Timeout`` raised with ``cmd`` and
    ``out`` (the output so far). ``output_file`` receives the output as it arrives, as
    does ``sys.stderr`` when ``debug`` is set. ``cwd`` '' keeps the current directory.
    ``max_output`` (None: no limit) caps the characters kept for ``output`` and for
    ``out``: past it only the last ``max_output`` are kept, after one line that says
    how many were cut (``ave.cmd.tail.cut_notice``), and memory stays bounded by about
    that many characters however much the command prints; ``output_file`` and
    ``debug`` still get everything. ``started`` is called with the command's pid as
    soon as it runs, so that another thread can end it early (``os.killpg``: the
    command leads its own process group). ``max_output`` and ``started`` are AVE
    extensions of the reference signature.
    Raises ``RunError`` when the command cannot be started.
    """
    argv = argv_of(cmd)
    cwd = _directory(cwd)
    timeout = check_timeout(timeout)
    output = Output(_sinks(debug, output_file), _output_limit(max_output))
    pid, master = _start(cmd, argv, cwd)
    try:
        _announce(started, pid)
        return _conclude(cmd, pid, master, output, timeout)
    finally:
        os.close(master)


def run_bg(cmd: Command, debug: bool = False, cwd: Path = '') -> tuple[int, int]:
    """Start ``cmd`` without waiting for it; return ``(pid, fd)``.

    ``fd`` is the master side of the command's pty: read it for the output (EIO means
    every writer has closed the terminal). The caller owns both and must ``os.waitpid``
    the pid and ``os.close`` the fd, or leak a zombie and a pty. ``debug`` announces
    the pid and command on ``sys.stderr``; the output itself is the caller's to read.
    Raises ``RunError`` when the command cannot be started.
    """
    argv = argv_of(cmd)
    pid, master = _start(cmd, argv, _directory(cwd))
    if debug:
        sys.stderr.write(f'ave.cmd: started pid {pid}: {argv}\n')
        sys.stderr.flush()
    return pid, master


def _conclude(cmd: Command, pid: int, master: int, output: Output,
              timeout: float) -> tuple[int, str]:
    deadline = time.monotonic() + timeout if timeout else None
    try:
        exited = _follow.follow(pid, master, output, deadline)
    except BaseException:
        _follow.abort(pid)
        raise
    if not exited:
        _follow.abort(pid)
        raise Timeout({'message': f'command timed out after {timeout} s',
                       'cmd': cmd, 'out': output.finish()})
    code = _spawn.reap(pid)
    text = output.finish()
    if code is None:
        raise RunError(cmd, text, 'exit status lost: something else reaped the '
                       'command (is SIGCHLD ignored?)')
    return code, text


def _announce(started: Callable[[int], object] | None, pid: int) -> None:
    """Tell the caller the pid; if that fails, the command must not run on unowned."""
    if started is None:
        return
    try:
        started(pid)
    except BaseException:
        _follow.abort(pid)
        raise


def _start(cmd: Command, argv: list[str], cwd: str) -> tuple[int, int]:
    try:
        return _spawn.start(argv, cwd)
    except _spawn.ExecFailed as exc:
        raise RunError(cmd, '', str(exc)) from None


def argv_of(cmd: object) -> list[str]:
    """``cmd`` (a str split on whitespace, or a list) as checked arguments: validated
    once, before any fork, so a child never meets a bad argument."""
    if isinstance(cmd, str):
        argv = cmd.split()
    elif isinstance(cmd, (list, tuple)):
        argv = list(cmd)
    else:
        raise TypeError(f'cmd must be a str or a list of str, not {type(cmd).__name__}')
    if not argv:
        raise ValueError('cmd is empty')
    for arg in argv:
        if not isinstance(arg, str):
            raise TypeError(f'cmd arguments must be str, not {type(arg).__name__}: '
                            f'{arg!r}')
        if '\0' in arg:
            raise ValueError(f'cmd argument contains a NUL character: {arg!r}')
    if not argv[0]:
        raise ValueError('cmd names no program (first argument is empty)')
    return argv


def _directory(cwd: object) -> str:
    if not isinstance(cwd, (str, os.PathLike)):
        raise TypeError(f'cwd must be a path, not {type(cwd).__name__}')
    path = os.fsdecode(cwd)
    if '\0' in path:
        raise ValueError(f'cwd contains a NUL character: {path!r}')
    return path


def _output_limit(max_output: object) -> int | None:
    if max_output is None:
        return None
    if not isinstance(max_output, int) or isinstance(max_output, bool):
        raise TypeError(f'max_output must be a number of characters or None, not '
                        f'{type(max_output).__name__}')
    if max_output < 0:
        raise ValueError(f'max_output must be >= 0 (None: no limit), not {max_output}')
    return max_output


def check_timeout(timeout: object) -> float:
    """A command's time limit in seconds (0: none), as ``run`` takes it; TypeError or
    ValueError otherwise. Shared by everything that passes a job's timeout on."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f'timeout must be a number of seconds, not '
                        f'{type(timeout).__name__}')
    if not math.isfinite(timeout) or timeout < 0:
        raise ValueError(f'timeout must be finite and >= 0 (0: none), not {timeout}')
    return timeout


def _sinks(debug: bool, output_file: TextIO | None) -> list[TextIO]:
    sinks = []
    if output_file is not None:
        if not callable(getattr(output_file, 'write', None)):
            raise TypeError('output_file must be a writable text file object')
        sinks.append(output_file)
    if debug:
        sinks.append(sys.stderr)
    return sinks
