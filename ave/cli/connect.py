"""Which broker and which home a command means, and the clients that talk to it.

``--broker HOST:PORT`` names a broker directly; otherwise its address comes from the
home's broker.json. The home is ``--home`` (which must exist), else the one
``ave.config.resolve_home`` finds. Keys (for ``ave kick``) always come from the
home's authkeys.json.
"""
from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ave import config
from ave.broker import Broker
from ave.equipment import EquipmentType, load_types

#: A broker bound to every address is reached through the loopback address.
_WILDCARDS = {'0.0.0.0': '127.0.0.1', '::': '::1'}


class Failure(Exception):
    """Ends the command with exit status 1 after printing the message on stderr."""


@dataclass
class Target:
    """The broker a command talks to, and where its address came from."""

    address: tuple[str, int]
    origin: str

    def describe(self) -> str:
        host, port = self.address
        return f'{host}:{port} ({self.origin})'


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:4000`` for IPv6) as a tuple; ValueError says what is wrong."""
    host, sep, port = text.rpartition(':')
    if host.startswith('[') and host.endswith(']'):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'--broker {text!r}: expected HOST:PORT, as in 127.0.0.1:4000')
    return host, int(port)


def home_of(args: argparse.Namespace) -> str:
    """The home a command acts on: ``--home`` if given (it must exist), else the
    resolved default."""
    if args.home is not None:
        return config.existing_home(args.home)
    return config.resolve_home()


def target_of(args: argparse.Namespace) -> Target:
    """The broker of ``--broker``, else of the home's broker.json. A ``--home``
    given beside ``--broker`` is checked all the same: a typo is never ignored."""
    if args.broker is not None:
        if args.home is not None:
            config.existing_home(args.home)
        return Target(args.broker, 'given with --broker')
    home = home_of(args)
    broker_config = config.load_broker_config(home)
    host = broker_config['host']
    return Target((_WILDCARDS.get(host, host), broker_config['port']),
                  f'from {os.path.join(config.config_dir(home), "broker.json")}')


@contextmanager
def client(target: Target, authkey: str | None = None, job: str | None = None,
           timeout: float = 10.0) -> Iterator[Broker]:
    """A Broker client of ``target``, connected on its first call and disconnected
    (so released of everything it holds) when the block ends."""
    broker = Broker(target.address, authkey=authkey, timeout=timeout, job=job)
    with broker:
        yield broker


def admin_key(home: str) -> str:
    """The admin key of ``home``; a home without one cannot kick anybody."""
    key = config.load_authkeys(home).get('admin')
    if not key:
        path = os.path.join(config.config_dir(home), 'authkeys.json')
        raise Failure(f'{path} has no admin key to kick with')
    return key


@functools.cache
def identities() -> dict[str, str]:
    """Each installed equipment type's identity key (``uid``, ``serial``)."""
    return {name: kind.identity for name, kind in _types().items()}


def with_defaults(profile: dict) -> dict:
    """``profile`` as the broker matches it: its type's request defaults added (a
    handset request means a booted handset unless it says otherwise)."""
    kind = _types().get(str(profile.get('type')))
    return profile if kind is None else {**kind.request_defaults, **profile}


@functools.cache
def _types() -> dict[str, EquipmentType]:
    """The installed equipment types; a broken plug-in leaves ``ave`` usable, since
    only labels and hints depend on them."""
    try:
        return load_types()
    except Exception:  # a plug-in is code we do not control
        return {}


def identity_value(profile: dict, known: dict[str, str]) -> str:
    """The value that names an item among those of its type ('r1', a serial number)."""
    value = profile.get(known.get(str(profile.get('type')), 'uid'), '')
    return value if isinstance(value, str) else str(value)


def item_key(profile: dict) -> tuple[str, str]:
    """``(type, identity value)``: one item, whatever else its profile says now."""
    return str(profile.get('type')), identity_value(profile, identities())
