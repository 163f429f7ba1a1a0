"""Sans-IO codec for AVE's wire frames: a 4-byte big-endian length, then the payload.

Bytes go in with ``feed()``, whole payloads come out of ``next_frame()``; nothing here
touches a socket, so the codec is tested byte by byte without any I/O.

Cost contract: a peer controls the bytes we are fed, so the work per byte must be O(1)
amortised and memory must never follow a number the peer merely announces. The header
is checked against the limit before a single payload byte is kept, and consumed bytes
are dropped from the front of a ``bytearray`` (which CPython does without copying the
rest), so a frame fed in a million one-byte pieces costs a million small appends.
"""
from __future__ import annotations

import struct

HEADER = struct.Struct('>I')
DEFAULT_LIMIT = 16 * 1024 * 1024


class FrameTooLarge(ValueError):
    """A frame's announced or actual size exceeds the receiver's (or sender's) limit."""


def encode(payload: bytes | bytearray | str, limit: int = DEFAULT_LIMIT) -> bytes:
    """One frame carrying ``payload`` (str is UTF-8 encoded); refuse what no peer takes."""
    header, payload = split_encode(payload, limit)
    return header + payload


def split_encode(payload: bytes | bytearray | str,
                 limit: int = DEFAULT_LIMIT) -> tuple[bytes, bytes | bytearray]:
    """The frame as (header, payload), for a gathering send that copies neither."""
    if isinstance(payload, str):
        payload = payload.encode('utf-8')
    if len(payload) > limit:
        raise FrameTooLarge(f'frame of {len(payload)} bytes exceeds the limit of {limit}')
    return HEADER.pack(len(payload)), payload


class FrameDecoder:
    """Accumulates received bytes and yields complete frame payloads in order."""

    __slots__ = ('limit', '_buffer', '_expected', 'held')  # one per connection

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._expected: int | None = None
        #: Received bytes waiting here (a partial header or frame, or frames not taken
        #: yet), kept up to date so that counting them costs no call.
        self.held = 0

    def feed(self, data: bytes) -> None:
        """Add bytes as they arrived from the peer, in any split."""
        self._buffer += data
        self.held += len(data)

    def feed_and_next(self, data: bytes) -> bytes | None:
        """``feed(data)`` then ``next_frame()``, with a shortcut for the usual case.

        A chunk that is exactly one frame, arriving while nothing is buffered, is
        returned as a slice of itself: it never passes through the buffer.
        """
        if self._expected is None and not self._buffer and len(data) >= HEADER.size:
            (size,) = HEADER.unpack_from(data)
            if size == len(data) - HEADER.size and size <= self.limit:
                return data[HEADER.size:]
        self._buffer += data
        self.held += len(data)
        return self.next_frame()

    def next_frame(self) -> bytes | None:
        """Return the next whole payload, or None until one has fully arrived.

        Raises FrameTooLarge as soon as a header announces more than ``limit``; the
        decoder is then unusable, as the stream can no longer be trusted.
        """
        if self._expected is None:
            if len(self._buffer) < HEADER.size:
                return None
            (size,) = HEADER.unpack_from(self._buffer)
            if size > self.limit:
                raise FrameTooLarge(
                    f'peer announced a frame of {size} bytes; the limit is {self.limit}')
            del self._buffer[:HEADER.size]
            self._expected = size
        if len(self._buffer) < self._expected:
            return None
        if len(self._buffer) == self._expected:  # one copy, not a slice and a copy
            payload = bytes(self._buffer)
            self._buffer.clear()
        else:
            payload = bytes(self._buffer[:self._expected])
            del self._buffer[:self._expected]
        self.held -= HEADER.size + self._expected
        self._expected = None
        return payload

    def wanted(self) -> int:
        """How many more bytes would complete the header or the frame being received."""
        if self._expected is None:
            return HEADER.size - len(self._buffer) if len(self._buffer) < HEADER.size else 0
        return max(0, self._expected - len(self._buffer))

    def pending(self) -> bytes:
        """Everything received but not yet returned as a frame, re-encoded as wire bytes.

        A restarting service hands this to its successor so a partly read frame is
        neither lost nor duplicated.
        """
        header = b'' if self._expected is None else HEADER.pack(self._expected)
        return header + bytes(self._buffer)
