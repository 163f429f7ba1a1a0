"""RPC services: ``Control``, a service serving framed JSON requests on an event loop.

Frames are ``ave.network.protocol``'s business, connection states ``ave.network.peer``'s,
timers, signals, threads and children ``ave.network.loop``'s; this module moves bytes
and peers between them. A request is read in ``_on_established``, decoded and checked
in ``_serve``, authorized in ``_find_rpc``, called through ``invoke`` and answered
through ``_send`` (at once, or later through a ``Reply`` when the method deferred it).
"""
from __future__ import annotations

import errno
import functools
import logging as logginglib
import selectors
import socket as socketlib
import time
from typing import Any, Callable

from ave.exceptions import AuthError, AveException, Exit
from ave.logs import Throttle, clip
from ave.network import peer as peers
from ave.network import protocol
from ave.network.connection import Connection
from ave.network.exceptions import ConnectionAgain, ConnectionClosed
from ave.network.limits import Admission, Limits
from ave.network.loop import EventLoop
from ave.network.peer import (AUTHENTICATING, CLOSED, ESTABLISHED, IN_SERVICE, LISTENING,
                              LIVE, RELEASED, SERVING, WATCHED, Listener, Peer)
from ave.network.protocol import CHALLENGE_PREFIX, NONCE_SIZE  # noqa: F401 (re-exported)
from ave.network.remote import RemoteControl  # noqa: F401 (re-exported)
from ave.network.rpc import Reply, auth, authorize_accounts, preauth, rpc

__all__ = ['Control', 'RemoteControl', 'Reply', 'auth', 'preauth', 'rpc']

HANDSHAKE_TIMEOUT = 10.0
EXIT_FLUSH_TIMEOUT = 1.0
ACCEPT_BATCH = 64
#: Pause after the process ran out of descriptors, doubled while it lasts.
ACCEPT_BACKOFF = (0.05, 1.0)
#: Input a serving peer may buffer before it is no longer read (its next requests).
SERVING_INPUT_CAP = 64 * 1024
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

log = logginglib.getLogger(__name__)


class Control(EventLoop):
    """An RPC service: a Process that serves ``@rpc`` methods of its subclass."""

    rpc = staticmethod(rpc)
    auth = staticmethod(auth)
    preauth = staticmethod(preauth)

    def __init__(self, port: int | None, authkey: str | None = None,
                 socket: socketlib.socket | None = None, alt_keys: dict | None = None,
                 interval: float | None = None, home: str | None = None,
                 proc_name: str | None = None, logging: bool = False,
                 host: str = '127.0.0.1', limits: Limits | None = None) -> None:
        super().__init__(interval=interval, logging=logging, proc_name=proc_name)
        self.home = home
        self.authkey = authkey
        self.alt_keys = dict(alt_keys or {})
        self.limits = limits or Limits()
        self.caller: Peer | None = None
        self._serving_async = False  # whether the request being served is one-way
        self._deferred: Reply | None = None  # its Reply, once it called defer()
        # No port and no socket: the listening socket will be adopted from a
        # predecessor (see adopt_listener), as a restarting broker does.
        self.listener: Connection | None = None
        self.port: int | None = None
        if port is not None or socket is not None:
            self.adopt_listener(_make_listener(host, port, socket))
        self._peers: dict[Connection, Peer] = {}
        self._accept_pause = ACCEPT_BACKOFF[0]
        self._admission = Admission(self.limits)
        self._buffered = 0
        self.throttle = Throttle(log)
        self._handlers.update({
            LISTENING: self._on_listening,
            AUTHENTICATING: self._on_authenticating,
            ESTABLISHED: self._on_established,
            SERVING: self._on_serving,
            WATCHED: self._on_watched,
        })

    def adopt_listener(self, sock: socketlib.socket) -> None:
        """Accept clients on ``sock`` (already bound and listening)."""
        self.listener = Connection(sock.getsockname()[:2], sock)
        self.port = self.listener.address[1]
        if self._selector is not None:
            self._selector_made(self._selector)

    def _selector_made(self, selector: selectors.BaseSelector) -> None:
        if self.listener is not None and not self.listener.closed:
            selector.register(self.listener.fileno(), selectors.EVENT_READ,
                              Listener(self.listener))

    # -- hooks for subclasses ----------------------------------------------------------

    def new_connection(self, connection: Connection, authkey: str | None) -> None:
        """Called when a client has finished its handshake."""

    def lost_connection(self, connection: Connection, authkey: str | None) -> None:
        """Called when an established or added connection is gone, whoever closed it."""

    # -- running -----------------------------------------------------------------------

    def start(self, daemonize: bool = False, synchronize: bool = False) -> int:
        """Fork the service; the parent's copy of the listening socket is closed.

        Only the child must accept: if the child dies, clients should be refused,
        not left waiting in a backlog nobody reads.
        """
        try:
            return super().start(daemonize, synchronize)
        finally:
            if self.listener is not None and self.listener.socket is not None:
                self.listener.socket.close()

    def close_fds(self, exclude: list[int]) -> None:
        super().close_fds(exclude + ([] if self.listener is None else [self.listener.fileno()]))

    # -- accepting and handshakes ------------------------------------------------------

    def _on_listening(self, listener: Listener, mask: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                connection = listener.connection.accept()
            except ConnectionAgain:
                break
            except OSError as error:
                if error.errno in _OUT_OF_DESCRIPTORS:
                    self._pause_accepting(error)
                else:
                    self.throttle.warning('accept', 'accept failed: %s', error)
                return
            except ConnectionClosed as error:
                self.throttle.warning('accept', 'accept failed: %s', error)
                return
            self._admit(connection)
        self._accept_pause = ACCEPT_BACKOFF[0]

    def _pause_accepting(self, error: OSError) -> None:
        """Out of descriptors: stop accepting for a moment instead of spinning on it."""
        assert self.listener is not None
        self.throttle.warning('descriptors', 'cannot accept clients (%s); pausing %.2f s',
                              error.strerror, self._accept_pause)
        self._loop().unregister(self.listener.fileno())
        self.call_later(self._accept_pause, self._resume_accepting)
        self._accept_pause = min(self._accept_pause * 2, ACCEPT_BACKOFF[1])

    def _resume_accepting(self) -> None:
        if self.listener is not None and not self.listener.closed \
                and self.listener.fileno() not in self._loop().get_map():
            self._selector_made(self._loop())

    def _admit(self, connection: Connection) -> None:
        """Start the handshake, unless the connection caps refuse the newcomer."""
        address = str(connection.address[0])
        refusal = self._admission.refusal(address)
        if refusal is not None:
            self.throttle.warning('refused', 'refusing a client: %s', refusal)
            connection.say_and_close(protocol.encode_exception(AveException(refusal)))
            return
        peer = Peer(connection, AUTHENTICATING)
        peer.address_key = address
        self._admission.enter(address)
        peer.nonce, frame = protocol.challenge()
        peer.deadline = time.monotonic() + (self.limits.handshake_s or HANDSHAKE_TIMEOUT)
        self._start_handshake_clock(peer)
        self._watch(peer)
        self._send(peer, frame)

    def _start_handshake_clock(self, peer: Peer) -> None:
        """Only a digest may come until the peer's deadline, which a timer enforces."""
        peer.connection.limit_input(protocol.HANDSHAKE_FRAME_LIMIT)
        peer.expiry = self.call_later(max(0.0, peer.deadline - time.monotonic()),
                                      functools.partial(self._expire_handshake, peer))

    def _expire_handshake(self, peer: Peer) -> None:
        """A peer's handshake time is up (a timer set when it arrived): drop it if it
        has not finished."""
        if peer.state == AUTHENTICATING:
            self.throttle.info('handshake', 'dropping %s: handshake not finished in time',
                               peer.connection)
            self._close(peer)

    def _on_authenticating(self, peer: Peer, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(peer)
        if mask & selectors.EVENT_READ and peer.state == AUTHENTICATING:
            answer = self._receive(peer)
            if answer is not None:
                self._authenticate(peer, answer)

    def _authenticate(self, peer: Peer, answer: bytes) -> None:
        """Match the digest against every key; a wrong key still connects, unprivileged."""
        peer.credentials = protocol.authenticate(peer.nonce, answer, self.authkey,
                                                 self.alt_keys)
        peer.nonce = b''
        peer.connection.limit_input(self.limits.frame_bytes)
        self._move(peer, ESTABLISHED)
        self._send(peer, protocol.verdict(peer.credentials))
        if peer.state == ESTABLISHED:
            self._call_hook(self.new_connection, peer.connection, peer.authkey)
            self._serve_buffered(peer)

    # -- connections the service makes or gives away -----------------------------------

    def add_connection(self, connection: Connection, authkey: str | None = None,
                       watched: bool = False) -> None:
        """Serve (or, if ``watched``, only watch) a connection made by the service itself.

        ``authkey`` grants the rights that key would have earned in a handshake.
        """
        peer = Peer(connection, WATCHED if watched else ESTABLISHED)
        peer.credentials = protocol.credentials_of(authkey, self.authkey, self.alt_keys)
        self._watch(peer)
        self._flush(peer)

    def remove_connection(self, connection: Connection) -> None:
        """Stop serving a connection without closing it (the caller owns it now)."""
        peer = self.peer_of(connection)
        if peer is not None:
            self._move(peer, RELEASED)

    def peer_of(self, connection: Connection) -> Peer | None:
        """The live peer of a connection this service serves, if any."""
        return self._peers.get(connection)

    def stop_listening(self) -> None:
        """Stop accepting new clients and close the listening socket."""
        if self.listener is None:
            return
        if self._selector is not None and self.listener.fileno() in self._selector.get_map():
            self._selector.unregister(self.listener.fileno())
        self.listener.close()

    # -- the one place where peers change state ----------------------------------------

    def _watch(self, peer: Peer) -> None:
        """Start serving a new peer: known by its connection, watched by the selector."""
        self._peers[peer.connection] = peer
        self._update_interest(peer)

    def _move(self, peer: Peer, state: str) -> None:
        """Change a peer's state, keep the selector and the counts in step with it, and
        tell the subclass when a connection it knew about is gone."""
        previous = peer.move(state)
        if peer.expiry is not None:  # the handshake is over, one way or another
            self.cancel(peer.expiry)
            peer.expiry = None
        if state in (CLOSED, RELEASED):
            del self._peers[peer.connection]
            self._update_interest(peer)
            self._uncount(peer)
            if state == CLOSED:
                peer.connection.close()
                if previous in IN_SERVICE:
                    self._call_hook(self.lost_connection, peer.connection, peer.authkey)
            return
        if state == ESTABLISHED:
            peer.parked = False
        self._update_interest(peer)

    def _update_interest(self, peer: Peer) -> None:
        """Make the selector watch what the peer's state and buffers call for.

        Unregistering uses the descriptor number kept at registration, so it works
        after the connection was closed too.
        """
        events = peer.wanted_events(selectors.EVENT_READ, selectors.EVENT_WRITE)
        if events == peer.registered_events:
            return
        selector = self._loop()
        if events == 0:
            selector.unregister(peer.fd)
        elif peer.registered_events == 0:
            selector.register(peer.fd, events, peer)
        else:
            selector.modify(peer.fd, events, peer)
        peer.registered_events = events

    def _uncount(self, peer: Peer) -> None:
        self._buffered -= peer.buffered
        peer.buffered = 0
        if peer.address_key is not None:
            self._admission.leave(peer.address_key)
            peer.address_key = None

    def _close(self, peer: Peer) -> None:
        if peer.live:
            self._move(peer, CLOSED)

    # -- reading -----------------------------------------------------------------------

    def _receive(self, peer: Peer, fill: bool = False) -> bytes | None:
        """One buffered or freshly read frame, or None; a broken peer is closed.
        ``fill`` only reads what has arrived (for a peer owed a reply). What arrived
        counts against the cap of unfinished frames; the usual case (nothing left
        over, nothing counted before) is decided without a call.
        """
        frame = None
        try:
            if fill:
                peer.connection.fill()
            else:
                frame = peer.connection.get()
        except (ConnectionClosed, OSError) as error:
            if isinstance(error, ConnectionClosed):
                log.debug('%s gone: %s', peer.connection, error)
            else:
                self.throttle.warning('read', '%s failed: %s', peer.connection, error)
            self._close(peer)
            return None
        if peer.buffered or peer.connection.decoder.held:
            self._account(peer)
        return frame

    def _account(self, peer: Peer) -> None:
        """Keep the total of partly received frames under its cap: the peer whose read
        went past it is dropped, so no crowd of half-sent frames can exhaust memory."""
        size = peer.connection.decoder.held
        self._buffered += size - peer.buffered
        peer.buffered = size
        if size and self._buffered > self.limits.buffered_bytes:
            self.throttle.warning('buffered', 'dropping %s: peers hold %d bytes of '
                                  'unfinished frames (limit %d)', peer.connection,
                                  self._buffered, self.limits.buffered_bytes)
            self._close(peer)

    def _on_established(self, peer: Peer, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(peer)
            self._serve_buffered(peer)
        if mask & selectors.EVENT_READ and peer.state == ESTABLISHED:
            payload = self._receive(peer)
            if payload is not None:
                self._serve(peer, payload)
                self._serve_buffered(peer)

    def _on_serving(self, peer: Peer, mask: int) -> None:
        """A reply is owed: read only to notice the peer leaving, and only so much."""
        if mask & selectors.EVENT_WRITE:
            self._flush(peer)
        if not mask & selectors.EVENT_READ or peer.state != SERVING:
            return
        self._receive(peer, fill=True)
        if peer.state == SERVING and peer.connection.decoder.held > SERVING_INPUT_CAP:
            peer.parked = True
            self._update_interest(peer)

    def _on_watched(self, peer: Peer, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(peer)
        if mask & selectors.EVENT_READ:
            while peer.state == WATCHED and self._receive(peer) is not None:
                continue  # a watched peer's messages carry no requests

    def serve_pending(self, connection: Connection) -> None:
        """Serve, right now, every request already waiting on ``connection``.

        For a service that must see one peer's earlier messages before answering
        another (a session applying its broker's updates before a client's call).
        """
        peer = self.peer_of(connection)
        while peer is not None and peer.state == ESTABLISHED and self.keep_going:
            payload = self._receive(peer)
            if payload is None:
                return
            self._serve(peer, payload)

    def _serve_buffered(self, peer: Peer) -> None:
        """Answer requests that arrived in the same read as the previous one.

        Stops while replies are still unsent (see ``_flush``) or one is owed.
        """
        while peer.state == ESTABLISHED and self.keep_going and not peer.writing:
            try:
                payload = peer.connection.next_frame()
            except ConnectionClosed:
                self._close(peer)
                return
            if payload is None:
                return
            if peer.buffered or peer.connection.decoder.held:
                self._account(peer)
            self._serve(peer, payload)

    # -- serving -----------------------------------------------------------------------

    def _serve(self, peer: Peer, payload: bytes) -> None:
        """Decode, authorize, call and answer one request. Bad input is answered too.

        The caller and the deferred reply are restored afterwards, so a request
        served from inside another (``serve_pending``) leaves the outer one intact.
        """
        try:
            method, resource, vargs, kwargs, is_async = protocol.parse_request(payload)
        except protocol.MalformedRequest as error:
            if not error.is_async:
                self._send(peer, protocol.encode_exception(error))
            return
        saved = self.caller, self._serving_async, self._deferred
        self.caller, self._serving_async, self._deferred = peer, is_async, None
        try:
            result = self.invoke(self._find_rpc(peer, method, resource), vargs, kwargs)
        except Exception as error:
            self._failed(peer, is_async, error)
        else:
            if self._deferred is not None:
                self._leave_deferred(peer, is_async, self._deferred)
            elif not is_async:
                self._send(peer, protocol.encode_result(result))
        finally:
            self.caller, self._serving_async, self._deferred = saved

    def _leave_deferred(self, peer: Peer, is_async: bool, reply: Reply) -> None:
        """The method returned after defer(): the peer waits for its Reply, unless
        that was already sent."""
        reply.in_dispatch = False
        if not reply.done and peer.state == ESTABLISHED:
            peer.reply_is_async = is_async
            self._move(peer, SERVING)

    def _failed(self, peer: Peer, is_async: bool, error: Exception) -> None:
        if self._deferred is not None:
            self._deferred.done = True
            self._deferred.in_dispatch = False
        if is_async:
            self.throttle.info('async', 'one-way call failed: %s', clip(str(error)))
        else:
            self._send(peer, protocol.encode_exception(error))

    def invoke(self, function: Callable, vargs: list, kwargs: dict) -> Any:
        """Call the RPC a request named; a service may run some calls elsewhere
        (a session runs resource calls in worker threads, through ``defer``)."""
        return function(*vargs, **kwargs)

    def defer(self) -> Reply:
        """Answer the request being served later, through the returned Reply.

        The peer's next requests wait until then; the loop goes on serving others.
        """
        if self.caller is None:
            raise RuntimeError('defer() is only possible while serving a request')
        if self._deferred is None:
            self._deferred = Reply(self, self.caller, self._serving_async, in_dispatch=True)
        return self._deferred

    def owed_reply(self, connection: Connection) -> Reply | None:
        """The Reply owed to a peer adopted in state serving (a predecessor's call)."""
        peer = self.peer_of(connection)
        if peer is None or peer.state != SERVING:
            return None
        return Reply(self, peer, peer.reply_is_async)

    def _finish_reply(self, reply: Reply, encode: Callable[[], str]) -> None:
        if reply.done:
            return
        reply.done = True
        peer = reply.peer
        if reply.in_dispatch:  # answered before its own request was done with
            if not reply.is_async:
                self._send(peer, encode())
            return
        if peer.state != SERVING:
            return  # gone, or handed to a successor that answers it
        self._move(peer, ESTABLISHED)
        if not reply.is_async:
            self._send(peer, encode())
        self._serve_buffered(peer)

    def _find_rpc(self, peer: Peer, method: str, resource: Any) -> Callable:
        """The bound method a request names, if it is an RPC this peer may call."""
        function = self.rpc_function(method, resource)
        if getattr(function, 'ave_auth', False) and self.authkey and not peer.primary:
            raise AuthError(f'{method}() requires the primary key')
        accounts = getattr(function, 'ave_preauth', None)
        if accounts is not None:
            authorize_accounts(accounts, method, peer, self.alt_keys)
        return function

    def rpc_function(self, method: str, resource: Any) -> Callable:
        """Resolve a request's method; subclasses that host resources extend this."""
        if resource is not None:
            raise AveException(f'{type(self).__name__} hosts no resources')
        if method.startswith('_'):
            raise AveException(f'no such RPC: {clip(method, 80)}')
        function = getattr(type(self), method, None)
        if not getattr(function, 'ave_rpc', False):
            raise AveException(f'no such RPC: {clip(method, 80)}')
        return getattr(self, method)

    def notify(self, connection: Connection, method: str, *vargs: Any,
               **kwargs: Any) -> None:
        """Send a one-way request to the peer of a connection this service serves.

        The peer must itself be a Control; it never answers, so the loop never waits.
        """
        peer = self.peer_of(connection)
        if peer is None:
            raise ConnectionClosed(f'{connection} is not served by this service')
        self._send(peer, protocol.encode_request(method, None, vargs, kwargs, True))

    # -- writing -----------------------------------------------------------------------

    def _send(self, peer: Peer, payload: bytes | str) -> None:
        """Queue a frame and push it out; what the kernel refuses waits for writability."""
        if peer.state not in LIVE:
            return
        try:
            peer.connection.put(payload)
        except ConnectionAgain:
            pass  # the rest is queued; _flush below asks for writability
        except ValueError as error:  # FrameTooLarge: say so instead of the reply
            peer.connection.queue(protocol.encode_exception(AveException(str(error))))
        except (ConnectionClosed, OSError) as error:
            log.debug('%s gone while writing: %s', peer.connection, error)
            self._close(peer)
            return
        self._flush(peer)

    def _flush(self, peer: Peer) -> None:
        try:
            done = peer.connection.flush()
        except (ConnectionClosed, OSError) as error:
            log.debug('%s gone while writing: %s', peer.connection, error)
            self._close(peer)
            return
        if peer.writing == done:
            # Backpressure: a peer is not read while its replies wait to be sent, so a
            # client that never reads cannot make the service queue without limit.
            peer.writing = not done
            self._update_interest(peer)

    # -- handing connections to a successor ---------------------------------------------

    def export_peers(self) -> list[tuple[Peer, dict]]:
        """Every served connection with a JSON description a successor can adopt.

        Nothing is closed or changed: if the handover fails, serving simply goes on.
        Partly read frames and unsent replies are part of the description.
        """
        now = time.monotonic()
        return [(peer, peers.describe(peer, now)) for peer in self._peers.values()]

    def import_peer(self, sock: socketlib.socket, description: dict) -> Connection:
        """Serve a connection a predecessor described with ``export_peers``."""
        peer = peers.restore(sock, description, time.monotonic())
        if peer.state == AUTHENTICATING:
            self._start_handshake_clock(peer)
        else:
            peer.connection.limit_input(self.limits.frame_bytes)
        if peer.address_key is not None:
            self._admission.enter(peer.address_key)
        peer.parked = peer.state == SERVING \
            and peer.connection.decoder.held > SERVING_INPUT_CAP
        self._watch(peer)
        self._account(peer)
        return peer.connection

    def serve_imported(self) -> None:
        """Answer requests that arrived whole before the handover but were not served."""
        for peer in list(self._peers.values()):
            if peer.state == ESTABLISHED:
                self._serve_buffered(peer)

    # -- shutting down -----------------------------------------------------------------

    def shutdown(self, details: dict | str | None = None) -> None:
        """Tell every client ``Exit``, close everything and leave the main loop."""
        if not self.keep_going:
            return
        self.keep_going = False
        self.drop_peers(details or 'the service has shut down')
        self.stop_listening()
        self._close_loop()

    def drop_peers(self, details: dict | str, keep: Connection | None = None) -> None:
        """Tell every peer but ``keep`` ``Exit`` with ``details``, and close them."""
        exit_frame = protocol.encode_exception(Exit(details))
        deadline = time.monotonic() + EXIT_FLUSH_TIMEOUT
        for peer in list(self._peers.values()):
            if peer.connection is keep:
                continue
            if peer.state in (ESTABLISHED, SERVING):
                peer.connection.deliver(exit_frame, deadline)
            self._close(peer)


def _make_listener(host: str, port: int | None,
                   sock: socketlib.socket | None) -> socketlib.socket:
    if sock is not None:
        return sock
    listener = Connection((host, port or 0))
    listener.listen()
    return listener.open_socket()
