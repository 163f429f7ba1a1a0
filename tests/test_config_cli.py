"""ave-config run as a real program: what it creates, prints and exits with."""
import json
import os
import subprocess
import sys

import pytest

from ave import config_cli

COMMAND = [sys.executable, '-m', 'ave.config_cli']

pytestmark = pytest.mark.timeout(30)


def ave_config(*args, stdin=''):
    """Run ave-config with ``stdin`` as its whole input; return the finished process."""
    return subprocess.run(COMMAND + list(args), input=stdin, capture_output=True,
                          text=True, timeout=20)


def run_with_open_stdin(*args):
    """Run ave-config with a stdin that never reaches EOF: it must not read it."""
    with subprocess.Popen(COMMAND + list(args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError('ave-config waited for stdin') from None
        finally:
            proc.stdin.close()
        return code, proc.stdout.read(), proc.stderr.read()


def read_json(path):
    with open(path, encoding='utf-8') as stream:
        return json.load(stream)


def write_etc(tmp_path, content):
    path = tmp_path / 'etc-user'
    path.write_text(content)
    return str(path)


def test_help_exits_zero_and_names_the_actions():
    proc = ave_config('--help')
    assert proc.returncode == 0, proc.stderr
    assert '--create-etc' in proc.stdout and '--create-default' in proc.stdout, proc.stdout


@pytest.mark.parametrize('args', [
    [], ['--create-etc', '--create-default'], ['--create-default', '--user', 'root'],
    ['--create-etc', '--home', '/tmp'], ['--bogus'],
])
def test_wrong_command_line_exits_two(args):
    proc = ave_config(*args)
    assert proc.returncode == 2 and 'usage' in proc.stderr, (proc.returncode, proc.stderr)


def test_create_default_reports_created_then_skipped(home):
    first = ave_config('--create-default', '--home', home)
    second = ave_config('--create-default', '--home', home)
    path = os.path.join(home, '.ave', 'config', 'broker.json')
    assert first.returncode == 0 and f'created {path}' in first.stdout.splitlines(), first
    assert second.returncode == 0 and f'skipped {path} (already exists)' in second.stdout, second
    assert len(first.stdout.splitlines()) == 3 and len(second.stdout.splitlines()) == 3


def test_create_default_says_when_it_made_the_home_itself(tmp_path):
    home = tmp_path / 'typo'
    proc = ave_config('--create-default', '--home', str(home))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f'created {home}', 'a new home was made silently'
    assert len(proc.stdout.splitlines()) == 4


def test_create_default_without_home_uses_the_etc_files_home(tmp_path):
    home = tmp_path / 'lab'
    etc = write_etc(tmp_path, json.dumps({'name': 'root', 'home': str(home)}))
    proc = ave_config('--create-default', '--etc-path', etc)
    assert proc.returncode == 0 and (home / '.ave' / 'config' / 'authkeys.json').exists(), proc


def test_create_default_with_a_broken_etc_file_fails_in_one_line(tmp_path):
    etc = write_etc(tmp_path, '{"name": "root"}')
    proc = ave_config('--create-default', '--etc-path', etc)
    assert proc.returncode == 1 and proc.stdout == ''
    assert proc.stderr == f"ave-config: {etc}: field 'home': required but missing\n", proc.stderr


def test_create_etc_with_user_never_reads_stdin(tmp_path):
    path = str(tmp_path / 'etc' / 'ave' / 'user')
    code, out, _ = run_with_open_stdin('--create-etc', '--user', 'root', '--etc-path', path)
    assert code == 0 and out == f'created {path}\n', out
    assert read_json(path)['name'] == 'root'


def test_create_etc_reads_the_account_from_stdin(tmp_path):
    path = str(tmp_path / 'user')
    proc = ave_config('--create-etc', '--etc-path', path, stdin='root\n')
    assert proc.returncode == 0, proc.stderr
    assert read_json(path) == {'name': 'root', 'home': os.path.expanduser('~root')}


def test_create_etc_keeps_an_existing_file_without_reading_stdin(tmp_path):
    etc = write_etc(tmp_path, '{"name": "someone", "home": "/x"}')
    code, out, _ = run_with_open_stdin('--create-etc', '--etc-path', etc)
    assert code == 0 and out == f'skipped {etc} (already exists)\n', out
    assert read_json(etc) == {'name': 'someone', 'home': '/x'}


def test_create_etc_with_an_unknown_account_fails_in_one_line(tmp_path):
    path = str(tmp_path / 'user')
    proc = ave_config('--create-etc', '--etc-path', path, stdin='no-such-account-ave-test\n')
    assert proc.returncode == 1 and not os.path.exists(path)
    assert proc.stderr == f"ave-config: {path}: no such account: 'no-such-account-ave-test'\n"


def test_create_etc_where_no_directory_can_be_made_fails_in_one_line(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    proc = ave_config('--create-etc', '--user', 'root', '--etc-path', str(blocker / 'user'))
    assert proc.returncode == 1 and proc.stderr.count('\n') == 1, proc.stderr
    assert proc.stderr.startswith(f'ave-config: {blocker}: '), proc.stderr


def test_main_in_process_returns_the_exit_status(home, capsys):
    assert config_cli.main(['--create-default', '--home', home]) == 0
    assert capsys.readouterr().out.count('created ') == 3


def test_main_in_process_reports_failure_on_stderr(tmp_path, capsys):
    path = str(tmp_path / 'user')
    assert config_cli.main(['--create-etc', '--user', 'no-such-account-ave-test',
                            '--etc-path', path]) == 1
    assert capsys.readouterr().err.startswith(f'ave-config: {path}: no such account')


class Terminal:
    """A stdin that looks like a terminal and holds one typed answer."""

    def __init__(self, text):
        self.text = text

    def isatty(self):
        return True

    def read(self, *args):
        text, self.text = self.text, ''
        return text


def test_on_a_terminal_the_account_is_asked_for(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr('sys.stdin', Terminal('root\n'))
    path = str(tmp_path / 'user')
    assert config_cli.main(['--create-etc', '--etc-path', path]) == 0
    assert 'account name' in capsys.readouterr().err
