"""The status page and metrics of a real broker: contents before and after an
allocation, across ``--restart``, and in a real browser."""
from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from support import wait_until
from test_http_page import CHROMIUM, Rows, chromium, rendered_dom

pytestmark = pytest.mark.timeout(120)

RELAY = {'type': 'relay', 'uid': 'r1',
         'circuits': {'c1': {'open': ['true'], 'close': ['true'], 'default': 'open'}}}


@pytest.fixture
def lab(start_broker):
    started = start_broker(equipment=[RELAY], http={'host': '127.0.0.1',
                                                    'port': free_port()})
    started.http = ('127.0.0.1', started.broker_json['http']['port'])
    assert wait_until(lambda: fetch(started, '/api/equipment')[0] == 200, timeout=10)
    return started


def fetch(lab, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(*lab.http, timeout=5)
    try:
        connection.request('GET', path)
        response = connection.getresponse()
        return response.status, response.read()
    except OSError:
        return 0, b''
    finally:
        connection.close()


def api(lab, path: str):
    status, body = fetch(lab, path)
    assert status == 200, f'GET {path} answered {status}'
    return json.loads(body)


def metrics(lab) -> dict:
    status, body = fetch(lab, '/metrics')
    assert status == 200
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def sample(families: dict, name: str, **labels) -> float | None:
    for family in families.values():
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return found.value
    return None


def relay_row(lab) -> dict:
    return next(row for row in api(lab, '/api/equipment')['equipment']
                if row['profile'].get('uid') == 'r1')


def test_endpoints_before_and_after_an_allocation(lab):
    assert relay_row(lab)['state'] == 'available'
    before = sample(metrics(lab), 'ave_allocations_total')
    client = lab.client()
    from ave.broker import Broker
    holder = Broker(lab.address, job='nightly-7')
    holder.get({'type': 'relay', 'uid': 'r1'})
    waiter = threading.Thread(target=lambda: client.get({'type': 'relay', 'uid': 'r1'},
                                                        wait=20), daemon=True)
    waiter.start()
    assert wait_until(lambda: relay_row(lab)['state'] == 'held', timeout=10)
    row = relay_row(lab)
    assert row['holder']['job'] == 'nightly-7' and row['since'] <= time.time(), row
    assert wait_until(lambda: len(api(lab, '/api/queue')['queue']) == 1, timeout=10)
    families = metrics(lab)
    assert sample(families, 'ave_allocations_total') == before + 1
    assert sample(families, 'ave_equipment', type='relay', state='held') == 1
    assert sample(families, 'ave_queue_length') == 1
    assert sample(families, 'ave_rpc_seconds_count', method='get') >= 1
    holder._disconnect()
    waiter.join(20)


def test_metric_names_and_types(lab):
    families = metrics(lab)
    wanted = {'ave_equipment': 'gauge', 'ave_sessions': 'gauge', 'ave_queue_length': 'gauge',
              'ave_allocations': 'counter', 'ave_queue_wait_seconds': 'histogram',
              'ave_rpc_seconds': 'histogram', 'ave_restarts': 'counter'}
    found = {name: families[name].type for name in wanted if name in families}
    assert found == wanted, f'metrics: {found}'


def test_a_change_shows_at_once_not_at_the_next_periodic_snapshot(lab):
    """Snapshots go out at least every 5 s and soon after each change: a change made
    while the periodic one is pending must not wait for it."""
    assert wait_until(lambda: relay_row(lab)['state'] == 'available', timeout=10)
    time.sleep(0.5)  # the first snapshot has gone; the next periodic one is 5 s away
    holder = lab.client()
    holder.get({'type': 'relay', 'uid': 'r1'})
    allocated = time.monotonic()
    assert wait_until(lambda: relay_row(lab)['state'] == 'held', timeout=10)
    assert time.monotonic() - allocated < 2.5, \
        f'the page showed the allocation after {time.monotonic() - allocated:.1f} s'


def test_restart_while_polling_fails_no_request(lab):
    failures, requests = [], [0]
    stop = threading.Event()

    def poll():
        while not stop.is_set() and requests[0] < 5000:
            status, _ = fetch(lab, '/metrics')
            requests[0] += 1
            if status != 200:
                failures.append(status)
            time.sleep(0.05)
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        time.sleep(0.5)
        result = lab.cli('--restart')
        assert result.returncode == 0, result.stderr
        time.sleep(1)
    finally:
        stop.set()
        poller.join(10)
    assert requests[0] > 10 and failures == [], f'{failures} of {requests[0]} failed'
    assert wait_until(lambda: sample(metrics(lab), 'ave_restarts_total') == 1, timeout=10)


@pytest.mark.skipif(not __import__('os').path.exists(CHROMIUM),
                    reason=f'{CHROMIUM} is not installed (Debian package chromium)')
def test_the_page_in_a_real_browser_shows_equipment_and_holders(lab, tmp_path):
    from ave.broker import Broker
    holder = Broker(lab.address, job='page-test-job')
    holder.get({'type': 'relay', 'uid': 'r1'})
    assert wait_until(lambda: relay_row(lab)['state'] == 'held', timeout=10)
    url = f'http://{lab.http[0]}:{lab.http[1]}/'
    rows = Rows()
    rows.feed(rendered_dom(tmp_path, url))
    equipment = ' | '.join(rows.rows['equipment'])
    assert 'r1' in equipment and 'page-test-job' in equipment and 'held' in equipment, \
        equipment
    screenshot = tmp_path / 'page.png'
    chromium(tmp_path, url, f'--screenshot={screenshot}', '--window-size=1280,800')
    assert screenshot.stat().st_size > 1000, 'no screenshot was written'
    holder._disconnect()
