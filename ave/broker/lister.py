"""The broker's lister: equipment found through udev, reported to the broker.

Handsets and serial consoles come and go as people plug them in. The lister is a
child process of the broker (``ave-broker-lister``) that asks udev, through pyudev,
what is there and what changes, maps each device to a profile with the equipment
types' ``from_udev``, and reports to the broker with the ``share`` key:

1. It starts watching udev events, then lists every device of the types' subsystems
   and sends one ``sync_equipment(type, profiles)`` per type. The snapshot corrects
   whatever changed while no lister ran, so a restarted lister needs no memory.
2. Then it waits for events. A device that appears or changes is mapped again and
   reported with ``add_equipment`` if its profile differs from what was last
   reported; one that disappears is reported with ``remove_equipment``, using the
   profile reported for it earlier: a removed device has almost nothing left to
   read.
3. Every ``REFRESH_INTERVAL`` seconds without an event it maps every known device
   again, because a handset's power state changes (it finishes booting, say)
   without udev noticing.

Anything that goes wrong with the broker connection ends the lister; the broker
restarts it, and the snapshot of step 1 puts things right. The lister also dies with
the broker (a parent-death signal), so it never reports to a successor that did not
start it.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import pyudev

from ave.equipment import EquipmentType
from ave.exceptions import AveException
from ave.network.control import RemoteControl
from ave.network.process import Process
from ave.profile import Profile

log = logging.getLogger(__name__)

#: Bounds connecting to the broker and waiting for each of its answers.
RPC_TIMEOUT = 30.0

#: Seconds between looks at known devices for changes udev does not announce.
#: Each look runs adb twice per handset, so this is not made much shorter.
REFRESH_INTERVAL = 3.0

Key = tuple[str, str]


class Lister(Process):
    """Reports the equipment udev shows to the broker at ``address``."""

    def __init__(self, address: tuple[str, int], share_key: str | None,
                 types: dict[str, EquipmentType], type_settings: dict[str, dict],
                 home: str, logging: bool = False) -> None:
        super().__init__(logging=logging, proc_name='ave-broker-lister')
        self.address = address
        self.share_key = share_key
        self.types = dict(types)
        self.type_settings = type_settings
        self.home = home
        self.broker_pid = os.getpid()
        # What was last reported for each device, by sysfs path.
        self.reported: dict[str, Profile] = {}

    def perform_prctl(self, death_signal: int = signal.SIGTERM) -> None:
        """Die with the broker; if it already died during the fork, end right here."""
        super().perform_prctl(death_signal)
        if os.getppid() != self.broker_pid:
            raise AveException('the broker ended before its lister started')

    def run(self) -> None:
        broker = RemoteControl(self.address, authkey=self.share_key, timeout=RPC_TIMEOUT)
        context = pyudev.Context()
        # Watching starts before listing, so a device plugged in between is not missed.
        monitor = pyudev.Monitor.from_netlink(context)
        for subsystem in self.subsystems():
            monitor.filter_by(subsystem)
        monitor.start()
        self.sync(broker, context)
        self.watch(broker, context, monitor)

    # -- the three steps ---------------------------------------------------------------

    def sync(self, broker: Any, context: pyudev.Context) -> None:
        """List everything now present and send the broker one snapshot per type."""
        self.reported.clear()
        for subsystem in self.subsystems():
            for device in context.list_devices(subsystem=subsystem):
                profile = self.profile_of(device)
                if profile is not None:
                    self.reported[device.sys_path] = profile
        for name in sorted(self.types):
            profiles = {self.key_of(p): dict(p) for p in self.reported.values()
                        if p['type'] == name}
            broker.sync_equipment(name, list(profiles.values()))
            log.info('lister: %d %s item(s) present', len(profiles), name)

    def watch(self, broker: Any, context: pyudev.Context, monitor: pyudev.Monitor) -> None:
        """Report events as they come, and look at known devices between them."""
        next_refresh = time.monotonic() + REFRESH_INTERVAL
        while True:
            device = monitor.poll(timeout=max(0.0, next_refresh - time.monotonic()))
            if device is not None:
                self.handle(broker, device)
            if time.monotonic() >= next_refresh:
                self.refresh(broker, context)
                next_refresh = time.monotonic() + REFRESH_INTERVAL

    def refresh(self, broker: Any, context: pyudev.Context) -> None:
        """Map every known device again and report the ones whose profile changed."""
        for sys_path in list(self.reported):
            try:
                device = pyudev.Devices.from_sys_path(context, sys_path)
            except pyudev.DeviceNotFoundError:
                continue  # unplugged: its remove event is waiting to be handled
            self.seen(broker, device)

    # -- single events -----------------------------------------------------------------

    def handle(self, broker: Any, device: pyudev.Device) -> None:
        """One udev event: a device went away, moved, or appeared or changed."""
        if device.action == 'remove':
            self.gone(broker, device.sys_path)
            return
        if device.action == 'move' and device.properties.get('DEVPATH_OLD'):
            self.gone(broker, '/sys' + device.properties['DEVPATH_OLD'])
        self.seen(broker, device)

    def seen(self, broker: Any, device: pyudev.Device) -> None:
        """Report a present device if what it is differs from what was reported."""
        profile = self.profile_of(device)
        before = self.reported.get(device.sys_path)
        if profile == before:
            return
        if profile is None or (before is not None
                               and self.key_of(before) != self.key_of(profile)):
            self.gone(broker, device.sys_path)
        if profile is not None:
            self.reported[device.sys_path] = profile
            broker.add_equipment(dict(profile))
            log.info('lister: reported %s', dict(profile))

    def gone(self, broker: Any, sys_path: str) -> None:
        """Report a device's item as removed, unless another device still shows it.

        Two devices can claim one identity (cheap handsets sharing a serial number);
        the item is there as long as one of them is.
        """
        profile = self.reported.pop(sys_path, None)
        if profile is None:
            return
        key = self.key_of(profile)
        if any(self.key_of(other) == key for other in self.reported.values()):
            return
        broker.remove_equipment(dict(profile))
        log.info('lister: reported %s %s gone', *key)

    # -- mapping devices to items ------------------------------------------------------

    def profile_of(self, device: pyudev.Device) -> Profile | None:
        """What ``device`` is, asked of each type watching its subsystem, or None.

        A type that fails on one device is logged and skipped: one odd device, or a
        bug in a lab's own plug-in, must not blind the broker to all the others.
        """
        for name, equipment_type in self.types.items():
            if device.subsystem not in equipment_type.udev_subsystems:
                continue
            try:
                profile = equipment_type.from_udev(device, self.type_settings.get(name, {}))
            except Exception:
                log.exception('lister: %s could not map %s', name, device.sys_path)
                continue
            if profile is not None:
                return profile
        return None

    def subsystems(self) -> list[str]:
        return sorted({s for t in self.types.values() for s in t.udev_subsystems})

    def key_of(self, profile: Profile) -> Key:
        return self.types[profile['type']].key_of(profile)
