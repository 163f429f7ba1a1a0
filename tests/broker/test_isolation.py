"""A job reaches its own equipment and nothing else, tried through real brokers as a
hostile or careless test job would try it."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import psutil
import pytest

from sandboxes import requires_bwrap
from support import wait_until

pytestmark = [pytest.mark.timeout(60), requires_bwrap]

WORKSPACE = {'type': 'workspace'}


def relay(state_dir):
    return {'type': 'relay', 'uid': 'r1', 'circuits': {'c1': {
        'open': ['sh', '-c', f'echo open > {state_dir}/r1.c1'],
        'close': ['sh', '-c', f'echo closed > {state_dir}/r1.c1'],
        'default': 'open'}}}


@pytest.fixture
def lab(start_broker, tmp_path):
    state = tmp_path / 'state'
    state.mkdir()
    started = start_broker(equipment=[relay(state)], isolation='required')
    started.state = state
    return started


def sessions_of(lab):
    return [p for p in psutil.Process(lab.pid).children()
            if p.name().startswith('ave-broker-sess')]


def available(lab):
    return [p['uid'] for p in lab.client(lab.admin_key).list_available()]


def test_a_job_cannot_read_the_brokers_keys(lab):
    workspace = lab.client().get(WORKSPACE)
    code, output = workspace.run(['cat', lab.config_path('authkeys.json')])
    assert code != 0 and lab.admin_key not in output, 'a job read the admin key'


def test_a_job_cannot_see_another_jobs_workspace(lab):
    theirs = lab.client().get(WORKSPACE)
    secret = theirs.write_tempfile('their secret')
    mine = lab.client().get(WORKSPACE)
    code, output = mine.run(['cat', secret])
    assert code != 0 and 'their secret' not in output, 'a job read another job\'s file'
    code, output = mine.run(['ls', os.path.dirname(theirs.get_path())])
    assert os.path.basename(theirs.get_path()) not in output, \
        'a job listed the other workspaces'


def test_a_job_cannot_signal_the_broker_or_another_session(lab):
    lab.client().get(WORKSPACE).get_path()
    mine = lab.client().get(WORKSPACE)
    other_session = sessions_of(lab)[0].pid
    for pid in (lab.pid, other_session):
        code, _ = mine.run(['kill', '-0', str(pid)])
        assert code != 0, f'a job could signal pid {pid} (broker {lab.pid})'


def test_background_processes_are_gone_within_2_s_of_release(lab):
    client = lab.client()
    workspace = client.get(WORKSPACE)
    seconds = f'600.{uuid.uuid4().int % 10 ** 6}'
    workspace.run(['sh', '-c', f'setsid sleep {seconds} & (sleep {seconds} &) & '
                                f'nohup sleep {seconds} >/dev/null 2>&1 &'])
    client.yield_resources(workspace)

    def leftovers():
        return [p for p in psutil.process_iter(['cmdline'])
                if p.info['cmdline'] == ['sleep', seconds]]
    assert wait_until(lambda: not leftovers(), timeout=2), \
        f'{len(leftovers())} processes started by the job outlived it'


JOB = textwrap.dedent('''
    import sys
    from ave.broker import Broker
    broker = Broker(('127.0.0.1', int(sys.argv[1])))
    relay, workspace = broker.get({'type': 'relay', 'uid': 'r1'}, {'type': 'workspace'})
    relay.set_circuit('c1', True)
    print(workspace.get_path(), flush=True)
    workspace.run(['sleep', '3600'])
''')


def test_job_killed_inside_a_long_run_is_reclaimed_within_2_s(lab):
    job = subprocess.Popen([sys.executable, '-c', JOB, str(lab.port)],
                           stdout=subprocess.PIPE, text=True)
    try:
        path = job.stdout.readline().strip()
        assert wait_until(lambda: any(p.info['cmdline'] == ['sleep', '3600']
                                      for p in psutil.process_iter(['cmdline'])), 10)
        job.kill()
        killed = time.monotonic()
        assert wait_until(lambda: 'r1' in available(lab), timeout=2), \
            'the relay was not free again within 2 s of the job\'s death'
        took = time.monotonic() - killed
    finally:
        job.kill()
        job.wait(10)
        job.stdout.close()
    assert (lab.state / 'r1.c1').read_text().strip() == 'open', 'the relay was not reset'
    assert not os.path.exists(path), 'the workspace was left on disk'
    assert took < 2


def test_a_killed_session_still_has_its_workspace_deleted_and_relay_reset(lab):
    relay_proxy, workspace = lab.client().get({'type': 'relay', 'uid': 'r1'}, WORKSPACE)
    relay_proxy.set_circuit('c1', True)
    path = workspace.get_path()
    sessions_of(lab)[0].send_signal(signal.SIGKILL)
    assert wait_until(lambda: not os.path.exists(path), timeout=5), \
        'the workspace of a killed session stayed on disk'
    assert wait_until(lambda: 'r1' in available(lab), timeout=5)
    assert (lab.state / 'r1.c1').read_text().strip() == 'open', 'the relay was not reset'


def test_a_session_killed_inside_a_command_leaves_no_status_file(lab):
    job = subprocess.Popen([sys.executable, '-c', JOB, str(lab.port)],
                           stdout=subprocess.PIPE, text=True)
    try:
        job.stdout.readline()
        assert wait_until(lambda: any(p.info['cmdline'] == ['sleep', '3600']
                                      for p in psutil.process_iter(['cmdline'])), 10)
        session = sessions_of(lab)[0]
        pattern = os.path.join(tempfile.gettempdir(), f'ave-sandbox-status-{session.pid}-*')
        assert glob.glob(pattern), 'the running command has no status file'
        session.send_signal(signal.SIGKILL)
        assert wait_until(lambda: not glob.glob(pattern), timeout=5), \
            'a killed session left its status file behind'
    finally:
        job.kill()
        job.wait(10)
        job.stdout.close()


def test_a_start_sweeps_workspaces_no_session_owns(broker_home):
    lab = broker_home()
    root = os.path.join(lab.home, '.ave', 'workspaces')
    orphan, other = os.path.join(root, '0123456789abcdef'), os.path.join(root, 'notes')
    os.makedirs(os.path.join(orphan, 'deep'))
    os.makedirs(other)
    lab.start()
    assert wait_until(lambda: not os.path.exists(orphan), timeout=5), \
        'a crash\'s workspace directory survived the start'
    assert os.path.isdir(other), 'the sweep removed something that is not a workspace'


@pytest.fixture
def no_bubblewrap(tmp_path):
    """A PATH without bwrap for the broker command."""
    empty = tmp_path / 'no-bin'
    empty.mkdir()
    return ('env', f'PATH={empty}')


def test_required_isolation_without_bubblewrap_refuses_to_start(broker_home, no_bubblewrap):
    lab = broker_home(isolation='required')
    result = lab.cli('--start', prefix=no_bubblewrap)
    assert result.returncode == 1 and result.stderr.count('\n') == 1, result.stderr
    assert 'isolation is "required" but commands cannot be sandboxed: bubblewrap not ' \
           'found' in result.stderr, result.stderr


def test_auto_isolation_without_bubblewrap_starts_and_warns(broker_home, no_bubblewrap):
    lab = broker_home(isolation='auto')
    lab.start(prefix=no_bubblewrap)
    text = open(os.path.join(lab.log_dir, 'broker.log')).read()
    assert text.count('JOBS ARE NOT ISOLATED') == 1, 'no single loud warning in the log'
