"""The wire protocol without sockets: handshake, requests and replies as values."""
import json

import pytest

from ave.exceptions import AuthError, AveException, Timeout
from ave.network import protocol
from ave.network.peer import (AUTHENTICATING, CLOSED, ESTABLISHED, RELEASED, SERVING,
                              TRANSITIONS, WATCHED, Peer)

pytestmark = pytest.mark.timeout(10)


# -- the handshake ----------------------------------------------------------------------

def test_challenge_frame_carries_a_fresh_nonce():
    nonce, frame = protocol.challenge()
    other, _ = protocol.challenge()
    assert frame == protocol.CHALLENGE_PREFIX + nonce and len(nonce) == protocol.NONCE_SIZE
    assert nonce != other, 'two challenges carried the same nonce'


def test_client_and_server_agree_on_the_digest():
    nonce, frame = protocol.challenge()
    answer = protocol.digest('key', protocol.parse_challenge(frame))
    proved = protocol.authenticate(nonce, answer, 'key', {})
    assert proved.primary and proved.authkey == 'key' and proved.authenticated


def test_digest_proves_each_matching_account():
    nonce, _ = protocol.challenge()
    answer = protocol.digest('shared', nonce)
    proved = protocol.authenticate(nonce, answer, 'primary',
                                   {'admin': 'shared', 'share': 'shared', 'other': 'x'})
    assert not proved.primary and proved.accounts == {'admin', 'share'}


def test_account_without_a_key_is_never_proved_by_the_empty_key():
    nonce, _ = protocol.challenge()
    proved = protocol.authenticate(nonce, protocol.digest(None, nonce), 'primary',
                                   {'admin': None, 'share': ''})
    assert proved == protocol.ANONYMOUS, f'the empty key proved {proved}'


@pytest.mark.parametrize('answer', [b'', b'x' * 31, b'x' * 33])
def test_wrong_length_answer_is_anonymous(answer):
    nonce, _ = protocol.challenge()
    assert protocol.authenticate(nonce, answer, 'key', {'admin': 'a'}) == protocol.ANONYMOUS


def test_refusal_in_place_of_a_challenge_is_raised_as_its_exception():
    frame = protocol.encode_exception(AveException('too many connections from 10.0.0.1'))
    with pytest.raises(AveException, match='too many connections'):
        protocol.parse_challenge(frame.encode())


def test_garbage_in_place_of_a_challenge_is_an_auth_error():
    with pytest.raises(AuthError):
        protocol.parse_challenge(b'#CHALLENGE#short')


# -- requests ---------------------------------------------------------------------------

def test_a_request_survives_encoding_and_parsing():
    frame = protocol.encode_request('run', {'type': 'workspace', 'uid': 'w'},
                                    ('ls',), {'timeout': 3}, False)
    request = protocol.parse_request(frame.encode())
    assert request == ('run', {'type': 'workspace', 'uid': 'w'}, ['ls'], {'timeout': 3},
                       False)


@pytest.mark.parametrize('request_, field', [
    ([1], 'JSON object'),
    ({'params': {}}, '"method"'),
    ({'method': 'echo'}, '"params" is missing'),
    ({'method': 'echo', 'params': []}, '"params"'),
    ({'method': 'echo', 'params': {'vargs': {}}}, '"params.vargs"'),
    ({'method': 'echo', 'params': {'kwargs': []}}, '"params.kwargs"'),
    ({'method': 'echo', 'params': {}, 'resource': 'x'}, '"resource"'),
    ({'method': 'echo', 'params': {}, 'async': 1}, '"async"'),
])
def test_each_malformed_request_names_its_defect(request_, field):
    with pytest.raises(protocol.MalformedRequest) as caught:
        protocol.parse_request(json.dumps(request_).encode())
    assert field in str(caught.value), f'the message {caught.value} does not name {field}'


def test_too_deeply_nested_json_is_a_malformed_request_not_a_crash():
    with pytest.raises(protocol.MalformedRequest):
        protocol.parse_request(b'[' * 100_000 + b']' * 100_000)


@pytest.mark.parametrize('frame', [
    b'{"method": "echo", "params": {}, "x": "\xff"}',
    '{"method": "echo", "params": {}}'.encode('utf-16'),
])
def test_a_frame_that_is_not_utf_8_is_a_malformed_request_in_one_line(frame):
    with pytest.raises(protocol.MalformedRequest) as caught:
        protocol.parse_request(frame)
    assert str(caught.value).startswith('malformed request: ') and \
        '\n' not in str(caught.value)


def test_a_reply_that_is_not_utf_8_is_a_malformed_reply():
    with pytest.raises(AveException, match='malformed reply'):
        protocol.decode_reply(b'{"result": "\xff"}')


@pytest.mark.parametrize('request_, is_async', [
    ({'async': True, 'method': 7}, True),
    ({'async': True, 'method': 'echo', 'params': []}, True),
    ({'async': 'yes', 'method': 'echo', 'params': {}}, False),
    ([{'async': True}], False),
    ({'exception': {'message': 'the session has ended', 'type': 'Exit', 'trace': []}}, True),
])
def test_one_way_requests_are_recognised_even_when_malformed(request_, is_async):
    with pytest.raises(protocol.MalformedRequest) as caught:
        protocol.parse_request(json.dumps(request_).encode())
    assert caught.value.is_async is is_async


# -- replies ----------------------------------------------------------------------------

def test_result_and_exception_replies_decode_to_value_and_typed_exception():
    assert protocol.decode_reply(protocol.encode_result(('a', 1)).encode()) == ['a', 1]
    with pytest.raises(Timeout, match='too slow'):
        protocol.decode_reply(protocol.encode_exception(Timeout('too slow')).encode())


def test_result_json_cannot_carry_becomes_an_exception_reply():
    reply = json.loads(protocol.encode_result({1, 2}))
    assert 'cannot be sent' in reply['exception']['message']


def test_reply_that_is_not_json_is_one_clear_error():
    with pytest.raises(AveException, match='malformed reply'):
        protocol.decode_reply(b'\xff{')


# -- the peer state table ----------------------------------------------------------------

def test_every_state_can_close_and_closed_is_final():
    for state in (AUTHENTICATING, ESTABLISHED, SERVING, WATCHED):
        assert CLOSED in TRANSITIONS[state], f'{state} cannot close'
    assert not TRANSITIONS[CLOSED] and not TRANSITIONS[RELEASED]


class _Connection:
    address = ('127.0.0.1', 1)

    def fileno(self):
        return 99


def test_a_forbidden_transition_raises_at_once():
    peer = Peer(_Connection(), AUTHENTICATING)
    with pytest.raises(RuntimeError, match='authenticating to serving'):
        peer.move(SERVING)
    assert peer.move(ESTABLISHED) == AUTHENTICATING and peer.state == ESTABLISHED
