"""Fixtures for the Control tests: a service to call, and owners for what tests create.

Every Control a test starts is really forked (``start(synchronize=True)``) and is
SIGTERMed, joined and, if it will not go, SIGKILLed afterwards, whatever the outcome
of the test. Every client socket is closed and every in-process Control is shut down
the same way. ``RawClient`` speaks the wire protocol by hand, so a test can send what
``RemoteControl`` never would.
"""
import hashlib
import hmac
import json
import os
import signal
import socket
import sys
import time

import pytest

from ave.exceptions import AveException, Timeout
from ave.network import framing
from ave.network.control import CHALLENGE_PREFIX, Control, RemoteControl, auth, preauth, rpc
from ave.network.exceptions import ConnectionClosed
from ave.network.process import Process

def exit_with(code):
    """Target of the child Process the service starts for ``join_later``."""
    time.sleep(0.05)
    sys.exit(code)


class Service(Control):
    """A Control with one RPC per behaviour under test; hooks record their calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory = {}
        self.hook_calls = []
        self.idle_calls = 0
        self.joins = []

    # -- hooks, recorded so that an RPC (or an in-process test) can report them -------

    def new_connection(self, connection, authkey):
        self.hook_calls.append(['new_connection', authkey])

    def lost_connection(self, connection, authkey):
        self.hook_calls.append(['lost_connection', authkey])

    def idle(self):
        self.idle_calls += 1

    def joined_process(self, pid, exit):
        self.joins.append([pid, exit])

    # -- plain RPCs ----------------------------------------------------------------------

    @rpc
    def echo(self, value):
        return value

    @rpc
    def describe(self, first, *rest, option=None, **extra):
        return {'first': first, 'rest': rest, 'option': option, 'extra': extra}

    @rpc
    def pair(self):
        return ('left', 'right')

    @rpc
    def nothing(self):
        return None

    @rpc
    def remember(self, key, value):
        self.memory[key] = value

    @rpc
    def recall(self, key):
        return self.memory.get(key)

    @rpc
    def sleep(self, seconds, value=None):
        time.sleep(seconds)
        return value

    @rpc
    def raise_timeout(self, message):
        raise Timeout(message)

    @rpc
    def raise_value_error(self, message):
        raise ValueError(message)

    @rpc
    def return_set(self):
        return {1, 2}

    @rpc
    def return_object(self):
        return object()

    @rpc
    def return_nested(self, depth):
        value = []
        for _ in range(depth):
            value = [value]
        return value

    @rpc
    def text_of(self, size):
        return 'x' * size

    @rpc
    def recurse(self, depth=0):
        return self.recurse(depth + 1)

    @rpc
    def raise_with_unsendable_details(self):
        raise AveException({'message': 'odd details', 'handle': object()})

    @rpc
    def stop(self):
        self.shutdown()
        return 'stopped'

    @rpc
    def stop_listening_now(self):
        self.stop_listening()

    @rpc
    def hooks(self):
        return self.hook_calls

    @rpc
    def idle_count(self):
        return self.idle_calls

    @rpc
    def spawn(self, code):
        child = Process(target=exit_with, args=(code,))
        pid = child.start()
        self.join_later(child)
        return pid

    @rpc
    def joined(self):
        return self.joins

    # -- guarded RPCs, in both decorator orders and both spellings -------------------

    @rpc
    @auth
    def auth_rpc_outer(self):
        return 'auth_rpc_outer'

    @Control.auth
    @Control.rpc
    def auth_rpc_inner(self):
        return 'auth_rpc_inner'

    @rpc
    @preauth('admin')
    def admin_rpc_outer(self):
        return 'admin_rpc_outer'

    @Control.preauth('admin')
    @Control.rpc
    def admin_rpc_inner(self):
        return 'admin_rpc_inner'

    @rpc
    @preauth('admin', 'share')
    def admin_or_share(self):
        return 'admin_or_share'

    # -- names a client must never reach -----------------------------------------------

    def undecorated(self):
        return 'undecorated was called'

    @rpc
    def _private(self):
        return '_private was called'


class RawClient:
    """A client that speaks the wire protocol by hand, so it can also speak it badly."""

    def __init__(self, sock, timeout=5.0):
        self.sock = sock
        self.timeout = timeout
        self.decoder = framing.FrameDecoder()
        sock.settimeout(timeout)

    @classmethod
    def connect(cls, port, timeout=5.0):
        return cls(socket.create_connection(('127.0.0.1', port), timeout=timeout), timeout)

    def send(self, data):
        self.sock.sendall(data)

    def send_frame(self, payload):
        self.send(framing.encode(payload))

    def send_json(self, message):
        self.send_frame(json.dumps(message))

    def read_frame(self, timeout=None):
        """The next whole frame; ConnectionClosed if the server closes first."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionClosed('the server closed the connection')
            self.decoder.feed(data)

    def read_json(self, timeout=None):
        return json.loads(self.read_frame(timeout))

    def read_challenge(self):
        challenge = self.read_frame()
        assert challenge.startswith(CHALLENGE_PREFIX), f'not a challenge: {challenge!r}'
        return challenge[len(CHALLENGE_PREFIX):]

    @staticmethod
    def digest(key, nonce):
        return hmac.new((key or '').encode('utf-8'), nonce, hashlib.sha256).digest()

    def handshake(self, key=None):
        """Read the challenge, answer it with ``key`` and return the server's verdict."""
        self.send_frame(self.digest(key, self.read_challenge()))
        return self.read_json()

    @staticmethod
    def request_of(method, *vargs, is_async=False, **kwargs):
        return {'method': method, 'resource': None,
                'params': {'vargs': list(vargs), 'kwargs': kwargs}, 'async': is_async}

    def request(self, method, *vargs, is_async=False, **kwargs):
        self.send_json(self.request_of(method, *vargs, is_async=is_async, **kwargs))

    def call(self, method, *vargs, **kwargs):
        """Send a request and return the decoded reply (``{"result": ...}`` or not)."""
        self.request(method, *vargs, **kwargs)
        return self.read_json()

    def nothing_arrives(self, timeout):
        """True if no byte arrives (and the server does not close) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except socket.timeout:
            return True
        except ConnectionResetError:
            return False
        return False  # a byte, or the end of the stream: either way something came

    def closed_by_server(self, timeout):
        """True if the server closes within ``timeout``; frames sent before are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return False
            except ConnectionResetError:
                return True
            if not data:
                return True

    def close(self):
        self.sock.close()


def stop_control(control):
    """Terminate, join and if need be kill a forked Control; reaping it exactly once."""
    if control.pid is None or control.exit_code is not None:
        return
    control.terminate()
    try:
        control.join(5)
    except Timeout:
        os.kill(control.pid, signal.SIGKILL)
        control.join(5)


@pytest.fixture
def service_class():
    """The Service class, for tests that subclass it (fork copies any class)."""
    return Service


@pytest.fixture
def start_control():
    """Fork a Service (or another Control class); every one is stopped afterwards."""
    started = []

    def start(cls=Service, **kwargs):
        kwargs.setdefault('port', 0)
        control = cls(**kwargs)
        try:
            control.start(synchronize=True)
        finally:
            if control.pid is not None:
                started.append(control)
        return control

    yield start
    for control in started:
        stop_control(control)


@pytest.fixture
def local_control():
    """Make a Service in this process, never started; it is shut down afterwards."""
    made = []

    def make(cls=Service, **kwargs):
        kwargs.setdefault('port', 0)
        control = cls(**kwargs)
        made.append(control)
        return control

    yield make
    for control in made:
        try:
            control.shutdown()
        finally:
            control.listener.close()


@pytest.fixture
def remote():
    """Make a RemoteControl to a Control (or a port); all are disconnected afterwards."""
    made = []

    def make(target, authkey=None, timeout=5.0, **kwargs):
        port = target if isinstance(target, int) else target.port
        client = RemoteControl(('127.0.0.1', port), authkey, timeout, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.__exit__(None, None, None)


@pytest.fixture
def raw():
    """Connect a RawClient to a Control (or wrap a socket); all are closed afterwards."""
    made = []

    def make(target, timeout=5.0):
        if isinstance(target, socket.socket):
            client = RawClient(target, timeout)
        else:
            port = target if isinstance(target, int) else target.port
            client = RawClient.connect(port, timeout)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def second_client(remote):
    """Call ``echo`` on a Control from a brand-new client: proof that it still serves."""
    def call(control):
        return remote(control, timeout=5.0, optimist=False).echo('still serving')
    return call
