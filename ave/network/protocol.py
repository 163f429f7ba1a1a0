"""AVE's RPC protocol without any I/O: what the frames of a conversation contain.

Both ends use this module: ``Control`` (the server loop) and ``RemoteControl`` (the
client). Bytes and values go in, bytes and values come out; sockets, buffers and
timing live in the callers, so every rule here is tested without a socket.

A conversation, as DESIGN.md describes it:

1. The server sends ``#CHALLENGE#`` followed by 32 random bytes (``challenge()``).
2. The client answers the raw HMAC-SHA256 of those bytes keyed with its authkey
   (``digest()``). The server checks it against each key it knows
   (``authenticate()``) and answers ``{"authenticated": bool}`` (``verdict()``).
   A wrong key still connects, without rights.
3. Requests (``encode_request()`` / ``parse_request()``) and replies
   (``encode_result()``, ``encode_exception()`` / ``decode_reply()``) follow, one
   reply per request unless the request was one-way (``async``).

A server that refuses a client outright (too many connections, say) sends an
exception frame instead of the challenge; ``parse_challenge()`` raises it.

Cost contract: the server parses what an anonymous peer sends, so parsing is bounded
by the frame size the caller already enforced; JSON too deeply nested for the
decoder is a malformed request, never an error that escapes.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any, Mapping

from ave.exceptions import AuthError, AveException, details_of, exception_factory

CHALLENGE_PREFIX = b'#CHALLENGE#'
NONCE_SIZE = 32
DIGEST_SIZE = hashlib.sha256().digest_size
#: The largest frame a peer may send before it has authenticated: the digest. A few
#: bytes of slack keep the limit from being the thing a confused client trips on.
HANDSHAKE_FRAME_LIMIT = 64

NO_ACCOUNTS: frozenset[str] = frozenset()  # shared: thousands of peers hold no account


class MalformedRequest(AveException):
    """A request frame is not a request; the message names the defect.

    ``is_async``: the frame, however broken, asked for no answer, or is an answer
    itself (the exception frame a peer writes as it shuts down, ``Exit``); it gets
    none, so two ends can never answer each other's answers.
    """

    def __init__(self, message: str, is_async: bool = False) -> None:
        super().__init__(message)
        self.is_async = is_async


@dataclass(frozen=True)
class Credentials:
    """What a handshake proved: the primary key, some accounts' keys, or nothing."""

    primary: bool = False
    accounts: frozenset[str] = NO_ACCOUNTS
    authkey: str | None = None

    @property
    def authenticated(self) -> bool:
        return self.primary or bool(self.accounts)


ANONYMOUS = Credentials()


#: A checked request: method, resource (None: the service itself), vargs, kwargs, and
#: whether it is one-way. A plain tuple: one is made per call, so it is made cheaply.
Request = tuple[str, 'dict | None', list, dict, bool]


# -- the handshake ----------------------------------------------------------------------

def challenge() -> tuple[bytes, bytes]:
    """A fresh nonce and the frame that carries it to the client."""
    nonce = secrets.token_bytes(NONCE_SIZE)
    return nonce, CHALLENGE_PREFIX + nonce


def parse_challenge(frame: bytes) -> bytes:
    """The nonce of a challenge frame; a refusal frame is raised as its exception."""
    if frame.startswith(CHALLENGE_PREFIX) and len(frame) == len(CHALLENGE_PREFIX) + NONCE_SIZE:
        return frame[len(CHALLENGE_PREFIX):]
    refusal = _exception_in(frame)
    if refusal is not None:
        raise refusal
    raise AuthError('the server did not send a valid challenge')


def digest(key: str | None, nonce: bytes) -> bytes:
    """The client's answer to a challenge: HMAC-SHA256 of the nonce (no key: empty)."""
    return hmac.new((key or '').encode('utf-8'), nonce, hashlib.sha256).digest()


def authenticate(nonce: bytes, answer: bytes, primary_key: str | None,
                 alt_keys: Mapping[str, str | None]) -> Credentials:
    """Which keys ``answer`` proves, compared in constant time against each of them.

    Every key is checked, whatever matched before, so the time taken says nothing
    about which key matched. Accounts without a key are never matched.
    """
    primary = hmac.compare_digest(digest(primary_key, nonce), answer)
    accounts = frozenset(name for name, key in alt_keys.items()
                         if key and hmac.compare_digest(digest(key, nonce), answer))
    if primary:
        return Credentials(True, accounts or NO_ACCOUNTS, primary_key)
    if accounts:
        return Credentials(False, accounts, alt_keys[min(accounts)])
    return ANONYMOUS


def credentials_of(authkey: str | None, primary_key: str | None,
                   alt_keys: Mapping[str, str | None]) -> Credentials:
    """The rights a key would earn in a handshake, for connections a service makes
    itself (a broker's link to its session)."""
    primary = authkey is not None and authkey == primary_key
    accounts = frozenset(name for name, key in alt_keys.items() if key and key == authkey)
    return Credentials(primary, accounts or NO_ACCOUNTS, authkey)


def verdict(credentials: Credentials) -> str:
    return json.dumps({'authenticated': credentials.authenticated})


def parse_verdict(frame: bytes) -> bool:
    try:
        return json.loads(frame).get('authenticated') is True
    except (ValueError, AttributeError, RecursionError):
        raise AuthError('the server sent a malformed handshake verdict') from None


# -- requests ---------------------------------------------------------------------------

def encode_request(method: str, resource: dict | None, vargs: list | tuple,
                   kwargs: dict, is_async: bool = False) -> str:
    """The one way a request frame is built, by clients and by ``Control.notify``."""
    return json.dumps({'method': method, 'resource': resource,
                       'params': {'vargs': vargs, 'kwargs': kwargs},  # a tuple is a list
                       'async': is_async})


def parse_request(payload: bytes) -> Request:
    """Decode and check a request frame; every defect is named in the error."""
    try:
        request = json.loads(payload.decode())  # UTF-8: no sniffing of encodings
    except (ValueError, RecursionError) as error:
        raise MalformedRequest(f'malformed request: {error}') from None
    if type(request) is not dict:
        raise MalformedRequest('malformed request: expected a JSON object')
    params = request.get('params')
    if type(params) is dict:
        method, vargs, kwargs = request.get('method'), params.get('vargs', []), \
            params.get('kwargs', {})
        resource, is_async = request.get('resource'), request.get('async', False)
        if (type(method) is str and method and type(vargs) is list
                and type(kwargs) is dict and (resource is None or type(resource) is dict)
                and (is_async is False or is_async is True)):
            return method, resource, vargs, kwargs, is_async
    is_answer = 'exception' in request and 'method' not in request
    raise MalformedRequest(f'malformed request: {_defect(request)}',
                           request.get('async') is True or is_answer)


def _defect(request: dict) -> str:
    """What is wrong with a request that failed the check in ``parse_request``."""
    params = request.get('params')
    if not isinstance(request.get('method'), str) or not request.get('method'):
        return '"method" must be a non-empty string'
    if 'params' not in request:
        return '"params" is missing'
    if not isinstance(params, dict):
        return '"params" must be an object'
    if not isinstance(params.get('vargs', []), list):
        return '"params.vargs" must be a list'
    if not isinstance(params.get('kwargs', {}), dict):
        return '"params.kwargs" must be an object'
    if not isinstance(request.get('resource'), (dict, type(None))):
        return '"resource" must be an object or null'
    return '"async" must be true or false'


# -- replies ----------------------------------------------------------------------------

def encode_result(result: Any) -> str:
    """A result reply; a value JSON cannot carry becomes an exception reply instead."""
    try:
        return json.dumps({'result': result})
    except (TypeError, ValueError, RecursionError) as error:
        return encode_exception(AveException(f'result cannot be sent: {error}'))


def encode_exception(error: BaseException) -> str:
    return json.dumps({'exception': details_of(error)}, default=repr)


def decode_reply(payload: bytes) -> Any:
    """The result a reply carries; an exception reply is raised, typed."""
    try:
        reply = json.loads(payload.decode())
    except (ValueError, RecursionError) as error:
        raise AveException(f'malformed reply: {error}') from None
    if type(reply) is not dict:
        raise AveException('malformed reply: expected a JSON object')
    if 'exception' in reply:
        raise exception_factory(reply['exception'])
    return reply.get('result')


def _exception_in(frame: bytes) -> AveException | None:
    try:
        reply = json.loads(frame)
    except (ValueError, RecursionError):
        return None
    if isinstance(reply, dict) and isinstance(reply.get('exception'), dict):
        return exception_factory(reply['exception'])
    return None
