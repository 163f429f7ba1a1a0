"""The feed: broker-side timings, pacing and snapshots, and their check on arrival.

No processes here: everything in ``feed`` and ``snapshot`` is pure.
"""
from __future__ import annotations

import json
import math

import pytest

from ave.broker.http import feed
from ave.broker.http.snapshot import MAX_TEXT, SnapshotError, check_snapshot

HOLDER = {'user': 'alice', 'host': 'ws1', 'pid': 42, 'program': '/usr/bin/flash',
          'job': 'https://ci.example/job/7'}


def snapshot(**changes):
    rows = [feed.equipment_row({'type': 'relay', 'uid': 'r1'}, 'r1', 'a', 'held', HOLDER, 10.0),
            feed.equipment_row({'type': 'relay', 'uid': 'r2'}, 'r2', 'a', 'available')]
    value = feed.build_snapshot(now=100.0, host='a', equipment=rows)
    value.update(changes)
    return value


# -- Histogram and RpcTimings -----------------------------------------------------------

def test_histogram_counts_a_value_on_a_bound_in_that_bound():
    histogram = feed.Histogram((1.0, 2.0))
    for value in (0.5, 1.0, 1.5, 2.0, 9.0):
        histogram.observe(value)
    assert histogram.export() == {'buckets': [[1.0, 2], [2.0, 4]], 'sum': 14.0, 'count': 5}


def test_histogram_refuses_bounds_out_of_order():
    with pytest.raises(ValueError, match='ascending'):
        feed.Histogram((2.0, 1.0))


def test_histogram_restored_from_its_export_counts_on():
    histogram = feed.Histogram(feed.QUEUE_WAIT_BOUNDS)
    for value in (0.1, 3.0, 100000.0):
        histogram.observe(value)
    restored = feed.Histogram.restore(json.loads(json.dumps(histogram.export())))
    restored.observe(3.0)
    assert restored.export()['count'] == 4 and restored.counts[1] == 2, restored.export()


def test_rpc_timings_keep_one_histogram_per_method():
    timings = feed.RpcTimings()
    timings.observe('get', 3e-5)
    timings.observe('get', 2e-3)
    timings.observe('who', 1e-5)
    exported = timings.export()
    assert sorted(exported) == ['get', 'who']
    assert exported['get']['count'] == 2 and exported['who']['buckets'][0] == [1e-5, 1]


def test_rpc_timings_share_one_histogram_beyond_the_method_limit():
    timings = feed.RpcTimings()
    for index in range(feed.MAX_METHODS + 50):
        timings.observe(f'made_up_{index}', 1e-4)
    assert len(timings.methods) == feed.MAX_METHODS + 1, 'method names must stay bounded'
    assert timings.methods[feed.OTHER_METHOD].export()['count'] == 50


def test_rpc_timings_restore_drops_histograms_with_other_bounds():
    timings = feed.RpcTimings()
    timings.observe('get', 1e-4)
    exported = timings.export()
    exported['old'] = feed.Histogram((1.0,)).export()
    restored = feed.RpcTimings.restore(exported)
    assert sorted(restored.methods) == ['get']


# -- FeedPacer --------------------------------------------------------------------------

def test_pacer_sends_at_once_first_then_soon_after_a_change():
    pacer = feed.FeedPacer(min_interval=0.1, max_interval=5.0)
    assert pacer.delay(10.0) == 0.0
    pacer.sent(10.0)
    pacer.changed()
    assert pacer.delay(10.02) == pytest.approx(0.08)
    assert pacer.delay(10.3) == 0.0


def test_pacer_spaces_costly_snapshots_to_bound_their_share_of_the_loop():
    pacer = feed.FeedPacer(min_interval=0.1, max_interval=5.0, max_share=0.02)
    pacer.sent(10.0, cost=0.01)  # a large lab: 10 ms per snapshot
    pacer.changed()
    assert pacer.delay(10.0) == pytest.approx(0.5)
    pacer.sent(10.5, cost=0.001)
    pacer.changed()
    assert pacer.delay(10.5) == pytest.approx(0.1)


def test_pacer_sends_a_heartbeat_when_nothing_changes():
    pacer = feed.FeedPacer(min_interval=0.1, max_interval=5.0)
    pacer.sent(10.0)
    assert pacer.delay(11.0) == pytest.approx(4.0)
    assert pacer.delay(15.0) == 0.0


# -- build_snapshot ---------------------------------------------------------------------

def test_a_built_snapshot_is_json_and_passes_the_check_unchanged():
    timings = feed.RpcTimings()
    timings.observe('get', 4e-5)
    wait = feed.Histogram(feed.QUEUE_WAIT_BOUNDS)
    wait.observe(12.0)
    value = feed.build_snapshot(
        now=100.0, host='a', lab='lab1', equipment=snapshot()['equipment'],
        queue=[{'position': 1, 'holder': HOLDER, 'profiles': [{'type': 'relay'}],
                'priority': 2, 'waited_s': 3.5}],
        sessions=1, allocations_total=9, restarts_total=2, rpc_seconds=timings,
        queue_wait_seconds=wait)
    carried = json.loads(json.dumps(value, allow_nan=False))
    assert check_snapshot(carried) == value


# -- check_snapshot ---------------------------------------------------------------------

@pytest.mark.parametrize('changes, field', [
    ({'time': 'now'}, 'time'),
    ({'time': math.nan}, 'time'),
    ({'host': None}, 'host'),
    ({'equipment': {}}, 'equipment'),
    ({'sessions': -1}, 'sessions'),
    ({'sessions': True}, 'sessions'),
    ({'version': 2}, 'version'),
    ({'queue': [{'waited_s': 'long'}]}, 'queue[0].waited_s'),
    ({'rpc_seconds': {'get': {'buckets': [[2.0, 1], [1.0, 2]], 'sum': 0, 'count': 2}}},
     'rpc_seconds.get.buckets'),
    ({'rpc_seconds': {'get': {'buckets': [[1.0, 3]], 'sum': 0, 'count': 2}}},
     'rpc_seconds.get.count'),
])
def test_a_wrong_field_is_named(changes, field):
    with pytest.raises(SnapshotError, match=field.replace('[', r'\[').replace(']', r'\]')):
        check_snapshot(snapshot(**changes))


def test_a_wrong_state_is_named_with_its_item():
    value = snapshot()
    value['equipment'][1]['state'] = 'borrowed'
    with pytest.raises(SnapshotError, match=r'equipment\[1\]\.state'):
        check_snapshot(value)


def test_declared_texts_are_cut_and_unknown_keys_dropped():
    value = snapshot()
    value['equipment'][0]['holder'] = {**HOLDER, 'job': 'x' * 100000, 'secret': 'y'}
    value['extra'] = 'ignored'
    checked = check_snapshot(value)
    holder = checked['equipment'][0]['holder']
    assert len(holder['job']) == MAX_TEXT and 'secret' not in holder and 'extra' not in checked


def test_a_holder_that_is_not_an_object_is_refused():
    value = snapshot()
    value['equipment'][0]['holder'] = ['alice']
    with pytest.raises(SnapshotError, match=r'equipment\[0\]\.holder'):
        check_snapshot(value)
