"""``ave hold``, ``ave run``, ``ave relay`` and ``ave kick``: equipment held from a shell.

A hold lasts as long as this process's connection to the broker, like any job's:
Ctrl-C, a closed terminal or a killed ``ave`` all release it. While holding, the
command asks the broker every ``POLL`` seconds what it still holds, so a hold
ended from elsewhere (``ave kick``, a stopped broker) is reported at once instead
of being believed in. ``ave run`` then stops the command it runs: that command
was promised the equipment, and someone else may have it now.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ave.broker import Broker
from ave.broker.client import ResourceProxy, job_label
from ave.broker.exceptions import Busy, NoSuch
from ave.broker.suggest import first_hint
from ave.cli.connect import (Failure, admin_key, client, home_of, identities,
                             identity_value, item_key, target_of, with_defaults)
from ave.cli.profiles import Request
from ave.cli.table import holder_text, profile_text
from ave.exceptions import AveException
from ave.network.exceptions import ConnectionException

#: Seconds between two checks that a hold is still in place.
POLL = 1.0
#: How long ``ave run`` gives its command to end after SIGTERM, once the hold is lost.
STOP_GRACE = 10.0
#: How long a command waits, once done, for the broker to reset what it gave back.
RELEASE_WAIT = 30.0
RELEASE_POLL = 0.05


def hold_command(args: argparse.Namespace) -> int:
    with client(target_of(args), job=args.job) as broker, signals_interrupt():
        proxies = allocate(broker, args.profiles, args.wait)
        profiles = [proxy.profile for proxy in proxies]
        with contextlib.suppress(KeyboardInterrupt):
            if args.json:
                print(json.dumps(profiles, sort_keys=True), flush=True)
            else:
                for line in _held_lines(profiles):
                    print(f'holding {line}', flush=True)
            print('ave: holding until Ctrl-C', file=sys.stderr, flush=True)
            _hold(broker, profiles, None)
        release(broker, profiles)
    return 0


def relay_command(args: argparse.Namespace) -> int:
    if args.profile.get('type') != 'relay':
        raise Failure(f'ave relay needs a relay profile, got {profile_text(args.profile)}')
    closed = args.state == 'close'
    with client(target_of(args), job=args.job) as broker, signals_interrupt():
        relay = allocate(broker, [args.profile], args.wait)[0]
        relay.set_circuit(args.circuit, closed)
        name = _held_lines([relay.profile])[0]
        until = 'until Ctrl-C' if args.hold_for is None else f'for {args.hold_for:g} s'
        with contextlib.suppress(KeyboardInterrupt):
            print(f'{name}: {args.circuit} {"closed" if closed else "open"}', flush=True)
            print(f'ave: holding {name} {until}; releasing it puts every circuit back to '
                  'its default', file=sys.stderr, flush=True)
            _hold(broker, [relay.profile], args.hold_for)
        release(broker, [relay.profile])
    return 0


def run_command(args: argparse.Namespace) -> int:
    """Hold the equipment while the command runs. Unless told otherwise, the job
    label others see in ``ave who`` is the program's name: its arguments stay
    private, as they may carry tokens or passwords."""
    job = args.job or job_label() or args.command_line[0]
    with client(target_of(args), job=job) as broker:
        proxies = allocate(broker, args.profiles, args.wait)
        profiles = [proxy.profile for proxy in proxies]
        env = {**os.environ, 'AVE_RESOURCES': json.dumps(profiles, sort_keys=True)}
        try:
            child = subprocess.Popen(args.command_line, env=env)
        except OSError as error:
            print(f'ave: cannot run {args.command_line[0]}: {error.strerror}', file=sys.stderr)
            return 127 if isinstance(error, FileNotFoundError) else 126
        status = _supervise(broker, profiles, child, args.command_line)
        release(broker, profiles)
        return status


def kick_command(args: argparse.Namespace) -> int:
    """End the session of whoever holds the item ``args.profile`` names.

    The profile may be partial (``relay,pretty=bench3``): it is matched against
    the held items, and must name exactly one.
    """
    key = admin_key(home_of(args))
    with client(target_of(args), authkey=key) as broker:
        entry = _the_held_item(broker, args.profile)
        broker.close_session(entry['profile'])
    item = _held_lines([entry['profile']])[0]
    print(f'kicked {holder_text(entry.get("holder")) or "its holder"} off {item}; '
          'everything that client held is being released')
    return 0


# -- allocating -------------------------------------------------------------------------

def allocate(broker: Broker, requests: list[Request], wait: float | None) -> list[ResourceProxy]:
    """``get`` the requests (JSON lists are stack groups); proxies in request order.

    Busy and NoSuch become one line that says what to do next; NoSuch also says
    which part of the request matches nothing the broker knows.
    """
    wire = [tuple(request) if isinstance(request, list) else request for request in requests]
    try:
        granted = broker.get(*wire, wait=wait)
    except NoSuch as error:
        raise Failure(_with_hint(str(error), broker, requests)) from None
    except Busy as error:
        advice = 'ave who shows the holders' if wait else \
            'ave who shows the holders; --wait S waits up to S seconds'
        raise Failure(f'{error} ({advice})') from None
    return list(granted) if isinstance(granted, tuple) else [granted]


def _with_hint(message: str, broker: Broker, requests: list[Request]) -> str:
    """``message`` and, unless the broker already gave it, the nearest-match hint.

    The hint needs one more listing; a broker that cannot give it still leaves the
    user with its own message.
    """
    try:
        known = [entry['profile'] for entry in broker.equipment()
                 if isinstance(entry, dict) and isinstance(entry.get('profile'), dict)]
    except (AveException, ConnectionException):
        return message
    asked = [[with_defaults(p) for p in request] if isinstance(request, list)
             else with_defaults(request) for request in requests]
    hint = first_hint(asked, known, identities())
    return f'{message}; {hint}' if hint and hint not in message else message


def _held_lines(profiles: list[dict]) -> list[str]:
    known = identities()
    return [f'{profile.get("type", "?")} {identity_value(profile, known)}'
            for profile in profiles]


def _the_held_item(broker: Broker, profile: dict) -> dict:
    entries = [entry for entry in broker.equipment()
               if isinstance(entry, dict) and isinstance(entry.get('profile'), dict)
               and all(k in entry['profile'] and entry['profile'][k] == v
                       for k, v in profile.items())]
    held = [entry for entry in entries if entry.get('state') == 'held']
    if len(held) == 1:
        return held[0]
    asked = profile_text(profile)
    if len(held) > 1:
        names = ', '.join(_held_lines([entry['profile'] for entry in held]))
        raise Failure(f'{asked} matches {len(held)} held items ({names}); name one')
    if entries:
        states = ', '.join(f'{line} is {entry.get("state")}' for line, entry in
                           zip(_held_lines([e['profile'] for e in entries]), entries))
        raise Failure(f'nobody holds {asked}: {states}')
    raise Failure(_with_hint(f'no such equipment: {asked}', broker, [profile]))


# -- holding ----------------------------------------------------------------------------

def release(broker: Broker, profiles: list[dict], wait: float = RELEASE_WAIT) -> None:
    """Give ``profiles`` back and wait (up to ``wait`` seconds) until the broker has
    reset them, so that the next command of a script finds them available, not
    still being released.

    Equipment already gone back (the session ended, the broker stopped) is no
    failure: it is released either way, and the disconnect that follows releases
    whatever is left.
    """
    mine = {item_key(profile) for profile in profiles}
    deadline = time.monotonic() + wait
    try:
        broker.yield_resources(*profiles)
        while time.monotonic() < deadline:
            if not any(isinstance(entry, dict) and isinstance(entry.get('profile'), dict)
                       and entry.get('state') == 'releasing'
                       and item_key(entry['profile']) in mine
                       for entry in broker.equipment()):
                return
            time.sleep(RELEASE_POLL)
    except (AveException, ConnectionException):
        return


def _hold(broker: Broker, profiles: list[dict], seconds: float | None) -> None:
    """Keep the hold for ``seconds`` (None: until interrupted); Failure if the broker
    ends it first."""
    deadline = None if seconds is None else time.monotonic() + seconds
    while deadline is None or time.monotonic() < deadline:
        remaining = POLL if deadline is None else deadline - time.monotonic()
        time.sleep(max(0.0, min(POLL, remaining)))
        _check_held(broker, profiles)


def _supervise(broker: Broker, profiles: list[dict], child: subprocess.Popen,
               command_line: list[str]) -> int:
    """Wait for ``child``, checking the hold meanwhile; its exit status, shell style.

    Ctrl-C reaches the child from the terminal (same process group) and is
    ignored here; SIGTERM and SIGHUP sent to ``ave`` are passed on to the child.
    """
    def forward(signum: int, frame: Any) -> None:
        child.send_signal(signum)
    previous = {signum: signal.signal(signum, handler) for signum, handler in
                ((signal.SIGINT, signal.SIG_IGN), (signal.SIGTERM, forward),
                 (signal.SIGHUP, forward))}
    try:
        while True:
            try:
                return _status(child.wait(timeout=POLL))
            except subprocess.TimeoutExpired:
                pass
            try:
                _check_held(broker, profiles)
            except Failure as lost:
                _stop(child)
                raise Failure(f'{lost}; stopped {shlex.join(command_line)}') from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _check_held(broker: Broker, profiles: list[dict]) -> None:
    try:
        held = {item_key(p) for p in broker.list_allocations() if isinstance(p, dict)}
    except (AveException, ConnectionException) as error:
        raise Failure(f'lost the hold: {error}') from None
    lost = [line for line, profile in zip(_held_lines(profiles), profiles)
            if item_key(profile) not in held]
    if lost:
        raise Failure(f'lost the hold on {", ".join(lost)}: the broker ended it '
                      '(ave kick, or the session holding it ended)')


def _stop(child: subprocess.Popen) -> None:
    child.terminate()
    try:
        child.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _status(returncode: int) -> int:
    """A child's exit status as a shell reports it: 128 + N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does: a hold ends the
    same way whichever ends it (released, exit status 0), and a console restores
    the terminal. Installed before anything is held, so no signal finds the
    default handler in between."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    previous = {signum: signal.signal(signum, interrupt)
                for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
