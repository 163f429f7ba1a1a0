"""A released relay is reset exactly once and comes back, whatever happens meanwhile.

The relay here logs each reset it starts (``begin``) and finishes (``end``), and its
reset can be made slow, so that something else can happen while it runs: the
client's session ending (its other commands are killed then, but never the reset of
what it already gave back), or ``ave-broker --restart`` while a reclaimer (the
broker's child that resets what a dead session held) is still at work.
"""
from __future__ import annotations

import psutil
import pytest

from support import reported_pid, wait_until
from ave.broker import Broker

pytestmark = pytest.mark.timeout(120)

R1 = {'type': 'relay', 'uid': 'r1'}

#: Seconds a slow reset takes: long enough for what a test does meanwhile.
SLOW = 5


def slow_relay(log, slow_flag):
    """r1, whose reset writes ``begin`` and ``end`` to ``log`` and sleeps between
    them while ``slow_flag`` exists."""
    reset = (f'echo begin >> {log}; if [ -e {slow_flag} ]; then sleep {SLOW}; fi; '
             f'echo end >> {log}')
    return {'type': 'relay', 'uid': 'r1', 'circuits': {'c1': {
        'open': ['sh', '-c', reset], 'close': ['true'], 'default': 'open'}}}


@pytest.fixture
def slow_lab(start_broker, tmp_path):
    lab = start_broker(equipment=[slow_relay(tmp_path / 'relay.log', tmp_path / 'slow')])
    lab.relay_log = tmp_path / 'relay.log'
    lab.slow_flag = tmp_path / 'slow'
    return lab


def resets(lab):
    return lab.relay_log.read_text().split() if lab.relay_log.exists() else []


def available(lab):
    admin = lab.client(lab.admin_key)
    return lambda: [p['uid'] for p in admin.list_available()] == ['r1']


def test_session_ending_does_not_kill_the_reset_of_what_it_gave_back(slow_lab):
    client = Broker(slow_lab.address)
    relay = client.get(R1)
    relay.get_profile()  # set up: a first allocation is reset (fast here)
    assert resets(slow_lab) == ['begin', 'end']
    slow_lab.slow_flag.touch()
    client.yield_resources(relay)
    assert wait_until(lambda: len(resets(slow_lab)) == 3), 'the teardown reset must start'
    client.__exit__(None, None, None)  # the session ends while the reset runs
    assert wait_until(available(slow_lab), timeout=SLOW + 15)
    assert resets(slow_lab) == ['begin', 'end', 'begin', 'end'], \
        'the session\'s own reset must run to its end, and once: nothing to reclaim'


def test_reclaim_running_during_restart_still_frees_the_relay(slow_lab):
    relay = slow_lab.client().get(R1)
    relay.get_profile()
    slow_lab.slow_flag.touch()
    session = next(p for p in psutil.Process(slow_lab.pid).children()
                   if p.name().startswith('ave-broker-sess'))
    session.kill()  # the broker's reclaimer resets r1 now, slowly
    assert wait_until(lambda: len(resets(slow_lab)) == 3), 'a reclaimer must reset r1'
    result = slow_lab.cli('--restart')
    assert result.returncode == 0, result.stderr
    slow_lab.pid = reported_pid(result.stdout)
    assert len(resets(slow_lab)) == 3, \
        f'the reclaim ended before the restart did (took over {SLOW} s?): nothing tested'
    assert wait_until(available(slow_lab), timeout=SLOW + 15), \
        'the new broker must learn that the old one\'s reclaimer finished'
    assert resets(slow_lab) == ['begin', 'end', 'begin', 'end']
