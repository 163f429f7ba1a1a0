"""Bad input never kills a Control: what a broken, hostile or silent client gets.

Every case is followed by a second, well-behaved client that must still be served, so
a test fails if the bad input cost anyone else their service. Malformed requests get
an exception reply and leave their connection usable; broken or oversize frames close
that one connection; silence costs nothing but a dropped handshake.
"""
import hashlib
import hmac
import json
import resource
import socket
import struct
import time

import psutil
import pytest

from ave.network import framing

pytestmark = pytest.mark.timeout(20)

STILL_SERVING = 'still serving'
SHORT_HANDSHAKE = 0.5


def established(raw, control, key=None):
    """A raw client that has finished its handshake."""
    client = raw(control)
    client.handshake(key)
    return client


@pytest.fixture
def short_handshake(monkeypatch):
    """Make unfinished handshakes expire after 0.5 s in Controls started from now on.

    The forked child inherits the module's state, so this must precede the start.
    """
    monkeypatch.setattr('ave.network.control.HANDSHAKE_TIMEOUT', SHORT_HANDSHAKE)
    return SHORT_HANDSHAKE


@pytest.fixture
def fd_headroom():
    """Raise the soft descriptor limit (inherited by forked Controls) for many clients."""
    wanted = 2048
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f'the hard descriptor limit {hard} is below {wanted}')
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- frames the server will not read ----------------------------------------------------

@pytest.mark.timeout(10)
def test_oversize_frame_announcement_drops_that_connection(start_control, raw,
                                                           second_client):
    control = start_control()
    client = established(raw, control)
    client.send(struct.pack('>I', 3 * 2 ** 30))
    assert client.closed_by_server(5), 'a 3 GiB frame announcement did not drop the client'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


def memory_of(pid):
    """Resident and peak resident size (VmHWM catches what was allocated and freed)."""
    with open(f'/proc/{pid}/status') as status:
        fields = dict(line.split(':', 1) for line in status)
    peak = int(fields['VmHWM'].split()[0]) * 1024
    return psutil.Process(pid).memory_info().rss, peak


@pytest.mark.timeout(10)
def test_oversize_frame_announcement_allocates_nothing(start_control, raw, second_client):
    control = start_control()
    client = established(raw, control)
    rss_before, peak_before = memory_of(control.pid)
    client.send(struct.pack('>I', 3 * 2 ** 30))
    client.closed_by_server(5)
    rss_after, peak_after = memory_of(control.pid)
    growth = max(rss_after - rss_before, peak_after - peak_before)
    assert growth < 4 * 2 ** 20, f'the server grew by {growth / 2 ** 20:.1f} MiB'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


@pytest.mark.timeout(10)
def test_oversize_frame_instead_of_digest_drops_that_connection(start_control, raw,
                                                                 second_client):
    control = start_control()
    client = raw(control)
    client.read_challenge()
    client.send(struct.pack('>I', 3 * 2 ** 30))
    assert client.closed_by_server(5), 'an oversize digest frame did not drop the client'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


@pytest.mark.timeout(10)
def test_http_request_instead_of_frames_drops_that_connection(start_control, raw,
                                                              second_client):
    control = start_control()
    client = established(raw, control)
    client.send(b'GET / HTTP/1.1\r\nHost: localhost\r\n\r\n')  # 'GET ' reads as ~1.1 GB
    assert client.closed_by_server(5), 'an HTTP request was not dropped'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


# -- frames that are not requests -------------------------------------------------------

UNREADABLE = {
    'zero-length': b'',
    'invalid-json': b'{"method": "echo", ',
    'invalid-utf8': b'{"method": "\xff\xfe"}',
    'not-json-at-all': b'\x00\x01\x02',
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize('payload', UNREADABLE.values(), ids=UNREADABLE.keys())
def test_unreadable_request_gets_an_exception_reply(start_control, raw, second_client,
                                                    payload):
    control = start_control()
    client = established(raw, control)
    client.send_frame(payload)
    reply = client.read_json()
    assert 'exception' in reply, f'{payload!r} got {reply!r}, not an exception reply'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


@pytest.mark.timeout(10)
@pytest.mark.parametrize('payload', UNREADABLE.values(), ids=UNREADABLE.keys())
def test_connection_stays_usable_after_an_unreadable_request(start_control, raw,
                                                             second_client, payload):
    control = start_control()
    client = established(raw, control)
    client.send_frame(payload)
    client.read_json()
    assert client.call('echo', 'next') == {'result': 'next'}, \
        f'the connection was not usable after {payload!r}'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


@pytest.mark.timeout(10)
def test_deeply_nested_request_gets_an_exception_reply(start_control, raw, second_client):
    control = start_control()
    client = established(raw, control)
    client.send_frame(b'[' * 100000)
    reply = client.read_json()
    assert 'exception' in reply, f'a deeply nested request got {reply!r}'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


WRONG_SHAPES = {
    'a-list': ([], 'JSON object'),
    'a-string': ('echo', 'JSON object'),
    'null': (None, 'JSON object'),
    'method-missing': ({'params': {'vargs': [1]}}, '"method"'),
    'method-not-a-string': ({'method': 5}, '"method"'),
    'method-empty': ({'method': ''}, '"method"'),
    'params-not-an-object': ({'method': 'echo', 'params': [1]}, '"params"'),
    'vargs-not-a-list': ({'method': 'echo', 'params': {'vargs': {'value': 1}}},
                         '"params.vargs"'),
    'kwargs-not-an-object': ({'method': 'echo', 'params': {'vargs': [], 'kwargs': [1]}},
                             '"params.kwargs"'),
    'async-not-a-bool': ({'method': 'echo', 'params': {'vargs': [1]}, 'async': 'yes'},
                         '"async"'),
    'resource-not-an-object': ({'method': 'echo', 'params': {'vargs': [1]},
                                'resource': 'handset'}, '"resource"'),
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize('request_, defect', WRONG_SHAPES.values(), ids=WRONG_SHAPES.keys())
def test_request_of_wrong_shape_gets_an_exception_naming_the_defect(
        start_control, raw, second_client, request_, defect):
    control = start_control()
    client = established(raw, control)
    client.send_json(request_)
    message = client.read_json().get('exception', {}).get('message', '')
    assert defect in message, f'{request_!r} was answered {message!r}, not naming {defect}'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


@pytest.mark.timeout(10)
def test_malformed_async_request_gets_no_reply(start_control, raw, second_client):
    control = start_control()
    client = established(raw, control)
    client.send_json({'method': 'echo', 'params': [1], 'async': True})
    assert client.call('echo', 'mine') == {'result': 'mine'}, \
        'a malformed async request was answered'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


# -- names that are not RPCs, and calls that do not fit ---------------------------------

NOT_RPCS = ['no_such_method', 'undecorated', '_private', '__init__', '__class__',
            'shutdown', 'stop_listening', 'rpc_function', 'start', 'join_later', 'rpc']


@pytest.mark.timeout(10)
@pytest.mark.parametrize('method', NOT_RPCS)
def test_name_that_is_not_an_rpc_gets_an_exception_reply(start_control, raw, second_client,
                                                         method):
    control = start_control()
    client = established(raw, control)
    reply = client.call(method)
    assert method in reply.get('exception', {}).get('message', ''), \
        f'calling {method} was answered {reply!r}'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


@pytest.mark.timeout(10)
def test_wrong_arguments_get_a_type_error_reply(start_control, raw, second_client):
    control = start_control()
    client = established(raw, control)
    reply = client.call('echo', 1, 2, colour='red')
    assert reply.get('exception', {}).get('type') == 'TypeError', \
        f'a call with wrong arguments was answered {reply!r}'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


@pytest.mark.timeout(10)
def test_resource_on_a_control_without_resources_gets_an_exception_reply(
        start_control, raw, second_client):
    control = start_control()
    client = established(raw, control)
    client.send_json({'method': 'echo', 'resource': {'type': 'handset'},
                      'params': {'vargs': [1], 'kwargs': {}}, 'async': False})
    reply = client.read_json()
    assert 'exception' in reply, f'a request for a resource was answered {reply!r}'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


@pytest.mark.timeout(10)
def test_pipelined_requests_are_answered_in_order(start_control, raw, second_client):
    control = start_control()
    client = established(raw, control)
    client.send(b''.join(framing.encode(json.dumps(client.request_of('echo', n)))
                         for n in range(50)))
    replies = [client.read_json()['result'] for _ in range(50)]
    assert replies == list(range(50)), f'pipelined replies came back as {replies!r}'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


# -- clients that stop half way ---------------------------------------------------------

def half_a_request(client):
    payload = json.dumps(client.request_of('echo', 'completed')).encode()
    frame = framing.encode(payload)
    return frame[:len(frame) // 2], frame[len(frame) // 2:]


@pytest.mark.timeout(10)
def test_half_a_frame_does_not_stop_others_being_served(start_control, raw, second_client):
    control = start_control()
    client = established(raw, control)
    first, _ = half_a_request(client)
    client.send(first)
    assert second_client(control) == STILL_SERVING, \
        'a client stuck half way through a frame held up another client'


@pytest.mark.timeout(10)
def test_authenticated_client_mid_frame_is_not_dropped_by_the_handshake_timer(
        short_handshake, start_control, raw, second_client):
    control = start_control()
    client = established(raw, control)
    first, rest = half_a_request(client)
    client.send(first)
    time.sleep(3 * short_handshake)
    client.send(rest)
    assert client.read_json() == {'result': 'completed'}, \
        'a frame completed after the handshake timeout was not served'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


@pytest.mark.timeout(10)
def test_client_that_never_answers_the_challenge_is_dropped(short_handshake, start_control,
                                                            raw, second_client):
    control = start_control()
    client = raw(control)
    client.read_challenge()
    began = time.monotonic()
    closed = client.closed_by_server(5)
    waited = time.monotonic() - began
    assert (closed, waited > 0.8 * short_handshake) == (True, True), \
        f'closed={closed} after {waited:.2f} s (handshake timeout {short_handshake} s)'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


@pytest.mark.timeout(10)
def test_client_with_half_a_digest_is_dropped(short_handshake, start_control, raw,
                                              second_client):
    control = start_control()
    client = raw(control)
    nonce = client.read_challenge()
    client.send(framing.encode(client.digest(None, nonce))[:10])
    assert client.closed_by_server(5), 'a client stuck half way through its digest stayed'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


@pytest.mark.timeout(10)
@pytest.mark.parametrize('digest', [b'', b'short', b'x' * 33, b'{"method": "echo"}'],
                         ids=['empty', 'short', 'one-too-long', 'a-request'])
def test_digest_of_wrong_length_is_answered_authenticated_false(
        start_control, raw, second_client, digest):
    control = start_control()
    client = raw(control)
    client.read_challenge()
    client.send_frame(digest)
    assert client.read_json() == {'authenticated': False}, 'a wrong digest was not refused'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


@pytest.mark.timeout(10)
def test_frame_larger_than_a_digest_before_the_handshake_disconnects_that_client(
        start_control, raw, second_client):
    control = start_control()
    client = raw(control)
    client.read_challenge()
    client.send(framing.HEADER.pack(4096))
    assert client.closed_by_server(5), 'a 4 KiB handshake frame was accepted'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


@pytest.mark.timeout(10)
def test_client_with_a_wrong_length_digest_stays_connected(start_control, raw,
                                                          second_client):
    control = start_control()
    client = raw(control)
    client.read_challenge()
    client.send_frame(b'short')
    client.read_json()
    assert client.call('echo', 'unauthenticated') == {'result': 'unauthenticated'}, \
        'a client with a wrong-length digest was not served a plain RPC'
    assert second_client(control) == STILL_SERVING, 'the Control stopped serving others'


@pytest.mark.timeout(10)
@pytest.mark.parametrize('abortive', [False, True], ids=['close', 'reset'])
def test_client_leaving_mid_request_does_not_affect_others(start_control, raw,
                                                           second_client, abortive):
    control = start_control()
    client = established(raw, control)
    first, _ = half_a_request(client)
    client.send(first)
    if abortive:  # the kernel answers with RST instead of FIN
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    client.close()
    assert second_client(control) == STILL_SERVING, \
        'a client that left half way through a request disturbed another client'


@pytest.mark.timeout(10)
def test_client_leaving_before_its_reply_does_not_affect_others(start_control, raw,
                                                                second_client):
    control = start_control()
    client = established(raw, control)
    client.request('sleep', 0.3, 'nobody reads this')
    client.close()
    assert second_client(control) == STILL_SERVING, \
        'a client that left before its reply disturbed another client'


@pytest.mark.timeout(15)
def test_slow_reader_does_not_hold_up_others(start_control, raw, second_client):
    control = start_control()
    client = established(raw, control)
    client.request('text_of', 8 * 2 ** 20)  # far more than the socket buffers hold
    began = time.monotonic()
    result = second_client(control)
    elapsed = time.monotonic() - began
    assert (result, elapsed < 1.0) == (STILL_SERVING, True), \
        f'behind a client not reading 8 MiB, a call took {elapsed:.2f} s: {result!r}'


@pytest.mark.timeout(15)
def test_slow_reader_gets_its_whole_reply_in_the_end(start_control, raw, second_client):
    control = start_control()
    client = established(raw, control)
    client.request('text_of', 8 * 2 ** 20)
    second_client(control)
    time.sleep(0.2)
    reply = client.read_json(timeout=10)
    assert len(reply.get('result', '')) == 8 * 2 ** 20, \
        'a slow reader lost part of its reply'


# -- crowds ---------------------------------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize('handshake', [False, True], ids=['silent', 'idle-after-handshake'])
def test_500_quiet_clients_do_not_delay_a_normal_one(fd_headroom, start_control, raw,
                                                     remote, handshake):
    control = start_control()
    quiet = [raw(control) for _ in range(500)]
    if handshake:
        for client in quiet:
            client.handshake()
    began = time.monotonic()
    result = remote(control, timeout=5, optimist=False).echo(STILL_SERVING)
    elapsed = time.monotonic() - began
    assert (result, elapsed < 1.0) == (STILL_SERVING, True), \
        f'with 500 quiet clients a call took {elapsed:.2f} s and returned {result!r}'


@pytest.mark.timeout(60)
def test_client_that_never_reads_replies_cannot_grow_server_memory(start_control, second_client):
    """Requests pile up in the kernel, not in the service, while replies go unread."""
    control = start_control()
    server = psutil.Process(control.pid)
    sock = socket.create_connection(('127.0.0.1', control.port), timeout=5)
    decoder = framing.FrameDecoder()
    while (challenge := decoder.next_frame()) is None:
        decoder.feed(sock.recv(4096))
    nonce = challenge[len(b'#CHALLENGE#'):]
    sock.sendall(framing.encode(hmac.new(b'', nonce, hashlib.sha256).digest()))
    request = framing.encode(json.dumps({'method': 'echo', 'params': {
        'vargs': ['x' * 60000], 'kwargs': {}}}))
    before = server.memory_info().rss
    sock.setblocking(False)
    unsent = memoryview(request * 400)
    deadline = time.monotonic() + 10
    stalled_since = None
    while unsent and time.monotonic() < deadline:
        try:
            unsent = unsent[sock.send(unsent):]
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 1.0:
                break  # the service stopped reading: backpressure reached us
            time.sleep(0.02)
    assert unsent, 'the service kept reading 24 MB of requests nobody collected'
    grown = server.memory_info().rss - before
    sock.close()
    assert grown < 64 * 2 ** 20, f'server grew by {grown} bytes for an unread client'
    second_client(control)
