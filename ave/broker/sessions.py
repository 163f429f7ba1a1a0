"""The broker's side of session processes: starting, ending, killing, reclaiming.

A session is forked without the broker waiting for it (its listening socket is bound
before the fork, so the client can connect at once). It is asked to end with SIGTERM
and given ``SESSION_KILL_GRACE`` seconds to tear its equipment down; one that does
not is SIGKILLed. Whatever a session held and did not report released when it ended
(it crashed, or was killed) is torn down by a ``Reclaimer`` child before anyone else
gets it, so a killed session still leaves reset relays and no workspace behind.

Forking a session costs the broker loop a few milliseconds, and the new process
needs a few more before it answers its client: the first ``get`` of every job paid
for both. So the keeper keeps a *spare* session forked ahead of need, made again
when the last was taken, at start-up, after a restart and after an adoption. A spare
serves nobody until it is taken: it is not in ``BrokerState`` (no limit, listing,
status, handover or sweep sees it), it is called ``ave-broker-spare`` (so nothing that
looks for sessions by name finds it), it holds no rendezvous marker, and has no crash
grace, so it ends with its broker's link; an orderly stop or a handover ends it.
Taking it sends it the client it serves (``Session.assigned``) before any resource,
and moves it into its cgroup.

Forking costs more than the fork: every page either process writes afterwards is
copied, and a broker that forks a session per job spends most of its time per job in
those faults. So a session whose client has gone is *recycled* where that is safe
(``Session.recycle``): it tears down as always, takes a new key and, if all went
cleanly, comes back as a spare (up to ``SPARES_KEPT`` of them wait; one more ends).
Jobs then run on a few processes and fork nothing, long ones and a stream of short
ones alike. Not recycled: sessions of a lab's jobs (their lifecycle is the lab's),
and sessions in a cgroup without isolation, whose leftover processes only the
session's end kills.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import socket as socketlib
from typing import TYPE_CHECKING

from ave import sandbox
from ave.broker.allocator import Key
from ave.broker.cgroups import SessionGroups
from ave.broker.reclaim import Reclaimer
from ave.broker.session import Session
from ave.broker.state import Client, SessionRecord
from ave.network.connection import Connection, find_free_port
from ave.network.exceptions import ConnectionClosed
from ave.network.process import Process

if TYPE_CHECKING:
    from ave.broker.server import BrokerServer

log = logging.getLogger(__name__)

SESSION_KILL_GRACE = 30.0
#: Seconds between taking the last spare and forking the next: the job that took it
#: is then past its first calls (connecting, the first resource call), which a fork
#: would hold up, as it stalls the broker loop and competes for the CPU (on two CPUs
#: a job's start took 4.1 ms at p50 and 6.7 ms at p99 with the fork at once, 3.3 and
#: 4.4 ms with it 5 ms later); and by then a short job's session is often back.
SPARE_DELAY = 0.005
#: Seconds before a spare is made again after one ended on its own (it crashed, or
#: could not start): a broken set-up must not become a fork loop.
SPARE_RETRY_DELAY = 1.0
#: Spare sessions kept waiting for clients, at most. Jobs that follow each other
#: closely take spares while the sessions of those before them are being recycled;
#: with two kept, a stream of short jobs on two CPUs still forked every few dozen jobs
#: (a session was ended as one too many, then missed), with four it forked none. Only
#: one is forked ahead of need; the others are recycled sessions.
SPARES_KEPT = 4


class SessionKeeper:
    """Starts and ends the sessions of one broker; owns the reclaimer children."""

    def __init__(self, server: BrokerServer) -> None:
        self.server = server
        self.reclaiming: dict[int, list[Key]] = {}  # reclaimer pid -> keys it tears down
        self.groups = SessionGroups(None)  # the server finds its cgroup as it starts
        self.spares: list[SessionRecord] = []
        self._spare_due = False  # a timer will make the spare

    def start(self, client: Client) -> SessionRecord:
        """Fork the client's session without waiting for it to initialize."""
        record = self.open(client)
        self.server.state.attach(client, record)
        return record

    def open(self, client: Client | None = None) -> SessionRecord:
        """A session for ``client``: the spare if there is one, else one forked now.
        Without ``client`` it serves no client of this broker's (a lab's job from
        another host) and is known by its pid and link.

        A session outlives a crash of its broker only for a client of this broker,
        which can come back to the next one; in a lab, allocations live under leases
        in etcd that a crashed broker no longer keeps, so its sessions end with it.
        """
        server = self.server
        survives = client is not None and server.lab is None
        crash_grace = server.config['crash_grace'] if survives else 0.0
        described = None if client is None else \
            {'identity': client.describe(), 'token': client.token}
        record = self._take_spare(described, crash_grace)
        if record is None:
            record = self._fork(described, crash_grace)
        # A spare gets its group only now: one that is never used leaves none behind.
        self.groups.place(record.pid)
        server.state.add_session(record)
        return record

    def _fork(self, client: dict | None, crash_grace: float,
              spare: bool = False) -> SessionRecord:
        """Fork a session without waiting for it to initialize; its listener is bound
        first, so its client can connect at once."""
        server = self.server
        listener, port = find_free_port(host=server.config['host'])
        broker_end, session_end = socketlib.socketpair()
        authkey = secrets.token_urlsafe(32)
        process = Session(listener, authkey, session_end, server.types, server.home,
                          logging=server.logging, isolated=server.isolation.enabled,
                          hidden=server.hidden_paths(), crash_grace=crash_grace,
                          client=client, spare=spare)
        try:
            process.start()
        except BaseException:
            broker_end.close()
            raise
        finally:
            session_end.close()
        assert process.pid is not None
        link = Connection(('session', process.pid), broker_end)
        record = SessionRecord(process, port, authkey, link)
        server.add_connection(link)
        server.join_later(process)
        return record

    # -- the spare session -------------------------------------------------------------

    def replenish(self, delay: float = 0.0) -> None:
        """Have a spare made ``delay`` seconds from now unless one waits by then, from
        the loop (so never before the reply now being sent)."""
        if not self.spares and not self._spare_due and self.server.keep_going:
            self._spare_due = True
            self.server.call_later(delay, self._make_spare)

    def _make_spare(self) -> None:
        self._spare_due = False
        if self.spares or not self.server.keep_going:
            return
        try:
            self.spares.append(self._fork(None, 0.0, spare=True))
        except OSError as error:  # out of processes or descriptors: fork on demand
            log.warning('cannot make a spare session (%s); trying again', error)
            self.replenish(SPARE_RETRY_DELAY)

    def _take_spare(self, client: dict | None, crash_grace: float) -> SessionRecord | None:
        """A spare, told whom it serves now; None if there is none that can hear."""
        record = None
        while self.spares and record is None:
            spare = self.spares.pop()  # the one last used: its pages are the warmest
            try:
                if spare.link is None:
                    raise ConnectionClosed('the spare session has no link')
                self.server.notify(spare.link, 'assigned', client, crash_grace)
                record = spare
            except ConnectionClosed:
                self._end_spare(spare)
        self.replenish(SPARE_DELAY)
        return record

    def drop_spares(self) -> None:
        """End the spares (the broker stops, or hands over to a successor, which makes
        its own): a spare must never outlive the broker that made it, nor be handed
        over as if it were a client's session."""
        spares, self.spares = self.spares, []
        for record in spares:
            self._end_spare(record)

    def _end_spare(self, record: SessionRecord) -> None:
        """``end`` before the link closes, so the spare does not take it for a crash;
        SIGTERM in case it cannot hear."""
        if record.link is not None:
            try:
                self.server.notify(record.link, 'end')
            except ConnectionClosed:
                pass  # the spare is gone or going: SIGTERM below is all it needs
            self.server.remove_connection(record.link)
            record.link.close()
            record.link = None
        record.process.terminate()

    def close(self, record: SessionRecord) -> None:
        """Ask a session to tear its equipment down and end, or to come back as a
        spare (under a new key) where that is safe; kill it if it hangs."""
        record.closing = True
        if not self._ask_to_recycle(record):
            record.process.terminate()
        self.server.call_later(SESSION_KILL_GRACE, lambda: self._kill_if_running(record))

    def _ask_to_recycle(self, record: SessionRecord) -> bool:
        """Send a session where it is safe to recycle it its new key; False if it is
        not, or cannot hear."""
        server = self.server
        if not (server.keep_going and server.lab is None and record.link is not None
                and (server.isolation.enabled or self.groups.parent is None)):
            return False
        record.authkey = secrets.token_urlsafe(32)
        try:
            server.notify(record.link, 'recycle', record.authkey)
        except ConnectionClosed:
            return False
        return True

    def recycled(self, record: SessionRecord) -> None:
        """A recycled session tore everything down and reported it released: keep it
        as a spare, or end it if enough are kept."""
        if record.keys:  # it cannot have: let it end, and reclaim what it held
            log.warning('session %d recycled while holding %s', record.pid,
                        sorted(record.keys))
            record.process.terminate()
            return
        self.server.state.remove_session(record.pid)
        spare = SessionRecord(record.process, record.port, record.authkey, record.link)
        if len(self.spares) < SPARES_KEPT and self.server.keep_going:
            self.spares.append(spare)
        else:
            self._end_spare(spare)

    def _kill_if_running(self, record: SessionRecord) -> None:
        """A session stuck in teardown is killed, but only while it is unreaped (its pid
        cannot have been reused by another process yet)."""
        if self.server.state.session(record.pid) is record:
            log.warning('session %d did not end in time: killing it', record.pid)
            os.kill(record.pid, signal.SIGKILL)

    def watch_adopted(self, record: SessionRecord) -> None:
        """Track a session a predecessor started, as if this broker had."""
        self.server.join_later(record.process)
        if record.closing:
            self.server.call_later(SESSION_KILL_GRACE, lambda: self._kill_if_running(record))

    def ended(self, pid: int, exit: int | None) -> bool:
        """A child was reaped; True if it was a session or a reclaimer of ours."""
        if pid in self.reclaiming:
            self._reclaimed(pid, exit)
            return True
        self.groups.ended(pid, self.server.call_later)  # a recycled spare has one too
        spare = next((record for record in self.spares if record.pid == pid), None)
        if spare is not None:
            log.warning('the spare session %d ended with status %s', pid, exit)
            self.spares.remove(spare)
            self._end_spare(spare)
            self.replenish(SPARE_RETRY_DELAY)
            return True
        record = self.server.state.remove_session(pid)
        if record is None:
            return False
        if exit not in (0, None):
            log.warning('session %d ended with status %s', pid, exit)
        if exit != 0:  # perhaps killed in the middle of a command (None: not our child)
            sandbox.remove_status_files(pid)
        if record.link is not None and not record.link.closed:
            self.server.remove_connection(record.link)
            record.link.close()
        if record.keys:
            self.reclaim(sorted(record.keys))
        return True

    def reclaim(self, keys: list[Key]) -> None:
        """Tear down items whose session could not: they stay unavailable until done."""
        allocator = self.server.allocator
        items = [(dict(allocator.items[key].profile), allocator.items[key].settings)
                 for key in keys if key in allocator.items]
        for key in keys:
            if key in allocator.items:
                allocator.begin_release(key)
        self._start_reclaimer([key for key in keys if key in allocator.items], items)

    def sweep(self, sweeps: dict[str, tuple[dict, set[str]]]) -> None:
        """Remove what no session owns (a crash's leftovers), off the loop."""
        if sweeps:
            self._start_reclaimer([], [], sweeps)

    def _start_reclaimer(self, keys: list[Key], items: list[tuple[dict, dict]],
                         sweeps: dict[str, tuple[dict, set[str]]] | None = None) -> None:
        reclaimer = Reclaimer(self.server.types, items, sweeps, self.server.home,
                              logging=self.server.logging)
        try:
            pid = reclaimer.start()
        except OSError as error:
            log.error('cannot start a reclaimer (%s); the next holders reset: %s', error,
                      keys)
            for key in keys:
                self.server.allocator.finish_release(key)
            return
        self.reclaiming[pid] = keys
        self.server.join_later(reclaimer)

    def _reclaimed(self, pid: int, exit: int | None) -> None:
        keys = self.reclaiming.pop(pid)
        for key in keys:
            self.server.released_item(key, clean=exit == 0)

    def export_reclaiming(self) -> list[list]:
        """The reclaimers at work and their items, for a restart's successor."""
        return [[pid, [list(key) for key in keys]]
                for pid, keys in self.reclaiming.items()]

    def adopt_reclaiming(self, exported: list[list]) -> None:
        """Watch the reclaimers a predecessor left at work, whose items stay releasing
        until they end. Their exit status goes to their parent, not here, so their
        items come back as not reset: the next holder's set-up resets them."""
        for pid, keys in exported:
            self.reclaiming[pid] = [(key[0], key[1]) for key in keys]
            self.server.join_later(Process.adopt(pid, 'ave-broker-reclaim'))


def adopt_process(pid: int) -> Process:
    """A handle on a session this broker did not fork (a predecessor did)."""
    return Process.adopt(pid, 'ave-broker-session')
