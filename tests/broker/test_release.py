"""A released relay is reset exactly once and comes back, whatever happens meanwhile.

The relay here logs each reset it starts (``begin``) and finishes (``end``), and its
reset can be held at a gate, so that something else happens while it runs: the
client's session ending (its other commands are killed then, but never the reset of
what it already gave back), or ``ave-broker --restart`` while a reclaimer (the
broker's child that resets what a dead session held) is still at work.
"""
from __future__ import annotations

import os
import time

import psutil
import pytest

from support import reported_pid, wait_until
from ave.broker import Broker

pytestmark = pytest.mark.timeout(120)

R1 = {'type': 'relay', 'uid': 'r1'}

#: Longest a reset waits at its gate (tenths of a second), so none outlives a test.
GATE_LIMIT = 300


def gated_relay(log, gate):
    """r1, whose reset writes ``begin`` to ``log``, waits while ``gate`` exists, and
    writes ``end``."""
    reset = (f'echo begin >> {log}; i=0; while [ -e {gate} ] && [ $i -lt {GATE_LIMIT} ]; '
             f'do sleep 0.1; i=$((i + 1)); done; echo end >> {log}')
    return {'type': 'relay', 'uid': 'r1', 'circuits': {'c1': {
        'open': ['sh', '-c', reset], 'close': ['true'], 'default': 'open'}}}


@pytest.fixture
def gated_lab(start_broker, tmp_path):
    lab = start_broker(equipment=[gated_relay(tmp_path / 'relay.log', tmp_path / 'gate')])
    lab.relay_log = tmp_path / 'relay.log'
    lab.gate = tmp_path / 'gate'
    yield lab
    lab.gate.unlink(missing_ok=True)  # a failed test leaves no reset waiting


def resets(lab):
    return lab.relay_log.read_text().split() if lab.relay_log.exists() else []


def available(lab):
    admin = lab.client(lab.admin_key)
    return lambda: [p['uid'] for p in admin.list_available()] == ['r1']


def test_session_ending_does_not_kill_the_reset_of_what_it_gave_back(gated_lab):
    client = Broker(gated_lab.address)
    relay = client.get(R1)
    relay.get_profile()  # set up: a first allocation is reset (the gate is open)
    assert resets(gated_lab) == ['begin', 'end']
    gated_lab.gate.touch()
    client.yield_resources(relay)
    assert wait_until(lambda: len(resets(gated_lab)) == 3), 'the teardown reset must start'
    client.__exit__(None, None, None)  # the session ends while the reset runs
    time.sleep(1)  # time enough for an ending session to kill what it should not
    gated_lab.gate.unlink()
    assert wait_until(available(gated_lab), timeout=15)
    assert resets(gated_lab) == ['begin', 'end', 'begin', 'end'], \
        'the session\'s own reset must run to its end, and once: nothing to reclaim'


def test_reclaim_running_during_restart_still_frees_the_relay(gated_lab):
    relay = gated_lab.client().get(R1)
    relay.get_profile()
    gated_lab.gate.touch()
    session = next(p for p in psutil.Process(gated_lab.pid).children()
                   if p.name().startswith('ave-broker-sess'))
    session.kill()  # the broker's reclaimer resets r1 now, and waits at the gate
    assert wait_until(lambda: len(resets(gated_lab)) == 3), 'a reclaimer must reset r1'
    result = gated_lab.cli('--restart')
    assert result.returncode == 0, result.stderr
    gated_lab.pid = reported_pid(result.stdout)
    assert len(resets(gated_lab)) == 3, 'the reclaim must still run after the restart'
    gated_lab.gate.unlink()
    assert wait_until(available(gated_lab), timeout=15), \
        'the new broker must learn that the old one\'s reclaimer finished'
    assert resets(gated_lab) == ['begin', 'end', 'begin', 'end']


def test_an_orderly_stop_is_not_mistaken_for_a_crash(gated_lab):
    """Sessions still tearing down when their broker has stopped in order expect it
    to be gone: no warning of a crash, no waiting for a broker to adopt them."""
    client = Broker(gated_lab.address)
    client.get(R1).get_profile()
    gated_lab.gate.touch()  # the stop's teardown outlasts the broker
    result = gated_lab.cli('--stop')
    assert result.returncode == 0, result.stderr
    gated_lab.gate.unlink()
    assert wait_until(lambda: resets(gated_lab).count('end') == 2, timeout=15)
    assert wait_until(lambda: not gated_lab.processes(), timeout=15), \
        'a session waited for a new broker after an orderly stop'
    log = ''.join(open(os.path.join(gated_lab.log_dir, name)).read()
                  for name in os.listdir(gated_lab.log_dir))
    assert 'without notice' not in log and 'WARNING' not in log, log
