"""``ave console PROFILE``: a serial console at the keyboard.

What is typed goes to the console with ``write``; what the console prints comes
back with ``read`` and goes to stdout, until Ctrl-] or the end of stdin. On a
terminal, stdin is put in raw mode for the duration, so every key (Ctrl-C
included) reaches the board at once, as with picocom or telnet.

The session runs one call per resource at a time, so input and output cannot be
waited for side by side: each turn sends what was typed, then waits up to
``READ_WAIT`` seconds for output. Output shows as it arrives; a key waits at most
that long. An idle console costs the session a few calls a second.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import os
import select
import sys
import termios
import tty
from collections.abc import Iterator

from ave.broker.client import ResourceProxy
from ave.cli.connect import Failure, client, identities, identity_value, target_of
from ave.cli.holding import allocate, release, signals_interrupt
from ave.cli.table import profile_text

#: Ctrl-], the key that ends the console (telnet's choice, so fingers know it).
ESCAPE = b'\x1d'
READ_WAIT = 0.1
_CHUNK = 4096


def console_command(args: argparse.Namespace) -> int:
    if args.profile.get('type') != 'serial':
        raise Failure(f'ave console needs a serial profile, got {profile_text(args.profile)}')
    with client(target_of(args), job=args.job) as broker, signals_interrupt():
        console = allocate(broker, [args.profile], args.wait)[0]
        interactive = os.isatty(sys.stdin.fileno())
        if interactive:
            name = identity_value(console.profile, identities())
            print(f'ave: console {name}; Ctrl-] ends it', file=sys.stderr, flush=True)
        with _raw(sys.stdin.fileno()) if interactive else contextlib.nullcontext():
            pump(console, sys.stdin.fileno(), sys.stdout.fileno())
        release(broker, [console.profile])
    return 0


def pump(console: ResourceProxy, stdin: int, stdout: int) -> None:
    """Copy ``stdin`` to the console and the console to ``stdout`` until Ctrl-] or
    the end of ``stdin``; what the console printed by then is shown before leaving.

    Input is decoded incrementally, so a character split between two reads is sent
    whole; bytes that are not UTF-8 go as U+FFFD.
    """
    decoder = codecs.getincrementaldecoder('utf-8')('replace')
    while True:
        if select.select([stdin], [], [], 0)[0]:
            data = os.read(stdin, _CHUNK)
            typed, escape, _ = data.partition(ESCAPE)
            text = decoder.decode(typed, final=not data or bool(escape))
            if text:
                console.write(text)
            if not data or escape:
                _show(stdout, console.read(0))
                return
        _show(stdout, console.read(READ_WAIT))


def _show(fd: int, text: str) -> None:
    data = text.encode('utf-8')
    while data:
        data = data[os.write(fd, data):]


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    """The terminal on ``fd`` in raw mode, restored however the console ends."""
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
