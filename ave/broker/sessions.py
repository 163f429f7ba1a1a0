"""The broker's side of session processes: starting, ending, killing, reclaiming.

A session is forked without the broker waiting for it (its listening socket is bound
before the fork, so the client can connect at once). It is asked to end with SIGTERM
and given ``SESSION_KILL_GRACE`` seconds to tear its equipment down; one that does
not is SIGKILLed. Whatever a session held and did not report released when it ended
(it crashed, or was killed) is torn down by a ``Reclaimer`` child before anyone else
gets it, so a killed session still leaves reset relays and no workspace behind.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import socket as socketlib
from typing import TYPE_CHECKING

from ave.broker.allocator import Key
from ave.broker.cgroups import SessionGroups
from ave.broker.reclaim import Reclaimer
from ave.broker.session import Session
from ave.broker.state import Client, SessionRecord
from ave.network.connection import Connection, find_free_port
from ave.network.process import Process

if TYPE_CHECKING:
    from ave.broker.server import BrokerServer

log = logging.getLogger(__name__)

SESSION_KILL_GRACE = 30.0


class SessionKeeper:
    """Starts and ends the sessions of one broker; owns the reclaimer children."""

    def __init__(self, server: BrokerServer) -> None:
        self.server = server
        self.reclaiming: dict[int, list[Key]] = {}  # reclaimer pid -> keys it tears down
        self.groups = SessionGroups(None)  # the server finds its cgroup as it starts

    def start(self, client: Client) -> SessionRecord:
        """Fork the client's session without waiting for it to initialize."""
        record = self.open(client)
        self.server.state.attach(client, record)
        return record

    def open(self, client: Client | None = None) -> SessionRecord:
        """Fork a session; without ``client`` it serves no client of this broker's (a
        lab's job from another host) and is known by its pid and link.

        A session outlives a crash of its broker only for a client of this broker,
        which can come back to the next one; in a lab, allocations live under leases
        in etcd that a crashed broker no longer keeps, so its sessions end with it.
        """
        server = self.server
        listener, port = find_free_port(host=server.config['host'])
        broker_end, session_end = socketlib.socketpair()
        authkey = secrets.token_urlsafe(32)
        survives = client is not None and server.lab is None
        process = Session(listener, authkey, session_end, server.types, server.home,
                          logging=server.logging, isolated=server.isolation.enabled,
                          hidden=server.hidden_paths(),
                          crash_grace=server.config['crash_grace'] if survives else 0.0,
                          client=None if client is None else
                          {'identity': client.describe(), 'token': client.token})
        try:
            process.start()
        finally:
            session_end.close()
        assert process.pid is not None
        self.groups.place(process.pid)
        link = Connection(('session', process.pid), broker_end)
        record = SessionRecord(process, port, authkey, link)
        server.add_connection(link)
        server.state.add_session(record)
        server.join_later(process)
        return record

    def close(self, record: SessionRecord) -> None:
        """Ask a session to tear its equipment down and end; kill it if it hangs."""
        record.closing = True
        record.process.terminate()
        self.server.call_later(SESSION_KILL_GRACE, lambda: self._kill_if_running(record))

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
        record = self.server.state.remove_session(pid)
        if record is None:
            return False
        self.groups.ended(pid, self.server.call_later)
        if exit not in (0, None):
            log.warning('session %d ended with status %s', pid, exit)
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
