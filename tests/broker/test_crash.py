"""A broker crash loses no job: real daemons SIGKILLed under real clients.

Sessions outlive their broker and serve on; the next broker started on the home
adopts them; a client's ``Broker`` object reconnects and resumes by itself. See
DESIGN.md, "A broker crash loses no job", and ``ave.broker.adoption``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from support import first_line, reported_pid, wait_until
from ave.broker import Broker
from ave.broker import rendezvous
from ave.broker.daemon import wait_for_exit
from ave.broker.exceptions import Busy, NotAllocated
from ave.broker.handover import HALT_VARIABLE, STEPS
from ave.exceptions import AveException, Exit
from ave.network import framing
from ave.network.control import RemoteControl
from ave.network.exceptions import ConnectionClosed

pytestmark = pytest.mark.timeout(120)

R1 = {'type': 'relay', 'uid': 'r1'}
WORKSPACE = {'type': 'workspace'}

# A job that holds a relay and a workspace and calls them in a loop until told to
# stop; then it allocates one more workspace and gives it back, reports, and waits
# for its stdin to close before it exits (which releases what it holds).
HOLDER = textwrap.dedent('''
    import json, os, sys, time
    from ave.broker import Broker
    port, stop, pause = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    broker = Broker(('127.0.0.1', port))
    relay, workspace = broker.get({'type': 'relay', 'uid': 'r1'}, {'type': 'workspace'})
    print(json.dumps({'workspace': workspace.get_path()}), flush=True)
    calls = failures = 0
    errors = []
    deadline = time.monotonic() + 90
    while not os.path.exists(stop) and time.monotonic() < deadline:
        try:
            relay.set_circuit('c1', calls % 2 == 0)
            assert workspace.run('true')[0] == 0
            calls += 1
        except Exception as error:
            failures += 1
            errors.append(repr(error))
        time.sleep(pause)
    began = time.monotonic()
    more = broker.get({'type': 'workspace'})
    more.run('true')
    broker.yield_resources(more)
    took = time.monotonic() - began
    held = sorted(p['type'] for p in broker.list_allocations())
    print(json.dumps({'calls': calls, 'failures': failures, 'errors': errors[:5],
                      'took': took, 'held': held}), flush=True)
    sys.stdin.read()
''')

# A job that holds r1 and sleeps until its stdin closes.
SLEEPER = textwrap.dedent('''
    import json, sys
    from ave.broker import Broker
    broker = Broker(('127.0.0.1', int(sys.argv[1])))
    relay = broker.get({'type': 'relay', 'uid': 'r1'})
    relay.get_profile()
    print('held', flush=True)
    sys.stdin.readline()
    more = broker.get({'type': 'workspace'})
    broker.yield_resources(more)
    print(json.dumps(sorted(p['type'] for p in broker.list_allocations())), flush=True)
    sys.stdin.read()
''')


def relay_entry(log):
    """r1, whose circuit commands append the state they set to ``log``."""
    return {'type': 'relay', 'uid': 'r1', 'circuits': {'c1': {
        'open': ['sh', '-c', f'echo open >> {log}'],
        'close': ['sh', '-c', f'echo closed >> {log}'],
        'default': 'open'}}}


@pytest.fixture
def crash_lab(start_broker, tmp_path):
    """Factory: a started broker with r1 (its switching logged to ``lab.relay_log``)."""
    def start(crash_grace=60, **broker_json):
        log = tmp_path / 'relay.log'
        lab = start_broker(equipment=[relay_entry(log)], crash_grace=crash_grace,
                           **broker_json)
        lab.relay_log = log
        return lab
    return start


def kill_broker(lab):
    """SIGKILL the broker and wait until it is gone."""
    process = psutil.Process(lab.pid)
    process.send_signal(signal.SIGKILL)
    assert wait_for_exit(process, 10), 'the broker survived SIGKILL'


def sessions_of(lab):
    found = []
    for process in lab.processes():
        try:
            if process.name() == rendezvous.SESSION_NAME:
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def available(lab):
    with RemoteControl(lab.address, lab.admin_key, timeout=5) as admin:
        return sorted(p['uid'] for p in admin.list_available())


def last_state(lab):
    return lab.relay_log.read_text().split()[-1]


# -- the job goes on ----------------------------------------------------------------------

def test_a_killed_broker_fails_no_call_and_its_job_carries_on(crash_lab, jobs, tmp_path):
    lab = crash_lab()
    stop = tmp_path / 'stop'
    holder = jobs(HOLDER, lab.port, stop, 0.005)
    holder.stdout.readline()
    time.sleep(0.3)
    kill_broker(lab)
    time.sleep(1.0)  # no broker: the job's resource calls go on meanwhile
    lab.start()
    started = time.monotonic()
    with pytest.raises(Busy):
        lab.client().get(R1)
    stop.write_text('stop')
    report = json.loads(holder.stdout.readline())
    assert report['failures'] == 0, f'calls failed across the crash: {report["errors"]}'
    assert report['calls'] > 10, f'the job\'s calls stalled: {report}'  # ~30 ms each
    assert time.monotonic() - started < 5, \
        'the same Broker object must allocate and yield within 5 s of the new broker'
    assert report['held'] == ['relay', 'workspace']
    other = lab.client()
    holder.stdin.close()
    assert other.get(R1, wait=5).get_profile()['uid'] == 'r1', \
        'the relay must go to the next client once its holder has left'


def test_a_job_asleep_through_the_outage_is_resumed_not_reclaimed(crash_lab, jobs):
    lab = crash_lab()
    sleeper = jobs(SLEEPER, lab.port)
    assert sleeper.stdout.readline().strip() == 'held'
    kill_broker(lab)
    time.sleep(0.5)
    lab.start()
    time.sleep(5)  # longer than a client that does not come back is waited for
    with pytest.raises(Busy):
        lab.client().get(R1)
    sleeper.stdin.write('go\n')
    sleeper.stdin.flush()
    assert json.loads(sleeper.stdout.readline()) == ['relay']


def test_a_job_killed_during_the_outage_frees_its_equipment(crash_lab, jobs):
    lab = crash_lab()
    sleeper = jobs(SLEEPER, lab.port)
    assert sleeper.stdout.readline().strip() == 'held'
    kill_broker(lab)
    sleeper.kill()
    sleeper.wait(10)
    lab.start()
    started = time.monotonic()
    assert wait_until(lambda: available(lab) == ['r1'], timeout=5), \
        'equipment of a client that died during the outage must be free within 5 s'
    assert time.monotonic() - started < 5
    assert last_state(lab) == 'open', 'the relay must be reset when it is reclaimed'
    assert wait_until(lambda: not sessions_of(lab)), 'its session must end'


def test_broker_crashing_twice_and_restarting_in_between_loses_nothing(crash_lab):
    lab = crash_lab()
    client = lab.client()
    relay = client.get(R1)
    for _ in range(2):
        kill_broker(lab)
        relay.set_circuit('c1', True)
        lab.start()
        client.get(WORKSPACE).run('true')
        lab.pid = reported_pid(lab.cli('--restart').stdout)
        relay.set_circuit('c1', False)
    assert sorted(p['type'] for p in client.list_allocations()) == \
        ['relay', 'workspace', 'workspace']
    with pytest.raises(Busy):
        lab.client().get(R1)


def test_a_get_in_flight_at_the_crash_fails_clearly_and_may_be_retried(crash_lab):
    lab = crash_lab()
    holder = Broker(lab.address)
    holder.get(R1).get_profile()
    waiter = lab.client()
    outcome = []

    def wait_for_r1():
        try:
            waiter.get(R1, wait=30)
        except Exception as error:
            outcome.append(error)
    thread = threading.Thread(target=wait_for_r1)
    thread.start()
    time.sleep(0.5)
    kill_broker(lab)
    thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionClosed), outcome
    assert 'lost the broker' in str(outcome[0])
    lab.start()
    assert [p['uid'] for p in holder.list_allocations()] == ['r1'], 'the holder resumes'
    holder.__exit__(None, None, None)
    assert waiter.get(R1, wait=5).get_profile()['uid'] == 'r1'


# -- sessions on their own ----------------------------------------------------------------

def test_sessions_end_when_no_broker_comes_within_crash_grace(crash_lab):
    lab = crash_lab(crash_grace=2)
    client = lab.client()
    relay, workspace = client.get(R1, WORKSPACE)
    relay.set_circuit('c1', True)
    path = workspace.get_path()
    [session] = sessions_of(lab)
    kill_broker(lab)
    lost = time.monotonic()
    relay.set_circuit('c1', False)
    relay.set_circuit('c1', True)
    assert workspace.run('true')[0] == 0, 'the session must serve on meanwhile'
    assert wait_for_exit(session, 10), 'the session outlived its crash_grace'
    assert time.monotonic() - lost >= 1.8, 'the session ended before its grace ran out'
    assert last_state(lab) == 'open', 'the relay must be reset'
    assert not os.path.exists(path), 'the workspace must be deleted'
    with pytest.raises((Exit, ConnectionClosed), match='no broker adopted'):
        relay.get_profile()


def test_zero_crash_grace_ends_sessions_with_their_broker(crash_lab):
    lab = crash_lab(crash_grace=0)
    lab.client().get(R1).set_circuit('c1', True)
    [session] = sessions_of(lab)
    kill_broker(lab)
    assert wait_for_exit(session, 3)
    assert last_state(lab) == 'open'


def test_an_orderly_stop_ends_sessions_at_once(crash_lab):
    lab = crash_lab(crash_grace=60)
    lab.client().get(R1).set_circuit('c1', True)
    [session] = sessions_of(lab)
    assert lab.cli('--stop').returncode == 0
    assert wait_for_exit(session, 3), 'a stopped broker must end its sessions, not orphan them'
    assert last_state(lab) == 'open'


def test_sigterm_ends_an_orphaned_session_at_once(crash_lab):
    lab = crash_lab(crash_grace=60)
    lab.client().get(R1).set_circuit('c1', True)
    [session] = sessions_of(lab)
    kill_broker(lab)
    session.terminate()
    assert wait_for_exit(session, 3)
    assert last_state(lab) == 'open'


def test_start_sweeps_leftovers_but_keeps_adopted_workspaces(crash_lab):
    lab = crash_lab()
    client = lab.client()
    workspace = client.get(WORKSPACE)
    path = workspace.get_path()
    leftover = os.path.join(os.path.dirname(path), '0123456789abcdef')  # a dead one's
    os.makedirs(leftover)
    kill_broker(lab)
    lab.start()
    assert wait_until(lambda: not os.path.exists(leftover)), 'leftovers must be swept'
    assert os.path.isdir(path), 'the workspace of an adopted session must stay'
    assert workspace.run('true')[0] == 0


# -- a crash during ave-broker --restart --------------------------------------------------

def halted(process):
    try:
        return process.status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


#: Whether ave-broker --restart succeeds when the broker named by the step is killed
#: there: a successor that adopted everything, or a fresh broker started after the
#: old one died, serves; a successor killed before its commit leaves the old serving.
RESTART_SUCCEEDS = {'old-connected': True, 'old-sent': True, 'old-committed': True,
                    'new-received': False, 'new-adopted': False, 'new-committed': True}


@pytest.mark.parametrize('step', STEPS)
def test_a_crash_at_any_step_of_a_restart_loses_no_job(crash_lab, jobs, tmp_path,
                                                        monkeypatch, step):
    restart_succeeds = RESTART_SUCCEEDS[step]
    who = step.split('-')[0]
    if who == 'old':
        monkeypatch.setenv(HALT_VARIABLE, step)
    lab = crash_lab()
    monkeypatch.delenv(HALT_VARIABLE, raising=False)
    stop = tmp_path / 'stop'
    holder = jobs(HOLDER, lab.port, stop, 0.005)
    holder.stdout.readline()
    old = psutil.Process(lab.pid)
    env = {**os.environ, **({HALT_VARIABLE: step} if who == 'new' else {})}
    restart = subprocess.Popen(lab.command('--restart'), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    try:
        if who == 'old':
            victim = wait_until(lambda: halted(old) and old, timeout=20)
        else:
            victim = wait_until(lambda: next(
                (p for p in lab.processes() if p.pid != old.pid and halted(p)), None),
                timeout=20)
        assert victim, f'no broker stopped at {step}'
        victim.send_signal(signal.SIGKILL)
        out, err = restart.communicate(timeout=60)
    finally:
        if restart.poll() is None:
            restart.kill()
            restart.wait(10)
    assert (restart.returncode == 0) == restart_succeeds, err
    lab.pid = reported_pid(out) if restart_succeeds else old.pid
    assert first_line(lab.cli('--status').stdout) == f'running, pid {lab.pid}'
    with pytest.raises(Busy):
        lab.client().get(R1)
    stop.write_text('stop')
    report = json.loads(holder.stdout.readline())
    assert report['failures'] == 0, f'calls failed: {report["errors"]}'
    assert report['held'] == ['relay', 'workspace']
    holder.stdin.close()
    assert lab.client().get(R1, wait=5).get_profile()['uid'] == 'r1'


# -- resuming is for the client it belongs to ---------------------------------------------

def test_resume_with_a_made_up_token_is_refused(broker):
    client = RemoteControl(broker.address, timeout=5)
    with pytest.raises(NotAllocated):
        client.resume('made-up')
    with pytest.raises(AveException, match='token'):
        client.resume(['not', 'a', 'token'])
    with pytest.raises(AveException, match='token'):
        client.resume('x' * 10000)
    assert client.list_allocations() == [], 'the broker must serve on'


def test_a_live_clients_token_cannot_be_taken_over(broker):
    owner = broker.client()
    owner.get(WORKSPACE)
    thief = RemoteControl(broker.address, timeout=5)
    with pytest.raises(NotAllocated):
        thief.resume(owner._token)
    assert thief.list_allocations() == []
    assert [p['type'] for p in owner.list_allocations()] == ['workspace']


# -- the rendezvous under attack ----------------------------------------------------------

def connect_rendezvous(lab):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(rendezvous.socket_path(lab.home))
    return sock


def closed_by_broker(sock):
    """True once the broker closed its end (end of file, or a reset)."""
    try:
        return sock.recv(1) == b''
    except ConnectionResetError:
        return True


def presentation(pid, port=1, authkey='k'):
    return rendezvous.Presentation(pid, port, authkey, {}, None,
                                   (rendezvous.Hosting(dict(R1), None),), ()).encode()


@pytest.mark.parametrize('payload', [
    framing.encode(b'not json'),
    framing.encode(b'{"pid": 1}'),
    struct.pack('>I', 0xFFFFFFF0) + b'x' * 100,  # an announced 4 GB frame
    b'\x00\x00\x00\x00',
])
def test_garbage_at_the_rendezvous_is_dropped_and_the_broker_serves_on(
        crash_lab, payload):
    lab = crash_lab()
    with connect_rendezvous(lab) as sock:
        sock.sendall(payload)
        assert closed_by_broker(sock), 'the broker must drop a garbage presentation'
    assert lab.client().get(R1).get_profile()['uid'] == 'r1'
    assert available(lab) == [], 'garbage must not free or claim anything'


def test_a_presentation_from_a_process_that_is_no_session_is_refused(crash_lab, tmp_path):
    lab = crash_lab()
    with connect_rendezvous(lab) as sock:
        sock.sendall(framing.encode(presentation(os.getpid())))
        assert closed_by_broker(sock)
    with connect_rendezvous(lab) as sock:
        sock.sendall(framing.encode(presentation(1)))  # a pid that is not the sender's
        assert closed_by_broker(sock)
    assert available(lab) == ['r1'], 'a refused presentation must claim nothing'
    log = open(os.path.join(lab.log_dir, 'broker.log')).read()
    assert 'rendezvous: refused pid' in log


def test_a_session_presenting_a_wrong_key_is_refused(crash_lab):
    lab = crash_lab()
    client = lab.client()
    relay = client.get(R1)
    relay.get_profile()
    port = relay._address[1]
    assert rendezvous.session_answers('127.0.0.1', port, relay._authkey, 5)
    assert not rendezvous.session_answers('127.0.0.1', port, 'a guess', 5), \
        'the key check must tell a wrong key from the right one'


def test_a_silent_peer_is_dropped_and_many_at_once_are_capped(crash_lab):
    lab = crash_lab()
    crowd = [connect_rendezvous(lab) for _ in range(100)]
    try:
        assert lab.client().get(R1).get_profile()['uid'] == 'r1', \
            'peers that never present themselves must not stall the broker'
        for sock in crowd:
            assert closed_by_broker(sock), 'a silent peer must be dropped'
    finally:
        for sock in crowd:
            sock.close()
    assert psutil.Process(lab.pid).num_fds() < 100, 'the broker must not keep them'


def test_other_users_cannot_reach_the_rendezvous(crash_lab):
    lab = crash_lab()
    mode = os.stat(rendezvous.socket_path(lab.home)).st_mode & 0o777
    assert mode == 0o600
    probe = subprocess.run(
        [sys.executable, '-c', textwrap.dedent(f'''
            import os, socket
            os.setgid(65534); os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect({rendezvous.socket_path(lab.home)!r})
            except PermissionError:
                print('refused')
            else:
                print('connected')
        ''')], capture_output=True, text=True, timeout=30)
    assert probe.stdout.strip() == 'refused', probe.stderr
