"""``ave console`` against a console a real broker serves.

The console is an umockdev-emulated USB-serial adapter (tests/data, as in
tests/broker/test_lister.py): the broker's lister finds it through libudev and
its session opens the emulated /dev/ttyUSB0, while the test plays the board on
the far end through the testbed. ``ave console`` runs once with pipes, once on a
real pseudoterminal (pexpect), as a person at a keyboard has it. Skipped, saying
why, where umockdev is not installed.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pexpect
import pytest

from broker.test_lister import CONSOLE_NODE, CONSOLE_UID, testbed  # noqa: F401 (fixture)
from cli.conftest import AVE
from support import wait_until

pytestmark = pytest.mark.timeout(90)

PROFILE = f'serial,uid={CONSOLE_UID}'


@pytest.fixture
def console_lab(testbed, broker, ave_for):  # noqa: F811 (testbed is the imported fixture)
    """A broker that sees the console, and ``ave`` for its home."""
    runner = ave_for(broker.home)
    testbed.add('serial-console.umockdev')
    assert wait_until(lambda: listed(runner, 'serial'), timeout=10), \
        'the broker never listed the console'
    return broker, runner, testbed


def board_read(board, until: str, timeout: float = 20.0) -> str:
    """What reached the board, up to ``until``. Until the session has opened the
    console, the board's end of the emulated tty reads EIO: that is waited out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return board.console_read(CONSOLE_NODE, until=until)
        except AssertionError as error:
            if 'Input/output error' not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def listed(ave, kind: str) -> list[dict]:
    result = ave('list', '--all', '--json')
    return [e for e in json.loads(result.stdout or '[]') if e['profile']['type'] == kind]


def test_console_sends_what_is_typed_and_shows_what_the_board_prints(console_lab):
    broker, ave, board = console_lab
    console = ave.start('console', PROFILE, stdin=subprocess.PIPE)
    console.send('uname\n')
    assert board_read(board, until='\n') == 'uname\n'
    board.console_write(CONSOLE_NODE, 'Linux ä\n# ')
    assert console.line() == 'Linux ä'
    status, rest, err = console.finish()
    assert (status, err) == (0, ''), err
    assert wait_until(lambda: listed(ave, 'serial')[0]['state'] == 'available',
                      timeout=10), 'the console was not released at the end of input'


def test_ctrl_right_bracket_ends_the_console_while_input_goes_on(console_lab):
    broker, ave, board = console_lab
    console = ave.start('console', PROFILE, stdin=subprocess.PIPE)
    console.send('ab')
    assert board_read(board, until='b') == 'ab'
    console.send('\x1dcd\n')
    assert console.process.wait(20) == 0, 'Ctrl-] did not end the console'


def test_console_on_a_terminal_is_raw_and_the_terminal_is_restored(console_lab):
    broker, ave, board = console_lab
    child = pexpect.spawn(sys.executable, [*AVE[1:], 'console', PROFILE, '--home',
                                           broker.home], encoding='utf-8', timeout=20)
    try:
        child.expect_exact('Ctrl-] ends it')
        child.send('\x03')  # raw mode: Ctrl-C goes to the board, it does not stop ave
        assert board_read(board, until='\x03') == '\x03'
        board.console_write(CONSOLE_NODE, 'login: ')
        child.expect_exact('login: ')
        child.send('\x1d')
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before


def test_console_of_something_else_is_refused(console_lab):
    broker, ave, board = console_lab
    result = ave('console', 'relay,uid=r1')
    assert result.returncode == 1
    assert result.stderr == 'ave: ave console needs a serial profile, got relay,uid=r1\n'


def test_console_held_by_another_is_busy(console_lab):
    broker, ave, board = console_lab
    holder = ave.start('hold', PROFILE)
    assert holder.line() == f'holding serial {CONSOLE_UID}'
    result = ave('console', PROFILE)
    assert result.returncode == 1 and 'busy' in result.stderr, result.stderr
