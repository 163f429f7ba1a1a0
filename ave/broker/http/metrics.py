"""Prometheus metrics made from the latest snapshot.

A custom collector reads the snapshot the broker last sent, so nothing is counted
twice and nothing lives in ``prometheus_client``'s global default registry (which
would also publish this process's own Python metrics as if they were the broker's).
Before the first snapshot there is nothing to say, and nothing is published.

Metrics: ``ave_equipment{type,state}`` (items per type in each state, zeros
included so that a series does not vanish when its last item changes state),
``ave_sessions``, ``ave_queue_length``, ``ave_allocations_total``,
``ave_restarts_total``, ``ave_queue_wait_seconds`` and ``ave_rpc_seconds{method}``
(histograms), and ``ave_snapshot_timestamp_seconds`` (when the broker made the
snapshot: alert on it growing old to learn that the broker stopped reporting).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)

from ave.broker.http.feed import STATES

CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8'


class SnapshotCollector:
    """Yields the broker's metrics from whatever ``latest()`` returns (or nothing)."""

    def __init__(self, latest: Callable[[], dict | None]) -> None:
        self.latest = latest

    def collect(self) -> Iterator[Metric]:
        snapshot = self.latest()
        if snapshot is None:
            return
        yield _equipment(snapshot['equipment'])
        yield GaugeMetricFamily('ave_sessions', 'Sessions running (clients holding '
                                'equipment).', value=snapshot['sessions'])
        yield GaugeMetricFamily('ave_queue_length', 'Requests waiting for equipment.',
                                value=len(snapshot['queue']))
        yield CounterMetricFamily('ave_allocations', 'Allocations granted.',
                                  value=snapshot['allocations_total'])
        yield CounterMetricFamily('ave_restarts', 'Broker restarts (takeovers).',
                                  value=snapshot['restarts_total'])
        wait = HistogramMetricFamily('ave_queue_wait_seconds',
                                     'Time a granted request spent in the queue.')
        wait.add_metric([], _buckets(snapshot['queue_wait_seconds']),
                        snapshot['queue_wait_seconds']['sum'])
        yield wait
        rpc = HistogramMetricFamily('ave_rpc_seconds', 'Time the broker took to answer '
                                    'an RPC.', labels=['method'])
        for method, histogram in sorted(snapshot['rpc_seconds'].items()):
            rpc.add_metric([method], _buckets(histogram), histogram['sum'])
        yield rpc
        yield GaugeMetricFamily('ave_snapshot_timestamp_seconds', 'When the broker made '
                                'the snapshot these metrics come from (unix time).',
                                value=snapshot['time'])


def _equipment(equipment: list[dict]) -> GaugeMetricFamily:
    counts = Counter((entry['type'], entry['state']) for entry in equipment)
    family = GaugeMetricFamily('ave_equipment', 'Equipment items by type and state.',
                               labels=['type', 'state'])
    for type_name in sorted({entry['type'] for entry in equipment}):
        for state in STATES:
            family.add_metric([type_name, state], counts[(type_name, state)])
    return family


def _buckets(histogram: dict) -> list[tuple[str, float]]:
    """Cumulative buckets as prometheus_client wants them, ``+Inf`` last."""
    return ([(_bound(bound), count) for bound, count in histogram['buckets']]
            + [('+Inf', histogram['count'])])


def _bound(bound: float) -> str:
    return repr(float(bound))


def make_registry(latest: Callable[[], dict | None]) -> CollectorRegistry:
    """A registry of our own holding only the snapshot collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(latest))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of everything in ``registry``."""
    return generate_latest(registry)
