"""``ave list``, ``ave who`` and ``ave queue`` against a real broker."""
from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess

import pytest

from ave.broker import Broker
from broker.conftest import free_port
from cli.conftest import AVE
from support import wait_until

pytestmark = pytest.mark.timeout(60)

HEADER = ['TYPE', 'ID', 'HOST', 'STATE', 'HOLDER', 'SINCE', 'NAME']


def table(output: str) -> list[list[str]]:
    """A table's rows (header first) split into cells at runs of 2+ spaces."""
    import re
    return [re.split(r' {2,}', line) for line in output.splitlines()]


def holder_of(lab, job: str | None = None) -> Broker:
    """A job holding relay r1 from this test process."""
    client = Broker(lab.address, job=job)
    lab._clients.append(client)
    client.get({'type': 'relay', 'uid': 'r1'})
    return client


# -- ave list -----------------------------------------------------------------------------

def test_list_shows_available_equipment_as_a_table(ave):
    result = ave('list')
    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    assert rows[0] == HEADER
    assert rows[1] == ['relay', 'r1', '127.0.0.1', 'available', 'bench 1']
    assert rows[2] == ['relay', 'r2', '127.0.0.1', 'available']


def test_list_leaves_out_what_is_held_and_list_all_says_by_whom(lab, ave):
    holder_of(lab)
    listed = table(ave('list').stdout)
    assert [row[1] for row in listed[1:]] == ['r2'], listed
    everything = table(ave('list', '--all').stdout)
    held = everything[1]
    assert held[:5] == ['relay', 'r1', '127.0.0.1', 'held',
                        f'{getpass.getuser()}@{socket.gethostname()}'], held
    assert held[5].endswith('s)') and held[6] == 'bench 1', held


def test_list_with_nothing_available_says_why_on_stderr(lab, ave):
    holder_of(lab)
    client = Broker(lab.address)
    lab._clients.append(client)
    client.get({'type': 'relay', 'uid': 'r2'})
    result = ave('list')
    assert (result.returncode, result.stdout) == (0, ''), result.stderr
    assert result.stderr == ('ave: nothing is available now (2 held; ave list --all shows '
                             'them)\n')


def test_list_of_a_broker_without_equipment_says_so(broker, ave_for):
    result = ave_for(broker.home)('list', '--all')
    assert (result.returncode, result.stdout) == (0, ''), result.stderr
    assert result.stderr.startswith('ave: the broker lists no equipment'), result.stderr


def test_list_json_is_the_brokers_listing(lab, ave):
    holder_of(lab, job='nightly 42')
    listed = json.loads(ave('list', '--all', '--json').stdout)
    by_uid = {entry['profile']['uid']: entry for entry in listed}
    assert by_uid['r1']['state'] == 'held' and by_uid['r1']['holder']['job'] == 'nightly 42'
    assert by_uid['r2']['state'] == 'available' and by_uid['r2']['holder'] is None
    assert by_uid['r2']['profile'] == {'type': 'relay', 'uid': 'r2', 'circuits': ['c1'],
                                       'power_state': 'online'}
    available = json.loads(ave('list', '--json').stdout)
    assert [entry['profile']['uid'] for entry in available] == ['r2']


def test_broker_option_needs_no_home(lab, ave, tmp_path):
    empty = tmp_path / 'nobody'
    empty.mkdir()
    result = ave.plain('list', '--broker', f'127.0.0.1:{lab.port}',
                       env={**os.environ, 'HOME': str(empty)})
    assert result.returncode == 0, result.stderr
    assert len(table(result.stdout)) == 3


def test_no_broker_at_the_address_is_one_line(ave):
    port = free_port()
    result = ave.plain('list', '--broker', f'127.0.0.1:{port}')
    assert result.returncode == 1
    assert result.stderr.startswith(f'ave: no broker listens on 127.0.0.1:{port}'), result.stderr
    assert result.stderr.count('\n') == 1, result.stderr


def test_a_reader_that_leaves_early_ends_the_listing_quietly(lab):
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([*AVE, 'list', '--all', '--home', lab.home], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (1, ''), result.stderr


# -- ave who ------------------------------------------------------------------------------

def test_who_names_holder_pid_and_job(lab, ave):
    holder_of(lab, job='https://ci.example/job/42')
    result = ave('who')
    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    assert rows[0] == ['TYPE', 'ID', 'HOST', 'HOLDER', 'PID', 'JOB', 'SINCE']
    assert rows[1][:6] == ['relay', 'r1', '127.0.0.1',
                           f'{getpass.getuser()}@{socket.gethostname()}', str(os.getpid()),
                           'https://ci.example/job/42'], rows


def test_who_json_carries_the_whole_identity(lab, ave):
    holder_of(lab, job='j')
    (allocation,) = json.loads(ave('who', '--json').stdout)
    assert allocation['profile']['uid'] == 'r1'
    assert allocation['holder']['pid'] == os.getpid() and allocation['holder']['job'] == 'j'
    assert isinstance(allocation['since'], (int, float))


def test_who_with_nobody_holding_says_so(ave):
    result = ave('who')
    assert (result.returncode, result.stdout, result.stderr) == \
        (0, '', 'ave: nobody holds any equipment\n')


def test_who_shows_no_terminal_control_a_holder_announced(lab, ave):
    holder_of(lab, job='\x1b]0;pwned\x07\x1b[2J')
    result = ave('who')
    assert '\x1b' not in result.stdout and '\x07' not in result.stdout, repr(result.stdout)
    assert '?]0;pwned??[2J' in result.stdout


# -- ave queue ----------------------------------------------------------------------------

def test_queue_with_nobody_waiting_says_so(ave):
    result = ave('queue')
    assert (result.returncode, result.stdout, result.stderr) == \
        (0, '', 'ave: nobody is waiting\n')


def test_queue_shows_who_waits_for_what(lab, ave):
    holder_of(lab)
    waiting = ave.start('hold', '--wait', '60', '--job', 'waiter', 'relay,uid=r1')
    assert wait_until(lambda: json.loads(ave('queue', '--json').stdout), timeout=10), \
        'the waiting hold never showed in the queue'
    rows = table(ave('queue').stdout)
    assert rows[0] == ['POS', 'HOLDER', 'JOB', 'WANTS', 'PRIORITY', 'WAITED']
    assert rows[1][0] == '1' and rows[1][2] == 'waiter' and rows[1][3] == 'relay,uid=r1', rows
    waiting.kill()
