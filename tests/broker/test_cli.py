"""``ave-broker`` as a lab owner runs it: a real command, a real daemon, a temp home.

The fixtures (conftest.py) stop and, if need be, kill every broker and session a
test started, so a failing test leaves nothing running.
"""
import glob
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

import support
from ave.broker.cli import broker_listener
pytestmark = pytest.mark.timeout(30)


def relay(uid):
    """A broker.json relay entry whose commands always succeed."""
    return {'type': 'relay', 'uid': uid,
            'circuits': {'c1': {'open': ['true'], 'close': ['true'], 'default': 'open'}}}


def relay_available():
    try:
        import ave.equipment.relay  # noqa: F401
    except ImportError:
        return False
    return True


def wait_until(predicate, timeout=10.0):
    return support.wait_until(predicate, timeout, 0.05)


def assert_one_line_failure(result, *expected):
    """Exit status 1 and exactly one line on stderr that says ``expected``."""
    assert result.returncode == 1, f'expected failure, got {result.returncode}: {result}'
    assert result.stderr.startswith('ave-broker: '), f'unprefixed error: {result.stderr!r}'
    assert result.stderr.count('\n') == 1, f'not one line: {result.stderr!r}'
    for text in expected:
        assert text in result.stderr, f'{text!r} missing from {result.stderr!r}'


@pytest.fixture
def bystander():
    """A live process that is not a broker: pid files naming it must be left alone."""
    process = subprocess.Popen(['sleep', '60'])
    yield process
    process.kill()
    process.wait()


# -- start, status, stop ---------------------------------------------------------------

def test_start_prints_the_pid_that_status_and_the_pid_file_report(broker):
    result = broker.cli('--status')
    assert result.returncode == 0, result.stderr
    assert support.first_line(result.stdout) == f'running, pid {broker.pid}'
    assert broker.read_pid_file() == broker.pid, 'the pid file names another process'
    assert psutil.Process(broker.pid).name() == 'ave-broker', 'daemon is misnamed'


def test_second_start_is_refused_while_the_broker_runs(broker):
    result = broker.cli('--start')
    assert_one_line_failure(result, f'already running, pid {broker.pid}')
    assert broker.read_pid_file() == broker.pid, 'the refused start touched the pid file'


def test_stop_ends_the_broker_and_removes_the_pid_file(broker):
    daemon = psutil.Process(broker.pid)
    result = broker.cli('--stop')
    assert result.returncode == 0, result.stderr
    assert not daemon.is_running() or daemon.status() == psutil.STATUS_ZOMBIE, \
        'the broker still runs after --stop returned'
    assert not os.path.exists(broker.pid_file), 'the pid file outlived the broker'
    assert broker.cli('--status').returncode == 1, 'status still says running'


def test_stop_and_status_without_a_broker_exit_1(broker_home):
    lab = broker_home()
    assert_one_line_failure(lab.cli('--stop'), 'not running')
    status = lab.cli('--status')
    assert (status.returncode, status.stdout) == (1, 'not running\n')


def test_sessions_end_with_their_broker(start_broker):
    lab = start_broker()
    lab.client().get({'type': 'workspace'})
    assert lab.cli('--stop').returncode == 0
    assert wait_until(lambda: not lab.processes()), \
        f'sessions outlived their broker: {lab.processes()}'


# -- stale pid files -------------------------------------------------------------------

@pytest.mark.parametrize('action', ['--stop', '--hickup'])
def test_pid_file_of_another_program_is_reported_and_not_signalled(broker_home, bystander,
                                                                   action):
    lab = broker_home()
    lab.write_config(lab.pid_file, f'{bystander.pid}\n')
    assert_one_line_failure(lab.cli(action), 'not running (stale pid file removed)')
    assert bystander.poll() is None, f'{action} signalled a process that is no broker'
    assert not os.path.exists(lab.pid_file), 'the stale pid file was kept'


def test_status_reports_and_removes_a_dead_pid(broker_home):
    lab = broker_home()
    finished = subprocess.Popen(['true'])
    finished.wait()
    lab.write_config(lab.pid_file, f'{finished.pid}\n')
    status = lab.cli('--status')
    assert status.returncode == 1
    assert status.stdout == 'not running (stale pid file removed)\n'
    assert not os.path.exists(lab.pid_file), 'the stale pid file was kept'


def test_ave_broker_younger_than_the_pid_file_is_a_reused_pid(broker_home):
    """Another home's broker may get the pid of ours after a crash: same name, but it
    started after our pid file was written, so it cannot be the one that wrote it."""
    lab = broker_home()
    impostor = subprocess.Popen(
        [sys.executable, '-c', 'from ave.network.process import Process; '
         'Process(proc_name="ave-broker").perform_prctl(); print(flush=True); '
         'import time; time.sleep(60)'], stdout=subprocess.PIPE)
    try:
        impostor.stdout.readline()
        lab.write_config(lab.pid_file, f'{impostor.pid}\n')
        an_hour_ago = time.time() - 3600
        os.utime(lab.pid_file, (an_hour_ago, an_hour_ago))
        assert_one_line_failure(lab.cli('--stop'), 'stale pid file removed')
        assert impostor.poll() is None, '--stop signalled a broker it does not own'
    finally:
        impostor.kill()
        impostor.wait()


def test_start_replaces_a_stale_pid_file(broker_home, bystander):
    lab = broker_home()
    lab.write_config(lab.pid_file, f'{bystander.pid}\n')
    lab.start()
    assert lab.read_pid_file() == lab.pid, 'the pid file still names the old process'


# -- foreground ------------------------------------------------------------------------

@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_foreground_writes_the_pid_file_and_a_signal_ends_it_with_0(broker_home, tmp_path,
                                                                     signum):
    """SIGTERM is how a supervisor stops it; SIGINT is Ctrl-C in a terminal."""
    lab = broker_home()
    with open(tmp_path / 'foreground.err', 'w') as stderr:
        process = lab.popen('--start', '--foreground', stderr=stderr)
    assert wait_until(lambda: lab.read_pid_file() == process.pid), \
        'the foreground broker never wrote its own pid to the pid file'
    assert support.first_line(lab.cli('--status').stdout) == f'running, pid {process.pid}'
    process.send_signal(signum)
    assert process.wait(10) == 0, f'{signum.name} did not end the foreground broker with 0'
    assert not os.path.exists(lab.pid_file), 'the pid file outlived the broker'
    assert 'broker started' in (tmp_path / 'foreground.err').read_text(), \
        'the foreground broker did not log to stderr'


def test_foreground_goes_only_with_start(broker_home):
    assert broker_home().cli('--status', '--foreground').returncode == 2


# -- hickup ----------------------------------------------------------------------------

def test_hickup_makes_the_broker_write_its_stack(broker):
    assert broker.cli('--hickup').returncode == 0
    pattern = os.path.join(broker.hickup_dir, f'*-ave-broker-{broker.pid}')
    assert wait_until(lambda: glob.glob(pattern)), f'no hickup file matches {pattern}'


def test_hickup_reaches_the_sessions(broker):
    broker.client().get({'type': 'workspace'}).get_path()  # the session is up and named
    session = next(child for child in psutil.Process(broker.pid).children()
                   if child.name().startswith('ave-broker-sess'))
    assert broker.cli('--hickup').returncode == 0
    pattern = os.path.join(broker.hickup_dir, f'*-ave-broker-session-{session.pid}')
    assert wait_until(lambda: glob.glob(pattern)), f'no hickup file matches {pattern}'


# -- listings --------------------------------------------------------------------------

@pytest.mark.skipif(not relay_available(), reason='the relay plug-in cannot be imported')
def test_list_all_shows_every_relay_and_list_only_free_ones(start_broker):
    lab = start_broker(equipment=[relay('r1'), relay('r2')])
    line = 'relay {} circuits=c1 power_state=online\n'
    lab.client().get({'type': 'relay', 'uid': 'r1'})
    listed_all = lab.cli('--list-all')
    listed = lab.cli('--list')
    held, free = listed_all.stdout.splitlines()
    assert held.startswith(line.format('r1').strip() + '  # held by '), listed_all.stderr
    assert shlex.split(held, comments=True) == line.format('r1').split(), \
        'the mark must be a comment that splitting drops'
    assert free + '\n' == line.format('r2'), listed_all.stderr
    assert listed.stdout == line.format('r2'), listed.stderr


def test_list_with_nothing_free_says_why_on_stderr(start_broker):
    lab = start_broker(equipment=[relay('r1')])
    lab.client().get({'type': 'relay', 'uid': 'r1'})
    result = lab.cli('--list')
    assert (result.returncode, result.stdout) == (0, ''), result.stderr
    assert result.stderr == ('ave-broker: nothing is available now (1 items held, releasing '
                             'or offline; --list-all shows them)\n')


def test_list_without_equipment_prints_nothing(broker):
    result = broker.cli('--list-all')
    assert (result.returncode, result.stdout) == (0, ''), result.stderr


def test_list_without_a_broker_fails_cleanly(broker_home):
    assert_one_line_failure(broker_home().cli('--list'), 'not running')


# -- configuration errors --------------------------------------------------------------

def test_malformed_broker_json_names_path_line_and_column(broker_home):
    lab = broker_home()
    lab.write_config(lab.config_path('broker.json'), '{\n  "port": \n')
    assert_one_line_failure(lab.cli('--start'), lab.config_path('broker.json'),
                            'line 3 column 1')
    assert not lab.processes(), 'a broker started on a malformed configuration'


def test_wrong_field_names_path_and_field(broker_home):
    lab = broker_home(port='x')
    assert_one_line_failure(lab.cli('--start'), lab.config_path('broker.json'), "'port'")


def test_unknown_equipment_type_is_refused_naming_the_entry(broker_home):
    lab = broker_home(equipment=[{'type': 'toaster', 'uid': 't1'}])
    assert_one_line_failure(lab.cli('--start'), "field 'equipment[0]'", "'toaster'")


def test_unknown_type_in_a_stack_is_refused_naming_the_member(broker_home):
    lab = broker_home(stacks=[[{'type': 'workspace', 'uid': 'w'}, {'type': 'relya'}]])
    assert_one_line_failure(lab.cli('--start'), "field 'stacks[0][1].type'")


def test_broken_workspace_json_fails_start(broker_home):
    lab = broker_home()
    lab.write_config(lab.config_path('workspace.json'), '{"root": "relative"}')
    assert_one_line_failure(lab.cli('--start'), lab.config_path('workspace.json'), "'root'")


def test_missing_configuration_names_the_file(tmp_path):
    (tmp_path / 'empty').mkdir()
    result = subprocess.run([sys.executable, '-m', 'ave.broker.cli', '--start',
                             '--home', str(tmp_path / 'empty')],
                            capture_output=True, text=True, timeout=30)
    assert_one_line_failure(result, 'broker.json', 'no such file')


def test_port_in_use_fails_cleanly(broker_home):
    lab = broker_home()
    with socket.create_server(('127.0.0.1', lab.port)):
        assert_one_line_failure(lab.cli('--start'), f'127.0.0.1:{lab.port}', 'in use')
    assert not os.path.exists(lab.pid_file), 'a pid file was written for no broker'


def test_failure_inside_the_daemon_reaches_the_command(broker_home):
    lab = broker_home()
    os.makedirs(os.path.dirname(lab.log_dir), exist_ok=True)
    lab.write_config(lab.log_dir, 'a file where the log directory should be')
    assert_one_line_failure(lab.cli('--start'), 'failed to start')
    assert not lab.processes(), 'the failed daemon is still running'


# -- logs and help ---------------------------------------------------------------------

def test_daemon_logs_under_the_home_and_never_the_keys(broker):
    broker.cli('--list-all')
    assert broker.cli('--stop').returncode == 0
    with open(os.path.join(broker.log_dir, 'broker.log'), encoding='utf-8') as stream:
        text = stream.read()
    assert f'broker started: pid {broker.pid}' in text, text
    assert f'broker stopped: pid {broker.pid}' in text, text
    assert broker.admin_key not in text and broker.share_key not in text, 'a key was logged'


def test_help_exits_0():
    result = subprocess.run([sys.executable, '-m', 'ave.broker.cli', '--help'],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert '--foreground' in result.stdout


@pytest.mark.parametrize('listening, port, expected', [
    ([], 4000, None),
    ([(9, '127.0.0.1', 51234), (5, '127.0.0.1', 4000)], 4000, ('127.0.0.1', 4000)),
    ([(9, '127.0.0.1', 51234), (5, '0.0.0.0', 4100)], 4000, ('0.0.0.0', 4100)),
])
def test_status_names_the_brokers_own_listener_not_a_session_being_forked(listening, port,
                                                                           expected):
    assert broker_listener(listening, port) == expected
