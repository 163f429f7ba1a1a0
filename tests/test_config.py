"""ave.config: creating, finding and checking AVE's configuration files."""
import errno
import io
import json
import os
import pwd
import stat

import pytest

from ave import config
from ave.config import ConfigError


def config_file(home, name):
    return os.path.join(home, '.ave', 'config', name)


def write_config(home, name, content):
    """Write ``content`` (a JSON value, or raw text when a str) as a config file."""
    path = config_file(home, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as stream:
        stream.write(content if isinstance(content, str) else json.dumps(content))
    return path


def read_json(path):
    with open(path, encoding='utf-8') as stream:
        return json.load(stream)


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def leftovers(directory):
    return [name for name in os.listdir(directory) if name.endswith('.tmp')]


def my_account():
    return pwd.getpwuid(os.geteuid())


class NoStdin:
    """Stands in for sys.stdin where reading it would be a bug."""

    def read(self, *args):
        raise AssertionError('stdin was read')


# --- create_default ---------------------------------------------------------------

def test_create_default_creates_home_and_the_three_files(tmp_path):
    home = str(tmp_path / 'not' / 'there')
    created, skipped = config.create_default(home)
    names = ['broker.json', 'authkeys.json', 'workspace.json']
    assert created == [config_file(home, n) for n in names] and skipped == [], created


def test_create_default_broker_json_listens_on_loopback_port_4000(home):
    config.create_default(home)
    assert read_json(config_file(home, 'broker.json')) == {'host': '127.0.0.1', 'port': 4000}


def test_create_default_workspace_json_names_root_and_git(home, monkeypatch):
    monkeypatch.setattr(config.shutil, 'which', lambda name: '/opt/bin/' + name)
    config.create_default(home)
    assert read_json(config_file(home, 'workspace.json')) == {
        'root': os.path.join(home, '.ave', 'workspaces'),
        'tools': {'git': '/opt/bin/git'}, 'pretty': None}


def test_create_default_without_git_leaves_tools_empty(home, monkeypatch):
    monkeypatch.setattr(config.shutil, 'which', lambda name: None)
    config.create_default(home)
    assert read_json(config_file(home, 'workspace.json'))['tools'] == {}


def test_create_default_makes_a_relative_home_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    created, _ = config.create_default('rel')
    assert created[0] == str(tmp_path / 'rel' / '.ave' / 'config' / 'broker.json'), created


def test_authkeys_are_random_urlsafe_and_distinct(home, tmp_path):
    config.create_default(home)
    other = str(tmp_path / 'other')
    config.create_default(other)
    keys = [config.load_authkeys(h)[account]
            for h in (home, other) for account in ('admin', 'share')]
    assert len(set(keys)) == 4, 'every key must be drawn afresh'
    for key in keys:
        assert len(key) >= 40 and set(key) <= set(
            'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'), key


def test_authkeys_file_is_private_and_the_others_readable(home):
    config.create_default(home)
    names = ('broker.json', 'authkeys.json', 'workspace.json')
    modes = {n: mode_of(config_file(home, n)) for n in names}
    assert modes == {'broker.json': 0o644, 'authkeys.json': 0o600, 'workspace.json': 0o644}, modes


def test_modes_do_not_depend_on_the_umask(home):
    old = os.umask(0o077)
    try:
        config.create_default(home)
    finally:
        os.umask(old)
    assert mode_of(config_file(home, 'broker.json')) == 0o644


def test_create_default_twice_skips_everything_and_keeps_keys(home):
    config.create_default(home)
    keys = config.load_authkeys(home)
    created, skipped = config.create_default(home)
    assert created == [] and len(skipped) == 3 and config.load_authkeys(home) == keys


def test_create_default_never_overwrites_an_existing_file(home):
    path = write_config(home, 'broker.json', 'not even JSON')
    created, skipped = config.create_default(home)
    assert skipped == [path] and len(created) == 2
    with open(path, encoding='utf-8') as stream:
        assert stream.read() == 'not even JSON'


def test_create_default_leaves_no_temporary_files(home):
    config.create_default(home)
    config.create_default(home)
    assert leftovers(config.config_dir(home)) == []


def test_file_that_appears_while_writing_wins(home, monkeypatch):
    path = write_config(home, 'broker.json', '{"port": 1234}')
    monkeypatch.setattr(config.os.path, 'lexists', lambda p: False)
    created, skipped = config.create_default(home)
    assert skipped == [path] and read_json(path) == {'port': 1234}
    assert leftovers(config.config_dir(home)) == []


def fail_link(code):
    def link(src, dst):
        raise OSError(code, os.strerror(code), src)
    return link


def test_without_hard_links_files_are_still_created(home, monkeypatch):
    monkeypatch.setattr(config.os, 'link', fail_link(errno.EPERM))
    created, _ = config.create_default(home)
    assert len(created) == 3 and read_json(created[0])['port'] == 4000
    assert leftovers(config.config_dir(home)) == []


def test_without_hard_links_a_file_that_appears_still_wins(home, monkeypatch):
    path = write_config(home, 'broker.json', '{"port": 1234}')
    real_lexists = os.path.lexists
    looked = set()

    def lexists_late(p):  # misses the file on the first look, as in a race
        if p in looked:
            return real_lexists(p)
        looked.add(p)
        return False

    monkeypatch.setattr(config.os, 'link', fail_link(errno.EOPNOTSUPP))
    monkeypatch.setattr(config.os.path, 'lexists', lexists_late)
    created, skipped = config.create_default(home)
    assert skipped == [path] and read_json(path) == {'port': 1234}


def test_other_link_failures_are_raised_and_cleaned_up(home, monkeypatch):
    monkeypatch.setattr(config.os, 'link', fail_link(errno.EIO))
    with pytest.raises(OSError) as info:
        config.create_default(home)
    assert info.value.errno == errno.EIO and leftovers(config.config_dir(home)) == []


def test_default_files_pass_their_own_checks(home):
    config.create_default(home)
    assert config.load_broker_config(home)['port'] == 4000
    assert config.load_workspace_config(home)['root'] == os.path.join(home, '.ave', 'workspaces')
    assert set(config.load_authkeys(home)) == {'admin', 'share'}


# --- create_etc and load_etc ------------------------------------------------------

def test_create_etc_with_user_writes_name_and_home_without_reading_stdin(tmp_path, monkeypatch):
    monkeypatch.setattr('sys.stdin', NoStdin())
    path = str(tmp_path / 'etc' / 'ave' / 'user')
    me = my_account()
    assert config.create_etc(path, me.pw_name) == ([path], [])
    assert read_json(path) == {'name': me.pw_name, 'home': me.pw_dir}
    assert mode_of(path) == 0o644


def test_create_etc_reads_the_name_from_stdin(tmp_path, monkeypatch):
    monkeypatch.setattr('sys.stdin', io.StringIO('  root\n'))
    path = str(tmp_path / 'user')
    config.create_etc(path)
    assert read_json(path) == {'name': 'root', 'home': pwd.getpwnam('root').pw_dir}


def test_create_etc_keeps_an_existing_file_and_reads_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr('sys.stdin', NoStdin())
    path = tmp_path / 'user'
    path.write_text('{"name": "someone", "home": "/x"}')
    assert config.create_etc(str(path)) == ([], [str(path)])
    assert path.read_text() == '{"name": "someone", "home": "/x"}'


def test_create_etc_refuses_an_unknown_account(tmp_path):
    path = str(tmp_path / 'user')
    with pytest.raises(ConfigError) as info:
        config.create_etc(path, 'no-such-account-ave-test')
    assert str(info.value) == f"{path}: no such account: 'no-such-account-ave-test'"
    assert not os.path.exists(path)


@pytest.mark.parametrize('text', ['', '\n', 'root admin\n'])
def test_create_etc_refuses_anything_but_one_name_on_stdin(tmp_path, monkeypatch, text):
    monkeypatch.setattr('sys.stdin', io.StringIO(text))
    path = str(tmp_path / 'user')
    with pytest.raises(ConfigError, match='expected one account name'):
        config.create_etc(path)
    assert not os.path.exists(path)


def test_load_etc_returns_name_and_home(tmp_path):
    path = tmp_path / 'user'
    path.write_text('{"name": "ave", "home": "/srv/ave"}')
    assert config.load_etc(str(path)) == {'name': 'ave', 'home': '/srv/ave'}


@pytest.mark.parametrize('content, field, problem', [
    ({'home': '/h'}, 'name', 'required but missing'),
    ({'name': 'ave'}, 'home', 'required but missing'),
    ({'name': 5, 'home': '/h'}, 'name', 'expected a non-empty string, got 5'),
    ({'name': 'ave', 'home': 'h'}, 'home', 'expected an absolute path, got "h"'),
    ({'name': 'ave', 'home': None}, 'home', 'expected a non-empty string, got null'),
    ({'name': 'ave', 'home': '/h', 'hom': 1}, 'hom', "unknown key (did you mean 'home'?)"),
])
def test_load_etc_names_the_wrong_field(tmp_path, content, field, problem):
    path = tmp_path / 'user'
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError) as info:
        config.load_etc(str(path))
    assert str(info.value) == f"{path}: field '{field}': {problem}"


def test_load_etc_of_a_missing_file_names_it(tmp_path):
    path = str(tmp_path / 'user')
    with pytest.raises(ConfigError, match=f'^{path}: no such file$'):
        config.load_etc(path)


# --- resolve_home -----------------------------------------------------------------

def test_resolve_home_explicit_home_wins_and_becomes_absolute(tmp_path, monkeypatch):
    etc = tmp_path / 'user'
    etc.write_text('{"name": "ave", "home": "/srv/ave"}')
    monkeypatch.chdir(tmp_path)
    assert config.resolve_home('mine', str(etc)) == str(tmp_path / 'mine')


def test_resolve_home_uses_the_etc_file_when_there(tmp_path):
    etc = tmp_path / 'user'
    etc.write_text('{"name": "ave", "home": "/srv/ave"}')
    assert config.resolve_home(None, str(etc)) == '/srv/ave'


def test_resolve_home_reports_a_broken_etc_file(tmp_path):
    etc = tmp_path / 'user'
    etc.write_text('{"name": "ave"')
    with pytest.raises(ConfigError, match=str(etc)):
        config.resolve_home(None, str(etc))


def test_resolve_home_without_etc_file_uses_HOME(tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path / 'scratch'))
    assert config.resolve_home(None, str(tmp_path / 'absent')) == str(tmp_path / 'scratch')


def test_resolve_home_etc_file_wins_over_HOME(tmp_path, monkeypatch):
    etc = tmp_path / 'user'
    etc.write_text('{"name": "ave", "home": "/srv/ave"}')
    monkeypatch.setenv('HOME', str(tmp_path / 'scratch'))
    assert config.resolve_home(None, str(etc)) == '/srv/ave'


def test_resolve_home_without_HOME_uses_the_password_database(tmp_path):
    home = config.resolve_home(None, str(tmp_path / 'absent'), environ={})
    assert home == my_account().pw_dir


def test_resolve_home_with_neither_HOME_nor_password_entry_says_so(tmp_path, monkeypatch):
    def no_entry(uid):
        raise KeyError(uid)
    monkeypatch.setattr(config.pwd, 'getpwuid', no_entry)
    with pytest.raises(ConfigError, match='no AVE home: no --home, no .*, no \\$HOME'):
        config.resolve_home(None, str(tmp_path / 'absent'), environ={})


def test_existing_home_is_made_absolute(tmp_path, monkeypatch):
    (tmp_path / 'mine').mkdir()
    monkeypatch.chdir(tmp_path)
    assert config.existing_home('mine') == str(tmp_path / 'mine')


def test_missing_home_is_refused_with_the_way_to_make_one(tmp_path):
    typo = str(tmp_path / 'typo')
    with pytest.raises(ConfigError, match=f'^--home {typo}: no such directory '
                                          f'\\(ave-config --create-default --home {typo} '):
        config.existing_home(typo)
    assert not os.path.exists(typo), 'checking a home created it'


# --- reading files: problems with the file as a whole -----------------------------

LOADERS = {
    'broker.json': config.load_broker_config,
    'workspace.json': config.load_workspace_config,
    'authkeys.json': config.load_authkeys,
}


@pytest.mark.parametrize('name', LOADERS)
def test_missing_file_is_named(home, name):
    with pytest.raises(ConfigError) as info:
        LOADERS[name](home)
    assert str(info.value) == f'{config_file(home, name)}: no such file'


@pytest.mark.parametrize('name', LOADERS)
def test_malformed_json_names_path_line_and_column(home, name):
    path = write_config(home, name, '{\n  "port": 4000\n  "host": "x"\n}')
    with pytest.raises(ConfigError) as info:
        LOADERS[name](home)
    assert str(info.value).startswith(f'{path}: malformed JSON at line 3 column 3: '), info.value


@pytest.mark.parametrize('name', LOADERS)
def test_top_level_must_be_an_object(home, name):
    path = write_config(home, name, [])
    with pytest.raises(ConfigError) as info:
        LOADERS[name](home)
    assert str(info.value) == f'{path}: expected an object, got an empty list'


def test_duplicate_key_is_refused(home):
    path = write_config(home, 'broker.json', '{"port": 4000, "port": 4001}')
    with pytest.raises(ConfigError) as info:
        config.load_broker_config(home)
    assert str(info.value) == f"{path}: key 'port' appears twice in one object"


def test_file_that_is_not_utf8_is_named(home):
    path = config_file(home, 'broker.json')
    os.makedirs(os.path.dirname(path))
    with open(path, 'wb') as stream:
        stream.write(b'{"host": "\xff"}')
    with pytest.raises(ConfigError, match=f'^{path}: not UTF-8 text$'):
        config.load_broker_config(home)


def test_unreadable_file_is_named_with_the_reason(home):
    path = config_file(home, 'broker.json')
    os.makedirs(path)
    with pytest.raises(ConfigError, match=f'^{path}: cannot read: Is a directory$'):
        config.load_broker_config(home)


# --- load_authkeys ----------------------------------------------------------------

def test_load_authkeys_returns_accounts_and_keys(home):
    write_config(home, 'authkeys.json', {'admin': 'a', 'share': None, 'lab': 'l'})
    assert config.load_authkeys(home) == {'admin': 'a', 'share': None, 'lab': 'l'}


def test_load_authkeys_names_the_account_but_never_shows_the_key(home):
    path = write_config(home, 'authkeys.json', {'admin': 918273645})
    with pytest.raises(ConfigError) as info:
        config.load_authkeys(home)
    assert str(info.value) == f"{path}: field 'admin': expected a string or null, got a number"


# --- load_broker_config -----------------------------------------------------------

FULL_BROKER = {
    'host': 'lab-host.example', 'port': 4000,
    'stacks': [[{'type': 'handset', 'serial': 'CB5A1QH2K2'}, {'type': 'relay', 'uid': 'r1'}]],
    'remote': {'host': 'master', 'port': 4000, 'policy': 'share', 'authkey': 'k'},
    'equipment': [{'type': 'relay', 'uid': 'r1', 'circuits': {
        'usb.pc.vcc': {'open': ['usbrelay', 'R1_1=0'], 'close': ['usbrelay', 'R1_1=1'],
                       'default': 'closed'}}}],
}


DEFAULT_LIMITS = {name: default for name, (default, _, _) in config.LIMITS.items()}
SECOND_STAGE_DEFAULTS = {'limits': DEFAULT_LIMITS, 'isolation': 'auto',
                         'queue': {'aging_s': 600.0, 'limit': 1000}, 'http': None,
                         'lab': None, 'crash_grace': 60.0}


def test_empty_broker_config_gets_every_default(home):
    write_config(home, 'broker.json', {})
    assert config.load_broker_config(home) == {
        'host': '127.0.0.1', 'port': 4000, 'stacks': [], 'remote': None, 'equipment': [],
        **SECOND_STAGE_DEFAULTS}


def test_full_broker_config_is_returned_as_written(home):
    write_config(home, 'broker.json', FULL_BROKER)
    assert config.load_broker_config(home) == {**FULL_BROKER, **SECOND_STAGE_DEFAULTS}


def test_limits_given_override_their_defaults_only(home):
    write_config(home, 'broker.json', {'limits': {'connections': 100, 'handshake_s': 2.5}})
    limits = config.load_broker_config(home)['limits']
    assert limits == {**DEFAULT_LIMITS, 'connections': 100, 'handshake_s': 2.5}


@pytest.mark.parametrize('limits, field, problem', [
    ({'connections': 0}, 'limits.connections', 'expected an integer from 16'),
    ({'frame_bytes': 1.5e6}, 'limits.frame_bytes', 'expected an integer'),
    ({'sessions': True}, 'limits.sessions', 'expected an integer'),
    ({'handshake_s': 'soon'}, 'limits.handshake_s', 'expected a number'),
    ({'conections': 5}, 'limits.conections', "did you mean 'connections'"),
])
def test_wrong_limit_is_named_with_its_field(home, limits, field, problem):
    write_config(home, 'broker.json', {'limits': limits})
    with pytest.raises(config.ConfigError) as caught:
        config.load_broker_config(home)
    assert f"field '{field}'" in str(caught.value) and problem in str(caught.value), \
        f'unclear message: {caught.value}'


def test_isolation_must_be_a_known_mode(home):
    write_config(home, 'broker.json', {'isolation': 'strict'})
    with pytest.raises(config.ConfigError, match="field 'isolation': expected one of"):
        config.load_broker_config(home)


def test_remote_gets_default_port_and_no_authkey(home):
    write_config(home, 'broker.json', {'remote': {'host': 'm', 'policy': 'forward'}})
    assert config.load_broker_config(home)['remote'] == {
        'host': 'm', 'port': 4000, 'policy': 'forward', 'authkey': None}


BAD_BROKER = [
    ({'host': 5}, 'host', 'expected a non-empty string, got 5'),
    ({'host': ''}, 'host', 'expected a non-empty string, got ""'),
    ({'host': None}, 'host', 'expected a non-empty string, got null'),
    ({'port': 'x'}, 'port', 'expected an integer from 1 to 65535, got "x"'),
    ({'port': 0}, 'port', 'expected an integer from 1 to 65535, got 0'),
    ({'port': 65536}, 'port', 'expected an integer from 1 to 65535, got 65536'),
    ({'port': True}, 'port', 'expected an integer from 1 to 65535, got true'),
    ({'port': 4000.5}, 'port', 'expected an integer from 1 to 65535, got 4000.5'),
    ({'port': [4000]}, 'port', 'expected an integer from 1 to 65535, got a list'),
    ({'prot': 4000}, 'prot', "unknown key (did you mean 'port'?)"),
    ({'zzz': 1}, 'zzz', f'unknown key (expected one of: {", ".join(config.BROKER_KEYS)})'),
    ({'stacks': {}}, 'stacks', 'expected a list, got an empty object'),
    ({'stacks': ['x']}, 'stacks[0]', 'expected a list, got "x"'),
    ({'stacks': [[3]]}, 'stacks[0][0]', 'expected an object, got 3'),
    ({'stacks': [[{'type': 'a'}, {}]]}, 'stacks[0][1].type', 'required but missing'),
    ({'stacks': [[{'type': 5}]]}, 'stacks[0][0].type', 'expected a non-empty string, got 5'),
    ({'remote': 'x'}, 'remote', 'expected an object, got "x"'),
    ({'remote': {'host': 'm'}}, 'remote.policy', 'required but missing'),
    ({'remote': {'policy': 'share'}}, 'remote.host', 'required but missing'),
    ({'remote': {'host': 5, 'policy': 'share'}}, 'remote.host',
     'expected a non-empty string, got 5'),
    ({'remote': {'host': 'm', 'port': 'x', 'policy': 'share'}}, 'remote.port',
     'expected an integer from 1 to 65535, got "x"'),
    ({'remote': {'host': 'm', 'policy': 'steal'}}, 'remote.policy',
     'expected "share" or "forward", got "steal"'),
    ({'remote': {'host': 'm', 'policy': 'share', 'authkey': 918273645}}, 'remote.authkey',
     'expected a string or null, got a number'),
    ({'remote': {'host': 'm', 'policy': 'share', 'polcy': 'x'}}, 'remote.polcy',
     "unknown key (did you mean 'policy'?)"),
    ({'equipment': {}}, 'equipment', 'expected a list, got an empty object'),
    ({'equipment': [3]}, 'equipment[0]', 'expected an object, got 3'),
    ({'equipment': [{'uid': 'r1'}]}, 'equipment[0].type', 'required but missing'),
    ({'equipment': [{'type': 'relay'}, {'type': ''}]}, 'equipment[1].type',
     'expected a non-empty string, got ""'),
]


@pytest.mark.parametrize('content, field, problem', BAD_BROKER,
                         ids=[f'{field}-{i}' for i, (_, field, _) in enumerate(BAD_BROKER)])
def test_wrong_broker_field_is_named_with_file_and_problem(home, content, field, problem):
    path = write_config(home, 'broker.json', content)
    with pytest.raises(ConfigError) as info:
        config.load_broker_config(home)
    assert str(info.value) == f"{path}: field '{field}': {problem}"
    assert (info.value.path, info.value.field) == (path, field)


def test_equipment_check_sees_each_entry(home):
    write_config(home, 'broker.json', FULL_BROKER)
    seen = []
    config.load_broker_config(home, check_equipment=seen.append)
    assert seen == FULL_BROKER['equipment']


def test_equipment_check_failure_names_the_entry(home):
    path = write_config(home, 'broker.json', {'equipment': [{'type': 'relay'}, {'type': 'relay'}]})
    calls = []

    def check(entry):
        calls.append(entry)
        if len(calls) == 2:
            raise ValueError("relay has no 'uid'")

    with pytest.raises(ConfigError) as info:
        config.load_broker_config(home, check_equipment=check)
    assert str(info.value) == f"{path}: field 'equipment[1]': relay has no 'uid'"


# --- load_workspace_config --------------------------------------------------------

def test_empty_workspace_config_gets_every_default(home):
    write_config(home, 'workspace.json', {})
    assert config.load_workspace_config(home) == {
        'root': os.path.join(home, '.ave', 'workspaces'), 'tools': {}, 'pretty': None,
        'limits': {'unzip_max_bytes': 4 * 1024 ** 3, 'unzip_max_entries': 100_000}}


def test_workspace_config_is_returned_as_written(home):
    content = {'root': '/srv/ws', 'tools': {'git': '/usr/bin/git'}, 'pretty': 'lab',
               'limits': {'unzip_max_bytes': 1024, 'unzip_max_entries': 3}}
    write_config(home, 'workspace.json', content)
    assert config.load_workspace_config(home) == content


def test_workspace_limits_missing_from_the_object_get_their_defaults(home):
    write_config(home, 'workspace.json', {'limits': {'unzip_max_entries': 10}})
    assert config.load_workspace_config(home)['limits'] == {
        'unzip_max_bytes': config.DEFAULT_UNZIP_MAX_BYTES, 'unzip_max_entries': 10}


def test_workspace_root_may_start_with_tilde(home):
    write_config(home, 'workspace.json', {'root': '~/ws'})
    assert config.load_workspace_config(home)['root'] == os.path.join(os.environ['HOME'], 'ws')


BAD_WORKSPACE = [
    ({'root': 'ws'}, 'root', 'expected an absolute path, got "ws"'),
    ({'root': 5}, 'root', 'expected a non-empty string, got 5'),
    ({'root': ''}, 'root', 'expected a non-empty string, got ""'),
    ({'tools': []}, 'tools', 'expected an object, got an empty list'),
    ({'tools': {'git': 5}}, 'tools.git', 'expected a non-empty string, got 5'),
    ({'tools': {'git': ''}}, 'tools.git', 'expected a non-empty string, got ""'),
    ({'pretty': 5}, 'pretty', 'expected a string or null, got 5'),
    ({'tool': {}}, 'tool', "unknown key (did you mean 'tools'?)"),
    ({'limits': 5}, 'limits', 'expected an object, got 5'),
    ({'limits': {'unzip_bytes': 5}}, 'limits.unzip_bytes',
     "unknown key (did you mean 'unzip_max_bytes'?)"),
    ({'limits': {'unzip_max_bytes': 0}}, 'limits.unzip_max_bytes',
     'expected an integer above 0, got 0'),
    ({'limits': {'unzip_max_bytes': 1.5}}, 'limits.unzip_max_bytes',
     'expected an integer above 0, got 1.5'),
    ({'limits': {'unzip_max_entries': True}}, 'limits.unzip_max_entries',
     'expected an integer above 0, got true'),
    ({'limits': {'unzip_max_entries': '10'}}, 'limits.unzip_max_entries',
     'expected an integer above 0, got "10"'),
]


@pytest.mark.parametrize('content, field, problem', BAD_WORKSPACE,
                         ids=[f'{field}-{i}' for i, (_, field, _) in enumerate(BAD_WORKSPACE)])
def test_wrong_workspace_field_is_named_with_file_and_problem(home, content, field, problem):
    path = write_config(home, 'workspace.json', content)
    with pytest.raises(ConfigError) as info:
        config.load_workspace_config(home)
    assert str(info.value) == f"{path}: field '{field}': {problem}"


def test_long_wrong_values_are_shortened_to_keep_one_line(home):
    path = write_config(home, 'broker.json', {'port': 'x' * 500})
    with pytest.raises(ConfigError) as info:
        config.load_broker_config(home)
    message = str(info.value)
    assert message.startswith(f"{path}: field 'port'") and message.endswith('...'), message
    assert len(message) < len(path) + 120, message


def test_config_error_travels_as_a_typed_exception(home):
    from ave.exceptions import exception_factory
    error = ConfigError.at('/p', 'bad', 'port')
    rebuilt = exception_factory(error.details)
    assert type(rebuilt) is ConfigError and str(rebuilt) == "/p: field 'port': bad"


@pytest.mark.parametrize('grace', [0, 5.5, 86400])
def test_crash_grace_is_taken_as_given(home, grace):
    write_config(home, 'broker.json', {'crash_grace': grace})
    assert config.load_broker_config(home)['crash_grace'] == grace


@pytest.mark.parametrize('grace', [-1, 'soon', True, None, 86401])
def test_crash_grace_out_of_range_is_refused(home, grace):
    write_config(home, 'broker.json', {'crash_grace': grace})
    with pytest.raises(config.ConfigError, match="field 'crash_grace': expected a number"):
        config.load_broker_config(home)
