"""Fixtures for broker tests: configured homes and real ``ave-broker`` daemons.

    def test_something(start_broker):
        lab = start_broker(equipment=[RELAY], stacks=[...])
        client = lab.client()                    # Broker on lab.address, closed at teardown
        admin = lab.client(lab.admin_key)        # may call list_equipment() etc.
        result = lab.cli('--list-all')           # CompletedProcess of ave-broker --home ...

    def test_defaults(broker):                   # a started broker, workspaces only
        ...

    def test_config(broker_home):                # a configured home, nothing started
        lab = broker_home(port='x')              # extra keys go into broker.json as given
        assert lab.cli('--start').returncode == 1

The broker is the real command (``python -m ave.broker.cli --start --home H``), so
tests see exactly what a lab owner sees. Each home gets a free port and its own
keys; nothing reads or writes the real ~/.ave or /etc/ave.

Teardown, whether the test passed or failed, runs ``ave-broker --stop`` for every
home and then SIGKILLs whatever is left of it: the daemon and its sessions are forked
from that command without exec, so their command line still names the home, which
is how they are found even after the daemon died and its sessions were orphaned.
Processes a test started through ``lab.popen`` are killed and reaped too. Having to
SIGKILL anything is reported as a warning, because an orderly stop should suffice.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from typing import Any

import psutil
import pytest

from ave import config
from ave.broker import Broker
from ave.broker.daemon import log_dir, pid_file_path, wait_for_exit
from ave.network.connection import above_ephemeral_ports, find_free_port
from support import reported_pid

CLI = [sys.executable, '-m', 'ave.broker.cli']
CLI_TIMEOUT = 30.0
PORT_RETRIES = 3
STOP_GRACE = 15.0


class BrokerHome:
    """One AVE home with its configuration, and the broker that may run from it.

    Attributes: ``home`` (path), ``host``, ``port``, ``address``, ``admin_key``,
    ``share_key``, ``pid`` (set by ``start``), ``pid_file``, ``log_dir``,
    ``hickup_dir``.
    """

    def __init__(self, home: str, broker_json: dict) -> None:
        self.home = home
        config.create_default(home)
        self.host = broker_json.get('host', '127.0.0.1')
        self.port = broker_json.get('port')
        self.port_was_picked = False
        self.write_broker_json(broker_json)
        keys = config.load_authkeys(home)
        self.admin_key = keys['admin']
        self.share_key = keys['share']
        self.pid: int | None = None
        self.pid_file = pid_file_path(home)
        self.log_dir = log_dir(home)
        self.hickup_dir = os.path.join(home, '.ave', 'hickup')
        self._popens: list[subprocess.Popen] = []
        self._clients: list[Broker] = []

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def config_path(self, name: str) -> str:
        """Path of a configuration file of this home (``broker.json``, ...)."""
        return os.path.join(config.config_dir(self.home), name)

    def write_broker_json(self, content: dict) -> None:
        self.broker_json = dict(content)
        self.write_config(self.config_path('broker.json'), json.dumps(content, indent=2))

    @staticmethod
    def write_config(path: str, text: str) -> None:
        with open(path, 'w', encoding='utf-8') as stream:
            stream.write(text)

    # -- the command --------------------------------------------------------------------

    def command(self, *args: str) -> list[str]:
        return [*CLI, *args, '--home', self.home]

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT,
            prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        """Run ``ave-broker ARGS --home HOME`` to completion; text stdout and stderr.

        ``prefix`` runs it through another command (``prlimit --nofile=...``)."""
        return subprocess.run([*prefix, *self.command(*args)], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def popen(self, *args: str, **kwargs: Any) -> subprocess.Popen:
        """Start ``ave-broker ARGS --home HOME`` without waiting; killed at teardown."""
        process = subprocess.Popen(self.command(*args), stdin=subprocess.DEVNULL, **kwargs)
        self._popens.append(process)
        return process

    def start(self, prefix: tuple[str, ...] = ()) -> BrokerHome:
        """``--start`` the broker; the test fails here, showing stderr, if it cannot.

        A port the fixture picked can be taken by someone else's connection between
        the pick and the bind; then another port is tried, a few times at most.
        """
        result = self.cli('--start', prefix=prefix)
        for _ in range(PORT_RETRIES):
            if not (self.port_was_picked and 'Address already in use' in result.stderr):
                break
            self.port = free_port()
            self.write_broker_json({**self.broker_json, 'port': self.port})
            result = self.cli('--start', prefix=prefix)
        assert result.returncode == 0, f'ave-broker --start failed: {result.stderr}'
        self.pid = reported_pid(result.stdout)
        return self

    def client(self, authkey: str | None = None, timeout: float = 5.0) -> Broker:
        """A Broker client of this home's broker, disconnected at teardown."""
        client = Broker(self.address, authkey=authkey, timeout=timeout)
        self._clients.append(client)
        return client

    def read_pid_file(self) -> int | None:
        try:
            with open(self.pid_file, encoding='ascii') as stream:
                return int(stream.read())
        except FileNotFoundError:
            return None

    def processes(self) -> list[psutil.Process]:
        """Every live process that runs ave-broker for this home (daemon, sessions,
        foreground brokers, commands still running)."""
        found = []
        for process in psutil.process_iter(['cmdline']):
            cmdline = process.info['cmdline'] or []
            if (process.pid != os.getpid() and self.home in cmdline
                    and 'ave.broker.cli' in cmdline):
                found.append(process)
        return found

    # -- teardown -----------------------------------------------------------------------

    def cleanup(self) -> None:
        """Stop the broker in order, then kill and reap whatever is left."""
        for client in self._clients:
            client.__exit__(None, None, None)
        leftovers = self.processes()
        if leftovers:
            subprocess.run(self.command('--stop'), capture_output=True,
                           timeout=STOP_GRACE + 5, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + STOP_GRACE
        killed = [process for process in leftovers
                  if not wait_for_exit(process, max(0.0, deadline - time.monotonic()))]
        for process in killed + self.processes():
            _kill(process)
        for popen in self._popens:
            if popen.poll() is None:
                popen.kill()
            popen.wait(STOP_GRACE)
        if killed:
            warnings.warn(f'ave-broker processes of {self.home} survived --stop and were '
                          f'killed: {[p.pid for p in killed]}')


def _kill(process: psutil.Process) -> None:
    try:
        process.send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        return
    wait_for_exit(process, STOP_GRACE)


def free_port() -> int:
    """A port nobody listens on right now (it is released for the broker to bind).

    Picked above the kernel's range for outgoing connections where there is room, so
    the clients of other tests cannot take it before the broker binds it.
    """
    sock, port = find_free_port(start=above_ephemeral_ports(), listen=False)
    sock.close()
    return port



@pytest.fixture
def broker_home(tmp_path):
    """Factory: ``broker_home(equipment=(), stacks=(), at=None, **broker_json) -> BrokerHome``.

    The home gets default configuration (``ave.config.create_default``) and a
    broker.json on 127.0.0.1 with a free port; keyword arguments are written into
    broker.json as given (``port='x'`` makes a bad one). ``at`` puts the home at
    that path instead of under tmp_path. Nothing is started.
    """
    homes: list[BrokerHome] = []

    def make(equipment=(), stacks=(), at: str | None = None,
             **broker_json: Any) -> BrokerHome:
        content = {'host': '127.0.0.1', 'port': free_port(), **broker_json}
        if equipment:
            content['equipment'] = list(equipment)
        if stacks:
            content['stacks'] = list(stacks)
        home = BrokerHome(at or str(tmp_path / f'home{len(homes)}'), content)
        home.port_was_picked = 'port' not in broker_json
        homes.append(home)
        return home

    yield make
    for home in homes:
        home.cleanup()


@pytest.fixture
def start_broker(broker_home):
    """Factory: ``start_broker(equipment=(), stacks=(), **broker_json) -> BrokerHome``,
    with the broker started (``pid`` set); stopped and cleaned up at teardown."""
    def start(equipment=(), stacks=(), **broker_json: Any) -> BrokerHome:
        return broker_home(equipment, stacks, **broker_json).start()
    return start


@pytest.fixture
def broker(start_broker):
    """A started broker without static equipment (workspaces are created on demand)."""
    return start_broker()


@pytest.fixture
def jobs():
    """Factory: ``jobs(script, *args)`` runs a test job's Python ``script`` as a real
    process, stdin and stdout piped as text; all are killed and reaped afterwards."""
    started = []

    def start(script, *args):
        job = subprocess.Popen([sys.executable, '-c', script, *map(str, args)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        started.append(job)
        return job
    yield start
    for job in started:
        job.kill()
        job.wait(10)
        job.stdin.close()
        job.stdout.close()
