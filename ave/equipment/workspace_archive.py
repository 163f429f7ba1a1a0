"""zip and unzip for workspaces: every file reached through a confined ``Tree``.

Packing walks the source with ``os.fwalk`` (directory descriptors, links never
entered) and opens every member through the workspace's ``Tree``, so a job swapping
links while its archive is made can only get an error, never a file from outside.

Unpacking a job's archive is the riskier half: the archive is hostile input. Before a
byte is written it is checked as a whole: its central directory against the size and
entry count limits (before ``zipfile`` reads that directory into memory), then every
member name (no absolute paths, no ``..``, no symbolic links, none landing outside
the destination through a link already there), then the total uncompressed size the
members declare. While writing, a member that decompresses to more than it declared
stops the extraction, and any failure (a lying archive, a full disk) removes what this
extraction created, so the disk space other jobs share is given back at once.

The extraction runs in the session, not in a sandboxed child: each member is created
with ``O_NOFOLLOW`` under directories opened one component at a time (``Tree``), so
there is no path to race; and only here can every decompressed byte be counted.
"""
from __future__ import annotations

import contextlib
import os
import stat
import struct
import zipfile
from collections.abc import Generator
from dataclasses import dataclass
from typing import IO, BinaryIO

from ave.equipment.workspace_paths import PathError, Tree, WorkspaceError

#: Bytes of central directory allowed per entry the limits allow: a record is 46 bytes
#: plus the member's name, extra fields and comment. ``zipfile`` reads the whole
#: directory into memory, so its size is checked before that happens.
DIRECTORY_BYTES_PER_ENTRY = 1024

# Mode bits unzip restores on extracted files: permissions only, never set-id bits.
_PERMISSION_BITS = 0o777

_CHUNK = 1024 * 1024

# The zip records that say where the central directory is (APPNOTE 4.3.14-4.3.16).
_END = struct.Struct('<4s4H2LH')
_END_SIGNATURE = b'PK\x05\x06'
_MAX_COMMENT = 0xFFFF
_LOCATOR64 = struct.Struct('<4sLQL')
_LOCATOR64_SIGNATURE = b'PK\x06\x07'
_END64 = struct.Struct('<4sQ2H2L4Q')
_END64_SIGNATURE = b'PK\x06\x06'
_ENTRY = struct.Struct('<4s4B4HL2L5H2L')
_ENTRY_SIGNATURE = b'PK\x01\x02'


@dataclass(frozen=True)
class UnzipLimits:
    """How much one unzip may write (workspace.json ``limits``)."""

    max_bytes: int
    max_entries: int


# --- zip ----------------------------------------------------------------------------

def pack(tree: Tree, path: str, dst: str | None) -> str:
    """Archive the file or directory ``path`` into ``dst``; see ``Workspace.zip``."""
    found = tree.stat(path)
    if found is None:
        raise FileNotFoundError(f'no such file or directory: {path!r}')
    source, source_stat = found
    target = tree.canonical(dst, 'dst') if dst is not None else _zip_name(source, tree.top)
    if target == source:
        raise ValueError(f'dst {dst!r} is path itself: the archive would overwrite it')
    members = _members(tree, source, stat.S_ISDIR(source_stat.st_mode), target)
    fd, target, created = tree.open_for_writing(target, 'dst')
    try:
        with open(fd, 'wb') as stream, \
                zipfile.ZipFile(stream, 'w', zipfile.ZIP_DEFLATED) as archive:
            for member, arcname in members:
                _add(tree, archive, member, arcname)
    except BaseException:
        if created:
            tree.remove(target)
        raise
    return target


def _zip_name(source: str, top: str) -> str:
    """Default archive path: beside ``source``, or inside it for the workspace itself."""
    parent = source if source == top else os.path.dirname(source)
    return os.path.join(parent, os.path.basename(source) + '.zip')


def _members(tree: Tree, source: str, is_directory: bool,
             target: str) -> list[tuple[str, str]]:
    """``(path, name in the archive)`` of everything to pack, checked before packing."""
    if not is_directory:
        name = os.path.basename(source)
        _check_member_file(tree, source, name)
        return [(source, name)]
    members = []
    with tree.resolve(source) as found, \
            contextlib.closing(_fwalk(found.existing(source))) as walk:
        for relative, dirnames, filenames, dirfd in walk:
            if relative:
                members.append((os.path.join(source, relative), relative))
            # fwalk lists links to directories among the directories but never enters
            # them; here they are archived, or refused, like any other link.
            links = [name for name in dirnames if _is_link(name, dirfd)]
            dirnames[:] = sorted(set(dirnames) - set(links))
            for name in sorted(filenames + links):
                full = os.path.join(source, relative, name)
                if full != target:  # an archive written inside source leaves itself out
                    arcname = os.path.join(relative, name)
                    _check_member_file(tree, full, arcname)
                    members.append((full, arcname))
    return members


def _fwalk(fd: int) -> Generator[tuple[str, list[str], list[str], int], None, None]:
    """``os.fwalk`` of the directory ``fd`` with paths relative to it ('' for itself)."""
    for dirpath, dirnames, filenames, dirfd in os.fwalk('.', dir_fd=fd, follow_symlinks=False):
        relative = '' if dirpath == '.' else os.path.relpath(dirpath, '.')
        yield relative, dirnames, filenames, dirfd


def _is_link(name: str, dirfd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _check_member_file(tree: Tree, full: str, arcname: str) -> None:
    """A member to pack must be a regular file, or a link to one inside the workspace."""
    try:
        found = tree.stat(full)
    except PathError:
        raise PathError({'message': f'cannot archive {arcname!r}: it links outside the '
                                    'workspace', 'path': arcname}) from None
    if found is None or not stat.S_ISREG(found[1].st_mode):
        raise WorkspaceError(f'cannot archive {arcname!r}: not a regular file or a link '
                             'to one')


def _add(tree: Tree, archive: zipfile.ZipFile, member: str, arcname: str) -> None:
    """Write one member; ``/proc/self/fd`` names exactly the object the Tree opened."""
    with tree.resolve(member) as found:
        fd = found.existing(member)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            archive.write(f'/proc/self/fd/{fd}', arcname)
            return
    fd = tree.open_file(member)
    try:
        archive.write(f'/proc/self/fd/{fd}', arcname)
    finally:
        os.close(fd)


# --- unzip --------------------------------------------------------------------------

def unpack(tree: Tree, path: str, dst: str | None, limits: UnzipLimits) -> str:
    """Extract the archive ``path`` into ``dst``; see ``Workspace.unzip``."""
    target = tree.canonical(dst, 'dst') if dst is not None else None
    fd = tree.open_file(path)
    with open(fd, 'rb') as stream:
        check_directory(stream, limits, path)
        with _open_zip(stream, path) as archive:
            members = archive.infolist()
            check_members(members, limits, path)
            if target is not None:
                _check_landing(tree, target, members)
            return _extract(tree, archive, members, target, path)


def _open_zip(stream: BinaryIO, given: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(stream)
    except zipfile.BadZipFile:
        raise WorkspaceError(f'{given!r} is not a zip archive') from None


def check_directory(stream: BinaryIO, limits: UnzipLimits, given: str) -> None:
    """Refuse an archive whose central directory is too big, before zipfile reads it."""
    span = central_directory(stream)
    if span is None:
        return  # not a zip archive: zipfile says so next
    start, size = span
    if size > limits.max_entries * DIRECTORY_BYTES_PER_ENTRY:
        raise WorkspaceError(f'{given!r} has a {size}-byte central directory, more than '
                             f'the {limits.max_entries} entries that workspace.json '
                             '"limits.unzip_max_entries" allows can need')
    if count_entries(stream, start, size, limits.max_entries + 1) > limits.max_entries:
        raise _too_many(given, limits)


def central_directory(stream: BinaryIO) -> tuple[int, int] | None:
    """``(offset, size)`` of the central directory exactly where ``zipfile`` looks for it.

    The end record is the last 22 bytes when the archive has no comment, else the last
    end signature within the final 64 KiB; a zip64 locator right before it leads to
    the zip64 record right before that. None when there is no end record at all.
    """
    file_size = stream.seek(0, os.SEEK_END)
    if file_size < _END.size:
        return None
    stream.seek(file_size - _END.size)
    last = stream.read(_END.size)
    if last[:4] == _END_SIGNATURE and last[-2:] == b'\0\0':
        location, record = file_size - _END.size, last
    else:
        window = max(file_size - _MAX_COMMENT - _END.size, 0)
        stream.seek(window)
        tail = stream.read()
        at = tail.rfind(_END_SIGNATURE)
        if at < 0 or len(tail) - at < _END.size:
            return None
        location, record = window + at, tail[at:at + _END.size]
    fields = _END.unpack(record)
    size, start = fields[5], location - fields[5]
    zip64 = _zip64_directory_size(stream, location)
    if zip64 is not None:
        size = zip64
        start = location - _LOCATOR64.size - _END64.size - size
    return start, size


def _zip64_directory_size(stream: BinaryIO, location: int) -> int | None:
    if location < _LOCATOR64.size + _END64.size:
        return None
    stream.seek(location - _LOCATOR64.size)
    if stream.read(_LOCATOR64.size)[:4] != _LOCATOR64_SIGNATURE:
        return None
    stream.seek(location - _LOCATOR64.size - _END64.size)
    record = stream.read(_END64.size)
    if record[:4] != _END64_SIGNATURE:
        return None
    return int(_END64.unpack(record)[8])


def count_entries(stream: BinaryIO, start: int, size: int, stop: int) -> int:
    """Entries in the central directory at ``start``, counting no further than ``stop``.

    Reads one fixed-size record header per entry and skips its variable part, so
    memory stays constant whatever the archive claims.
    """
    count, offset, end = 0, start, start + size
    while offset < end and count < stop:
        stream.seek(offset)
        header = stream.read(_ENTRY.size)
        if len(header) < _ENTRY.size or header[:4] != _ENTRY_SIGNATURE:
            break  # damaged: zipfile refuses it next
        fields = _ENTRY.unpack(header)
        offset += _ENTRY.size + fields[12] + fields[13] + fields[14]
        count += 1
    return count


def check_members(members: list[zipfile.ZipInfo], limits: UnzipLimits, given: str) -> None:
    """Refuse what no destination could take: too much, or names that could escape."""
    if len(members) > limits.max_entries:
        raise _too_many(given, limits)
    for info in members:
        _check_name(info)
    total = sum(info.file_size for info in members)
    if total > limits.max_bytes:
        raise WorkspaceError(f'{given!r} would unpack to {total} bytes, more than the '
                             f'{limits.max_bytes} that workspace.json '
                             '"limits.unzip_max_bytes" allows')


def _too_many(given: str, limits: UnzipLimits) -> WorkspaceError:
    return WorkspaceError(f'{given!r} has more than the {limits.max_entries} entries '
                          'that workspace.json "limits.unzip_max_entries" allows')


def _check_name(info: zipfile.ZipInfo) -> None:
    """No member may be a link (extracting must not create a way out) or climb out."""
    name = info.filename
    if stat.S_ISLNK(info.external_attr >> 16):
        raise PathError({'message': f'archive member {name!r} is a symbolic link, '
                                    'which could point anywhere', 'path': name})
    if name.startswith('/') or '..' in name.split('/') or '\0' in name:
        raise PathError({'message': f'archive member {name!r} would land outside '
                                    'the destination', 'path': name})


def _check_landing(tree: Tree, target: str, members: list[zipfile.ZipInfo]) -> None:
    """Refuse members that would pass through a link already in ``target`` and out."""
    with tree.resolve(target, 'dst') as found:
        if found.fd is None or not stat.S_ISDIR(os.fstat(found.fd).st_mode):
            return  # a directory yet to be made holds no links
        destination = Tree(found.path, found.fd, 'the destination')
        for info in members:
            try:
                destination.canonical(info.filename, 'archive member')
            except PathError:
                raise PathError({'message': f'archive member {info.filename!r} would land '
                                            'outside the destination through a symbolic '
                                            'link', 'path': info.filename}) from None


def _extract(tree: Tree, archive: zipfile.ZipFile, members: list[zipfile.ZipInfo],
             target: str | None, given: str) -> str:
    """Write every member below ``target`` (a new directory when None); undo on failure."""
    created: list[str] = []
    if target is None:
        _, target = tree.create_unique('.', directory=True)
        created.append(target)
    try:
        fd, target, made = tree.make_directories(target, 'dst')
        created += made
        try:
            destination = Tree(target, fd, 'the destination')
            for info in members:
                _extract_member(destination, archive, info, created)
        finally:
            os.close(fd)
    except BaseException as err:
        for path in reversed(created):
            with contextlib.suppress(OSError, WorkspaceError):
                tree.remove(path)
        if isinstance(err, OSError):
            raise WorkspaceError(f'unzip of {given!r} failed and was undone: '
                                 f'{err.strerror or err}') from None
        if isinstance(err, zipfile.BadZipFile):
            raise WorkspaceError(f'unzip of {given!r} failed and was undone: the archive '
                                 f'is damaged ({err})') from None
        raise
    return target


def _extract_member(destination: Tree, archive: zipfile.ZipFile, info: zipfile.ZipInfo,
                    created: list[str]) -> None:
    name = info.filename
    parent = os.path.dirname(name.rstrip('/'))
    if info.is_dir() or parent:
        fd, _, made = destination.make_directories(name if info.is_dir() else parent,
                                                   'archive member')
        os.close(fd)
        created += made
    if info.is_dir():
        return
    fd, path, new = destination.open_for_writing(name, 'archive member')
    if new:
        created.append(path)
    with open(fd, 'wb') as out, archive.open(info) as source:
        _copy_declared(source, out, info)
        mode = (info.external_attr >> 16) & _PERMISSION_BITS
        if mode:
            os.fchmod(out.fileno(), mode)


def _copy_declared(source: IO[bytes], out: IO[bytes], info: zipfile.ZipInfo) -> None:
    """Copy a member, refusing to write more than its header declared."""
    written = 0
    while chunk := source.read(_CHUNK):
        written += len(chunk)
        if written > info.file_size:
            raise WorkspaceError(f'archive member {info.filename!r} unpacks to more than '
                                 f'the {info.file_size} bytes it declares')
        out.write(chunk)
