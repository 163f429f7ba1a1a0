"""A new lab user's first hour (issue 15): each rough edge they met, as they met it.

``make run`` and the tools run for real, with ``HOME`` pointing at a scratch home
whose broker.json has a free port (so no test meets another's broker on 4000).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from support import first_line, reported_pid, wait_until

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / '.venv' / 'bin'


def with_home(home: str) -> dict:
    return {**os.environ, 'HOME': home}


def details(output: str) -> dict[str, str]:
    """The ``name  value`` lines after the first line of --start/--status output."""
    return dict(re.split(r' +', line, maxsplit=1) for line in output.splitlines()[1:]
                if re.match(r'[a-z]+ +\S', line))


@pytest.mark.skipif(os.path.exists('/etc/ave/user'),
                    reason='/etc/ave/user names the home, so $HOME is rightly not used')
def test_make_run_uses_HOME_and_says_where_everything_is(broker_home):
    lab = broker_home()
    make = ['make', '--no-print-directory', '-C', str(REPO), '-o', 'install', '-o',
            '.venv/.installed', 'run']
    try:
        first = subprocess.run(make, capture_output=True, text=True, timeout=60,
                               env=with_home(lab.home))
        again = subprocess.run(make, capture_output=True, text=True, timeout=60,
                               env=with_home(lab.home))
    finally:
        stopped = lab.cli('--stop')
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    started = next(i for i, line in enumerate(lines) if line.startswith('started, pid '))
    told = details('\n'.join(lines[started:]))
    assert told['address'] == f'127.0.0.1:{lab.port}'
    assert told['home'] == lab.home, 'make run did not use $HOME'
    assert told['log'] == f'{lab.home}/.ave/logs/broker.log'
    assert told['isolation'] in ('on', 'off')
    assert 'not running' not in first.stdout
    assert lines[-1] == ('The tools are in .venv/bin: try .venv/bin/ave list --all, or first '
                         '. .venv/bin/activate')
    assert f'running, pid {reported_pid(lines[started])}' in again.stdout, again.stdout
    assert stopped.returncode == 0, stopped.stderr


def test_status_says_pid_address_home_log_isolation_and_version(broker):
    result = broker.cli('--status')
    assert first_line(result.stdout) == f'running, pid {broker.pid}'
    told = details(result.stdout)
    assert told['address'] == f'127.0.0.1:{broker.port}' and told['home'] == broker.home
    assert told['log'] == os.path.join(broker.log_dir, 'broker.log')
    assert told['isolation'] in ('on', 'off')
    assert told['version']


def test_status_of_a_foreground_broker_says_its_log_goes_to_the_supervisor(broker_home,
                                                                           tmp_path):
    lab = broker_home()
    with open(tmp_path / 'foreground.err', 'w') as stderr:
        process = lab.popen('--start', '--foreground', stderr=stderr)
    assert wait_until(lambda: lab.read_pid_file() == process.pid, timeout=20)
    told = details(lab.cli('--status').stdout)
    assert told['log'].startswith('stderr, kept by its supervisor'), told


def test_status_reports_where_the_broker_listens_even_after_broker_json_changed(broker):
    broker.write_broker_json({**broker.broker_json, 'port': 1})
    told = details(broker.cli('--status').stdout)
    assert told['address'] == f'127.0.0.1:{broker.port}' and told['version'], told


def test_status_of_a_broker_that_does_not_answer_says_what_can_be_known(broker):
    broker.write_broker_json({**broker.broker_json, 'isolation': 'off'})
    daemon = psutil.Process(broker.pid)
    daemon.suspend()
    try:
        result = broker.cli('--status')
    finally:
        daemon.resume()
    assert first_line(result.stdout) == f'running, pid {broker.pid}'
    told = details(result.stdout)
    assert told['address'] == f'127.0.0.1:{broker.port}' and told['home'] == broker.home
    assert told['isolation'].startswith('off as broker.json asks (the broker did not '
                                        'report its status: '), told


def test_status_of_a_running_broker_with_a_broken_broker_json_still_says_running(broker):
    broker.write_config(broker.config_path('broker.json'), '{')
    result = broker.cli('--status')
    assert result.returncode == 0, result.stderr
    assert details(result.stdout)['address'] == f'127.0.0.1:{broker.port}'


def test_start_says_where_the_broker_is(broker_home):
    lab = broker_home()
    result = lab.cli('--start')
    lab.pid = reported_pid(result.stdout)
    assert first_line(result.stdout) == f'started, pid {lab.pid}'
    assert details(result.stdout)['address'] == f'127.0.0.1:{lab.port}'


def test_tools_find_the_home_through_HOME(lab, ave):
    result = ave.plain('list', '--all', env=with_home(lab.home))
    assert result.returncode == 0 and 'r1' in result.stdout, result.stderr


def test_broker_client_finds_the_home_through_HOME(lab):
    job = ('from ave.broker import Broker; broker = Broker(); '
           'print(broker.get({"type": "relay", "uid": "r2"}).get_profile()["uid"])')
    result = subprocess.run([sys.executable, '-c', job], capture_output=True, text=True,
                            env=with_home(lab.home), timeout=30)
    assert result.stdout == 'r2\n', result.stderr


# -- ave-config --check -------------------------------------------------------------------

def ave_config(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'ave.config_cli', *args],
                          capture_output=True, text=True, timeout=30)


def test_check_of_a_good_home_says_what_each_file_holds(lab):
    result = ave_config('--check', '--home', lab.home)
    assert result.returncode == 0, result.stderr
    directory = os.path.join(lab.home, '.ave', 'config')
    assert result.stdout == (
        f'{directory}/broker.json: ok (2 equipment entries, 0 stacks, port {lab.port})\n'
        f'{directory}/authkeys.json: ok (accounts: admin, share)\n'
        f'{directory}/workspace.json: ok\n')


@pytest.mark.parametrize('name, content, field', [
    ('broker.json', {'equipment': [{'type': 'relay', 'uid': 'r1', 'circuits': {
        'c1': {'open': ['true'], 'close': 'true', 'default': 'open'}}}]},
     "field 'equipment[0]'"),
    ('broker.json', {'prot': 4000}, "field 'prot': unknown key (did you mean 'port'?)"),
    ('workspace.json', {'root': 'relative'}, "field 'root'"),
    ('authkeys.json', {'admin': 5}, "field 'admin'"),
])
def test_check_fails_with_the_line_the_broker_gives(broker_home, name, content, field):
    lab = broker_home()
    lab.write_config(lab.config_path(name), json.dumps(content))
    checked = ave_config('--check', '--home', lab.home)
    started = lab.cli('--start')
    assert checked.returncode == 1 and started.returncode == 1
    assert checked.stderr.startswith('ave-config: ') and checked.stderr.count('\n') == 1
    assert field in checked.stderr, checked.stderr
    assert checked.stderr.removeprefix('ave-config: ') == \
        started.stderr.removeprefix('ave-broker: '), 'not the message the broker gives'


def test_check_binds_nothing_so_it_works_beside_the_running_broker(lab):
    assert ave_config('--check', '--home', lab.home).returncode == 0


def test_check_without_home_uses_HOME(lab):
    result = subprocess.run([sys.executable, '-m', 'ave.config_cli', '--check'],
                            capture_output=True, text=True, timeout=30,
                            env=with_home(lab.home))
    assert result.returncode == 0 and lab.home in result.stdout, result.stderr


# -- README -------------------------------------------------------------------------------

def test_readme_starts_with_exactly_the_two_commands():
    text = (REPO / 'README.md').read_text()
    first_block = text.split('```sh\n', 1)[1].split('```', 1)[0]
    commands = [line.split('#')[0].strip() for line in first_block.splitlines()]
    assert commands == ['make run', 'make test']


def test_readme_commands_are_the_installed_ones():
    text = (REPO / 'README.md').read_text()
    named = set(re.findall(r'(?<![\w-])(ave(?:-broker|-config)?) ', text))
    assert named == {'ave', 'ave-broker', 'ave-config'}, named
    for tool in named:
        assert (BIN / tool).exists(), f'README names {tool}, which make run does not install'
    assert '. .venv/bin/activate' in text, 'README must say how the tools get on PATH'
