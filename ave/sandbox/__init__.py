"""Commands that job code chooses, run in a sandbox made with bubblewrap.

Clients of a broker are anonymous, so whatever a job makes a session run (``run`` in a
workspace, ``shell`` on a handset, git on a URL it names, ...) is untrusted. Each
session process (one client) has one ``Sandbox``, installed at start with
``install()`` and found by resources with ``current()``, so the plug-in constructor
``Resource(profile, settings)`` needs nothing new. Inside, a command sees:

- the host's file system read-only, with the ``hidden`` paths (the broker home's
  ``.ave``, the workspace root) replaced by empty directories, and ``/run`` (where
  systemd, D-Bus and container engines keep their control sockets) emptied too;
- read-write only the session's own workspaces (``allow_write``);
- a private ``/tmp``, a minimal ``/dev`` plus the session's device nodes
  (``allow_device``), and a ``/proc`` of its own pid namespace: the broker, other
  sessions and their commands cannot be seen, signalled or traced;
- the host's network, because handsets are driven through the adb server on
  loopback and git fetches from wherever a job says;
- no capabilities (``--cap-drop ALL``; bwrap keeps them all for root otherwise) and
  ``no_new_privs``, so nothing regains them through a set-id program.

Every process a command leaves behind dies when the command ends: the command's first
process is the namespace's init (``ave.sandbox.launcher``), and the kernel kills the
rest of a namespace when its init exits. ``kill()`` ends commands at once from another
thread, for a session whose client has gone.

A disabled sandbox (``"isolation": "off"``, or ``auto`` where the kernel refuses
namespaces) runs commands plainly with ``ave.cmd.run``: same results, same
``kill()``, no isolation and no cost. So do commands the lab owner configured
(``isolate=False``: relay tools), which need the host as it is. With nothing
installed, ``current()`` is a disabled sandbox, which is what resources get in unit
tests.
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TextIO

import psutil

import ave.cmd
from ave.exceptions import AveException, RunError, Timeout
from ave.sandbox.layout import DEFAULT_TMP_BYTES, Layout, mount_arguments

__all__ = ['MODES', 'Killed', 'Layout', 'Sandbox', 'SandboxUnavailable', 'current',
           'enabled_for', 'install', 'mount_arguments', 'probe', 'remove_status_files']

_log = logging.getLogger(__name__)

#: The values of broker.json ``"isolation"``.
MODES = ('auto', 'required', 'off')

BWRAP = 'bwrap'

#: How long ``probe()`` lets its trial command take; it normally takes milliseconds.
PROBE_TIMEOUT = 10.0

#: How long ``kill()`` waits for the commands it killed to be reaped by their callers.
#: Killing takes milliseconds; the bound is for a caller stuck elsewhere.
KILL_WAIT = 5.0

# How often kill() looks again for a command whose process had not started yet.
_KILL_POLL = 0.02

# The launcher runs isolated (-I) and without site-packages (-S), so it starts fast and
# needs nothing but the interpreter, which must therefore be the real binary and not a
# virtualenv's link (the virtualenv may live under a hidden path).
_PYTHON = os.path.realpath(sys.executable) if sys.executable else '/usr/bin/python3'
_LAUNCHER_PATH = os.path.join(os.path.dirname(__file__), 'launcher.py')

# Opens the status file as descriptor 3, then becomes the launcher (or bwrap). $0 is
# the status file's path; nothing of the job's reaches this shell text.
_STATUS_SHELL = ['/bin/sh', '-c', 'exec 3>"$0" && exec "$@"']

_MARKER_PREFIX = 'ave-sandbox-call-'

# Status files are named after the session that made them (followed by its pid), so
# that those of a session killed in the middle of a command can be found and removed.
_STATUS_PREFIX = 'ave-sandbox-status-'

# Namespaces and privileges, the same for every command.
_ISOLATION = ['--unshare-pid', '--unshare-ipc', '--die-with-parent', '--as-pid-1',
              '--cap-drop', 'ALL']


class Killed(AveException):
    """``Sandbox.kill()`` ended the command: its session or its owner is going away.

    Details (also attributes): ``cmd`` and ``out``, the output until then.
    """


class SandboxUnavailable(AveException):
    """Isolation is ``required`` but this machine cannot make a sandbox (says why)."""


def probe(bwrap: str = BWRAP) -> str | None:
    """None when sandboxes work here, else one line saying why not.

    The trial is real: the launcher runs ``true`` with the very options every command
    gets, so a kernel that refuses namespaces shows up with bwrap's own words. It
    takes a few milliseconds; run it once per broker start.
    """
    found = shutil.which(bwrap)
    if found is None:
        return (f'bubblewrap not found: {bwrap!r} is not an executable file on PATH '
                '(install the Debian package bubblewrap)')
    try:
        code, output = Sandbox(True, bwrap=found).run(['true'], timeout=PROBE_TIMEOUT)
    except (RunError, Timeout) as err:
        return f'{found} cannot make a sandbox here: {_one_line(str(err))}'
    if code != 0:
        return (f'{found} cannot make a sandbox here: a trial command exited with status '
                f'{code}: {_one_line(output)}')
    return None


def enabled_for(mode: str, problem: str | None) -> bool:
    """Whether to sandbox, given broker.json ``"isolation"`` and what ``probe()`` said.

    ``auto`` without a working bwrap runs commands plainly (the caller logs one loud
    warning); ``required`` refuses instead, with SandboxUnavailable naming the problem.
    """
    if mode not in MODES:
        raise ValueError(f'isolation must be one of {", ".join(MODES)}; got {mode!r}')
    if mode == 'off':
        return False
    if problem is None:
        return True
    if mode == 'required':
        raise SandboxUnavailable(f'isolation is "required" but commands cannot be '
                                 f'sandboxed: {problem}')
    return False


@dataclass(frozen=True)
class Isolation:
    """Whether jobs' commands run sandboxed, as broker.json asked and the host allows."""

    mode: str
    enabled: bool
    problem: str | None

    @classmethod
    def decide(cls, mode: str) -> Isolation:
        """Probe the sandbox (not for ``off``); ``required`` without one raises
        SandboxUnavailable, with the reason, before anything starts."""
        problem = None if mode == 'off' else probe()
        return cls(mode, enabled_for(mode, problem), problem)

    def describe(self) -> str:
        if self.enabled:
            return 'on'
        if self.mode == 'off':
            return 'off (broker.json says "isolation": "off")'
        return f'off: {self.problem}'


@dataclass(frozen=True)
class _Output:
    """Where a command's output goes besides its result, and how much is kept."""

    file: TextIO | None
    limit: int | None


@dataclass
class _Call:
    """One command in progress: who it runs for, and how kill() finds and flags it
    (a sandboxed one by the marker on its command line, a plain one by its pid)."""

    owner: object
    marker: str
    cancelled: bool = False
    pid: int | None = None


class Sandbox:
    """Runs commands isolated from the broker, other sessions and other jobs' files.

    ``enabled`` False runs them without isolation (same API and results). ``hidden``
    are paths that must look empty inside; ``bwrap`` is the program to use;
    ``tmp_bytes`` the size of each command's private /tmp.
    Thread-safe: commands run from several threads at once, and ``kill()`` may be
    called from any thread while others are inside ``run()``.
    """

    def __init__(self, enabled: bool, hidden: Iterable[str] = (), bwrap: str = BWRAP,
                 tmp_bytes: int = DEFAULT_TMP_BYTES) -> None:
        self._enabled = enabled
        self._hidden = tuple(_absolute(path, 'hidden path') for path in hidden)
        self._bwrap = bwrap
        self._tmp_bytes = tmp_bytes
        self._writable: list[str] = []
        self._devices: list[str] = []
        self._calls: dict[str, _Call] = {}
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)

    @property
    def enabled(self) -> bool:
        """Whether commands run isolated (False: plainly, for ``off`` or no bwrap)."""
        return self._enabled

    # --- what commands may reach ----------------------------------------------------

    def allow_write(self, path: str) -> None:
        """Make the directory ``path`` (a workspace of this session) writable inside."""
        real = _absolute(path, 'path')
        with self._lock:
            if real not in self._writable:
                self._writable.append(real)

    def disallow(self, path: str) -> None:
        """Undo ``allow_write(path)``, for a workspace being deleted."""
        real = _absolute(path, 'path')
        with self._lock:
            if real in self._writable:
                self._writable.remove(real)

    def writable_paths(self) -> tuple[str, ...]:
        """The directories commands may write: this session's workspaces."""
        with self._lock:
            return tuple(self._writable)

    def allow_device(self, node: str) -> None:
        """Make the device node ``node`` (of this session's equipment) usable inside."""
        real = _absolute(node, 'node')
        with self._lock:
            if real not in self._devices:
                self._devices.append(real)

    # --- running and killing commands ------------------------------------------------

    def run(self, cmd: str | list[str], timeout: float = 0, cwd: str | os.PathLike = '',
            output_file: TextIO | None = None, *, owner: object = None,
            isolate: bool = True, max_output: int | None = None) -> tuple[int, str]:
        """Run ``cmd`` like ``ave.cmd.run`` does, inside the sandbox when enabled.

        Same arguments and results: ``(exit_code, output)`` with minus the signal
        number for a command killed by a signal, ``Timeout`` (with ``out``) after
        ``timeout`` seconds (0: none), ``RunError`` when the command cannot start (a
        missing program, a ``cwd`` that does not exist inside), output through a
        pseudoterminal and into ``output_file`` as it arrives. ``cwd`` '' keeps the
        session's directory when it is visible inside.

        ``owner`` (any object, compared by identity) lets ``kill(owner)`` end this
        command alone; a command it kills raises ``Killed``. ``isolate`` False runs
        the command plainly even in an enabled sandbox: only for commands the lab
        owner configured (relay tools, which need the host's devices and files),
        never for job-chosen ones. ``max_output`` keeps only the end of the output,
        as ``ave.cmd.run`` does.
        """
        argv = ave.cmd.argv_of(cmd)
        call = self._register(owner)
        limits = _Output(output_file, max_output)
        try:
            if self._enabled and isolate:
                return self._run(call, cmd, argv, timeout, os.fspath(cwd), limits)
            return self._run_plain(call, cmd, argv, timeout, os.fspath(cwd), limits)
        finally:
            with self._lock:
                del self._calls[call.marker]
                self._ended.notify_all()

    def kill(self, owner: object = None, *, spare: Collection[object] = ()) -> None:
        """Kill every command running now (only ``owner``'s when given) and wait for them.

        Each such ``run()`` raises ``Killed`` promptly; a command that was about to
        start does not start. Returns once those calls have returned, or after
        ``KILL_WAIT`` seconds with a warning. Commands started after this call are not
        affected, so teardown that follows (a relay's reset) runs normally. Commands
        of the owners in ``spare`` are left running: a session that ends spares the
        resets of what it already gave back, which are teardown, not job commands.
        """
        spared = {id(other) for other in spare}
        with self._lock:
            doomed = [call for call in self._calls.values()
                      if (owner is None or call.owner is owner)
                      and id(call.owner) not in spared]
            for call in doomed:
                call.cancelled = True
        deadline = time.monotonic() + KILL_WAIT
        while True:
            with self._lock:
                alive = {call.marker for call in doomed if call.marker in self._calls}
            if not alive:
                return
            if time.monotonic() >= deadline:
                _log.warning('%d killed command(s) did not end within %g s',
                             len(alive), KILL_WAIT)
                return
            self._kill_plain(alive)
            _kill_marked(alive, deadline)
            with self._lock:
                self._ended.wait(_KILL_POLL)

    # --- helpers ----------------------------------------------------------------------

    def _register(self, owner: object) -> _Call:
        call = _Call(owner, _MARKER_PREFIX + secrets.token_hex(16))
        with self._lock:
            self._calls[call.marker] = call
        return call

    def _run_plain(self, call: _Call, cmd: str | list[str], argv: list[str],
                   timeout: float, cwd: str, output: _Output) -> tuple[int, str]:
        """Run a command without isolation; kill() ends its process group."""
        def started(pid: int) -> None:
            with self._lock:
                call.pid = pid
                if call.cancelled:
                    _kill_group(pid)
        if call.cancelled:
            raise _killed(cmd, '')
        try:
            code, text = ave.cmd.run(argv, timeout=timeout, cwd=cwd,
                                     output_file=output.file, max_output=output.limit,
                                     started=started)
        except Timeout as err:
            raise _killed(cmd, err.out) if call.cancelled else err from None
        if call.cancelled:
            raise _killed(cmd, text)
        return code, text

    def _kill_plain(self, markers: set[str]) -> None:
        """SIGKILL the process groups of plain commands among these calls."""
        with self._lock:
            for marker in markers:
                call = self._calls.get(marker)
                if call is not None and call.pid is not None:
                    _kill_group(call.pid)

    def _run(self, call: _Call, cmd: str | list[str], argv: list[str], timeout: float,
             cwd: str, output: _Output) -> tuple[int, str]:
        status_fd, status_path = tempfile.mkstemp(prefix=_status_prefix(os.getpid()))
        try:
            wrapped = [*_STATUS_SHELL, status_path,
                       *self._command_line(call.marker, argv, cwd)]
            if call.cancelled:
                raise _killed(cmd, '')
            try:
                code, text = ave.cmd.run(wrapped, timeout=timeout, output_file=output.file,
                                         max_output=output.limit)
            except Timeout as err:
                if call.cancelled:
                    raise _killed(cmd, err.out) from None
                raise Timeout({'message': str(err), 'cmd': cmd, 'out': err.out}) from None
            except RunError as err:
                raise RunError(cmd, err.out, str(err)) from None
            if call.cancelled:
                raise _killed(cmd, text)
            status = os.read(status_fd, 4096).decode('utf-8', 'replace')
            return _outcome(cmd, code, text, status)
        finally:
            os.close(status_fd)
            os.unlink(status_path)

    def _command_line(self, marker: str, argv: list[str], cwd: str) -> list[str]:
        launcher = [_PYTHON, '-I', '-S', '-c', _launcher_source(), marker, cwd, *argv]
        with self._lock:
            writable, devices = tuple(self._writable), tuple(self._devices)
        layout = Layout.seen_by_commands(self._hidden, writable, devices, self._tmp_bytes)
        return [self._bwrap, *mount_arguments(layout), *_ISOLATION, '--', *launcher]


def remove_status_files(pid: int) -> None:
    """Delete what status files session ``pid`` left in the temporary directory: a
    session killed while a sandboxed command ran had no chance to."""
    prefix = _status_prefix(pid)
    with contextlib.suppress(OSError), os.scandir(tempfile.gettempdir()) as entries:
        for entry in entries:
            if entry.name.startswith(prefix):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _status_prefix(pid: int) -> str:
    return f'{_STATUS_PREFIX}{pid}-'


_installed = Sandbox(False)
_launcher_text: str | None = None


def current() -> Sandbox:
    """The sandbox of this process: the one installed, else a disabled one."""
    return _installed


def install(sandbox: Sandbox) -> Sandbox:
    """Make ``sandbox`` the one ``current()`` returns; returns the one it replaces.

    A session calls this once at start, before it creates resources.
    """
    global _installed
    previous, _installed = _installed, sandbox
    return previous


def _launcher_source() -> str:
    global _launcher_text
    if _launcher_text is None:
        with open(_LAUNCHER_PATH, encoding='utf-8') as stream:
            _launcher_text = stream.read()
    return _launcher_text


def _outcome(cmd: str | list[str], code: int, output: str, status: str) -> tuple[int, str]:
    """The result of a command from the launcher's status line (see launcher.py)."""
    kind, _, detail = status.strip().partition(' ')
    if kind == 'exit':
        return int(detail), output
    if kind == 'signal':
        return -int(detail), output
    if kind == 'error':
        raise RunError(cmd, output, detail)
    if code < 0:  # the sandbox itself was killed from outside (the OOM killer, say)
        return code, output
    # The launcher never ran: bwrap said why on the terminal.
    raise RunError(cmd, output, f'cannot start the sandbox: {_one_line(output)}')


def _killed(cmd: str | list[str], output: str) -> Killed:
    return Killed({'message': f'command {cmd!r} was killed: the session is releasing '
                              'what it ran for', 'cmd': cmd, 'out': output})


def _kill_marked(markers: set[str], deadline: float) -> None:
    """SIGKILL the processes of the calls with these markers, and wait until they are gone.

    ``ave.cmd`` starts each call as a child of this process and the leader of a new
    session; the child's command line carries its marker (as an argument to bwrap or
    to the launcher). Everything in that session is killed: outside a sandbox, all the
    command started short of what made a session of its own; inside one, bwrap and the
    launcher too, and the launcher is the pid namespace's init, whose exit completes
    only once every process in the namespace is gone. Processes are held by pidfds
    while they are checked and signalled, so a recycled pid is never hit, and the
    wait is on those pidfds: when this returns (before ``deadline``) nothing of these
    calls is left.
    """
    doomed: list[int] = []
    try:
        for child in psutil.Process().children():
            pidfd = _pidfd(child.pid)
            if pidfd is None:
                continue
            if markers.isdisjoint(_command_line_of(child.pid)) or _has_exited(pidfd):
                os.close(pidfd)
                continue
            doomed.append(pidfd)
            doomed += _session_members(child.pid)
        for pidfd in doomed:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        _wait_exited(doomed, deadline)
    finally:
        for pidfd in doomed:
            os.close(pidfd)


def _kill_group(pid: int) -> None:
    """SIGKILL a plain command's process group (``ave.cmd`` makes it lead one)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _session_members(sid: int) -> list[int]:
    """pidfds of the processes in session ``sid`` other than its leader."""
    members = []
    for pid in psutil.pids():
        if pid == sid:
            continue
        pidfd = _pidfd(pid)
        if pidfd is None:
            continue
        try:
            if os.getsid(pid) == sid:
                members.append(pidfd)
                continue
        except ProcessLookupError:
            pass
        os.close(pidfd)
    return members


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _wait_exited(pidfds: list[int], deadline: float) -> None:
    poller = select.poll()
    for pidfd in pidfds:
        poller.register(pidfd, select.POLLIN)
    waiting = len(pidfds)
    while waiting and (left := deadline - time.monotonic()) > 0:
        for pidfd, _ in poller.poll(left * 1000):
            poller.unregister(pidfd)
            waiting -= 1


def _command_line_of(pid: int) -> list[str]:
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as stream:
            return stream.read().decode('utf-8', 'replace').split('\0')
    except OSError:
        return []


def _has_exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])


def _absolute(path: object, name: str) -> str:
    if not isinstance(path, str) or not os.path.isabs(path):
        raise ValueError(f'{name} must be an absolute path, got {path!r}')
    return os.path.realpath(path)


def _one_line(text: str, limit: int = 300) -> str:
    line = ' '.join(text.split())
    return line if len(line) <= limit else line[:limit - 3] + '...'

