"""TCP message queues: ``Connection`` for event loops, ``BlockingConnection`` for clients.

Both speak the frames of ``ave.network.framing`` and keep a partly read frame and
partly written output between calls. The socket underneath is always non-blocking;
``BlockingConnection`` waits with ``poll`` so that every call can carry a deadline.
"""
from __future__ import annotations

import errno
import random
import select
import socket as socketlib
import time
from typing import Self

from ave.network import framing
from ave.network.exceptions import (
    ConnectionAgain, ConnectionClosed, ConnectionInProgress, ConnectionRefused,
    ConnectionReset, ConnectionTimeout)

Address = tuple[str, int]

RECV_SIZE = 64 * 1024
LARGE_RECV_SIZE = 4 * 1024 * 1024
LISTEN_BACKLOG = 1024
_REFUSALS = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ETIMEDOUT}
_CLOSURES = {errno.EPIPE, errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNABORTED,
             errno.EBADF}


def find_free_port(start: int = 49152, stop: int = 65536, listen: bool = True,
                   host: str = '127.0.0.1') -> tuple[socketlib.socket, int]:
    """Bind a TCP socket to a random free port in [start, stop) on ``host``.

    The socket is returned still bound, so nobody can take the port between the
    search and its use.
    """
    for _ in range(20000):
        port = random.randrange(start, stop)
        sock = socketlib.socket(_family_of(host), socketlib.SOCK_STREAM)
        sock.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            sock.close()
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                continue
            raise
        if listen:
            sock.listen(LISTEN_BACKLOG)
        return sock, port
    raise OSError(errno.EADDRINUSE, f'no free port in [{start}, {stop}) after 20000 tries')


def above_ephemeral_ports() -> int:
    """The first port above the range the kernel gives outgoing connections.

    A port picked there and handed to another process cannot be taken meanwhile by
    some client's connect(). 49152 (the IANA dynamic range) where the kernel's range
    leaves no room above it or cannot be read.
    """
    try:
        with open('/proc/sys/net/ipv4/ip_local_port_range', encoding='ascii') as stream:
            highest = int(stream.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 49152
    return highest + 1 if highest < 65000 else 49152


def _family_of(host: str) -> int:
    return socketlib.AF_INET6 if ':' in host else socketlib.AF_INET


def _new_socket(host: str) -> socketlib.socket:
    sock = socketlib.socket(_family_of(host), socketlib.SOCK_STREAM)
    sock.setblocking(False)
    return sock


def _tune(sock: socketlib.socket) -> None:
    """Small request/response frames must leave at once, not wait for Nagle."""
    sock.setblocking(False)
    if sock.family in (socketlib.AF_INET, socketlib.AF_INET6):
        sock.setsockopt(socketlib.IPPROTO_TCP, socketlib.TCP_NODELAY, 1)


class Connection:
    """A non-blocking, framed message queue over one TCP socket."""

    def __init__(self, address: Address, socket: socketlib.socket | None = None,
                 limit: int = framing.DEFAULT_LIMIT) -> None:
        self.address = address
        self.socket = socket
        self.limit = limit
        #: What has arrived, cut into frames; ``decoder.held`` counts what waits there.
        self.decoder = framing.FrameDecoder(limit)
        self._outbox = bytearray()
        if socket is not None:
            socket.setblocking(False)

    def __repr__(self) -> str:
        return f'<{type(self).__name__} {self.address} fd={self.fileno()}>'

    def fileno(self) -> int:
        """The socket's descriptor, or -1 once closed."""
        return -1 if self.socket is None else self.socket.fileno()

    @property
    def closed(self) -> bool:
        return self.socket is None or self.socket.fileno() < 0

    def listen(self) -> None:
        """Replace the socket with one listening on ``address`` (port 0: any port)."""
        host, port = self.address[:2]
        sock = _new_socket(host)
        sock.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        self.socket = sock
        self.address = sock.getsockname()[:2]

    def open_socket(self) -> socketlib.socket:
        """The socket; ConnectionClosed once there is none."""
        if self.socket is None:
            raise ConnectionClosed()
        return self.socket

    def accept(self) -> Self:
        """Take one pending connection; ConnectionAgain when none is waiting."""
        try:
            sock, address = self.open_socket().accept()
        except (BlockingIOError, InterruptedError):
            raise ConnectionAgain()
        except OSError as error:
            raise _translate(error)
        _tune(sock)
        return type(self)(address[:2], sock, self.limit)

    def connect(self) -> None:
        """Start connecting; ConnectionInProgress if the kernel could not finish at once."""
        if self.socket is None:
            self.socket = _new_socket(self.address[0])
        code = self.socket.connect_ex(self.address)
        if code == 0 or code == errno.EISCONN:
            _tune(self.socket)
            return
        if code in (errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN):
            raise ConnectionInProgress()
        raise _translate(OSError(code, errno.errorcode.get(code, str(code))))

    def close(self) -> None:
        """Close the socket; safe to call more than once."""
        if self.socket is None:
            return
        try:
            self.socket.shutdown(socketlib.SHUT_RDWR)
        except OSError:
            pass  # already disconnected: closing is all that is left to do
        self.socket.close()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the kernel takes now; returns the number of bytes sent."""
        if self.socket is None:
            raise ConnectionClosed()
        try:
            return self.socket.send(data)
        except (BlockingIOError, InterruptedError):
            raise ConnectionAgain()
        except OSError as error:
            raise _translate(error)

    def read(self, size: int) -> bytes:
        """Receive up to ``size`` bytes; ConnectionClosed when the peer has gone."""
        data = self._recv(size)
        if data is None:
            raise ConnectionAgain()
        return data

    def _recv(self, size: int) -> bytes | None:
        """Like ``read`` but None, not an exception, when nothing is there yet."""
        if self.socket is None:
            raise ConnectionClosed()
        try:
            data = self.socket.recv(size)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as error:
            raise _translate(error)
        if not data:
            raise ConnectionClosed()
        return data

    def _send_frame(self, payload: bytes | str) -> bool:
        """Send one frame at once if nothing is queued, queueing what the kernel
        refuses; True when all of it went out. The header and the payload leave in
        one gathering ``sendmsg``, so a large payload is not copied to be framed."""
        if self._outbox:
            self.queue(payload)
            return self.flush()
        header, data = framing.split_encode(payload, self.limit)
        if self.socket is None:
            raise ConnectionClosed()
        try:
            sent = self.socket.sendmsg([header, data])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as error:
            raise _translate(error)
        if sent == len(header) + len(data):
            return True
        if sent < len(header):
            self._outbox += header[sent:]
            sent = len(header)
        self._outbox += memoryview(data)[sent - len(header):]
        return False

    def queue(self, payload: bytes | str) -> None:
        """Frame ``payload`` and append it to the output, without sending anything."""
        self._outbox += framing.encode(payload, self.limit)

    def flush(self) -> bool:
        """Send queued output until the kernel refuses more; True when all is sent."""
        while self._outbox:
            try:
                sent = self.write(self._outbox)
            except ConnectionAgain:
                return False
            del self._outbox[:sent]
        return True

    @property
    def has_output(self) -> bool:
        return bool(self._outbox)

    def put(self, payload: bytes | str) -> None:
        """Queue one frame and send as much as possible.

        Raises ConnectionAgain when part of the output is still queued: the frame is
        kept, so the caller only has to call ``flush()`` once the socket is writable.
        """
        if not self._send_frame(payload):
            raise ConnectionAgain()

    def next_frame(self) -> bytes | None:
        """A frame already received and buffered, without touching the socket."""
        try:
            return self.decoder.next_frame()
        except framing.FrameTooLarge as error:
            self.close()
            raise ConnectionClosed(str(error))

    def get(self) -> bytes | None:
        """The next whole frame, reading the socket at most once; None if incomplete."""
        frame = self.next_frame()
        if frame is not None:
            return frame
        data = self._recv(self._read_size())
        return None if data is None else self._take(data)

    def _take(self, data: bytes) -> bytes | None:
        try:
            return self.decoder.feed_and_next(data)
        except framing.FrameTooLarge as error:
            self.close()
            raise ConnectionClosed(str(error))

    def fill(self) -> None:
        """Read what the socket has into the input buffer without taking frames out;
        ConnectionClosed when the peer has gone."""
        data = self._recv(RECV_SIZE)
        if data is not None:
            self.decoder.feed(data)

    def limit_input(self, limit: int) -> None:
        """Refuse incoming frames over ``limit`` from now on (outgoing ones keep
        ``self.limit``): a peer that has not authenticated gets a tiny allowance."""
        self.decoder.limit = limit

    def _read_size(self) -> int:
        wanted = self.decoder.wanted()
        return RECV_SIZE if wanted <= RECV_SIZE else min(wanted, LARGE_RECV_SIZE)

    def say_and_close(self, payload: bytes | str) -> None:
        """Send one frame if the socket takes it at once (a courtesy), then close."""
        try:
            self.put(payload)
        except (ConnectionAgain, ConnectionClosed, OSError):
            pass  # the close below is what matters
        self.close()

    def deliver(self, payload: bytes | str, deadline: float) -> None:
        """Best effort to send one last frame before ``deadline`` (monotonic)."""
        try:
            self.queue(payload)
            while not self.flush():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                select.select([], [self.open_socket()], [], min(remaining, 0.05))
        except (ConnectionClosed, OSError):
            return

    def pending_input(self) -> bytes:
        """Received bytes not yet returned as frames (for handing the peer over)."""
        return self.decoder.pending()

    def pending_output(self) -> bytes:
        """Queued bytes not yet sent (for handing the peer over)."""
        return bytes(self._outbox)

    def restore(self, pending_input: bytes, pending_output: bytes) -> None:
        """Take over a predecessor's half-read input and unsent output."""
        self.decoder.feed(pending_input)
        self._outbox += pending_output


class BlockingConnection(Connection):
    """A framed connection whose calls wait, each for at most ``timeout`` seconds."""

    def __init__(self, address: Address, socket: socketlib.socket | None = None,
                 limit: int = framing.DEFAULT_LIMIT) -> None:
        super().__init__(address, socket, limit)
        self._poller: select.poll | None = None

    def poll(self, mask: int, timeout: float | None) -> list[tuple[int, int]] | None:
        """Wait until the socket meets ``mask`` (select.POLL*); None on time-out."""
        poller = select.poll()
        poller.register(self.open_socket(), mask)
        events = poller.poll(None if timeout is None else max(0, timeout) * 1000)
        return events or None

    def connect(self, timeout: float | None = None, optimist: bool = False) -> None:
        """Connect, waiting up to ``timeout``.

        An optimist keeps retrying refused attempts (the server may not listen yet)
        until the deadline, then reports ConnectionTimeout rather than a refusal.
        """
        deadline = _deadline(timeout)
        pause = 0.005
        while True:
            try:
                self._connect_once(deadline)
                return
            except ConnectionRefused:
                if not optimist:
                    self.close()
                    self.socket = None
                    raise
            self.close()
            self.socket = None
            if _remaining(deadline) == 0:
                raise ConnectionTimeout(f'could not connect to {self.address}')
            time.sleep(min(pause, _remaining(deadline) or pause))
            pause = min(pause * 2, 0.2)

    def _connect_once(self, deadline: float | None) -> None:
        try:
            Connection.connect(self)
            return
        except ConnectionInProgress:
            pass  # the normal case for a non-blocking connect: wait for it below
        if self.poll(select.POLLOUT, _remaining(deadline)) is None:
            self.close()
            self.socket = None
            raise ConnectionTimeout(f'could not connect to {self.address} in time')
        sock = self.open_socket()
        code = sock.getsockopt(socketlib.SOL_SOCKET, socketlib.SO_ERROR)
        if code:
            raise _translate(OSError(code, errno.errorcode.get(code, str(code))))
        _tune(sock)

    def accept(self, timeout: float | None = None) -> Self:
        """Wait up to ``timeout`` for a client and return its connection."""
        deadline = _deadline(timeout)
        while True:
            try:
                return Connection.accept(self)
            except ConnectionAgain:
                self._wait(select.POLLIN, deadline)

    def write(self, data: bytes | bytearray | memoryview,
              timeout: float | None = None) -> int:
        """Send all of ``data`` within ``timeout``; returns its length."""
        deadline = _deadline(timeout)
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            try:
                sent += Connection.write(self, view[sent:])
            except ConnectionAgain:
                self._wait(select.POLLOUT, deadline)
        return sent

    def read(self, size: int, timeout: float | None = None) -> bytes:
        """Receive between 1 and ``size`` bytes within ``timeout``."""
        deadline = _deadline(timeout)
        while True:
            try:
                return Connection.read(self, size)
            except ConnectionAgain:
                self._wait(select.POLLIN, deadline)

    def put(self, payload: bytes | str, timeout: float | None = None) -> None:
        """Send one whole frame within ``timeout``."""
        if not self._send_frame(payload):
            rest, self._outbox = self._outbox, bytearray()
            self.write(rest, timeout)

    def get(self, timeout: float | None = None) -> bytes:
        """Wait up to ``timeout`` for the next whole frame (ConnectionTimeout if none).

        The socket is read first and polled only when it has nothing: a reply that is
        already there costs one system call.
        """
        frame = self.next_frame()
        deadline = _deadline(timeout)
        while frame is None:
            data = self._recv(self._read_size())
            if data is None:
                self._wait(select.POLLIN, deadline)
            else:
                frame = self._take(data)
        return frame

    def _wait(self, mask: int, deadline: float | None) -> None:
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.open_socket(), mask)
        else:
            self._poller.modify(self.open_socket(), mask)
        remaining = _remaining(deadline)
        events = self._poller.poll(None if remaining is None else remaining * 1000)
        if not events:
            raise ConnectionTimeout()

    def close(self) -> None:
        self._poller = None
        super().close()


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _translate(error: OSError) -> Exception:
    """Map a socket error onto the connection exception a caller can act on."""
    if error.errno in _REFUSALS:
        return ConnectionRefused(error.strerror)
    if error.errno == errno.ECONNRESET:
        return ConnectionReset()
    if error.errno in _CLOSURES:
        return ConnectionClosed()
    return error
