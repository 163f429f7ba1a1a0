"""``ave-broker``: start, stop and inspect the broker of an AVE home.

Exit status 0 on success; 1 when the work failed or, for ``--status`` and ``--stop``,
when no broker runs; 2 for a wrong command line. A failure is one line on stderr
starting with ``ave-broker: ``.

``--start``, ``--restart`` and ``--status`` print ``started, pid N`` (``restarted``,
``running``) and then one ``name  value`` line each for the address, home, log
file, isolation mode and version, as the broker reports them (its ``status()`` RPC,
asked where the process listens, which broker.json may no longer say); when it
does not answer, what is known without it and the isolation broker.json asks for.

``--list`` and ``--list-all`` print one line per item, sorted: type, identity, then
``key=value`` for the other profile keys in key order, lists joined by commas and
values quoted as a POSIX shell would need them (``pretty='bench 3'``). With
``--list-all`` an item that is not available ends in a shell comment saying so
(``# held by alice@lab1 since 14:03:22 (5m12s)``), which ``shlex.split(line,
comments=True)`` drops. When nothing is listed, one line on stderr says why.

``--stop`` sends SIGTERM and waits up to STOP_TIMEOUT seconds. A broker that is
still there after that is reported, not killed: it may be busy tearing sessions
down, and whether to SIGKILL it (orphaning their equipment) is the operator's call.

Run by root without ``--home`` (an init system, a package's install scripts), the
command first becomes the account named in /etc/ave/user, so that the broker, its
files and everything it starts belong to that account and never to root.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil

from ave import __version__, config, persona
from ave.broker import cgroups, daemon, logfile
from ave.cli.table import holder_text, printable, since_text
from ave.exceptions import AveException
from ave.network.control import RemoteControl
from ave.network.exceptions import ConnectionException, ConnectionRefused
from ave.network.process import StartError

STOP_TIMEOUT = 10.0
LIST_TIMEOUT = 10.0
STATUS_TIMEOUT = 5.0
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
                        help='the AVE home holding .ave/config, which must exist '
                             f'(default: the home named in {config.ETC_PATH}, else $HOME, '
                             'else your account\'s)')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
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
        _hand_cgroup_to(etc['name'])
        persona.become_user(etc['name'])
        return etc['home']
    if home is not None:
        return config.existing_home(home)
    return config.resolve_home()


def _hand_cgroup_to(name: str) -> None:
    """systemd delegates a cgroup to the unit (Delegate=yes), which starts as root: the
    account the broker becomes must own it to give each session a group."""
    with contextlib.suppress(KeyError):  # become_user says the account is missing
        account = pwd.getpwnam(name)
        cgroups.hand_to(account.pw_uid, account.pw_gid)


def _start(home: str, args: argparse.Namespace) -> int:
    running = daemon.find_broker(home).pid
    if running is not None:
        raise Failure(f'already running, pid {running}')
    broker = daemon.BrokerDaemon.from_home(home, foreground=args.foreground)
    if args.foreground:
        return broker.serve_foreground()
    return _launch(home, broker, 'started', 'the broker failed to start')


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
        return _launch(home, broker, 'restarted', lambda: _after_failed_restart(home),
                       f' (took over from pid {running.pid})')
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


def _launch(home: str, broker: daemon.BrokerDaemon, done: str,
            failure: str | Callable[[], str], note: str = '') -> int:
    """Start the daemon and, once it serves, say so with its pid and where it is;
    its start-up failure ends here."""
    try:
        pid = broker.start(daemonize=True, synchronize=True)
    except StartError as error:
        what = failure if isinstance(failure, str) else failure()
        raise Failure(f'{what}: {error}') from None
    print(f'{done}, pid {pid}{note}')
    configured = (broker.config['host'], broker.config['port'])
    _print_details(home, _listening(psutil.Process(pid), configured[1]) or configured)
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
    if status.process is None:
        print(_not_running(status))
        return 1
    print(f'running, pid {status.pid}')
    address = _listening(status.process, _configured_port(home))
    if address is None:
        loaded = config.load_broker_config(home)
        address = (loaded['host'], loaded['port'])
    _print_details(home, address)
    return 0


def _configured_port(home: str) -> int | None:
    """broker.json's port, or None if it cannot be read (the broker runs on anyway)."""
    try:
        return config.load_broker_config(home)['port']
    except AveException:
        return None


def _listening(process: psutil.Process, configured_port: int | None) -> tuple[str, int] | None:
    """Where the broker process listens now (broker.json may have changed since it
    started); None when that cannot be seen. psutil before 6.0 (Debian 12's) names
    the call ``connections``."""
    sockets_of = getattr(process, 'net_connections', None) or process.connections
    try:
        listening = [(c.fd, c.laddr.ip, c.laddr.port) for c in sockets_of(kind='inet')
                     if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return None
    return broker_listener(listening, configured_port)


def broker_listener(listening: list[tuple[int, str, int]],
                    configured_port: int | None) -> tuple[str, int] | None:
    """Which of a broker's listening sockets ``(fd, ip, port)`` is its own: the one on
    the configured port, else the oldest (lowest descriptor). The others are brief:
    a session's listener is made in the broker just before the session is forked."""
    if not listening:
        return None
    _, ip, port = next((entry for entry in listening if entry[2] == configured_port),
                       min(listening))
    return ip, port


def _print_details(home: str, address: tuple[str, int]) -> None:
    """Address, home, log file, isolation and version of the broker at ``address``,
    as it reports them itself (its ``status()`` RPC). A broker that does not answer
    gets what can be known without it, and the isolation broker.json asks for."""
    host, port = address
    try:
        with RemoteControl((_WILDCARDS.get(host, host), port), None,
                           timeout=STATUS_TIMEOUT, optimist=False) as broker:
            status = broker.status()
        if not isinstance(status, dict):
            raise AveException('status() did not answer with an object')
    except (AveException, ConnectionException) as error:
        print(f'address    {host}:{port}')
        print(f'home       {home}')
        print(f'log        {os.path.join(daemon.log_dir(home), logfile.LOG_FILE)}')
        print(f'isolation  {_configured_isolation(home)} (the broker did not report its '
              f'status: {printable(str(error))})')
        return
    reported = status.get('address')
    where = f'{reported[0]}:{reported[1]}' if isinstance(reported, list) \
        and len(reported) == 2 else f'{host}:{port}'
    log = status.get('log') or "stderr, kept by its supervisor (journalctl -u ave-broker)"
    for name, value in (('address', where), ('home', status.get('home')), ('log', log),
                        ('isolation', status.get('isolation')),
                        ('version', status.get('version')), ('lab', status.get('lab'))):
        if value is not None:
            print(f'{name:<10} {printable(str(value))}')


def _configured_isolation(home: str) -> str:
    try:
        return f'{config.load_broker_config(home)["isolation"]} as broker.json asks'
    except config.ConfigError:
        return 'unknown'


def _hickup(home: str, args: argparse.Namespace) -> int:
    process = _running(home)
    process.send_signal(signal.SIGUSR1)
    print(f'asked pid {process.pid} for hickup files in {home}/.ave/hickup')
    return 0


def _list(home: str, args: argparse.Namespace) -> int:
    broker_config = config.load_broker_config(home)
    host, port = broker_config['host'], broker_config['port']
    broker = RemoteControl((_WILDCARDS.get(host, host), port), None,
                           timeout=LIST_TIMEOUT, optimist=False)
    try:
        with broker:
            entries = broker.equipment()
    except ConnectionRefused:
        raise Failure(f'not running (nothing listens on {host}:{port})') from None
    except ConnectionException as error:
        raise Failure(f'the broker at {host}:{port} did not answer: {error}') from None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get('profile'), dict) for e in entries):
        raise Failure(f'the broker at {host}:{port} sent a malformed equipment listing')
    shown = entries if args.action == 'list_all' \
        else [entry for entry in entries if entry.get('state') == 'available']
    identities = _identities()
    for line in sorted(_line(entry['profile'], identities) + _mark(entry) for entry in shown):
        print(line)
    if not shown:
        print(f'ave-broker: {_nothing_listed(entries)}', file=sys.stderr)
    return 0


def _mark(entry: dict) -> str:
    """What an item that is not available is doing, as a trailing shell comment."""
    state = entry.get('state')
    if state == 'available':
        return ''
    text = f'  # {printable(str(state))}'
    holder = entry.get('holder')
    if state == 'held' and isinstance(holder, dict):
        text += f' by {holder_text(holder)}'
    since = entry.get('since')
    if isinstance(since, (int, float)) and not isinstance(since, bool):
        text += f' since {since_text(since, time.time())}'
    return text


def _nothing_listed(entries: list[dict]) -> str:
    if not entries:
        return ('the broker lists no equipment (declare it in broker.json, or plug it in; '
                'workspaces are made on demand and never listed)')
    return (f'nothing is available now ({len(entries)} items held, releasing or offline; '
            '--list-all shows them)')


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
