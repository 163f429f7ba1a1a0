"""Restart the broker over and over under load: does any client notice?

Run from the repository root:
``.venv/bin/python bench/restart.py [--crash] [--quick] [--keep]``.
Exit status 0 when every target is met, 1 when one is missed or the run failed.

``ave-broker --restart`` promises that running test jobs never see it: no refused
connection, no failed call, no lost session, and at most a short pause while the new
broker adopts the old one's sockets. This benchmark holds it to that promise with
the real daemon and the real command, configured in a temporary home:

* the broker serves eight relays on 127.0.0.1 (each circuit switched by ``true``);
* eight client processes cycle without pause: ``get({'type': 'relay'})``, one call
  on the relay (answered by the client's session), ``yield_resources``. Half of them
  keep one ``Broker`` connection for the whole run, and their session until a Busy
  answer closes it (the broker closes a client's session on every failed ``get``):
  their connections and sessions are what a restart must hand over. The other half
  open a new connection for every cycle, so that a moment without a listener would
  show as refused connections; they also make a restart meet sessions being born
  and torn down. A Busy answer (a relay given back is still being reset, or held by
  another client) is counted and the cycle tried again at once;
* ``ave-broker --restart`` then runs a hundred times, each one right after an
  ``ave-broker --status``: a process start of about the same weight that never
  touches the broker's sockets, the control that shows how long clients pause on
  this machine, under this load, when nothing is restarted.

Every RPC that got an answer (a Busy answer too) is a completed call and gets a
timestamp; the gaps between one client's consecutive completed calls are its pauses.
A command's pause is the longest gap of any client that overlaps the time the
command ran. At the end the design's other promises are checked too: old brokers
exit, sessions of departed clients end and their relays come back, and
``ave-broker --stop`` leaves nothing of the broker running.

``--crash`` measures the other half, a broker that dies: each cycle SIGKILLs the
broker and starts a new one with ``ave-broker --start`` (what systemd's
``Restart=on-failure`` does, without its one-second delay). Sessions outlive the
broker and the new one adopts them; the clients' ``Broker`` objects reconnect and
resume by themselves. The clients behave as a job written for it would: a broker
call that meets the outage (the connection lost, a refused connection, a ``get``
whose answer was lost) is tried again after a short pause, and after a lost ``get``
the client gives back what ``list_allocations()`` says it holds (an answer that got
lost may have granted a relay) before it asks again; a yield asked again after its
answer was lost may hear that the relay is no longer the client's, which is right when
the client resumed as the same holder. Each allocation is used for
three calls on the relay. The promise: no call on a relay fails, no session is lost
(a relay held across a crash is still the client's afterwards), and allocating
pauses only while no broker runs. Only broker calls (get, yield) are timestamps
here, so a crash's pause is the allocation pause: the longest gap between two of a
client's answered broker calls that overlaps the kill and the start.

Every loop ends at its count or its time budget, whichever comes first; every
process started here is stopped and reaped at the end, also after an error, and the
temporary directory is removed (``--keep`` keeps it when a target was missed or the
run failed, with the broker's log under ``.ave/logs``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil

from ave import config
from ave.broker.client import Broker
from ave.broker.daemon import find_broker, log_dir, wait_for_exit
from ave.broker.exceptions import Busy, NotAllocated, NotOwner
from ave.exceptions import Exit
from ave.network.connection import above_ephemeral_ports, find_free_port
from ave.network.control import RemoteControl
from ave.network.exceptions import ConnectionClosed, ConnectionException, ConnectionRefused

from _common import (Children, describe, percentile, receive_message, render_table,
                     send_message)

HOST = '127.0.0.1'
RELAYS = 8
CLIENTS = 8
PROFILE = {'type': 'relay'}
PAUSE_TARGET = 0.100        # seconds: the bound on a restart's pause
CLI = [sys.executable, '-m', 'ave.broker.cli']
CLI_TIMEOUT = 60.0          # one ave-broker command, --restart included
PORT_TRIES = 3              # a picked port can be taken before the broker binds it
CLIENT_TIMEOUT = 5.0        # connecting to the broker and each broker reply
CALL_TIMEOUT = 10.0         # each reply from a session
WARMUP_CYCLES = 20          # per client, before measuring: sessions exist, code is warm
SETTLE = 1.0                # seconds of plain load before and after the restarts
FAILURE_PAUSE = 0.005       # a client that just failed waits this long before it goes on
START_TIMEOUT = 60.0        # for the clients to warm up
REPORT_TIMEOUT = 60.0       # for a client to report once asked to stop
AFTERMATH = 5.0             # seconds old brokers and sessions get to go away at the end
STOP_GRACE = 15.0
MAX_RESTART_FAILURES = 3    # consecutive failed --restart commands end the series
FIRST_ERRORS = 5            # failure messages each client keeps for the report
NOTES_WIDTH = 88
HOLD_CALLS = 3              # crash mode: calls on the relay per allocation
OUTAGE_PATIENCE = 30.0      # crash mode: how long a broker call is retried in an outage
OUTAGE_PAUSE = 0.02         # crash mode: between two tries of a broker call


@dataclass(frozen=True)
class Plan:
    """How many restarts, how far apart, and the time they may take all together."""
    restarts: int = 100
    interval: float = 0.1
    budget: float = 600.0
    crash: bool = False  # SIGKILL and --start instead of --restart

    @property
    def cycling(self) -> float:
        """The longest a client cycles: the series, one more round of commands that
        began just before the budget ran out, and the settling time around them."""
        return self.budget + 4 * CLI_TIMEOUT + 2 * SETTLE

    @property
    def lifetime(self) -> float:
        """The longest any child may live: the alarm that ends it if all else fails."""
        return self.cycling + START_TIMEOUT + REPORT_TIMEOUT + 60


FULL = Plan()
QUICK = Plan(restarts=10, budget=120.0)


# -- the home and its broker ------------------------------------------------------------

class Lab:
    """A temporary AVE home with a relay pool, and the ave-broker daemon serving it."""

    def __init__(self, home: str) -> None:
        self.home = home
        config.create_default(home)
        self.port = free_port()
        self.write_broker_json()
        self.admin_key = config.load_authkeys(home)['admin']
        self.pid: int | None = None

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    def write_broker_json(self) -> None:
        content = {'host': HOST, 'port': self.port,
                   'equipment': [relay_entry(n) for n in range(1, RELAYS + 1)]}
        path = os.path.join(config.config_dir(self.home), 'broker.json')
        with open(path, 'w', encoding='utf-8') as stream:
            json.dump(content, stream, indent=2)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """``ave-broker ARGS --home HOME``, run to completion (or CLI_TIMEOUT)."""
        return subprocess.run([*CLI, *args, '--home', self.home], capture_output=True,
                              text=True, timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)

    def start(self) -> None:
        """``--start``; another free port is tried if someone took the picked one."""
        for _ in range(PORT_TRIES):
            result = self.cli('--start')
            if 'Address already in use' not in result.stderr:
                break
            self.port = free_port()
            self.write_broker_json()
        if result.returncode != 0:
            raise RuntimeError(f'ave-broker --start failed: {result.stderr.strip()}')
        self.pid = pid_of(result.stdout)

    def processes(self) -> list[psutil.Process]:
        """Every live process of this home's ave-broker: daemons old and new, sessions,
        commands still running. Daemons and sessions are forked without exec, so their
        command line still names the home."""
        found = []
        for process in psutil.process_iter(['cmdline']):
            cmdline = process.info['cmdline'] or []
            if self.home in cmdline and 'ave.broker.cli' in cmdline:
                found.append(process)
        return found

    def sessions(self) -> list[psutil.Process]:
        found = []
        for process in self.processes():
            try:
                if process.name().startswith('ave-broker-sess'):
                    found.append(process)
            except psutil.NoSuchProcess:
                pass  # it ended while we looked: not a session that is left
        return found

    def free_relays(self) -> int:
        """How many relays the broker would hand out right now (asked as admin)."""
        with RemoteControl(self.address, self.admin_key, CLIENT_TIMEOUT) as admin:
            return len(admin.list_available())

    def stop(self) -> list[tuple[int, str]]:
        """``--stop`` if a broker runs; then, after up to STOP_GRACE, whatever of this
        home still runs (pid and name). An orderly stop should leave nothing."""
        leftovers = self.processes()
        if find_broker(self.home).process is None:
            return [(p.pid, name_of(p)) for p in leftovers]
        try:
            self.cli('--stop')
        except subprocess.TimeoutExpired:
            pass  # whatever did not stop is listed below
        deadline = time.monotonic() + STOP_GRACE
        survivors = []
        for process in leftovers:
            if not wait_for_exit(process, max(0.0, deadline - time.monotonic())):
                survivors.append(process)
        return [(p.pid, name_of(p)) for p in survivors]

    def cleanup(self) -> list[int]:
        """Stop the broker if it still runs, then kill whatever of this home is left;
        returns the pids that had to be killed."""
        self.stop()
        killed = []
        for process in self.processes():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                continue
            killed.append(process.pid)
            wait_for_exit(process, STOP_GRACE)
        return killed


def pid_of(output: str) -> int:
    """The pid ave-broker --start and --restart report first (``started, pid 1234``)."""
    match = re.match(r'\w+, pid (\d+)', first_line(output))
    if match is None:
        raise RuntimeError(f'ave-broker reported no pid: {output!r}')
    return int(match.group(1))


def first_line(output: str) -> str:
    return output.splitlines()[0] if output else ''


def name_of(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return '(gone)'


def relay_entry(number: int) -> dict:
    """A relay whose one circuit is switched by ``true``: the command always succeeds."""
    circuit = {'open': ['true'], 'close': ['true'], 'default': 'open'}
    return {'type': 'relay', 'uid': f'r{number}', 'circuits': {'c1': circuit}}


def free_port() -> int:
    """A port nobody listens on, above the range the kernel gives outgoing connections
    (where there is room): the clients' own connections can then never take it."""
    sock, port = find_free_port(start=above_ephemeral_ports(), listen=False, host=HOST)
    sock.close()
    return port



# -- the clients ------------------------------------------------------------------------

class LoadClient:
    """One test job that allocates, calls and releases a relay, over and over, and
    keeps a record of how every call went."""

    def __init__(self, address: tuple[str, int], fresh: bool, crash: bool = False) -> None:
        self.address = address
        self.fresh = fresh
        self.crash = crash
        self.broker: Broker | None = None
        self.holding = False  # a relay is held that a lost session would take along
        self.reset()

    def reset(self) -> None:
        """Forget what happened so far (the warm-up); measuring starts now."""
        self.stamps = array('d', [time.monotonic()])
        self.cycles = 0
        self.busy = 0
        self.lost = 0
        self.failed: Counter[str] = Counter()
        self.errors: list[tuple[float, str]] = []
        self.resource_calls = 0
        self.resource_failed: Counter[str] = Counter()
        self.outage = 0
        self.strays = 0
        self.lost_yields = 0

    def connect(self) -> Broker:
        if self.broker is None:
            self.broker = Broker(self.address, timeout=CLIENT_TIMEOUT)
            # The client normally retries a refused connection in silence; here a
            # refusal must surface, because counting them is the point.
            self.broker._optimist = False
        return self.broker

    def disconnect(self) -> None:
        """Drop the broker connection: the broker reclaims whatever it still held."""
        if self.broker is not None:
            self.broker.__exit__(None, None, None)
            self.broker = None

    def completed(self) -> None:
        self.stamps.append(time.monotonic())

    def cycle(self) -> None:
        """get, call the relay, give it back; a failure is recorded, never raised.

        After a failure the connection is dropped and the next cycle starts from
        nothing, as a job that handles errors would.
        """
        self.holding = False
        try:
            broker = self.connect()
            if self.crash:
                self.crash_cycle(broker)
            else:
                self.plain_cycle(broker)
        except Exception as error:  # every failure is the measurement, not a crash
            self.failure(error, self.holding)
            self.disconnect()
            time.sleep(FAILURE_PAUSE)
        finally:
            if self.fresh:
                self.disconnect()

    def take(self, get: Callable[[], Any]) -> Any:
        """The relay ``get`` allocates, or None (counted) when the answer is Busy."""
        try:
            relay = get()
        except Busy:
            relay = None
            self.busy += 1
        self.completed()
        return relay

    def plain_cycle(self, broker: Broker) -> None:
        """get, one call on the relay, give it back."""
        relay = self.take(lambda: broker.get(PROFILE))
        if relay is None:
            return
        self.holding = True
        with relay:
            # A session's calls may otherwise wait for ever; a hung session must
            # show up as a failure, not stall the benchmark.
            relay._reply_timeout = CALL_TIMEOUT
            relay.get_profile()
            self.completed()
            broker.yield_resources(relay)
            self.holding = False
            self.completed()
        self.cycles += 1

    def crash_cycle(self, broker: Broker) -> None:
        """Crash mode: get, HOLD_CALLS calls on the relay, give it back, riding out
        any broker outage on the way (see the module's docstring)."""
        relay = self.take(lambda: self.allocate(broker))
        if relay is None:
            return
        with relay:
            relay._reply_timeout = CALL_TIMEOUT
            for _ in range(HOLD_CALLS):
                try:
                    relay.get_profile()
                except Exception as error:
                    self.resource_failure(error)
                    self.disconnect()
                    return
                self.resource_calls += 1
            try:
                self.give_back(broker, relay)
            except (NotAllocated, NotOwner) as error:  # the resume failed
                self.lost += 1
                self.failure(error, False)
                self.disconnect()
                return
            self.completed()
        self.cycles += 1

    def allocate(self, broker: Broker) -> Any:
        """``get`` a relay, asking again after an outage; an answer a crash lost may
        have granted one, so whatever the client holds then goes back first."""
        deadline = time.monotonic() + OUTAGE_PATIENCE
        while True:
            try:
                return broker.get(PROFILE)
            except ConnectionException:
                if time.monotonic() > deadline:
                    raise
                self.outage += 1
                time.sleep(OUTAGE_PAUSE)
                self.through_outage(lambda: self.give_back_strays(broker))

    def give_back(self, broker: Broker, relay: Any) -> None:
        """``yield_resources``, asked again after an outage. A crash may lose the
        answer to a yield that was done: asked again, the broker then says the relay
        is not ours (any more). That is fine as long as this client resumed as the
        holder it was (its token was accepted); otherwise its session was lost."""
        answer_lost = False
        deadline = time.monotonic() + OUTAGE_PATIENCE
        while True:
            try:
                broker.yield_resources(relay)
                return
            except ConnectionException:
                if time.monotonic() > deadline:
                    raise
                answer_lost = True
                self.outage += 1
                time.sleep(OUTAGE_PAUSE)
            except (NotAllocated, NotOwner):
                if not answer_lost or broker._token is None:
                    raise
                self.lost_yields += 1
                return

    def give_back_strays(self, broker: Broker) -> None:
        held = broker.list_allocations()
        if held:
            broker.yield_resources(*held)
            self.strays += len(held)

    def through_outage(self, call: Callable[[], object]) -> object:
        """A broker call, tried again while no broker answers (up to OUTAGE_PATIENCE)."""
        deadline = time.monotonic() + OUTAGE_PATIENCE
        while True:
            try:
                return call()
            except ConnectionException:
                if time.monotonic() > deadline:
                    raise
                self.outage += 1
                time.sleep(OUTAGE_PAUSE)

    def resource_failure(self, error: Exception) -> None:
        """A call on a relay failed: what crash mode must never see."""
        self.resource_failed[type(error).__name__] += 1
        if isinstance(error, (Exit, ConnectionClosed)):
            self.lost += 1
        if len(self.errors) < FIRST_ERRORS:
            self.errors.append((time.monotonic(), describe(error)))

    def failure(self, error: Exception, holding: bool) -> None:
        """Count the failure by type; one that ends the link to equipment still held
        (its session or the broker connection went away) also counts as a lost session."""
        self.failed[type(error).__name__] += 1
        if holding and isinstance(error, (Exit, ConnectionClosed)):
            self.lost += 1
        if len(self.errors) < FIRST_ERRORS:
            self.errors.append((time.monotonic(), describe(error)))

    def report(self, ended: float) -> dict:
        return {'fresh': self.fresh, 'cycles': self.cycles, 'calls': len(self.stamps) - 1,
                'busy': self.busy, 'lost': self.lost, 'failed': dict(self.failed),
                'refused': self.failed[ConnectionRefused.__name__],
                'errors': self.errors, 'ended': ended,
                'resource_calls': self.resource_calls,
                'resource_failed': dict(self.resource_failed),
                'outage': self.outage, 'strays': self.strays,
                'lost_yields': self.lost_yields}


def client_main(address: tuple[str, int], fresh: bool, crash: bool, stop_read: int,
                stop_write: int, report: int, stamps_path: str, cycling: float) -> None:
    """A client process: warm up, say ready, cycle until told to stop, then write the
    timestamps of its completed calls to ``stamps_path`` and report on ``report``."""
    os.close(stop_write)  # so that the parent closing its end reads as "stop" here
    logging.getLogger('ave').setLevel(logging.CRITICAL)
    client = LoadClient(address, fresh, crash)
    for _ in range(WARMUP_CYCLES):
        client.cycle()
    if client.failed:
        raise RuntimeError(f'the warm-up failed before any restart: {client.errors}')
    client.reset()
    send_message(report, {'ready': True})
    stop = select.poll()
    stop.register(stop_read, select.POLLIN)
    deadline = time.monotonic() + cycling
    while not stop.poll(0) and time.monotonic() < deadline:
        client.cycle()
    ended = time.monotonic()
    client.disconnect()
    with open(stamps_path, 'wb') as stream:
        client.stamps.tofile(stream)
    send_message(report, client.report(ended))


@dataclass
class Clients:
    """The client processes: pid, report pipe and timestamp file of each."""
    children: Children
    stop_read: int
    stop_write: int
    members: list[tuple[int, int, str]] = field(default_factory=list)

    def close(self) -> None:
        for fd in (self.stop_read, self.stop_write, *(m[1] for m in self.members)):
            if fd >= 0:
                os.close(fd)
        self.stop_read = self.stop_write = -1
        self.members = [(pid, -1, path) for pid, _, path in self.members]


def start_clients(children: Children, plan: Plan, address: tuple[str, int],
                  directory: str) -> Clients:
    """Fork the clients, even-numbered ones keeping their connection, the others not,
    and return once every one has warmed up."""
    stop_read, stop_write = os.pipe()
    clients = Clients(children, stop_read, stop_write)
    for index in range(CLIENTS):
        report_read, report_write = os.pipe()
        path = os.path.join(directory, f'stamps-{index}')
        pid = children.fork(client_main, address, index % 2 == 1, plan.crash, stop_read,
                            stop_write, report_write, path, plan.cycling)
        os.close(report_write)
        clients.members.append((pid, report_read, path))
    for _, report, _ in clients.members:
        message = receive_message(report, START_TIMEOUT)
        if not message.get('ready'):
            raise RuntimeError(f'a client did not start: {message}')
    return clients


def stop_clients(clients: Clients) -> list[tuple[dict, array]]:
    """Tell every client to stop (end-of-file on the stop pipe, all at once); their
    reports with their timestamps, each list closed by the moment it stopped."""
    os.close(clients.stop_write)
    clients.stop_write = -1
    results = []
    for pid, report, path in clients.members:
        message = receive_message(report, REPORT_TIMEOUT)
        clients.children.wait(pid, REPORT_TIMEOUT)
        stamps = array('d')
        with open(path, 'rb') as stream:
            stamps.frombytes(stream.read())
        stamps.append(message['ended'])
        results.append((message, stamps))
    return results


# -- the restarts -----------------------------------------------------------------------

@dataclass
class Restart:
    """One ``ave-broker --restart``: when it ran, and what came of it."""
    began: float
    ended: float
    predecessor: psutil.Process
    pid: int | None = None
    error: str | None = None


@dataclass
class Series:
    """The restarts, the control commands between them, and why the series ended
    early, if it did."""
    restarts: list[Restart] = field(default_factory=list)
    controls: list[tuple[float, float]] = field(default_factory=list)
    early_stop: str | None = None


def restart_series(lab: Lab, plan: Plan) -> Series:
    """Run ``--restart`` up to ``plan.restarts`` times, each after a ``--status``.

    ``--status`` is the control: a Python process of about the same weight that
    starts, reads the pid file and exits without ever touching the broker's sockets.
    The pauses clients see while it runs are what the machine's load alone causes;
    the pauses during a restart beyond those are the restart's. Its answer also must
    name the broker the last restart reported: a --restart with no broker running
    would start a fresh one and hide a crash.
    """
    return run_series(lab, plan, ('restarts', 'failed'), restart_once)


def crash_series(lab: Lab, plan: Plan) -> Series:
    """Crash mode: up to ``plan.restarts`` times, SIGKILL the broker and start a new
    one with ``--start``, each after the same ``--status`` control as a restart.
    A crash's window runs from the kill to the end of the ``--start`` command."""
    return run_series(lab, plan, ('crashes', 'starts failed'), crash_once)


def restart_once(lab: Lab, event: Restart) -> None:
    """``--restart``: the new broker's pid, or the error, into ``event``."""
    run_command(lab, '--restart', event)


def crash_once(lab: Lab, event: Restart) -> None:
    """SIGKILL the running broker, then ``--start`` a new one."""
    event.predecessor.send_signal(signal.SIGKILL)
    if not wait_for_exit(event.predecessor, STOP_GRACE):
        event.error = f'broker {event.predecessor.pid} survived SIGKILL'
    else:
        run_command(lab, '--start', event)


def run_command(lab: Lab, option: str, event: Restart) -> None:
    try:
        result = lab.cli(option)
        if result.returncode == 0:
            event.pid = pid_of(result.stdout)
        else:
            event.error = result.stderr.strip() or f'exit status {result.returncode}'
    except subprocess.TimeoutExpired:
        event.error = f'{option} did not finish within {CLI_TIMEOUT:.0f} s'


def run_series(lab: Lab, plan: Plan, words: tuple[str, str],
               act: Callable[[Lab, Restart], None]) -> Series:
    """Up to ``plan.restarts`` events made by ``act``, each after a ``--status``
    control, within the plan's budget; ``words`` name them in the reasons to stop."""
    events, failed = words
    series = Series()
    deadline = time.monotonic() + plan.budget
    failures_in_a_row = 0
    for number in range(plan.restarts):
        if time.monotonic() >= deadline:
            series.early_stop = (f'stopped after {number} of {plan.restarts} {events}: '
                                 f'the {plan.budget:.0f} s budget ran out')
            return series
        began = time.monotonic()
        status = first_line(lab.cli('--status').stdout)
        series.controls.append((began, time.monotonic()))
        running = find_broker(lab.home).process
        if status != f'running, pid {lab.pid}' or running is None:
            series.early_stop = (f'stopped after {number} {events}: --status said '
                                 f'{status!r}, expected broker {lab.pid} to run')
            return series
        time.sleep(plan.interval)
        event = Restart(time.monotonic(), 0.0, running)
        act(lab, event)
        event.ended = time.monotonic()
        series.restarts.append(event)
        if event.pid is None:
            failures_in_a_row += 1
            if failures_in_a_row >= MAX_RESTART_FAILURES:
                series.early_stop = (f'stopped after {number + 1} {events}: '
                                     f'{failures_in_a_row} {failed} in a row')
                return series
        else:
            failures_in_a_row = 0
            lab.pid = event.pid
        time.sleep(plan.interval)
    return series


def surviving_predecessors(restarts: list[Restart], lab: Lab) -> list[int]:
    """Old brokers still running AFTERMATH seconds from now; each should have exited as
    soon as it handed everything over."""
    deadline = time.monotonic() + AFTERMATH
    left = []
    for restart in restarts:
        if restart.pid is None or restart.predecessor.pid == lab.pid:
            continue
        if not wait_for_exit(restart.predecessor, max(0.0, deadline - time.monotonic())):
            left.append(restart.predecessor.pid)
    return left


def lingering_sessions(lab: Lab) -> list[int]:
    """Sessions still running AFTERMATH seconds after every client left."""
    deadline = time.monotonic() + AFTERMATH
    while True:
        left = [process.pid for process in lab.sessions()]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


# -- analysis ---------------------------------------------------------------------------

def gaps_of(stamps: array) -> list[float]:
    return [later - earlier for earlier, later in zip(stamps, stamps[1:])]


def pause_during(stamps: array, began: float, ended: float,
                 apart_from: list[tuple[float, float]] = ()) -> float:
    """The longest gap in ``stamps`` that overlaps ``[began, ended]``: it ends after the
    command began and starts before the command ended. Gaps that also overlap one
    of the windows ``apart_from`` do not count."""
    first = max(1, bisect_right(stamps, began))
    last = min(len(stamps) - 1, bisect_left(stamps, ended))
    return max((stamps[i] - stamps[i - 1] for i in range(first, last + 1)
                if not any(stamps[i] > start and stamps[i - 1] < end
                           for start, end in apart_from)), default=0.0)


def pauses(windows: list[tuple[float, float]], stamps: list[array],
           apart_from: list[tuple[float, float]] = ()) -> list[float]:
    """For each command's run, the longest pause any client saw meanwhile (leaving
    out pauses that also overlap a window of ``apart_from``)."""
    return [max(pause_during(s, began, ended, apart_from) for s in stamps)
            for began, ended in windows]


def when(moment: float, restarts: list[Restart]) -> str:
    """Where a moment falls relative to the restarts, for reading failures."""
    for number, restart in enumerate(restarts, 1):
        if moment < restart.began:
            return f'{restart.began - moment:.3f} s before restart {number} began'
        if moment <= restart.ended:
            return f'during restart {number}'
    if restarts:
        return f'{moment - restarts[-1].ended:.3f} s after the last restart ended'
    return 'with no restart run'


# -- the table --------------------------------------------------------------------------

@dataclass
class Outcome:
    """All that was measured, ready for the table."""
    plan: Plan
    series: Series
    reports: list[dict]
    stamps: list[array]
    measured: float
    old_brokers: list[int]
    sessions: list[int]
    free_relays: int | str
    survivors: list[tuple[int, str]]


def ms(seconds: float) -> str:
    return f'{seconds * 1000:.1f} ms'


def check(passed: bool) -> str:
    return 'PASS' if passed else 'FAIL'


def table_rows(outcome: Outcome) -> list[list[str]]:
    if outcome.plan.crash:
        return crash_rows(outcome)
    series, reports = outcome.series, outcome.reports
    done = [r for r in series.restarts if r.pid is not None]
    times = [r.ended - r.began for r in done]
    calls = sum(r['calls'] for r in reports)
    failed: Counter[str] = Counter()
    for report in reports:
        failed.update(report['failed'])
    refused = sum(r['refused'] for r in reports)
    lost = sum(r['lost'] for r in reports)
    gaps = [gap for stamps in outcome.stamps for gap in gaps_of(stamps)]
    windows = [(r.began, r.ended) for r in done]
    during = pauses(windows, outcome.stamps)
    by_kind = {fresh: pauses(windows, [s for r, s in zip(reports, outcome.stamps)
                                       if r['fresh'] == fresh]) for fresh in (False, True)}
    control = pauses(series.controls, outcome.stamps)
    longest = max(during, default=0.0)
    rows = [
        ['restarts done', f'{len(done)} of {outcome.plan.restarts}',
         str(outcome.plan.restarts), check(len(done) == outcome.plan.restarts)],
        ['restart commands failed', str(len(series.restarts) - len(done)), '0',
         check(len(series.restarts) == len(done))],
        *spread('restart command time', times),
        ['calls completed', f'{calls:,} ({calls / outcome.measured:,.0f}/s)', '', ''],
        ['cycles completed', f'{sum(r["cycles"] for r in reports):,}', '', ''],
        ['calls failed', str(sum(failed.values())), '0', check(not failed)],
        *([f'  {name}', str(count), '', ''] for name, count in sorted(failed.items())),
        ['connections refused', str(refused), '0', check(refused == 0)],
        ['sessions lost', str(lost), '0', check(lost == 0)],
        ['Busy retries', f'{sum(r["busy"] for r in reports):,}', '', ''],
        ['longest pause during a restart', ms(longest), f'< {ms(PAUSE_TARGET)}',
         check(bool(during) and longest < PAUSE_TARGET)],
        *spread('pause during a restart', during),
        ['  longest, clients keeping their connection',
         ms(max(by_kind[False], default=0.0)), '', ''],
        ['  longest, clients connecting every cycle',
         ms(max(by_kind[True], default=0.0)), '', ''],
        ['longest pause during --status (control)', ms(max(control, default=0.0)), '', ''],
        *spread('pause during --status (control)', control),
        *spread('gap between calls (whole run)', gaps),
        ['longest gap (whole run)', ms(max(gaps, default=0.0)), '', ''],
        ['old brokers still running', str(len(outcome.old_brokers)), '0',
         check(not outcome.old_brokers)],
        ['sessions left after clients quit', str(len(outcome.sessions)), '0',
         check(not outcome.sessions)],
        ['relays free after clients quit', f'{outcome.free_relays} of {RELAYS}',
         str(RELAYS), check(outcome.free_relays == RELAYS)],
        ['processes left after --stop', str(len(outcome.survivors)), '0',
         check(not outcome.survivors)],
    ]
    return rows


def crash_rows(outcome: Outcome) -> list[list[str]]:
    """The table of crash mode: what jobs must never see, and how long allocating
    paused."""
    series, reports = outcome.series, outcome.reports
    done = [r for r in series.restarts if r.pid is not None]
    times = [r.ended - r.began for r in done]
    calls = sum(r['calls'] for r in reports)
    resource_calls = sum(r['resource_calls'] for r in reports)
    resource_failed: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for report in reports:
        resource_failed.update(report['resource_failed'])
        failed.update(report['failed'])
    lost = sum(r['lost'] for r in reports)
    crashes = [(r.began, r.ended) for r in series.restarts]
    during = pauses([(r.began, r.ended) for r in done], outcome.stamps)
    # A crash's pause lasts until clients are back, often into the next --status:
    # the control counts only pauses that overlap no crash.
    control = pauses(series.controls, outcome.stamps, crashes)
    longest = max(during, default=0.0)
    return [
        ['crashes (SIGKILL, then --start)', f'{len(done)} of {outcome.plan.restarts}',
         str(outcome.plan.restarts), check(len(done) == outcome.plan.restarts)],
        ['start commands failed', str(len(series.restarts) - len(done)), '0',
         check(len(series.restarts) == len(done))],
        *spread('kill to started broker', times),
        ['calls on relays completed', f'{resource_calls:,}', '', ''],
        ['calls on relays failed', str(sum(resource_failed.values())), '0',
         check(not resource_failed)],
        *([f'  {name}', str(count), '', ''] for name, count in sorted(resource_failed.items())),
        ['sessions lost', str(lost), '0', check(lost == 0)],
        ['broker calls answered', f'{calls:,} ({calls / outcome.measured:,.0f}/s)', '', ''],
        ['broker calls tried again in an outage', f'{sum(r["outage"] for r in reports):,}',
         '', ''],
        ['relays given back after a lost get answer', str(sum(r['strays'] for r in reports)),
         '', ''],
        ['yields done whose answer a crash lost',
         str(sum(r['lost_yields'] for r in reports)), '', ''],
        ['other failures', str(sum(failed.values())), '0', check(not failed)],
        *([f'  {name}', str(count), '', ''] for name, count in sorted(failed.items())),
        ['cycles completed', f'{sum(r["cycles"] for r in reports):,}', '', ''],
        ['Busy retries', f'{sum(r["busy"] for r in reports):,}', '', ''],
        ['longest allocation pause (crash)', ms(longest), '', ''],
        *spread('allocation pause (crash)', during),
        ['longest allocation pause during --status (control)',
         ms(max(control, default=0.0)), '', ''],
        ['  ratio, longest crash pause to longest control pause',
         f'{longest / max(max(control, default=0.0), 1e-9):.1f}x', '', ''],
        ['sessions left after clients quit', str(len(outcome.sessions)), '0',
         check(not outcome.sessions)],
        ['relays free after clients quit', f'{outcome.free_relays} of {RELAYS}',
         str(RELAYS), check(outcome.free_relays == RELAYS)],
        ['processes left after --stop', str(len(outcome.survivors)), '0',
         check(not outcome.survivors)],
    ]


def spread(what: str, samples: list[float]) -> list[list[str]]:
    """p50 and p99 rows of a duration, none when nothing was measured."""
    if not samples:
        return []
    return [[f'{what}, {label}', ms(percentile(samples, fraction)), '', '']
            for label, fraction in (('p50', 0.50), ('p99', 0.99))]


NOTES = f"""\
Calls: every RPC that got an answer (get, incl. Busy; the call on the relay;
yield_resources). Calls failed counts every exception a client saw, refused connections
included; a session is lost when a call fails with Exit or ConnectionClosed while its
client holds equipment. A command's pause: the longest gap between two completed calls of
any one client that overlaps the command's run. Each restart follows an ave-broker
--status, which never touches the broker: its pauses are what the load on this machine
causes by itself. Gaps (whole run) cover all clients at all times. The last four rows
check the design: old brokers {AFTERMATH:.0f} s after the last restart, sessions and
relays {AFTERMATH:.0f} s after the clients quit, processes {STOP_GRACE:.0f} s after
ave-broker --stop."""  # filled to one width when printed


CRASH_NOTES = """\
Broker calls: get (a Busy answer too) and yield_resources, each counted once it was
answered; a call that met the outage is tried again until it is. Calls on relays run in
the clients' sessions and must never fail; a session is lost when such a call fails with
Exit or ConnectionClosed, or when a relay held across a crash is no longer the client's
(its resume failed). A crash's allocation pause: the longest gap between two answered
broker calls of any one client that overlaps the time from the kill to the end of
--start. The control is the same gap during an ave-broker --status, among the gaps that
overlap no crash."""


def report(outcome: Outcome) -> tuple[str, bool]:
    """The printed report and whether every target was met."""
    rows = table_rows(outcome)
    plan, series = outcome.plan, outcome.series
    what = 'Crash' if plan.crash else 'Restart'
    lines = [f'{what} benchmark: Python {platform.python_version()}, '
             f'{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at the end); '
             f'{CLIENTS} clients, {RELAYS} relays, {plan.restarts} '
             f'{"crashes" if plan.crash else "restarts"}, '
             f'{plan.interval:g} s between commands, {outcome.measured:.1f} s under load.',
             '', render_table(['measurement', 'value', 'target', 'result'], rows),
             '', textwrap.fill(CRASH_NOTES if plan.crash else NOTES, NOTES_WIDTH)]
    if series.early_stop:
        lines += ['', f'The series ended early: {series.early_stop}.']
    failed_restarts = [(n, r) for n, r in enumerate(series.restarts, 1) if r.error]
    if failed_restarts:
        lines += ['', 'Failed restarts:']
        lines += [f'  restart {n}: {r.error}' for n, r in failed_restarts[:10]]
    errors = sorted(error for r in outcome.reports for error in r['errors'])
    if errors:
        lines += ['', 'First failures seen by the clients:']
        lines += [f'  {when(moment, series.restarts)}: {text}'
                  for moment, text in errors[:20]]
    if outcome.old_brokers:
        lines += ['', f'Old brokers still running: {outcome.old_brokers}']
    if outcome.sessions:
        lines += ['', f'Sessions left: {outcome.sessions}']
    if outcome.survivors:
        names = Counter(name for _, name in outcome.survivors)
        pids = ', '.join(str(pid) for pid, _ in outcome.survivors[:10])
        more = ', ...' if len(outcome.survivors) > 10 else ''
        lines += ['', f'Left after --stop, then killed: '
                      f'{", ".join(f"{n} {name}" for name, n in sorted(names.items()))} '
                      f'(pids {pids}{more})']
    return '\n'.join(lines), all(row[3] != 'FAIL' for row in rows)


# -- main -------------------------------------------------------------------------------

def measure(lab: Lab, children: Children, plan: Plan, directory: str) -> Outcome:
    lab.start()
    clients = start_clients(children, plan, lab.address, directory)
    try:
        began = time.monotonic()
        time.sleep(SETTLE)
        series = crash_series(lab, plan) if plan.crash else restart_series(lab, plan)
        time.sleep(SETTLE)
        results = stop_clients(clients)
        measured = time.monotonic() - began
    finally:
        clients.close()
    old_brokers = [] if plan.crash else surviving_predecessors(series.restarts, lab)
    sessions = lingering_sessions(lab)
    try:
        free: int | str = lab.free_relays()
    except Exception as error:  # the row shows it; the broker's state is the finding
        free = describe(error)
    survivors = lab.stop()
    return Outcome(plan, series, [r for r, _ in results], [s for _, s in results],
                   measured, old_brokers, sessions, free, survivors)


def run(plan: Plan, keep: bool) -> bool:
    """Measure and print; True when every target was met. The directory goes, unless
    ``keep`` and something went wrong."""
    directory = tempfile.mkdtemp(prefix='ave-bench-restart-')
    home = os.path.join(directory, 'home')
    children = Children(plan.lifetime)
    lab: Lab | None = None
    passed = False
    try:
        lab = Lab(home)
        outcome = measure(lab, children, plan, directory)
        text, passed = report(outcome)
        print(text)
    finally:
        children.stop_all()
        killed = lab.cleanup() if lab is not None else []
        if killed:
            print(f'\n{len(killed)} leftover process(es) killed at the end')
        if keep and not passed:
            print(f'\nkept {directory}; the broker log is in {log_dir(home)}')
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--crash', action='store_true',
                        help='SIGKILL the broker and --start a new one, instead of '
                             '--restart')
    parser.add_argument('--quick', action='store_true',
                        help=f'a sanity run: {QUICK.restarts} restarts')
    parser.add_argument('--restarts', type=int, help='how many restarts to run')
    parser.add_argument('--interval', type=float,
                        help='seconds between one command and the next (--status or '
                             f'--restart; default {FULL.interval:g})')
    parser.add_argument('--keep', action='store_true',
                        help='keep the temporary home when a target is missed or the '
                             'run fails')
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    plan = Plan(args.restarts if args.restarts is not None else plan.restarts,
                args.interval if args.interval is not None else plan.interval,
                plan.budget, args.crash)
    # Ctrl-C or SIGTERM unwinds through the finally blocks, which stop everything.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return 0 if run(plan, args.keep) else 1


if __name__ == '__main__':
    sys.exit(main())
