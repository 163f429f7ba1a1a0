"""Broker behaviour through real ``ave-broker`` daemons and the public client only."""
from __future__ import annotations

import os
import signal
import textwrap
import time

import psutil
import pytest

from support import wait_until
from ave.broker import Broker
from ave.broker.exceptions import Busy, NoSuch, NotAllocated, NotOwner
from ave.exceptions import AuthError, AveException, Exit
from ave.network.control import RemoteControl
from ave.network.exceptions import ConnectionClosed

pytestmark = pytest.mark.timeout(60)


def relay(uid, state_dir, circuits=('c1',)):
    """A relay whose circuit commands record their state in files the test can read."""
    return {'type': 'relay', 'uid': uid, 'circuits': {
        name: {'open': ['sh', '-c', f'echo open > {state_dir}/{uid}.{name}'],
               'close': ['sh', '-c', f'echo closed > {state_dir}/{uid}.{name}'],
               'default': 'open'}
        for name in circuits}}


def handset(serial):
    """A static stand-in for a handset: a relay-typed item would do, but stacks mix types."""
    return {'type': 'relay', 'uid': serial, 'circuits': {
        'power': {'open': ['true'], 'close': ['true'], 'default': 'closed'}}}


def uids(profiles):
    return sorted(p['uid'] for p in profiles)


def sessions_of(lab):
    """Session processes of the lab's broker (call a resource first: sessions start
    without the broker waiting, and name themselves once initialized). The kernel keeps
    15 characters of a name: 'ave-broker-session' shows as 'ave-broker-sess'."""
    return [p for p in psutil.Process(lab.pid).children() if p.name().startswith('ave-broker-sess')]


@pytest.fixture
def lab(start_broker, tmp_path):
    """A broker with relays r1 and r2 whose circuit states land in tmp_path/state."""
    state = tmp_path / 'state'
    state.mkdir()
    started = start_broker(equipment=[relay('r1', state), relay('r2', state)])
    started.state = state
    return started


# -- allocation ----------------------------------------------------------------------------

def test_get_one_profile_returns_one_proxy(lab):
    resource = lab.client().get({'type': 'relay', 'uid': 'r1'})
    assert resource.get_profile() == {'type': 'relay', 'uid': 'r1', 'circuits': ['c1'],
                                      'power_state': 'online'}


def test_get_several_returns_proxies_in_request_order(lab):
    second, first = lab.client().get({'type': 'relay', 'uid': 'r2'},
                                     {'type': 'relay', 'uid': 'r1'})
    assert (second.get_profile()['uid'], first.get_profile()['uid']) == ('r2', 'r1')


def test_workspace_and_relay_in_one_request(lab):
    r, w = lab.client().get({'type': 'relay'}, {'type': 'workspace'})
    assert os.path.isdir(w.get_path()) and r.get_profile()['type'] == 'relay'


def test_busy_when_every_match_is_held(lab):
    lab.client().get({'type': 'relay'}, {'type': 'relay'})
    with pytest.raises(Busy):
        lab.client().get({'type': 'relay'})


def test_nosuch_when_nothing_matches(lab):
    with pytest.raises(NoSuch):
        lab.client().get({'type': 'relay', 'uid': 'r9'})


def test_unknown_type_is_nosuch(lab):
    with pytest.raises(NoSuch):
        lab.client().get({'type': 'toaster'})


def test_profile_without_type_is_refused_clearly(lab):
    with pytest.raises(AveException) as caught:
        lab.client().get({'uid': 'r1'})
    assert "'type'" in str(caught.value)


def test_all_or_nothing_leaves_nothing_held(lab):
    holder = lab.client()
    holder.get({'type': 'relay', 'uid': 'r2'})
    other = lab.client()
    with pytest.raises(Busy):
        other.get({'type': 'relay', 'uid': 'r1'}, {'type': 'relay', 'uid': 'r2'})
    assert other.list_allocations() == [], 'a failed get must leave nothing allocated'
    assert lab.client().get({'type': 'relay', 'uid': 'r1'}), 'r1 must still be free'


def test_failed_get_releases_what_the_client_held(lab):
    client = lab.client()
    first = client.get({'type': 'relay', 'uid': 'r1'})
    with pytest.raises(NoSuch):
        client.get({'type': 'relay', 'uid': 'nope'})
    with pytest.raises((Exit, ConnectionClosed)):
        first.get_profile()
    assert wait_until(lambda: 'r1' in uids(lab.client(lab.admin_key).list_available()))


def test_same_client_starts_afresh_after_failed_get(lab):
    client = lab.client()
    client.get({'type': 'relay', 'uid': 'r1'})
    with pytest.raises(NoSuch):
        client.get({'type': 'relay', 'uid': 'nope'})
    assert wait_until(lambda: 'r1' in uids(lab.client(lab.admin_key).list_available()))
    again = client.get({'type': 'relay', 'uid': 'r1'})
    assert again.get_profile()['uid'] == 'r1'


def test_list_allocations_shows_only_own(lab):
    mine = lab.client()
    mine.get({'type': 'relay', 'uid': 'r1'})
    lab.client().get({'type': 'relay', 'uid': 'r2'})
    assert uids(mine.list_allocations()) == ['r1']


# -- stacks and collateral -----------------------------------------------------------------

@pytest.fixture
def stacked(start_broker, tmp_path):
    state = tmp_path / 'state'
    state.mkdir()
    return start_broker(
        equipment=[handset('h1'), relay('r1', state), handset('h2'), relay('r2', state)],
        stacks=[[{'type': 'relay', 'uid': 'h1'}, {'type': 'relay', 'uid': 'r1'}],
                [{'type': 'relay', 'uid': 'h2'}, {'type': 'relay', 'uid': 'r2'}]])


def test_group_is_satisfied_from_one_stack(stacked):
    phone, switch = stacked.client().get(({'type': 'relay', 'uid': 'h2'},
                                          {'type': 'relay', 'circuits': ['c1']}))
    assert switch.get_profile()['uid'] == 'r2', 'the relay must come from h2\'s stack'


def test_profile_and_group_flatten_into_one_tuple(stacked):
    got = stacked.client().get({'type': 'workspace'},
                               ({'type': 'relay', 'uid': 'h1'}, {'type': 'relay', 'uid': 'r1'}))
    assert len(got) == 3


def test_stack_members_are_collateral_for_others(stacked):
    stacked.client().get({'type': 'relay', 'uid': 'h1'})
    with pytest.raises(Busy):
        stacked.client().get({'type': 'relay', 'uid': 'r1'})


def test_collateral_is_available_to_the_holder(stacked):
    client = stacked.client()
    client.get({'type': 'relay', 'uid': 'h1'})
    assert client.get({'type': 'relay', 'uid': 'r1'}).get_profile()['uid'] == 'r1'


def test_group_across_stacks_is_nosuch(stacked):
    with pytest.raises(NoSuch):
        stacked.client().get(({'type': 'relay', 'uid': 'h1'}, {'type': 'relay', 'uid': 'r2'}))


def test_list_stacks_for_admin(stacked):
    assert len(stacked.client(stacked.admin_key).list_stacks()) == 2


# -- release -------------------------------------------------------------------------------

def test_yield_resources_frees_and_resets(lab):
    client = lab.client()
    r1 = client.get({'type': 'relay', 'uid': 'r1'})
    r1.set_circuit('c1', True)
    assert (lab.state / 'r1.c1').read_text().strip() == 'closed'
    client.yield_resources(r1)
    assert wait_until(lambda: 'r1' in uids(lab.client(lab.admin_key).list_available()))
    assert (lab.state / 'r1.c1').read_text().strip() == 'open', 'release must reset circuits'


def test_yielded_proxy_stops_working(lab):
    client = lab.client()
    r1 = client.get({'type': 'relay', 'uid': 'r1'})
    client.yield_resources(r1)
    with pytest.raises(NotAllocated):
        r1.get_profile()


def test_yield_of_other_clients_equipment_is_notowner(lab):
    lab.client().get({'type': 'relay', 'uid': 'r1'})
    with pytest.raises(NotOwner):
        lab.client().yield_resources({'type': 'relay', 'uid': 'r1'})


def test_yield_of_free_equipment_is_notallocated(lab):
    with pytest.raises(NotAllocated):
        lab.client().yield_resources({'type': 'relay', 'uid': 'r2'})


def test_dropped_broker_object_releases_everything(lab):
    client = Broker(lab.address)
    client.get({'type': 'relay', 'uid': 'r1'}, {'type': 'relay', 'uid': 'r2'})
    del client
    admin = lab.client(lab.admin_key)
    assert wait_until(lambda: uids(admin.list_available()) == ['r1', 'r2'], timeout=2)


CLIENT_SCRIPT = textwrap.dedent('''
    import sys, time
    from ave.broker import Broker
    b = Broker(('127.0.0.1', int(sys.argv[1])))
    b.get({'type': 'relay', 'uid': sys.argv[2]})
    print('held', flush=True)
    time.sleep(60)
''')


def test_client_killed_while_holding_is_reclaimed_within_a_second(lab, jobs):
    job = jobs(CLIENT_SCRIPT, lab.port, 'r1')
    assert job.stdout.readline().strip() == 'held'
    admin = lab.client(lab.admin_key)
    assert 'r1' not in uids(admin.list_available())
    job.send_signal(signal.SIGKILL)
    job.wait(5)
    killed = time.monotonic()
    assert wait_until(lambda: 'r1' in uids(admin.list_available()), timeout=1.0), \
        'equipment of a killed client must be free within a second'
    assert time.monotonic() - killed <= 1.0


RACE_SCRIPT = textwrap.dedent('''
    import os, sys, time
    from ave.broker import Broker
    from ave.broker.exceptions import Busy
    b = Broker(('127.0.0.1', int(sys.argv[1])))
    b.list_allocations()
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.001)
    try:
        b.get({'type': 'relay', 'uid': 'r1'})
        print('won', flush=True)
    except Busy:
        print('busy', flush=True)
    sys.stdin.read()
''')


def test_two_clients_racing_for_the_last_relay_exactly_one_wins(lab, jobs, tmp_path):
    go = tmp_path / 'go'
    racers = [jobs(RACE_SCRIPT, lab.port, go)
              for _ in range(2)]
    time.sleep(0.5)
    go.write_text('go')
    results = sorted(racer.stdout.readline().strip() for racer in racers)
    assert results == ['busy', 'won']


# -- sessions ------------------------------------------------------------------------------

def test_session_death_gives_clear_error_and_frees_equipment(lab):
    client = lab.client()
    r1 = client.get({'type': 'relay', 'uid': 'r1'})
    r1.get_profile()
    [session] = sessions_of(lab)
    session.kill()
    with pytest.raises(ConnectionClosed) as caught:
        r1.get_profile()
    assert 'session' in str(caught.value)
    admin = lab.client(lab.admin_key)
    assert wait_until(lambda: 'r1' in uids(admin.list_available()), timeout=2)


def test_client_gets_new_session_after_its_session_died(lab):
    client = lab.client()
    client.get({'type': 'relay', 'uid': 'r1'}).get_profile()
    sessions_of(lab)[0].kill()
    admin = lab.client(lab.admin_key)
    assert wait_until(lambda: 'r1' in uids(admin.list_available()), timeout=2)
    assert client.get({'type': 'relay', 'uid': 'r1'}).get_profile()['uid'] == 'r1'


def test_each_client_gets_its_own_session_process(lab):
    lab.client().get({'type': 'relay', 'uid': 'r1'}).get_profile()
    lab.client().get({'type': 'relay', 'uid': 'r2'}).get_profile()
    assert len(sessions_of(lab)) == 2


def test_session_refuses_calls_without_the_session_key(lab):
    r1 = lab.client().get({'type': 'relay', 'uid': 'r1'})
    intruder = RemoteControl(r1._address, authkey='guess', timeout=5)
    intruder._resource = {'type': 'relay', 'uid': 'r1'}
    with pytest.raises(AuthError):
        intruder.set_circuit('c1', True)


@pytest.mark.parametrize('method', ['_teardown', '_setup', '__init__', 'no_such_method'])
def test_only_public_resource_methods_are_callable(lab, method):
    r1 = lab.client().get({'type': 'relay', 'uid': 'r1'})
    with pytest.raises(AveException):
        r1._call(method, (), {})


def test_clients_cannot_call_session_management(lab):
    r1 = lab.client().get({'type': 'relay', 'uid': 'r1'})
    session = RemoteControl(r1._address, authkey=r1._authkey, timeout=5)
    with pytest.raises(AuthError):
        session.remove_resource({'type': 'relay', 'uid': 'r1'})


def test_long_resource_call_does_not_block_the_broker(lab):
    w = lab.client().get({'type': 'workspace'})
    w.run('true')
    w.run('sleep 3', __async__=True)
    started = time.monotonic()
    lab.client().get({'type': 'relay', 'uid': 'r1'}).get_profile()
    assert time.monotonic() - started < 1.5, 'a busy session must not hold up the broker'


# -- workspaces ----------------------------------------------------------------------------

def test_workspace_runs_commands_inside_itself(lab):
    w = lab.client().get({'type': 'workspace'})
    code, output = w.run('pwd')
    assert (code, output.strip()) == (0, w.get_path())


def test_workspace_is_deleted_on_release(lab):
    client = lab.client()
    w = client.get({'type': 'workspace'})
    path = w.get_path()
    client.yield_resources(w)
    assert wait_until(lambda: not os.path.exists(path))


def test_workspace_is_deleted_when_client_goes(lab):
    client = Broker(lab.address)
    path = client.get({'type': 'workspace'}).get_path()
    del client
    assert wait_until(lambda: not os.path.exists(path))


@pytest.mark.parametrize('path', ['/etc/passwd', '../../x', '/'])
def test_workspace_refuses_paths_outside_itself(lab, path):
    w = lab.client().get({'type': 'workspace'})
    with pytest.raises(AveException) as caught:
        w.cat(path)
    assert caught.value.details['type'] == 'PathError'


# -- administration ------------------------------------------------------------------------

@pytest.mark.parametrize('call', ['list_equipment', 'list_available',
                                  'list_allocations_all', 'list_stacks'])
def test_admin_calls_refused_without_admin_key(lab, call):
    with pytest.raises(AuthError):
        getattr(lab.client(), call)()


def test_admin_calls_refused_with_share_key(lab):
    with pytest.raises(AuthError):
        lab.client(lab.share_key).list_equipment()


def test_admin_sees_all_equipment_and_allocations(lab):
    lab.client().get({'type': 'relay', 'uid': 'r2'})
    admin = lab.client(lab.admin_key)
    assert uids(admin.list_equipment()) == ['r1', 'r2']
    assert uids(admin.list_allocations_all()) == ['r2']
    assert uids(admin.list_available()) == ['r1']


def test_admin_close_session_reclaims_equipment(lab):
    r1 = lab.client().get({'type': 'relay', 'uid': 'r1'})
    lab.client(lab.admin_key).close_session({'type': 'relay', 'uid': 'r1'})
    admin = lab.client(lab.admin_key)
    assert wait_until(lambda: 'r1' in uids(admin.list_available()), timeout=2)
    with pytest.raises((Exit, ConnectionClosed)):
        r1.get_profile()


def test_admin_stop_ends_the_broker(lab):
    with pytest.raises(Exit):
        lab.client(lab.admin_key).stop()
    assert wait_until(lambda: not psutil.pid_exists(lab.pid)
                      or psutil.Process(lab.pid).status() == psutil.STATUS_ZOMBIE)


def test_share_key_reports_equipment(lab):
    sharer = lab.client(lab.share_key)
    sharer.add_equipment({'type': 'relay', 'uid': 'r3', 'circuits': []})
    assert 'r3' in uids(lab.client(lab.admin_key).list_equipment())
    sharer.remove_equipment({'type': 'relay', 'uid': 'r3'})
    assert 'r3' not in uids(lab.client(lab.admin_key).list_equipment())


def test_equipment_reports_refused_without_share_key(lab):
    with pytest.raises(AuthError):
        lab.client().add_equipment({'type': 'relay', 'uid': 'r3'})


def test_broker_survives_a_client_sending_garbage(lab):
    import socket
    with socket.create_connection(lab.address, timeout=5) as sock:
        sock.sendall(b'\xff\xff\xff\xff garbage')
        sock.recv(100)
    assert lab.client().get({'type': 'relay', 'uid': 'r1'}).get_profile()['uid'] == 'r1'


def test_cleanly_released_relay_is_not_reset_twice(lab):
    client = lab.client()
    r1 = client.get({'type': 'relay', 'uid': 'r1'})
    r1.get_profile()
    client.yield_resources(r1)
    admin = lab.client(lab.admin_key)
    assert wait_until(lambda: 'r1' in uids(admin.list_available()))
    (lab.state / 'r1.c1').write_text('untouched\n')
    again = lab.client().get({'type': 'relay', 'uid': 'r1'})
    assert again.get_circuits() == {'c1': 'open'}
    assert (lab.state / 'r1.c1').read_text() == 'untouched\n', \
        'a relay whose release reset it must not be reset again on allocation'


def test_relay_of_a_crashed_session_is_reset_for_the_next_holder(lab):
    r1 = lab.client().get({'type': 'relay', 'uid': 'r1'})
    r1.set_circuit('c1', True)
    sessions_of(lab)[0].kill()
    admin = lab.client(lab.admin_key)
    assert wait_until(lambda: 'r1' in uids(admin.list_available()), timeout=2)
    lab.client().get({'type': 'relay', 'uid': 'r1'}).get_profile()
    assert (lab.state / 'r1.c1').read_text().strip() == 'open', \
        'nobody reset the relay of a killed session: its next holder must'


def test_relay_of_a_departed_client_is_not_reset_twice(lab):
    client = Broker(lab.address)
    client.get({'type': 'relay', 'uid': 'r1'}).set_circuit('c1', True)
    del client
    admin = lab.client(lab.admin_key)
    assert wait_until(lambda: 'r1' in uids(admin.list_available()), timeout=2)
    assert (lab.state / 'r1.c1').read_text().strip() == 'open', 'release must reset'
    (lab.state / 'r1.c1').write_text('untouched\n')
    lab.client().get({'type': 'relay', 'uid': 'r1'}).get_profile()
    assert (lab.state / 'r1.c1').read_text() == 'untouched\n', \
        'the departed client\'s session reset the relay: the next holder need not'


def test_relay_whose_reset_failed_is_reset_for_the_next_holder(start_broker, tmp_path):
    state = tmp_path / 'state'
    state.mkdir()
    flaky = relay('r1', state)
    gate = tmp_path / 'broken'
    flaky['circuits']['c1']['open'] = [
        'sh', '-c', f'test ! -e {gate} && echo open > {state}/r1.c1']
    lab = start_broker(equipment=[flaky])
    client = lab.client()
    r1 = client.get({'type': 'relay', 'uid': 'r1'})
    r1.get_profile()
    gate.write_text('x')
    client.yield_resources(r1)
    admin = lab.client(lab.admin_key)
    assert wait_until(lambda: 'r1' in uids(admin.list_available()))
    gate.unlink()
    (state / 'r1.c1').write_text('stale\n')
    lab.client().get({'type': 'relay', 'uid': 'r1'}).get_profile()
    assert (state / 'r1.c1').read_text().strip() == 'open', \
        'a relay whose reset failed must be reset before its next holder gets it'


def test_a_relay_whose_command_cannot_run_is_offline_with_the_reason(start_broker):
    broken = {'type': 'relay', 'uid': 'r9', 'circuits': {'c1': {
        'open': ['no-such-relay-tool', 'off'], 'close': ['true'], 'default': 'open'}}}
    lab = start_broker(equipment=[broken])
    row = lab.client().equipment()[0]
    assert (row['state'], row['profile']['power_state']) == ('offline', 'offline'), row
    assert "'no-such-relay-tool' is not an executable program" in row['profile']['problem']
    with pytest.raises(NoSuch, match="power_state 'online'"):
        lab.client().get({'type': 'relay', 'uid': 'r9'})
