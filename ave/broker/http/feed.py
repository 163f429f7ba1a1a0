"""The broker's side of the status feed: timings, pacing and the snapshot it sends.

The broker loop answers an RPC in about 30 µs, so whatever it does for the status
page must be cheap, bounded and free of I/O: everything here is plain bookkeeping.
The expensive parts (HTTP, Prometheus rendering, the utilisation history) live in
the HTTP process, which the broker feeds with the one-way call ``update(snapshot)``.

What the broker does:

- time every RPC and give the duration to ``RpcTimings.observe(method, seconds)``
  (a dict lookup and one ``bisect``); a granted queued request goes to a
  ``Histogram`` of queue waits the same way;
- call ``FeedPacer.changed()`` when equipment, holders or the queue change, and send
  a snapshot when ``FeedPacer.delay(now)`` says one is due (soon after a change, no
  more often than every 100 ms, at least every 5 s even when nothing changed), then
  tell it ``sent(now, cost)`` with the seconds that building and sending took, so
  that a large lab's snapshots never take more than 2 % of the loop;
- make the snapshot with ``build_snapshot`` from rows made by ``equipment_row``;
- skip a due snapshot while the link still has output queued (``link.has_output``)
  and send it once that has drained: a stalled HTTP process must not make the
  broker queue snapshots without limit.

The snapshot (schema version 1; ``ave.broker.http.snapshot`` checks it on arrival)::

    {"version": 1, "time": unix seconds, "lab": str | null, "host": str,
     "on_demand_types": [str, ...],            # made per allocation: not utilisation
     "equipment": [{"type": str, "identity": str, "profile": {...}, "host": str,
                    "state": "available" | "held" | "reserved" | "releasing"
                             | "offline",
                    "holder": {"user", "host", "pid", "program", "job"} | null,
                    "since": unix seconds | null}, ...],
     "queue": [{"position": int, "holder": {...} | null, "profiles": [...],
                "priority": int, "waited_s": float}, ...],
     "sessions": int, "allocations_total": int, "restarts_total": int,
     "rpc_seconds": {method: histogram}, "queue_wait_seconds": histogram}

A histogram is ``{"buckets": [[upper bound, cumulative count], ...], "sum": float,
"count": int}``: finite bounds in ascending order; ``count`` is the ``+Inf`` bucket
(JSON has no infinity).
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Any, Iterable, Mapping, Sequence

SCHEMA_VERSION = 1
STATES = ('available', 'held', 'reserved', 'releasing', 'offline')
HOLDER_KEYS = ('user', 'host', 'pid', 'program', 'job')

# From 10 µs (a trivial RPC) to 1 s (a broker in trouble).
RPC_BOUNDS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
              1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)
# From a second to a working day spent in the queue.
QUEUE_WAIT_BOUNDS = (1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
                     7200.0, 14400.0, 28800.0)
# Method names come from clients: past this many, new names share one histogram.
MAX_METHODS = 64
OTHER_METHOD = 'other'

MIN_INTERVAL = 0.1
MAX_INTERVAL = 5.0
MAX_SHARE = 0.02


class Histogram:
    """Counts of observations in fixed buckets, as Prometheus histograms have them.

    ``observe`` costs one ``bisect`` on a short tuple and two additions; cumulative
    counts are computed only when exported. A value equal to a bound falls in that
    bound's bucket (Prometheus's ``le``, less than or equal).
    """

    __slots__ = ('bounds', 'counts', 'total')

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError('histogram bounds must be distinct and ascending')
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is above every bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def export(self) -> dict:
        """The histogram in the snapshot's form (cumulative counts)."""
        buckets = []
        running = 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            buckets.append([bound, running])
        return {'buckets': buckets, 'sum': self.total, 'count': running + self.counts[-1]}

    @classmethod
    def restore(cls, exported: Mapping[str, Any]) -> 'Histogram':
        """The histogram ``export`` described: a successor broker keeps counting on."""
        histogram = cls([bound for bound, _ in exported['buckets']])
        previous = 0
        for index, (_, cumulative) in enumerate(exported['buckets']):
            histogram.counts[index] = int(cumulative) - previous
            previous = int(cumulative)
        histogram.counts[-1] = int(exported['count']) - previous
        if min(histogram.counts) < 0:
            raise ValueError('histogram counts must not decrease')
        histogram.total = float(exported['sum'])
        return histogram


class RpcTimings:
    """One histogram of durations per RPC method, with a bounded number of methods."""

    __slots__ = ('bounds', 'methods')

    def __init__(self, bounds: Sequence[float] = RPC_BOUNDS) -> None:
        self.bounds = tuple(bounds)
        self.methods: dict[str, Histogram] = {}

    def observe(self, method: str, seconds: float) -> None:
        histogram = self.methods.get(method)
        if histogram is None:
            histogram = self._histogram_for(method)
        histogram.observe(seconds)

    def _histogram_for(self, method: str) -> Histogram:
        if len(self.methods) >= MAX_METHODS:
            method = OTHER_METHOD
        return self.methods.setdefault(method, Histogram(self.bounds))

    def export(self) -> dict:
        return {method: histogram.export() for method, histogram in self.methods.items()}

    @classmethod
    def restore(cls, exported: Mapping[str, Mapping[str, Any]],
                bounds: Sequence[float] = RPC_BOUNDS) -> 'RpcTimings':
        """Timings a predecessor exported; histograms with other bounds start over."""
        timings = cls(bounds)
        for method, histogram in list(exported.items())[:MAX_METHODS]:
            restored = Histogram.restore(histogram)
            if restored.bounds == timings.bounds:
                timings.methods[str(method)] = restored
        return timings


class FeedPacer:
    """Decides when the next snapshot is due: soon after a change, but no more often
    than ``min_interval``, and at least every ``max_interval`` so that the HTTP
    process can tell a quiet broker from a lost one.

    A snapshot's cost grows with the lab (about 3 µs per item to build, encode and
    send), so the pause after one is also at least its cost divided by ``max_share``:
    however large the lab, snapshots take at most that share of the loop's time.
    """

    __slots__ = ('min_interval', 'max_interval', 'max_share', 'last_sent', 'pause', 'dirty')

    def __init__(self, min_interval: float = MIN_INTERVAL,
                 max_interval: float = MAX_INTERVAL, max_share: float = MAX_SHARE) -> None:
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.max_share = max_share
        self.last_sent: float | None = None
        self.pause = min_interval
        self.dirty = True

    def changed(self) -> None:
        self.dirty = True

    def delay(self, now: float) -> float:
        """Seconds until a snapshot is due; 0 means send one now."""
        if self.last_sent is None:
            return 0.0
        wait = self.pause if self.dirty else max(self.pause, self.max_interval)
        return max(0.0, self.last_sent + wait - now)

    def sent(self, now: float, cost: float = 0.0) -> None:
        """A snapshot went out at ``now``; making and sending it took ``cost`` seconds."""
        self.last_sent = now
        self.pause = max(self.min_interval, cost / self.max_share)
        self.dirty = False


def equipment_row(profile: Mapping[str, Any], identity: str, host: str, state: str,
                  holder: Mapping[str, Any] | None = None,
                  since: float | None = None) -> dict:
    """One entry of a snapshot's ``equipment``; ``holder`` is the announced identity."""
    return {'type': profile.get('type'), 'identity': identity, 'profile': dict(profile),
            'host': host, 'state': state,
            'holder': None if holder is None else dict(holder), 'since': since}


def build_snapshot(*, now: float, host: str, equipment: Iterable[dict],
                   queue: Iterable[dict] = (), lab: str | None = None,
                   sessions: int = 0, allocations_total: int = 0, restarts_total: int = 0,
                   rpc_seconds: RpcTimings | None = None,
                   queue_wait_seconds: Histogram | None = None,
                   on_demand_types: Iterable[str] = ('workspace',)) -> dict:
    """The snapshot for ``update()``, from rows of ``equipment_row`` and queue entries
    as the broker's ``queue()`` RPC lists them. Copies nothing it does not have to."""
    return {
        'version': SCHEMA_VERSION, 'time': now, 'lab': lab, 'host': host,
        'on_demand_types': list(on_demand_types),
        'equipment': list(equipment), 'queue': list(queue),
        'sessions': sessions, 'allocations_total': allocations_total,
        'restarts_total': restarts_total,
        'rpc_seconds': {} if rpc_seconds is None else rpc_seconds.export(),
        'queue_wait_seconds': (Histogram(QUEUE_WAIT_BOUNDS) if queue_wait_seconds is None
                               else queue_wait_seconds).export(),
    }
