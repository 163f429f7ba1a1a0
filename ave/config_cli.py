"""``ave-config``: create /etc/ave/user and a home's default configuration files, or
check a home's configuration without starting a broker.

Exit status 0 on success (including "everything already existed"), 1 when the
work failed or a file is wrong (one line on stderr says why, the same line
``ave-broker --start`` would give), 2 for a wrong command line.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ave import __version__, config
from ave.exceptions import AveException


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='ave-config',
        description='Create AVE configuration files. Existing files are never changed.')
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument('--create-etc', action='store_true',
                        help='write the file naming the account that runs AVE; the '
                             'account name is read from stdin unless --user is given')
    action.add_argument('--create-default', action='store_true',
                        help='write default broker.json, authkeys.json and '
                             'workspace.json under HOME/.ave/config')
    action.add_argument('--check', action='store_true',
                        help='check broker.json (each equipment entry by its plug-in), '
                             'authkeys.json and workspace.json as the broker would, '
                             'without starting one')
    parser.add_argument('--user', metavar='NAME',
                        help='with --create-etc: the account, instead of reading stdin')
    parser.add_argument('--home', metavar='DIR',
                        help='with --create-default (which creates it) or --check (for '
                             'which it must exist): the home to use, instead of the one '
                             'named by the etc file, else $HOME, else your account\'s')
    parser.add_argument('--etc-path', metavar='PATH', default=config.ETC_PATH,
                        help='the etc file to write or consult (default: %(default)s)')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ave-config``; return the exit status (argparse exits 2 on a bad command line)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.user is not None and not args.create_etc:
        parser.error('--user only goes with --create-etc')
    if args.home is not None and not (args.create_default or args.check):
        parser.error('--home only goes with --create-default or --check')
    try:
        if args.check:
            return _check(args)
        created, skipped = _run(args)
    except (AveException, OSError) as err:
        print(f'ave-config: {_one_line(err)}', file=sys.stderr)
        return 1
    for path in created:
        print(f'created {path}')
    for path in skipped:
        print(f'skipped {path} (already exists)')
    return 0


def _run(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Do what the command line asked; return the created and skipped paths."""
    if args.create_etc:
        if args.user is None and sys.stdin.isatty():
            print('account name to run AVE (end with Ctrl-D):', file=sys.stderr)
        return config.create_etc(args.etc_path, args.user)
    home = config.resolve_home(args.home, args.etc_path)
    new_home = not os.path.isdir(home)
    created, skipped = config.create_default(home)
    return ([home] if new_home else []) + created, skipped


def _check(args: argparse.Namespace) -> int:
    """Check every file of the home; print what was found in each on success."""
    from ave.broker.daemon import check_home  # the broker's own checks, loaded only here
    home = config.existing_home(args.home) if args.home is not None \
        else config.resolve_home(None, args.etc_path)
    checked = check_home(home)
    directory = config.config_dir(home)
    equipment, stacks = checked.broker_config['equipment'], checked.broker_config['stacks']
    print(f'{directory}/broker.json: ok ({len(equipment)} equipment entries, '
          f'{len(stacks)} stacks, port {checked.broker_config["port"]})')
    missing = [account for account in ('admin', 'share') if not checked.authkeys.get(account)]
    note = f'; no {" or ".join(missing)} key: every client may make those calls' \
        if missing else ''
    print(f'{directory}/authkeys.json: ok (accounts: '
          f'{", ".join(sorted(checked.authkeys)) or "none"}{note})')
    print(f'{directory}/workspace.json: ok')
    return 0


def _one_line(err: Exception) -> str:
    """An OSError as "path: reason"; AVE errors already are one line."""
    if isinstance(err, OSError) and err.filename is not None:
        return f'{err.filename}: {err.strerror}'
    return str(err)


if __name__ == '__main__':
    sys.exit(main())
