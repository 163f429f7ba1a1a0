"""The etcd client against one real etcd member: every operation, leases, watches,
and a member that stops answering."""
import threading
import time

import pytest

from ave.lab.etcd import (Compacted, Compare, Etcd, EtcdError, EtcdUnavailable, LeaseGone,
                          Op, OutcomeUnknown)

from support import wait_until

TIMEOUT = 2.0
SLACK = 1.5     # scheduling noise on a shared machine, on top of a promised bound


@pytest.fixture
def etcd(etcd_node):
    client = Etcd([etcd_node.endpoint], timeout=TIMEOUT)
    yield client
    client.close()


# -- keys -------------------------------------------------------------------------------

def test_put_then_get_returns_value_and_revisions(etcd):
    revision = etcd.put('lab/a', 'α')
    kv = etcd.get('lab/a')
    assert kv.value == 'α'.encode() and kv.text == 'α'
    assert kv.key == 'lab/a' and kv.mod_revision == kv.create_revision == revision
    assert kv.version == 1 and kv.lease == 0


def test_get_of_a_missing_key_is_none(etcd):
    assert etcd.get('lab/nothing') is None


def test_second_put_moves_mod_revision_only(etcd):
    first = etcd.put('lab/a', b'1')
    second = etcd.put('lab/a', b'2')
    kv = etcd.get('lab/a')
    assert (kv.create_revision, kv.mod_revision, kv.version) == (first, second, 2)


def test_get_prefix_is_sorted_bounded_and_carries_the_revision(etcd):
    for key in ['lab/b', 'lab/a', 'lab0', 'lab/c/d', 'other']:
        last = etcd.put(key, key)
    found = etcd.get_prefix('lab/')
    assert [kv.key for kv in found] == ['lab/a', 'lab/b', 'lab/c/d']
    assert found.revision == last
    assert len(etcd.get_prefix('')) == 5, 'the empty prefix means every key'


def test_binary_keys_and_values_round_trip(etcd):
    etcd.put(b'lab/\xff\x00', b'\x00\xff' * 1000)
    kv = etcd.get(b'lab/\xff\x00')
    assert kv.value == b'\x00\xff' * 1000
    assert kv.key.encode('utf-8', 'surrogateescape') == b'lab/\xff\x00'
    assert etcd.get(kv.key).value == kv.value, 'a key handed out as str finds its key'


def test_large_value_round_trips(etcd):
    value = bytes(range(256)) * 4000        # 1 MB, under etcd's 1.5 MiB request cap
    etcd.put('lab/big', value)
    assert etcd.get('lab/big').value == value


def test_delete_says_whether_the_key_existed(etcd):
    etcd.put('lab/a', 'x')
    assert etcd.delete('lab/a') is True
    assert etcd.delete('lab/a') is False
    assert etcd.get('lab/a') is None


def test_delete_prefix_counts_and_spares_other_keys(etcd):
    for key in ['lab/a', 'lab/b', 'lab0']:
        etcd.put(key, 'x')
    assert etcd.delete_prefix('lab/') == 2
    assert [kv.key for kv in etcd.get_prefix('')] == ['lab0']
    with pytest.raises(ValueError):
        etcd.delete_prefix('')


def test_empty_key_is_refused_locally(etcd):
    with pytest.raises(ValueError):
        etcd.put('', 'x')


# -- transactions -----------------------------------------------------------------------

def test_txn_with_every_compare_holding_applies_the_success_branch(etcd):
    lease = etcd.lease_grant(30)
    revision = etcd.put('lab/held', 'job-1', lease=lease)
    result = etcd.txn(
        [Compare.missing('lab/free'), Compare.value('lab/held', 'job-1'),
         Compare.lease('lab/held', lease), Compare.mod_revision('lab/held', revision),
         Compare.version('lab/held', 1), Compare.create_revision('lab/held', revision),
         Compare.exists('lab/held')],
        [Op.put('lab/free', 'job-2', lease=lease), Op.get_prefix('lab/'),
         Op.delete('lab/held')],
        [Op.get('lab/free')])
    assert result.succeeded
    assert result.revision == revision + 1, 'a txn is one revision'
    assert [kv.key for kv in result.responses[1].kvs] == ['lab/free', 'lab/held']
    assert result.responses[2].deleted == 1
    assert etcd.get('lab/free').lease == lease and etcd.get('lab/held') is None


def test_txn_with_one_compare_failing_applies_nothing_of_the_success_branch(etcd):
    etcd.put('lab/a', 'mine')
    before = etcd.get_prefix('').revision
    result = etcd.txn(
        [Compare.value('lab/a', 'mine'), Compare.missing('lab/b'),
         Compare.mod_revision('lab/a', 1, '>'), Compare.value('lab/a', 'theirs')],
        [Op.put('lab/b', '1'), Op.put('lab/c', '1'), Op.delete('lab/a')],
        [Op.get('lab/a'), Op.get('lab/b')])
    assert not result.succeeded
    assert result.responses[0].kvs[0].value == b'mine'
    assert result.responses[1].kvs == ()
    assert etcd.get_prefix('').revision == before, 'a failed txn must change nothing'
    assert etcd.get('lab/b') is None and etcd.get('lab/c') is None


def test_txn_refused_by_etcd_applies_nothing_and_says_why(etcd):
    with pytest.raises(EtcdError, match='duplicate key') as caught:
        etcd.txn([], [Op.put('lab/a', '1'), Op.put('lab/b', '1'), Op.delete('lab/a')])
    assert not isinstance(caught.value, EtcdUnavailable)
    assert etcd.get_prefix('lab/').kvs == ()


def test_txn_compare_operators(etcd):
    etcd.put('lab/a', 'b')
    holds = [Compare.value('lab/a', 'a', '>'), Compare.value('lab/a', 'c', '<'),
             Compare.value('lab/a', 'x', '!='), Compare.version('lab/a', 0, '>'),
             Compare.lease('lab/a', 0), Compare.missing('lab/none'),
             Compare.lease('lab/none', 0)]
    for compare in holds:
        assert etcd.txn([compare], []).succeeded, compare


# -- leases -----------------------------------------------------------------------------

def test_lease_expiry_removes_its_keys(etcd):
    lease = etcd.lease_grant(1)
    etcd.put('lab/host', 'alive', lease=lease)
    assert wait_until(lambda: etcd.get('lab/host') is None, timeout=5), \
        'a key must go when its lease expires'
    with pytest.raises(LeaseGone):
        etcd.lease_keepalive(lease)


def test_keepalive_keeps_the_lease_and_its_keys(etcd):
    lease = etcd.lease_grant(1)
    etcd.put('lab/host', 'alive', lease=lease)
    until = time.monotonic() + 3
    while time.monotonic() < until:
        assert etcd.lease_keepalive(lease) == 1
        time.sleep(0.2)
    assert etcd.get('lab/host') is not None, 'keepalives must keep the key'
    assert etcd.lease_ttl(lease) in (0, 1)


def test_revoke_removes_keys_at_once_and_only_once(etcd):
    lease = etcd.lease_grant(60)
    etcd.put('lab/a', '1', lease=lease)
    etcd.put('lab/b', '1', lease=lease)
    assert sorted(etcd.lease_keys(lease)) == ['lab/a', 'lab/b']
    assert etcd.lease_revoke(lease) is True
    assert etcd.get_prefix('lab/').kvs == ()
    assert etcd.lease_revoke(lease) is False
    for call in (etcd.lease_keepalive, etcd.lease_ttl, etcd.lease_keys):
        with pytest.raises(LeaseGone):
            call(lease)


def test_put_with_an_unknown_lease_is_refused(etcd):
    with pytest.raises(LeaseGone, match='lease not found'):
        etcd.put('lab/a', '1', lease=0x1234)


def test_lease_ttl_counts_down(etcd):
    lease = etcd.lease_grant(30)
    assert 28 <= etcd.lease_ttl(lease) <= 30


# -- watches ----------------------------------------------------------------------------

def read_events(watch, count, timeout=5.0):
    """Read until ``count`` events came or ``timeout`` passed."""
    events = []
    deadline = time.monotonic() + timeout
    while len(events) < count and time.monotonic() < deadline:
        events.extend(watch.read(0.2))
    return events


def summary(events):
    return [(e.type, e.kv.key, e.kv.value, e.kv.mod_revision) for e in events]


def test_watch_replays_history_then_follows_in_order(etcd):
    start = etcd.put('lab/a', '1')
    etcd.put('other', 'x')
    etcd.delete('lab/a')
    with etcd.watch('lab/', start) as watch:
        etcd.put('lab/b', '2')
        events = read_events(watch, 3)
    assert [(t, k, v) for t, k, v, _ in summary(events)] == [
        ('put', 'lab/a', b'1'), ('delete', 'lab/a', b''), ('put', 'lab/b', b'2')]
    revisions = [e.kv.mod_revision for e in events]
    assert revisions == sorted(revisions) and revisions[0] == start
    assert watch.revision == revisions[-1]


def test_watch_from_now_sees_only_later_changes(etcd):
    etcd.put('lab/old', '1')
    with etcd.watch('lab/') as watch:
        revision = etcd.put('lab/new', '2')
        assert summary(read_events(watch, 1)) == [('put', 'lab/new', b'2', revision)]


def test_txn_changes_arrive_as_one_batch(etcd):
    with etcd.watch('lab/') as watch:
        etcd.txn([], [Op.put('lab/a', '1'), Op.put('lab/b', '2'), Op.put('lab/c', '3')])
        batch = watch.read(5)
    assert [e.kv.key for e in batch] == ['lab/a', 'lab/b', 'lab/c']
    assert len({e.kv.mod_revision for e in batch}) == 1


def test_read_returns_nothing_when_nothing_changes_within_the_timeout(etcd):
    with etcd.watch('lab/') as watch:
        started = time.monotonic()
        assert watch.read(0.3) == []
        assert time.monotonic() - started < 0.3 + SLACK


def test_new_watch_from_the_last_seen_revision_misses_and_repeats_nothing(etcd):
    start = etcd.put('lab/0', '0')
    with etcd.watch('lab/', start) as watch:
        first = read_events(watch, 1)
        last_seen = watch.revision
    for i in range(1, 5):
        etcd.put(f'lab/{i}', str(i))
    with etcd.watch('lab/', last_seen + 1) as watch:
        rest = read_events(watch, 4)
        assert watch.read(0.2) == []
    assert [e.kv.key for e in first + rest] == [f'lab/{i}' for i in range(5)]


def test_watch_resumes_by_itself_after_its_member_restarts(etcd, etcd_node):
    watch = etcd.watch('lab/')
    before = etcd.put('lab/before', '1')
    assert summary(read_events(watch, 1)) == [('put', 'lab/before', b'1', before)]
    etcd_node.kill()
    with pytest.raises(EtcdUnavailable):
        for _ in range(20):
            watch.read(0.2)     # the stream is gone and nothing answers: unavailable
    etcd_node.start()
    etcd_node.wait_healthy()
    after = etcd.put('lab/after', '2')
    events = []
    deadline = time.monotonic() + 10
    while not events and time.monotonic() < deadline:
        try:
            events = watch.read(0.5)
        except EtcdUnavailable:
            pass
    watch.close()
    assert summary(events) == [('put', 'lab/after', b'2', after)], \
        'the watch must resume after the last revision it delivered'


def test_watch_of_compacted_history_says_to_reread(etcd):
    first = etcd.put('lab/a', '1')
    for i in range(5):
        etcd.put('lab/a', str(i))
    etcd.compact(first + 3)
    watch = etcd.watch('lab/', first)
    with pytest.raises(Compacted, match='re-read') as caught:
        read_events(watch, 1)
    assert caught.value.compact_revision == first + 3
    with pytest.raises(Compacted):
        watch.read(0.1)
    watch.close()


def test_watch_read_in_a_thread_is_woken_by_close(etcd):
    watch = etcd.watch('lab/')
    got = []
    reader = threading.Thread(target=lambda: got.extend(watch), daemon=True)
    reader.start()
    etcd.put('lab/a', '1')
    assert wait_until(lambda: got, timeout=5), 'the iterating thread must see the put'
    started = time.monotonic()
    watch.close()
    reader.join(5)
    assert not reader.is_alive(), 'close must end iteration in the reading thread'
    assert time.monotonic() - started < 1
    assert watch.read(0.1) == [] and watch.closed


# -- a member that stops answering ------------------------------------------------------

def test_paused_member_makes_calls_fail_within_the_timeout(etcd, etcd_node):
    etcd.put('lab/a', '1')
    etcd_node.pause()
    try:
        for call, error in [(lambda: etcd.get('lab/a'), EtcdUnavailable),
                            (lambda: etcd.put('lab/a', '2'), OutcomeUnknown),
                            (lambda: etcd.lease_grant(5), EtcdUnavailable)]:
            started = time.monotonic()
            with pytest.raises(error) as caught:
                call()
            assert time.monotonic() - started < TIMEOUT + SLACK
            assert etcd_node.endpoint in str(caught.value)
    finally:
        etcd_node.resume()
    assert etcd.get('lab/a') is not None, 'calls work again once the member resumes'


def test_paused_member_under_a_watch_is_noticed_within_the_idle_check(etcd, etcd_node):
    watch = etcd.watch('lab/', idle_check=0.5)
    etcd_node.pause()
    started = time.monotonic()
    try:
        with pytest.raises(EtcdUnavailable):
            for _ in range(50):
                watch.read(0.2)
        assert time.monotonic() - started < 0.5 + 2 * TIMEOUT + SLACK
    finally:
        etcd_node.resume()
    revision = etcd.put('lab/a', '1')
    assert summary(read_events(watch, 1)) == [('put', 'lab/a', b'1', revision)]
    watch.close()


def test_unreachable_endpoint_fails_within_the_timeout():
    from etcd_process import free_port
    client = Etcd([f'http://127.0.0.1:{free_port()}'], timeout=0.5)
    started = time.monotonic()
    with pytest.raises(EtcdUnavailable, match='get: no etcd endpoint answered'):
        client.get('k')
    assert time.monotonic() - started < 0.5 + SLACK


def test_status_names_the_leader(etcd, etcd_node):
    status = etcd.status()
    assert status.is_leader and status.endpoint == etcd_node.endpoint
    assert status.version.startswith('3.')


@pytest.mark.parametrize('endpoints', [
    'http://127.0.0.1:2379', [], ['https://127.0.0.1:2379'], ['127.0.0.1:2379'],
    ['http://127.0.0.1:2379/v3'], ['http://127.0.0.1:99999']])
def test_bad_endpoint_lists_are_refused_at_once(endpoints):
    with pytest.raises(ValueError):
        Etcd(endpoints)


def test_ipv6_endpoint_is_understood():
    client = Etcd(['http://[::1]:2379'])
    assert client.endpoints == ['http://[::1]:2379']


def test_one_client_serves_many_threads_at_once(etcd):
    failures = []

    def worker(number):
        try:
            for i in range(30):
                etcd.put(f'lab/{number}/{i}', str(i))
                assert etcd.get(f'lab/{number}/{i}').value == str(i).encode()
        except Exception as error:  # collected for the assertion below
            failures.append(error)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not failures, failures[:3]
    assert len(etcd.get_prefix('lab/')) == 8 * 30
