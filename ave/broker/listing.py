"""What people are told about equipment: listings, and why a request is Busy.

Pure functions over the allocator's table. Holders are the broker's ids; ``Who``
turns one into the identity its client announced (user, host, pid, program, job),
so every listing and message names people, not numbers.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from ave.broker.allocator import Allocator, Blocker, Holder, Key

#: Turns a holder id into the identity of its client ({} if it has gone).
Who = Callable[[Holder], dict]

#: How many blocked items a Busy message describes before it only counts the rest.
BLOCKERS_SHOWN = 5


def allocations(allocator: Allocator, who: Who) -> list[dict]:
    """The public ``who()``: every held item with its holder and since when."""
    return [{'profile': dict(item.profile), 'holder': who(item.holder),
             'since': item.since}
            for item in allocator.items.values() if item.holder is not None]


def equipment(allocator: Allocator, who: Who) -> list[dict]:
    """The public ``equipment()``: every item but per-client creations (workspaces),
    with its state and, when held, holder and since when."""
    rows = []
    for key, item in allocator.items.items():
        if allocator.types[key[0]].on_demand:
            continue
        holder = item.holder if item.holder is not None else item.reserved_for
        rows.append({'profile': dict(item.profile), 'state': item.state,
                     'holder': None if holder is None else who(holder),
                     'since': item.since if item.holder is not None else None})
    return rows


def busy_message(request: object, blockers: Iterable[Blocker], who: Who,
                 now: float | None = None) -> str:
    """One line: what was asked, and who holds (reserved, is resetting) what it needs."""
    found = list(blockers)
    reasons = [_reason(blocker, who, time.time() if now is None else now)
               for blocker in found[:BLOCKERS_SHOWN]]
    if len(found) > BLOCKERS_SHOWN:
        reasons.append(f'and {len(found) - BLOCKERS_SHOWN} more')
    what = '; '.join(reasons) or 'nothing free matches it'
    return f'equipment is busy: {_clipped(request)}: {what}'


def _reason(blocker: Blocker, who: Who, now: float) -> str:
    item = _name(blocker.key)
    holder = describe_holder(who(blocker.holder)) if blocker.holder is not None else ''
    if blocker.reason == 'held':
        return f'{item} held by {holder}{_since(blocker.since, now)}'
    if blocker.reason == 'releasing':
        return f'{item} is being reset after its last use'
    if blocker.reason == 'absent':
        return f'{item} is unplugged'
    if blocker.reason == 'reserved':
        return f'{item} is reserved for {holder}, first in the queue'
    if blocker.reason == 'collateral':
        via = _name(blocker.via) if blocker.via is not None else 'a stack member'
        return f'{item} is in a stack with {via}, which {holder} has'
    via = f' (through {_name(blocker.via)})' if blocker.via is not None else ''
    return f'{item} is waited for by {holder}, ahead in the queue{via}'


def describe_holder(identity: dict) -> str:
    """An identity as people read it: ``user@host (job ...)``."""
    if not identity:
        return 'a client that has gone'
    who = identity.get('user') or '?'
    where = identity.get('host')
    text = f'{who}@{where}' if where else str(who)
    if identity.get('pid'):
        text += f' pid {identity["pid"]}'
    if identity.get('job'):
        text += f' job {identity["job"]}'
    return text[:300]


def _since(since: float | None, now: float) -> str:
    if since is None:
        return ''
    started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))
    return f' since {started} ({_duration(max(0.0, now - since))})'


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f'{seconds:.0f} s'
    if seconds < 7200:
        return f'{seconds / 60:.0f} min'
    return f'{seconds / 3600:.1f} h'


def _name(key: Key) -> str:
    return f'{key[0]} {key[1]}'


def _clipped(request: object) -> str:
    text = repr(request)
    return text if len(text) <= 200 else text[:200] + '...'
