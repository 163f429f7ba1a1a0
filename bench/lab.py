"""The lab on etcd: allocation latency and cycles/s for 1, 3 and 6 brokers, next to a
lone broker and labgrid's coordinator; reclaim times; etcd operations per allocation.

Run from the repository root: ``.venv/bin/python bench/lab.py [--quick]`` (needs
Debian's etcd-server and, for the labgrid column, ``pip install labgrid``).

Everything runs on this machine: one etcd member and N real ``ave-broker`` daemons,
each with its own home, port and loopback address (127.0.0.1, .2, ...) standing for a
host, each with two relays whose circuits switch with ``true``. One client, connected
to the broker of host 1, measures:

* allocation latency: ``get`` of a relay on its own host (local) and on the last host
  (remote), p50 and p99;
* cycles/s: get (waiting if the relay is still being reset), one call, yield;
* labgrid: acquire and release of a place on its coordinator, one client (its cycle
  has no resource call and no reset);
* reclaim: a client process holding a remote relay is SIGKILLed (time until the relay
  is available again, seen from host 1), and a broker is SIGKILLed (time until its
  equipment has left the lab, seen from host 1), with the lab's ttl;
* etcd operations per allocation cycle and per second of quiet (keepalives), counted
  by etcd itself (its /metrics), for the estimate of a large lab.

Targets: a remote allocation within 2x a local one; reclaim <= 2 s after a client's
death and <= ttl + 2 s after a host's.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

from ave import config
from ave.broker import Broker
from ave.network.connection import above_ephemeral_ports, find_free_port

from _common import percentile, render_table

CLI = [sys.executable, '-m', 'ave.broker.cli']
TTL = 3
ETCD = shutil.which('etcd') or '/usr/bin/etcd'


def free_port() -> int:
    sock, port = find_free_port(start=above_ephemeral_ports(), listen=False)
    sock.close()
    return port


def relay(uid: str) -> dict:
    return {'type': 'relay', 'uid': uid,
            'circuits': {'c1': {'open': ['true'], 'close': ['true'], 'default': 'open'}}}


class Etcd:
    def __init__(self, directory: str) -> None:
        self.client, peer = free_port(), free_port()
        self.url = f'http://127.0.0.1:{self.client}'
        self.log = open(os.path.join(directory, 'etcd.log'), 'wb')
        self.process = subprocess.Popen(
            [ETCD, '--name', 'bench', '--data-dir', os.path.join(directory, 'etcd'),
             '--listen-client-urls', self.url, '--advertise-client-urls', self.url,
             '--listen-peer-urls', f'http://127.0.0.1:{peer}',
             '--initial-advertise-peer-urls', f'http://127.0.0.1:{peer}',
             '--initial-cluster', f'bench=http://127.0.0.1:{peer}'],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f'{self.url}/health', timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError('etcd did not start')

    def handled(self) -> dict[str, float]:
        """etcd's count of handled requests by method (the gateway calls gRPC)."""
        text = urllib.request.urlopen(f'{self.url}/metrics', timeout=5).read().decode()
        counts: dict[str, float] = {}
        for match in re.finditer(r'^grpc_server_handled_total\{[^}]*grpc_method="(\w+)"'
                                 r'[^}]*\} (\S+)$', text, re.M):
            counts[match.group(1)] = counts.get(match.group(1), 0) + float(match.group(2))
        return counts

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.close()


class Brokers:
    """N brokers on 127.0.0.1..N (lab) or one lone broker (no etcd)."""

    def __init__(self, directory: str, count: int, etcd: Etcd | None) -> None:
        self.homes: list[str] = []
        self.ports: list[int] = []
        self.pids: list[int] = []
        lab = f'bench-{time.monotonic_ns()}'
        for number in range(1, count + 1):
            home = os.path.join(directory, f'host{number}-{time.monotonic_ns()}')
            config.create_default(home)
            port = free_port()
            content: dict = {'host': f'127.0.0.{number}', 'port': port,
                             'equipment': [relay(f'r{number}a'), relay(f'r{number}b')]}
            if etcd is not None:
                content['lab'] = {'name': lab, 'etcd': [etcd.url], 'ttl': TTL}
            with open(os.path.join(config.config_dir(home), 'broker.json'), 'w') as out:
                json.dump(content, out)
            result = subprocess.run([*CLI, '--start', '--home', home], capture_output=True,
                                    text=True, check=True)
            self.pids.append(int(re.search(r'pid (\d+)', result.stdout).group(1)))
            self.homes.append(home)
            self.ports.append(port)

    def client(self, number: int = 1) -> Broker:
        return Broker((f'127.0.0.{number}', self.ports[number - 1]), timeout=10)

    def stop(self) -> None:
        for home in self.homes:
            subprocess.run([*CLI, '--stop', '--home', home], capture_output=True)


def latencies(broker: Broker, uid: str, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        proxy = broker.get({'type': 'relay', 'uid': uid}, wait=10)
        samples.append(time.perf_counter() - started)
        broker.yield_resources(proxy)
    return samples


def cycles_per_second(broker: Broker, uid: str, seconds: float) -> float:
    done = 0
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    while time.monotonic() < deadline and done < 100_000:
        proxy = broker.get({'type': 'relay', 'uid': uid}, wait=10)
        proxy.set_circuit('c1', True)
        broker.yield_resources(proxy)
        done += 1
    return done / (time.monotonic() - started)


HOLDER = textwrap.dedent('''
    import sys
    from ave.broker import Broker
    broker = Broker(('127.0.0.1', int(sys.argv[1])))
    broker.get({'type': 'relay', 'uid': sys.argv[2]}, wait=10)
    print('held', flush=True)
    sys.stdin.read()
''')


def state_of(broker: Broker, uid: str) -> str | None:
    rows = [row for row in broker.equipment() if row['profile'].get('uid') == uid]
    return rows[0]['state'] if rows else None


def client_reclaim(brokers: Brokers, uid: str) -> float:
    job = subprocess.Popen([sys.executable, '-c', HOLDER, str(brokers.ports[0]), uid],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    job.stdout.readline()
    watcher = brokers.client()
    job.kill()
    killed = time.monotonic()
    job.wait()
    while state_of(watcher, uid) != 'available' and time.monotonic() - killed < 30:
        time.sleep(0.01)
    return time.monotonic() - killed


def host_reclaim(brokers: Brokers) -> float:
    watcher = brokers.client()
    uid = f'r{len(brokers.pids)}a'
    os.kill(brokers.pids[-1], signal.SIGKILL)
    killed = time.monotonic()
    while state_of(watcher, uid) is not None and time.monotonic() - killed < 60:
        time.sleep(0.02)
    return time.monotonic() - killed


def labgrid_figures(directory: str, count: int, seconds: float) -> tuple[list[float], float]:
    """Acquire latency and acquire+release cycles/s of one labgrid client."""
    import broker as broker_bench  # bench/broker.py: its coordinator and client
    process, address = broker_bench.start_coordinator(directory)
    try:
        setup = broker_bench.LabgridClient(address, 'bench-setup')
        setup.create('bench-0')
        setup.close()
        client = broker_bench.LabgridClient(address, 'bench')
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            client.acquire('bench-0')
            samples.append(time.perf_counter() - started)
            client.release('bench-0')
        done, started_at = 0, time.monotonic()
        while time.monotonic() - started_at < seconds and done < 100_000:
            client.acquire('bench-0')
            client.release('bench-0')
            done += 1
        rate = done / (time.monotonic() - started_at)
        client.close()
        return samples, rate
    finally:
        broker_bench.stop_coordinator(process)


def ms(value: float) -> str:
    return f'{value * 1000:.2f}'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='a short sanity run')
    args = parser.parse_args()
    count, seconds = (30, 2.0) if args.quick else (200, 8.0)
    rows = []
    verdicts = []
    with tempfile.TemporaryDirectory() as directory:
        lone = Brokers(directory, 1, None)
        try:
            client = lone.client()
            base = latencies(client, 'r1a', count)
            rows.append(['lone broker (no lab)', ms(percentile(base, 0.5)),
                         ms(percentile(base, 0.99)), '', '',
                         f'{cycles_per_second(client, "r1a", seconds):.0f}'])
        finally:
            lone.stop()
        etcd = Etcd(directory)
        try:
            for size in (1, 3, 6):
                brokers = Brokers(directory, size, etcd)
                try:
                    client = brokers.client()
                    local = latencies(client, 'r1a', count)
                    remote = latencies(client, f'r{size}a', count) if size > 1 else []
                    rate = cycles_per_second(client, f'r{size}a', seconds)
                    rows.append([f'lab of {size}', ms(percentile(local, 0.5)),
                                 ms(percentile(local, 0.99)),
                                 ms(percentile(remote, 0.5)) if remote else '-',
                                 ms(percentile(remote, 0.99)) if remote else '-',
                                 f'{rate:.0f}'])
                    if remote:
                        ratio = percentile(remote, 0.5) / percentile(local, 0.5)
                        verdicts.append(f'lab of {size}: remote p50 {ratio:.2f}x local '
                                        f'(target <= 2x): {"PASS" if ratio <= 2 else "FAIL"}')
                    if size == 3:
                        before = etcd.handled()
                        cycles = 50
                        for _ in range(cycles):
                            proxy = client.get({'type': 'relay', 'uid': 'r3b'}, wait=10)
                            client.yield_resources(proxy)
                        time.sleep(0.5)
                        per_cycle = _delta(before, etcd.handled(), cycles)
                        before = etcd.handled()
                        time.sleep(10)
                        per_second = _delta(before, etcd.handled(), 10)
                        reclaims = [client_reclaim(brokers, 'r3b') for _ in range(3)]
                        host = host_reclaim(brokers)
                finally:
                    brokers.stop()
        finally:
            etcd.stop()
        try:
            samples, rate = labgrid_figures(directory, count, seconds)
            rows.append(['labgrid coordinator', ms(percentile(samples, 0.5)),
                         ms(percentile(samples, 0.99)), '', '', f'{rate:.0f}'])
        except (ImportError, RuntimeError) as error:
            rows.append(['labgrid coordinator', f'skipped: {error}', '', '', '', ''])
    print(render_table(['', 'local p50 ms', 'local p99 ms', 'remote p50 ms',
                        'remote p99 ms', 'cycles/s'], rows))
    print()
    print('etcd operations (lab of 3), counted by etcd:')
    print('  per allocation cycle (get + yield):',
          ', '.join(f'{name} {value:.1f}' for name, value in sorted(per_cycle.items())))
    print('  per second with nothing happening (3 brokers):',
          ', '.join(f'{name} {value:.2f}' for name, value in sorted(per_second.items())))
    print()
    worst = max(reclaims)
    verdicts.append(f'reclaim after a client died: worst {worst:.2f} s of 3 (target <= 2 s): '
                    f'{"PASS" if worst <= 2 else "FAIL"}')
    verdicts.append(f'reclaim after a host died: {host:.2f} s with ttl {TTL} s '
                    f'(target <= {TTL + 2} s): {"PASS" if host <= TTL + 2 else "FAIL"}')
    print('\n'.join(verdicts))
    return 0


def _delta(before: dict[str, float], after: dict[str, float], per: float) -> dict[str, float]:
    return {name: (after.get(name, 0) - before.get(name, 0)) / per
            for name in after if after.get(name, 0) - before.get(name, 0) > 0}


if __name__ == '__main__':
    sys.exit(main())
