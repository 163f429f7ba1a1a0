"""ave.equipment.workspace_archive: hostile archives meet the unzip limits.

Archives here are real zip files; the bombs are small on disk and large unpacked.
The full-disk case mounts a small tmpfs as the workspace root (root only; skipped
with the reason elsewhere) so that "the disk" is really full.
"""
import io
import os
import shutil
import struct
import subprocess
import zipfile

import pytest

from ave.equipment.workspace import WORKSPACE, Workspace, WorkspaceError
from ave.equipment.workspace_archive import (DIRECTORY_BYTES_PER_ENTRY, central_directory,
                                             count_entries)

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024


def make_workspace(root, limits=None):
    settings = {'root': str(root), 'tools': {}, 'pretty': None}
    if limits is not None:
        settings['limits'] = limits
    workspace = Workspace(WORKSPACE.create(settings), settings)
    workspace._setup()
    return workspace


@pytest.fixture
def workspaces(tmp_path):
    """``new(limits=None, root=...)`` makes set-up workspaces, all torn down afterwards."""
    made = []

    def new(limits=None, root=tmp_path / 'ws'):
        workspace = make_workspace(root, limits)
        made.append(workspace)
        return workspace
    yield new
    for workspace in made:
        workspace._teardown()


def zeros_archive(path, members, size):
    """A zip of ``members`` files of ``size`` zero bytes each: tiny packed, big unpacked."""
    block = bytes(MiB)
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as archive:
        for index in range(members):
            with archive.open(f'zeros-{index}', 'w', force_zip64=size > 2 ** 31) as out:
                for offset in range(0, size, MiB):
                    out.write(block[:min(MiB, size - offset)])
    return str(path)


def entries(workspace):
    return sorted(os.listdir(workspace.get_path()))


# --- limits checked before a byte is written -------------------------------------------

def test_an_archive_with_too_many_entries_is_refused_before_writing(workspaces):
    ws = workspaces({'unzip_max_entries': 10})
    archive = os.path.join(ws.get_path(), 'many.zip')
    with zipfile.ZipFile(archive, 'w') as opened:
        for index in range(11):
            opened.writestr(f'f{index}', 'x')
    with pytest.raises(WorkspaceError, match='more than the 10 entries.*unzip_max_entries'):
        ws.unzip('many.zip', 'dst')
    assert entries(ws) == ['many.zip'], 'nothing may be written for a refused archive'


def test_an_archive_that_unpacks_beyond_the_byte_limit_is_refused_before_writing(workspaces):
    ws = workspaces({'unzip_max_bytes': 2 * MiB})
    zeros_archive(os.path.join(ws.get_path(), 'bomb.zip'), 3, MiB)
    assert os.path.getsize(os.path.join(ws.get_path(), 'bomb.zip')) < 64 * 1024
    with pytest.raises(WorkspaceError, match=f'unpack to {3 * MiB} bytes.*unzip_max_bytes'):
        ws.unzip('bomb.zip')
    assert entries(ws) == ['bomb.zip'], 'nothing may be written for a refused archive'


def test_an_archive_within_the_limits_unpacks(workspaces):
    ws = workspaces({'unzip_max_bytes': 3 * MiB, 'unzip_max_entries': 3})
    zeros_archive(os.path.join(ws.get_path(), 'fine.zip'), 3, MiB)
    dst = ws.unzip('fine.zip', 'dst')
    assert sorted(os.listdir(dst)) == ['zeros-0', 'zeros-1', 'zeros-2']
    assert os.path.getsize(os.path.join(dst, 'zeros-2')) == MiB


def test_the_default_limits_refuse_a_bomb_of_more_than_4_gib(workspaces):
    ws = workspaces()
    archive = os.path.join(ws.get_path(), 'big.zip')
    with zipfile.ZipFile(archive, 'w', zipfile.ZIP_DEFLATED) as opened:
        for index in range(5):  # declared 1 GiB each, never written: the header is the bomb
            info = zipfile.ZipInfo(f'gig-{index}')
            info.file_size = 1024 ** 3
            opened.writestr(info, b'')
    _declare(archive, {f'gig-{index}': 1024 ** 3 for index in range(5)})
    with pytest.raises(WorkspaceError, match='unzip_max_bytes'):
        ws.unzip('big.zip', 'dst')
    assert entries(ws) == ['big.zip']


def test_a_member_that_unpacks_to_more_than_it_declares_is_stopped_and_undone(workspaces):
    ws = workspaces()
    archive = zeros_archive(os.path.join(ws.get_path(), 'liar.zip'), 2, MiB)
    _declare(archive, {'zeros-1': 1000})
    with pytest.raises(WorkspaceError, match='failed and was undone|more than the 1000'):
        ws.unzip('liar.zip', 'dst')
    assert entries(ws) == ['liar.zip'], 'a stopped extraction must leave nothing behind'


def test_a_central_directory_larger_than_the_limits_allow_is_refused_unread(workspaces):
    ws = workspaces({'unzip_max_entries': 4})
    archive = os.path.join(ws.get_path(), 'wide.zip')
    with zipfile.ZipFile(archive, 'w') as opened:
        for index in range(3):
            info = zipfile.ZipInfo(f'f{index}')
            info.comment = b'c' * 3000  # a legal but unlikely 3000-byte comment each
            opened.writestr(info, 'x')
    with pytest.raises(WorkspaceError, match='central directory'):
        ws.unzip('wide.zip', 'dst')
    assert 3 * 3000 > 4 * DIRECTORY_BYTES_PER_ENTRY


def test_an_archive_lying_about_its_entry_count_is_counted_anyway(workspaces):
    ws = workspaces({'unzip_max_entries': 5})
    archive = os.path.join(ws.get_path(), 'count.zip')
    with zipfile.ZipFile(archive, 'w') as opened:
        for index in range(8):
            opened.writestr(f'f{index}', '')
    with open(archive, 'r+b') as stream:  # the end record now claims one entry
        stream.seek(-22 + 8, os.SEEK_END)
        stream.write(struct.pack('<2H', 1, 1))
    with pytest.raises(WorkspaceError, match='more than the 5 entries'):
        ws.unzip('count.zip', 'dst')


# --- a full disk ------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 8 MiB tmpfs for workspace roots, unmounted afterwards."""
    mountpoint = tmp_path / 'small-disk'
    mountpoint.mkdir()
    result = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=8m,mode=0700', 'tmpfs',
                             str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}')
    try:
        yield mountpoint
    finally:
        subprocess.run(['umount', '-l', str(mountpoint)], check=False)


def free_bytes(path):
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def test_a_bomb_on_a_small_disk_is_undone_and_other_jobs_keep_writing(workspaces, small_disk,
                                                                     tmp_path):
    bomb = zeros_archive(tmp_path / 'bomb.zip', 1, 32 * MiB)  # within the default limits
    attacker, neighbour = workspaces(root=small_disk), workspaces(root=small_disk)
    shutil.move(bomb, os.path.join(attacker.get_path(), 'bomb.zip'))
    before = free_bytes(small_disk)
    with pytest.raises(WorkspaceError, match='failed and was undone.*No space left'):
        attacker.unzip('bomb.zip', 'dst')
    assert entries(attacker) == ['bomb.zip'], 'the partial extraction was left behind'
    assert free_bytes(small_disk) >= before - 64 * 1024, 'the space was not given back'
    written = neighbour.write_tempfile('n' * (4 * MiB))
    assert os.path.getsize(written) == 4 * MiB, "the other job's write failed"


def test_a_bomb_over_the_limit_on_a_small_disk_takes_no_space_at_all(workspaces, small_disk,
                                                                    tmp_path):
    bomb = zeros_archive(tmp_path / 'bomb.zip', 1, 32 * MiB)
    attacker = workspaces({'unzip_max_bytes': 4 * MiB}, root=small_disk)
    shutil.move(bomb, os.path.join(attacker.get_path(), 'bomb.zip'))
    before = free_bytes(small_disk)
    with pytest.raises(WorkspaceError, match='unzip_max_bytes'):
        attacker.unzip('bomb.zip', 'dst')
    assert free_bytes(small_disk) == before and entries(attacker) == ['bomb.zip']


# --- finding the central directory as zipfile does -----------------------------------

@pytest.mark.parametrize('comment', [b'', b'an archive comment'])
def test_central_directory_is_where_zipfile_reads_it(comment):
    stream = io.BytesIO()
    with zipfile.ZipFile(stream, 'w') as archive:
        for index in range(7):
            archive.writestr(f'member-{index}', 'x' * index)
        archive.comment = comment
    start, size = central_directory(stream)
    with zipfile.ZipFile(stream) as archive:
        assert start == archive.start_dir
        assert count_entries(stream, start, size, 100) == len(archive.infolist()) == 7


def test_central_directory_follows_zip64_records(monkeypatch):
    monkeypatch.setattr(zipfile, 'ZIP_FILECOUNT_LIMIT', 2)  # zip64 records for 3 entries
    stream = io.BytesIO()
    with zipfile.ZipFile(stream, 'w') as archive:
        for index in range(3):
            archive.writestr(f'member-{index}', 'x')
    monkeypatch.undo()
    assert b'PK\x06\x06' in stream.getvalue(), 'the archive has no zip64 end record'
    start, size = central_directory(stream)
    with zipfile.ZipFile(stream) as archive:
        assert start == archive.start_dir
    assert count_entries(stream, start, size, 100) == 3


def test_counting_stops_at_the_limit():
    stream = io.BytesIO()
    with zipfile.ZipFile(stream, 'w') as archive:
        for index in range(50):
            archive.writestr(f'm{index}', '')
    assert count_entries(stream, *central_directory(stream), 10) == 10


@pytest.mark.parametrize('data', [b'', b'short', b'not a zip archive at all' * 100])
def test_no_end_record_means_no_central_directory(data):
    assert central_directory(io.BytesIO(data)) is None


# --- helpers ---------------------------------------------------------------------------

def _declare(path, sizes):
    """Rewrite the uncompressed sizes that ``path``'s headers declare for some members."""
    with zipfile.ZipFile(path) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        start_dir = archive.start_dir
    with open(path, 'r+b') as stream:
        data = stream.read()
        for name, size in sizes.items():
            info = infos[name]
            stream.seek(info.header_offset + 22)  # local header: uncompressed size
            stream.write(struct.pack('<L', size))
            entry = data.find(b'PK\x01\x02', start_dir)
            while entry >= 0:
                name_length = struct.unpack_from('<H', data, entry + 28)[0]
                if data[entry + 46:entry + 46 + name_length] == name.encode():
                    stream.seek(entry + 24)  # central directory: uncompressed size
                    stream.write(struct.pack('<L', size))
                    break
                entry = data.find(b'PK\x01\x02', entry + 4)
