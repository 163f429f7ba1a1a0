"""The HTTP process's side of the feed: a snapshot is checked once, when it arrives.

The broker is trusted, but a snapshot carries text that clients declared about
themselves (the holder's user, program and job) and the broker may one day send a
newer schema to an HTTP process still running older code (across ``--restart``). So
every field the pages and metrics use is checked for its type here, texts are cut to
a few hundred characters, lists are capped, and unknown keys are ignored. What
passes can be rendered without further checks; what fails is refused whole with one
line naming the field, and the previous snapshot stays in service.

The schema is described in ``ave.broker.http.feed``.
"""
from __future__ import annotations

import math
from typing import Any

from ave.broker.http.feed import HOLDER_KEYS, SCHEMA_VERSION, STATES

MAX_TEXT = 256
MAX_EQUIPMENT = 20000
MAX_QUEUE = 10000
MAX_PROFILES = 64
MAX_METHODS = 256
MAX_BUCKETS = 64
MAX_TYPES = 256


class SnapshotError(ValueError):
    """A snapshot field has the wrong type or size; the message names the field."""


def check_snapshot(value: Any) -> dict:
    """A checked copy of ``value`` with exactly the fields of schema version 1."""
    snapshot = _mapping(value, 'snapshot')
    version = snapshot.get('version', SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise SnapshotError(f'snapshot: version {version!r} is not {SCHEMA_VERSION}')
    return {
        'version': SCHEMA_VERSION,
        'time': _number(snapshot.get('time'), 'time'),
        'lab': _text_or_none(snapshot.get('lab'), 'lab'),
        'host': _text(snapshot.get('host'), 'host'),
        'on_demand_types': [_text(name, 'on_demand_types[]') for name in _list(
            snapshot.get('on_demand_types', ['workspace']), 'on_demand_types', MAX_TYPES)],
        'equipment': [_equipment(entry, f'equipment[{index}]') for index, entry in
                      enumerate(_list(snapshot.get('equipment'), 'equipment', MAX_EQUIPMENT))],
        'queue': [_queue_entry(entry, f'queue[{index}]') for index, entry in
                  enumerate(_list(snapshot.get('queue', []), 'queue', MAX_QUEUE))],
        'sessions': _count(snapshot.get('sessions', 0), 'sessions'),
        'allocations_total': _count(snapshot.get('allocations_total', 0), 'allocations_total'),
        'restarts_total': _count(snapshot.get('restarts_total', 0), 'restarts_total'),
        'rpc_seconds': _histograms(snapshot.get('rpc_seconds', {}), 'rpc_seconds'),
        'queue_wait_seconds': _histogram(snapshot.get('queue_wait_seconds', _EMPTY),
                                         'queue_wait_seconds'),
    }


_EMPTY = {'buckets': [], 'sum': 0.0, 'count': 0}


def _equipment(value: Any, where: str) -> dict:
    entry = _mapping(value, where)
    profile = _mapping(entry.get('profile'), f'{where}.profile')
    state = entry.get('state')
    if state not in STATES:
        raise SnapshotError(f'{where}.state: {str(state)[:40]!r} is not one of {STATES}')
    since = entry.get('since')
    return {
        'type': _text(entry.get('type', profile.get('type')), f'{where}.type'),
        'identity': _text(entry.get('identity', ''), f'{where}.identity'),
        'profile': profile,
        'host': _text(entry.get('host', ''), f'{where}.host'),
        'state': state,
        'holder': _holder(entry.get('holder'), f'{where}.holder'),
        'since': None if since is None else _number(since, f'{where}.since'),
    }


def _queue_entry(value: Any, where: str) -> dict:
    entry = _mapping(value, where)
    return {
        'position': _count(entry.get('position', 0), f'{where}.position'),
        'holder': _holder(entry.get('holder'), f'{where}.holder'),
        'profiles': _list(entry.get('profiles', []), f'{where}.profiles', MAX_PROFILES),
        'priority': _integer(entry.get('priority', 0), f'{where}.priority'),
        'waited_s': _number(entry.get('waited_s', 0.0), f'{where}.waited_s'),
    }


def _holder(value: Any, where: str) -> dict | None:
    """The announced identity: only its five keys, each a short text or a number."""
    if value is None:
        return None
    holder = _mapping(value, where)
    checked: dict[str, str | int | None] = {}
    for key in HOLDER_KEYS:
        item = holder.get(key)
        if item is None or (isinstance(item, int) and not isinstance(item, bool)):
            checked[key] = item
        else:
            checked[key] = _text(item, f'{where}.{key}')
    return checked


def _histograms(value: Any, where: str) -> dict:
    histograms = _mapping(value, where)
    if len(histograms) > MAX_METHODS:
        raise SnapshotError(f'{where}: more than {MAX_METHODS} methods')
    return {_text(name, f'{where} key'): _histogram(histogram, f'{where}.{name}'[:80])
            for name, histogram in histograms.items()}


def _histogram(value: Any, where: str) -> dict:
    histogram = _mapping(value, where)
    buckets = []
    previous_bound = -math.inf
    previous_count = 0
    for pair in _list(histogram.get('buckets'), f'{where}.buckets', MAX_BUCKETS):
        if not isinstance(pair, list) or len(pair) != 2:
            raise SnapshotError(f'{where}.buckets: each bucket is [bound, count]')
        bound = _number(pair[0], f'{where}.buckets bound')
        count = _count(pair[1], f'{where}.buckets count')
        if bound <= previous_bound or count < previous_count:
            raise SnapshotError(f'{where}.buckets: bounds must ascend, counts not decrease')
        buckets.append([bound, count])
        previous_bound, previous_count = bound, count
    count = _count(histogram.get('count'), f'{where}.count')
    if count < previous_count:
        raise SnapshotError(f'{where}.count: smaller than its last bucket')
    return {'buckets': buckets, 'sum': _number(histogram.get('sum'), f'{where}.sum'),
            'count': count}


# -- leaves ---------------------------------------------------------------------------

def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise SnapshotError(f'{where}: expected an object, got {type(value).__name__}')
    return value


def _list(value: Any, where: str, limit: int) -> list:
    if not isinstance(value, list):
        raise SnapshotError(f'{where}: expected a list, got {type(value).__name__}')
    if len(value) > limit:
        raise SnapshotError(f'{where}: more than {limit} entries')
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise SnapshotError(f'{where}: expected a string, got {type(value).__name__}')
    return value[:MAX_TEXT]


def _text_or_none(value: Any, where: str) -> str | None:
    return None if value is None else _text(value, where)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SnapshotError(f'{where}: expected a number, got {type(value).__name__}')
    if not math.isfinite(value):
        raise SnapshotError(f'{where}: expected a finite number')
    return float(value)


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SnapshotError(f'{where}: expected an integer, got {type(value).__name__}')
    return value


def _count(value: Any, where: str) -> int:
    number = _integer(value, where)
    if number < 0:
        raise SnapshotError(f'{where}: must not be negative')
    return number
