"""Connection and BlockingConnection over real sockets on 127.0.0.1."""
import socket
import struct
import threading
import time

import pytest

from ave.network.connection import BlockingConnection, Connection, find_free_port
from ave.network.exceptions import (
    ConnectionAgain, ConnectionClosed, ConnectionInProgress, ConnectionRefused,
    ConnectionReset, ConnectionTimeout)

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def listener():
    server = BlockingConnection(('127.0.0.1', 0))
    server.listen()
    yield server
    server.close()


@pytest.fixture
def pair(listener):
    """A connected (client, server) pair of BlockingConnections."""
    client = BlockingConnection(listener.address)
    client.connect(timeout=5)
    server = listener.accept(timeout=5)
    yield client, server
    client.close()
    server.close()


def unused_port():
    sock, port = find_free_port(listen=False)
    sock.close()
    return port


def test_find_free_port_returns_bound_listening_socket():
    sock, port = find_free_port()
    try:
        assert sock.getsockname()[1] == port
        probe = socket.create_connection(('127.0.0.1', port), timeout=2)
        probe.close()
    finally:
        sock.close()


def test_find_free_port_stays_in_range_and_can_skip_listen():
    sock, port = find_free_port(start=50000, stop=50100, listen=False)
    try:
        assert 50000 <= port < 50100
        with pytest.raises(OSError):
            sock.accept()
    finally:
        sock.close()


def test_listen_on_port_zero_reports_real_port(listener):
    assert listener.address[1] > 0


def test_put_and_get_round_trip_in_both_directions(pair):
    client, server = pair
    client.put('request', timeout=5)
    assert server.get(timeout=5) == b'request'
    server.put(b'\x00binary', timeout=5)
    assert client.get(timeout=5) == b'\x00binary'


def test_large_frame_arrives_whole(pair):
    client, server = pair
    payload = bytes(range(256)) * 16384
    sender = threading.Thread(target=client.put, args=(payload, 10))
    sender.start()
    try:
        assert server.get(timeout=10) == payload
    finally:
        sender.join(10)


def test_blocking_get_times_out_instead_of_returning_none(pair):
    client, _ = pair
    started = time.monotonic()
    with pytest.raises(ConnectionTimeout):
        client.get(timeout=0.2)
    assert time.monotonic() - started < 2


def test_get_raises_closed_when_peer_goes(pair):
    client, server = pair
    server.close()
    with pytest.raises(ConnectionClosed):
        client.get(timeout=5)


def test_oversize_frame_closes_receiving_connection(listener):
    client = BlockingConnection(listener.address)
    client.connect(timeout=5)
    server = BlockingConnection(listener.address, listener.accept(timeout=5).socket,
                                limit=1024)
    try:
        client.write(struct.pack('>I', 3 * 2 ** 30), timeout=5)
        with pytest.raises(ConnectionClosed):
            server.get(timeout=5)
        assert server.closed
    finally:
        client.close()
        server.close()


def test_connect_refused_without_optimism():
    client = BlockingConnection(('127.0.0.1', unused_port()))
    with pytest.raises(ConnectionRefused):
        client.connect(timeout=2)


def test_optimist_connect_times_out_instead_of_refusing():
    client = BlockingConnection(('127.0.0.1', unused_port()))
    started = time.monotonic()
    with pytest.raises(ConnectionTimeout):
        client.connect(timeout=0.3, optimist=True)
    assert time.monotonic() - started < 2


def test_optimist_connect_succeeds_once_server_listens():
    port = unused_port()
    client = BlockingConnection(('127.0.0.1', port))
    server = BlockingConnection(('127.0.0.1', port))
    timer = threading.Timer(0.2, server.listen)
    timer.start()
    try:
        client.connect(timeout=5, optimist=True)
        assert server.accept(timeout=5) is not None
    finally:
        timer.cancel()
        client.close()
        server.close()


def test_accept_times_out(listener):
    with pytest.raises(ConnectionTimeout):
        listener.accept(timeout=0.1)


def test_poll_returns_none_on_timeout_and_events_when_ready(pair):
    import select
    client, server = pair
    assert client.poll(select.POLLIN, 0.05) is None
    server.put('x', timeout=5)
    assert client.poll(select.POLLIN, 5)


def test_nonblocking_accept_and_get_report_again(listener):
    server = Connection(listener.address, listener.socket)
    with pytest.raises(ConnectionAgain):
        server.accept()
    client = BlockingConnection(listener.address)
    client.connect(timeout=5)
    peer = listener.accept(timeout=5)
    nonblocking = Connection(peer.address, peer.socket)
    try:
        assert nonblocking.get() is None, 'no data yet: get() must return None'
    finally:
        client.close()
        nonblocking.close()


def test_nonblocking_connect_reports_in_progress_or_connects(listener):
    client = Connection(listener.address)
    try:
        client.connect()
    except ConnectionInProgress:
        pass
    finally:
        client.close()


def test_put_queues_what_the_kernel_refuses_and_flush_finishes(pair):
    client, server = pair
    sender = Connection(client.address, client.socket)
    chunk = b'x' * (1024 * 1024)
    with pytest.raises(ConnectionAgain):
        for _ in range(64):
            sender.put(chunk)
    assert sender.has_output
    received = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (sender.has_output or received < 64):
        sender.flush()
        try:
            while server.get(timeout=0.01) is not None:
                received += 1
        except ConnectionTimeout:
            pass
        if received and not sender.has_output:
            break
    assert not sender.has_output, 'flush() must eventually send everything queued'


def test_write_to_reset_peer_raises_closed(pair):
    client, server = pair
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    server.close()
    with pytest.raises(ConnectionClosed):
        for _ in range(100):
            client.put(b'y' * 65536, timeout=5)
            time.sleep(0.01)


def test_reset_is_a_kind_of_closed():
    assert issubclass(ConnectionReset, ConnectionClosed)


def test_close_twice_is_harmless(pair):
    client, _ = pair
    client.close()
    client.close()
    assert client.closed


def test_pending_input_keeps_partial_frame(pair):
    client, server = pair
    client.write(struct.pack('>I', 10) + b'abc', timeout=5)
    with pytest.raises(ConnectionTimeout):
        server.get(timeout=0.2)
    assert server.pending_input() == struct.pack('>I', 10) + b'abc'


def test_above_ephemeral_ports_is_past_the_kernels_outgoing_range():
    from ave.network.connection import above_ephemeral_ports
    with open('/proc/sys/net/ipv4/ip_local_port_range') as stream:
        low, high = map(int, stream.read().split())
    first = above_ephemeral_ports()
    assert first > high or (first == 49152 and high >= 65000)
