"""Benchmark: ave.cmd.run against subprocess on a pty and against pexpect.run.

All three run the command on a pseudoterminal and return its output as text, so they
pay for the same kernel work; the differences are their own overhead. Two rows:

* ``true``: the median time of one call (start, exec, wait, clean-up).
* ``cat`` of a 50 MB file: output throughput.

Ratio columns: ``ave / subprocess`` is what ave costs relative to subprocess+pty (time
over time, or rate under rate: below 1.0 ave is faster); the speed-ups are over
pexpect.run (above 1.0: faster than pexpect). Targets: ave.cmd.run within 1.5x of
subprocess+pty on ``true``, and no slower than pexpect.run on any row.

The ``true`` calls of ave and subprocess are interleaved, each going first in every
other round, so a busy spell on a shared machine hurts both alike; pexpect.run is timed
in a loop of its own, because it sleeps 0.1 s in every call and whatever ran right
after that sleep would start on a cold CPU. Every loop is bounded in calls and in
seconds, and pexpect.run gets a time limit on the big ``cat``: it slows down as its
buffer grows, and if it does not finish, its rate is computed over the part it
delivered and marked with ``*``.

Run: ``.venv/bin/pip install -r bench/requirements.txt; .venv/bin/python bench/cmd.py``
"""
from __future__ import annotations

import errno
import os
import shlex
import statistics
import subprocess
import tempfile
import time
from typing import Callable

import pexpect  # type: ignore[import-untyped]

import ave.cmd

from _common import render_table

Runner = Callable[[list[str]], tuple[int, str]]

ROUNDS, ROUND_SECONDS = 200, 10.0   # `true` row: one ave and one subprocess call each
PEXPECT_ROUNDS = 20                  # `true` row for pexpect.run, about 0.1 s per call
CATS, CAT_SECONDS = 3, 20.0          # `cat` row, per runner
PEXPECT_CAT_LIMIT = 20               # seconds pexpect.run may spend on one cat
TAIL_LIMIT = 1 << 20                 # max_output of the extra `cat` line
TARGET = 1.5                         # ave.cmd.run / subprocess+pty on `true`, at most
LINE = 'x' * 99 + '\n'
FILE_BYTES = 50 * 1000 * 1000        # 50 MB, in lines of 100 bytes


def ave_run(argv: list[str]) -> tuple[int, str]:
    return ave.cmd.run(argv)


def subprocess_pty(argv: list[str]) -> tuple[int, str]:
    """subprocess with stdin/stdout/stderr on a pty slave, reading the master.

    Popen rather than subprocess.run: the master must be read while the program runs,
    or a big output fills the pty and both sides wait for ever.
    """
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                start_new_session=True)
    finally:
        os.close(slave)
    try:
        data = _read_to_eio(master)
    finally:
        os.close(master)
    return proc.wait(), data.decode('utf-8', 'replace')


def _read_to_eio(master: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            return b''.join(chunks)
        if not chunk:
            return b''.join(chunks)
        chunks.append(chunk)


def pexpect_run(argv: list[str]) -> tuple[int, str]:
    output, status = pexpect.run(shlex.join(argv), timeout=PEXPECT_CAT_LIMIT,
                                 withexitstatus=True, encoding='utf-8')
    return status, output


RUNNERS: dict[str, Runner] = {
    'ave.cmd.run': ave_run,
    'subprocess+pty': subprocess_pty,
    'pexpect.run': pexpect_run,
}


def bounded(action: Callable[[], float], count: int, seconds: float) -> list[float]:
    """Repeat ``action`` up to ``count`` times or until ``seconds`` have passed."""
    results: list[float] = []
    end = time.monotonic() + seconds
    while len(results) < count and (not results or time.monotonic() < end):
        results.append(action())
    return results


def timed(runner: Runner) -> float:
    start = time.perf_counter()
    runner(['true'])
    return time.perf_counter() - start


def per_call_ms() -> dict[str, str]:
    samples: dict[str, list[float]] = {name: [] for name in RUNNERS}
    for runner in RUNNERS.values():
        runner(['true'])  # warm up: imports, caches
    pair = ['ave.cmd.run', 'subprocess+pty']
    end = time.monotonic() + ROUND_SECONDS
    for round_number in range(ROUNDS):
        for name in pair if round_number % 2 == 0 else pair[::-1]:
            samples[name].append(timed(RUNNERS[name]))
        if time.monotonic() >= end:
            break
    samples['pexpect.run'] = bounded(lambda: timed(pexpect_run), PEXPECT_ROUNDS,
                                     ROUND_SECONDS)
    return {name: f'{statistics.median(times) * 1000:.2f}'
            for name, times in samples.items()}


def cat_mb_per_s(runner: Runner, path: str, expected_chars: int) -> str:
    partial = False

    def one() -> float:
        nonlocal partial
        start = time.perf_counter()
        _, out = runner(['cat', path])
        elapsed = time.perf_counter() - start
        partial = partial or len(out) < expected_chars
        return FILE_BYTES * len(out) / expected_chars / elapsed / 1e6
    rate = statistics.median(bounded(one, CATS, CAT_SECONDS))
    return f'{rate:.1f}' + ('*' if partial else '')


def tail_against_whole_mb_per_s(path: str) -> tuple[str, str]:
    """``cat`` throughput of ave.cmd.run keeping the last TAIL_LIMIT characters, and
    keeping everything, measured alternately."""
    rates: dict[int | None, list[float]] = {TAIL_LIMIT: [], None: []}
    end = time.monotonic() + 2 * CAT_SECONDS
    for _ in range(CATS):
        for limit, found in rates.items():
            start = time.perf_counter()
            _, out = ave.cmd.run(['cat', path], max_output=limit)
            found.append(FILE_BYTES / (time.perf_counter() - start) / 1e6)
            if not out.endswith(LINE.replace('\n', '\r\n')):
                raise RuntimeError(f'the output does not end like the file: '
                                   f'{out[-200:]!r}')
        if time.monotonic() >= end:
            break
    return (f'{statistics.median(rates[TAIL_LIMIT]):.1f}',
            f'{statistics.median(rates[None]):.1f}')


def speedup(figure: str, baseline: str, lower_is_better: bool) -> float:
    value, base = float(figure.rstrip('*')), float(baseline.rstrip('*'))
    return base / value if lower_is_better else value / base


def ave_cost(figures: dict[str, str], lower_is_better: bool) -> float:
    """ave.cmd.run's time relative to subprocess+pty's (rates turned into times)."""
    return 1 / speedup(figures['ave.cmd.run'], figures['subprocess+pty'], lower_is_better)


def make_file(directory: str) -> tuple[str, int]:
    """The 50 MB input, and its length in characters once a terminal made \\n \\r\\n."""
    path = os.path.join(directory, '50MB.txt')
    lines = FILE_BYTES // len(LINE)
    with open(path, 'w', encoding='ascii') as out:
        out.write(LINE * lines)
    return path, FILE_BYTES + lines


def print_table(rows: list[tuple[str, dict[str, str], bool]]) -> None:
    names = list(RUNNERS)
    header = ['', *names, 'ave / subprocess', 'ave vs pexpect', 'subprocess vs pexpect']
    lines = []
    for label, figures, lower_is_better in rows:
        speedups = [speedup(figures[name], figures['pexpect.run'], lower_is_better)
                    for name in ('ave.cmd.run', 'subprocess+pty')]
        lines.append([label, *(figures[name] for name in names),
                      f'{ave_cost(figures, lower_is_better):.2f}x',
                      *(f'{ratio:.1f}x' for ratio in speedups)])
    print(render_table(header, lines))
    _, calls, _ = rows[0]
    cost = ave_cost(calls, True)
    print(f"\nave / subprocess: ave.cmd.run's cost relative to subprocess+pty (below "
          f"1.0: ave is faster). Target (within {TARGET}x on 'true'): "
          f'{"met" if cost <= TARGET else "NOT met"} ({cost:.2f}x)')
    met = all(speedup(f['ave.cmd.run'], f['pexpect.run'], low) >= 1.0
              for _, f, low in rows)
    print(f'speed-up: how many times faster than pexpect.run. '
          f'Target (ave no slower than pexpect.run on every row): '
          f'{"met" if met else "NOT met"}')


def main() -> None:
    with tempfile.TemporaryDirectory(prefix='ave-bench-cmd-') as directory:
        path, expected_chars = make_file(directory)
        calls = per_call_ms()
        cats = {name: cat_mb_per_s(runner, path, expected_chars)
                for name, runner in RUNNERS.items()}
        tail_rate, whole_rate = tail_against_whole_mb_per_s(path)
    print_table([("run 'true': median ms per call", calls, True),
                 ('cat 50 MB: MB/s', cats, False)])
    if any(figure.endswith('*') for figure in cats.values()):
        print(f'* did not finish within {PEXPECT_CAT_LIMIT} s: rate over the part '
              f'delivered by then')
    print(f'ave.cmd.run, cat 50 MB with max_output={TAIL_LIMIT:,}: {tail_rate} MB/s, '
          f'against {whole_rate} MB/s keeping everything (measured alternately)')


if __name__ == '__main__':
    main()
