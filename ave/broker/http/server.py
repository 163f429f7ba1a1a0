"""The broker's HTTP process (``ave-broker-http``): status page, JSON and metrics.

It is a separate process, a child of the broker, for three reasons. The broker loop
stays fast: it only sends a snapshot now and then, while HTTP parsing, JSON and
Prometheus rendering happen here. A hostile HTTP peer can at worst slow this
process, never the broker. And the page keeps answering across
``ave-broker --restart``: this process simply runs on, and the new broker takes over
its end of the link the way it takes over sessions.

Like a session, it is a ``Control`` whose only RPC peer is the broker, on a socket
pair. The broker sends one-way ``update(snapshot)`` calls (see ``feed`` for the
schema); nothing is ever sent back, so the broker never waits for this process.
The HTTP listener and its connections are served on the same selector by
``HttpFrontend``: one thread, one loop, no locks.

Losing the link means the broker is gone for good (a restart hands the link over,
it never closes it), so the process then shuts down and frees the port for the
next broker's own HTTP process. The utilisation history is saved every minute and
on the way out, and reloaded at start.
"""
from __future__ import annotations

import logging
import os
import signal
import socket as socketlib
import time

from ave.broker.http import history
from ave.broker.http.connections import HttpFrontend, Limits
from ave.broker.http.site import Site
from ave.broker.http.snapshot import SnapshotError, check_snapshot
from ave.exceptions import AuthError
from ave.network.connection import Connection
from ave.network.control import Control

log = logging.getLogger(__name__)

PROC_NAME = 'ave-broker-http'
TICK = 1.0
REPORT_INTERVAL = 60.0
LISTEN_BACKLOG = 128


def open_listener(host: str, port: int, backlog: int = LISTEN_BACKLOG) -> socketlib.socket:
    """The HTTP listening socket, bound before the fork so that the broker learns of
    a taken port at once, as a clear error, rather than from a child's death."""
    family = socketlib.AF_INET6 if ':' in host else socketlib.AF_INET
    sock = socketlib.socket(family, socketlib.SOCK_STREAM)
    try:
        sock.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class HttpServer(Control):
    """Serves the status page from the snapshots the broker sends over ``link``.

    ``listener``: a bound, listening TCP socket (``open_listener``). ``link``: this
    process's end of a socket pair whose other end the broker serves with
    ``add_connection``. ``start()`` closes both in the parent, which must not accept
    HTTP peers nor hold the link open behind the child's back.
    """

    def __init__(self, listener: socketlib.socket, link: socketlib.socket,
                 home: str | None = None, limits: Limits = Limits(),
                 logging: bool = False) -> None:
        super().__init__(None, home=home, proc_name=PROC_NAME, logging=logging)
        self.http_socket = listener
        self.link_socket = link
        self.http_limits = limits
        self.history_path = history.path_in(home or os.path.expanduser('~'))
        self.broker: Connection | None = None
        # The page files are read here, in the broker, so that a broken installation
        # fails the broker's start with a clear error rather than killing the child.
        self.site = Site(history.Utilisation())
        self.frontend: HttpFrontend | None = None
        self._history_saved = -1
        self._save_failing = False
        self._refused_snapshots = 0
        self._next_report = 0.0

    def start(self, daemonize: bool = False, synchronize: bool = False) -> int:
        try:
            return super().start(daemonize, synchronize)
        finally:
            self.http_socket.close()
            self.link_socket.close()

    def close_fds(self, exclude: list[int]) -> None:
        super().close_fds(exclude + [self.http_socket.fileno(), self.link_socket.fileno()])

    def initialize(self) -> None:
        super().initialize()
        # Ctrl-C on a foreground broker reaches its whole process group, and SIGHUP
        # is the broker's restart signal: this process ends only through its link.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.site.history = history.load(self.history_path)
        self._history_saved = self.site.history.version
        self.broker = Connection(('broker', 0), self.link_socket)
        self.add_connection(self.broker)
        # HTTP descriptors share the Control's selector; each registered object names
        # its handler by its ``state``, exactly as the Control's own objects do.
        self.frontend = HttpFrontend(self.selector, self.http_socket, self.site.reply,
                                     self.http_limits)
        for state, handler in self.frontend.handlers().items():
            self.add_handler(state, handler)
        self.frontend.start()
        self._next_report = time.monotonic() + REPORT_INTERVAL
        self.call_later(TICK, self._tick)

    # -- the broker's side -------------------------------------------------------------

    @Control.rpc
    def update(self, snapshot: dict) -> None:
        """The broker's latest state (one-way). A snapshot that fails its check is
        dropped and the previous one stays in service."""
        self._require_broker()
        try:
            checked = check_snapshot(snapshot)
        except SnapshotError as error:
            if not self._refused_snapshots:
                log.warning('ignoring a snapshot from the broker: %s', error)
            self._refused_snapshots += 1
            return
        self.site.update(checked)
        self.site.history.record(time.time(), history.fractions_of(
            checked['equipment'], checked['on_demand_types']))

    def _require_broker(self) -> None:
        if self.caller is None or self.caller.connection is not self.broker:
            raise AuthError('only the broker feeds its HTTP process')

    def lost_connection(self, connection: Connection, authkey: str | None) -> None:
        if connection is self.broker and self.keep_going:
            log.info('broker link closed; the HTTP process ends')
            self.shutdown()

    # -- housekeeping ------------------------------------------------------------------

    def _tick(self) -> None:
        """Once a second: time limits; once a minute: save the history, report."""
        self.call_later(TICK, self._tick)
        assert self.frontend is not None, 'ticks begin once the frontend exists'
        now = time.monotonic()
        self.frontend.sweep(now)
        if now >= self._next_report:
            self._next_report = now + REPORT_INTERVAL
            self._save_history()
            self._report()

    def _report(self) -> None:
        """One line a minute at most about misbehaving peers, never one per peer."""
        assert self.frontend is not None, 'reports begin once the frontend exists'
        refused, evicted, pauses = self.frontend.take_counts()
        if refused or evicted or pauses:
            statuses = ', '.join(f'{count} x {status}' for status, count in sorted(refused.items()))
            log.warning('HTTP peers in the last minute: refused %s; evicted %d stale; '
                        'accepting paused %d times', statuses or 'none', evicted, pauses)
        if self._refused_snapshots > 1:
            log.warning('ignored %d more snapshots from the broker', self._refused_snapshots - 1)
        self._refused_snapshots = 0

    def _save_history(self) -> None:
        current = self.site.history
        if current.version == self._history_saved:
            return
        try:
            history.save(self.history_path, current)
        except OSError as error:
            if not self._save_failing:
                log.warning('cannot save utilisation history %s: %s', self.history_path,
                            error)
            self._save_failing = True
            return
        self._save_failing = False
        self._history_saved = current.version

    def shutdown(self, details: dict | str | None = None) -> None:
        if not self.keep_going:
            return
        self.site.history.finish(time.time())
        self._save_history()
        if self.frontend is not None:
            self.frontend.close()
        super().shutdown(details or 'the HTTP process has ended')
