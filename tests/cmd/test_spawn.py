"""How ave.cmd sets up the command: its session and controlling terminal, its signals,
its descriptors, its directory; start failures; starting from threads.

Everything runs real programs on real ptys and looks at them from both sides: what the
command reports about itself, and what the caller sees of it (/proc, psutil).
"""
import errno
import os
import shutil
import signal
import sys
import threading
import time

import psutil
import pytest

from ave._native import ffi, lib
from ave.cmd import run, run_bg
from ave.exceptions import RunError
from cmd_support import in_forked_helper, open_descriptors, read_until_closed

PY = sys.executable

pytestmark = pytest.mark.timeout(30)


def pts_index(master: int) -> int:
    """The N of /dev/pts/N behind a pty master, as the kernel reports it."""
    with open(f'/proc/self/fdinfo/{master}', encoding='ascii') as info:
        for line in info:
            if line.startswith('tty-index:'):
                return int(line.split()[1])
    raise AssertionError('the kernel gave no tty-index for the pty master')


def signal_masks(status: str) -> dict[str, int]:
    """The Sig* lines of a /proc/PID/status text, as numbers."""
    return {name: int(value, 16) for name, value in
            (line.replace('\t', '').split(':') for line in status.splitlines()
             if line.startswith(('SigIgn', 'SigBlk', 'SigCgt', 'SigPnd')))}


# --- session and controlling terminal -----------------------------------------------

def test_controlling_terminal_is_the_pty_whose_master_the_caller_holds():
    script = ('tty; ps -o tty= -p $$; readlink /proc/$$/fd/0 /proc/$$/fd/1 /proc/$$/fd/2;'
              'echo probe >/dev/tty && echo opened')
    pid, master = run_bg(['sh', '-c', script])
    try:
        index = pts_index(master)
        out = read_until_closed(master).decode()
        os.waitpid(pid, 0)
    finally:
        os.close(master)
    pts = f'/dev/pts/{index}'
    assert out.split() == [pts, f'pts/{index}', pts, pts, pts, 'probe', 'opened'], \
        f'the command must have {pts} as controlling terminal and stdio: {out!r}'


def test_command_leads_a_session_and_process_group_of_its_own():
    pid, master = run_bg(['sleep', '30'])
    try:
        seen = (os.getsid(pid), os.getpgid(pid), psutil.Process(pid).terminal())
        expected = (pid, pid, f'/dev/pts/{pts_index(master)}')
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(master)
    assert seen == expected, f'(sid, pgid, terminal) {seen}, expected {expected}'


def test_command_is_session_leader_with_the_pty_as_controlling_terminal():
    script = ('import os\n'
              'print(os.getsid(0) == os.getpid(), os.getpgid(0) == os.getpid(),'
              ' os.isatty(1))\n'
              'os.close(os.open("/dev/tty", os.O_RDWR))\n')
    assert run([PY, '-c', script]) == (0, 'True True True\r\n'), \
        'the command must lead its own session with the pty as controlling terminal'


# --- signals ------------------------------------------------------------------------

def test_every_signal_is_default_and_unblocked_whatever_the_caller_did(restore_signals):
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGRTMIN})
    _, out = run(['grep', '^Sig', '/proc/self/status'])
    masks = signal_masks(out)
    assert (masks['SigIgn'], masks['SigBlk']) == (0, 0), \
        f'the command inherited ignored or blocked signals: {out!r}'


@pytest.mark.parametrize('name', ['HUP', 'INT', 'PIPE', 'TERM', 'USR1', 'ALRM'])
def test_command_dies_of_a_signal_the_caller_ignores(restore_signals, name):
    signum = signal.Signals[f'SIG{name}']
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        code, out = run(['sh', '-c', f'kill -{name} $$; echo survived'])
    finally:
        signal.signal(signum, previous)
    assert (code, out) == (-signum, ''), f'SIG{name} did not kill the command: {code}, {out!r}'


def test_command_is_hung_up_when_its_terminal_closes_though_the_caller_ignores_sighup(
        restore_signals, doomed):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    pid, master = run_bg(['sleep', '30'])
    doomed.append(pid)
    os.close(master)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGHUP, \
        'closing the terminal must hang the command up'


@pytest.mark.skipif(shutil.which('bash') is None, reason='needs bash for PIPESTATUS')
def test_writer_to_a_closed_pipe_dies_of_sigpipe():
    # Python ignores SIGPIPE in itself; a command must not inherit that, or `yes | head`
    # would report write errors instead of ending quietly.
    _, out = run(['bash', '-c', 'yes | head -n 1 >/dev/null; echo "${PIPESTATUS[0]}"'])
    assert out == f'{128 + signal.SIGPIPE}\r\n', f'yes was not killed by SIGPIPE: {out!r}'


def test_reserved_signals_an_ignoring_caller_inherited_are_reset():
    """glibc's posix_spawn leaves signals 32 and 33 ignored in the program it starts,
    and glibc then refuses to change them; ave.cmd resets them all the same."""
    script = ('from ave.cmd import run\n'
              'own = open("/proc/self/status").read()\n'
              '_, out = run(["grep", "^Sig", "/proc/self/status"])\n'
              'print(own)\n'
              'print("---")\n'
              'print(out)\n')
    read_end, write_end = os.pipe()
    try:
        pid = os.posix_spawn(PY, [PY, '-c', script], os.environ,
                             file_actions=[(os.POSIX_SPAWN_DUP2, write_end, 1)])
    finally:
        os.close(write_end)
    try:
        report = read_until_closed(read_end, within=20).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    own, _, command = report.partition('---')
    reserved = (1 << 31) | (1 << 32)
    if signal_masks(own)['SigIgn'] & reserved != reserved:
        pytest.skip("this libc's posix_spawn does not leave signals 32 and 33 ignored")
    assert signal_masks(command)['SigIgn'] == 0, \
        f'the command inherited ignored signals: {command!r}'


# --- descriptors and directory ------------------------------------------------------

def test_inheritable_descriptors_of_the_caller_do_not_reach_the_command():
    read_end, write_end = os.pipe()
    inherited = os.dup2(write_end, 100)  # far above anything Python opens at start-up
    os.set_inheritable(inherited, True)
    try:
        _, out = run([PY, '-c', 'import os\ntry:\n    os.fstat(100)\n    print("open")\n'
                                'except OSError:\n    print("closed")\n'])
    finally:
        for fd in (read_end, write_end, inherited):
            os.close(fd)
    assert out == 'closed\r\n', 'an inheritable descriptor of the caller reached the command'


def test_works_when_the_caller_closed_its_stdio():
    def closed_stdio_run():
        for fd in (0, 1, 2):
            os.close(fd)
        return run(['echo', 'hi'])
    assert in_forked_helper(closed_stdio_run) == ["done: (0, 'hi\\r\\n')"], \
        'descriptors 0-2 being free must not confuse the child set-up'


def test_relative_program_is_found_from_the_given_directory(tmp_path):
    script = tmp_path / 'hello'
    script.write_text('#!/bin/sh\necho hello from "$(pwd -P)"\n')
    script.chmod(0o755)
    assert run(['./hello'], cwd=tmp_path) == (0, f'hello from {tmp_path.resolve()}\r\n'), \
        'a relative program path must be taken from cwd, as in a shell'


# --- start failures -----------------------------------------------------------------

def test_missing_program_raises_run_error_in_exactly_one_process():
    def missing():
        try:
            run(['no-such-program-ave-test'])
        except RunError as exc:
            return f'RunError {exc.message}'
        return 'no error'
    lines = in_forked_helper(missing)
    assert len(lines) == 1, f'the caller continued in {len(lines)} processes: {lines}'
    assert lines[0].startswith('done: RunError cannot run'), lines[0]


def test_run_error_carries_command_output_and_message():
    cmd = ['no-such-program-ave-test', '--flag']
    with pytest.raises(RunError) as caught:
        run(cmd)
    details = caught.value.details
    assert (details['cmd'], details['out']) == (cmd, ''), details
    assert details['message'] == ("cannot run 'no-such-program-ave-test': "
                                  "No such file or directory"), details


def test_program_that_is_not_executable_raises_run_error(tmp_path):
    script = tmp_path / 'script'
    script.write_text('#!/bin/sh\necho never\n')
    with pytest.raises(RunError, match='Permission denied'):
        run([str(script)])


def test_missing_directory_raises_run_error_naming_it(tmp_path):
    missing = tmp_path / 'missing'
    with pytest.raises(RunError) as caught:
        run(['true'], cwd=missing)
    assert caught.value.message == (f'cannot change directory to {str(missing)!r}: '
                                    'No such file or directory'), caught.value.message


def test_directory_that_is_a_file_raises_run_error(tmp_path):
    (tmp_path / 'file').write_text('')
    with pytest.raises(RunError, match='cannot change directory .*Not a directory'):
        run(['true'], cwd=tmp_path / 'file')


def test_bad_directory_raises_run_error_in_exactly_one_process(tmp_path):
    def bad_directory():
        try:
            run(['true'], cwd=tmp_path / 'missing')
        except RunError as exc:
            return f'RunError {exc.message}'
        return 'no error'
    lines = in_forked_helper(bad_directory)
    assert len(lines) == 1, f'the caller continued in {len(lines)} processes: {lines}'
    assert lines[0].startswith('done: RunError cannot change directory'), lines[0]


def test_directory_with_a_nul_character_is_refused():
    with pytest.raises(ValueError, match='cwd'):
        run(['true'], cwd='/tmp\0/etc')


def test_failed_starts_leave_no_descriptors_or_zombies(tmp_path):
    run(['true'])
    before = len(open_descriptors())
    for _ in range(200):
        with pytest.raises(RunError):
            run(['no-such-program-ave-test'])
        with pytest.raises(RunError):
            run(['true'], cwd=tmp_path / 'missing')
    assert len(open_descriptors()) == before, 'failed starts leaked descriptors'
    assert psutil.Process().children() == [], 'failed starts left zombies'


# --- threads ------------------------------------------------------------------------

def test_works_from_a_thread_other_than_main():
    results = []
    worker = threading.Thread(target=lambda: results.append(run(['echo', 'hi'])))
    worker.start()
    worker.join(10)
    assert results == [(0, 'hi\r\n')], 'run() must work outside the main thread'


def test_eight_threads_start_commands_at_once_while_another_keeps_allocating():
    threads, runs = 8, 25
    start_together = threading.Barrier(threads, timeout=10)
    stop = threading.Event()
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def starter(number: int) -> None:
        try:
            start_together.wait()
            results[number] = [run(['echo', f'thread-{number}-{i}']) for i in range(runs)]
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    def allocator() -> None:
        end = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < end:
            [str(i) for i in range(1000)]

    run(['true'])
    before = len(open_descriptors())
    busy = threading.Thread(target=allocator)
    workers = [threading.Thread(target=starter, args=(n,)) for n in range(threads)]
    busy.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(25)
    stop.set()
    busy.join(5)
    assert errors == [], f'starting from threads failed: {errors!r}'
    expected = {n: [(0, f'thread-{n}-{i}\r\n') for i in range(runs)] for n in range(threads)}
    assert results == expected, 'some thread got another output or exit code'
    assert len(open_descriptors()) == before, 'descriptors leaked'
    assert psutil.Process().children() == [], 'zombies left behind'


# --- the native helper itself -------------------------------------------------------

def test_native_helper_refuses_missing_arguments_without_starting_anything():
    argv = ffi.new('char *[]', [ffi.new('char[]', b'true'), ffi.NULL])
    failure = ffi.new('struct ave_spawn_failure *')
    calls = [(ffi.NULL, 0, failure), (argv, -1, failure), (argv, 0, ffi.NULL),
             (ffi.new('char *[]', [ffi.NULL]), 0, failure)]
    for call_argv, tty, call_failure in calls:
        assert lib.ave_spawn(call_argv, tty, ffi.NULL, call_failure) == -1
        assert ffi.errno == errno.EINVAL, f'expected EINVAL, got {ffi.errno}'
    assert psutil.Process().children() == [], 'a refused call started a process'
