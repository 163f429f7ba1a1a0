"""The lab's decisions: who gets which equipment, made by one broker, without I/O.

The broker elected leader runs a ``Decider`` over its mirror of the lab: the same
allocator and fair queue a lone broker runs (``ave.broker.allocator``,
``ave.broker.queue``), over every registered item of every host. Items are known by
host and identity, so two hosts may both have a relay ``r1``. Holders are jobs (the
names brokers give their clients). Each pass turns pending requests into
``Decision``s, which the leader commits as etcd transactions; a decision in flight
counts as a hold until the mirror shows it or its transaction fails, so no pass
hands an item out twice.

Workspaces are made per request, not registered: a request's workspaces are kept out
of the search and placed afterwards, on the host a request pins, else on the host of
the equipment asked for with them (in their stack group first), else on the host of
the requesting broker.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from ave.broker import listing
from ave.broker.allocator import Allocator, Key
from ave.broker.exceptions import Busy, NoSuch
from ave.broker.queue import WaitQueue
from ave.equipment import EquipmentType
from ave.exceptions import AveException, details_of
from ave.lab.mirror import Mirror

ItemRef = tuple[str, str, str]  # (host, type, identity): how etcd keys name an item


class LabAllocator(Allocator):
    """An allocator whose items are named by host as well as identity."""

    def key_of(self, profile: dict) -> Key:
        kind, identity = super().key_of(profile)
        host = profile.get('host')
        if not isinstance(host, str):
            raise NoSuch(f'lab {kind} profile lacks its host')
        return kind, f'{host}/{identity}'


def ref_of(key: Key) -> ItemRef:
    host, identity = key[1].split('/', 1)
    return host, key[0], identity


@dataclass
class Request:
    """A client's get as its broker published it."""

    job: str
    number: int
    lease: int
    profiles: list            # profiles and stack groups, as the client asked
    wait: float | None
    priority: int
    arrived: float
    host: str                 # the requesting broker

    @classmethod
    def from_json(cls, job: str, number: int, lease: int, data: dict) -> Request:
        wait = data.get('wait')
        return cls(job, number, lease, list(data['profiles']),
                   None if wait is None else float(wait), int(data.get('priority', 0)),
                   float(data['arrived']), str(data['host']))


@dataclass
class Decision:
    """What a request gets: ``granted`` profiles (in request order, each naming its
    host) or an ``error`` (the wire form of Busy or NoSuch)."""

    request: Request
    granted: list[dict] = field(default_factory=list)
    error: dict | None = None

    @property
    def refs(self) -> list[ItemRef]:
        return [(p['host'], p['type'], str(p[_IDENTITY[p['type']]])) for p in self.granted]


# Each type's identity key, filled from the installed types (see Decider).
_IDENTITY: dict[str, str] = {}


class Decider:
    """The leader's queue and allocator over the whole lab."""

    def __init__(self, types: dict[str, EquipmentType], aging_s: float, limit: int) -> None:
        self.types = types
        self.queue = WaitQueue(aging_s, limit)
        self.waiting: dict[str, Request] = {}     # by job
        self.seen: set[tuple[str, int]] = set()   # requests decided or queued
        self.pending: dict[ItemRef, str] = {}     # holds committed but not yet seen
        _IDENTITY.update({name: kind.identity for name, kind in types.items()})

    # -- one pass ----------------------------------------------------------------------

    def decide(self, mirror: Mirror, now: float) -> list[Decision]:
        """Decisions for every request that can be decided now."""
        table = self.table(mirror)
        requests = {(job, number): (data, lease)
                    for job, number, data, lease in mirror.requests()}
        self._forget_gone(requests, table)
        decisions = []
        for (job, number), (data, lease) in sorted(requests.items(),
                                                   key=lambda item: item[1][0].get('arrived', 0)):
            if (job, number) in self.seen:
                continue
            self.seen.add((job, number))
            try:
                request = Request.from_json(job, number, lease, data)
            except (KeyError, TypeError, ValueError) as error:
                decisions.append(Decision(_broken(job, number, lease),
                                          error=details_of(AveException(
                                              f'malformed lab request: {error}'))))
                continue
            decision = self._arrive(table, request, now, mirror)
            if decision is not None:
                decisions.append(decision)
        decisions += self._expire(table, now, mirror)
        decisions += self._schedule(table, now)
        for decision in decisions:
            for ref in decision.refs:
                self.pending[ref] = decision.request.job
        return decisions

    def settled(self, decision: Decision, committed: bool) -> None:
        """The leader's transaction for ``decision`` is done: its holds are now in
        the mirror (or were never made)."""
        for ref in decision.refs:
            self.pending.pop(ref, None)

    def table(self, mirror: Mirror) -> LabAllocator:
        """The lab's items with their holds, releases and stacks, as one allocator."""
        stacks = [[{**member, 'host': host} for member in stack]
                  for host, broker in mirror.brokers().items()
                  for stack in broker.get('stacks', []) if isinstance(stack, list)]
        table = LabAllocator({name: kind for name, kind in self.types.items()
                              if not kind.on_demand}, stacks)
        for host, profile in mirror.items():
            if profile.get('type') in table.types:
                try:
                    table.add(profile)
                except AveException:
                    continue  # a profile without its identity: not allocatable
        holds = mirror.holds()
        for key, item in table.items.items():
            ref = ref_of(key)
            hold = holds.get(ref)
            if hold is not None and hold.get('yielded'):
                item.releasing = True  # let go, being reset on its host
                continue
            item.holder = hold['job'] if hold is not None else self.pending.get(ref)
            item.since = hold.get('since') if hold is not None else None
        return table

    # -- requests arriving and leaving -------------------------------------------------

    def _arrive(self, table: LabAllocator, request: Request, now: float,
                mirror: Mirror) -> Decision | None:
        searched, _ = _split(request.profiles, self.types)
        if not searched:
            return self._grant(request, [])
        try:
            items = self.queue.allocate_now(table, request.job, searched, now,
                                            request.priority)
        except NoSuch as error:
            return Decision(request, error=details_of(error))
        except Busy:
            if request.wait == 0:
                blockers = self.queue.blockers(table, request.job, searched, now,
                                               request.priority)
                return Decision(request, error=details_of(Busy(listing.busy_message(
                    request.profiles, blockers, _who(mirror), now))))
            try:
                self.queue.add(request.job, searched, request.arrived, request.priority,
                               request.wait)
            except AveException as error:
                return Decision(request, error=details_of(error))
            self.waiting[request.job] = request
            return None
        except AveException as error:
            return Decision(request, error=details_of(error))
        return self._grant(request, [table.key_of(item.profile) for item in items])

    def _forget_gone(self, requests: dict, table: LabAllocator) -> None:
        """Requests withdrawn (their job ended) leave the queue at once."""
        for job, request in list(self.waiting.items()):
            if (job, request.number) not in requests:
                waiter = self.queue.waiter_of(job)
                if waiter is not None:
                    self.queue.remove(waiter.id, table)
                del self.waiting[job]
        self.seen &= set(requests)

    def _expire(self, table: LabAllocator, now: float, mirror: Mirror) -> list[Decision]:
        decisions = []
        for waiter in self.queue.expire(table, now):
            request = self.waiting.pop(str(waiter.holder))
            blockers = table.blockers(waiter.holder, waiter.request)
            message = listing.busy_message(request.profiles, blockers, _who(mirror), now)
            decisions.append(Decision(request, error=details_of(Busy(
                f'waited {now - waiter.arrived:.0f} s in vain: {message}'))))
        return decisions

    def _schedule(self, table: LabAllocator, now: float) -> list[Decision]:
        decisions = []
        for grant in self.queue.schedule(table, now):
            request = self.waiting.pop(str(grant.waiter.holder))
            decisions.append(self._grant(request, grant.keys))
        return decisions

    def next_deadline(self) -> float | None:
        return self.queue.next_deadline()

    # -- building a grant --------------------------------------------------------------

    def _grant(self, request: Request, keys: list[Key]) -> Decision:
        """The granted profiles in request order: searched items from ``keys``, and
        a new workspace for each workspace profile, placed as the module says."""
        searched, layout = _split(request.profiles, self.types)
        chosen = iter(keys)
        hosts = [ref_of(key)[0] for key in keys] or [request.host]
        granted: list[dict] = []
        for group in layout:
            group_hosts = []
            members: list[dict | None] = []
            for wanted, is_made in group:
                if is_made:
                    members.append(None)
                    continue
                key = next(chosen)
                host, kind, identity = ref_of(key)
                group_hosts.append(host)
                members.append({**wanted, 'type': kind, _IDENTITY[kind]: identity,
                                'host': host})
            for index, (wanted, is_made) in enumerate(group):
                if is_made:
                    host = wanted.get('host') or (group_hosts or hosts)[0]
                    members[index] = {'type': wanted['type'], 'uid': secrets.token_hex(8),
                                      'host': host}
            granted += [member for member in members if member is not None]
        return Decision(request, granted=granted)


def refine(decision: Decision, table_items: dict[Key, Any]) -> None:
    """Replace each granted item's profile by the full one from the table."""
    for index, profile in enumerate(decision.granted):
        key = (profile['type'], f'{profile["host"]}/{profile[_IDENTITY[profile["type"]]]}')
        item = table_items.get(key)
        if item is not None:
            decision.granted[index] = dict(item.profile)


def _split(profiles: list, types: dict[str, EquipmentType]
           ) -> tuple[list, list[list[tuple[dict, bool]]]]:
    """The request without its made-per-request items (for the search), and the
    request's layout: groups of (profile, made per request)."""
    searched: list = []
    layout = []
    for entry in profiles:
        group = entry if isinstance(entry, list) else [entry]
        marked = [(wanted, _made(wanted, types)) for wanted in group]
        layout.append(marked)
        kept = [wanted for wanted, made in marked if not made]
        if kept:
            searched.append(kept if isinstance(entry, list) else kept[0])
    return searched, layout


def _made(wanted: dict, types: dict[str, EquipmentType]) -> bool:
    kind = types.get(wanted.get('type'))  # type: ignore[arg-type]
    return kind is not None and kind.on_demand


def _who(mirror: Mirror) -> listing.Who:
    jobs = mirror.jobs()

    def who(holder: Any) -> dict:
        job = jobs.get(str(holder))
        return dict(job.get('holder') or {}) if job else {}
    return who


def _broken(job: str, number: int, lease: int) -> Request:
    return Request(job, number, lease, [], 0, 0, 0.0, '')
