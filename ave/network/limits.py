"""What any one peer, or all of them together, may make a Control hold.

Every number here is something an anonymous peer controls: how many connections it
opens, how large a frame it announces, how long it takes to say who it is. The
defaults protect a lab host with a few hundred jobs; a broker reads its own from the
``"limits"`` entry of broker.json.
"""
from __future__ import annotations

import logging
import resource
from collections import Counter
from dataclasses import dataclass, replace

from ave.network.framing import DEFAULT_LIMIT

log = logging.getLogger(__name__)

#: Descriptors a service keeps for itself beside its peers: listener, selector,
#: wake-up socket, pidfds, log files, sessions' links, commands' ptys.
DESCRIPTOR_MARGIN = 128


@dataclass(frozen=True)
class Limits:
    """Caps a Control enforces on its peers."""

    #: Largest frame accepted from an authenticated peer.
    frame_bytes: int = DEFAULT_LIMIT
    #: Partly received frames of all peers together; a read that would go beyond it
    #: drops the peer doing the reading.
    buffered_bytes: int = 256 * 1024 * 1024
    #: Accepted connections in total, and from one remote address.
    connections: int = 4096
    connections_per_address: int = 1024
    #: Seconds a new peer has to finish its handshake.
    handshake_s: float | None = None

    @classmethod
    def from_config(cls, limits: dict) -> Limits:
        """The caps of broker.json's (checked) ``"limits"``, fitted to the descriptors."""
        return cls(frame_bytes=limits['frame_bytes'],
                   buffered_bytes=limits['buffered_bytes'],
                   connections=limits['connections'],
                   connections_per_address=limits['connections_per_address'],
                   handshake_s=limits['handshake_s']).fitted_to_descriptors()

    def fitted_to_descriptors(self) -> Limits:
        """These limits with ``connections`` lowered below the descriptor limit.

        The soft limit is raised towards the hard one first, so a unit's LimitNOFILE
        (or a generous shell) is used; what cannot be had is logged, not fatal.
        """
        wanted = self.connections + DESCRIPTOR_MARGIN
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
                soft = new_soft
            except (ValueError, OSError) as error:
                log.warning('cannot raise the descriptor limit to %d: %s', new_soft, error)
        if soft == resource.RLIM_INFINITY or soft >= wanted:
            return self
        fitted = max(2, soft - DESCRIPTOR_MARGIN)
        log.warning('at most %d connections: the descriptor limit is %d (raise '
                    'LimitNOFILE to allow the configured %d)', fitted, soft, self.connections)
        # One address may not take every place: the others must still get in.
        return replace(self, connections=fitted,
                       connections_per_address=min(self.connections_per_address,
                                                   fitted // 2))


class Admission:
    """Counts accepted connections, in total and per remote address, against the
    caps of ``Limits``: ``refusal`` says why a newcomer may not come in."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0
        self.by_address: Counter[str] = Counter()

    def refusal(self, address: str) -> str | None:
        if self.total >= self.limits.connections:
            return f'too many connections (limit {self.limits.connections})'
        if self.by_address[address] >= self.limits.connections_per_address:
            return (f'too many connections from {address} '
                    f'(limit {self.limits.connections_per_address})')
        return None

    def enter(self, address: str) -> None:
        self.total += 1
        self.by_address[address] += 1

    def leave(self, address: str) -> None:
        self.total -= 1
        self.by_address[address] -= 1
        if not self.by_address[address]:
            del self.by_address[address]
