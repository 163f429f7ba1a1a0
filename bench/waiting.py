"""Waiting for equipment: the fair queue next to poll-on-Busy clients and greedy orders.

Run from the repository root: ``.venv/bin/python bench/waiting.py [--quick]``.
(Not bench/queue.py: scripts run from bench/ have it first on sys.path, so that name
would stand in for the standard library's queue module in every benchmark.)

A simulation of the pure decision logic (``ave.broker.allocator`` and
``ave.broker.queue``) on a simulated clock, so hours of lab time run in seconds and
every run gives the same numbers. No broker, no sockets: what is measured is the
policy, not the code's speed.

The lab: 50 items. 20 handsets (12 of model a, 8 of model b), 20 relays and 10
serial consoles; the first 10 of each kind are wired as 10 stacks (handset, relay,
console), so taking one member of a stack makes the other two collateral.

The jobs (1,000 per run, fixed seeds): arrivals are a Poisson process; hold times are
log-normal (median 4 minutes, capped at an hour). Requests:
  size 1 (55 %): a handset by model, a pinned handset, a relay, a pinned relay, a console
  size 2 (30 %): a (handset, relay) stack, a handset by model with any relay, two
                 pinned relays
  size 3 (15 %): a (handset, relay, console) stack, a pinned handset with a pinned
                 relay and any console
The offered load is the requested item-seconds per second over the 50 items. Demand
gathers on the stacks and on model a, and a handset taken alone makes its relay and
console collateral, so this lab saturates near a load of 0.45 (about 45 % of
item-time held, whatever the policy); runs are made below that (0.3, 0.4) and above
it (0.85, 1.1), where the queue grows for the whole run.

The policies, all through the same Allocator:
* fair queue: ``WaitQueue`` as the broker will use it (every job waits, no limit).
* poll 1 s: a job that gets Busy asks again every second from its arrival, as
  labgrid's ``reserve --wait`` does; nothing is reserved and nobody is ahead of anyone.
* greedy FIFO / greedy small-first / greedy large-first: a queue that grants every
  waiter that fits whenever anything comes free, in that order, with no reservations:
  the orderings that keep equipment busiest, and the ones that starve large requests.

Measured per policy:
* utilisation: requested item-seconds / (50 items x time from first arrival to last
  release). Every policy runs the same jobs to completion, so this is throughput.
  "best" is the highest utilisation of all the policies run.
* waits (grant time - arrival): p50 / p99 / max overall and per size class.
* fair share: a job's fair wait is the work (item-seconds) still ahead of it when it
  arrives, if the 50 items served all jobs in arrival order as one perfectly divisible
  pool (a Lindley recursion), divided by 50, plus one median hold (the time any single
  item takes to come free). "worst / fair" is the largest wait / fair wait of any job.
* get calls per job: 1 for a queue; 1 + one per second waited for a poller.

Targets (for the fair queue): utilisation at least 95 % of the best; no job waits more
than 3 x the p50 wait of its size class. Each run prints whether they were met.
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from ave.broker.allocator import Allocator, Holder, Key
from ave.broker.exceptions import Busy
from ave.broker.queue import WaitQueue
from ave.equipment import EquipmentType
from ave.profile import Profile

from _common import percentile, render_table

ITEMS = 50
JOBS = 1000
MEDIAN_HOLD = 240.0
HOLD_SIGMA = 0.8
MAX_HOLD = 3600.0
LOADS = (0.3, 0.4, 0.85, 1.1)
SEEDS = (1, 2, 3)
POLL_INTERVAL = 1.0
UTILISATION_TARGET = 0.95
TAIL_TARGET = 3.0


class SerialProfile(Profile):
    identity = 'serial'


class UidProfile(Profile):
    identity = 'uid'


class HandsetType(EquipmentType):
    name = 'handset'
    profile_class = SerialProfile


class RelayType(EquipmentType):
    name = 'relay'
    profile_class = UidProfile


class ConsoleType(EquipmentType):
    name = 'serial'
    profile_class = UidProfile


TYPES: dict[str, EquipmentType] = {'handset': HandsetType(), 'relay': RelayType(),
                                   'serial': ConsoleType()}


def handset(i: int) -> dict:
    return {'type': 'handset', 'serial': f'h{i:02}', 'model': 'a' if i <= 12 else 'b'}


def relay(i: int) -> dict:
    return {'type': 'relay', 'uid': f'r{i:02}'}


def console(i: int) -> dict:
    return {'type': 'serial', 'uid': f's{i:02}'}


def make_lab() -> Allocator:
    stacks = [[{'type': 'handset', 'serial': f'h{i:02}'}, {'type': 'relay', 'uid': f'r{i:02}'},
               {'type': 'serial', 'uid': f's{i:02}'}] for i in range(1, 11)]
    allocator = Allocator(TYPES, stacks)
    for profile in ([handset(i) for i in range(1, 21)] + [relay(i) for i in range(1, 21)]
                    + [console(i) for i in range(1, 11)]):
        allocator.add(profile)
    assert len(allocator.items) == ITEMS
    return allocator


# -- the workload ----------------------------------------------------------------------

@dataclass
class Job:
    index: int
    arrival: float
    hold: float
    request: list
    size: int
    relevant: frozenset[Key] = frozenset()  # items whose release could let it start


def random_request(rng: random.Random) -> list:
    model = {'type': 'handset', 'model': rng.choice('aab')}
    pinned_handset = {'type': 'handset', 'serial': f'h{rng.randint(1, 20):02}'}
    any_relay, any_console = {'type': 'relay'}, {'type': 'serial'}
    kinds: list[tuple[float, Callable[[], list]]] = [
        (0.25, lambda: [model]),
        (0.10, lambda: [pinned_handset]),
        (0.10, lambda: [any_relay]),
        (0.05, lambda: [{'type': 'relay', 'uid': f'r{rng.randint(1, 20):02}'}]),
        (0.05, lambda: [any_console]),
        (0.15, lambda: [[{'type': 'handset'}, any_relay]]),
        (0.10, lambda: [model, any_relay]),
        (0.05, lambda: [{'type': 'relay', 'uid': f'r{i:02}'}
                        for i in rng.sample(range(1, 21), 2)]),
        (0.10, lambda: [[{'type': 'handset'}, any_relay, any_console]]),
        (0.05, lambda: [pinned_handset, {'type': 'relay', 'uid': f'r{rng.randint(1, 20):02}'},
                        any_console]),
    ]
    roll = rng.random()
    for weight, build in kinds:
        if roll < weight:
            return build()
        roll -= weight
    return kinds[-1][1]()


def size_of(request: list) -> int:
    return sum(len(entry) if isinstance(entry, list) else 1 for entry in request)


def make_jobs(seed: int, load: float, count: int) -> list[Job]:
    rng = random.Random(seed)
    drafts = []
    for _ in range(count):
        request = random_request(rng)
        hold = min(MAX_HOLD, rng.lognormvariate(math.log(MEDIAN_HOLD), HOLD_SIGMA))
        drafts.append((request, hold))
    mean_work = statistics.fmean(size_of(r) * h for r, h in drafts)
    rate = load * ITEMS / mean_work
    jobs, now = [], 0.0
    for index, (request, hold) in enumerate(drafts):
        now += rng.expovariate(rate)
        jobs.append(Job(index, now, hold, request, size_of(request)))
    lab = make_lab()
    for job in jobs:
        job.relevant = relevant_items(lab, job.request)
    return jobs


def relevant_items(lab: Allocator, request: list) -> frozenset[Key]:
    """Items matching a profile of ``request``, and the members of their stacks (their
    release ends a collateral block)."""
    wanted = [member for entry in request
              for member in (entry if isinstance(entry, list) else [entry])]
    matching = {key for key, item in lab.items.items()
                if any(item.profile.match(w) for w in wanted)}
    mates = {key for key, item in lab.items.items() for stack in lab.stacks
             if any(item.profile.match(m) for m in stack)
             and any(lab.items[k].profile.match(m) for k in matching for m in stack)}
    return frozenset(matching | mates)


# -- the policies ------------------------------------------------------------------------

Timer = Callable[[float, Job], None]


class FairQueue:
    """The broker's way: a job Busy at once waits in the WaitQueue."""

    name = 'fair queue'

    def __init__(self, jobs: list[Job]) -> None:
        self.allocator = make_lab()
        self.queue = WaitQueue()
        self.jobs: dict[Holder, Job] = {job.index: job for job in jobs}

    def arrive(self, job: Job, now: float, timer: Timer) -> list[Job]:
        try:
            self.queue.allocate_now(self.allocator, job.index, job.request, now)
            return [job]
        except Busy:
            self.queue.add(job.index, job.request, now, wait=None)
            return self._schedule(now)

    def release(self, job: Job, now: float, timer: Timer) -> list[Job]:
        release_all(self.allocator, job)
        return self._schedule(now)

    def retry(self, job: Job, now: float, timer: Timer) -> list[Job]:
        raise AssertionError('the queue sets no timers')

    def _schedule(self, now: float) -> list[Job]:
        return [self.jobs[g.waiter.holder] for g in self.queue.schedule(self.allocator, now)]


class Greedy:
    """Whatever fits goes, in the given order; nothing is reserved."""

    def __init__(self, jobs: list[Job], name: str, order: Callable[[Job], tuple]) -> None:
        self.name = name
        self.order = order
        self.allocator = make_lab()
        self.waiting: list[Job] = []

    def arrive(self, job: Job, now: float, timer: Timer) -> list[Job]:
        if self.allocator.try_allocate(job.index, job.request, now) is not None:
            return [job]
        self.waiting.append(job)
        self.waiting.sort(key=self.order)
        return []

    def release(self, job: Job, now: float, timer: Timer) -> list[Job]:
        release_all(self.allocator, job)
        granted = [waiter for waiter in self.waiting if waiter.relevant & job.relevant
                   and self.allocator.try_allocate(waiter.index, waiter.request, now)
                   is not None]
        self.waiting = [waiter for waiter in self.waiting if waiter not in granted]
        return granted

    def retry(self, job: Job, now: float, timer: Timer) -> list[Job]:
        raise AssertionError('greedy orders set no timers')


class Poll:
    """Busy clients ask again every POLL_INTERVAL seconds, counted from their arrival.

    A retry can only succeed after a release it could use, so only those releases set
    a client's next retry (the same outcome as retrying every second, far cheaper).
    """

    name = 'poll 1 s'

    def __init__(self, jobs: list[Job]) -> None:
        self.allocator = make_lab()
        self.polling: set[int] = set()
        self.pending: set[int] = set()
        self.jobs = {job.index: job for job in jobs}

    def arrive(self, job: Job, now: float, timer: Timer) -> list[Job]:
        if self.allocator.try_allocate(job.index, job.request, now) is not None:
            return [job]
        self.polling.add(job.index)
        return []

    def release(self, job: Job, now: float, timer: Timer) -> list[Job]:
        release_all(self.allocator, job)
        for index in sorted(self.polling - self.pending):
            poller = self.jobs[index]
            if poller.relevant & job.relevant:
                ticks = math.floor((now - poller.arrival) / POLL_INTERVAL) + 1
                timer(poller.arrival + ticks * POLL_INTERVAL, poller)
                self.pending.add(index)
        return []

    def retry(self, job: Job, now: float, timer: Timer) -> list[Job]:
        self.pending.discard(job.index)
        if self.allocator.try_allocate(job.index, job.request, now) is None:
            return []
        self.polling.discard(job.index)
        return [job]


def release_all(allocator: Allocator, job: Job) -> None:
    for key in allocator.held_by(job.index):
        allocator.begin_release(key)
        allocator.finish_release(key, clean=True)


# -- the simulation ----------------------------------------------------------------------

RELEASE, ARRIVE, RETRY = 0, 1, 2  # the order of events at the same instant


@dataclass
class Outcome:
    name: str
    jobs: list[Job]
    granted: dict[int, float] = field(default_factory=dict)
    end: float = 0.0
    seconds: float = 0.0

    def wait(self, job: Job) -> float:
        return self.granted[job.index] - job.arrival


def simulate(jobs: list[Job], policy: FairQueue | Greedy | Poll) -> Outcome:
    outcome = Outcome(policy.name, jobs)
    events: list[tuple[float, int, int, Job]] = []
    sequence = 0

    def push(when: float, kind: int, job: Job) -> None:
        nonlocal sequence
        sequence += 1
        heapq.heappush(events, (when, kind, sequence, job))

    def timer(when: float, job: Job) -> None:
        push(when, RETRY, job)

    for job in jobs:
        push(job.arrival, ARRIVE, job)
    started = time.perf_counter()
    handlers = {ARRIVE: policy.arrive, RELEASE: policy.release, RETRY: policy.retry}
    while events:
        now, kind, _, job = heapq.heappop(events)
        for granted in handlers[kind](job, now, timer):
            outcome.granted[granted.index] = now
            push(now + granted.hold, RELEASE, granted)
        outcome.end = now
    outcome.seconds = time.perf_counter() - started
    missing = [job.index for job in jobs if job.index not in outcome.granted]
    if missing:
        raise RuntimeError(f'{policy.name}: {len(missing)} jobs never started')
    return outcome


# -- measurements ------------------------------------------------------------------------

def utilisation(outcome: Outcome) -> float:
    work = sum(job.size * job.hold for job in outcome.jobs)
    return work / (ITEMS * (outcome.end - outcome.jobs[0].arrival))


def fair_waits(jobs: list[Job]) -> dict[int, float]:
    """Each job's fair wait: work ahead of it in a perfectly divisible FIFO pool of all
    items (Lindley's recursion), spread over the items, plus one median hold."""
    fair, backlog, last = {}, 0.0, jobs[0].arrival
    for job in jobs:
        backlog = max(0.0, backlog - ITEMS * (job.arrival - last))
        fair[job.index] = backlog / ITEMS + MEDIAN_HOLD
        backlog += job.size * job.hold
        last = job.arrival
    return fair


def wait_cells(waits: list[float]) -> str:
    return (f'{percentile(waits, 0.5):.0f} / {percentile(waits, 0.99):.0f} / '
            f'{max(waits):.0f}')


def tail_cell(waits: list[float]) -> str:
    median = percentile(waits, 0.5)
    return 'p50 = 0' if median == 0 else f'{max(waits) / median:.1f}'


def get_calls(name: str, wait: float) -> float:
    return 1 + math.ceil(wait / POLL_INTERVAL) if name == Poll.name else 1


@dataclass
class Verdicts:
    met: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)

    def judge(self, ok: bool, line: str) -> None:
        (self.met if ok else self.missed).append(line)


def report(load: float, runs: dict[str, list[Outcome]], verdicts: Verdicts) -> None:
    """Print one load's table and judge the fair queue against the targets."""
    names = list(runs)
    fair = [fair_waits(outcome.jobs) for outcome in runs[names[0]]]

    def waits(name: str, size: int | None = None) -> list[float]:
        return [outcome.wait(job) for outcome in runs[name] for job in outcome.jobs
                if size is None or job.size == size]

    def worst_over_fair(name: str) -> float:
        return max(outcome.wait(job) / fair[run][job.index]
                   for run, outcome in enumerate(runs[name]) for job in outcome.jobs)

    used = {name: statistics.fmean(utilisation(o) for o in runs[name]) for name in names}
    best = max(used.values())
    rows = [['utilisation'] + [f'{used[n]:.3f}' for n in names],
            ['  / best'] + [f'{used[n] / best:.3f}' for n in names],
            ['wait p50/p99/max s'] + [wait_cells(waits(n)) for n in names]]
    for size in (1, 2, 3):
        rows.append([f'  size {size}'] + [wait_cells(waits(n, size)) for n in names])
        rows.append([f'  size {size}: max / p50'] + [tail_cell(waits(n, size)) for n in names])
    rows.append(['worst wait / fair'] + [f'{worst_over_fair(n):.1f}' for n in names])
    rows.append(['get calls per job'] + [
        f'{statistics.fmean(get_calls(n, w) for w in waits(n)):.1f}' for n in names])
    rows.append(['cpu s per run'] + [
        f'{statistics.fmean(o.seconds for o in runs[n]):.1f}' for n in names])
    count, seeds = len(runs[names[0]][0].jobs), len(runs[names[0]])
    title = f'offered load {load} ({count} jobs x {seeds} seeds, {ITEMS} items)'
    print(f'\n{title}\n')
    print(render_table(['', *names], rows))
    longest = sorted(((o.wait(j), j) for o in runs[FairQueue.name] for j in o.jobs),
                     key=lambda pair: -pair[0])[:3]
    print('longest fair-queue waits: ' + '; '.join(
        f'{wait:.0f} s for {json.dumps(job.request)}' for wait, job in longest))
    share = used[FairQueue.name] / best
    verdicts.judge(share >= UTILISATION_TARGET,
                   f'load {load}: fair queue utilisation is {share:.3f} of the best')
    for size in (1, 2, 3):
        sample = waits(FairQueue.name, size)
        median, worst = percentile(sample, 0.5), max(sample)
        waited = [w for w in sample if w > 0]
        line = (f'load {load}: size {size}: max wait {worst:.0f} s, '
                f'3 x p50 = {3 * median:.0f} s')
        if waited and median == 0:
            spread = max(waited) / percentile(waited, 0.5)
            line += (f' (p50 is 0: {len(sample) - len(waited)} of {len(sample)} did not '
                     f'wait; of those that did, max = {spread:.1f} x their p50)')
        verdicts.judge(worst <= TAIL_TARGET * median, line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true',
                        help='one seed and 300 jobs per load, for a smoke run')
    args = parser.parse_args()
    seeds = SEEDS[:1] if args.quick else SEEDS
    count = 300 if args.quick else JOBS
    verdicts = Verdicts()
    for load in LOADS:
        runs: dict[str, list[Outcome]] = {}
        for seed in seeds:
            jobs = make_jobs(seed, load, count)
            policies: list[FairQueue | Greedy | Poll] = [
                FairQueue(jobs), Poll(jobs),
                Greedy(jobs, 'greedy FIFO', lambda j: (j.arrival,)),
                Greedy(jobs, 'greedy small-first', lambda j: (j.size, j.arrival)),
                Greedy(jobs, 'greedy large-first', lambda j: (-j.size, j.arrival))]
            for policy in policies:
                runs.setdefault(policy.name, []).append(simulate(jobs, policy))
        report(load, runs, verdicts)
    print('\nTargets met:')
    print('\n'.join(f'  {line}' for line in verdicts.met) or '  none')
    print('Targets NOT met:')
    print('\n'.join(f'  {line}' for line in verdicts.missed) or '  none')
    return 0


if __name__ == '__main__':
    sys.exit(main())
