"""ave.equipment.serial: consoles recognised in udev, and expect-style I/O on a tty.

udev devices are the ``tests/data/*.umockdev`` descriptions, seen through the real
libudev by a child process run under ``umockdev-run``. The console resource is
driven end to end on a pseudoterminal pair: the resource opens the terminal side by
its name, exactly as it opens /dev/ttyUSB0, and the test plays the board on the other
side through the master descriptor.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ave.equipment import load_types
from ave.equipment.serial import SERIAL, Serial, SerialError, SerialProfile
from ave.exceptions import Timeout

pytestmark = pytest.mark.timeout(30)

DATA = Path(__file__).resolve().parent.parent / 'data'
FTDI_TTY = '/sys/devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3:1.0/ttyUSB0/tty/ttyUSB0'
CH340_TTY = '/sys/devices/pci0000:00/0000:00:14.0/usb1/1-4/1-4:1.0/ttyUSB1/tty/ttyUSB1'
BUILT_IN_UART = '/sys/devices/platform/serial8250/tty/ttyS0'

requires_umockdev = pytest.mark.skipif(shutil.which('umockdev-run') is None,
                                       reason='umockdev is not installed (Debian package '
                                       'umockdev)')

# Maps every tty of the testbed with SERIAL.from_udev; prints path -> profile.
MAP_DEVICES = '''
import json, sys, pyudev
from ave.equipment.serial import SERIAL
settings = json.loads(sys.argv[1])
devices = pyudev.Context().list_devices(subsystem='tty')
print(json.dumps({d.sys_path: SERIAL.from_udev(d, settings) for d in devices}))
'''


def mapped(settings: dict | None = None) -> dict[str, dict | None]:
    """What SERIAL.from_udev makes of each tty of a testbed with three of them."""
    files = ['usb-host', 'serial-console', 'serial-noserial', 'platform-uart']
    devices = [arg for name in files for arg in ('--device', str(DATA / f'{name}.umockdev'))]
    result = subprocess.run(['umockdev-run', *devices, '--', sys.executable, '-c',
                             MAP_DEVICES, json.dumps(settings or {})],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, f'mapping devices failed: {result.stderr}'
    return json.loads(result.stdout.splitlines()[-1])


class Board:
    """The far side of a pseudoterminal: what a console adapter's board would be."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        self.node = os.ttyname(slave)
        os.close(slave)

    def send(self, text: str) -> None:
        os.write(self.master, text.encode('utf-8'))

    def received(self, size: int, timeout: float = 5.0) -> bytes:
        """Exactly ``size`` bytes the console sent, or fewer if they do not come."""
        data = b''
        deadline = time.monotonic() + timeout
        while len(data) < size and select.select([self.master], [], [],
                                                 max(0, deadline - time.monotonic()))[0]:
            data += os.read(self.master, size - len(data))
        return data

    def hang_up(self) -> None:
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


@pytest.fixture
def board():
    far_end = Board()
    yield far_end
    far_end.hang_up()


@pytest.fixture
def console(board):
    """A Serial resource set up on the board's terminal; torn down afterwards."""
    resource = Serial(SerialProfile({'type': 'serial', 'uid': 'u1',
                                     'device_node': board.node}), {})
    resource._setup()
    yield resource
    resource._teardown()


# -- the type ------------------------------------------------------------------------------

def test_serial_type_is_published_as_a_plug_in():
    assert load_types()['serial'] is SERIAL


@requires_umockdev
def test_usb_serial_adapter_is_a_console_with_a_full_profile():
    assert mapped()[FTDI_TTY] == {'type': 'serial', 'uid': 'FTDI_FT232R_USB_UART_A50285BI-if00',
                                  'device_node': '/dev/ttyUSB0', 'vendor': '0403',
                                  'product': '6001', 'power_state': 'online'}


@requires_umockdev
def test_adapter_without_serial_number_is_known_by_its_usb_path():
    assert mapped()[CH340_TTY]['uid'] == 'pci-0000:00:14.0-usb-0:4:1.0'


@requires_umockdev
def test_built_in_uart_is_not_a_console():
    assert mapped()[BUILT_IN_UART] is None


@requires_umockdev
def test_console_friendly_name_comes_from_the_settings():
    profile = mapped({'pretty': {'FTDI_FT232R_USB_UART_A50285BI-if00': 'bench 3'}})[FTDI_TTY]
    assert profile['pretty'] == 'bench 3'


@pytest.mark.parametrize('entry, field', [
    ({'type': 'serial'}, 'uid'),
    ({'type': 'serial', 'uid': 'u1', 'pretty': ''}, 'pretty'),
    ({'type': 'serial', 'uid': 'u1', 'device_node': '/dev/ttyUSB0'}, 'device_node'),
])
def test_wrong_broker_json_entry_is_refused_naming_the_field(entry, field):
    with pytest.raises(ValueError, match=f'^{field}: '):
        SERIAL.validate_entry(entry)


def test_declared_console_is_offline_and_cannot_be_opened():
    profile = SERIAL.profile_of({'type': 'serial', 'uid': 'u1', 'pretty': 'bench 3'})
    assert profile == {'type': 'serial', 'uid': 'u1', 'pretty': 'bench 3',
                       'power_state': 'offline'}
    with pytest.raises(SerialError, match='no device node'):
        Serial(profile, {})


# -- the console ------------------------------------------------------------------------------

def test_write_reaches_the_board_unchanged(console, board):
    console.write('ls\n\u00e9')
    assert board.received(6) == 'ls\n\u00e9'.encode('utf-8')


def test_read_returns_what_the_board_printed(console, board):
    board.send('U-Boot 2024.01\n')
    assert console.read(timeout=5) == 'U-Boot 2024.01\n'


def test_read_without_timeout_returns_at_once_when_nothing_came(console):
    started = time.monotonic()
    assert console.read() == ''
    assert time.monotonic() - started < 1


def test_read_waits_for_output_that_comes_later(console, board):
    timer = threading.Timer(0.3, board.send, ('late',))
    timer.start()
    try:
        assert console.read(timeout=5) == 'late'
    finally:
        timer.cancel()


def test_expect_returns_up_to_the_match_and_keeps_the_rest(console, board):
    board.send('booting\nlogin: extra')
    assert console.expect(r'login: ', timeout=5) == 'booting\nlogin: '
    assert console.read(timeout=1) == 'extra'


def test_expect_timeout_reports_and_keeps_what_came(console, board):
    board.send('no prompt here')
    with pytest.raises(Timeout) as caught:
        console.expect('login: ', timeout=0.5)
    assert caught.value.out == 'no prompt here'
    assert console.read() == 'no prompt here'


def test_output_from_before_the_allocation_is_dropped(board):
    board.send('stale output\n')
    time.sleep(0.1)
    resource = Serial(SerialProfile({'type': 'serial', 'uid': 'u1',
                                     'device_node': board.node}), {})
    resource._setup()
    try:
        assert resource.read(timeout=0.3) == ''
    finally:
        resource._teardown()


def test_console_whose_far_end_went_away_raises(console, board):
    board.hang_up()
    with pytest.raises(SerialError, match='gone'):
        console.read(timeout=1)


def test_missing_device_node_fails_the_setup(tmp_path):
    resource = Serial(SerialProfile({'type': 'serial', 'uid': 'u1',
                                     'device_node': str(tmp_path / 'ttyUSB9')}), {})
    with pytest.raises(SerialError, match='gone'):
        resource._setup()


def test_file_that_is_not_a_terminal_fails_the_setup(tmp_path):
    plain = tmp_path / 'plain'
    plain.write_text('')
    resource = Serial(SerialProfile({'type': 'serial', 'uid': 'u1',
                                     'device_node': str(plain)}), {})
    with pytest.raises(SerialError, match='not a usable terminal'):
        resource._setup()


def test_console_is_closed_by_teardown(console):
    console._teardown()
    with pytest.raises(SerialError, match='not open'):
        console.write('x')


@pytest.mark.parametrize('call', [
    lambda c: c.write(b'bytes'), lambda c: c.expect('('), lambda c: c.expect(''),
    lambda c: c.read(timeout=-1), lambda c: c.expect('x', timeout='soon'),
])
def test_bad_arguments_are_refused(console, call):
    with pytest.raises((TypeError, ValueError)):
        call(console)
