"""How fast the broker hands out equipment, next to labgrid's coordinator.

Run from the repository root: ``.venv/bin/python bench/broker.py [--quick]``.
labgrid is a baseline only: ``.venv/bin/pip install labgrid``; without it (or if its
coordinator cannot run here) its cells read n/a and the reason is printed.

A test job's life with the broker is get, use, give back, over and over; a lab with
many short jobs lives or dies by how many such cycles per second a broker sustains
and by how long a brand-new job waits for its first piece of equipment (that first
``get`` gives the job a session: a spare one, recycled from an earlier job or forked
ahead of need, else one forked then). Measured here, each client in a process of its own:

* cycle = ``r = b.get(profile, wait=CYCLE_WAIT)``, one call on ``r`` (answered by
  the session), ``b.yield_resources(r)``: for a relay from a pool of eight (its reset
  runs the circuit commands, ``true`` here, through ``ave.cmd`` on release, part of
  the real cost; on allocation only after a release that did not finish cleanly)
  and for a workspace (a directory made and deleted); from one client, then from
  eight clients competing for the same pool.
  The ``get`` waits its turn in the broker's queue, as a real job does; a get that
  still ends in Busy is retried and counted, not counted as a cycle.
* first allocation = new ``Broker``, ``get``, first call on the resource returns: new
  clients one after another, each ``Plan.arrival_gap`` (20 ms) after the last left, as jobs
  arrive in a lab; and the same back to back (no gap), which measures how fast a
  lab absorbs a stream of new jobs rather than how long one waits: there the work a
  departed client leaves (its session being recycled, the relay's reset, a new spare
  session) overlaps the next client's measurement, while labgrid's client releases
  synchronously, before its next measurement starts.
* labgrid = acquire + release of a place through its Python client API (what
  ``labgrid-client acquire`` calls, without the process start), eight clients
  competing for eight places; its first allocation is a new client session + acquire.
  labgrid has no queue: a client that finds no idle place asks again at once.
* labgrid + reset: the same, with the relay's reset done the way a labgrid job would
  do it, in the client: ``subprocess.run(['true'])`` before the release, as often as
  AVE resets (the place stays taken while it is reset, as a relay being reset is not
  handed out by AVE either); in its first allocation the reset is after the timed
  part, as AVE's is. This is the like-for-like baseline of the relay rows.

The broker is a ``BrokerServer`` forked here (no daemon, no configuration files) on
127.0.0.1; the coordinator is the ``labgrid-coordinator`` command on 127.0.0.1. Every
measurement stops after a number of cycles or seconds, whichever comes first, and
every process started here is stopped and reaped in the end, also after an error.
"""
from __future__ import annotations

import argparse
import json
import contextlib
import importlib.metadata
import logging
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, NamedTuple

import psutil

from ave import cmd, config
from ave.broker.client import Broker
from ave.broker.exceptions import Busy
from ave.broker.server import BrokerServer
from ave.equipment import load_types
from ave.exceptions import Timeout
from ave.network.connection import above_ephemeral_ports, find_free_port

from _common import (Children, describe, die_with_parent, percentile, receive_message,
                     render_table, send_message)

HOST = '127.0.0.1'
POOL = 8                    # relays in the broker, places in the coordinator
CLIENTS = 8                 # concurrent client processes in the contended runs
PROFILES = {'relay': {'type': 'relay'}, 'workspace': {'type': 'workspace'}}
STOP_TIMEOUT = 10.0
START_TIMEOUT = 30.0
REPORT_MARGIN = 30.0        # a client reports this long after its work should be done
CYCLE_WAIT = 10.0           # seconds a cycle's get waits in the queue before Busy
RESET_COMMAND = ['true']    # what a relay's circuits run here, on reset


@dataclass(frozen=True)
class Plan:
    """How much to measure; a loop ends at its cycle count or its time, whichever first."""
    rounds: int = 3
    seconds: float = 3.0
    max_cycles: int = 100_000
    warmup_seconds: float = 0.5
    warmup_cycles: int = 20
    new_clients: int = 50
    new_client_seconds: float = 30.0
    arrival_gap: float = 0.02
    cmd_calls: int = 200
    lifetime: float = 600.0

    @property
    def client_timeout(self) -> float:
        """How long any one client may take, warm-up included, before it is given up."""
        return (self.warmup_seconds + max(self.seconds, self.new_client_seconds)
                + REPORT_MARGIN)


FULL = Plan()
QUICK = Plan(rounds=1, seconds=0.5, warmup_seconds=0.2, warmup_cycles=5, new_clients=10,
             new_client_seconds=10.0, cmd_calls=20, lifetime=180.0)


@dataclass
class Rate:
    """Cycles per second, with the cycles completed and the Busy answers met."""
    cycles: int
    busy: int
    per_second: float


@dataclass
class Latency:
    """Seconds from start to done: two percentiles, the sample count and Busy answers."""
    p50: float
    p99: float
    count: int
    busy: int


# -- clients -----------------------------------------------------------------------

def run_clients(children: Children, plan: Plan, count: int, body: Callable[..., dict],
                *args: Any) -> list[dict]:
    """Run ``body(index, start, plan, *args)`` in ``count`` processes; their reports.

    Each client prepares (connects, warms up), then calls ``start()``: that reports it
    ready and waits until every client is, so that the timed windows overlap.
    """
    go_read, go_write = os.pipe()
    clients = []
    try:
        for index in range(count):
            report_read, report_write = os.pipe()
            pid = children.fork(_client_main, body, index, go_read, go_write,
                                report_write, (plan, *args))
            os.close(report_write)
            clients.append((pid, report_read))
        for _, report in clients:
            _checked(receive_message(report, START_TIMEOUT))
        os.close(go_write)  # every client sees end-of-file at once: go
        go_write = -1
        return [_checked(receive_message(report, plan.client_timeout))
                for _, report in clients]
    finally:
        for fd in (go_read, go_write):
            if fd >= 0:
                os.close(fd)
        for pid, report in clients:
            os.close(report)
            children.wait(pid, STOP_TIMEOUT)


def _client_main(body: Callable[..., dict], index: int, go_read: int, go_write: int,
                 report: int, args: tuple) -> None:
    os.close(go_write)

    def start() -> None:
        send_message(report, {'ready': True})
        os.read(go_read, 1)  # returns empty once the parent closed its end

    try:
        result = body(index, start, *args)
    except Exception as error:  # the parent raises it; Children.fork prints the trace
        send_message(report, {'error': describe(error)})
        raise
    send_message(report, result)


def _checked(message: dict) -> dict:
    if 'error' in message:
        raise RuntimeError(f'a client failed: {message["error"]} (trace above)')
    return message


def timed_loop(cycle: Callable[[], bool], seconds: float, max_cycles: int) -> dict:
    """Repeat ``cycle`` (True: done, False: Busy) until the count or the time is up."""
    cycles = busy = 0
    began = time.monotonic()
    deadline = began + seconds
    while cycles < max_cycles and time.monotonic() < deadline:
        if cycle():
            cycles += 1
        else:
            busy += 1
    return {'cycles': cycles, 'busy': busy, 'elapsed': time.monotonic() - began}


def rate_of(reports: list[dict]) -> Rate:
    """One round: all clients' cycles over the longest window, never flattered by a
    client that finished early."""
    cycles = sum(report['cycles'] for report in reports)
    elapsed = max(report['elapsed'] for report in reports)
    return Rate(cycles, sum(report['busy'] for report in reports), cycles / elapsed)


# -- AVE ---------------------------------------------------------------------------

class BenchBroker(BrokerServer):
    """A BrokerServer that dies with the benchmark should the benchmark be killed.

    Its sessions follow: a session whose broker link closes tears down and exits.
    """

    def perform_prctl(self, death_signal: int = 0) -> None:
        super().perform_prctl(signal.SIGTERM)


def relay_entry(number: int) -> dict:
    """A relay whose one circuit is switched by ``true``: the command always succeeds."""
    circuit = {'open': ['true'], 'close': ['true'], 'default': 'open'}
    return {'type': 'relay', 'uid': f'r{number}', 'circuits': {'c1': circuit}}


def start_broker(home: str, isolation: str = 'auto') -> BenchBroker:
    """A broker configured the way a lab owner would: broker.json with every default,
    the relays of the pool and a free port; ``isolation`` as broker.json takes it."""
    config.create_default(home)
    sock, port = find_free_port(start=above_ephemeral_ports(), listen=False)
    sock.close()
    with open(os.path.join(config.config_dir(home), 'broker.json'), 'w') as stream:
        json.dump({'host': HOST, 'port': port, 'isolation': isolation,
                   'equipment': [relay_entry(n) for n in range(1, POOL + 1)]}, stream)
    types = load_types()
    settings = {name: kind.load_settings(home) for name, kind in types.items()}
    server = BenchBroker(home, config.load_broker_config(home), config.load_authkeys(home),
                         types, settings)
    server.start(synchronize=True)
    return server


def stop_broker(server: BenchBroker) -> None:
    """SIGTERM the broker, then make sure that none of its sessions (or their
    commands) outlives it."""
    try:
        descendants = psutil.Process(server.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    server.terminate()
    try:
        server.join(STOP_TIMEOUT)
    except Timeout:
        os.kill(server.pid, signal.SIGKILL)
        server.join(STOP_TIMEOUT)
    _, alive = psutil.wait_procs(descendants, timeout=STOP_TIMEOUT)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=STOP_TIMEOUT)


def ave_cycle(broker: Broker, profile: dict) -> bool:
    """get (waiting its turn), one call on the resource (served by the session), give
    it back."""
    try:
        resource = broker.get(profile, wait=CYCLE_WAIT)
    except Busy:
        return False
    with resource:
        resource.get_profile()
        broker.yield_resources(resource)
    return True


def ave_cycles(index: int, start: Callable[[], None], plan: Plan,
               address: tuple[str, int], profile: dict) -> dict:
    """One client: warm up (its session is started here), then cycle."""
    with Broker(address) as broker:
        cycle = partial(ave_cycle, broker, profile)
        timed_loop(cycle, plan.warmup_seconds, plan.warmup_cycles)
        start()
        return timed_loop(cycle, plan.seconds, plan.max_cycles)


def ave_first_allocations(index: int, start: Callable[[], None], plan: Plan,
                          address: tuple[str, int], profile: dict, gap: float) -> dict:
    """New clients one after another, ``gap`` seconds apart: time from a new Broker to
    the first call's answer."""
    with Broker(address) as warmup:  # import and first connect untimed, as labgrid's
        warmup.status()
    start()
    samples: list[float] = []
    busy = 0
    deadline = time.monotonic() + plan.new_client_seconds
    while len(samples) < plan.new_clients and time.monotonic() < deadline:
        began = time.perf_counter()
        with Broker(address) as broker:
            try:
                resource = broker.get(profile)
            except Busy:
                busy += 1
                continue
            with resource:
                resource.get_profile()
                samples.append(time.perf_counter() - began)
        time.sleep(gap)
    return {'samples': samples, 'busy': busy}


def measure_cmd(plan: Plan) -> list[dict]:
    """What one relay switch costs a session: ``ave.cmd.run(['true'])``, timed here."""
    cmd.run(['true'])
    samples = []
    deadline = time.monotonic() + plan.seconds
    while len(samples) < plan.cmd_calls and time.monotonic() < deadline:
        began = time.perf_counter()
        cmd.run(['true'])
        samples.append(time.perf_counter() - began)
    return [{'samples': samples, 'busy': 0}]


# -- labgrid -----------------------------------------------------------------------

def labgrid_version() -> str:
    try:
        return importlib.metadata.version('labgrid')
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError('labgrid is not installed '
                           '(.venv/bin/pip install labgrid)') from None


# labgrid-coordinator's main() with asyncio's debug mode, which it switches on
# unconditionally, left off: how a coordinator patched for speed would run.
_COORDINATOR_WITHOUT_DEBUG = (
    'import asyncio, sys; from labgrid.remote import coordinator; '
    'set_debug = asyncio.BaseEventLoop.set_debug; '
    'asyncio.BaseEventLoop.set_debug = lambda loop, enabled: set_debug(loop, False); '
    'sys.argv[0] = "labgrid-coordinator"; coordinator.main()')


def start_coordinator(directory: str, debug: bool = True) -> tuple[subprocess.Popen, str]:
    """``labgrid-coordinator`` on 127.0.0.1 and a port of its choice; returns its address.

    Its output goes to a file: it prints every request, and a pipe nobody drains
    would stall it. It runs in ``directory`` because it saves its places there.
    ``debug`` False runs it without asyncio's debug mode (``--labgrid-without-debug``).
    """
    command = [os.path.join(os.path.dirname(sys.executable), 'labgrid-coordinator')] \
        if debug else [sys.executable, '-c', _COORDINATOR_WITHOUT_DEBUG]
    output = os.path.join(directory, 'coordinator.out')
    with open(output, 'wb') as sink:
        process = subprocess.Popen([*command, '--listen', f'{HOST}:0'], cwd=directory,
                                   stdin=subprocess.DEVNULL, stdout=sink,
                                   stderr=subprocess.STDOUT,
                                   preexec_fn=partial(die_with_parent, os.getpid()))
    try:
        return process, _await_listening(process, output)
    except BaseException:
        stop_coordinator(process)
        raise


def _await_listening(process: subprocess.Popen, output: str) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with open(output, encoding='utf-8', errors='replace') as stream:
            text = stream.read()
        found = re.search(rf'listening on {re.escape(HOST)}:(\d+)', text)
        if found:
            return f'{HOST}:{found.group(1)}'
        if process.poll() is not None:
            raise RuntimeError(f'labgrid-coordinator exited with status '
                               f'{process.returncode}: {text.strip()[-800:]}')
        time.sleep(0.05)
    raise RuntimeError(f'labgrid-coordinator did not listen within {START_TIMEOUT:.0f} s')


def stop_coordinator(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT)


class LabgridClient:
    """A labgrid client session driven the way ``labgrid-client`` drives it.

    ``acquire()``/``release()`` are the methods behind the commands of that name
    (request, then wait until the coordinator's update reached this client); they
    print a line each, which goes to /dev/null. labgrid is imported here, in the
    client process, so that the benchmark never forks with gRPC's threads running.
    """

    def __init__(self, address: str, user: str) -> None:
        from labgrid.remote.client import start_session
        os.environ['LG_USERNAME'] = user  # tells concurrent clients apart, as users
        self.args = argparse.Namespace(place=None, allow_unmatched=True, kick=False)
        with _quiet():
            self.session = start_session(address, extra={'args': self.args})

    def run(self, coroutine: Any) -> Any:
        with _quiet():
            return self.session.loop.run_until_complete(coroutine)

    def create(self, place: str) -> None:
        self.args.place = place
        self.run(self.session.add_place())

    def acquire(self, place: str) -> bool:
        """Take ``place``; False if someone else got it first (any other error raises)."""
        from labgrid.remote.client import ServerError, UserError
        self.args.place = place
        try:
            self.run(self.session.acquire())
        except (ServerError, UserError) as error:
            if 'already acquired' not in str(error):
                raise
            return False
        return True

    def catch_up(self) -> None:
        """Let the places' updates that the coordinator has sent so far arrive."""
        self.run(self.session.sync_with_coordinator())

    def release(self, place: str) -> None:
        self.args.place = place
        self.run(self.session.release())

    def idle_place(self, first: int) -> str | None:
        """An idle place as this client last heard, looking from ``first`` on."""
        names = sorted(self.session.places)
        for name in names[first:] + names[:first]:
            if not self.session.places[name].acquired:
                return name
        return None

    def close(self) -> None:
        self.run(self.session.stop())
        self.run(self.session.close())


@contextlib.contextmanager
def _quiet():
    with open(os.devnull, 'w') as sink, contextlib.redirect_stdout(sink):
        yield


def place_names() -> list[str]:
    return [f'bench-{number}' for number in range(POOL)]


def labgrid_create(index: int, start: Callable[[], None], plan: Plan, address: str) -> dict:
    client = LabgridClient(address, 'bench-setup')
    for name in place_names():
        client.create(name)
    client.close()
    start()
    return {}


def reset_relay() -> None:
    """A relay reset as a labgrid job would run it: the circuit command, in the client."""
    subprocess.run(RESET_COMMAND, check=True)


def labgrid_cycle(client: LabgridClient, first: int, reset: bool) -> bool:
    """Acquire an idle place of the pool and release it (the AVE cycle's counterpart);
    with ``reset``, reset the relay before releasing it."""
    place = client.idle_place(first)
    if place is None:
        client.catch_up()
        return False
    if not client.acquire(place):
        return False
    if reset:
        reset_relay()
    client.release(place)
    return True


def labgrid_cycles(index: int, start: Callable[[], None], plan: Plan, address: str,
                   reset: bool) -> dict:
    """One client. labgrid has no pool: a client names the place it wants. Each client
    here looks for an idle one starting from a place of its own, which spares labgrid
    most collisions with the others."""
    client = LabgridClient(address, f'bench{index}')
    cycle = partial(labgrid_cycle, client, index, reset)
    timed_loop(cycle, plan.warmup_seconds, plan.warmup_cycles)
    start()
    result = timed_loop(cycle, plan.seconds, plan.max_cycles)
    client.close()
    return result


def labgrid_first_allocations(index: int, start: Callable[[], None], plan: Plan,
                              address: str, reset: bool, gap: float) -> dict:
    """New client sessions one after another, ``gap`` seconds apart: time from nothing
    to an acquired place (with ``reset``, the relay is reset after that, before it is
    released)."""
    place = place_names()[0]
    LabgridClient(address, 'bench-warmup').close()  # import and first connect untimed
    start()
    samples: list[float] = []
    busy = 0
    deadline = time.monotonic() + plan.new_client_seconds
    while len(samples) < plan.new_clients and time.monotonic() < deadline:
        began = time.perf_counter()
        client = LabgridClient(address, 'bench-new')
        if client.acquire(place):
            samples.append(time.perf_counter() - began)
            if reset:
                reset_relay()
            client.release(place)
        else:
            busy += 1
        client.close()
        time.sleep(gap)
    return {'samples': samples, 'busy': busy}


# -- rounds ------------------------------------------------------------------------

LABGRID = {'labgrid': False, 'labgrid+reset': True}  # baselines: reset in the client?


class Step(NamedTuple):
    """One measurement of one round; ``run`` returns the clients' reports."""
    name: str
    system: str
    run: Callable[[], list[dict]]


def round_steps(children: Children, plan: Plan, ave: tuple[str, int],
                labgrid: str | None) -> list[Step]:
    """A round's measurements, labgrid's next to AVE's so a noisy spell hits both."""
    steps = []
    for count in (1, CLIENTS):
        for baseline, reset in LABGRID.items():
            steps.append(Step(f'{baseline} x{count}', 'labgrid', partial(
                run_clients, children, plan, count, labgrid_cycles, labgrid, reset)))
        for name, profile in PROFILES.items():
            steps.append(Step(f'{name} x{count}', 'ave', partial(
                run_clients, children, plan, count, ave_cycles, ave, profile)))
    for arrival, gap in (('first', plan.arrival_gap), ('back to back', 0.0)):
        for baseline, reset in LABGRID.items():
            steps.append(Step(f'{baseline} {arrival}', 'labgrid', partial(
                run_clients, children, plan, 1, labgrid_first_allocations, labgrid, reset,
                gap)))
        for name, profile in PROFILES.items():
            steps.append(Step(f'{name} {arrival}', 'ave', partial(
                run_clients, children, plan, 1, ave_first_allocations, ave, profile, gap)))
    steps.append(Step('cmd', 'ave', partial(measure_cmd, plan)))
    return steps


def measure(children: Children, plan: Plan, ave: tuple[str, int], labgrid: str | None,
            problem: str | None) -> tuple[dict[str, list[list[dict]]], str | None]:
    """Every step's reports, round by round. AVE failing fails the run; labgrid failing
    ends only labgrid's part, and why is kept for the table."""
    results: dict[str, list[list[dict]]] = {}
    for _ in range(plan.rounds):
        for step in round_steps(children, plan, ave, labgrid):
            if step.system == 'labgrid' and problem is not None:
                continue
            try:
                reports = step.run()
            except Exception as error:
                if step.system != 'labgrid':
                    raise
                problem = describe(error)
                continue
            results.setdefault(step.name, []).append(reports)
    return results, problem


def rate(rounds: list[list[dict]]) -> Rate:
    """The median round's rate; Busy answers and cycles summed over every round."""
    per_round = [rate_of(reports) for reports in rounds]
    return Rate(sum(r.cycles for r in per_round), sum(r.busy for r in per_round),
                statistics.median(r.per_second for r in per_round))


def latency(rounds: list[list[dict]]) -> Latency:
    """Percentiles over the samples of every round together."""
    reports = [report for reports in rounds for report in reports]
    samples = [sample for report in reports for sample in report['samples']]
    if not samples:
        raise ValueError('no samples: every attempt was answered Busy')
    return Latency(percentile(samples, 0.50), percentile(samples, 0.99), len(samples),
                   sum(report['busy'] for report in reports))


# -- the table ---------------------------------------------------------------------

def rate_row(what: str, ave: Rate, baselines: list[Rate | None]) -> list[str]:
    """AVE's rate, then each baseline's with AVE's ratio to it (None: not measured)."""
    cells = [what, 'cycles/s', f'{ave.per_second:,.0f}']
    for theirs in baselines:
        cells += ['n/a' if theirs is None else f'{theirs.per_second:,.0f}',
                  _ratio(ave.per_second, theirs and theirs.per_second)]
    return _padded(cells) + [_busy((ave.busy, ave.cycles),
                                   [t and (t.busy, t.cycles) for t in baselines])]


def latency_rows(what: str, ave: Latency, baselines: list[Latency | None]) -> list[list[str]]:
    rows = []
    for label in ('p50', 'p99'):
        mine = getattr(ave, label)
        cells = [f'{what}, {label}', 'ms', f'{mine * 1000:.2f}']
        for theirs in baselines:
            taken = None if theirs is None else getattr(theirs, label)
            # Faster means less time here: their time over ours.
            cells += ['n/a' if taken is None else f'{taken * 1000:.2f}', _ratio(taken, mine)]
        rows.append(_padded(cells) + [_busy((ave.busy, ave.count),
                                            [t and (t.busy, t.count) for t in baselines])])
    return rows


def _padded(cells: list[str]) -> list[str]:
    """Blank cells for the baselines a row has no counterpart in (the last ones)."""
    return cells + [''] * (3 + 2 * len(LABGRID) - len(cells))


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return 'n/a'
    return f'{numerator / denominator:.2f}x'


def _busy(mine: tuple[int, int], theirs: list[tuple[int, int] | None]) -> str:
    """Busy answers per 100 completed cycles (or new clients): AVE's, then those of
    the baselines that were measured."""
    return ' / '.join(f'{100 * busy / max(done, 1):.1f}'
                      for busy, done in [mine, *(t for t in theirs if t is not None)])


def table_rows(results: dict[str, list[list[dict]]]) -> list[list[str]]:
    def baselines(suffix: str, aggregate: Callable, relay: bool) -> list:
        """labgrid's figure; for a relay row also labgrid + reset's, its like for like
        (a workspace has no reset command to compare)."""
        names = list(LABGRID) if relay else [name for name, reset in LABGRID.items()
                                             if not reset]
        return [aggregate(results[name + suffix]) if name + suffix in results else None
                for name in names]

    rows = []
    for count, label in ((1, '1 client'), (CLIENTS, f'{CLIENTS} clients')):
        for name in PROFILES:
            pool = f', pool of {POOL}' if name == 'relay' and count > 1 else ''
            rows.append(rate_row(f'{name} cycle, {label}{pool}',
                                 rate(results[f'{name} x{count}']),
                                 baselines(f' x{count}', rate, name == 'relay')))
    for arrival, label in (('first', 'first allocation'),
                           ('back to back', 'new clients back to back')):
        for name in PROFILES:
            rows += latency_rows(f'{label}, {name}', latency(results[f'{name} {arrival}']),
                                 baselines(f' {arrival}', latency, name == 'relay'))
    command = latency(results['cmd'])
    rows.append(_padded(["ave.cmd.run(['true']), p50", 'ms', f'{command.p50 * 1000:.2f}'])
                + [''])
    return rows


NOTES = """\
AVE cycle: get (waiting in the queue) + get_profile() on the resource + yield_resources;
labgrid cycle: acquire + release of an idle place through its Python client API (no
process start); labgrid+reset: the same with subprocess.run(['true']) before the release
(in a first allocation after the timed part), the like-for-like baseline of the relay
rows. Rates: the median of the rounds; latencies: p50/p99 of every round's samples.
"AVE vs ..." above 1.00x means AVE is faster (rates: AVE / baseline; latencies: baseline
time / AVE time). Busy/100: Busy answers (labgrid: acquires lost to another client, or
no idle place seen) per 100 completed cycles or new clients, AVE / labgrid /
labgrid+reset; they are retried at once and are not cycles. First allocation: new Broker
+ get + first call returns (labgrid: new client session + acquire), new clients 20 ms
apart; back to back: the same without the gap (how fast new jobs are absorbed; AVE's
cleanup after a client overlaps the next one, labgrid's release is synchronous and
untimed). A relay cycle runs
ave.cmd.run once in the session (the reset on release; a relay released cleanly is not
reset again when allocated)."""

COORDINATOR_MODES = {
    True: 'labgrid-coordinator runs as shipped, in the asyncio debug mode its main() '
          'switches on\n(--labgrid-without-debug measures it without).',
    False: 'labgrid-coordinator runs WITHOUT the asyncio debug mode its main() switches '
           'on\n(not as shipped: --labgrid-without-debug).'}


def report(plan: Plan, results: dict[str, list[list[dict]]], problem: str | None,
           version: str | None, debug: bool, isolation: str) -> str:
    header = ['measurement', 'unit', 'AVE', 'labgrid', 'AVE vs labgrid', 'labgrid+reset',
              'AVE vs lg+reset', 'Busy/100']
    lines = [f'Broker benchmark: Python {platform.python_version()}, {os.cpu_count()} '
             f'CPUs (load average {os.getloadavg()[0]:.1f} at the end), labgrid '
             f'{version or "n/a"}; {plan.rounds} round(s), each rate {plan.seconds:g} s '
             f'or {plan.max_cycles:,} cycles, {plan.new_clients} new clients per latency; '
             f'isolation {isolation}.',
             '', render_table(header, table_rows(results)), '', NOTES,
             COORDINATOR_MODES[debug]]
    if problem:
        lines += ['', f'labgrid: n/a because {problem}']
    return '\n'.join(lines)


# -- main --------------------------------------------------------------------------

def start_labgrid(stack: contextlib.ExitStack, children: Children, plan: Plan,
                  directory: str, debug: bool) -> tuple[str | None, str | None, str | None]:
    """The coordinator's address with the pool of places made, or why labgrid is n/a:
    a missing baseline must not cost the AVE figures. Also returns labgrid's version."""
    version = None
    try:
        version = labgrid_version()
        workdir = os.path.join(directory, 'labgrid')
        os.mkdir(workdir)
        coordinator, address = start_coordinator(workdir, debug)
        stack.callback(stop_coordinator, coordinator)
        run_clients(children, plan, 1, labgrid_create, address)
        return address, None, version
    except Exception as error:  # shown verbatim in place of labgrid's figures
        return None, describe(error), version


def run(plan: Plan, labgrid_debug: bool = True, isolation: str = 'auto') -> str:
    with contextlib.ExitStack() as stack:  # undone last to first: clients, servers, files
        directory = stack.enter_context(
            tempfile.TemporaryDirectory(prefix='ave-bench-broker-'))
        home = os.path.join(directory, 'home')
        os.mkdir(home)
        children = Children(plan.lifetime)
        server = start_broker(home, isolation)
        stack.callback(stop_broker, server)
        labgrid, problem, version = start_labgrid(stack, children, plan, directory,
                                                  labgrid_debug)
        stack.callback(children.stop_all)
        results, problem = measure(children, plan, (HOST, server.port), labgrid, problem)
        return report(plan, results, problem, version, labgrid_debug,
                      server.isolation.describe())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='a short sanity run')
    parser.add_argument('--labgrid-without-debug', action='store_true',
                        help='run the coordinator without the asyncio debug mode it '
                             'switches on (a faster baseline than labgrid as shipped)')
    parser.add_argument('--isolation', choices=('auto', 'required', 'off'), default='auto',
                        help="broker.json's isolation for the broker measured (the "
                             "sandbox's cost shows as on against off)")
    args = parser.parse_args(argv)
    # A session whose broker stops warns about it; at the end of a run that is the plan.
    logging.getLogger('ave').setLevel(logging.ERROR)
    print(run(QUICK if args.quick else FULL, not args.labgrid_without_debug,
              args.isolation))
    return 0


if __name__ == '__main__':
    sys.exit(main())
