"""``ave-broker --restart`` on the broker's side: handing everything over, taking over.

The transport (an FdTx socket, chunks, the commit and bye words) is
``ave.broker.handover``'s; this module decides what a broker's state is. The running
broker exports its listener, every peer (with half-read input and unsent output), the
client and session model (``BrokerState.export``) and every item's allocation state.
The successor adopts all of it, does everything that could still fail, and only then
commits; the old broker then exits without a word to anyone.
"""
from __future__ import annotations

import logging
import os
import signal
import socket as socketlib
from typing import TYPE_CHECKING, Callable

from ave.broker import handover, systemd
from ave.broker.exceptions import NoSuch
from ave.broker.sessions import adopt_process
from ave.broker.state import BrokerState
from ave.exceptions import AveException
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
    try:
        handover.send(tx, *export_state(server))
        handover.await_word(tx, handover.COMMIT, handover.HANDOVER_TIMEOUT)
        tx.put(handover.BYE)
    except (AveException, OSError, ValueError, handover.HandoverError,
            ConnectionClosed) as error:
        log.error('restart handover failed; serving on: %s', error)
        tx.close()
        return
    log.info('handed everything over to the new broker; exiting')
    server.let_go()
    logging.shutdown()
    os._exit(0)  # no Exit frames, no socket shutdown: the successor serves them now


def export_state(server: BrokerServer) -> tuple[dict, list[int]]:
    peers = server.export_peers()
    index = {peer.connection: i for i, (peer, _) in enumerate(peers)}
    state = {
        'peers': [description for _, description in peers],
        'items': [item.to_json() for item in server.allocator.items.values()],
        'model': server.state.export(index.get),
        'extra': server.export_extra(index.get),
    }
    assert server.listener is not None
    return state, [server.listener.fileno()] + [peer.fd for peer, _ in peers]


def take_over(server: BrokerServer, takeover_from: int,
              prepare: Callable[[], None]) -> None:
    """Become the broker: adopt the running one's listener, clients and sessions.

    ``prepare`` runs after the state was adopted and before the commit: whatever can
    still fail (the pid file, say) fails there, while the old broker still serves.
    Raises HandoverError (the start-up fails and the old broker serves on) unless
    the old broker confirmed it is gone.
    """
    tx = handover.listen(server.home)
    announced = False
    try:
        os.kill(takeover_from, signal.SIGHUP)
        tx.accept(handover.HANDOVER_TIMEOUT)
        state, fds = handover.receive(tx)
        adopt_state(server, state, fds)
        prepare()
        # A supervising systemd must know the new main process before the old
        # one exits, or it takes that exit for the end of the service.
        announced = systemd.notify(f'MAINPID={os.getpid()}\nREADY=1')
        tx.put(handover.COMMIT)
        handover.await_word(tx, handover.BYE, handover.HANDOVER_TIMEOUT)
    except (AveException, OSError, ValueError, KeyError, ConnectionClosed) as error:
        if announced:
            systemd.notify(f'MAINPID={takeover_from}')
        raise handover.HandoverError(f'taking over from broker {takeover_from} '
                                     f'failed: {error}') from error
    finally:
        tx.close()
    log.info('took over from broker %d', takeover_from)


def adopt_state(server: BrokerServer, state: dict, fds: list[int]) -> None:
    listener, *peer_fds = (socketlib.socket(fileno=fd) for fd in fds)
    server.adopt_listener(listener)
    _check_address(server)
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
