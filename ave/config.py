"""Where AVE finds its configuration, how it is created, and how it is checked.

``/etc/ave/user`` names the account that runs AVE and the home that holds
``<home>/.ave/config/``: ``broker.json``, ``authkeys.json`` and ``workspace.json``.
Lab owners edit these files by hand, so every loader checks every field and refuses
what it does not understand with one line naming the file and the field::

    /h/.ave/config/broker.json: field 'port': expected an integer from 1 to 65535, got "x"

A typo such as ``"prot"`` is refused rather than ignored: a setting that silently
has no effect costs a lab owner far more time than an error message does.

Files are created atomically and never replace an existing file, so a reader never
sees half a file and whatever the lab owner already wrote always wins.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import secrets
import shutil
import sys
from collections.abc import Callable, Mapping
from typing import Any

from ave.checks import Checker, ConfigError, read_json, shown

ETC_PATH = '/etc/ave/user'

#: Loopback by default: test jobs normally run on the lab host itself, and putting
#: a broker on the network (to share equipment with a master) should be a choice
#: the lab owner makes in broker.json, not something a fresh install does.
DEFAULT_HOST = '127.0.0.1'
DEFAULT_PORT = 4000

_POLICIES = ('share', 'forward')
BROKER_KEYS = ('host', 'port', 'stacks', 'remote', 'equipment', 'limits', 'isolation',
               'queue', 'http', 'lab', 'crash_grace')
_LAB_KEYS = ('name', 'etcd', 'ttl', 'advertise', 'compact_s')
DEFAULT_LAB_TTL = 10
#: How much of etcd's history the lab's leader keeps (seconds); 0: it never compacts.
DEFAULT_LAB_COMPACT_S = 300
_HTTP_KEYS = ('host', 'port')
ISOLATION_MODES = ('auto', 'required', 'off')

#: What one peer, or all of them, may make a broker hold (DESIGN.md, "Limits"); each
#: can be set in broker.json's "limits" object. Name: (default, smallest, largest).
LIMITS: dict[str, tuple[int | float, int | float, int | float]] = {
    'frame_bytes': (1024 * 1024, 4096, 256 * 1024 * 1024),
    'buffered_bytes': (64 * 1024 * 1024, 1024 * 1024, 16 * 1024 ** 3),
    'connections': (4096, 16, 1024 * 1024),
    'connections_per_address': (1024, 1, 1024 * 1024),
    'handshake_s': (10.0, 0.5, 300.0),
    'sessions': (1024, 1, 65536),
    'sessions_per_address': (256, 1, 65536),
}

#: How waiting requests are ordered and how many may wait (DESIGN.md, "Waiting"):
#: a request gains one priority level per ``aging_s`` seconds waited.
QUEUE: dict[str, tuple[int | float, int | float, int | float]] = {
    'aging_s': (600.0, 1.0, 10 ** 7),
    'limit': (1000, 1, 100_000),
}
#: Seconds a session whose broker died keeps serving its client while it waits for
#: the next broker of its home to adopt it (DESIGN.md, "A broker crash loses no job"):
#: long enough for systemd to restart a crashed broker, or a person to start one.
#: 0 makes sessions end with their broker, as before crash recovery existed; a day
#: is the most a lab owner may let equipment sit with no broker accounting for it.
DEFAULT_CRASH_GRACE = 60.0
CRASH_GRACE_MAX = 86400.0
_REMOTE_KEYS = ('host', 'port', 'policy', 'authkey')
_WORKSPACE_KEYS = ('root', 'tools', 'pretty', 'limits')
_WORKSPACE_LIMIT_KEYS = ('unzip_max_bytes', 'unzip_max_entries')

#: workspace.json ``limits`` defaults: what one ``unzip`` of a job's archive may write.
#: 4 GiB and 100,000 members hold any build a handset test unpacks, and stop an
#: archive built to fill the disk other jobs share.
DEFAULT_UNZIP_MAX_BYTES = 4 * 1024 ** 3
DEFAULT_UNZIP_MAX_ENTRIES = 100_000
_ETC_KEYS = ('name', 'home')

# Errors from os.link() meaning "this file system has no hard links", not "failed".
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


# --- paths and the home directory -------------------------------------------------

def config_dir(home: str) -> str:
    """The directory holding the JSON configuration files of ``home``."""
    return os.path.join(home, '.ave', 'config')


def resolve_home(home: str | None = None, etc_path: str = ETC_PATH,
                 environ: Mapping[str, str] = os.environ) -> str:
    """The AVE home a command line tool or broker client should use, as an absolute path.

    An explicit ``home`` wins; otherwise the home named in ``etc_path``, when that
    file exists (a broken one is an error, not a reason to look elsewhere); otherwise
    ``$HOME``, because a user who points it at a scratch directory means it, as every
    other program respects it; the password database only for a process without
    ``$HOME`` (started by an init system or ``env -i``).
    """
    if home is not None:
        return os.path.abspath(home)
    if os.path.exists(etc_path):
        return load_etc(etc_path)['home']
    if environ.get('HOME'):
        return os.path.abspath(environ['HOME'])
    try:
        return pwd.getpwuid(os.geteuid()).pw_dir
    except KeyError:
        raise ConfigError({'message': f'no AVE home: no --home, no {etc_path}, no $HOME '
                           f'and uid {os.geteuid()} has no password entry'}) from None


def existing_home(home: str) -> str:
    """``home`` (a ``--home`` argument) as an absolute path, if it is a directory.

    Only creating the default configuration makes a home; every other tool given a
    home that is not there stops with the hint, instead of acting on a typo.
    """
    path = os.path.abspath(home)
    if not os.path.isdir(path):
        raise ConfigError({'message': f'--home {home}: no such directory (ave-config '
                           f'--create-default --home {home} makes one)', 'path': path,
                           'field': None})
    return path


# --- creating files ---------------------------------------------------------------

def create_default(home: str) -> tuple[list[str], list[str]]:
    """Create the default configuration under ``home``; return ``(created, skipped)``.

    ``home`` and ``<home>/.ave/config`` are created if missing. A file that already
    exists is skipped untouched, whatever it holds. Run this as the account that
    will run AVE: the files belong to whoever creates them, and ``authkeys.json`` is
    readable by its owner only.
    """
    home = os.path.abspath(home)
    directory = config_dir(home)
    os.makedirs(directory, exist_ok=True)
    created: list[str] = []
    skipped: list[str] = []
    for name, content, mode in _default_files(home):
        path = os.path.join(directory, name)
        if os.path.lexists(path) or not _write_new(path, content, mode):
            skipped.append(path)
        else:
            created.append(path)
    return created, skipped


def _default_files(home: str) -> list[tuple[str, dict, int]]:
    """Name, content and mode of each default file. Keys are drawn here, fresh."""
    git = shutil.which('git')
    return [
        ('broker.json', {'host': DEFAULT_HOST, 'port': DEFAULT_PORT}, 0o644),
        ('authkeys.json', {'admin': secrets.token_urlsafe(32),
                           'share': secrets.token_urlsafe(32)}, 0o600),
        ('workspace.json', {'root': os.path.join(home, '.ave', 'workspaces'),
                            'tools': {'git': git} if git else {},
                            'pretty': None}, 0o644),
    ]


def create_etc(path: str = ETC_PATH, user: str | None = None) -> tuple[list[str], list[str]]:
    """Write ``{"name": ..., "home": ...}`` for an account to ``path``.

    Returns ``([path], [])`` when the file was written and ``([], [path])`` when a
    file was already there: an existing file always wins and is not an error, so a
    package's install script can call this on every upgrade. The account is
    ``user`` when given (stdin is then never read), otherwise the name read from
    stdin up to EOF. Raises ConfigError when the name is empty or no such account
    exists. The parent directory is created if missing.
    """
    if os.path.lexists(path):
        return [], [path]
    name = user if user is not None else sys.stdin.read().strip()
    entry = _account(path, name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if _write_new(path, {'name': entry.pw_name, 'home': entry.pw_dir}, 0o644):
        return [path], []
    return [], [path]


def _account(path: str, name: str) -> pwd.struct_passwd:
    """The password entry of ``name``, or the ConfigError that ``create_etc`` reports."""
    if not name or len(name.split()) != 1:
        raise ConfigError.at(path, f'expected one account name, got {name!r}')
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise ConfigError.at(path, f'no such account: {name!r}') from None


def _write_new(path: str, content: dict, mode: int) -> bool:
    """Publish ``content`` as JSON at ``path`` unless a file is there; True if written.

    The JSON goes to a temporary file beside ``path`` first and is then published
    in one step, so nobody ever reads a partly written file. ``mode`` is set
    exactly (not filtered by the umask) because other accounts must be able to read
    broker.json and /etc/ave/user, and nobody else may read authkeys.json.
    """
    directory, name = os.path.split(path)
    temp = os.path.join(directory, f'.{name}.{secrets.token_hex(6)}.tmp')
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with open(fd, 'w', encoding='utf-8') as stream:
            os.fchmod(fd, mode)
            json.dump(content, stream, indent=4)
            stream.write('\n')
            stream.flush()
            os.fsync(fd)
        return _publish(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def _publish(temp: str, path: str) -> bool:
    """Give the finished ``temp`` the name ``path`` unless taken; True if published.

    A hard link is atomic *and* refuses to replace an existing file, so a file that
    appears while we write still wins. File systems without hard links get
    ``os.replace`` after a last look, which leaves only a tiny window.
    """
    try:
        os.link(temp, path)
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(path):
            return False
        os.replace(temp, path)
    return True


# --- loading files ----------------------------------------------------------------

def load_etc(path: str = ETC_PATH) -> dict[str, str]:
    """The checked content of ``/etc/ave/user``: ``{'name': str, 'home': absolute path}``."""
    check = Checker(path)
    data = check.json_object(None, read_json(path), _ETC_KEYS)
    return {'name': check.string('name', check.required(data, 'name')),
            'home': check.absolute_path('home', check.required(data, 'home'))}


def load_authkeys(home: str) -> dict[str, str | None]:
    """The account keys from ``<home>/.ave/config/authkeys.json``: name -> key or None.

    The dict is what ``Control`` takes as its alternative keys. Error messages
    never repeat a key, only its JSON type.
    """
    path = os.path.join(config_dir(home), 'authkeys.json')
    check = Checker(path)
    data = check.json_object(None, read_json(path))
    return {name: check.string_or_null(name, key, secret=True) for name, key in data.items()}


def load_broker_config(home: str,
                       check_equipment: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """The checked content of ``<home>/.ave/config/broker.json`` with defaults filled in.

    Returns ``{'host': str, 'port': int, 'stacks': [[profile dict, ...], ...],
    'remote': None or {'host', 'port', 'policy', 'authkey'}, 'equipment': [dict, ...],
    'limits': {name: number} (every name in LIMITS), 'isolation': str,
    'queue': {name: number} (every name in QUEUE), 'http': None or {'host', 'port'},
    'lab': None or {'name', 'etcd', 'ttl', 'advertise', 'compact_s'},
    'crash_grace': seconds}``.

    Here an equipment entry or stack member is only checked to be an object with a
    string ``type``; what else it needs depends on its type, which only the equipment
    plug-ins know. They hook in through ``check_equipment``: it is called with each
    equipment entry and raises ValueError describing what is wrong, which is
    reported as a ConfigError on ``equipment[i]``.
    """
    path = os.path.join(config_dir(home), 'broker.json')
    check = Checker(path)
    data = check.json_object(None, read_json(path), BROKER_KEYS)
    config: dict[str, Any] = {
        'host': check.string('host', data.get('host', DEFAULT_HOST)),
        'port': check.port('port', data.get('port', DEFAULT_PORT)),
        'stacks': _stacks(check, data.get('stacks', [])),
        'remote': _remote(check, data['remote']) if 'remote' in data else None,
        'equipment': _equipment(check, data.get('equipment', [])),
        'limits': _numbers(check, 'limits', data.get('limits', {}), LIMITS),
        'queue': _numbers(check, 'queue', data.get('queue', {}), QUEUE),
        'http': _http(check, data['http']) if 'http' in data else None,
        'lab': _lab(check, data['lab']) if 'lab' in data else None,
        'isolation': check.choice('isolation', data.get('isolation', 'auto'),
                                  ISOLATION_MODES),
        'crash_grace': check.number('crash_grace',
                                    data.get('crash_grace', DEFAULT_CRASH_GRACE), 0,
                                    CRASH_GRACE_MAX),
    }
    for index, entry in enumerate(config['equipment']):
        _check_entry(check, f'equipment[{index}]', entry, check_equipment)
    return config


def _stacks(check: Checker, value: Any) -> list[list[dict]]:
    """Each stack is a list of profile objects, each naming its type."""
    return [[check.typed(f'stacks[{i}][{j}]', member)
             for j, member in enumerate(check.json_list(f'stacks[{i}]', stack))]
            for i, stack in enumerate(check.json_list('stacks', value))]


def _remote(check: Checker, value: Any) -> dict[str, Any]:
    """The broker this one shares with or forwards to; host and policy are required."""
    data = check.json_object('remote', value, _REMOTE_KEYS)
    policy = check.required(data, 'policy', 'remote')
    if policy not in _POLICIES:
        raise check.error('remote.policy', f'expected "share" or "forward", got {shown(policy)}')
    return {'host': check.string('remote.host', check.required(data, 'host', 'remote')),
            'port': check.port('remote.port', data.get('port', DEFAULT_PORT)),
            'policy': policy,
            'authkey': check.string_or_null('remote.authkey', data.get('authkey'), secret=True)}


def _lab(check: Checker, value: Any) -> dict[str, Any]:
    """The lab this broker belongs to: its name, its etcd cluster's client URLs, the
    lease's time to live (seconds), the name other hosts reach this one by, and how
    often its leader compacts etcd's history."""
    data = check.json_object('lab', value, _LAB_KEYS)
    name = check.string('lab.name', check.required(data, 'name', 'lab'))
    if '/' in name:
        raise check.error('lab.name', f'may not contain "/", got {shown(name)}')
    urls = check.json_list('lab.etcd', check.required(data, 'etcd', 'lab'))
    if not urls:
        raise check.error('lab.etcd', 'expected at least one etcd URL')
    for index, url in enumerate(urls):
        if not isinstance(url, str) or not url.startswith('http://'):
            raise check.error(f'lab.etcd[{index}]',
                              f'expected an http:// URL, got {shown(url)}')
    advertise = data.get('advertise')
    return {'name': name, 'etcd': urls,
            'ttl': check.number('lab.ttl', data.get('ttl', DEFAULT_LAB_TTL), 2, 3600,
                                integer=True),
            'advertise': None if advertise is None
            else check.string('lab.advertise', advertise),
            'compact_s': check.number('lab.compact_s',
                                      data.get('compact_s', DEFAULT_LAB_COMPACT_S), 0, 86400)}


def _http(check: Checker, value: Any) -> dict[str, Any]:
    """Where the status page and metrics are served; the port is required."""
    data = check.json_object('http', value, _HTTP_KEYS)
    return {'host': check.string('http.host', data.get('host', DEFAULT_HOST)),
            'port': check.port('http.port', check.required(data, 'port', 'http'))}


def _numbers(check: Checker, field: str, value: Any,
             known: dict[str, tuple[int | float, int | float, int | float]]
             ) -> dict[str, int | float]:
    """An object of numbers (``limits``, ``queue``): each from broker.json where
    given, else its default, checked against its range."""
    data = check.json_object(field, value, known)
    numbers: dict[str, int | float] = {}
    for name, (default, low, high) in known.items():
        given = data.get(name, default)
        numbers[name] = check.number(f'{field}.{name}', given, low, high,
                                     integer=isinstance(default, int))
    return numbers


def _equipment(check: Checker, value: Any) -> list[dict]:
    """Statically declared equipment: objects that name their type."""
    return [check.typed(f'equipment[{i}]', entry)
            for i, entry in enumerate(check.json_list('equipment', value))]


def _check_entry(check: Checker, field: str, entry: dict,
                 check_equipment: Callable[[dict], None] | None) -> None:
    """Let the equipment plug-in judge ``entry``; its ValueError names our field."""
    if check_equipment is None:
        return
    try:
        check_equipment(entry)
    except ValueError as err:
        raise check.error(field, str(err)) from None


def load_workspace_config(home: str) -> dict[str, Any]:
    """The checked content of ``<home>/.ave/config/workspace.json`` with defaults filled in.

    Returns ``{'root': absolute path, 'tools': {name: path}, 'pretty': str or None,
    'limits': {'unzip_max_bytes': int, 'unzip_max_entries': int}}``. ``root`` may
    start with ``~``; it defaults to ``<home>/.ave/workspaces``. ``limits`` caps what
    one unzip of a job's archive may write: the total bytes its members declare
    (default 4 GiB) and how many members it has (default 100,000); each key is
    optional and must be an integer above 0.
    """
    path = os.path.join(config_dir(home), 'workspace.json')
    check = Checker(path)
    data = check.json_object(None, read_json(path), _WORKSPACE_KEYS)
    root = data.get('root', os.path.join(os.path.abspath(home), '.ave', 'workspaces'))
    tools = check.json_object('tools', data.get('tools', {}))
    limits = check.json_object('limits', data.get('limits', {}), _WORKSPACE_LIMIT_KEYS)
    return {'root': check.absolute_path('root', root),
            'tools': {name: check.string(f'tools.{name}', tool) for name, tool in tools.items()},
            'pretty': check.string_or_null('pretty', data.get('pretty')),
            'limits': {
                'unzip_max_bytes': check.positive_int(
                    'limits.unzip_max_bytes', limits.get('unzip_max_bytes',
                                                         DEFAULT_UNZIP_MAX_BYTES)),
                'unzip_max_entries': check.positive_int(
                    'limits.unzip_max_entries', limits.get('unzip_max_entries',
                                                           DEFAULT_UNZIP_MAX_ENTRIES))}}
