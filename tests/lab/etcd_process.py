"""Real etcd members on 127.0.0.1 for tests and benchmarks: started, waited for,
paused, killed, and always stopped.

A member is one ``etcd`` process with its own data directory, free client and peer
ports, and its log in a file kept for failure messages. Each cluster gets a unique
``--initial-cluster-token`` so members of two clusters (other tests, other workers on
the machine) can never join each other through a recycled port. Every process dies
with the test process (``PR_SET_PDEATHSIG``) even when pytest itself is killed.

Election timing is tuned for tests, not for a lab: a heartbeat of 50 ms and an election
timeout of 500 ms make a lost leader replaced within about a second. A real lab keeps
etcd's defaults (100 ms / 1000 ms) or raises both with the network's round-trip time.
``--pre-vote`` (etcd 3.5's default, off in 3.4) keeps a member that was paused or cut
off from deposing a healthy leader when it comes back; a lab wants it too.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from ave.network.connection import above_ephemeral_ports, find_free_port

ETCD = Path(os.environ.get('AVE_TEST_ETCD', '/usr/bin/etcd'))
HEARTBEAT_MS = 50
ELECTION_MS = 500
START_TIMEOUT = 20.0
START_TRIES = 3


def missing_reason() -> str | None:
    """Why etcd tests cannot run here, or None."""
    if not os.access(ETCD, os.X_OK):
        return f'{ETCD} is missing: install Debian\'s etcd-server to run the etcd tests'
    return None


def free_port() -> int:
    """A port nobody listens on now, above the range outgoing connections use."""
    sock, port = find_free_port(start=above_ephemeral_ports(), listen=False)
    sock.close()
    return port


def _set_death_signal() -> None:
    from ave._native import lib  # type: ignore[import-not-found]  # built by cffi
    lib.ave_set_death_signal(signal.SIGKILL)


class EtcdNode:
    """One etcd member. ``endpoint`` is its client URL for ``ave.lab.etcd.Etcd``."""

    def __init__(self, name: str, directory: Path, initial_cluster: str, token: str,
                 client_port: int, peer_port: int) -> None:
        self.name = name
        self.directory = directory
        self.data_dir = directory / 'data'
        self.log_path = directory / 'etcd.log'
        self.endpoint = f'http://127.0.0.1:{client_port}'
        self.peer_url = f'http://127.0.0.1:{peer_port}'
        self.initial_cluster = initial_cluster
        self.token = token
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    def __repr__(self) -> str:
        return f'<EtcdNode {self.name} {self.endpoint} pid={self.pid}>'

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the process (again, with its data, after ``kill`` or ``stop``)."""
        if self.running:
            raise RuntimeError(f'{self.name} is already running')
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            str(ETCD), '--name', self.name, '--data-dir', str(self.data_dir),
            '--listen-client-urls', self.endpoint, '--advertise-client-urls', self.endpoint,
            '--listen-peer-urls', self.peer_url,
            '--initial-advertise-peer-urls', self.peer_url,
            '--initial-cluster', self.initial_cluster,
            '--initial-cluster-token', self.token, '--initial-cluster-state', 'new',
            '--heartbeat-interval', str(HEARTBEAT_MS),
            '--election-timeout', str(ELECTION_MS), '--pre-vote',
            '--logger', 'zap', '--log-outputs', 'stderr']
        with open(self.log_path, 'ab') as log:
            log.write(f'--- start {time.strftime("%H:%M:%S")}: {" ".join(command)}\n'.encode())
            log.flush()
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=_set_death_signal, close_fds=True)
        self.paused = False

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Return once the member answers /health with a leader; raise with its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f'etcd {self.name} exited:\n{self.log_tail()}')
            if self.health():
                return
            time.sleep(0.05)
        raise RuntimeError(f'etcd {self.name} not healthy within {timeout:g} s:\n'
                           f'{self.log_tail()}')

    def health(self) -> bool:
        try:
            answer = _http(self.endpoint, 'GET', '/health', None, timeout=1.0)
        except (OSError, http.client.HTTPException, ValueError):
            return False
        return isinstance(answer, dict) and answer.get('health') == 'true'

    def status(self, timeout: float = 1.0) -> dict[str, object]:
        """The member's raw /v3/maintenance/status answer (raises when it has none)."""
        answer = _http(self.endpoint, 'POST', '/v3/maintenance/status', b'{}', timeout)
        if not isinstance(answer, dict) or 'leader' not in answer:
            raise RuntimeError(f'{self.name}: no status: {answer!r:.200}')
        return answer

    def is_leader(self) -> bool:
        try:
            status = self.status()
        except (OSError, http.client.HTTPException, ValueError, RuntimeError):
            return False
        header = status.get('header')
        return isinstance(header, dict) and header.get('member_id') == status['leader']

    def wait_leaderless(self, timeout: float = 15.0) -> None:
        """Return once the member itself reports no leader (its status has no leader
        field, or 0). How soon that is after its peers die depends on its election timer
        and on how busy the machine is, so tests wait for it rather than sleep."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                answer = _http(self.endpoint, 'POST', '/v3/maintenance/status', b'{}', 1.0)
            except (OSError, http.client.HTTPException, ValueError):
                answer = None
            if isinstance(answer, dict) and 'header' in answer \
                    and str(answer.get('leader', '0')) == '0':
                return
            time.sleep(0.05)
        raise RuntimeError(f'etcd {self.name} still reports a leader after {timeout:g} s:\n'
                           f'{self.log_tail()}')

    def pause(self) -> None:
        """SIGSTOP: the member keeps its sockets and answers nothing. Returns once every
        thread has stopped (a signal is delivered, not obeyed, when kill() returns)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self._wait_threads(stopped=True)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT; returns once every thread runs again."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self._wait_threads(stopped=False)
        self.paused = False

    def _wait_threads(self, stopped: bool, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(state == 'T' for state in self._thread_states()) == stopped:
                return
            time.sleep(0.005)
        raise RuntimeError(f'{self.name}: threads not {"stopped" if stopped else "running"} '
                           f'within {timeout:g} s')

    def _thread_states(self) -> list[str]:
        """The scheduler state letter of each thread (T: stopped)."""
        states = []
        for task in Path(f'/proc/{self.pid}/task').iterdir():
            try:
                stat = (task / 'stat').read_text()
            except OSError:
                continue  # the thread ended meanwhile
            states.append(stat.rsplit(')', 1)[1].split()[0])
        return states

    def kill(self) -> None:
        """SIGKILL, as a crash or a pulled plug would end it; reaped at once."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.paused = False

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (after SIGCONT if paused), then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        if self.paused:
            self.resume()
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors='replace')
        except OSError:
            return '(no log)'
        return '\n'.join(line[:300] for line in text.splitlines()[-lines:])

    def port_clash(self) -> bool:
        return 'address already in use' in self.log_tail(200)


class EtcdCluster:
    """Members that form one cluster; a node's methods (kill, pause, ...) act on it."""

    def __init__(self, nodes: list[EtcdNode]) -> None:
        self.nodes = nodes

    @property
    def endpoints(self) -> list[str]:
        return [node.endpoint for node in self.nodes]

    def leader(self, timeout: float = 10.0) -> EtcdNode:
        """The member that leads now, among those running and not paused."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.running and not node.paused and node.is_leader():
                    return node
            time.sleep(0.05)
        raise RuntimeError(f'no leader within {timeout:g} s:\n' + self.log_tails())

    def followers(self) -> list[EtcdNode]:
        leader = self.leader()
        return [node for node in self.nodes if node is not leader]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def log_tails(self, lines: int = 20) -> str:
        return '\n'.join(f'--- {node.name} ---\n{node.log_tail(lines)}' for node in self.nodes)


def start_cluster(directory: Path, size: int) -> EtcdCluster:
    """``size`` members, started and healthy; new ports when one was taken meanwhile."""
    for attempt in range(START_TRIES):
        cluster = _make_cluster(directory / f'try{attempt}', size)
        try:
            for node in cluster.nodes:
                node.start()
            for node in cluster.nodes:
                node.wait_healthy()
            return cluster
        except RuntimeError:
            cluster.stop()
            if not any(node.port_clash() for node in cluster.nodes):
                raise
    raise RuntimeError(f'etcd kept finding its ports taken ({START_TRIES} tries)')


def _make_cluster(directory: Path, size: int) -> EtcdCluster:
    token = f'ave-test-{uuid.uuid4().hex[:12]}'
    ports = [(free_port(), free_port()) for _ in range(size)]
    names = [f'node{index}' for index in range(size)]
    initial = ','.join(f'{name}=http://127.0.0.1:{peer}'
                       for name, (_, peer) in zip(names, ports))
    return EtcdCluster([EtcdNode(name, directory / name, initial, token, client, peer)
                        for name, (client, peer) in zip(names, ports)])


def _http(endpoint: str, method: str, path: str, body: bytes | None,
          timeout: float) -> object:
    host, port = endpoint.removeprefix('http://').rsplit(':', 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(method, path, body=body)
        return json.loads(connection.getresponse().read(1 << 20))
    finally:
        connection.close()
