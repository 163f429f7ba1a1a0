"""Descriptor transfer between processes (FdTx), the tool behind invisible restarts.

A restarting broker must hand its listening socket and every open connection to its
successor without anyone reconnecting: a busy session could not answer a reconnect in
time, and a client would see a refused connection. Passing the open descriptors over
a Unix domain socket (SCM_RIGHTS) lets the new broker poll them exactly as the old one
did. The send and receive of descriptors are done by ``ave._native``, compiled with
cffi from ``native/fdtx.c``; listening and connecting use the ``socket`` module.

Wire format. The socket is ``AF_UNIX``/``SOCK_SEQPACKET``, chosen over a byte stream
because the kernel keeps each message whole: the text and its descriptors arrive
together in one record or not at all, and a record too large for the receiver's buffer
is discarded entirely, so the next ``get`` always starts at the next message. Each
record is a 4-byte unsigned big-endian length N, then N bytes of UTF-8 text; the
descriptors ride on the same record as one SCM_RIGHTS control message. The length
prefix also tells a real message (at least 4 bytes, even for empty text) from the
empty read that means the peer closed. A record must fit in the sender's socket send
buffer, which Linux caps at twice ``net.core.wmem_max`` (about 416 KiB by default), so
``put`` raises ``OSError(EMSGSIZE)`` for messages beyond that; large state should
travel in several messages. ``MAX_MSG_LEN`` bounds both sides regardless.

Received descriptors are close-on-exec, like every descriptor Python opens.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable, Iterable

from ave._native import ffi, lib
from ave.exceptions import Timeout
from ave.network.exceptions import ConnectionClosed

MAX_FDS: int = lib.AVE_FDTX_MAX_FDS
"""Most descriptors one message can carry (the kernel's SCM_MAX_FD)."""

MAX_MSG_LEN = 16 * 1024 * 1024
"""Largest text, in bytes, that ``put`` sends or ``get`` makes room for."""

_HEADER = struct.Struct('>I')
_INT_MAX = 2**31 - 1
_RETRY_INTERVAL = 0.05

_GET_HINTS = {
    errno.EMSGSIZE: 'message longer than max_msg_len; it was discarded',
    errno.ENOBUFS: 'more descriptors than max_fds (or none left in this process); '
                   'the received ones were closed',
}


class FdTx:
    """One end of a descriptor transfer channel: listen and accept, or connect.

    ``so_path`` named the shared library in the original ctypes implementation; the
    native code is now part of the package, so the argument is accepted for
    compatibility and ignored (``None`` is fine).
    """

    def __init__(self, so_path: str | None = None) -> None:
        del so_path  # kept in the signature only so old callers keep working
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._path: str | None = None  # the socket file this object created

    def __enter__(self) -> FdTx:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def listen(self, dirname: str, filename: str | None = None) -> str:
        """Create a socket file in ``dirname`` and listen on it; return its path.

        A missing ``filename`` gets a random one. An existing file is never replaced
        (``FileExistsError``): it may be another live endpoint. The file is made
        owner-only before the socket listens, so no other account can connect and
        push descriptors into this process.
        """
        self._check_unused()
        path = os.path.join(dirname, filename or f'fdtx-{secrets.token_hex(8)}')
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, 'FdTx socket file already exists', path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._listener.bind(path)
            self._path = path
            os.chmod(path, 0o600)
            self._listener.listen(1)
        except OSError:
            self.close()
            raise
        return path

    def accept(self, timeout: float | None = None) -> None:
        """Wait for a peer to connect, at most ``timeout`` seconds (None: forever).

        FdTx carries one connection, so once a peer is in, the listening socket is
        closed and its file removed: nobody can connect in its place later.
        Raises ``ave.exceptions.Timeout`` when no peer came in time.
        """
        if self._listener is None:
            raise OSError(errno.EINVAL, 'FdTx.accept() needs listen() first')
        self._listener.settimeout(timeout)
        try:
            conn, _ = self._listener.accept()
        except (TimeoutError, BlockingIOError):
            raise Timeout(f'no FdTx peer connected to {self._path} '
                          f'within {timeout} s') from None
        self._close_listener()
        self._conn = _prepared(conn)

    def connect(self, path: str, timeout: float | None) -> None:
        """Connect to a listening FdTx, retrying while ``path`` is absent or refuses.

        The peer may still be starting, so failures that can heal are retried until
        ``timeout`` seconds have passed (None: forever), then ``Timeout`` is raised.
        Other failures (no permission, not a socket path) raise at once.
        """
        self._check_unused()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._conn = _attempt_connect(path, _remaining(deadline))
            if self._conn is not None:
                return
            left = _remaining(deadline)
            if left == 0:
                raise Timeout(f'could not connect to FdTx {path} within {timeout} s')
            time.sleep(_RETRY_INTERVAL if left is None else min(_RETRY_INTERVAL, left))

    def fileno(self) -> int:
        """The connected socket's descriptor, to wait on it with poll() and a time-out."""
        return self._connected().fileno()

    def close(self) -> None:
        """Close the connection or listening socket and remove a socket file made here.

        Safe to call more than once; descriptors already sent or received stay open.
        """
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._close_listener()

    def put(self, message: str | bytes, *fds: int) -> None:
        """Send ``message`` and the descriptors ``fds`` to the peer as one message.

        The descriptors stay open here too: the peer gets its own copies. The peer
        must know by convention how many descriptors to expect (its ``max_fds``).
        """
        payload = _encode(message)
        fd_array = _fd_array(fds)
        conn = self._connected()
        record = _HEADER.pack(len(payload)) + payload
        _native(lambda: lib.ave_fdtx_send(conn.fileno(), record, len(record),
                                          fd_array, len(fds)),
                'FdTx.put', {})

    def get(self, max_msg_len: int, max_fds: int) -> tuple[str, list[int]]:
        """Receive one message: its text (decoded as UTF-8) and its descriptors.

        A message longer than ``max_msg_len`` bytes raises ``OSError(EMSGSIZE)``, one
        with more than ``max_fds`` descriptors ``OSError(ENOBUFS)``; either way that
        whole message is dropped, any descriptors that came with it are closed, and
        the next ``get`` reads the next message. Text that is not UTF-8 raises
        ``UnicodeDecodeError`` after closing the descriptors. The peer closing the
        connection raises ``ConnectionClosed``. Blocks until a message arrives.
        """
        _check_count('max_msg_len', max_msg_len, MAX_MSG_LEN)
        _check_count('max_fds', max_fds, MAX_FDS)
        conn = self._connected()
        buf = ffi.new('char[]', _HEADER.size + max_msg_len)
        fds = ffi.new('int[]', max_fds)
        count = ffi.new('size_t *')
        size = _native(lambda: lib.ave_fdtx_recv(conn.fileno(), buf, len(buf),
                                                 fds, max_fds, count),
                       'FdTx.get', _GET_HINTS)
        received = [fds[i] for i in range(count[0])]
        try:
            return _decode(ffi.buffer(buf, size)[:]), received
        except (ValueError, ConnectionClosed):
            _close_all(received)
            raise

    def _check_unused(self) -> None:
        """Refuse to start a second socket: FdTx tracks exactly one."""
        if self._listener is not None or self._conn is not None:
            raise OSError(errno.EISCONN, 'FdTx already has a socket; close() it first')

    def _connected(self) -> socket.socket:
        if self._conn is None:
            raise OSError(errno.ENOTCONN, 'FdTx is not connected')
        return self._conn

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            self._path = None


def _attempt_connect(path: str, timeout: float | None) -> socket.socket | None:
    """One connection attempt: the connected socket, or None if worth retrying."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError, TimeoutError, BlockingIOError):
        sock.close()
        return None
    except BaseException:
        sock.close()
        raise
    return _prepared(sock)


def _prepared(sock: socket.socket) -> socket.socket:
    """Make a connected socket blocking and let it send records up to MAX_MSG_LEN.

    The kernel silently caps the send buffer at twice net.core.wmem_max.
    """
    sock.setblocking(True)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MSG_LEN)
    return sock


def _remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (never negative), or None for no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _check_count(name: str, value: object, limit: int) -> None:
    """Sizes go straight into C buffers: only plain ints in [0, limit] pass."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f'{name} must be an int, not {type(value).__name__}')
    if not 0 <= value <= limit:
        raise ValueError(f'{name} must be between 0 and {limit}, not {value}')


def _encode(message: str | bytes) -> bytes:
    if isinstance(message, str):
        payload = message.encode('utf-8')
    elif isinstance(message, (bytes, bytearray)):
        payload = bytes(message)
    else:
        raise TypeError(f'message must be str or bytes, not {type(message).__name__}')
    if len(payload) > MAX_MSG_LEN:
        raise ValueError(f'message of {len(payload)} bytes exceeds {MAX_MSG_LEN}')
    return payload


def _fd_array(fds: tuple[int, ...]) -> object:
    """The descriptors as a C int array, after checking each really is an int."""
    if len(fds) > MAX_FDS:
        raise ValueError(f'at most {MAX_FDS} descriptors per message, not {len(fds)}')
    for fd in fds:
        _check_count('a descriptor', fd, _INT_MAX)
    return ffi.new('int[]', list(fds))


def _decode(record: bytes) -> str:
    """The text of one record, checked against its length prefix."""
    if not record:
        raise ConnectionClosed('FdTx peer closed the connection')
    if len(record) < _HEADER.size or _HEADER.unpack_from(record)[0] != len(record) - _HEADER.size:
        raise ValueError(f'malformed FdTx message of {len(record)} bytes')
    return record[_HEADER.size:].decode('utf-8')


def _native(call: Callable[[], int], what: str, hints: dict[int, str]) -> int:
    """Run a native call; retry on EINTR (signal handlers run in between), and turn
    any other failure into OSError with the real errno."""
    while True:
        result = call()
        if result >= 0:
            return result
        err = ffi.errno
        if err != errno.EINTR:
            raise OSError(err, f'{what}: {hints.get(err, os.strerror(err))}')


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)
