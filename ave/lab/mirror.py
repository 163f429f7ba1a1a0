"""The lab's keys in etcd, and every broker's copy of them.

All of a lab lives under ``/ave/labs/<name>/``, so labs can share one etcd::

    brokers/<host>                  {address, pid, version, stacks}   host's lease
    items/<host>/<type>/<id>        {profile}                         host's lease
    holds/<host>/<type>/<id>        {job, request, position, profile,
                                     holder, since, yielded}         job's broker's lease
    jobs/<job>                      {broker, holder}                  broker's lease
    requests/<job>/<n>              {profiles, wait, priority, ...}   broker's lease
    decisions/<job>/<n>             {error: {...}}  (refusals only)   broker's lease
    sessions/<job>/<host>           {address, authkey, holds}         host's lease
    leader                          <host>                            leader's lease

A lease is a host's: each broker keeps one alive. A broker that dies takes its items,
its jobs' holds and everything else of its own with it after ``ttl``. A granted
request becomes one hold per item (in one transaction, with the request deleted);
letting an item go marks its hold ``yielded``, and the item's host deletes the hold
once the item is reset, so an item is never free in etcd while it is being reset. A
job that ends has its keys deleted and its holds yielded by its broker. ``<host>`` is
a broker's advertised name, ``<id>`` an item's identity, ``<job>`` a random name a
broker gives each of its clients.

``Mirror`` is a broker's copy of every key of its lab, kept by a watch; the views
below read it without I/O, so listings and decisions never wait for etcd.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from ave.lab.etcd import KeyValue, WatchEvent

ROOT = '/ave/labs/'
#: The largest value a lab key may hold; anything larger is not ours and is ignored.
MAX_VALUE = 1024 * 1024


class LabKeys:
    """Key names of one lab."""

    def __init__(self, lab: str) -> None:
        if not lab or '/' in lab:
            raise ValueError(f'a lab name may not be empty or contain "/": {lab!r}')
        self.prefix = f'{ROOT}{lab}/'

    def broker(self, host: str) -> str:
        return f'{self.prefix}brokers/{host}'

    def item(self, host: str, kind: str, identity: str) -> str:
        return f'{self.prefix}items/{host}/{kind}/{identity}'

    def hold(self, host: str, kind: str, identity: str) -> str:
        return f'{self.prefix}holds/{host}/{kind}/{identity}'

    def job(self, job: str) -> str:
        return f'{self.prefix}jobs/{job}'

    def request(self, job: str, number: int) -> str:
        return f'{self.prefix}requests/{job}/{number}'

    def decision(self, job: str, number: int) -> str:
        return f'{self.prefix}decisions/{job}/{number}'

    def session(self, job: str, host: str) -> str:
        return f'{self.prefix}sessions/{job}/{host}'

    def leader(self) -> str:
        return f'{self.prefix}leader'

    def parse(self, key: str) -> tuple[str, ...] | None:
        """``(kind, part, ...)`` of a key of this lab, None for any other key."""
        if not key.startswith(self.prefix):
            return None
        parts = tuple(key[len(self.prefix):].split('/'))
        return parts if parts and parts[0] in _SHAPES and len(parts) == _SHAPES[parts[0]] \
            else None


# How many '/'-separated parts each kind of key has, its kind included.
_SHAPES = {'brokers': 2, 'items': 4, 'holds': 4, 'jobs': 2,
           'requests': 3, 'decisions': 3, 'sessions': 3, 'leader': 1}


@dataclass(frozen=True)
class Entry:
    """One key of the lab as the mirror holds it: its parts, JSON value and lease."""

    parts: tuple[str, ...]
    value: Any
    lease: int
    mod_revision: int


class Mirror:
    """A broker's copy of its lab's keys: filled from a read, kept by a watch.

    Values that are not JSON, or too large, are ignored: the lab's prefix is shared
    with whoever else can write to etcd, and a bad value must not break a broker.
    """

    def __init__(self, keys: LabKeys) -> None:
        self.keys = keys
        self.entries: dict[str, Entry] = {}
        self.revision = 0
        self._read_at = 0

    def load(self, kvs: Iterable[KeyValue], revision: int) -> None:
        """Replace everything with a full read made at ``revision``."""
        self.entries = {}
        for kv in kvs:
            self._put(kv)
        self.revision = self._read_at = revision

    def apply(self, events: Iterable[WatchEvent]) -> None:
        """Changes from the watch, in order (one revision may change several keys)."""
        for event in events:
            if event.kv.mod_revision <= self._read_at:
                continue  # already in the read the watch started after
            if event.type == 'delete':
                self.entries.pop(event.kv.key, None)
            else:
                self._put(event.kv)
            self.revision = max(self.revision, event.kv.mod_revision)

    def _put(self, kv: KeyValue) -> None:
        parts = self.keys.parse(kv.key)
        if parts is None or len(kv.value) > MAX_VALUE:
            return
        try:
            value = json.loads(kv.value) if kv.value else ''
        except ValueError:
            return
        self.entries[kv.key] = Entry(parts, value, kv.lease, kv.mod_revision)

    def of_kind(self, kind: str) -> Iterator[Entry]:
        return (entry for entry in self.entries.values() if entry.parts[0] == kind)

    def get(self, key: str) -> Entry | None:
        return self.entries.get(key)

    # -- views -------------------------------------------------------------------------

    def brokers(self) -> dict[str, dict]:
        """Live brokers by advertised host."""
        return {entry.parts[1]: entry.value for entry in self.of_kind('brokers')
                if isinstance(entry.value, dict)}

    def items(self) -> list[tuple[str, dict]]:
        """(host, profile) of every registered item; the profile names its host."""
        found = []
        for entry in self.of_kind('items'):
            profile = entry.value.get('profile') if isinstance(entry.value, dict) else None
            if isinstance(profile, dict) and profile.get('host') == entry.parts[1]:
                found.append((entry.parts[1], profile))
        return found

    def holds(self) -> dict[tuple[str, str, str], dict]:
        """The hold on each held item, by (host, type, identity)."""
        return {_ref(entry): entry.value for entry in self.of_kind('holds')
                if isinstance(entry.value, dict) and isinstance(entry.value.get('job'), str)}

    def holds_of(self, job: str, number: int) -> list[dict]:
        """The holds a granted request became, in request order."""
        found = [hold for hold in self.holds().values()
                 if hold['job'] == job and hold.get('request') == number]
        return sorted(found, key=lambda hold: hold.get('position', 0))

    def requests(self) -> list[tuple[str, int, dict, int]]:
        """(job, number, request, lease) of every pending request."""
        found = []
        for entry in self.of_kind('requests'):
            if isinstance(entry.value, dict) and entry.parts[2].isdigit():
                found.append((entry.parts[1], int(entry.parts[2]), entry.value, entry.lease))
        return found

    def jobs(self) -> dict[str, dict]:
        return {entry.parts[1]: entry.value for entry in self.of_kind('jobs')
                if isinstance(entry.value, dict)}

    def leader(self) -> str | None:
        entry = self.entries.get(self.keys.leader())
        return entry.value if entry is not None and isinstance(entry.value, str) else None

    def sessions_of(self, job: str) -> dict[str, dict]:
        """The sessions hosting a job's equipment, by host."""
        return {entry.parts[2]: entry.value for entry in self.of_kind('sessions')
                if entry.parts[1] == job and isinstance(entry.value, dict)}

    def decisions_of(self, job: str) -> dict[int, dict]:
        return {int(entry.parts[2]): entry.value for entry in self.of_kind('decisions')
                if entry.parts[1] == job and entry.parts[2].isdigit()
                and isinstance(entry.value, dict)}


def _ref(entry: Entry) -> tuple[str, str, str]:
    """(host, type, identity) of an item's key (items, holds)."""
    _, host, kind, identity = entry.parts
    return host, kind, identity
