"""etcd's gateway messages built and checked without a server, and which errors retry."""
import pytest

from ave.lab.etcd_errors import Retry, classify
from ave.lab.etcd_messages import (Compare, MessageError, Op, decode_kv, decode_range,
                                   decode_txn, decode_watch, prefix_end)


@pytest.mark.parametrize('prefix, end', [
    (b'a/', b'a0'), (b'a\xff', b'b'), (b'a\xff\xff', b'b'), (b'\xff', b'\0'), (b'', b'\0')])
def test_prefix_end_covers_exactly_the_keys_under_the_prefix(prefix, end):
    assert prefix_end(prefix) == end


def test_compares_encode_as_the_gateway_expects():
    assert Compare.missing('k').encode() == {
        'key': 'aw==', 'target': 'CREATE', 'result': 'EQUAL', 'create_revision': '0'}
    assert Compare.value('k', 'v', '!=').encode() == {
        'key': 'aw==', 'target': 'VALUE', 'result': 'NOT_EQUAL', 'value': 'dg=='}
    assert Compare.mod_revision('k', 7, '<').encode()['result'] == 'LESS'
    assert Compare.lease('k', 5).encode()['lease'] == '5'


def test_compare_refuses_nonsense():
    with pytest.raises(ValueError):
        Compare(b'k', 'value', '==', 3)
    with pytest.raises(ValueError):
        Compare(b'k', 'version', '>=', 3)
    with pytest.raises(ValueError):
        Compare.value('', 'v')


def test_ops_encode_with_lease_and_ranges():
    assert Op.put('k', b'v', lease=9).encode() == {
        'request_put': {'key': 'aw==', 'value': 'dg==', 'lease': '9'}}
    assert Op.get_prefix('a/').encode() == {
        'request_range': {'key': 'YS8=', 'range_end': 'YTA='}}
    assert Op.delete('k').encode() == {'request_delete_range': {'key': 'aw=='}}
    assert not Op.get('k').writes and Op.delete_prefix('p').writes


def test_key_value_decodes_missing_fields_as_zero():
    kv = decode_kv({'key': 'aw==', 'create_revision': '3', 'mod_revision': '4'})
    assert (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.lease) == (
        'k', b'', 3, 4, 0)


def test_undecodable_key_bytes_survive_as_surrogates():
    kv = decode_kv({'key': '/w=='})   # b'\xff'
    assert kv.key.encode('utf-8', 'surrogateescape') == b'\xff'


@pytest.mark.parametrize('message', [
    {'key': 'not base64!'}, {'key': 5}, {'key': 'aw==', 'mod_revision': 'ten'},
    {'key': 'aw==', 'mod_revision': '99999999999999999999'},
    {'key': 'aw==', 'version': True}, {'key': 'aw==', 'lease': [1]}, 'text'])
def test_malformed_key_values_are_refused(message):
    with pytest.raises(MessageError):
        decode_kv(message)


def test_range_needs_a_list_of_kvs():
    with pytest.raises(MessageError):
        decode_range({'kvs': {'key': 'aw=='}})


def test_txn_response_must_match_the_branch_taken():
    success = (Op.put('k', 'v'), Op.get('k'))
    failure = (Op.get('k'),)
    message = {'header': {'revision': '8'}, 'succeeded': True, 'responses': [
        {'response_put': {}}, {'response_range': {'kvs': [{'key': 'aw==', 'value': 'dg=='}]}}]}
    result = decode_txn(message, success, failure)
    assert result.succeeded and result.revision == 8
    assert result.responses[1].kvs[0].value == b'v'
    with pytest.raises(MessageError, match='2 txn responses for 1 ops'):
        decode_txn({**message, 'succeeded': False}, success, failure)


def test_watch_message_with_events():
    message = decode_watch({'header': {'revision': '9'}, 'events': [
        {'kv': {'key': 'aw==', 'mod_revision': '8'}},
        {'type': 'DELETE', 'kv': {'key': 'aw==', 'mod_revision': '9'}}]})
    assert [(e.type, e.kv.mod_revision) for e in message.events] == [('put', 8), ('delete', 9)]


def test_watch_event_of_unknown_type_is_refused():
    with pytest.raises(MessageError):
        decode_watch({'events': [{'type': 'EXPLODE', 'kv': {}}]})


@pytest.mark.parametrize('code, message, retry', [
    (14, 'etcdserver: no leader', Retry.ANY),
    (8, 'etcdserver: too many requests', Retry.ANY),
    (14, 'etcdserver: request timed out, possibly due to previous leader failure',
     Retry.READS),
    (14, 'etcdserver: something new', Retry.READS),
    (5, 'etcdserver: requested lease not found', Retry.NEVER),
    (3, 'etcdserver: duplicate key given in txn request', Retry.NEVER),
])
def test_only_refusals_before_raft_let_a_write_be_sent_again(code, message, retry):
    assert classify(code, message) is retry
