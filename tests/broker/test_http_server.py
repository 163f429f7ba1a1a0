"""The real ``ave-broker-http`` process, fed the way the broker feeds it.

Each test forks the process with a socket pair, exactly as a broker does, sends
one-way ``update`` calls from an in-process Control on the other end, and queries
the HTTP side over loopback with ``http.client``. ``HttpProcess`` and the
``http_process`` fixture are shared with the hostile-peer and page tests.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import wait_until
from ave.broker.http import feed
from ave.broker.http.connections import Limits
from ave.broker.http.server import HttpServer, open_listener
from ave.network.connection import Connection
from ave.network.control import Control

pytestmark = pytest.mark.timeout(60)

HOLDER = {'user': 'alice', 'host': 'ws1', 'pid': 4242, 'program': '/opt/ci/flash.py',
          'job': 'https://ci.example/job/17'}


class HttpProcess:
    """A running HTTP process, its port, and the broker's end of its link."""

    def __init__(self, home: str, limits: Limits = Limits()) -> None:
        self.home = home
        listener = open_listener('127.0.0.1', 0)
        self.port = listener.getsockname()[1]
        broker_end, http_end = socket.socketpair()
        self.server = HttpServer(listener, http_end, home=home, limits=limits, logging=True)
        self.pid = self.server.start(synchronize=True)
        self.feeder = Control(None)
        self.link = Connection(('http', self.pid), broker_end)
        self.feeder.add_connection(self.link)

    def send(self, snapshot: dict) -> None:
        """``update(snapshot)`` one-way, as the broker's ``notify`` sends it."""
        self.feeder.notify(self.link, 'update', snapshot)
        deadline = time.monotonic() + 10
        while self.link.has_output and time.monotonic() < deadline:
            self.feeder.step_main(0.05)
        assert not self.link.has_output, 'the HTTP process did not take the snapshot'

    def publish(self, snapshot: dict) -> None:
        """Send ``snapshot`` and wait until the HTTP side serves it."""
        self.send(snapshot)
        served = wait_until(lambda: self.json('/api/equipment')['time'] == snapshot['time'])
        assert served, 'the snapshot was not served within 5 s'

    def request(self, path: str, method: str = 'GET') -> tuple[int, dict, bytes]:
        client = http.client.HTTPConnection('127.0.0.1', self.port, timeout=5)
        try:
            client.request(method, path)
            response = client.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            client.close()

    def json(self, path: str) -> dict:
        status, headers, body = self.request(path)
        assert status == 200 and headers['Content-Type'] == 'application/json', (status, body)
        return json.loads(body)

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def close_link(self) -> None:
        """The broker is gone for good: its end of the link closes."""
        if not self.link.closed:
            self.feeder.remove_connection(self.link)
            self.link.close()

    def stop(self) -> int | None:
        self.close_link()
        try:
            return self.server.join(10)
        except Exception:
            os.kill(self.pid, signal.SIGKILL)
            return self.server.join(10)


@pytest.fixture
def http_process(home):
    """``http_process(limits=...)`` starts one; all are stopped (killed if need be)."""
    started: list[HttpProcess] = []

    def start(limits: Limits = Limits(), home_dir: str = home) -> HttpProcess:
        process = HttpProcess(home_dir, limits)
        started.append(process)
        return process
    yield start
    for process in started:
        process.stop()


def snapshot(now=None, holder=HOLDER, queue=True, items=2, **changes):
    now = time.time() if now is None else now
    rows = [feed.equipment_row({'type': 'relay', 'uid': 'r1', 'circuits': ['usb.pc.vcc']},
                               'r1', 'host-a', 'held', holder, now - 125),
            feed.equipment_row({'type': 'handset', 'serial': 'CB5A1', 'platform': 'android',
                                'power_state': 'boot_completed'}, 'CB5A1', 'host-a',
                               'available')]
    rows += [feed.equipment_row({'type': 'relay', 'uid': f'x{index}'}, f'x{index}', 'host-b',
                                'offline') for index in range(items - 2)]
    waiting = [{'position': 1, 'holder': {**HOLDER, 'user': 'bob'},
                'profiles': [{'type': 'relay', 'uid': 'r1'}], 'priority': 0,
                'waited_s': 42.0}] if queue else []
    timings = feed.RpcTimings()
    timings.observe('get', 3e-5)
    timings.observe('who', 2e-5)
    value = feed.build_snapshot(now=now, host='host-a', lab='lab1', equipment=rows,
                                queue=waiting, sessions=1, allocations_total=5,
                                restarts_total=1, rpc_seconds=timings)
    value.update(changes)
    return value


def metrics_of(process: HttpProcess) -> dict:
    status, headers, body = process.request('/metrics')
    assert status == 200 and headers['Content-Type'].startswith('text/plain')
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


# -- endpoints ---------------------------------------------------------------------------

def test_every_endpoint_before_and_after_a_change(http_process):
    process = http_process()
    assert process.json('/api/equipment')['equipment'] == []
    assert process.json('/api/queue')['queue'] == []
    assert metrics_of(process) == {}

    process.publish(snapshot())
    equipment = process.json('/api/equipment')
    relay = next(e for e in equipment['equipment'] if e['identity'] == 'r1')
    assert (relay['state'], relay['holder']['user'], equipment['lab']) == ('held', 'alice', 'lab1')
    assert process.json('/api/queue')['queue'][0]['holder']['user'] == 'bob'
    assert metrics_of(process)['ave_queue_length'].samples[0].value == 1

    process.publish(snapshot(holder=None, queue=False, allocations_total=6))
    relay = next(e for e in process.json('/api/equipment')['equipment'] if e['identity'] == 'r1')
    assert relay['holder'] is None, 'a released holder must disappear'
    assert process.json('/api/queue')['queue'] == []
    families = metrics_of(process)
    assert families['ave_queue_length'].samples[0].value == 0
    assert families['ave_allocations'].samples[0].value == 6
    status, headers, page = process.request('/')
    assert status == 200 and b'<script src="page.js"' in page


def test_metric_names_and_types(http_process):
    process = http_process()
    process.publish(snapshot())
    families = metrics_of(process)
    types = {name: family.type for name, family in families.items()}
    assert types == {
        'ave_equipment': 'gauge', 'ave_sessions': 'gauge', 'ave_queue_length': 'gauge',
        'ave_allocations': 'counter', 'ave_restarts': 'counter',
        'ave_queue_wait_seconds': 'histogram', 'ave_rpc_seconds': 'histogram',
        'ave_snapshot_timestamp_seconds': 'gauge'}
    names = {sample.name for family in families.values() for sample in family.samples}
    assert {'ave_allocations_total', 'ave_restarts_total', 'ave_rpc_seconds_bucket',
            'ave_rpc_seconds_count', 'ave_queue_wait_seconds_sum'} <= names
    states = {(s.labels['type'], s.labels['state']): s.value
              for s in families['ave_equipment'].samples}
    assert states[('relay', 'held')] == 1 and states[('handset', 'offline')] == 0
    methods = {s.labels['method'] for s in families['ave_rpc_seconds'].samples}
    assert methods == {'get', 'who'}


def test_head_gets_the_headers_without_a_body(http_process):
    process = http_process()
    status, headers, body = process.request('/api/equipment', method='HEAD')
    assert status == 200 and body == b'' and int(headers['Content-Length']) > 0


def test_one_connection_serves_requests_one_after_another(http_process):
    process = http_process()
    client = http.client.HTTPConnection('127.0.0.1', process.port, timeout=5)
    try:
        for path in ('/', '/page.js', '/page.css', '/api/queue', '/metrics'):
            client.request('GET', path)
            response = client.getresponse()
            response.read()
            assert response.status == 200, path
    finally:
        client.close()


def test_a_refused_snapshot_keeps_the_previous_one(http_process):
    process = http_process()
    good = snapshot()
    process.publish(good)
    process.send(snapshot(equipment='not a list'))
    process.publish(snapshot(now=good['time'] + 1))  # the link still works after it
    process.send({**snapshot(), 'time': 'soon'})
    time.sleep(0.2)
    assert process.json('/api/equipment')['time'] == good['time'] + 1


def test_a_large_lab_is_served_whole(http_process):
    process = http_process()
    process.publish(snapshot(items=500))
    assert len(process.json('/api/equipment')['equipment']) == 500
    offline = [s for s in metrics_of(process)['ave_equipment'].samples
               if s.labels == {'type': 'relay', 'state': 'offline'}]
    assert offline[0].value == 498


# -- the process -------------------------------------------------------------------------

def test_the_process_is_named_and_ends_when_the_broker_link_closes(http_process):
    process = http_process()
    assert psutil.Process(process.pid).name() == 'ave-broker-http'
    assert process.stop() == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(('127.0.0.1', process.port), timeout=2).close()


def test_sigterm_ends_it_in_order(http_process):
    process = http_process()
    os.kill(process.pid, signal.SIGTERM)
    assert process.server.join(10) == 0


def test_a_new_broker_taking_over_the_link_keeps_the_page_answering(http_process):
    """What ``--restart`` does to this process: the link's descriptor moves to a new
    broker and the old one lets go of it, and the page never stops answering."""
    process = http_process()
    process.publish(snapshot())
    successor = Control(None)
    adopted = Connection(('http', process.pid), socket.socket(fileno=os.dup(process.link.fileno())))
    successor.add_connection(adopted)
    process.feeder.remove_connection(process.link)
    process.link.socket.close()  # the old broker exits: its copy closes, no shutdown
    assert process.json('/api/equipment')['equipment'], 'the page must answer meanwhile'
    process.feeder, process.link = successor, adopted
    later = snapshot(restarts_total=2)
    process.publish(later)
    assert metrics_of(process)['ave_restarts'].samples[0].value == 2


# -- utilisation history -----------------------------------------------------------------

def test_history_survives_a_restart_of_the_process(http_process, home):
    first = http_process()
    for _ in range(3):
        first.publish(snapshot())
        time.sleep(0.1)
    recorded = first.json('/api/utilisation')['buckets']
    assert recorded and recorded[-1]['types']['relay'] == 1.0, recorded
    assert first.stop() == 0
    assert os.path.exists(os.path.join(home, '.ave', 'utilisation.json'))
    second = http_process()
    assert second.json('/api/utilisation')['buckets'] == recorded


def test_a_corrupt_history_file_is_ignored(http_process, home):
    path = os.path.join(home, '.ave', 'utilisation.json')
    os.makedirs(os.path.dirname(path))
    with open(path, 'wb') as stream:
        stream.write(b'{"version": 1, "bucket_s": 300, "buckets": [{"start": "yesterday"')
    process = http_process()
    assert process.json('/api/utilisation')['buckets'] == []
    process.publish(snapshot())
    time.sleep(0.1)
    process.publish(snapshot())
    assert process.stop() == 0
    with open(path, encoding='utf-8') as stream:
        assert json.load(stream)['version'] == 1, 'the next save replaces the corrupt file'
