"""ave.cmd.run and run_bg against real processes on real pseudoterminals; nothing is
mocked. How the child is set up (session, terminal, signals, descriptors, threads) is
tested in test_spawn.py, the tail helper in test_tail.py.

Tests that start processes able to outlive a failing assertion hand their pids to the
``doomed`` fixture (conftest.py), which kills whatever is still alive when the test ends.
"""
import os
import signal
import sys
import threading
import time

import psutil
import pytest

from ave.cmd import run, run_bg
from ave.cmd.tail import cut_notice
from ave.exceptions import RunError, Timeout
from cmd_support import (all_gone, gone, open_descriptors, pids_in, pty_descriptors,
                         read_until_closed)

PY = sys.executable


# --- exit codes ---------------------------------------------------------------------

def test_success_gives_exit_code_zero():
    assert run(['true']) == (0, ''), 'true must exit 0 without output'


def test_failure_gives_the_programs_exit_code():
    code, _ = run(['sh', '-c', 'exit 3'])
    assert code == 3, 'the exit code must be passed through unchanged'


def test_death_by_signal_gives_minus_the_signal_number():
    code, _ = run(['sh', '-c', 'kill -TERM $$'])
    assert code == -signal.SIGTERM, f'expected -SIGTERM, got {code}'


# --- output -------------------------------------------------------------------------

def test_stdout_and_stderr_are_mixed_in_write_order():
    _, out = run(['sh', '-c', 'echo one; echo two >&2; echo three'])
    assert out == 'one\r\ntwo\r\nthree\r\n', f'unexpected output {out!r}'


def test_string_command_is_split_on_whitespace():
    _, out = run('echo  a   b')
    assert out == 'a b\r\n', 'a string command must be split on runs of whitespace'


def test_list_command_keeps_each_argument_whole():
    _, out = run(['echo', 'a   b'])
    assert out == 'a   b\r\n', 'list items must reach the program unsplit'


def test_tuple_command_works_like_a_list():
    assert run(('echo', 'x')) == (0, 'x\r\n'), 'a tuple of str is a valid command'


def test_command_runs_in_the_given_directory(tmp_path):
    _, out = run(['pwd', '-P'], cwd=tmp_path)
    assert out.strip() == str(tmp_path.resolve()), 'cwd must be the working directory'


def test_empty_cwd_keeps_the_current_directory():
    _, out = run(['pwd', '-P'])
    assert out.strip() == os.path.realpath(os.getcwd()), "cwd='' must not change dir"


def test_invalid_utf8_is_replaced():
    _, out = run(['printf', 'a\\377b'])
    assert out == 'a\ufffdb', f'invalid bytes must become U+FFFD, got {out!r}'


def test_character_split_across_reads_is_decoded_whole():
    script = ("import sys, time\n"
              "sys.stdout.buffer.write(b'\\xc3'); sys.stdout.flush(); time.sleep(0.3)\n"
              "sys.stdout.buffer.write(b'\\xa9'); sys.stdout.flush()\n")
    _, out = run([PY, '-c', script])
    assert out == '\u00e9', f'a two-byte character split in time was mangled: {out!r}'


def test_large_output_arrives_complete():
    _, out = run(['sh', '-c', "head -c 1000000 /dev/zero | tr '\\0' x"])
    assert out == 'x' * 1_000_000, f'expected 1000000 x, got {len(out)} characters'


def test_output_file_receives_output_while_the_command_runs(tmp_path):
    path = tmp_path / 'out.txt'
    # The command looks at the file itself: it only says "seen" if its first line got
    # there while it was still running.
    script = ('echo first; for i in $(seq 50); do '
              'grep -q first "$1" && echo seen && exit 0; sleep 0.1; done; echo unseen')
    with open(path, 'w', encoding='utf-8') as sink:
        _, out = run(['sh', '-c', script, 'sh', str(path)], output_file=sink)
    assert out == 'first\r\nseen\r\n', f'output was not streamed: {out!r}'
    with open(path, encoding='utf-8', newline='') as written:
        assert written.read() == out, 'the file must hold the whole output'


def test_debug_echoes_output_to_stderr(capfd):
    run(['echo', 'shown-on-stderr'], debug=True)
    assert 'shown-on-stderr' in capfd.readouterr().err, 'debug must echo to stderr'


# --- when output ends ---------------------------------------------------------------

@pytest.mark.timeout(10)
def test_returns_when_the_command_exits_though_a_descendant_holds_the_pty(doomed):
    start = time.monotonic()
    code, out = run(['sh', '-c', 'trap "" HUP; sleep 30 & echo $!'])
    elapsed = time.monotonic() - start
    doomed.extend(pids_in(out))
    assert code == 0 and len(doomed) == 1, f'unexpected result {code}, {out!r}'
    assert elapsed < 2, f'run() waited {elapsed:.1f} s for a descendant'


@pytest.mark.timeout(10)
def test_waits_for_a_command_that_closed_its_output():
    start = time.monotonic()
    code, _ = run(['sh', '-c', 'exec >/dev/null 2>&1; sleep 0.5; exit 7'])
    elapsed = time.monotonic() - start
    assert (code, elapsed >= 0.5) == (7, True), 'run() must wait for the exit itself'


@pytest.mark.timeout(10)
def test_properly_daemonized_program_survives(doomed):
    # The daemon detaches (new session, stdio off the pty) before its parent exits.
    script = ('import os, time\n'
              'ready_r, ready_w = os.pipe()\n'
              'if os.fork() == 0:\n'
              '    os.setsid()\n'
              '    print(os.getpid(), flush=True)\n'
              '    null = os.open(os.devnull, os.O_RDWR)\n'
              '    for fd in (0, 1, 2):\n'
              '        os.dup2(null, fd)\n'
              '    os.close(ready_w)\n'
              '    time.sleep(30)\n'
              '    os._exit(0)\n'
              'os.close(ready_w)\n'
              'os.read(ready_r, 1)\n')
    _, out = run([PY, '-c', script])
    doomed.extend(pids_in(out))
    assert len(doomed) == 1 and not gone(doomed[0]), \
        'a program in a session of its own must outlive the call'


# --- timeouts -----------------------------------------------------------------------

@pytest.mark.timeout(10)
def test_timeout_raises_promptly():
    start = time.monotonic()
    with pytest.raises(Timeout):
        run(['sleep', '30'], timeout=1)
    elapsed = time.monotonic() - start
    assert elapsed < 2, f'Timeout came after {elapsed:.1f} s'


@pytest.mark.timeout(10)
def test_timeout_kills_the_whole_process_group(doomed):
    with pytest.raises(Timeout) as caught:
        run(['sh', '-c', 'sleep 30 & echo $!; sleep 30 & echo $!; wait'], timeout=1)
    doomed.extend(pids_in(caught.value.out))
    assert len(doomed) == 2, f'expected two pids in {caught.value.out!r}'
    assert all_gone(doomed), 'grandchildren survived the timeout'
    assert psutil.Process().children() == [], 'the command was not reaped'


@pytest.mark.timeout(10)
def test_timeout_kills_descendants_that_left_the_process_group(doomed):
    script = ('import os, time\n'
              'os.setpgid(0, 0)\n'
              'print(os.getpid(), flush=True)\n'
              'time.sleep(30)\n')
    with pytest.raises(Timeout) as caught:
        run(['sh', '-c', f'{PY} -c "$1" & wait', 'sh', script], timeout=1)
    doomed.extend(pids_in(caught.value.out))
    assert len(doomed) == 1, f'expected one pid in {caught.value.out!r}'
    assert all_gone(doomed), 'a process in another group of the session survived'


@pytest.mark.timeout(10)
def test_timeout_carries_the_command_and_the_output_so_far():
    cmd = ['sh', '-c', 'echo started; sleep 30']
    with pytest.raises(Timeout) as caught:
        run(cmd, timeout=0.5)
    assert (caught.value.cmd, caught.value.out) == (cmd, 'started\r\n'), \
        f'Timeout details incomplete: {caught.value.details}'


@pytest.mark.timeout(10)
def test_timeout_applies_after_the_command_closed_its_output():
    with pytest.raises(Timeout):
        run(['sh', '-c', 'exec >/dev/null 2>&1; sleep 30'], timeout=0.5)


@pytest.mark.timeout(10)
def test_error_while_streaming_kills_and_reaps_the_command(tmp_path):
    (tmp_path / 'read-only').write_text('')
    with open(tmp_path / 'read-only', encoding='utf-8') as not_writable:
        with pytest.raises(OSError):
            run(['sh', '-c', 'echo x; sleep 30'], output_file=not_writable)
    assert psutil.Process().children() == [], 'the command outlived the failed call'


# --- max_output ---------------------------------------------------------------------

def numbered_lines(count: int) -> str:
    """What ``seq 1 COUNT`` prints, as it comes out of a terminal."""
    return ''.join(f'{i}\r\n' for i in range(1, count + 1))


def test_max_output_keeps_the_tail_after_a_line_saying_what_was_cut():
    full = numbered_lines(100_000)
    _, out = run(['seq', '1', '100000'], max_output=1000)
    assert out == cut_notice(len(full) - 1000, 1000) + full[-1000:], \
        f'expected the notice and the last 1000 characters, got {out[:120]!r}...'


def test_output_within_max_output_is_returned_whole():
    assert run(['seq', '1', '3'], max_output=9) == (0, '1\r\n2\r\n3\r\n'), \
        'output at the limit must not be cut'


def test_output_file_gets_everything_when_max_output_cuts(tmp_path):
    path = tmp_path / 'out.txt'
    with open(path, 'w', encoding='utf-8', newline='') as sink:
        _, out = run(['seq', '1', '100000'], output_file=sink, max_output=100)
    full = numbered_lines(100_000)
    with open(path, encoding='utf-8', newline='') as written:
        assert written.read() == full, 'output_file must receive the whole output'
    assert out == cut_notice(len(full) - 100, 100) + full[-100:], 'the tail is wrong'


def peak_rss_growth_during(action) -> int:
    """Bytes the process's resident set grew by at its highest while ``action`` ran,
    sampled every few milliseconds from another thread."""
    me, stop = psutil.Process(), threading.Event()
    base = peak = me.memory_info().rss

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.005):
            peak = max(peak, me.memory_info().rss)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        action()
    finally:
        stop.set()
        sampler.join(5)
    return max(peak, me.memory_info().rss) - base


@pytest.mark.timeout(60)
def test_memory_stays_bounded_by_max_output_whatever_the_command_prints():
    printed, limit, bound = 200_000_000, 1 << 20, 32 << 20
    results = []
    with open(os.devnull, 'w', encoding='utf-8') as sink:
        growth = peak_rss_growth_during(lambda: results.append(run(
            ['sh', '-c', f"head -c {printed} /dev/zero | tr '\\0' x"],
            output_file=sink, max_output=limit)))
    (code, out), = results
    assert out == cut_notice(printed - limit, limit) + 'x' * limit, \
        f'unexpected output: {out[:100]!r}... ({len(out)} characters)'
    assert growth < bound, \
        f'RSS grew by {growth >> 20} MiB while {printed // 10**6} MB passed through ' \
        f'a {limit >> 20} MiB max_output (bound: {bound >> 20} MiB)'


@pytest.mark.timeout(20)
def test_timeout_output_is_cut_to_max_output_too():
    script = "seq 1 200000; echo last-line; sleep 30"
    with pytest.raises(Timeout) as caught:
        run(['sh', '-c', script], timeout=2, max_output=500)
    out = caught.value.out
    notice, _, kept = out.partition('\n')
    assert notice.startswith('[ave.cmd: ') and len(kept) == 500, \
        f'Timeout.out must be a notice and 500 characters: {out[:120]!r}...'
    assert kept.endswith('200000\r\nlast-line\r\n'), f'the end is missing: {kept!r}'


@pytest.mark.parametrize('max_output, error', [
    (-1, ValueError), (1.5, TypeError), ('10', TypeError), (True, TypeError)])
def test_bad_max_output_is_refused(max_output, error):
    with pytest.raises(error, match='max_output'):
        run(['true'], max_output=max_output)


def test_max_output_is_keyword_only():
    with pytest.raises(TypeError):
        run(['true'], 0, False, '', None, 10)


# --- resources ----------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_thousand_runs_leak_no_descriptors_ptys_or_zombies():
    run(['true'])
    fds_before, ptys_before = len(open_descriptors()), pty_descriptors()
    for _ in range(1000):
        run(['true'])
    assert (len(open_descriptors()), pty_descriptors()) == (fds_before, ptys_before), \
        'descriptors or ptys leaked'
    assert psutil.Process().children() == [], 'zombies left behind'


# --- a caller that ignores SIGCHLD ---------------------------------------------------

def test_caller_ignoring_sigchld_gets_a_clear_error_with_the_output(restore_signals):
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    # The kernel reaps the command sometimes before run() looks, sometimes after:
    # repeat so that both orders are likely to be met.
    for _ in range(20):
        with pytest.raises(RunError, match='exit status lost') as caught:
            run(['echo', 'hi'])
        assert caught.value.out == 'hi\r\n', f'output lost: {caught.value.out!r}'


def test_missing_program_is_a_run_error_even_when_sigchld_is_ignored(restore_signals):
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    with pytest.raises(RunError, match='cannot run'):
        run(['no-such-program-ave-test'])


# --- bad arguments ------------------------------------------------------------------

@pytest.mark.parametrize('cmd', [42, None, b'ls', {'ls'}, ['ls', 1], ['ls', b'-l']])
def test_command_of_the_wrong_type_raises_type_error(cmd):
    with pytest.raises(TypeError, match='cmd'):
        run(cmd)


@pytest.mark.parametrize('cmd', ['', '   ', [], ['', 'x'], ['echo', 'a\0b']])
def test_empty_or_unusable_command_raises_value_error(cmd):
    with pytest.raises(ValueError, match='cmd'):
        run(cmd)


@pytest.mark.parametrize('timeout, error', [
    (-1, ValueError), (float('inf'), ValueError), (float('nan'), ValueError),
    ('5', TypeError)])
def test_bad_timeout_is_refused(timeout, error):
    with pytest.raises(error, match='timeout'):
        run(['true'], timeout=timeout)


def test_bad_cwd_and_output_file_are_refused():
    with pytest.raises(TypeError, match='cwd'):
        run(['true'], cwd=5)
    with pytest.raises(TypeError, match='output_file'):
        run(['true'], output_file='out.txt')


def test_run_bg_refuses_bad_commands():
    with pytest.raises(TypeError, match='cmd'):
        run_bg(42)


# --- run_bg -------------------------------------------------------------------------

@pytest.mark.timeout(10)
def test_run_bg_gives_the_pid_and_a_pty_carrying_the_output():
    pid, fd = run_bg(['sh', '-c', 'echo from-background; exit 4'])
    try:
        output = read_until_closed(fd)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert output == b'from-background\r\n', f'unexpected output {output!r}'
    assert os.waitstatus_to_exitcode(status) == 4, 'the caller reaps the exit code'


def test_run_bg_descriptor_is_not_inherited_by_other_programs():
    pid, fd = run_bg(['true'])
    try:
        assert not os.get_inheritable(fd), 'the pty master would leak into children'
    finally:
        os.close(fd)
        os.waitpid(pid, 0)


def test_run_bg_missing_program_raises_run_error():
    with pytest.raises(RunError, match='cannot run'):
        run_bg(['no-such-program-ave-test'])
    assert psutil.Process().children() == [], 'the failed child was not reaped'


def test_run_bg_debug_announces_the_pid(capfd):
    pid, fd = run_bg(['true'], debug=True)
    os.close(fd)
    os.waitpid(pid, 0)
    assert f'pid {pid}' in capfd.readouterr().err, 'debug must name the started pid'
