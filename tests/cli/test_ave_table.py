"""Listing formats (ave.cli.table): columns, times, and text other clients announced."""
import time

import pytest

from ave.cli.table import age_text, holder_text, printable, profile_text, render, since_text


def test_columns_are_aligned_under_the_header_without_trailing_spaces():
    text = render(['TYPE', 'ID', 'HOLDER'], [['relay', 'r1', ''], ['serial', 'FTDI-1', 'a@b']])
    assert text == ('TYPE    ID      HOLDER\n'
                    'relay   r1\n'
                    'serial  FTDI-1  a@b\n')


def test_control_characters_announced_by_a_holder_cannot_reach_the_terminal():
    text = render(['HOLDER'], [[holder_text({'user': 'eve\x1b[2J', 'host': 'h\rx\n'})]])
    assert '\x1b' not in text and '\r' not in text and text.count('\n') == 2, repr(text)
    assert 'eve?[2J@h?x?' in text


def test_long_cells_are_cut_to_keep_tables_readable():
    line = render(['JOB'], [['x' * 500]]).splitlines()[1]
    assert len(line) == 60 and line.endswith('...'), line


@pytest.mark.parametrize('holder, text', [
    ({'user': 'alice', 'host': 'lab1', 'pid': 4}, 'alice@lab1'),
    ({'host': '10.0.0.7'}, '10.0.0.7'),
    (None, ''),
])
def test_holder_is_user_at_host_or_what_there_is(holder, text):
    assert holder_text(holder) == text


@pytest.mark.parametrize('seconds, text', [
    (0, '0s'), (45.9, '45s'), (312, '5m12s'), (3 * 3600 + 300, '3h05m'),
    (2 * 86400 + 4 * 3600, '2d04h'), (-5, '0s'),
])
def test_age_shows_its_two_largest_units(seconds, text):
    assert age_text(seconds) == text


def test_since_today_shows_the_clock_and_the_age():
    now = time.mktime((2026, 5, 4, 14, 8, 34, 0, 0, -1))
    assert since_text(now - 312, now) == '14:03:22 (5m12s)'


def test_since_another_day_shows_the_date():
    now = time.mktime((2026, 5, 4, 14, 8, 34, 0, 0, -1))
    assert since_text(now - 2 * 86400, now) == '2026-05-02 14:08 (2d00h)'


def test_since_unknown_is_empty():
    assert since_text(None, time.time()) == ''


def test_profile_text_is_a_profile_argument_when_it_can_be():
    assert profile_text({'type': 'relay', 'uid': 'r1'}) == 'relay,uid=r1'
    assert profile_text({'type': 'relay', 'circuits': ['a']}) == \
        '{"circuits": ["a"], "type": "relay"}'
    assert profile_text({'type': 'relay', 'pretty': 'a,b'}) == \
        '{"pretty": "a,b", "type": "relay"}'


def test_printable_keeps_ordinary_text():
    assert printable('bench 3 — console') == 'bench 3 — console'
