"""The frame codec, fed byte by byte and in odd splits, with no sockets at all."""
import struct

import pytest

from ave.network import framing


def frames_of(decoder):
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def test_encode_prefixes_big_endian_length():
    assert framing.encode(b'abc') == b'\x00\x00\x00\x03abc'


def test_encode_turns_text_into_utf8():
    assert framing.encode('ä') == b'\x00\x00\x00\x02\xc3\xa4'


def test_encode_refuses_payload_over_limit():
    with pytest.raises(framing.FrameTooLarge):
        framing.encode(b'x' * 11, limit=10)


def test_byte_at_a_time_feeding_yields_each_frame_once():
    wire = framing.encode(b'first') + framing.encode(b'') + framing.encode(b'third')
    decoder = framing.FrameDecoder()
    got = []
    for i in range(len(wire)):
        decoder.feed(wire[i:i + 1])
        got.extend(frames_of(decoder))
    assert got == [b'first', b'', b'third'], 'frames must come out whole and in order'


def test_many_frames_in_one_feed_all_come_out():
    decoder = framing.FrameDecoder()
    decoder.feed(b''.join(framing.encode(str(i)) for i in range(100)))
    assert frames_of(decoder) == [str(i).encode() for i in range(100)]


def test_incomplete_frame_returns_none_until_complete():
    decoder = framing.FrameDecoder()
    decoder.feed(framing.encode(b'hello')[:-1])
    assert decoder.next_frame() is None
    decoder.feed(b'o')
    assert decoder.next_frame() == b'hello'


def test_oversize_header_is_refused_before_payload_is_buffered():
    decoder = framing.FrameDecoder(limit=1024)
    decoder.feed(struct.pack('>I', 3 * 2 ** 30))
    with pytest.raises(framing.FrameTooLarge):
        decoder.next_frame()
    assert decoder.wanted() >= 0


def test_frame_exactly_at_limit_is_accepted():
    decoder = framing.FrameDecoder(limit=8)
    decoder.feed(framing.encode(b'12345678', limit=8))
    assert decoder.next_frame() == b'12345678'


def test_wanted_counts_missing_header_then_payload_bytes():
    decoder = framing.FrameDecoder()
    assert decoder.wanted() == 4
    decoder.feed(b'\x00\x00')
    assert decoder.wanted() == 2
    decoder.feed(b'\x00\x0a' + b'abc')
    assert decoder.next_frame() is None
    assert decoder.wanted() == 7


def test_pending_reencodes_partial_frame_for_handover():
    wire = framing.encode(b'whole') + framing.encode(b'partial')[:7]
    decoder = framing.FrameDecoder()
    decoder.feed(wire)
    assert decoder.next_frame() == b'whole'
    assert decoder.next_frame() is None
    successor = framing.FrameDecoder()
    successor.feed(decoder.pending() + framing.encode(b'partial')[7:])
    assert successor.next_frame() == b'partial', 'a handed-over partial frame must complete'


def test_feed_and_next_returns_a_chunk_that_is_exactly_one_frame():
    decoder = framing.FrameDecoder()
    assert decoder.feed_and_next(framing.encode(b'whole')) == b'whole'
    assert decoder.pending() == b'', 'nothing may stay buffered'


def test_feed_and_next_buffers_whatever_is_not_one_whole_frame():
    decoder = framing.FrameDecoder()
    wire = framing.encode(b'one') + framing.encode(b'two')
    assert decoder.feed_and_next(wire[:5]) is None
    assert decoder.feed_and_next(wire[5:]) == b'one'
    assert decoder.next_frame() == b'two'


def test_feed_and_next_still_refuses_oversize_frames():
    decoder = framing.FrameDecoder(limit=4)
    with pytest.raises(framing.FrameTooLarge):
        decoder.feed_and_next(framing.encode(b'12345', limit=10))


def test_split_encode_matches_encode():
    header, payload = framing.split_encode('ab')
    assert header + payload == framing.encode('ab')
