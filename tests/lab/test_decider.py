"""The lab's decisions without etcd: a mirror filled by hand, a Decider over it."""
from __future__ import annotations

import json

import pytest

from ave.equipment import load_types
from ave.lab.decider import Decider
from ave.lab.etcd import KeyValue, WatchEvent
from ave.lab.mirror import LabKeys, Mirror

pytestmark = pytest.mark.timeout(10)

KEYS = LabKeys('lab1')
TYPES = load_types()


def kv(key: str, value, revision: int = 1, lease: int = 7) -> KeyValue:
    return KeyValue(key, json.dumps(value).encode(), revision, revision, 1, lease)


def relay(host: str, uid: str) -> KeyValue:
    profile = {'type': 'relay', 'uid': uid, 'circuits': ['c1'], 'power_state': 'online',
               'host': host}
    return kv(KEYS.item(host, 'relay', uid), {'profile': profile})


def request(job: str, profiles, number: int = 1, wait=0, arrived: float = 1.0) -> KeyValue:
    return kv(KEYS.request(job, number), {'profiles': profiles, 'wait': wait,
                                          'priority': 0, 'arrived': arrived,
                                          'host': 'a'})


def hold(host: str, uid: str, job: str) -> KeyValue:
    return kv(KEYS.hold(host, 'relay', uid), {'job': job, 'since': 1.0})


def mirror_of(*kvs: KeyValue) -> Mirror:
    mirror = Mirror(KEYS)
    mirror.load(kvs, 10)
    return mirror


def put(mirror: Mirror, *kvs: KeyValue) -> None:
    mirror.apply([WatchEvent('put', KeyValue(k.key, k.value, 20, 20, 1, k.lease))
                  for k in kvs])


def delete(mirror: Mirror, key: str) -> None:
    mirror.apply([WatchEvent('delete', KeyValue(key, b'', 0, 21, 0, 0))])


@pytest.fixture
def decider():
    return Decider(TYPES, aging_s=600, limit=100)


def test_a_request_spanning_hosts_is_granted_whole(decider):
    mirror = mirror_of(relay('a', 'r1'), relay('b', 'r2'),
                       request('j1', [{'type': 'relay', 'uid': 'r1'},
                                      {'type': 'relay', 'uid': 'r2'}]))
    (decision,) = decider.decide(mirror, 5.0)
    assert decision.error is None
    assert decision.refs == [('a', 'relay', 'r1'), ('b', 'relay', 'r2')]


def test_two_hosts_may_both_have_an_r1(decider):
    mirror = mirror_of(relay('a', 'r1'), relay('b', 'r1'),
                       request('j1', [{'type': 'relay', 'uid': 'r1', 'host': 'b'}]))
    (decision,) = decider.decide(mirror, 5.0)
    assert decision.refs == [('b', 'relay', 'r1')]


def test_held_equipment_is_busy_for_a_request_that_does_not_wait(decider):
    mirror = mirror_of(relay('a', 'r1'), hold('a', 'r1', 'j0'),
                       request('j1', [{'type': 'relay', 'uid': 'r1'}]))
    (decision,) = decider.decide(mirror, 5.0)
    assert decision.error['type'] == 'Busy' and 'a/r1' in decision.error['message']


def test_a_decision_in_flight_is_never_given_out_again(decider):
    mirror = mirror_of(relay('a', 'r1'), request('j1', [{'type': 'relay'}]))
    (first,) = decider.decide(mirror, 5.0)
    put(mirror, request('j2', [{'type': 'relay'}], arrived=2.0))
    (second,) = decider.decide(mirror, 6.0)
    assert first.refs and second.error['type'] == 'Busy', \
        'an item whose hold was not yet seen was granted twice'


def test_a_waiting_request_is_granted_when_the_hold_goes(decider):
    mirror = mirror_of(relay('a', 'r1'), hold('a', 'r1', 'j0'),
                       request('j1', [{'type': 'relay', 'uid': 'r1'}], wait=30))
    assert decider.decide(mirror, 5.0) == []
    delete(mirror, KEYS.hold('a', 'relay', 'r1'))
    (decision,) = decider.decide(mirror, 6.0)
    assert decision.refs == [('a', 'relay', 'r1')]


def test_an_item_let_go_but_still_being_reset_is_not_granted(decider):
    let_go = kv(KEYS.hold('a', 'relay', 'r1'), {'job': 'j0', 'yielded': True})
    mirror = mirror_of(relay('a', 'r1'), let_go,
                       request('j1', [{'type': 'relay', 'uid': 'r1'}], wait=30))
    assert decider.decide(mirror, 5.0) == []
    assert decider.table(mirror).items[('relay', 'a/r1')].state == 'releasing'


def test_a_withdrawn_request_leaves_the_queue(decider):
    mirror = mirror_of(relay('a', 'r1'), hold('a', 'r1', 'j0'),
                       request('j1', [{'type': 'relay', 'uid': 'r1'}], wait=30))
    decider.decide(mirror, 5.0)
    delete(mirror, KEYS.request('j1', 1))
    delete(mirror, KEYS.hold('a', 'relay', 'r1'))
    assert decider.decide(mirror, 6.0) == [] and len(decider.queue) == 0


def test_a_workspace_lands_on_the_host_of_the_equipment_asked_with_it(decider):
    mirror = mirror_of(relay('b', 'r2'),
                       request('j1', [{'type': 'workspace'}, {'type': 'relay'}]))
    (decision,) = decider.decide(mirror, 5.0)
    workspace, relay_profile = decision.granted
    assert (workspace['type'], workspace['host'], relay_profile['host']) == \
        ('workspace', 'b', 'b')


def test_a_workspace_alone_lands_on_the_requesting_host(decider):
    mirror = mirror_of(request('j1', [{'type': 'workspace'}]))
    (decision,) = decider.decide(mirror, 5.0)
    assert decision.granted[0]['host'] == 'a'


def test_nosuch_for_equipment_no_host_has(decider):
    mirror = mirror_of(relay('a', 'r1'), request('j1', [{'type': 'relay', 'uid': 'r9'}]))
    (decision,) = decider.decide(mirror, 5.0)
    assert decision.error['type'] == 'NoSuch'


def test_the_mirror_ignores_keys_and_values_that_are_not_the_labs():
    mirror = mirror_of(KeyValue(KEYS.prefix + 'items/a/relay', b'{}', 1, 1, 1, 0),
                       KeyValue(KEYS.item('a', 'relay', 'r1'), b'not json', 1, 1, 1, 0),
                       KeyValue('/other/key', b'{}', 1, 1, 1, 0))
    assert mirror.entries == {}
