"""The rendezvous protocol: presentations parsed without sockets, and the socket's
two ends on real UNIX sockets in a temporary home."""
from __future__ import annotations

import json
import os
import socket

import pytest

from ave.broker import rendezvous
from ave.broker.rendezvous import BadPresentation, Hosting, Presentation

RELAY = {'type': 'relay', 'uid': 'r1', 'circuits': ['c1']}
DIGEST = 'ab' * 32


def valid(**changes) -> dict:
    data = {'pid': 4242, 'port': 50123, 'authkey': 'key',
            'client': {'identity': {'user': 'u', 'job': 'j'}, 'token': DIGEST},
            'resources': [{'profile': RELAY, 'since': 1718000000.5}],
            'releasing': [{'type': 'workspace', 'uid': '0123456789abcdef'}]}
    data.update(changes)
    return data


def parse(data) -> Presentation:
    return rendezvous.parse(json.dumps(data).encode())


def test_a_presentation_survives_encoding_and_parsing():
    presentation = Presentation(4242, 50123, 'key', {'user': 'u'}, DIGEST,
                                (Hosting(RELAY, 12.5), Hosting(RELAY, None)), (RELAY,))
    assert rendezvous.parse(presentation.encode()) == presentation


def test_a_valid_presentation_is_parsed_field_by_field():
    presentation = parse(valid())
    assert (presentation.pid, presentation.port, presentation.authkey) == \
        (4242, 50123, 'key')
    assert presentation.token == DIGEST
    assert presentation.resources == (Hosting(RELAY, 1718000000.5),)
    assert presentation.releasing == ({'type': 'workspace', 'uid': '0123456789abcdef'},)


@pytest.mark.parametrize('payload, problem', [
    (b'not json', 'not JSON'),
    (b'[' * 100000, 'not JSON'),
    (b'[]', 'exactly the keys'),
    (json.dumps({**valid(), 'extra': 1}).encode(), 'exactly the keys'),
    (json.dumps({k: v for k, v in valid().items() if k != 'port'}).encode(),
     'exactly the keys'),
    (json.dumps(valid(pid=-1)).encode(), '"pid"'),
    (json.dumps(valid(pid=True)).encode(), '"pid"'),
    (json.dumps(valid(pid='4242')).encode(), '"pid"'),
    (json.dumps(valid(port=70000)).encode(), '"port"'),
    (json.dumps(valid(authkey='')).encode(), '"authkey"'),
    (json.dumps(valid(authkey='k' * 1000)).encode(), '"authkey"'),
    (json.dumps(valid(client={'identity': {}})).encode(), '"client"'),
    (json.dumps(valid(client={'identity': {}, 'token': 7})).encode(), '"token"'),
    (json.dumps(valid(resources={})).encode(), 'must be lists'),
    (json.dumps(valid(resources=[{'profile': RELAY}])).encode(), '"since"'),
    (json.dumps(valid(resources=[{'profile': RELAY, 'since': 'now'}])).encode(), '"since"'),
    (json.dumps(valid(resources=[{'profile': {'uid': 'r1'}, 'since': None}])).encode(),
     'not a profile'),
    (json.dumps(valid(releasing=['relay'])).encode(), 'not a profile'),
    (json.dumps(valid(resources=[{'profile': RELAY, 'since': None}] * 1025)).encode(),
     'more than 1024'),
])
def test_every_defect_is_refused_with_its_reason(payload, problem):
    with pytest.raises(BadPresentation, match=problem):
        rendezvous.parse(payload)


def test_a_missing_identity_becomes_an_empty_one():
    assert parse(valid(client={'identity': 'me', 'token': None})).identity == {}


# -- the socket --------------------------------------------------------------------------

@pytest.fixture
def home(tmp_path):
    os.makedirs(tmp_path / '.ave')
    return str(tmp_path)


def test_the_listener_is_private_and_replaces_a_stale_socket(home):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(rendezvous.socket_path(home))
    stale.close()  # a dead broker's file: nobody listens on it
    with rendezvous.listen(home) as listener:
        assert os.stat(rendezvous.socket_path(home)).st_mode & 0o777 == 0o600
        with rendezvous.connect(home):
            accepted, _ = listener.accept()
            with accepted:
                assert rendezvous.peer_of(accepted) == (os.getpid(), os.getuid())
    assert [name for name in os.listdir(os.path.join(home, '.ave'))
            if name.endswith('.tmp')] == [], 'no temporary socket file is left behind'


def test_connecting_without_a_broker_answers_none(home):
    assert rendezvous.connect(home) is None, 'no socket file'
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(rendezvous.socket_path(home))
    stale.close()
    assert rendezvous.connect(home) is None, 'a socket file nobody listens on'


def test_a_home_with_a_path_too_long_for_a_socket_works(tmp_path):
    deep = tmp_path / ('d' * 60) / ('e' * 60)
    os.makedirs(deep / '.ave')
    assert len(rendezvous.socket_path(str(deep))) > 108
    with rendezvous.listen(str(deep)) as listener:
        with rendezvous.connect(str(deep)) as sock:
            assert sock is not None
            listener.accept()[0].close()


def test_is_session_knows_a_session_by_its_name():
    assert not rendezvous.is_session(os.getpid())
    assert not rendezvous.is_session(2 ** 22 + 1)
