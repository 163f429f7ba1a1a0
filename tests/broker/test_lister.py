"""The lister through real ``ave-broker`` daemons and udev devices emulated by umockdev.

Each test runs an umockdev testbed (``tests/data/testbed.py``, run with Debian's
python3 for umockdev's GObject bindings) and starts the broker with umockdev's
preload library and the testbed's directory in its environment: the broker's lister
then lists and watches the testbed through the real libudev, and sees devices added
and removed while it runs exactly as it would see a cable plugged in. adb is the
stand-in ``tests/data/bin/adb``, first on the broker's PATH, whose handsets are
directories the test sets up. Device descriptions are the ``*.umockdev`` files in
``tests/data``.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import psutil
import pytest

import support
from ave.broker.exceptions import NoSuch
from ave.broker.lister import REFRESH_INTERVAL, Lister
from ave.equipment import EquipmentType
from ave.profile import Profile

pytestmark = pytest.mark.timeout(60)

DEBIAN_PYTHON = '/usr/bin/python3'
PRELOAD = 'libumockdev-preload.so.0'

SERIAL = support.HANDSET_SERIAL
HANDSET_USB = '/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2'
CONSOLE_UID = 'FTDI_FT232R_USB_UART_A50285BI-if00'
CONSOLE_USB = '/sys/devices/pci0000:00/0000:00:14.0/usb1/1-3'
CONSOLE_NODE = '/dev/ttyUSB0'

HANDSET_PROFILE = {'type': 'handset', 'serial': SERIAL, 'vendor': '18d1', 'product': '4ee2',
                   'sysfs_path': HANDSET_USB, 'power_state': 'boot_completed',
                   'platform': 'android'}
CONSOLE_PROFILE = {'type': 'serial', 'uid': CONSOLE_UID, 'device_node': CONSOLE_NODE,
                   'vendor': '0403', 'product': '6001', 'power_state': 'online'}

# Long enough for a lister to notice an event, or to be restarted and resync.
SETTLE = 10.0


def umockdev_missing() -> str | None:
    """Why the testbed cannot run here, or None when it can."""
    if shutil.which('umockdev-wrapper') is None:
        return 'umockdev is not installed (Debian package umockdev)'
    probe = subprocess.run([DEBIAN_PYTHON, '-c', "import gi; gi.require_version('UMockdev', "
                            "'1.0')"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return (f'{DEBIAN_PYTHON} cannot load umockdev\'s bindings (Debian packages '
                'python3-gi and gir1.2-umockdev-1.0)')
    return None


class UdevTestbed:
    """Commands to the testbed process; see tests/data/testbed.py for what they do."""

    def __init__(self, process: subprocess.Popen, root: str) -> None:
        self.process = process
        self.root = root

    def add(self, name: str) -> None:
        self.command(f'add {support.DATA / name}')

    def remove(self, sys_path: str) -> None:
        self.command(f'remove {sys_path}')

    def console_write(self, node: str, text: str) -> None:
        self.command(f'write {node} {json.dumps(text)}')

    def console_read(self, node: str, until: str, timeout: float = 5.0) -> str:
        """What the far end of the console received, up to the first ``until``."""
        text = ''
        deadline = time.monotonic() + timeout
        while until not in text and time.monotonic() < deadline:
            text += self.command(f'read {node}')
        return text

    def command(self, line: str):
        self.process.stdin.write(line + '\n')
        self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        assert answer.startswith('ok'), f'testbed refused {line!r}: {answer or "it died"}'
        return json.loads(answer[3:]) if answer != 'ok' else None


@pytest.fixture
def testbed(monkeypatch):
    """An umockdev testbed with a USB host controller, seen by brokers started later."""
    reason = umockdev_missing()
    if reason:
        pytest.skip(reason)
    process = subprocess.Popen(['umockdev-wrapper', DEBIAN_PYTHON, str(support.DATA / 'testbed.py')],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    root = process.stdout.readline().strip()
    try:
        assert root, 'the testbed process did not start'
        monkeypatch.setenv('LD_PRELOAD', PRELOAD)
        monkeypatch.setenv('UMOCKDEV_DIR', root)
        bed = UdevTestbed(process, root)
        bed.add('usb-host.umockdev')
        yield bed
    finally:
        process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        process.stdout.close()
        if root:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def lab(testbed, adb, start_broker):
    """Start a broker (broker.json keywords as for start_broker) that sees the testbed.

    The fixtures it depends on are set up first, so they are torn down after the
    broker has been stopped.
    """
    def start(**broker_json):
        started = start_broker(**broker_json)
        started.admin = started.client(started.admin_key)
        return started
    return start


def wait_until(predicate, timeout: float = SETTLE, step: float = 0.05):
    return support.wait_until(predicate, timeout, step)


def listed(lab, equipment_type: str) -> list[dict]:
    return [p for p in lab.admin.list_equipment() if p['type'] == equipment_type]


def listers_of(lab) -> list[psutil.Process]:
    """The lister children of the lab's broker (the kernel keeps 15 characters of
    'ave-broker-lister')."""
    return [p for p in psutil.Process(lab.pid).children()
            if p.name().startswith('ave-broker-list')]


# -- enumeration -----------------------------------------------------------------------------

def test_equipment_present_at_start_is_listed_with_full_profiles(testbed, adb, lab):
    testbed.add('handset.umockdev')
    testbed.add('serial-console.umockdev')
    adb(SERIAL)
    started = lab()
    assert wait_until(lambda: len(started.admin.list_equipment()) == 2), \
        f'the lister did not report both items: {started.admin.list_equipment()}'
    assert sorted(started.admin.list_equipment(), key=lambda p: p['type']) == \
        [HANDSET_PROFILE, CONSOLE_PROFILE]


def test_console_without_usb_serial_number_is_known_by_its_usb_path(testbed, lab):
    testbed.add('serial-noserial.umockdev')
    started = lab()
    assert wait_until(lambda: listed(started, 'serial'))
    assert listed(started, 'serial')[0]['uid'] == 'pci-0000:00:14.0-usb-0:4:1.0'


def test_handset_adb_has_not_seen_yet_is_listed_offline(testbed, lab):
    testbed.add('handset.umockdev')
    started = lab()
    assert wait_until(lambda: listed(started, 'handset'))
    assert listed(started, 'handset')[0]['power_state'] == 'offline'


# -- events while the broker runs -------------------------------------------------------------

def test_handset_plugged_in_while_running_appears(testbed, adb, lab):
    adb(SERIAL)
    started = lab()
    testbed.add('handset.umockdev')
    assert wait_until(lambda: listed(started, 'handset') == [HANDSET_PROFILE]), \
        f'listed: {listed(started, "handset")}'


def test_handset_unplugged_while_running_disappears(testbed, adb, lab):
    testbed.add('handset.umockdev')
    adb(SERIAL)
    started = lab()
    assert wait_until(lambda: listed(started, 'handset'))
    testbed.remove(HANDSET_USB)
    assert wait_until(lambda: not listed(started, 'handset')), 'the handset is still listed'


def test_console_plugged_in_while_running_can_be_allocated_and_used(testbed, lab):
    started = lab()
    testbed.add('serial-console.umockdev')
    assert wait_until(lambda: listed(started, 'serial'))
    console = started.client().get({'type': 'serial', 'uid': CONSOLE_UID})
    console.write('uname\n')
    assert testbed.console_read(CONSOLE_NODE, until='\n') == 'uname\n'
    testbed.console_write(CONSOLE_NODE, 'Linux\n# ')
    assert console.expect('# ', timeout=5) == 'Linux\n# '


def test_finished_boot_is_reported_without_a_udev_event(testbed, adb, lab):
    testbed.add('handset.umockdev')
    handset = adb(SERIAL, boot_completed='0')
    started = lab()
    assert wait_until(lambda: listed(started, 'handset'))
    assert listed(started, 'handset')[0]['power_state'] == 'online'
    (handset / 'boot_completed').write_text('1\n')
    assert wait_until(lambda: listed(started, 'handset')[0]['power_state'] == 'boot_completed',
                      timeout=REFRESH_INTERVAL + SETTLE), 'the lister missed the boot'


def test_unplugged_while_allocated_stays_allocated_offline_until_released(testbed, adb, lab):
    testbed.add('handset.umockdev')
    adb(SERIAL)
    started = lab()
    assert wait_until(lambda: listed(started, 'handset'))
    client = started.client()
    client.get({'type': 'handset', 'serial': SERIAL})
    testbed.remove(HANDSET_USB)
    assert wait_until(lambda: started.admin.list_allocations_all()[0]['power_state']
                      == 'offline'), 'the held handset does not show as offline'
    assert started.admin.list_available() == []
    client.__exit__(None, None, None)
    assert wait_until(lambda: not started.admin.list_equipment()), \
        'the unplugged handset is still listed after its release'


# -- allocation --------------------------------------------------------------------------------

def test_handset_allocated_by_serial_runs_adb_on_that_handset(testbed, adb, lab):
    testbed.add('handset.umockdev')
    handset_dir = adb(SERIAL)
    (handset_dir / 'fs' / 'greeting').write_text('hello from the handset\n')
    # The stand-in adb keeps its handsets in the test's /tmp, which a sandboxed
    # command cannot see (a real adb reaches its server on loopback instead).
    started = lab(isolation='off')
    assert wait_until(lambda: listed(started, 'handset'))
    handset = started.client().get({'type': 'handset', 'serial': SERIAL})
    assert handset.shell('cat greeting') == 'hello from the handset\n'


def test_friendly_name_from_broker_json_is_in_the_profile_and_allocates(testbed, adb, lab):
    testbed.add('handset.umockdev')
    adb(SERIAL)
    started = lab(equipment=[{'type': 'handset', 'serial': SERIAL, 'pretty': 'bench 3'}])
    assert wait_until(lambda: listed(started, 'handset')[0]['power_state'] == 'boot_completed')
    handset = started.client().get({'type': 'handset', 'pretty': 'bench 3'})
    assert handset.get_profile() == {**HANDSET_PROFILE, 'pretty': 'bench 3'}


def test_declared_handset_never_plugged_in_is_listed_offline(lab):
    started = lab(equipment=[{'type': 'handset', 'serial': 'NOT-HERE', 'pretty': 'bench 9'}])
    assert listed(started, 'handset') == [{'type': 'handset', 'serial': 'NOT-HERE',
                                           'pretty': 'bench 9', 'platform': 'android',
                                           'power_state': 'offline'}]


def test_request_without_power_state_only_gets_a_booted_handset(testbed, adb, lab):
    testbed.add('handset.umockdev')
    adb(SERIAL, boot_completed='0')
    started = lab()
    assert wait_until(lambda: listed(started, 'handset'))
    with pytest.raises(NoSuch):
        started.client().get({'type': 'handset'})


def test_declared_handset_unplugged_stays_listed_offline(testbed, adb, lab):
    testbed.add('handset.umockdev')
    adb(SERIAL)
    started = lab(equipment=[{'type': 'handset', 'serial': SERIAL, 'pretty': 'bench 3'}])
    assert wait_until(lambda: listed(started, 'handset')[0]['power_state'] == 'boot_completed')
    testbed.remove(HANDSET_USB)
    assert wait_until(lambda: [p['power_state'] for p in listed(started, 'handset')]
                      != ['boot_completed']), 'the lister did not report the unplugging'
    assert listed(started, 'handset') == [{'type': 'handset', 'serial': SERIAL,
                                           'pretty': 'bench 3', 'platform': 'android',
                                           'power_state': 'offline'}]


# -- the lister process ---------------------------------------------------------------------

def test_killed_lister_is_restarted_and_corrects_what_it_missed(testbed, adb, lab):
    testbed.add('handset.umockdev')
    adb(SERIAL)
    started = lab()
    assert wait_until(lambda: listed(started, 'handset'))
    [lister] = listers_of(started)
    lister.send_signal(signal.SIGKILL)
    testbed.remove(HANDSET_USB)  # while no lister watches: only the resync can tell
    testbed.add('serial-console.umockdev')
    assert wait_until(lambda: [p['type'] for p in started.admin.list_equipment()]
                      == ['serial']), f'listed: {started.admin.list_equipment()}'
    assert [p.pid for p in listers_of(started)] != [lister.pid]


def test_lister_ends_with_its_broker(testbed, lab):
    started = lab()
    assert wait_until(lambda: listers_of(started)), 'no lister runs'
    [lister] = listers_of(started)
    psutil.Process(started.pid).send_signal(signal.SIGKILL)
    assert wait_until(lambda: ended(lister)), 'the lister outlived its broker'


def ended(process: psutil.Process) -> bool:
    """Gone, or a zombie nobody reaped yet (an orphan waits for whoever adopts it)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- event handling, in-process -----------------------------------------------------------------
# The rules of what is reported for which event, checked with stand-in devices and a
# broker that only records the calls it gets.

class ProbeProfile(Profile):
    identity = 'uid'


class ProbeType(EquipmentType):
    """Devices whose 'UID' property says which item they are; 'FAIL' makes it raise."""

    name = 'probe'
    profile_class = ProbeProfile
    udev_subsystems = ('usb',)

    def from_udev(self, device, settings):
        if 'FAIL' in device.properties:
            raise OSError('the device vanished while it was read')
        uid = device.properties.get('UID')
        return None if uid is None else ProbeProfile({'type': 'probe', 'uid': uid})


class StandInDevice:
    def __init__(self, sys_path, action='add', subsystem='usb', **properties):
        self.sys_path = sys_path
        self.action = action
        self.subsystem = subsystem
        self.properties = properties


class RecordingBroker:
    def __init__(self):
        self.calls = []

    def __getattr__(self, method):
        return lambda *args: self.calls.append((method, *args))


@pytest.fixture
def lister():
    return Lister(('127.0.0.1', 1), None, {'probe': ProbeType()}, {}, '/nonexistent')


def test_unchanged_device_is_not_reported_again(lister):
    broker = RecordingBroker()
    lister.handle(broker, StandInDevice('/sys/a', UID='x'))
    lister.handle(broker, StandInDevice('/sys/a', action='change', UID='x'))
    assert broker.calls == [('add_equipment', {'type': 'probe', 'uid': 'x'})]


def test_item_shown_by_two_devices_stays_until_both_are_gone(lister):
    broker = RecordingBroker()
    lister.handle(broker, StandInDevice('/sys/a', UID='x'))
    lister.handle(broker, StandInDevice('/sys/b', UID='x'))
    lister.handle(broker, StandInDevice('/sys/a', action='remove'))
    assert ('remove_equipment', {'type': 'probe', 'uid': 'x'}) not in broker.calls
    lister.handle(broker, StandInDevice('/sys/b', action='remove'))
    assert broker.calls[-1] == ('remove_equipment', {'type': 'probe', 'uid': 'x'})


def test_device_that_changes_identity_is_removed_then_added(lister):
    broker = RecordingBroker()
    lister.handle(broker, StandInDevice('/sys/a', UID='x'))
    lister.handle(broker, StandInDevice('/sys/a', action='change', UID='y'))
    assert broker.calls[1:] == [('remove_equipment', {'type': 'probe', 'uid': 'x'}),
                                ('add_equipment', {'type': 'probe', 'uid': 'y'})]


def test_removal_of_a_device_never_reported_sends_nothing(lister):
    broker = RecordingBroker()
    lister.handle(broker, StandInDevice('/sys/a', action='remove'))
    assert broker.calls == []


def test_device_a_type_fails_on_is_skipped_and_others_still_count(lister):
    broker = RecordingBroker()
    lister.handle(broker, StandInDevice('/sys/a', FAIL='1'))
    lister.handle(broker, StandInDevice('/sys/b', UID='x'))
    assert broker.calls == [('add_equipment', {'type': 'probe', 'uid': 'x'})]


def test_devices_of_other_subsystems_are_not_asked_about(lister):
    broker = RecordingBroker()
    lister.handle(broker, StandInDevice('/sys/a', subsystem='tty', UID='x'))
    assert broker.calls == []
