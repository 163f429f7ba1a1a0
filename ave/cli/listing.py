"""``ave list``, ``ave who`` and ``ave queue``: what the lab has, who holds it, who
waits. Each asks the broker one public RPC (no key) and prints a table, or the
reply itself with ``--json``.

The HOST column is the equipment profile's ``host`` (brokers of a lab put it
there), else the host of the broker asked. An empty listing prints its header
nowhere: stdout stays empty, and one line on stderr says why.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ave.cli.connect import Failure, Target, client, identities, identity_value, target_of
from ave.cli.table import age_text, holder_text, profile_text, render, since_text

STATES = ('available', 'held', 'releasing', 'offline')


def list_command(args: argparse.Namespace) -> int:
    target = target_of(args)
    with client(target) as broker:
        entries = _records(broker.equipment(), 'equipment', ('profile',))
    shown = entries if args.all else [e for e in entries if e.get('state') == 'available']
    if args.json:
        return _print_json(shown)
    if not shown:
        _note(_why_nothing_listed(entries, args.all))
        return 0
    known = identities()
    rows = sorted(_equipment_row(entry, known, target) for entry in shown)
    header = ['TYPE', 'ID', 'HOST', 'STATE', 'HOLDER', 'SINCE']
    if any('pretty' in entry['profile'] for entry in shown):
        header.append('NAME')
    else:
        rows = [row[:-1] for row in rows]
    sys.stdout.write(render(header, rows))
    return 0


def _equipment_row(entry: dict, known: dict[str, str], target: Target) -> list[str]:
    profile = entry['profile']
    return [str(profile.get('type', '?')), identity_value(profile, known),
            _host(profile, target), str(entry.get('state', '?')),
            holder_text(_mapping(entry.get('holder'))),
            since_text(_number(entry.get('since')), time.time()),
            str(profile.get('pretty', ''))]


def _why_nothing_listed(entries: list[dict], listing_all: bool) -> str:
    if not entries:
        return ('the broker lists no equipment (declare it in broker.json, or plug it in; '
                'workspaces are made on demand and never listed)')
    counts = {state: sum(1 for e in entries if e.get('state') == state) for state in STATES}
    busy = ', '.join(f'{count} {state}' for state, count in counts.items() if count)
    return f'nothing is available now ({busy}; ave list --all shows them)'


def who_command(args: argparse.Namespace) -> int:
    target = target_of(args)
    with client(target) as broker:
        allocations = _records(broker.who(), 'who', ('profile',))
    if args.json:
        return _print_json(allocations)
    if not allocations:
        _note('nobody holds any equipment')
        return 0
    known, now = identities(), time.time()
    rows = sorted([str(a['profile'].get('type', '?')), identity_value(a['profile'], known),
                   _host(a['profile'], target), holder_text(_mapping(a.get('holder'))),
                   str(_mapping(a.get('holder')).get('pid', '')),
                   str(_mapping(a.get('holder')).get('job') or ''),
                   since_text(_number(a.get('since')), now)] for a in allocations)
    sys.stdout.write(render(['TYPE', 'ID', 'HOST', 'HOLDER', 'PID', 'JOB', 'SINCE'], rows))
    return 0


def queue_command(args: argparse.Namespace) -> int:
    target = target_of(args)
    with client(target) as broker:
        waiting = _records(broker.queue(), 'queue', ())
    if args.json:
        return _print_json(waiting)
    if not waiting:
        _note('nobody is waiting')
        return 0
    rows = [[str(w.get('position', '?')), holder_text(_mapping(w.get('holder'))),
             str(_mapping(w.get('holder')).get('job') or ''), _wants(w.get('profiles')),
             str(w.get('priority', '')), age_text(_number(w.get('waited_s')) or 0)]
            for w in waiting]
    sys.stdout.write(render(['POS', 'HOLDER', 'JOB', 'WANTS', 'PRIORITY', 'WAITED'], rows))
    return 0


def _wants(profiles: Any) -> str:
    """A waiting request's profiles; a stack group in parentheses."""
    if not isinstance(profiles, list):
        return '?'
    texts = []
    for entry in profiles:
        if isinstance(entry, list):
            texts.append('(' + ' '.join(profile_text(p) for p in entry
                                        if isinstance(p, dict)) + ')')
        elif isinstance(entry, dict):
            texts.append(profile_text(entry))
    return ' '.join(texts)


def _host(profile: dict, target: Target) -> str:
    return str(profile.get('host') or target.address[0])


def _records(reply: Any, what: str, dict_fields: tuple[str, ...]) -> list[dict]:
    """A listing reply as a list of dicts whose ``dict_fields`` are dicts; anything
    else is a broker speaking another protocol, said in one line."""
    if not isinstance(reply, list) or not all(
            isinstance(entry, dict) and all(isinstance(entry.get(f), dict) for f in dict_fields)
            for entry in reply):
        raise Failure(f'the broker sent a malformed {what} listing')
    return reply


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _print_json(value: Any) -> int:
    print(json.dumps(value, indent=2, sort_keys=True))
    return 0


def _note(text: str) -> None:
    print(f'ave: {text}', file=sys.stderr)
