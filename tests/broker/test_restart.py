"""ave-broker --restart: a new broker takes over everything and nobody notices."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import subprocess
import textwrap
import time

import psutil
import pytest

from support import first_line, reported_pid, wait_until
from ave.broker import Broker
from ave.broker.exceptions import Busy
from ave.network import framing

pytestmark = pytest.mark.timeout(120)

RELAY = {'type': 'relay', 'uid': 'r1',
         'circuits': {'c1': {'open': ['true'], 'close': ['true'], 'default': 'open'}}}

HOLDER = textwrap.dedent('''
    import json, os, sys, time
    from ave.broker import Broker
    port, stop = int(sys.argv[1]), sys.argv[2]
    broker = Broker(('127.0.0.1', port))
    relay, workspace = broker.get({'type': 'relay', 'uid': 'r1'}, {'type': 'workspace'})
    print('held', flush=True)
    calls = failures = 0
    errors = []
    deadline = time.monotonic() + 90
    while not os.path.exists(stop) and time.monotonic() < deadline:
        try:
            relay.set_circuit('c1', calls % 2 == 0)
            assert workspace.run('true')[0] == 0
            calls += 1
        except Exception as error:
            failures += 1
            errors.append(repr(error))
    more = broker.get({'type': 'workspace'})
    more.run('true')
    held = sorted(p['type'] for p in broker.list_allocations())
    print(json.dumps({'calls': calls, 'failures': failures, 'errors': errors[:5],
                      'held': held}), flush=True)
    sys.stdin.read()
''')

KNOCKER = textwrap.dedent('''
    import json, os, socket, sys, time
    from ave.broker import Broker
    port, stop = int(sys.argv[1]), sys.argv[2]
    opened = refused = failed = 0
    deadline = time.monotonic() + 90
    while not os.path.exists(stop) and time.monotonic() < deadline:
        try:
            client = Broker(('127.0.0.1', port), timeout=5)
            client._optimist = False
            client.list_allocations()
            opened += 1
            del client
        except ConnectionRefusedError:
            refused += 1
        except Exception as error:
            if 'refused' in str(error):
                refused += 1
            else:
                failed += 1
        time.sleep(0.005)
    print(json.dumps({'opened': opened, 'refused': refused, 'failed': failed}), flush=True)
''')


def restart(lab):
    result = lab.cli('--restart')
    assert result.returncode == 0, f'--restart failed: {result.stderr}'
    return reported_pid(result.stdout)


def test_five_restarts_under_load_lose_nothing(start_broker, jobs, tmp_path):
    lab = start_broker(equipment=[RELAY])
    stop = tmp_path / 'stop'
    holder = jobs(HOLDER, lab.port, stop)
    assert holder.stdout.readline().strip() == 'held'
    knocker = jobs(KNOCKER, lab.port, stop)
    pids = [lab.pid]
    for _ in range(5):
        time.sleep(0.3)
        pids.append(restart(lab))
        with pytest.raises(Busy):
            lab.client().get({'type': 'relay', 'uid': 'r1'})
    time.sleep(0.3)
    stop.write_text('stop')
    held = json.loads(holder.stdout.readline())
    knocks = json.loads(knocker.stdout.readline())
    assert len(set(pids)) == 6, 'every restart must start a new broker'
    assert held['failures'] == 0, f'calls failed across restarts: {held["errors"]}'
    assert held['calls'] > 0
    assert held['held'] == ['relay', 'workspace', 'workspace'], \
        'the allocation must survive and the client must allocate more afterwards'
    assert knocks['refused'] == 0 and knocks['failed'] == 0, knocks
    assert knocks['opened'] > 10
    holder.stdin.close()
    holder.wait(10)
    admin = lab.client(lab.admin_key)
    assert wait_until(lambda: [p['uid'] for p in admin.list_available()] == ['r1']), \
        'equipment must be freed when its holder leaves after the restarts'


def test_status_shows_the_new_pid_and_the_old_broker_is_gone(start_broker):
    lab = start_broker()
    old = lab.pid
    new = restart(lab)
    assert first_line(lab.cli('--status').stdout) == f'running, pid {new}'
    assert wait_until(lambda: not psutil.pid_exists(old)
                      or psutil.Process(old).status() == psutil.STATUS_ZOMBIE)
    lab.pid = new


def test_restart_with_nothing_running_starts_the_broker(broker_home):
    lab = broker_home()
    result = lab.cli('--restart')
    assert result.returncode == 0, result.stderr
    lab.pid = reported_pid(result.stdout)
    assert lab.cli('--status').returncode == 0


def test_malformed_new_config_fails_loudly_and_old_broker_serves_on(start_broker):
    lab = start_broker(equipment=[RELAY])
    client = lab.client()
    relay = client.get({'type': 'relay', 'uid': 'r1'})
    with open(lab.config_path('broker.json'), 'w') as config:
        config.write('{"port": ')
    result = lab.cli('--restart')
    assert result.returncode == 1
    assert 'broker.json' in result.stderr and 'line' in result.stderr
    assert first_line(lab.cli('--status').stdout) == f'running, pid {lab.pid}'
    assert relay.get_profile()['uid'] == 'r1', 'the old broker must keep serving'


def test_failed_takeover_leaves_old_broker_serving(start_broker):
    lab = start_broker(equipment=[RELAY])
    client = lab.client()
    relay = client.get({'type': 'relay', 'uid': 'r1'})
    lab.write_broker_json({**lab.broker_json, 'port': lab.port + 1})
    result = lab.cli('--restart')
    assert result.returncode == 1 and 'serves on' in result.stderr, result.stderr
    assert first_line(lab.cli('--status').stdout) == f'running, pid {lab.pid}'
    assert client.list_allocations()[0]['uid'] == 'r1'
    assert relay.get_profile()['uid'] == 'r1'


def test_half_a_frame_sent_before_restart_completes_after(start_broker):
    lab = start_broker()
    with socket.create_connection(lab.address, timeout=5) as sock:
        challenge = read_frame(sock)
        nonce = challenge[len(b'#CHALLENGE#'):]
        sock.sendall(framing.encode(hmac.new(b'', nonce, hashlib.sha256).digest()))
        assert json.loads(read_frame(sock)) == {'authenticated': True}
        request = framing.encode(json.dumps({'method': 'list_allocations', 'params': {}}))
        sock.sendall(request[:7])
        lab.pid = restart(lab)
        sock.sendall(request[7:])
        assert json.loads(read_frame(sock)) == {'result': []}


def test_handshake_begun_before_restart_finishes_after(start_broker):
    lab = start_broker()
    with socket.create_connection(lab.address, timeout=5) as sock:
        nonce = read_frame(sock)[len(b'#CHALLENGE#'):]
        lab.pid = restart(lab)
        sock.sendall(framing.encode(hmac.new(lab.admin_key.encode(), nonce,
                                             hashlib.sha256).digest()))
        assert json.loads(read_frame(sock)) == {'authenticated': True}
        sock.sendall(framing.encode(json.dumps({'method': 'list_equipment', 'params': {}})))
        assert 'result' in json.loads(read_frame(sock)), 'admin rights must carry over'


def test_adopted_session_that_dies_frees_its_equipment(start_broker):
    lab = start_broker(equipment=[RELAY])
    relay = lab.client().get({'type': 'relay', 'uid': 'r1'})
    relay.get_profile()
    session = next(p for p in psutil.Process(lab.pid).children()
                   if p.name().startswith('ave-broker-sess'))
    lab.pid = restart(lab)
    session.kill()
    admin = lab.client(lab.admin_key)
    assert wait_until(lambda: [p['uid'] for p in admin.list_available()] == ['r1'])


def test_client_leaving_after_restart_frees_its_equipment(start_broker):
    lab = start_broker(equipment=[RELAY])
    client = Broker(lab.address)
    client.get({'type': 'relay', 'uid': 'r1'}).get_profile()
    lab.pid = restart(lab)
    del client
    admin = lab.client(lab.admin_key)
    assert wait_until(lambda: [p['uid'] for p in admin.list_available()] == ['r1'])


def test_restarted_broker_can_be_stopped(start_broker):
    lab = start_broker()
    lab.pid = restart(lab)
    assert lab.cli('--stop').returncode == 0
    assert lab.cli('--status').returncode == 1


def read_frame(sock):
    decoder = framing.FrameDecoder()
    while (frame := decoder.next_frame()) is None:
        data = sock.recv(65536)
        assert data, 'connection closed'
        decoder.feed(data)
    return frame


def test_takeover_tells_a_supervising_systemd_its_new_main_pid(start_broker, tmp_path):
    lab = start_broker()
    address = str(tmp_path / 'notify')
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as supervisor:
        supervisor.bind(address)
        supervisor.settimeout(10)
        result = subprocess.run(lab.command('--restart'), capture_output=True, text=True,
                                timeout=30, stdin=subprocess.DEVNULL,
                                env={**os.environ, 'NOTIFY_SOCKET': address})
        assert result.returncode == 0, result.stderr
        lab.pid = reported_pid(result.stdout)
        message = supervisor.recv(4096).decode()
    assert message == f'MAINPID={lab.pid}\nREADY=1'
