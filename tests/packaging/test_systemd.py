"""sd_notify as systemd receives it: real AF_UNIX datagram sockets in a temp dir.

The packaged unit is ``Type=notify``, so a broker that never says ``READY=1`` is
killed by systemd after the start timeout; these tests play systemd's part.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys

import pytest

from ave import config
from ave.broker.daemon import pid_file_path
from ave.broker.systemd import notify
from ave.network.connection import find_free_port

READY_TIMEOUT = 20.0


@pytest.fixture
def supervisor(tmp_path, monkeypatch):
    """A datagram socket where systemd's would be, named by $NOTIFY_SOCKET."""
    path = str(tmp_path / 'notify')
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(READY_TIMEOUT)
        monkeypatch.setenv('NOTIFY_SOCKET', path)
        yield sock


def test_without_notify_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv('NOTIFY_SOCKET', raising=False)
    assert notify('READY=1') is False, 'notify claimed success with no supervisor'


def test_message_arrives_as_one_datagram(supervisor):
    assert notify('MAINPID=4242\nREADY=1') is True
    assert supervisor.recv(4096) == b'MAINPID=4242\nREADY=1', \
        'the supervisor did not receive the message unchanged'


def test_abstract_socket_name_starting_with_at(monkeypatch):
    name = f'ave-test-{secrets.token_hex(8)}'
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind('\0' + name)
        sock.settimeout(5)
        monkeypatch.setenv('NOTIFY_SOCKET', '@' + name)
        assert notify('READY=1') is True
        assert sock.recv(4096) == b'READY=1', 'the abstract socket got nothing'


def test_unreachable_socket_is_reported_not_raised(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv('NOTIFY_SOCKET', str(tmp_path / 'nobody-listens'))
    assert notify('READY=1') is False, 'notify claimed success without a listener'
    assert 'could not notify systemd' in caplog.text, 'the failure was not logged'


def test_foreground_broker_says_ready_once_it_serves(supervisor, home):
    """systemd lets ``systemctl start`` return on READY=1: by then the pid file must
    name the broker and its port must accept connections."""
    config.create_default(home)
    listener, port = find_free_port(listen=False)
    listener.close()
    with open(os.path.join(config.config_dir(home), 'broker.json'), 'w') as stream:
        json.dump({'host': '127.0.0.1', 'port': port}, stream)
    broker = subprocess.Popen(
        [sys.executable, '-m', 'ave.broker.cli', '--start', '--foreground', '--home', home],
        stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert supervisor.recv(4096) == b'READY=1', 'the broker sent something else'
        with open(pid_file_path(home)) as stream:
            assert int(stream.read()) == broker.pid, 'READY=1 came before the pid file'
        socket.create_connection(('127.0.0.1', port), timeout=5).close()
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(10)
