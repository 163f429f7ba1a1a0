"""The AVE exception family and its wire form.

Every AVE exception carries a ``details`` dict (``type``, ``message`` and anything else
the raiser wants to say, such as ``cmd`` or ``out``). That dict is what travels in an
RPC exception reply, so a client can rebuild the same typed exception with
``exception_factory`` and a test engineer sees the server's message and trace.
"""
from __future__ import annotations

import threading
import traceback
from typing import Any, Callable

_REGISTRY: dict[str, type['AveException']] = {}
#: Imports that may register more types, run once, when a reply first names a type
#: that is not registered (a client imports equipment plug-ins only then).
_LOADERS: list[Callable[[], None]] = []
_LOADING = threading.Lock()


class AveException(Exception):
    """Base of every AVE exception; ``details`` keys read as attributes (``e.out``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def __init__(self, details: dict | str | None = None) -> None:
        self._set_details(details)

    def _set_details(self, details: dict | str | None) -> None:
        if details is None:
            details = {}
        elif not isinstance(details, dict):
            details = {'message': str(details)}
        details = dict(details)
        details.setdefault('type', type(self).__name__)
        details.setdefault('message', '')
        self.details = details
        Exception.__init__(self, details['message'])

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: expose the details as attributes.
        details = self.__dict__.get('details', {})
        if name in details:
            return details[name]
        raise AttributeError(name)

    def __str__(self) -> str:
        return str(self.details.get('message', ''))

    def __repr__(self) -> str:
        return f'{self.details["type"]}({self.details.get("message", "")!r})'

    def format_trace(self) -> str:
        """Render the trace that came with the exception (remote or local), or ''."""
        trace = self.details.get('trace')
        if not trace:
            return ''
        lines = []
        for entry in trace:
            filename, lineno, function, text = (list(entry) + [None] * 4)[:4]
            lines.append(f'  File "{filename}", line {lineno}, in {function}\n')
            if text:
                lines.append(f'    {text}\n')
        return ''.join(lines)


_REGISTRY['AveException'] = AveException


class Timeout(AveException):
    """An operation did not finish within its time limit."""


class Exit(AveException):
    """The hosting service (a broker, a session) has shut down in an orderly way."""


class AuthError(AveException):
    """A handshake or an authorization check failed."""


class RunError(AveException):
    """An external program could not be run, or failed in a way the caller must see."""

    def __init__(self, cmd: Any = None, out: str = '', message: str = '') -> None:
        if isinstance(cmd, dict) and out == '' and message == '':
            self._set_details(cmd)
            return
        self._set_details({'cmd': cmd, 'out': out, 'message': message})


class Restarting(AveException):
    """The service restarted and this instance no longer takes new calls."""


class Terminated(AveException):
    """A background activity (flashing, image building, ...) has ended."""


class Offline(AveException):
    """A handset is offline."""


class CompositionServerResponseNot200Exception(AveException):
    """A composition server answered with an HTTP status other than 200."""


class CompositionServerResponseHttpRetryCode(AveException):
    """A composition server failed transiently (502, 503, 504): try again."""


class CompositionServerResponseOrderFailed(AveException):
    """A composition order was processed but failed."""


class CompositionDownloadImagesFailed(AveException):
    """Downloading the images of a composition failed."""


def exception_factory(details: dict) -> AveException:
    """Rebuild a typed exception from its wire form; unknown types stay AveException.

    The exception is returned, not raised, so the caller decides where it surfaces.
    """
    if not isinstance(details, dict):
        details = {'message': str(details)}
    name = str(details.get('type'))
    if name not in _REGISTRY and _LOADERS:
        with _LOADING:  # another thread's reply may be loading them right now
            while name not in _REGISTRY and _LOADERS:
                _LOADERS.pop()()
    cls = _REGISTRY.get(name, AveException)
    exc = cls.__new__(cls)
    AveException._set_details(exc, details)
    return exc


def load_types_when_unknown(loader: Callable[[], None]) -> None:
    """Run ``loader`` (it imports modules that define exception types) the first time
    a reply names a type not registered by then, and never before."""
    _LOADERS.append(loader)


def trace_of(exc: BaseException) -> list[list]:
    """The traceback of ``exc`` as JSON-friendly ``[file, line, function, text]`` rows."""
    return [[f.filename, f.lineno, f.name, f.line]
            for f in traceback.extract_tb(exc.__traceback__)]


def details_of(exc: BaseException) -> dict:
    """The wire form of any exception: AVE ones keep their details, others their name."""
    if isinstance(exc, AveException):
        details = dict(exc.details)
    else:
        details = {'type': type(exc).__name__, 'message': str(exc)}
    if not details.get('trace'):
        details['trace'] = trace_of(exc)
    return details
