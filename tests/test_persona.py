"""become_user: giving up root for an account, observed from a forked child.

Changing account cannot be undone, so every switch happens in a child process that
reports what it became through a pipe; the test process keeps its own identity.
"""
import json
import os
import pwd
import signal

import pytest

from ave.persona import PersonaError, become_user

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason='only root can change account')


def run_in_child(function):
    """Run ``function()`` in a forked child; return its JSON result or its error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's exit code
        try:
            os.close(read_end)
            try:
                report = {'value': function()}
            except Exception as err:  # the report carries any failure to the parent
                report = {'error': type(err).__name__, 'message': str(err)}
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    finished = False
    try:
        with os.fdopen(read_end, 'rb') as stream:
            report = json.loads(stream.read())
        finished = True
    finally:
        if not finished:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return report


def identity(home):
    """What a process that called become_user looks like from the inside."""
    try:
        os.setuid(0)
        regained = True
    except PermissionError:
        regained = False
    return {'home': home, 'resuid': os.getresuid(), 'resgid': os.getresgid(),
            'groups': sorted(os.getgroups()), 'regained_root': regained,
            'env': [os.environ.get(k) for k in ('HOME', 'USER', 'LOGNAME')]}


@needs_root
@pytest.mark.timeout(10)
def test_root_becomes_nobody_for_good():
    entry = pwd.getpwnam('nobody')
    report = run_in_child(lambda: identity(become_user('nobody')))
    uid, gid = entry.pw_uid, entry.pw_gid
    assert report['value'] == {
        'home': entry.pw_dir, 'resuid': [uid] * 3, 'resgid': [gid] * 3,
        'groups': sorted(set(os.getgrouplist('nobody', gid))), 'regained_root': False,
        'env': [entry.pw_dir, 'nobody', 'nobody']}, report


@needs_root
@pytest.mark.timeout(10)
def test_the_test_process_stays_root():
    home = os.environ['HOME']
    run_in_child(lambda: become_user('nobody'))
    assert (os.geteuid(), os.environ['HOME']) == (0, home)


def drop_root_then_become_root():
    if os.geteuid() == 0:
        nobody = pwd.getpwnam('nobody')
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
    return become_user('root')


@pytest.mark.timeout(10)
def test_a_process_that_is_not_root_is_refused():
    report = run_in_child(drop_root_then_become_root)
    assert report.get('error') == 'PersonaError' and 'only root' in report['message'], report


def test_an_unknown_account_is_refused_before_anything_changes():
    uid = os.geteuid()
    with pytest.raises(PersonaError, match="'no-such-account-ave-test': no such account"):
        become_user('no-such-account-ave-test')
    assert os.geteuid() == uid
