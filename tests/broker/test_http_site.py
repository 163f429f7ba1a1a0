"""What each path answers, without HTTP: ``Site.reply`` from snapshots and history."""
from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ave.broker.http import feed
from ave.broker.http.history import OVERALL, Utilisation
from ave.broker.http.site import Site
from ave.broker.http.snapshot import check_snapshot


def make_snapshot(now=100.0, holder='alice'):
    rows = [feed.equipment_row({'type': 'relay', 'uid': 'r1'}, 'r1', 'a', 'held',
                               {'user': holder}, 50.0),
            feed.equipment_row({'type': 'relay', 'uid': 'r2'}, 'r2', 'a', 'available')]
    return check_snapshot(feed.build_snapshot(now=now, host='a', equipment=rows))


@pytest.fixture
def site():
    return Site(Utilisation())


def body_of(site, path):
    reply = site.reply('GET', path)
    assert reply.status == 200, f'{path}: {reply.status} {reply.body[:200]!r}'
    return reply.body


def test_the_page_and_its_files_are_served_with_a_strict_policy(site):
    page = site.reply('GET', '/')
    assert page.content_type.startswith('text/html') and b'page.js' in page.body
    policy = dict(page.headers)['Content-Security-Policy']
    assert "script-src 'self'" in policy and 'unsafe-inline' not in policy
    assert b'function' in body_of(site, '/page.js')
    assert b'@media' in body_of(site, '/page.css')


def test_before_any_snapshot_the_api_says_so_and_metrics_are_empty(site):
    equipment = json.loads(body_of(site, '/api/equipment'))
    assert equipment == {'time': None, 'lab': None, 'host': None, 'equipment': []}
    assert json.loads(body_of(site, '/api/queue'))['queue'] == []
    assert body_of(site, '/metrics') == b''


def test_a_new_snapshot_replaces_the_cached_answers(site):
    site.update(make_snapshot(holder='alice'))
    first = json.loads(body_of(site, '/api/equipment'))
    site.update(make_snapshot(now=101.0, holder='bob'))
    second = json.loads(body_of(site, '/api/equipment'))
    assert first['equipment'][0]['holder']['user'] == 'alice'
    assert second['equipment'][0]['holder']['user'] == 'bob' and second['time'] == 101.0


def test_answers_are_made_once_per_snapshot(site):
    site.update(make_snapshot())
    assert site.reply('GET', '/metrics') is site.reply('GET', '/metrics?x=1')


def test_utilisation_follows_the_history(site):
    site.history.record(1_700_000_100, {OVERALL: 1.0})
    empty = json.loads(body_of(site, '/api/utilisation'))
    site.history.record(1_700_000_110, {OVERALL: 0.0})
    recorded = json.loads(body_of(site, '/api/utilisation'))
    assert empty['buckets'] == [] and recorded['buckets'][0]['all'] == 1.0


def test_metrics_describe_the_snapshot(site):
    site.update(make_snapshot())
    families = {f.name: f for f in text_string_to_metric_families(
        body_of(site, '/metrics').decode())}
    held = [s for s in families['ave_equipment'].samples if s.labels == {
        'type': 'relay', 'state': 'held'}]
    assert held[0].value == 1.0


@pytest.mark.parametrize('method, path, status', [
    ('POST', '/', 405), ('DELETE', '/api/queue', 405), ('GET', '/nope', 404),
    ('GET', '/../etc/passwd', 404), ('GET', '/page', 404),
])
def test_other_requests_get_one_clear_status(site, method, path, status):
    reply = site.reply(method, path)
    assert reply.status == status and reply.body.startswith(str(status).encode())
    assert reply.body.count(b'\n') == 1
