"""How much AVE's RPC costs, next to the protocol's floor, Pyro5 and RPyC.

Run from the repository root: ``.venv/bin/python bench/rpc.py [--quick] [--only ave,floor]``.

Every job talks to the broker and its sessions through Control/RemoteControl, so the
RPC layer must cost about what its wire protocol costs, keep costing that with
thousands of quiet clients attached, and beat the general-purpose libraries a lab
would otherwise reach for. The *floor* is the least code that speaks the same
protocol (blocking sockets, 4-byte length prefix, the same JSON request and reply,
no handshake): what is left between AVE and the floor is AVE's own overhead.

Each server runs in its own forked process, so that its memory can be read with
psutil and its CPU is not the benchmark's. Everything talks over 127.0.0.1 only.
Latency is measured with client and server pinned to CPUs (see ``Placement``), and
in interleaved rounds (floor, AVE, Pyro5, RPyC, floor, ...) so that a slow spell on
a shared machine hurts all of them alike.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import operator
import os
import platform
import resource
import signal
import socket
import statistics
import struct
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import psutil
import Pyro5
import Pyro5.api
import rpyc
from rpyc.core.stream import SocketStream
from rpyc.utils.factory import connect_stream
from rpyc.utils.server import ThreadedServer

from ave.network.control import Control, RemoteControl

from _common import (Children, describe, percentile, raise_fd_limit, receive_message,
                     render_table, send_message)

HOST = '127.0.0.1'
AUTHKEY = 'bench-authkey'
CALL_TIMEOUT = 30.0
SERVER_START_TIMEOUT = 30.0
WORKER_GRACE = 1.0          # forked load clients connect and warm up in this time
WORKER_WARMUP = 20
WORKER_MAX_CALLS = 10_000_000
FD_MARGIN = 200             # descriptors a process needs beside its idle sockets
SETTLE_TIMEOUT = 30.0
MiB = 1024 * 1024
BIG = 'x' * MiB
HEADER = struct.Struct('>I')
PYRO_OBJECT = 'bench'


@dataclass(frozen=True)
class Plan:
    """How much to measure; every loop is bounded by a count and by ``loop_budget``."""
    latency_calls: int = 2000
    rounds: int = 4
    warmup_calls: int = 200
    loop_budget: float = 30.0
    clients: int = 8
    throughput_rounds: int = 5
    round_seconds: float = 1.0
    big_calls: int = 30
    idle_clients: int = 5000
    idle_latency_calls: int = 1000
    idle_open_budget: float = 120.0
    lifetime: float = 1200.0


FULL = Plan()
QUICK = Plan(latency_calls=400, rounds=2, warmup_calls=50, loop_budget=10.0,
             throughput_rounds=3, round_seconds=0.5, big_calls=6, idle_clients=500,
             idle_latency_calls=200, idle_open_budget=30.0, lifetime=300.0)


@dataclass
class Client:
    """One connection to a server under test, reduced to the two calls we time."""
    noop: Callable[[], Any]
    echo: Callable[[Any], Any]
    close: Callable[[], None]


@dataclass
class Missing:
    """A figure that could not be measured; ``reason`` becomes a footnote."""
    reason: str


# -- the floor: the same frames and JSON, with nothing else --------------------------

FLOOR_METHODS = {'noop': lambda: None, 'echo': lambda value: value}


def _receive_exactly(sock: socket.socket, size: int) -> bytearray | None:
    """``size`` bytes read straight into one buffer; None if the peer closed first."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = sock.recv_into(view[received:])
        if count == 0:
            return None
        received += count
    return buffer


def _receive_frame(sock: socket.socket) -> bytearray | None:
    header = _receive_exactly(sock, HEADER.size)
    if header is None:
        return None
    return _receive_exactly(sock, HEADER.unpack(header)[0])


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(HEADER.pack(len(payload)) + payload)


def _bound_blocking(sock: socket.socket) -> None:
    """Nagle off, and kernel-side time limits that keep the socket plainly blocking.

    A Python-level timeout would add a poll() before every recv(); SO_RCVTIMEO bounds
    each call without costing the floor a system call.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    limit = struct.pack('ll', int(CALL_TIMEOUT), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)


def serve_floor(report: Callable[[int], None]) -> None:
    """Blocking accept, one thread per connection; runs until the benchmark stops it."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, 0))
    listener.listen(1024)
    report(listener.getsockname()[1])
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            threading.Thread(target=_serve_floor_connection, args=(sock,),
                             daemon=True).start()
        except RuntimeError:  # out of threads: that client is refused, the rest go on
            sock.close()


def _serve_floor_connection(sock: socket.socket) -> None:
    """Answer well-formed calls; anything else (or the client leaving) ends the thread."""
    with sock:
        try:
            while (payload := _receive_frame(sock)) is not None:
                request = json.loads(payload)
                params = request['params']
                result = FLOOR_METHODS[request['method']](*params['vargs'],
                                                          **params['kwargs'])
                _send_frame(sock, json.dumps({'result': result}).encode('utf-8'))
        except (OSError, ValueError, KeyError, TypeError):
            return


def connect_floor(port: int) -> Client:
    sock = socket.create_connection((HOST, port), timeout=CALL_TIMEOUT)
    sock.settimeout(None)
    _bound_blocking(sock)

    def call(method: str, *vargs: Any) -> Any:
        request = json.dumps({'method': method, 'resource': None,
                              'params': {'vargs': vargs, 'kwargs': {}}, 'async': False})
        _send_frame(sock, request.encode('utf-8'))
        reply = _receive_frame(sock)
        if reply is None:
            raise ConnectionError('the floor server closed the connection')
        return json.loads(reply)['result']

    return Client(lambda: call('noop'), lambda value: call('echo', value), sock.close)


# -- AVE ----------------------------------------------------------------------------

class BenchControl(Control):
    """The smallest useful Control: one call that does nothing, one that echoes."""

    lifetime = FULL.lifetime

    @Control.rpc
    def noop(self) -> None:
        return None

    @Control.rpc
    def echo(self, value: Any) -> Any:
        return value

    def initialize(self) -> None:
        super().initialize()
        signal.alarm(int(self.lifetime))  # last resort if the benchmark is lost

    def perform_prctl(self, death_signal: int = 0) -> None:
        super().perform_prctl(signal.SIGKILL)  # never outlive the benchmark


def connect_ave(port: int) -> Client:
    remote = RemoteControl((HOST, port), AUTHKEY, timeout=CALL_TIMEOUT)
    return Client(remote.noop, remote.echo, lambda: remote.__exit__(None, None, None))


# -- Pyro5 --------------------------------------------------------------------------

@Pyro5.api.expose
class PyroService:
    def noop(self) -> None:
        return None

    def echo(self, value: Any) -> Any:
        return value


def configure_pyro() -> None:
    """Multiplexed server: the default pool of 80 threads refuses any further client."""
    Pyro5.config.SERVERTYPE = 'multiplex'
    Pyro5.config.SOCK_NODELAY = True


def serve_pyro(report: Callable[[int], None]) -> None:
    daemon = Pyro5.api.Daemon(host=HOST, port=0)
    daemon.register(PyroService(), PYRO_OBJECT)  # one shared object, as a Control is
    report(daemon.sock.getsockname()[1])
    daemon.requestLoop()


def connect_pyro(port: int) -> Client:
    proxy = Pyro5.api.Proxy(f'PYRO:{PYRO_OBJECT}@{HOST}:{port}')
    proxy._pyroTimeout = CALL_TIMEOUT
    proxy._pyroBind()
    return Client(proxy.noop, proxy.echo, proxy._pyroRelease)


# -- RPyC ---------------------------------------------------------------------------

class RpycService(rpyc.Service):
    def exposed_noop(self) -> None:
        return None

    def exposed_echo(self, value: Any) -> Any:
        return value


class NodelayThreadedServer(ThreadedServer):
    """RPyC's thread-per-connection server with Nagle off, like every server here."""

    def _accept_method(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super()._accept_method(sock)


def serve_rpyc(report: Callable[[int], None]) -> None:
    quiet = logging.getLogger('bench.rpyc')
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False  # it logs every connection; 5,000 of them drown the table
    server = NodelayThreadedServer(RpycService, hostname=HOST, port=0, logger=quiet,
                                   protocol_config={'sync_request_timeout': CALL_TIMEOUT})
    server.listener.listen(server.backlog)  # ready before the port is announced
    report(server.port)
    server.start()


def connect_rpyc(port: int) -> Client:
    stream = SocketStream.connect(HOST, port, nodelay=True, timeout=CALL_TIMEOUT)
    connection = connect_stream(stream, config={'sync_request_timeout': CALL_TIMEOUT})
    root = connection.root
    # The method references are fetched once: conn.root.noop() would pay an extra
    # round trip per call for the attribute lookup.
    return Client(root.noop, root.echo, connection.close)


# -- servers in their own processes ------------------------------------------------

Starter = Callable[[Children, Plan], tuple[int, int]]


class System:
    """One implementation under test: how its server starts and how a client connects."""

    def __init__(self, label: str, start: Starter,
                 connect: Callable[[int], Client]) -> None:
        self.label = label
        self._start = start
        self._connect = connect
        self.pid: int | None = None
        self.port: int | None = None

    def start(self, children: Children, plan: Plan) -> None:
        self.pid, self.port = self._start(children, plan)

    def connect(self) -> Client:
        return self._connect(self.port)


def all_systems() -> dict[str, System]:
    return {
        'floor': System('floor', forked(serve_floor), connect_floor),
        'ave': System('AVE', start_control, connect_ave),
        'pyro5': System('Pyro5', forked(serve_pyro), connect_pyro),
        'rpyc': System('RPyC', forked(serve_rpyc), connect_rpyc),
    }


def start_control(children: Children, plan: Plan) -> tuple[int, int]:
    """AVE forks its own server process: Control is a Process."""
    control = BenchControl(port=0, authkey=AUTHKEY, proc_name='ave-bench',
                           **server_limits(plan))
    control.lifetime = plan.lifetime
    pid = control.start(synchronize=True)
    children.adopt(pid)
    return pid, control.port


def server_limits(plan: Plan) -> dict:
    """Caps that let every idle client in: they all come from 127.0.0.1, which the
    per-address cap (a lab host's defence) would stop at 1,024. An AVE from before
    the caps (compared by running this file with PYTHONPATH=<its checkout>) takes none.
    """
    try:
        from ave.network.limits import Limits
    except ImportError:
        return {}
    total = plan.idle_clients + 2 * plan.clients + 64
    return {'limits': Limits(connections=total, connections_per_address=total)}


def forked(serve: Callable[[Callable[[int], None]], None]) -> Starter:
    """A starter that runs ``serve`` in a forked child of ours."""
    return lambda children, plan: start_forked_server(children, serve)


def start_forked_server(children: Children, serve: Callable) -> tuple[int, int]:
    """Fork ``serve`` and wait for the port it announces once it listens."""
    read_end, write_end = os.pipe()
    pid = children.fork(_serve_announcing, serve, write_end)
    os.close(write_end)
    try:
        return pid, receive_message(read_end, SERVER_START_TIMEOUT)
    finally:
        os.close(read_end)


def _serve_announcing(serve: Callable, write_end: int) -> None:
    def announce(port: int) -> None:
        send_message(write_end, port)
        os.close(write_end)
    serve(announce)


# -- timing ------------------------------------------------------------------------

def time_calls(call: Callable[[], Any], count: int, budget: float) -> list[float]:
    """Seconds taken by each of up to ``count`` calls, stopping once ``budget`` is spent."""
    samples = []
    deadline = time.perf_counter() + budget
    for _ in range(count):
        start = time.perf_counter()
        call()
        end = time.perf_counter()
        samples.append(end - start)
        if end > deadline:
            break
    return samples


def warm_up(client: Client, calls: int) -> None:
    """Check the echo really echoes, then let caches, buffers and threads settle."""
    if client.echo('ping') != 'ping':
        raise AssertionError('echo did not return its argument')
    for _ in range(calls):
        client.noop()


def interleaved(clients: dict[str, Client], call_of: Callable[[Client], Callable],
                total: int, plan: Plan) -> dict[str, list[float] | Missing]:
    """Time ``total`` calls per client, split into rounds that alternate the systems."""
    samples: dict[str, list[float] | Missing] = {name: [] for name in clients}
    per_round = math.ceil(total / plan.rounds)
    for _ in range(plan.rounds):
        for name, client in clients.items():
            if isinstance(samples[name], Missing):
                continue
            try:
                samples[name] += time_calls(call_of(client), per_round, plan.loop_budget)
            except Exception as error:
                samples[name] = Missing(f'{name} failed: {describe(error)}')
    return samples


NOOP = operator.attrgetter('noop')


def big_echo(client: Client) -> Callable[[], Any]:
    return lambda: client.echo(BIG)


def summarize(samples: dict[str, list[float] | Missing],
              fraction: float) -> dict[str, float | Missing]:
    return {name: value if isinstance(value, Missing) else percentile(value, fraction)
            for name, value in samples.items()}


# -- many clients at once ----------------------------------------------------------

def measure_throughput(systems: dict[str, System], plan: Plan,
                       children: Children) -> dict[str, float | Missing]:
    """Calls per second of ``plan.clients`` forked clients: the median of rounds.

    A short burst of other work on a shared machine can halve one round; the median
    of interleaved rounds keeps that round from deciding the figure.
    """
    rates: dict[str, list[float]] = {name: [] for name in systems}
    failed: dict[str, Missing] = {}
    for _ in range(plan.throughput_rounds):
        for name, system in systems.items():
            if name in failed:
                continue
            try:
                calls, seconds = run_load_clients(system, plan, children)
            except Exception as error:
                failed[name] = Missing(f'{system.label} load clients failed: '
                                       f'{describe(error)}')
                continue
            rates[name].append(calls / seconds)
    return {name: failed.get(name) or statistics.median(rates[name]) for name in systems}


def run_load_clients(system: System, plan: Plan, children: Children) -> tuple[int, float]:
    """All clients call from a common start time to a common end; wall time ends
    when the last one finished its last call."""
    start_at = time.monotonic() + WORKER_GRACE
    stop_at = start_at + plan.round_seconds
    workers = []
    try:
        for _ in range(plan.clients):
            read_end, write_end = os.pipe()
            workers.append((children.fork(_count_calls, system, start_at, stop_at,
                                          write_end), read_end))
            os.close(write_end)
        reports = [receive_message(read_end, stop_at - time.monotonic() + CALL_TIMEOUT)
                   for _, read_end in workers]
    finally:
        for pid, read_end in workers:
            os.close(read_end)
            children.wait(pid, 5.0)
    for report in reports:
        if 'error' in report:
            raise RuntimeError(report['error'])
    return (sum(report['calls'] for report in reports),
            max(report['end'] for report in reports) - start_at)


def _count_calls(system: System, start_at: float, stop_at: float, write_end: int) -> None:
    """One load client: connect and warm up, then call until ``stop_at``."""
    try:
        client = system.connect()
        warm_up(client, WORKER_WARMUP)
        time.sleep(max(0.0, start_at - time.monotonic()))
        calls = 0
        while calls < WORKER_MAX_CALLS and time.monotonic() < stop_at:
            client.noop()
            calls += 1
        send_message(write_end, {'calls': calls, 'end': time.monotonic()})
    except Exception as error:
        send_message(write_end, {'error': describe(error)})


# -- idle clients ------------------------------------------------------------------

def measure_idle(system: System, client: Client, plan: Plan,
                 children: Children) -> dict[str, float | Missing]:
    """No-op p50 and server RSS while a helper process holds many idle clients.

    The p50 without them is measured again just before they connect: compared with
    the figure of the first row, taken a minute earlier, drift on a shared machine
    would pass for an effect of the idle clients.
    """
    server = psutil.Process(system.pid)
    fds_before = server.num_fds()
    reference = median_noop(client, plan)
    base_rss = server.memory_info().rss / MiB
    report_read, report_write = os.pipe()
    command_read, command_write = os.pipe()
    helper = children.fork(_hold_idle_clients, system, plan.idle_clients,
                           plan.idle_open_budget, report_write, command_read)
    os.close(report_write)
    os.close(command_read)
    try:
        report = receive_message(report_read, plan.idle_open_budget + CALL_TIMEOUT)
        if report['opened'] < plan.idle_clients:
            missing = Missing(f'{system.label} held {report["opened"]:,} of '
                              f'{plan.idle_clients:,} idle clients: {report["error"]}')
            return {'idle_ref': reference, 'base_rss': base_rss, 'idle_p50': missing,
                    'idle_rss': missing}
        return {'idle_ref': reference, 'base_rss': base_rss,
                'idle_p50': median_noop(client, plan),
                'idle_rss': server.memory_info().rss / MiB}
    finally:
        _release_idle_clients(command_write)
        os.close(report_read)
        children.wait(helper, SETTLE_TIMEOUT)
        settle(server, fds_before)


IDLE_FIGURES = ('idle_ref', 'base_rss', 'idle_p50', 'idle_rss')


def median_noop(client: Client, plan: Plan, chunks: int = 3) -> float:
    """The lowest median of a few chunks of calls.

    Client and server share one pinned CPU here, so another program landing on that
    CPU for a second can only add time; the quietest chunk is the one to trust.
    """
    per_chunk = math.ceil(plan.idle_latency_calls / chunks)
    return min(percentile(time_calls(client.noop, per_chunk, plan.loop_budget), 0.5)
               for _ in range(chunks))


def _release_idle_clients(command_write: int) -> None:
    try:
        send_message(command_write, 'close')
    except OSError:
        pass  # the helper is already gone; its sockets closed with it
    os.close(command_write)


def _hold_idle_clients(system: System, count: int, budget: float,
                       report_write: int, command_read: int) -> None:
    """Open ``count`` clients, each finishing one call, and keep them until told."""
    held = []
    error = None
    deadline = time.monotonic() + budget
    try:
        while len(held) < count and time.monotonic() < deadline:
            client = system.connect()
            client.noop()
            held.append(client)
        if len(held) < count:
            error = f'not all connected within {budget:.0f} s'
    except Exception as failure:
        error = describe(failure)
    send_message(report_write, {'opened': len(held), 'error': error})
    receive_message(command_read, CALL_TIMEOUT + budget)


def settle(server: psutil.Process, fds_before: int) -> None:
    """Wait (bounded) until the server has closed the idle clients' sockets, so that
    its clean-up does not steal CPU from the next measurement."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if server.num_fds() <= fds_before + 8:
                return
        except psutil.Error:
            return
        time.sleep(0.05)


def idle_count(wanted: int, hard_limit: int) -> tuple[int, str | None]:
    """How many idle clients the descriptor limit allows.

    The clients live in a helper process and the server in another, so each process
    needs about ``wanted`` descriptors, not twice that.
    """
    if hard_limit == resource.RLIM_INFINITY or hard_limit >= wanted + FD_MARGIN:
        return wanted, None
    allowed = max(0, hard_limit - FD_MARGIN)
    return allowed, (f'RLIMIT_NOFILE hard limit is {hard_limit}: idle clients '
                     f'reduced from {wanted:,} to {allowed:,}.')


# -- where processes run ------------------------------------------------------------

class Placement:
    """Pins the benchmark (the measuring client) and every server thread to CPUs.

    Left to itself, the scheduler sometimes runs client and server on one CPU and
    sometimes wakes the server on the other; on a VM a cross-CPU wake-up costs tens
    of microseconds, so the same code measured 20 or 110 µs from one run to the next.
    Latency is therefore measured in two fixed placements: one CPU for both (the cost
    of the code itself) and two CPUs (the cost including cross-CPU wake-ups).
    Children forked while pinned (load clients, idle helpers, new server threads)
    inherit the pinning.
    """

    def __init__(self, systems: Any) -> None:
        self.pids = [system.pid for system in systems]
        self.cpus = sorted(os.sched_getaffinity(0))
        self.can_split = len(self.cpus) >= 2

    def one_cpu(self) -> contextlib.AbstractContextManager:
        return self._pinned({self.cpus[-1]}, {self.cpus[-1]})

    def two_cpus(self) -> contextlib.AbstractContextManager:
        return self._pinned({self.cpus[0]}, {self.cpus[-1]})

    @contextlib.contextmanager
    def _pinned(self, client: set[int], server: set[int]):
        self._pin(client, server)
        try:
            yield
        finally:
            self._pin(set(self.cpus), set(self.cpus))

    def _pin(self, client: set[int], server: set[int]) -> None:
        os.sched_setaffinity(0, client)
        for pid in self.pids:
            for thread in psutil.Process(pid).threads():
                with contextlib.suppress(ProcessLookupError):  # a thread just ended
                    os.sched_setaffinity(thread.id, server)


# -- the run -----------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    key: str
    title: str
    unit: str
    higher_is_better: bool = False


def rows_for(plan: Plan) -> list[Row]:
    return [
        Row('p50', 'no-op latency p50, one CPU', 'time'),
        Row('p99', 'no-op latency p99, one CPU', 'time'),
        Row('p50_split', 'no-op latency p50, two CPUs', 'time'),
        Row('rate', f'calls/s, {plan.clients} clients, any CPU', 'rate',
            higher_is_better=True),
        Row('big', '1 MiB str echo median, one CPU', 'time'),
        Row('idle_p50', f'no-op p50, {plan.idle_clients:,} idle clients, one CPU', 'time'),
        Row('idle_rss', f'server RSS, {plan.idle_clients:,} idle clients', 'mib'),
    ]


Results = dict[str, dict[str, 'float | Missing']]


def run(systems: dict[str, System], plan: Plan, children: Children) -> Results:
    results: Results = {row.key: {} for row in rows_for(plan)}
    results['idle_ref'] = {}   # not rows: the references the idle figures are read
    results['base_rss'] = {}   # against, shown in the targets and the notes
    clients = start_and_connect(systems, plan, children, results)
    live = {name: systems[name] for name in clients}
    placement = Placement(live.values())
    with placement.one_cpu():
        samples = interleaved(clients, NOOP, plan.latency_calls, plan)
        big = interleaved(clients, big_echo, plan.big_calls, plan)
    results['p50'].update(summarize(samples, 0.5))
    results['p99'].update(summarize(samples, 0.99))
    results['big'].update(summarize(big, 0.5))
    results['p50_split'].update(measure_split(clients, plan, placement))
    results['rate'].update(measure_throughput(live, plan, children))
    with placement.one_cpu():
        measure_all_idle(live, clients, plan, children, results)
    for client in clients.values():
        client.close()
    return results


def measure_split(clients: dict[str, Client], plan: Plan,
                  placement: 'Placement') -> dict[str, float | Missing]:
    if not placement.can_split:
        return {name: Missing('two CPUs are needed to place client and server apart')
                for name in clients}
    with placement.two_cpus():
        samples = interleaved(clients, NOOP, plan.latency_calls, plan)
    return summarize(samples, 0.5)


def measure_all_idle(live: dict[str, System], clients: dict[str, Client], plan: Plan,
                     children: Children, results: Results) -> None:
    for name, system in live.items():
        try:
            figures = measure_idle(system, clients[name], plan, children)
        except Exception as error:
            missing = Missing(f'{system.label} idle run failed: {describe(error)}')
            figures = dict.fromkeys(IDLE_FIGURES, missing)
        for key, value in figures.items():
            results[key][name] = value


def start_and_connect(systems: dict[str, System], plan: Plan, children: Children,
                      results: Results) -> dict[str, Client]:
    """Start every server before any client exists, so no server inherits a client."""
    failures = {}
    for name, system in systems.items():
        try:
            system.start(children, plan)
        except Exception as error:
            failures[name] = Missing(f'{system.label} did not start: {describe(error)}')
    clients = {}
    for name, system in systems.items():
        if name in failures:
            continue
        try:
            clients[name] = system.connect()
            warm_up(clients[name], plan.warmup_calls)
        except Exception as error:
            failures[name] = Missing(f'{system.label} client failed: {describe(error)}')
    for name, missing in failures.items():
        for row in results.values():
            row[name] = missing
    return clients


# -- the report --------------------------------------------------------------------

def format_value(unit: str, value: float) -> str:
    if unit == 'rate':
        return f'{value:,.0f}'
    if unit == 'mib':
        return f'{value:.1f} MiB'
    if value < 1e-3:
        return f'{value * 1e6:.0f} µs'
    if value < 1.0:
        return f'{value * 1e3:.2f} ms'
    return f'{value:.2f} s'


class Notes:
    """Numbered footnotes; the same text is given one number only."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f'[{self.texts.index(text) + 1}]'


def cell(row: Row, value: float | Missing | None, floor: float | Missing | None,
         notes: Notes) -> str:
    if value is None:
        return '-'
    if isinstance(value, Missing):
        return f'n/a {notes.mark(value.reason)}'
    text = format_value(row.unit, value)
    if isinstance(floor, float) and floor > 0:
        text += f' ({value / floor:.2f}x)'
    return text


def table(systems: dict[str, System], plan: Plan, results: Results, notes: Notes) -> str:
    header = ['figure', *(system.label for system in systems.values())]
    lines = []
    for row in rows_for(plan):
        values = results[row.key]
        lines.append([row.title, *(cell(row, values.get(name), values.get('floor'), notes)
                                   for name in systems)])
    return render_table(header, lines)


def ratio(results: Results, key: str, name: str, reference: str = 'floor',
          reference_key: str | None = None) -> float | None:
    value = results[key].get(name)
    base = results[reference_key or key].get(reference)
    if isinstance(value, float) and isinstance(base, float) and base > 0:
        return value / base
    return None


def verdict(passed: bool | None) -> str:
    return {True: 'PASS', False: 'FAIL', None: 'n/a '}[passed]


def target_lines(systems: dict[str, System], plan: Plan, results: Results) -> list[str]:
    """Each target AVE is held to, with the measured figure and whether it is met."""
    checks = []
    for text, measured, limit, at_most in [
            ('no-op p50 within 1.10x of the floor', ratio(results, 'p50', 'ave'), 1.10, True),
            (f'{plan.clients}-client calls/s at least 0.80x the floor',
             ratio(results, 'rate', 'ave'), 0.80, False),
            ('1 MiB echo within 1.50x of the floor', ratio(results, 'big', 'ave'), 1.50, True),
            (f'p50 with {plan.idle_clients:,} idle clients within 1.10x of its no-idle '
             f'p50 just before', ratio(results, 'idle_p50', 'ave', 'ave', 'idle_ref'), 1.10,
             True)]:
        passed = None if measured is None else (measured <= limit if at_most
                                                else measured >= limit)
        shown = 'not measured' if measured is None else f'{measured:.2f}x'
        checks.append(f'  {verdict(passed)}  {text}: {shown}')
    reference = results['idle_ref'].get('ave')
    if isinstance(reference, float):
        checks[-1] += f' (just before: {format_value("time", reference)})'
    rss = results['idle_rss'].get('ave')
    rss_ok = rss < 50 if isinstance(rss, float) else None
    shown = f'{rss:.1f} MiB' if isinstance(rss, float) else 'not measured'
    checks.append(f'  {verdict(rss_ok)}  AVE server RSS with {plan.idle_clients:,} idle '
                  f'clients under 50 MiB: {shown}')
    checks.append(ahead_line(systems, plan, results))
    return checks


def ahead_line(systems: dict[str, System], plan: Plan, results: Results) -> str:
    """AVE must beat each baseline on every row; list the rows where it does not."""
    rivals = [name for name in ('pyro5', 'rpyc') if name in systems]
    behind, compared = [], 0
    for row in rows_for(plan):
        ave = results[row.key].get('ave')
        for name in rivals:
            other = results[row.key].get(name)
            if not (isinstance(ave, float) and isinstance(other, float)):
                continue
            compared += 1
            if (ave <= other) if row.higher_is_better else (ave >= other):
                behind.append(f'{row.title} vs {systems[name].label}')
    passed = None if compared == 0 else not behind
    detail = f' (behind on: {"; ".join(behind)})' if behind else ''
    return (f'  {verdict(passed)}  AVE ahead of Pyro5 and RPyC on every row: '
            f'{compared - len(behind)} of {compared} comparisons{detail}')


def method_notes(plan: Plan) -> list[str]:
    return [
        f'no-op: {plan.latency_calls:,} calls per system after {plan.warmup_calls} '
        f'warm-up calls, in {plan.rounds} rounds alternating the systems; 1 MiB: median '
        f'of {plan.big_calls} echo calls of a 1 MiB str (1 MiB each way).',
        'one CPU: the measuring client and every server thread pinned to the same CPU '
        '(the cost of the code); two CPUs: client and server pinned to different CPUs '
        '(adds two cross-CPU wake-ups per call); any CPU: not pinned.',
        f'calls/s: {plan.clients} forked clients, each with its own connection, calling '
        f'for {plan.round_seconds:g} s from a common start; total calls / wall time, '
        f'median of {plan.throughput_rounds} rounds per system.',
        f'idle: a helper process opens {plan.idle_clients:,} clients, each finishing one '
        f'call (AVE: authenticated RemoteControl); p50 is the lowest median of 3 chunks of '
        f'{math.ceil(plan.idle_latency_calls / 3)} calls, with and (just before) without '
        f'them; RSS is the server process, all threads.',
        'floor: blocking accept, a thread per connection (one process, one GIL, as every '
        'server here), no handshake. AVE: one-thread '
        'epoll Control with HMAC handshake. Pyro5: multiplex server (its default pool of '
        '80 threads refuses more clients), serpent, one shared object. RPyC: '
        'ThreadedServer (a thread per connection), method references fetched once. '
        'TCP_NODELAY on both ends everywhere; 127.0.0.1 only.',
    ]


def memory_note(systems: dict[str, System], plan: Plan, results: Results) -> str | None:
    """Server RSS before the idle clients, and what each idle client added.

    RSS includes the interpreter pages every server shares with the benchmark it was
    forked from, so the growth per client says more about a design than the total.
    """
    parts = []
    for name, system in systems.items():
        base, loaded = results['base_rss'].get(name), results['idle_rss'].get(name)
        if isinstance(base, float) and isinstance(loaded, float):
            per_client = (loaded - base) * MiB / max(1, plan.idle_clients) / 1024
            parts.append(f'{system.label} {base:.1f} MiB, +{per_client:.1f} KiB per client')
    return f'server RSS before the idle clients: {"; ".join(parts)}.' if parts else None


def print_report(systems: dict[str, System], plan: Plan, results: Results,
                 extra_notes: list[str], elapsed: float, load: float) -> None:
    notes = Notes()
    print(f'AVE RPC benchmark: Python {platform.python_version()}, {os.cpu_count()} CPUs, '
          f'Pyro5 {Pyro5.__version__}, RPyC {rpyc.__version__}; run took {elapsed:.0f} s; '
          f'load average at the start {load:.1f} (other work on the machine adds noise)')
    print('Each cell: value (value / floor). For calls/s higher is better; the ratio is '
          'still value / floor, so above 1.00x beats the floor.\n')
    print(table(systems, plan, results, notes))
    print('\nTargets for AVE:')
    print('\n'.join(target_lines(systems, plan, results)))
    print('\nNotes:')
    for number, text in enumerate(notes.texts, 1):
        print(f'  [{number}] {text}')
    memory = memory_note(systems, plan, results)
    for text in method_notes(plan) + ([memory] if memory else []) + extra_notes:
        print(f'  - {text}')


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true',
                        help='smaller counts and 500 idle clients, for a sanity run')
    parser.add_argument('--only', default='floor,ave,pyro5,rpyc',
                        help='comma-separated systems among floor, ave, pyro5, rpyc')
    args = parser.parse_args(argv)
    args.only = [name.strip().lower() for name in args.only.split(',') if name.strip()]
    unknown = set(args.only) - set(all_systems())
    if unknown or not args.only:
        parser.error(f'--only takes floor, ave, pyro5, rpyc; got {args.only}')
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    _, hard = raise_fd_limit()  # before any fork: the servers need it as much as we do
    idle, fd_note = idle_count(plan.idle_clients, hard)
    plan = replace(plan, idle_clients=idle)
    configure_pyro()
    systems = {name: system for name, system in all_systems().items() if name in args.only}
    children = Children(plan.lifetime)
    started = time.monotonic()
    load = os.getloadavg()[0]
    try:
        results = run(systems, plan, children)
    except KeyboardInterrupt:
        print('interrupted: stopping every child process', file=sys.stderr)
        return 130
    finally:
        children.stop_all()
    print_report(systems, plan, results, [fd_note] if fd_note else [],
                 time.monotonic() - started, load)
    return 0


if __name__ == '__main__':
    sys.exit(main())
