"""The lab's one door to etcd: a small synchronous client for the v3 API.

Everything the lab needs from etcd goes through ``Etcd`` and the names exported here,
so the way we talk to etcd can be replaced without touching the lab. Today it speaks
etcd's JSON gateway (``/v3/...`` over HTTP/1.1) with our own sans-IO HTTP codec: no
gRPC, no protobuf, no third-party package, and every wait bounded by a deadline.

Behaviour shared by every call:

- ``timeout`` (seconds) bounds the whole call, failover and retries included;
- endpoints are tried in turn on failure; reads retry until the timeout, writes whose
  outcome became unknown raise ``OutcomeUnknown`` (see ``etcd_transport``);
- keys and values are ``bytes`` or ``str`` (UTF-8); keys come back as ``str``;
- an answer larger than ``max_response`` bytes (default 64 MiB) is refused;
- errors are ``EtcdError`` and its subclasses, each with a one-line message naming
  the endpoint and the operation.

Usage::

    etcd = Etcd(['http://127.0.0.1:2379'], timeout=2)
    lease = etcd.lease_grant(10)
    result = etcd.txn([Compare.missing('lab/items/r1')],
                      [Op.put('lab/items/r1', 'job-7', lease=lease)],
                      [Op.get('lab/items/r1')])
    snapshot = etcd.get_prefix('lab/items/')
    with etcd.watch('lab/items/', snapshot.revision + 1) as watch:
        for event in watch.read(timeout=1.0): ...
"""
from __future__ import annotations

from typing import Any, Sequence

from ave.lab.etcd_errors import (BadResponse, Compacted, EtcdError, EtcdUnavailable,
                                 LeaseGone, OutcomeUnknown)
from ave.lab.etcd_messages import (Compare, KeyLike, KeyValue, Op, OpResult, Range,
                                   Status, TxnResult, WatchEvent, b64, decode_key,
                                   decode_range, decode_status, decode_txn, field_int,
                                   field_list,
                                   header_revision, prefix_end, to_bytes, to_key)
from ave.lab.etcd_transport import DEFAULT_MAX_RESPONSE, Endpoint, Transport
from ave.lab.etcd_watch import Watch

__all__ = ['Etcd', 'Compare', 'Op', 'KeyValue', 'Range', 'OpResult', 'TxnResult',
           'WatchEvent', 'Watch', 'Status', 'EtcdError', 'EtcdUnavailable',
           'OutcomeUnknown', 'BadResponse', 'LeaseGone', 'Compacted']

MAX_OPS = 128  # etcd's default --max-txn-ops


class Etcd:
    """A client of one etcd cluster, safe to share between threads."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 5.0, *,
                 max_response: int = DEFAULT_MAX_RESPONSE) -> None:
        self._transport = Transport(endpoints, timeout, max_response)

    @property
    def endpoints(self) -> list[str]:
        return [endpoint.url for endpoint in self._transport.endpoints]

    @property
    def timeout(self) -> float:
        return self._transport.timeout

    def close(self) -> None:
        """Close idle connections; open watches stay open until closed themselves."""
        self._transport.close()

    def __enter__(self) -> 'Etcd':
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- keys ----------------------------------------------------------------------------

    def get(self, key: KeyLike) -> KeyValue | None:
        """The key, or None when it does not exist."""
        found = self._transport.call(
            'get', '/v3/kv/range', {'key': b64(to_key(key))}, write=False,
            decode=lambda _, message: decode_range(message))
        return found.kvs[0] if found.kvs else None

    def get_prefix(self, prefix: KeyLike) -> Range:
        """Every key under ``prefix`` (all keys for ''), sorted, with the revision read."""
        raw = to_bytes(prefix)
        payload = {'key': b64(raw or b'\0'), 'range_end': b64(prefix_end(raw)),
                   'sort_order': 'ASCEND', 'sort_target': 'KEY'}
        return self._transport.call(
            'get_prefix', '/v3/kv/range', payload, write=False,
            decode=lambda _, message: decode_range(message))

    def put(self, key: KeyLike, value: KeyLike, lease: int | None = None) -> int:
        """Store ``value``; with ``lease``, the key goes when the lease does.
        Returns the revision of the change."""
        payload = {'key': b64(to_key(key)), 'value': b64(to_bytes(value))}
        if lease:
            payload['lease'] = str(lease)
        return self._transport.call(
            'put', '/v3/kv/put', payload, write=True,
            decode=lambda _, message: header_revision(message))

    def delete(self, key: KeyLike) -> bool:
        """Remove the key; False when there was none."""
        return self._transport.call(
            'delete', '/v3/kv/deleterange', {'key': b64(to_key(key))}, write=True,
            decode=lambda _, message: field_int(message, 'deleted') > 0)

    def delete_prefix(self, prefix: KeyLike) -> int:
        """Remove every key under ``prefix`` (refuses ''); returns how many went."""
        raw = to_bytes(prefix)
        if not raw:
            raise ValueError('refusing to delete every key: give a non-empty prefix')
        payload = {'key': b64(raw), 'range_end': b64(prefix_end(raw))}
        return self._transport.call(
            'delete_prefix', '/v3/kv/deleterange', payload, write=True,
            decode=lambda _, message: field_int(message, 'deleted'))

    def txn(self, compare: Sequence[Compare], success: Sequence[Op],
            failure: Sequence[Op] = ()) -> TxnResult:
        """If every compare holds, apply ``success``, else ``failure``: all at one
        revision, all or nothing. A key may be written only once per branch."""
        success, failure = tuple(success), tuple(failure)
        if max(len(compare), len(success), len(failure)) > MAX_OPS:
            raise ValueError(f'a txn takes at most {MAX_OPS} compares and ops per branch')
        payload = {'compare': [c.encode() for c in compare],
                   'success': [op.encode() for op in success],
                   'failure': [op.encode() for op in failure]}
        return self._transport.call(
            'txn', '/v3/kv/txn', payload, write=any(op.writes for op in success + failure),
            decode=lambda _, message: decode_txn(message, success, failure))

    # -- leases --------------------------------------------------------------------------

    def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; returns its id.

        Retried like a read: a grant whose answer was lost leaves an orphan lease that
        expires by itself.
        """
        if ttl < 1:
            raise ValueError('a lease lasts at least 1 second')
        lease = self._transport.call(
            'lease_grant', '/v3/lease/grant', {'TTL': str(ttl)}, write=False,
            decode=lambda _, message: field_int(message, 'ID'))
        if lease <= 0:
            raise BadResponse(f'lease_grant: etcd returned lease id {lease}')
        return lease

    def lease_keepalive(self, lease: int) -> int:
        """Renew the lease; returns its TTL, or raises ``LeaseGone``."""
        ttl = self._transport.call(
            f'lease_keepalive {lease:x}', '/v3/lease/keepalive', {'ID': str(lease)},
            write=False, stream_reply=True,
            decode=lambda _, message: field_int(message, 'TTL'))
        if ttl <= 0:
            raise LeaseGone(f'lease_keepalive: lease {lease:x} has expired or was revoked')
        return ttl

    def lease_revoke(self, lease: int) -> bool:
        """End the lease now, deleting its keys; False when etcd no longer had it
        (expired, or revoked by an earlier try of this same call)."""
        try:
            self._transport.call(
                f'lease_revoke {lease:x}', '/v3/lease/revoke', {'ID': str(lease)},
                write=False, decode=lambda _, message: None)
        except LeaseGone:
            return False
        return True

    def lease_ttl(self, lease: int) -> int:
        """Seconds the lease has left; raises ``LeaseGone`` when it has none."""
        ttl = self._transport.call(
            f'lease_ttl {lease:x}', '/v3/lease/timetolive', {'ID': str(lease)},
            write=False, decode=lambda _, message: field_int(message, 'TTL'))
        if ttl < 0:
            raise LeaseGone(f'lease_ttl: lease {lease:x} has expired or was revoked')
        return ttl

    def lease_keys(self, lease: int) -> list[str]:
        """The keys attached to the lease; raises ``LeaseGone`` when it has expired."""
        def decode(_: Endpoint, message: dict[str, Any]) -> list[str] | None:
            if field_int(message, 'TTL') < 0:
                return None
            return [decode_key(item) for item in field_list(message, 'keys')]
        keys = self._transport.call(
            f'lease_keys {lease:x}', '/v3/lease/timetolive',
            {'ID': str(lease), 'keys': True}, write=False, decode=decode)
        if keys is None:
            raise LeaseGone(f'lease_keys: lease {lease:x} has expired or was revoked')
        return keys

    # -- watching and health -------------------------------------------------------------

    def watch(self, prefix: KeyLike, start_revision: int | None = None, *,
              idle_check: float = 5.0) -> Watch:
        """Every change under ``prefix`` from ``start_revision`` on (None: from now).

        Returns once etcd has confirmed the watch. ``idle_check`` is how long the watch
        may hear nothing before it asks its member whether it is still there.
        """
        return Watch(self._transport, to_bytes(prefix), start_revision, idle_check)

    def status(self, endpoint: str | None = None) -> Status:
        """The status of ``endpoint`` (one of ours), or of the first one that answers."""
        only = None
        if endpoint is not None:
            wanted = endpoint.rstrip('/')
            only = next((e for e in self._transport.endpoints if e.url == wanted), None)
            if only is None:
                raise ValueError(f'{endpoint!r} is not one of this client\'s endpoints')
        return self._transport.call(
            'status', '/v3/maintenance/status', {}, write=False, only=only,
            decode=lambda e, message: decode_status(e.url, message))

    def compact(self, revision: int) -> None:
        """Drop the history before ``revision`` (housekeeping, tests); a history
        compacted that far already is left as it is."""
        try:
            self._transport.call(
                'compact', '/v3/kv/compaction', {'revision': str(revision), 'physical': True},
                write=False, decode=lambda _, message: None)
        except Compacted:
            pass
