"""A broker's membership in its lab: the lease, the watch, the election, the fence.

The broker's loop never waits for etcd. Every etcd call runs in a worker thread and
its outcome comes back to the loop (``submit``); one thread reads the watch of the
lab's keys and hands each batch of changes to the loop, which applies it to the
``Mirror`` and tells the broker (``on_change``). Everything that reads or changes
the agent's state runs on the loop's thread.

The lease. Everything a broker puts in etcd lives under one lease of ``ttl``
seconds, kept alive every ``ttl / 4``. If the broker dies, its equipment, its
clients' holds and everything else of its own go within ``ttl``.

The fence. A broker that has not renewed its lease for ``ttl / 2`` stops deciding
and granting (``available`` is False: a ``get`` raises LabUnavailable); once it has
not for ``ttl`` it can no longer prove that its lease, and so any hold under it,
still exists, and ``fenced`` tells the broker to end the sessions it hosts. When etcd
answers again the fence is lifted: at once if the lease is renewed (it outlived the
silence), else once the broker has joined anew with a new lease.

History. Every change adds a revision to etcd's history, which grows until it is
compacted; etcd refuses all writes once its database reaches its quota. The leader
compacts every ``compact_s`` seconds to the revision it saw one period earlier, so
that a watch lagging less than that loses nothing (one that lags more reads the lab
again). ``compact_s`` 0 leaves compaction to etcd's own ``--auto-compaction-*``.

The election. The broker that manages to create the ``leader`` key (under its lease)
decides for the lab; when that key goes (its broker stopped, died or lost etcd), the
others race to create it again.
"""
from __future__ import annotations

import functools
import json
import logging
import threading
import time
from typing import Any, Callable

from ave.lab.etcd import (Compacted, Compare, Etcd, EtcdError, LeaseGone, Op, Range,
                          TxnResult, WatchEvent)
from ave.lab.mirror import LabKeys, Mirror
from ave.network.loop import EventLoop

log = logging.getLogger(__name__)

WATCH_READ = 1.0


class _Outcome:
    def __init__(self, on_result: Callable[[Any], None],
                 on_error: Callable[[BaseException], None]) -> None:
        self._on_result, self._on_error = on_result, on_error

    def result(self, value: Any = None) -> None:
        self._on_result(value)

    def fail(self, error: BaseException) -> None:
        self._on_error(error)


class LabAgent:
    """One broker's connection to its lab."""

    def __init__(self, loop: EventLoop, lab: dict, host: str,
                 on_change: Callable[[], None], registration: Callable[[], dict],
                 items: Callable[[], list[tuple[str, dict]]]) -> None:
        self.loop = loop
        self.ttl = int(lab['ttl'])
        self.endpoints = list(lab['etcd'])
        self.host = host
        self.keys = LabKeys(lab['name'])
        self.mirror = Mirror(self.keys)
        self.on_change = on_change
        self._registration = registration
        self._items = items
        self.etcd = Etcd(self.endpoints, timeout=max(1.0, self.ttl / 4))
        self.lease: int | None = None
        self.last_renewed = 0.0
        self.fenced = False
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        self._rejoining = False
        self._generation = 0  # which watch the loop listens to
        self._seen: list[tuple[int, Callable[[], None]]] = []  # (revision, then what)
        self.compact_s = float(lab.get('compact_s', 0))
        self._compact_to = 0  # the revision seen one compaction period ago

    # -- joining -----------------------------------------------------------------------

    def join(self, lease: int | None = None) -> None:
        """Register this broker and its equipment and read the lab; blocks (start-up,
        before the broker serves). ``lease`` continues a predecessor's lease."""
        self.lease = self._lease(lease)
        self._register()
        snapshot = self.etcd.get_prefix(self.keys.prefix)
        self.last_renewed = time.monotonic()
        self.fenced = False
        self.mirror.load(snapshot.kvs, snapshot.revision)
        self._watch(snapshot)
        self.loop.call_later(self.ttl / 4, self._keep_alive)
        if self.compact_s:
            self.loop.call_later(self.compact_s, self._compact)

    def _lease(self, lease: int | None) -> int:
        if lease is not None:
            try:
                self.etcd.lease_keepalive(lease)
                return lease
            except LeaseGone:
                log.warning('lab lease %x expired meanwhile; taking a new one', lease)
        return self.etcd.lease_grant(self.ttl)

    def _register(self) -> None:
        """Put the broker's key and its items, replacing items of a former life."""
        self.etcd.delete_prefix(f'{self.keys.prefix}items/{self.host}/')
        ops = [Op.put(self.keys.broker(self.host), json.dumps(self._registration()),
                      lease=self.lease)]
        ops += [self._item_op(identity, profile) for identity, profile in self._items()]
        self.etcd.txn([], ops)

    def _item_op(self, identity: str, profile: dict) -> Op:
        """``items`` gives (identity, profile) of each item, its profile naming this host."""
        key = self.keys.item(self.host, profile['type'], identity)
        return Op.put(key, json.dumps({'profile': profile}), lease=self.lease)

    def publish_items(self) -> None:
        """This host's equipment changed: put all of it again (one transaction)."""
        if self.lease is None or self._rejoining:
            return
        items = self._items()
        wanted = {self.keys.item(self.host, profile['type'], identity)
                  for identity, profile in items}
        ops = [self._item_op(identity, profile) for identity, profile in items]
        ops += [Op.delete(key) for key, entry in self.mirror.entries.items()
                if entry.parts[:2] == ('items', self.host) and key not in wanted]
        self.submit(lambda: self.etcd.txn([], ops), self._ignore,
                    lambda error: log.warning('could not publish equipment: %s', error))

    # -- calls off the loop ------------------------------------------------------------

    def submit(self, call: Callable[[], Any], on_result: Callable[[Any], None],
               on_error: Callable[[BaseException], None]) -> None:
        """Run an etcd call in a worker thread; its outcome comes back on the loop."""
        self.loop.run_in_thread(call, _Outcome(on_result, on_error))

    def txn(self, compare: list[Compare], success: list[Op],
            on_result: Callable[[TxnResult], None],
            on_error: Callable[[BaseException], None]) -> None:
        self.submit(lambda: self.etcd.txn(compare, success), on_result, on_error)

    @staticmethod
    def _ignore(_: Any) -> None:
        """An outcome nobody needs (the watch shows its effect)."""

    # -- the lease and the fence -------------------------------------------------------

    @property
    def available(self) -> bool:
        """Whether this broker may decide and grant: its lease renewed lately."""
        return (self.lease is not None and not self._rejoining
                and time.monotonic() - self.last_renewed < self.ttl / 2)

    def _keep_alive(self) -> None:
        if not self.loop.keep_going:
            return
        self.loop.call_later(self.ttl / 4, self._keep_alive)
        if self._rejoining or self.lease is None:
            return
        lease = self.lease
        self.submit(lambda: self.etcd.lease_keepalive(lease), self._renewed,
                    self._not_renewed)
        if time.monotonic() - self.last_renewed >= self.ttl and not self.fenced:
            log.error('lab: etcd unreachable for %d s: the lease cannot be proven; '
                      'ending the sessions of lab equipment', self.ttl)
            self.fenced = True
            self.on_change()

    def _renewed(self, _: Any) -> None:
        self.last_renewed = time.monotonic()
        if self.fenced and not self._rejoining:
            # The lease outlived the silence (etcd heard keep-alives whose answers
            # were lost): it is proven again, and the broker may host again.
            log.info('lab: the lease is renewed again; hosting lab equipment again')
            self.fenced = False
            self.on_change()

    def _not_renewed(self, error: BaseException) -> None:
        if isinstance(error, LeaseGone):
            log.error('lab: the lease is gone (etcd was away longer than %d s); '
                      'joining again', self.ttl)
            self._rejoin()
        else:
            log.warning('lab: cannot renew the lease: %s', error)

    def _rejoin(self) -> None:
        """Join again after losing the lease: everything of ours in etcd is gone."""
        if self._rejoining:
            return
        self._rejoining = True
        self.fenced = True
        self.on_change()

        def again() -> Range:
            self.lease = self.etcd.lease_grant(self.ttl)
            self._register()
            return self.etcd.get_prefix(self.keys.prefix)
        self.submit(again, self._rejoined, self._rejoin_failed)

    def _rejoined(self, snapshot: Range) -> None:
        self._rejoining = False
        self.fenced = False
        self.last_renewed = time.monotonic()
        self.mirror.load(snapshot.kvs, snapshot.revision)
        self._watch(snapshot)
        log.info('lab: joined again with a new lease')
        self.on_change()

    def _rejoin_failed(self, error: BaseException) -> None:
        log.warning('lab: cannot join again yet: %s', error)
        self._rejoining = False
        self.loop.call_later(self.ttl / 4, self._rejoin)

    # -- the watch ---------------------------------------------------------------------

    def _watch(self, snapshot: Range) -> None:
        """Follow the lab's keys from after ``snapshot`` in a thread of its own."""
        self._stop.set()
        self._stop = threading.Event()
        self._generation += 1
        generation, stop = self._generation, self._stop
        watch = self.etcd.watch(self.keys.prefix, snapshot.revision + 1)

        def follow() -> None:
            try:
                while not stop.is_set():
                    events = watch.read(WATCH_READ)
                    if events:
                        self.loop.call_soon_threadsafe(
                            functools.partial(self._changed, generation, events))
            except Compacted:
                self.loop.call_soon_threadsafe(lambda: self._reread(generation))
            except EtcdError as error:
                log.warning('lab: the watch failed (%s); reading again', error)
                self.loop.call_soon_threadsafe(lambda: self._reread(generation))
            finally:
                watch.close()
        self._watcher = threading.Thread(target=follow, name='ave-lab-watch', daemon=True)
        self._watcher.start()

    def _changed(self, generation: int, events: list[WatchEvent]) -> None:
        if generation != self._generation:
            return  # a watch replaced since
        self.mirror.apply(events)
        self._run_seen()
        self.on_change()

    def once_seen(self, revision: int, then: Callable[[], None]) -> None:
        """Run ``then`` once the mirror shows the store at ``revision`` (a change of
        ours has come back through the watch), so what we answer, we also list."""
        self._seen.append((revision, then))
        self._run_seen()

    def _run_seen(self) -> None:
        due = [then for revision, then in self._seen if revision <= self.mirror.revision]
        self._seen = [(revision, then) for revision, then in self._seen
                      if revision > self.mirror.revision]
        for then in due:
            then()

    def _reread(self, generation: int) -> None:
        if generation != self._generation or not self.loop.keep_going:
            return

        def read() -> Range:
            return self.etcd.get_prefix(self.keys.prefix)

        def reload(snapshot: Range) -> None:
            self.mirror.load(snapshot.kvs, snapshot.revision)
            self._watch(snapshot)
            self._run_seen()
            self.on_change()
        def again(_: BaseException) -> None:
            self.loop.call_later(1.0, lambda: self._reread(generation))
        self.submit(read, reload, again)

    # -- the election ------------------------------------------------------------------

    @property
    def leader(self) -> bool:
        return self.mirror.leader() == self.host and self.available

    def campaign(self) -> None:
        """Try to become the leader when nobody is (the loser's try changes nothing)."""
        if self.mirror.leader() is not None or not self.available:
            return
        key = self.keys.leader()
        self.txn([Compare.missing(key)], [Op.put(key, json.dumps(self.host),
                                                 lease=self.lease)],
                 self._ignore, lambda error: log.info('lab: election: %s', error))

    # -- history -----------------------------------------------------------------------

    def _compact(self) -> None:
        if not self.loop.keep_going:
            return
        self.loop.call_later(self.compact_s, self._compact)
        revision, self._compact_to = self._compact_to, self.mirror.revision
        if revision and self.leader:
            self.submit(lambda: self.etcd.compact(revision), self._ignore,
                        lambda error: log.warning('lab: cannot compact etcd: %s', error))

    # -- ending ------------------------------------------------------------------------

    def leave(self) -> None:
        """An orderly stop: revoke the lease, so that everything of ours goes now."""
        self._stop.set()
        if self.lease is not None:
            try:
                self.etcd.lease_revoke(self.lease)
            except EtcdError as error:
                log.warning('lab: could not revoke the lease: %s', error)
        self.etcd.close()

    def let_go(self) -> None:
        """A successor took over: keep the lease for it, just stop the watch."""
        self._stop.set()
