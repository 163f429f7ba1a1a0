"""What feeding the status page costs the broker loop, next to one broker RPC.

Run from the repository root: ``.venv/bin/python bench/http_feed.py [--quick]``.

The broker loop answers an RPC in tens of microseconds; everything it does for the
HTTP process (``ave.broker.http``) runs on that loop. Measured here, side by side
in one run:

* timing an RPC: the two ``perf_counter()`` calls around it, which the broker needs
  before it can record anything;
* ``RpcTimings.observe`` and ``Histogram.observe``: recording one duration;
* building a 500-item snapshot: ``equipment_row`` per item, then ``build_snapshot``
  with fifteen methods' histograms;
* sending it: ``Control.notify(link, 'update', snapshot)`` (JSON encoding and the
  socket write) plus the loop steps that flush what the socket did not take at
  once, into a real ``ave-broker-http`` process that reads and checks it;
* the baseline: one AVE RPC round trip to a trivial Control in another process.

Each row's ratio is its median over the RPC's median; the last line is the share of
the loop a broker spends on snapshots sent at the fastest pace ``FeedPacer`` allows
(every 100 ms, or slower for a lab whose snapshots cost more).
Everything runs on 127.0.0.1, each measurement bounded in count, and every process
started here is stopped and reaped in the end.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import tempfile
import time
from typing import Callable

from ave.broker.http import feed
from ave.broker.http.server import HttpServer, open_listener
from ave.network.connection import Connection
from ave.network.control import Control, RemoteControl

from _common import Children, percentile, raise_fd_limit, render_table

ITEMS = 500
METHODS = ('get', 'yield_resources', 'list_allocations', 'who', 'queue', 'list_equipment',
           'list_available', 'list_allocations_all', 'list_stacks', 'close_session',
           'add_equipment', 'remove_equipment', 'sync_equipment', 'released', 'stop')
HOLDER = {'user': 'builder', 'host': 'ci-runner-17.lab.example', 'pid': 123456,
          'program': '/usr/lib/jenkins/workspace/flash-and-test/run.py',
          'job': 'https://jenkins.lab.example/job/flash-and-test/4711/'}


class Echo(Control):
    """The baseline: the cheapest RPC a Control can answer."""

    @Control.rpc
    def ping(self) -> int:
        return 1


def per_call(function: Callable[[], object], calls: int, rounds: int) -> list[float]:
    """Seconds per call of ``function``, one sample per round of ``calls`` calls."""
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        samples.append((time.perf_counter() - started) / calls)
    return samples


def equipment(now: float) -> list[tuple]:
    rows = []
    for index in range(ITEMS):
        held = index % 3 == 0
        profile = {'type': ('handset', 'relay', 'serial')[index % 3], 'uid': f'item-{index}',
                   'serial': f'CB5A{index:06}', 'platform': 'android',
                   'power_state': 'boot_completed', 'host': f'host-{index % 10}'}
        rows.append((profile, f'item-{index}', profile['host'],
                     'held' if held else 'available',
                     HOLDER if held else None, now - index if held else None))
    return rows


def build(rows: list[tuple], timings: feed.RpcTimings, wait: feed.Histogram) -> dict:
    return feed.build_snapshot(
        now=time.time(), host='host-0', lab='lab1',
        equipment=[feed.equipment_row(*row) for row in rows],
        queue=[{'position': n + 1, 'holder': HOLDER, 'profiles': [{'type': 'handset'}],
                'priority': 0, 'waited_s': 12.5} for n in range(20)],
        sessions=160, allocations_total=123456, restarts_total=3,
        rpc_seconds=timings, queue_wait_seconds=wait)


def measure_sending(snapshot: dict, count: int, children: Children) -> list[float]:
    """Loop time per snapshot sent to a real HTTP process (notify + flushing)."""
    with tempfile.TemporaryDirectory() as home:
        broker_end, http_end = socket.socketpair()
        server = HttpServer(open_listener('127.0.0.1', 0), http_end, home=home)
        pid = server.start(synchronize=True)
        children.adopt(pid)
        feeder = Control(None)
        link = Connection(('http', pid), broker_end)
        feeder.add_connection(link)
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            feeder.notify(link, 'update', snapshot)
            spent = time.perf_counter() - started
            while link.has_output:  # the rest goes out as the loop finds it writable
                feeder.step_main(1.0)
                spent = time.perf_counter() - started
            samples.append(spent)
            time.sleep(0.02)  # the next one comes no sooner than the pacer allows
        feeder.remove_connection(link)
        link.close()
        children.wait(pid, 10)
    return samples


def measure_rpc(calls: int, children: Children) -> list[float]:
    listener = socket.create_server(('127.0.0.1', 0))
    port = listener.getsockname()[1]
    server = Echo(0, socket=listener)
    pid = server.start(synchronize=True)
    children.adopt(pid)
    samples = []
    with RemoteControl(('127.0.0.1', port), timeout=10) as client:
        client.ping()
        for _ in range(calls):
            started = time.perf_counter()
            client.ping()
            samples.append(time.perf_counter() - started)
    children.stop(pid)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='fewer rounds, rougher numbers')
    quick = parser.parse_args().quick
    raise_fd_limit()
    rounds = 5 if quick else 20
    calls = 20000 if quick else 100000
    snapshots = 30 if quick else 200
    children = Children(lifetime=600)
    random.seed(1)
    durations = [random.lognormvariate(-10, 1.5) for _ in range(1024)]
    names = [METHODS[i % len(METHODS)] for i in range(1024)]
    timings = feed.RpcTimings()
    histogram = feed.Histogram(feed.RPC_BOUNDS)
    counter = iter(range(10 ** 12))
    perf_counter = time.perf_counter

    def observe_rpc() -> None:
        n = next(counter) & 1023
        timings.observe(names[n], durations[n])

    def observe_histogram() -> None:
        histogram.observe(durations[next(counter) & 1023])

    def timer_pair() -> float:
        started = perf_counter()
        return perf_counter() - started

    try:
        rows = equipment(time.time())
        wait = feed.Histogram(feed.QUEUE_WAIT_BOUNDS)
        snapshot = build(rows, timings, wait)
        results = {
            'timing an RPC (2 x perf_counter)': per_call(timer_pair, calls, rounds),
            'RpcTimings.observe': per_call(observe_rpc, calls, rounds),
            'Histogram.observe': per_call(observe_histogram, calls, rounds),
            f'build a {ITEMS}-item snapshot': per_call(
                lambda: build(rows, timings, wait), 1, snapshots),
            'send it (notify + flush)': measure_sending(snapshot, snapshots, children),
        }
        rpc = measure_rpc(2000 if quick else 10000, children)
    finally:
        children.stop_all()
    baseline = percentile(rpc, 0.5)
    table = [['AVE RPC round trip (baseline)', f'{baseline * 1e6:.1f}',
              f'{percentile(rpc, 0.99) * 1e6:.1f}', '1.00']]
    for name, samples in results.items():
        median = percentile(samples, 0.5)
        table.append([name, f'{median * 1e6:.2f}', f'{percentile(samples, 0.99) * 1e6:.2f}',
                      f'{median / baseline:.3f}'])
    print(f'Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; '
          f'{ITEMS}-item snapshot = {len(json.dumps(snapshot)) // 1024} KiB of JSON')
    print(render_table(['operation', 'p50 µs', 'p99 µs', 'x RPC p50'], table))
    per_snapshot = (percentile(results[f'build a {ITEMS}-item snapshot'], 0.5)
                    + percentile(results['send it (notify + flush)'], 0.5))
    pacer = feed.FeedPacer()
    pacer.sent(0.0, per_snapshot)
    print(f'\none snapshot holds the loop for {per_snapshot / baseline:.0f} RPCs\' worth; '
          f'at the fastest pace FeedPacer allows (one per {pacer.pause * 1000:.0f} ms) '
          f'that is {per_snapshot / pacer.pause:.2%} of the loop\'s time')
    return 0


if __name__ == '__main__':
    sys.exit(main())
