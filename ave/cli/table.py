"""Listings as people read them: aligned columns, local times, ages.

Pure formatting without I/O. Much of what is shown was announced by other clients
(a holder's user, host and job label are whatever its job claimed), so every cell
is made safe for a terminal (control characters become ``?``) and cut to a width;
``--json`` gives the untouched data.
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

#: The widest a cell gets in a table; JSON output is never cut.
CELL_WIDTH = 60


def render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns left-aligned, two spaces apart, header first; no trailing spaces."""
    cells = [[_cell(text) for text in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ['  '.join(text.ljust(width) for text, width in zip(row, widths)).rstrip()
             for row in cells]
    return '\n'.join(lines) + '\n'


def _cell(text: str) -> str:
    safe = printable(text)
    return safe if len(safe) <= CELL_WIDTH else safe[:CELL_WIDTH - 3] + '...'


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on (escape sequences,
    carriage returns, newlines) shown as ``?``."""
    return ''.join(ch if ch.isprintable() else '?' for ch in text)


def holder_text(holder: Mapping[str, Any] | None) -> str:
    """``user@host``, or whatever part of it the holder announced; '' for none."""
    if not holder:
        return ''
    user, host = holder.get('user'), holder.get('host')
    if user and host:
        return printable(f'{user}@{host}')
    return printable(str(user or host or '?'))


def age_text(seconds: float) -> str:
    """A duration in its two largest units: ``45s``, ``5m12s``, ``3h05m``, ``2d04h``."""
    seconds = max(0, int(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f'{days}d{hours:02d}h'
    if hours:
        return f'{hours}h{minutes:02d}m'
    if minutes:
        return f'{minutes}m{secs:02d}s'
    return f'{secs}s'


def since_text(since: float | None, now: float) -> str:
    """When something began, in local time, and how long ago: ``14:03:22 (5m12s)``;
    the date is added when it was not today. '' when unknown."""
    if since is None:
        return ''
    then, today = time.localtime(since), time.localtime(now)
    same_day = (then.tm_year, then.tm_yday) == (today.tm_year, today.tm_yday)
    clock = time.strftime('%H:%M:%S' if same_day else '%Y-%m-%d %H:%M', then)
    return f'{clock} ({age_text(now - since)})'


def profile_text(profile: Mapping[str, Any]) -> str:
    """A profile as a PROFILE argument would give it (``relay,uid=r1``) when its
    values are strings without commas, else as JSON: what to paste into ``ave``."""
    pairs = [(key, value) for key, value in profile.items() if key != 'type']
    kind = profile.get('type')
    if isinstance(kind, str) and all(isinstance(value, str) and ',' not in value
                                     for _, value in pairs):
        return ','.join([kind, *(f'{key}={value}' for key, value in pairs)])
    return json.dumps(dict(profile), sort_keys=True)
