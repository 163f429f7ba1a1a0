"""Workspaces: a private directory for each allocation, gone when it is released.

A test job that asks for ``{'type': 'workspace'}`` gets a directory of its own under
the ``root`` named in workspace.json, where it can keep files, unpack archives, check
out source code and run commands. Nothing survives the allocation: the session
deletes the directory when the job lets go of it or disappears.

The broker only makes up a profile with a fresh ``uid`` (no disk access on its loop);
the directory ``<root>/<uid>`` is created and deleted by the session process.

Every path a job passes may be relative (to the workspace directory) or absolute
(starting with the path ``get_path()`` returns), and must resolve inside the
workspace once symbolic links are followed; anything else is refused with
``PathError``. Paths are resolved through directory descriptors
(``ave.equipment.workspace_paths``), so a job swapping links meanwhile cannot make the
session read or write outside. Commands (``run``, git) run in the session's sandbox
(``ave.sandbox``), where this workspace is writable and other jobs' workspaces and the
broker's files are not there at all.

workspace.json ``limits`` caps what one ``unzip`` may write: ``unzip_max_bytes``
(default 4 GiB in total) and ``unzip_max_entries`` (default 100,000 members).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from fnmatch import fnmatchcase

from ave import sandbox
from ave.config import (DEFAULT_UNZIP_MAX_BYTES, DEFAULT_UNZIP_MAX_ENTRIES,
                        load_workspace_config)
from ave.equipment import REPLY_LIMIT, EquipmentType, Resource, fitted_to_reply
from ave.equipment.workspace_archive import UnzipLimits, pack, unpack
from ave.equipment.workspace_paths import (PathError, Tree, WorkspaceError, remove_tree,
                                           text as _text)
from ave.exceptions import RunError
from ave.profile import Profile

__all__ = ['REPLY_LIMIT', 'WORKSPACE', 'MissingTool', 'PathError', 'Workspace',
           'WorkspaceError', 'WorkspaceProfile', 'WorkspaceType']

_log = logging.getLogger(__name__)


#: What ``path_exists`` can be asked to check, by the file type bits it wants.
_FILE_TYPES = {'file': stat.S_ISREG, 'directory': stat.S_ISDIR, 'symlink': stat.S_ISLNK}

# Smallest time slice handed to a git step once an overall deadline has passed, so
# that the step times out at once (a timeout of 0 would mean "no limit").
_EXPIRED = 0.001

# Workspaces made on demand are named with this many random bytes, as hex digits; a
# start's sweep removes only directories named so.
_UID_BYTES = 8
_MADE_UP_UID = re.compile(f'[0-9a-f]{{{2 * _UID_BYTES}}}')

# The only transports git may use for a job. Without this list a URL such as
# "ext::sh -c ..." makes git run a command of the job's choosing.
_GIT_PROTOCOLS = 'file:git:http:https:ssh'


class MissingTool(WorkspaceError):
    """A program the operation needs is not configured or not executable."""


class WorkspaceProfile(Profile):
    """A workspace's profile; ``uid`` (also its directory name) tells two apart."""

    identity = 'uid'


class Workspace(Resource):
    """One workspace directory as the session of its holder serves it.

    The public methods are exactly the RPCs a test job may call. Paths returned are
    absolute and canonical (symbolic links resolved).
    """

    def __init__(self, profile: Profile, settings: dict) -> None:
        super().__init__(profile, settings)
        # The uid becomes a directory name that _teardown deletes: a uid with a
        # slash or '..' in it must never get that far.
        uid = _check_uid(profile.get('uid'))
        self._path = os.path.join(os.path.realpath(settings['root']), uid)
        self._tools: dict[str, str] = dict(settings.get('tools') or {})
        limits = settings.get('limits') or {}
        self._unzip_limits = UnzipLimits(
            limits.get('unzip_max_bytes', DEFAULT_UNZIP_MAX_BYTES),
            limits.get('unzip_max_entries', DEFAULT_UNZIP_MAX_ENTRIES))

    # --- life cycle (session only) -----------------------------------------------

    def _setup(self, tainted: bool = True) -> None:
        """Create the workspace directory, private to the account running AVE.

        Every workspace is new, so what happened to earlier ones does not matter.
        The session's sandbox then lets commands write here.
        """
        os.makedirs(os.path.dirname(self._path), exist_ok=True)
        try:
            os.mkdir(self._path, 0o700)
        except FileExistsError:
            raise WorkspaceError(f'workspace directory {self._path} already exists; '
                                 'refusing to share it with another allocation') from None
        sandbox.current().allow_write(self._path)
        _log.debug('created workspace %s', self._path)

    def _teardown(self) -> None:
        """Stop this workspace's commands, then delete it and everything in it.

        Commands first, so that none is still writing while the tree goes. Symbolic
        links are removed, never followed; directories the job made unwritable or
        unreadable are opened up first so that nothing is left behind.
        """
        box = sandbox.current()
        box.kill(self)
        box.disallow(self._path)
        if remove_tree(self._path):
            _log.debug('deleted workspace %s', self._path)

    # --- RPCs ------------------------------------------------------------------------

    def get_path(self) -> str:
        """The absolute path of the workspace directory."""
        return self._path

    def make_tempdir(self) -> str:
        """Create a new, empty directory with a unique name in the workspace."""
        with self._tree() as tree:
            return tree.create_unique('.', directory=True)[1]

    def make_tempfile(self, path: str | None = None) -> str:
        """Create a new, empty file with a unique name in the directory ``path``.

        ``path`` defaults to the workspace directory itself.
        """
        with self._tree() as tree:
            fd, name = tree.create_unique('.' if path is None else path)
        if fd is not None:
            os.close(fd)
        return name

    def write_tempfile(self, data: str) -> str:
        """Create a new file in the workspace holding ``data`` as UTF-8; return its path.

        The text is written exactly as given (no newline translation).
        """
        _text(data, 'data')
        with self._tree() as tree:
            fd, name = tree.create_unique('.')
        assert fd is not None  # a file, not a directory, was asked for
        with open(fd, 'w', encoding='utf-8', newline='') as stream:
            stream.write(data)
        return name

    def cat(self, path: str) -> str:
        """The content of the regular file ``path`` as text (invalid UTF-8 replaced).

        Files too large for one RPC reply (about 16 MiB, less for text that JSON has
        to escape) are refused with WorkspaceError rather than read: copy them
        elsewhere with ``run()``, or compare them with ``get_checksum()``.
        """
        with self._tree() as tree:
            fd = tree.open_file(path)
        with open(fd, 'rb') as stream:
            _refuse_large(path, os.fstat(stream.fileno()).st_size)
            data = stream.read(REPLY_LIMIT + 1)  # the file may still be growing
        _refuse_large(path, len(data))
        text = data.decode('utf-8', 'replace')
        _fit_reply(text, f'the content of {path!r}')
        return text

    def ls(self, path: str, globstr: str = '*') -> list[str]:
        """Sorted names in the directory ``path`` that match the shell pattern ``globstr``.

        As in the shell, ``*`` does not match names that start with a dot; ask for
        ``.*`` to see those. The pattern matches names in ``path`` only, so it may
        not contain ``/``.
        """
        _text(path, 'path')
        if '/' in _text(globstr, 'globstr'):
            raise ValueError(f'globstr {globstr!r} may not contain "/": it matches '
                             'names within path')
        with self._tree() as tree:
            try:
                fd, _ = tree.open_directory(path)
            except (FileNotFoundError, NotADirectoryError):
                raise NotADirectoryError(f'{path!r} is not a directory') from None
        try:
            names = os.listdir(fd)
        finally:
            os.close(fd)
        if not globstr.startswith('.'):
            names = [name for name in names if not name.startswith('.')]
        return sorted(name for name in names if fnmatchcase(name, globstr))

    def path_exists(self, path: str, file_type: str | None = None) -> bool:
        """Whether ``path`` exists, and when ``file_type`` is given, is of that type.

        ``file_type`` is None (anything), 'file', 'directory' or 'symlink'. Only the
        'symlink' check looks at a link itself; the others follow it, so asking them
        about a link that leads outside the workspace raises PathError.
        """
        if file_type is not None and file_type not in tuple(_FILE_TYPES):
            raise ValueError(f'file_type must be None, {", ".join(map(repr, _FILE_TYPES))}; '
                             f'got {file_type!r}')
        with self._tree() as tree:
            try:
                found = tree.stat(path, follow=file_type != 'symlink')
            except OSError:  # a loop of links leads nowhere
                return False
        if found is None:
            return False
        return file_type is None or _FILE_TYPES[file_type](found[1].st_mode)

    def get_checksum(self, path: str) -> str:
        """The SHA-256 digest of the regular file ``path``, as 64 hex digits.

        SHA-256 rather than MD5 so that a matching digest means an identical file
        even when someone might have crafted a collision.
        """
        with self._tree() as tree:
            fd = tree.open_file(path)
        with open(fd, 'rb') as stream:
            return hashlib.file_digest(stream, 'sha256').hexdigest()

    def has_tool(self, name: str) -> bool:
        """Whether the program ``name`` can be run by the methods that need it.

        A tool listed in workspace.json ``tools`` is available when that file is
        executable; the configured path is then the only one considered, so a broken
        configuration shows up here instead of being papered over. A tool not listed
        is looked up on the session's PATH.
        """
        return self._find_tool(_tool_name(name)) is not None

    def run(self, cmd: str | list[str], timeout: float = 0) -> tuple[int, str]:
        """Run ``cmd`` in the workspace directory; return ``(exit_code, output)``.

        This is ``ave.cmd.run`` inside the session's sandbox: ``cmd`` is a list of
        arguments or a string split on whitespace (no shell), output is stdout and
        stderr as the terminal showed them (lines end in CR LF), ``timeout`` 0 means
        none, and ``Timeout`` (with ``out``) or ``RunError`` report a command that
        hung or could not start. Processes the command leaves behind are killed when
        it returns. Output larger than one reply can carry is cut to its end, after
        one line saying how much was left out: redirect it to a file to keep it all.
        """
        exit_code, output = sandbox.current().run(cmd, timeout=timeout, cwd=self._path,
                                                  owner=self, max_output=REPLY_LIMIT)
        return exit_code, fitted_to_reply(output)

    def zip(self, path: str, dst: str | None = None) -> str:
        """Pack the file or directory ``path`` into a zip archive; return its path.

        A directory's archive holds its content (paths relative to ``path``, empty
        directories included); a file's holds that one file. ``dst`` defaults to
        ``<path>.zip`` (``<workspace>/<uid>.zip`` for the workspace itself) and is
        replaced if it exists. Symbolic links are stored as the files they point to,
        which must be in the workspace; links to directories are refused, because
        they can form loops.
        """
        with self._tree() as tree:
            return pack(tree, _text(path, 'path'), dst)

    def unzip(self, path: str, dst: str | None = None) -> str:
        """Extract the zip archive ``path`` into the directory ``dst``; return ``dst``.

        ``dst`` defaults to a new directory in the workspace and is created if
        missing. The whole archive is checked before anything is written: more
        members or more bytes than workspace.json ``limits`` allow, absolute member
        names, ``..`` components, symbolic links and members that would pass through
        an existing link out of ``dst`` are refused. A member that unpacks to more
        than it declared, or a full disk, stops the extraction and removes what it
        wrote. File permission bits stored in the archive are restored.
        """
        with self._tree() as tree:
            return unpack(tree, _text(path, 'path'), dst, self._unzip_limits)

    def make_git(self, path: str) -> str:
        """Make ``path`` (created if missing) a git repository; return its path.

        Running it on an existing repository is harmless.
        """
        full = self._canonical(path)
        self._git_ok(['init', '--quiet', full], f'creating a git repository at {path!r}')
        return full

    def has_git(self, path: str, refspec: str) -> bool:
        """Whether the repository at ``path`` holds the commit ``refspec`` names.

        ``refspec`` is anything git resolves to a commit: a hash (full or
        abbreviated), a branch or a tag. False when ``path`` is not the top of a
        repository: a directory inside someone else's checkout does not count.
        """
        full = self._canonical(path)
        _check_refspec(refspec)
        with self._tree() as tree:
            if tree.stat(os.path.join(full, '.git'), follow=False) is None:
                return False
        exit_code, _ = self._git(['-C', full, 'cat-file', '-e', f'{refspec}^{{commit}}'])
        return exit_code == 0

    def download_git(self, src: str, refspec: str, dst: str | None = None,
                     timeout: float = 0, depth: int = 1) -> str:
        """Fetch ``refspec`` from the repository ``src`` and check it out in ``dst``.

        ``src`` is whatever git accepts as a remote over file, git, http, https or
        ssh (``ext::`` and other transports that run commands are refused): a URL or
        a local path (relative to the workspace). Git runs in the session's sandbox,
        so a local ``src`` must be visible there. ``refspec`` is a branch, a tag or
        a commit hash. ``dst`` defaults to a new directory in the workspace; an
        existing repository there is updated. Only the last ``depth`` commits are
        fetched (0: the whole history). ``timeout`` (seconds, 0: none) covers the
        whole download. Returns ``dst``; the checkout is detached at the fetched
        commit. Git failures raise RunError with git's output.
        """
        _check_src(src)
        _check_refspec(refspec)
        _check_depth(depth)
        _check_timeout(timeout)
        target = self._canonical(dst, 'dst') if dst is not None else None
        self._tool('git')  # fail before making a directory that would stay empty
        if target is None:
            target = self.make_tempdir()
        deadline = time.monotonic() + timeout if timeout else None
        for args, doing in _download_steps(src, refspec, target, depth):
            self._git_ok(args, doing, _time_left(deadline))
        return target

    # --- helpers -------------------------------------------------------------------

    @contextlib.contextmanager
    def _tree(self) -> Iterator[Tree]:
        """The workspace held open for one operation, paths resolved from there."""
        fd = os.open(self._path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            yield Tree(self._path, fd, 'the workspace')
        finally:
            os.close(fd)

    def _canonical(self, path: str, name: str = 'path') -> str:
        """Where ``path`` leads (it need not exist yet), for a command to use."""
        with self._tree() as tree:
            return tree.canonical(path, name)

    def _find_tool(self, name: str) -> str | None:
        configured = self._tools.get(name)
        if configured is None:
            return shutil.which(name)
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured
        return None

    def _tool(self, name: str) -> str:
        """The program to run for ``name``, or MissingTool saying why there is none."""
        found = self._find_tool(name)
        if found is not None:
            return found
        if name in self._tools:
            raise MissingTool(f'{name} is configured as {self._tools[name]!r} in '
                              'workspace.json "tools", which is not an executable file')
        raise MissingTool(f'{name} is not configured in workspace.json "tools" and '
                          'not found on PATH')

    def _git(self, args: list[str], timeout: float = 0) -> tuple[int, str]:
        """Run git in the sandbox: the job controls the repositories' configuration
        (hooks, ``core.fsmonitor``, ...), so git may run anything it chooses there.

        GIT_TERMINAL_PROMPT=0: the command has a terminal, and a repository that
        wants a password must fail at once instead of waiting for a reply.
        """
        argv = ['env', 'GIT_TERMINAL_PROMPT=0', f'GIT_ALLOW_PROTOCOL={_GIT_PROTOCOLS}',
                self._tool('git'), '--no-pager', *args]
        return sandbox.current().run(argv, timeout=timeout, cwd=self._path, owner=self)

    def _git_ok(self, args: list[str], doing: str, timeout: float = 0) -> str:
        exit_code, output = self._git(args, timeout)
        if exit_code != 0:
            raise RunError(['git', *args], output, f'{doing} failed: git exited with '
                                                   f'{exit_code}: {output.strip()[-400:]}')
        return output


class WorkspaceType(EquipmentType):
    """Workspaces are made on demand: each request for one gets a new directory."""

    name = 'workspace'
    profile_class = WorkspaceProfile
    resource_class = Workspace
    on_demand = True
    sweeps = True

    def load_settings(self, home: str) -> dict:
        """The checked content of ``<home>/.ave/config/workspace.json``."""
        return load_workspace_config(home)

    def validate_entry(self, entry: dict) -> None:
        """A workspace declared in broker.json needs a uid usable as a directory name."""
        super().validate_entry(entry)
        _check_uid(entry['uid'])

    def sweep(self, settings: dict, keep: set[str]) -> None:
        """Delete the workspace directories a crash left in the root, but those in
        ``keep``. Only names this type makes up (sixteen hex digits) are touched: the
        root is the lab owner's choice, and might hold other things too."""
        root = os.path.realpath(settings['root'])
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            return
        for name in names:
            if _MADE_UP_UID.fullmatch(name) and name not in keep:
                if remove_tree(os.path.join(root, name)):
                    _log.info('removed workspace %s: no session owns it', name)

    def create(self, settings: dict) -> WorkspaceProfile:
        """A profile for a brand-new workspace; the directory comes later, in the session.

        This runs on the broker loop, so it touches no disk. Sixteen random hex
        digits make a clash with a live workspace practically impossible, and
        ``_setup`` refuses an existing directory should one happen anyway.
        """
        values = {'type': self.name, 'uid': secrets.token_hex(_UID_BYTES)}
        if settings.get('pretty') is not None:
            values['pretty'] = settings['pretty']
        return WorkspaceProfile(values)


#: The plug-in instance published through the ``ave.equipment`` entry point.
WORKSPACE = WorkspaceType()


# --- checks and helpers that need no workspace ------------------------------------

def _check_uid(value: object) -> str:
    uid = _text(value, 'uid')
    if uid in ('', '.', '..') or '/' in uid:
        raise ValueError(f'uid {uid!r} cannot be a directory name: it must be '
                         'non-empty, not "." or "..", and without "/"')
    return uid


def _tool_name(value: object) -> str:
    name = _text(value, 'name')
    if '/' in name or not name:
        raise ValueError(f'name {name!r} must be a program name, not a path')
    return name


def _check_src(value: object) -> None:
    # A leading '-' would reach git as an option.
    src = _text(value, 'src')
    if src.startswith('-'):
        raise ValueError(f'src {src!r} may not start with "-"')


def _check_refspec(value: object) -> None:
    # A leading '-' would reach git as an option.
    refspec = _text(value, 'refspec')
    if not refspec or refspec.startswith('-'):
        raise ValueError(f'refspec {refspec!r} must be non-empty and may not start '
                         'with "-"')


def _check_depth(depth: object) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f'depth must be an int, not {type(depth).__name__}')
    if depth < 0:
        raise ValueError(f'depth must be >= 0 (0: the whole history), not {depth}')


def _check_timeout(timeout: object) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f'timeout must be a number of seconds, not {type(timeout).__name__}')
    if not 0 <= timeout < float('inf'):
        raise ValueError(f'timeout must be finite and >= 0 (0: none), not {timeout}')


def _download_steps(src: str, refspec: str, target: str,
                    depth: int) -> list[tuple[list[str], str]]:
    """The git commands of ``download_git``, each with what it does (for errors)."""
    shallow = ['--depth', str(depth)] if depth else []
    # --git-dir rather than -C for the fetch: git then reads a relative src from its
    # working directory, the workspace, as download_git promises.
    git_dir = os.path.join(target, '.git')
    return [
        (['init', '--quiet', target], f'creating a git repository at {target}'),
        ([f'--git-dir={git_dir}', 'fetch', '--quiet', *shallow, '--', src, refspec],
         f'fetching {refspec!r} from {src!r}'),
        (['-C', target, 'checkout', '--quiet', '--detach', 'FETCH_HEAD'],
         f'checking out {refspec!r} in {target}'),
    ]


def _time_left(deadline: float | None) -> float:
    """The timeout for the next step of a job with an overall ``deadline`` (0: none)."""
    if deadline is None:
        return 0
    return max(deadline - time.monotonic(), _EXPIRED)


def _refuse_large(path: str, size: int) -> None:
    if size > REPLY_LIMIT:
        raise WorkspaceError(f'{path!r} holds {size} bytes, more than one reply can '
                             f'carry ({REPLY_LIMIT} bytes)')


def _fit_reply(text: str, what: str) -> None:
    """Refuse ``text`` as a result if its JSON form would not fit in one reply."""
    size = len(json.dumps(text))  # ASCII only, so characters are bytes on the wire
    if size > REPLY_LIMIT:
        raise WorkspaceError(f'{what} takes {size} bytes as JSON, more than one reply '
                             f'can carry ({REPLY_LIMIT} bytes)')

