"""PROFILE arguments: equipment requests written on a command line.

One argument is one profile, in either of two forms:

- ``TYPE[,KEY=VALUE...]``: the equipment type first, then ``key=value`` pairs, as in
  ``relay,uid=r1`` or ``handset,platform=android``. Values stay strings. A value
  may contain ``=`` (only the first one separates key from value) but not a comma:
  a value with a comma, or one that is not a string, needs the JSON form.
- a JSON object, as in ``'{"type": "relay", "uid": "r1"}'``; or a JSON list of
  objects, which asks for equipment wired together in one stack.

Pure parsing without I/O; every mistake is a ``ProfileSyntaxError`` whose message
is one line naming the argument and saying how to write it instead.
"""
from __future__ import annotations

import json
from typing import Any

SYNTAX = ('TYPE[,KEY=VALUE...] such as relay,uid=r1, or a JSON object such as '
          '\'{"type": "relay", "uid": "r1"}\'')


class ProfileSyntaxError(ValueError):
    """A PROFILE argument cannot be read; the message is one line."""


Request = dict[str, Any] | list[dict[str, Any]]


def parse_request(text: str) -> Request:
    """One PROFILE argument: a profile, or (a JSON list) a group for one stack."""
    stripped = text.lstrip()
    if stripped.startswith('['):
        return _json_group(text)
    return parse_profile(text)


def parse_profile(text: str) -> dict[str, Any]:
    """One PROFILE argument that must be a single profile (not a stack group)."""
    stripped = text.lstrip()
    if stripped.startswith('['):
        raise _error(text, 'a stack group (a JSON list) is not accepted here; give one '
                           'profile')
    if stripped.startswith('{'):
        return _json_profile(text, _load_json(text))
    return _comma_profile(text)


def _comma_profile(text: str) -> dict[str, Any]:
    if not text:
        raise _error(text, f'empty; write {SYNTAX}')
    fields = text.split(',')
    kind = fields[0]
    if '=' in kind:
        raise _error(text, f'starts with {kind.split("=")[0] + "="!r}, but the equipment '
                           f'type comes first, as in relay,{kind}')
    _check_name(text, 'the type', kind)
    profile: dict[str, Any] = {'type': kind}
    for index, field in enumerate(fields[1:], start=1):
        key, value = _pair(text, fields, index, field)
        if key in profile:
            again = ' (the type is the first field)' if key == 'type' else ''
            raise _error(text, f'key {key!r} is given twice{again}')
        profile[key] = value
    return profile


def _pair(text: str, fields: list[str], index: int, field: str) -> tuple[str, str]:
    """``key=value`` of one field; a field without ``=`` after a pair is most likely
    the rest of a value that held a comma, and the message shows the JSON for that."""
    if not field:
        raise _error(text, 'has an empty field (two commas in a row, or one at the end)')
    if '=' not in field:
        previous = fields[index - 1]
        if index > 1 and '=' in previous:
            key, value = previous.split('=', 1)
            spelled = json.dumps({'type': fields[0], key: f'{value},{field}'})
            raise _error(text, f'{field!r} is not KEY=VALUE; a value cannot hold a comma '
                               f'here: write such a profile as JSON, as in \'{spelled}\'')
        raise _error(text, f'{field!r} is not KEY=VALUE')
    key, value = field.split('=', 1)
    _check_name(text, 'a key', key)
    return key, value


def _check_name(text: str, what: str, name: str) -> None:
    if not name:
        raise _error(text, f'{what} is missing ({SYNTAX})')
    if name != name.strip():
        raise _error(text, f'{what} {name!r} has spaces around it')


def _load_json(text: str) -> Any:
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise _error(text, f'key {key!r} appears twice in one JSON object')
            result[key] = value
        return result
    try:
        return json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as err:
        raise _error(text, f'not valid JSON: {err.msg} at column {err.colno}') from None


def _json_profile(text: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _error(text, f'a JSON profile is an object, not {_json_kind(value)}')
    kind = value.get('type')
    if not isinstance(kind, str) or not kind:
        raise _error(text, 'a JSON profile needs "type", a non-empty string')
    return value


def _json_group(text: str) -> list[dict[str, Any]]:
    value = _load_json(text)
    if not isinstance(value, list) or not value:
        raise _error(text, 'a stack group is a non-empty JSON list of profiles')
    return [_json_profile(text, member) for member in value]


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return 'a list'
    if isinstance(value, str):
        return 'a string'
    if value is None:
        return 'null'
    return 'a boolean' if isinstance(value, bool) else 'a number'


def _error(text: str, problem: str) -> ProfileSyntaxError:
    return ProfileSyntaxError(f'PROFILE {text!r}: {problem}')
