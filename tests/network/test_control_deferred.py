"""Answers given later (``defer``, ``run_in_thread``) and serving inside a request,
driven in-process one step at a time."""
import socket
import threading
import time

import pytest

from ave.network import framing, protocol
from ave.network.connection import Connection
from ave.network.control import Control, rpc

pytestmark = pytest.mark.timeout(10)


class Deferring(Control):
    """A service whose RPCs answer later, and one that serves a side link meanwhile."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hook_calls = []
        self.owed = []
        self.side = None
        self.seen_callers = []
        self.gate = threading.Event()

    def lost_connection(self, connection, authkey):
        self.hook_calls.append(['lost_connection', authkey])

    @rpc
    def echo(self, value):
        return value

    @rpc
    def later(self):
        self.owed.append(self.defer())

    @rpc
    def in_thread(self, value):
        def work():
            self.gate.wait(5)
            return value * 2
        self.run_in_thread(work, self.defer())

    @rpc
    def failing_in_thread(self):
        def work():
            raise ValueError('worker failed')
        self.run_in_thread(work, self.defer())

    @rpc
    def nested(self):
        outer = self.caller
        self.serve_pending(self.side)
        return self.caller is outer

    @rpc
    def note_caller(self):
        self.seen_callers.append(self.caller)

    def release(self, value):
        self.owed.pop(0).result(value)


def connect(control, raw):
    client = raw(control)
    control.step_main(timeout=2)
    client.send_frame(client.digest(None, client.read_challenge()))
    control.step_main(timeout=2)
    client.read_json()
    return client


def call(client, method, *vargs):
    client.request(method, *vargs)


def arrived(client):
    return not client.nothing_arrives(0.001)


def steps(control, count=3):
    for _ in range(count):
        control.step_main(timeout=0.05)


def test_deferred_reply_arrives_when_given_and_others_are_served_meanwhile(
        local_control, raw):
    control = local_control(cls=Deferring)
    waiting, other = connect(control, raw), connect(control, raw)
    call(waiting, 'later')
    call(other, 'echo', 'meanwhile')
    steps(control)
    assert other.read_json() == {'result': 'meanwhile'}, 'the loop waited for the owed reply'
    control.release('at last')
    assert waiting.read_json() == {'result': 'at last'}


def test_next_request_of_a_peer_waits_for_its_owed_reply(local_control, raw):
    control = local_control(cls=Deferring)
    client = connect(control, raw)
    call(client, 'later')
    call(client, 'echo', 'second')
    steps(control)
    assert client.nothing_arrives(0.2), 'the second request was answered first'
    control.release('first')
    assert [client.read_json(), client.read_json()] == [
        {'result': 'first'}, {'result': 'second'}], 'replies came out of order'


def test_peer_leaving_while_owed_a_reply_is_lost_and_the_reply_goes_nowhere(
        local_control, raw):
    control = local_control(cls=Deferring)
    client = connect(control, raw)
    call(client, 'later')
    steps(control)
    client.sock.close()
    steps(control)
    assert ['lost_connection', None] in control.hook_calls, 'the departure went unnoticed'
    control.release('too late')  # must not raise


def test_work_in_a_thread_answers_without_blocking_the_loop(local_control, raw):
    control = local_control(cls=Deferring)
    worker_client, other = connect(control, raw), connect(control, raw)
    call(worker_client, 'in_thread', 21)
    call(other, 'echo', 'free')
    steps(control)
    assert other.read_json() == {'result': 'free'}
    control.gate.set()
    deadline = time.monotonic() + 5
    while not arrived(worker_client) and time.monotonic() < deadline:
        control.step_main(timeout=0.05)
    assert worker_client.read_json() == {'result': 42}


def test_exception_in_a_thread_is_the_reply(local_control, raw):
    control = local_control(cls=Deferring)
    client = connect(control, raw)
    call(client, 'failing_in_thread')
    deadline = time.monotonic() + 5
    while not arrived(client) and time.monotonic() < deadline:
        control.step_main(timeout=0.05)
    reply = client.read_json()
    assert reply['exception']['type'] == 'ValueError' and 'worker failed' in \
        reply['exception']['message']


def test_caller_is_restored_after_serving_another_peer_inside_a_request(
        local_control, raw):
    control = local_control(cls=Deferring)
    ours, theirs = socket.socketpair()
    control.side = Connection(('side', 0), ours)
    control.add_connection(control.side)
    theirs.sendall(framing.encode(protocol.encode_request('note_caller', None, [], {}, True)))
    client = connect(control, raw)
    call(client, 'nested')
    steps(control)
    assert client.read_json() == {'result': True}, 'the nested request left caller changed'
    assert len(control.seen_callers) == 1 and control.seen_callers[0].connection \
        is control.side, 'the side request was not served with its own caller'
    theirs.close()


class _Outcomes(list):
    """Where a worker thread's outcome goes: appended, result or error alike."""

    def result(self, value=None):
        self.append(value)

    def fail(self, error):
        self.append(error)


def test_threads_idle_waits_for_work_in_threads_and_runs_its_outcomes():
    service = Deferring(port=0)
    outcomes = _Outcomes()
    gate = threading.Event()
    service.run_in_thread(lambda: gate.wait(5) and 'done', outcomes)
    service.run_in_thread(lambda: 1 / 0, outcomes)
    assert not service.threads_idle(0.05), 'a thread still at work counted as idle'
    gate.set()
    assert service.threads_idle(5)
    assert sorted(map(str, outcomes)) == ['division by zero', 'done'], \
        'outcomes queued by the threads must have run when threads_idle returns'
    service.shutdown()
