"""The etcd client against servers that are broken or hostile: every call ends within
its timeout with one clear error, and memory stays bounded by the client's caps."""
import socket
import threading
import time
import tracemalloc

import pytest

from ave.lab.etcd import (BadResponse, Etcd, EtcdUnavailable, OutcomeUnknown)

TIMEOUT = 1.0
SLACK = 1.5
CAP = 1024 * 1024           # max_response given to the client under attack
SERVER_LIFETIME = 10.0      # every fake connection ends by then, whatever the client does
CHUNK = b'a' * 65536


class FakeServer:
    """Listens on 127.0.0.1 and hands every connection to ``behaviour(sock)`` in a
    thread; closing it closes every connection and joins every thread."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.url = f'http://127.0.0.1:{self.listener.getsockname()[1]}'
        self.connections = []
        self.threads = []
        self.stopping = False
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self):
        self.listener.settimeout(0.05)  # a closed listener does not wake accept()
        while not self.stopping:
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(SERVER_LIFETIME)
            self.connections.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, sock):
        try:
            read_request(sock)
            self.behaviour(sock)
        except OSError:
            pass  # the client went away: that is what it should do
        finally:
            sock.close()

    def close(self):
        self.stopping = True
        self.acceptor.join(SERVER_LIFETIME)
        self.listener.close()
        for sock in self.connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self.threads:
            thread.join(SERVER_LIFETIME)


def read_request(sock):
    data = b''
    while b'\r\n\r\n' not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError('client left')
        data += chunk
    head, _, body = data.partition(b'\r\n\r\n')
    length = int(head.lower().split(b'content-length:')[1].split(b'\r\n')[0])
    while len(body) < length:
        body += sock.recv(65536)


def stream_for_a_while(sock, data, pause=0.0):
    """Send ``data`` again and again until the client leaves or the lifetime ends."""
    ends = time.monotonic() + SERVER_LIFETIME
    while time.monotonic() < ends:
        sock.sendall(data)
        if pause:
            time.sleep(pause)


def oversize_length(sock):
    sock.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n')
    stream_for_a_while(sock, CHUNK)


def endless_chunks(sock):
    sock.sendall(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n')
    stream_for_a_while(sock, b'10000\r\n' + CHUNK + b'\r\n')


def truncated_chunk(sock):
    sock.sendall(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n{"kvs":')


def not_json(sock):
    sock.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world')


def wrong_shape(sock):
    body = b'{"header":{"revision":"1"},"kvs":[{"key":7}]}'
    sock.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n' % len(body) + body)


def deep_json(sock):
    body = b'[' * 100_000
    sock.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n' % len(body) + body)


def binary_garbage(sock):
    sock.sendall(bytes(range(256)) * 64)


def html_error_page(sock):
    body = b'<html>502 Bad Gateway</html>'
    sock.sendall(b'HTTP/1.1 502 Bad Gateway\r\nContent-Length: %d\r\n\r\n' % len(body) + body)


def slow_loris(sock):
    sock.sendall(b'HTTP/1.1 200 OK\r\n')
    stream_for_a_while(sock, b'X', pause=0.05)


def silent(sock):
    """Never answer; return when the client leaves."""
    sock.settimeout(0.1)
    ends = time.monotonic() + SERVER_LIFETIME
    while time.monotonic() < ends:
        try:
            if not sock.recv(65536):
                return
        except TimeoutError:
            pass


def header_flood(sock):
    sock.sendall(b'HTTP/1.1 200 OK\r\n')
    stream_for_a_while(sock, b'X-Flood: ' + b'y' * 100 + b'\r\n')


def long_header(sock):
    sock.sendall(b'HTTP/1.1 200 OK\r\nX-Long: ')
    stream_for_a_while(sock, b'y' * 4096)


CREATED = b'{"result":{"header":{"revision":"5"},"created":true}}\n'


def watch_then(rest):
    def behaviour(sock):
        sock.sendall(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n'
                     + b'%x\r\n' % len(CREATED) + CREATED + b'\r\n')
        rest(sock)
    return behaviour


def endless_line(sock):
    stream_for_a_while(sock, b'10000\r\n' + CHUNK + b'\r\n')


def garbage_line(sock):
    line = b'this is not json\n'
    sock.sendall(b'%x\r\n' % len(line) + line + b'\r\n')
    silent(sock)


@pytest.fixture
def serve():
    servers = []

    def start(behaviour):
        server = FakeServer(behaviour)
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.close()


def timed(call):
    """(exception raised by ``call``, seconds taken, peak bytes allocated meanwhile)."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        call()
    except Exception as error:   # the test inspects whatever it was
        raised = error
    else:
        raised = None
    took = time.monotonic() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return raised, took, peak


@pytest.mark.parametrize('behaviour, error, text', [
    (oversize_length, BadResponse, 'exceeds 1048576'),
    (endless_chunks, BadResponse, 'exceeds 1048576'),
    (not_json, BadResponse, 'not JSON'),
    (wrong_shape, BadResponse, "field 'key'"),
    (deep_json, BadResponse, 'not JSON'),
    (binary_garbage, BadResponse, 'status line'),
    (html_error_page, BadResponse, 'HTTP 502'),
    (header_flood, BadResponse, 'header lines'),
    (long_header, BadResponse, 'head exceeds'),
    (truncated_chunk, EtcdUnavailable, 'connection ended inside'),
    (slow_loris, EtcdUnavailable, 'no answer in time'),
    (silent, EtcdUnavailable, 'no answer in time'),
])
def test_broken_server_gives_a_clear_error_in_bounded_time_and_memory(
        serve, behaviour, error, text):
    server = serve(behaviour)
    client = Etcd([server.url], timeout=TIMEOUT, max_response=CAP)
    raised, took, peak = timed(lambda: client.get('lab/a'))
    client.close()
    assert isinstance(raised, error), f'expected {error.__name__}, got {raised!r}'
    message = str(raised)
    assert text in message and server.url in message and 'get' in message, message
    assert '\n' not in message, 'one line'
    assert took < TIMEOUT + SLACK, f'took {took:.1f} s'
    assert peak < 4 * CAP, f'peak allocation {peak} bytes for a {CAP}-byte cap'


@pytest.mark.parametrize('behaviour', [not_json, truncated_chunk, silent, binary_garbage])
def test_write_to_a_broken_server_is_reported_as_of_unknown_outcome(serve, behaviour):
    server = serve(behaviour)
    client = Etcd([server.url], timeout=TIMEOUT, max_response=CAP)
    raised, took, _ = timed(lambda: client.put('lab/a', 'x'))
    client.close()
    assert isinstance(raised, OutcomeUnknown), repr(raised)
    assert 'may or may not have been applied' in str(raised)
    assert took < TIMEOUT + SLACK


NO_LEADER = b'{"error":"etcdserver: no leader","message":"etcdserver: no leader","code":14}'


def no_leader(sock):
    """A member cut off from its leader: a moment's thought, then a clean refusal."""
    time.sleep(0.05)
    sock.sendall(b'HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n'
                 b'Content-Length: %d\r\n\r\n' % len(NO_LEADER) + NO_LEADER)


# Deadlines that fall while the try after the 2nd, 3rd, ... pause awaits its answer
# (tries start near 0.075, 0.175, 0.325, 0.575, 1.025 s).
@pytest.mark.parametrize('timeout', [0.2, 0.35, 0.6, 1.05, 1.5])
def test_refused_until_the_deadline_still_says_why_and_leaves_no_doubt(serve, timeout):
    """The retry loop never starts a try it has no time to finish: that try could
    only time out, and turn a refusal into "no answer" (a write into "outcome
    unknown"), whenever the deadline fell in a pause."""
    server = serve(no_leader)
    with Etcd([server.url], timeout=timeout) as client:
        for call in (lambda: client.get('lab/a'), lambda: client.put('lab/a', 'x')):
            raised, took, _ = timed(call)
            assert type(raised) is EtcdUnavailable, repr(raised)
            assert 'no leader' in str(raised), str(raised)
            assert took < timeout + SLACK


def test_reads_pass_over_a_broken_endpoint_to_a_working_one(serve, etcd_node):
    server = serve(binary_garbage)
    with Etcd([etcd_node.endpoint]) as direct:
        direct.put('lab/a', '1')
    with Etcd([server.url, etcd_node.endpoint], timeout=TIMEOUT) as client:
        assert client.get('lab/a').value == b'1'


def test_watch_stream_with_an_endless_line_fails_at_the_cap(serve):
    server = serve(watch_then(endless_line))
    client = Etcd([server.url], timeout=TIMEOUT, max_response=CAP)
    watch = client.watch('lab/')
    raised, took, peak = timed(lambda: watch.read(5.0))
    watch.close()
    assert isinstance(raised, BadResponse) and 'exceeds 1048576' in str(raised), repr(raised)
    assert server.url in str(raised)
    assert peak < 4 * CAP, f'peak allocation {peak} bytes for a {CAP}-byte cap'


def test_watch_stream_with_a_garbage_line_fails_clearly_and_can_be_read_again(serve):
    server = serve(watch_then(garbage_line))
    client = Etcd([server.url], timeout=TIMEOUT, max_response=CAP)
    watch = client.watch('lab/')
    raised, took, _ = timed(lambda: watch.read(5.0))
    assert isinstance(raised, BadResponse) and 'not JSON' in str(raised), repr(raised)
    assert took < TIMEOUT + SLACK
    raised, _, _ = timed(lambda: watch.read(0.5))
    assert isinstance(raised, BadResponse), 'a new stream from the same server: same error'
    watch.close()


def test_watch_that_is_never_confirmed_fails_within_the_timeout(serve):
    server = serve(silent)
    client = Etcd([server.url], timeout=TIMEOUT)
    raised, took, _ = timed(lambda: client.watch('lab/'))
    assert isinstance(raised, EtcdUnavailable) and 'watch' in str(raised), repr(raised)
    assert took < TIMEOUT + SLACK


def trickle(sock):
    sock.sendall(b'10000\r\n')
    stream_for_a_while(sock, b'a', pause=0.02)


def test_watch_fed_a_trickle_still_returns_within_its_read_timeout(serve):
    server = serve(watch_then(trickle))
    client = Etcd([server.url], timeout=TIMEOUT, max_response=CAP)
    with client.watch('lab/', idle_check=60) as watch:
        raised, took, _ = timed(lambda: watch.read(0.5))
    assert raised is None, repr(raised)
    assert took < 0.5 + SLACK, f'a trickling server held read(0.5) for {took:.1f} s'
