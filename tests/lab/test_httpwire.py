"""The HTTP/1.1 response codec, fed byte by byte and in odd splits, with no sockets."""
import time

import pytest

from ave.lab import httpwire
from ave.lab.httpwire import END, Body, Head, LineSplitter, ResponseError, ResponseParser

CHUNKED = (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n'
           b'Transfer-Encoding: chunked\r\n\r\n'
           b'5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nGrpc-Trailer: x\r\n\r\n')
LENGTH = b'HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope'


def events_of(parser):
    out = []
    while (event := parser.next_event()) is not None:
        out.append(event)
    return out


def parse(wire, step=None, max_body=1 << 20):
    parser = ResponseParser(max_body=max_body)
    events = []
    step = step or len(wire)
    for i in range(0, len(wire), step):
        parser.feed(wire[i:i + step])
        events.extend(events_of(parser))
    return parser, events


def body_of(events):
    return b''.join(e.data for e in events if isinstance(e, Body))


@pytest.mark.parametrize('step', [1, 2, 7, 1000])
def test_chunked_response_in_any_split_gives_head_body_and_end(step):
    parser, events = parse(CHUNKED, step)
    assert isinstance(events[0], Head) and events[0].status == 200
    assert events[0].headers['transfer-encoding'] == 'chunked'
    assert body_of(events) == b'hello world', 'chunk data must come out whole, in order'
    assert events[-1] is END and parser.done


@pytest.mark.parametrize('step', [1, 3, 1000])
def test_content_length_response_ends_without_the_connection_closing(step):
    parser, events = parse(LENGTH, step)
    assert events[0].status == 404 and events[0].reason == 'Not Found'
    assert body_of(events) == b'nope'
    assert events[-1] is END


def test_keep_alive_follows_version_and_connection_header():
    _, events = parse(b'HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n')
    assert events[0].keep_alive is False
    _, events = parse(b'HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n')
    assert events[0].keep_alive is False
    _, events = parse(b'HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n')
    assert events[0].keep_alive is True and events[-1] is END


def test_body_until_close_ends_with_eof():
    parser, events = parse(b'HTTP/1.1 200 OK\r\n\r\nabc')
    assert body_of(events) == b'abc' and not parser.done
    parser.feed_eof()
    assert events_of(parser) == [END]


def test_bytes_after_the_response_are_reported_as_leftover():
    parser, _ = parse(LENGTH + b'HTTP/1.1 200')
    assert parser.leftover == len(b'HTTP/1.1 200')


def test_announced_content_length_over_the_cap_fails_before_any_body_byte():
    parser = ResponseParser(max_body=1000)
    parser.feed(b'HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n')
    with pytest.raises(ResponseError, match='exceeds 1000'):
        events_of(parser)


def test_announced_chunk_over_the_cap_fails_before_its_data():
    parser = ResponseParser(max_body=1000)
    parser.feed(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffff\r\n')
    with pytest.raises(ResponseError, match='exceeds 1000'):
        events_of(parser)


def test_many_small_chunks_count_against_the_body_cap():
    parser = ResponseParser(max_body=100)
    parser.feed(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n')
    with pytest.raises(ResponseError, match='exceeds 100'):
        for _ in range(200):
            parser.feed(b'1\r\nx\r\n')
            events_of(parser)


def test_endless_head_fails_at_the_head_cap():
    parser = ResponseParser(max_body=None, max_head=4096)
    parser.feed(b'HTTP/1.1 200 OK\r\n')
    with pytest.raises(ResponseError, match='head exceeds'):
        for _ in range(1000):
            parser.feed(b'X-Flood: ' + b'a' * 200 + b'\r\n')
            events_of(parser)


def test_header_line_count_is_capped():
    parser = ResponseParser(max_body=None)
    parser.feed(b'HTTP/1.1 200 OK\r\n' + b'X: y\r\n' * 200)
    with pytest.raises(ResponseError, match='header lines'):
        events_of(parser)


def test_head_without_newline_fails_at_the_cap_not_later():
    parser = ResponseParser(max_body=None, max_head=4096)
    parser.feed(b'H' * 4097)
    with pytest.raises(ResponseError, match='head exceeds'):
        parser.next_event()


@pytest.mark.parametrize('wire, message', [
    (b'\x16\x03\x01\x02\x00garbage\r\n\r\n', 'status line'),
    (b'SSH-2.0-OpenSSH_9\r\n\r\n', 'status line'),
    (b'HTTP/1.1 200 OK\r\nno colon here\r\n\r\n', 'malformed header'),
    (b'HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n', 'Content-Length'),
    (b'HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n', 'conflicting'),
    (b'HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n', 'transfer coding'),
    (b'HTTP/1.1 100 Continue\r\n\r\n', 'informational'),
    (b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n', 'chunk size'),
    (b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY', 'CRLF'),
])
def test_malformed_responses_fail_with_a_clear_error(wire, message):
    with pytest.raises(ResponseError, match=message):
        parse(wire)


def test_truncated_chunk_fails_when_the_connection_ends():
    parser, events = parse(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n'
                           b'64\r\n' + b'x' * 10)
    assert body_of(events) == b'x' * 10, 'partial chunk data is handed out as it arrives'
    parser.feed_eof()
    with pytest.raises(ResponseError, match='connection ended inside the body'):
        events_of(parser)


def test_connection_end_inside_the_head_is_an_error():
    parser, _ = parse(b'HTTP/1.1 200 OK\r\nContent-')
    parser.feed_eof()
    with pytest.raises(ResponseError, match='ended inside the head'):
        events_of(parser)


def test_header_block_fed_a_byte_at_a_time_costs_linear_time():
    """A quadratic rescan of 200 kB one byte at a time would take minutes."""
    wire = b'HTTP/1.1 200 OK\r\nX-Long: ' + b'a' * 200_000 + b'\r\nContent-Length: 0\r\n\r\n'
    parser = ResponseParser(max_body=0, max_head=300_000)
    started = time.monotonic()
    events = []
    for i in range(len(wire)):
        parser.feed(wire[i:i + 1])
        events.extend(events_of(parser))
    assert events[-1] is END
    assert time.monotonic() - started < 20, 'parsing must not rescan what it has seen'


def test_line_splitter_cuts_messages_in_any_split():
    splitter = LineSplitter(max_line=100)
    wire = b'{"a":1}\n{"b":2}\n\n{"c"'
    lines = []
    for i in range(len(wire)):
        splitter.feed(wire[i:i + 1])
        while (line := splitter.next_line()) is not None:
            lines.append(line)
    assert lines == [b'{"a":1}', b'{"b":2}', b'']
    assert splitter.pending == 4


def test_line_splitter_fails_as_soon_as_a_line_passes_the_cap():
    splitter = LineSplitter(max_line=1000)
    splitter.feed(b'x' * 1001)
    with pytest.raises(ResponseError, match='exceeds 1000'):
        splitter.next_line()


def test_request_encoding_refuses_header_injection():
    assert httpwire.encode_request('POST', '/v3/kv/range', 'h:1', b'{}').startswith(
        b'POST /v3/kv/range HTTP/1.1\r\nHost: h:1\r\nContent-Length: 2\r\n')
    with pytest.raises(ValueError):
        httpwire.encode_request('POST', '/x', 'h', b'', (('X', 'a\r\nEvil: 1'),))
    with pytest.raises(ValueError):
        httpwire.encode_request('POST', '/x y', 'h', b'')
