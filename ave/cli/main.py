"""``ave``: the lab user's command. See ``ave --help`` and each ``ave COMMAND --help``.

Exit status 0 on success; 1 when the work failed, with one line on stderr starting
with ``ave: ``; 2 for a wrong command line (also one line); ``ave run`` exits with
its command's status (128 + N when a signal N ended it, 127 when it cannot be
found, 126 when it cannot be run).

Options follow the subcommand (``ave run --home H --wait 60 relay,uid=r1 -- cmd``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from ave import __version__
from ave.cli import completion, console, holding, listing
from ave.cli.connect import Failure, parse_address
from ave.cli.profiles import SYNTAX, ProfileSyntaxError, parse_profile, parse_request
from ave.exceptions import AveException
from ave.network.exceptions import ConnectionException

PROFILE_HELP = (f'equipment to ask for: {SYNTAX}; a value may hold "=" but not ","; a '
                'JSON list of profiles asks for equipment of one stack')


class _Parser(argparse.ArgumentParser):
    """Reports a wrong command line in one line, like every other failure."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f'ave: {message} (see {self.prog} --help)\n')


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog='ave', description='Look at the lab and use its equipment '
                     'from a shell. Every COMMAND takes --help.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND', required=True,
                                     parser_class=_Parser)
    where = _Parser(add_help=False)
    where.add_argument('--broker', metavar='HOST:PORT', type=_address,
                       help="the broker to ask (default: the home's broker.json)")
    where.add_argument('--home', metavar='DIR',
                       help='the AVE home with .ave/config (default: the one in '
                            '/etc/ave/user, else $HOME, else your account\'s)')
    as_json = _Parser(add_help=False)
    as_json.add_argument('--json', action='store_true', help='print JSON, not a table')
    holding_options = _Parser(add_help=False)
    holding_options.add_argument('--wait', metavar='S', type=_seconds, default=0,
                                 help='wait up to S seconds (or "forever") while others '
                                      'hold it (default: fail at once)')
    holding_options.add_argument('--job', metavar='LABEL',
                                 help='what this hold is for, shown by ave who (default: '
                                      '$AVE_JOB, or the CI job)')

    def command(name: str, handler: Callable[[argparse.Namespace], int], text: str,
                *parents: _Parser, usage: str | None = None
                ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text, usage=usage,
                                  parents=[where, *parents])
        sub.set_defaults(handler=handler)
        return sub

    sub = command('list', listing.list_command, 'list the equipment that is available '
                  '(--all: all of it, with state, holder and since when)', as_json)
    sub.add_argument('--all', action='store_true', help='every item, whatever its state')
    command('who', listing.who_command, 'list who holds which equipment', as_json)
    command('queue', listing.queue_command, 'list the requests waiting for equipment',
            as_json)
    sub = command('hold', holding.hold_command, 'hold equipment until Ctrl-C',
                  holding_options, as_json)
    sub.add_argument('profiles', metavar='PROFILE', nargs='+', help=PROFILE_HELP)
    sub = command('run', holding.run_command, 'hold equipment while a command runs; the '
                  'command finds the profiles it got as JSON in $AVE_RESOURCES and '
                  "ave exits with the command's status", holding_options,
                  usage='ave run [options] PROFILE... -- CMD [ARG...]')
    sub.add_argument('profiles', metavar='PROFILE', nargs='+', help=PROFILE_HELP)
    sub = command('console', console.console_command, 'open a serial console: keys go to '
                  'it, its output comes here; Ctrl-] or the end of input ends it',
                  holding_options)
    sub.add_argument('profile', metavar='PROFILE', help='the serial console, as in '
                     'serial,uid=FTDI_A50285BI-if00')
    sub = command('relay', holding.relay_command, 'switch a relay circuit and hold the '
                  'relay until Ctrl-C (or --for S); releasing it puts every circuit back '
                  'to its default', holding_options)
    sub.add_argument('profile', metavar='PROFILE', help='the relay, as in relay,uid=r1')
    sub.add_argument('circuit', metavar='CIRCUIT', help='the circuit name')
    sub.add_argument('state', choices=('open', 'close'), help='open or close it')
    sub.add_argument('--for', dest='hold_for', metavar='S', type=_finite_seconds,
                     help='release the relay after S seconds (a power cycle)')
    sub = command('kick', holding.kick_command, "end the session of whoever holds the "
                  "equipment (needs the admin key in the home's authkeys.json)")
    sub.add_argument('profile', metavar='PROFILE', help='the held item, as in relay,uid=r1')
    completion_parser = commands.add_parser(
        'completion', help='print the bash completion script for ave',
        description='print the bash completion script; load it with '
                    'source <(ave completion)')
    completion_parser.set_defaults(handler=lambda args: completion.print_script(parser))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ave``; return the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    words, command_line = _split_command(words)
    parser = build_parser()
    if words and words[0].startswith('-') and words[0] not in ('-h', '--help', '--version'):
        parser.error(f'options follow the command, as in: ave list {words[0]} ...')
    args = parser.parse_args(words)
    try:
        _finish_parsing(args, command_line)
    except ProfileSyntaxError as error:
        parser.exit(2, f'ave: {error}\n')
    except ValueError as error:
        parser.exit(2, f'ave: {error} (see ave {args.command} --help)\n')
    try:
        return args.handler(args)
    except (Failure, AveException, ConnectionException) as error:
        return _fail(_one_line(str(error)) or type(error).__name__)
    except BrokenPipeError:
        _silence_stdout()  # the reader left (ave list | head): nothing more to tell it
        return 1
    except OSError as error:
        where = f'{error.filename}: ' if error.filename else ''
        return _fail(f'{where}{error.strerror or error}')
    except KeyboardInterrupt:
        return _fail('interrupted', 130)


def _split_command(words: list[str]) -> tuple[list[str], list[str] | None]:
    """``ave run``'s own words and, after the first ``--``, the command it runs."""
    if words[:1] == ['run'] and '--' in words:
        cut = words.index('--')
        return words[:cut], words[cut + 1:]
    return words, None


def _finish_parsing(args: argparse.Namespace, command_line: list[str] | None) -> None:
    """Read PROFILE arguments and ``ave run``'s command; ValueError for the user."""
    if args.command == 'run':
        if not command_line:
            raise ValueError('ave run needs the command after --, as in: ave run '
                             'relay,uid=r1 -- ./flash.sh')
        args.command_line = command_line
    if hasattr(args, 'profiles'):
        args.profiles = [parse_request(text) for text in args.profiles]
    if hasattr(args, 'profile'):
        args.profile = parse_profile(args.profile)


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _seconds(text: str) -> float | None:
    """``--wait``: seconds, or "forever" (None: no limit)."""
    if text == 'forever':
        return None
    try:
        return _finite_seconds(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f'expected seconds (a number >= 0) or "forever", '
                                         f'got {text!r}') from None


def _finite_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f'expected seconds (a number >= 0), got {text!r}')
    return value


def _one_line(text: str) -> str:
    """A message fit for one line of stderr: the lines of a longer one joined."""
    return '; '.join(line.strip() for line in text.strip().splitlines() if line.strip())


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _fail(message: str, status: int = 1) -> int:
    print(f'ave: {message}', file=sys.stderr)
    return status


if __name__ == '__main__':
    sys.exit(main())
