"""Allocation rules, exercised on the allocator alone (no sockets, no processes)."""
import pytest

from fake_types import HandsetLike, SerialProfile, fake_types, handset, relay
from ave.broker.allocator import Allocator
from ave.broker.exceptions import Busy, NoSuch, NotAllocated, NotOwner


@pytest.fixture
def types():
    return fake_types()


def make(types, items=(), stacks=()):
    allocator = Allocator(types, stacks, {'workspace': {'root': '/ws'}})
    for item in items:
        allocator.add(item)
    return allocator


def keys(items):
    return [(item.profile['type'], item.profile.get('uid', item.profile.get('serial')))
            for item in items]


def test_single_profile_gets_matching_item(types):
    allocator = make(types, [relay('r1'), relay('r2', color='red')])
    assert keys(allocator.allocate('a', [{'type': 'relay', 'color': 'red'}])) == [
        ('relay', 'r2')]


def test_results_follow_request_order(types):
    allocator = make(types, [relay('r1'), handset('h1')])
    got = allocator.allocate('a', [{'type': 'handset'}, {'type': 'relay'}])
    assert keys(got) == [('handset', 'h1'), ('relay', 'r1')]


def test_nothing_matching_is_nosuch(types):
    allocator = make(types, [relay('r1')])
    with pytest.raises(NoSuch):
        allocator.allocate('a', [{'type': 'relay', 'uid': 'r9'}])


def test_unknown_type_is_nosuch(types):
    with pytest.raises(NoSuch):
        make(types).allocate('a', [{'type': 'toaster'}])


def test_held_match_is_busy(types):
    allocator = make(types, [relay('r1')])
    allocator.allocate('a', [{'type': 'relay'}])
    with pytest.raises(Busy):
        allocator.allocate('b', [{'type': 'relay'}])


def test_all_or_nothing_leaves_nothing_allocated_on_failure(types):
    allocator = make(types, [relay('r1'), handset('h1')])
    allocator.allocate('a', [{'type': 'handset'}])
    with pytest.raises(Busy):
        allocator.allocate('b', [{'type': 'relay'}, {'type': 'handset'}])
    assert allocator.allocations('b') == [], 'a failed request must allocate nothing'


def test_search_backtracks_instead_of_failing_greedily(types):
    allocator = make(types, [relay('r1'), relay('r2')])
    got = allocator.allocate('a', [{'type': 'relay'}, {'type': 'relay', 'uid': 'r1'}])
    assert keys(got) == [('relay', 'r2'), ('relay', 'r1')]


def test_same_item_is_never_given_twice_in_one_request(types):
    allocator = make(types, [relay('r1')])
    with pytest.raises(NoSuch):
        allocator.allocate('a', [{'type': 'relay'}, {'type': 'relay'}])


def test_group_must_come_from_one_stack(types):
    stacks = [[handset('h1'), relay('r1')], [handset('h2'), relay('r2')]]
    allocator = make(types, [handset('h1'), relay('r1'), handset('h2'), relay('r2')],
                     stacks)
    got = allocator.allocate('a', [[{'type': 'handset', 'serial': 'h2'}, {'type': 'relay'}]])
    assert keys(got) == [('handset', 'h2'), ('relay', 'r2')]


def test_group_without_a_fitting_stack_is_nosuch(types):
    allocator = make(types, [handset('h1'), relay('r1')], [[handset('h1')]])
    with pytest.raises(NoSuch):
        allocator.allocate('a', [[{'type': 'handset'}, {'type': 'relay'}]])


def test_other_stack_members_are_collateral_for_others(types):
    allocator = make(types, [handset('h1'), relay('r1')], [[handset('h1'), relay('r1')]])
    allocator.allocate('a', [{'type': 'handset'}])
    with pytest.raises(Busy):
        allocator.allocate('b', [{'type': 'relay'}])


def test_collateral_is_still_available_to_its_holder(types):
    allocator = make(types, [handset('h1'), relay('r1')], [[handset('h1'), relay('r1')]])
    allocator.allocate('a', [{'type': 'handset'}])
    assert keys(allocator.allocate('a', [{'type': 'relay'}])) == [('relay', 'r1')]


def test_collateral_hidden_from_available_listing(types):
    allocator = make(types, [handset('h1'), relay('r1'), relay('r2')],
                     [[handset('h1'), relay('r1')]])
    allocator.allocate('a', [{'type': 'handset'}])
    assert allocator.available() == [relay('r2')]


def test_on_demand_items_are_created_per_request(types):
    allocator = make(types)
    first = allocator.allocate('a', [{'type': 'workspace'}])
    second = allocator.allocate('b', [{'type': 'workspace'}])
    assert keys(first) != keys(second)
    assert first[0].settings == {'root': '/ws'}, 'on-demand items carry type settings'


def test_failed_request_discards_on_demand_items_it_made(types):
    allocator = make(types, [relay('r1')])
    allocator.allocate('a', [{'type': 'relay'}])
    with pytest.raises(Busy):
        allocator.allocate('b', [{'type': 'workspace'}, {'type': 'relay'}])
    assert list(allocator.items) == [('relay', 'r1')], 'no stray workspaces may remain'


def test_on_demand_not_listed_as_equipment(types):
    allocator = make(types, [relay('r1')])
    allocator.allocate('a', [{'type': 'workspace'}])
    assert allocator.equipment() == [relay('r1')]


def test_release_goes_through_releasing_state(types):
    allocator = make(types, [relay('r1')])
    allocator.allocate('a', [{'type': 'relay'}])
    allocator.begin_release(('relay', 'r1'))
    with pytest.raises(Busy):
        allocator.allocate('b', [{'type': 'relay'}])
    allocator.finish_release(('relay', 'r1'))
    assert keys(allocator.allocate('b', [{'type': 'relay'}])) == [('relay', 'r1')]


def test_finished_on_demand_item_is_forgotten(types):
    allocator = make(types)
    [item] = allocator.allocate('a', [{'type': 'workspace'}])
    key = allocator.key_of(item.profile)
    allocator.begin_release(key)
    allocator.finish_release(key)
    assert key not in allocator.items


def test_check_holder_distinguishes_owner_other_and_nobody(types):
    allocator = make(types, [relay('r1'), relay('r2')])
    allocator.allocate('a', [{'type': 'relay', 'uid': 'r1'}])
    assert allocator.check_holder('a', relay('r1')) == ('relay', 'r1')
    with pytest.raises(NotOwner):
        allocator.check_holder('b', relay('r1'))
    with pytest.raises(NotAllocated):
        allocator.check_holder('a', relay('r2'))


def test_removed_free_item_disappears(types):
    allocator = make(types, [relay('r1')])
    allocator.remove(('relay', 'r1'))
    with pytest.raises(NoSuch):
        allocator.allocate('a', [{'type': 'relay'}])


def test_removed_held_item_stays_allocated_and_offline(types):
    allocator = make(types, [handset('h1', power_state='online')])
    allocator.allocate('a', [{'type': 'handset'}])
    allocator.remove(('handset', 'h1'))
    assert allocator.allocations('a') == [handset('h1', power_state='offline')]
    with pytest.raises(NoSuch):
        allocator.allocate('b', [{'type': 'handset'}])
    allocator.begin_release(('handset', 'h1'))
    allocator.finish_release(('handset', 'h1'))
    assert ('handset', 'h1') not in allocator.items, 'gone equipment is forgotten on release'


def test_add_refreshes_profile_but_keeps_holder(types):
    allocator = make(types, [handset('h1', power_state='online')])
    allocator.allocate('a', [{'type': 'handset'}])
    allocator.add(handset('h1', power_state='boot_completed'))
    assert allocator.allocations('a') == [handset('h1', power_state='boot_completed')]


def test_search_is_bounded_on_hopeless_requests(types):
    allocator = make(types, [relay(f'r{i}') for i in range(12)])
    request = [{'type': 'relay'}] * 13
    with pytest.raises(NoSuch):
        allocator.allocate('a', request)


def test_items_start_tainted_and_clean_release_untaints(types):
    allocator = make(types, [relay('r1')])
    [item] = allocator.allocate('a', [{'type': 'relay'}])
    assert item.tainted, 'nobody has seen the state of equipment the broker just met'
    allocator.begin_release(('relay', 'r1'))
    allocator.finish_release(('relay', 'r1'), clean=True)
    assert not allocator.items[('relay', 'r1')].tainted


def test_release_without_confirmed_teardown_taints(types):
    allocator = make(types, [relay('r1')])
    allocator.allocate('a', [{'type': 'relay'}])
    allocator.finish_release(('relay', 'r1'), clean=True)
    allocator.allocate('a', [{'type': 'relay'}])
    allocator.finish_release(('relay', 'r1'))
    assert allocator.items[('relay', 'r1')].tainted


def test_sync_adds_seen_and_removes_unseen_items(types):
    allocator = make(types, [handset('h1'), handset('h2')])
    allocator.sync('handset', [handset('h2'), handset('h3')])
    assert sorted(k[1] for k in allocator.items) == ['h2', 'h3']


def test_sync_keeps_declared_items_offline_and_held_unseen_ones(types):
    allocator = Allocator(types)
    declared = handset('fixed', pretty='bench 3')
    allocator.add({**declared, 'power_state': 'online'}, declared, static=True)
    allocator.add(handset('h1', power_state='online'))
    allocator.allocate('a', [{'type': 'handset', 'serial': 'h1'}])
    allocator.sync('handset', [])
    assert allocator.equipment() == [{**declared, 'power_state': 'offline'},
                                     handset('h1', power_state='offline')]


def test_request_defaults_apply_unless_the_request_says_otherwise(types):
    class Booting(HandsetLike):
        request_defaults = {'power_state': 'boot_completed'}
    allocator = make({**types, 'handset': Booting()},
                     [handset('h1', power_state='online')])
    with pytest.raises(NoSuch):
        allocator.allocate('a', [{'type': 'handset'}])
    got = allocator.allocate('a', [{'type': 'handset', 'power_state': 'online'}])
    assert keys(got) == [('handset', 'h1')]


def test_sync_refuses_profiles_of_another_type(types):
    with pytest.raises(NoSuch):
        make(types).sync('handset', [relay('r1')])


# -- what waiting requests need: reservations, avoid-sets, plans, blockers ----------------

def test_allocation_records_since_when_given_the_time(types):
    allocator = make(types, [relay('r1')])
    [item] = allocator.allocate('a', [{'type': 'relay'}], now=42.0)
    assert item.since == 42.0


def test_try_allocate_fails_quietly_and_changes_nothing(types):
    allocator = make(types, [relay('r1')])
    allocator.allocate('a', [{'type': 'relay'}])
    assert allocator.try_allocate('b', [{'type': 'workspace'}, {'type': 'relay'}]) is None
    assert list(allocator.items) == [('relay', 'r1')], 'no stray workspace may remain'


def test_reserved_item_goes_to_nobody_else(types):
    allocator = make(types, [relay('r1')])
    allocator.reserve('w', [('relay', 'r1')])
    with pytest.raises(Busy):
        allocator.allocate('b', [{'type': 'relay'}])
    assert allocator.available() == [], 'a reserved item is not available'
    [item] = allocator.allocate('w', [{'type': 'relay'}])
    assert item.reserved_for is None, 'a granted item is held, no longer reserved'


def test_reserve_replaces_the_holders_reservations(types):
    allocator = make(types, [relay('r1'), relay('r2')])
    allocator.reserve('w', [('relay', 'r1')])
    allocator.reserve('w', [('relay', 'r2')])
    assert allocator.reserved_by('w') == [('relay', 'r2')]
    allocator.reserve('w', ())
    assert allocator.reserved_by('w') == []


def test_reserving_what_is_not_free_is_refused(types):
    allocator = make(types, [relay('r1')])
    allocator.allocate('a', [{'type': 'relay'}])
    with pytest.raises(ValueError, match='not free'):
        allocator.reserve('w', [('relay', 'r1')])
    with pytest.raises(ValueError, match='not free'):
        allocator.reserve('w', [('relay', 'r9')])


def test_reserved_item_makes_its_stack_mates_collateral(types):
    allocator = make(types, [handset('h1'), relay('r1')], [[handset('h1'), relay('r1')]])
    allocator.reserve('w', [('handset', 'h1')])
    with pytest.raises(Busy):
        allocator.allocate('b', [{'type': 'relay'}])
    assert keys(allocator.allocate('w', [{'type': 'relay'}])) == [('relay', 'r1')]


def test_own_reservations_are_chosen_first(types):
    allocator = make(types, [relay('r1'), relay('r2')])
    allocator.reserve('w', [('relay', 'r2')])
    assert keys(allocator.allocate('w', [{'type': 'relay'}])) == [('relay', 'r2')]


def test_avoided_items_and_their_stack_mates_are_not_taken(types):
    allocator = make(types, [handset('h1'), relay('r1'), relay('r2')],
                     [[handset('h1'), relay('r1')]])
    avoid = {('handset', 'h1')}
    assert keys(allocator.allocate('b', [{'type': 'relay'}], avoid=avoid)) == [('relay', 'r2')]
    with pytest.raises(Busy):
        allocator.allocate('c', [{'type': 'relay'}], avoid=avoid)


def test_own_reservation_is_never_avoided(types):
    allocator = make(types, [relay('r1')])
    allocator.reserve('w', [('relay', 'r1')])
    got = allocator.allocate('w', [{'type': 'relay'}], avoid={('relay', 'r1')})
    assert keys(got) == [('relay', 'r1')]


def test_plan_prefers_reserved_then_free_then_releasing_then_held(types):
    allocator = make(types, [relay('held'), relay('resetting'), relay('free'),
                             relay('mine')])
    allocator.allocate('a', [relay('held'), relay('resetting')])
    allocator.begin_release(('relay', 'resetting'))
    allocator.reserve('w', [('relay', 'mine')])
    wanted = [{'type': 'relay'}] * 4
    assert allocator.plan('w', wanted) == [('relay', 'mine'), ('relay', 'free'),
                                           ('relay', 'resetting'), ('relay', 'held')]


def test_plan_is_none_only_when_nothing_could_ever_match(types):
    allocator = make(types, [relay('r1')])
    allocator.allocate('a', [{'type': 'relay'}])
    assert allocator.plan('w', [{'type': 'relay'}]) == [('relay', 'r1')]
    assert allocator.plan('w', [{'type': 'relay'}] * 2) is None


def test_plan_counts_held_items_that_are_unplugged(types):
    """A rebooting handset leaves the lister's view while held; a waiter keeps its plan."""
    allocator = make(types, [handset('h1')])
    allocator.allocate('a', [{'type': 'handset'}])
    allocator.remove(('handset', 'h1'))
    assert allocator.plan('w', [{'type': 'handset'}]) == [('handset', 'h1')]


def test_plan_leaves_out_on_demand_items(types):
    allocator = make(types, [relay('r1')])
    assert allocator.plan('w', [{'type': 'workspace'}, {'type': 'relay'}]) == [('relay', 'r1')]
    assert list(allocator.items) == [('relay', 'r1')]


def test_blockers_say_who_holds_what_and_why(types):
    allocator = make(types, [handset('h1'), relay('r1'), relay('r2'), relay('r3'),
                             relay('r4')], [[handset('h1'), relay('r1')]])
    allocator.allocate('a', [handset('h1')], now=7.0)
    allocator.allocate('b', [relay('r2'), relay('r3')], now=8.0)
    allocator.begin_release(('relay', 'r3'))
    allocator.reserve('w', [('relay', 'r4')])
    request = [relay('r1'), relay('r2'), relay('r3'), relay('r4')]
    found = {b.key[1]: (b.reason, b.holder, b.since, b.via)
             for b in allocator.blockers('c', request)}
    assert found == {'r1': ('collateral', 'a', 7.0, ('handset', 'h1')),
                     'r2': ('held', 'b', 8.0, None),
                     'r3': ('releasing', None, None, None),
                     'r4': ('reserved', 'w', None, None)}


def test_blockers_name_the_claim_of_an_earlier_waiter(types):
    allocator = make(types, [relay('r1')])
    [blocker] = allocator.blockers('c', [relay('r1')], {('relay', 'r1'): 'w'})
    assert (blocker.reason, blocker.holder) == ('claimed', 'w')


def test_blockers_are_empty_when_nothing_could_match(types):
    assert make(types, [relay('r1')]).blockers('c', [relay('r9')]) == []


def test_held_equipment_leaves_out_workspaces(types):
    allocator = make(types, [relay('r1')])
    allocator.allocate('a', [{'type': 'workspace'}, {'type': 'relay'}])
    assert allocator.held_equipment('a') == [('relay', 'r1')]


def test_item_state_survives_json(types):
    import json
    allocator = make(types, [handset('h1'), relay('r1')])
    allocator.allocate('a', [handset('h1')], now=3.5)
    allocator.reserve('w', [('relay', 'r1')])
    state = json.loads(json.dumps([item.to_json() for item in allocator.items.values()]))
    successor = make(types)
    for entry in state:
        successor.restore_item(entry)
    assert [i.to_json() for i in successor.items.values()] == state
    assert type(successor.items[('handset', 'h1')].profile) is SerialProfile


def test_stack_membership_follows_a_changed_profile(types):
    allocator = make(types, [relay('r1', slot='x'), relay('r2')],
                     [[{'type': 'relay', 'slot': 'x'}]])
    allocator.allocate('a', [relay('r2')])
    assert allocator.stacks_of(('relay', 'r1')) == (0,)
    allocator.add(relay('r1', slot='y'))
    assert allocator.stacks_of(('relay', 'r1')) == ()


@pytest.mark.parametrize('fields, expected', [
    ({}, 'available'),
    ({'holder': 1}, 'held'),
    ({'holder': 1, 'present': False}, 'held'),
    ({'releasing': True}, 'releasing'),
    ({'reserved_for': 2}, 'reserved'),
    ({'present': False}, 'offline'),
    ({'profile': {'type': 'relay', 'uid': 'r1', 'power_state': 'offline'}}, 'offline'),
])
def test_an_items_state_as_people_see_it(fields, expected):
    from ave.broker.allocator import Item
    from ave.profile import Profile
    values = {'profile': Profile({'type': 'relay', 'uid': 'r1'}), 'settings': {}, **fields}
    values['profile'] = Profile(values['profile'])
    assert Item(**values).state == expected
