"""What the status page costs the broker: RPC latency with and without a client
polling ``/metrics`` every 100 ms.

Run from the repository root: ``.venv/bin/python bench/statuspage.py [--quick]``.

A real broker (``ave-broker --start``) with 200 relays and ``"http"`` configured. A
client times ``list_allocations`` (a plain broker RPC) in rounds; every other round a
second process fetches ``/metrics`` every 100 ms meanwhile. The broker feeds the HTTP
process a snapshot at most every 100 ms while RPCs change nothing, so the cost shown
is that of feeding and of the HTTP process competing for the CPUs. Target: the p50
with polling within 3 % of the p50 without.
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

from ave import config
from ave.network.connection import above_ephemeral_ports, find_free_port
from ave.network.remote import RemoteControl

from _common import percentile, render_table

CLI = [sys.executable, '-m', 'ave.broker.cli']
RELAYS = 200


def free_port() -> int:
    sock, port = find_free_port(start=above_ephemeral_ports(), listen=False)
    sock.close()
    return port


def start_broker(home: str) -> tuple[int, int]:
    config.create_default(home)
    port, http_port = free_port(), free_port()
    relays = [{'type': 'relay', 'uid': f'r{n}', 'circuits': {
        'c1': {'open': ['true'], 'close': ['true'], 'default': 'open'}}}
        for n in range(RELAYS)]
    with open(os.path.join(config.config_dir(home), 'broker.json'), 'w') as stream:
        json.dump({'host': '127.0.0.1', 'port': port, 'equipment': relays,
                   'http': {'host': '127.0.0.1', 'port': http_port}}, stream)
    subprocess.run([*CLI, '--start', '--home', home], check=True, capture_output=True)
    return port, http_port


def poll_metrics(http_port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection('127.0.0.1', http_port, timeout=5)
        connection.request('GET', '/metrics')
        connection.getresponse().read()
        connection.close()
        time.sleep(0.1)


def timed_calls(client: RemoteControl, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        client.list_allocations()
        samples.append(time.perf_counter() - started)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='a short sanity run')
    args = parser.parse_args()
    rounds, calls = (4, 2000) if args.quick else (12, 5000)
    quiet: list[float] = []
    polled: list[float] = []
    with tempfile.TemporaryDirectory() as home:
        port, http_port = start_broker(home)
        try:
            client = RemoteControl(('127.0.0.1', port), timeout=10)
            timed_calls(client, 500)  # warm up
            for round_number in range(rounds):
                if round_number % 2:
                    poller = multiprocessing.Process(target=poll_metrics,
                                                     args=(http_port, 600))
                    poller.start()
                    time.sleep(0.3)
                    polled += timed_calls(client, calls)
                    poller.terminate()
                    poller.join()
                else:
                    quiet += timed_calls(client, calls)
        finally:
            subprocess.run([*CLI, '--stop', '--home', home], capture_output=True)
    base = percentile(quiet, 0.5)
    rows = [[name, f'{percentile(values, 0.5) * 1e6:.1f}',
             f'{percentile(values, 0.99) * 1e6:.1f}',
             f'{percentile(values, 0.5) / base:.3f}x']
            for name, values in (('no page client', quiet),
                                 ('/metrics every 100 ms', polled))]
    print(render_table(['broker RPC (list_allocations)', 'p50 µs', 'p99 µs',
                        'p50 vs none'], rows))
    ratio = percentile(polled, 0.5) / base
    print(f'\np50 with polling {ratio:.3f}x of without (target <= 1.03x): '
          f'{"PASS" if ratio <= 1.03 else "FAIL"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
