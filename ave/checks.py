"""Checking what a lab owner wrote: JSON files read strictly, fields checked one by one.

Every configuration loader (``ave.config``) and every equipment plug-in that checks
its broker.json entries uses ``Checker``, so a wrong field reads the same wherever
it is found: one line naming the file (when there is one) and the field::

    /h/.ave/config/broker.json: field 'port': expected an integer from 1 to 65535, got "x"

A ``Checker`` for a file raises ``ConfigError``; one without a file (a plug-in
checking an entry) raises ``ValueError("field: problem")``, which the loader turns
into a ConfigError on the entry's field.
"""
from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterable
from typing import Any

from ave.exceptions import AveException


class ConfigError(AveException):
    """A configuration file is missing, unreadable, malformed or has a wrong field.

    The message is one line starting with the file's path; ``path`` and ``field``
    (None for problems with the file as a whole) are also attributes.
    """

    @classmethod
    def at(cls, path: str, problem: str, field: str | None = None) -> ConfigError:
        """Build the error for ``field`` of the file at ``path`` (or the whole file)."""
        where = path if field is None else f"{path}: field '{field}'"
        return cls({'message': f'{where}: {problem}', 'path': path, 'field': field})



class _DuplicateKey(ValueError):
    """Raised while parsing: the same key twice in one object, the later one would win."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build one JSON object, refusing a repeated key instead of keeping the last."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def read_json(path: str) -> Any:
    """Parse the file at ``path``; every way of failing becomes a one-line ConfigError."""
    try:
        with open(path, encoding='utf-8') as stream:
            return json.load(stream, object_pairs_hook=_unique_keys)
    except FileNotFoundError:
        raise ConfigError.at(path, 'no such file') from None
    except OSError as err:
        raise ConfigError.at(path, f'cannot read: {err.strerror}') from None
    except UnicodeDecodeError:
        raise ConfigError.at(path, 'not UTF-8 text') from None
    except json.JSONDecodeError as err:
        raise ConfigError.at(
            path, f'malformed JSON at line {err.lineno} column {err.colno}: {err.msg}') from None
    except _DuplicateKey as err:
        raise ConfigError.at(path, f'key {str(err)!r} appears twice in one object') from None


def _kind(value: Any) -> str:
    """The JSON name of ``value``'s type, with an article, for messages."""
    if value is None:
        return 'null'
    if isinstance(value, bool):
        return 'a boolean'
    if isinstance(value, (int, float)):
        return 'a number'
    if isinstance(value, str):
        return 'a string'
    return 'a list' if isinstance(value, list) else 'an object'


def shown(value: Any) -> str:
    """How a wrong value appears in a message: scalars as JSON, containers by kind."""
    if isinstance(value, (list, dict)):
        return _kind(value) if value else f'an empty {_kind(value).split()[-1]}'
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):  # not from JSON: a plug-in's own object
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + '...'


class Checker:
    """Field checks for one file; each returns the value or raises a ConfigError.

    ``field`` is the dotted/indexed name shown to the lab owner (``remote.port``,
    ``stacks[0][1].type``); None means the top level of the file.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path

    def error(self, field: str | None, problem: str) -> AveException | ValueError:
        if self.path is None:
            return ValueError(problem if field is None else f'{field}: {problem}')
        return ConfigError.at(self.path, problem, field)

    def json_object(self, field: str | None, value: Any,
               known: Iterable[str] | None = None) -> dict[str, Any]:
        """A JSON object; with ``known``, a key outside it is refused by name."""
        if not isinstance(value, dict):
            raise self.error(field, f'expected an object, got {shown(value)}')
        if known is not None:
            for key in value:
                if key not in known:
                    raise self.error(_join(field, key), _unknown(key, known))
        return value

    def required(self, data: dict, key: str, parent: str | None = None) -> Any:
        if key not in data:
            raise self.error(_join(parent, key), 'required but missing')
        return data[key]

    def json_list(self, field: str, value: Any) -> list:
        if not isinstance(value, list):
            raise self.error(field, f'expected a list, got {shown(value)}')
        return value

    def string(self, field: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(field, f'expected a non-empty string, got {shown(value)}')
        return value

    def string_or_null(self, field: str, value: Any, secret: bool = False) -> str | None:
        """A string or null; a ``secret`` field's wrong value is described, never shown."""
        if value is not None and not isinstance(value, str):
            got = _kind(value) if secret else shown(value)
            raise self.error(field, f'expected a string or null, got {got}')
        return value

    def port(self, field: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise self.error(field, f'expected an integer from 1 to 65535, got {shown(value)}')
        return value

    def number(self, field: str, value: Any, low: float, high: float,
               integer: bool = False) -> int | float:
        """A number (an integer if ``integer``) from ``low`` to ``high``."""
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) \
                or not low <= value <= high:
            kind = 'an integer' if integer else 'a number'
            raise self.error(field, f'expected {kind} from {low:g} to {high:g}, '
                                    f'got {shown(value)}')
        return value

    def choice(self, field: str, value: Any, choices: Iterable[str]) -> str:
        choices = tuple(choices)
        if value not in choices:
            names = [json.dumps(choice) for choice in choices]
            wanted = ' or '.join(names) if len(names) == 2 else f'one of {", ".join(names)}'
            raise self.error(field, f'expected {wanted}, got {shown(value)}')
        return value

    def seconds(self, field: str, value: Any) -> float:
        """A finite number of seconds above 0 (a time limit)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise self.error(field, f'expected a number of seconds above 0, '
                                    f'got {shown(value)}')
        return float(value)

    def positive_int(self, field: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.error(field, f'expected an integer above 0, got {shown(value)}')
        return value

    def absolute_path(self, field: str, value: Any) -> str:
        """A string that is an absolute path once ``~`` is expanded."""
        path = os.path.expanduser(self.string(field, value))
        if not os.path.isabs(path):
            raise self.error(field, f'expected an absolute path, got {shown(value)}')
        return path

    def typed(self, field: str, value: Any) -> dict[str, Any]:
        """An object with a non-empty string ``type``: a profile or equipment entry."""
        data = self.json_object(field, value)
        self.string(f'{field}.type', self.required(data, 'type', field))
        return data


def _join(parent: str | None, key: str) -> str:
    return key if parent is None else f'{parent}.{key}'


def _unknown(key: str, known: Iterable[str]) -> str:
    """The complaint about an unknown key, with a suggestion when one is close."""
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"unknown key (did you mean '{close[0]}'?)"
    return 'unknown key (expected one of: ' + ', '.join(known) + ')'
