"""The spare session: forked ahead of need, invisible until a client's first get takes it.

Through real ``ave-broker`` daemons: what a lab owner and a job can see of it (process
names, status, limits) and that it never outlives or outlasts its broker.
"""
from __future__ import annotations

import signal

import psutil
import pytest

from support import children_named, reported_pid, wait_until
from ave.broker.daemon import wait_for_exit
from ave.broker.exceptions import Busy
from ave.broker.sessions import SPARE_RETRY_DELAY
from ave.exceptions import AuthError
from ave.network.control import RemoteControl

pytestmark = pytest.mark.timeout(60)

RELAY = {'type': 'relay', 'uid': 'r1',
         'circuits': {'c1': {'open': ['true'], 'close': ['true'], 'default': 'open'}}}
R1 = {'type': 'relay', 'uid': 'r1'}
# The kernel keeps 15 characters of a process name.
SPARE, SESSION = 'ave-broker-spar', 'ave-broker-sess'


def the_spare(lab, timeout=5.0):
    """The broker's one spare session, once it is there."""
    spares = wait_until(lambda: children_named(lab.pid, SPARE), timeout)
    assert len(spares) == 1, f'expected one spare session, found {spares}'
    return spares[0]


def gone(process, timeout=5.0):
    """Whether ``process`` ended (reaped, or a zombie nobody waits for) in time."""
    def ended():
        try:
            return process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    return wait_until(ended, timeout)


def restart(lab):
    result = lab.cli('--restart')
    assert result.returncode == 0, f'--restart failed: {result.stderr}'
    return reported_pid(result.stdout)


def test_a_spare_waits_before_any_client_and_is_no_session(start_broker):
    lab = start_broker(equipment=[RELAY])
    the_spare(lab)
    assert children_named(lab.pid, SESSION) == []
    client = lab.client()
    assert client.status()['sessions'] == 0, 'the spare was counted as a session'
    assert client.who() == [] and client.queue() == []


def test_the_first_get_takes_the_spare_and_a_new_one_follows(start_broker):
    lab = start_broker(equipment=[RELAY])
    spare = the_spare(lab)
    relay = lab.client().get(R1)
    assert relay.get_profile()['uid'] == 'r1'
    sessions = children_named(lab.pid, SESSION)
    assert [s.pid for s in sessions] == [spare.pid], 'the spare did not become the session'
    assert the_spare(lab).pid != spare.pid, 'no new spare after the first was taken'


def test_a_spare_counts_toward_no_session_limit(start_broker):
    lab = start_broker(equipment=[RELAY], limits={'sessions': 1})
    the_spare(lab)
    lab.client().get(R1).get_profile()
    the_spare(lab)  # made again although the broker runs its one session
    with pytest.raises(Busy, match='limit of 1 sessions'):
        lab.client().get({'type': 'workspace'})
    assert lab.client().status()['sessions'] == 1


def test_clients_cannot_assign_a_session(start_broker):
    lab = start_broker(equipment=[RELAY])
    relay = lab.client().get(R1)
    session = RemoteControl(relay._address, authkey=relay._authkey, timeout=5)
    with pytest.raises(AuthError):
        session.assigned({'identity': {'user': 'mallory'}, 'token': None}, 3600)
    assert relay.get_profile()['uid'] == 'r1'


def test_an_orderly_stop_ends_the_spare(start_broker):
    lab = start_broker(equipment=[RELAY])
    spare = the_spare(lab)
    assert lab.cli('--stop').returncode == 0
    assert gone(spare), 'the spare outlived its stopped broker'


def test_a_restart_hands_over_no_spare_and_the_successor_makes_its_own(start_broker):
    lab = start_broker(equipment=[RELAY])
    relay = lab.client().get(R1)
    relay.get_profile()
    [session] = children_named(lab.pid, SESSION)
    old_spare = the_spare(lab)
    lab.pid = restart(lab)
    assert gone(old_spare), "the old broker's spare outlived the handover"
    new_spare = the_spare(lab)
    assert new_spare.pid not in (old_spare.pid, session.pid)
    assert relay.get_profile()['uid'] == 'r1', 'the session did not carry on'
    assert lab.client().status()['sessions'] == 1


def test_a_crashed_brokers_spare_ends_while_sessions_serve_on(start_broker):
    lab = start_broker(equipment=[RELAY], crash_grace=30)
    relay = lab.client().get(R1)
    relay.get_profile()
    [session] = children_named(lab.pid, SESSION)
    spare = the_spare(lab)
    broker = psutil.Process(lab.pid)
    broker.send_signal(signal.SIGKILL)
    assert wait_for_exit(broker, 10), 'the broker survived SIGKILL'
    assert gone(spare), 'a spare serves nobody and must end with its broker'
    assert relay.get_profile()['uid'] == 'r1', 'the orphaned session stopped serving'
    session.terminate()  # no broker will come: SIGTERM ends an orphan at once
    assert gone(session)


def test_a_spare_that_dies_is_made_again(start_broker):
    lab = start_broker(equipment=[RELAY])
    spare = the_spare(lab)
    spare.kill()
    assert gone(spare)
    replacements = wait_until(lambda: [p for p in children_named(lab.pid, SPARE)
                                       if p.pid != spare.pid], SPARE_RETRY_DELAY + 5)
    assert len(replacements) == 1, 'no new spare after the last one died'
    assert lab.client().get(R1).get_profile()['uid'] == 'r1'
