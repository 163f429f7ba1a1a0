"""The Debian package as a lab owner meets it: installed, upgraded and purged.

Runs only with AVE_PACKAGE_TEST=1 (``make deb-test`` sets it, CI runs that), as
root, on the package ``make deb`` left in build/deb. Nothing is installed on this
machine: debootstrap makes a throwaway Debian root of the host's release, from the
mirror the host's apt uses (or $AVE_DEBIAN_MIRROR), and every command runs in it
inside namespaces of its own. A private PID namespace means every process the
package starts is known and dies with the root; a private network namespace means
its broker binds port 4000 without meeting anybody else's. Only apt's downloads
use the host's network. systemd is installed in the root but does not run there,
so the maintainer scripts take their path for hosts without it (they run
``ave-broker`` themselves) while the unit can still be verified and enabled.

The tests run in file order, each step building on the one before: install,
upgrade (a reinstall of the same package, which is what postinst sees on upgrade),
purge, then two installs from scratch.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import time
from typing import Any

import psutil
import pytest

pytestmark = [
    pytest.mark.skipif(os.environ.get('AVE_PACKAGE_TEST') != '1',
                       reason='installs packages into a debootstrap root; '
                              'set AVE_PACKAGE_TEST=1 (make deb-test) to run'),
    pytest.mark.timeout(900),
]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEB_DIR = os.path.join(REPO, 'build', 'deb')
DEB_IN_ROOT = '/tmp/ave.deb'
ENV = {'PATH': '/usr/sbin:/usr/bin:/sbin:/bin', 'LANG': 'C.UTF-8', 'HOME': '/root',
       'DEBIAN_FRONTEND': 'noninteractive'}
STOP_WAIT = 15.0
UNIT = '/lib/systemd/system/ave-broker.service'
WANTS = '/etc/systemd/system/multi-user.target.wants/ave-broker.service'

# PID 1 of the root's PID namespace: it enters the root and reaps the orphans there
# (daemons, sessions), as an init would; its pid namespace ends when it does.
REAPER = '''
import os, sys, time
os.chroot(sys.argv[1])
os.chdir('/')
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.2)
'''

# Run by unshare inside the new namespaces, before the reaper takes over: terminals
# for workspace commands, a read-only /sys for udev, and a loopback to listen on.
NAMESPACE_SETUP = '''
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$1/dev/pts"
mount --bind "$1/dev/pts/ptmx" "$1/dev/ptmx"
mount -t sysfs -o ro sysfs "$1/sys"
ip link set lo up
exec /usr/bin/python3 -c "$2" "$1"
'''

# A test job that holds a workspace across the upgrade: it allocates, says so, waits
# for a line on stdin, then reports what it still holds and uses the workspace.
CLIENT = '''
import json, sys
from ave.broker import Broker
broker = Broker()
workspace = broker.get({'type': 'workspace'})
print(json.dumps({'path': workspace.get_path()}), flush=True)
sys.stdin.readline()
print(json.dumps({'allocations': broker.list_allocations(),
                  'path': workspace.get_path(),
                  'run': workspace.run('echo still here')}), flush=True)
'''


class DebianRoot:
    """A debootstrapped root and the namespaces its commands run in."""

    def __init__(self, path: str) -> None:
        self.path = os.path.realpath(path)
        self.holder: subprocess.Popen | None = None
        self.init: psutil.Process | None = None

    def bootstrap(self, release: str, mirror: str, log: str) -> None:
        with open(log, 'w') as stream:
            result = subprocess.run(['debootstrap', '--variant=minbase', release, self.path,
                                     mirror], stdout=stream, stderr=subprocess.STDOUT)
        assert result.returncode == 0, f'debootstrap failed; see {log}'

    def enter(self) -> None:
        """Start the namespaces and wait until their init has entered the root."""
        self.holder = subprocess.Popen(
            ['unshare', '--fork', '--pid', '--mount', '--net', '--kill-child',
             f'--mount-proc={self.path}/proc', 'sh', '-ec', NAMESPACE_SETUP, 'sh',
             self.path, REAPER], start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for child in psutil.Process(self.holder.pid).children():
                if os.readlink(f'/proc/{child.pid}/root') == self.path:
                    self.init = child
                    return
            assert self.holder.poll() is None, 'unshare could not set up the namespaces'
            time.sleep(0.05)
        raise AssertionError('the namespace init never entered the root')

    def file(self, path: str) -> str:
        """Where ``path`` of the root is seen from the host."""
        return os.path.join(self.path, path.lstrip('/'))

    def command(self, *args: str, host_network: bool = False) -> list[str]:
        namespaces = ['--mount', '--pid', '--root', '--wd']
        if not host_network:
            namespaces.append('--net')
        return ['nsenter', f'--target={self.init.pid}', *namespaces, '--', *args]

    def run(self, *args: str, host_network: bool = False, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """Run a command in the root as root; with ``check``, fail on a non-zero exit."""
        result = subprocess.run(self.command(*args, host_network=host_network), env=ENV,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=timeout)
        if check:
            assert result.returncode == 0, \
                f'{" ".join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}'
        return result

    def popen(self, *args: str, stderr: Any) -> subprocess.Popen:
        """Start a command in the root with its stdin and stdout as pipes."""
        return subprocess.Popen(self.command(*args), env=ENV, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)

    def processes(self) -> list[psutil.Process]:
        """Every process in the root's PID namespace except its init."""
        namespace = os.readlink(f'/proc/{self.init.pid}/ns/pid')
        found = []
        for process in psutil.process_iter():
            try:
                if (process.pid != self.init.pid
                        and os.readlink(f'/proc/{process.pid}/ns/pid') == namespace):
                    found.append(process)
            except OSError:
                continue  # it exited while we looked
        return found

    def ave_processes(self) -> list[psutil.Process]:
        named = []
        for process in self.processes():
            try:
                if process.name().startswith('ave-'):
                    named.append(process)
            except psutil.NoSuchProcess:
                continue
        return named

    def account(self, name: str) -> dict | None:
        """The root's password entry for ``name`` as a dict, None if there is none."""
        with open(self.file('/etc/passwd')) as stream:
            for line in stream:
                fields = line.rstrip('\n').split(':')
                if fields[0] == name:
                    return {'uid': int(fields[2]), 'gid': int(fields[3]),
                            'home': fields[5], 'shell': fields[6]}
        return None

    def broker_pid(self) -> int:
        """The pid (in the root) that ``ave-broker --status`` reports, run as root."""
        status = self.run('ave-broker', '--status', check=False)
        match = re.match(r'running, pid (\d+)\n', status.stdout)
        assert status.returncode == 0 and match, \
            f'ave-broker --status: {status.stdout}{status.stderr}'
        return int(match.group(1))

    def broker_process(self) -> psutil.Process:
        """The host's view of the broker that --status reports."""
        pid = self.broker_pid()
        for process in self.ave_processes():
            if _namespace_pid(process) == pid:
                return process
        raise AssertionError(f'--status reports pid {pid}, which does not run')

    def close(self) -> None:
        """Kill everything in the namespaces, then delete the root.

        Killing unshare kills the init (--kill-child), and the kernel then kills
        everything else in its PID namespace.
        """
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait(10)
        if self.init is not None:
            psutil.wait_procs([self.init], timeout=10)
        # The mounts lived in the private mount namespace; --one-file-system still
        # guarantees that nothing outside the root is ever deleted through one.
        subprocess.run(['rm', '-rf', '--one-file-system', self.path], check=True)


def _namespace_pid(process: psutil.Process) -> int | None:
    """The pid ``process`` has inside its own PID namespace."""
    with open(f'/proc/{process.pid}/status') as stream:
        for line in stream:
            if line.startswith('NSpid:'):
                return int(line.split()[-1])
    return None


def _release() -> str:
    with open('/etc/os-release') as stream:
        fields = dict(line.rstrip('\n').split('=', 1) for line in stream if '=' in line)
    return fields['VERSION_CODENAME'].strip('"')


def _mirror(release: str) -> str:
    """The Debian mirror the host's apt uses for ``release`` (not -updates, -security)."""
    if os.environ.get('AVE_DEBIAN_MIRROR'):
        return os.environ['AVE_DEBIAN_MIRROR']
    for path in ['/etc/apt/sources.list', *sorted(glob.glob('/etc/apt/sources.list.d/*'))]:
        if not os.path.isfile(path):
            continue
        with open(path) as stream:
            text = stream.read()
        if path.endswith('.sources'):
            for stanza in re.split(r'\n\s*\n', text):
                fields = dict(re.findall(r'^(\w[\w-]*):\s*(.*)$', stanza, re.MULTILINE))
                if 'deb' in fields.get('Types', '').split() \
                        and release in fields.get('Suites', '').split():
                    return fields['URIs'].split()[0]
        elif path.endswith('.list'):
            for line in text.splitlines():
                words = re.sub(r'\[[^]]*\]', '', line).split()
                if len(words) >= 3 and words[0] == 'deb' and words[2] == release:
                    return words[1]
    raise AssertionError(f'no Debian mirror for {release} in the apt sources; '
                         'set AVE_DEBIAN_MIRROR')


# -- fixtures: one root for the module, taken through the package's life --------------

@pytest.fixture(scope='module')
def deb() -> str:
    found = glob.glob(os.path.join(DEB_DIR, 'ave_*.deb'))
    assert len(found) == 1, f'expected one package in {DEB_DIR} (make deb), found {found}'
    return found[0]


@pytest.fixture(scope='module')
def debian(deb, tmp_path_factory) -> DebianRoot:
    """A fresh Debian root holding the package and, downloaded, what it depends on.

    systemd is installed but not running, as on a host seen from a rescue system: the
    maintainer scripts take their path for hosts without systemd, and the unit can
    be checked and its enablement seen.
    """
    assert os.geteuid() == 0, 'the package test needs root (debootstrap, namespaces)'
    for tool in ('debootstrap', 'unshare', 'nsenter', 'ip'):
        assert shutil.which(tool), f'{tool} is missing (make deb-deps installs it)'
    base = tmp_path_factory.mktemp('debian')
    release = _release()
    root = DebianRoot(str(base / 'root'))
    try:
        root.bootstrap(release, _mirror(release), str(base / 'debootstrap.log'))
        shutil.copy(deb, root.file(DEB_IN_ROOT))
        root.enter()
        root.run('apt-get', 'update', '-qq', host_network=True)
        root.run('apt-get', 'install', '-y', '-qq', '--no-install-recommends',
                 '--download-only', DEB_IN_ROOT, 'systemd', host_network=True)
        root.run('apt-get', 'install', '-y', '-qq', '--no-install-recommends', 'systemd')
        yield root
    finally:
        root.close()


def _install(debian: DebianRoot) -> None:
    debian.run('apt-get', 'install', '-y', '-qq', '--no-install-recommends', DEB_IN_ROOT)


def _purge(debian: DebianRoot) -> None:
    debian.run('apt-get', 'purge', '-y', '-qq', 'ave')


@pytest.fixture(scope='module')
def installed(debian) -> DebianRoot:
    _install(debian)
    return debian


@pytest.fixture(scope='module')
def upgraded(installed, tmp_path_factory) -> dict:
    """Reinstall the package while a test job holds a workspace; what happened."""
    debian = installed
    errors = tmp_path_factory.mktemp('client') / 'stderr'
    with open(errors, 'w') as stderr:
        client = debian.popen('python3', '-c', CLIENT, stderr=stderr)
    try:
        before = json.loads(client.stdout.readline() or 'null')
        assert before is not None, f'the test job failed: {errors.read_text()}'
        old = debian.broker_pid()
        debian.run('dpkg', '-i', DEB_IN_ROOT)
        new = debian.broker_pid()
        client.stdin.write('go\n')
        client.stdin.flush()
        after = json.loads(client.stdout.readline() or 'null')
    finally:
        client.kill()
        client.wait(10)
    return {'old': old, 'new': new, 'before': before, 'after': after,
            'errors': errors.read_text()}


@pytest.fixture(scope='module')
def purged(installed) -> list[str]:
    """Purge the package; the files it had installed."""
    files = installed.run('dpkg-query', '-L', 'ave').stdout.split()
    _purge(installed)
    return files


def _wait_for_no_ave_processes(debian: DebianRoot) -> list[psutil.Process]:
    """Sessions may still be tearing down after their broker stopped: give them time."""
    deadline = time.monotonic() + STOP_WAIT
    while debian.ave_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    return debian.ave_processes()


# -- install ------------------------------------------------------------------------

def test_install_puts_commands_extension_and_unit_in_place(installed):
    for path in ('/usr/bin/ave-broker', '/usr/bin/ave-config', UNIT):
        assert os.path.isfile(installed.file(path)), f'{path} is not installed'
    extension = glob.glob(installed.file('/usr/lib/python3/dist-packages/ave/_native*.so'))
    assert extension, 'the compiled FdTx extension is not installed'
    installed.run('/usr/bin/python3', '-c', 'import ave._native')


def test_install_puts_ave_its_manual_and_its_completion_in_place(installed):
    for path in ('/usr/bin/ave', '/usr/share/man/man1/ave.1.gz',
                 '/usr/share/bash-completion/completions/ave'):
        assert os.path.isfile(installed.file(path)), f'{path} is not installed'
    listed = installed.run('ave', 'list', '--all', check=False)
    assert listed.returncode == 0, f'ave list --all: {listed.stderr}'


def test_unit_passes_systemd_analyze_verify(installed):
    result = installed.run('systemd-analyze', 'verify', '--man=no', UNIT, check=False)
    assert result.returncode == 0 and not result.stderr, \
        f'systemd-analyze verify: {result.stderr}'


def test_install_enables_the_unit(installed):
    assert os.path.islink(installed.file(WANTS)), 'ave-broker.service is not enabled'


def test_install_creates_an_ave_system_account_named_in_etc(installed):
    account = installed.account('ave')
    assert account is not None, 'no ave account'
    assert account['uid'] < 1000 and account['shell'] == '/usr/sbin/nologin', \
        f'ave is not a system account without login: {account}'
    with open(installed.file('/etc/ave/user')) as stream:
        assert json.load(stream) == {'name': 'ave', 'home': '/var/lib/ave'}, \
            '/etc/ave/user does not name the ave account and its home'


def test_default_configuration_belongs_to_the_account(installed):
    uid = installed.account('ave')['uid']
    for name in ('broker.json', 'authkeys.json', 'workspace.json'):
        info = os.stat(installed.file(f'/var/lib/ave/.ave/config/{name}'))
        assert info.st_uid == uid, f'{name} does not belong to ave'
    mode = os.stat(installed.file('/var/lib/ave/.ave/config/authkeys.json')).st_mode
    assert mode & 0o077 == 0, 'others may read authkeys.json'


def test_broker_runs_as_the_account_after_install(installed):
    broker = installed.broker_process()
    assert broker.uids().real == installed.account('ave')['uid'], \
        'the broker does not run as the ave account'


# -- upgrade ------------------------------------------------------------------------

def test_upgrade_leaves_a_broker_running(upgraded, installed):
    assert installed.broker_process().is_running(), 'no broker serves after the upgrade'


def test_upgrade_hands_over_to_a_new_broker(upgraded, installed):
    assert upgraded['new'] != upgraded['old'], 'the broker was not replaced'
    running = {_namespace_pid(process) for process in installed.ave_processes()}
    assert upgraded['old'] not in running, 'the old broker still runs'


def test_test_job_keeps_its_workspace_across_the_upgrade(upgraded):
    after = upgraded['after']
    assert after is not None, f'the test job failed after the upgrade: {upgraded["errors"]}'
    assert len(after['allocations']) == 1, f'the job lost its allocation: {after}'
    assert after['path'] == upgraded['before']['path'], 'the workspace changed'
    assert after['run'][0] == 0 and 'still here' in after['run'][1], \
        f'the workspace no longer runs commands: {after["run"]}'


# -- purge --------------------------------------------------------------------------

def test_purge_removes_etc_the_account_home_and_the_enablement(purged, installed):
    for path in ('/etc/ave', '/var/lib/ave', WANTS):
        assert not os.path.lexists(installed.file(path)), f'{path} survived the purge'


def test_purge_leaves_no_ave_process(purged, installed):
    left = _wait_for_no_ave_processes(installed)
    assert not left, f'still running after the purge: {[p.name() for p in left]}'


def test_purge_removes_every_file_of_the_package(purged, installed):
    left = [path for path in purged if os.path.lexists(installed.file(path))
            and not os.path.isdir(installed.file(path))]
    assert not left, f'files of the package survived the purge: {left}'
    assert not os.path.exists(installed.file('/usr/lib/python3/dist-packages/ave')), \
        'the ave Python package directory (or its byte code) survived the purge'


def test_purge_keeps_the_system_account(purged, installed):
    """Debian leaves the system accounts of purged packages: see debian/ave.postrm."""
    assert installed.account('ave') is not None, 'the ave account was deleted'


# -- installing again ---------------------------------------------------------------

def test_install_after_purge_reuses_the_account_and_makes_its_home(purged, installed):
    uid = installed.account('ave')['uid']
    _install(installed)
    try:
        assert installed.broker_process().uids().real == uid, 'the broker is not ave'
        assert os.path.isfile(installed.file('/var/lib/ave/.ave/config/broker.json')), \
            'no default configuration in the recreated home'
    finally:
        _purge(installed)


def test_existing_etc_file_names_the_account_that_runs_the_broker(purged, installed):
    """A lab owner's own account wins, and purging leaves that account's files."""
    installed.run('useradd', '--create-home', '--home-dir', '/home/lab', 'lab')
    os.makedirs(installed.file('/etc/ave'))
    with open(installed.file('/etc/ave/user'), 'w') as stream:
        json.dump({'name': 'lab', 'home': '/home/lab'}, stream)
    _install(installed)
    try:
        lab = installed.account('lab')
        assert installed.broker_process().uids().real == lab['uid'], \
            'the broker does not run as the account named in /etc/ave/user'
        info = os.stat(installed.file('/home/lab/.ave/config/authkeys.json'))
        assert info.st_uid == lab['uid'], 'the configuration does not belong to lab'
    finally:
        _purge(installed)
    assert os.path.isdir(installed.file('/home/lab/.ave/config')), \
        "the purge deleted the lab owner's configuration"
    assert not _wait_for_no_ave_processes(installed), 'the broker survived the purge'
