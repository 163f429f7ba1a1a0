"""Benchmark: ave.cmd.run against subprocess on a pty and against pexpect.run.

All three run the command on a pseudoterminal and return its output as text, so they
pay for the same kernel work; the differences are their own overhead. Two rows:

* ``true``: the median time of one call (fork, exec, wait, clean-up).
* ``cat`` of a 50 MB file: output throughput.

The last columns give the speed-up over pexpect.run (above 1.0: faster than pexpect).
The ``true`` calls are interleaved (ave, subprocess, pexpect, ave, ...) so that a busy
spell on a shared machine hurts all three alike. Every loop is bounded in calls and in
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

import pexpect

import ave.cmd

from _common import render_table

Runner = Callable[[list[str]], tuple[int, str]]

ROUNDS, ROUND_SECONDS = 100, 10.0   # `true` row: one call of each runner per round
CATS, CAT_SECONDS = 3, 20.0          # `cat` row, per runner
PEXPECT_CAT_LIMIT = 20               # seconds pexpect.run may spend on one cat
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
    chunks = []
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
    results, end = [], time.monotonic() + seconds
    while len(results) < count and (not results or time.monotonic() < end):
        results.append(action())
    return results


def per_call_ms() -> dict[str, str]:
    samples: dict[str, list[float]] = {name: [] for name in RUNNERS}
    for runner in RUNNERS.values():
        runner(['true'])  # warm up: imports, caches
    end = time.monotonic() + ROUND_SECONDS
    for _ in range(ROUNDS):
        for name, runner in RUNNERS.items():
            start = time.perf_counter()
            runner(['true'])
            samples[name].append(time.perf_counter() - start)
        if time.monotonic() >= end:
            break
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


def speedup(figure: str, baseline: str, lower_is_better: bool) -> float:
    value, base = float(figure.rstrip('*')), float(baseline.rstrip('*'))
    return base / value if lower_is_better else value / base


def make_file(directory: str) -> tuple[str, int]:
    """The 50 MB input, and its length in characters once a terminal made \\n \\r\\n."""
    path = os.path.join(directory, '50MB.txt')
    lines = FILE_BYTES // len(LINE)
    with open(path, 'w', encoding='ascii') as out:
        out.write(LINE * lines)
    return path, FILE_BYTES + lines


def print_table(rows: list[tuple[str, dict[str, str], bool]]) -> None:
    names = list(RUNNERS)
    header = ['', *names, 'ave vs pexpect', 'subprocess vs pexpect']
    lines = []
    for label, figures, lower_is_better in rows:
        ratios = [speedup(figures[name], figures['pexpect.run'], lower_is_better)
                  for name in ('ave.cmd.run', 'subprocess+pty')]
        lines.append([label, *(figures[name] for name in names),
                      *(f'{ratio:.1f}x' for ratio in ratios)])
    print(render_table(header, lines))
    met = all(speedup(f['ave.cmd.run'], f['pexpect.run'], low) >= 1.0
              for _, f, low in rows)
    print(f'\nspeed-up: how many times faster than pexpect.run. '
          f'Target (ave no slower than pexpect.run on every row): '
          f'{"met" if met else "NOT met"}')


def main() -> None:
    with tempfile.TemporaryDirectory(prefix='ave-bench-cmd-') as directory:
        path, expected_chars = make_file(directory)
        calls = per_call_ms()
        cats = {name: cat_mb_per_s(runner, path, expected_chars)
                for name, runner in RUNNERS.items()}
    print_table([("run 'true': median ms per call", calls, True),
                 ('cat 50 MB: MB/s', cats, False)])
    if any(figure.endswith('*') for figure in cats.values()):
        print(f'* did not finish within {PEXPECT_CAT_LIMIT} s: rate over the part '
              f'delivered by then')


if __name__ == '__main__':
    main()
