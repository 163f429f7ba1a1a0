"""``RemoteControl``: the client of any Control, where attribute calls become RPCs.

The frames it sends and reads are built and parsed by ``ave.network.protocol``, the
same module the server uses; this class only owns the blocking connection, its
deadlines and the rule that a half-finished exchange is never reused.
"""
from __future__ import annotations

import socket as socketlib
from typing import Any, Callable

from ave.network import protocol
from ave.network.connection import BlockingConnection

_SAME_AS_TIMEOUT = object()


class RemoteControl:
    """A client of a Control: ``remote.method(*args, **kwargs)`` is an RPC.

    It returns the result or raises the typed remote exception; ``__async__=True``
    sends the request one-way. The connection is made on the first call and re-made
    after a failure. ``timeout`` bounds connecting, the handshake, sending and, unless
    ``reply_timeout`` says otherwise, waiting for each reply. An ``optimist`` keeps
    retrying a refused connection until the timeout (the service may be starting).
    ``resource`` names the held resource every call is for (session proxies).
    """

    def __init__(self, address: tuple[str, int], authkey: str | None = None,
                 timeout: float | None = None, optimist: bool = True,
                 sock: socketlib.socket | None = None, *,
                 resource: dict | None = None,
                 reply_timeout: Any = _SAME_AS_TIMEOUT) -> None:
        host, port = address
        self._address = (host or '127.0.0.1', port)
        self._authkey = authkey
        self._timeout = timeout
        self._reply_timeout = timeout if reply_timeout is _SAME_AS_TIMEOUT else reply_timeout
        self._optimist = optimist
        self._resource = resource
        self._connection: BlockingConnection | None = None
        if sock is not None:
            self._connection = BlockingConnection(self._address, sock)
            self._handshake(self._connection)

    def __getattr__(self, name: str) -> Callable:
        if name.startswith('_'):
            raise AttributeError(name)
        return _RemoteMethod(self, name)

    def __enter__(self) -> RemoteControl:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._disconnect()

    def _connect(self) -> BlockingConnection:
        if self._connection is not None:
            return self._connection
        connection = BlockingConnection(self._address)
        try:
            connection.connect(self._timeout, self._optimist)
            self._handshake(connection)
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        self._connected()
        return connection

    def _connected(self) -> None:
        """Called once a new connection is ready, before the call that made it; a
        subclass may introduce itself here."""

    def _handshake(self, connection: BlockingConnection) -> None:
        nonce = protocol.parse_challenge(connection.get(self._timeout))
        connection.put(protocol.digest(self._authkey, nonce), self._timeout)
        # The verdict is read to keep the stream in step, not kept: a client without
        # the right key learns it from the AuthError of the first guarded call.
        protocol.parse_verdict(connection.get(self._timeout))

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _call(self, method: str, vargs: tuple, kwargs: dict,
              reply_timeout: Any = _SAME_AS_TIMEOUT) -> Any:
        """One request and its reply; ``reply_timeout`` overrides the usual bound on
        waiting for the reply (a waiting allocation waits as long as it asked)."""
        is_async = bool(kwargs.pop('__async__', False))
        payload = protocol.encode_request(method, self._resource, vargs, kwargs, is_async)
        connection = self._connect()
        if reply_timeout is _SAME_AS_TIMEOUT:
            reply_timeout = self._reply_timeout
        try:
            connection.put(payload, self._timeout)
            if is_async:
                return None
            reply = connection.get(reply_timeout)
        except BaseException:
            self._disconnect()  # a half-done exchange would answer the wrong call later
            raise
        return protocol.decode_reply(reply)


class _RemoteMethod:
    __slots__ = ('_remote', '_name')

    def __init__(self, remote: RemoteControl, name: str) -> None:
        self._remote = remote
        self._name = name

    def __call__(self, *vargs: Any, **kwargs: Any) -> Any:
        return self._remote._call(self._name, vargs, kwargs)
