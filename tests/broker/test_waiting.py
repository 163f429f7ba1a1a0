"""Waiting instead of Busy, and who holds what, through real brokers and clients."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from support import wait_until
from ave.broker import Broker
from ave.broker.exceptions import Busy, NoSuch
from ave.exceptions import AveException

pytestmark = pytest.mark.timeout(60)


def relay(uid):
    return {'type': 'relay', 'uid': uid,
            'circuits': {'c1': {'open': ['true'], 'close': ['true'], 'default': 'open'}}}


R1, R2 = {'type': 'relay', 'uid': 'r1'}, {'type': 'relay', 'uid': 'r2'}


@pytest.fixture
def lab(start_broker):
    return start_broker(equipment=[relay('r1'), relay('r2')])


class Waiter:
    """A client that waits for equipment in a thread, so the test can go on."""

    def __init__(self, lab, *profiles, job=None, **kwargs):
        self.client = Broker(lab.address, job=job)
        self.result = None
        self.error = None
        self.granted_at = None
        self.thread = threading.Thread(target=self._get, args=(profiles, kwargs),
                                       daemon=True)
        self.thread.start()

    def _get(self, profiles, kwargs):
        try:
            self.result = self.client.get(*profiles, **kwargs)
            self.granted_at = time.monotonic()
        except Exception as error:
            self.error = error

    def done(self, timeout=10):
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def close(self):
        self.client._disconnect()


@pytest.fixture
def waiters():
    made = []

    def make(lab, *profiles, **kwargs):
        waiter = Waiter(lab, *profiles, **kwargs)
        made.append(waiter)
        return waiter
    yield make
    for waiter in made:
        waiter.close()


def queued(lab, count):
    return wait_until(lambda: len(lab.client().queue()) == count)


def test_a_waiting_get_is_granted_when_the_holder_releases(lab, waiters):
    holder = lab.client()
    r1 = holder.get(R1)
    waiter = waiters(lab, R1, wait=30)
    assert queued(lab, 1)
    released = time.monotonic()
    holder.yield_resources(r1)
    assert waiter.done(), 'the waiting get was never answered'
    assert waiter.error is None and waiter.result.profile['uid'] == 'r1', waiter.error
    assert waiter.granted_at - released < 2


def test_a_wait_that_runs_out_is_busy_naming_the_holder(lab, waiters):
    lab.client().get(R1)
    started = time.monotonic()
    waiter = waiters(lab, R1, wait=0.5)
    assert waiter.done()
    assert isinstance(waiter.error, Busy) and 'held by' in str(waiter.error), waiter.error
    assert time.monotonic() - started < 5, 'the wait ran far past its limit'
    assert lab.client().queue() == [], 'an expired request stayed in the queue'


def test_three_waiters_are_served_in_arrival_order(lab, waiters):
    holder = lab.client()
    r1 = holder.get(R1)
    order = []
    for count in range(1, 4):  # they arrive one after the other
        order.append(waiters(lab, R1, wait=30, job=f'waiter-{count}'))
        assert queued(lab, count)
    assert [row['holder']['job'] for row in lab.client().queue()] == \
        ['waiter-1', 'waiter-2', 'waiter-3']
    holder.yield_resources(r1)
    for waiter in order:
        assert waiter.done() and waiter.error is None, waiter.error
        waiter.client.yield_resources(waiter.result)
    times = [waiter.granted_at for waiter in order]
    assert times == sorted(times), 'waiters were not served first come, first served'


def test_higher_priority_goes_first(lab, waiters):
    holder = lab.client()
    r1 = holder.get(R1)
    low = waiters(lab, R1, wait=30)
    assert queued(lab, 1)
    high = waiters(lab, R1, wait=30, priority=5)
    assert queued(lab, 2)
    assert [row['priority'] for row in lab.client().queue()] == [5, 0]
    holder.yield_resources(r1)
    assert high.done() and high.error is None
    assert low.result is None, 'the lower priority was served first'


def test_a_request_needing_nothing_the_head_waits_for_is_granted_at_once(lab, waiters):
    lab.client().get(R1)
    head = waiters(lab, R1, R2, wait=30)  # gets r2 reserved, waits for r1
    assert queued(lab, 1)
    backfill = lab.client().get({'type': 'workspace'}, wait=5)
    assert backfill.get_path(), 'a request for free equipment had to wait'
    with pytest.raises(Busy, match='reserved'):
        lab.client().get(R2)
    assert head.result is None


def test_a_client_holding_equipment_may_not_wait_and_keeps_what_it_holds(lab):
    client = lab.client()
    r1 = client.get(R1)
    with pytest.raises(AveException, match='holds relay r1'):
        client.get(R2, wait=10)
    assert r1.get_profile()['uid'] == 'r1', 'the refused wait cost the client its relay'


def test_holding_only_workspaces_a_client_may_wait(lab):
    holder = lab.client()
    r1 = holder.get(R1)
    client = lab.client()
    client.get({'type': 'workspace'}).get_path()
    timer = threading.Timer(0.5, holder.yield_resources, args=(r1,))
    timer.start()
    granted = client.get(R1, wait=30)
    timer.join()
    assert granted.profile['uid'] == 'r1'


def test_nosuch_is_immediate_even_when_waiting(lab):
    started = time.monotonic()
    with pytest.raises(NoSuch):
        lab.client().get({'type': 'relay', 'uid': 'r9'}, wait=30)
    assert time.monotonic() - started < 2


def test_a_waiting_client_that_disconnects_leaves_the_queue_at_once(lab, waiters):
    lab.client().get(R1)
    waiter = waiters(lab, R1, wait=None)
    assert queued(lab, 1)
    waiter.close()
    assert queued(lab, 0), 'a departed client stayed in the queue'


def test_who_and_queue_name_holders_as_they_announced_themselves(lab, waiters):
    holder = Broker(lab.address, job='nightly-42')
    holder.get(R1)
    waiter = waiters(lab, R1, wait=30, job='waiting-job')
    assert queued(lab, 1)
    allocations = lab.client().who()
    assert [(a['profile']['uid'], a['holder']['job']) for a in allocations] == \
        [('r1', 'nightly-42')]
    assert allocations[0]['since'] <= time.time()
    row = lab.client().queue()[0]
    assert (row['position'], row['holder']['job'], row['profiles']) == \
        (1, 'waiting-job', [R1])
    holder._disconnect()
    assert waiter.done()


def test_busy_names_the_holder_and_since_when(lab):
    holder = Broker(lab.address, job='the-holder')
    holder.get(R1)
    with pytest.raises(Busy) as caught:
        lab.client().get(R1)
    message = str(caught.value)
    assert 'relay r1 held by' in message and 'job the-holder' in message and \
        'since' in message, message


def test_equipment_shows_state_holder_and_reservations(lab, waiters):
    holder = lab.client()
    holder.get(R1)
    waiters(lab, R1, R2, wait=30)
    assert queued(lab, 1)
    rows = {row['profile']['uid']: row for row in lab.client().equipment()}
    assert (rows['r1']['state'], rows['r2']['state']) == ('held', 'reserved'), rows


def test_a_restart_keeps_the_queue_and_answers_the_waiting_get(lab, waiters):
    holder = lab.client()
    r1 = holder.get(R1)
    waiter = waiters(lab, R1, wait=60)
    assert queued(lab, 1)
    result = lab.cli('--restart')
    assert result.returncode == 0, result.stderr
    assert len(lab.client().queue()) == 1, 'the restart lost the waiting request'
    holder.yield_resources(r1)
    assert waiter.done() and waiter.error is None, waiter.error
    assert waiter.result.get_profile()['uid'] == 'r1'


CYCLER = textwrap.dedent('''
    import sys, time
    from ave.broker import Broker
    port, uid = int(sys.argv[1]), sys.argv[2]
    deadline = time.monotonic() + 40
    cycles = 0
    while time.monotonic() < deadline and cycles < 2000:
        client = Broker(('127.0.0.1', port))
        try:
            relay = client.get({'type': 'relay', 'uid': uid}, wait=5)
            time.sleep(0.01)
            client.yield_resources(relay)
            cycles += 1
        except Exception:
            pass
        finally:
            client._disconnect()
''')


def test_a_request_for_two_relays_is_not_starved_by_two_cyclers(lab, waiters):
    cyclers = [subprocess.Popen([sys.executable, '-c', CYCLER, str(lab.port), uid])
               for uid in ('r1', 'r2')]
    try:
        time.sleep(0.5)
        both = waiters(lab, R1, R2, wait=20)
        assert both.done(25)
        assert both.error is None, f'starved: {both.error}'
    finally:
        for cycler in cyclers:
            cycler.kill()
            cycler.wait(10)


def test_a_long_wait_ages_past_a_newer_request_of_higher_priority(start_broker, waiters):
    lab = start_broker(equipment=[relay('r1')], queue={'aging_s': 1})
    holder = lab.client()
    r1 = holder.get(R1)
    old = waiters(lab, R1, wait=30)
    assert queued(lab, 1)
    time.sleep(2.5)  # 2.5 levels of ageing: more than the newcomer's 2
    newer = waiters(lab, R1, wait=30, priority=2)
    assert queued(lab, 2)
    assert [row['priority'] for row in lab.client().queue()] == [0, 2], \
        'the old request did not age past the newer one'
    holder.yield_resources(r1)
    assert old.done() and old.error is None and newer.result is None


def test_nosuch_says_what_is_wrong_with_the_request(lab):
    with pytest.raises(NoSuch, match=r"no relay has key 'uidd' \(did you mean 'uid'\?\)"):
        lab.client().get({'type': 'relay', 'uidd': 'r1'})
    with pytest.raises(NoSuch, match=r"no relay has uid 'r9' \(known: r1, r2\)"):
        lab.client().get({'type': 'relay', 'uid': 'r9'})
