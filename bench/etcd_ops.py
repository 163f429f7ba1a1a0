"""What one etcd operation costs through ``ave.lab.etcd``, next to the least code that
speaks the same gateway, a gRPC client and etcdctl.

Run from the repository root: ``.venv/bin/python bench/etcd_ops.py [--quick]``.

A lab's etcd load is its brokers' keepalives, reads, allocation txns and watch
traffic, so these are measured one by one against a single etcd member on 127.0.0.1
(started here, in a temporary directory, with the test fixtures' code):

- *ave*: ``ave.lab.etcd.Etcd``, the client the lab uses;
- *floor*: ``http.client`` on a kept-alive connection posting prebuilt JSON to the
  same gateway paths and decoding the reply with ``json.loads``; what is left between
  ave and the floor is our own overhead (validation, base64, deadlines, failover);
- *grpc*: python3-etcd3 (gRPC, protobuf) when it is installed (``pip install
  python3-etcd3``): what skipping the gateway would buy;
- *etcdctl*: the official Go client, one process per operation (it has no batch mode);
  for watches, one ``etcdctl watch`` process whose output lines are timed.

Columns: median and p99 latency of one call, CPU the calling process spent per call,
and CPU the etcd process spent per call (the figure that sizes etcd for a lab). A
second table puts one key while 1, 10 and 50 ave watches follow its prefix, as every
broker of a lab follows the lab's keys: what one change costs etcd per watcher.
Clients take turns in rounds, so that a slow spell on a shared machine hurts all.
Watch latency is from the start of a put (always made with ave) to the event being
read by the client under test. Every loop is bounded in count and in time.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import psutil

from ave.lab.etcd import Compare, Etcd, Op

from _common import percentile, render_table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'tests' / 'lab'))
from etcd_process import start_cluster  # noqa: E402  (test machinery, shared on purpose)

ETCDCTL = '/usr/bin/etcdctl'
OPS = ['range', 'put', 'txn (4 compares)', 'lease keepalive', 'watch event']
EVENT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Plan:
    rounds: int = 5
    calls: int = 400           # per op, client and round
    etcdctl_calls: int = 20
    watch_events: int = 100
    fanout: tuple[int, ...] = (1, 10, 50)   # ave watchers on one prefix
    fanout_puts: int = 200
    budget: float = 20.0       # seconds at most for one batch


@dataclass
class Result:
    latency: list[float] = field(default_factory=list)
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    calls: int = 0


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- the clients under test: each turns an op name into a callable doing one call ---------

class Client(Protocol):
    name: str

    def op(self, name: str) -> Callable[[], Any]: ...

    def watch_prefix(self) -> str: ...

    def next_event(self) -> None: ...

    def close(self) -> None: ...


class AveClient:
    name = 'ave'

    def __init__(self, endpoint: str, lease: int) -> None:
        self.etcd = Etcd([endpoint], timeout=5)
        self.lease = lease
        self.watch = self.etcd.watch('bench/watch/ave/')

    def op(self, name: str) -> Callable[[], Any]:
        etcd, lease = self.etcd, self.lease
        compares = [Compare.exists('bench/k'), Compare.value('bench/k', 'v'),
                    Compare.version('bench/k', 0, '>'), Compare.lease('bench/k', 0)]
        return {
            'range': lambda: etcd.get('bench/k'),
            'put': lambda: etcd.put('bench/k', 'v'),
            'txn (4 compares)': lambda: etcd.txn(compares, [Op.put('bench/k', 'v')]),
            'lease keepalive': lambda: etcd.lease_keepalive(lease),
        }[name]

    def watch_prefix(self) -> str:
        return 'bench/watch/ave/'

    def next_event(self) -> None:
        deadline = time.monotonic() + EVENT_TIMEOUT
        while not self.watch.read(0.5):
            if time.monotonic() > deadline:
                raise TimeoutError('ave: no watch event')

    def close(self) -> None:
        self.watch.close()
        self.etcd.close()


class FloorClient:
    name = 'floor'

    def __init__(self, endpoint: str, lease: int) -> None:
        host, port = endpoint.removeprefix('http://').rsplit(':', 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=5)
        self.lease = lease
        self.watcher = http.client.HTTPConnection(host, int(port), timeout=EVENT_TIMEOUT)
        body = {'create_request': {'key': b64('bench/watch/floor/'),
                                   'range_end': b64('bench/watch/floor0')}}
        self.watcher.request('POST', '/v3/watch', json.dumps(body))
        self.stream = self.watcher.getresponse()
        self.stream.readline()  # the "created" message

    def post(self, path: str, body: bytes) -> Any:
        self.connection.request('POST', path, body,
                                {'Content-Type': 'application/json'})
        return json.loads(self.connection.getresponse().read())

    def op(self, name: str) -> Callable[[], Any]:
        key, value = b64('bench/k'), b64('v')
        compares = [{'key': key, 'target': 'CREATE', 'result': 'GREATER',
                     'create_revision': '0'},
                    {'key': key, 'target': 'VALUE', 'result': 'EQUAL', 'value': value},
                    {'key': key, 'target': 'VERSION', 'result': 'GREATER', 'version': '0'},
                    {'key': key, 'target': 'LEASE', 'result': 'EQUAL', 'lease': '0'}]
        bodies = {
            'range': ('/v3/kv/range', {'key': key}),
            'put': ('/v3/kv/put', {'key': key, 'value': value}),
            'txn (4 compares)': ('/v3/kv/txn', {
                'compare': compares,
                'success': [{'request_put': {'key': key, 'value': value}}]}),
            'lease keepalive': ('/v3/lease/keepalive', {'ID': str(self.lease)}),
        }
        path, body = bodies[name]
        data = json.dumps(body).encode()
        return lambda: self.post(path, data)

    def watch_prefix(self) -> str:
        return 'bench/watch/floor/'

    def next_event(self) -> None:
        while b'"events"' not in self.stream.readline():
            pass

    def close(self) -> None:
        self.connection.close()
        self.watcher.close()


class GrpcClient:
    name = 'grpc'

    def __init__(self, endpoint: str, lease: int) -> None:
        import etcd3  # type: ignore[import-untyped]  # python3-etcd3, for comparison
        host, port = endpoint.removeprefix('http://').rsplit(':', 1)
        self.client = etcd3.client(host=host, port=int(port), timeout=5)
        self.lease = lease
        self.events, self.cancel = self.client.watch_prefix('bench/watch/grpc/')

    def op(self, name: str) -> Callable[[], Any]:
        client, lease = self.client, self.lease
        compare = client.transactions
        # It has no lease compare; a revision compare stands in for the fourth.
        compares = [compare.create('bench/k') > 0, compare.value('bench/k') == 'v',
                    compare.version('bench/k') > 0, compare.mod('bench/k') > 0]
        success = [compare.put('bench/k', 'v')]
        return {
            'range': lambda: client.get('bench/k'),
            'put': lambda: client.put('bench/k', 'v'),
            'txn (4 compares)': lambda: client.transaction(compares, success, []),
            'lease keepalive': lambda: list(client.refresh_lease(lease)),
        }[name]

    def watch_prefix(self) -> str:
        return 'bench/watch/grpc/'

    def next_event(self) -> None:
        next(self.events)

    def close(self) -> None:
        self.cancel()
        self.client.close()


class EtcdctlClient:
    name = 'etcdctl'

    def __init__(self, endpoint: str, lease: int) -> None:
        self.base = [ETCDCTL, '--endpoints', endpoint]
        self.lease = lease
        self.watcher = subprocess.Popen([*self.base, 'watch', '--prefix', 'bench/watch/ctl/'],
                                        stdout=subprocess.PIPE, env={'ETCDCTL_API': '3'})
        time.sleep(0.5)  # let it connect and register before the first put

    def run(self, *args: str, stdin: str | None = None) -> None:
        subprocess.run([*self.base, *args], input=stdin, text=True, check=True,
                       stdout=subprocess.DEVNULL, env={'ETCDCTL_API': '3'}, timeout=10)

    def op(self, name: str) -> Callable[[], Any]:
        # etcdctl 3.4's txn syntax has no lease compare: a revision compare stands in.
        txn = ('create("bench/k") > "0"\nvalue("bench/k") = "v"\n'
               'version("bench/k") > "0"\nmod("bench/k") > "0"\n\nput bench/k v\n\n\n')
        return {
            'range': lambda: self.run('get', 'bench/k'),
            'put': lambda: self.run('put', 'bench/k', 'v'),
            'txn (4 compares)': lambda: self.run('txn', stdin=txn),
            'lease keepalive': lambda: self.run('lease', 'keep-alive', '--once',
                                                f'{self.lease:x}'),
        }[name]

    def watch_prefix(self) -> str:
        return 'bench/watch/ctl/'

    def next_event(self) -> None:
        assert self.watcher.stdout is not None
        while self.watcher.stdout.readline().strip() != b'PUT':
            pass
        self.watcher.stdout.readline()
        self.watcher.stdout.readline()

    def close(self) -> None:
        self.watcher.kill()
        self.watcher.wait()


# -- measuring ----------------------------------------------------------------------------

def measure(call: Callable[[], Any], count: int, budget: float, server: psutil.Process,
            result: Result) -> None:
    """``count`` calls (fewer if ``budget`` seconds run out), added to ``result``."""
    call()  # warm: a connection, a code path
    cpu, server_cpu = time.process_time(), _cpu(server)
    deadline = time.monotonic() + budget
    done = 0
    while done < count and time.monotonic() < deadline:
        started = time.perf_counter()
        call()
        result.latency.append(time.perf_counter() - started)
        done += 1
    result.client_cpu += time.process_time() - cpu
    result.server_cpu += _cpu(server) - server_cpu
    result.calls += done


def measure_watch(client: Client, writer: Etcd, count: int, budget: float,
                  server: psutil.Process, result: Result) -> None:
    """Put-to-event latency: the put is ave's for every client, the event the client's."""
    prefix = client.watch_prefix()
    seen = threading.Semaphore(0)
    stop = threading.Event()
    failures: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                client.next_event()
                seen.release()
        except BaseException as error:  # reported by the measuring thread
            failures.append(error)
            seen.release()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    cpu, server_cpu = time.process_time(), _cpu(server)
    deadline = time.monotonic() + budget
    done = 0
    while done < count and time.monotonic() < deadline:
        started = time.perf_counter()
        writer.put(f'{prefix}{done % 10}', 'v')
        if not seen.acquire(timeout=EVENT_TIMEOUT) or failures:
            raise RuntimeError(f'{client.name}: no watch event ({failures})')
        result.latency.append(time.perf_counter() - started)
        done += 1
    stop.set()
    writer.put(f'{prefix}stop', 'v')   # wakes the reader so it can see ``stop``
    thread.join(EVENT_TIMEOUT)
    result.client_cpu += time.process_time() - cpu
    result.server_cpu += _cpu(server) - server_cpu
    result.calls += done


def measure_fanout(endpoint: str, writer: Etcd, watchers: int, puts: int, budget: float,
                   server: psutil.Process) -> Result:
    """Each put seen by ``watchers`` ave watches on one prefix (as every broker of a lab
    watches the lab's keys): latency until the last one saw it, etcd CPU per put."""
    clients = [Etcd([endpoint], timeout=5) for _ in range(watchers)]
    watches = [client.watch('bench/fanout/') for client in clients]
    seen = threading.Semaphore(0)
    stop = threading.Event()

    def reader(watch: Any) -> None:
        while not stop.is_set():
            if watch.read(0.2):
                seen.release()

    threads = [threading.Thread(target=reader, args=(w,), daemon=True) for w in watches]
    for thread in threads:
        thread.start()
    result = Result()
    try:
        cpu, server_cpu = time.process_time(), _cpu(server)
        deadline = time.monotonic() + budget
        while result.calls < puts and time.monotonic() < deadline:
            started = time.perf_counter()
            writer.put('bench/fanout/k', 'v')
            for _ in range(watchers):
                if not seen.acquire(timeout=EVENT_TIMEOUT):
                    raise RuntimeError('fan-out: a watcher missed an event')
            result.latency.append(time.perf_counter() - started)
            result.calls += 1
        result.client_cpu = time.process_time() - cpu
        result.server_cpu = _cpu(server) - server_cpu
    finally:
        stop.set()
        for thread in threads:
            thread.join(EVENT_TIMEOUT)
        for watch, client in zip(watches, clients):
            watch.close()
            client.close()
    return result


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def run(plan: Plan, names: list[str]) -> dict[tuple[str, str], Result]:
    """Every (client, operation) measured; ('fan-out', N) for N ave watchers."""
    results: dict[tuple[str, str], Result] = {}
    with tempfile.TemporaryDirectory(prefix='ave-bench-etcd-') as directory:
        cluster = start_cluster(Path(directory), 1)
        try:
            node = cluster.nodes[0]
            assert node.pid is not None
            server = psutil.Process(node.pid)
            writer = Etcd([node.endpoint], timeout=5)
            writer.put('bench/k', 'v')
            lease = writer.lease_grant(600)
            kinds: dict[str, Callable[[str, int], Client]] = {
                'ave': AveClient, 'floor': FloorClient, 'grpc': GrpcClient,
                'etcdctl': EtcdctlClient}
            clients = [kinds[name](node.endpoint, lease) for name in names]
            try:
                for round_number in range(plan.rounds):
                    for client in clients:
                        calls = plan.etcdctl_calls if client.name == 'etcdctl' else plan.calls
                        for op in OPS[:-1]:
                            result = results.setdefault((client.name, op), Result())
                            measure(client.op(op), calls, plan.budget, server, result)
                        result = results.setdefault((client.name, OPS[-1]), Result())
                        measure_watch(client, writer, plan.watch_events, plan.budget,
                                      server, result)
                    print(f'round {round_number + 1}/{plan.rounds} done', file=sys.stderr)
                for watchers in plan.fanout:
                    results[('fan-out', str(watchers))] = measure_fanout(
                        node.endpoint, writer, watchers, plan.fanout_puts, plan.budget,
                        server)
            finally:
                for client in clients:
                    client.close()
                writer.close()
        finally:
            cluster.stop()
    return results


def report(results: dict[tuple[str, str], Result], names: list[str]) -> str:
    header = ['operation', 'client', 'median', 'p99', 'client CPU/call', 'etcd CPU/call',
              'median vs ave']
    rows = []
    for op in OPS:
        ave = results.get(('ave', op))
        for name in names:
            result = results.get((name, op))
            if result is None or not result.latency:
                continue
            median = percentile(result.latency, 0.5)
            ratio = f'{median / percentile(ave.latency, 0.5):.2f}x' if ave else '-'
            rows.append([op, name, _us(median), _us(percentile(result.latency, 0.99)),
                         _us(result.client_cpu / result.calls),
                         _us(result.server_cpu / result.calls), ratio])
    return render_table(header, rows)


def report_fanout(results: dict[tuple[str, str], Result]) -> str:
    """Per put: latency until every watcher saw it, etcd CPU in all, and the share of
    each delivered event (etcd CPU beyond what the put costs alone, per watcher)."""
    put_alone = results[('ave', 'put')]
    put_cpu = put_alone.server_cpu / put_alone.calls
    header = ['watchers', 'put → all seen (median)', 'p99', 'etcd CPU/put',
              'etcd CPU/delivery']
    rows = []
    for (kind, watchers), result in results.items():
        if kind != 'fan-out' or not result.calls:
            continue
        per_put = result.server_cpu / result.calls
        rows.append([watchers, _us(percentile(result.latency, 0.5)),
                     _us(percentile(result.latency, 0.99)), _us(per_put),
                     _us(max(0.0, per_put - put_cpu) / int(watchers))])
    return render_table(header, rows)


def _us(seconds: float) -> str:
    return f'{seconds * 1e6:,.0f} µs'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='fewer rounds and calls')
    parser.add_argument('--only', help='comma-separated clients: ave,floor,grpc,etcdctl')
    args = parser.parse_args()
    plan = Plan(rounds=2, calls=100, etcdctl_calls=5, watch_events=30,
                fanout_puts=30) if args.quick else Plan()
    names = args.only.split(',') if args.only else ['ave', 'floor', 'grpc', 'etcdctl']
    if 'grpc' in names:
        try:
            import etcd3  # type: ignore[import-untyped]  # noqa: F401
        except Exception as error:   # absent, or broken by its protobuf
            print(f'grpc: skipped (python3-etcd3 not usable: {type(error).__name__})',
                  file=sys.stderr)
            names.remove('grpc')
    results = run(plan, names)
    print(report(results, names))
    print()
    print(report_fanout(results))


if __name__ == '__main__':
    main()
