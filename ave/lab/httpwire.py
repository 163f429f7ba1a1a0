"""Sans-IO HTTP/1.1, client side only: requests as bytes out, responses as events in.

etcd's JSON gateway is the only server this speaks to, so it does only what that
takes: POST requests with a known length, and responses framed by Content-Length,
chunked transfer coding (unary errors and every stream) or the connection's end.
Nothing here touches a socket; ``ResponseParser`` is fed bytes and hands out
``Head``, ``Body`` and ``End`` events, and ``LineSplitter`` cuts a streamed body into
the newline-delimited JSON messages the gateway sends for a watch.

Cost contract: the server is a peer, and a broken one controls every byte we parse.
Each byte fed is scanned a bounded number of times (a search for a line end resumes
where the last one stopped, never from the start), and consumed bytes are dropped from
the front of one ``bytearray``, so the work is O(n) in the bytes received, however they
are split. Memory never follows a number the peer announces: the head is capped at
``max_head`` bytes, a chunk-size line at ``MAX_CHUNK_LINE``, a whole body at
``max_body`` (counted as bytes arrive, checked against Content-Length and each chunk
size before anything is buffered), a streamed line at ``max_line``. Body bytes are
handed out as they arrive, not gathered, so a stream holds at most one partial line.
Past a cap, or on anything malformed, the parser raises ``ResponseError`` and is dead.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEAD = 64 * 1024
MAX_CHUNK_LINE = 1024
MAX_HEADERS = 100
_STATUS_LINE = re.compile(rb'HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n]*))?')
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_NO_BODY = (204, 304)


class ResponseError(ValueError):
    """The bytes received are not an HTTP/1.1 response we accept, or exceed a cap."""


class Truncated(ResponseError):
    """The connection ended before the response did (a lost connection, not garbage)."""


@dataclass(frozen=True)
class Head:
    """Status line and headers; names are lower-case, repeats are joined with ', '."""
    status: int
    reason: str
    headers: dict[str, str]
    keep_alive: bool


@dataclass(frozen=True)
class Body:
    """Some bytes of the body, in order, as they arrived."""
    data: bytes


@dataclass(frozen=True)
class End:
    """The response is complete; a keep-alive connection may carry the next request."""


END = End()
Event = Head | Body | End


def encode_request(method: str, target: str, host: str, body: bytes,
                   headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """One request with a Content-Length; refuses header text that would split lines."""
    lines = [f'{method} {target} HTTP/1.1', f'Host: {host}',
             f'Content-Length: {len(body)}']
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or any(c in value for c in '\r\n\0'):
            raise ValueError(f'refusing to send header {name!r}')
        lines.append(f'{name}: {value}')
    for text in (method, target, host):
        if not text or any(c in text for c in ' \r\n\0'):
            raise ValueError(f'refusing to send request line part {text!r}')
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1') + body


class ResponseParser:
    """Parses one response; ``feed`` bytes, then take events with ``next_event``.

    States, in order: ``head``; then the body as ``length`` (Content-Length),
    ``chunk-size`` / ``chunk-data`` / ``chunk-end`` ... ``trailers`` (chunked) or
    ``until-close``; then ``end`` (END is due) and ``done``.
    """

    def __init__(self, max_body: int | None, max_head: int = MAX_HEAD) -> None:
        self.max_body = max_body
        self.max_head = max_head
        self.head: Head | None = None
        self._buffer = bytearray()
        self._scanned = 0           # bytes at the buffer's start known to hold no b'\n'
        self._state = 'head'
        self._head_bytes = 0        # head and trailer bytes so far, against max_head
        self._head_lines: list[bytes] = []
        self._remaining = 0         # bytes left of the Content-Length body or the chunk
        self._body_seen = 0
        self._eof = False

    def feed(self, data: bytes) -> None:
        """Add bytes as received, in any split."""
        if self._eof:
            raise ResponseError('bytes fed after the end of the connection')
        self._buffer += data

    def feed_eof(self) -> None:
        """The connection ended; only a body framed by the close may end with it."""
        self._eof = True

    @property
    def done(self) -> bool:
        """END has been handed out."""
        return self._state == 'done'

    @property
    def leftover(self) -> int:
        """Bytes received beyond the response (a keep-alive peer sends none)."""
        return len(self._buffer) if self._state in ('end', 'done') else 0

    def next_event(self) -> Event | None:
        """The next event, or None until more bytes (or the end) arrive."""
        while True:
            state = self._state
            if state == 'done':
                return None
            if state == 'end':
                self._state = 'done'
                return END
            if state == 'head':
                if not self._read_head():
                    self._expect_more('the head of the response')
                    return None
                return self.head
            if state in ('length', 'chunk-data'):
                if not self._buffer:
                    self._expect_more('the body')
                    return None
                return self._read_framed_data()
            if state == 'until-close':
                return self._read_data_until_close()
            if state == 'chunk-size':
                if not self._read_chunk_size():
                    self._expect_more('a chunk size')
                    return None
            elif state == 'chunk-end':
                if len(self._buffer) < 2:
                    self._expect_more('the end of a chunk')
                    return None
                if self._buffer[:2] != b'\r\n':
                    raise ResponseError('a chunk is not followed by CRLF')
                del self._buffer[:2]
                self._state = 'chunk-size'
            elif state == 'trailers':
                if not self._read_trailers():
                    self._expect_more('the trailers')
                    return None
            else:
                raise AssertionError(state)

    def _expect_more(self, what: str) -> None:
        """Waiting for more bytes is fine unless the connection has ended."""
        if self._eof:
            raise Truncated(f'the connection ended inside {what}')

    def _take_line(self, limit: int, what: str) -> bytes | None:
        """One line without its CRLF (or bare LF), or None; never scans a byte twice."""
        index = self._buffer.find(b'\n', self._scanned)
        if index < 0:
            self._scanned = len(self._buffer)
            if self._scanned > limit:
                raise ResponseError(f'{what} exceeds {max(limit, 0)} bytes')
            return None
        if index + 1 > limit:
            raise ResponseError(f'{what} exceeds {max(limit, 0)} bytes')
        line = bytes(self._buffer[:index])
        del self._buffer[:index + 1]
        self._scanned = 0
        return line[:-1] if line.endswith(b'\r') else line

    def _read_head(self) -> bool:
        while True:
            line = self._take_line(self.max_head - self._head_bytes, 'the response head')
            if line is None:
                return False
            self._head_bytes += len(line) + 2
            if line:
                if not self._head_lines and not _STATUS_LINE.fullmatch(line):
                    raise ResponseError(f'not an HTTP/1.x status line: {line[:60]!r}')
                if len(self._head_lines) > MAX_HEADERS:
                    raise ResponseError(f'more than {MAX_HEADERS} header lines')
                self._head_lines.append(line)
                continue
            if not self._head_lines:
                continue  # tolerate blank lines before the status line
            self.head = _make_head(self._head_lines)
            self._head_lines = []
            self._state = self._body_state(self.head)
            return True

    def _body_state(self, head: Head) -> str:
        if head.status in _NO_BODY:
            return 'end'
        coding = head.headers.get('transfer-encoding')
        if coding is not None:
            if coding.strip().lower() != 'chunked':
                raise ResponseError(f'unsupported transfer coding {coding[:40]!r}')
            return 'chunk-size'
        length = head.headers.get('content-length')
        if length is None:
            return 'until-close'
        self._remaining = _parse_length(length)
        self._count_body(self._remaining)
        return 'length' if self._remaining else 'end'

    def _count_body(self, size: int) -> None:
        self._body_seen += size
        if self.max_body is not None and self._body_seen > self.max_body:
            raise ResponseError(f'the response body exceeds {self.max_body} bytes')

    def _read_framed_data(self) -> Body:
        size = min(self._remaining, len(self._buffer))
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._remaining -= size
        if not self._remaining:
            self._state = 'chunk-end' if self._state == 'chunk-data' else 'end'
        return Body(data)

    def _read_data_until_close(self) -> Event | None:
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            self._count_body(len(data))
            return Body(data)
        if self._eof:
            self._state = 'done'
            return END
        return None

    def _read_chunk_size(self) -> bool:
        line = self._take_line(MAX_CHUNK_LINE, 'a chunk-size line')
        if line is None:
            return False
        digits = line.split(b';', 1)[0].strip()
        if not 0 < len(digits) <= 15 or digits.strip(b'0123456789abcdefABCDEF'):
            raise ResponseError(f'bad chunk size {digits[:20]!r}')
        self._remaining = int(digits, 16)
        self._count_body(self._remaining)
        self._state = 'chunk-data' if self._remaining else 'trailers'
        return True

    def _read_trailers(self) -> bool:
        while True:
            line = self._take_line(self.max_head - self._head_bytes, 'the trailers')
            if line is None:
                return False
            self._head_bytes += len(line) + 2
            if not line:
                self._state = 'end'
                return True


def _make_head(lines: list[bytes]) -> Head:
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise ResponseError(f'not an HTTP/1.x status line: {lines[0][:60]!r}')
    minor, status, reason = match.groups()
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.decode('latin-1').partition(':')
        if not colon or not _TOKEN.fullmatch(name):
            raise ResponseError(f'malformed header line {line[:60]!r}')
        name = name.lower()
        value = value.strip(' \t')
        headers[name] = f'{headers[name]}, {value}' if name in headers else value
    if 100 <= int(status) < 200:
        raise ResponseError(f'unexpected informational response {int(status)}')
    connection = headers.get('connection', '').lower()
    keep_alive = 'close' not in connection and (minor == b'1' or 'keep-alive' in connection)
    return Head(int(status), (reason or b'').decode('latin-1'), headers, keep_alive)


def _parse_length(text: str) -> int:
    values = {part.strip() for part in text.split(',')}
    if len(values) != 1:
        raise ResponseError(f'conflicting Content-Length {text[:40]!r}')
    value = values.pop()
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise ResponseError(f'bad Content-Length {value[:40]!r}')
    return int(value)


class LineSplitter:
    """Cuts a byte stream into lines (without the b'\n'), each at most ``max_line``.

    Same contract as the parser: a search resumes where the last one stopped, and a
    line longer than the cap fails as soon as the cap is passed, not when it ends.
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._scanned = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_line(self) -> bytes | None:
        index = self._buffer.find(b'\n', self._scanned)
        if index < 0:
            self._scanned = len(self._buffer)
            if self._scanned > self.max_line:
                raise ResponseError(f'a streamed message exceeds {self.max_line} bytes')
            return None
        if index > self.max_line:
            raise ResponseError(f'a streamed message exceeds {self.max_line} bytes')
        line = bytes(self._buffer[:index])
        del self._buffer[:index + 1]
        self._scanned = 0
        return line

    @property
    def pending(self) -> int:
        """Bytes of a line not yet complete."""
        return len(self._buffer)
