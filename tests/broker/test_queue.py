"""The waiting queue and its scheduler, on the allocator alone (no sockets, no clock:
every step is given its ``now``)."""
import json
import random

import pytest

from fake_types import fake_types, handset, relay
from ave.broker.allocator import Allocator
from ave.broker.exceptions import Busy, NoSuch
from ave.broker.queue import MAX_PRIORITY, WaitQueue, parse_priority, parse_wait
from ave.exceptions import AveException


TYPES = fake_types()

ANY_RELAY = {'type': 'relay'}
WORKSPACE = {'type': 'workspace'}


def lab(items=(), stacks=()):
    allocator = Allocator(TYPES, stacks, {})
    for profile in items:
        allocator.add(profile)
    return allocator


def key(profile):
    return (profile['type'], profile.get('uid', profile.get('serial')))


def release(allocator, *profiles):
    for profile in profiles:
        allocator.begin_release(key(profile))
        allocator.finish_release(key(profile), clean=True)


def granted(grants):
    return {grant.waiter.holder: grant.keys for grant in grants}


def wait_for(queue, allocator, holder, request, now, priority=0, wait=None):
    """What the broker does for get(wait>0): try now, else queue and schedule."""
    try:
        return queue.allocate_now(allocator, holder, request, now, priority)
    except Busy:
        waiter = queue.add(holder, request, now, priority, wait)
        grants = queue.schedule(allocator, now)
        assert waiter.holder not in granted(grants), 'Busy a moment ago, granted now?'
        return waiter


# -- the basics --------------------------------------------------------------------------

def test_release_grants_the_waiter():
    allocator, queue = lab([relay('r1')]), WaitQueue()
    allocator.allocate('a', [relay('r1')])
    wait_for(queue, allocator, 'w', [relay('r1')], now=1)
    release(allocator, relay('r1'))
    assert granted(queue.schedule(allocator, now=2)) == {'w': [key(relay('r1'))]}
    assert allocator.items[key(relay('r1'))].holder == 'w', 'the grant must assign it'
    assert allocator.items[key(relay('r1'))].since == 2, 'the grant time is recorded'
    assert len(queue) == 0


def test_three_waiters_are_served_in_arrival_order():
    allocator, queue = lab([relay('r1')]), WaitQueue()
    allocator.allocate('a', [relay('r1')])
    for now, holder in enumerate(['x', 'y', 'z'], 1):
        wait_for(queue, allocator, holder, [ANY_RELAY], now)
    served = []
    for now in range(10, 13):
        release(allocator, relay('r1'))
        served += list(granted(queue.schedule(allocator, now)))
    assert served == ['x', 'y', 'z']


def test_higher_priority_is_served_first():
    allocator, queue = lab([relay('r1')]), WaitQueue()
    allocator.allocate('a', [relay('r1')])
    wait_for(queue, allocator, 'low', [ANY_RELAY], now=1, priority=0)
    wait_for(queue, allocator, 'high', [ANY_RELAY], now=2, priority=5)
    release(allocator, relay('r1'))
    assert list(granted(queue.schedule(allocator, now=3))) == ['high']


def test_ageing_lets_a_long_waiter_pass_a_newer_higher_priority_request():
    allocator, queue = lab([relay('r1')]), WaitQueue(aging_s=600)
    allocator.allocate('a', [relay('r1')])
    wait_for(queue, allocator, 'old', [ANY_RELAY], now=0, priority=0)
    wait_for(queue, allocator, 'new', [ANY_RELAY], now=1300, priority=2)
    release(allocator, relay('r1'))
    assert list(granted(queue.schedule(allocator, now=1301))) == ['old'], (
        'waiting 1300 s is worth more than 2 levels at 600 s per level')


def test_ageing_does_not_let_a_short_wait_pass_a_higher_priority():
    allocator, queue = lab([relay('r1')]), WaitQueue(aging_s=600)
    allocator.allocate('a', [relay('r1')])
    wait_for(queue, allocator, 'old', [ANY_RELAY], now=0, priority=0)
    wait_for(queue, allocator, 'new', [ANY_RELAY], now=1100, priority=2)
    release(allocator, relay('r1'))
    assert list(granted(queue.schedule(allocator, now=1101))) == ['new']


def test_order_of_waiters_never_changes_while_they_wait():
    """Stepwise ageing would swap these two every 300 s; continuous ageing never does."""
    allocator, queue = lab([relay('r1')]), WaitQueue(aging_s=600)
    allocator.allocate('a', [relay('r1')])
    wait_for(queue, allocator, 'a0', [ANY_RELAY], now=0, priority=0)
    wait_for(queue, allocator, 'b1', [ANY_RELAY], now=300, priority=1)
    orders = set()
    for now in range(300, 5000, 50):
        queue.schedule(allocator, now)
        orders.add(tuple(w.holder for w in queue.order()))
    assert orders == {('b1', 'a0')}


def test_without_ageing_priority_then_arrival_decides():
    allocator, queue = lab([relay('r1')]), WaitQueue(aging_s=None)
    allocator.allocate('a', [relay('r1')])
    wait_for(queue, allocator, 'old', [ANY_RELAY], now=0, priority=0)
    wait_for(queue, allocator, 'new', [ANY_RELAY], now=10 ** 6, priority=1)
    assert [w.holder for w in queue.order()] == ['new', 'old']


# -- head, reservations, backfilling -----------------------------------------------------

def test_head_keeps_what_it_was_given_while_it_waits_for_the_rest():
    allocator, queue = lab([relay('r1'), relay('r2')]), WaitQueue()
    allocator.allocate('a', [relay('r1')])
    allocator.allocate('b', [relay('r2')])
    wait_for(queue, allocator, 'w', [relay('r1'), relay('r2')], now=1)
    release(allocator, relay('r1'))
    assert queue.schedule(allocator, now=2) == []
    assert allocator.reserved_by('w') == [key(relay('r1'))]
    with pytest.raises(Busy):
        queue.allocate_now(allocator, 'c', [relay('r1')], now=3)
    wait_for(queue, allocator, 'later', [relay('r1')], now=4)
    assert queue.schedule(allocator, now=5) == [], 'a reserved item went to a later waiter'
    release(allocator, relay('r2'))
    grants = granted(queue.schedule(allocator, now=6))
    assert grants == {'w': [key(relay('r1')), key(relay('r2'))]}


def test_request_needing_nothing_the_head_waits_for_is_granted_at_once():
    allocator, queue = lab([relay('r1'), relay('r2'), relay('r3')]), WaitQueue()
    allocator.allocate('a', [relay('r1')])
    wait_for(queue, allocator, 'head', [relay('r1'), relay('r2')], now=1)
    assert allocator.reserved_by('head') == [key(relay('r2'))]
    got = queue.allocate_now(allocator, 'c', [ANY_RELAY], now=2)
    assert [key(item.profile) for item in got] == [key(relay('r3'))]


def test_waiter_behind_the_head_backfills_when_equipment_comes_free():
    allocator, queue = lab([relay('r1'), relay('r2'), handset('h1')]), WaitQueue()
    allocator.allocate('a', [handset('h1')])
    allocator.allocate('b', [relay('r2')])
    wait_for(queue, allocator, 'head', [handset('h1'), relay('r1')], now=1)
    wait_for(queue, allocator, 'small', [relay('r2')], now=2)
    release(allocator, relay('r2'))
    assert granted(queue.schedule(allocator, now=3)) == {'small': [key(relay('r2'))]}


def test_released_item_goes_to_the_earliest_waiter_that_can_use_it():
    allocator, queue = lab([relay('r1'), handset('h1')]), WaitQueue()
    allocator.allocate('a', [relay('r1')])
    allocator.allocate('b', [handset('h1')])
    wait_for(queue, allocator, 'head', [handset('h1')], now=1)
    wait_for(queue, allocator, 'second', [ANY_RELAY], now=2)
    wait_for(queue, allocator, 'third', [ANY_RELAY], now=3)
    release(allocator, relay('r1'))
    assert list(granted(queue.schedule(allocator, now=4))) == ['second']


def test_non_head_waiters_hold_nothing_back():
    """Only the head reserves: a two-item request behind the head does not keep a free
    item idle while it waits for its other item."""
    allocator, queue = lab([relay('r1'), relay('r2'), handset('h1')]), WaitQueue()
    allocator.allocate('a', [handset('h1')])
    allocator.allocate('b', [relay('r2')])
    wait_for(queue, allocator, 'head', [handset('h1')], now=1)
    wait_for(queue, allocator, 'pair', [relay('r1'), relay('r2')], now=2)
    assert allocator.reserved_by('pair') == []
    got = queue.allocate_now(allocator, 'c', [relay('r1')], now=3)
    assert [key(item.profile) for item in got] == [key(relay('r1'))]


def test_head_with_reservations_stays_head_when_higher_priority_arrives():
    allocator, queue = lab([relay('r1'), relay('r2')]), WaitQueue()
    allocator.allocate('b', [relay('r2')])
    wait_for(queue, allocator, 'head', [relay('r1'), relay('r2')], now=1)
    wait_for(queue, allocator, 'vip', [relay('r1'), relay('r2')], now=2, priority=50)
    assert [w.holder for w in queue.order()] == ['head', 'vip']
    release(allocator, relay('r2'))
    assert list(granted(queue.schedule(allocator, now=3))) == ['head']


def test_head_without_reservations_gives_way_to_higher_priority():
    allocator, queue = lab([relay('r1')]), WaitQueue()
    allocator.allocate('a', [relay('r1')])
    wait_for(queue, allocator, 'first', [relay('r1')], now=1)
    wait_for(queue, allocator, 'vip', [relay('r1')], now=2, priority=50)
    release(allocator, relay('r1'))
    assert list(granted(queue.schedule(allocator, now=3))) == ['vip']


def test_higher_priority_newcomer_may_backfill_around_a_reserving_head():
    allocator, queue = lab([relay('r1'), relay('r2'), relay('r3')]), WaitQueue()
    allocator.allocate('b', [relay('r2')])
    wait_for(queue, allocator, 'head', [relay('r1'), relay('r2')], now=1)
    got = queue.allocate_now(allocator, 'vip', [ANY_RELAY], now=2, priority=50)
    assert [key(item.profile) for item in got] == [key(relay('r3'))]


def test_released_item_being_reset_is_waited_for_not_refused():
    allocator, queue = lab([relay('r1')]), WaitQueue()
    allocator.allocate('a', [relay('r1')])
    allocator.begin_release(key(relay('r1')))
    with pytest.raises(Busy):
        queue.allocate_now(allocator, 'w', [relay('r1')], now=1)
    wait_for(queue, allocator, 'w', [relay('r1')], now=1)
    allocator.finish_release(key(relay('r1')))
    assert list(granted(queue.schedule(allocator, now=2))) == ['w']


# -- stacks and collateral ---------------------------------------------------------------

STACKS = [[handset('h1'), relay('r1')], [handset('h2'), relay('r2')]]


def stacked_lab():
    return lab([handset('h1'), relay('r1'), handset('h2'), relay('r2'), relay('r9')], STACKS)


def test_waiter_for_a_stack_is_granted_when_the_stack_clears():
    allocator, queue = stacked_lab(), WaitQueue()
    allocator.allocate('a', [handset('h1')])
    allocator.allocate('b', [handset('h2')])
    group = [[{'type': 'handset'}, ANY_RELAY]]
    wait_for(queue, allocator, 'w', group, now=1)
    release(allocator, handset('h2'))
    grants = granted(queue.schedule(allocator, now=2))
    assert grants == {'w': [key(handset('h2')), key(relay('r2'))]}


def test_reserved_item_makes_its_stack_mates_collateral():
    allocator, queue = stacked_lab(), WaitQueue()
    allocator.allocate('a', [relay('r9')])
    wait_for(queue, allocator, 'head', [handset('h1'), relay('r9')], now=1)
    assert allocator.reserved_by('head') == [key(handset('h1'))]
    with pytest.raises(Busy):
        queue.allocate_now(allocator, 'c', [relay('r1')], now=2)
    [blocker] = queue.blockers(allocator, 'c', [relay('r1')], now=2)
    assert (blocker.reason, blocker.holder, blocker.via) == (
        'collateral', 'head', key(handset('h1')))


def test_stack_mate_of_an_item_the_head_waits_for_is_not_given_away():
    """The head waits for r1 while it is being reset; handing out h1 meanwhile would
    make r1 collateral of someone else the moment it is free."""
    allocator, queue = stacked_lab(), WaitQueue()
    allocator.allocate('a', [relay('r1')])
    allocator.begin_release(key(relay('r1')))
    wait_for(queue, allocator, 'head', [relay('r1')], now=1)
    with pytest.raises(Busy):
        queue.allocate_now(allocator, 'c', [handset('h1')], now=2)
    allocator.finish_release(key(relay('r1')))
    assert list(granted(queue.schedule(allocator, now=3))) == ['head']


def test_holder_of_a_stack_member_may_not_take_what_the_head_waits_for():
    allocator, queue = stacked_lab(), WaitQueue()
    allocator.allocate('a', [handset('h1')])
    wait_for(queue, allocator, 'head', [relay('r1')], now=1)
    with pytest.raises(Busy):
        queue.allocate_now(allocator, 'a', [relay('r1')], now=2)
    [blocker] = queue.blockers(allocator, 'a', [relay('r1')], now=2)
    assert (blocker.reason, blocker.holder) == ('claimed', 'head')


# -- leaving the queue -------------------------------------------------------------------

def test_waiter_leaves_at_its_deadline_and_gives_back_its_reservations():
    allocator, queue = lab([relay('r1'), relay('r2')]), WaitQueue()
    allocator.allocate('b', [relay('r2')])
    wait_for(queue, allocator, 'w', [relay('r1'), relay('r2')], now=10, wait=30)
    wait_for(queue, allocator, 'x', [relay('r1')], now=11, wait=100)
    assert queue.next_deadline() == 40
    assert queue.expire(allocator, now=39) == []
    assert [w.holder for w in queue.expire(allocator, now=40)] == ['w']
    assert allocator.reserved_by('w') == []
    assert list(granted(queue.schedule(allocator, now=40))) == ['x']
    assert queue.next_deadline() is None


def test_disconnected_head_leaves_at_once_and_its_items_go_on():
    allocator, queue = lab([relay('r1'), relay('r2')]), WaitQueue()
    allocator.allocate('b', [relay('r2')])
    head = wait_for(queue, allocator, 'w', [relay('r1'), relay('r2')], now=1)
    wait_for(queue, allocator, 'x', [relay('r1')], now=2)
    assert queue.remove(head.id, allocator) is head
    assert queue.head is None and allocator.reserved_by('w') == []
    assert list(granted(queue.schedule(allocator, now=3))) == ['x']
    assert queue.remove(head.id, allocator) is None, 'a second removal is a no-op'


def test_waiter_whose_equipment_vanished_turns_dormant_and_blocks_nobody():
    allocator, queue = lab([relay('r1'), relay('r2')]), WaitQueue()
    allocator.allocate('b', [relay('r2')])
    wait_for(queue, allocator, 'w', [relay('r1'), relay('r2')], now=1)
    allocator.remove(key(relay('r1')))
    allocator.add(relay('r3'))
    wait_for(queue, allocator, 'x', [ANY_RELAY], now=2)
    assert allocator.reserved_by('w') == [], 'a dormant waiter keeps nothing back'
    assert allocator.items[key(relay('r3'))].holder == 'x'


# -- refusals ----------------------------------------------------------------------------

def test_nothing_that_could_ever_match_is_nosuch_at_once():
    allocator, queue = lab([relay('r1')]), WaitQueue()
    with pytest.raises(NoSuch):
        queue.allocate_now(allocator, 'w', [relay('r7')], now=1)


def test_client_holding_equipment_may_not_wait():
    allocator, queue = lab([relay('r1'), relay('r2')]), WaitQueue()
    allocator.allocate('a', [relay('r1'), WORKSPACE])
    with pytest.raises(AveException, match='relay r1'):
        queue.check_may_wait(allocator, 'a')
    allocator.allocate('b', [WORKSPACE])
    queue.check_may_wait(allocator, 'b')  # a workspace alone does not count


def test_one_waiting_request_per_client():
    allocator, queue = lab([relay('r1')]), WaitQueue()
    allocator.allocate('a', [relay('r1')])
    wait_for(queue, allocator, 'w', [relay('r1')], now=1)
    with pytest.raises(AveException, match='already waiting'):
        queue.add('w', [relay('r1')], now=2)
    with pytest.raises(AveException, match='already waiting'):
        queue.allocate_now(allocator, 'w', [relay('r1')], now=2)
    with pytest.raises(AveException, match='already waiting'):
        queue.check_may_wait(allocator, 'w')


def test_full_queue_refuses_more_waiters():
    allocator, queue = lab([relay('r1')]), WaitQueue(limit=3)
    allocator.allocate('a', [relay('r1')])
    for holder in range(3):
        queue.add(holder, [relay('r1')], now=1)
    with pytest.raises(Busy, match='waiting already'):
        queue.add(99, [relay('r1')], now=1)


@pytest.mark.parametrize('value', [-1, float('nan'), float('inf'), '5', True, [1],
                                   10 ** 400, 'x' * 10000])
def test_bad_wait_is_one_clear_short_error(value):
    with pytest.raises(AveException, match='wait must be') as error:
        parse_wait(value)
    assert len(str(error.value)) < 120, 'a peer must not fill our messages'


def test_wait_accepts_seconds_and_none():
    assert (parse_wait(0), parse_wait(2), parse_wait(0.5), parse_wait(None)) == (
        0.0, 2.0, 0.5, None)


def test_oversize_waiting_request_is_refused():
    huge = [{'type': 'relay', 'uid': 'r1', 'note': 'x' * 100000}]
    with pytest.raises(AveException, match='at most'):
        WaitQueue().add('w', huge, now=1)


@pytest.mark.parametrize('value', [MAX_PRIORITY + 1, -MAX_PRIORITY - 1, 1.5, '1', False,
                                   10 ** 100])
def test_bad_priority_is_one_clear_error(value):
    with pytest.raises(AveException, match='priority must be'):
        parse_priority(value)


def test_wait_zero_is_not_queued():
    with pytest.raises(AveException, match='does not wait'):
        WaitQueue().add('w', [relay('r1')], now=1, wait=0)


def test_busy_names_holders_and_since():
    allocator, queue = lab([relay('r1')]), WaitQueue()
    allocator.allocate('a', [relay('r1')], now=1234.5)
    [blocker] = queue.blockers(allocator, 'b', [relay('r1')], now=2000)
    assert (blocker.key, blocker.reason, blocker.holder, blocker.since) == (
        key(relay('r1')), 'held', 'a', 1234.5)


# -- workspaces in waiting requests ------------------------------------------------------

def test_workspace_is_made_only_when_the_request_is_granted():
    allocator, queue = lab([relay('r1')]), WaitQueue()
    allocator.allocate('a', [relay('r1')])
    wait_for(queue, allocator, 'w', [WORKSPACE, relay('r1')], now=1)
    queue.schedule(allocator, now=2)
    assert list(allocator.items) == [key(relay('r1'))], 'no workspace while waiting'
    release(allocator, relay('r1'))
    [grant] = queue.schedule(allocator, now=3)
    assert grant.keys[0][0] == 'workspace' and grant.keys[1] == key(relay('r1'))
    assert allocator.items[grant.keys[0]].holder == 'w'


# -- the public listing and the handover -------------------------------------------------

def test_describe_lists_waiters_in_order():
    allocator, queue = lab([relay('r1')]), WaitQueue()
    allocator.allocate('a', [relay('r1')])
    wait_for(queue, allocator, 'x', [relay('r1')], now=10)
    wait_for(queue, allocator, 'y', [ANY_RELAY], now=20, priority=3)
    assert queue.describe(now=25) == [
        {'position': 1, 'holder': 'y', 'profiles': [ANY_RELAY], 'priority': 3,
         'waited_s': 5},
        {'position': 2, 'holder': 'x', 'profiles': [relay('r1')], 'priority': 0,
         'waited_s': 15}]


def clone(allocator, queue):
    """A successor's view: both states through JSON text, rebuilt from scratch."""
    items = json.loads(json.dumps([item.to_json() for item in allocator.items.values()]))
    successor = Allocator(TYPES, allocator.stacks, {})
    for entry in items:
        successor.restore_item(entry)
    state = json.loads(json.dumps(queue.to_json()))
    return successor, WaitQueue.from_json(state, queue.aging_s, queue.limit)


def test_state_mid_wait_survives_a_json_round_trip():
    allocator, queue = stacked_lab(), WaitQueue()
    allocator.allocate('a', [relay('r9')], now=1)
    allocator.allocate('b', [handset('h2')], now=2)
    wait_for(queue, allocator, 'head', [handset('h1'), relay('r9')], now=3, wait=60)
    wait_for(queue, allocator, 'next', [[{'type': 'handset'}, ANY_RELAY]], now=4, priority=2)
    successor, restored = clone(allocator, queue)
    assert restored.to_json() == queue.to_json()
    assert [i.to_json() for i in successor.items.values()] == [
        i.to_json() for i in allocator.items.values()]
    assert restored.next_deadline() == 63
    for table in (allocator, successor):
        release(table, relay('r9'), handset('h2'))
    grants = queue.schedule(allocator, 5)
    assert len(grants) == 2, 'the release should complete both waiters'
    assert restored.schedule(successor, 5) == grants, 'the successor decided otherwise'


# -- starvation --------------------------------------------------------------------------

def test_pair_request_is_not_starved_by_two_clients_trading_its_items():
    """Two clients in a loop: give back the relay held, take any relay again at once.
    One of r1 and r2 is always held, yet a request for both is granted within a few
    releases."""
    allocator, queue = lab([relay('r1'), relay('r2')]), WaitQueue()
    allocator.allocate('a', [relay('r1')])
    allocator.allocate('b', [relay('r2')])
    wait_for(queue, allocator, 'pair', [relay('r1'), relay('r2')], now=0)
    for step in range(1, 100):
        client = 'a' if step % 2 else 'b'
        for k in allocator.held_by(client):
            release(allocator, allocator.items[k].profile)
        if 'pair' in granted(queue.schedule(allocator, step)):
            assert step <= 2, f'the pair waited {step} releases'
            return
        try:
            queue.allocate_now(allocator, client, [ANY_RELAY], now=step)
        except Busy:
            pass
    pytest.fail('the pair request was starved for 99 releases')


def test_without_the_queue_the_pair_request_would_starve():
    """The same loop against plain allocate(), as poll-on-Busy clients see it: the
    reason the queue exists, and a check that the test above tests something."""
    allocator = lab([relay('r1'), relay('r2')])
    allocator.allocate('a', [relay('r1')])
    allocator.allocate('b', [relay('r2')])
    for step in range(1, 50):
        client = 'a' if step % 2 else 'b'
        for k in allocator.held_by(client):
            release(allocator, allocator.items[k].profile)
        allocator.allocate(client, [ANY_RELAY])
        with pytest.raises(Busy):
            allocator.allocate('pair', [relay('r1'), relay('r2')])


# -- random runs, checking the invariants after every step -------------------------------

RANDOM_ITEMS = [handset(f'h{i}') for i in range(1, 5)] + [relay(f'r{i}') for i in range(1, 7)]
RANDOM_STACKS = [[handset('h1'), relay('r1')], [handset('h2'), relay('r2')],
                 [handset('h3'), relay('r3'), relay('r4')]]


def random_request(rng):
    def one():
        kind = rng.choice(['handset', 'relay'])
        if rng.random() < 0.4:
            pinned = rng.choice([p for p in RANDOM_ITEMS if p['type'] == kind])
            return dict(pinned)
        return {'type': kind}
    size = rng.choice([1, 1, 1, 2, 2, 3])
    if size > 1 and rng.random() < 0.3:
        return [[{'type': 'handset'}] + [{'type': 'relay'}] * (size - 1)]
    request = [one() for _ in range(size)]
    if rng.random() < 0.1:
        request.append(dict(WORKSPACE))
    return request


def fits(allocator, request, keys):
    """Is ``keys`` a complete, valid answer to ``request``?"""
    size = sum(len(entry) if isinstance(entry, list) else 1 for entry in request)
    if len(keys) != size or len(set(keys)) != len(keys):
        return False
    position = 0
    for entry in request:
        group = entry if isinstance(entry, list) else [entry]
        profiles = [allocator.items[k].profile for k in keys[position:position + len(group)]]
        if not all(p.match(w) for p, w in zip(profiles, group)):
            return False
        if isinstance(entry, list) and not any(
                all(any(p.match(m) for m in stack) for p in profiles)
                for stack in allocator.stacks):
            return False
        position += len(group)
    return True


def check_invariants(allocator, queue, owned, reserved_before, left, grants):
    """``owned`` is the test's own record of who holds what, kept from grants and
    releases: a grant of a held item would overwrite its holder, not show two."""
    for holder, keys in grants:
        for k in keys:
            assert k not in owned, f'{k} granted to {holder} while {owned.get(k)} holds it'
            owned[k] = holder
            before = reserved_before.get(k)
            assert before in (None, holder) or before in left, (
                f'{k} was reserved for {before} and granted to {holder}')
    held = {k: item.holder for k, item in allocator.items.items() if item.holder is not None}
    assert held == owned, 'the table and the record of grants disagree on who holds what'
    for k, item in allocator.items.items():
        assert not (item.holder is not None and item.reserved_for is not None), (
            f'{k} is both held and reserved')
    reservers = {item.reserved_for for item in allocator.items.values()
                 if item.reserved_for is not None}
    assert len(reservers) <= 1, f'more than one waiter holds reservations: {reservers}'
    if reservers:
        assert queue.head is not None and {queue.waiters[queue.head].holder} == reservers
    assert_nobody_left_grantable(allocator, queue)


def assert_nobody_left_grantable(allocator, queue):
    """Search each waiter on a copy, as the rules say and without the pass's shortcuts:
    none may be grantable, the head with nothing avoided, the others avoiding the
    head's plan."""
    successor, restored = clone(allocator, queue)
    claims = None
    for waiter in restored.order():
        got = successor.try_allocate(waiter.holder, waiter.request, avoid=claims or ())
        assert got is None, f'{waiter.holder} was left waiting but fits now'
        if claims is None:
            planned = successor.plan(waiter.holder, waiter.request)
            claims = None if planned is None else dict.fromkeys(planned)
    assert restored.schedule(successor, 10 ** 9) == [], 'a second pass granted more'


@pytest.mark.parametrize('seed', range(12))
def test_random_runs_keep_the_invariants(seed):
    rng = random.Random(seed)
    allocator, queue = lab(RANDOM_ITEMS, RANDOM_STACKS), WaitQueue(aging_s=50)
    requests, owned = {}, {}
    for step in range(300):
        now = float(step)
        reserved_before = {k: i.reserved_for for k, i in allocator.items.items()
                           if i.reserved_for is not None}
        left, grants = set(), []
        action = rng.random()
        holder = f'c{rng.randrange(25)}'
        held = allocator.held_by(holder)
        if action < 0.45 and not held and queue.waiter_of(holder) is None:
            request = random_request(rng)
            requests[holder] = request
            try:
                items = queue.allocate_now(allocator, holder, request, now,
                                           rng.randint(-2, 2))
                grants.append((holder, [allocator.key_of(i.profile) for i in items]))
            except NoSuch:
                pass
            except Busy:
                if rng.random() < 0.8:
                    queue.add(holder, request, now, rng.randint(-2, 2),
                              rng.choice([None, 5.0, 30.0]))
        elif action < 0.8 and held:
            for k in held:
                del owned[k]
                allocator.begin_release(k)
                if rng.random() < 0.7:
                    allocator.finish_release(k)
        elif action < 0.9:
            releasing = [k for k, i in allocator.items.items() if i.releasing]
            if releasing:
                allocator.finish_release(rng.choice(releasing))
        elif queue.waiters:
            waiter = rng.choice(list(queue.waiters.values()))
            left.add(waiter.holder)
            queue.remove(waiter.id, allocator)
        left.update(w.holder for w in queue.expire(allocator, now))
        for grant in queue.schedule(allocator, now):
            grants.append((grant.waiter.holder, grant.keys))
            left.add(grant.waiter.holder)  # a granted head's spare reservations go on
        for holder, keys in grants:
            assert fits(allocator, requests[holder], keys), (
                f'{keys} does not fit {requests[holder]}')
        check_invariants(allocator, queue, owned, reserved_before, left, grants)
    drain(allocator, queue, rng)


def drain(allocator, queue, rng):
    """Release everything repeatedly: every waiter must be served in bounded steps."""
    for step in range(200):
        if not queue.waiters:
            return
        for k, item in list(allocator.items.items()):
            if item.holder is not None or item.releasing:
                allocator.begin_release(k)
                allocator.finish_release(k)
        queue.schedule(allocator, 10 ** 6 + step)
    pytest.fail(f'{len(queue)} waiters never served once everything was released')
