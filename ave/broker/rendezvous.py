"""The rendezvous: where sessions that outlived their broker meet the next one.

A session serves its client directly, so a broker that dies (SIGKILL, the OOM
killer, a bug) need not take the client's job with it: the session keeps serving
and looks for the next broker of its home at a UNIX stream socket every broker
listens on, ``<home>/.ave/sessions.sock`` (mode 0600, in the home's own ``.ave``).
Both ends of the conversation live in this module:

1. An orphaned session connects and sends one frame (``ave.network.framing``: a
   4-byte big-endian length, then UTF-8 JSON), its *presentation*::

       {"pid": 4242, "port": 50123, "authkey": "...",
        "client": {"identity": {"user": ..., "job": ...}, "token": "<sha-256 hex>"},
        "resources": [{"profile": {...}, "since": 1718000000.5}, ...],
        "releasing": [{...profile...}, ...]}

   ``token`` is the digest of the client's resume token (never the token);
   ``resources`` are the items it hosts, ``releasing`` those it is tearing down.
2. The broker checks the peer through the kernel before reading a byte of JSON:
   ``SO_PEERCRED`` must name a process of the broker's own user. Then the
   presentation must name that same pid, and the pid must be a live process
   called ``ave-broker-sess`` (how the kernel shortens ``ave-broker-session``).
3. The broker proves the key: it connects to the announced port as a client with
   the announced key and must be told ``{"authenticated": true}``
   (``session_answers``). Only the session listening there accepts that key, so a
   presentation cannot borrow another session's port, nor make up a key.
4. Adopted: the connection becomes the session's broker link, exactly like the
   socket pair a forked session is given. The broker's first one-way request on it
   is ``adopted(crash_grace)``, then ``add_resource``, ``remove_resource`` and
   ``end`` as usual; the session reports ``released``. Refused: the broker closes
   the connection without a word, and the session tries again after
   ``RETRY_INTERVAL`` seconds until its grace runs out.

The session checks its end too: the listener must belong to its own user (its pid
is not checked: a successor of ``--restart`` inherits the listening socket).

Cost contract: the presentation is the only thing read from a peer before it is
trusted. It is read through a frame decoder limited to ``PRESENTATION_LIMIT`` bytes,
so memory never follows an announced length; it is parsed once as JSON (never
evaluated), and every field is checked, every count and string capped.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
from dataclasses import dataclass
from typing import Any, Iterator

import psutil

from ave.exceptions import AveException
from ave.network import protocol
from ave.network.connection import BlockingConnection
from ave.network.exceptions import ConnectionException
from ave.profile import Profile, ProfileError

#: How a session process is called (``prctl`` keeps 15 characters of its name).
SESSION_NAME = 'ave-broker-sess'
#: Seconds between an orphaned session's attempts to reach a broker.
RETRY_INTERVAL = 0.2
#: The largest presentation a broker reads: a session with MAX_RESOURCES items of
#: generous profiles fits well within it.
PRESENTATION_LIMIT = 1024 * 1024
#: Most items one presentation may list, hosted and releasing together.
MAX_RESOURCES = 1024
#: Longest session key and resume-token digest accepted.
MAX_KEY_LENGTH = 256
#: Connections queued for the broker at once (sessions retry when it is full).
BACKLOG = 128

_SOCKET_NAME = 'sessions.sock'
_MARKER_NAME = 'sessions.mark'
_PRESENTATION_KEYS = {'pid', 'port', 'authkey', 'client', 'resources', 'releasing'}
#: The kernel's limit on a socket path; longer ones are reached through /proc.
_SUN_PATH_MAX = 107


class BadPresentation(AveException):
    """A peer of the rendezvous is not a session this broker may adopt; the message
    says why."""


@dataclass(frozen=True)
class Hosting:
    """One item a session hosts, and since when (None: it does not know)."""

    profile: dict
    since: float | None


@dataclass(frozen=True)
class Presentation:
    """What an orphaned session tells the next broker about itself."""

    pid: int
    port: int
    authkey: str
    identity: dict
    token: str | None
    resources: tuple[Hosting, ...]
    releasing: tuple[dict, ...]

    def encode(self) -> bytes:
        return json.dumps({
            'pid': self.pid, 'port': self.port, 'authkey': self.authkey,
            'client': {'identity': self.identity, 'token': self.token},
            'resources': [{'profile': h.profile, 'since': h.since} for h in self.resources],
            'releasing': list(self.releasing)}).encode('utf-8')


def parse(payload: bytes) -> Presentation:
    """The presentation in a frame; BadPresentation names the first defect."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        raise BadPresentation('the presentation is not JSON') from None
    if not isinstance(data, dict) or set(data) != _PRESENTATION_KEYS:
        raise BadPresentation(f'a presentation is an object with exactly the keys '
                              f'{", ".join(sorted(_PRESENTATION_KEYS))}')
    client = data['client']
    if not isinstance(client, dict) or set(client) != {'identity', 'token'}:
        raise BadPresentation('"client" must be an object with "identity" and "token"')
    resources, releasing = data['resources'], data['releasing']
    if not isinstance(resources, list) or not isinstance(releasing, list):
        raise BadPresentation('"resources" and "releasing" must be lists')
    if len(resources) + len(releasing) > MAX_RESOURCES:
        raise BadPresentation(f'more than {MAX_RESOURCES} items')
    return Presentation(
        pid=_positive_int('pid', data['pid']),
        port=_port(data['port']),
        authkey=_key('authkey', data['authkey']),
        identity=client['identity'] if isinstance(client['identity'], dict) else {},
        token=None if client['token'] is None else _key('token', client['token']),
        resources=tuple(_hosting(entry) for entry in resources),
        releasing=tuple(_profile(entry) for entry in releasing))


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadPresentation(f'"{name}" must be a positive integer')
    return value


def _port(value: Any) -> int:
    port = _positive_int('port', value)
    if port > 65535:
        raise BadPresentation('"port" must be a TCP port')
    return port


def _key(name: str, value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_KEY_LENGTH:
        raise BadPresentation(f'"{name}" must be a string of 1 to {MAX_KEY_LENGTH} '
                              f'characters')
    return value


def _hosting(entry: Any) -> Hosting:
    if not isinstance(entry, dict) or set(entry) != {'profile', 'since'}:
        raise BadPresentation('each of "resources" is {"profile": ..., "since": ...}')
    since = entry['since']
    if since is not None and (isinstance(since, bool) or not isinstance(since, (int, float))):
        raise BadPresentation('"since" must be a time in seconds or null')
    return Hosting(_profile(entry['profile']), None if since is None else float(since))


def _profile(value: Any) -> dict:
    try:
        Profile.validate(value)
    except ProfileError as error:
        raise BadPresentation(f'not a profile: {error}') from None
    return dict(value)


# -- the socket -------------------------------------------------------------------------

def socket_path(home: str) -> str:
    return os.path.join(home, '.ave', _SOCKET_NAME)


def listen(home: str) -> socket.socket:
    """The broker's end: a new listening socket in place of any stale one.

    It is bound under a temporary name, made owner-only, and only then renamed over
    the well-known name, so no other user can ever connect, and sessions looking
    for a broker never find the name missing while a socket file of a dead broker
    is replaced.
    """
    path = socket_path(home)
    temp = f'{path}.{secrets.token_hex(4)}.tmp'
    sock = socket.socket(socket.AF_UNIX,
                         socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        with _reachable(temp) as address:
            sock.bind(address)
        os.chmod(temp, 0o600)
        sock.listen(BACKLOG)
        os.replace(temp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return sock


def connect(home: str) -> socket.socket | None:
    """The session's end: a connection to the broker of ``home``, or None when no
    broker of our own user listens there now (worth trying again later)."""
    sock = socket.socket(socket.AF_UNIX,
                         socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        with _reachable(socket_path(home)) as address:
            sock.connect(address)
        _, uid = peer_of(sock)
    except OSError:  # absent, refused, its queue full, or the home is gone
        sock.close()
        return None
    if uid != os.getuid():
        sock.close()
        return None
    return sock


def peer_of(sock: socket.socket) -> tuple[int, int]:
    """The pid and uid the kernel vouches for at the other end of a UNIX socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    pid, uid, _ = (int.from_bytes(creds[i:i + 4], 'little') for i in (0, 4, 8))
    return pid, uid


@contextlib.contextmanager
def _reachable(path: str) -> Iterator[str]:
    """A name for ``path`` short enough for a socket address: itself, or a path
    through the directory's descriptor when the home's path is long."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield path
        return
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f'/proc/self/fd/{fd}/{os.path.basename(path)}'
    finally:
        os.close(fd)


# -- who is a session ---------------------------------------------------------------------

def is_session(pid: int) -> bool:
    """Whether ``pid`` is a live session process."""
    try:
        process = psutil.Process(pid)
        return process.name() == SESSION_NAME and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def session_answers(host: str, port: int, authkey: str, timeout: float) -> bool:
    """Whether the session listening on ``host:port`` accepts ``authkey``: the
    handshake of any AVE client, with the verdict kept. Blocks up to a few times
    ``timeout``; the broker runs it in a worker thread."""
    connection = BlockingConnection((host, port))
    try:
        connection.connect(timeout)
        nonce = protocol.parse_challenge(connection.get(timeout))
        connection.put(protocol.digest(authkey, nonce), timeout)
        return protocol.parse_verdict(connection.get(timeout))
    except (ConnectionException, AveException, OSError):
        return False
    finally:
        connection.close()


def marker_path(home: str) -> str:
    """A file every session of ``home`` keeps open while it may still present itself:
    how a starting broker knows whom to wait for."""
    return os.path.join(home, '.ave', _MARKER_NAME)


def hold_marker(home: str) -> int:
    """Open the marker (creating it); the session keeps the descriptor."""
    return os.open(marker_path(home), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)


def orphans(home: str) -> set[int]:
    """Pids of this user's sessions of ``home`` that may present themselves: live
    ``ave-broker-sess`` processes holding the marker open."""
    marker = marker_path(home)
    found = set()
    for process in psutil.process_iter(['name', 'uids']):
        try:
            if (process.info['name'] != SESSION_NAME
                    or process.info['uids'] is None
                    or process.info['uids'].real != os.getuid()):
                continue
            if any(f.path == marker for f in process.open_files()):
                found.add(process.pid)
        except psutil.Error:
            continue  # gone meanwhile, or not ours to look at
    return found
