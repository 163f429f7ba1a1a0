"""The restart handover: a running broker passes everything it serves to its successor.

The successor listens on an FdTx socket in the home's .ave directory and sends the
running broker SIGHUP. At its next step boundary the running broker connects and sends
its state (JSON, in chunks that fit a datagram) and every descriptor it serves, in
batches. The successor adopts them and answers ``commit``; only then does the old
broker answer ``bye`` and exit, without a word to its clients. Until ``commit`` the old
broker owns everything: if anything fails or times out, it simply serves on, and a
successor that never hears ``bye`` gives up, unless the old broker is dead by then
(it then serves what it adopted). So at no moment do two brokers serve.

Either broker may be killed at any step; ``ave.broker.takeover`` says what follows.
Tests stop a broker at a named step (``checkpoint``) to kill it exactly there.
"""
from __future__ import annotations

import json
import os
import select
import signal

from ave.network.fdtx import FdTx

CHUNK = 128 * 1024
FD_BATCH = 250
COMMIT = 'commit'
BYE = 'bye'
HANDOVER_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0

#: For tests of crash safety only: a process whose environment names a step here
#: stops itself (SIGSTOP) when it reaches that step, for the test to SIGKILL it.
HALT_VARIABLE = 'AVE_TEST_HALT_AT'
#: The steps, in order: the old broker's, then the successor's.
STEPS = ('old-connected', 'old-sent', 'old-committed',
         'new-received', 'new-adopted', 'new-committed')


def checkpoint(step: str) -> None:
    """Mark a step of the handover (see HALT_VARIABLE)."""
    if os.environ.get(HALT_VARIABLE) == step:
        os.kill(os.getpid(), signal.SIGSTOP)


class HandoverError(Exception):
    """The handover did not complete; whoever sees this keeps (or never takes) control."""


def socket_path(home: str) -> str:
    return os.path.join(home, '.ave', 'handover.sock')


def listen(home: str) -> FdTx:
    """Open the successor's end; a stale socket file of a crashed restart is replaced."""
    path = socket_path(home)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # the usual case: no restart crashed here before
    tx = FdTx()
    tx.listen(os.path.dirname(path), os.path.basename(path))
    return tx


def send(tx: FdTx, state: dict, fds: list[int]) -> None:
    """Old broker: the state, then the descriptors, each in pieces FdTx can carry."""
    text = json.dumps(state)
    chunks = [text[i:i + CHUNK] for i in range(0, len(text), CHUNK)] or ['']
    batches = [fds[i:i + FD_BATCH] for i in range(0, len(fds), FD_BATCH)]
    tx.put(json.dumps({'chunks': len(chunks), 'batches': len(batches), 'fds': len(fds)}))
    for chunk in chunks:
        tx.put(chunk)
    for batch in batches:
        tx.put('fds', *batch)


def receive(tx: FdTx) -> tuple[dict, list[int]]:
    """Successor: everything ``send`` sent, with the descriptors in the same order.

    If the old broker dies or stalls midway, the descriptors received so far are
    closed: kept open, they would hide from clients and sessions that their broker
    is gone.
    """
    await_message(tx, HANDOVER_TIMEOUT)
    header = json.loads(tx.get(4096, 0)[0])
    fds: list[int] = []
    try:
        chunks = []
        for _ in range(header['chunks']):
            await_message(tx, HANDOVER_TIMEOUT)
            chunks.append(tx.get(CHUNK * 4 + 16, 0)[0])
        for _ in range(header['batches']):
            await_message(tx, HANDOVER_TIMEOUT)
            fds.extend(tx.get(16, FD_BATCH)[1])
        if len(fds) != header['fds']:
            raise HandoverError(f'expected {header["fds"]} descriptors, got {len(fds)}')
        return json.loads(''.join(chunks)), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def await_message(tx: FdTx, timeout: float) -> None:
    """Wait until the peer sent something (or hung up); HandoverError on time-out."""
    poller = select.poll()
    poller.register(tx.fileno(), select.POLLIN)
    if not poller.poll(timeout * 1000):
        raise HandoverError(f'the other broker sent nothing for {timeout} s')


def await_word(tx: FdTx, word: str, timeout: float) -> None:
    """Wait for the other side's ``commit`` or ``bye``; anything else is a failure."""
    poller = select.poll()
    poller.register(tx.fileno(), select.POLLIN)
    if not poller.poll(timeout * 1000):
        raise HandoverError(f'no {word!r} within {timeout} s')
    got = tx.get(64, 0)[0]
    if got != word:
        raise HandoverError(f'expected {word!r}, got {got!r}')
