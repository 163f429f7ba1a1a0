"""FdTx: descriptors keep working in the process that receives them, bad requests fail
cleanly, and nothing leaks.

Transfers between processes use real forked children; argument checks use an
in-process connected pair. Every test checks that the test process ends with the same
number of open descriptors it started with.
"""
import errno
import os
import socket
import stat
import time
import traceback

import pytest

from ave._native import ffi, lib
from ave.exceptions import Timeout
from ave.network.exceptions import ConnectionClosed
from ave.network.fdtx import MAX_FDS, MAX_MSG_LEN, FdTx

pytestmark = pytest.mark.timeout(10)


def open_fd_count() -> int:
    return len(os.listdir('/proc/self/fd'))


@pytest.fixture(autouse=True)
def no_descriptor_leak():
    """Every test must close what it opened, including descriptors it received."""
    before = open_fd_count()
    yield
    assert open_fd_count() == before, 'the test process leaked descriptors'


class Children:
    """Forked children of one test; any still running at teardown are killed."""

    def __init__(self) -> None:
        self.running: set[int] = set()

    def start(self, body) -> int:
        pid = os.fork()
        if pid == 0:
            try:
                body()
            except BaseException:  # the child must never unwind into pytest's frames
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        self.running.add(pid)
        return pid

    def wait(self, pid: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.running.discard(pid)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        raise AssertionError(f'child {pid} still running after {timeout} s')

    def kill_all(self) -> None:
        for pid in self.running:
            os.kill(pid, 9)
            os.waitpid(pid, 0)


@pytest.fixture
def children():
    owner = Children()
    try:
        yield owner
    finally:
        owner.kill_all()


class Pipes:
    """Pipes of one test; ends the test did not close itself are closed at teardown."""

    def __init__(self) -> None:
        self.open: set[int] = set()

    def new(self) -> tuple[int, int]:
        r, w = os.pipe()
        self.open.update((r, w))
        return r, w

    def close(self, fd: int) -> None:
        self.open.remove(fd)
        os.close(fd)

    def close_all(self) -> None:
        for fd in list(self.open):
            self.close(fd)


@pytest.fixture
def pipes():
    owner = Pipes()
    try:
        yield owner
    finally:
        owner.close_all()


@pytest.fixture
def pair(tmp_path):
    """A connected (server, client) pair inside the test process."""
    server, client = FdTx(), FdTx()
    try:
        path = server.listen(str(tmp_path))
        client.connect(path, 5)
        server.accept(5)
        yield server, client
    finally:
        client.close()
        server.close()


def close_all(fds):
    for fd in fds:
        os.close(fd)


# Descriptors crossing process boundaries

def test_pipe_write_end_sent_from_child_carries_data_back(tmp_path, children):
    with FdTx() as server:
        path = server.listen(str(tmp_path))

        def child():
            r, w = os.pipe()  # made after fork: the parent can only get it via FdTx
            with FdTx() as tx:
                tx.connect(path, 5)
                tx.put('write end', w)
            os.close(w)
            assert os.read(r, 100) == b'ping'

        pid = children.start(child)
        server.accept(5)
        message, fds = server.get(100, 1)
        os.write(fds[0], b'ping')
        close_all(fds)
    assert message == 'write end'
    assert children.wait(pid) == 0, 'the child did not read what the parent wrote'


def test_listening_tcp_socket_keeps_accepting_in_receiver(tmp_path, children):
    with FdTx() as server:
        path = server.listen(str(tmp_path))

        def child():
            with FdTx() as tx:
                tx.connect(path, 5)
                _, (fd,) = tx.get(100, 1)
            with socket.socket(fileno=fd) as listener:
                listener.settimeout(5)
                conn, _ = listener.accept()
                with conn:
                    conn.sendall(conn.recv(4))

        pid = children.start(child)
        server.accept(5)
        with socket.create_server(('127.0.0.1', 0)) as listener:
            port = listener.getsockname()[1]
            server.put('tcp listener', listener.fileno())
    # The test's copy is closed now: only the child can accept this connection.
    with socket.create_connection(('127.0.0.1', port), timeout=5) as conn:
        conn.sendall(b'echo')
        assert conn.recv(4) == b'echo', 'the child did not serve the passed listener'
    assert children.wait(pid) == 0


def test_several_descriptors_arrive_in_order(tmp_path, children, pipes):
    ends = [pipes.new() for _ in range(3)]
    with FdTx() as server:
        path = server.listen(str(tmp_path))

        def child():
            with FdTx() as tx:
                tx.connect(path, 5)
                message, fds = tx.get(100, 3)
            assert message == 'three pipes'
            for index, fd in enumerate(fds):
                os.write(fd, str(index).encode())

        pid = children.start(child)
        server.accept(5)
        server.put('three pipes', *(w for _, w in ends))
    for _, w in ends:
        pipes.close(w)
    assert [os.read(r, 10) for r, _ in ends] == [b'0', b'1', b'2']
    assert children.wait(pid) == 0


def test_connect_retries_until_listener_appears(tmp_path, children):
    def child():
        time.sleep(0.3)
        with FdTx() as tx:
            tx.listen(str(tmp_path), 'late.sock')
            tx.accept(5)
            tx.put('listening at last')

    pid = children.start(child)
    with FdTx() as client:
        client.connect(str(tmp_path / 'late.sock'), 5)
        assert client.get(100, 0) == ('listening at last', [])
    assert children.wait(pid) == 0


# Messages

def test_message_without_descriptors(pair):
    server, client = pair
    client.put('no descriptors')
    assert server.get(100, 0) == ('no descriptors', [])


def test_empty_message_is_not_mistaken_for_a_closed_peer(pair):
    server, client = pair
    client.put('')
    assert server.get(0, 0) == ('', [])


def test_bytes_message_is_received_as_text(pair):
    server, client = pair
    client.put('grüße'.encode())
    assert server.get(100, 0) == ('grüße', [])


def test_received_descriptors_are_close_on_exec(pair, pipes):
    server, client = pair
    _, w = pipes.new()
    client.put('w', w)
    _, (fd,) = server.get(10, 1)
    try:
        assert not os.get_inheritable(fd), 'a received descriptor would leak into exec'
    finally:
        os.close(fd)


def test_get_raises_connection_closed_when_peer_closes(pair):
    server, client = pair
    client.close()
    with pytest.raises(ConnectionClosed):
        server.get(100, 0)


def test_put_to_closed_peer_raises_epipe(pair):
    server, client = pair
    server.close()
    with pytest.raises(OSError) as info:
        client.put('anyone?')
    assert info.value.errno == errno.EPIPE


# Listening, accepting and connecting

def test_accept_times_out_within_bound(tmp_path):
    with FdTx() as server:
        server.listen(str(tmp_path))
        start = time.monotonic()
        with pytest.raises(Timeout):
            server.accept(timeout=0.3)
        elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 2, f'accept(0.3) gave up after {elapsed:.2f} s'


def test_connect_times_out_when_nobody_listens(tmp_path):
    with FdTx() as client:
        start = time.monotonic()
        with pytest.raises(Timeout):
            client.connect(str(tmp_path / 'nobody.sock'), 0.3)
        elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 2, f'connect(0.3) gave up after {elapsed:.2f} s'


def test_listen_on_existing_file_raises(tmp_path):
    existing = tmp_path / 'taken'
    existing.write_text('keep me')
    with FdTx() as server, pytest.raises(FileExistsError):
        server.listen(str(tmp_path), 'taken')
    assert existing.read_text() == 'keep me', 'listen() replaced an existing file'


def test_listen_picks_random_name_and_owner_only_mode(tmp_path):
    with FdTx() as first, FdTx() as second:
        paths = {first.listen(str(tmp_path)), second.listen(str(tmp_path))}
        modes = {stat.S_IMODE(os.stat(path).st_mode) for path in paths}
    assert len(paths) == 2 and modes == {0o600}


def test_socket_file_removed_once_peer_connected(pair, tmp_path):
    assert list(tmp_path.glob('fdtx-*')) == [], 'the socket file outlived accept()'


def test_close_removes_unaccepted_socket_file(tmp_path):
    server = FdTx()
    path = server.listen(str(tmp_path))
    server.close()
    assert not os.path.exists(path)


def test_so_path_is_accepted_and_ignored(tmp_path):
    with FdTx('/nonexistent/libfdtx.so') as server:
        assert server.listen(str(tmp_path))


# Oversize and garbage requests

def test_oversize_message_is_dropped_whole_and_next_arrives(pair, pipes):
    server, client = pair
    r, _ = pipes.new()
    before = open_fd_count()
    client.put('x' * 100, r)
    with pytest.raises(OSError) as info:
        server.get(10, 1)
    assert info.value.errno == errno.EMSGSIZE
    assert open_fd_count() == before, 'descriptors of a dropped message stayed open'
    client.put('next')
    assert server.get(10, 0) == ('next', [])


def test_more_descriptors_than_max_fds_are_all_closed(pair, pipes):
    server, client = pair
    r, w = pipes.new()
    before = open_fd_count()
    client.put('three', r, w, r)
    with pytest.raises(OSError) as info:
        server.get(10, 1)
    assert info.value.errno == errno.ENOBUFS
    assert open_fd_count() == before, 'descriptors of a refused message stayed open'
    client.put('next')
    assert server.get(10, 0) == ('next', [])


def test_text_that_is_not_utf8_raises_and_closes_descriptors(pair, pipes):
    server, client = pair
    r, _ = pipes.new()
    before = open_fd_count()
    client.put(b'\xff\xfe', r)
    with pytest.raises(UnicodeDecodeError):
        server.get(10, 1)
    assert open_fd_count() == before


@pytest.mark.parametrize('max_msg_len, max_fds, error', [
    (10, 10**6, ValueError),
    (10, MAX_FDS + 1, ValueError),
    (10, -1, ValueError),
    (-1, 0, ValueError),
    (MAX_MSG_LEN + 1, 0, ValueError),
    (10**30, 0, ValueError),
    ('10', 0, TypeError),
    (10, 1.5, TypeError),
    (10, None, TypeError),
    (True, 0, TypeError),
])
def test_get_rejects_bad_sizes_before_receiving(pair, max_msg_len, max_fds, error):
    server, client = pair
    client.put('still queued')
    with pytest.raises(error):
        server.get(max_msg_len, max_fds)
    assert server.get(100, 0) == ('still queued', []), 'a refused get consumed a message'


@pytest.mark.parametrize('fd, error', [
    ('3', TypeError),
    (3.0, TypeError),
    (None, TypeError),
    (-1, ValueError),
    (2**40, ValueError),
])
def test_put_rejects_non_descriptors(pair, fd, error):
    _, client = pair
    with pytest.raises(error):
        client.put('bad fd', fd)


def test_put_of_closed_descriptor_raises_ebadf_and_channel_survives(pair):
    server, client = pair
    closed = os.open(os.devnull, os.O_RDONLY)
    os.close(closed)
    with pytest.raises(OSError) as info:
        client.put('closed', closed)
    assert info.value.errno == errno.EBADF
    client.put('fine')
    assert server.get(10, 0) == ('fine', [])


def test_put_rejects_more_than_max_fds(pair):
    _, client = pair
    with pytest.raises(ValueError):
        client.put('too many', *([0] * (MAX_FDS + 1)))


@pytest.mark.parametrize('message', [None, 42, ['list']])
def test_put_rejects_message_that_is_not_text(pair, message):
    _, client = pair
    with pytest.raises(TypeError):
        client.put(message)


@pytest.mark.parametrize('operation', [
    lambda tx: tx.put('nobody'),
    lambda tx: tx.get(10, 0),
    lambda tx: tx.accept(0.1),
])
def test_unconnected_fdtx_raises_oserror(operation):
    with pytest.raises(OSError):
        operation(FdTx())


def test_second_socket_on_one_fdtx_is_refused(pair, tmp_path):
    server, _ = pair
    with pytest.raises(OSError) as info:
        server.listen(str(tmp_path))
    assert info.value.errno == errno.EISCONN


# The C API defends itself, whatever a caller passes

def test_native_recv_refuses_max_fds_above_scm_max_fd():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        buf, fds, count = ffi.new('char[]', 8), ffi.new('int[]', 1), ffi.new('size_t *')
        assert lib.ave_fdtx_recv(a.fileno(), buf, 8, fds, 10**6, count) == -1
        assert ffi.errno == errno.EINVAL


def test_native_send_refuses_more_than_scm_max_fd():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        fds = ffi.new('int[]', lib.AVE_FDTX_MAX_FDS + 1)
        assert lib.ave_fdtx_send(a.fileno(), b'x', 1, fds, len(fds)) == -1
        assert ffi.errno == errno.EINVAL


def test_native_recv_refuses_missing_count_pointer():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        buf = ffi.new('char[]', 8)
        assert lib.ave_fdtx_recv(a.fileno(), buf, 8, ffi.NULL, 0, ffi.NULL) == -1
        assert ffi.errno == errno.EINVAL
