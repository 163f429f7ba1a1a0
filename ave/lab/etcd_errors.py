"""What can go wrong talking to etcd, as one exception family, and which failures a
call may retry.

Every message is one line that names the endpoint (or endpoints) and the operation,
because the lab's logs are read by people who have several etcd members and several
brokers in front of them. None of these travel over AVE's wire: the lab turns them into
what a client should see (``LabUnavailable`` and friends).
"""
from __future__ import annotations

import enum


class EtcdError(Exception):
    """Base of every etcd failure; also etcd's own refusals (bad request, too large)."""


class EtcdUnavailable(EtcdError):
    """No endpoint gave an answer within the call's timeout."""


class OutcomeUnknown(EtcdUnavailable):
    """A write reached an endpoint but no answer came back: it may or may not be applied.

    Only writes raise it (put, delete, a txn with a write); the caller decides whether
    to re-read, or to repeat a write that is safe to repeat.
    """


class BadResponse(EtcdError):
    """An endpoint answered with something that is not a response we accept."""


class LeaseGone(EtcdError):
    """The lease has expired or was revoked; keys attached to it are gone."""


class Compacted(EtcdError):
    """A watch asked for history that etcd has compacted away.

    ``compact_revision`` is the oldest revision still kept; the caller re-reads the
    keys it watches and starts a new watch from that read's revision + 1.
    """

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class Retry(enum.Enum):
    """What a failure allows the caller to do next."""
    ANY = 'not applied: any request may be sent again'
    READS = 'outcome unknown: reads may be sent again, writes may not'
    NEVER = 'a definite answer: sending it again changes nothing'


# etcd's own texts (rpctypes) for refusals made before a request reaches raft: nothing
# was applied, so even a write can go to another member.
_NOT_APPLIED = (
    'etcdserver: no leader',
    'etcdserver: too many requests',
    'etcdserver: not capable',
    'etcdserver: leader changed',
    'etcdserver: raft proposal dropped',
    'raft proposal dropped',
    'etcdserver: rpc not supported for learner',
)
# Refusals after a write may already be in raft's log: it can still be applied.
_UNKNOWN = (
    'etcdserver: request timed out',
    'etcdserver: server stopped',
    'etcdserver: request cancelled',
)
_GRPC_UNAVAILABLE = 14
_GRPC_DEADLINE_EXCEEDED = 4


def classify(code: int, message: str) -> Retry:
    """Whether an error etcd answered with leaves room to try again, and for what.

    ``code`` is the gRPC status code the gateway passes on; messages are matched
    first because etcd gives the same code to failures of both kinds.
    """
    if message.startswith(_NOT_APPLIED):
        return Retry.ANY
    if message.startswith(_UNKNOWN) or code in (_GRPC_UNAVAILABLE, _GRPC_DEADLINE_EXCEEDED):
        return Retry.READS
    return Retry.NEVER


def is_lease_gone(message: str) -> bool:
    return message.startswith('etcdserver: requested lease not found')


def is_compacted(message: str) -> bool:
    return message.startswith('etcdserver: mvcc: required revision has been compacted')


def clip(text: str, limit: int = 200) -> str:
    """Peer-controlled text made fit for a one-line message."""
    text = text.replace('\n', ' ').replace('\r', ' ')
    return text if len(text) <= limit else text[:limit] + '...'
