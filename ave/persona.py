"""Dropping root for the account named in /etc/ave/user.

An init system starts the broker as root; the broker then becomes the AVE account
so that equipment, workspaces and files under that account's home belong to it.
UNIX only.
"""
from __future__ import annotations

import os
import pwd

from ave.exceptions import AveException


class PersonaError(AveException):
    """The process cannot become the requested account."""


def become_user(name: str) -> str:
    """Make this process run as account ``name`` for good; return its home directory.

    Only root may do this. The supplementary groups and the group are changed
    before the user id, because once the user id is not root any more the process
    is no longer allowed to change its groups. Real, effective and saved ids all
    change, so root cannot be regained. ``HOME``, ``USER`` and ``LOGNAME`` are set
    so that child processes and ``~`` see the new account.
    """
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PersonaError(f'cannot become {name!r}: no such account') from None
    if os.geteuid() != 0:
        raise PersonaError(f'cannot become {name!r}: only root can change account, '
                           f'this process runs as uid {os.geteuid()}')
    os.initgroups(entry.pw_name, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
    return entry.pw_dir
