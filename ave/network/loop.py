"""The event loop under every AVE service: one thread, one selector, nothing that waits.

``EventLoop`` knows nothing about RPC. It watches descriptors whose registered object
carries a ``state`` naming the handler that deals with it, runs timers, reaps child
processes through their pidfds, and wakes up for signals and for work finished in
worker threads. ``Control`` builds the RPC service on top of it.
"""
from __future__ import annotations

import heapq
import itertools
import logging as logginglib
import os
import selectors
import signal
import socket as socketlib
import threading
import time
from collections import deque
# Imported here, not on first use (``concurrent.futures`` loads it lazily): a forked
# child (a broker's session) then finds it loaded instead of importing it again.
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, Protocol

from ave.exceptions import AveException, Exit
from ave.network.process import Process

#: Worker threads one loop runs at most for ``run_in_thread``; more calls wait.
MAX_WORKERS = 64
#: Cancelled timers the heap may hold before they are all dropped at once (when they
#: are also most of it).
COMPACT_CANCELLED = 256

JOINING = 'joining'
WAKING = 'waking'

log = logginglib.getLogger(__name__)


class Outcome(Protocol):
    """Where the result of work done in a thread goes (``ave.network.rpc.Reply``)."""

    def result(self, value: Any = None) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class _Joining:
    __slots__ = ('process', 'pidfd', 'state')

    def __init__(self, process: Process, pidfd: int) -> None:
        self.process = process
        self.pidfd = pidfd
        self.state: str | None = JOINING


class _Waker:
    """A socket pair whose write end signal handlers and worker threads poke."""

    __slots__ = ('receiver', 'sender', 'state')

    def __init__(self) -> None:
        self.receiver, self.sender = socketlib.socketpair()
        self.receiver.setblocking(False)
        self.sender.setblocking(False)
        self.state = WAKING

    def poke(self) -> None:
        try:
            self.sender.send(b'\0')
        except OSError:
            pass  # full or closing: the loop is awake or going away either way

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self.receiver.close()
        self.sender.close()


class EventLoop(Process):
    """A Process whose ``run()`` steps a selector loop until ``shutdown()``."""

    def __init__(self, interval: float | None = None, logging: bool = False,
                 proc_name: str | None = None) -> None:
        super().__init__(logging=logging, proc_name=proc_name)
        self.interval = interval
        self.keep_going = True
        self._selector: selectors.BaseSelector | None = None
        self._timers: list[list] = []  # heap of [deadline, order, function or None]
        self._cancelled = 0  # timers in the heap whose function is None
        self._timer_order = itertools.count()
        self._last_activity = time.monotonic()
        self._waker: _Waker | None = None
        self._from_threads: deque[Callable[[], Any]] = deque()
        self._workers: ThreadPoolExecutor | None = None
        self._working = 0  # functions given to run_in_thread that have not returned
        self._work_done = threading.Condition()
        self._terminating = False
        self._handlers: dict[str, Callable[[Any, int], None]] = {
            JOINING: self._on_joining, WAKING: self._on_waking}

    @property
    def selector(self) -> selectors.BaseSelector:
        """The loop's selector, for services that watch descriptors of their own."""
        return self._loop()

    def add_handler(self, state: str, handler: Callable[[Any, int], None]) -> None:
        """Dispatch events of registered objects whose ``state`` is ``state`` to
        ``handler(item, mask)``."""
        if state in self._handlers:
            raise ValueError(f'a handler for {state!r} exists already')
        self._handlers[state] = handler

    # -- hooks for subclasses ----------------------------------------------------------

    def joined_process(self, pid: int, exit: int | None) -> None:
        """Called when a process handed to ``join_later`` has been reaped."""

    def idle(self) -> None:
        """Called after ``interval`` seconds without any traffic."""

    def _selector_made(self, selector: selectors.BaseSelector) -> None:
        """Register what must be watched from the start (a Control's listener)."""

    def shutdown(self, details: dict | str | None = None) -> None:
        """Leave the main loop, releasing what the loop itself holds."""
        if not self.keep_going:
            return
        self.keep_going = False
        self._close_loop()

    # -- running -----------------------------------------------------------------------

    def initialize(self) -> None:
        super().initialize()
        self._waker = _Waker()
        signal.set_wakeup_fd(self._waker.sender.fileno(), warn_on_full_buffer=False)
        self._loop().register(self._waker.receiver.fileno(), selectors.EVENT_READ,
                              self._waker)

    def handle_SIGTERM(self, signum: int, frame: Any) -> None:
        """Ask the loop for an orderly shutdown; the wake-up socket interrupts its wait."""
        self._terminating = True

    def run(self) -> None:
        """The service's main loop: step until shut down (exit status 0)."""
        while self.keep_going:
            self.step_main()

    def step_main(self, timeout: float | None = None) -> None:
        """Wait for traffic (at most ``timeout`` s) and dispatch all of it once.

        Public so that tests can drive a service in-process, deterministically.
        """
        if not self.keep_going:
            raise Exit('the service has shut down')
        events = self._loop().select(self._wait_time(timeout))
        for key, mask in events:
            if not self.keep_going:
                return  # a handler shut the service down: the rest of the batch is moot
            item = key.data
            handler = self._handlers.get(item.state)
            if handler is not None:
                handler(item, mask)
        if self._from_threads:
            self._run_from_threads()
        now = time.monotonic()
        if events:
            self._last_activity = now
        if self._timers and self._timers[0][0] <= now:
            self._run_due_timers(now)
        if self._terminating and self.keep_going:
            self.shutdown()
        elif self.interval is not None and now - self._last_activity >= self.interval:
            self._last_activity = now
            self._call_hook(self.idle)

    def _loop(self) -> selectors.BaseSelector:
        """The selector, made on first use so that a forked child gets its own."""
        if self._selector is None:
            self._selector = selectors.DefaultSelector()
            self._selector_made(self._selector)
        return self._selector

    def _wait_time(self, timeout: float | None) -> float | None:
        """How long the selector may wait: until the first timer, the idle hook or
        ``timeout``, whichever comes first; not at all with work from threads queued."""
        if self._from_threads:
            return 0.0
        timers = self._timers
        while timers and timers[0][2] is None:
            heapq.heappop(timers)  # cancelled
            self._cancelled -= 1
        soonest = timers[0][0] if timers else None
        if self.interval is not None:
            idle_at = self._last_activity + self.interval
            soonest = idle_at if soonest is None else min(soonest, idle_at)
        if soonest is None:
            return timeout
        wait = max(0.0, soonest - time.monotonic())
        return wait if timeout is None else min(wait, timeout)

    def call_later(self, delay: float, function: Callable[[], Any]) -> list:
        """Run ``function`` from the loop after ``delay`` seconds (never earlier); the
        returned handle can be given to ``cancel``."""
        timer = [time.monotonic() + delay, next(self._timer_order), function]
        heapq.heappush(self._timers, timer)
        return timer

    def cancel(self, timer: list) -> None:
        """Forget a ``call_later`` that has not run yet. It leaves the heap lazily, or
        all at once when cancelled timers are most of it: a crowd of handshakes that
        each cancel their expiry must not keep memory for ``handshake_s``."""
        if timer[2] is None:
            return
        timer[2] = None
        self._cancelled += 1
        if self._cancelled > COMPACT_CANCELLED and self._cancelled * 2 > len(self._timers):
            self._timers = [timer for timer in self._timers if timer[2] is not None]
            heapq.heapify(self._timers)
            self._cancelled = 0

    def _run_due_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now and self.keep_going:
            timer = heapq.heappop(self._timers)
            function, timer[2] = timer[2], None  # a later cancel() finds it done
            if function is None:
                self._cancelled -= 1
            else:
                self._call_hook(function)

    def _call_hook(self, hook: Callable, *args: Any) -> None:
        """Run a subclass hook; its failure is logged and never stops the service."""
        try:
            hook(*args)
        except Exception:
            log.exception('%s failed', getattr(hook, '__name__', hook))

    # -- work off the loop -------------------------------------------------------------

    def call_soon_threadsafe(self, function: Callable[[], Any]) -> None:
        """Run ``function`` on the loop's thread at its next step; any thread may call."""
        self._from_threads.append(function)
        if self._waker is not None:
            self._waker.poke()

    def run_in_thread(self, function: Callable[[], Any], outcome: Outcome) -> None:
        """Run ``function`` in a worker thread; its result or exception goes to
        ``outcome`` on the loop's thread. The loop goes on serving meanwhile."""
        if self._workers is None:
            self._workers = ThreadPoolExecutor(
                MAX_WORKERS, thread_name_prefix=self.proc_name or 'ave-worker')

        def work() -> None:
            try:
                done = partial(outcome.result, function())
            except BaseException as error:  # the caller must hear of anything at all
                done = partial(outcome.fail, error)
            try:
                self.call_soon_threadsafe(done)
            finally:  # idle only once the outcome is queued: see threads_idle()
                with self._work_done:
                    self._working -= 1
                    self._work_done.notify_all()
        with self._work_done:
            self._working += 1
        self._workers.submit(work)

    def threads_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no function given to ``run_in_thread``
        is still running or waiting for a thread, then run the outcomes they queued;
        True if none is left."""
        with self._work_done:
            idle = self._work_done.wait_for(lambda: self._working == 0, timeout)
        if idle:
            self._run_from_threads()
        return idle

    def _run_from_threads(self) -> None:
        while self._from_threads and self.keep_going:
            self._call_hook(self._from_threads.popleft())

    def _on_waking(self, item: _Waker, mask: int) -> None:
        try:
            item.receiver.recv(4096)
        except (BlockingIOError, InterruptedError):
            pass  # nothing queued: a signal handler already set its flag

    # -- processes ---------------------------------------------------------------------

    def join_later(self, process: Process) -> None:
        """Reap ``process`` from the loop when it ends, then call ``joined_process``."""
        assert process.pid is not None
        try:
            pidfd = os.pidfd_open(process.pid)
        except ProcessLookupError:
            self._finish_join(process)
            return
        self._loop().register(pidfd, selectors.EVENT_READ, _Joining(process, pidfd))

    def _on_joining(self, item: _Joining, mask: int) -> None:
        self._loop().unregister(item.pidfd)
        os.close(item.pidfd)
        item.state = None
        self._finish_join(item.process)

    def _finish_join(self, process: Process) -> None:
        try:
            code = process.join(0)
        except (AveException, OSError) as error:
            self.log(f'could not join process {process.pid}: {error}')
            return
        self._call_hook(self.joined_process, process.pid, code)

    # -- the end -----------------------------------------------------------------------

    def _close_loop(self) -> None:
        """Close what only the loop holds: pidfds, the wake-up socket, the selector."""
        if self._workers is not None:
            self._workers.shutdown(wait=False, cancel_futures=True)
        if self._selector is None:
            return
        for key in list(self._selector.get_map().values()):
            if isinstance(key.data, _Joining):
                os.close(key.data.pidfd)
            elif isinstance(key.data, _Waker):
                key.data.close()
        self._selector.close()
