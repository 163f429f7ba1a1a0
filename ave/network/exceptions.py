"""Connection-level failures, raised on the side that sees them.

These describe the state of a local socket, so they are never sent over the wire; the
RPC layer turns them into what the caller should see.
"""


class ConnectionException(Exception):
    """Base of the connection failures; ``str(e)`` is the message."""

    default_message = 'connection failure'

    def __init__(self, msg: str | None = None) -> None:
        super().__init__(self.default_message if msg is None else msg)


class ConnectionClosed(ConnectionException):
    """The peer closed the connection, or it was closed here."""

    default_message = 'connection closed'


class ConnectionTimeout(ConnectionException):
    """Nothing could be read or written within the time limit."""

    default_message = 'timed out'


class ConnectionRefused(ConnectionException):
    """Nothing accepted the connection attempt."""

    default_message = 'connection refused'


class ConnectionInProgress(ConnectionException):
    """A non-blocking connect has started; poll for writability to see it finish."""

    default_message = 'connection in progress'


class ConnectionAgain(ConnectionException):
    """A non-blocking read or write must be retried when the socket is ready."""

    default_message = 'connection again'


class ConnectionReset(ConnectionClosed):
    """The peer reset the connection (a closed connection that ended abruptly)."""

    default_message = 'connection reset'
