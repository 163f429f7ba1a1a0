"""Process: real forks, daemons, synchronization, signals and prctl."""
import os
import signal
import sys
import time

import psutil
import pytest

from ave.exceptions import Timeout
from ave.network.process import Process, StartError
from support import wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def processes():
    """Every Process a test starts; all are killed and reaped afterwards."""
    started = []
    yield started
    for process in started:
        if process.pid is None:
            continue
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if not process.daemonized and process.exit_code is None:
            process.join(5)


def hickup_files(home):
    """Finished hickup files (a file being written still has its .tmp name)."""
    directory = os.path.join(home, '.ave', 'hickup')
    if not os.path.isdir(directory):
        return []
    return [name for name in os.listdir(directory) if not name.endswith('.tmp')]


def sleep_forever():
    for _ in range(600):
        time.sleep(0.1)


def test_join_returns_the_targets_exit_code(processes):
    process = Process(target=sys.exit, args=(7,))
    processes.append(process)
    process.start()
    assert process.join(5) == 7


def test_target_returning_normally_exits_zero(processes):
    process = Process(target=lambda: None)
    processes.append(process)
    process.start()
    assert process.join(5) == 0


def test_target_returning_a_value_exits_zero(processes):
    process = Process(target=lambda: 'a result nobody asked for')
    processes.append(process)
    process.start()
    assert process.join(10) == 0, 'a value returned by the target became an exit code'


def test_target_raising_exits_one(processes):
    process = Process(target=lambda: 1 / 0)
    processes.append(process)
    process.start()
    assert process.join(5) == 1


def test_subclass_run_is_the_default_target(processes):
    class Worker(Process):
        def run(self):
            sys.exit(3)
    process = Worker()
    processes.append(process)
    process.start()
    assert process.join(5) == 3


def test_start_returns_pid_and_sets_it(processes):
    process = Process(target=lambda: None)
    processes.append(process)
    pid = process.start()
    assert pid == process.pid and pid != os.getpid()
    process.join(5)


def test_join_with_timeout_raises_timeout_while_running(processes):
    process = Process(target=sleep_forever)
    processes.append(process)
    process.start()
    with pytest.raises(Timeout):
        process.join(0.1)


def test_terminate_ends_process_with_minus_sigterm(processes):
    process = Process(target=sleep_forever)
    processes.append(process)
    process.start(synchronize=True)
    process.terminate()
    assert process.join(5) == -signal.SIGTERM


def test_is_alive_tracks_the_child(processes):
    process = Process(target=time.sleep, args=(0.2,))
    processes.append(process)
    process.start()
    assert process.is_alive()
    assert wait_until(lambda: not process.is_alive())
    assert process.join(1) == 0


def test_synchronize_reports_initialize_failure_in_parent(processes):
    class Broken(Process):
        def initialize(self):
            raise RuntimeError('cannot initialize')
    process = Broken(target=lambda: None)
    processes.append(process)
    with pytest.raises(StartError) as caught:
        process.start(synchronize=True)
    assert 'cannot initialize' in str(caught.value) and caught.value.format_trace()


def test_synchronize_reports_redirect_failure_in_parent(processes):
    class Broken(Process):
        def redirect(self):
            open('/nonexistent/dir/log', 'w')
    process = Broken(target=lambda: None)
    processes.append(process)
    with pytest.raises(StartError):
        process.start(synchronize=True)


def test_synchronize_waits_for_initialize(tmp_path, processes):
    marker = tmp_path / 'initialized'

    class Slow(Process):
        def initialize(self):
            super().initialize()
            time.sleep(0.3)
            marker.write_text('done')
    process = Slow(target=sleep_forever)
    processes.append(process)
    process.start(synchronize=True)
    assert marker.exists(), 'start() must return only after initialize() finished'


def test_daemon_pid_is_the_daemons_own_and_reparented(processes):
    process = Process(target=sleep_forever, proc_name='ave-test-daemon')
    processes.append(process)
    pid = process.start(daemonize=True, synchronize=True)
    daemon = psutil.Process(pid)
    assert daemon.ppid() != os.getpid(), 'a daemon must not be our child'
    assert os.getsid(pid) == pid, 'a daemon leads its own session'
    process.terminate()
    assert wait_until(lambda: not process.is_alive())


def test_join_on_daemon_waits_and_returns_none(processes):
    process = Process(target=time.sleep, args=(0.2,))
    processes.append(process)
    process.start(daemonize=True, synchronize=True)
    assert process.join(5) is None


def test_close_fds_closes_inherited_descriptors(processes):
    read_end, write_end = os.pipe()
    process = Process(target=lambda: os.fstat(write_end))
    processes.append(process)
    process.start()
    os.close(write_end)
    try:
        assert process.join(5) == 1, 'the inherited pipe must be closed in the child'
    finally:
        os.close(read_end)


def test_close_fds_keeps_excluded_descriptors(processes):
    read_end, write_end = os.pipe()

    class Keeper(Process):
        def close_fds(self, exclude):
            super().close_fds(exclude + [write_end])
    process = Keeper(target=lambda: os.write(write_end, b'kept') and None)
    processes.append(process)
    process.start()
    os.close(write_end)
    try:
        assert process.join(5) == 0
        assert os.read(read_end, 10) == b'kept'
    finally:
        os.close(read_end)


def test_redirect_runs_after_close_fds(tmp_path, processes):
    log_path = tmp_path / 'stderr.log'

    class Logged(Process):
        def redirect(self):
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.dup2(fd, 2)
            os.close(fd)
    process = Logged(target=lambda: os.write(2, b'to the log'), logging=True)
    processes.append(process)
    process.start(synchronize=True)
    process.join(5)
    assert log_path.read_bytes() == b'to the log'


def test_proc_name_is_set_with_prctl(processes):
    process = Process(target=sleep_forever, proc_name='ave-test-name')
    processes.append(process)
    pid = process.start(synchronize=True)
    assert psutil.Process(pid).name() == 'ave-test-name'


def test_log_writes_time_stamped_line_to_stderr(tmp_path, processes):
    log_path = tmp_path / 'stderr.log'

    class Logged(Process):
        def redirect(self):
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.dup2(fd, 2)
            os.close(fd)

        def run(self):
            self.log('hello from the child')
    process = Logged(logging=True, proc_name='ave-logger')
    processes.append(process)
    process.start(synchronize=True)
    process.join(5)
    text = log_path.read_text()
    assert 'hello from the child' in text and 'ave-logger' in text and text[:4].isdigit()


def test_death_signal_kills_child_when_parent_dies(tmp_path, processes):
    pid_file = tmp_path / 'grandchild'

    class Orphan(Process):
        def perform_prctl(self, death_signal=0):
            super().perform_prctl(signal.SIGKILL)

    def parent():
        child = Orphan(target=sleep_forever)
        pid_file.write_text(str(child.start(synchronize=True)))
        sleep_forever()
    middle = Process(target=parent)
    processes.append(middle)
    middle.start()
    assert wait_until(lambda: pid_file.exists() and pid_file.read_text())
    grandchild = int(pid_file.read_text())
    middle.terminate()
    middle.join(5)
    assert wait_until(lambda: not psutil.pid_exists(grandchild)
                      or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE)


def test_sigusr1_writes_hickup_and_process_lives_on(home, tmp_path, processes):
    running = tmp_path / 'running'

    def sleep_forever_once_marked():
        running.write_text('yes')
        sleep_forever()
    process = Process(target=sleep_forever_once_marked, proc_name='ave-hickup')
    process.home = home
    processes.append(process)
    pid = process.start(synchronize=True)
    assert wait_until(running.exists), 'the target never started'
    os.kill(pid, signal.SIGUSR1)
    assert wait_until(lambda: len(hickup_files(home)) == 1)
    name = hickup_files(home)[0]
    assert name.endswith(f'-ave-hickup-{pid}')
    assert 'sleep_forever' in open(os.path.join(home, '.ave', 'hickup', name)).read()
    assert process.is_alive()


def test_sigusr1_is_forwarded_to_ave_children(home, processes):
    def parent():
        child = Process(target=sleep_forever, proc_name='ave-hickup-kid')
        child.home = home
        child.start(synchronize=True)
        sleep_forever()
    process = Process(target=parent, proc_name='ave-hickup-top')
    process.home = home
    processes.append(process)
    process.start(synchronize=True)
    assert wait_until(lambda: any(p.name() == 'ave-hickup-kid'
                                  for p in psutil.Process(process.pid).children()))
    os.kill(process.pid, signal.SIGUSR1)
    assert wait_until(lambda: len(hickup_files(home)) == 2)
    for child in psutil.Process(process.pid).children(recursive=True):
        child.kill()


def test_child_never_returns_into_parent_code(tmp_path, processes):
    marker = tmp_path / 'markers'
    process = Process(target=lambda: 1 / 0)
    processes.append(process)
    process.start()
    process.join(5)
    with open(marker, 'a') as out:
        out.write(f'{os.getpid()}\n')
    assert marker.read_text().splitlines() == [str(os.getpid())]


def test_sigterm_right_after_start_reaches_the_childs_own_handler(tmp_path, processes):
    marker = tmp_path / 'handled'

    class Careful(Process):
        def handle_SIGTERM(self, signum, frame):
            marker.write_text('mine')
            os._exit(0)

        def initialize(self):
            time.sleep(0.2)  # a window in which the parent's handler would be in place
            super().initialize()
    process = Careful(target=sleep_forever)
    processes.append(process)
    process.start()
    process.terminate()
    assert process.join(5) == 0 and marker.read_text() == 'mine'


def test_child_forked_during_initialize_can_still_be_terminated(tmp_path, processes):
    pid_file = tmp_path / 'grandchild'

    class Starter(Process):
        def initialize(self):
            super().initialize()
            child = Process(target=sleep_forever)
            pid_file.write_text(str(child.start(synchronize=True)))
    starter = Starter(target=sleep_forever)
    processes.append(starter)
    starter.start(synchronize=True)
    grandchild = int(pid_file.read_text())
    os.kill(grandchild, signal.SIGTERM)
    assert wait_until(lambda: not psutil.pid_exists(grandchild)
                      or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE), \
        'a child started inside initialize() must not inherit blocked SIGTERM'


def test_child_of_a_process_with_a_wakeup_fd_does_not_inherit_it(processes):
    import socket as socketlib
    sender, receiver = socketlib.socketpair()
    sender.setblocking(False)
    previous = signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
    try:
        process = Process(target=lambda: sys.exit(signal.set_wakeup_fd(-1) + 2))
        processes.append(process)
        process.start()
        assert process.join(5) == 1, 'the child must start without a signal wake-up fd'
    finally:
        signal.set_wakeup_fd(previous)
        sender.close()
        receiver.close()
