"""Who the broker serves: clients, the sessions holding their equipment, and the links
to those sessions, kept as one model.

A ``Client`` is one connection to the broker, with the identity its job announced,
the session that hosts what it was given and its place in the waiting queue. A
``SessionRecord`` is one running session process. ``BrokerState`` indexes both the
ways the broker looks them up (by connection, by holder id, by session pid, by link)
and is the only place that changes those indexes, so no lookup ever scans and no
two dicts can disagree. A restart hands the whole model to the successor as JSON
(``export``/``restore``), with connections replaced by their index in the list of
handed-over peers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ave.network.connection import Connection
from ave.network.process import Process

Key = tuple[str, str]

#: The fields a client announces about itself (DESIGN.md, "Who").
IDENTITY_FIELDS = ('user', 'host', 'pid', 'program', 'job')
#: Longest value kept for an announced field: it is shown to people and logged.
IDENTITY_VALUE_LIMIT = 300


@dataclass(eq=False)
class SessionRecord:
    """What the broker knows about one running session."""

    process: Process
    port: int
    authkey: str
    link: Connection | None  # None once the link is gone (a predecessor saw it close)
    keys: set[Key] = field(default_factory=set)
    holder: int | None = None   # the client it serves; None once that client left
    closing: bool = False       # asked to end; killed if it does not in time

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid


@dataclass(eq=False)
class Client:
    """A connected client and the session holding its equipment, if any."""

    holder: int
    connection: Connection
    address: str = ''
    identity: dict = field(default_factory=dict)
    session: SessionRecord | None = None
    connected_at: float = field(default_factory=time.time)

    def describe(self) -> dict:
        """The identity shown to people: what the job announced, else its address."""
        return dict(self.identity) or {'host': self.address}


def identity_of(announced: Any, address: str) -> dict:
    """Keep the known fields of a job's self-description, each cut to a sane length.

    The description is the job's own claim, shown and logged, never trusted: a
    peer cannot use it to grow the broker's memory or its log lines.
    """
    if not isinstance(announced, dict):
        return {}
    identity = {}
    for name in IDENTITY_FIELDS:
        value = announced.get(name)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            identity[name] = value if isinstance(value, int) \
                else value[:IDENTITY_VALUE_LIMIT]
    return identity


class BrokerState:
    """Clients and sessions, indexed every way the broker needs them."""

    def __init__(self) -> None:
        self._clients: dict[Connection, Client] = {}
        self._by_holder: dict[int, Client] = {}
        self._sessions: dict[int, SessionRecord] = {}
        self._by_link: dict[Connection, SessionRecord] = {}
        self.next_holder = 1

    # -- clients -----------------------------------------------------------------------

    def client(self, connection: Connection) -> Client | None:
        return self._clients.get(connection)

    def client_by_holder(self, holder: object) -> Client | None:
        return self._by_holder.get(holder) if isinstance(holder, int) else None

    def clients(self) -> list[Client]:
        return list(self._clients.values())

    def add_client(self, connection: Connection, address: str = '') -> Client:
        client = Client(self.next_holder, connection, address)
        self.next_holder += 1
        self._clients[connection] = client
        self._by_holder[client.holder] = client
        return client

    def remove_client(self, connection: Connection) -> Client | None:
        client = self._clients.pop(connection, None)
        if client is not None:
            del self._by_holder[client.holder]
            if client.session is not None:
                client.session.holder = None
        return client

    # -- sessions ----------------------------------------------------------------------

    def session(self, pid: int) -> SessionRecord | None:
        return self._sessions.get(pid)

    def session_of_link(self, connection: Connection) -> SessionRecord | None:
        return self._by_link.get(connection)

    def is_link(self, connection: Connection) -> bool:
        return connection in self._by_link

    def sessions(self) -> list[SessionRecord]:
        return list(self._sessions.values())

    def sessions_from(self, address: str) -> int:
        """How many sessions serve clients connected from ``address``."""
        return sum(1 for client in self._clients.values()
                   if client.session is not None and client.address == address)

    def attach(self, client: Client, record: SessionRecord) -> None:
        """``record`` now hosts ``client``'s equipment."""
        client.session = record
        record.holder = client.holder
        self.add_session(record)

    def add_session(self, record: SessionRecord) -> None:
        self._sessions[record.pid] = record
        if record.link is not None:
            self._by_link[record.link] = record

    def detach(self, client: Client) -> SessionRecord | None:
        """The client no longer has a session (it is closing, or ended)."""
        record, client.session = client.session, None
        if record is not None:
            record.holder = None
        return record

    def remove_session(self, pid: int) -> SessionRecord | None:
        """A session process ended: forget it and its link."""
        record = self._sessions.pop(pid, None)
        if record is None:
            return None
        self.forget_link(record)
        client = None if record.holder is None else self._by_holder.get(record.holder)
        if client is not None and client.session is record:
            client.session = None
        return record

    def forget_link(self, record: SessionRecord) -> None:
        if record.link is not None:
            self._by_link.pop(record.link, None)

    # -- handing over ------------------------------------------------------------------

    def export(self, index_of: Callable[[Connection], int | None]) -> dict:
        """The whole model as JSON; connections become indexes of handed-over peers."""
        return {
            'next_holder': self.next_holder,
            'clients': [{'peer': index_of(c.connection), 'holder': c.holder,
                         'address': c.address, 'identity': c.identity,
                         'connected_at': c.connected_at,
                         'session': None if c.session is None else c.session.pid}
                        for c in self._clients.values()
                        if index_of(c.connection) is not None],
            'sessions': [{'pid': r.pid, 'port': r.port, 'authkey': r.authkey,
                          'link': None if r.link is None else index_of(r.link),
                          'keys': sorted(r.keys), 'holder': r.holder,
                          'closing': r.closing}
                         for r in self._sessions.values()],
        }

    @classmethod
    def restore(cls, data: dict, connections: list[Connection],
                adopt: Callable[[int], Process]) -> BrokerState:
        """The model ``export`` described, on the successor's connections; ``adopt``
        turns a session pid into a process handle."""
        state = cls()
        state.next_holder = data['next_holder']
        for entry in data['sessions']:
            link = None if entry['link'] is None else connections[entry['link']]
            state.add_session(SessionRecord(
                adopt(entry['pid']), entry['port'], entry['authkey'], link,
                {(key[0], key[1]) for key in entry['keys']}, entry['holder'],
                entry['closing']))
        for entry in data['clients']:
            connection = connections[entry['peer']]
            client = Client(entry['holder'], connection, entry['address'],
                            entry['identity'], None, entry['connected_at'])
            state._clients[connection] = client
            state._by_holder[client.holder] = client
            if entry['session'] is not None:
                client.session = state._sessions.get(entry['session'])
        return state
