"""The etcd client against three real members: a leader killed, a member paused, a
quorum lost; calls and watches carry on wherever that is possible."""
import time

import pytest

from ave.lab.etcd import Etcd, EtcdError, EtcdUnavailable, OutcomeUnknown

from etcd_process import free_port

TIMEOUT = 2.0
SLACK = 1.5


def leader_first(cluster):
    """The endpoints with the leader first, so the client starts on the member killed."""
    leader = cluster.leader()
    return leader, [leader.endpoint] + [n.endpoint for n in cluster.nodes if n is not leader]


def first_success(call, within):
    """Seconds until ``call`` first succeeds, retrying etcd errors; None if never."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        try:
            call()
            return time.monotonic() - started
        except EtcdError:
            time.sleep(0.05)
    return None


def read_events(watch, count, timeout):
    events = []
    deadline = time.monotonic() + timeout
    while len(events) < count and time.monotonic() < deadline:
        try:
            events.extend(watch.read(0.2))
        except EtcdUnavailable:
            pass
    return events


def test_writes_and_reads_continue_within_seconds_of_the_leader_dying(etcd_cluster):
    leader, endpoints = leader_first(etcd_cluster)
    with Etcd(endpoints, timeout=TIMEOUT) as etcd:
        etcd.put('lab/before', '1')
        leader.kill()
        took = first_success(lambda: etcd.put('lab/after', '2'), within=15)
        assert took is not None and took < 6, f'first write after the kill took {took}'
        for i in range(20):   # and then every call works, on the new leader or a follower
            etcd.put(f'lab/{i}', str(i))
            assert etcd.get(f'lab/{i}').value == str(i).encode()
        assert etcd.get('lab/before') is not None
        survivors = [n for n in etcd_cluster.nodes if n is not leader]
        assert etcd_cluster.leader() in survivors


def test_watch_moves_to_another_member_when_its_member_dies(etcd_cluster):
    leader, endpoints = leader_first(etcd_cluster)
    with Etcd(endpoints, timeout=TIMEOUT) as etcd:
        watch = etcd.watch('lab/', idle_check=1.0)
        assert watch.endpoint == leader.endpoint
        etcd.put('lab/0', '0')
        assert len(read_events(watch, 1, 5)) == 1
        leader.kill()
        written = []
        deadline = time.monotonic() + 15
        while len(written) < 10 and time.monotonic() < deadline:
            key = f'lab/{len(written) + 1}'
            try:
                etcd.put(key, 'x')
                written.append(key)
            except EtcdError:
                time.sleep(0.05)
        events = read_events(watch, len(written), 10)
        watch.close()
    assert [e.kv.key for e in events] == written, \
        'after moving, the watch must deliver every later change once, in order'
    assert watch.endpoint != leader.endpoint


def test_paused_member_is_passed_over_and_then_avoided(etcd_cluster):
    follower = etcd_cluster.followers()[0]
    endpoints = [follower.endpoint] + [n.endpoint for n in etcd_cluster.nodes
                                       if n is not follower]
    with Etcd(endpoints, timeout=TIMEOUT) as etcd:
        etcd.put('lab/a', '1')
        follower.pause()
        try:
            started = time.monotonic()
            assert etcd.get('lab/a').value == b'1'
            assert time.monotonic() - started < TIMEOUT + SLACK
            started = time.monotonic()
            for i in range(10):
                etcd.put(f'lab/{i}', 'x')
            assert time.monotonic() - started < TIMEOUT, \
                'once passed over, the paused member must not cost every call a timeout'
        finally:
            follower.resume()


def test_watch_leaves_a_paused_member_without_losing_changes(etcd_cluster):
    follower = etcd_cluster.followers()[0]
    endpoints = [follower.endpoint] + [n.endpoint for n in etcd_cluster.nodes
                                       if n is not follower]
    with Etcd(endpoints, timeout=TIMEOUT) as etcd, Etcd(endpoints[1:]) as writer:
        watch = etcd.watch('lab/', idle_check=0.5)
        assert watch.endpoint == follower.endpoint
        follower.pause()
        try:
            revisions = [writer.put(f'lab/{i}', 'x') for i in range(5)]
            events = read_events(watch, 5, 0.5 + 3 * TIMEOUT + SLACK)
        finally:
            follower.resume()
        watch.close()
    assert [e.kv.mod_revision for e in events] == revisions
    assert watch.endpoint != follower.endpoint


def test_member_without_quorum_refuses_within_the_timeout_and_recovers(etcd_cluster):
    survivor, *others = etcd_cluster.nodes
    with Etcd([survivor.endpoint], timeout=TIMEOUT) as etcd:
        etcd.put('lab/a', '1')
        for node in others:
            node.kill()
        survivor.wait_leaderless()
        for call in (lambda: etcd.get('lab/a'), lambda: etcd.put('lab/a', '2')):
            started = time.monotonic()
            with pytest.raises(EtcdUnavailable, match=survivor.endpoint) as caught:
                call()
            assert time.monotonic() - started < TIMEOUT + SLACK
            assert 'no leader' in str(caught.value), 'asked to refuse without a leader'
            assert not isinstance(caught.value, OutcomeUnknown), \
                'a refusal before raft leaves no doubt about a write'
        for node in others:
            node.start()
        took = first_success(lambda: etcd.put('lab/a', '3'), within=20)
        assert took is not None, 'the cluster must serve again once quorum is back'
        assert etcd.get('lab/a').value == b'3'


def test_refused_endpoint_in_the_list_costs_nothing(etcd_cluster):
    endpoints = [f'http://127.0.0.1:{free_port()}', *etcd_cluster.endpoints]
    with Etcd(endpoints, timeout=TIMEOUT) as etcd:
        started = time.monotonic()
        etcd.put('lab/a', '1')
        assert etcd.get('lab/a') is not None
        assert time.monotonic() - started < 1


def test_status_of_each_member_agrees_on_the_leader(etcd_cluster):
    with Etcd(etcd_cluster.endpoints, timeout=TIMEOUT) as etcd:
        statuses = [etcd.status(endpoint) for endpoint in etcd_cluster.endpoints]
    assert len({s.leader for s in statuses}) == 1
    assert sum(s.is_leader for s in statuses) == 1
    leader = next(s for s in statuses if s.is_leader)
    assert leader.endpoint == etcd_cluster.leader().endpoint
