"""``ave-broker --restart`` on the broker's side: handing everything over, taking over.

The transport (an FdTx socket, chunks, the commit and bye words) is
``ave.broker.handover``'s; this module decides what a broker's state is. The running
broker exports its listener, every peer (with half-read input and unsent output), the
client and session model (``BrokerState.export``) and every item's allocation state.
The successor adopts all of it, does everything that could still fail, and only then
commits; the old broker then exits without a word to anyone.

Either broker may be killed at any step, and no job may notice more than a pause:

* the old one, before it sent everything: the successor gives up at once (it watches
  the old broker's pid), closing whatever it received, and exits; sessions and
  clients see their broker gone, as after any crash, and the next broker started on
  the home adopts them (``ave-broker --restart`` starts one itself when it finds no
  broker running after its successor failed);
* the old one, after it sent everything: the successor has adopted it all and,
  finding the old broker dead instead of hearing ``bye``, serves it;
* the successor, before its ``commit``: the old broker hears it hang up and serves on;
* the successor, after its ``commit``: the old broker has let go and exits too, so
  sessions and clients are orphaned, and the next start adopts them.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import socket as socketlib
from typing import TYPE_CHECKING, Callable

from ave.broker import handover, systemd
from ave.broker.exceptions import NoSuch
from ave.broker.sessions import adopt_process
from ave.broker.state import BrokerState
from ave.exceptions import AveException, Timeout
from ave.network.exceptions import ConnectionClosed
from ave.network.fdtx import FdTx

if TYPE_CHECKING:
    from ave.broker.server import BrokerServer

log = logging.getLogger(__name__)


def hand_over(server: BrokerServer) -> None:
    """Send state and descriptors to the successor; exit once it has committed.

    Any failure before the commit leaves this broker serving as if nothing had
    happened: nothing was closed or changed while the state was exported. The
    successor must already be listening: the attempt to reach it is made once,
    without waiting, so a stray SIGHUP costs the loop nothing.
    """
    tx = FdTx()
    try:
        tx.connect(handover.socket_path(server.home), 0)
    except (OSError, AveException, ConnectionClosed) as error:
        log.warning('SIGHUP, but no successor waits for a handover (%s); serving on',
                    error)
        tx.close()
        return
    server.keeper.drop_spares()  # the successor makes its own; this one is no session
    try:
        handover.checkpoint('old-connected')
        handover.send(tx, *export_state(server))
        handover.checkpoint('old-sent')
        handover.await_word(tx, handover.COMMIT, handover.HANDOVER_TIMEOUT)
        handover.checkpoint('old-committed')
        tx.put(handover.BYE)
    except (AveException, OSError, ValueError, handover.HandoverError,
            ConnectionClosed) as error:
        log.error('restart handover failed; serving on: %s', error)
        tx.close()
        server.keeper.replenish()
        return
    log.info('handed everything over to the new broker; exiting')
    server.let_go()
    logging.shutdown()
    os._exit(0)  # no Exit frames, no socket shutdown: the successor serves them now


def export_state(server: BrokerServer) -> tuple[dict, list[int]]:
    peers = server.export_peers()
    index = {peer.connection: i for i, (peer, _) in enumerate(peers)}
    rendezvous = server.adopter.fileno()
    state = {
        'peers': [description for _, description in peers],
        'items': [item.to_json() for item in server.allocator.items.values()],
        'model': server.state.export(index.get),
        'extra': server.export_extra(index.get),
        'rendezvous': rendezvous is not None,
    }
    assert server.listener is not None
    listeners = [server.listener.fileno()] + ([] if rendezvous is None else [rendezvous])
    return state, listeners + [peer.fd for peer, _ in peers]


def take_over(server: BrokerServer, takeover_from: int,
              prepare: Callable[[], None]) -> None:
    """Become the broker: adopt the running one's listener, clients and sessions.

    ``prepare`` runs after the state was adopted and before the commit: whatever can
    still fail (the pid file, say) fails there, while the old broker still serves.
    Raises HandoverError (the start-up fails and the old broker serves on) unless
    the old broker confirmed it is gone, or died after handing everything over.
    """
    tx = handover.listen(server.home)
    predecessor = _Predecessor(takeover_from)
    announced = adopted = False
    try:
        os.kill(takeover_from, signal.SIGHUP)
        _accept(tx, predecessor)
        state, fds = handover.receive(tx)
        handover.checkpoint('new-received')
        adopt_state(server, state, fds)
        prepare()
        # A supervising systemd must know the new main process before the old
        # one exits, or it takes that exit for the end of the service.
        announced = systemd.notify(f'MAINPID={os.getpid()}\nREADY=1')
        handover.checkpoint('new-adopted')
        adopted = True
        tx.put(handover.COMMIT)
        handover.checkpoint('new-committed')
        handover.await_word(tx, handover.BYE, handover.HANDOVER_TIMEOUT)
    except (AveException, OSError, ValueError, KeyError, ConnectionClosed) as error:
        if adopted and predecessor.gone(DEATH_WAIT):
            log.warning('broker %d died before it said bye; serving what it handed over',
                        takeover_from)
        else:
            if announced:
                systemd.notify(f'MAINPID={takeover_from}')
            raise handover.HandoverError(f'taking over from broker {takeover_from} '
                                         f'failed: {error}') from error
    finally:
        tx.close()
        predecessor.close()
    log.info('took over from broker %d', takeover_from)


#: How long a successor that lost its predecessor's connection waits to see that
#: process gone (its sockets close a moment before it is).
DEATH_WAIT = 1.0
#: How often a successor waiting for its predecessor looks whether it still lives.
ACCEPT_STEP = 0.1


class _Predecessor:
    """The running broker a successor takes over from, watched through a pidfd."""

    def __init__(self, pid: int) -> None:
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None

    def gone(self, timeout: float = 0.0) -> bool:
        if self._pidfd is None:
            return True
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def _accept(tx: FdTx, predecessor: _Predecessor) -> None:
    """Wait for the running broker to connect; give up at once if it dies."""
    for _ in range(round(handover.HANDOVER_TIMEOUT / ACCEPT_STEP)):
        try:
            tx.accept(ACCEPT_STEP)
            return
        except Timeout:
            if predecessor.gone():
                raise handover.HandoverError('the running broker died before it handed '
                                             'anything over') from None
    raise handover.HandoverError(f'the running broker did not connect within '
                                 f'{handover.HANDOVER_TIMEOUT:g} s')


def adopt_state(server: BrokerServer, state: dict, fds: list[int]) -> None:
    listener, *peer_fds = (socketlib.socket(fileno=fd) for fd in fds)
    rendezvous = peer_fds.pop(0) if state.get('rendezvous') else None
    server.adopt_listener(listener)
    _check_address(server)
    server.adopter.open(rendezvous)
    connections = [server.import_peer(sock, description)
                   for sock, description in zip(peer_fds, state['peers'])]
    for entry in state['items']:
        _adopt_item(server, entry)
    server.state = BrokerState.restore(state['model'], connections, adopt_process)
    for record in server.state.sessions():
        server.keeper.watch_adopted(record)
    server.adopt_extra(state['extra'], connections)


def _check_address(server: BrokerServer) -> None:
    assert server.listener is not None
    wanted = (server.config['host'], server.config['port'])
    if tuple(server.listener.address) != wanted and server.config['port'] != 0:
        raise handover.HandoverError(
            f'the running broker listens on {server.listener.address[0]}:'
            f'{server.listener.address[1]}, the new configuration says {wanted[0]}:'
            f'{wanted[1]}; a move needs ave-broker --stop and --start')


def _adopt_item(server: BrokerServer, entry: dict) -> None:
    """Take over one item's allocation state. The new configuration wins for what an
    item is (a declared item keeps its new profile and settings); an item the new
    broker.json no longer declares stays until nobody holds or reserves it."""
    allocator = server.allocator
    try:
        key = allocator.key_of(entry['profile'])
    except NoSuch:
        log.warning('dropping %s: its type is no longer installed', entry['profile'])
        return
    item = allocator.items.get(key)
    if item is None:
        if entry['static'] and entry['holder'] is None and not entry['releasing'] \
                and entry.get('reserved_for') is None:
            return  # no longer in broker.json and nobody holds it
        allocator.restore_item({**entry, 'static': False,
                                'present': entry['present'] and not entry['static']})
        return
    item.holder = entry['holder']
    item.releasing = entry['releasing']
    item.tainted = entry['tainted']
    item.reserved_for = entry.get('reserved_for')
    item.since = entry.get('since')
