"""USB-serial consoles: tty devices on USB, found with pyudev, driven with pexpect.

A lab wires a board's or handset's UART to a USB-serial adapter (ttyUSB) or gets a
console over USB directly (ttyACM); the broker's lister reports every tty with a
USB parent. A console's profile::

    {'type': 'serial', 'uid': 'FTDI_FT232R_USB_UART_A50285BI-if00',
     'device_node': '/dev/ttyUSB0', 'vendor': '0403', 'product': '6001',
     'power_state': 'online', 'pretty': 'bench 3 console'}

``uid`` has to survive replugging and moving to another USB port, and tell apart
the ports of a multi-port adapter: it is udev's ``ID_SERIAL`` plus the USB interface
number (as in /dev/serial/by-id). Adapters without a serial number share one
``ID_SERIAL`` per model, so for them the physical path (``ID_PATH``) is used: such
an adapter keeps its uid only while it stays in the same USB port.

The session opens the tty when the console is allocated, in raw mode at
``BAUD_RATE`` without flow control, and drops whatever was waiting in the input, so
a job never reads what was printed before it got the console.
"""
from __future__ import annotations

import errno
import fcntl
import math
import os
import re
import termios
import tty
from typing import Any

import pexpect
from pexpect import fdpexpect

from ave.equipment import EquipmentType, Resource
from ave.equipment.udev import (check_declared, declared_names, declared_profile,
                                property_of, usb_device_of, usb_ids, with_pretty)
from ave.exceptions import AveException, Timeout
from ave.profile import Profile

BAUD_RATE = termios.B115200

#: The most one ``read`` returns; a console printing faster than a job reads would
#: otherwise keep a single call going (and its reply growing) without end.
READ_LIMIT = 1024 * 1024
_CHUNK = 65536


class SerialError(AveException):
    """A console could not be opened, or went away while it was being used.

    Details (also attributes): ``uid`` and ``device_node``.
    """


class SerialProfile(Profile):
    """A console's profile; ``uid`` tells two apart."""

    identity = 'uid'


def console_uid(device: Any) -> str | None:
    """The stable identity of a tty on USB (see the module text), or None."""
    serial = property_of(device, 'ID_SERIAL')
    if serial and property_of(device, 'ID_SERIAL_SHORT'):
        interface = property_of(device, 'ID_USB_INTERFACE_NUM')
        return f'{serial}-if{interface}' if interface else serial
    return property_of(device, 'ID_PATH')


class Serial(Resource):
    """One console as its holder's session drives it: text in, text out.

    Text is UTF-8 both ways; bytes that do not decode arrive as U+FFFD.
    """

    def __init__(self, profile: Profile, settings: dict) -> None:
        super().__init__(profile, settings)
        self._uid = str(profile.get('uid'))
        node = profile.get('device_node')
        if not isinstance(node, str) or not node:
            raise SerialError({'message': f'console {self._uid!r} has no device node '
                               '(it has not been seen plugged in)',
                               'uid': self._uid, 'device_node': node})
        self._node: str = node
        self._console: fdpexpect.fdspawn | None = None

    def _setup(self, tainted: bool = True) -> None:
        """Open the tty for the new holder, with nothing left over from before."""
        fd = self._open()
        self._console = fdpexpect.fdspawn(fd, encoding='utf-8', codec_errors='replace',
                                          use_poll=True)

    def _teardown(self) -> None:
        """Close the tty, so an unplugged adapter is not held open by AVE."""
        if self._console is not None:
            self._console.close()
            self._console = None

    def write(self, text: str) -> None:
        """Send ``text`` to the console as UTF-8 (a newline is not added)."""
        if not isinstance(text, str):
            raise TypeError(f'text must be a string, got {type(text).__name__}')
        data = text.encode('utf-8')
        fd = self._open_console().child_fd
        while data:
            try:
                written = os.write(fd, data)
            except OSError as err:
                raise self._gone(err) from err
            data = data[written:]

    def read(self, timeout: float = 0) -> str:
        """What the console printed since the last read or expect.

        Waits up to ``timeout`` seconds for something to arrive when nothing has; 0
        returns at once, possibly with ''.
        """
        console = self._open_console()
        wait = _seconds(timeout)
        text = console.buffer
        console.buffer = console.string_type()
        while len(text) < READ_LIMIT:
            try:
                text += console.read_nonblocking(_CHUNK, timeout=0 if text else wait)
            except pexpect.TIMEOUT:
                break
            except pexpect.EOF:
                if text:
                    break
                raise self._gone() from None
        return text

    def expect(self, pattern: str, timeout: float | None = 30) -> str:
        """Wait until the console prints a match of the regular expression ``pattern``.

        Returns everything up to and including the match, which is consumed; what
        follows stays for the next read or expect. ``timeout`` in seconds (None:
        no limit; 0: only what has already arrived). On expiry Timeout is raised
        with what arrived meanwhile as ``out``; that text is not consumed.
        """
        compiled = _regex(pattern)
        limit = None if timeout is None else _seconds(timeout)
        console = self._open_console()
        try:
            console.expect(compiled, timeout=limit)
        except pexpect.TIMEOUT:
            raise Timeout({'message': f'console {self._uid!r}: no match for {pattern!r} '
                           f'within {limit:g} s', 'uid': self._uid,
                           'out': console.buffer}) from None
        except pexpect.EOF:
            raise self._gone() from None
        return console.before + console.after

    def _open(self) -> int:
        """Open and configure the tty; the descriptor is blocking once configured.

        It is opened non-blocking because opening a tty may otherwise wait for a
        carrier signal that a console adapter never raises.
        """
        try:
            fd = os.open(self._node, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            raise self._gone(err) from err
        try:
            _make_raw(fd)
            termios.tcflush(fd, termios.TCIFLUSH)
            _set_blocking(fd)
        except (OSError, termios.error) as err:
            os.close(fd)
            raise SerialError({'message': f'console {self._uid!r}: {self._node} is not a '
                               f'usable terminal: {err}', 'uid': self._uid,
                               'device_node': self._node}) from err
        return fd

    def _open_console(self) -> fdpexpect.fdspawn:
        if self._console is None:
            raise SerialError({'message': f'console {self._uid!r} is not open',
                               'uid': self._uid, 'device_node': self._node})
        return self._console

    def _gone(self, err: OSError | None = None) -> SerialError:
        if err is None or err.errno in (errno.EIO, errno.ENODEV, errno.ENOENT, errno.ENXIO):
            problem = 'is gone (unplugged?)'
        else:
            problem = f'failed: {err.strerror}'
        return SerialError({'message': f'console {self._uid!r}: {self._node} {problem}',
                            'uid': self._uid, 'device_node': self._node})


class SerialType(EquipmentType):
    """Consoles are found by the lister and may be named in broker.json."""

    name = 'serial'
    profile_class = SerialProfile
    resource_class = Serial
    udev_subsystems = ('tty',)

    def load_settings(self, home: str) -> dict:
        """Friendly names by uid, from the serial entries of broker.json."""
        return {'pretty': declared_names(home, self.name, 'uid')}

    def validate_entry(self, entry: dict) -> None:
        """A declared console has a uid and optionally a friendly name, nothing else."""
        check_declared(entry, 'uid')

    def profile_of(self, entry: dict) -> SerialProfile:
        """A declared console nobody has seen yet: offline, and without a device node."""
        return declared_profile(SerialProfile, entry, power_state='offline')

    def from_udev(self, device: Any, settings: dict) -> SerialProfile | None:
        """The profile of a tty on USB, else None (built-in UARTs, virtual terminals)."""
        node = device.device_node
        usb_device = usb_device_of(device)
        if device.subsystem != 'tty' or not node or usb_device is None:
            return None
        uid = console_uid(device)
        if uid is None:
            return None
        vendor, product = usb_ids(usb_device)
        values = {'type': self.name, 'uid': uid, 'device_node': node, 'vendor': vendor,
                  'product': product, 'power_state': 'online'}
        return SerialProfile(with_pretty(values, settings, 'uid'))


#: The plug-in instance published through the ``ave.equipment`` entry point.
SERIAL = SerialType()


def _make_raw(fd: int) -> None:
    """Raw 8-bit I/O at BAUD_RATE, ignoring modem lines and without flow control."""
    tty.setraw(fd)
    attributes = termios.tcgetattr(fd)
    attributes[2] = (attributes[2] | termios.CLOCAL | termios.CREAD) & ~termios.CRTSCTS
    attributes[0] &= ~(termios.IXON | termios.IXOFF)
    attributes[4] = attributes[5] = BAUD_RATE
    termios.tcsetattr(fd, termios.TCSANOW, attributes)


def _set_blocking(fd: int) -> None:
    """Clear O_NONBLOCK with fcntl; os.set_blocking uses an ioctl that not every tty
    driver (nor umockdev's emulated ones) implements."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)


def _regex(pattern: Any) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f'pattern must be a non-empty regular expression, got {pattern!r}')
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f'pattern {pattern!r} is not a regular expression: {err}') from None


def _seconds(value: Any) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value < 0):
        raise ValueError(f'timeout must be a number of seconds, 0 or more, got {value!r}')
    return float(value)
