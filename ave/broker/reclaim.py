"""Tearing equipment down when no session can: after a session was killed, and at start.

A session tears its own resources down. When it cannot (it crashed, or was SIGKILLed
because its teardown hung), the broker still owes the next holder a reset relay and
must not leave a job's files on disk. It never runs resource code on its own loop, so
it forks a ``Reclaimer``: a short-lived child that builds each resource from its
profile and settings, tears it down, and exits 0 only if every teardown worked. At a
fresh start the same child sweeps what no session owns (workspace directories left
by a crash), through each equipment type's ``sweep``.
"""
from __future__ import annotations

import logging
import signal
import sys

from ave.equipment import EquipmentType
from ave.network.process import Process

log = logging.getLogger(__name__)

#: Exit status of a reclaimer some of whose teardowns failed.
SOME_FAILED = 3


class Reclaimer(Process):
    """Tears down ``items`` (profile, settings) and sweeps ``sweeps`` (type name ->
    identities still owned by live sessions) in a child process."""

    def __init__(self, types: dict[str, EquipmentType], items: list[tuple[dict, dict]],
                 sweeps: dict[str, tuple[dict, set[str]]] | None = None,
                 home: str | None = None, logging: bool = False) -> None:
        super().__init__(logging=logging, proc_name='ave-broker-reclaim')
        self.home = home
        self.types = types
        self.items = items
        self.sweeps = sweeps or {}

    def initialize(self) -> None:
        super().initialize()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a foreground broker's Ctrl-C
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def run(self) -> None:
        failed = 0
        for profile, settings in self.items:
            failed += not self._tear_down(profile, settings)
        for type_name, (settings, keep) in self.sweeps.items():
            try:
                self.types[type_name].sweep(settings, keep)
            except Exception:
                log.exception('sweeping %s equipment failed', type_name)
                failed += 1
        sys.exit(SOME_FAILED if failed else 0)

    def _tear_down(self, profile: dict, settings: dict) -> bool:
        try:
            equipment_type = self.types[profile['type']]
            resource = equipment_type.resource_class(
                equipment_type.profile_class(profile), settings)
            resource._teardown()
        except Exception:
            log.exception('reclaiming %s failed', profile)
            return False
        log.info('reclaimed %s', profile)
        return True
