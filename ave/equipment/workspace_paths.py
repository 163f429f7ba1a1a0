"""Paths a job names, resolved inside its workspace through directory descriptors.

A job's own processes may rename, replace or relink anything in its workspace at any
moment, also while the session is working on a path the job gave it. Checking where a
path leads (``realpath``) and then opening it leaves a window in which a link can be
swapped to point elsewhere, and a job that races for it wins now and then. So nothing
here opens a path by name from the root of the file system. ``Tree`` walks a path one
component at a time, each opened relative to the descriptor of the directory already
reached, with ``O_PATH | O_NOFOLLOW``: the object a step finds is the object the next
step starts from. Symbolic links are read and followed here, by the same rules: a
relative link continues from the directory that holds it, an absolute one must lead
into the tree, ``..`` returns to a directory already held and never above the top,
and at most ``MAX_LINKS`` links are followed per path.

Cost: one ``openat`` and ``fstat`` per component and one ``readlink`` per link, with
one descriptor held per directory level until the operation ends.

The rules are today's workspace rules: paths are relative to the workspace or absolute
inside it (starting with the path ``get_path()`` returns), links that stay inside are
fine, and anything that resolves outside raises ``PathError``.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from ave.exceptions import AveException

#: Symbolic links followed while resolving one path before giving up (as Linux does).
MAX_LINKS = 40

# Attempts at a fresh random name before giving up on creating a temporary file.
_NAME_ATTEMPTS = 100

_PATH_ONLY = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class WorkspaceError(AveException):
    """A workspace operation was refused or failed (file too large, bad archive, ...)."""


class PathError(WorkspaceError):
    """A path leads outside the workspace, or an archive member would land outside.

    ``path`` (also an attribute) is the offending value as the caller gave it.
    """


def text(value: object, name: str) -> str:
    """``value`` if it is a string fit for a path or argument, else a clear error."""
    if not isinstance(value, str):
        raise TypeError(f'{name} must be a str, not {type(value).__name__}')
    if '\0' in value:
        raise ValueError(f'{name} contains a NUL character: {value!r}')
    return value


def is_within(path: str, top: str) -> bool:
    """Whether the canonical ``path`` is ``top`` or below it (not merely a prefix)."""
    return path == top or path.startswith(top.rstrip('/') + '/')


@dataclass
class Found:
    """Where a path led. Descriptors are ``O_PATH`` and belong to the walk that made them.

    ``fd`` is the object itself, None when the path does not exist; then ``parent`` is
    the deepest directory that exists and ``missing`` the names below it, in order
    (``name`` is the first). Otherwise ``parent`` holds the object under ``name``
    (None for the top itself).
    """

    path: str
    fd: int | None
    parent: int | None
    name: str
    missing: list[str] = field(default_factory=list)

    def existing(self, given: str) -> int:
        """``fd``, or FileNotFoundError naming ``given`` when the path does not exist."""
        if self.fd is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), given)
        return self.fd


class Tree:
    """A directory that paths may not leave, held open as ``top_fd`` by the caller.

    ``top`` is its canonical path; ``what`` names it in errors ("the workspace").
    """

    def __init__(self, top: str, top_fd: int, what: str) -> None:
        self.top = top
        self.top_fd = top_fd
        self._what = what
        self._top_parts = _components(top)

    # --- resolving ---------------------------------------------------------------------

    @contextlib.contextmanager
    def resolve(self, given: str, label: str = 'path', follow: bool = True) -> Iterator[Found]:
        """Walk ``given``; yield where it led. ``follow`` False keeps a final link itself.

        Raises PathError (naming ``label``) for a path that leads outside,
        NotADirectoryError for one that goes through a file, OSError ELOOP after
        ``MAX_LINKS`` links. The descriptors in the Found close when the block ends.
        """
        opened: list[int] = []
        try:
            yield self._walk(text(given, label), label, follow, opened)
        finally:
            for fd in opened:
                os.close(fd)

    def _walk(self, given: str, label: str, follow: bool, opened: list[int]) -> Found:
        pending = deque(self._relative(given, given, label))
        stack: list[tuple[int, str]] = [(self.top_fd, '')]
        missing: list[str] = []
        links = 0
        while pending:
            name = pending.popleft()
            if name == '..':
                if missing:
                    missing.pop()
                elif len(stack) > 1:
                    stack.pop()
                else:
                    raise self.outside(label, given)
                continue
            if missing:
                missing.append(name)
                continue
            try:
                fd = os.open(name, _PATH_ONLY, dir_fd=stack[-1][0])
            except FileNotFoundError:
                missing.append(name)
                continue
            opened.append(fd)
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode) and (pending or follow):
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), given)
                target = os.readlink('', dir_fd=fd)
                if target.startswith('/'):
                    del stack[1:]
                pending.extendleft(reversed(self._relative(target, given, label)))
                continue
            if pending and not stat.S_ISDIR(mode):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), given)
            stack.append((fd, name))
        return self._found(stack, missing)

    def _found(self, stack: list[tuple[int, str]], missing: list[str]) -> Found:
        path = os.path.join(self.top, *(name for _, name in stack[1:]), *missing)
        if missing:
            return Found(path, None, stack[-1][0], missing[0], missing)
        parent = stack[-2][0] if len(stack) > 1 else None
        return Found(path, stack[-1][0], parent, stack[-1][1])

    def _relative(self, path: str, given: str, label: str) -> list[str]:
        """The components of ``path`` below the top; an absolute one must start there."""
        parts = _components(path)
        if not path.startswith('/'):
            return parts
        if parts[:len(self._top_parts)] != self._top_parts:
            raise self.outside(label, given)
        return parts[len(self._top_parts):]

    def outside(self, label: str, given: str) -> PathError:
        return PathError({'message': f'{label} {given!r} is outside {self._what} {self.top}',
                          'path': given})

    # --- operations ------------------------------------------------------------------------

    def canonical(self, given: str, label: str = 'path') -> str:
        """The canonical absolute path ``given`` names; it need not exist."""
        with self.resolve(given, label) as found:
            return found.path

    def stat(self, given: str, label: str = 'path',
             follow: bool = True) -> tuple[str, os.stat_result] | None:
        """``(canonical path, stat)`` of what ``given`` names, or None when nothing is there."""
        try:
            with self.resolve(given, label, follow) as found:
                return None if found.fd is None else (found.path, os.fstat(found.fd))
        except (NotADirectoryError, FileNotFoundError):
            return None

    def open_file(self, given: str, label: str = 'path', flags: int = os.O_RDONLY) -> int:
        """A descriptor of the regular file ``given`` opened with ``flags``; caller closes.

        Anything else (a directory, a FIFO that would block a reader) is refused
        before it is opened for real.
        """
        with self.resolve(given, label) as found:
            return _reopen_regular(found.existing(given), given, flags)

    def open_directory(self, given: str, label: str = 'path') -> tuple[int, str]:
        """``(readable descriptor, canonical path)`` of the directory ``given``; caller closes."""
        with self.resolve(given, label) as found:
            fd = os.open('.', os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                         dir_fd=_directory(found.existing(given), given))
            return fd, found.path

    def create_unique(self, given: str, label: str = 'path',
                      directory: bool = False) -> tuple[int | None, str]:
        """Create a new file (or directory) with a fresh name in the directory ``given``.

        Returns ``(descriptor open for writing, path)`` for a file, ``(None, path)``
        for a directory. The new entry is private to the account running AVE.
        """
        with self.resolve(given, label) as found:
            parent = _directory(found.existing(given), given)
            for _ in range(_NAME_ATTEMPTS):
                name = 'tmp' + secrets.token_hex(4)
                try:
                    if directory:
                        os.mkdir(name, 0o700, dir_fd=parent)
                        return None, os.path.join(found.path, name)
                    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=parent)
                    return fd, os.path.join(found.path, name)
                except FileExistsError:
                    continue
        raise FileExistsError(errno.EEXIST, 'no free temporary name', given)

    def open_for_writing(self, given: str, label: str = 'path') -> tuple[int, str, bool]:
        """``(descriptor, path, created)`` of the regular file ``given``, emptied or new.

        The directory it goes in must exist; a link at ``given`` is followed inside the
        tree. ``created`` says whether the file is new (for clean-up on failure).
        """
        with self.resolve(given, label) as found:
            if found.fd is not None:
                fd = _reopen_regular(found.fd, given, os.O_WRONLY)
                os.ftruncate(fd, 0)
                return fd, found.path, False
            if len(found.missing) > 1:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), given)
            fd = os.open(found.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o666, dir_fd=found.parent)
            return fd, found.path, True

    def make_directories(self, given: str, label: str = 'path') -> tuple[int, str, list[str]]:
        """``(O_PATH descriptor, path, created)`` of directory ``given``, made if missing.

        Like ``mkdir -p``; ``created`` lists the paths of the directories made, top
        down. The caller closes the descriptor.
        """
        with self.resolve(given, label) as found:
            if found.fd is not None:
                return os.dup(_directory(found.fd, given)), found.path, []
            parent = os.dup(_directory(found.parent, given))
            base = _ancestor(found.path, len(found.missing))
            made = []
            for depth, name in enumerate(found.missing):
                try:
                    os.mkdir(name, 0o777, dir_fd=parent)
                    made.append(os.path.join(base, *found.missing[:depth + 1]))
                except FileExistsError:
                    pass  # made meanwhile: opened (without following) like any other
                try:
                    child = os.open(name, _PATH_ONLY | os.O_DIRECTORY, dir_fd=parent)
                finally:
                    os.close(parent)
                parent = child
            return parent, found.path, made

    def remove(self, given: str, label: str = 'path') -> None:
        """Delete the file, link or empty directory ``given`` (never what a link leads to)."""
        with self.resolve(given, label, follow=False) as found:
            fd = found.existing(given)
            if found.parent is None:
                raise ValueError(f'{label} {given!r} is the top of {self._what}')
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.rmdir(found.name, dir_fd=found.parent)
            else:
                os.unlink(found.name, dir_fd=found.parent)


def _components(path: str) -> list[str]:
    return [part for part in path.split('/') if part not in ('', '.')]


def _ancestor(path: str, levels: int) -> str:
    for _ in range(levels):
        path = os.path.dirname(path)
    return path


def _directory(fd: int | None, given: str) -> int:
    """``fd`` if it is a directory, else NotADirectoryError naming ``given``."""
    if fd is None or not stat.S_ISDIR(os.fstat(fd).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), given)
    return fd


def _reopen_regular(fd: int, given: str, flags: int) -> int:
    """Open the regular file behind the ``O_PATH`` descriptor ``fd`` for real.

    ``/proc/self/fd/N`` leads to exactly the object ``fd`` holds, whatever has
    happened to its name since.
    """
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise WorkspaceError(f'{given!r} is not a regular file')
    return os.open(f'/proc/self/fd/{fd}', flags | os.O_CLOEXEC | os.O_NOCTTY)


# --- deleting a whole workspace ----------------------------------------------------

def remove_tree(path: str) -> bool:
    """Delete the directory ``path`` with everything in it; False if nothing was there.

    Links are removed, never followed, so a link to a directory outside leaves that
    directory alone; a ``path`` that became a link or a file is simply unlinked.
    Directories the job made unreadable or unwritable are opened up first, each
    through a descriptor of the directory itself, so that a job swapping a directory
    for a link cannot redirect the change of mode.
    """
    parent_path, name = os.path.split(path)
    try:
        parent = os.open(parent_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        try:
            mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(mode):
            os.unlink(name, dir_fd=parent)
            return True
        _allow_owner(name, parent)
        for _, dirnames, _, dirfd in os.fwalk(name, dir_fd=parent, follow_symlinks=False):
            for child in dirnames:
                _allow_owner(child, dirfd)
        shutil.rmtree(name, dir_fd=parent)
        return True
    finally:
        os.close(parent)


def _allow_owner(name: str, dir_fd: int) -> None:
    """Give the owner full access to the directory ``name`` (a link is left alone)."""
    try:
        fd = os.open(name, _PATH_ONLY, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode) and mode & 0o700 != 0o700:
            os.chmod(f'/proc/self/fd/{fd}', stat.S_IMODE(mode) | 0o700)
    finally:
        os.close(fd)
