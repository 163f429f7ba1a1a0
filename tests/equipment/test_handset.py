"""ave.equipment.handset: handsets recognised in udev, power states, and adb calls.

udev devices are the ``tests/data/*.umockdev`` descriptions, seen through the real
libudev by a child process run under ``umockdev-run``. adb is the stand-in
``tests/data/bin/adb``, first on PATH, whose handsets are directories made here:
shell commands really run (in the handset's ``fs`` directory) and files really move.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from ave import config
from ave.equipment import load_types
from ave.equipment.handset import HANDSET, Handset, HandsetError, HandsetProfile
from ave.equipment.workspace import PathError
from ave.exceptions import Timeout, details_of, exception_factory
from ave.sandbox import Killed, Sandbox
from sandboxes import installed, requires_bwrap
from support import DATA, HANDSET_SERIAL, wait_until

pytestmark = pytest.mark.timeout(30)

SERIAL = HANDSET_SERIAL
USB_DEVICE = '/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2'
ADB_INTERFACE = USB_DEVICE + '/1-2:1.1'
PROFILE = {'type': 'handset', 'serial': SERIAL, 'vendor': '18d1', 'product': '4ee2',
           'sysfs_path': USB_DEVICE, 'power_state': 'boot_completed', 'platform': 'android'}

requires_umockdev = pytest.mark.skipif(shutil.which('umockdev-run') is None,
                                       reason='umockdev is not installed (Debian package '
                                       'umockdev)')

# Maps every USB device of the testbed with HANDSET.from_udev; prints path -> profile.
MAP_DEVICES = '''
import json, sys, pyudev
from ave.equipment.handset import HANDSET
settings = json.loads(sys.argv[1])
devices = pyudev.Context().list_devices(subsystem='usb')
print(json.dumps({d.sys_path: HANDSET.from_udev(d, settings) for d in devices}))
'''


@pytest.fixture
def handset(adb):
    """A Handset resource on a booted stand-in handset; its directory is ``.dir``."""
    resource = Handset(HandsetProfile({'type': 'handset', 'serial': SERIAL}), {})
    resource.dir = adb()
    return resource


@pytest.fixture
def workspace(tmp_path):
    """A directory the session's (disabled) sandbox counts as this job's workspace."""
    path = tmp_path / 'workspace'
    path.mkdir()
    box = Sandbox(False)
    box.allow_write(str(path))
    with installed(box):
        yield path


@pytest.fixture
def isolated(tmp_path, workspace, monkeypatch):
    """An enabled sandbox with a workspace, hiding a fake broker home.

    The stand-in adb keeps its handsets under tmp_path, which is private inside a
    sandbox; they are made writable there as the real adb server's handsets are
    reachable over loopback.
    """
    dot_ave = tmp_path / 'home' / '.ave'
    dot_ave.mkdir(parents=True)
    box = Sandbox(True, hidden=[str(dot_ave)])
    box.allow_write(str(workspace))
    box.allow_write(os.environ['AVE_TEST_ADB'])
    with installed(box):
        yield box


def mapped(settings: dict | None = None) -> dict[str, dict | None]:
    """What HANDSET.from_udev makes of each USB device of the handset testbed."""
    result = subprocess.run(
        ['umockdev-run', '--device', str(DATA / 'usb-host.umockdev'),
         '--device', str(DATA / 'handset.umockdev'), '--',
         sys.executable, '-c', MAP_DEVICES, json.dumps(settings or {})],
        capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, f'mapping devices failed: {result.stderr}'
    return json.loads(result.stdout.splitlines()[-1])


# -- the type ------------------------------------------------------------------------------

def test_handset_type_is_published_as_a_plug_in():
    assert load_types()['handset'] is HANDSET


@requires_umockdev
def test_adb_interface_is_a_handset_with_a_full_profile(adb):
    adb()
    assert mapped()[ADB_INTERFACE] == PROFILE


@requires_umockdev
def test_other_usb_devices_and_interfaces_are_not_handsets(adb):
    adb()
    others = {path: profile for path, profile in mapped().items() if path != ADB_INTERFACE}
    assert len(others) == 3 and set(others.values()) == {None}, others


@requires_umockdev
def test_friendly_name_comes_from_the_settings(adb):
    adb()
    assert mapped({'pretty': {SERIAL: 'bench 3'}})[ADB_INTERFACE]['pretty'] == 'bench 3'


@requires_umockdev
def test_handset_adb_does_not_see_is_offline(adb):
    assert mapped()[ADB_INTERFACE]['power_state'] == 'offline'


def test_settings_name_handsets_from_broker_json(home):
    config.create_default(home)
    with open(os.path.join(config.config_dir(home), 'broker.json'), 'w') as stream:
        json.dump({'equipment': [{'type': 'handset', 'serial': SERIAL, 'pretty': 'bench 3'},
                                 {'type': 'handset', 'serial': 'OTHER'}]}, stream)
    assert HANDSET.load_settings(home) == {'pretty': {SERIAL: 'bench 3'}}


@pytest.mark.parametrize('entry, field', [
    ({'type': 'handset'}, 'serial'),
    ({'type': 'handset', 'serial': ''}, 'serial'),
    ({'type': 'handset', 'serial': SERIAL, 'pretty': 3}, 'pretty'),
    ({'type': 'handset', 'serial': SERIAL, 'power_state': 'online'}, 'power_state'),
])
def test_wrong_broker_json_entry_is_refused_naming_the_field(entry, field):
    with pytest.raises(ValueError, match=f'^{field}: '):
        HANDSET.validate_entry(entry)


def test_declared_handset_is_offline_until_seen():
    entry = {'type': 'handset', 'serial': SERIAL, 'pretty': 'bench 3'}
    HANDSET.validate_entry(entry)
    assert HANDSET.profile_of(entry) == {'type': 'handset', 'serial': SERIAL,
                                         'pretty': 'bench 3', 'platform': 'android',
                                         'power_state': 'offline'}


# -- power states ----------------------------------------------------------------------------

@pytest.mark.parametrize('state, boot_completed, expected', [
    ('device', '1', 'boot_completed'),
    ('device', '0', 'online'),
    ('device', '', 'online'),
    ('recovery', '', 'online'),
    ('unauthorized', '', 'offline'),
])
def test_power_state_is_read_with_adb(adb, state, boot_completed, expected):
    adb(state=state, boot_completed=boot_completed)
    resource = Handset(HandsetProfile({'type': 'handset', 'serial': SERIAL}), {})
    assert resource.get_power_state() == expected


def test_handset_adb_does_not_know_is_offline(adb):
    resource = Handset(HandsetProfile({'type': 'handset', 'serial': 'UNKNOWN'}), {})
    assert resource.get_power_state() == 'offline'


def test_without_adb_calls_fail_with_a_handset_error(handset, tmp_path, monkeypatch):
    monkeypatch.setenv('PATH', str(tmp_path))
    with pytest.raises(HandsetError, match='cannot run adb'):
        handset.get_power_state()


def test_reboot_goes_offline_then_comes_back_booted(handset):
    handset.reboot()
    assert handset.get_power_state() == 'offline'
    assert handset.wait_power_state('boot_completed', timeout=10) == 'boot_completed'


def test_wait_power_state_accepts_any_of_several(handset):
    handset.reboot()
    assert handset.wait_power_state(['online', 'boot_completed'], timeout=10) in \
        ('online', 'boot_completed')


def test_wait_power_state_times_out_naming_the_state_seen(adb):
    adb(boot_completed='0')
    resource = Handset(HandsetProfile({'type': 'handset', 'serial': SERIAL}), {})
    started = time.monotonic()
    with pytest.raises(Timeout, match='it is online'):
        resource.wait_power_state('boot_completed', timeout=0.5)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize('states', ['booted', [], ['online', 'on']])
def test_wait_power_state_refuses_unknown_states(handset, states):
    with pytest.raises(ValueError):
        handset.wait_power_state(states, timeout=1)


# -- adb commands ----------------------------------------------------------------------------

def test_shell_returns_the_output_with_plain_newlines(handset):
    assert handset.shell('echo one; echo two') == 'one\ntwo\n'


def test_shell_quotes_a_list_of_arguments_for_the_handset(handset):
    assert handset.shell(['echo', 'two  spaces', '$HOME']) == 'two  spaces $HOME\n'


def test_shell_runs_without_a_remote_terminal_or_our_input(handset):
    handset.shell('true')
    assert (handset.dir / 'calls').read_text().splitlines()[-1] == 'shell -T -n true'


def test_shell_failure_raises_with_exit_code_and_output(handset):
    with pytest.raises(HandsetError) as caught:
        handset.shell('echo oops; exit 3')
    assert (caught.value.exit_code, caught.value.out) == (3, 'oops\n')


def test_shell_past_its_timeout_is_killed(handset):
    started = time.monotonic()
    with pytest.raises(Timeout):
        handset.shell('sleep 20', timeout=0.5)
    assert time.monotonic() - started < 10


def test_push_and_pull_copy_files_both_ways(handset, workspace):
    source = workspace / 'data.txt'
    source.write_text('payload')
    handset.push(str(source), '/sdcard/data.txt')
    assert handset.shell('cat sdcard/data.txt') == 'payload'
    handset.pull('/sdcard/data.txt', str(workspace / 'back.txt'))
    assert (workspace / 'back.txt').read_text() == 'payload'


def test_pull_of_a_missing_file_raises(handset, workspace):
    with pytest.raises(HandsetError, match='exited with status'):
        handset.pull('/sdcard/none', str(workspace / 'none'))


def test_install_puts_the_package_on_the_handset(handset, workspace):
    apk = workspace / 'app.apk'
    apk.write_text('GOOD')
    handset.install(str(apk))
    assert (handset.dir / 'installed').read_text() == 'app.apk\n'


def test_install_refused_by_the_package_manager_raises(handset, workspace):
    apk = workspace / 'broken.apk'
    apk.write_text('BAD')
    with pytest.raises(HandsetError, match='refused') as caught:
        handset.install(str(apk))
    assert 'INSTALL_FAILED_INVALID_APK' in caught.value.out


def test_handset_error_arrives_typed_on_the_client_side(handset):
    with pytest.raises(HandsetError) as caught:
        handset.shell('exit 1')
    rebuilt = exception_factory(details_of(caught.value))
    assert isinstance(rebuilt, HandsetError) and rebuilt.serial == SERIAL


@pytest.mark.parametrize('call', [
    lambda h: h.shell(''), lambda h: h.shell(['ls', 3]), lambda h: h.shell('ls', timeout=-1),
    lambda h: h.push(None, '/sdcard'), lambda h: h.install(''),
])
def test_bad_arguments_are_refused_before_adb_runs(handset, call):
    with pytest.raises(ValueError):
        call(handset)
    assert not (handset.dir / 'calls').exists()


# -- host paths and the sandbox ------------------------------------------------------------

@pytest.mark.parametrize('call', [
    lambda h, outside: h.push(str(outside / 'secret.txt'), '/sdcard/x'),
    lambda h, outside: h.pull('/sdcard/x', str(outside / 'copy.txt')),
    lambda h, outside: h.install(str(outside / 'app.apk')),
], ids=['push', 'pull', 'install'])
def test_host_paths_outside_the_jobs_workspaces_are_refused_before_adb_runs(
        handset, workspace, tmp_path, call):
    outside = tmp_path / 'outside'
    outside.mkdir()
    with pytest.raises(PathError, match='not in a workspace of this job'):
        call(handset, outside)
    assert not (handset.dir / 'calls').exists()


@pytest.mark.parametrize('path', ['relative.txt', '{workspace}/../escape.txt'])
def test_relative_and_climbing_host_paths_are_refused(handset, workspace, path):
    with pytest.raises((ValueError, PathError)):
        handset.pull('/sdcard/x', path.format(workspace=workspace))
    assert not (handset.dir / 'calls').exists()


def test_a_link_in_a_workspace_leading_out_is_refused(handset, workspace, tmp_path):
    (tmp_path / 'secret.txt').write_text('secret')
    os.symlink(tmp_path / 'secret.txt', workspace / 'link.txt')
    with pytest.raises(PathError):
        handset.push(str(workspace / 'link.txt'), '/sdcard/x')


@requires_bwrap
def test_shell_runs_in_the_sandbox(handset, isolated):
    assert handset.shell(f'kill -0 {os.getpid()} 2>/dev/null && echo broker-visible '
                         '|| echo isolated') == 'isolated\n'


@requires_bwrap
def test_push_and_pull_work_through_the_sandbox(handset, isolated, workspace):
    (workspace / 'data.txt').write_text('payload')
    handset.push(str(workspace / 'data.txt'), '/sdcard/data.txt')
    handset.pull('/sdcard/data.txt', str(workspace / 'back.txt'))
    assert (workspace / 'back.txt').read_text() == 'payload'


@pytest.mark.parametrize('enabled', [False, pytest.param(True, marks=requires_bwrap)],
                         ids=['plain', 'sandboxed'])
def test_kill_for_the_handset_ends_its_shell_command(handset, tmp_path, enabled):
    box = Sandbox(enabled)
    box.allow_write(os.environ['AVE_TEST_ADB'])
    outcome = {}

    def long_shell():
        try:
            handset.shell('echo started > started; sleep 60')
        except Exception as err:  # the test looks at what happened
            outcome['error'] = err
    with installed(box):
        thread = threading.Thread(target=long_shell, daemon=True)
        thread.start()
        assert wait_until(lambda: (handset.dir / 'fs' / 'started').exists(), 5)
        box.kill(handset)
        thread.join(5)
    assert isinstance(outcome.get('error'), Killed), outcome
