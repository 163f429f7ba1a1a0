"""How soon a waiting job gets equipment after its holder lets go, through a real broker.

Run from the repository root: ``.venv/bin/python bench/wakeup.py [--quick]``.

One relay, two clients in this process. The holder takes the relay; the waiter asks
for it and waits; the holder yields it; the time from the holder's ``yield_resources``
returning to the waiter holding the relay is the wake-up latency. It includes the
session's teardown (the relay's reset command, ``true``) and the broker's scheduling.
Side by side: a waiter that polls ``get`` on Busy every second (labgrid's ``reserve
--wait`` does) and every 100 ms. Target: the queue's p50 under 10 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from ave import config
from ave.broker import Broker
from ave.broker.exceptions import Busy
from ave.network.connection import above_ephemeral_ports, find_free_port

from _common import percentile, render_table

RELAY = {'type': 'relay', 'uid': 'r1', 'circuits': {
    'c1': {'open': ['true'], 'close': ['true'], 'default': 'open'}}}
PROFILE = {'type': 'relay', 'uid': 'r1'}
CLI = [sys.executable, '-m', 'ave.broker.cli']


def start_broker(home: str) -> int:
    config.create_default(home)
    sock, port = find_free_port(start=above_ephemeral_ports(), listen=False)
    sock.close()
    with open(os.path.join(config.config_dir(home), 'broker.json'), 'w') as stream:
        json.dump({'host': '127.0.0.1', 'port': port, 'equipment': [RELAY]}, stream)
    subprocess.run([*CLI, '--start', '--home', home], check=True, capture_output=True)
    return port


def stop_broker(home: str) -> None:
    subprocess.run([*CLI, '--stop', '--home', home], capture_output=True)


def one_wakeup(port: int, waiter_get) -> float:
    """Latency of one hand-over from a holder to a waiter using ``waiter_get``."""
    with Broker(('127.0.0.1', port)) as holder, Broker(('127.0.0.1', port)) as waiter:
        relay = holder.get(PROFILE, wait=10)  # the last round may still be resetting it
        granted: list[float] = []
        thread = threading.Thread(target=lambda: granted.append(waiter_get(waiter)))
        thread.start()
        time.sleep(0.2)  # the waiter is waiting (or polling) by now
        holder.yield_resources(relay)
        released = time.monotonic()
        thread.join(30)
        return granted[0] - released


def queued_get(client: Broker) -> float:
    client.get(PROFILE, wait=30)
    return time.monotonic()


def polling_get(interval: float):
    def get(client: Broker) -> float:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                client.get(PROFILE)
                return time.monotonic()
            except Busy:
                time.sleep(interval)
        raise TimeoutError('the poller never got the relay')
    return get


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='a short sanity run')
    args = parser.parse_args()
    rounds = 10 if args.quick else 60
    ways = {'fair queue (wait=30)': queued_get, 'poll every 100 ms': polling_get(0.1),
            'poll every 1 s': polling_get(1.0)}
    samples: dict[str, list[float]] = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as home:
        port = start_broker(home)
        try:
            for _ in range(rounds):  # interleaved, so a slow spell hurts all alike
                for name, get in ways.items():
                    samples[name].append(one_wakeup(port, get))
        finally:
            stop_broker(home)
    queue_p50 = percentile(samples['fair queue (wait=30)'], 0.5)
    rows = []
    for name, values in samples.items():
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        rows.append([name, f'{p50 * 1000:.1f}', f'{p99 * 1000:.1f}',
                     f'{p50 / queue_p50:.1f}x'])
    print(render_table(['waiter', 'p50 ms', 'p99 ms', 'p50 vs queue'], rows))
    verdict = 'PASS' if queue_p50 < 0.010 else 'FAIL'
    print(f'\nqueue wake-up p50 {queue_p50 * 1000:.1f} ms (target < 10 ms): {verdict}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
