"""Requests to a set of etcd endpoints: every wait bounded, failures sorted, and the
next endpoint tried when that is safe.

One call has one deadline (``timeout`` seconds from its start). Within it the endpoints
are tried in turn, starting with the one that answered last. A read's try gets an equal
share of what is left, so one paused member (it accepts connections, it never answers)
cannot take the whole budget from the others; a write's try gets all of it, because a
write that was sent cannot move on anyway, and a member that is merely slow (a disk
stall) should get to answer it. When every endpoint failed, the round is repeated after
a short pause (an election takes a moment) while enough time is left for a try to be
answered; a try begun just before the deadline could only run out of time.

Whether a failure may be retried depends on what reached the server:

- nothing was sent (refused, unreachable, connect timed out): try the next endpoint;
- etcd refused before the request entered raft ("no leader", "too many requests"):
  try the next endpoint;
- the request was sent and no definite answer came (timeout, reset, garbage, "request
  timed out"): a read tries the next endpoint, a write raises ``OutcomeUnknown``;
- a definite answer (a result, or an error such as "lease not found"): return it.

Every request carries gRPC metadata ``hasleader``, so a member cut off from its
leader refuses at once instead of holding the request until raft gives up, and drops
its watch streams when it loses its leader.

Idle keep-alive connections are pooled per endpoint (a few each). Before one is reused
it is polled: a connection the server has closed (a killed member) is readable, and is
dropped before a write is sent into it, so that case stays "nothing was sent".
"""
from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from ave.lab import httpwire
from ave.lab.etcd_errors import (BadResponse, Compacted, EtcdError, EtcdUnavailable,
                                 LeaseGone, OutcomeUnknown, Retry, classify, clip,
                                 is_compacted, is_lease_gone)
from ave.lab.etcd_messages import MessageError

log = logging.getLogger(__name__)

T = TypeVar('T')
DEFAULT_MAX_RESPONSE = 64 * 1024 * 1024
IDLE_PER_ENDPOINT = 4
RECEIVE_SIZE = 256 * 1024
FIRST_PAUSE = 0.025
LONGEST_PAUSE = 0.4
#: A round is tried again only if, after its pause, this much of the call's time is
#: left (or a quarter of its timeout, if that is less). A try started just before the
#: deadline can only time out: a write that every member refused would end as "outcome
#: unknown", and the error would say "no answer in time" instead of why they refused.
SHORTEST_TRY = 0.2
HEADERS = (('Content-Type', 'application/json'), ('Grpc-Metadata-hasleader', 'true'))


@dataclass(frozen=True)
class Endpoint:
    """An etcd client URL, ``http://host:port``."""
    url: str
    host: str
    port: int

    @staticmethod
    def parse(url: str) -> 'Endpoint':
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != 'http':
            raise ValueError(f'etcd endpoint {url!r}: only http:// is supported')
        if not parts.hostname or parts.path not in ('', '/') or parts.query:
            raise ValueError(f'etcd endpoint {url!r}: expected http://host:port')
        try:
            port = parts.port or 2379
        except ValueError:
            raise ValueError(f'etcd endpoint {url!r}: bad port') from None
        return Endpoint(url.rstrip('/'), parts.hostname, port)

    @property
    def authority(self) -> str:
        host = f'[{self.host}]' if ':' in self.host else self.host
        return f'{host}:{self.port}'


# -- failures of one try, sorted by what they allow ------------------------------------

class Unreachable(Exception):
    """Nothing was sent: the endpoint could not be connected to."""


class Lost(Exception):
    """The request was (or may have been) sent, and no answer came."""


class ServerRefused(Exception):
    """etcd answered with an error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- one connection ---------------------------------------------------------------------

class Connection:
    """One socket to one endpoint; every wait on it ends at the deadline it is given."""

    def __init__(self, endpoint: Endpoint, sock: socket.socket) -> None:
        self.endpoint = endpoint
        self.sock = sock

    @staticmethod
    def open(endpoint: Endpoint, deadline: float) -> 'Connection':
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Unreachable('no time left to connect')
        try:
            sock = socket.create_connection((endpoint.host, endpoint.port), remaining)
        except OSError as error:
            raise Unreachable(f'connect failed: {_describe(error)}') from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Connection(endpoint, sock)

    def send(self, data: bytes, deadline: float) -> None:
        try:
            self.sock.settimeout(_left(deadline))
            self.sock.sendall(data)
        except (OSError, Lost) as error:
            raise Lost(f'sending failed: {_describe(error)}') from None

    def receive(self, deadline: float) -> bytes:
        """Some bytes, or b'' when the server closed the connection."""
        try:
            self.sock.settimeout(_left(deadline))
            return self.sock.recv(RECEIVE_SIZE)
        except TimeoutError:
            raise Lost('no answer in time') from None
        except OSError as error:
            raise Lost(f'receiving failed: {_describe(error)}') from None

    def is_idle(self) -> bool:
        """True while the server has sent nothing since the last answer (no close)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        return not poller.poll(0)

    def close(self) -> None:
        self.sock.close()


def _left(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise Lost('no answer in time')
    return remaining


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return 'timed out'
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def exchange(connection: Connection, request: bytes, deadline: float,
             max_body: int) -> tuple[httpwire.Head, bytes, bool]:
    """Send one request and read its whole response: (head, body, reusable)."""
    connection.send(request, deadline)
    parser = httpwire.ResponseParser(max_body=max_body)
    body = bytearray()
    head: httpwire.Head | None = None
    while True:
        try:
            event = parser.next_event()
        except httpwire.Truncated as error:
            raise Lost(str(error)) from None
        except httpwire.ResponseError as error:
            raise BadResponse(str(error)) from None
        if event is None:
            data = connection.receive(deadline)
            if data:
                parser.feed(data)
            elif head is None and not body:
                raise Lost('the server closed the connection without answering')
            else:
                parser.feed_eof()
        elif isinstance(event, httpwire.Head):
            head = event
        elif isinstance(event, httpwire.Body):
            body += event.data
        else:
            assert head is not None
            return head, bytes(body), head.keep_alive and not parser.leftover


def encode_json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(',', ':')).encode('ascii')


def parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise BadResponse(f'the body is not JSON: {clip(repr(data[:80]))}') from None


def error_of(message: Any) -> ServerRefused | None:
    """The error an etcd gateway message carries, if it is one.

    Unary errors are ``{"error": text, "code": n, "message": text}``; errors inside a
    stream are ``{"error": {"grpc_code": n, "message": text, ...}}``.
    """
    if not isinstance(message, dict) or 'error' not in message:
        return None
    error = message['error']
    if isinstance(error, dict):
        code, text = error.get('grpc_code', 2), error.get('message', '')
    else:
        code, text = message.get('code', 2), message.get('message', error)
    if not isinstance(code, int) or isinstance(code, bool) or not isinstance(text, str):
        raise BadResponse('an error message of unexpected shape')
    return ServerRefused(code, text)


def unary_message(head: httpwire.Head, body: bytes, stream_reply: bool) -> dict[str, Any]:
    """The result of a whole response, or the error it carries raised."""
    if stream_reply and head.status == 200:
        body = body.split(b'\n', 1)[0]
    try:
        message = parse_json(body) if body.strip() else None
    except BadResponse:
        if head.status == 200:
            raise
        message = None
    refused = error_of(message)
    if refused is not None:
        raise refused
    if head.status != 200:
        raise BadResponse(f'HTTP {head.status} {clip(head.reason, 40)} without an etcd '
                          f'error: {clip(repr(body[:80]))}')
    if stream_reply:
        message = message.get('result') if isinstance(message, dict) else None
    if not isinstance(message, dict):
        raise BadResponse('the answer is not a JSON object')
    return message


# -- the endpoint set -------------------------------------------------------------------

class Transport:
    """The endpoints of one etcd cluster, a pool of idle connections, the retry loop."""

    def __init__(self, endpoints: Sequence[str], timeout: float,
                 max_response: int = DEFAULT_MAX_RESPONSE) -> None:
        if isinstance(endpoints, str) or not endpoints:
            raise ValueError('give etcd endpoints as a non-empty list of URLs')
        if not timeout > 0:
            raise ValueError('the etcd timeout must be positive')
        self.endpoints = tuple(Endpoint.parse(url) for url in endpoints)
        self.timeout = float(timeout)
        self.max_response = max_response
        self._preferred = 0
        self._idle: dict[Endpoint, list[Connection]] = {e: [] for e in self.endpoints}
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle = [c for connections in self._idle.values() for c in connections]
            for connections in self._idle.values():
                connections.clear()
        for connection in idle:
            connection.close()

    # -- the retry loop ------------------------------------------------------------------

    def run(self, operation: str, attempt: Callable[[Endpoint, float], T], *,
            write: bool, timeout: float | None = None,
            only: Endpoint | None = None) -> T:
        """``attempt(endpoint, deadline)`` on one endpoint after another, as the
        failures it raises allow, until one returns or the call's time is up."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        candidates = (only,) if only is not None else self.endpoints
        broken: set[Endpoint] = set()
        last = 'no endpoint tried'
        pause = FIRST_PAUSE
        shortest_try = min(SHORTEST_TRY, timeout / 4)
        while True:
            order = [e for e in self._rotation(candidates) if e not in broken]
            if not order:
                raise BadResponse(f'{operation}: {last}')
            for index, endpoint in enumerate(order):
                now = time.monotonic()
                if now >= deadline:
                    break
                share = deadline if write or index == len(order) - 1 else (
                    now + (deadline - now) / (len(order) - index))
                try:
                    result = attempt(endpoint, share)
                except (Unreachable, Lost, BadResponse, ServerRefused) as failure:
                    last = self._judge(operation, endpoint, failure, write)
                    log.debug('etcd %s: %s', operation, last)
                    if isinstance(failure, BadResponse):
                        broken.add(endpoint)
                    self.avoid(endpoint)
                    continue
                self._prefer(endpoint)
                return result
            if deadline - time.monotonic() < pause + shortest_try:
                raise EtcdUnavailable(
                    f'{operation}: no etcd endpoint answered within {timeout:g} s '
                    f'({", ".join(e.url for e in candidates)}); last: {last}')
            time.sleep(pause)
            pause = min(pause * 2, LONGEST_PAUSE)

    @staticmethod
    def _judge(operation: str, endpoint: Endpoint, failure: Exception, write: bool) -> str:
        """What a failed try means: a line for the final message when another try is
        allowed; else the error the call raises."""
        text = f'{operation} on {endpoint.url}'
        if isinstance(failure, Unreachable):
            return f'{endpoint.url}: {failure}'
        if isinstance(failure, (Lost, BadResponse)):
            if write:
                raise OutcomeUnknown(f'{text}: {failure}; it may or may not have been '
                                     'applied')
            return f'{endpoint.url}: {failure}'
        assert isinstance(failure, ServerRefused)
        message = clip(failure.message)
        retry = classify(failure.code, failure.message)
        if retry is Retry.ANY or (retry is Retry.READS and not write):
            return f'{endpoint.url}: {message}'
        if retry is Retry.READS:
            raise OutcomeUnknown(f'{text}: {message}; it may or may not have been applied')
        if is_lease_gone(failure.message):
            raise LeaseGone(f'{text}: {message}')
        if is_compacted(failure.message):
            raise Compacted(f'{text}: {message}', 0)
        raise EtcdError(f'{text}: {message}')

    def _rotation(self, candidates: Sequence[Endpoint]) -> list[Endpoint]:
        if len(candidates) == 1:
            return list(candidates)
        start = self._preferred % len(candidates)
        return [*candidates[start:], *candidates[:start]]

    def _prefer(self, endpoint: Endpoint) -> None:
        if endpoint in self.endpoints:
            self._preferred = self.endpoints.index(endpoint)

    def avoid(self, endpoint: Endpoint) -> None:
        """Start the next call elsewhere, if ``endpoint`` is where it would start."""
        if self.endpoints[self._preferred % len(self.endpoints)] == endpoint:
            self._preferred += 1

    # -- unary calls ---------------------------------------------------------------------

    def call(self, operation: str, path: str, payload: dict[str, Any], *, write: bool,
             decode: Callable[[Endpoint, dict[str, Any]], T], stream_reply: bool = False,
             timeout: float | None = None, only: Endpoint | None = None) -> T:
        """POST ``payload`` to ``path`` and decode the answer, within the retry loop.

        ``stream_reply`` is for RPCs the gateway serves as a stream (lease keepalive):
        their first message is the answer.
        """
        body = encode_json(payload)

        def attempt(endpoint: Endpoint, deadline: float) -> T:
            request = httpwire.encode_request('POST', path, endpoint.authority, body,
                                              HEADERS)
            message = self.request(endpoint, request, deadline, stream_reply)
            try:
                return decode(endpoint, message)
            except MessageError as error:
                raise BadResponse(f'malformed answer: {error}') from None
        return self.run(operation, attempt, write=write, timeout=timeout, only=only)

    def request(self, endpoint: Endpoint, request: bytes, deadline: float,
                stream_reply: bool = False) -> dict[str, Any]:
        """One request on a pooled (or new) connection; the answer's message."""
        connection = self.checkout(endpoint, deadline)
        try:
            head, body, reusable = exchange(connection, request, deadline,
                                            self.max_response)
        except BaseException:
            connection.close()
            raise
        if reusable:
            self._checkin(connection)
        else:
            connection.close()
        return unary_message(head, body, stream_reply)

    def checkout(self, endpoint: Endpoint, deadline: float) -> Connection:
        """An idle connection still open at the server's end, or a new one."""
        while True:
            with self._lock:
                idle = self._idle[endpoint]
                connection = idle.pop() if idle else None
            if connection is None:
                return Connection.open(endpoint, deadline)
            if connection.is_idle():
                return connection
            connection.close()

    def _checkin(self, connection: Connection) -> None:
        with self._lock:
            idle = self._idle[connection.endpoint]
            if not self._closed and len(idle) < IDLE_PER_ENDPOINT:
                idle.append(connection)
                return
        connection.close()
