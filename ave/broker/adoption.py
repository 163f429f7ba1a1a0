"""The broker's side of crash recovery: adopting sessions that outlived their broker,
and waiting for their clients to come back.

How a session presents itself and how it is checked is ``ave.broker.rendezvous``'s
business; this module decides what a presented session becomes in this broker's
model (``BrokerState`` and the ``Allocator``):

* The session becomes a ``SessionRecord`` like one this broker forked: its link is
  the rendezvous connection, its process an adopted handle joined through a pidfd,
  so its end, and the reclaiming of what it did not report released, are noticed as
  for any session.
* Its client becomes a placeholder ``Client``: no connection, the identity and the
  resume-token digest the session reported, holding every item the session hosts
  (``since`` as reported). The client has ``RESUME_GRACE`` seconds from when this
  broker serves to reconnect and ``resume``; else it is taken for gone and its
  session ends as after any disconnect (teardown, then the items are free).
* Items the session is tearing down stay unavailable until it reports them
  released, or ends (the reclaimer then resets them).
* Items no session reports are free. Every item starts tainted at a broker start,
  so a relay whose holder's session died during the outage is reset by the next
  holder's session before it is used, and the start-up sweep removes workspace
  directories that no adopted session reports.
* An item a second session also claims stays with the first claimant; the second
  claim is logged and ignored (getting there takes two crashes in a row and a
  session refused in between).

A fresh broker *gathers* before it serves (``gather``): while sessions of its home
may still present themselves it handles nothing but the rendezvous, so no client is
granted an item that a session still hosts, and the sweep that follows removes no
workspace in use. Waiting requests are not recovered: a crash fails them, and the
clients may ask again.
"""
from __future__ import annotations

import logging
import os
import selectors
import socket as socketlib
import time
from typing import TYPE_CHECKING, Any, Callable

from ave.broker import rendezvous
from ave.broker.allocator import Key
from ave.broker.exceptions import NoSuch, NotAllocated
from ave.broker.rendezvous import BadPresentation, Presentation
from ave.broker.sessions import adopt_process
from ave.broker.state import Client, SessionRecord, identity_of, token_digest
from ave.exceptions import AveException
from ave.logs import Throttle, clip
from ave.network.connection import Connection
from ave.network.exceptions import ConnectionClosed

if TYPE_CHECKING:
    from ave.broker.server import BrokerServer

log = logging.getLogger(__name__)

#: How long a client whose session was adopted has to come back. Clients retry every
#: 0.2 s (``ave.broker.client.RECONNECT_INTERVAL``), so one that is alive is back
#: within a fraction of a second of the broker serving; three seconds leave room for
#: a loaded host and still free the equipment of a client that died during the
#: outage within five seconds of the broker starting.
RESUME_GRACE = 3.0
#: A starting broker stops gathering when the sessions it knows of have all
#: presented themselves, or when none arrived for GATHER_QUIET seconds (five of
#: their retries), and in any case after GATHER_LIMIT seconds.
GATHER_QUIET = 1.0
GATHER_LIMIT = 5.0
GATHER_STEP = 0.05
#: A session sends its presentation as soon as it is connected.
PRESENT_TIMEOUT = 5.0
#: Bounds each step of the handshake that proves a session's key.
VERIFY_TIMEOUT = 2.0
#: Sessions presenting or being checked at once; more are refused and try again.
MAX_PRESENTERS = 64
ACCEPT_BATCH = 32
#: Pause after accepting failed (out of descriptors), so the loop does not spin.
ACCEPT_PAUSE = 1.0

RENDEZVOUS = 'rendezvous'  # the listener
PRESENTING = 'presenting'  # connected; its presentation is being read
CHECKING = 'checking'      # presented; its key is being proved
DONE = 'done'              # adopted or refused

_LOOPBACK = {'0.0.0.0': '127.0.0.1', '::': '::1'}


class _Listening:
    __slots__ = ('socket', 'state')

    def __init__(self, sock: socketlib.socket) -> None:
        self.socket = sock
        self.state = RENDEZVOUS


class _Presenter:
    """A connection at the rendezvous whose session is not adopted yet; ``fd`` is the
    descriptor number it was registered with (the connection may close itself)."""

    __slots__ = ('connection', 'fd', 'pid', 'state')

    def __init__(self, connection: Connection, pid: int) -> None:
        self.connection = connection
        self.fd = connection.fileno()
        self.pid = pid
        self.state = PRESENTING


class _Verdict:
    """Where the worker thread checking a session's key reports (on the loop)."""

    def __init__(self, then: Callable[[bool], None]) -> None:
        self._then = then

    def result(self, value: Any = None) -> None:
        self._then(value is True)

    def fail(self, error: BaseException) -> None:
        log.error('checking a session key failed: %s', error)
        self._then(False)


class Adopter:
    """The rendezvous listener of one broker and the sessions presenting there."""

    def __init__(self, server: BrokerServer) -> None:
        self.server = server
        self.listener: socketlib.socket | None = None
        self.presenters: set[_Presenter] = set()
        self.gathering = False
        self._accounted: set[int] = set()  # pids adopted or refused while gathering
        self._last_arrival = 0.0
        self.throttle = Throttle(log)
        server.add_handler(RENDEZVOUS, self._on_listening)
        server.add_handler(PRESENTING, self._on_presenting)

    # -- the listener ------------------------------------------------------------------

    def open(self, sock: socketlib.socket | None = None) -> None:
        """Listen at the rendezvous: on ``sock`` if a predecessor handed its socket
        over, else on a new one that replaces any stale socket file."""
        self.listener = sock if sock is not None else rendezvous.listen(self.server.home)
        self.listener.setblocking(False)
        self._watch_listener()

    def _watch_listener(self) -> None:
        if self.listener is not None and self.server.keep_going:
            self.server.selector.register(self.listener.fileno(), selectors.EVENT_READ,
                                          _Listening(self.listener))

    def fileno(self) -> int | None:
        return None if self.listener is None else self.listener.fileno()

    def close(self) -> None:
        """The broker stops: refuse whoever is presenting. The socket file stays; the
        next broker replaces it."""
        for presenter in list(self.presenters):
            self._refuse(presenter, None)
        if self.listener is not None:
            self._unregister(self.listener.fileno())
            self.listener.close()
            self.listener = None

    def _on_listening(self, item: _Listening, mask: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = item.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                self.throttle.warning('rendezvous', 'rendezvous: cannot accept (%s); '
                                      'pausing %g s', error, ACCEPT_PAUSE)
                self._unregister(item.socket.fileno())
                self.server.call_later(ACCEPT_PAUSE, self._watch_listener)
                return
            self._admit(sock)

    def _admit(self, sock: socketlib.socket) -> None:
        """Take a newcomer's credentials from the kernel before reading anything."""
        try:
            pid, uid = rendezvous.peer_of(sock)
        except OSError:
            sock.close()
            return
        problem = None
        if uid != os.getuid():
            problem = f'it runs as uid {uid}, not as the broker\'s user'
        elif len(self.presenters) >= MAX_PRESENTERS:
            problem = f'{MAX_PRESENTERS} sessions are presenting already'
        if problem is not None:
            self.throttle.warning('rendezvous', 'rendezvous: refused pid %d: %s', pid,
                                  problem)
            sock.close()
            return
        connection = Connection(('session', pid), sock)
        connection.limit_input(rendezvous.PRESENTATION_LIMIT)
        presenter = _Presenter(connection, pid)
        self.presenters.add(presenter)
        self.server.selector.register(connection.fileno(), selectors.EVENT_READ, presenter)
        self.server.call_later(PRESENT_TIMEOUT, lambda: self._overdue(presenter))
        self._last_arrival = time.monotonic()

    def _on_presenting(self, presenter: _Presenter, mask: int) -> None:
        try:
            frame = presenter.connection.get()
        except (ConnectionClosed, OSError) as error:  # it hung up, or sent too much
            self._refuse(presenter, f'{error} before it presented itself')
            return
        if frame is None:
            return
        self._unregister(presenter.fd)
        presenter.state = CHECKING
        try:
            presentation = rendezvous.parse(frame)
            self._check(presenter, presentation)
        except BadPresentation as error:
            self._refuse(presenter, str(error))
            return
        host = self.server.config['host']
        host, port, key = _LOOPBACK.get(host, host), presentation.port, presentation.authkey
        self.server.run_in_thread(
            lambda: rendezvous.session_answers(host, port, key, VERIFY_TIMEOUT),
            _Verdict(lambda answered: self._checked(presenter, presentation, answered)))

    def _check(self, presenter: _Presenter, presentation: Presentation) -> None:
        """What can be checked without asking the session itself."""
        pid = presenter.pid
        if presentation.pid != pid:
            raise BadPresentation(f'it says it is pid {presentation.pid}, the kernel '
                                  f'says {pid}')
        if self.server.state.session(pid) is not None or any(
                other is not presenter and other.pid == pid and other.state == CHECKING
                for other in self.presenters):
            raise BadPresentation('that session is adopted already, or being checked')
        if not rendezvous.is_session(pid):
            raise BadPresentation(f'pid {pid} is not a live {rendezvous.SESSION_NAME} '
                                  f'process')

    def _checked(self, presenter: _Presenter, presentation: Presentation,
                 answered: bool) -> None:
        if presenter not in self.presenters:
            return  # refused meanwhile (the broker is stopping)
        if not answered:
            self._refuse(presenter, f'its port {presentation.port} did not accept its '
                                    f'session key')
            return
        self.presenters.discard(presenter)
        presenter.state = DONE
        self._adopt(presenter.connection, presentation)

    def _overdue(self, presenter: _Presenter) -> None:
        if presenter in self.presenters and presenter.state == PRESENTING:
            self._refuse(presenter, f'no presentation within {PRESENT_TIMEOUT:g} s')

    def _refuse(self, presenter: _Presenter, reason: str | None) -> None:
        """Close without a word; the session tries again later."""
        self.presenters.discard(presenter)
        if self.gathering:
            self._accounted.add(presenter.pid)
        if presenter.state == PRESENTING:
            self._unregister(presenter.fd)
        presenter.state = DONE
        if reason is not None:
            self.throttle.warning('rendezvous', 'rendezvous: refused pid %d: %s',
                                  presenter.pid, clip(reason))
        presenter.connection.close()

    def _unregister(self, fd: int) -> None:
        """Stop watching ``fd``; by number, which works after it was closed too."""
        if fd in self.server.selector.get_map():
            self.server.selector.unregister(fd)

    # -- adopting ----------------------------------------------------------------------

    def _adopt(self, link: Connection, presentation: Presentation) -> None:
        """Make a checked session one of ours; its client becomes a placeholder."""
        server = self.server
        link.limit_input(server.limits.frame_bytes)
        record = SessionRecord(adopt_process(presentation.pid), presentation.port,
                               presentation.authkey, link)
        client = server.state.add_placeholder(identity_of(presentation.identity, ''),
                                              presentation.token)
        server.state.attach(client, record)
        for hosting in presentation.resources:
            key = self._claim(presentation.pid, hosting.profile, client.holder)
            if key is not None:
                record.keys.add(key)
                server.allocator.items[key].since = hosting.since
        for profile in presentation.releasing:
            key = self._claim(presentation.pid, profile, None)
            if key is not None:
                record.keys.add(key)
        if self.gathering:
            self._accounted.add(presentation.pid)
        self._last_arrival = time.monotonic()
        server.add_connection(link)
        try:
            server.notify(link, 'adopted', server.config['crash_grace'])
        except ConnectionClosed:
            pass  # it went meanwhile: its end is noticed through its pid, as any session's
        server.serve_pending(link)
        server.keeper.watch_adopted(record)
        if not self.gathering:
            self._await(client)
        log.info('adopted session %d (port %d) of %s, holding %s', presentation.pid,
                 presentation.port, clip(str(client.describe()), 300),
                 ', '.join(f'{k[0]} {k[1]}' for k in sorted(record.keys)) or 'nothing')
        server.waiting.schedule()
        server.status_page.changed()

    def _claim(self, pid: int, profile: dict, holder: int | None) -> Key | None:
        """Mark an item a session reports as held by ``holder`` (None: being torn
        down). A type no longer installed, or an item someone else has, is skipped."""
        allocator = self.server.allocator
        try:
            key = allocator.key_of(profile)
        except NoSuch:
            log.warning('session %d hosts %s, whose type is not installed here', pid,
                        clip(str(profile)))
            return None
        item = allocator.items.get(key)
        if item is None:
            on_demand = self.server.types[key[0]].on_demand
            settings = allocator.type_settings.get(key[0], {}) if on_demand else {}
            allocator.add(profile, settings)
            item = allocator.items[key]
        elif item.holder is not None or item.releasing:
            log.error('session %d reports %s %s, which another session has; it stays '
                      'there', pid, *key)
            return None
        item.reserved_for = None
        if holder is None:
            allocator.begin_release(key)
        else:
            item.holder = holder
        return key

    # -- clients coming back -----------------------------------------------------------

    def arm_placeholders(self) -> None:
        """The broker serves from now: every placeholder's time to come back begins."""
        for client in self.server.state.placeholders():
            self._await(client)

    def _await(self, client: Client) -> None:
        self.server.call_later(RESUME_GRACE, lambda: self._overdue_client(client))

    def _overdue_client(self, client: Client) -> None:
        state = self.server.state
        if client.connection is not None or state.client_by_holder(client.holder) is not client:
            return
        log.warning('%s did not come back within %g s of the broker starting; ending '
                    'its session', clip(str(client.describe()), 300), RESUME_GRACE)
        self.server.end_session(client)
        state.forget(client)
        self.server.status_page.changed()

    def claim(self, token: Any) -> Client:
        """The placeholder a resume token belongs to; NotAllocated if there is none."""
        if not isinstance(token, str) or not 0 < len(token) <= rendezvous.MAX_KEY_LENGTH:
            raise AveException('resume() takes the token of the first allocation\'s reply')
        client = self.server.state.placeholder(token_digest(token))
        if client is None:
            raise NotAllocated('nothing to resume: this broker holds nothing for that '
                               'token (the equipment was reclaimed, or no broker crashed)')
        return client

    # -- gathering ---------------------------------------------------------------------

    def gather(self) -> None:
        """Serve nothing but the rendezvous until the sessions of this home that may
        present themselves have done so (see the module's docstring)."""
        expected = rendezvous.orphans(self.server.home)
        if not expected:
            return
        log.info('%d sessions of this home may have outlived their broker; gathering '
                 'them before serving', len(expected))
        began = self._last_arrival = time.monotonic()
        self.gathering = True
        try:
            while self.server.keep_going and not self._gathered(expected, began):
                self.server.step_main(GATHER_STEP)
        finally:
            self.gathering = False
            self._accounted.clear()
        adopted = len(expected & {record.pid for record in self.server.state.sessions()})
        log.info('adopted %d of %d sessions in %.2f s', adopted, len(expected),
                 time.monotonic() - began)

    def _gathered(self, expected: set[int], began: float) -> bool:
        now = time.monotonic()
        if now - began >= GATHER_LIMIT:
            log.warning('still expecting sessions after %g s; serving now', GATHER_LIMIT)
            return True
        if self.presenters:
            return False
        missing = [pid for pid in expected
                   if pid not in self._accounted and rendezvous.is_session(pid)]
        return not missing or now - self._last_arrival >= GATHER_QUIET
