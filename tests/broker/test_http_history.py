"""Utilisation history: time-weighted buckets, and a file that survives any content."""
from __future__ import annotations

import json
import logging
import os

import pytest

from ave.broker.http import history
from ave.broker.http.history import OVERALL, Utilisation, fractions_of

DAY = history.BUCKET_S * history.BUCKETS
T0 = 1_700_000_100  # a bucket start (a multiple of 300)


def item(type_name, state):
    return {'type': type_name, 'state': state}


# -- fractions_of ----------------------------------------------------------------------

def test_fractions_leave_out_offline_and_on_demand_equipment():
    equipment = [item('relay', 'held'), item('relay', 'available'), item('relay', 'offline'),
                 item('handset', 'releasing'), item('workspace', 'held')]
    fractions = fractions_of(equipment, ['workspace'])
    assert fractions == {'relay': 0.5, 'handset': 1.0, OVERALL: pytest.approx(2 / 3)}


def test_fractions_of_nothing_usable_have_no_overall():
    assert fractions_of([item('relay', 'offline')], []) == {}


# -- Utilisation -----------------------------------------------------------------------

def test_a_bucket_holds_the_time_weighted_average():
    use = Utilisation()
    use.record(T0, {OVERALL: 1.0})
    use.record(T0 + 10, {OVERALL: 0.0})    # 1.0 held for 10 s
    use.record(T0 + 40, {OVERALL: 0.0})    # 0.0 held for 30 s
    row = use.export()['buckets'][0]
    assert row['start'] == T0 and row['all'] == pytest.approx(0.25)


def test_a_silent_spell_counts_only_up_to_the_gap_limit():
    use = Utilisation()
    use.record(T0, {OVERALL: 1.0})
    use.record(T0 + 200, {OVERALL: 0.0})   # silent: 1.0 counts for MAX_GAP only
    use.record(T0 + 200 + history.MAX_GAP, {OVERALL: 0.0})
    seconds = use.buckets[T0][OVERALL][1]
    assert seconds == pytest.approx(2 * history.MAX_GAP)
    assert use.export()['buckets'][0]['all'] == pytest.approx(0.5)


def test_an_interval_across_a_bucket_boundary_is_split():
    use = Utilisation()
    use.record(T0 + 290, {OVERALL: 1.0, 'relay': 1.0})
    use.record(T0 + 310, {OVERALL: 1.0, 'relay': 1.0})
    assert use.buckets[T0][OVERALL][1] == pytest.approx(10)
    assert use.buckets[T0 + 300]['relay'][1] == pytest.approx(10)


def test_only_the_last_day_is_kept():
    use = Utilisation()
    for step in range(0, 2 * DAY, 25):
        use.record(T0 + step, {OVERALL: 0.5})
    assert len(use.buckets) <= history.BUCKETS
    assert min(use.buckets) > T0 + 2 * DAY - DAY - history.BUCKET_S


@pytest.mark.parametrize('offset', [0, 5, 24, 25, 150, 299])
def test_a_day_ending_in_a_new_bucket_still_saves_and_loads_whole(tmp_path, offset):
    use = Utilisation()
    now = T0 + DAY + offset
    for step in range(0, DAY, 25):
        use.record(now - DAY + step, {OVERALL: 0.5})
    use.finish(now)  # the last interval may open one bucket more
    assert len(use.buckets) <= history.BUCKETS
    path = str(tmp_path / 'utilisation.json')
    history.save(path, use)
    assert history.load(path).export() == use.export(), 'the saved day was refused'


def test_types_beyond_the_limit_are_not_tracked_but_overall_is():
    use = Utilisation()
    many = {f'type{index:02}': 0.5 for index in range(history.MAX_TYPES + 10)}
    use.record(T0, {**many, OVERALL: 0.5})
    use.record(T0 + 10, {})
    series = use.buckets[T0]
    assert OVERALL in series and len(series) == history.MAX_TYPES + 1


def test_a_clock_set_back_drops_the_future_buckets():
    use = Utilisation()
    use.record(T0 + 600, {OVERALL: 1.0})
    use.record(T0 + 610, {OVERALL: 1.0})
    use.record(T0, {OVERALL: 1.0})
    assert T0 + 600 not in use.buckets


# -- the file --------------------------------------------------------------------------

def sample_history():
    use = Utilisation()
    use.record(T0, {OVERALL: 0.5, 'relay': 0.5})
    use.record(T0 + 20, {OVERALL: 1.0})
    use.finish(T0 + 30)
    return use


def test_saved_history_loads_the_same(tmp_path):
    path = str(tmp_path / '.ave' / 'utilisation.json')
    history.save(path, sample_history())
    assert history.load(path).export() == sample_history().export()
    assert not [name for name in os.listdir(tmp_path / '.ave') if name.endswith('.tmp')]


def test_a_missing_file_is_an_empty_history_without_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert history.load(str(tmp_path / 'none.json')).buckets == {}
    assert not caplog.records


def hostile_files():
    good = sample_history().to_json()
    row = good['buckets'][0]
    return {
        'garbage': b'\x00\xff not json',
        'truncated': json.dumps(good).encode()[:-7],
        'deep': b'[' * 100000 + b']' * 100000,
        'nan': json.dumps({**good, 'buckets': [{**row, 'series': {'': [float('nan'), 1]}}]}).encode(),
        'fraction above one': json.dumps(
            {**good, 'buckets': [{**row, 'series': {'': [7.0, 10]}}]}).encode(),
        'too many buckets': json.dumps(
            {**good, 'buckets': [{**row, 'start': T0 + 300 * i} for i in range(400)]}).encode(),
        'unaligned start': json.dumps({**good, 'buckets': [{**row, 'start': T0 + 1}]}).encode(),
        'wrong version': json.dumps({**good, 'version': 99}).encode(),
        'list': b'[]',
        'huge': b' ' * (history.FILE_LIMIT + 1) + b'{}',
    }


@pytest.mark.parametrize('name', sorted(hostile_files()))
def test_a_hostile_file_is_ignored_with_one_warning(tmp_path, caplog, name):
    path = tmp_path / 'utilisation.json'
    path.write_bytes(hostile_files()[name])
    with caplog.at_level(logging.WARNING, logger='ave.broker.http.history'):
        assert history.load(str(path)).buckets == {}
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage(), warnings
    assert len(warnings[0].getMessage()) < 400, 'the warning must stay one short line'


def test_a_fifo_in_place_of_the_file_does_not_block(tmp_path, caplog):
    path = tmp_path / 'utilisation.json'
    os.mkfifo(path)
    with caplog.at_level(logging.WARNING, logger='ave.broker.http.history'):
        assert history.load(str(path)).buckets == {}
    assert 'regular file' in caplog.text


def test_a_link_in_place_of_the_file_is_not_followed(tmp_path, caplog):
    target = tmp_path / 'elsewhere.json'
    history.save(str(target), sample_history())
    path = tmp_path / 'utilisation.json'
    path.symlink_to(target)
    with caplog.at_level(logging.WARNING, logger='ave.broker.http.history'):
        assert history.load(str(path)).buckets == {}
    assert len(caplog.records) == 1


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / 'ave' / 'utilisation.json'
    history.save(str(path), sample_history())
    before = path.read_bytes()
    broken = sample_history()
    broken.buckets[T0][OVERALL] = [object(), 1.0]  # cannot be written as JSON
    with pytest.raises(TypeError):
        history.save(str(path), broken)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ['utilisation.json']
