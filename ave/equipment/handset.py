"""Android handsets: found by their adb USB interface, driven with ``adb -s SERIAL``.

The broker's lister sees a handset when udev reports a USB interface of class 0xff,
subclass 0x42, protocol 0x01: the interface adb talks to, present only while USB
debugging is on. Its serial is the USB device's serial number, which is also what
adb calls the device. A handset's profile::

    {'type': 'handset', 'serial': '2A111FDH200B7Q', 'vendor': '18d1', 'product': '4ee2',
     'sysfs_path': '/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2',
     'power_state': 'boot_completed', 'platform': 'android', 'pretty': 'bench 3'}

``power_state`` is what adb says: ``offline`` (adb cannot reach it: not yet seen by
the adb server, unauthorized, or gone), ``online`` (adb reaches it, but Android has
not finished booting, or it runs recovery) or ``boot_completed``. The lister reads it
when the handset appears and again every few seconds, because a booting handset
changes state without udev noticing. ``pretty`` comes from broker.json (see
``ave.equipment.udev``).

Every resource method runs ``adb -s SERIAL ...`` in the session's sandbox
(``ave.sandbox``): a job chooses what ``shell`` runs and which files ``push``, ``pull``
and ``install`` touch, so the adb client gets no more of the host than any other job
command. It reaches the handset through the host's adb server on loopback, which must
be running outside the sandbox (a server the client starts inside would die with the
command and could not reach USB). Host paths must lie in one of the job's workspaces.
The ``adb`` found first on the broker's PATH is the one used. Failures raise
``HandsetError`` with the command, its exit code and output.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import shlex
import time
from collections.abc import Callable
from typing import Any

from ave import sandbox
from ave.cmd import check_timeout
from ave.cmd import run as run_command
from ave.cmd.tail import shown
from ave.equipment import REPLY_LIMIT, EquipmentType, Resource, fitted_to_reply
from ave.equipment.udev import (attribute_of, check_declared, declared_names,
                                declared_profile, property_of, usb_device_of, usb_ids,
                                with_pretty)
from ave.equipment.workspace_paths import PathError, is_within
from ave.exceptions import AveException, RunError, Timeout
from ave.profile import Profile

_log = logging.getLogger(__name__)

ADB = 'adb'
POWER_STATES = ('offline', 'online', 'boot_completed')

#: The adb interface as the kernel announces it: class/subclass/protocol in decimal.
ADB_INTERFACE = '255/66/1'

#: Limits for adb commands, so that one stuck on a dead USB link cannot hold a
#: session (or the lister) forever. Reading the state is quick when adb works at all;
#: copying files and installing packages can take minutes on a slow handset.
PROBE_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0
TRANSFER_TIMEOUT = 900.0

#: How often wait_power_state asks adb; a handset boots in tens of seconds.
POLL_INTERVAL = 0.5

# States adb reports for a reachable handset that is not running Android proper.
_NOT_BOOTED = ('recovery', 'rescue', 'sideload')


class HandsetError(AveException):
    """An adb command on a handset failed or could not run.

    Details (also attributes): ``serial``, ``cmd`` (the adb argument list),
    ``exit_code`` (None when adb did not run) and ``out``.
    """


class HandsetProfile(Profile):
    """A handset's profile; ``serial`` (the adb serial) tells two apart."""

    identity = 'serial'


def adb_argv(serial: str, *args: str) -> list[str]:
    """The command line that runs ``adb args`` on one handset."""
    return [ADB, '-s', serial, *args]


def shell_argv(serial: str, command: str) -> list[str]:
    """``adb shell`` without a remote terminal (-T) and without our stdin (-n).

    adb would otherwise allocate a terminal on the handset, because ave.cmd runs it
    on one here, and that mixes the command's stderr into its output and can leave a
    command that reads its input waiting forever.
    """
    return adb_argv(serial, 'shell', '-T', '-n', command)


Runner = Callable[..., tuple[int, str]]


def read_power_state(serial: str, run: Runner = run_command) -> str:
    """Ask adb for a handset's power state; raises RunError when adb cannot run.

    ``run`` runs the adb commands (``ave.cmd.run``, or a sandbox's ``run``).
    """
    try:
        code, out = run(adb_argv(serial, 'get-state'), timeout=PROBE_TIMEOUT)
    except Timeout:
        return 'offline'
    state = _last_line(out) if code == 0 else ''
    if state in _NOT_BOOTED:
        return 'online'
    if state != 'device':
        return 'offline'
    try:
        code, out = run(shell_argv(serial, 'getprop sys.boot_completed'),
                        timeout=PROBE_TIMEOUT)
    except Timeout:
        return 'online'
    return 'boot_completed' if code == 0 and _last_line(out) == '1' else 'online'


def _last_line(out: str) -> str:
    """adb starting its server prints progress first; the answer comes last."""
    lines = out.strip().splitlines()
    return lines[-1].strip() if lines else ''


class Handset(Resource):
    """One handset as its holder's session drives it; every call runs adb, sandboxed.

    Host paths (``push``'s source, ``pull``'s destination, the package to install)
    are absolute paths in one of the job's workspaces (allocated in the same
    session): nothing else is writable in the sandbox, and nothing of another job's
    is visible there.
    """

    def __init__(self, profile: Profile, settings: dict) -> None:
        super().__init__(profile, settings)
        self._serial: str = _string('serial', profile.get('serial'))

    def shell(self, cmd: str | list[str], timeout: float = 0) -> str:
        """Run a shell command on the handset and return its output.

        ``cmd`` is a command line for the handset's shell, or a list of arguments
        that is quoted for it. ``timeout`` is in seconds, 0 for none. A non-zero exit
        status raises HandsetError carrying ``exit_code`` and ``out``.
        """
        if isinstance(cmd, list):
            cmd = shlex.join([_string('cmd item', arg) for arg in cmd])
        argv = shell_argv(self._serial, _string('cmd', cmd))
        return self._adb(argv, check_timeout(timeout))

    def push(self, src: str, dst: str) -> None:
        """Copy the file or directory ``src`` of a workspace to ``dst`` on the handset."""
        self._adb(adb_argv(self._serial, 'push', _local('src', src), _string('dst', dst)),
                  TRANSFER_TIMEOUT)

    def pull(self, src: str, dst: str) -> None:
        """Copy ``src`` on the handset to ``dst`` in a workspace."""
        self._adb(adb_argv(self._serial, 'pull', _string('src', src), _local('dst', dst)),
                  TRANSFER_TIMEOUT)

    def install(self, apk: str) -> None:
        """Install (or replace) the package in the workspace file ``apk``.

        Old adb versions exit 0 even when the package manager refused the package,
        so its answer is checked as well.
        """
        argv = adb_argv(self._serial, 'install', '-r', _local('apk', apk))
        out = self._adb(argv, TRANSFER_TIMEOUT)
        if 'Failure' in out:
            raise self._error(argv, 'the package manager refused the package', out, 0)

    def reboot(self) -> None:
        """Restart the handset; it goes offline, then comes back (wait_power_state)."""
        self._adb(adb_argv(self._serial, 'reboot'), COMMAND_TIMEOUT)

    def get_power_state(self) -> str:
        """'offline', 'online' or 'boot_completed', asked of adb now."""
        try:
            return read_power_state(self._serial, self._runner())
        except RunError as err:
            raise self._error(adb_argv(self._serial, 'get-state'),
                              f'cannot run adb: {err}') from err

    def wait_power_state(self, states: str | list[str], timeout: float = 0) -> str:
        """Wait until the handset is in one of ``states``; return the state reached.

        ``timeout`` in seconds, 0 to wait as long as it takes; on expiry Timeout is
        raised naming the last state seen.
        """
        wanted = _power_states(states)
        limit = check_timeout(timeout)
        deadline = time.monotonic() + limit if limit else math.inf
        while True:
            state = self.get_power_state()
            if state in wanted:
                return state
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout({'message': f'handset {self._serial!r} did not reach '
                               f'{" or ".join(wanted)} within {limit:g} s (it is {state})',
                               'serial': self._serial, 'state': state})
            time.sleep(min(POLL_INTERVAL, remaining))

    def _runner(self) -> Runner:
        """Runs commands in the session's sandbox on behalf of this handset; their
        output is cut to what one reply can carry."""
        return functools.partial(sandbox.current().run, owner=self,
                                 max_output=REPLY_LIMIT)

    def _adb(self, argv: list[str], timeout: float) -> str:
        """Run adb; its output with the local terminal's \\r\\n made plain newlines."""
        try:
            code, out = self._runner()(argv, timeout=timeout)
        except RunError as err:
            raise self._error(argv, f'cannot run adb: {err}') from err
        except Timeout as err:
            raise Timeout({'message': f'handset {self._serial!r}: {shlex.join(argv)} did '
                           f'not finish within {timeout:g} s and was killed',
                           'serial': self._serial, 'cmd': argv,
                           'out': _plain(err.out)}) from err
        out = fitted_to_reply(_plain(out))
        if code != 0:
            raise self._error(argv, f'exited with status {code}', out, code)
        return out

    def _error(self, argv: list[str], problem: str, out: str = '',
               exit_code: int | None = None) -> HandsetError:
        message = f'handset {self._serial!r}: {shlex.join(argv)} {problem}'
        if out.strip():
            message += f' (output: {shown(out)})'
        return HandsetError({'message': message, 'serial': self._serial, 'cmd': argv,
                             'exit_code': exit_code, 'out': out})


class HandsetType(EquipmentType):
    """Handsets are found by the lister and may be named in broker.json."""

    name = 'handset'
    profile_class = HandsetProfile
    resource_class = Handset
    udev_subsystems = ('usb',)
    #: A job that does not say which power state it needs wants a usable handset.
    #: The allocator fills this in for requests that leave the key out.
    request_defaults = {'power_state': 'boot_completed'}

    def load_settings(self, home: str) -> dict:
        """Friendly names by serial, from the handset entries of broker.json."""
        return {'pretty': declared_names(home, self.name, 'serial')}

    def validate_entry(self, entry: dict) -> None:
        """A declared handset has a serial and optionally a friendly name, nothing else."""
        check_declared(entry, 'serial')

    def profile_of(self, entry: dict) -> HandsetProfile:
        """A declared handset nobody has seen yet: offline until the lister finds it."""
        return declared_profile(HandsetProfile, entry, platform='android',
                                power_state='offline')

    def from_udev(self, device: Any, settings: dict) -> HandsetProfile | None:
        """The profile of a handset whose adb interface ``device`` is, else None.

        Runs adb to read the power state, which is why this belongs in the lister
        and never on the broker loop.
        """
        if property_of(device, 'INTERFACE') != ADB_INTERFACE:
            return None
        usb_device = usb_device_of(device)
        if usb_device is None:
            return None
        # The sysfs attribute is the serial exactly as the handset reports it, which
        # is what adb uses; udev's ID_SERIAL_SHORT has odd characters replaced.
        serial = attribute_of(usb_device, 'serial') or property_of(usb_device,
                                                                   'ID_SERIAL_SHORT')
        if serial is None:
            _log.warning('adb interface %s has no USB serial number; ignored',
                         device.sys_path)
            return None
        vendor, product = usb_ids(usb_device)
        values = {'type': self.name, 'serial': serial, 'vendor': vendor,
                  'product': product, 'sysfs_path': usb_device.sys_path,
                  'power_state': _probed_power_state(serial), 'platform': 'android'}
        return HandsetProfile(with_pretty(values, settings, 'serial'))


#: The plug-in instance published through the ``ave.equipment`` entry point.
HANDSET = HandsetType()


def _probed_power_state(serial: str) -> str:
    """The power state for a lister's report: without a working adb, 'offline'."""
    try:
        return read_power_state(serial)
    except RunError as err:
        _log.warning('cannot run adb for handset %s: %s', serial, err)
        return 'offline'


def _power_states(states: Any) -> list[str]:
    wanted = [states] if isinstance(states, str) else states
    if not isinstance(wanted, list) or not wanted:
        raise ValueError(f'states must be a power state or a non-empty list of them, '
                         f'got {states!r}')
    for state in wanted:
        if state not in POWER_STATES:
            raise ValueError(f'unknown power state {state!r} (expected one of: '
                             f'{", ".join(POWER_STATES)})')
    return wanted


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f'{name} must be a non-empty string, got {value!r}')
    return value


def _local(name: str, value: Any) -> str:
    """A host path for adb: absolute, and inside one of the session's workspaces.

    Checked here for a clear error; the sandbox is what enforces it, since adb runs
    where nothing else is writable and other jobs' files are not there.
    """
    path = _string(name, value)
    if not os.path.isabs(path):
        raise ValueError(f'{name} must be an absolute path in one of your workspaces, '
                         f'got {path!r}')
    real = os.path.realpath(path)
    if not any(is_within(real, top) for top in sandbox.current().writable_paths()):
        raise PathError({'message': f'{name} {path!r} is not in a workspace of this job: '
                                    'allocate a workspace with the handset and use paths '
                                    'in it', 'path': path})
    return path


def _plain(out: str) -> str:
    return out.replace('\r\n', '\n')



