"""etcd's v3 messages as the JSON gateway spells them, built and checked without I/O.

The gateway speaks protobuf's JSON mapping: bytes are base64, 64-bit integers are
decimal strings, and fields at their zero value are left out (a key with no lease has
no ``lease``; a txn that failed has no ``succeeded``). Decoding is strict about types
because the server may be broken: anything unexpected raises ``MessageError``, which
the client reports as a ``BadResponse`` naming the endpoint.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Iterator

KeyLike = bytes | str

_COMPARE_TARGETS = {'version': 'VERSION', 'create_revision': 'CREATE',
                    'mod_revision': 'MOD', 'value': 'VALUE', 'lease': 'LEASE'}
_COMPARE_RESULTS = {'==': 'EQUAL', '!=': 'NOT_EQUAL', '<': 'LESS', '>': 'GREATER'}
_INT64 = 2 ** 63


class MessageError(ValueError):
    """A message from the server does not have the shape etcd gives it."""


def to_bytes(data: KeyLike) -> bytes:
    """Keys and values given as str are UTF-8 (lone surrogates from a key we handed
    out as str go back to the bytes they came from)."""
    if isinstance(data, str):
        return data.encode('utf-8', 'surrogateescape')
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f'expected bytes or str, not {type(data).__name__}')


def to_key(data: KeyLike) -> bytes:
    key = to_bytes(data)
    if not key:
        raise ValueError('an etcd key may not be empty')
    return key


def prefix_end(prefix: bytes) -> bytes:
    """The range end that makes [prefix, end) every key starting with ``prefix``."""
    trimmed = prefix.rstrip(b'\xff')
    if not trimmed:
        return b'\0'  # etcd's "every key from here on"
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode('ascii')


@dataclass(frozen=True)
class KeyValue:
    """A key as etcd stores it. ``key`` is text (UTF-8; undecodable bytes survive as
    surrogates), ``value`` the raw bytes; ``lease`` is 0 for a key without one."""
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @property
    def text(self) -> str:
        """The value as UTF-8 text."""
        return self.value.decode('utf-8')


@dataclass(frozen=True)
class Range:
    """Keys read at one revision, sorted by key; watch from ``revision + 1`` to follow."""
    kvs: tuple[KeyValue, ...]
    revision: int

    def __iter__(self) -> Iterator[KeyValue]:
        return iter(self.kvs)

    def __len__(self) -> int:
        return len(self.kvs)


@dataclass(frozen=True)
class Compare:
    """One condition of a txn: ``<target of key> <result> <operand>``.

    Build them with the static methods; ``Compare.missing(key)`` is the usual "nobody
    holds it yet", ``Compare.mod_revision(key, rev)`` the usual "unchanged since I read
    it". ``result`` is one of ``== != < >``.
    """
    key: bytes
    target: str
    result: str
    operand: bytes | int

    def __post_init__(self) -> None:
        if self.target not in _COMPARE_TARGETS:
            raise ValueError(f'unknown compare target {self.target!r}')
        if self.result not in _COMPARE_RESULTS:
            raise ValueError(f'unknown compare result {self.result!r}')
        if (self.target == 'value') != isinstance(self.operand, bytes):
            raise ValueError(f'a {self.target} compare needs a '
                             f'{"bytes/str" if self.target == "value" else "int"} operand')

    @staticmethod
    def value(key: KeyLike, value: KeyLike, result: str = '==') -> 'Compare':
        return Compare(to_key(key), 'value', result, to_bytes(value))

    @staticmethod
    def version(key: KeyLike, version: int, result: str = '==') -> 'Compare':
        return Compare(to_key(key), 'version', result, version)

    @staticmethod
    def create_revision(key: KeyLike, revision: int, result: str = '==') -> 'Compare':
        return Compare(to_key(key), 'create_revision', result, revision)

    @staticmethod
    def mod_revision(key: KeyLike, revision: int, result: str = '==') -> 'Compare':
        return Compare(to_key(key), 'mod_revision', result, revision)

    @staticmethod
    def lease(key: KeyLike, lease: int, result: str = '==') -> 'Compare':
        """The key is attached to ``lease`` (0: to none; a missing key has lease 0)."""
        return Compare(to_key(key), 'lease', result, lease)

    @staticmethod
    def missing(key: KeyLike) -> 'Compare':
        return Compare(to_key(key), 'create_revision', '==', 0)

    @staticmethod
    def exists(key: KeyLike) -> 'Compare':
        return Compare(to_key(key), 'create_revision', '>', 0)

    def encode(self) -> dict[str, Any]:
        message: dict[str, Any] = {'key': b64(self.key),
                                   'target': _COMPARE_TARGETS[self.target],
                                   'result': _COMPARE_RESULTS[self.result]}
        operand = self.operand
        message[self.target] = b64(operand) if isinstance(operand, bytes) else str(operand)
        return message


@dataclass(frozen=True)
class Op:
    """One request inside a txn; build them with the static methods."""
    kind: str                    # get, get_prefix, put, delete, delete_prefix
    key: bytes
    value: bytes = b''
    lease: int = 0

    @staticmethod
    def get(key: KeyLike) -> 'Op':
        return Op('get', to_key(key))

    @staticmethod
    def get_prefix(prefix: KeyLike) -> 'Op':
        return Op('get_prefix', to_bytes(prefix))

    @staticmethod
    def put(key: KeyLike, value: KeyLike, lease: int | None = None) -> 'Op':
        return Op('put', to_key(key), to_bytes(value), lease or 0)

    @staticmethod
    def delete(key: KeyLike) -> 'Op':
        return Op('delete', to_key(key))

    @staticmethod
    def delete_prefix(prefix: KeyLike) -> 'Op':
        return Op('delete_prefix', to_bytes(prefix))

    @property
    def writes(self) -> bool:
        return self.kind not in ('get', 'get_prefix')

    def encode(self) -> dict[str, Any]:
        """The request as a txn branch entry (``{"request_put": {...}}`` and so on)."""
        body: dict[str, Any] = {'key': b64(self.key)}
        if self.kind in ('get_prefix', 'delete_prefix'):
            body['range_end'] = b64(prefix_end(self.key))
        if self.kind == 'put':
            body['value'] = b64(self.value)
            if self.lease:
                body['lease'] = str(self.lease)
            return {'request_put': body}
        if self.kind in ('get', 'get_prefix'):
            return {'request_range': body}
        return {'request_delete_range': body}


@dataclass(frozen=True)
class OpResult:
    """What one op of the branch taken returned: ``kvs`` for a get, ``deleted`` (count)
    for a delete, nothing for a put."""
    kind: str
    kvs: tuple[KeyValue, ...] = ()
    deleted: int = 0


@dataclass(frozen=True)
class TxnResult:
    """Whether every compare held, the results of the branch taken (in op order), and
    the store's revision after the txn."""
    succeeded: bool
    responses: tuple[OpResult, ...]
    revision: int


@dataclass(frozen=True)
class WatchEvent:
    """One change: ``type`` is ``put`` or ``delete``; a delete's ``kv`` has the key and
    the revision of the delete, nothing else."""
    type: str
    kv: KeyValue


@dataclass(frozen=True)
class WatchMessage:
    """One message of a watch stream, decoded."""
    revision: int                       # the header's revision
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ''
    events: tuple[WatchEvent, ...] = ()


@dataclass(frozen=True)
class Status:
    """One member's view: who it is, who it thinks leads, how far it has applied."""
    endpoint: str
    member_id: int
    leader: int
    raft_term: int
    revision: int
    version: str
    db_size: int

    @property
    def is_leader(self) -> bool:
        return self.leader != 0 and self.leader == self.member_id


# -- decoding: every accessor checks the type it reads ---------------------------------

def field_int(message: dict[str, Any], name: str, unsigned: bool = False) -> int:
    """An int64 (or, ``unsigned``, a uint64 such as a member id) field."""
    raw = message.get(name, 0)
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise MessageError(f'field {name!r} is not an integer')
    try:
        value = int(raw)
    except ValueError:
        raise MessageError(f'field {name!r} is not an integer') from None
    if not (0 <= value < 2 * _INT64 if unsigned else -_INT64 <= value < _INT64):
        raise MessageError(f'field {name!r} is out of range')
    return value


def field_bytes(message: dict[str, Any], name: str) -> bytes:
    raw = message.get(name, '')
    if not isinstance(raw, str):
        raise MessageError(f'field {name!r} is not base64 text')
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise MessageError(f'field {name!r} is not valid base64') from None


def field_bool(message: dict[str, Any], name: str) -> bool:
    raw = message.get(name, False)
    if not isinstance(raw, bool):
        raise MessageError(f'field {name!r} is not a boolean')
    return raw


def field_object(message: dict[str, Any], name: str) -> dict[str, Any]:
    raw = message.get(name, {})
    if not isinstance(raw, dict):
        raise MessageError(f'field {name!r} is not an object')
    return raw


def field_list(message: dict[str, Any], name: str) -> list[Any]:
    raw = message.get(name, [])
    if not isinstance(raw, list):
        raise MessageError(f'field {name!r} is not a list')
    return raw


def field_str(message: dict[str, Any], name: str) -> str:
    raw = message.get(name, '')
    if not isinstance(raw, str):
        raise MessageError(f'field {name!r} is not text')
    return raw


def header_revision(message: dict[str, Any]) -> int:
    return field_int(field_object(message, 'header'), 'revision')


def decode_key(raw: Any) -> str:
    """A base64 key as the text ``KeyValue.key`` holds."""
    return field_bytes({'key': raw}, 'key').decode('utf-8', 'surrogateescape')


def decode_kv(message: Any) -> KeyValue:
    if not isinstance(message, dict):
        raise MessageError('a key-value is not an object')
    return KeyValue(
        key=decode_key(message.get('key', '')),
        value=field_bytes(message, 'value'),
        create_revision=field_int(message, 'create_revision'),
        mod_revision=field_int(message, 'mod_revision'),
        version=field_int(message, 'version'),
        lease=field_int(message, 'lease'))


def decode_kvs(message: dict[str, Any]) -> tuple[KeyValue, ...]:
    return tuple(decode_kv(item) for item in field_list(message, 'kvs'))


def decode_range(message: dict[str, Any]) -> Range:
    return Range(decode_kvs(message), header_revision(message))


_TXN_RESPONSE_FIELDS = {'get': 'response_range', 'get_prefix': 'response_range',
                        'put': 'response_put', 'delete': 'response_delete_range',
                        'delete_prefix': 'response_delete_range'}


def decode_txn(message: dict[str, Any], success: tuple[Op, ...],
               failure: tuple[Op, ...]) -> TxnResult:
    """A txn response, checked against the ops of the branch it says it took."""
    succeeded = field_bool(message, 'succeeded')
    ops = success if succeeded else failure
    items = field_list(message, 'responses')
    if len(items) != len(ops):
        raise MessageError(f'{len(items)} txn responses for {len(ops)} ops')
    results = []
    for op, item in zip(ops, items):
        if not isinstance(item, dict):
            raise MessageError('a txn response is not an object')
        body = field_object(item, _TXN_RESPONSE_FIELDS[op.kind])
        if op.kind in ('get', 'get_prefix'):
            results.append(OpResult(op.kind, kvs=decode_kvs(body)))
        elif op.kind == 'put':
            results.append(OpResult(op.kind))
        else:
            results.append(OpResult(op.kind, deleted=field_int(body, 'deleted')))
    return TxnResult(succeeded, tuple(results), header_revision(message))


def decode_event(message: Any) -> WatchEvent:
    if not isinstance(message, dict):
        raise MessageError('a watch event is not an object')
    kind = message.get('type', 'PUT')
    if kind not in ('PUT', 'DELETE'):
        raise MessageError('a watch event has an unknown type')
    return WatchEvent(kind.lower(), decode_kv(field_object(message, 'kv')))


def decode_watch(message: dict[str, Any]) -> WatchMessage:
    """One line of a watch stream, its ``result`` already unwrapped."""
    return WatchMessage(
        revision=header_revision(message),
        created=field_bool(message, 'created'),
        canceled=field_bool(message, 'canceled'),
        compact_revision=field_int(message, 'compact_revision'),
        cancel_reason=field_str(message, 'cancel_reason'),
        events=tuple(decode_event(item) for item in field_list(message, 'events')))


def decode_status(endpoint: str, message: dict[str, Any]) -> Status:
    return Status(endpoint=endpoint,
                  member_id=field_int(field_object(message, 'header'), 'member_id', True),
                  leader=field_int(message, 'leader', True),
                  raft_term=field_int(message, 'raftTerm', True),
                  revision=header_revision(message),
                  version=field_str(message, 'version'),
                  db_size=field_int(message, 'dbSize'))
