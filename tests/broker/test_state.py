"""The client and session model: placeholders of clients expected back after a crash,
their resume tokens, and the model's trip through a restart's handover (no sockets:
connections are plain objects here)."""
from __future__ import annotations

import json

from ave.broker.state import BrokerState, SessionRecord, token_digest
from ave.network.connection import Connection
from ave.network.process import Process


def session(pid: int) -> SessionRecord:
    return SessionRecord(Process.adopt(pid), 50000 + pid, f'key{pid}', None)


def test_a_token_is_kept_only_as_its_digest():
    state = BrokerState()
    client = state.add_client(Connection(('127.0.0.1', 1)))
    token = state.issue_token(client)
    assert client.token == token_digest(token) and client.token != token


def test_a_placeholder_is_resumed_by_its_token_and_only_once():
    state = BrokerState()
    placeholder = state.add_placeholder({'user': 'u'}, token_digest('t'))
    assert state.placeholder(token_digest('t')) is placeholder
    assert state.placeholder(token_digest('other')) is None
    connection = Connection(('127.0.0.1', 1))
    state.bind(placeholder, connection, '127.0.0.1')
    assert state.client(connection) is placeholder
    assert state.placeholder(token_digest('t')) is None, \
        'a client that is back must not be taken over by a second resume'
    assert state.placeholders() == []


def test_a_live_clients_token_does_not_make_it_resumable():
    state = BrokerState()
    client = state.add_client(Connection(('127.0.0.1', 1)))
    token = state.issue_token(client)
    assert state.placeholder(token_digest(token)) is None


def test_forgetting_a_client_frees_every_index():
    state = BrokerState()
    placeholder = state.add_placeholder({}, token_digest('t'))
    record = session(7)
    state.attach(placeholder, record)
    state.forget(placeholder)
    assert state.client_by_holder(placeholder.holder) is None
    assert state.placeholder(token_digest('t')) is None
    assert record.holder is None


def test_placeholders_and_tokens_survive_a_handover():
    state = BrokerState()
    connection = Connection(('127.0.0.1', 1))
    live = state.add_client(connection, '127.0.0.1')
    state.issue_token(live)
    placeholder = state.add_placeholder({'job': 'j'}, token_digest('t'))
    state.attach(placeholder, session(9))
    data = json.loads(json.dumps(state.export({connection: 0}.get)))
    successor_connection = Connection(('127.0.0.1', 1))
    restored = BrokerState.restore(data, [successor_connection], Process.adopt)
    back = restored.placeholder(token_digest('t'))
    assert back is not None and back.holder == placeholder.holder
    assert back.identity == {'job': 'j'} and back.session is restored.session(9)
    assert restored.client(successor_connection).token == live.token
    assert restored.next_holder == state.next_holder
