"""Control and RemoteControl: RPC over real loopback sockets to really forked services.

Read top to bottom, this is how an AVE service behaves towards its clients: calls and
their values, keys and who may call what, exceptions that arrive typed, one-way calls,
shutting down, the hooks a service implements, a Control stepped by hand in this
process, and the client's connection handling. Malformed input has its own module,
test_control_bad_input.py. The service under test, ``Service``, and the fixtures that
own every process and socket are in conftest.py.
"""
import json
import os
import signal
import socket
import time
import tracemalloc

import pytest

from ave.exceptions import AuthError, AveException, Exit, Timeout
from ave.network import framing
from ave.network.connection import Connection, find_free_port
from ave.network.control import CHALLENGE_PREFIX, NONCE_SIZE, RemoteControl
from ave.network.exceptions import ConnectionClosed, ConnectionRefused, ConnectionTimeout
from ave.network.process import Process
from support import wait_until

pytestmark = pytest.mark.timeout(20)

PRIMARY_KEY = 'primary-key'
ADMIN_KEY = 'admin-key'
SHARE_KEY = 'share-key'

KEYS = {'authkey': PRIMARY_KEY, 'alt_keys': {'admin': ADMIN_KEY, 'share': SHARE_KEY}}


def raised_by(call, *args, **kwargs):
    """The exception ``call`` raised, or None."""
    try:
        call(*args, **kwargs)
    except Exception as error:
        return error
    return None


# -- calls and their values ------------------------------------------------------------

@pytest.mark.timeout(10)
def test_call_passes_positional_and_keyword_arguments(start_control, remote):
    client = remote(start_control())
    result = client.describe('a', 'b', 3, option=True, colour='red')
    assert result == {'first': 'a', 'rest': ['b', 3], 'option': True,
                      'extra': {'colour': 'red'}}, 'vargs/kwargs did not reach the service'


@pytest.mark.timeout(10)
@pytest.mark.parametrize('value', [
    None, 0, -1.5, '', 'text with ünïcode', [], [1, [2, [3]]], {},
    {'nested': {'list': [None, True, 'x']}},
], ids=['null', 'zero', 'float', 'empty-string', 'unicode', 'empty-list', 'nested-list',
        'empty-dict', 'nested-dict'])
def test_json_values_come_back_unchanged(start_control, remote, value):
    assert remote(start_control()).echo(value) == value, 'the value changed on its way'


@pytest.mark.timeout(10)
def test_rpc_without_return_value_returns_none(start_control, remote):
    assert remote(start_control()).nothing() is None, 'a bare return did not give None'


@pytest.mark.timeout(10)
def test_tuples_come_back_as_lists(start_control, remote):
    assert remote(start_control()).pair() == ['left', 'right'], \
        'a tuple did not travel as a list'


@pytest.mark.timeout(10)
def test_large_values_travel_whole(start_control, remote):
    value = 'ü' * 2 ** 20
    assert remote(start_control()).echo(value) == value, \
        'a 2 MiB string did not come back whole'


@pytest.mark.timeout(10)
def test_argument_json_cannot_carry_leaves_the_client_usable(start_control, remote):
    client = remote(start_control())
    raised_by(client.echo, {'a set'})
    assert client.echo('next') == 'next', 'an unsendable argument broke the client'


@pytest.mark.timeout(10)
def test_empty_host_in_address_means_localhost(start_control):
    control = start_control()
    with RemoteControl(('', control.port), timeout=5) as client:
        assert client.echo(1) == 1, "host '' did not reach the local Control"


@pytest.mark.timeout(10)
def test_control_serves_on_a_listening_socket_given_by_the_caller(start_control, remote):
    sock, port = find_free_port()
    try:
        start_control(port=port, socket=sock)
    finally:
        sock.close()
    assert remote(port).echo('given') == 'given', \
        'the Control did not serve the given socket'


# -- keys and who may call what ---------------------------------------------------------

@pytest.mark.timeout(10)
@pytest.mark.parametrize('key', [PRIMARY_KEY, ADMIN_KEY, SHARE_KEY])
def test_primary_and_alternative_keys_authenticate(start_control, raw, key):
    answer = raw(start_control(**KEYS)).handshake(key)
    assert answer == {'authenticated': True}, f'the key {key!r} was not accepted'


@pytest.mark.timeout(10)
def test_key_with_non_ascii_characters_authenticates(start_control, raw):
    answer = raw(start_control(authkey='nøkkel-ключ')).handshake('nøkkel-ключ')
    assert answer == {'authenticated': True}, 'a non-ASCII key was not accepted'


@pytest.mark.timeout(10)
@pytest.mark.parametrize('key', [None, 'wrong-key'])
def test_wrong_or_missing_key_connects_unauthenticated(start_control, raw, key):
    answer = raw(start_control(**KEYS)).handshake(key)
    assert answer == {'authenticated': False}, 'a wrong key was not told it failed'


@pytest.mark.timeout(10)
def test_unauthenticated_client_may_call_plain_rpc(start_control, remote):
    client = remote(start_control(**KEYS), authkey='wrong-key')
    assert client.echo('open') == 'open', 'a plain @rpc refused an unauthenticated client'


@pytest.mark.timeout(10)
@pytest.mark.parametrize('method', ['auth_rpc_outer', 'admin_rpc_outer'])
def test_unauthenticated_client_is_refused_guarded_rpc_with_typed_auth_error(
        start_control, remote, method):
    error = raised_by(getattr(remote(start_control(**KEYS), authkey='wrong-key'), method))
    assert isinstance(error, AuthError), \
        f'{method} did not refuse with AuthError: {error!r}'


@pytest.mark.timeout(10)
def test_auth_refusal_leaves_the_client_usable(start_control, remote):
    client = remote(start_control(**KEYS), authkey='wrong-key')
    raised_by(client.auth_rpc_outer)
    assert client.echo('after') == 'after', 'the client could not call after a refusal'


@pytest.mark.timeout(10)
def test_primary_key_may_call_auth_rpc(start_control, remote):
    client = remote(start_control(**KEYS), authkey=PRIMARY_KEY)
    assert client.auth_rpc_outer() == 'auth_rpc_outer', '@auth refused the primary key'


@pytest.mark.timeout(10)
@pytest.mark.parametrize('key', [ADMIN_KEY, SHARE_KEY])
def test_alternative_key_is_refused_auth_rpc(start_control, remote, key):
    error = raised_by(remote(start_control(**KEYS), authkey=key).auth_rpc_outer)
    assert isinstance(error, AuthError), f'@auth admitted an alternative key: {error!r}'


@pytest.mark.timeout(10)
def test_preauth_admits_the_named_accounts_key(start_control, remote):
    client = remote(start_control(**KEYS), authkey=ADMIN_KEY)
    assert client.admin_rpc_outer() == 'admin_rpc_outer', "@preauth('admin') refused admin"


@pytest.mark.timeout(10)
def test_preauth_with_several_accounts_admits_each_of_them(start_control, remote):
    client = remote(start_control(**KEYS), authkey=SHARE_KEY)
    assert client.admin_or_share() == 'admin_or_share', \
        "@preauth('admin', 'share') refused share"


@pytest.mark.timeout(10)
def test_preauth_refuses_another_accounts_key(start_control, remote):
    error = raised_by(remote(start_control(**KEYS), authkey=SHARE_KEY).admin_rpc_outer)
    assert isinstance(error, AuthError), f"@preauth('admin') admitted share: {error!r}"


@pytest.mark.timeout(10)
def test_preauth_does_not_imply_the_primary_key(start_control, remote):
    error = raised_by(remote(start_control(**KEYS), authkey=PRIMARY_KEY).admin_rpc_outer)
    assert isinstance(error, AuthError), \
        f"@preauth('admin') admitted the primary key: {error!r}"


@pytest.mark.timeout(10)
@pytest.mark.parametrize('alt_keys', [
    None, {}, {'share': SHARE_KEY}, {'admin': None, 'share': SHARE_KEY}, {'admin': ''},
], ids=['no-alt-keys', 'empty', 'admin-absent', 'admin-none', 'admin-empty'])
@pytest.mark.parametrize('key', [None, 'random-key'], ids=['no-key', 'random-key'])
def test_preauth_admits_everybody_when_no_named_account_has_a_key(
        start_control, remote, alt_keys, key):
    client = remote(start_control(authkey=PRIMARY_KEY, alt_keys=alt_keys), authkey=key)
    assert client.admin_rpc_outer() == 'admin_rpc_outer', \
        "@preauth('admin') locked out a client although nobody has an admin key"


@pytest.mark.timeout(10)
@pytest.mark.parametrize('key', [None, 'random-key'], ids=['no-key', 'random-key'])
def test_auth_admits_everybody_when_the_control_has_no_authkey(start_control, remote, key):
    client = remote(start_control(authkey=None), authkey=key)
    assert client.auth_rpc_outer() == 'auth_rpc_outer', \
        '@auth refused a client of a keyless Control'


@pytest.mark.timeout(10)
@pytest.mark.parametrize('method, key', [
    ('auth_rpc_outer', PRIMARY_KEY), ('auth_rpc_inner', PRIMARY_KEY),
    ('admin_rpc_outer', ADMIN_KEY), ('admin_rpc_inner', ADMIN_KEY),
])
def test_decorator_order_does_not_change_admission(start_control, remote, method, key):
    client = remote(start_control(**KEYS), authkey=key)
    assert getattr(client, method)() == method, f'{method} refused the right key'


@pytest.mark.timeout(10)
@pytest.mark.parametrize('method', [
    'auth_rpc_outer', 'auth_rpc_inner', 'admin_rpc_outer', 'admin_rpc_inner'])
def test_decorator_order_does_not_change_refusal(start_control, remote, method):
    error = raised_by(getattr(remote(start_control(**KEYS), authkey='wrong-key'), method))
    assert isinstance(error, AuthError), f'{method} admitted a wrong key: {error!r}'


# -- exceptions arrive typed, with the remote trace -------------------------------------

@pytest.mark.timeout(10)
def test_ave_exception_arrives_as_its_own_class(start_control, remote):
    error = raised_by(remote(start_control()).raise_timeout, 'too slow')
    assert type(error) is Timeout, f'expected ave.exceptions.Timeout, got {error!r}'


@pytest.mark.timeout(10)
def test_ave_exception_keeps_its_message(start_control, remote):
    error = raised_by(remote(start_control()).raise_timeout, 'too slow')
    assert str(error) == 'too slow', f'the message changed: {error!r}'


@pytest.mark.timeout(10)
def test_remote_trace_names_the_function_that_raised(start_control, remote):
    error = raised_by(remote(start_control()).raise_timeout, 'too slow')
    assert 'in raise_timeout' in error.format_trace(), \
        f'the remote trace does not show the service function:\n{error.format_trace()}'


@pytest.mark.timeout(10)
def test_builtin_exception_arrives_as_ave_exception_keeping_its_type(start_control, remote):
    error = raised_by(remote(start_control()).raise_value_error, 'bad value')
    assert (type(error), error.details['type'], str(error)) == \
        (AveException, 'ValueError', 'bad value'), f'ValueError arrived as {error!r}'


UNSENDABLE = {'set': ('return_set',), 'object': ('return_object',),
              'over-the-frame-limit': ('text_of', 17 * 2 ** 20)}


@pytest.mark.timeout(10)
@pytest.mark.parametrize('call', UNSENDABLE.values(), ids=UNSENDABLE.keys())
def test_result_json_cannot_carry_becomes_an_exception(start_control, remote, call):
    method, *args = call
    error = raised_by(getattr(remote(start_control()), method), *args)
    assert isinstance(error, AveException), \
        f'{method} did not raise AveException: {error!r}'


@pytest.mark.timeout(10)
@pytest.mark.parametrize('call', UNSENDABLE.values(), ids=UNSENDABLE.keys())
def test_connection_stays_usable_after_an_unsendable_result(start_control, raw, call):
    client = raw(start_control())
    client.handshake()
    client.call(*call)
    assert client.call('echo', 'next') == {'result': 'next'}, \
        'the connection was not usable after an unsendable result'


@pytest.mark.timeout(10)
def test_runaway_recursion_in_an_rpc_arrives_as_recursion_error(start_control, remote):
    error = raised_by(remote(start_control()).recurse)
    assert error.details['type'] == 'RecursionError', f'runaway recursion gave {error!r}'


@pytest.mark.timeout(10)
def test_exception_details_json_cannot_carry_travel_as_their_repr(start_control, remote):
    error = raised_by(remote(start_control()).raise_with_unsendable_details)
    assert str(error.details.get('handle')).startswith('<object object'), \
        f'an unsendable detail arrived as {error.details!r}'


@pytest.mark.timeout(10)
def test_too_deeply_nested_result_becomes_an_exception(start_control, remote):
    client = remote(start_control())
    error = raised_by(client.return_nested, 100000)
    assert isinstance(error, AveException), f'expected an exception reply, got {error!r}'


# -- one-way calls -------------------------------------------------------------------

@pytest.mark.timeout(10)
def test_async_call_returns_none_without_waiting_for_the_service(start_control, remote):
    client = remote(start_control())
    began = time.monotonic()
    result = client.sleep(0.6, 'late', __async__=True)
    elapsed = time.monotonic() - began
    assert (result, elapsed < 0.3) == (None, True), \
        f'async call returned {result!r} after {elapsed:.2f} s'


@pytest.mark.timeout(10)
def test_async_call_takes_effect(start_control, remote):
    client = remote(start_control())
    client.remember('colour', 'blue', __async__=True)
    assert client.recall('colour') == 'blue', 'the async call had no effect'


@pytest.mark.timeout(10)
def test_failing_async_call_sends_no_reply(start_control, remote):
    client = remote(start_control())
    client.raise_value_error('nobody listens', __async__=True)
    assert client.echo('mine') == 'mine', 'a sync call got a stray reply of an async one'


@pytest.mark.timeout(10)
def test_async_call_of_a_missing_method_sends_no_reply(start_control, raw):
    client = raw(start_control())
    client.handshake()
    client.request('no_such_method', is_async=True)
    assert client.call('echo', 'mine') == {'result': 'mine'}, \
        'an async call to a missing method was answered'


# -- shutting down ----------------------------------------------------------------------

@pytest.mark.timeout(10)
def test_rpc_that_shuts_down_raises_exit_in_its_caller(start_control, remote):
    error = raised_by(remote(start_control()).stop)
    assert type(error) is Exit, f'the caller of stop() got {error!r}'


@pytest.mark.timeout(10)
def test_other_clients_receive_exit_on_their_next_call(start_control, remote):
    control = start_control()
    bystander = remote(control)
    bystander.echo('connected')
    raised_by(remote(control).stop)
    error = raised_by(bystander.echo, 'too late')
    assert type(error) is Exit, f'a connected bystander got {error!r} instead of Exit'


@pytest.mark.timeout(10)
def test_control_shut_down_by_an_rpc_exits_with_status_zero(start_control, remote):
    control = start_control()
    raised_by(remote(control).stop)
    assert control.join(5) == 0, 'the Control did not exit 0 after shutdown()'


@pytest.mark.timeout(10)
def test_sigterm_shuts_down_with_exit_status_zero(start_control, remote):
    control = start_control()
    remote(control).echo('connected')
    os.kill(control.pid, signal.SIGTERM)
    assert control.join(5) == 0, 'SIGTERM did not lead to an orderly exit with status 0'


@pytest.mark.timeout(10)
def test_sigterm_sends_exit_to_connected_clients(start_control, remote):
    control = start_control()
    client = remote(control)
    client.echo('connected')
    os.kill(control.pid, signal.SIGTERM)
    control.join(5)
    error = raised_by(client.echo, 'too late')
    assert type(error) is Exit, f'a connected client got {error!r} instead of Exit'


@pytest.mark.timeout(10)
def test_sigterm_during_an_rpc_lets_it_answer_before_exit(start_control, raw):
    control = start_control()
    client = raw(control)
    client.handshake()
    client.request('sleep', 0.4, 'done')
    time.sleep(0.1)  # the service is inside the call now
    os.kill(control.pid, signal.SIGTERM)
    frames = [client.read_json(), client.read_json()]
    assert [frames[0], frames[1].get('exception', {}).get('type')] == \
        [{'result': 'done'}, 'Exit'], f'frames after SIGTERM mid-call: {frames!r}'


@pytest.mark.timeout(10)
def test_exit_frame_is_written_without_being_asked(start_control, raw):
    control = start_control()
    client = raw(control)
    client.handshake()
    os.kill(control.pid, signal.SIGTERM)
    frame = client.read_json()
    assert frame['exception']['type'] == 'Exit', f'expected an Exit frame, got {frame!r}'


@pytest.mark.timeout(10)
def test_clients_still_in_handshake_are_closed_at_shutdown(start_control, raw):
    control = start_control()
    client = raw(control)
    client.read_challenge()
    os.kill(control.pid, signal.SIGTERM)
    assert client.closed_by_server(5), \
        'a client in its handshake was not closed at shutdown'


# -- hooks ------------------------------------------------------------------------------

@pytest.mark.timeout(10)
@pytest.mark.parametrize('key', [PRIMARY_KEY, SHARE_KEY, None])
def test_new_connection_is_called_with_the_key_the_client_earned(start_control, remote,
                                                                 key):
    hooks = remote(start_control(**KEYS), authkey=key).hooks()
    assert hooks == [['new_connection', key]], f'new_connection was called as {hooks!r}'


@pytest.mark.timeout(10)
def test_lost_connection_is_called_when_a_client_leaves(start_control, remote):
    control = start_control(**KEYS)
    leaver = remote(control, authkey=SHARE_KEY)
    leaver.echo('hello')
    leaver.__exit__(None, None, None)
    observer = remote(control)
    hooks = wait_until(lambda: ['lost_connection', SHARE_KEY] in observer.hooks())
    assert hooks, f'lost_connection was not called: {observer.hooks()!r}'


@pytest.mark.timeout(10)
def test_idle_is_called_after_interval_without_traffic(start_control, remote):
    client = remote(start_control(interval=0.2))
    client.echo('traffic')
    time.sleep(0.6)
    assert client.idle_count() >= 1, 'idle() was not called during 0.6 s of silence'


@pytest.mark.timeout(10)
def test_joined_process_reports_pid_and_exit_code_of_a_child(start_control, remote):
    client = remote(start_control())
    pid = client.spawn(3)
    joins = wait_until(client.joined)
    assert joins == [[pid, 3]], f'joined_process was called as {joins!r}'


@pytest.mark.timeout(10)
def test_joined_child_is_reaped(start_control, remote):
    client = remote(start_control())
    pid = client.spawn(0)
    wait_until(client.joined)
    with pytest.raises(ProcessLookupError):  # a zombie would still accept signal 0
        os.kill(pid, 0)


@pytest.mark.timeout(10)
def test_stop_listening_refuses_new_connections(start_control, remote):
    control = start_control()
    remote(control).stop_listening_now()
    error = raised_by(remote(control, timeout=2, optimist=False).echo, 'new')
    assert isinstance(error, ConnectionRefused), f'a new client got {error!r}, not refused'


@pytest.mark.timeout(10)
def test_stop_listening_keeps_serving_existing_connections(start_control, remote):
    client = remote(start_control())
    client.stop_listening_now()
    assert client.echo('existing') == 'existing', 'an existing client lost service'


def hickup_files(home):
    directory = os.path.join(home, '.ave', 'hickup')
    if not os.path.isdir(directory):
        return []
    return [name for name in os.listdir(directory) if not name.endswith('.tmp')]


@pytest.mark.timeout(10)
def test_sigusr1_writes_a_hickup_file(start_control, home):
    control = start_control(home=home, proc_name='ave-test-control')
    os.kill(control.pid, signal.SIGUSR1)
    files = wait_until(lambda: hickup_files(home))
    assert len(files) == 1 and files[0].endswith(f'-ave-test-control-{control.pid}'), \
        f'hickup files after SIGUSR1: {files!r}'


@pytest.mark.timeout(10)
def test_control_serves_on_after_sigusr1(start_control, remote, home):
    control = start_control(home=home)
    client = remote(control)
    client.echo('before')
    os.kill(control.pid, signal.SIGUSR1)
    wait_until(lambda: hickup_files(home))
    assert client.echo('after') == 'after', 'the Control stopped serving after SIGUSR1'


@pytest.mark.timeout(10)
@pytest.mark.parametrize('hook', ['new_connection', 'lost_connection', 'idle'])
def test_failing_hook_does_not_stop_the_service(start_control, remote, service_class, hook):
    def fail(self, *args):
        raise RuntimeError(f'{hook} fails on purpose')

    faulty = type('Faulty', (service_class,), {hook: fail})
    control = start_control(cls=faulty, interval=0.05)
    with RemoteControl(('127.0.0.1', control.port), timeout=5) as leaver:
        leaver.echo('hello')
    time.sleep(0.2)  # lost_connection and idle have had their chance to fail
    assert remote(control).echo('alive') == 'alive', f'a failing {hook} stopped the service'


# -- a Control stepped by hand in this process -------------------------------------------

def step_through_handshake(control, client, key):
    """Drive accept -> challenge -> digest -> verdict; return the verdict."""
    control.step_main(timeout=2)
    client.send_frame(client.digest(key, client.read_challenge()))
    control.step_main(timeout=2)
    return client.read_json()


@pytest.mark.timeout(10)
def test_step_accepts_a_client_and_sends_it_a_challenge(local_control, raw):
    control = local_control(**KEYS)
    client = raw(control)
    control.step_main(timeout=2)
    challenge = client.read_frame()
    expected = (CHALLENGE_PREFIX, len(CHALLENGE_PREFIX) + NONCE_SIZE)
    assert (challenge[:len(CHALLENGE_PREFIX)], len(challenge)) == expected, \
        f'not a challenge frame: {challenge!r}'


@pytest.mark.timeout(10)
def test_step_answers_the_right_digest_with_authenticated_true(local_control, raw):
    control = local_control(**KEYS)
    verdict = step_through_handshake(control, raw(control), PRIMARY_KEY)
    assert verdict == {'authenticated': True}, f'the primary key earned {verdict!r}'


@pytest.mark.timeout(10)
def test_step_answers_a_wrong_digest_with_authenticated_false(local_control, raw):
    control = local_control(**KEYS)
    verdict = step_through_handshake(control, raw(control), 'wrong-key')
    assert verdict == {'authenticated': False}, f'a wrong key earned {verdict!r}'


@pytest.mark.timeout(10)
def test_new_connection_runs_only_when_the_handshake_is_done(local_control, raw):
    control = local_control(**KEYS)
    client = raw(control)
    control.step_main(timeout=2)
    nonce = client.read_challenge()
    before = list(control.hook_calls)
    client.send_frame(client.digest(ADMIN_KEY, nonce))
    control.step_main(timeout=2)
    assert (before, control.hook_calls) == ([], [['new_connection', ADMIN_KEY]]), \
        f'hooks before/after the digest: {before!r} / {control.hook_calls!r}'


@pytest.mark.timeout(10)
def test_step_serves_a_request_after_the_handshake(local_control, raw):
    control = local_control(**KEYS)
    client = raw(control)
    step_through_handshake(control, client, PRIMARY_KEY)
    client.request('echo', [1, 2])
    control.step_main(timeout=2)
    assert client.read_json() == {'result': [1, 2]}, 'the stepped Control did not reply'


@pytest.mark.timeout(10)
def test_step_answers_a_digest_and_a_request_sent_together(local_control, raw):
    control = local_control(**KEYS)
    client = raw(control)
    control.step_main(timeout=2)
    nonce = client.read_challenge()
    client.send(framing.encode(client.digest(PRIMARY_KEY, nonce))
                + framing.encode(json.dumps(client.request_of('echo', 'together'))))
    control.step_main(timeout=2)
    replies = [client.read_json(), client.read_json()]
    assert replies == [{'authenticated': True}, {'result': 'together'}], \
        f'one step did not answer both frames: {replies!r}'


@pytest.mark.timeout(10)
def test_shutdown_writes_exit_to_established_clients(local_control, raw):
    control = local_control()
    client = raw(control)
    step_through_handshake(control, client, None)
    control.shutdown()
    frame = client.read_json()
    assert frame['exception']['type'] == 'Exit', f'expected an Exit frame, got {frame!r}'


@pytest.mark.timeout(10)
def test_step_main_after_shutdown_raises_exit(local_control):
    control = local_control()
    control.shutdown()
    with pytest.raises(Exit):
        control.step_main(timeout=0)


@pytest.mark.timeout(10)
def test_step_drops_a_client_whose_handshake_is_overdue(local_control, raw, monkeypatch):
    monkeypatch.setattr('ave.network.control.HANDSHAKE_TIMEOUT', 0.2)
    control = local_control()
    client = raw(control)
    control.step_main(timeout=2)
    client.read_challenge()
    control.step_main(timeout=2)  # nothing to read: the step ends at the handshake deadline
    assert client.closed_by_server(1), 'an overdue handshake was not dropped'


@pytest.mark.timeout(10)
def test_idle_runs_when_a_step_waits_out_the_interval(local_control):
    control = local_control(interval=0.05)
    control.step_main(timeout=2)
    assert control.idle_calls == 1, \
        f'idle() ran {control.idle_calls} times in one quiet step'


@pytest.mark.timeout(10)
def test_idle_does_not_run_before_the_interval(local_control):
    control = local_control(interval=30)
    control.step_main(timeout=0.05)
    assert control.idle_calls == 0, 'idle() ran before its interval had passed'


@pytest.fixture
def socket_pair():
    """Two connected sockets: the service's end and the peer's; both closed afterwards."""
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


@pytest.mark.timeout(10)
def test_added_connection_is_served_without_a_handshake(local_control, raw, socket_pair):
    control = local_control()
    ours, theirs = socket_pair
    control.add_connection(Connection(('pair', 0), ours))
    client = raw(theirs)
    client.request('echo', 'added')
    control.step_main(timeout=2)
    assert client.read_json() == {'result': 'added'}, 'an added connection was not served'


@pytest.mark.timeout(10)
def test_added_connection_has_the_rights_of_its_authkey(local_control, raw, socket_pair):
    control = local_control(**KEYS)
    ours, theirs = socket_pair
    control.add_connection(Connection(('pair', 0), ours), authkey=ADMIN_KEY)
    client = raw(theirs)
    client.request('admin_rpc_outer')
    control.step_main(timeout=2)
    assert client.read_json() == {'result': 'admin_rpc_outer'}, \
        'an added connection did not get the rights of its key'


@pytest.mark.timeout(10)
def test_removed_connection_is_no_longer_served(local_control, raw, socket_pair):
    control = local_control()
    ours, theirs = socket_pair
    connection = Connection(('pair', 0), ours)
    control.add_connection(connection)
    control.remove_connection(connection)
    client = raw(theirs)
    client.request('echo', 'ignored')
    control.step_main(timeout=0.2)
    assert client.nothing_arrives(0.2), 'a removed connection was still answered'


@pytest.mark.timeout(10)
def test_removed_connection_stays_open_for_its_new_owner(local_control, socket_pair):
    control = local_control()
    ours, _ = socket_pair
    connection = Connection(('pair', 0), ours)
    control.add_connection(connection)
    control.remove_connection(connection)
    control.step_main(timeout=0.05)
    assert not connection.closed, 'remove_connection closed the connection'


@pytest.mark.timeout(10)
def test_watched_connection_is_not_served(local_control, raw, socket_pair):
    control = local_control()
    ours, theirs = socket_pair
    control.add_connection(Connection(('pair', 0), ours), watched=True)
    client = raw(theirs)
    client.request('echo', 'ignored')
    control.step_main(timeout=0.2)
    assert client.nothing_arrives(0.2), 'a watched connection was served a request'


@pytest.mark.timeout(10)
def test_loss_of_a_watched_connection_calls_lost_connection(local_control, socket_pair):
    control = local_control(**KEYS)
    ours, theirs = socket_pair
    control.add_connection(Connection(('pair', 0), ours), authkey=SHARE_KEY, watched=True)
    theirs.close()
    control.step_main(timeout=2)
    assert control.hook_calls == [['lost_connection', SHARE_KEY]], \
        f'lost_connection was called as {control.hook_calls!r}'


@pytest.mark.timeout(10)
def test_serve_pending_answers_waiting_requests_without_a_step(local_control, raw,
                                                               socket_pair):
    control = local_control()
    ours, theirs = socket_pair
    connection = Connection(('pair', 0), ours)
    control.add_connection(connection)
    client = raw(theirs)
    client.request('echo', 'first')
    client.request('echo', 'second')
    control.serve_pending(connection)
    replies = [client.read_json(timeout=1), client.read_json(timeout=1)]
    assert replies == [{'result': 'first'}, {'result': 'second'}], \
        f'serve_pending answered {replies!r}'


@pytest.mark.timeout(10)
def test_notify_sends_a_one_way_request_to_a_served_peer(local_control, raw, socket_pair):
    control = local_control()
    ours, theirs = socket_pair
    connection = Connection(('pair', 0), ours)
    control.add_connection(connection, watched=True)
    control.notify(connection, 'update', 1, state='new')
    frame = raw(theirs).read_json(timeout=1)
    assert frame == {'method': 'update', 'resource': None, 'async': True,
                     'params': {'vargs': [1], 'kwargs': {'state': 'new'}}}, \
        f'notify sent {frame!r}'


@pytest.mark.timeout(10)
def test_notify_to_a_connection_not_served_raises_connection_closed(local_control,
                                                                    socket_pair):
    control = local_control()
    ours, _ = socket_pair
    with pytest.raises(ConnectionClosed):
        control.notify(Connection(('pair', 0), ours), 'update')


@pytest.mark.timeout(10)
def test_call_later_runs_the_function_after_its_delay(local_control):
    control = local_control()
    ran_at = []
    scheduled_at = time.monotonic()
    control.call_later(0.1, lambda: ran_at.append(time.monotonic()))
    control.step_main(timeout=2)
    waited = [when - scheduled_at for when in ran_at]
    assert len(waited) == 1 and waited[0] >= 0.1, f'the timer ran after {waited!r} s'


@pytest.mark.timeout(10)
def test_call_later_does_not_run_before_its_delay(local_control):
    control = local_control()
    ran = []
    control.call_later(30, lambda: ran.append(True))
    control.step_main(timeout=0.05)
    assert ran == [], 'a timer ran before its delay'


@pytest.mark.timeout(10)
def test_timers_run_in_the_order_of_their_deadlines(local_control):
    control = local_control()
    ran = []
    for delay, name in [(0.06, 'third'), (0.02, 'first'), (0.04, 'second')]:
        control.call_later(delay, lambda name=name: ran.append(name))
    deadline = time.monotonic() + 2
    while len(ran) < 3 and time.monotonic() < deadline:
        control.step_main(timeout=0.5)
    assert ran == ['first', 'second', 'third'], f'timers ran as {ran!r}'


@pytest.mark.timeout(10)
def test_failing_timer_does_not_stop_the_loop_or_later_timers(local_control):
    control = local_control()
    ran = []
    control.call_later(0, lambda: 1 / 0)
    control.call_later(0, lambda: ran.append('after'))
    error = raised_by(control.step_main, timeout=1)
    assert (error, ran) == (None, ['after']), f'step raised {error!r}; timers ran {ran!r}'


@pytest.mark.timeout(10)
def test_a_cancelled_timer_never_runs_and_cancelling_twice_or_late_is_harmless(
        local_control):
    control = local_control()
    ran = []
    cancelled = control.call_later(0, lambda: ran.append('cancelled'))
    done = control.call_later(0, lambda: ran.append('done'))
    control.cancel(cancelled)
    control.cancel(cancelled)
    control.step_main(timeout=1)
    control.cancel(done)
    control.call_later(0, lambda: ran.append('later'))
    control.step_main(timeout=1)
    assert ran == ['done', 'later'], f'timers ran as {ran!r}'


@pytest.mark.timeout(30)
def test_cancelled_timers_do_not_hold_memory_until_their_deadline(local_control):
    control = local_control()
    ran = []
    control.call_later(0.05, lambda: ran.append(True))
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(100_000):  # as many handshakes, each cancelling its expiry
            control.cancel(control.call_later(60, lambda: None))
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    control.step_main(timeout=2)
    assert grown < 1_000_000, f'100,000 cancelled timers still hold {grown:,} bytes'
    assert ran == [True], 'a live timer was lost with the cancelled ones'


@pytest.mark.timeout(10)
def test_timers_do_not_run_after_shutdown(local_control, raw):
    control = local_control()
    client = raw(control)
    step_through_handshake(control, client, None)
    ran = []
    control.call_later(0, lambda: ran.append(True))
    client.request('stop')
    control.step_main(timeout=2)
    assert ran == [], 'a timer ran after the service had shut down'


@pytest.fixture
def napping_child():
    """A child Process of this test that ends by itself after 0.3 s; reaped afterwards."""
    child = Process(target=time.sleep, args=(0.3,))
    child.start()
    yield child
    if child.exit_code is None:
        child.terminate()
        child.join(5)


@pytest.mark.timeout(10)
def test_shutdown_by_an_rpc_ignores_the_rest_of_its_step(
        local_control, raw, napping_child):
    control = local_control()
    client = raw(control)
    step_through_handshake(control, client, None)
    control.join_later(napping_child)
    client.request('stop')        # ready first: epoll reports it before the child's end
    time.sleep(0.6)               # the child has ended too: both events are in one batch
    error = raised_by(control.step_main, timeout=2)
    assert error is None, f'a step that shut the Control down raised {error!r}'


# -- RemoteControl's connection -----------------------------------------------------------

@pytest.fixture
def dead_port():
    """A port bound but not listening, held for the test: connecting to it is refused."""
    sock, port = find_free_port(listen=False)
    yield port
    sock.close()


@pytest.mark.timeout(10)
def test_constructing_a_remote_control_to_nothing_does_not_fail(dead_port):
    error = raised_by(RemoteControl, ('127.0.0.1', dead_port), None, 0.5, False)
    assert error is None, f'constructing a RemoteControl to a dead port raised {error!r}'


@pytest.mark.timeout(10)
def test_constructing_a_remote_control_does_not_connect(start_control, remote):
    control = start_control()
    remote(control)  # never called
    hooks = remote(control).hooks()
    assert hooks == [['new_connection', None]], f'connections made: {hooks!r}'


@pytest.mark.timeout(10)
def test_optimist_first_call_times_out_after_timeout(dead_port, remote):
    client = remote(dead_port, timeout=0.5, optimist=True)
    began = time.monotonic()
    error = raised_by(client.echo, 1)
    elapsed = time.monotonic() - began
    assert (type(error), 0.4 <= elapsed < 2.0) == (ConnectionTimeout, True), \
        f'optimist got {error!r} after {elapsed:.2f} s'


@pytest.mark.timeout(10)
def test_pessimist_first_call_is_refused_at_once(dead_port, remote):
    client = remote(dead_port, timeout=5, optimist=False)
    began = time.monotonic()
    error = raised_by(client.echo, 1)
    elapsed = time.monotonic() - began
    assert (type(error), elapsed < 1.0) == (ConnectionRefused, True), \
        f'pessimist got {error!r} after {elapsed:.2f} s'


def open_descriptors():
    return len(os.listdir('/proc/self/fd'))


@pytest.mark.timeout(10)
def test_refused_call_leaves_no_socket_open(dead_port, remote):
    client = remote(dead_port, timeout=5, optimist=False)
    before = open_descriptors()
    error = raised_by(client.echo, 1)
    leaked = open_descriptors() - before
    assert leaked == 0, f'{leaked} descriptor(s) left open by a refused call ({error!r})'


@pytest.mark.timeout(10)
def test_optimist_keeps_trying_until_the_control_listens(start_control, remote,
                                                         service_class):
    class LateListener(service_class):
        def run(self):
            time.sleep(0.3)
            self.listener.socket.listen(16)
            super().run()

    sock, port = find_free_port(listen=False)
    try:
        start_control(cls=LateListener, port=port, socket=sock)
    finally:
        sock.close()
    client = remote(port, timeout=5, optimist=True)
    assert client.echo('late') == 'late', 'the optimist gave up before the Control listened'


@pytest.mark.timeout(10)
def test_slow_rpc_raises_connection_timeout(start_control, remote):
    client = remote(start_control(), timeout=0.3)
    error = raised_by(client.sleep, 0.6, 'slow')
    assert type(error) is ConnectionTimeout, f'a slow call raised {error!r}'


@pytest.mark.timeout(10)
def test_call_after_a_timeout_reconnects_and_gets_its_own_answer(start_control, remote):
    client = remote(start_control(), timeout=0.3)
    raised_by(client.sleep, 0.6, 'slow')
    time.sleep(0.5)  # the service finishes the slow call meanwhile
    assert client.echo('fresh') == 'fresh', 'the call after a timeout got a stale answer'


@pytest.mark.timeout(10)
def test_remote_control_speaks_over_a_socket_it_was_given(start_control):
    control = start_control()
    sock = socket.create_connection(('127.0.0.1', control.port), timeout=5)
    with RemoteControl(('127.0.0.1', control.port), timeout=5, sock=sock) as client:
        hooks = client.hooks()
    assert hooks == [['new_connection', None]], \
        f'the given socket was not the one used (connections: {hooks!r})'
