"""The broker's side of waiting: replies held open while requests wait their turn.

Which request gets what, and when, is ``ave.broker.queue``'s pure decision. This
module ties it to the loop: a waiting ``get`` is answered through a deferred
``Reply``; a pass of the scheduler runs after anything that may free equipment (a
release, equipment appearing, a waiter leaving), so a release wakes the next request
at once, without polling; one timer, set for the earliest deadline, ends waits that
ran out. Clock: wall-clock seconds, shared with every item's ``since``.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from ave.broker import listing, suggest
from ave.broker.allocator import Allocator
from ave.broker.exceptions import Busy, NoSuch
from ave.broker.queue import WaitQueue, parse_priority, parse_wait
from ave.broker.requests import RESET_PATIENCE
from ave.broker.state import Client
from ave.exceptions import AveException
from ave.network.connection import Connection
from ave.network.rpc import Reply

if TYPE_CHECKING:
    from ave.broker.server import BrokerServer

log = logging.getLogger(__name__)


def with_hint(message: str, request: list, allocator: Allocator) -> str:
    """A NoSuch message with the reason nothing matches, when one can be named."""
    def defaulted(wanted: dict) -> dict:
        kind = allocator.types.get(wanted.get('type'))  # type: ignore[arg-type]
        return wanted if kind is None else {**kind.request_defaults, **wanted}
    defaults = [[defaulted(p) for p in entry] if isinstance(entry, list)
                else defaulted(entry) for entry in request]
    identities = {name: kind.identity for name, kind in allocator.types.items()}
    known = [dict(item.profile) for item in allocator.items.values()]
    found = suggest.first_hint(defaults, known, identities)
    return f'{message}: {found}' if found else message


class Waiting:
    """The wait queue of one broker, with the replies its waiters are owed."""

    def __init__(self, server: BrokerServer, aging_s: float, limit: int) -> None:
        self.server = server
        self.queue = WaitQueue(aging_s, limit)
        self.replies: dict[int, tuple[Reply, Client]] = {}
        self._timer_at: float | None = None
        #: Called with the seconds each granted waiter waited (for metrics).
        self.on_granted: Callable[[float], None] = lambda waited: None

    # -- requests ----------------------------------------------------------------------

    def get(self, client: Client, request: list, wait: Any, priority: Any) -> dict | None:
        """Grant ``request`` now (the get's result), or queue it and return None: the
        get has then been deferred and is answered when granted or when its wait
        runs out. Busy or NoSuch (after closing the client's session) otherwise."""
        server = self.server
        wait, priority = parse_wait(wait), parse_priority(priority)
        if wait != 0:
            self.queue.check_may_wait(server.allocator, client.holder)
        now = time.time()
        try:
            items = self.queue.allocate_now(server.allocator, client.holder, request,
                                            now, priority)
        except NoSuch as error:
            server.end_session(client)
            raise NoSuch(with_hint(str(error), request, server.allocator)) from None
        except Busy:
            if wait == 0:
                wait = self._reset_patience(client, request, now, priority)
            if wait == 0:
                message = self._busy(client, request, now, priority)
                server.end_session(client)
                raise Busy(message) from None
            self._enqueue(client, request, now, priority, wait)
            return None
        return server.hand_out(client, [server.allocator.key_of(i.profile) for i in items])

    def _enqueue(self, client: Client, request: list, now: float, priority: int,
                 wait: float | None) -> None:
        try:
            waiter = self.queue.add(client.holder, request, now, priority, wait)
        except Exception:
            self.server.end_session(client)
            raise
        self.replies[waiter.id] = (self.server.defer(), client)
        log.info('%s waits %s for %s', listing.describe_holder(client.describe()),
                 'without limit' if wait is None else f'up to {wait:g} s',
                 listing._clipped(request))
        self.schedule()

    def _reset_patience(self, client: Client, request: list, now: float,
                        priority: int) -> float:
        """RESET_PATIENCE for a request that lacks only items being reset, from a
        client that may wait (it holds nothing, and is not waiting); else 0."""
        allocator = self.server.allocator
        blockers = self.queue.blockers(allocator, client.holder, request, now, priority)
        if not blockers or any(blocker.reason != 'releasing' for blocker in blockers):
            return 0.0
        try:
            self.queue.check_may_wait(allocator, client.holder)
        except AveException:
            return 0.0
        return RESET_PATIENCE

    def _busy(self, client: Client, request: list, now: float, priority: int) -> str:
        blockers = self.queue.blockers(self.server.allocator, client.holder, request,
                                       now, priority)
        return listing.busy_message(request, blockers, self.server.identity_of, now)

    # -- the scheduler -----------------------------------------------------------------

    def schedule(self) -> None:
        """Grant what can be granted now; then make sure the next deadline is timed."""
        now = time.time()
        for grant in self.queue.schedule(self.server.allocator, now):
            reply, client = self.replies.pop(grant.waiter.id)
            self.on_granted(now - grant.waiter.arrived)
            try:
                reply.result(self.server.hand_out(client, grant.keys))
            except Exception as error:
                reply.fail(error)
        self._arm(now)

    def _arm(self, now: float) -> None:
        deadline = self.queue.next_deadline()
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        self._timer_at = deadline
        self.server.call_later(max(0.0, deadline - now), self._expire)

    def _expire(self) -> None:
        self._timer_at = None
        now = time.time()
        for waiter in self.queue.expire(self.server.allocator, now):
            reply, client = self.replies.pop(waiter.id)
            blockers = self.server.allocator.blockers(waiter.holder, waiter.request)
            message = listing.busy_message(waiter.request, blockers,
                                           self.server.identity_of, now)
            self.server.end_session(client)
            reply.fail(Busy(f'waited {now - waiter.arrived:.0f} s in vain: {message}'))
        self.server.status_page.changed()
        self.schedule()

    def client_left(self, client: Client) -> None:
        """A waiting client disconnected: it leaves the queue at once."""
        waiter = self.queue.waiter_of(client.holder)
        if waiter is not None:
            self.queue.remove(waiter.id, self.server.allocator)
            self.replies.pop(waiter.id, None)
            self.schedule()

    # -- what people see, and what a successor takes over ------------------------------

    def describe(self) -> list[dict]:
        """The public ``queue()``: position, holder's identity, profiles, priority and
        seconds waited, in the order requests are served."""
        rows = self.queue.describe(time.time())
        for row in rows:
            row['holder'] = self.server.identity_of(row['holder'])
        return rows

    def export(self, index_of: Callable[[Connection], int | None]) -> dict:
        return {'queue': self.queue.to_json(),
                'replies': {str(waiter_id): index_of(reply.connection)
                            for waiter_id, (reply, _) in self.replies.items()}}

    def adopt(self, data: dict, connections: list[Connection]) -> None:
        """Take over a predecessor's queue; its waiting clients' calls are ours to
        answer now (their peers were adopted in state serving)."""
        self.queue = WaitQueue.from_json(data['queue'], self.queue.aging_s,
                                         self.queue.limit)
        for waiter_id, peer in data['replies'].items():
            connection = None if peer is None else connections[peer]
            reply = None if connection is None else self.server.owed_reply(connection)
            client = None if connection is None else self.server.state.client(connection)
            if reply is None or client is None:
                self.queue.remove(int(waiter_id), self.server.allocator)
                continue
            self.replies[int(waiter_id)] = (reply, client)
        self.server.call_later(0, self.schedule)
