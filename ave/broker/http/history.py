"""Utilisation over the last day: how much of the lab's equipment was in use.

Per bucket of five minutes (288 buckets, one day) the history keeps the
time-weighted average of the fraction of equipment in use, overall and per type.
"In use" is held or releasing; equipment that is offline is left out of the
fraction (it could not have been used), and so are on-demand types such as
workspaces (they exist only while held, so they would always read 100 %).

Each snapshot is a sample; the state it reports is taken to hold until the next
one, but never for longer than ``MAX_GAP`` seconds, so a broker that was silent for
an hour does not fill the hour with its last state.

``Utilisation`` is pure bookkeeping. ``load`` and ``save`` keep it in
``<home>/.ave/utilisation.json`` so that it survives a restart of the HTTP process.
The file is bounded (at most 288 buckets of at most ``MAX_TYPES`` types, written by
us) and read defensively: anything larger than ``FILE_LIMIT``, not a regular file,
or not exactly what ``save`` writes is ignored with one warning.
"""
from __future__ import annotations

import json
import logging
import math
import os
import stat
from typing import Any, Iterable

log = logging.getLogger(__name__)

BUCKET_S = 300
BUCKETS = 288
MAX_TYPES = 16
MAX_TYPE_NAME = 64
MAX_GAP = 30.0
FILE_LIMIT = 1024 * 1024
FILE_VERSION = 1
IN_USE = frozenset({'held', 'releasing'})
COUNTED = frozenset({'available', 'held', 'releasing'})

# A bucket's series: name -> [average fraction, seconds covered]. '' is overall.
Series = dict[str, list[float]]
OVERALL = ''


def fractions_of(equipment: Iterable[dict], on_demand: Iterable[str]) -> dict[str, float]:
    """The fraction in use, overall ('') and per type, of a snapshot's equipment."""
    skipped = set(on_demand)
    in_use: dict[str, int] = {}
    counted: dict[str, int] = {}
    for entry in equipment:
        if entry['type'] in skipped or entry['state'] not in COUNTED:
            continue
        counted[entry['type']] = counted.get(entry['type'], 0) + 1
        if entry['state'] in IN_USE:
            in_use[entry['type']] = in_use.get(entry['type'], 0) + 1
    fractions = {name: in_use.get(name, 0) / total for name, total in counted.items()}
    total = sum(counted.values())
    if total:
        fractions[OVERALL] = sum(in_use.values()) / total
    return fractions


class Utilisation:
    """The buckets of the last day, fed one sample (a snapshot's fractions) at a time."""

    def __init__(self, bucket_s: int = BUCKET_S, buckets: int = BUCKETS) -> None:
        self.bucket_s = bucket_s
        self.size = buckets
        self.buckets: dict[int, Series] = {}
        self._last: tuple[float, dict[str, float]] | None = None
        self.version = 0  # counts changes, so that renderings can be cached

    def record(self, now: float, fractions: dict[str, float]) -> None:
        """The state ``fractions`` describes begins at ``now``; the previous one ends."""
        self.finish(now)
        self._last = (now, dict(fractions))
        self._prune(now)

    def finish(self, now: float) -> None:
        """The last state reported ends now (the process is about to stop)."""
        if self._last is not None:
            began, previous = self._last
            self._add(began, min(now, began + MAX_GAP), previous)
            self._last = None
            self._prune(now)  # the interval may have opened a bucket: still one day

    def _add(self, start: float, end: float, fractions: dict[str, float]) -> None:
        """Spread the interval over the buckets it touches (at most two: MAX_GAP is short)."""
        while end > start:
            bucket = int(start // self.bucket_s) * self.bucket_s
            stop = min(end, bucket + self.bucket_s)
            series = self.buckets.setdefault(bucket, {})
            for name, fraction in sorted(fractions.items()):  # overall ('') first
                if name in series or len(series) <= MAX_TYPES:
                    _blend(series.setdefault(name, [0.0, 0.0]), fraction, stop - start)
            start = stop
        self.version += 1

    def _prune(self, now: float) -> None:
        """Keep the buckets of the last day; a clock set back drops the future ones."""
        oldest = now - self.size * self.bucket_s
        for bucket in [b for b in self.buckets if b <= oldest or b > now]:
            del self.buckets[bucket]

    def export(self) -> dict:
        """The averages for the page: ``{"bucket_s", "buckets": [{"start", "all",
        "types"}]}``, oldest first; ``all`` is null when nothing could be used."""
        rows = []
        for start in sorted(self.buckets):
            series = self.buckets[start]
            overall = series.get(OVERALL)
            rows.append({'start': start, 'all': None if overall is None else overall[0],
                         'types': {name: values[0] for name, values in sorted(series.items())
                                   if name != OVERALL}})
        return {'bucket_s': self.bucket_s, 'buckets': rows}

    # -- the file form -----------------------------------------------------------------

    def to_json(self) -> dict:
        return {'version': FILE_VERSION, 'bucket_s': self.bucket_s,
                'buckets': [{'start': start, 'series': self.buckets[start]}
                            for start in sorted(self.buckets)]}

    @classmethod
    def from_json(cls, data: Any, buckets: int = BUCKETS) -> 'Utilisation':
        """The history ``to_json`` wrote; ValueError naming the defect for anything else."""
        if not isinstance(data, dict) or data.get('version') != FILE_VERSION:
            raise ValueError(f'not a version {FILE_VERSION} utilisation history')
        bucket_s = data.get('bucket_s')
        if not isinstance(bucket_s, int) or isinstance(bucket_s, bool) or bucket_s <= 0:
            raise ValueError('"bucket_s" must be a positive integer')
        rows = data.get('buckets')
        if not isinstance(rows, list) or len(rows) > buckets:
            raise ValueError(f'"buckets" must be a list of at most {buckets} entries')
        history = cls(bucket_s, buckets)
        for row in rows:
            start, series = _checked_row(row, bucket_s)
            history.buckets[start] = series
        return history


def _blend(average: list[float], fraction: float, seconds: float) -> None:
    covered = average[1] + seconds
    if covered > 0:
        average[0] = (average[0] * average[1] + fraction * seconds) / covered
        average[1] = covered


def _checked_row(row: Any, bucket_s: int) -> tuple[int, Series]:
    if not isinstance(row, dict):
        raise ValueError('a bucket must be an object')
    start = row.get('start')
    if not isinstance(start, int) or isinstance(start, bool) or start % bucket_s:
        raise ValueError('a bucket\'s "start" must be a multiple of "bucket_s"')
    series = row.get('series')
    if not isinstance(series, dict) or len(series) > MAX_TYPES + 1:
        raise ValueError(f'a bucket holds at most {MAX_TYPES + 1} series')
    checked: Series = {}
    for name, values in series.items():
        if len(name) > MAX_TYPE_NAME:
            raise ValueError('a type name is too long')
        if (not isinstance(values, list) or len(values) != 2
                or not all(_finite(value) for value in values)
                or not 0.0 <= values[0] <= 1.0 or not 0.0 <= values[1] <= bucket_s):
            raise ValueError(f'series {name[:MAX_TYPE_NAME]!r} must be [fraction, seconds]')
        checked[name] = [float(values[0]), float(values[1])]
    return start, checked


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


# -- the file -------------------------------------------------------------------------

def path_in(home: str) -> str:
    return os.path.join(home, '.ave', 'utilisation.json')


def load(path: str) -> Utilisation:
    """The history kept at ``path``; an empty one (and one warning) if it is unusable.

    Opened without following a link and without blocking, so that neither a FIFO nor
    a link to a device put in its place can hang or flood the process.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return Utilisation()
    except OSError as error:
        log.warning('ignoring utilisation history %s: %s', path, error)
        return Utilisation()
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > FILE_LIMIT:
            raise ValueError(f'not a regular file of at most {FILE_LIMIT} bytes')
        with os.fdopen(fd, 'rb', closefd=False) as stream:
            text = stream.read(FILE_LIMIT + 1)
        if len(text) > FILE_LIMIT:
            raise ValueError(f'larger than {FILE_LIMIT} bytes')
        return Utilisation.from_json(json.loads(text))
    except (OSError, ValueError, RecursionError) as error:
        log.warning('ignoring utilisation history %s: %s', path, str(error)[:200])
        return Utilisation()
    finally:
        os.close(fd)


def save(path: str, history: Utilisation) -> None:
    """Write the history so that a reader (or a crash) only ever sees a whole file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f'{path}.{os.getpid()}.tmp'
    try:
        with open(temporary, 'w', encoding='utf-8') as stream:
            json.dump(history.to_json(), stream, separators=(',', ':'))
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass  # never created, or already gone: nothing to clean up
        raise
