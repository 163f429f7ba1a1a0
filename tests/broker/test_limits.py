"""No peer can exhaust the broker: each test is an attack by a peer without a key,
followed by proof that a normal client is still served and memory stayed bounded."""
from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import threading
import time

import psutil
import pytest

from ave.broker import daemon
from ave.broker.exceptions import Busy
from ave.network import framing, protocol
from ave.network.remote import RemoteControl

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
RELAY = {'type': 'relay', 'uid': 'r1',
         'circuits': {'c1': {'open': ['true'], 'close': ['true'], 'default': 'open'}}}


@pytest.fixture(autouse=True)
def _descriptors():
    """Floods need more descriptors than a test process has by default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def sockets():
    """Raw sockets of the attacker; all closed afterwards."""
    opened: list[socket.socket] = []

    def connect(port: int, source: str = '127.0.0.1') -> socket.socket:
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(5)
        sock.connect(('127.0.0.1', port))
        opened.append(sock)
        return sock
    yield connect
    for sock in opened:
        sock.close()


def handshake(sock: socket.socket) -> None:
    """Answer the challenge with no key; the server then takes requests."""
    decoder = framing.FrameDecoder()
    nonce = protocol.parse_challenge(read_frame(sock, decoder))
    sock.sendall(framing.encode(protocol.digest(None, nonce)))
    read_frame(sock, decoder)


def read_frame(sock: socket.socket, decoder: framing.FrameDecoder) -> bytes:
    while (frame := decoder.next_frame()) is None:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError('closed')
        decoder.feed(data)
    return frame


def served_from(lab, source: str = '127.0.0.2') -> bool:
    """A client from another loopback address gets an answer from the broker."""
    sock = socket.create_connection(lab.address, timeout=5, source_address=(source, 0))
    with RemoteControl(lab.address, timeout=5, sock=sock) as client:
        return client.list_allocations() == []


def _first_bytes(sock: socket.socket) -> bytes:
    try:
        return sock.recv(4096, socket.MSG_DONTWAIT)
    except OSError:
        return b''


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def log_bytes(lab) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(lab.log_dir))


def test_idle_connection_flood_at_the_descriptor_limit_is_capped_and_costs_no_cpu(
        start_broker, sockets):
    lab = start_broker()
    lab.cli('--stop')
    lab.start(prefix=('prlimit', '--nofile=300:300'))
    log_before = log_bytes(lab)
    flood = [sockets(lab.port) for _ in range(400)]
    time.sleep(0.5)
    refusals = sum(b'too many connections from 127.0.0.1' in _first_bytes(sock)
                   for sock in flood)
    assert refusals > 200, f'only {refusals} of 400 flooding connections were refused'

    cpu = psutil.Process(lab.pid).cpu_percent(interval=2)
    assert cpu < 30, f'the broker spins at {cpu}% CPU with its connections full'
    assert served_from(lab), 'a client from another address was not served'
    assert log_bytes(lab) - log_before < 64 * 1024, 'the flood inflated the log'


def test_clients_beyond_the_per_address_cap_get_one_clear_line_and_others_are_served(
        start_broker, sockets):
    lab = start_broker(limits={'connections_per_address': 20})
    refusals = []
    for _ in range(25):
        try:
            handshake(sockets(lab.port))
        except Exception as refusal:
            refusals.append(str(refusal))
    # The broker's own lister may hold one of the 20 places.
    assert len(refusals) in (5, 6), f'{25 - len(refusals)} of 25 were let in, limit 20'
    assert set(refusals) == {'too many connections from 127.0.0.1 (limit 20)'}, refusals
    assert served_from(lab), 'a client from another address was not served'


def test_partial_frames_parked_by_many_peers_are_capped_in_total(start_broker, sockets):
    lab = start_broker(limits={'buffered_bytes': 8 * MiB, 'frame_bytes': MiB})
    before = rss(lab.pid)
    parked = 0
    chunk = b'x' * (900 * 1024)
    for _ in range(40):
        sock = sockets(lab.port)
        handshake(sock)
        with contextlib.suppress(OSError):
            sock.sendall(framing.HEADER.pack(MiB) + chunk)
            parked += 1
    time.sleep(1)
    growth = rss(lab.pid) - before
    assert growth < 40 * MiB, f'40 parked frames grew the broker by {growth >> 20} MiB'
    assert served_from(lab), 'the broker stopped serving others'


def test_partial_frame_before_the_handshake_disconnects_at_the_header(start_broker,
                                                                      sockets):
    lab = start_broker()
    sock = sockets(lab.port)
    sock.recv(4096)  # the challenge
    sock.sendall(framing.HEADER.pack(16 * MiB) + b'x' * 1024)
    sock.settimeout(5)
    assert sock.recv(4096) == b'', 'a 16 MiB frame was accepted before the handshake'
    assert served_from(lab)


def test_a_frame_of_empty_objects_cannot_blow_up_the_broker(start_broker, sockets):
    lab = start_broker()
    sock = sockets(lab.port)
    handshake(sock)
    before = rss(lab.pid)
    peak = before
    body = b'[' + b'{},' * (MiB // 3 - 2) + b'{}]'
    sock.sendall(framing.encode(body))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        peak = max(peak, rss(lab.pid))
        time.sleep(0.005)
    assert peak - before < 96 * MiB, f'a 1 MiB frame took the broker to +{(peak - before) >> 20} MiB'
    big = sockets(lab.port)
    handshake(big)
    big.sendall(framing.HEADER.pack(16 * MiB))
    big.settimeout(5)
    assert big.recv(1 << 20) == b'' or big.recv(1 << 20) == b'', \
        'a 16 MiB frame was accepted by the broker'
    assert served_from(lab)


def test_failing_one_way_calls_do_not_flood_the_logs(start_broker, sockets):
    lab = start_broker()
    sock = sockets(lab.port)
    handshake(sock)
    before = log_bytes(lab)
    request = protocol.encode_request('x' * 100_000, None, [], {}, True).encode()
    for _ in range(200):
        sock.sendall(framing.encode(request))
    time.sleep(1)
    assert log_bytes(lab) - before < 32 * 1024, \
        f'20 MB of failing one-way calls wrote {log_bytes(lab) - before} bytes of log'
    assert served_from(lab)


def test_sessions_per_address_are_capped_and_other_addresses_still_get_one(start_broker):
    lab = start_broker(limits={'sessions_per_address': 3})
    clients = [lab.client() for _ in range(3)]
    for client in clients:
        client.get({'type': 'workspace'})
    with pytest.raises(Busy, match='127.0.0.1 has its limit of 3 sessions'):
        lab.client().get({'type': 'workspace'})
    sock = socket.create_connection(lab.address, timeout=5, source_address=('127.0.0.2', 0))
    with RemoteControl(lab.address, timeout=5, sock=sock) as other:
        assert other.get({'type': 'workspace'})['resources'], 'another address was refused'


def test_get_failing_after_its_items_were_chosen_leaves_nothing_held(start_broker):
    lab = start_broker(equipment=[RELAY], limits={'sessions': 1})
    lab.client().get({'type': 'workspace'})
    with pytest.raises(Busy, match='limit of 1 sessions'):
        lab.client().get({'type': 'relay', 'uid': 'r1'})
    admin = lab.client(lab.admin_key)
    assert [p['uid'] for p in admin.list_available()] == ['r1'], \
        'the relay chosen for a get that failed stayed unavailable'


def test_sighup_without_a_successor_does_not_stall_the_broker(start_broker):
    lab = start_broker()
    client = lab.client()
    client.list_allocations()
    os.kill(lab.pid, signal.SIGHUP)
    started = time.monotonic()
    client.list_allocations()
    assert time.monotonic() - started < 1.0, 'a lone SIGHUP froze the broker'
    assert psutil.Process(lab.pid).is_running()


def test_stop_of_one_home_never_stops_the_broker_of_another(start_broker, broker_home):
    other = start_broker()
    home = broker_home()
    os.makedirs(os.path.dirname(home.pid_file), exist_ok=True)
    with open(home.pid_file, 'w') as stream:
        stream.write(f'{other.pid}\n')
    with open(os.path.join(os.path.dirname(home.pid_file), 'broker.lock'), 'w'):
        pass
    result = home.cli('--stop')
    assert result.returncode == 1 and psutil.Process(other.pid).is_running(), \
        f'--stop of one home stopped the broker of another: {result.stdout}{result.stderr}'


def test_proc_locks_names_the_broker_of_a_home_and_no_other(start_broker, broker_home):
    """The check used when a broker's open files are not readable (it dropped root's
    privileges, so it is not dumpable): /proc/locks names the holder of each lock."""
    serving, other = start_broker(), start_broker()
    lock = os.path.join(os.path.dirname(serving.pid_file), 'broker.lock')
    holders = daemon._flock_holders(os.stat(lock).st_ino)
    assert serving.pid in holders and other.pid not in holders


def test_broker_without_keys_says_so_in_its_log(broker_home):
    lab = broker_home()
    with open(lab.config_path('authkeys.json'), 'w') as stream:
        json.dump({'admin': None, 'share': None}, stream)
    lab.start()
    text = ''.join(open(os.path.join(lab.log_dir, name)).read()
                   for name in os.listdir(lab.log_dir) if name.endswith('.log'))
    assert 'no admin key: every client may make admin calls' in text


@pytest.fixture
def small_home(tmp_path):
    """A home on a 16 MiB tmpfs, to fill (root only). Ask for it before broker_home,
    so that the broker is stopped before the file system goes."""
    mount = tmp_path / 'small'
    mount.mkdir()
    result = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here: {result.stderr.strip()}')
    yield mount
    subprocess.run(['umount', '-l', str(mount)], capture_output=True)


def test_restart_with_a_full_home_leaves_the_running_broker_serving(small_home,
                                                                   broker_home):
    lab = broker_home(at=str(small_home / 'home')).start()
    workspace = lab.client().get({'type': 'workspace'})
    filler = os.path.join(lab.home, 'filler')
    subprocess.run(['dd', 'if=/dev/zero', f'of={filler}', 'bs=1M', 'count=64'],
                   capture_output=True)
    result = lab.cli('--restart')
    assert result.returncode == 1, f'a restart on a full disk claimed success: {result.stdout}'
    assert f'broker {lab.pid} serves on' in result.stderr, result.stderr
    assert workspace.get_path(), 'the running broker stopped serving its client'
    os.unlink(filler)
    result = lab.cli('--restart')
    assert result.returncode == 0, result.stderr
    assert workspace.get_path()


def test_a_command_printing_200_mb_keeps_its_session_small(start_broker):
    lab = start_broker()
    workspace = lab.client(timeout=60).get({'type': 'workspace'})
    workspace.get_path()
    session = next(p for p in psutil.Process(lab.pid).children()
                   if p.name().startswith('ave-broker-sess'))
    before = session.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            with contextlib.suppress(psutil.Error):
                peak[0] = max(peak[0], session.memory_info().rss)
            time.sleep(0.005)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        code, output = workspace.run(['sh', '-c', 'head -c 200000000 /dev/zero | '
                                                  'tr "\\0" x; echo THE-END'])
    finally:
        done.set()
        sampler.join(5)
    assert code == 0 and output.rstrip().endswith('THE-END')
    assert 'characters of output cut' in output[:200]
    growth = peak[0] - before
    assert growth < 160 * MiB, f'200 MB of output grew the session by {growth >> 20} MiB'
