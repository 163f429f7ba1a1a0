"""Hostile HTTP peers against the real process: it answers each with one clear status
(or a close), keeps its memory bounded and keeps serving a normal client throughout.

Every loop here is bounded in count and time, and all traffic stays on 127.0.0.1.
"""
from __future__ import annotations

import resource
import socket
import time

import psutil
import pytest

from support import wait_until
from test_http_server import HttpProcess, http_process, snapshot  # noqa: F401 (fixture)
from ave.broker.http.connections import Limits

pytestmark = pytest.mark.timeout(90)

MB = 1024 * 1024
RSS_GROWTH_LIMIT = 24 * MB
QUICK = Limits(request_timeout=2.0, write_timeout=2.0, drain_timeout=1.0)


def connect(process: HttpProcess) -> socket.socket:
    return socket.create_connection(('127.0.0.1', process.port), timeout=10)


def read_all(sock: socket.socket, timeout: float = 5.0, limit: int = 4 * MB) -> bytes:
    """Everything the server sends until it closes (or ``timeout``, or ``limit``)."""
    sock.settimeout(timeout)
    chunks = []
    size = 0
    deadline = time.monotonic() + timeout
    while size < limit and time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b''.join(chunks)


def status_of(answer: bytes) -> int:
    assert answer.startswith(b'HTTP/1.1 '), f'not an HTTP answer: {answer[:80]!r}'
    return int(answer[9:12])


def assert_one_refusal(answer: bytes, status: int) -> None:
    """One status line, one line of text, then the server closed the connection."""
    assert status_of(answer) == status, answer[:200]
    assert answer.count(b'HTTP/1.1 ') == 1, 'exactly one answer'
    head, _, body = answer.partition(b'\r\n\r\n')
    assert b'connection: close' in head.lower()
    assert body.startswith(str(status).encode()) and body.count(b'\n') == 1, body


def assert_serves_normally(process: HttpProcess) -> None:
    status, _, body = process.request('/api/equipment')
    assert status == 200 and body.startswith(b'{'), 'a normal client must still be served'


@pytest.fixture
def server(http_process):
    process = http_process(QUICK)
    process.publish(snapshot(items=50))
    assert_serves_normally(process)
    return process


# -- one bad request each ----------------------------------------------------------------

BAD_REQUESTS = {
    'http 0.9': (b'GET /\r\n', 400),
    'tls hello': (b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03' + bytes(range(256)), 400),
    'garbage': (b'\x8f\xe2 nonsense \x00\x01\x02\r\n\r\n', 400),
    'header without colon': (b'GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n', 400),
    'http 1.1 without host': (b'GET / HTTP/1.1\r\n\r\n', 400),
    'negative length': (b'GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n', 400),
    'two lengths': (b'GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n'
                    b'Content-Length: 2\r\n\r\nab', 400),
    'unknown method': (b'BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n', 405),
    'post': (b'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc', 405),
}


@pytest.mark.parametrize('name', sorted(BAD_REQUESTS))
def test_a_bad_request_gets_one_clear_status(server, name):
    request_bytes, status = BAD_REQUESTS[name]
    with connect(server) as sock:
        sock.sendall(request_bytes)
        answer = read_all(sock)
    if status == 405:
        assert status_of(answer) == 405 and answer.count(b'HTTP/1.1 ') == 1
    else:
        assert_one_refusal(answer, status)
    assert_serves_normally(server)


def test_http_0_9_is_refused_at_once_not_after_the_timeout(server):
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(b'GET /\r\n')
        answer = read_all(sock)
    assert status_of(answer) == 400 and time.monotonic() - started < 1.0


def test_an_endless_header_gets_431(server):
    rss = server.rss()
    with connect(server) as sock:
        sock.sendall(b'GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ')
        sent = 0
        try:
            while sent < 8 * MB:  # far more than the limit; the server stops us first
                sock.sendall(b'a' * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_all(sock)
    if answer:  # the reset may overtake the answer; a close is a clear refusal too
        assert_one_refusal(answer, 431)
    assert sent < 8 * MB, 'the server must stop reading an endless header'
    assert server.rss() - rss < RSS_GROWTH_LIMIT
    assert_serves_normally(server)


def test_a_100_mb_body_is_refused_with_413_before_it_is_read(server):
    rss = server.rss()
    with connect(server) as sock:
        sock.sendall(b'GET / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n' % (100 * MB))
        sock.settimeout(5)
        answer = sock.recv(65536)
        assert_one_refusal(answer, 413)
        sent = 0
        deadline = time.monotonic() + 20
        try:
            while sent < 100 * MB and time.monotonic() < deadline:
                sock.sendall(b'\0' * MB)
                sent += MB
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass
    assert sent < 100 * MB, 'the server must not read a refused body to its end'
    assert server.rss() - rss < RSS_GROWTH_LIMIT
    assert_serves_normally(server)


def test_an_endless_chunked_body_is_refused_with_413(server):
    with connect(server) as sock:
        sock.sendall(b'GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n')
        try:
            for _ in range(64):
                sock.sendall(b'400\r\n' + b'z' * 1024 + b'\r\n')
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_all(sock)
    if answer:
        assert_one_refusal(answer, 413)
    assert_serves_normally(server)


# -- slow and idle peers -----------------------------------------------------------------

def test_a_slowloris_gets_408_while_others_are_served(server):
    head = b'GET /api/queue HTTP/1.1\r\nHost: x\r\nX-Slow: ' + b'z' * 100
    with connect(server) as sock:
        sock.settimeout(0.05)
        answer = b''
        started = time.monotonic()
        for byte in head:  # a byte per second: far longer than the 2 s allowed
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            assert_serves_normally(server)
            try:
                answer = sock.recv(65536)
            except socket.timeout:
                time.sleep(1.0)
                continue
            break
        answer += read_all(sock)
        waited = time.monotonic() - started
    assert_one_refusal(answer, 408)
    assert waited < QUICK.request_timeout + 3, f'cut off after {waited:.1f} s'


def test_a_thousand_idle_connections_do_not_lock_out_a_client(server):
    rss = server.rss()
    idle = []
    try:
        for _ in range(1000):
            idle.append(connect(server))
        assert_serves_normally(server)
        assert server.rss() - rss < RSS_GROWTH_LIMIT
        assert len(server_connections(server)) <= Limits().connections + 1
    finally:
        for sock in idle:
            sock.close()
    assert_serves_normally(server)


def test_running_out_of_descriptors_evicts_the_stalest_peer(http_process):
    server = http_process()  # idle peers would hold their descriptors for 10 s
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (64, hard))
    idle = []
    try:
        for _ in range(200):
            idle.append(connect(server))
        started = time.monotonic()
        assert_serves_normally(server)
        assert time.monotonic() - started < 1.0, 'served at once, not after idle timeouts'
        assert psutil.Process(server.pid).num_fds() <= 64
    finally:
        for sock in idle:
            sock.close()


def server_connections(process: HttpProcess) -> list:
    return [c for c in psutil.Process(process.pid).net_connections('tcp')
            if c.status == psutil.CONN_ESTABLISHED]


def test_a_silent_connection_is_closed_quietly(server):
    with connect(server) as sock:
        answer = read_all(sock, timeout=QUICK.request_timeout + 3)
    assert answer == b'', 'a connection that asked nothing gets no answer, only a close'


# -- pipelining --------------------------------------------------------------------------

def test_pipelined_requests_are_answered_in_order(server):
    paths = ['/api/queue', '/nope', '/api/equipment'] * 30
    with connect(server) as sock:
        sock.sendall(b''.join(b'GET %s HTTP/1.1\r\nHost: x\r\n\r\n' % p.encode() for p in paths)
                     + b'GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        answer = read_all(sock, limit=64 * MB)
    statuses = [int(part[:3]) for part in answer.split(b'HTTP/1.1 ')[1:]]
    assert statuses == [404 if p == '/nope' else 200 for p in paths] + [200]


def test_a_pipelining_peer_that_never_reads_is_held_back_and_dropped(server):
    rss = server.rss()
    request = b'GET /api/equipment HTTP/1.1\r\nHost: x\r\n\r\n'
    with connect(server) as sock:
        sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 10
        while sent < 64 * MB and time.monotonic() < deadline:
            try:
                sent += sock.send(request * 256)
            except BlockingIOError:
                break  # the server stopped reading: backpressure
        assert sent < 64 * MB, 'the server must stop reading from a peer that does not read'
        assert_serves_normally(server)
        assert server.rss() - rss < RSS_GROWTH_LIMIT
        port = sock.getsockname()[1]
        gone = wait_until(lambda: all(c.raddr.port != port for c in server_connections(server)),
                          QUICK.write_timeout + 5, step=0.1)
        assert gone, 'a peer that does not take its answers must be dropped'

