"""``ave-broker``: start, stop and inspect the broker of an AVE home.

Exit status 0 on success; 1 when the work failed or, for ``--status`` and ``--stop``,
when no broker runs; 2 for a wrong command line. A failure is one line on stderr
starting with ``ave-broker: ``.

``--list`` and ``--list-all`` print one line per item, sorted: type, identity, then
``key=value`` for the other profile keys in key order, lists joined by commas and
values quoted as a POSIX shell would need them (``pretty='bench 3'``).

``--stop`` sends SIGTERM and waits up to STOP_TIMEOUT seconds. A broker that is
still there after that is reported, not killed: it may be busy tearing sessions
down, and whether to SIGKILL it (orphaning their equipment) is the operator's call.

Run by root without ``--home`` (an init system, a package's install scripts), the
command first becomes the account named in /etc/ave/user, so that the broker, its
files and everything it starts belong to that account and never to root.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import psutil

from ave import config, persona
from ave.broker import daemon
from ave.exceptions import AveException
from ave.network.control import RemoteControl
from ave.network.exceptions import ConnectionException, ConnectionRefused
from ave.network.process import StartError

STOP_TIMEOUT = 10.0
LIST_TIMEOUT = 10.0
#: After a failed --restart: how long the old broker may take to exit, when it let
#: go just before its successor died.
PREDECESSOR_EXIT_WAIT = 1.0

#: A broker bound to every address is reached through the loopback address.
_WILDCARDS = {'0.0.0.0': '127.0.0.1', '::': '::1'}


class Failure(Exception):
    """Ends the command with exit status 1 after printing the message on stderr."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='ave-broker', description='Start, stop and inspect the AVE broker.')
    action = parser.add_mutually_exclusive_group(required=True)
    for flag, text in (
            ('--start', 'check the configuration and start the broker as a daemon; '
                        'print its pid'),
            ('--stop', 'stop the running broker (SIGTERM) and wait for it to exit'),
            ('--restart', 'start a broker with the current code and configuration that '
                          'takes over clients, sessions and equipment from the running '
                          'one without dropping anything; print its pid'),
            ('--status', 'say whether the broker runs (exit status 1 if not)'),
            ('--list', 'list the equipment that is available now'),
            ('--list-all', 'list all equipment, allocated or not'),
            ('--hickup', 'make the broker and its sessions write their stacks to '
                         'HOME/.ave/hickup')):
        action.add_argument(flag, dest='action', action='store_const',
                            const=flag[2:].replace('-', '_'), help=text)
    parser.add_argument('--foreground', action='store_true',
                        help='with --start: run in this process instead of as a daemon, '
                             'logging to stderr (for supervisors such as systemd)')
    parser.add_argument('--home', metavar='DIR',
                        help='the AVE home holding .ave/config (default: the home named '
                             f'in {config.ETC_PATH}, else your own)')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ave-broker``; return the exit status (argparse exits 2 on a bad command
    line)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.foreground and args.action != 'start':
        parser.error('--foreground only goes with --start')
    try:
        return _ACTIONS[args.action](_home(args.home), args)
    except (Failure, AveException, ConnectionException, psutil.Error) as error:
        return _fail(str(error))
    except OSError as error:
        return _fail(_os_error(error))


def _home(home: str | None) -> str:
    """The home to act on; root without ``--home`` becomes the AVE account first.

    An explicit ``--home`` is a deliberate choice and is obeyed as whoever we are.
    """
    if home is None and os.geteuid() == 0 and os.path.exists(config.ETC_PATH):
        etc = config.load_etc()
        persona.become_user(etc['name'])
        return etc['home']
    return config.resolve_home(home)


def _start(home: str, args: argparse.Namespace) -> int:
    running = daemon.find_broker(home).pid
    if running is not None:
        raise Failure(f'already running, pid {running}')
    broker = daemon.BrokerDaemon.from_home(home, foreground=args.foreground)
    if args.foreground:
        return broker.serve_foreground()
    return _launch(broker, 'the broker failed to start')


def _restart(home: str, args: argparse.Namespace) -> int:
    """Hand everything to a new broker; exit 0 only once the new broker serves.

    A configuration error or a failed takeover leaves the running broker serving. If
    the running broker died during the handover (it crashed, or was killed), its
    sessions wait for the next broker: one is started, and adopts them.
    """
    running = daemon.find_broker(home).process
    if running is None:
        return _start(home, args)
    broker = daemon.BrokerDaemon.from_home(home, takeover_from=running.pid)
    try:
        return _launch(broker, lambda: _after_failed_restart(home))
    except Failure:
        if not daemon.wait_for_exit(running, PREDECESSOR_EXIT_WAIT):
            raise
    print(f'ave-broker: broker {running.pid} died during the handover; starting a new '
          f'one, which adopts its sessions', file=sys.stderr)
    return _start(home, args)


def _after_failed_restart(home: str) -> str:
    """What a failed restart left running, checked rather than assumed."""
    serving = daemon.find_broker(home).pid
    if serving is None:
        return (f'restart failed and no broker runs now; see {daemon.log_dir(home)} '
                'and start one with ave-broker --start')
    return f'restart failed; broker {serving} serves on'


def _launch(broker: daemon.BrokerDaemon, failure: str | Callable[[], str]) -> int:
    """Start the daemon, print its pid once it serves; its start-up failure ends here."""
    try:
        pid = broker.start(daemonize=True, synchronize=True)
    except StartError as error:
        what = failure if isinstance(failure, str) else failure()
        raise Failure(f'{what}: {error}') from None
    print(pid)
    return 0


def _stop(home: str, args: argparse.Namespace) -> int:
    process = _running(home)
    process.send_signal(signal.SIGTERM)
    if not daemon.wait_for_exit(process, STOP_TIMEOUT):
        raise Failure(f'pid {process.pid} did not stop within {STOP_TIMEOUT:g} s and '
                      f'still runs; see {daemon.log_dir(home)}')
    daemon.remove_pid_file(daemon.pid_file_path(home), process.pid)
    print(f'stopped, pid {process.pid}')
    return 0


def _status(home: str, args: argparse.Namespace) -> int:
    status = daemon.find_broker(home)
    if status.pid is None:
        print(_not_running(status))
        return 1
    print(f'running, pid {status.pid}')
    return 0


def _hickup(home: str, args: argparse.Namespace) -> int:
    process = _running(home)
    process.send_signal(signal.SIGUSR1)
    print(f'asked pid {process.pid} for hickup files in {home}/.ave/hickup')
    return 0


def _list(home: str, args: argparse.Namespace) -> int:
    broker_config = config.load_broker_config(home)
    admin_key = config.load_authkeys(home).get('admin')
    host, port = broker_config['host'], broker_config['port']
    broker = RemoteControl((_WILDCARDS.get(host, host), port), admin_key,
                           timeout=LIST_TIMEOUT, optimist=False)
    try:
        with broker:
            items = broker.list_equipment() if args.action == 'list_all' \
                else broker.list_available()
    except ConnectionRefused:
        raise Failure(f'not running (nothing listens on {host}:{port})') from None
    except ConnectionException as error:
        raise Failure(f'the broker at {host}:{port} did not answer: {error}') from None
    identities = _identities()
    for line in sorted(_line(profile, identities) for profile in items):
        print(line)
    return 0


_ACTIONS = {'start': _start, 'restart': _restart, 'stop': _stop, 'status': _status,
            'hickup': _hickup,
            'list': _list, 'list_all': _list}


# -- helpers ------------------------------------------------------------------------------

def _running(home: str) -> psutil.Process:
    """The verified broker process of ``home``; Failure when none runs."""
    status = daemon.find_broker(home)
    if status.process is None:
        raise Failure(_not_running(status))
    return status.process


def _not_running(status: daemon.BrokerStatus) -> str:
    return 'not running (stale pid file removed)' if status.stale_removed else 'not running'


def _identities() -> dict[str, str]:
    """Each installed type's identity key (how its items are told apart)."""
    return {name: equipment_type.identity
            for name, equipment_type in daemon.load_equipment_types().items()}


def _line(profile: dict, identities: dict[str, str]) -> str:
    """``type identity key=value ...``: sorted keys, lists joined by commas, values
    quoted as a shell would need them, so that a line splits back into its fields."""
    kind = str(profile.get('type'))
    identity = identities.get(kind, 'uid')
    fields = [kind, shlex.quote(_text(profile.get(identity, '')))]
    fields += [f'{key}={shlex.quote(_text(profile[key]))}' for key in sorted(profile)
               if key not in ('type', identity)]
    return ' '.join(fields)


def _text(value: Any) -> str:
    """Strings as they are, lists joined by commas, anything else as JSON."""
    if isinstance(value, list):
        return ','.join(_text(member) for member in value)
    return value if isinstance(value, str) else json.dumps(value)


def _fail(message: str) -> int:
    print(f'ave-broker: {message}', file=sys.stderr)
    return 1


def _os_error(error: OSError) -> str:
    """An OSError as "path: reason" when it has a path."""
    if error.filename is not None:
        return f'{error.filename}: {error.strerror}'
    return str(error)


if __name__ == '__main__':
    sys.exit(main())
