"""What makes a method an RPC, and the answer an RPC gives later.

The decorators only mark the function, so they stack in any order; ``Control``
reads the marks when a request names the method. ``Reply`` is the answer owed to a
request whose method called ``Control.defer()``: the work goes on elsewhere (a worker
thread, a queue of waiting requests) and the reply is sent when it is done.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ave.exceptions import AuthError
from ave.network import protocol
from ave.network.connection import Connection
from ave.network.peer import Peer

if TYPE_CHECKING:
    from ave.network.control import Control


def rpc(function: Callable) -> Callable:
    """Make a Control method callable over the network.

    The access marks get defaults here so that checking them on every call is a
    plain attribute hit: a ``getattr`` that misses raises and catches internally.
    """
    function.ave_rpc = True  # type: ignore[attr-defined]
    function.__dict__.setdefault('ave_auth', False)
    function.__dict__.setdefault('ave_preauth', None)
    return function


def auth(function: Callable) -> Callable:
    """Admit only clients holding the Control's primary key (everyone if it has none)."""
    function.ave_auth = True  # type: ignore[attr-defined]
    return function


def preauth(*accounts: str) -> Callable[[Callable], Callable]:
    """Admit only clients holding one of these accounts' keys.

    When none of the named accounts has a key configured, everyone is admitted: a lab
    that never set keys is not locked out of its own tools.
    """
    def mark(function: Callable) -> Callable:
        function.ave_preauth = tuple(accounts)  # type: ignore[attr-defined]
        return function
    return mark


def authorize_accounts(accounts: tuple[str, ...], method: str, peer: Peer,
                       alt_keys: dict) -> None:
    """AuthError unless ``peer`` proved one of the ``accounts`` that have a key (an
    RPC marked ``preauth``); with none of them keyed, everyone may call."""
    keyed = {name for name in accounts if alt_keys.get(name)}
    if keyed and not keyed & peer.accounts:
        raise AuthError(f'{method}() requires the key of {" or ".join(sorted(keyed))}')


class Reply:
    """The answer owed to one request, sent from the loop's thread, once.

    After the peer went away (or was handed to a successor) ``result`` and ``fail``
    do nothing. A one-way request's Reply sends nothing but still frees the peer
    for its next request.
    """

    __slots__ = ('_control', 'peer', 'is_async', 'done', 'in_dispatch')

    def __init__(self, control: Control, peer: Peer, is_async: bool,
                 in_dispatch: bool = False) -> None:
        self._control = control
        self.peer = peer
        self.is_async = is_async
        self.done = False
        self.in_dispatch = in_dispatch  # its request is still being served

    @property
    def connection(self) -> Connection:
        return self.peer.connection

    @property
    def pending(self) -> bool:
        """Still owed to a peer that is still there."""
        return not self.done and self.peer.live

    def result(self, value: Any = None) -> None:
        self._control._finish_reply(self, lambda: protocol.encode_result(value))

    def fail(self, error: BaseException) -> None:
        self._control._finish_reply(self, lambda: protocol.encode_exception(error))
