"""Fixtures for ``ave`` tests: real brokers (tests/broker/conftest.py's fixtures) and
the real command, run as a lab user runs it.

    def test_something(lab, ave):
        result = ave('list', '--all')              # CompletedProcess, --home added
        holder = ave.start('hold', 'relay,uid=r1')  # Running, killed at teardown
        assert holder.line() == 'holding relay r1'

``lab`` is a started broker with relays r1 and r2, whose circuit commands write
their state to ``lab.state/<uid>.<circuit>``. Every command gets ``--home`` of the
lab (``ave.plain(...)`` runs it without), ``stdin`` from /dev/null unless told
otherwise, and a timeout.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from broker.conftest import BrokerHome, broker, broker_home, start_broker  # noqa: F401

AVE = [sys.executable, '-m', 'ave.cli']
TIMEOUT = 30.0


def relay(uid: str, state_dir: Any, circuits: tuple[str, ...] = ('c1',),
          pretty: str | None = None) -> dict:
    """A relay whose circuit commands record their state in files the test reads."""
    entry: dict[str, Any] = {'type': 'relay', 'uid': uid, 'circuits': {
        name: {'open': ['sh', '-c', f'echo open > {state_dir}/{uid}.{name}'],
               'close': ['sh', '-c', f'echo closed > {state_dir}/{uid}.{name}'],
               'default': 'open'}
        for name in circuits}}
    if pretty is not None:
        entry['pretty'] = pretty
    return entry


class Ave:
    """Runs ``ave`` against one home; owns every process it starts."""

    def __init__(self, home: str) -> None:
        self.home = home
        self.started: list[Running] = []

    def __call__(self, *args: str, input: str | None = None, env: dict | None = None,
                 timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        return self.plain(*_with_home(args, self.home), input=input, env=env,
                          timeout=timeout)

    def plain(self, *args: str, input: str | None = None, env: dict | None = None,
              timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        """``ave ARGS`` exactly as given (no --home added)."""
        return subprocess.run([*AVE, *args], capture_output=True, text=True, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL,
                              env=env, timeout=timeout)

    def start(self, *args: str, home: bool = True, **kwargs: Any) -> Running:
        """``ave ARGS --home HOME`` in the background; killed and reaped at teardown."""
        words = [*AVE, *(_with_home(args, self.home) if home else args)]
        running = Running(words, **kwargs)
        self.started.append(running)
        return running

    def cleanup(self) -> None:
        for running in self.started:
            running.kill()


class Running:
    """A command in the background whose stdout is read line by line as it comes.

    stdout and stderr are unbuffered byte pipes; stdin is /dev/null unless
    ``stdin=subprocess.PIPE`` is given (then ``send`` writes to it).
    """

    def __init__(self, words: list[str], **kwargs: Any) -> None:
        options = {'stdin': subprocess.DEVNULL, 'stdout': subprocess.PIPE,
                   'stderr': subprocess.PIPE, 'bufsize': 0, **kwargs}
        self.process = subprocess.Popen(words, **options)
        self.pid = self.process.pid
        self._out = b''

    def line(self, timeout: float = TIMEOUT) -> str:
        """The next line of stdout, or what came of it when ``timeout`` runs out."""
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b'\n' not in self._out:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._out += chunk
        line, _, self._out = self._out.partition(b'\n')
        return line.decode()

    def send(self, text: str) -> None:
        self.process.stdin.write(text.encode())

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def finish(self, timeout: float = TIMEOUT) -> tuple[int, str, str]:
        """Close stdin and wait for the end; the exit status, the rest of stdout, and
        stderr."""
        if self.process.stdin is not None:
            self.process.stdin.close()
            self.process.stdin = None
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, (self._out + out).decode(), err.decode()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(TIMEOUT)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def _with_home(args: tuple[str, ...], home: str) -> list[str]:
    """``ARGS --home HOME``, the option before ``--`` (ave run's command) if any."""
    words = list(args)
    cut = words.index('--') if '--' in words else len(words)
    return [*words[:cut], '--home', home, *words[cut:]]


@pytest.fixture
def lab(start_broker, tmp_path) -> BrokerHome:
    """A broker with relays r1 (two circuits, named "bench 1") and r2."""
    state = tmp_path / 'state'
    state.mkdir()
    started = start_broker(equipment=[relay('r1', state, ('c1', 'c2'), pretty='bench 1'),
                                      relay('r2', state)])
    started.state = state
    return started


@pytest.fixture
def ave_for():
    """Factory: ``ave_for(home) -> Ave`` for a home other than the lab's."""
    runners: list[Ave] = []

    def make(home: str) -> Ave:
        runners.append(Ave(home))
        return runners[-1]
    yield make
    for runner in runners:
        runner.cleanup()


@pytest.fixture
def ave(lab, ave_for):
    return ave_for(lab.home)


def environment(**changes: str) -> dict:
    """This process's environment with ``changes``."""
    return {**os.environ, **changes}
