"""What a job asks the broker for, checked, and what the broker answers with.

Profiles arrive from anonymous peers: every one is checked to be a profile (string
keys, JSON values) and a single get() may name at most a bounded number, so a peer
cannot make the allocator search an unbounded request.
"""
from __future__ import annotations

from typing import Any

from ave.exceptions import AveException
from ave.profile import Profile

MAX_PROFILES_PER_GET = 64
#: How long a request that does not wait (``wait`` 0) waits all the same when all it
#: lacks is being reset (``Blocker`` reason ``releasing``) and its client may wait:
#: such items are about to be free, and Busy would close the client's session only
#: for it to ask again a moment later. A longer reset still ends in Busy. Clients
#: allow for it in how long they wait for the reply to a get.
RESET_PATIENCE = 2.0


def granted(profiles: list[dict], session: list, authkey: str) -> dict:
    """A get's result: each resource with the session that hosts it (address, where
    None means the broker's own, and key), so one get may span several hosts."""
    return {'resources': [{'profile': profile, 'session': session, 'authkey': authkey}
                          for profile in profiles]}


def parse_request(profiles: tuple) -> list[dict | list[dict]]:
    """Check a get() request: profiles (dicts) and stack groups (lists of dicts)."""
    if not profiles:
        raise AveException('get() needs at least one profile')
    request: list[dict | list[dict]] = []
    count = 0
    for entry in profiles:
        if isinstance(entry, list):
            if not entry:
                raise AveException('an empty group cannot be allocated')
            request.append([checked_profile(member) for member in entry])
            count += len(entry)
        else:
            request.append(checked_profile(entry))
            count += 1
    if count > MAX_PROFILES_PER_GET:
        raise AveException(f'at most {MAX_PROFILES_PER_GET} profiles per get()')
    return request


def checked_profile(value: Any) -> dict:
    """``value`` as a plain dict, once it is known to be a valid profile."""
    Profile.validate(value)
    return dict(value)
