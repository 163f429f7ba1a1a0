"""``ave``'s command line without a broker: versions, help, usage errors, completion."""
from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from cli.conftest import AVE

pytestmark = pytest.mark.timeout(60)

TOOLS = {'ave': AVE, 'ave-broker': [sys.executable, '-m', 'ave.broker.cli'],
         'ave-config': [sys.executable, '-m', 'ave.config_cli']}


def run(*args: str, tool: str = 'ave', **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOLS[tool], *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=30, **kwargs)


def usage_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.startswith('ave: ') and result.stderr.count('\n') == 1, \
        repr(result.stderr)
    return result.stderr


@pytest.mark.parametrize('tool', TOOLS)
def test_every_tool_says_its_version(tool):
    result = run('--version', tool=tool)
    assert (result.returncode, result.stdout) == (0, f'{tool} {version("ave")}\n'), \
        result.stderr


@pytest.mark.parametrize('command', ['list', 'who', 'queue', 'hold', 'run', 'console',
                                     'relay', 'kick', 'completion'])
def test_every_command_has_help(command):
    result = run(command, '--help')
    assert result.returncode == 0 and result.stdout.startswith('usage: ave'), result.stderr


def test_help_names_every_command():
    text = run('--help').stdout
    for command in ('list', 'who', 'queue', 'hold', 'run', 'console', 'relay', 'kick'):
        assert f'    {command}' in text, f'{command} missing from ave --help'


@pytest.mark.parametrize('args, problem', [
    ((), 'the following arguments are required: COMMAND'),
    (('fly',), "invalid choice: 'fly'"),
    (('list', '--bogus'), 'unrecognized arguments: --bogus'),
    (('--home', '/tmp', 'list'), 'options follow the command, as in: ave list --home ...'),
    (('hold',), 'the following arguments are required: PROFILE'),
    (('hold', 'relay,uid'), "PROFILE 'relay,uid': 'uid' is not KEY=VALUE"),
    (('hold', 'uid=r1'), 'the equipment type comes first'),
    (('console', '[{"type": "serial"}]'), 'a stack group (a JSON list) is not accepted here'),
    (('hold', '--wait', 'soon', 'relay'), 'expected seconds (a number >= 0) or "forever"'),
    (('hold', '--wait', '-1', 'relay'), 'expected seconds'),
    (('hold', '--wait', 'nan', 'relay'), 'expected seconds'),
    (('list', '--broker', 'lab-host'), "--broker 'lab-host': expected HOST:PORT"),
    (('list', '--broker', 'h:99999'), 'expected HOST:PORT'),
    (('relay', 'relay,uid=r1', 'c1', 'toggle'), "invalid choice: 'toggle'"),
    (('relay', '--for', 'x', 'relay,uid=r1', 'c1', 'open'), 'expected seconds'),
    (('run', 'relay,uid=r1'), 'ave run needs the command after --'),
    (('run', 'relay,uid=r1', '--'), 'ave run needs the command after --'),
])
def test_wrong_command_lines_are_one_line_and_exit_2(args, problem):
    assert problem in usage_error(run(*args))


def test_a_missing_home_is_refused_and_not_created(tmp_path):
    typo = tmp_path / 'typo'
    for tool, args in (('ave', ('list',)), ('ave-broker', ('--status',)),
                       ('ave-config', ('--check',))):
        result = run(*args, '--home', str(typo), tool=tool)
        assert result.returncode == 1, (tool, result.stderr)
        assert result.stderr == (f'{tool}: --home {typo}: no such directory (ave-config '
                                 f'--create-default --home {typo} makes one)\n')
        assert not typo.exists(), f'{tool} created the home'


def test_ipv6_broker_address_in_brackets(tmp_path):
    result = run('list', '--broker', '[::1]:1', env={**os.environ, 'HOME': str(tmp_path)})
    assert result.returncode == 1 and 'no broker listens on ::1:1' in result.stderr, \
        result.stderr


# -- bash completion ----------------------------------------------------------------------

def complete(line: str) -> list[str]:
    """What bash completes for ``line`` (the cursor at its end) with ave's script."""
    script = run('completion').stdout
    probe = (f'{script}\nCOMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}\n'
             'COMP_WORDS=(); COMP_CWORD=0\n_ave\nprintf "%s\\n" "${COMPREPLY[@]}"\n')
    result = subprocess.run(['bash', '--norc', '--noprofile', '-c', probe],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return sorted(word for word in result.stdout.splitlines() if word)


def test_completion_of_commands():
    assert complete('ave ') == sorted(['list', 'who', 'queue', 'hold', 'run', 'console',
                                       'relay', 'kick', 'completion', '--version', '--help'])
    assert complete('ave k') == ['kick']


def test_completion_of_options_of_a_command():
    assert complete('ave list --') == ['--all', '--broker', '--help', '--home', '--json']


def test_completion_of_profiles_offers_the_installed_types():
    assert complete('ave hold re') == ['relay,']
    assert complete('ave hold --wait 5 relay,uid=r1 ser') == ['serial,']
    assert complete('ave hold relay,u') == [], 'nothing is guessed inside a profile'


def test_completion_of_a_relay_state():
    assert complete('ave relay relay,uid=r1 c1 ') == ['close', 'open']


def test_completion_of_home_directories(tmp_path):
    (tmp_path / 'labhome').mkdir()
    (tmp_path / 'labfile').write_text('')
    assert complete(f'ave list --home {tmp_path}/lab') == [f'{tmp_path}/labhome']


def test_completion_after_double_dash_is_a_command_then_files(tmp_path):
    assert 'sh' in complete('ave run relay -- s')
    (tmp_path / 'flash.img').write_text('')
    assert complete(f'ave run relay -- ./flash.sh {tmp_path}/fla') == [f'{tmp_path}/flash.img']
