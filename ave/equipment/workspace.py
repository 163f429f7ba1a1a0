"""Workspaces: a private directory for each allocation, gone when it is released.

A test job that asks for ``{'type': 'workspace'}`` gets a directory of its own under
the ``root`` named in workspace.json, where it can keep files, unpack archives, check
out source code and run commands. Nothing survives the allocation: the session
deletes the directory when the job lets go of it or disappears.

The broker only makes up a profile with a fresh ``uid`` (no disk access on its loop);
the directory ``<root>/<uid>`` is created and deleted by the session process.

Every path a job passes may be relative (to the workspace directory) or absolute, and
must resolve inside the workspace once symbolic links are followed; anything else is
refused with ``PathError``. The rule is there so that a job's mistake (a wrong
``..``, a link into a shared tree) cannot damage what the lab keeps elsewhere. It is
not a sandbox: ``run()`` executes arbitrary commands as the broker's account.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
import time
import zipfile

from ave.cmd import run as run_command
from ave.config import load_workspace_config
from ave.equipment import EquipmentType, Resource
from ave.exceptions import AveException, RunError
from ave.network.framing import DEFAULT_LIMIT
from ave.profile import Profile

_log = logging.getLogger(__name__)

#: The most a reply may carry as encoded JSON text. A reply over the frame limit
#: would be refused by the Control anyway, but only after the whole file had been
#: read into memory; checking first turns a 10 GB ``cat`` into a quick, clear error.
#: The margin leaves room for the reply's envelope.
REPLY_LIMIT = DEFAULT_LIMIT - 64 * 1024

#: What ``path_exists`` can be asked to check, and how.
_FILE_TYPES = {'file': os.path.isfile, 'directory': os.path.isdir,
               'symlink': os.path.islink}

# Mode bits unzip restores on extracted files: permissions only, never set-id bits.
_PERMISSION_BITS = 0o777

# Smallest time slice handed to a git step once an overall deadline has passed, so
# that the step times out at once (a timeout of 0 would mean "no limit").
_EXPIRED = 0.001


class WorkspaceError(AveException):
    """A workspace operation was refused or failed (file too large, bad archive, ...)."""


class PathError(WorkspaceError):
    """A path leads outside the workspace, or an archive member would land outside.

    ``path`` (also an attribute) is the offending value as the caller gave it.
    """


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
        uid = profile.get('uid')
        # The uid becomes a directory name that _teardown deletes: a uid with a
        # slash or '..' in it must never get that far.
        _check_uid(uid)
        self._path = os.path.join(os.path.realpath(settings['root']), uid)
        self._tools: dict[str, str] = dict(settings.get('tools') or {})

    # --- life cycle (session only) -----------------------------------------------

    def _setup(self, tainted: bool = True) -> None:
        """Create the workspace directory, private to the account running AVE.

        Every workspace is new, so what happened to earlier ones does not matter.
        """
        os.makedirs(os.path.dirname(self._path), exist_ok=True)
        try:
            os.mkdir(self._path, 0o700)
        except FileExistsError:
            raise WorkspaceError(f'workspace directory {self._path} already exists; '
                                 'refusing to share it with another allocation') from None
        _log.debug('created workspace %s', self._path)

    def _teardown(self) -> None:
        """Delete the workspace directory and everything in it.

        Symbolic links are removed, never followed, so a link to a directory outside
        leaves that directory alone. Directories the job made unwritable or
        unreadable are opened up first so that nothing is left behind.
        """
        if not os.path.lexists(self._path):
            return
        if os.path.islink(self._path) or not os.path.isdir(self._path):
            os.unlink(self._path)
            return
        _open_up_directories(self._path)
        shutil.rmtree(self._path)
        _log.debug('deleted workspace %s', self._path)

    # --- RPCs ------------------------------------------------------------------------

    def get_path(self) -> str:
        """The absolute path of the workspace directory."""
        return self._path

    def make_tempdir(self) -> str:
        """Create a new, empty directory with a unique name in the workspace."""
        return tempfile.mkdtemp(dir=self._path)

    def make_tempfile(self, path: str | None = None) -> str:
        """Create a new, empty file with a unique name in the directory ``path``.

        ``path`` defaults to the workspace directory itself.
        """
        directory = self._path if path is None else self._resolve(path)
        fd, name = tempfile.mkstemp(dir=directory)
        os.close(fd)
        return name

    def write_tempfile(self, data: str) -> str:
        """Create a new file in the workspace holding ``data`` as UTF-8; return its path.

        The text is written exactly as given (no newline translation).
        """
        _text(data, 'data')
        fd, name = tempfile.mkstemp(dir=self._path)
        with open(fd, 'w', encoding='utf-8', newline='') as stream:
            stream.write(data)
        return name

    def cat(self, path: str) -> str:
        """The content of the regular file ``path`` as text (invalid UTF-8 replaced).

        Files too large for one RPC reply (about 16 MiB, less for text that JSON has
        to escape) are refused with WorkspaceError rather than read: copy them
        elsewhere with ``run()``, or compare them with ``get_checksum()``.
        """
        full = self._regular_file(path)
        with open(full, 'rb') as stream:
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
        full = self._resolve(path)
        if '/' in _text(globstr, 'globstr'):
            raise ValueError(f'globstr {globstr!r} may not contain "/": it matches '
                             'names within path')
        if not os.path.isdir(full):
            raise NotADirectoryError(f'{path!r} is not a directory')
        return sorted(glob.glob(globstr, root_dir=full))

    def path_exists(self, path: str, file_type: str | None = None) -> bool:
        """Whether ``path`` exists, and when ``file_type`` is given, is of that type.

        ``file_type`` is None (anything), 'file', 'directory' or 'symlink'. Only the
        'symlink' check looks at a link itself; the others follow it, so asking them
        about a link that leads outside the workspace raises PathError.
        """
        if file_type is not None and file_type not in tuple(_FILE_TYPES):
            raise ValueError(f'file_type must be None, {", ".join(map(repr, _FILE_TYPES))}; '
                             f'got {file_type!r}')
        if file_type == 'symlink':
            return os.path.islink(self._resolve_link(path))
        full = self._resolve(path)
        if file_type is None:
            return os.path.exists(full)
        return _FILE_TYPES[file_type](full)

    def get_checksum(self, path: str) -> str:
        """The SHA-256 digest of the regular file ``path``, as 64 hex digits.

        SHA-256 rather than MD5 so that a matching digest means an identical file
        even when someone might have crafted a collision.
        """
        with open(self._regular_file(path), 'rb') as stream:
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

        This is ``ave.cmd.run``: ``cmd`` is a list of arguments or a string split on
        whitespace (no shell), output is stdout and stderr as the terminal showed
        them (lines end in CR LF), ``timeout`` 0 means none, and ``Timeout`` (with
        ``out``) or ``RunError`` report a command that hung or could not start.
        Output too large for one reply raises WorkspaceError: redirect it to a file.
        """
        exit_code, output = run_command(cmd, timeout=timeout, cwd=self._path)
        _fit_reply(output, f'the output of {cmd!r} (exit code {exit_code})')
        return exit_code, output

    def zip(self, path: str, dst: str | None = None) -> str:
        """Pack the file or directory ``path`` into a zip archive; return its path.

        A directory's archive holds its content (paths relative to ``path``, empty
        directories included); a file's holds that one file. ``dst`` defaults to
        ``<path>.zip`` (``<workspace>/<uid>.zip`` for the workspace itself) and is
        replaced if it exists. Symbolic links are stored as the files they point to,
        which must be in the workspace; links to directories are refused, because
        they can form loops.
        """
        source = self._resolve(path)
        if not os.path.exists(source):
            raise FileNotFoundError(f'no such file or directory: {path!r}')
        target = self._resolve(dst, 'dst') if dst is not None else _zip_name(source, self._path)
        if target == source:
            raise ValueError(f'dst {dst!r} is path itself: the archive would overwrite it')
        members = self._zip_members(source, target)
        with zipfile.ZipFile(target, 'w', zipfile.ZIP_DEFLATED) as archive:
            for full, arcname in members:
                archive.write(full, arcname)
        return target

    def unzip(self, path: str, dst: str | None = None) -> str:
        """Extract the zip archive ``path`` into the directory ``dst``; return ``dst``.

        ``dst`` defaults to a new directory in the workspace and is created if
        missing. The whole archive is checked before anything is written: absolute
        member names, ``..`` components, symbolic links and members that would pass
        through an existing link out of ``dst`` are refused with PathError. File
        permission bits stored in the archive are restored.
        """
        archive_path = self._resolve(path)
        target = None if dst is None else self._resolve(dst, 'dst')
        with _open_zip(archive_path, path) as archive:
            members = archive.infolist()
            for info in members:
                _check_member(info, target)
            if target is None:
                target = tempfile.mkdtemp(dir=self._path)
            os.makedirs(target, exist_ok=True)
            for info in members:
                _extract(archive, info, target)
        return target

    def make_git(self, path: str) -> str:
        """Make ``path`` (created if missing) a git repository; return its path.

        Running it on an existing repository is harmless.
        """
        full = self._resolve(path)
        self._git_ok(['init', '--quiet', full], f'creating a git repository at {path!r}')
        return full

    def has_git(self, path: str, refspec: str) -> bool:
        """Whether the repository at ``path`` holds the commit ``refspec`` names.

        ``refspec`` is anything git resolves to a commit: a hash (full or
        abbreviated), a branch or a tag. False when ``path`` is not the top of a
        repository: a directory inside someone else's checkout does not count.
        """
        full = self._resolve(path)
        _check_refspec(refspec)
        if not os.path.lexists(os.path.join(full, '.git')):
            return False
        exit_code, _ = self._git(['-C', full, 'cat-file', '-e', f'{refspec}^{{commit}}'])
        return exit_code == 0

    def download_git(self, src: str, refspec: str, dst: str | None = None,
                     timeout: float = 0, depth: int = 1) -> str:
        """Fetch ``refspec`` from the repository ``src`` and check it out in ``dst``.

        ``src`` is whatever git accepts as a remote: a URL or a local path (relative
        to the workspace). It is only read, so it may be outside the workspace.
        ``refspec`` is a branch, a tag or a commit hash. ``dst`` defaults to a new
        directory in the workspace; an existing repository there is updated. Only
        the last ``depth`` commits are fetched (0: the whole history). ``timeout``
        (seconds, 0: none) covers the whole download. Returns ``dst``; the checkout
        is detached at the fetched commit. Git failures raise RunError with git's
        output.
        """
        _check_src(src)
        _check_refspec(refspec)
        _check_depth(depth)
        _check_timeout(timeout)
        target = self._resolve(dst, 'dst') if dst is not None else None
        self._tool('git')  # fail before making a directory that would stay empty
        if target is None:
            target = tempfile.mkdtemp(dir=self._path)
        deadline = time.monotonic() + timeout if timeout else None
        for args, doing in _download_steps(src, refspec, target, depth):
            self._git_ok(args, doing, _time_left(deadline))
        return target

    # --- helpers -------------------------------------------------------------------

    def _resolve(self, path: str, name: str = 'path') -> str:
        """The canonical absolute form of ``path``, or PathError if it is outside."""
        full = os.path.realpath(os.path.join(self._path, _text(path, name)))
        self._check_inside(full, path, name)
        return full

    def _resolve_link(self, path: str) -> str:
        """Like ``_resolve``, but a link in the last component is not followed."""
        head, tail = os.path.split(os.path.join(self._path, _text(path, 'path')))
        if tail in ('', '.', '..'):
            return self._resolve(path)
        full = os.path.join(os.path.realpath(head), tail)
        self._check_inside(full, path, 'path')
        return full

    def _check_inside(self, full: str, given: str, name: str) -> None:
        if not _is_within(full, self._path):
            raise PathError({'message': f'{name} {given!r} is outside the workspace '
                                        f'{self._path}', 'path': given})

    def _regular_file(self, path: str) -> str:
        """The resolved ``path`` if it is a regular file (reading a FIFO would hang)."""
        full = self._resolve(path)
        if not stat.S_ISREG(os.stat(full).st_mode):
            raise WorkspaceError(f'{path!r} is not a regular file')
        return full

    def _zip_members(self, source: str, target: str) -> list[tuple[str, str]]:
        """``(file to read, name in the archive)`` for the file or directory ``source``."""
        if not os.path.isdir(source):
            name = os.path.basename(source)
            return [(self._member_file(source, name), name)]
        members = []
        for directory, dirnames, filenames in os.walk(source):
            dirnames.sort()
            if directory != source:
                members.append((directory, os.path.relpath(directory, source)))
            # os.walk lists links to directories among the directories but never
            # enters them; here they are archived, or refused, like any other link.
            links = [name for name in dirnames if os.path.islink(os.path.join(directory, name))]
            for name in sorted(filenames + links):
                full = os.path.join(directory, name)
                if full != target:  # an archive written inside source leaves itself out
                    arcname = os.path.relpath(full, source)
                    members.append((self._member_file(full, arcname), arcname))
        return members

    def _member_file(self, full: str, shown: str) -> str:
        """The regular file to archive for ``full``, following a link inside the workspace."""
        real = os.path.realpath(full)
        if not _is_within(real, self._path):
            raise PathError({'message': f'cannot archive {shown!r}: it links to {real}, '
                                        'outside the workspace', 'path': shown})
        if not os.path.isfile(real):
            raise WorkspaceError(f'cannot archive {shown!r}: not a regular file or a '
                                 'link to one')
        return real

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
        # GIT_TERMINAL_PROMPT=0: the command has a terminal, and a repository that
        # wants a password must fail at once instead of waiting for a reply.
        argv = ['env', 'GIT_TERMINAL_PROMPT=0', self._tool('git'), '--no-pager', *args]
        return run_command(argv, timeout=timeout, cwd=self._path)

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

    def load_settings(self, home: str) -> dict:
        """The checked content of ``<home>/.ave/config/workspace.json``."""
        return load_workspace_config(home)

    def validate_entry(self, entry: dict) -> None:
        """A workspace declared in broker.json needs a uid usable as a directory name."""
        super().validate_entry(entry)
        _check_uid(entry['uid'])

    def create(self, settings: dict) -> WorkspaceProfile:
        """A profile for a brand-new workspace; the directory comes later, in the session.

        This runs on the broker loop, so it touches no disk. Sixteen random hex
        digits make a clash with a live workspace practically impossible, and
        ``_setup`` refuses an existing directory should one happen anyway.
        """
        values = {'type': self.name, 'uid': secrets.token_hex(8)}
        if settings.get('pretty') is not None:
            values['pretty'] = settings['pretty']
        return WorkspaceProfile(values)


#: The plug-in instance published through the ``ave.equipment`` entry point.
WORKSPACE = WorkspaceType()


# --- checks and helpers that need no workspace ------------------------------------

def _text(value: object, name: str) -> str:
    """``value`` if it is a string fit for a path or argument, else a clear error."""
    if not isinstance(value, str):
        raise TypeError(f'{name} must be a str, not {type(value).__name__}')
    if '\0' in value:
        raise ValueError(f'{name} contains a NUL character: {value!r}')
    return value


def _check_uid(uid: object) -> None:
    _text(uid, 'uid')
    if uid in ('', '.', '..') or '/' in uid:
        raise ValueError(f'uid {uid!r} cannot be a directory name: it must be '
                         'non-empty, not "." or "..", and without "/"')


def _tool_name(name: object) -> str:
    if '/' in _text(name, 'name') or not name:
        raise ValueError(f'name {name!r} must be a program name, not a path')
    return name


def _check_src(src: object) -> None:
    # A leading '-' would reach git as an option.
    if _text(src, 'src').startswith('-'):
        raise ValueError(f'src {src!r} may not start with "-"')


def _check_refspec(refspec: object) -> None:
    # A leading '-' would reach git as an option.
    if not _text(refspec, 'refspec') or refspec.startswith('-'):
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


def _is_within(path: str, top: str) -> bool:
    """Whether the canonical ``path`` is ``top`` or below it (not merely a prefix)."""
    return path == top or path.startswith(top + os.sep)


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


def _zip_name(source: str, workspace: str) -> str:
    """Default archive path: beside ``source``, or inside it for the workspace itself."""
    parent = source if source == workspace else os.path.dirname(source)
    return os.path.join(parent, os.path.basename(source) + '.zip')


def _open_zip(full: str, given: str) -> zipfile.ZipFile:
    if not os.path.isfile(full):
        raise FileNotFoundError(f'no such file: {given!r}')
    try:
        return zipfile.ZipFile(full)
    except zipfile.BadZipFile:
        raise WorkspaceError(f'{given!r} is not a zip archive') from None


def _check_member(info: zipfile.ZipInfo, target: str | None) -> None:
    """Refuse a member that could write anywhere but below ``target``.

    No member may be a symbolic link, so extracting cannot create a new way out;
    checking each member against the directories as they are now is then enough.
    ``target`` None stands for a directory yet to be made, which holds no links.
    """
    name = info.filename
    if stat.S_ISLNK(info.external_attr >> 16):
        raise PathError({'message': f'archive member {name!r} is a symbolic link, '
                                    'which could point anywhere', 'path': name})
    if name.startswith('/') or '..' in name.split('/'):
        raise PathError({'message': f'archive member {name!r} would land outside '
                                    'the destination', 'path': name})
    if target is None:
        return
    landing = os.path.realpath(os.path.join(target, name))
    if not _is_within(landing, target):
        raise PathError({'message': f'archive member {name!r} would land outside the '
                                    'destination through a symbolic link', 'path': name})


def _extract(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: str) -> None:
    extracted = archive.extract(info, target)
    mode = (info.external_attr >> 16) & _PERMISSION_BITS
    if mode and not info.is_dir():
        os.chmod(extracted, mode)


def _open_up_directories(top: str) -> None:
    """Give the owner full access to every directory under ``top``, links not followed.

    Deleting needs write and search permission on each directory and listing needs
    read permission. ``os.walk`` visits top down, so each directory is opened up
    before the walk tries to list it. The check-then-chmod has a window in which a
    leftover process of the job could swap a directory for a link; at worst that
    grants the AVE account access to one of its own files.
    """
    _allow_owner(top)
    for directory, dirnames, _ in os.walk(top):
        for name in dirnames:
            _allow_owner(os.path.join(directory, name))


def _allow_owner(path: str) -> None:
    mode = os.lstat(path).st_mode
    if stat.S_ISDIR(mode) and mode & 0o700 != 0o700:
        os.chmod(path, stat.S_IMODE(mode) | 0o700)
