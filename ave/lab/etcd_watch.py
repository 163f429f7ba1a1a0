"""A watch: every change under a prefix, in revision order, from a given revision on,
read with a timeout and carried across member failures.

The gateway serves a watch as one long HTTP response: a chunked body of JSON messages,
one per line. Over HTTP/1.1 it cannot take further requests on that stream (Go's
server drains the request body before it answers), so there is no in-band progress
request; instead a watch that has heard nothing for ``idle_check`` seconds asks its
member for its status on a separate connection. A member that does not answer, has no
leader, or ends the stream, costs nothing but a reconnection: the watch opens a new
stream (on the next endpoint that answers) from the revision after the last one it
delivered, so no event is lost or repeated. Only compaction is final: the history the
watch needs is gone, and ``Compacted`` tells the caller to re-read and watch again.

Cost contract: the stream parser is ``httpwire``'s (O(n) in bytes received), and at
most one partial message (capped at the client's ``max_response``) is held.

Threads: one thread reads (``read`` or iteration); ``close`` may be called from any
thread and wakes a blocked reader at once through a pipe.
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import Any, Iterator

from ave.lab import httpwire
from ave.lab.etcd_errors import BadResponse, Compacted, EtcdError, clip
from ave.lab.etcd_messages import (MessageError, WatchEvent, WatchMessage, b64,
                                   decode_watch, prefix_end)
from ave.lab.etcd_transport import (HEADERS, Connection, Endpoint, Lost, ServerRefused,
                                    Transport, Unreachable, encode_json, error_of,
                                    parse_json, unary_message)

log = logging.getLogger(__name__)

MIN_STREAM_INTERVAL = 0.1


class _Stream:
    """One open watch response: its connection and the parsers over its bytes."""

    def __init__(self, connection: Connection, max_line: int) -> None:
        self.connection = connection
        self.max_line = max_line
        self.parser = httpwire.ResponseParser(max_body=None)
        self.lines = httpwire.LineSplitter(max_line)

    @property
    def endpoint(self) -> Endpoint:
        return self.connection.endpoint

    def read_head(self, deadline: float) -> httpwire.Head:
        while True:
            event = self._next_event()
            if isinstance(event, httpwire.Head):
                return event
            if event is not None:
                raise BadResponse('a response without a head')
            if not self._receive(deadline, None):
                raise Lost('no answer in time')

    def read_body(self, deadline: float) -> bytes:
        """The rest of a response that is not a stream (an error), at most max_line."""
        body = bytearray()
        while True:
            event = self._next_event()
            if isinstance(event, httpwire.Body):
                body += event.data
                if len(body) > self.max_line:
                    raise BadResponse(f'an error body exceeds {self.max_line} bytes')
            elif event is httpwire.END:
                return bytes(body)
            elif not self._receive(deadline, None):
                raise Lost('no answer in time')

    def next_line(self, deadline: float, wake_fd: int | None) -> bytes | None:
        """The next non-empty message line, or None at the deadline or when woken."""
        while True:
            try:
                line = self.lines.next_line()
            except httpwire.ResponseError as error:
                raise BadResponse(str(error)) from None
            if line is not None:
                if line.strip():
                    return line
                continue
            event = self._next_event()
            if isinstance(event, httpwire.Body):
                self.lines.feed(event.data)
            elif event is httpwire.END:
                raise Lost('the server ended the watch stream')
            elif event is not None:
                raise BadResponse('a second response head inside a stream')
            elif not self._receive(deadline, wake_fd):
                return None

    def _next_event(self) -> httpwire.Event | None:
        try:
            return self.parser.next_event()
        except httpwire.Truncated as error:
            raise Lost(str(error)) from None
        except httpwire.ResponseError as error:
            raise BadResponse(str(error)) from None

    def _receive(self, deadline: float, wake_fd: int | None) -> bool:
        """Feed what arrives before the deadline (what has arrived already, when it has
        passed); False on timeout or wake-up."""
        remaining = max(0.0, deadline - time.monotonic())
        poller = select.poll()
        poller.register(self.connection.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        if wake_fd is not None:
            poller.register(wake_fd, select.POLLIN)
        ready = dict(poller.poll(remaining * 1000))
        if not ready or (wake_fd is not None and wake_fd in ready):
            return False
        data = self.connection.receive(time.monotonic() + 1.0)  # readable: will not wait
        if data:
            self.parser.feed(data)
        else:
            self.parser.feed_eof()
        return True


class Watch:
    """Changes under ``prefix``; ``revision`` is the last revision delivered (an event's
    or a progress report's), so a new watch from ``revision + 1`` would carry on."""

    def __init__(self, transport: Transport, prefix: bytes, start_revision: int | None,
                 idle_check: float) -> None:
        if start_revision is not None and start_revision < 1:
            raise ValueError('a watch starts at revision 1 or later')
        self.prefix = prefix
        self.idle_check = idle_check
        self.revision = 0 if start_revision is None else start_revision - 1
        self._transport = transport
        self._stream: _Stream | None = None
        self._last_heard = self._connected_at = time.monotonic()
        self._failure: Compacted | None = None
        self._closed = False
        self._reader = threading.Lock()          # held by the one thread reading
        self._pipe_lock = threading.Lock()       # the wake-up pipe is closed only once
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._connect(from_now=start_revision is None)
        except BaseException:
            self._release()
            raise

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def endpoint(self) -> str | None:
        """The URL of the member streaming to us now, if any."""
        return self._stream.endpoint.url if self._stream is not None else None

    def __repr__(self) -> str:
        return f'<Watch {show(self.prefix)} after revision {self.revision}>'

    def read(self, timeout: float) -> list[WatchEvent]:
        """The events of the next change message (several when one revision changed
        several keys), or [] when ``timeout`` passes first or the watch is closed.

        Returns within ``timeout``, plus at most the client's timeout when the watch
        must reconnect or ask a silent member whether it is still there. Raises
        ``Compacted`` (for good), ``EtcdUnavailable`` when no member could be reached
        for a new stream and ``BadResponse`` for a broken one (reading again retries).
        """
        deadline = time.monotonic() + timeout
        self._reader.acquire()
        try:
            return self._read_until(deadline)
        finally:
            self._reader.release()
            if self._closed:
                self._release_if_idle()

    def __iter__(self) -> Iterator[WatchEvent]:
        """Every event, waiting as long as it takes; ends when the watch is closed."""
        while not self._closed:
            yield from self.read(self.idle_check)

    def close(self) -> None:
        """Stop the watch; a read blocked in another thread returns [] at once."""
        if self._closed:
            return
        self._closed = True
        with self._pipe_lock:
            if self._wake_write >= 0:
                try:
                    os.write(self._wake_write, b'x')
                except BlockingIOError:
                    pass  # the pipe is full of wake-ups already
        self._release_if_idle()

    def __enter__(self) -> 'Watch':
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------

    def _read_until(self, deadline: float) -> list[WatchEvent]:
        while not self._closed:
            if self._failure is not None:
                raise self._failure
            if self._stream is None:
                if not self._pause_before_reconnecting(deadline):
                    return []
                self._connect(from_now=False)
            stream = self._stream
            assert stream is not None
            try:
                line = stream.next_line(
                    min(deadline, self._last_heard + self.idle_check), self._wake_read)
            except (Lost, BadResponse) as failure:
                self._drop(f'{failure}')
                if isinstance(failure, BadResponse):
                    raise BadResponse(f'watch on {stream.endpoint.url}: {failure}') from None
                if time.monotonic() >= deadline:
                    return []
                continue
            now = time.monotonic()
            if line is None:
                if self._closed:
                    break
                if now - self._last_heard >= self.idle_check:
                    self._check_member()
                if now >= deadline:
                    return []
                continue
            self._last_heard = now
            events = self._handle(line)
            if events:
                return events
        return []

    def _handle(self, line: bytes) -> list[WatchEvent]:
        assert self._stream is not None
        endpoint = self._stream.endpoint.url
        message = self._decode(line, endpoint)
        if message is None:
            return []
        if message.compact_revision:
            self._drop('compacted')
            self._failure = Compacted(
                f'watch {show(self.prefix)} from revision {self.revision + 1} on '
                f'{endpoint}: etcd has compacted its history up to revision '
                f'{message.compact_revision}; re-read the keys and watch again from that '
                "read's revision + 1", message.compact_revision)
            raise self._failure
        if message.canceled:
            self._drop(f'canceled by the server: {clip(message.cancel_reason)}')
            return []
        events = [e for e in message.events if e.kv.mod_revision > self.revision]
        if events:
            self.revision = max(e.kv.mod_revision for e in events)
        elif not message.created and message.revision > self.revision:
            self.revision = message.revision  # a progress report: nothing new up to here
        return events

    def _decode(self, line: bytes, endpoint: str) -> WatchMessage | None:
        """A stream line as a message; an error line drops the stream (None)."""
        try:
            parsed = parse_json(line)
            refused = error_of(parsed)
            if refused is not None:
                self._drop(f'error from the server: {clip(refused.message)}')
                return None
            if not isinstance(parsed, dict) or not isinstance(parsed.get('result'), dict):
                raise BadResponse('a watch message without a result')
            return decode_watch(parsed['result'])
        except (BadResponse, MessageError) as error:
            self._drop(f'{error}')
            raise BadResponse(f'watch on {endpoint}: {error}') from None

    # -- the stream's life ---------------------------------------------------------------

    def _pause_before_reconnecting(self, deadline: float) -> bool:
        """Keep a server that ends every stream at once from making us spin: streams
        start at most every ``MIN_STREAM_INTERVAL`` seconds. False when the read's
        deadline comes first, or the watch is closed meanwhile."""
        wait = self._connected_at + MIN_STREAM_INTERVAL - time.monotonic()
        if wait <= 0:
            return True
        if time.monotonic() + wait > deadline:
            return False
        poller = select.poll()
        poller.register(self._wake_read, select.POLLIN)
        poller.poll(wait * 1000)
        return not self._closed

    def _connect(self, from_now: bool) -> None:
        """Open a stream from ``revision + 1`` (or from now) on the first member that
        answers; raises ``EtcdUnavailable`` when none does within the client timeout."""
        create: dict[str, Any] = {'key': b64(self.prefix),
                                  'range_end': b64(prefix_end(self.prefix)),
                                  'progress_notify': True}
        if not from_now:
            create['start_revision'] = str(self.revision + 1)
        body = encode_json({'create_request': create})

        def attempt(endpoint: Endpoint, deadline: float) -> tuple[_Stream, WatchMessage]:
            request = httpwire.encode_request('POST', '/v3/watch', endpoint.authority,
                                              body, HEADERS)
            connection = Connection.open(endpoint, deadline)
            try:
                return self._open_stream(connection, request, deadline)
            except BaseException:
                connection.close()
                raise

        stream, created = self._transport.run('watch', attempt, write=False)
        if from_now:
            self.revision = created.revision
        self._stream = stream
        self._last_heard = self._connected_at = time.monotonic()

    def _open_stream(self, connection: Connection, request: bytes,
                     deadline: float) -> tuple[_Stream, WatchMessage]:
        connection.send(request, deadline)
        stream = _Stream(connection, self._transport.max_response)
        head = stream.read_head(deadline)
        if head.status != 200:
            unary_message(head, stream.read_body(deadline), stream_reply=False)
            raise BadResponse(f'HTTP {head.status} to a watch')
        line = stream.next_line(deadline, None)
        if line is None:
            raise Lost('no answer in time')
        parsed = parse_json(line)
        refused = error_of(parsed)
        if refused is not None:
            raise refused
        result = parsed.get('result') if isinstance(parsed, dict) else None
        try:
            created = decode_watch(result) if isinstance(result, dict) else None
        except MessageError as error:
            raise BadResponse(f'malformed answer: {error}') from None
        if created is None or not created.created:
            raise BadResponse('the first watch message does not confirm the watch')
        return stream, created

    def _check_member(self) -> None:
        """Keep the stream if its member still answers and has a leader; else drop it."""
        assert self._stream is not None
        endpoint = self._stream.endpoint
        request = httpwire.encode_request('POST', '/v3/maintenance/status',
                                          endpoint.authority, b'{}', HEADERS)
        try:
            self._transport.request(endpoint, request,
                                    time.monotonic() + self._transport.timeout)
        except (Unreachable, Lost, ServerRefused, EtcdError) as error:
            self._drop(f'member check failed: {error}')
        else:
            self._last_heard = time.monotonic()

    def _drop(self, reason: str) -> None:
        """Leave a stream that failed; the next read resumes elsewhere if it can."""
        if self._stream is not None:
            endpoint = self._stream.endpoint
            log.info('watch %s: leaving %s (%s); will resume from revision %d',
                     show(self.prefix), endpoint.url, reason, self.revision + 1)
            self._stream.connection.close()
            self._stream = None
            self._transport.avoid(endpoint)

    def _release_if_idle(self) -> None:
        """Free the stream and the pipe unless a reader is in the middle of a read
        (that reader frees them on its way out)."""
        if self._reader.acquire(blocking=False):
            try:
                self._release()
            finally:
                self._reader.release()

    def _release(self) -> None:
        if self._stream is not None:
            self._stream.connection.close()
            self._stream = None
        with self._pipe_lock:
            for fd in (self._wake_read, self._wake_write):
                if fd >= 0:
                    os.close(fd)
            self._wake_read = self._wake_write = -1


def show(prefix: bytes) -> str:
    """A prefix for a message: text, quoted, clipped."""
    return repr(clip(prefix.decode('utf-8', 'backslashreplace'), 60))
