"""Why nothing matches a request: the hint that goes with ``NoSuch``.

A request profile matches an item when every key of the request is in the item's
profile with an equal value. When nothing matches, the user has usually made one
small mistake (a misspelt key, a wrong identity, a string where the lab has a
number), and "no such equipment" alone sends them reading broker.json. ``hint``
compares the request with the profiles the broker knows and names the first
mistake it can pin down::

    no relay has key 'uidd' (did you mean 'uid'?)
    no relay has uid 'r9' (known: r1, r2)

Pure logic without I/O. The request comes from a client, so everything of it that
appears in a hint is cut short, and so are the lists of known keys and values: a
hint stays one line of a few hundred characters whatever the request or the lab.
The cost is linear in the size of the known profiles times the keys of the
request; close matches are only looked for to words of up to MATCH_LIMIT
characters, because comparing two words costs the square of their length.
"""
from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from typing import Any

#: How many known keys, values or types a hint lists before it says how many more.
SHOWN = 8
#: How many characters of one key or value a hint shows.
CLIP = 40
#: The longest word a hint looks for a close match to.
MATCH_LIMIT = 100

_MISSING = object()


def hint(request: Mapping[str, Any], known: Iterable[Mapping[str, Any]],
         identities: Mapping[str, str] | None = None) -> str:
    """The first reason ``request`` matches none of ``known``, or '' if one matches.

    ``known`` are the full profiles of the equipment the broker knows (any state);
    ``identities`` maps each installed type to its identity key (``{'relay': 'uid'}``),
    which names the nearest item when each key matches some item but no item
    matches them all. A type that is installed but has no known profiles (a type
    created on demand, such as workspaces, is never listed) gets a plain "the
    broker lists no ...".
    """
    identities = identities or {}
    known = list(known)
    kind = request.get('type')
    candidates = [profile for profile in known if profile.get('type') == kind]
    if not candidates:
        if kind in identities:
            return f'the broker lists no {_clip(kind)}'
        return _unknown_type(kind, known, identities)
    wanted = [(key, value) for key, value in request.items() if key != 'type']
    name = _clip(kind)
    for key, value in wanted:
        if not any(key in profile for profile in candidates):
            keys = sorted({k for profile in candidates for k in profile} - {'type'})
            return f'no {name} has key {_quoted(key)} ({_nearest(key, keys)})'
    for key, value in wanted:
        values = _distinct(profile[key] for profile in candidates if key in profile)
        if value not in values:
            return f'no {name} has {_clip(key)} {_shown(value)} ({_known_values(value, values)})'
    if any(all(k in p and p[k] == v for k, v in wanted) for p in candidates):
        return ''
    return _no_single_match(name, wanted, candidates, identities.get(str(kind)))


def first_hint(request: Iterable[Mapping[str, Any] | Iterable[Mapping[str, Any]]],
               known: Iterable[Mapping[str, Any]],
               identities: Mapping[str, str] | None = None) -> str:
    """The hint for the first profile of a ``get`` request that has one, or ''.

    ``request`` holds profiles and groups (lists of profiles for one stack), as
    ``get`` takes them.
    """
    known = list(known)
    for entry in request:
        for profile in [entry] if isinstance(entry, Mapping) else entry:
            found = hint(profile, known, identities)
            if found:
                return found
    return ''


def _unknown_type(kind: Any, known: Iterable[Mapping[str, Any]],
                  identities: Mapping[str, str]) -> str:
    types = sorted(set(identities) | {str(p['type']) for p in known if 'type' in p})
    return f'no equipment of type {_shown(kind)} ({_nearest(kind, types, "types")})'


def _no_single_match(name: str, wanted: list[tuple[str, Any]],
                     candidates: list[Mapping[str, Any]], identity: str | None) -> str:
    """Each wanted pair exists somewhere, never all on one item: name the item that
    comes closest and what it has instead."""
    def score(profile: Mapping[str, Any]) -> int:
        return sum(1 for key, value in wanted if profile.get(key) == value)
    closest = max(candidates, key=score)
    asked = ' and '.join(f'{_clip(key)} {_shown(value)}' for key, value in wanted[:SHOWN])
    has = ', '.join(f'{_clip(key)} {_shown(closest[key])}' if key in closest
                    else f'no {_clip(key)}'
                    for key, value in wanted if closest.get(key, _MISSING) != value)
    who = name if identity is None or identity not in closest \
        else f'{name} {_shown(closest[identity])}'
    return f'no single {name} has {asked} (nearest: {who} has {has})'


def _nearest(word: Any, choices: list[str], what: str = 'keys') -> str:
    """'did you mean ...?' when a choice is close to ``word``, else the choices."""
    close = _only_close_match(word, choices)
    if close is not None:
        return f'did you mean {_quoted(close)}?'
    return f'{what}: {_listed(choices)}' if choices else f'no {what} known'


def _known_values(value: Any, values: list[Any]) -> str:
    """The known values, with a note when the request's value is a string and the
    lab's are not: values compare exactly, so '4' never matches 4."""
    close = _only_close_match(value, [v for v in values if isinstance(v, str)])
    if close is not None:
        return f'did you mean {_quoted(close)}?'
    text = 'known: ' + _listed([_plain(v) for v in values])
    if isinstance(value, str) and any(not isinstance(v, str) for v in values):
        text += '; values compare exactly, so give a non-string value as JSON'
    return text


def _only_close_match(word: Any, choices: list[str]) -> str | None:
    """The choice closest to ``word`` when it is close and no other is as close;
    otherwise None (the list of choices then says more than a guess would).

    A word longer than MATCH_LIMIT is nobody's typo and is not compared: matching
    costs time quadratic in its length.
    """
    if not isinstance(word, str) or len(word) > MATCH_LIMIT:
        return None
    close = difflib.get_close_matches(word, choices, n=2)
    if not close:
        return None
    if len(close) == 2 and _ratio(word, close[0]) == _ratio(word, close[1]):
        return None
    return close[0]


def _ratio(word: str, choice: str) -> float:
    return difflib.SequenceMatcher(None, word, choice).ratio()


def _distinct(values: Iterable[Any]) -> list[Any]:
    """Values without repeats, in order of appearance; told apart by their JSON so
    that lists and objects count too, in linear time."""
    seen: dict[str, Any] = {}
    for value in values:
        seen.setdefault(_json(value), value)
    return list(seen.values())


def _listed(items: list[str]) -> str:
    shown = ', '.join(_clip(item) for item in items[:SHOWN])
    if len(items) > SHOWN:
        shown += f', ... ({len(items)} in all)'
    return shown


def _plain(value: Any) -> str:
    """A known value as a list shows it: strings bare, anything else as JSON."""
    return value if isinstance(value, str) else _json(value)


def _shown(value: Any) -> str:
    """A value inside a sentence: strings quoted, anything else as JSON."""
    return _quoted(value) if isinstance(value, str) else _clip(_json(value))


def _quoted(text: Any) -> str:
    return f"'{_clip(str(text))}'"


def _json(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        return repr(value)


def _clip(text: Any) -> str:
    text = str(text)
    return text if len(text) <= CLIP else text[:CLIP - 3] + '...'
