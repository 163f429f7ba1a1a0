"""Waiting for equipment: the order of waiting requests and who is granted what next.

Pure decision logic, like the allocator it drives: no I/O and no clock of its own
(whatever needs the time takes ``now``, in seconds on one clock the caller keeps),
and state that is plain data (``to_json``/``from_json``, together with the
allocator's ``Item.to_json``), so a restarted broker, or later a lab-wide leader
deciding through etcd transactions, continues exactly where the last one stopped.
The same state and ``now`` always give the same decisions.

The rules of DESIGN.md ("Waiting: a fair queue instead of polling on Busy"), made
precise:

*Order.* A request's place is fixed when it arrives, by its virtual arrival
``arrived - priority * aging_s``, then by id (ids grow with arrival). This is ageing
without steps: a waiter gains one priority level per ``aging_s`` seconds waited, a
little at a time, so waiting k * aging_s longer makes up for k levels. Stepwise
ageing (``priority + floor(waited / aging_s)``, ties by arrival) gives the same answer
except between two steps, where it lets two waiters of different priority swap places
back and forth every few minutes, moving the head with them; here the order of two
waiters never changes while they wait, and a clock step cannot reorder the queue.
With ``aging_s=None`` the order is priority, then arrival.

*Head.* The head is the waiter collecting equipment: the first waiter, in order, that
cannot be granted now and whose request the equipment in the table could ever meet.
Its plan (``Allocator.plan``) names one item per profile, preferring what it already
has reserved, then free items, items being reset, and held ones last. The free items
of its plan are reserved for it; the others it waits for. A head holding reservations
stays the head, even when a request of higher priority arrives, until it is granted,
leaves the queue, or its request can no longer be met (equipment unplugged or
changed): handing its partial set to the newcomer would give a reserved item to
another, and letting both keep partial sets could deadlock them.

*Waiting for.* "An item an earlier waiter is waiting for" means an item of the head's
plan, reserved or not, or another member of one of its stacks (taking that would make
the planned item collateral). Other waiters claim nothing. Claiming free items for
every waiter would be reserving for every waiter: equipment would sit idle behind
requests that cannot start. Claiming held items for them would change nothing, since
nobody can be granted a held item, and the moment it is released the pass below offers
it in order. The price is that a request for several items can see the items it needs
taken by later, smaller requests until it becomes the head; from then on it is
protected.

*Granting* (``schedule``, run after anything that may free equipment): the head
first, then every waiter in order, each granted when its whole request can be met
with items that are free, not reserved for someone else, not collateral of someone
else's holding or reservation, and not claimed by the head. A released item thus goes
to the head if the head can use it, otherwise to the earliest waiter that can
complete with it; a request needing nothing the head waits for is granted at once
(backfilling). A new request (``allocate_now``) is judged as if it stood at its
place in the queue: behind the head it may not take what the head claims, and it
never takes a reservation.

*No starvation.* Nobody else can be given an item of the head's plan or make it
collateral, so the head is granted at the latest when the holders of the items it
waits for have let them go (sooner if other matching items come free). Every waiter
becomes the head once the finitely many waiters ahead of it are granted or gone, and
ageing bounds how many newcomers can get ahead of it: a request arriving ``t`` seconds
later is ahead only if its priority is more than ``t / aging_s`` levels higher, and
priorities are capped at ``MAX_PRIORITY``.

Waiters whose request nothing in the table can meet any more stay in the queue,
dormant: they reserve and claim nothing and leave at their deadline (NoSuch is for
requests that could never match when made).

Cost: a pass tries each waiter once: a few profile matches against the free items,
and an allocator search (bounded by its SEARCH_LIMIT) only for a waiter that passes
that test (see ``_Vacancies``); O(waiters x searches) at worst. Memory: at most
``limit`` waiters, one per holder, each request at most MAX_REQUEST_CHARS of JSON.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ave.broker.allocator import Allocator, Blocker, Holder, Item, Key, Request
from ave.broker.exceptions import Busy
from ave.exceptions import AveException
from ave.profile import Profile

DEFAULT_AGING_S = 600.0
DEFAULT_LIMIT = 1000
MAX_PRIORITY = 100
MAX_REQUEST_CHARS = 65536  # a real request is a few hundred; it is kept while it waits

Pool = dict[str, list[Profile]]  # profiles of free items, by type


@dataclass
class Waiter:
    """One request waiting in the queue."""

    id: int
    holder: Holder
    request: Request
    priority: int
    arrived: float
    deadline: float | None  # None: waits until granted or gone

    def to_json(self) -> dict:
        return {'id': self.id, 'holder': self.holder, 'request': self.request,
                'priority': self.priority, 'arrived': self.arrived,
                'deadline': self.deadline}

    @classmethod
    def from_json(cls, data: dict) -> Waiter:
        return cls(int(data['id']), data['holder'], list(data['request']),
                   int(data['priority']), float(data['arrived']),
                   None if data['deadline'] is None else float(data['deadline']))


@dataclass(frozen=True)
class Grant:
    """A waiter that now holds ``keys``: one per requested profile, in request order."""

    waiter: Waiter
    keys: list[Key]


def parse_wait(value: Any) -> float | None:
    """A client's ``wait``: seconds (0: do not wait), or None to wait without limit."""
    if value is None:
        return None
    seconds = float('nan')
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond any float
            pass
    if not math.isfinite(seconds) or seconds < 0:
        raise AveException(f'wait must be a number of seconds >= 0 or None, '
                           f'got {_clip(value)}')
    return seconds


def parse_priority(value: Any) -> int:
    """A client's ``priority``: an int from -MAX_PRIORITY to MAX_PRIORITY."""
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_PRIORITY:
        raise AveException(f'priority must be an int from {-MAX_PRIORITY} to '
                           f'{MAX_PRIORITY}, got {_clip(value)}')
    return value


def _clip(value: Any) -> str:
    """A peer's value for an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + '...'


class WaitQueue:
    """Requests waiting for equipment, and the scheduler that grants them.

    Every method that changes reservations takes the allocator whose items carry
    them; the queue itself holds the waiters, the next id and which waiter is the
    head (only the head has reservations).
    """

    def __init__(self, aging_s: float | None = DEFAULT_AGING_S,
                 limit: int = DEFAULT_LIMIT) -> None:
        if aging_s is not None and not (math.isfinite(aging_s) and aging_s > 0):
            raise ValueError(f'aging_s must be a positive number or None, got {aging_s!r}')
        self.aging_s = aging_s
        self.limit = limit
        self.waiters: dict[int, Waiter] = {}
        self.head: int | None = None
        self.next_id = 1

    def __len__(self) -> int:
        return len(self.waiters)

    # -- requests arriving -------------------------------------------------------------

    def check_may_wait(self, allocator: Allocator, holder: Holder) -> None:
        """Refuse a wait by a holder of equipment (two such jobs can deadlock) or by a
        holder already waiting; raises AveException naming why."""
        held = allocator.held_equipment(holder)
        if held:
            names = ', '.join(f'{kind} {identity}' for kind, identity in held)
            raise AveException(f'a client holding equipment may not wait for more '
                               f'(it could deadlock with another); it holds {names}')
        if self.waiter_of(holder) is not None:
            raise AveException('this client is already waiting for equipment')

    def allocate_now(self, allocator: Allocator, holder: Holder, request: Request,
                     now: float, priority: int = 0) -> list[Item]:
        """Grant ``request`` at once if the queue allows it; NoSuch or Busy otherwise.

        The request is judged at the place it would take in the queue: it never gets
        a reserved item, and behind the head it gets nothing the head claims.
        """
        if self.waiter_of(holder) is not None:
            raise AveException('this client is already waiting for equipment')
        claims = self._claims_ahead_of(allocator, self._rank_of_new(now, priority))
        return allocator.allocate(holder, request, now=now, avoid=claims)

    def blockers(self, allocator: Allocator, holder: Holder, request: Request,
                 now: float, priority: int = 0) -> list[Blocker]:
        """Why ``allocate_now`` would refuse this request: the items of its plan it
        cannot have now, each with who holds, reserved or claims it."""
        claims = self._claims_ahead_of(allocator, self._rank_of_new(now, priority))
        return allocator.blockers(holder, request, claims)

    def add(self, holder: Holder, request: Request, now: float, priority: int = 0,
            wait: float | None = None) -> Waiter:
        """Queue a request that ``allocate_now`` refused with Busy.

        ``wait`` is seconds (> 0) or None for no limit. Run ``schedule`` next: the
        newcomer may become the head. Busy when ``limit`` requests already wait.
        """
        priority = parse_priority(priority)
        wait = parse_wait(wait)
        if wait == 0:
            raise AveException('a request with wait=0 does not wait')
        if self.waiter_of(holder) is not None:
            raise AveException('this client is already waiting for equipment')
        if len(self.waiters) >= self.limit:
            raise Busy(f'{len(self.waiters)} requests are waiting already, the most '
                       'this broker queues')
        text = json.dumps(request)
        if len(text) > MAX_REQUEST_CHARS:
            raise AveException(f'a waiting request may be at most {MAX_REQUEST_CHARS} '
                               f'characters of JSON, this one is {len(text)}')
        waiter = Waiter(self.next_id, holder, json.loads(text), priority, now,
                        None if wait is None else now + wait)
        self.next_id += 1
        self.waiters[waiter.id] = waiter
        return waiter

    # -- requests leaving --------------------------------------------------------------

    def remove(self, waiter_id: int, allocator: Allocator) -> Waiter | None:
        """A waiter gives up (its client disconnected): it leaves at once with its
        reservations. Run ``schedule`` next: what it had reserved may complete another."""
        waiter = self.waiters.pop(waiter_id, None)
        if waiter is None:
            return None
        allocator.reserve(waiter.holder, ())
        if self.head == waiter_id:
            self.head = None
        return waiter

    def expire(self, allocator: Allocator, now: float) -> list[Waiter]:
        """Remove and return the waiters whose deadline has come (they get Busy)."""
        due = [waiter for waiter in self.order()
               if waiter.deadline is not None and waiter.deadline <= now]
        for waiter in due:
            self.remove(waiter.id, allocator)
        return due

    def next_deadline(self) -> float | None:
        """When ``expire`` next has work, so the broker can set one timer, not poll."""
        deadlines = [w.deadline for w in self.waiters.values() if w.deadline is not None]
        return min(deadlines, default=None)

    def waiter_of(self, holder: Holder) -> Waiter | None:
        return next((w for w in self.waiters.values() if w.holder == holder), None)

    # -- the order and the scheduler ---------------------------------------------------

    def order(self) -> list[Waiter]:
        """Waiters in the order they are served: the head first, then by rank."""
        ranked = sorted((w for w in self.waiters.values() if w.id != self.head),
                        key=self._rank)
        head = self.waiters.get(self.head) if self.head is not None else None
        return ranked if head is None else [head, *ranked]

    def schedule(self, allocator: Allocator, now: float) -> list[Grant]:
        """Grant every waiter that can be granted now, in order, and pick and equip the
        head; see the module docstring. Mutates the allocator exactly as the grants and
        reservations require."""
        grants: list[Grant] = []
        claims: dict[Key, Holder] = {}
        head_chosen = False
        vacancies = _Vacancies(allocator)
        for waiter in self.order():
            if (vacancies.may_fit(waiter)
                    and self._try_grant(allocator, waiter, now, claims, grants)):
                vacancies = _Vacancies(allocator)
                continue
            if head_chosen:
                continue
            planned = _plan(allocator, waiter)
            if planned is None:  # dormant: nothing in the table can meet it now
                self._drop_reservations(allocator, waiter)
                continue
            head_chosen = True
            keep = [key for key in planned if allocator.available_to(waiter.holder, key)]
            allocator.reserve(waiter.holder, keep)
            self.head = waiter.id if keep else None
            claims = {key: waiter.holder for key in planned}
        return grants

    def _try_grant(self, allocator: Allocator, waiter: Waiter, now: float,
                   claims: dict[Key, Holder], grants: list[Grant]) -> bool:
        try:
            items = allocator.try_allocate(waiter.holder, waiter.request, now, claims)
        except AveException:  # a type uninstalled over a restart: dormant, not fatal
            return False
        if items is None:
            return False
        self.waiters.pop(waiter.id)
        self._drop_reservations(allocator, waiter)
        grants.append(Grant(waiter, [allocator.key_of(item.profile) for item in items]))
        return True

    def _drop_reservations(self, allocator: Allocator, waiter: Waiter) -> None:
        allocator.reserve(waiter.holder, ())
        if self.head == waiter.id:
            self.head = None

    def _rank(self, waiter: Waiter) -> tuple[float, ...]:
        return self._rank_at(waiter.arrived, waiter.priority, waiter.id)

    def _rank_of_new(self, now: float, priority: int) -> tuple[float, ...]:
        return self._rank_at(now, parse_priority(priority), self.next_id)

    def _rank_at(self, arrived: float, priority: int, waiter_id: int) -> tuple[float, ...]:
        if self.aging_s is None:
            return (-priority, arrived, waiter_id)
        return (arrived - priority * self.aging_s, waiter_id)

    def _claims_ahead_of(self, allocator: Allocator,
                         rank: tuple[float, ...]) -> dict[Key, Holder]:
        """The head's claims, if the head is ahead of a request of this rank.

        A head with reservations is ahead of everyone; otherwise the head is the first
        waiter with a plan (after a pass, no waiter can be granted at once).
        """
        for waiter in self.order():
            if waiter.id != self.head and self._rank(waiter) > rank:
                return {}
            planned = _plan(allocator, waiter)
            if planned is not None:
                return {key: waiter.holder for key in planned}
        return {}

    # -- what people see, and what a successor takes over ------------------------------

    def describe(self, now: float) -> list[dict]:
        """The public ``queue()`` listing; ``holder`` is the broker's holder id."""
        return [{'position': position, 'holder': waiter.holder,
                 'profiles': waiter.request, 'priority': waiter.priority,
                 'waited_s': max(0.0, now - waiter.arrived)}
                for position, waiter in enumerate(self.order(), 1)]

    def to_json(self) -> dict:
        """The queue's state; configuration (aging_s, limit) is not part of it."""
        return {'next_id': self.next_id, 'head': self.head,
                'waiters': [waiter.to_json() for waiter in self.order()]}

    @classmethod
    def from_json(cls, data: dict, aging_s: float | None = DEFAULT_AGING_S,
                  limit: int = DEFAULT_LIMIT) -> WaitQueue:
        queue = cls(aging_s, limit)
        for entry in data['waiters']:
            waiter = Waiter.from_json(entry)
            queue.waiters[waiter.id] = waiter
        queue.next_id = max([int(data['next_id']),
                             *(waiter.id + 1 for waiter in queue.waiters.values())])
        head = data['head']
        queue.head = head if head in queue.waiters else None
        return queue


class _Vacancies:
    """What is free right now, to rule most waiters out of a pass without a search.

    A waiter that holds nothing and has nothing reserved can be given exactly the
    items free for no holder in particular; unless each of its profiles matches one of
    those (a group's, all in one stack; on-demand types make theirs), its search would
    fail. Holders and reservers are always searched. In a busy lab few items are free,
    so a pass over hundreds of waiters costs a few profile matches each, not a search.
    """

    def __init__(self, allocator: Allocator) -> None:
        self.types = allocator.types
        self.free: Pool = {}
        self.free_in_stack: list[Pool] = [{} for _ in allocator.stacks]
        for key in allocator.free_keys(None):
            profile = allocator.items[key].profile
            self.free.setdefault(key[0], []).append(profile)
            for index in allocator.stacks_of(key):
                self.free_in_stack[index].setdefault(key[0], []).append(profile)
        self.parties = {item.holder if item.holder is not None else item.reserved_for
                        for item in allocator.items.values()} - {None}

    def may_fit(self, waiter: Waiter) -> bool:
        if waiter.holder in self.parties:
            return True
        for entry in waiter.request:
            if isinstance(entry, list):
                if not any(all(self._matches(wanted, free) for wanted in entry)
                           for free in self.free_in_stack):
                    return False
            elif not self._matches(entry, self.free):
                return False
        return True

    def _matches(self, wanted: dict, free: Pool) -> bool:
        kind = wanted.get('type')
        if not isinstance(kind, str) or kind not in self.types or self.types[kind].on_demand:
            return True  # made on demand, or the search decides (and fails)
        return any(profile.match(wanted) for profile in free.get(kind, ()))


def _plan(allocator: Allocator, waiter: Waiter) -> list[Key] | None:
    try:
        return allocator.plan(waiter.holder, waiter.request)
    except AveException:  # a type uninstalled over a restart
        return None
