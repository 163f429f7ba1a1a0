"""The broker's side of its status page: the HTTP process, and what it is fed.

With ``"http"`` in broker.json the broker runs ``ave-broker-http`` (see
``ave.broker.http.server``) as a child and sends it a snapshot of equipment, queue
and counters, one-way, soon after a change and at least every few seconds, paced so
that snapshots never take more than a small share of the loop. RPC timings and
queue waits are counted here with a dict lookup and a bisect each. Across a restart
the HTTP process runs on: the successor takes over its link and counters and counts
the restart; after a crash the process ends with its link, and the next broker
starts a new one on the same port.
"""
from __future__ import annotations

import logging
import socket as socketlib
import time
from typing import TYPE_CHECKING, Any, Callable

from ave.broker.http import feed
from ave.network.connection import Connection
from ave.network.process import Process

if TYPE_CHECKING:
    from ave.broker.server import BrokerServer

log = logging.getLogger(__name__)

PROC_NAME = 'ave-broker-http'
RESTART_DELAY = 1.0


class StatusPage:
    """Runs and feeds the HTTP process of one broker (nothing without ``"http"``)."""

    def __init__(self, server: BrokerServer, http: dict | None, bind: bool) -> None:
        self.server = server
        self.address = None if http is None else (http['host'], http['port'])
        self.listener: socketlib.socket | None = None
        if self.address is not None and bind:
            from ave.broker.http.server import open_listener
            self.listener = open_listener(*self.address)
        self.process: Process | None = None
        self.link: Connection | None = None
        self.timings = feed.RpcTimings()
        self.queue_waits = feed.Histogram(feed.QUEUE_WAIT_BOUNDS)
        self.restarts_total = 0
        self._pacer = feed.FeedPacer()
        self._due: float | None = None  # when the next snapshot goes out, if armed

    # -- counting ----------------------------------------------------------------------

    def observe_rpc(self, method: str, seconds: float) -> None:
        self.timings.observe(method, seconds)

    def observe_wait(self, seconds: float) -> None:
        self.queue_waits.observe(seconds)

    def changed(self) -> None:
        """Equipment, holders or the queue may have changed: a snapshot is due soon."""
        self._pacer.changed()
        self._arm()

    # -- the process -------------------------------------------------------------------

    def start(self) -> None:
        """Start the HTTP process on the bound listener (once the broker serves)."""
        if self.listener is None or self.process is not None or not self.server.keep_going:
            return
        from ave.broker.http.server import HttpServer
        broker_end, http_end = socketlib.socketpair()
        process = HttpServer(self.listener, http_end, self.server.home,
                             logging=self.server.logging)
        listener, self.listener = self.listener, None
        try:
            process.start()
        except OSError as error:
            log.error('cannot start the HTTP process (%s); retrying', error)
            broker_end.close()
            self._rebind_later(listener)
            return
        assert process.pid is not None
        link = Connection(('http', process.pid), broker_end)
        self._take(process, link)
        self.server.add_connection(link)

    def _rebind_later(self, listener: socketlib.socket) -> None:
        self.listener = listener if listener.fileno() >= 0 else None
        self.server.call_later(RESTART_DELAY, self._restart)

    def _take(self, process: Process, link: Connection) -> None:
        self.process, self.link = process, link
        self.server.join_later(process)
        self.changed()

    def ended(self, pid: int, exit: int | None) -> bool:
        """A child was reaped; True if it was the HTTP process (started again later)."""
        if self.process is None or pid != self.process.pid:
            return False
        log.warning('the HTTP process ended with status %s; starting another', exit)
        self.process = None
        if self.link is not None and not self.link.closed:
            self.server.remove_connection(self.link)
            self.link.close()
        self.link = None
        self.server.call_later(RESTART_DELAY, self._restart)
        return True

    def _restart(self) -> None:
        if self.address is None or self.process is not None or not self.server.keep_going:
            return
        if self.listener is None:
            from ave.broker.http.server import open_listener
            try:
                self.listener = open_listener(*self.address)
            except OSError as error:
                log.warning('cannot listen for HTTP on %s:%d (%s); retrying',
                            *self.address, error)
                self.server.call_later(RESTART_DELAY * 5, self._restart)
                return
        self.start()

    def let_go(self) -> None:
        """This broker exits: a successor took the process; nothing to do here."""
        self.process = self.link = None

    # -- feeding -----------------------------------------------------------------------

    def _arm(self) -> None:
        """Make sure a send is due when the pacer says: a change made while waiting
        for the next periodic snapshot brings it forward."""
        if self.link is None:
            return
        now = time.monotonic()
        due = now + self._pacer.delay(now)
        if self._due is not None and self._due <= due:
            return
        self._due = due
        self.server.call_later(due - now, self._send)

    def _send(self) -> None:
        now = time.monotonic()
        if self._due is None or now < self._due:
            return  # a timer of a send that was brought forward since
        self._due = None
        if self.link is None or self.link.closed:
            return
        if self._pacer.delay(now) > 0 or self.link.has_output:
            self._due = now + max(self._pacer.delay(now), feed.MIN_INTERVAL)
            self.server.call_later(self._due - now, self._send)  # the last one is
            return  # still on its way
        started = time.perf_counter()
        self.server.notify(self.link, 'update', self.snapshot())
        self._pacer.sent(now, time.perf_counter() - started)
        self._arm()

    def snapshot(self) -> dict:
        server = self.server
        host = server.advertised_host()
        rows = []
        for key, item in server.allocator.items.items():
            holder = item.holder if item.holder is not None else item.reserved_for
            rows.append(feed.equipment_row(
                item.profile, key[1], host, item.state,
                None if holder is None else server.identity_of(holder),
                item.since if item.holder is not None else None))
        return feed.build_snapshot(
            now=time.time(), host=host, equipment=rows, queue=server.waiting.describe(),
            lab=None, sessions=len(server.state.sessions()),
            allocations_total=server.allocations_total,
            restarts_total=self.restarts_total, rpc_seconds=self.timings,
            queue_wait_seconds=self.queue_waits,
            on_demand_types=[name for name, kind in server.types.items() if kind.on_demand])

    # -- handing over ------------------------------------------------------------------

    def export(self, index_of: Callable[[Connection], int | None]) -> dict:
        return {'pid': None if self.process is None else self.process.pid,
                'link': None if self.link is None else index_of(self.link),
                'address': None if self.address is None else list(self.address),
                'rpc_seconds': self.timings.export(),
                'queue_wait_seconds': self.queue_waits.export(),
                'restarts_total': self.restarts_total}

    def adopt(self, data: dict, connections: list[Connection]) -> None:
        """Take over the predecessor's HTTP process and counters, and count the
        restart. A process serving an address the new configuration no longer names
        is ended, and this broker starts its own."""
        self.timings = feed.RpcTimings.restore(data['rpc_seconds'])
        self.queue_waits = feed.Histogram.restore(data['queue_wait_seconds'])
        self.restarts_total = data['restarts_total'] + 1
        if data['pid'] is None or data['link'] is None:
            self.server.call_later(0, self._restart)
            return
        link = connections[data['link']]
        process = Process.adopt(data['pid'], PROC_NAME)
        if self.address is not None and data['address'] == list(self.address):
            self._take(process, link)
            return
        process.terminate()  # its end of the link closes with it: it exits
        self.server.join_later(process)
        self.server.call_later(RESTART_DELAY, self._restart)

    def describe(self) -> Any:
        return None if self.address is None else f'http://{self.address[0]}:{self.address[1]}/'
