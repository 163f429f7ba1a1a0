"""RemoteControl's round-trip savings: the verdict read with the first reply, and
connections shared through a ConnectionPool, against really forked services."""
from __future__ import annotations

import threading

import pytest

from support import wait_until
from ave.exceptions import AuthError
from ave.network.exceptions import ConnectionTimeout
from ave.network.remote import POOL_IDLE_LIMIT, ConnectionPool, RemoteControl

pytestmark = pytest.mark.timeout(30)

KEY = 'primary-key'


@pytest.fixture
def pooled():
    """Factory of RemoteControls sharing pools; every pool is closed afterwards."""
    pools = []

    def make(control, pool=None, **kwargs):
        if pool is None:
            pool = ConnectionPool()
            pools.append(pool)
        kwargs.setdefault('timeout', 5.0)
        return RemoteControl(('127.0.0.1', control.port), KEY, pool=pool, **kwargs)
    yield make
    for pool in pools:
        pool.close()


def connections_made(observer):
    return sum(1 for hook, _ in observer.hooks() if hook == 'new_connection') - 1


def test_the_first_reply_after_a_one_way_call_still_answers_its_own_call(
        start_control, remote):
    client = remote(start_control(authkey=KEY), authkey=KEY)
    client.remember('key', 'value', __async__=True)
    assert client.recall('key') == 'value'
    assert client.echo('second') == 'second'


def test_a_wrong_key_still_learns_it_from_the_first_guarded_call(start_control, remote):
    client = remote(start_control(authkey=KEY), authkey='wrong')
    with pytest.raises(AuthError):
        client.auth_rpc_outer()
    assert client.echo('unguarded') == 'unguarded'


def test_remote_controls_sharing_a_pool_share_one_connection(start_control, remote,
                                                             pooled):
    control = start_control(authkey=KEY)
    first = pooled(control)
    second = pooled(control, first._pool)
    for number in range(5):
        assert first.echo(number) == number
        assert second.echo(-number) == -number
    with second:  # leaving a pooled remote closes nothing: the pool owns it
        second.echo('inside')
    assert first.echo('after') == 'after'
    observer = remote(control, authkey=KEY)
    assert connections_made(observer) == 1


def test_concurrent_calls_through_a_pool_each_get_their_own_answer(start_control,
                                                                   remote, pooled):
    control = start_control(authkey=KEY)
    shared = pooled(control)
    wrong = []

    def caller(index):
        for call in range(20):
            value = f'{index}-{call}'
            if shared.echo(value) != value:
                wrong.append(value)
    threads = [threading.Thread(target=caller, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert not any(thread.is_alive() for thread in threads)
    assert wrong == [], f'answers went to the wrong call: {wrong[:5]}'
    observer = remote(control, authkey=KEY)
    assert 1 <= connections_made(observer) <= 8
    assert len(shared._pool._idle) <= POOL_IDLE_LIMIT


def test_a_call_that_timed_out_never_lends_its_connection_to_the_next(start_control,
                                                                       pooled):
    control = start_control(authkey=KEY)
    impatient = pooled(control, reply_timeout=0.2)
    patient = pooled(control, impatient._pool)
    assert patient.echo('warm') == 'warm'  # the connection the slow call will take
    with pytest.raises(ConnectionTimeout):
        impatient.sleep(0.6, 'late')
    assert patient.echo('next') == 'next', 'a late reply answered the next call'
    assert patient.echo('and next') == 'and next'


def test_a_closed_pool_still_serves_and_keeps_nothing_open(start_control, remote,
                                                           pooled):
    control = start_control(authkey=KEY)
    client = pooled(control)
    assert client.echo('before') == 'before'
    client._pool.close()
    assert client.echo('after') == 'after'
    observer = remote(control, authkey=KEY)
    lost = wait_until(lambda: sum(1 for hook, _ in observer.hooks()
                                  if hook == 'lost_connection') >= 2)
    assert lost, 'a closed pool kept a connection open'
