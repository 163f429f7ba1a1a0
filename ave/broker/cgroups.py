"""A control group per session, where the broker was given a cgroup subtree to manage.

A sandboxed command cannot outlive its session's pid namespace, but a command run
plainly (isolation off, or no bwrap on the host) can leave processes behind that no
process group reaches: ``setsid``, double forks, daemons. A cgroup holds every
descendant whatever it does, and the kernel kills them all at once (``cgroup.kill``).
So the broker puts each session, and with it everything the session starts, in a
cgroup of its own, and kills whatever is left there when the session has ended.

Only a delegated cgroup is used (systemd's ``Delegate=yes``): systemd manages every
other one, and a process making groups there would fight it. Delegated means that
systemd marked it so (the ``trusted.delegate`` or ``user.delegate`` attribute), or,
for a broker that is not root, that it may write to it (systemd hands a delegated
unit's cgroup to the unit's user; the packaged broker starts as root and hands it to
its account with ``hand_to`` before dropping root). Nothing here is fatal: without a
cgroup, sessions still kill their commands' process groups.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Callable

log = logging.getLogger(__name__)

PREFIX = 'session-'
#: The files a delegated cgroup's owner must be able to write (as systemd chowns them).
DELEGATED_FILES = ('cgroup.procs', 'cgroup.threads', 'cgroup.subtree_control')
#: How often, and how far apart, removing a group is retried while its processes die.
REMOVE_TRIES = 50
REMOVE_INTERVAL = 0.1


def own_cgroup() -> str | None:
    """The directory of this process's cgroup v2, or None on a host without one."""
    try:
        with open('/proc/self/cgroup', encoding='utf-8') as stream:
            relative = next((line[3:].strip() for line in stream if line.startswith('0::')),
                            None)
        mount = _cgroup2_mount()
    except OSError:
        return None
    if relative is None or mount is None or relative.endswith(' (deleted)'):
        return None
    return os.path.join(mount, relative.lstrip('/'))


def _cgroup2_mount() -> str | None:
    with open('/proc/self/mountinfo', encoding='utf-8') as stream:
        for line in stream:
            fields = line.split()
            separator = fields.index('-') if '-' in fields else -1
            if separator > 0 and fields[separator + 1] == 'cgroup2' and fields[3] == '/':
                return fields[4]
    return None


def delegated(path: str | None) -> str | None:
    """Why ``path`` is not a cgroup this process may manage; None if it is."""
    if path is None:
        return 'this host has no cgroup v2 hierarchy'
    if not _marked_delegated(path) and not (
            os.geteuid() != 0 and all(os.access(os.path.join(path, name), os.W_OK)
                                      for name in ('', *DELEGATED_FILES))):
        return f'{path} is not delegated to the broker (systemd: Delegate=yes)'
    if not os.path.exists(os.path.join(path, 'cgroup.kill')):
        return 'the kernel has no cgroup.kill (Linux 5.14 or later)'
    return None


def _marked_delegated(path: str) -> bool:
    for name in ('trusted.delegate', 'user.delegate'):
        with contextlib.suppress(OSError):
            if os.getxattr(path, name) == b'1':
                return True
    return False


def hand_to(uid: int, gid: int) -> None:
    """Give this process's delegated cgroup to the account root is about to become."""
    path = own_cgroup()
    if path is None or delegated(path) is not None:
        return
    try:
        for name in ('', *DELEGATED_FILES):
            os.chown(os.path.join(path, name), uid, gid)
    except OSError as error:
        log.warning('cannot hand the cgroup %s to uid %d: %s', path, uid, error)


class SessionGroups:
    """One cgroup per session under ``parent``; without a parent, nothing is done."""

    def __init__(self, parent: str | None) -> None:
        self.parent = parent

    @classmethod
    def find(cls) -> SessionGroups:
        """The groups under this process's cgroup if it is delegated; says which."""
        path = own_cgroup()
        problem = delegated(path)
        if problem is None:
            log.info('each session runs in a cgroup of its own under %s', path)
            return cls(path)
        log.info('sessions get no cgroups (%s): a plain command\'s setsid or daemon '
                 'children may outlive their session', problem)
        return cls(None)

    def place(self, pid: int) -> None:
        """Move a new session, before it runs anything, into a group of its own."""
        if self.parent is None:
            return
        path = self._path(pid)
        try:
            os.makedirs(path, exist_ok=True)
            _write(os.path.join(path, 'cgroup.procs'), str(pid))
        except OSError as error:
            log.warning('session %d stays in the broker\'s cgroup: %s', pid, error)

    def ended(self, pid: int, call_later: Callable[[float, Callable[[], None]], object]
              ) -> None:
        """Kill what session ``pid`` left running, then remove its group when empty."""
        if self.parent is None or not os.path.isdir(self._path(pid)):
            return
        self._empty(self._path(pid), call_later, REMOVE_TRIES)

    def sweep(self, call_later: Callable[[float, Callable[[], None]], object]) -> None:
        """At start: empty the groups whose session is gone (a crash's leftovers).

        A group that still holds its session is left alone: the session outlived a
        crash and is about to be adopted, or ends by itself, reported through ended().
        """
        if self.parent is None:
            return
        for name in os.listdir(self.parent):
            suffix = name[len(PREFIX):]
            if not (name.startswith(PREFIX) and suffix.isdigit()):
                continue
            path = os.path.join(self.parent, name)
            if int(suffix) not in _members(path):
                self._empty(path, call_later, REMOVE_TRIES)

    def _path(self, pid: int) -> str:
        assert self.parent is not None
        return os.path.join(self.parent, f'{PREFIX}{pid}')

    def _empty(self, path: str, call_later: Callable[[float, Callable[[], None]], object],
               tries: int) -> None:
        if _members(path):
            _kill_members(path)
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return
        except OSError as error:
            if tries > 1:
                call_later(REMOVE_INTERVAL, lambda: self._empty(path, call_later, tries - 1))
            else:
                log.warning('cannot remove the session cgroup %s: %s', path, error)


def _members(path: str) -> set[int]:
    try:
        with open(os.path.join(path, 'cgroup.procs'), encoding='ascii') as stream:
            return {int(line) for line in stream if line.strip().isdigit()}
    except OSError:
        return set()


def _kill_members(path: str) -> None:
    try:
        _write(os.path.join(path, 'cgroup.kill'), '1')
    except OSError as error:
        log.warning('cannot kill what is left in %s: %s', path, error)
        for pid in _members(path):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _write(path: str, text: str) -> None:
    with open(path, 'w', encoding='ascii') as stream:
        stream.write(text)
