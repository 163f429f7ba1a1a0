"""ave.cmd.tail: the end of a text with a line saying what was cut; no processes here."""
import random
import tracemalloc

import pytest

from ave.cmd.tail import Tail, cut_notice, tail


def test_notice_states_both_counts_with_thousands_separators():
    assert cut_notice(123456789, 16000000) == \
        '[ave.cmd: 123,456,789 characters of output cut; the last 16,000,000 follow]\n'


def test_text_within_the_limit_is_returned_whole():
    assert tail('abc', 3) == 'abc', 'nothing may be cut from a text at the limit'


def test_longer_text_keeps_its_end_after_the_notice():
    assert tail('0123456789', 4) == cut_notice(6, 4) + '6789'


def test_limit_zero_keeps_only_the_notice():
    assert tail('abc', 0) == cut_notice(3, 0)


@pytest.mark.parametrize('seed', range(20))
def test_pieces_give_what_the_whole_text_gives(seed):
    chance = random.Random(seed)
    text = ''.join(chance.choice('ab\u00e9\U0001f600\n') for _ in range(chance.randrange(500)))
    limit = chance.randrange(300)
    kept = Tail(limit)
    rest = text
    while rest:
        size = chance.randrange(1, 40)
        kept.add(rest[:size])
        rest = rest[size:]
    assert (kept.text(), kept.total) == (tail(text, limit), len(text)), \
        f'seed {seed}: feeding in pieces changed the result'


def test_no_limit_keeps_everything():
    kept = Tail()
    for piece in ('a' * 1000, '', 'b' * 1000):
        kept.add(piece)
    assert kept.text() == 'a' * 1000 + 'b' * 1000


def test_memory_stays_near_the_limit_however_much_is_added():
    limit, piece_size, pieces = 100_000, 16_384, 2_000   # 32 MB through a 100 kB tail
    kept = Tail(limit)
    tracemalloc.start()
    try:
        for i in range(pieces):
            kept.add(chr(ord('a') + i % 26) * piece_size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * (limit + piece_size), f'{peak} bytes held for a {limit} tail'
    assert kept.text().endswith(chr(ord('a') + (pieces - 1) % 26) * piece_size)


@pytest.mark.parametrize('limit, error', [(-1, ValueError), (1.5, TypeError),
                                          ('10', TypeError), (True, TypeError)])
def test_bad_limits_are_refused(limit, error):
    with pytest.raises(error, match='limit'):
        Tail(limit)
    with pytest.raises(error, match='limit'):
        tail('text', limit)
