"""Workspaces: the plug-in, the directory's life cycle, every RPC and the path rules.

The resource is driven in-process, exactly as a session would host it: build it from
a profile and settings, ``_setup()``, call methods, ``_teardown()``. Every workspace
root lives under the test's tmp_path; git runs only against local repositories.
"""
import hashlib
import json
import os
import shutil
import stat
import threading
import time
import zipfile

import psutil
import pytest

from ave.config import ConfigError, create_default
from ave.equipment import load_types
from ave.equipment.workspace import (
    REPLY_LIMIT, WORKSPACE, MissingTool, PathError, Workspace, WorkspaceError,
    WorkspaceProfile, WorkspaceType)
from ave.exceptions import RunError, Timeout
from ave.sandbox import Killed, Sandbox
from sandboxes import installed, requires_bwrap

GIT = shutil.which('git')
needs_git = pytest.mark.skipif(GIT is None, reason='git is not installed on this machine')

pytestmark = pytest.mark.timeout(30)


# --- fixtures -----------------------------------------------------------------------

@pytest.fixture
def settings(tmp_path):
    """workspace.json content with the root in this test's temp dir."""
    return {'root': str(tmp_path / 'ws'), 'tools': {'git': GIT} if GIT else {},
            'pretty': None}


@pytest.fixture(params=['plain', pytest.param('sandboxed', marks=requires_bwrap)])
def ws(request, settings):
    """A set-up workspace, torn down afterwards whatever the test did to it.

    Every test that uses it runs twice: with commands run plainly, and in a sandbox
    that hides the workspace root, as a session's would.
    """
    box = Sandbox(request.param == 'sandboxed', hidden=[settings['root']])
    with installed(box):
        workspace = Workspace(WORKSPACE.create(settings), settings)
        workspace._setup()
        yield workspace
        workspace._teardown()


@pytest.fixture
def outside(tmp_path):
    """A directory outside the workspace that nothing may touch."""
    path = tmp_path / 'outside'
    path.mkdir()
    (path / 'secret.txt').write_text('keep me')
    return path


def write(ws, name, content='text'):
    """Create a file in the workspace (parents too) and return its absolute path."""
    path = os.path.join(ws.get_path(), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = 'wb' if isinstance(content, bytes) else 'w'
    with open(path, mode) as stream:
        stream.write(content)
    return path


def make_zip(path, members):
    """Write a zip at ``path`` from ``{name: content}``; a ZipInfo key is used as is."""
    with zipfile.ZipFile(path, 'w') as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def symlink_member(name, target):
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


# --- the plug-in --------------------------------------------------------------------

def test_entry_point_publishes_the_workspace_type():
    assert load_types()['workspace'] is WORKSPACE, 'ave.equipment entry point must be WORKSPACE'


def test_type_is_on_demand_with_uid_identity():
    assert isinstance(WORKSPACE, WorkspaceType)
    assert (WORKSPACE.name, WORKSPACE.on_demand) == ('workspace', True)
    assert WORKSPACE.profile_class is WorkspaceProfile and WorkspaceProfile.identity == 'uid'
    assert WORKSPACE.resource_class is Workspace


def test_create_makes_distinct_uids(settings):
    uids = {WORKSPACE.create(settings)['uid'] for _ in range(200)}
    assert len(uids) == 200, 'every created workspace must get its own uid'


def test_create_gives_a_workspace_profile_without_pretty_when_unset(settings):
    profile = WORKSPACE.create(settings)
    assert isinstance(profile, WorkspaceProfile)
    assert set(profile) == {'type', 'uid'} and profile['type'] == 'workspace', profile


def test_create_copies_pretty_when_set(settings):
    settings['pretty'] = 'bench 3 scratch'
    assert WORKSPACE.create(settings)['pretty'] == 'bench 3 scratch'


def test_create_touches_no_disk(settings, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('create() touched the disk')
    with monkeypatch.context() as patch:
        for name in ('mkdir', 'makedirs', 'open', 'stat', 'lstat', 'listdir', 'scandir'):
            patch.setattr(os, name, refuse)
        patch.setattr('builtins.open', refuse)
        WORKSPACE.create(settings)
    assert not os.path.exists(settings['root']), 'create() must not make the root'


def test_load_settings_reads_workspace_json(home):
    create_default(home)
    loaded = WORKSPACE.load_settings(home)
    assert loaded['root'] == os.path.join(home, '.ave', 'workspaces'), loaded
    assert loaded['pretty'] is None


def test_load_settings_without_workspace_json_is_a_config_error(home):
    with pytest.raises(ConfigError, match='workspace.json'):
        WORKSPACE.load_settings(home)


@pytest.mark.parametrize('uid', ['', '.', '..', '../x', 'a/b', 'nul\0'])
def test_validate_entry_refuses_uid_that_is_no_directory_name(uid):
    with pytest.raises(ValueError, match='uid'):
        WORKSPACE.validate_entry({'type': 'workspace', 'uid': uid})


def test_validate_entry_accepts_a_plain_uid():
    WORKSPACE.validate_entry({'type': 'workspace', 'uid': 'scratch-1'})


@pytest.mark.parametrize('uid', ['../escape', '..', 'a/b'])
def test_resource_refuses_uid_that_is_no_directory_name(settings, uid):
    with pytest.raises(ValueError, match='uid'):
        Workspace({'type': 'workspace', 'uid': uid}, settings)


# --- life cycle -----------------------------------------------------------------------

def test_setup_creates_private_directory_named_by_uid(settings):
    profile = WORKSPACE.create(settings)
    workspace = Workspace(profile, settings)
    workspace._setup()
    try:
        path = workspace.get_path()
        assert path == os.path.join(os.path.realpath(settings['root']), profile['uid'])
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700, 'workspace must be private'
    finally:
        workspace._teardown()


def test_setup_refuses_an_existing_directory(ws, settings):
    twin = Workspace(ws.get_profile(), settings)
    with pytest.raises(WorkspaceError, match='already exists'):
        twin._setup()


def test_get_profile_is_the_allocated_profile(settings):
    profile = WORKSPACE.create(settings)
    assert Workspace(profile, settings).get_profile() == profile


def test_teardown_deletes_everything_even_read_only(ws):
    write(ws, 'deep/er/file.txt')
    locked = os.path.join(ws.get_path(), 'deep', 'er')
    os.chmod(os.path.join(locked, 'file.txt'), 0o400)
    os.chmod(locked, 0o500)
    write(ws, 'sealed/inner/x')
    os.chmod(os.path.join(ws.get_path(), 'sealed'), 0o000)
    ws._teardown()
    assert not os.path.lexists(ws.get_path()), 'teardown left the workspace behind'


def test_teardown_does_not_follow_a_link_to_an_outside_directory(ws, outside):
    os.symlink(outside, os.path.join(ws.get_path(), 'link'))
    ws._teardown()
    assert not os.path.lexists(ws.get_path())
    assert os.listdir(outside) == ['secret.txt'], 'teardown deleted through a symlink'


def test_teardown_removes_only_the_link_when_the_workspace_became_one(ws, outside):
    shutil.rmtree(ws.get_path())
    os.symlink(outside, ws.get_path())
    ws._teardown()
    assert not os.path.lexists(ws.get_path())
    assert os.listdir(outside) == ['secret.txt'], 'teardown followed the replaced workspace'


def test_teardown_of_a_vanished_workspace_is_quiet(ws):
    shutil.rmtree(ws.get_path())
    ws._teardown()


# --- files ------------------------------------------------------------------------------

def test_make_tempdir_makes_new_directories_inside(ws):
    first, second = ws.make_tempdir(), ws.make_tempdir()
    assert first != second
    for path in (first, second):
        assert os.path.dirname(path) == ws.get_path() and os.listdir(path) == []


def test_make_tempfile_defaults_to_the_workspace(ws):
    path = ws.make_tempfile()
    assert os.path.dirname(path) == ws.get_path() and os.path.getsize(path) == 0


def test_make_tempfile_in_a_given_directory(ws):
    os.mkdir(os.path.join(ws.get_path(), 'sub'))
    path = ws.make_tempfile('sub')
    assert os.path.dirname(path) == os.path.join(ws.get_path(), 'sub')


def test_make_tempfile_in_a_missing_directory_fails(ws):
    with pytest.raises(FileNotFoundError):
        ws.make_tempfile('missing')


def test_write_tempfile_then_cat_round_trips_text(ws):
    text = 'line one\r\nline two\nä€😀\n'
    path = ws.write_tempfile(text)
    assert os.path.dirname(path) == ws.get_path()
    assert ws.cat(path) == text, 'text must come back byte for byte, newlines included'


def test_write_tempfile_refuses_bytes(ws):
    with pytest.raises(TypeError, match='data must be a str'):
        ws.write_tempfile(b'bytes')


def test_cat_accepts_relative_and_absolute_paths(ws):
    path = write(ws, 'sub/f.txt', 'hello')
    assert ws.cat('sub/f.txt') == ws.cat(path) == 'hello'


def test_cat_replaces_invalid_utf8(ws):
    write(ws, 'bad.bin', b'ok\xff\xfeok')
    assert ws.cat('bad.bin') == 'ok\ufffd\ufffdok'


def test_cat_refuses_a_file_too_large_for_a_reply_without_reading_it(ws):
    with open(os.path.join(ws.get_path(), 'huge'), 'wb') as stream:
        stream.truncate(10 * 1024 ** 3)  # sparse: 10 GiB that cost no disk
    with pytest.raises(WorkspaceError, match='more than one reply can carry'):
        ws.cat('huge')


def test_cat_refuses_text_whose_json_form_is_too_large(ws):
    write(ws, 'controls', b'\x01' * (REPLY_LIMIT // 4))  # each becomes \u0001
    with pytest.raises(WorkspaceError, match='more than one reply can carry'):
        ws.cat('controls')


def test_cat_refuses_a_directory(ws):
    with pytest.raises(WorkspaceError, match='not a regular file'):
        ws.cat('.')


def test_cat_refuses_a_fifo_instead_of_hanging(ws):
    os.mkfifo(os.path.join(ws.get_path(), 'pipe'))
    with pytest.raises(WorkspaceError, match='not a regular file'):
        ws.cat('pipe')


def test_cat_of_a_missing_file_is_file_not_found(ws):
    with pytest.raises(FileNotFoundError):
        ws.cat('missing')


def test_ls_returns_sorted_names_matching_the_pattern(ws):
    for name in ('b.txt', 'a.txt', 'c.log', '.hidden'):
        write(ws, name)
    os.mkdir(os.path.join(ws.get_path(), 'dir'))
    assert ws.ls('.') == ['a.txt', 'b.txt', 'c.log', 'dir']
    assert ws.ls('', '*.txt') == ['a.txt', 'b.txt']
    assert ws.ls(ws.get_path(), '.*') == ['.hidden']


def test_ls_of_a_subdirectory(ws):
    write(ws, 'sub/x')
    assert ws.ls('sub') == ['x']


def test_ls_refuses_a_pattern_with_a_slash(ws):
    with pytest.raises(ValueError, match='globstr'):
        ws.ls('.', '../*')


def test_ls_of_a_file_is_not_a_directory(ws):
    write(ws, 'f')
    with pytest.raises(NotADirectoryError):
        ws.ls('f')


def test_path_exists_by_type(ws):
    write(ws, 'f')
    os.mkdir(os.path.join(ws.get_path(), 'd'))
    os.symlink('f', os.path.join(ws.get_path(), 'l'))
    got = {(name, kind): ws.path_exists(name, kind)
           for name in ('f', 'd', 'l', 'missing')
           for kind in (None, 'file', 'directory', 'symlink')}
    assert got == {
        ('f', None): True, ('f', 'file'): True, ('f', 'directory'): False, ('f', 'symlink'): False,
        ('d', None): True, ('d', 'file'): False, ('d', 'directory'): True, ('d', 'symlink'): False,
        ('l', None): True, ('l', 'file'): True, ('l', 'directory'): False, ('l', 'symlink'): True,
        ('missing', None): False, ('missing', 'file'): False, ('missing', 'directory'): False,
        ('missing', 'symlink'): False}


def test_path_exists_sees_a_link_leading_outside_as_a_link(ws, outside):
    os.symlink(outside, os.path.join(ws.get_path(), 'out'))
    assert ws.path_exists('out', 'symlink') is True


@pytest.mark.parametrize('file_type', ['dir', 'FILE', '', 42, ['file']])
def test_path_exists_refuses_an_unknown_file_type(ws, file_type):
    with pytest.raises(ValueError, match='file_type'):
        ws.path_exists('.', file_type)


def test_get_checksum_is_sha256_hex(ws):
    write(ws, 'data', b'\x00payload\xff')
    assert ws.get_checksum('data') == hashlib.sha256(b'\x00payload\xff').hexdigest()


def test_get_checksum_refuses_a_directory(ws):
    with pytest.raises(WorkspaceError, match='not a regular file'):
        ws.get_checksum('.')


# --- tools and commands ---------------------------------------------------------------------

def test_has_tool_finds_an_unconfigured_program_on_path(ws):
    assert ws.has_tool('sh') is True
    assert ws.has_tool('no-such-program-for-ave-tests') is False


def test_has_tool_trusts_only_the_configured_path(settings, tmp_path):
    settings['tools'] = {'sh': str(tmp_path / 'missing-sh')}
    workspace = Workspace(WORKSPACE.create(settings), settings)
    assert workspace.has_tool('sh') is False, 'a broken configured path must not fall back'


@needs_git
def test_has_tool_accepts_the_configured_git(ws):
    assert ws.has_tool('git') is True


@pytest.mark.parametrize('name, error', [('/bin/sh', ValueError), ('', ValueError),
                                         (None, TypeError)])
def test_has_tool_refuses_what_is_not_a_program_name(ws, name, error):
    with pytest.raises(error):
        ws.has_tool(name)


def test_run_returns_exit_code_and_output(ws):
    assert ws.run(['sh', '-c', 'echo hello; exit 3']) == (3, 'hello\r\n')


def test_run_works_in_the_workspace_directory(ws):
    exit_code, output = ws.run('pwd')
    assert (exit_code, output.strip()) == (0, ws.get_path())


def test_run_times_out(ws):
    started = time.monotonic()
    with pytest.raises(Timeout):
        ws.run(['sleep', '30'], timeout=0.5)
    assert time.monotonic() - started < 10, 'the timeout did not stop the command'


def test_run_of_a_missing_program_is_a_run_error(ws):
    with pytest.raises(RunError):
        ws.run(['no-such-program-for-ave-tests'])


@pytest.mark.timeout(90)
def test_run_keeps_the_end_of_output_too_large_for_a_reply(ws):
    extra = 1024 * 1024
    code, output = ws.run(['sh', '-c', f'head -c {REPLY_LIMIT + extra} /dev/zero | '
                                       f'tr "\\0" x; echo THE-END'])
    assert code == 0 and output.rstrip().endswith('THE-END'), 'the end of the output is lost'
    assert output.startswith('[ave.cmd: ') and 'characters of output cut' in output, \
        f'the cut is not announced: {output[:100]!r}'
    assert len(json.dumps(output)) <= REPLY_LIMIT


@pytest.mark.timeout(90)
def test_run_output_json_escapes_heavily_is_cut_until_it_fits(ws):
    code, output = ws.run(['sh', '-c', f'head -c {REPLY_LIMIT // 2} /dev/zero | tr "\\0" "\\001"'])
    assert code == 0 and len(json.dumps(output)) <= REPLY_LIMIT, 'the reply does not fit'


# --- zip and unzip -----------------------------------------------------------------------

@pytest.fixture
def tree(ws):
    """A directory with text, binary, an executable, a nested and an empty directory."""
    write(ws, 'tree/a.txt', 'alpha')
    write(ws, 'tree/sub/b.bin', b'\x00\xff')
    os.chmod(write(ws, 'tree/tool.sh', '#!/bin/sh\n'), 0o755)
    os.makedirs(os.path.join(ws.get_path(), 'tree', 'sub', 'empty'))
    return 'tree'


def snapshot(top):
    """``{relative path: (content or None for a directory, permission bits)}``."""
    found = {}
    for directory, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = os.path.join(directory, name)
            content = None
            if os.path.isfile(full):
                with open(full, 'rb') as stream:
                    content = stream.read()
            found[os.path.relpath(full, top)] = (content, stat.S_IMODE(os.stat(full).st_mode))
    return found


def test_zip_then_unzip_round_trips_a_tree(ws, tree):
    archive = ws.zip(tree)
    assert archive == os.path.join(ws.get_path(), 'tree.zip'), 'default dst is <path>.zip'
    copy = ws.unzip(archive, 'copy')
    assert copy == os.path.join(ws.get_path(), 'copy')
    assert snapshot(copy) == snapshot(os.path.join(ws.get_path(), tree))


def test_unzip_defaults_to_a_new_directory_in_the_workspace(ws, tree):
    first, second = ws.unzip(ws.zip(tree)), ws.unzip('tree.zip')
    assert first != second and os.path.dirname(first) == ws.get_path()
    assert sorted(os.listdir(first)) == ['a.txt', 'sub', 'tool.sh']


def test_zip_of_one_file_holds_that_file(ws):
    write(ws, 'one.txt', 'only')
    archive = ws.zip('one.txt', 'out/../one-file.zip')
    with zipfile.ZipFile(archive) as opened:
        assert opened.namelist() == ['one.txt']
        assert opened.read('one.txt') == b'only'


def test_zip_of_the_workspace_leaves_its_own_archive_out(ws, tree):
    archive = ws.zip('.')
    assert archive == os.path.join(ws.get_path(), os.path.basename(ws.get_path()) + '.zip')
    ws.zip('.')  # again, with the first archive now lying in the tree
    with zipfile.ZipFile(archive) as opened:
        names = opened.namelist()
    assert 'tree/a.txt' in names and os.path.basename(archive) not in names, names


def test_zip_stores_a_link_inside_as_the_file(ws):
    write(ws, 'd/real.txt', 'real')
    os.symlink('real.txt', os.path.join(ws.get_path(), 'd', 'alias.txt'))
    with zipfile.ZipFile(ws.zip('d')) as opened:
        assert opened.read('alias.txt') == b'real'


def test_zip_refuses_a_link_leading_outside(ws, outside):
    os.makedirs(os.path.join(ws.get_path(), 'd'))
    os.symlink(outside / 'secret.txt', os.path.join(ws.get_path(), 'd', 'leak'))
    with pytest.raises(PathError, match='outside the workspace'):
        ws.zip('d')


def test_zip_refuses_a_link_to_a_directory(ws):
    os.makedirs(os.path.join(ws.get_path(), 'd', 'inner'))
    os.symlink('.', os.path.join(ws.get_path(), 'd', 'loop'))
    with pytest.raises(WorkspaceError, match='not a regular file'):
        ws.zip('d')


def test_zip_refuses_to_overwrite_the_file_it_packs(ws):
    write(ws, 'one.txt', 'precious')
    with pytest.raises(ValueError, match='overwrite'):
        ws.zip('one.txt', 'one.txt')
    assert ws.cat('one.txt') == 'precious'


def test_zip_of_a_missing_path_is_file_not_found(ws):
    with pytest.raises(FileNotFoundError):
        ws.zip('missing')


def test_unzip_refuses_what_is_not_a_zip(ws):
    write(ws, 'fake.zip', 'not an archive')
    with pytest.raises(WorkspaceError, match='not a zip archive'):
        ws.unzip('fake.zip')


@pytest.mark.parametrize('evil', [
    '../evil.txt', 'a/../../evil.txt', '/tmp/ave-test-evil.txt', 'link'],
    ids=['dotdot', 'nested-dotdot', 'absolute', 'symlink'])
def test_unzip_refuses_escaping_members_and_writes_nothing(ws, evil):
    member = symlink_member(evil, '/etc') if evil == 'link' else evil
    archive = make_zip(os.path.join(ws.get_path(), 'evil.zip'),
                       {'good.txt': 'fine', member: 'bad'})
    with pytest.raises(PathError):
        ws.unzip(archive, 'dst')
    assert not os.path.exists(os.path.join(ws.get_path(), 'dst')), 'refusal must write nothing'
    assert not os.path.exists(os.path.join(os.path.dirname(ws.get_path()), 'evil.txt'))
    assert not os.path.exists('/tmp/ave-test-evil.txt')


def test_unzip_refuses_a_member_that_passes_through_an_existing_link(ws, outside):
    dst = os.path.join(ws.get_path(), 'dst')
    os.makedirs(dst)
    os.symlink(outside, os.path.join(dst, 'out'))
    archive = make_zip(os.path.join(ws.get_path(), 'evil.zip'), {'out/planted.txt': 'bad'})
    with pytest.raises(PathError, match='symbolic link'):
        ws.unzip(archive, 'dst')
    assert os.listdir(outside) == ['secret.txt'], 'unzip wrote through a symlink'


# --- path rules, for every method that takes a path -----------------------------------------

ESCAPES = ['dotdot', 'nested-dotdot', 'absolute', 'sibling-prefix', 'link-into-outside',
           'link-itself']

PATH_CALLS = {
    'make_tempfile': lambda ws, p: ws.make_tempfile(p),
    'cat': lambda ws, p: ws.cat(p),
    'ls': lambda ws, p: ws.ls(p),
    'path_exists': lambda ws, p: ws.path_exists(p),
    'path_exists-directory': lambda ws, p: ws.path_exists(p, 'directory'),
    'get_checksum': lambda ws, p: ws.get_checksum(p),
    'zip-path': lambda ws, p: ws.zip(p),
    'zip-dst': lambda ws, p: ws.zip('file.txt', p),
    'unzip-path': lambda ws, p: ws.unzip(p),
    'unzip-dst': lambda ws, p: ws.unzip('archive.zip', p),
    'make_git': lambda ws, p: ws.make_git(p),
    'has_git': lambda ws, p: ws.has_git(p, 'HEAD'),
    'download_git-dst': lambda ws, p: ws.download_git('src-unused', 'HEAD', dst=p),
}


@pytest.fixture
def escapes(ws, outside):
    """Each kind of escaping path, for a workspace holding a file, a zip and a link out."""
    write(ws, 'file.txt')
    make_zip(os.path.join(ws.get_path(), 'archive.zip'), {'x.txt': 'x'})
    os.symlink(outside, os.path.join(ws.get_path(), 'out'))
    return {'dotdot': '../neighbour', 'nested-dotdot': 'a/../../neighbour',
            'absolute': str(outside / 'secret.txt'),
            'sibling-prefix': ws.get_path() + '-neighbour',
            'link-into-outside': 'out/secret.txt', 'link-itself': 'out'}


@pytest.mark.parametrize('escape', ESCAPES)
@pytest.mark.parametrize('call', PATH_CALLS.values(), ids=PATH_CALLS.keys())
def test_every_path_argument_refuses_an_escape(ws, outside, escapes, call, escape):
    with pytest.raises(PathError, match='outside the workspace'):
        call(ws, escapes[escape])
    root = os.path.dirname(ws.get_path())
    assert sorted(os.listdir(root)) == [os.path.basename(ws.get_path())], \
        'something was created beside the workspace'
    assert os.listdir(outside) == ['secret.txt'], 'something was written outside'


def test_path_exists_symlink_check_refuses_a_path_through_a_link_out(ws, outside):
    os.symlink(outside, os.path.join(ws.get_path(), 'out'))
    with pytest.raises(PathError):
        ws.path_exists('out/secret.txt', 'symlink')


@pytest.mark.parametrize('bad', [42, b'file.txt'], ids=['int', 'bytes'])
@pytest.mark.parametrize('call', PATH_CALLS.values(), ids=PATH_CALLS.keys())
def test_every_path_argument_refuses_a_non_string(ws, escapes, call, bad):
    with pytest.raises(TypeError, match='must be a str'):
        call(ws, bad)


def test_path_error_names_the_offending_path(ws):
    with pytest.raises(PathError) as caught:
        ws.cat('../x')
    assert caught.value.path == '../x' and 'Traceback' not in str(caught.value)


# --- git ------------------------------------------------------------------------------------

def git(ws, repo, *args):
    """Run git in ``repo`` through the workspace, as a job would; return the output."""
    exit_code, output = ws.run([GIT, '-C', repo, '-c', 'user.name=AVE Test',
                                '-c', 'user.email=ave-test@example.invalid', *args])
    assert exit_code == 0, f'git {args} failed: {output}'
    return output.strip()


def commit(ws, repo, name, text):
    """Commit one file; return the new commit's hash."""
    write(ws, os.path.join(repo, name), text)
    git(ws, repo, 'add', name)
    git(ws, repo, 'commit', '--quiet', '-m', f'add {name}: {text}')
    return git(ws, repo, 'rev-parse', 'HEAD')


@pytest.fixture
def origin(ws):
    """A local repository with two commits; ``stable`` names the first one."""
    repo = ws.make_git('origin')
    first = commit(ws, repo, 'version.txt', 'one')
    git(ws, repo, 'branch', 'stable')
    second = commit(ws, repo, 'version.txt', 'two')
    return {'path': repo, 'first': first, 'second': second}


@needs_git
def test_make_git_creates_a_repository(ws):
    repo = ws.make_git('sub/repo')
    assert repo == os.path.join(ws.get_path(), 'sub', 'repo')
    assert os.path.isdir(os.path.join(repo, '.git'))


@needs_git
@pytest.mark.timeout(60)
def test_has_git_knows_which_commits_the_repository_holds(ws, origin):
    assert ws.has_git('origin', origin['first']) is True
    assert ws.has_git('origin', origin['second'][:10]) is True
    assert ws.has_git('origin', 'stable') is True
    assert ws.has_git('origin', '0' * 40) is False
    assert ws.has_git('origin', 'no-such-branch') is False


@needs_git
def test_has_git_is_false_where_there_is_no_repository_top(ws, origin):
    os.makedirs(os.path.join(origin['path'], 'inner'))
    os.mkdir(os.path.join(ws.get_path(), 'plain'))
    assert ws.has_git('plain', 'HEAD') is False
    assert ws.has_git('missing', 'HEAD') is False
    assert ws.has_git('origin/inner', 'HEAD') is False, 'a subdirectory is not a repository'


@needs_git
@pytest.mark.timeout(60)
def test_download_git_fetches_a_branch_with_depth_one(ws, origin):
    dst = ws.download_git(origin['path'], 'stable')
    assert os.path.dirname(dst) == ws.get_path(), 'default dst is a new workspace directory'
    assert ws.cat(os.path.join(dst, 'version.txt')) == 'one'
    assert git(ws, dst, 'rev-list', '--count', 'HEAD') == '1', 'depth=1 must fetch one commit'
    assert ws.has_git(dst, origin['first']) is True


@needs_git
@pytest.mark.timeout(60)
def test_download_git_fetches_a_commit_by_hash_into_dst(ws, origin):
    dst = ws.download_git(origin['path'], origin['second'], dst='checkout')
    assert dst == os.path.join(ws.get_path(), 'checkout')
    assert git(ws, dst, 'rev-parse', 'HEAD') == origin['second']


@needs_git
@pytest.mark.timeout(60)
def test_download_git_reads_a_relative_src_from_the_workspace(ws, origin):
    ws.download_git('origin', origin['first'], dst='rel')
    assert ws.cat('rel/version.txt') == 'one'


@needs_git
@pytest.mark.timeout(60)
def test_download_git_depth_zero_fetches_the_whole_history(ws, origin):
    dst = ws.download_git(origin['path'], origin['second'], depth=0, timeout=30)
    assert git(ws, dst, 'rev-list', '--count', 'HEAD') == '2'


@needs_git
@pytest.mark.timeout(60)
def test_download_git_of_an_unknown_ref_is_a_run_error_with_output(ws, origin):
    with pytest.raises(RunError) as caught:
        ws.download_git(origin['path'], 'no-such-branch', dst='x')
    assert 'no-such-branch' in caught.value.out, caught.value.details


@pytest.mark.parametrize('kwargs, error', [
    ({'refspec': '--upload-pack=touch'}, ValueError), ({'refspec': ''}, ValueError),
    ({'src': '--upload-pack=touch'}, ValueError), ({'src': None}, TypeError),
    ({'depth': -1}, ValueError), ({'depth': True}, TypeError), ({'depth': 1.5}, TypeError),
    ({'timeout': -1}, ValueError), ({'timeout': 'soon'}, TypeError)])
def test_download_git_refuses_bad_arguments(ws, kwargs, error):
    arguments = {'src': 'origin', 'refspec': 'HEAD', **kwargs}
    with pytest.raises(error):
        ws.download_git(**arguments)


def test_has_git_refuses_a_refspec_that_git_would_take_as_an_option(ws):
    with pytest.raises(ValueError, match='refspec'):
        ws.has_git('.', '--all')


def test_git_methods_without_git_raise_missing_tool(settings, tmp_path):
    settings['tools'] = {'git': str(tmp_path / 'no-git')}
    workspace = Workspace(WORKSPACE.create(settings), settings)
    workspace._setup()
    try:
        with pytest.raises(MissingTool, match='workspace.json'):
            workspace.make_git('repo')
        with pytest.raises(MissingTool):
            workspace.download_git('origin', 'HEAD')
        assert workspace.has_tool('git') is False
    finally:
        workspace._teardown()


# --- isolation: commands a job chooses run in the session's sandbox --------------------

@needs_git
@pytest.mark.timeout(60)
def test_download_git_refuses_the_ext_transport_that_runs_commands(ws, tmp_path):
    planted = tmp_path / 'planted-by-ext'
    with pytest.raises(RunError, match='fetching'):
        ws.download_git(f'ext::sh -c touch% {planted}', 'HEAD', dst='x')
    assert not planted.exists(), 'git ran a command named in the URL'


@needs_git
@requires_bwrap
@pytest.mark.timeout(60)
def test_git_runs_repository_hooks_only_inside_the_sandbox(settings, origin_repo):
    with installed(Sandbox(True, hidden=[settings['root']])):
        workspace = Workspace(WORKSPACE.create(settings), settings)
        workspace._setup()
        try:
            origin = origin_repo(workspace)
            repo = workspace.make_git('checkout')
            hook = os.path.join(repo, '.git', 'hooks', 'post-checkout')
            write(workspace, hook, f'#!/bin/sh\nkill -0 {os.getpid()} 2>/dev/null '
                                   '&& echo broker-visible > hook.txt '
                                   '|| echo isolated > hook.txt\n')
            os.chmod(hook, 0o755)
            workspace.download_git(origin, 'HEAD', dst='checkout')
            assert workspace.cat('checkout/hook.txt') == 'isolated\n'
        finally:
            workspace._teardown()


@pytest.fixture
def origin_repo():
    """``make(workspace)``: a one-commit repository in ``workspace``; returns its path."""
    def make(workspace):
        repo = workspace.make_git('origin')
        commit(workspace, repo, 'f.txt', 'one')
        return repo
    return make


@requires_bwrap
def test_run_cannot_read_the_broker_keys_or_another_jobs_workspace(settings, tmp_path):
    dot_ave = tmp_path / 'home' / '.ave'
    (dot_ave / 'config').mkdir(parents=True)
    (dot_ave / 'config' / 'authkeys.json').write_text('{"admin": "top secret"}')
    theirs = Workspace(WORKSPACE.create(settings), settings)  # another session's
    theirs._setup()
    try:
        write(theirs, 'results.txt', 'theirs')
        with installed(Sandbox(True, hidden=[str(dot_ave), settings['root']])):
            mine = Workspace(WORKSPACE.create(settings), settings)
            mine._setup()
            try:
                code, output = mine.run(['cat', str(dot_ave / 'config' / 'authkeys.json'),
                                         os.path.join(theirs.get_path(), 'results.txt')])
            finally:
                mine._teardown()
        assert code != 0 and 'top secret' not in output and 'theirs' not in output, output
    finally:
        theirs._teardown()


def test_teardown_kills_the_workspaces_running_commands_first(ws):
    seconds = f'{700 + os.getpid() % 100}.{time.time_ns() % 10 ** 6}'
    outcome = {}

    def long_run():
        try:
            outcome['result'] = ws.run(['sleep', seconds])
        except Exception as err:  # the test looks at what happened
            outcome['error'] = err
    thread = threading.Thread(target=long_run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not _sleeping(seconds) and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    ws._teardown()
    thread.join(5)
    assert time.monotonic() - started < 2 and isinstance(outcome.get('error'), Killed), outcome
    assert not _sleeping(seconds) and not os.path.exists(ws.get_path())


def _sleeping(seconds):
    return [proc for proc in psutil.process_iter(['cmdline'])
            if proc.info['cmdline'] == ['sleep', seconds]]
