"""ave.sandbox: what a command can reach, how it ends, and how it is killed.

Everything runs real bwrap (tests that need it are skipped, with probe()'s reason,
where the kernel refuses namespaces). A fake broker home and a fake workspace root
under tmp_path stand for the real ones; this test process stands for the broker.
"""
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest

import ave.cmd
from ave.exceptions import RunError, Timeout
from ave.sandbox import (MODES, Killed, Layout, Sandbox, SandboxUnavailable, current,
                         enabled_for, mount_arguments, probe)
from ave.sandbox.layout import masked_installation
from sandboxes import installed, requires_bwrap
from support import wait_until

pytestmark = pytest.mark.timeout(30)

SECRET = 'admin-key-that-must-never-leak'

# Host device nodes that bwrap's minimal /dev does not have; the first present is used.
HOST_ONLY_DEVICES = ('/dev/fuse', '/dev/kmsg', '/dev/loop-control', '/dev/net/tun')

MODE_IDS = ['plain', pytest.param('sandboxed', marks=requires_bwrap)]


# --- fixtures -----------------------------------------------------------------------

@pytest.fixture
def home(tmp_path):
    """A broker home holding keys, and a workspace root with two jobs' workspaces."""
    config = tmp_path / 'home' / '.ave' / 'config'
    config.mkdir(parents=True)
    (config / 'authkeys.json').write_text(f'{{"admin": "{SECRET}"}}')
    root = tmp_path / 'workspaces'
    for name in ('mine', 'theirs'):
        (root / name).mkdir(parents=True)
    (root / 'theirs' / 'results.txt').write_text('another job\'s data')
    return {'keys': str(config / 'authkeys.json'), 'dot_ave': str(tmp_path / 'home' / '.ave'),
            'root': str(root), 'mine': str(root / 'mine'), 'theirs': str(root / 'theirs')}


@pytest.fixture
def box(home):
    """An enabled sandbox as a session would install it, owning the workspace 'mine'."""
    sandbox = Sandbox(True, hidden=[home['dot_ave'], home['root']])
    sandbox.allow_write(home['mine'])
    return sandbox


@pytest.fixture(params=MODE_IDS)
def any_box(request, home):
    """Each test using this runs with isolation off and on: the API is the same."""
    sandbox = Sandbox(request.param == 'sandboxed', hidden=[home['dot_ave'], home['root']])
    sandbox.allow_write(home['mine'])
    return sandbox


def sh(script):
    return ['sh', '-c', script]


def processes_with(word):
    """Live processes whose command line contains ``word`` as one argument."""
    found = []
    for proc in psutil.process_iter(['cmdline']):
        if word in (proc.info['cmdline'] or []) and proc.status() != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def unique_seconds(whole=600):
    """``whole`` seconds and a random fraction: a duration that names our sleeps among
    every other process on this machine."""
    return f'{whole}.{uuid.uuid4().int % 10 ** 9:09d}'


def in_thread(function):
    """Start ``function`` in a thread; returns a dict that gets 'result' or 'error'."""
    outcome = {}

    def target():
        try:
            outcome['result'] = function()
        except BaseException as err:  # the test inspects whatever happened
            outcome['error'] = err
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    outcome['thread'] = thread
    return outcome


# --- isolation: what a job's command cannot reach ---------------------------------

@requires_bwrap
def test_the_broker_keys_cannot_be_read(box, home):
    code, output = box.run(['cat', home['keys']])
    assert code != 0 and SECRET not in output, output


@requires_bwrap
def test_the_broker_home_looks_empty(box, home):
    assert box.run(['ls', '-A', home['dot_ave']]) == (0, '')


@requires_bwrap
def test_another_jobs_workspace_is_invisible(box, home):
    code, output = box.run(['cat', os.path.join(home['theirs'], 'results.txt')])
    assert code != 0 and 'another job' not in output, output
    assert box.run(['ls', home['root']]) == (0, 'mine\r\n'), 'only our own workspace is there'


@requires_bwrap
def test_the_own_workspace_is_writable_and_nothing_else(box, home):
    code, _ = box.run(sh('echo made > made.txt'), cwd=home['mine'])
    assert code == 0 and open(os.path.join(home['mine'], 'made.txt')).read() == 'made\n'
    code, output = box.run(sh('echo x > /var/tmp/ave-sandbox-test-leak'))
    assert code != 0 and 'Read-only file system' in output, output
    assert not os.path.exists('/var/tmp/ave-sandbox-test-leak')


@requires_bwrap
def test_workspaces_under_the_hidden_home_stay_reachable(tmp_path):
    dot_ave = tmp_path / 'home' / '.ave'
    (dot_ave / 'config').mkdir(parents=True)
    (dot_ave / 'config' / 'authkeys.json').write_text(SECRET)
    mine = dot_ave / 'workspaces' / 'mine'  # the default root is <home>/.ave/workspaces
    mine.mkdir(parents=True)
    sandbox = Sandbox(True, hidden=[str(dot_ave), str(dot_ave / 'workspaces')])
    sandbox.allow_write(str(mine))
    code, output = sandbox.run(sh('echo kept > kept.txt; ls -A ..; ls -A ../..'), cwd=str(mine))
    assert (code, output) == (0, 'mine\r\nworkspaces\r\n'), output
    assert (mine / 'kept.txt').read_text() == 'kept\n'


@requires_bwrap
def test_tmp_is_private(box, tmp_path):
    (tmp_path / 'host-file').write_text('host')
    assert box.run(['test', '-e', str(tmp_path / 'host-file')])[0] == 1
    box.run(sh('echo inside > /tmp/left-here'))
    assert box.run(['cat', '/tmp/left-here'])[0] == 1, 'each command gets a fresh /tmp'


@requires_bwrap
def test_memory_backed_file_systems_are_capped(home):
    sandbox = Sandbox(True, hidden=[home['dot_ave']], tmp_bytes=2 * 1024 * 1024)
    for directory in ('/tmp', '/run', home['dot_ave']):
        code, output = sandbox.run(sh(f'head -c 3000000 /dev/zero > {directory}/fill'))
        assert code != 0 and 'No space left' in output, (directory, output)


@requires_bwrap
def test_control_sockets_under_run_are_out_of_reach(box):
    path = f'/run/ave-sandbox-test-{uuid.uuid4().hex[:8]}.sock'
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(path)
    except OSError as err:
        pytest.skip(f'cannot make a socket under /run here: {err}')
    try:
        listener.listen()
        code, output = box.run([sys.executable, '-c', 'import socket, sys; '
                                'socket.socket(socket.AF_UNIX).connect(sys.argv[1])', path])
        assert code != 0 and 'No such file' in output, output
    finally:
        listener.close()
        os.unlink(path)


@requires_bwrap
def test_the_broker_cannot_be_seen_or_signalled(box):
    code, output = box.run(sh(f'kill -0 {os.getpid()}'))
    assert code != 0 and 'No such process' in output, output
    code, output = box.run(sh('ls /proc | grep -c "^[0-9]"'))
    assert int(output) <= 4, f'the sandbox sees foreign processes: {output}'


@requires_bwrap
def test_capabilities_are_dropped_even_for_root(box):
    code, output = box.run(['grep', '-E', '^(Cap(Inh|Prm|Eff|Amb)|NoNewPrivs):',
                            '/proc/self/status'])
    fields = dict(line.split(':\t') for line in output.splitlines())
    assert fields == {'CapInh': '0000000000000000', 'CapPrm': '0000000000000000',
                      'CapEff': '0000000000000000', 'CapAmb': '0000000000000000',
                      'NoNewPrivs': '1'}, fields


@requires_bwrap
def test_the_network_is_shared_so_loopback_services_are_reachable(box):
    with socket.create_server(('127.0.0.1', 0)) as server:
        port = server.getsockname()[1]
        accepted = in_thread(lambda: server.accept()[0].sendall(b'adb server here'))
        code, output = box.run([sys.executable, '-c', 'import socket, sys; print(socket.'
                                'create_connection(("127.0.0.1", int(sys.argv[1]))).recv(99))',
                                str(port)], timeout=10)
        accepted['thread'].join(5)
    assert (code, output.strip()) == (0, "b'adb server here'"), output


@requires_bwrap
def test_an_allowed_device_node_appears_and_others_do_not(box):
    node = next((path for path in HOST_ONLY_DEVICES if os.path.exists(path)), None)
    if node is None:
        pytest.skip(f'none of {HOST_ONLY_DEVICES} exists on this host')
    assert box.run(['test', '-e', node])[0] == 1, f'{node} is there without being allowed'
    box.allow_device(node)
    assert box.run(['test', '-c', node])[0] == 0, f'{node} was allowed but is missing'


@requires_bwrap
def test_a_command_not_isolated_sees_the_host_as_it_is(box, tmp_path):
    node = next((path for path in HOST_ONLY_DEVICES if os.path.exists(path)), None)
    if node is None:
        pytest.skip(f'none of {HOST_ONLY_DEVICES} exists on this host')
    assert box.run(['test', '-e', node])[0] == 1, f'{node} is there in the sandbox'
    assert box.run(['test', '-e', node], isolate=False)[0] == 0
    flag = tmp_path / 'flag'
    assert box.run(['touch', str(flag)], isolate=False)[0] == 0 and flag.exists()


@requires_bwrap
def test_kill_ends_a_command_that_is_not_isolated(box):
    seconds = unique_seconds(3600)
    running = in_thread(lambda: box.run(['sleep', seconds], isolate=False))
    assert wait_until(lambda: processes_with(seconds), 5), 'the command never started'
    started = time.monotonic()
    box.kill()
    running['thread'].join(5)
    assert time.monotonic() - started < 1 and isinstance(running.get('error'), Killed), \
        running
    assert not processes_with(seconds)


@requires_bwrap
def test_a_hidden_file_reads_empty(tmp_path):
    secret = tmp_path / 'secret.conf'
    secret.write_text(SECRET)
    assert Sandbox(True, hidden=[str(secret)]).run(['cat', str(secret)]) == (0, '')


@requires_bwrap
def test_a_disallowed_workspace_becomes_read_only_again(box, home):
    box.disallow(home['mine'])
    assert box.run(['test', '-e', home['mine']])[0] == 1, 'it is hidden with the root again'


# --- processes left behind ----------------------------------------------------------

@requires_bwrap
def test_processes_left_behind_are_gone_when_run_returns(box):
    seconds = [unique_seconds() for _ in range(4)]
    script = (f'setsid sleep {seconds[0]} & nohup sleep {seconds[1]} >/dev/null 2>&1 & '
              f'(sleep {seconds[2]} &) ; (setsid sh -c "sleep {seconds[3]} &" &) ; '
              'sleep 0.2; echo started')
    assert box.run(sh(script)) == (0, 'started\r\n')
    left = [proc for duration in seconds for proc in processes_with(duration)]
    assert left == [], f'processes outlived their command: {left}'


@requires_bwrap
def test_a_timeout_takes_what_the_command_started_along(box):
    seconds = unique_seconds()
    with pytest.raises(Timeout) as caught:
        box.run(sh(f'setsid sleep {seconds} & echo waiting; sleep 30'), timeout=0.5)
    assert caught.value.out == 'waiting\r\n' and caught.value.cmd[0] == 'sh'
    assert wait_until(lambda: not processes_with(seconds), 2), 'the setsid child survived'


@requires_bwrap
def test_commands_die_with_a_session_killed_by_sigkill(home, tmp_path):
    seconds = unique_seconds()
    session = subprocess.Popen(
        [sys.executable, '-c', 'import sys; from ave.sandbox import Sandbox; '
         'Sandbox(True).run(["sh", "-c", "setsid sleep %s & sleep %s"])' % (seconds, seconds)])
    try:
        assert wait_until(lambda: len(processes_with(seconds)) == 2, 10), 'nothing started'
        session.kill()
        assert wait_until(lambda: not processes_with(seconds), 2), \
            'commands outlived the session that started them'
    finally:
        session.kill()
        session.wait()


# --- kill() -------------------------------------------------------------------------

@pytest.mark.parametrize('any_box', MODE_IDS, indirect=True)
def test_kill_from_another_thread_ends_a_long_command_within_a_second(any_box):
    seconds = unique_seconds(3600)
    running = in_thread(lambda: any_box.run(['sleep', seconds]))
    assert wait_until(lambda: processes_with(seconds), 5), 'the command never started'
    started = time.monotonic()
    any_box.kill()
    running['thread'].join(5)
    took = time.monotonic() - started
    assert took < 1, f'kill() took {took:.2f} s'
    assert isinstance(running.get('error'), Killed), running
    assert not processes_with(seconds)


@pytest.mark.parametrize('any_box', MODE_IDS, indirect=True)
def test_kill_with_an_owner_spares_the_commands_of_others(any_box):
    workspace, relay = object(), object()
    mine, theirs = unique_seconds(), unique_seconds()
    doomed = in_thread(lambda: any_box.run(['sleep', mine], owner=workspace))
    spared = in_thread(lambda: any_box.run(['sleep', theirs], owner=relay))
    assert wait_until(lambda: processes_with(mine) and processes_with(theirs), 5)
    any_box.kill(workspace)
    doomed['thread'].join(5)
    assert isinstance(doomed.get('error'), Killed), doomed
    assert processes_with(theirs) and spared['thread'].is_alive(), 'the other owner was hit'
    any_box.kill(relay)
    spared['thread'].join(5)
    assert isinstance(spared.get('error'), Killed), spared


@pytest.mark.parametrize('any_box', MODE_IDS, indirect=True)
def test_kill_of_everything_leaves_the_spared_owners_commands_running(any_box):
    job, releasing = object(), object()
    mine, spared = unique_seconds(), unique_seconds()
    doomed = in_thread(lambda: any_box.run(['sleep', mine], owner=job))
    reset = in_thread(lambda: any_box.run(['sleep', spared], owner=releasing))
    assert wait_until(lambda: processes_with(mine) and processes_with(spared), 5)
    any_box.kill(spare=[releasing])
    doomed['thread'].join(5)
    assert isinstance(doomed.get('error'), Killed), doomed
    assert processes_with(spared) and reset['thread'].is_alive(), 'a spared owner was hit'
    any_box.kill()
    reset['thread'].join(5)
    assert isinstance(reset.get('error'), Killed), reset


@pytest.mark.parametrize('any_box', MODE_IDS, indirect=True)
def test_commands_run_normally_after_a_kill(any_box):
    any_box.kill()
    assert any_box.run(['echo', 'after']) == (0, 'after\r\n')


@requires_bwrap
def test_kill_ends_many_concurrent_commands(box):
    seconds = unique_seconds()
    runs = [in_thread(lambda: box.run(['sleep', seconds])) for _ in range(6)]
    # bwrap's and the launcher's command lines name the duration too: count sleeps.
    assert wait_until(lambda: len([proc for proc in processes_with(seconds)
                                   if proc.info['cmdline'][0] == 'sleep']) == 6, 10)
    box.kill()
    for running in runs:
        running['thread'].join(5)
    assert all(isinstance(running.get('error'), Killed) for running in runs), runs
    assert not processes_with(seconds)


# --- the same results as ave.cmd.run ------------------------------------------------

@pytest.mark.parametrize('any_box', MODE_IDS, indirect=True)
@pytest.mark.parametrize('script', ['echo out; echo err >&2; exit 3', 'kill -TERM $$',
                                    'kill -KILL $$', 'exit 143', 'test -t 0 && test -t 1'])
def test_exit_code_and_output_are_those_of_ave_cmd(any_box, script):
    assert any_box.run(sh(script)) == ave.cmd.run(sh(script))


@pytest.mark.parametrize('any_box', MODE_IDS, indirect=True)
@pytest.mark.parametrize('cmd, cwd', [(['no-such-program-for-ave'], ''),
                                      (['./not-here'], '/'),
                                      (['true'], '/no/such/directory')])
def test_start_failures_are_run_errors_like_ave_cmd(any_box, cmd, cwd):
    with pytest.raises(RunError) as ours:
        any_box.run(cmd, cwd=cwd)
    with pytest.raises(RunError) as theirs:
        ave.cmd.run(cmd, cwd=cwd)
    assert (str(ours.value), ours.value.cmd, ours.value.out) == \
        (str(theirs.value), theirs.value.cmd, theirs.value.out)


@pytest.mark.parametrize('any_box', MODE_IDS, indirect=True)
def test_a_string_command_is_split_on_whitespace_and_cwd_applies(any_box, home):
    assert any_box.run('pwd', cwd=home['mine']) == (0, home['mine'] + '\r\n')


@pytest.mark.parametrize('any_box', MODE_IDS, indirect=True)
def test_output_reaches_output_file_as_it_arrives(any_box):
    stream = io.StringIO()
    code, output = any_box.run(sh('echo one; echo two'), output_file=stream)
    assert stream.getvalue() == output == 'one\r\ntwo\r\n'


@pytest.mark.parametrize('cmd, error', [([], ValueError), ('', ValueError), (None, TypeError),
                                        (['ls', 3], TypeError), ([''], ValueError),
                                        (['echo', 'nul\0'], ValueError)])
def test_bad_commands_are_refused_like_ave_cmd(cmd, error):
    with pytest.raises(error):
        Sandbox(False).run(cmd)


def test_isolation_off_runs_commands_plainly(tmp_path):
    (tmp_path / 'visible').write_text('plain')
    code, output = Sandbox(False, hidden=[str(tmp_path)]).run(
        sh(f'cat {tmp_path}/visible; kill -0 {os.getpid()} && echo sees-the-broker'))
    assert (code, output) == (0, 'plainsees-the-broker\r\n')


def test_nothing_installed_means_a_disabled_sandbox():
    assert current().enabled is False


def test_install_returns_the_sandbox_it_replaces():
    mine = Sandbox(False)
    with installed(mine):
        assert current() is mine
    assert current() is not mine


# --- probe and modes --------------------------------------------------------------

def test_probe_reports_a_missing_bwrap_on_path_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv('PATH', str(tmp_path))
    problem = probe()
    assert problem is not None and '\n' not in problem and 'bubblewrap not found' in problem, \
        problem


def test_probe_reports_a_configured_bwrap_that_is_not_there(tmp_path):
    problem = probe(str(tmp_path / 'bwrap'))
    assert problem is not None and str(tmp_path / 'bwrap') in problem and '\n' not in problem


@requires_bwrap
def test_probe_passes_where_bwrap_works():
    assert probe() is None


@requires_bwrap
def test_probe_reports_bwraps_own_words_where_namespaces_are_refused(box):
    # Inside a sandbox (no capabilities, no_new_privs) the kernel refuses bwrap
    # the namespaces it needs: a real refusal, as on a locked-down host.
    code, output = box.run([sys.executable, '-c', 'from ave.sandbox import probe; '
                            'print(probe())'], timeout=20)
    line = output.strip()
    assert code == 0 and 'cannot make a sandbox here' in line and 'bwrap:' in line, output
    assert '\n' not in line and len(line) < 500, line


def test_modes_are_auto_required_off():
    assert MODES == ('auto', 'required', 'off')


@pytest.mark.parametrize('mode, problem, enabled', [
    ('off', None, False), ('auto', None, True), ('required', None, True),
    ('auto', 'no bwrap', False), ('off', 'no bwrap', False)])
def test_enabled_for_decides_from_mode_and_probe(mode, problem, enabled):
    assert enabled_for(mode, problem) is enabled


def test_required_without_a_sandbox_refuses_naming_the_problem():
    with pytest.raises(SandboxUnavailable, match='required.*bwrap: Operation not permitted'):
        enabled_for('required', 'bwrap: Operation not permitted')


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match='isolation must be one of auto, required, off'):
        enabled_for('on', None)


# --- the bwrap command line ---------------------------------------------------------

def test_mounts_hide_then_open_workspaces_then_make_dev_and_proc():
    args = mount_arguments(Layout(hidden=(('/h/.ave', True), ('/h/secret', False)),
                                  writable=('/h/.ave/ws/a',), devices=('/dev/ttyUSB0',),
                                  resolv='/run/resolvconf/resolv.conf', tmp_bytes=1000))
    assert args == ['--ro-bind', '/', '/', '--size', '1000', '--tmpfs', '/tmp',
                    '--size', '1048576', '--tmpfs', '/run',
                    '--ro-bind-try', '/run/resolvconf/resolv.conf',
                    '/run/resolvconf/resolv.conf',
                    '--size', '1048576', '--tmpfs', '/h/.ave',
                    '--dev-bind', '/dev/null', '/h/secret',
                    '--bind-try', '/h/.ave/ws/a', '/h/.ave/ws/a',
                    '--dev', '/dev', '--dev-bind-try', '/dev/ttyUSB0', '/dev/ttyUSB0',
                    '--proc', '/proc']


def test_what_shows_through_the_private_tmp_is_mounted_before_the_hidden_paths():
    args = mount_arguments(Layout(hidden=(('/tmp/x/home/.ave', True),), writable=(),
                                  devices=(), resolv=None, readable=('/tmp/x',)))
    shown, hidden = args.index('/tmp/x'), args.index('/tmp/x/home/.ave')
    assert args[shown - 1] == '--ro-bind-try' and args.index('/run') < shown < hidden


@pytest.mark.parametrize('prefix, package_root, masked', [
    ('/usr', '/usr/lib/python3/dist-packages', ()),
    ('/tmp/co/.venv', '/tmp/co', ('/tmp/co', '/tmp/co/.venv')),
    ('/run/user/1000/venv', '/home/u/ave', ('/run/user/1000/venv',)),
    ('/tmpfs/venv', '/runner/ave', ()),
])
def test_only_an_installation_under_tmp_or_run_is_shown_through(prefix, package_root,
                                                                 masked):
    assert masked_installation(prefix, package_root) == masked


@requires_bwrap
def test_an_installation_under_tmp_is_readable_and_the_rest_of_tmp_is_not(
        home, tmp_path, monkeypatch):
    install, other = tmp_path / 'install', tmp_path / 'other'
    for directory in (install, other):
        directory.mkdir()
        (directory / 'file').write_text(directory.name)
    monkeypatch.setattr('ave.sandbox.layout._OWN_INSTALLATION', (str(install),))
    box = Sandbox(True, hidden=[home['dot_ave'], home['root']])
    assert box.run(['cat', str(install / 'file')]) == (0, 'install')
    code, output = box.run(['cat', str(other / 'file')])
    assert code != 0 and 'No such file' in output, output
    code, output = box.run(['sh', '-c', f'echo x > {install}/new'])
    assert code != 0 and not (install / 'new').exists(), 'the installation was writable'


@pytest.mark.parametrize('path', ['relative/path', '', None])
def test_paths_given_to_a_sandbox_must_be_absolute(path):
    with pytest.raises(ValueError, match='absolute path'):
        Sandbox(False, hidden=[path])
    with pytest.raises(ValueError, match='absolute path'):
        Sandbox(False).allow_write(path)


def test_no_status_files_are_left_behind(tmp_path, monkeypatch):
    temp = tmp_path / 'temp'
    temp.mkdir()
    monkeypatch.setattr('tempfile.tempdir', str(temp))
    sandbox = Sandbox(False)
    sandbox.run(['true'])
    with pytest.raises(RunError):
        sandbox.run(['no-such-program-for-ave'])
    assert os.listdir(temp) == []


@requires_bwrap
def test_a_signal_killing_the_sandbox_from_outside_is_reported_as_such():
    sandbox, seconds = Sandbox(True), unique_seconds()
    running = in_thread(lambda: sandbox.run(sh(f'echo ready; exec sleep {seconds}')))
    assert wait_until(lambda: processes_with(seconds), 5)
    for child in sandbox_children():
        os.kill(child.pid, signal.SIGTERM)
    running['thread'].join(5)
    assert running.get('result') == (-signal.SIGTERM, 'ready\r\n'), running


def sandbox_children():
    return [child for child in psutil.Process().children()
            if any(arg.startswith('ave-sandbox-call-') for arg in child.cmdline())]
