"""RPC services (``Control``) and their clients (``RemoteControl``).

A Control is a single-threaded event loop on ``selectors`` serving framed JSON
requests. Each registered descriptor carries one small object whose ``state`` names
the handler that deals with it:

    listening       the accepting socket: new peers start authenticating
    authenticating  challenge sent, waiting for the HMAC digest (dropped after 10 s)
    established     requests in, replies out
    watched         added by the service itself; only its liveness matters
    joining         a pidfd of a child Process handed to ``join_later``
    waking          the signal wake-up socket, so SIGTERM is handled between steps

Reading this file top to bottom answers "what happens to a request": it is read in
``_on_established``, decoded and checked in ``_serve``, authorized in ``_find_rpc``,
and answered through ``_reply``.
"""
from __future__ import annotations

import hashlib
import heapq
import hmac
import base64
import itertools
import json
import logging as logginglib
import os
import secrets
import selectors
import signal
import socket as socketlib
import time
from collections import deque
from typing import Any, Callable

from ave.exceptions import AuthError, AveException, Exit, details_of, exception_factory
from ave.network import framing
from ave.network.connection import BlockingConnection, Connection
from ave.network.exceptions import ConnectionAgain, ConnectionClosed
from ave.network.process import Process

CHALLENGE_PREFIX = b'#CHALLENGE#'
NONCE_SIZE = 32
HANDSHAKE_TIMEOUT = 10.0
EXIT_FLUSH_TIMEOUT = 1.0

LISTENING = 'listening'
AUTHENTICATING = 'authenticating'
ESTABLISHED = 'established'
WATCHED = 'watched'
JOINING = 'joining'
WAKING = 'waking'

NO_ACCOUNTS: frozenset[str] = frozenset()  # shared: thousands of peers hold no account

log = logginglib.getLogger(__name__)


# -- decorators -------------------------------------------------------------------------
# They only mark the function, so they stack in any order.

def rpc(function: Callable) -> Callable:
    """Make a Control method callable over the network.

    The access marks are given defaults here so that checking them on every call is
    a plain attribute hit: a ``getattr`` that misses raises and catches internally.
    """
    function.ave_rpc = True
    function.__dict__.setdefault('ave_auth', False)
    function.__dict__.setdefault('ave_preauth', None)
    return function


def auth(function: Callable) -> Callable:
    """Admit only clients holding the Control's primary key (everyone if it has none)."""
    function.ave_auth = True
    return function


def preauth(*accounts: str) -> Callable[[Callable], Callable]:
    """Admit only clients holding one of these accounts' keys.

    When none of the named accounts has a key configured, everyone is admitted: a lab
    that never set keys is not locked out of its own tools.
    """
    def mark(function: Callable) -> Callable:
        function.ave_preauth = tuple(accounts)
        return function
    return mark


# -- per-descriptor state ---------------------------------------------------------------

class Peer:
    """One connection and everything the loop knows about it."""

    __slots__ = ('connection', 'fd', 'state', 'writing', 'challenge', 'deadline',
                 'authkey', 'primary', 'accounts')

    def __init__(self, connection: Connection, state: str) -> None:
        self.connection = connection
        self.fd = connection.fileno()
        self.state = state
        self.writing = False
        self.challenge = b''
        self.deadline = 0.0
        self.authkey: str | None = None
        self.primary = False
        self.accounts: frozenset[str] = NO_ACCOUNTS

    @property
    def authenticated(self) -> bool:
        return self.primary or bool(self.accounts)


class _Joining:
    __slots__ = ('process', 'pidfd', 'state')

    def __init__(self, process: Process, pidfd: int) -> None:
        self.process = process
        self.pidfd = pidfd
        self.state = JOINING


class _Waking:
    __slots__ = ('receiver', 'sender', 'state')

    def __init__(self) -> None:
        self.receiver, self.sender = socketlib.socketpair()
        self.receiver.setblocking(False)
        self.sender.setblocking(False)
        self.state = WAKING


# -- the server -------------------------------------------------------------------------

class Control(Process):
    """An RPC service: a Process that serves ``@rpc`` methods of its subclass."""

    rpc = staticmethod(rpc)
    auth = staticmethod(auth)
    preauth = staticmethod(preauth)

    def __init__(self, port: int | None, authkey: str | None = None,
                 socket: socketlib.socket | None = None, alt_keys: dict | None = None,
                 interval: float | None = None, home: str | None = None,
                 proc_name: str | None = None, logging: bool = False,
                 host: str = '127.0.0.1') -> None:
        super().__init__(logging=logging, proc_name=proc_name)
        self.home = home
        self.authkey = authkey
        self.alt_keys = dict(alt_keys or {})
        self.interval = interval
        self.keep_going = True
        self.caller: Peer | None = None
        self._selector: selectors.BaseSelector | None = None
        # No port and no socket: the listening socket will be adopted from a
        # predecessor (see adopt_listener), as a restarting broker does.
        self.listener: Connection | None = None
        self.port: int | None = None
        if port is not None or socket is not None:
            self.adopt_listener(self._make_listener(host, port, socket).socket)
        self._handshakes: deque[Peer] = deque()
        self._timers: list[tuple[float, int, Callable]] = []
        self._timer_order = itertools.count()
        self._last_activity = time.monotonic()
        self._waking: _Waking | None = None
        self._terminating = False
        self._handlers = {
            LISTENING: self._on_listening,
            AUTHENTICATING: self._on_authenticating,
            ESTABLISHED: self._on_established,
            WATCHED: self._on_watched,
            JOINING: self._on_joining,
            WAKING: self._on_waking,
        }

    def adopt_listener(self, sock: socketlib.socket) -> None:
        """Accept clients on ``sock`` (already bound and listening)."""
        self.listener = Connection(sock.getsockname()[:2], sock)
        self.port = self.listener.address[1]
        if self._selector is not None:
            self._selector.register(self.listener.fileno(), selectors.EVENT_READ,
                                    Peer(self.listener, LISTENING))

    @staticmethod
    def _make_listener(host: str, port: int, sock: socketlib.socket | None) -> Connection:
        if sock is not None:
            return Connection(sock.getsockname()[:2], sock)
        listener = Connection((host, port))
        listener.listen()
        return listener

    # -- hooks for subclasses ----------------------------------------------------------

    def new_connection(self, connection: Connection, authkey: str | None) -> None:
        """Called when a client has finished its handshake."""

    def lost_connection(self, connection: Connection, authkey: str | None) -> None:
        """Called when an established or added connection is gone, whoever closed it."""

    def joined_process(self, pid: int, exit: int | None) -> None:
        """Called when a process handed to ``join_later`` has been reaped."""

    def idle(self) -> None:
        """Called after ``interval`` seconds without any traffic."""

    # -- running -----------------------------------------------------------------------

    def start(self, daemonize: bool = False, synchronize: bool = False) -> int:
        """Fork the service; the parent's copy of the listening socket is closed.

        Only the child must accept: if the child dies, clients should be refused,
        not left waiting in a backlog nobody reads.
        """
        try:
            return super().start(daemonize, synchronize)
        finally:
            if self.listener is not None:
                self.listener.socket.close()

    def close_fds(self, exclude: list[int]) -> None:
        super().close_fds(exclude + ([] if self.listener is None else [self.listener.fileno()]))

    def initialize(self) -> None:
        super().initialize()
        self._waking = _Waking()
        signal.set_wakeup_fd(self._waking.sender.fileno(), warn_on_full_buffer=False)
        self._loop().register(self._waking.receiver.fileno(), selectors.EVENT_READ,
                              self._waking)

    def handle_SIGTERM(self, signum: int, frame: Any) -> None:
        """Ask the loop for an orderly shutdown; the wake-up socket interrupts its wait."""
        self._terminating = True

    def run(self) -> None:
        """The service's main loop: step until shut down (exit status 0)."""
        while self.keep_going:
            self.step_main()

    def step_main(self, timeout: float | None = None) -> None:
        """Wait for traffic (at most ``timeout`` s) and dispatch all of it once.

        Public so that tests can drive a Control in-process, deterministically.
        """
        if not self.keep_going:
            raise Exit('the service has shut down')
        selector = self._loop()
        events = selector.select(self._wait_time(timeout))
        for key, mask in events:
            item = key.data
            if not self.keep_going:
                return  # an RPC shut the service down: the rest of the batch is moot
            if item.state is not None:
                self._handlers[item.state](item, mask)
        now = time.monotonic()
        if events:
            self._last_activity = now
        self._expire_handshakes(now)
        self._run_due_timers(now)
        if self._terminating and self.keep_going:
            self.shutdown()
        elif self.interval is not None and now - self._last_activity >= self.interval:
            self._last_activity = now
            self._call_hook(self.idle)

    def _loop(self) -> selectors.BaseSelector:
        """The selector, made on first use so that a forked child gets its own."""
        if self._selector is None:
            self._selector = selectors.DefaultSelector()
            if self.listener is not None:
                self._selector.register(self.listener.fileno(), selectors.EVENT_READ,
                                        Peer(self.listener, LISTENING))
        return self._selector

    def _wait_time(self, timeout: float | None) -> float | None:
        limits = [] if timeout is None else [timeout]
        now = time.monotonic()
        if self._handshakes:
            limits.append(self._handshakes[0].deadline - now)
        if self._timers:
            limits.append(self._timers[0][0] - now)
        if self.interval is not None:
            limits.append(self._last_activity + self.interval - now)
        return max(0.0, min(limits)) if limits else None

    def call_later(self, delay: float, function: Callable[[], Any]) -> None:
        """Run ``function`` from the loop after ``delay`` seconds (never earlier)."""
        deadline = time.monotonic() + delay
        heapq.heappush(self._timers, (deadline, next(self._timer_order), function))

    def _run_due_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now and self.keep_going:
            _, _, function = heapq.heappop(self._timers)
            self._call_hook(function)

    def _call_hook(self, hook: Callable, *args: Any) -> None:
        """Run a subclass hook; its failure is logged and never stops the service."""
        try:
            hook(*args)
        except Exception:
            log.exception('%s failed', getattr(hook, '__name__', hook))

    # -- connections -------------------------------------------------------------------

    def _on_listening(self, peer: Peer, mask: int) -> None:
        for _ in range(64):
            try:
                connection = self.listener.accept()
            except ConnectionAgain:
                return
            except (ConnectionClosed, OSError) as error:
                log.warning('accept failed: %s', error)
                return
            self._begin_handshake(connection)

    def _begin_handshake(self, connection: Connection) -> None:
        peer = Peer(connection, AUTHENTICATING)
        peer.challenge = secrets.token_bytes(NONCE_SIZE)
        peer.deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        self._loop().register(peer.fd, selectors.EVENT_READ, peer)
        self._handshakes.append(peer)
        self._send(peer, CHALLENGE_PREFIX + peer.challenge)

    def _expire_handshakes(self, now: float) -> None:
        while self._handshakes and (self._handshakes[0].state != AUTHENTICATING
                                    or self._handshakes[0].deadline <= now):
            peer = self._handshakes.popleft()
            if peer.state == AUTHENTICATING:
                log.info('dropping %s: handshake not finished in time', peer.connection)
                self._drop(peer)

    def _on_authenticating(self, peer: Peer, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(peer)
        if mask & selectors.EVENT_READ and peer.state == AUTHENTICATING:
            digest = self._receive(peer)
            if digest is not None:
                self._authenticate(peer, digest)
                if peer.state == ESTABLISHED:
                    self._serve_buffered(peer)

    def _authenticate(self, peer: Peer, digest: bytes) -> None:
        """Match the digest against every key; a wrong key still connects, unprivileged."""
        primary = _digest_matches(self.authkey, peer.challenge, digest)
        accounts = frozenset(name for name, key in self.alt_keys.items()
                             if key and _digest_matches(key, peer.challenge, digest)
                             ) or NO_ACCOUNTS
        peer.primary = primary
        peer.accounts = accounts
        peer.authkey = self.authkey if primary else (
            self.alt_keys[min(accounts)] if accounts else None)
        peer.state = ESTABLISHED
        peer.challenge = b''
        self._send(peer, json.dumps({'authenticated': peer.authenticated}))
        if peer.state == ESTABLISHED:
            self._call_hook(self.new_connection, peer.connection, peer.authkey)

    def add_connection(self, connection: Connection, authkey: str | None = None,
                       watched: bool = False) -> None:
        """Serve (or, if ``watched``, only watch) a connection made by the service itself.

        ``authkey`` grants the rights that key would have earned in a handshake.
        """
        peer = Peer(connection, WATCHED if watched else ESTABLISHED)
        peer.primary = authkey is not None and authkey == self.authkey
        peer.accounts = frozenset(name for name, key in self.alt_keys.items()
                                  if key and key == authkey)
        peer.authkey = authkey
        self._loop().register(peer.fd, selectors.EVENT_READ, peer)
        self._flush(peer)

    def remove_connection(self, connection: Connection) -> None:
        """Stop serving a connection without closing it (the caller owns it now)."""
        fd = connection.fileno()
        if self._selector is not None and fd in self._selector.get_map():
            self._forget(self._selector.get_map()[fd].data)

    def stop_listening(self) -> None:
        """Stop accepting new clients and close the listening socket."""
        if self.listener is None:
            return
        if self._selector is not None and self.listener.fileno() in self._selector.get_map():
            self._selector.unregister(self.listener.fileno())
        self.listener.close()

    def _on_watched(self, peer: Peer, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(peer)
        if mask & selectors.EVENT_READ:
            while self._receive(peer) is not None:
                continue  # a watched peer's messages carry no requests

    def _forget(self, peer: Peer) -> None:
        """Unregister by the descriptor number kept at registration, even if closed."""
        if peer.state is not None and self._selector is not None:
            self._selector.unregister(peer.fd)
        peer.state = None

    def _drop(self, peer: Peer) -> None:
        """Close a peer's connection and tell the subclass if it had been in service."""
        was = peer.state
        self._forget(peer)
        peer.connection.close()
        if was in (ESTABLISHED, WATCHED):
            self._call_hook(self.lost_connection, peer.connection, peer.authkey)

    def _receive(self, peer: Peer) -> bytes | None:
        """One buffered or freshly read frame, or None; a broken peer is dropped."""
        try:
            return peer.connection.get()
        except ConnectionClosed as error:
            log.debug('%s gone: %s', peer.connection, error)
        except OSError as error:
            log.warning('%s failed: %s', peer.connection, error)
        self._drop(peer)
        return None

    # -- handing connections to a successor ---------------------------------------------

    def export_peers(self) -> list[tuple[Peer, dict]]:
        """Every served connection with a JSON description a successor can adopt.

        Nothing is closed or changed: if the handover fails, serving simply goes on.
        Partly read frames and unsent replies are part of the description.
        """
        exported = []
        now = time.monotonic()
        for key in self._loop().get_map().values():
            peer = key.data
            if not isinstance(peer, Peer) or peer.state not in (
                    AUTHENTICATING, ESTABLISHED, WATCHED):
                continue
            exported.append((peer, {
                'state': peer.state, 'address': list(peer.connection.address),
                'input': _b64(peer.connection.pending_input()),
                'output': _b64(peer.connection.pending_output()),
                'challenge': peer.challenge.hex(),
                'deadline_in': max(0.0, peer.deadline - now),
                'authkey': peer.authkey, 'primary': peer.primary,
                'accounts': sorted(peer.accounts)}))
        return exported

    def import_peer(self, sock: socketlib.socket, description: dict) -> Connection:
        """Serve a connection a predecessor described with ``export_peers``."""
        connection = Connection(tuple(description['address']), sock)
        connection.restore(base64.b64decode(description['input']),
                           base64.b64decode(description['output']))
        peer = Peer(connection, description['state'])
        peer.authkey = description['authkey']
        peer.primary = bool(description['primary'])
        peer.accounts = frozenset(description['accounts']) or NO_ACCOUNTS
        peer.challenge = bytes.fromhex(description['challenge'])
        # Nothing is written here: until the predecessor confirms it has let go, the
        # queued output is still its to send. The loop sends it once running.
        peer.writing = connection.has_output
        events = selectors.EVENT_WRITE if peer.writing else selectors.EVENT_READ
        self._loop().register(peer.fd, events, peer)
        if peer.state == AUTHENTICATING:
            peer.deadline = time.monotonic() + description['deadline_in']
            self._handshakes.append(peer)
        return connection

    def serve_imported(self) -> None:
        """Answer requests that arrived whole before the handover but were not served."""
        for key in list(self._loop().get_map().values()):
            if isinstance(key.data, Peer) and key.data.state == ESTABLISHED:
                self._serve_buffered(key.data)

    # -- requests ----------------------------------------------------------------------

    def _on_established(self, peer: Peer, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(peer)
            self._serve_buffered(peer)
        if mask & selectors.EVENT_READ and peer.state == ESTABLISHED:
            payload = self._receive(peer)
            if payload is not None:
                self._serve(peer, payload)
                self._serve_buffered(peer)

    def serve_pending(self, connection: Connection) -> None:
        """Serve, right now, every request already waiting on ``connection``.

        For a service that must see one peer's earlier messages before answering
        another (a session applying its broker's updates before a client's call).
        """
        key = self._loop().get_map().get(connection.fileno())
        if key is None or key.data.state != ESTABLISHED:
            return
        peer = key.data
        while peer.state == ESTABLISHED and self.keep_going:
            payload = self._receive(peer)
            if payload is None:
                return
            self._serve(peer, payload)

    def _serve_buffered(self, peer: Peer) -> None:
        """Answer requests that arrived in the same read as the previous one.

        Stops while replies are still unsent: see ``_flush``.
        """
        while peer.state == ESTABLISHED and self.keep_going and not peer.writing:
            try:
                payload = peer.connection.next_frame()
            except ConnectionClosed:
                self._drop(peer)
                return
            if payload is None:
                return
            self._serve(peer, payload)

    def _serve(self, peer: Peer, payload: bytes) -> None:
        """Decode, authorize, call and answer one request. Bad input is answered too."""
        try:
            request = json.loads(payload)
        except (ValueError, RecursionError) as error:
            self._reply_exception(peer, AveException(f'malformed request: {error}'))
            return
        is_async = isinstance(request, dict) and request.get('async') is True
        self.caller = peer
        try:
            method, resource, vargs, kwargs = _parse_request(request)
            result = self._find_rpc(peer, method, resource)(*vargs, **kwargs)
        except Exception as error:
            if is_async:
                log.info('async call failed: %s', error)
            else:
                self._reply_exception(peer, error)
            return
        finally:
            self.caller = None
        if not is_async:
            self._reply(peer, result)

    def _find_rpc(self, peer: Peer, method: str, resource: Any) -> Callable:
        """The bound method a request names, if it is an RPC this peer may call."""
        function = self.rpc_function(method, resource)
        if getattr(function, 'ave_auth', False) and self.authkey and not peer.primary:
            raise AuthError(f'{method}() requires the primary key')
        accounts = getattr(function, 'ave_preauth', None)
        if accounts is not None:
            keyed = {name for name in accounts if self.alt_keys.get(name)}
            if keyed and not keyed & peer.accounts:
                raise AuthError(f'{method}() requires the key of '
                                f'{" or ".join(sorted(keyed))}')
        return function

    def rpc_function(self, method: str, resource: Any) -> Callable:
        """Resolve a request's method; subclasses that host resources extend this."""
        if resource is not None:
            raise AveException(f'{type(self).__name__} hosts no resources')
        if method.startswith('_'):
            raise AveException(f'no such RPC: {method}')
        function = getattr(type(self), method, None)
        if not getattr(function, 'ave_rpc', False):
            raise AveException(f'no such RPC: {method}')
        return getattr(self, method)

    def notify(self, connection: Connection, method: str, *vargs: Any,
               **kwargs: Any) -> None:
        """Send a one-way request to the peer of a connection this service serves.

        The peer must itself be a Control; it never answers, so the loop never waits.
        """
        key = None if connection.closed else self._loop().get_map().get(connection.fileno())
        if key is None or not isinstance(key.data, Peer):
            raise ConnectionClosed(f'{connection} is not served by this service')
        self._send(key.data, json.dumps({
            'method': method, 'resource': None, 'async': True,
            'params': {'vargs': list(vargs), 'kwargs': kwargs}}))

    def _reply(self, peer: Peer, result: Any) -> None:
        try:
            payload = json.dumps({'result': result})
        except (TypeError, ValueError, RecursionError) as error:
            self._reply_exception(peer, AveException(f'result cannot be sent: {error}'))
            return
        self._send(peer, payload)

    def _reply_exception(self, peer: Peer, error: BaseException) -> None:
        self._send(peer, json.dumps({'exception': details_of(error)}, default=repr))

    def _send(self, peer: Peer, payload: bytes | str) -> None:
        """Queue a frame and push it out; what the kernel refuses waits for writability."""
        if peer.state is None:
            return
        try:
            peer.connection.put(payload)
        except ConnectionAgain:
            pass  # the rest is queued; _flush below asks for writability
        except framing.FrameTooLarge as error:
            peer.connection.queue(json.dumps(
                {'exception': details_of(AveException(str(error)))}))
        except (ConnectionClosed, OSError) as error:
            log.debug('%s gone while writing: %s', peer.connection, error)
            self._drop(peer)
            return
        self._flush(peer)

    def _flush(self, peer: Peer) -> None:
        try:
            done = peer.connection.flush()
        except (ConnectionClosed, OSError) as error:
            log.debug('%s gone while writing: %s', peer.connection, error)
            self._drop(peer)
            return
        if peer.writing == done:
            # Backpressure: a peer is not read while its replies wait to be sent, so a
            # client that never reads cannot make the service queue without limit.
            peer.writing = not done
            events = selectors.EVENT_WRITE if peer.writing else selectors.EVENT_READ
            self._loop().modify(peer.fd, events, peer)

    # -- processes ---------------------------------------------------------------------

    def join_later(self, process: Process) -> None:
        """Reap ``process`` from the loop when it ends, then call ``joined_process``."""
        try:
            pidfd = os.pidfd_open(process.pid)
        except ProcessLookupError:
            self._finish_join(process)
            return
        self._loop().register(pidfd, selectors.EVENT_READ, _Joining(process, pidfd))

    def _on_joining(self, item: _Joining, mask: int) -> None:
        self._loop().unregister(item.pidfd)
        os.close(item.pidfd)
        item.state = None
        self._finish_join(item.process)

    def _finish_join(self, process: Process) -> None:
        try:
            code = process.join(0)
        except (AveException, OSError) as error:
            self.log(f'could not join process {process.pid}: {error}')
            return
        self._call_hook(self.joined_process, process.pid, code)

    def _on_waking(self, item: _Waking, mask: int) -> None:
        try:
            item.receiver.recv(4096)
        except (BlockingIOError, InterruptedError):
            pass  # nothing queued: the signal handler already set its flag

    # -- shutting down -----------------------------------------------------------------

    def shutdown(self, details: dict | str | None = None) -> None:
        """Tell every client ``Exit``, close everything and leave the main loop."""
        if not self.keep_going:
            return
        self.keep_going = False
        exit_frame = json.dumps({'exception': details_of(
            Exit(details or 'the service has shut down'))}, default=repr)
        deadline = time.monotonic() + EXIT_FLUSH_TIMEOUT
        for key in list(self._loop().get_map().values()):
            self._close_item(key.data, exit_frame, deadline)
        self.stop_listening()
        self._selector.close()

    def _close_item(self, item: Any, exit_frame: str, deadline: float) -> None:
        if isinstance(item, Peer) and item.state in (AUTHENTICATING, ESTABLISHED, WATCHED):
            if item.state == ESTABLISHED:
                _last_words(item.connection, exit_frame, deadline)
            self._drop(item)
        elif isinstance(item, _Joining):
            os.close(item.pidfd)
        elif isinstance(item, _Waking):
            signal.set_wakeup_fd(-1)
            item.receiver.close()
            item.sender.close()


def _last_words(connection: Connection, frame: str, deadline: float) -> None:
    """Best effort to deliver the Exit frame before closing, bounded by ``deadline``."""
    try:
        connection.queue(frame)
        while not connection.flush():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            selectors.DefaultSelector().select(min(remaining, 0.05))
    except (ConnectionClosed, OSError):
        return


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode('ascii')


def _digest_matches(key: str | None, challenge: bytes, digest: bytes) -> bool:
    expected = hmac.new((key or '').encode('utf-8'), challenge, hashlib.sha256).digest()
    return hmac.compare_digest(expected, digest)


def _parse_request(request: Any) -> tuple[str, Any, list, dict]:
    """Check a request's shape; every defect is named in the error the client gets."""
    if not isinstance(request, dict):
        raise AveException('malformed request: expected a JSON object')
    method = request.get('method')
    if not isinstance(method, str) or not method:
        raise AveException('malformed request: "method" must be a non-empty string')
    params = request.get('params', {})
    if not isinstance(params, dict):
        raise AveException('malformed request: "params" must be an object')
    vargs = params.get('vargs', [])
    kwargs = params.get('kwargs', {})
    if not isinstance(vargs, list):
        raise AveException('malformed request: "params.vargs" must be a list')
    if not isinstance(kwargs, dict):
        raise AveException('malformed request: "params.kwargs" must be an object')
    resource = request.get('resource')
    if resource is not None and not isinstance(resource, dict):
        raise AveException('malformed request: "resource" must be an object or null')
    if not isinstance(request.get('async', False), bool):
        raise AveException('malformed request: "async" must be true or false')
    return method, resource, vargs, kwargs


# -- the client -------------------------------------------------------------------------

class RemoteControl:
    """A client of a Control: attribute calls become RPCs.

    ``remote.method(*args, **kwargs)`` sends a request and returns the result or raises
    the typed remote exception; ``__async__=True`` sends it one-way. The connection is
    made on the first call and re-made after a failure. ``timeout`` bounds connecting,
    the handshake, sending and waiting for each reply.
    """

    def __init__(self, address: tuple[str, int], authkey: str | None = None,
                 timeout: float | None = None, optimist: bool = True,
                 sock: socketlib.socket | None = None) -> None:
        host, port = address
        self._address = (host or '127.0.0.1', port)
        self._authkey = authkey
        self._timeout = timeout
        self._reply_timeout = timeout
        self._optimist = optimist
        self._connection: BlockingConnection | None = None
        self._resource: dict | None = None
        if sock is not None:
            self._connection = BlockingConnection(self._address, sock)
            self._handshake()

    def __getattr__(self, name: str) -> Callable:
        if name.startswith('_'):
            raise AttributeError(name)
        return _RemoteMethod(self, name)

    def __enter__(self) -> 'RemoteControl':
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._disconnect()

    def _connect(self) -> BlockingConnection:
        if self._connection is None:
            connection = BlockingConnection(self._address)
            try:
                connection.connect(self._timeout, self._optimist)
            except BaseException:
                connection.close()
                raise
            self._connection = connection
            try:
                self._handshake()
            except BaseException:
                self._disconnect()
                raise
        return self._connection

    def _handshake(self) -> None:
        challenge = self._connection.get(self._timeout)
        if (not challenge.startswith(CHALLENGE_PREFIX)
                or len(challenge) != len(CHALLENGE_PREFIX) + NONCE_SIZE):
            raise AuthError('the server did not send a valid challenge')
        nonce = challenge[len(CHALLENGE_PREFIX):]
        key = (self._authkey or '').encode('utf-8')
        self._connection.put(hmac.new(key, nonce, hashlib.sha256).digest(), self._timeout)
        # The verdict is read to keep the stream in step, not kept: a client without
        # the right key learns it from the AuthError of the first guarded call.
        json.loads(self._connection.get(self._timeout))

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _call(self, method: str, vargs: tuple, kwargs: dict) -> Any:
        is_async = bool(kwargs.pop('__async__', False))
        payload = json.dumps({'method': method, 'resource': self._resource,
                              'params': {'vargs': vargs, 'kwargs': kwargs},
                              'async': is_async})
        connection = self._connect()
        try:
            connection.put(payload, self._timeout)
            if is_async:
                return None
            response = json.loads(connection.get(self._reply_timeout))
        except BaseException:
            self._disconnect()  # a half-done exchange would answer the wrong call later
            raise
        if 'exception' in response:
            raise exception_factory(response['exception'])
        return response.get('result')


class _RemoteMethod:
    __slots__ = ('_remote', '_name')

    def __init__(self, remote: RemoteControl, name: str) -> None:
        self._remote = remote
        self._name = name

    def __call__(self, *vargs: Any, **kwargs: Any) -> Any:
        return self._remote._call(self._name, vargs, kwargs)
