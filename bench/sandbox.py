"""Benchmark: what running a command in the session's sandbox costs over ave.cmd.run.

Four ways to run the same command, side by side in one run:

* ``ave.cmd.run``: the baseline, no isolation;
* ``sandbox off``: ``Sandbox(False).run``, the launcher without bwrap (isolation off);
* ``bare bwrap``: ``ave.cmd.run`` of bwrap with the sandbox's namespaces, running the
  command directly (no launcher, so signals and exec failures are not reported
  exactly, and leftovers are reaped only by bwrap's own init): the floor a bwrap
  sandbox can reach;
* ``sandbox on``: ``Sandbox(True).run`` hiding a home and a workspace root, as a
  session runs a job's command.

Rows: the median time of one ``true`` (calls interleaved, so a busy spell on a shared
machine hurts all alike) and the throughput of ``cat`` of a 20 MB file. Ratios are
against ave.cmd.run (above 1.0: slower). Every loop is bounded in calls and seconds.

Run: ``.venv/bin/python bench/sandbox.py``
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from typing import Callable

import ave.cmd
from ave.sandbox import Sandbox, probe

from _common import render_table

Runner = Callable[[list[str]], tuple[int, str]]

ROUNDS, ROUND_SECONDS = 300, 60.0   # `true`: one call of each runner per round
CATS, CAT_SECONDS = 5, 30.0         # `cat`, per runner
LINE = 'x' * 99 + '\n'
FILE_BYTES = 20 * 1000 * 1000       # 20 MB in lines of 100 bytes


def bare_bwrap(workspace: str) -> list[str]:
    return ['bwrap', '--ro-bind', '/', '/', '--tmpfs', '/tmp', '--bind', workspace, workspace,
            '--dev', '/dev', '--proc', '/proc', '--unshare-pid', '--unshare-ipc',
            '--die-with-parent', '--cap-drop', 'ALL', '--']


def runners(directory: str) -> dict[str, Runner]:
    home, root = os.path.join(directory, 'home', '.ave'), os.path.join(directory, 'ws')
    os.makedirs(home)
    os.makedirs(os.path.join(root, 'mine'))
    isolated = Sandbox(True, hidden=[home, root])
    isolated.allow_write(os.path.join(root, 'mine'))
    plain = Sandbox(False)
    bare = bare_bwrap(os.path.join(root, 'mine'))
    return {'ave.cmd.run': ave.cmd.run,
            'sandbox off': plain.run,
            'bare bwrap': lambda argv: ave.cmd.run(bare + argv),
            'sandbox on': isolated.run}


def per_call_ms(runs: dict[str, Runner]) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run(['true'])  # warm up: imports, caches
    end = time.monotonic() + ROUND_SECONDS
    for _ in range(ROUNDS):
        for name, run in runs.items():
            start = time.perf_counter()
            run(['true'])
            samples[name].append(time.perf_counter() - start)
        if time.monotonic() >= end:
            break
    return {name: statistics.median(times) * 1000 for name, times in samples.items()}


def cat_mb_per_s(runs: dict[str, Runner], path: str) -> dict[str, float]:
    """Interleaved like the calls; a cat that fails (file not visible) is an error."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    end = time.monotonic() + CAT_SECONDS
    for _ in range(CATS):
        for name, run in runs.items():
            start = time.perf_counter()
            code, output = run(['cat', path])
            if code != 0:
                raise RuntimeError(f'{name}: cat failed: {output[:200]}')
            rates[name].append(FILE_BYTES / (time.perf_counter() - start) / 1e6)
        if time.monotonic() >= end:
            break
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    problem = probe()
    if problem is not None:
        sys.exit(f'no sandbox on this machine: {problem}')
    with tempfile.TemporaryDirectory(prefix='ave-bench-sandbox-') as directory:
        runs = runners(directory)
        path = os.path.join(directory, 'ws', 'mine', '20MB.txt')
        with open(path, 'w', encoding='ascii') as out:
            out.write(LINE * (FILE_BYTES // len(LINE)))
        calls = per_call_ms(runs)
        cats = cat_mb_per_s(runs, path)
    base_call, base_cat = calls['ave.cmd.run'], cats['ave.cmd.run']
    rows = [[name, f'{calls[name]:.2f}', f'{calls[name] / base_call:.2f}x',
             f'{cats[name]:.0f}', f'{base_cat / cats[name]:.2f}x'] for name in runs]
    print(render_table(['', "'true' median ms", 'vs ave.cmd.run', 'cat 20 MB MB/s',
                        'vs ave.cmd.run'], rows))
    print('\nratios: time taken relative to ave.cmd.run (above 1.0: slower)')


if __name__ == '__main__':
    main()
