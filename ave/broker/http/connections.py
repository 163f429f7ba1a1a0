"""HTTP/1.1 connections on a selectors loop, bounded against hostile peers.

h11 parses (bytes in, events out, no sockets); this module moves the bytes and
enforces the limits. Every registered object carries a ``state`` naming its handler,
the convention of ``ave.network.control``, so these handlers run on the loop of the
process that owns the selector:

    http-listening  the listening socket: accept, evicting the stalest peer when full
    http-reading    waiting for (the rest of) a request; h11 parses what arrives
    http-writing    a response is going out; nothing is read until it has gone
    http-draining   our side is shut after a final answer: what the peer still sends
                    is read and dropped for a moment, so that it sees the answer
                    rather than a reset

Cost contract: a peer controls every byte it sends, so

- reading is O(1) per byte: h11 buffers at most ``head_bytes`` of an unfinished
  request head (431 beyond), and we read at most ``RECV_SIZE`` more at a time, only
  while h11 asks for data (so pipelined requests cannot pile up unread);
- a body is never kept: it is counted and dropped, and over ``body_bytes`` (or
  announced over it) the request is refused with 413;
- each request must arrive whole within ``request_timeout`` of the previous answer
  (a peer trickling one byte a second gets 408; a silent one is closed quietly), each
  answer must be taken within ``write_timeout``, a final drain lasts at most
  ``drain_timeout`` and ``drain_bytes``;
- at most ``connections`` peers are served; a new one evicts the peer that has gone
  longest without progress, so idle connections cannot lock everyone else out (the
  same happens when the process runs out of descriptors first);
- a peer with pipelined requests gets one answer per loop turn, so it cannot starve
  the others.

A request line that cannot be HTTP/1.x (HTTP/0.9, garbage) is refused with 400 as
soon as its line ends, without waiting for a head that will never come. Every
refusal is one status line with a one-line text body, then the connection closes.
"""
from __future__ import annotations

import email.utils
import errno
import http
import logging
import re
import selectors
import socket as socketlib
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import h11

from ave.broker.http.site import COMMON_HEADERS, Reply, error_reply

log = logging.getLogger(__name__)

LISTENING = 'http-listening'
READING = 'http-reading'
WRITING = 'http-writing'
DRAINING = 'http-draining'

RECV_SIZE = 16 * 1024
ACCEPTS_PER_TURN = 64
LISTENER_PAUSE = 1.0
SERVER_NAME = 'ave-broker-http'
REQUEST_LINE = re.compile(rb'[!#$%&\'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+ HTTP/[0-9]\.[0-9]\r?\n')

Responder = Callable[[str, str], Reply]


@dataclass(frozen=True)
class Limits:
    """What a peer may cost the HTTP process (defaults fit a status page)."""

    connections: int = 256
    head_bytes: int = 8 * 1024
    body_bytes: int = 4 * 1024
    request_timeout: float = 10.0
    write_timeout: float = 10.0
    drain_timeout: float = 2.0
    drain_bytes: int = 256 * 1024


class HttpConnection:
    """One peer: its socket, its h11 state machine and where its request stands."""

    __slots__ = ('sock', 'fd', 'protocol', 'state', 'interest', 'deadline', 'outbox',
                 'received', 'line_checked', 'body', 'method', 'target', 'drained')

    def __init__(self, sock: socketlib.socket, limits: Limits) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.protocol = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.head_bytes)
        self.state: str | None = READING
        self.interest = selectors.EVENT_READ
        self.deadline = 0.0
        self.outbox = memoryview(b'')
        self.drained = 0
        self.new_request()

    def new_request(self) -> None:
        self.received = False      # any byte of this request yet?
        self.line_checked = False  # has its request line been seen to be HTTP/1.x?
        self.body = 0
        self.method = 'GET'
        self.target = '/'


class _Listener:
    __slots__ = ('sock', 'state', 'paused_until')

    def __init__(self, sock: socketlib.socket) -> None:
        self.sock = sock
        self.state: str | None = LISTENING
        self.paused_until = 0.0


class HttpFrontend:
    """Serves ``respond(method, target)`` to every peer of ``listener``.

    The owner registers ``handlers()`` with its loop's dispatch table, calls
    ``sweep()`` about once a second to enforce the time limits, and ``close()``
    when it shuts down.
    """

    def __init__(self, selector: selectors.BaseSelector, listener: socketlib.socket,
                 respond: Responder, limits: Limits = Limits()) -> None:
        self.selector = selector
        self.listener = _Listener(listener)
        self.respond = respond
        self.limits = limits
        # Least recent progress first: the front is whom to evict.
        self.connections: OrderedDict[int, HttpConnection] = OrderedDict()
        self.refused: Counter[int] = Counter()
        self.evicted = 0
        self.pauses = 0

    def handlers(self) -> dict[str, Callable[[Any, int], None]]:
        return {LISTENING: self._on_listening, READING: self._on_reading,
                WRITING: self._on_writing, DRAINING: self._on_draining}

    def start(self) -> None:
        self.listener.sock.setblocking(False)
        self.selector.register(self.listener.sock, selectors.EVENT_READ, self.listener)

    def sweep(self, now: float) -> None:
        """Enforce deadlines; resume accepting after a pause."""
        for connection in list(self.connections.values()):
            if connection.deadline <= now and connection.state is not None:
                self._expire(connection)
        listener = self.listener
        if listener.paused_until and listener.paused_until <= now and listener.state:
            listener.paused_until = 0.0
            self.selector.register(listener.sock, selectors.EVENT_READ, listener)

    def close(self) -> None:
        for connection in list(self.connections.values()):
            self._close(connection)
        if self.listener.state is not None:
            if not self.listener.paused_until:
                self.selector.unregister(self.listener.sock)
            self.listener.state = None
            self.listener.sock.close()

    def take_counts(self) -> tuple[Counter[int], int, int]:
        """Refusals by status, evictions and accept pauses since the last call (for a
        log summary: one line a minute, never one per peer)."""
        counts = (self.refused, self.evicted, self.pauses)
        self.refused, self.evicted, self.pauses = Counter(), 0, 0
        return counts

    # -- accepting ---------------------------------------------------------------------

    def _on_listening(self, listener: _Listener, mask: int) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, _ = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE) and self.connections:
                    self._evict()  # out of descriptors: the stalest peer makes room
                    continue
                self._pause(listener, error)
                return
            if len(self.connections) >= self.limits.connections:
                self._evict()
            self._admit(sock)

    def _evict(self) -> None:
        self.evicted += 1
        self._close(next(iter(self.connections.values())))

    def _pause(self, listener: _Listener, error: OSError) -> None:
        """Stop accepting for a moment rather than spin on a listener that stays
        readable while accepting fails."""
        if not self.pauses:
            log.warning('HTTP accept failed (%s); pausing for %.0f s', error, LISTENER_PAUSE)
        self.pauses += 1
        self.selector.unregister(listener.sock)
        listener.paused_until = time.monotonic() + LISTENER_PAUSE

    def _admit(self, sock: socketlib.socket) -> None:
        sock.setblocking(False)
        connection = HttpConnection(sock, self.limits)
        self.connections[connection.fd] = connection
        self.selector.register(sock, selectors.EVENT_READ, connection)
        self._enter(connection, READING, self.limits.request_timeout)

    # -- reading a request -------------------------------------------------------------

    def _on_reading(self, connection: HttpConnection, mask: int) -> None:
        line_may_end = True  # without a read, this is a pipelined request's turn
        if mask & selectors.EVENT_READ:
            try:
                data = connection.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(connection)
                return
            connection.protocol.receive_data(data)
            connection.received = connection.received or bool(data)
            line_may_end = b'\n' in data or not data
        if line_may_end and not connection.line_checked:
            if not self._request_line_ok(connection):
                return
        self._advance(connection)

    def _request_line_ok(self, connection: HttpConnection) -> bool:
        """Refuse at once a first line that no HTTP/1.x client would send.

        Checked once per request, when its first line ends (or the peer closes), so
        the buffer is copied once and the cost stays linear in what was sent.
        """
        buffered, closed = connection.protocol.trailing_data
        if closed and not buffered:
            return True  # a quiet goodbye: h11 reports it as such
        if b'\n' not in buffered[:self.limits.head_bytes]:
            return True  # the line is not complete yet (h11 caps its length)
        connection.line_checked = True
        if REQUEST_LINE.match(buffered):
            return True
        self._refuse(connection, 400, 'not an HTTP/1.x request line')
        return False

    def _advance(self, connection: HttpConnection) -> None:
        """Take h11's events until it needs more bytes or an answer is on its way."""
        protocol = connection.protocol
        while connection.state == READING:
            try:
                event = protocol.next_event()
            except h11.RemoteProtocolError as error:
                status = error.error_status_hint
                self._refuse(connection, status, f'request head larger than '
                             f'{self.limits.head_bytes} bytes' if status == 431
                             else _describe(error))
                return
            if event is h11.NEED_DATA:
                self._want(connection, selectors.EVENT_READ)
                return
            if isinstance(event, h11.Request):
                connection.line_checked = True
                connection.method = event.method.decode('ascii', 'replace')
                connection.target = event.target.decode('latin-1')
                if _announced_length(event) > self.limits.body_bytes:
                    self._refuse(connection, 413, f'a request body may have at most '
                                 f'{self.limits.body_bytes} bytes')
            elif isinstance(event, h11.Data):
                connection.body += len(event.data)
                if connection.body > self.limits.body_bytes:
                    self._refuse(connection, 413, f'a request body may have at most '
                                 f'{self.limits.body_bytes} bytes')
            elif isinstance(event, h11.EndOfMessage):
                self._answer(connection, self._reply_for(connection))
                return  # any pipelined request waits for its own turn
            else:
                self._close(connection)  # the peer closed between requests

    def _reply_for(self, connection: HttpConnection) -> Reply:
        try:
            return self.respond(connection.method, connection.target)
        except Exception:
            log.exception('answering %s %s failed', connection.method[:16],
                          connection.target[:200])
            return error_reply(500, 'the server failed to make this page')

    # -- answering ---------------------------------------------------------------------

    def _refuse(self, connection: HttpConnection, status: int, message: str) -> None:
        """Answer a bad request with one status line, then close."""
        self.refused[status] += 1
        if connection.protocol.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._answer(connection, error_reply(status, message), close=True)
        else:
            self._close(connection)

    def _answer(self, connection: HttpConnection, reply: Reply, close: bool = False) -> None:
        protocol = connection.protocol
        headers = [('Content-Type', reply.content_type),
                   ('Content-Length', str(len(reply.body))),
                   ('Date', email.utils.formatdate(usegmt=True)),
                   ('Server', SERVER_NAME), *COMMON_HEADERS, *reply.headers]
        if close:
            headers.append(('Connection', 'close'))
        try:
            parts = [protocol.send(h11.Response(status_code=reply.status, headers=headers,
                                               reason=http.HTTPStatus(reply.status).phrase))]
            if connection.method != 'HEAD':
                parts.append(protocol.send(h11.Data(data=reply.body)))
            parts.append(protocol.send(h11.EndOfMessage()))
        except h11.LocalProtocolError as error:
            log.warning('could not answer %s: %s', connection.target[:200], error)
            self._close(connection)
            return
        connection.outbox = memoryview(b''.join(part for part in parts if part))
        self._enter(connection, WRITING, self.limits.write_timeout)
        self._flush(connection)

    def _on_writing(self, connection: HttpConnection, mask: int) -> None:
        self._flush(connection)

    def _flush(self, connection: HttpConnection) -> None:
        try:
            sent = connection.sock.send(connection.outbox)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(connection)
            return
        connection.outbox = connection.outbox[sent:]
        if connection.outbox:
            self._want(connection, selectors.EVENT_WRITE)
        else:
            self._answered(connection)

    def _answered(self, connection: HttpConnection) -> None:
        """The answer is out: on to the next request, or a graceful close."""
        protocol = connection.protocol
        if protocol.our_state is h11.DONE and protocol.their_state is h11.DONE:
            protocol.start_next_cycle()
            connection.new_request()
            self._enter(connection, READING, self.limits.request_timeout)
            # A pipelined request already buffered waits for the next turn (the
            # socket is writable, so that comes at once) rather than being served
            # now: one answer per turn keeps a pipelining peer from starving others.
            pending = bool(protocol.trailing_data[0])
            self._want(connection, selectors.EVENT_WRITE if pending else selectors.EVENT_READ)
            return
        try:
            connection.sock.shutdown(socketlib.SHUT_WR)
        except OSError:
            self._close(connection)
            return
        self._enter(connection, DRAINING, self.limits.drain_timeout)
        self._want(connection, selectors.EVENT_READ)

    def _on_draining(self, connection: HttpConnection, mask: int) -> None:
        try:
            data = connection.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b''
        connection.drained += len(data)
        if not data or connection.drained > self.limits.drain_bytes:
            self._close(connection)

    # -- bookkeeping -------------------------------------------------------------------

    def _expire(self, connection: HttpConnection) -> None:
        if connection.state == READING and connection.received:
            self._refuse(connection, 408, f'the request did not arrive within '
                         f'{self.limits.request_timeout:g} s')
        else:
            self._close(connection)  # idle between requests, not reading, or drained

    def _enter(self, connection: HttpConnection, state: str, timeout: float) -> None:
        """Move to ``state`` with a fresh deadline; progress moves it off the front."""
        connection.state = state
        connection.deadline = time.monotonic() + timeout
        self.connections.move_to_end(connection.fd)

    def _want(self, connection: HttpConnection, events: int) -> None:
        if connection.interest != events:
            connection.interest = events
            self.selector.modify(connection.sock, events, connection)

    def _close(self, connection: HttpConnection) -> None:
        if connection.state is None:
            return
        connection.state = None
        self.connections.pop(connection.fd, None)
        self.selector.unregister(connection.sock)
        connection.sock.close()


def _announced_length(request: h11.Request) -> int:
    for name, value in request.headers:
        if name == b'content-length':
            return int(value)
    return 0


def _describe(error: h11.RemoteProtocolError) -> str:
    """h11's reason, cut short: it may quote what the peer sent."""
    return str(error).splitlines()[0][:120] if str(error) else 'malformed request'
