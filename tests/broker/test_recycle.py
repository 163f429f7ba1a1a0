"""Recycled sessions: a session whose client has gone serves the next job as a spare.

Through real ``ave-broker`` daemons and clients. What must hold is that the next job
cannot tell: the old key opens nothing, the old client's connections are gone, what
the old job held was torn down (relay reset, workspace deleted) and reported, and the
process carries nothing over (descriptors, memory). Anything unusual ends the process
as before, and no more than ``SPARES_KEPT`` wait.
"""
from __future__ import annotations

import contextlib
import os
import signal

import psutil
import pytest
from support import children_named, reported_pid, wait_until

from ave.broker.client import Broker, ResourceProxy
from ave.broker.daemon import wait_for_exit
from ave.broker.session import (
    RECYCLE_DESCRIPTOR_GROWTH,
    RECYCLE_MEMORY_GROWTH,
    Footprint,
)
from ave.broker.sessions import SPARES_KEPT
from ave.exceptions import AuthError, Exit
from ave.network.control import RemoteControl

pytestmark = pytest.mark.timeout(120)

R1 = {'type': 'relay', 'uid': 'r1'}
WORKSPACE = {'type': 'workspace'}
# The kernel keeps 15 characters of a process name.
SPARE, SESSION = 'ave-broker-spar', 'ave-broker-sess'


def logged_relay(log, fail_while=None):
    """r1, whose reset appends ``reset`` to ``log``; it fails while ``fail_while``
    exists."""
    reset = f'echo reset >> {log}'
    if fail_while is not None:
        reset += f'; test ! -e {fail_while}'
    return {'type': 'relay', 'uid': 'r1', 'circuits': {'c1': {
        'open': ['sh', '-c', reset], 'close': ['true'], 'default': 'open'}}}


def live_children(lab, name):
    return children_named(lab.pid, name)


def spare_pids(lab):
    return {process.pid for process in live_children(lab, SPARE)}


def session_pid(lab):
    [session] = wait_until(lambda: live_children(lab, SESSION))
    return session.pid


def gone(pid, timeout=10.0):
    def ended():
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    return wait_until(ended, timeout)


def resets(log):
    return log.read_text().split().count('reset') if log.exists() else 0


def recycled(lab, pid):
    """Wait until ``pid`` waits as a spare again."""
    return wait_until(lambda: pid in spare_pids(lab), 10)


def test_the_next_job_runs_in_the_same_process_under_a_new_key(start_broker, tmp_path):
    log = tmp_path / 'relay.log'
    lab = start_broker(equipment=[logged_relay(log)])
    with Broker(lab.address) as first:
        relay = first.get(R1)
        relay.get_profile()
        pid, old_key, address = session_pid(lab), relay._authkey, relay._address
        assert resets(log) == 1, 'a first allocation is reset'
    assert recycled(lab, pid), 'the session of a job that left did not come back'
    assert resets(log) == 2, 'the relay was not reset when its job left'
    with Broker(lab.address) as second:
        relay = second.get(R1)
        assert relay.get_profile()['uid'] == 'r1'
        assert resets(log) == 2, 'a relay released cleanly was reset again when allocated'
        assert session_pid(lab) == pid
        assert relay._address == address and relay._authkey != old_key
        with pytest.raises(Exit, match='the session has ended'):
            ResourceProxy(address, old_key, R1, timeout=5).get_profile()
        with pytest.raises(AuthError):
            ResourceProxy(address, 'x' * 43, R1, timeout=5).get_profile()
        assert relay.get_profile()['uid'] == 'r1', 'the stale key disturbed the session'
    assert recycled(lab, pid)
    assert resets(log) == 3, 'the relay was not reset when the second job left'


def test_a_job_still_connected_hears_its_session_ended(start_broker, tmp_path):
    lab = start_broker(equipment=[logged_relay(tmp_path / 'relay.log')])
    client = lab.client()
    relay = client.get(R1)
    relay.get_profile()
    pid = session_pid(lab)
    lab.client(lab.admin_key).close_session(R1)
    assert recycled(lab, pid)
    with pytest.raises(Exit):
        relay.get_profile()
    assert lab.client().get(R1).get_profile()['uid'] == 'r1'


def test_a_workspace_is_deleted_before_its_session_serves_again(start_broker):
    lab = start_broker()
    with Broker(lab.address) as first:
        workspace = first.get(WORKSPACE)
        path = workspace.get_path()
        workspace.write_tempfile('left by the first job')
        pid = session_pid(lab)
    assert recycled(lab, pid)
    assert not os.path.exists(path), 'the first job\'s workspace outlived its session'
    with Broker(lab.address) as second:
        workspace = second.get(WORKSPACE)
        assert session_pid(lab) == pid
        assert workspace.get_path() != path
        assert workspace.ls(workspace.get_path()) == []


def test_a_session_whose_teardown_failed_ends_instead(start_broker, tmp_path):
    log, broken = tmp_path / 'relay.log', tmp_path / 'broken'
    lab = start_broker(equipment=[logged_relay(log, fail_while=broken)])
    with Broker(lab.address) as client:
        client.get(R1).get_profile()
        pid = session_pid(lab)
        broken.touch()
    assert gone(pid), 'a session whose reset failed was kept'
    assert pid not in spare_pids(lab)
    broken.unlink()
    assert Broker(lab.address).get(R1).get_profile()['uid'] == 'r1'
    assert resets(log) == 3, 'a relay whose reset failed was not reset for its next job'


def test_no_more_than_the_kept_spares_wait(start_broker):
    lab = start_broker()
    clients = [lab.client() for _ in range(SPARES_KEPT + 3)]
    for client in clients:
        client.get(WORKSPACE).get_path()
    pids = {process.pid for process in live_children(lab, SESSION)}
    assert len(pids) == len(clients)
    for client in clients:
        client.__exit__(None, None, None)
    assert wait_until(lambda: not live_children(lab, SESSION), 10)
    kept = wait_until(lambda: pids & spare_pids(lab))
    assert kept, 'no session came back as a spare'
    assert all(gone(pid) for pid in pids - kept), 'more spares were kept than wait'
    assert len(spare_pids(lab)) == SPARES_KEPT


def test_recycling_keeps_no_descriptor_or_memory_of_past_jobs(start_broker, tmp_path):
    lab = start_broker(equipment=[logged_relay(tmp_path / 'relay.log')])

    def job():
        with Broker(lab.address) as client:
            relay, workspace = client.get(R1, WORKSPACE)
            relay.get_profile()
            workspace.write_tempfile('x' * 100_000)
            workspace.run(['true'])
            return session_pid(lab)

    first = {job() for _ in range(4)}
    assert wait_until(lambda: first <= spare_pids(lab), 10)
    before = {pid: (psutil.Process(pid).num_fds(), psutil.Process(pid).memory_info().rss)
              for pid in first}
    later = {job() for _ in range(40)}
    assert later <= first, 'sessions were forked although spares came back'
    assert wait_until(lambda: first <= spare_pids(lab), 10)
    for pid, (fds, rss) in before.items():
        process = psutil.Process(pid)
        assert process.num_fds() == fds, 'a recycled session keeps descriptors of past jobs'
        assert process.memory_info().rss - rss < 8 * 2**20, 'a recycled session grows'


def test_recycled_spares_end_with_a_crashed_broker(start_broker):
    lab = start_broker(crash_grace=30)
    with Broker(lab.address) as client:
        client.get(WORKSPACE).get_path()
        pid = session_pid(lab)
    assert recycled(lab, pid)
    broker = psutil.Process(lab.pid)
    broker.send_signal(signal.SIGKILL)
    assert wait_for_exit(broker, 10), 'the broker survived SIGKILL'
    assert gone(pid), 'a recycled spare serves nobody and must end with its broker'


def test_an_orderly_stop_ends_recycled_spares(start_broker):
    lab = start_broker()
    with Broker(lab.address) as client:
        client.get(WORKSPACE).get_path()
        pid = session_pid(lab)
    assert recycled(lab, pid)
    assert lab.cli('--stop').returncode == 0
    assert gone(pid), 'a recycled spare outlived its stopped broker'


def test_clients_cannot_recycle_a_session(start_broker):
    lab = start_broker()
    workspace = lab.client().get(WORKSPACE)
    path = workspace.get_path()
    session = RemoteControl(workspace._address, authkey=workspace._authkey, timeout=5)
    with pytest.raises(AuthError):
        session.recycle('k' * 43)
    assert workspace.get_path() == path


def test_a_session_recycling_across_a_restart_serves_the_successor(start_broker, tmp_path):
    log, gate = tmp_path / 'relay.log', tmp_path / 'gate'
    reset = (f'echo reset >> {log}; i=0; while [ -e {gate} ] && [ $i -lt 300 ]; '
             f'do sleep 0.1; i=$((i + 1)); done')
    lab = start_broker(equipment=[{'type': 'relay', 'uid': 'r1', 'circuits': {'c1': {
        'open': ['sh', '-c', reset], 'close': ['true'], 'default': 'open'}}}])
    try:
        with Broker(lab.address) as client:
            client.get(R1).get_profile()
            pid = session_pid(lab)
            gate.touch()
        assert wait_until(lambda: resets(log) == 2), 'the reset on recycling did not start'
        result = lab.cli('--restart')
        assert result.returncode == 0, result.stderr
        lab.pid = reported_pid(result.stdout)
    finally:
        gate.unlink(missing_ok=True)
    assert wait_until(lambda: psutil.Process(pid).name() == SPARE, 10), \
        'the successor did not keep the recycled session as a spare'
    with Broker(lab.address) as client:
        assert client.get(R1).get_profile()['uid'] == 'r1'
    assert resets(log) == 2, 'the relay reset on recycling was not reported to the successor'


def test_only_a_session_asked_to_recycle_reports_recycled(start_broker):
    lab = start_broker()
    workspace = lab.client().get(WORKSPACE)
    for key in (None, lab.admin_key):
        with pytest.raises(AuthError):
            RemoteControl(lab.address, authkey=key, timeout=5).recycled()
    assert workspace.get_path(), 'the session was disturbed'
    assert lab.client().get(WORKSPACE).get_path()


CHURN_JOB = '''
import sys, time
from ave.broker.client import Broker
port, jobs, deadline = int(sys.argv[1]), int(sys.argv[2]), time.monotonic() + 60
done = 0
while done < jobs and time.monotonic() < deadline:
    with Broker(('127.0.0.1', port)) as broker:
        relay, workspace = broker.get({'type': 'relay'}, {'type': 'workspace'}, wait=30)
        relay.get_profile()
        workspace.write_tempfile('x')
    done += 1
print(done, flush=True)
'''


def test_jobs_coming_and_going_at_once_leave_everything_free(start_broker, jobs, tmp_path):
    relays = [dict(logged_relay(tmp_path / f'{n}.log'), uid=f'r{n}') for n in range(3)]
    lab = start_broker(equipment=relays)
    started = [jobs(CHURN_JOB, lab.port, 25) for _ in range(4)]
    assert [job.communicate(timeout=90)[0].strip() for job in started] == ['25'] * 4
    admin = lab.client(lab.admin_key)
    assert wait_until(lambda: len(admin.list_available()) == 3, 10), 'a relay stayed taken'
    assert wait_until(lambda: not live_children(lab, SESSION), 10)
    assert len(spare_pids(lab)) <= SPARES_KEPT
    workspaces = os.path.join(lab.home, '.ave', 'workspaces')
    assert not os.path.isdir(workspaces) or os.listdir(workspaces) == []


def test_a_footprint_grown_past_its_bounds_is_reported(tmp_path):
    """The measure a session takes before it is reused: a leak of descriptors or of
    memory in this very process shows, and ordinary churn does not."""
    start = Footprint.now()
    assert start.outgrown_by(Footprint.now()) == ''
    with contextlib.ExitStack() as files:
        for n in range(RECYCLE_DESCRIPTOR_GROWTH + 1):
            files.enter_context(open(tmp_path / f'f{n}', 'w'))
        assert 'descriptors' in start.outgrown_by(Footprint.now())
    assert start.outgrown_by(Footprint.now()) == ''
    hoard = bytearray(RECYCLE_MEMORY_GROWTH + 16 * 2**20)
    hoard[::4096] = b'x' * len(hoard[::4096])   # touch every page: resident, not reserved
    assert 'resident memory grew' in start.outgrown_by(Footprint.now())
    del hoard
