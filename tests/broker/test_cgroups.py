"""A cgroup per session where the broker's own cgroup is delegated to it: whatever a
plain (unsandboxed) command leaves running is killed when its session ends.

The tests stand in for systemd's Delegate=yes: they make a cgroup, mark it delegated
as systemd does, and start the broker inside it. Root and cgroup v2 are needed.
"""
from __future__ import annotations

import os
import signal
import subprocess
import uuid

import psutil
import pytest

from support import wait_until
from ave.broker import cgroups

pytestmark = pytest.mark.timeout(60)

WORKSPACE = {'type': 'workspace'}


def _make_cgroup(marked: bool) -> str:
    parent = cgroups.own_cgroup()
    if parent is None or os.geteuid() != 0:
        pytest.skip('needs root and a cgroup v2 hierarchy')
    path = os.path.join(parent, f'ave-test-{uuid.uuid4().hex[:8]}')
    try:
        os.mkdir(path)
        if marked:
            os.setxattr(path, 'trusted.delegate', b'1')
    except OSError as error:
        pytest.skip(f'cannot make a delegated cgroup here: {error}')
    return path


def _remove_cgroup(path: str) -> None:
    """Kill everything left in ``path`` and its children, then remove them all."""
    for directory, _, _ in sorted(os.walk(path), key=lambda entry: -len(entry[0])):
        with open(os.path.join(directory, 'cgroup.kill'), 'w') as stream:
            stream.write('1')
        wait_until(lambda: not _members(directory), timeout=5)
        os.rmdir(directory)


def _members(path: str) -> list[int]:
    with open(os.path.join(path, 'cgroup.procs')) as stream:
        return [int(line) for line in stream if line.strip()]


@pytest.fixture
def delegated():
    path = _make_cgroup(marked=True)
    yield path
    _remove_cgroup(path)


@pytest.fixture
def undelegated():
    path = _make_cgroup(marked=False)
    yield path
    _remove_cgroup(path)


def _inside(path: str) -> tuple[str, ...]:
    """A command prefix that moves itself into cgroup ``path`` and runs the rest."""
    return ('sh', '-c', f'echo $$ > {path}/cgroup.procs && exec "$@"', 'sh')


def _session_groups(path: str) -> list[str]:
    return [name for name in os.listdir(path) if name.startswith(cgroups.PREFIX)]


def _sleepers(seconds: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(['cmdline']) if p.info['cmdline'] == ['sleep', seconds]]


def _start(broker_home, cgroup: str):
    return broker_home(isolation='off').start(prefix=_inside(cgroup))


def test_each_session_and_its_commands_run_in_a_group_of_their_own(delegated, broker_home):
    lab = _start(broker_home, delegated)
    first, second = lab.client().get(WORKSPACE), lab.client().get(WORKSPACE)
    _, own = first.run(['cat', '/proc/self/cgroup'])
    _, other = second.run(['cat', '/proc/self/cgroup'])
    groups = _session_groups(delegated)
    assert len(groups) == 2, f'expected one group per session, found {groups}'
    assert own.strip().rsplit('/', 1)[1] in groups and own != other, (own, other)
    assert lab.pid in _members(delegated), 'the broker itself left its cgroup'


def test_what_a_plain_command_left_running_dies_with_its_session(delegated, broker_home):
    lab = _start(broker_home, delegated)
    client = lab.client()
    workspace = client.get(WORKSPACE)
    seconds = f'600.{uuid.uuid4().int % 10 ** 6}'
    workspace.run(['sh', '-c', f'setsid sleep {seconds} >/dev/null 2>&1 & sleep 0.3'])
    assert wait_until(lambda: _sleepers(seconds), timeout=5), \
        'the background process did not outlive its command (it must, to be a test)'
    client.__exit__(None, None, None)
    assert wait_until(lambda: not _sleepers(seconds), timeout=5), \
        f'{len(_sleepers(seconds))} processes of an ended session still run'
    assert wait_until(lambda: not _session_groups(delegated), timeout=5), \
        'the ended session\'s cgroup was not removed'


def test_a_killed_sessions_leftovers_die_too(delegated, broker_home):
    lab = _start(broker_home, delegated)
    workspace = lab.client().get(WORKSPACE)
    seconds = f'600.{uuid.uuid4().int % 10 ** 6}'
    workspace.run(['sh', '-c', f'setsid sleep {seconds} >/dev/null 2>&1 & sleep 0.3'])
    assert wait_until(lambda: _sleepers(seconds), timeout=5)
    session = int(_session_groups(delegated)[0][len(cgroups.PREFIX):])
    os.kill(session, signal.SIGKILL)
    assert wait_until(lambda: not _sleepers(seconds), timeout=5), \
        'a SIGKILLed session\'s background process outlived it'


def test_broker_start_empties_groups_whose_session_is_gone(delegated, broker_home):
    leftover = os.path.join(delegated, f'{cgroups.PREFIX}999999')
    os.mkdir(leftover)
    seconds = f'600.{uuid.uuid4().int % 10 ** 6}'
    sleeper = subprocess.Popen([*_inside(leftover), 'sleep', seconds])
    try:
        assert wait_until(lambda: sleeper.pid in _members(leftover), timeout=5)
        _start(broker_home, delegated)
        assert wait_until(lambda: sleeper.poll() is not None, timeout=5), \
            'a crash\'s leftover process survived the next broker\'s start'
        assert wait_until(lambda: not os.path.exists(leftover), timeout=5)
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
        sleeper.wait(5)


def test_a_cgroup_systemd_did_not_delegate_is_left_alone(undelegated, broker_home):
    lab = _start(broker_home, undelegated)
    workspace = lab.client().get(WORKSPACE)
    code, _ = workspace.run(['true'])
    assert code == 0 and _session_groups(undelegated) == []
    log = open(os.path.join(lab.log_dir, 'broker.log')).read()
    assert 'is not delegated to the broker' in log
