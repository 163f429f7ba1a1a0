"""One connection as a Control sees it, and every state it can be in.

A Control registers one ``Peer`` per connection with its selector. The peer's
``state`` says what the loop does with it; every change of state goes through
``Peer.move``, checked against one table, so "can this happen?" has one answer:

    authenticating  challenge sent, waiting for the digest (dropped after a while)
    established     requests are read and served one at a time
    serving         a request is being worked on (a worker thread, a waiting get):
                    its reply is owed, so later requests wait in the input buffer
    watched         a connection the service made itself; only its liveness matters
    closed          gone: the connection is closed and nobody serves it
    released        handed to someone else (a successor broker): not closed here

Orthogonal to the state, ``writing`` says output is queued: a peer is not read while
its replies wait to be sent (backpressure), and ``parked`` says a serving peer has
buffered as much input as it may, so it is not read until its reply has gone out.
"""
from __future__ import annotations

import base64
import socket as socketlib

from ave.network.connection import Connection
from ave.network.protocol import ANONYMOUS, NO_ACCOUNTS, Credentials

AUTHENTICATING = 'authenticating'
ESTABLISHED = 'established'
SERVING = 'serving'
WATCHED = 'watched'
CLOSED = 'closed'
RELEASED = 'released'

#: Which state may follow which. Anything else is a bug in the loop, raised at once.
TRANSITIONS: dict[str, frozenset[str]] = {
    AUTHENTICATING: frozenset({ESTABLISHED, CLOSED, RELEASED}),
    ESTABLISHED: frozenset({SERVING, CLOSED, RELEASED}),
    SERVING: frozenset({ESTABLISHED, CLOSED, RELEASED}),
    WATCHED: frozenset({CLOSED, RELEASED}),
    CLOSED: frozenset(),
    RELEASED: frozenset(),
}

#: States in which the subclass has been told about the connection (new_connection or
#: add_connection) and must hear when it goes (lost_connection).
IN_SERVICE = frozenset({ESTABLISHED, SERVING, WATCHED})
#: States whose peers are still registered with the selector.
LIVE = frozenset({AUTHENTICATING, ESTABLISHED, SERVING, WATCHED})
#: The state of the one ``Listener`` (it never changes): new connections are waiting.
LISTENING = 'listening'


class Listener:
    """The listening socket as the selector sees it, beside the peers."""

    __slots__ = ('connection', 'state')

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.state = LISTENING


class Peer:
    """One connection and everything the loop knows about it."""

    __slots__ = ('connection', 'fd', 'state', 'writing', 'parked', 'registered_events',
                 'nonce', 'deadline', 'expiry', 'credentials', 'address_key', 'buffered',
                 'reply_is_async')

    def __init__(self, connection: Connection, state: str) -> None:
        self.connection = connection
        self.fd = connection.fileno()
        self.state = state
        self.writing = False
        self.parked = False
        self.registered_events = 0          # what the selector watches now (0: nothing)
        self.nonce = b''
        self.deadline = 0.0
        self.expiry: list | None = None      # the loop's timer that ends the handshake
        self.credentials: Credentials = ANONYMOUS
        self.address_key: str | None = None  # counted against the per-address cap
        self.buffered = 0                    # input bytes counted in the global total
        self.reply_is_async = False          # the owed reply (state serving) is one-way

    def __repr__(self) -> str:
        return f'<Peer {self.connection.address} {self.state}>'

    def move(self, state: str) -> str:
        """Change state; return the previous one. A move the table forbids raises."""
        previous = self.state
        if state not in TRANSITIONS[previous]:
            raise RuntimeError(f'{self!r}: no transition from {previous} to {state}')
        self.state = state
        return previous

    @property
    def live(self) -> bool:
        return self.state in LIVE

    @property
    def authkey(self) -> str | None:
        return self.credentials.authkey

    @property
    def primary(self) -> bool:
        return self.credentials.primary

    @property
    def accounts(self) -> frozenset[str]:
        return self.credentials.accounts

    @property
    def authenticated(self) -> bool:
        return self.credentials.authenticated

    def wanted_events(self, read: int, write: int) -> int:
        """The selector events this peer needs now (0: leave it alone for a while)."""
        if not self.live:
            return 0
        if self.writing:
            return write
        if self.parked:
            return 0
        return read


# -- handing a peer to a successor ------------------------------------------------------

def describe(peer: Peer, now: float) -> dict:
    """A peer as JSON, partly read input and unsent output included, so that a
    successor process can go on exactly where this one stopped."""
    return {'state': peer.state, 'address': list(peer.connection.address),
            'input': _b64(peer.connection.pending_input()),
            'output': _b64(peer.connection.pending_output()),
            'challenge': peer.nonce.hex(),
            'deadline_in': max(0.0, peer.deadline - now),
            'authkey': peer.authkey, 'primary': peer.primary,
            'accounts': sorted(peer.accounts),
            'reply_is_async': peer.reply_is_async,
            'counted': peer.address_key is not None}


def restore(sock: socketlib.socket, description: dict, now: float) -> Peer:
    """The peer ``describe`` described, on the successor's copy of its socket."""
    connection = Connection(tuple(description['address']), sock)
    connection.restore(base64.b64decode(description['input']),
                       base64.b64decode(description['output']))
    peer = Peer(connection, description['state'])
    peer.credentials = Credentials(bool(description['primary']),
                                   frozenset(description['accounts']) or NO_ACCOUNTS,
                                   description['authkey'])
    peer.nonce = bytes.fromhex(description['challenge'])
    peer.deadline = now + description['deadline_in']
    peer.reply_is_async = bool(description.get('reply_is_async'))
    # Nothing is written here: until the predecessor confirms it has let go, the
    # queued output is still its to send. The loop sends it once running.
    peer.writing = connection.has_output
    if description.get('counted'):
        peer.address_key = str(connection.address[0])
    return peer


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode('ascii')
