"""``RemoteControl``: the client of any Control, where attribute calls become RPCs.

The frames it sends and reads are built and parsed by ``ave.network.protocol``, the
same module the server uses; this class only owns the blocking connections, their
deadlines and the rule that a half-finished exchange is never reused.

Two things save round trips. The handshake's verdict is not waited for: the first
request follows the digest at once and the verdict is read just before its reply
(a server authenticates a digest before it reads what follows; the verdict only
keeps the stream in step, the rights it names show in the replies). And several
``RemoteControl`` objects may share a ``ConnectionPool``: a test job's proxies for
the items of one session then reuse authenticated connections instead of
connecting and shaking hands for every proxy.
"""
from __future__ import annotations

import socket as socketlib
import threading
from typing import Any, Callable

from ave.network import protocol
from ave.network.connection import BlockingConnection

_SAME_AS_TIMEOUT = object()
#: Idle connections a pool keeps; more are closed as their calls end.
POOL_IDLE_LIMIT = 8


class ClientConnection(BlockingConnection):
    """A client's connection: ``verdict_due`` while the handshake's verdict is unread."""

    verdict_due = False


class ConnectionPool:
    """Authenticated connections to one service, each used by one call at a time.

    A call takes an idle connection (or is given a new one) and hands it back once
    its exchange is complete; one whose exchange broke off is closed instead, never
    reused, so a late reply cannot answer the wrong call. Calls from several threads
    each get a connection of their own, so a long call never holds up another.
    """

    def __init__(self, limit: int = POOL_IDLE_LIMIT) -> None:
        self._limit = limit
        self._idle: list[ClientConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def take(self) -> ClientConnection | None:
        """An idle connection, most recently used first; None if there is none."""
        with self._lock:
            return self._idle.pop() if self._idle else None

    def give_back(self, connection: ClientConnection) -> None:
        """Keep a connection whose exchange completed, for the next call."""
        with self._lock:
            if not self._closed and len(self._idle) < self._limit:
                self._idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        """Close the idle connections; those in use are closed as their calls end."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class RemoteControl:
    """A client of a Control: ``remote.method(*args, **kwargs)`` is an RPC.

    It returns the result or raises the typed remote exception; ``__async__=True``
    sends the request one-way. The connection is made on the first call and re-made
    after a failure. ``timeout`` bounds connecting, the handshake, sending and, unless
    ``reply_timeout`` says otherwise, waiting for each reply. An ``optimist`` keeps
    retrying a refused connection until the timeout (the service may be starting).
    ``resource`` names the held resource every call is for (session proxies).
    With a ``pool`` the calls use the pool's connections (and the object may be used
    from several threads at once); leaving a ``with`` block then closes nothing, as
    the connections belong to the pool.
    """

    def __init__(self, address: tuple[str, int], authkey: str | None = None,
                 timeout: float | None = None, optimist: bool = True,
                 sock: socketlib.socket | None = None, *,
                 resource: dict | None = None,
                 reply_timeout: Any = _SAME_AS_TIMEOUT,
                 pool: ConnectionPool | None = None) -> None:
        host, port = address
        self._address = (host or '127.0.0.1', port)
        self._authkey = authkey
        self._timeout = timeout
        self._reply_timeout = timeout if reply_timeout is _SAME_AS_TIMEOUT else reply_timeout
        self._optimist = optimist
        self._resource = resource
        self._pool = pool
        self._connection: ClientConnection | None = None
        if sock is not None:
            self._connection = ClientConnection(self._address, sock)
            self._handshake(self._connection)

    def __getattr__(self, name: str) -> Callable:
        if name.startswith('_'):
            raise AttributeError(name)
        return _RemoteMethod(self, name)

    def __enter__(self) -> RemoteControl:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._disconnect()

    def _connect(self) -> ClientConnection:
        if self._connection is not None:
            return self._connection
        connection = self._open()
        self._connection = connection
        self._connected()
        return connection

    def _open(self) -> ClientConnection:
        """A new connection, handshake sent (its verdict is read with the first reply)."""
        connection = ClientConnection(self._address)
        try:
            connection.connect(self._timeout, self._optimist)
            self._handshake(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _connected(self) -> None:
        """Called once a new connection is ready, before the call that made it; a
        subclass may introduce itself here."""

    def _handshake(self, connection: ClientConnection) -> None:
        nonce = protocol.parse_challenge(connection.get(self._timeout))
        connection.put(protocol.digest(self._authkey, nonce), self._timeout)
        connection.verdict_due = True

    def _read_verdict(self, connection: ClientConnection) -> None:
        """Read the verdict the handshake left on its way. It is read to keep the
        stream in step, not kept: a client without the right key learns it from the
        AuthError of the first guarded call."""
        protocol.parse_verdict(connection.get(self._timeout))
        connection.verdict_due = False

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _call(self, method: str, vargs: tuple, kwargs: dict,
              reply_timeout: Any = _SAME_AS_TIMEOUT) -> Any:
        """One request and its reply; ``reply_timeout`` overrides the usual bound on
        waiting for the reply (a waiting allocation waits as long as it asked)."""
        is_async = bool(kwargs.pop('__async__', False)) if kwargs else False
        payload = protocol.encode_request(method, self._resource, vargs, kwargs, is_async)
        pool = self._pool
        if pool is None:
            connection = self._connection or self._connect()
        else:
            connection = pool.take() or self._open()
        try:
            connection.put(payload, self._timeout)
            if not is_async:
                if connection.verdict_due:
                    self._read_verdict(connection)
                reply = connection.get(self._reply_timeout if reply_timeout is
                                       _SAME_AS_TIMEOUT else reply_timeout)
        except BaseException:
            # A half-done exchange would answer the wrong call later.
            if pool is None:
                self._disconnect()
            else:
                connection.close()
            raise
        if pool is not None:
            pool.give_back(connection)
        return None if is_async else protocol.decode_reply(reply)


class _RemoteMethod:
    __slots__ = ('_remote', '_name')

    def __init__(self, remote: RemoteControl, name: str) -> None:
        self._remote = remote
        self._name = name

    def __call__(self, *vargs: Any, **kwargs: Any) -> Any:
        return self._remote._call(self._name, vargs, kwargs)
