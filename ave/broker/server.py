"""The broker: a Control that allocates equipment and runs one session per client.

Nothing here waits. A session is forked without synchronization (its listening socket
is bound before the fork, so the client can connect at once); resources are added and
removed with one-way calls over a socket pair; the broker learns that a session ended
from its pidfd. Equipment of an ended session becomes available again as soon as the
session has torn it down and exited.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import socket as socketlib
from dataclasses import dataclass, field
from typing import Any

from ave.broker import handover, systemd
from ave.broker.allocator import Allocator, Item, Key
from ave.broker.exceptions import Busy, NoSuch
from ave.broker.session import Session
from ave.equipment import EquipmentType
from ave.exceptions import AuthError, AveException
from ave.network.connection import Connection, find_free_port
from ave.network.control import Control
from ave.network.exceptions import ConnectionClosed
from ave.network.fdtx import FdTx
from ave.network.process import Process
from ave.profile import Profile

log = logging.getLogger(__name__)

SESSION_KILL_GRACE = 30.0
LISTER_RESTART_DELAY = 1.0
MAX_PROFILES_PER_GET = 64


@dataclass(eq=False)
class SessionRecord:
    """What the broker knows about one running session."""

    process: Session
    port: int
    authkey: str
    link: Connection | None  # None once the link is gone (a predecessor saw it close)
    keys: set[Key] = field(default_factory=set)


@dataclass(eq=False)
class Client:
    """A connected client and the session holding its equipment, if any."""

    holder: int
    session: SessionRecord | None = None


class BrokerServer(Control):
    """Allocates equipment by profile; see DESIGN.md, section Broker."""

    def __init__(self, home: str, config: dict, authkeys: dict,
                 types: dict[str, EquipmentType], type_settings: dict[str, dict],
                 socket: socketlib.socket | None = None, logging: bool = False,
                 takeover_from: int | None = None) -> None:
        port = None if takeover_from is not None else config['port']
        super().__init__(port, socket=socket, alt_keys=authkeys, home=home,
                         proc_name='ave-broker', logging=logging, host=config['host'])
        self.takeover_from = takeover_from
        self.config = config
        self.types = types
        self.allocator = Allocator(types, config['stacks'], type_settings)
        for entry in config['equipment']:
            self.allocator.add(types[entry['type']].profile_of(entry), entry, static=True)
        self.lister: Process | None = None
        self.clients: dict[Connection, Client] = {}
        self.sessions: dict[int, SessionRecord] = {}
        self.links: dict[Connection, SessionRecord] = {}
        self._next_holder = 1

    # -- client RPCs -------------------------------------------------------------------

    @Control.rpc
    def get(self, *profiles: Any) -> dict:
        """Allocate every requested profile (tuples: one stack) or nothing at all.

        On failure the client's session is closed and everything it held is freed, so
        no client can sit on half a set while it retries.
        """
        client = self._client()
        request = _parse_request(profiles)
        try:
            items = self.allocator.allocate(client.holder, request)
        except (Busy, NoSuch):
            self._close_session(client)
            raise
        session = client.session or self._start_session(client)
        for item in items:
            key = self.allocator.key_of(item.profile)
            session.keys.add(key)
            self.notify(session.link, 'add_resource', dict(item.profile), item.settings,
                        item.tainted)
        return {'session': [None, session.port], 'authkey': session.authkey,
                'resources': [dict(item.profile) for item in items]}

    @Control.rpc
    def yield_resources(self, *profiles: Any) -> None:
        """Give items back early; they go to others once their session reset them."""
        client = self._client()
        keys = [self.allocator.check_holder(client.holder, _profile(p)) for p in profiles]
        if client.session is None:
            return  # the session ended: its equipment is being reclaimed already
        for key in keys:
            profile = dict(self.allocator.items[key].profile)
            self.allocator.begin_release(key)
            self.notify(client.session.link, 'remove_resource', profile)

    @Control.rpc
    def list_allocations(self) -> list[dict]:
        """What the calling client holds."""
        client = self.clients.get(self.caller.connection)
        return [] if client is None else self.allocator.allocations(client.holder)

    # -- administration ----------------------------------------------------------------

    @Control.rpc
    @Control.preauth('admin')
    def list_equipment(self) -> list[dict]:
        return self.allocator.equipment()

    @Control.rpc
    @Control.preauth('admin')
    def list_available(self) -> list[dict]:
        return self.allocator.available()

    @Control.rpc
    @Control.preauth('admin')
    def list_allocations_all(self) -> list[dict]:
        return self.allocator.allocations()

    @Control.rpc
    @Control.preauth('admin')
    def list_stacks(self) -> list[list[dict]]:
        return self.allocator.stacks

    @Control.rpc
    @Control.preauth('admin')
    def close_session(self, profile: dict) -> None:
        """End the session of whoever holds ``profile`` (its equipment is reclaimed)."""
        key = self.allocator.key_of(_profile(profile))
        for client in self.clients.values():
            if client.session is not None and key in client.session.keys:
                self._close_session(client)
                return
        raise AveException(f'no session holds {key[0]} {key[1]}')

    @Control.rpc
    @Control.preauth('admin')
    def stop(self) -> None:
        """Shut the broker down; sessions end themselves when their link closes."""
        self.shutdown('the broker was stopped')

    # -- equipment reports -------------------------------------------------------------

    @Control.rpc
    @Control.preauth('share')
    def add_equipment(self, profile: dict) -> None:
        """A lister reports equipment that appeared or changed."""
        self.allocator.add(_profile(profile))

    @Control.rpc
    @Control.preauth('share')
    def remove_equipment(self, profile: dict) -> None:
        """A lister reports equipment that disappeared (kept while held)."""
        self.allocator.remove(self.allocator.key_of(_profile(profile)))

    @Control.rpc
    @Control.preauth('share')
    def sync_equipment(self, type_name: str, profiles: list) -> None:
        """A lister's complete view of one type, sent when it (re)starts."""
        if not isinstance(profiles, list):
            raise AveException('sync_equipment() takes a list of profiles')
        self.allocator.sync(type_name, [_profile(p) for p in profiles])

    # -- the lister --------------------------------------------------------------------

    def initialize(self) -> None:
        super().initialize()
        signal.signal(signal.SIGHUP, self.handle_SIGHUP)
        if self.takeover_from is not None:
            self._take_over()
        self._start_lister()

    # -- restart: handing over ---------------------------------------------------------

    def handle_SIGHUP(self, signum: int, frame: Any) -> None:
        """A successor asks for everything; hand it over between two loop steps."""
        self.call_later(0, self._hand_over)

    def _hand_over(self) -> None:
        """Send state and descriptors to the successor; exit once it has committed.

        Any failure before the commit leaves this broker serving as if nothing had
        happened: nothing was closed or changed while the state was exported.
        """
        tx = FdTx()
        try:
            tx.connect(handover.socket_path(self.home), handover.CONNECT_TIMEOUT)
            handover.send(tx, *self._export_state())
            handover.await_word(tx, handover.COMMIT, handover.HANDOVER_TIMEOUT)
            tx.put(handover.BYE)
        except (AveException, OSError, ValueError, handover.HandoverError,
                ConnectionClosed) as error:
            log.error('restart handover failed; serving on: %s', error)
            tx.close()
            return
        log.info('handed everything over to the new broker; exiting')
        if self.lister is not None:
            self.lister.terminate()
        logging.shutdown()
        os._exit(0)  # no Exit frames, no socket shutdown: the successor serves them now

    def _export_state(self) -> tuple[dict, list[int]]:
        peers = self.export_peers()
        index = {peer.connection: i for i, (peer, _) in enumerate(peers)}
        attached = {id(c.session) for c in self.clients.values() if c.session is not None}
        state = {
            'peers': [description for _, description in peers],
            'items': [_item_state(item) for item in self.allocator.items.values()],
            'clients': [{'peer': index[connection], 'holder': client.holder,
                         'session': client.session and client.session.process.pid}
                        for connection, client in self.clients.items()
                        if connection in index],
            'sessions': [{'pid': pid, 'port': record.port, 'authkey': record.authkey,
                          'link': index.get(record.link), 'keys': sorted(record.keys),
                          'closing': id(record) not in attached}
                         for pid, record in self.sessions.items()],
            'next_holder': self._next_holder,
        }
        return state, [self.listener.fileno()] + [peer.fd for peer, _ in peers]

    # -- restart: taking over ----------------------------------------------------------

    def _take_over(self) -> None:
        """Become the broker: adopt the running one's listener, clients and sessions.

        Raises HandoverError (the start-up fails and the old broker serves on) unless
        the old broker confirmed it is gone.
        """
        tx = handover.listen(self.home)
        announced = False
        try:
            os.kill(self.takeover_from, signal.SIGHUP)
            tx.accept(handover.HANDOVER_TIMEOUT)
            state, fds = handover.receive(tx)
            self._adopt(state, fds)
            # A supervising systemd must know the new main process before the old
            # one exits, or it takes that exit for the end of the service.
            announced = systemd.notify(f'MAINPID={os.getpid()}\nREADY=1')
            tx.put(handover.COMMIT)
            handover.await_word(tx, handover.BYE, handover.HANDOVER_TIMEOUT)
        except (AveException, OSError, ValueError, KeyError, ConnectionClosed) as error:
            if announced:
                systemd.notify(f'MAINPID={self.takeover_from}')
            raise handover.HandoverError(f'taking over from broker {self.takeover_from} '
                                         f'failed: {error}') from error
        finally:
            tx.close()
        log.info('took over from broker %d', self.takeover_from)

    def _adopt(self, state: dict, fds: list[int]) -> None:
        listener, *peer_fds = (socketlib.socket(fileno=fd) for fd in fds)
        self.adopt_listener(listener)
        wanted = (self.config['host'], self.config['port'])
        if tuple(self.listener.address) != wanted and self.config['port'] != 0:
            raise handover.HandoverError(
                f'the running broker listens on {self.listener.address[0]}:'
                f'{self.listener.address[1]}, the new configuration says {wanted[0]}:'
                f'{wanted[1]}; a move needs ave-broker --stop and --start')
        connections = [self.import_peer(sock, description)
                       for sock, description in zip(peer_fds, state['peers'])]
        for entry in state['items']:
            self._adopt_item(entry)
        sessions = {entry['pid']: self._adopt_session(entry, connections)
                    for entry in state['sessions']}
        for entry in state['clients']:
            self.clients[connections[entry['peer']]] = Client(
                entry['holder'], sessions.get(entry['session']))
        self._next_holder = state['next_holder']

    def _adopt_item(self, entry: dict) -> None:
        try:
            key = self.allocator.key_of(entry['profile'])
        except NoSuch:
            log.warning('dropping %s: its type is no longer installed', entry['profile'])
            return
        item = self.allocator.items.get(key)
        if item is None:
            if entry['static'] and entry['holder'] is None and not entry['releasing']:
                return  # no longer in broker.json and nobody holds it
            self.allocator.add(entry['profile'], entry['settings'])
            item = self.allocator.items[key]
            item.present = entry['present'] and not entry['static']
        item.holder = entry['holder']
        item.releasing = entry['releasing']
        item.tainted = entry['tainted']

    def _adopt_session(self, entry: dict, connections: list[Connection]) -> SessionRecord:
        link = None if entry['link'] is None else connections[entry['link']]
        record = SessionRecord(Process.adopt(entry['pid'], 'ave-broker-session'),
                               entry['port'], entry['authkey'], link,
                               {tuple(key) for key in entry['keys']})
        if link is not None:
            self.links[link] = record
        self.sessions[entry['pid']] = record
        self.join_later(record.process)
        if entry['closing']:
            self.call_later(SESSION_KILL_GRACE, lambda: self._kill_if_running(record))
        return record

    def run(self) -> None:
        self.serve_imported()
        super().run()

    def _listed_types(self) -> dict[str, EquipmentType]:
        return {name: t for name, t in self.types.items() if t.udev_subsystems}

    def _start_lister(self) -> None:
        """Run the udev lister as a child, if any installed type is found through udev."""
        listed = self._listed_types()
        if not listed or not self.keep_going:
            return
        from ave.broker.lister import Lister
        self.lister = Lister((self.config['host'], self.port), self.alt_keys.get('share'),
                             listed, self.allocator.type_settings, self.home, logging=self.logging)
        self.lister.start()
        self.join_later(self.lister)

    def shutdown(self, details: dict | str | None = None) -> None:
        """Stop the lister with the broker; sessions end when their links close."""
        if self.lister is not None and self.keep_going:
            self.lister.terminate()
        super().shutdown(details)

    def _lister_ended(self, exit: int | None) -> None:
        log.warning('lister ended with status %s; restarting it', exit)
        self.lister = None
        self.call_later(LISTER_RESTART_DELAY, self._start_lister)

    # -- session reports ---------------------------------------------------------------

    @Control.rpc
    def released(self, profile: dict, clean: bool = True) -> None:
        """A session finished tearing an item down (one-way, sessions only).

        ``clean`` is False when the teardown failed: the next holder's session then
        resets the item before handing it over.
        """
        record = self.links.get(self.caller.connection)
        if record is None:
            raise AuthError('only sessions report released equipment')
        key = self.allocator.key_of(profile)
        record.keys.discard(key)
        self.allocator.finish_release(key, clean=clean is True)

    # -- clients and sessions ----------------------------------------------------------

    def _client(self) -> Client:
        connection = self.caller.connection
        if connection in self.links:
            raise AuthError('sessions do not allocate equipment')
        client = self.clients.get(connection)
        if client is None:
            client = self.clients[connection] = Client(self._next_holder)
            self._next_holder += 1
        return client

    def _start_session(self, client: Client) -> SessionRecord:
        """Fork the client's session without waiting for it to initialize."""
        listener, port = find_free_port(host=self.config['host'])
        broker_end, session_end = socketlib.socketpair()
        authkey = secrets.token_urlsafe(32)
        process = Session(listener, authkey, session_end, self.types, self.home,
                          logging=self.logging)
        try:
            process.start()
        finally:
            session_end.close()
        link = Connection(('session', process.pid), broker_end)
        record = SessionRecord(process, port, authkey, link)
        self.add_connection(link)
        self.links[link] = record
        self.sessions[process.pid] = record
        self.join_later(process)
        client.session = record
        return record

    def _close_session(self, client: Client) -> None:
        """Free the client's equipment: its session tears it down and exits."""
        for key in self.allocator.held_by(client.holder):
            self.allocator.begin_release(key)
        record, client.session = client.session, None
        if record is not None:
            record.process.terminate()
            self.call_later(SESSION_KILL_GRACE, lambda: self._kill_if_running(record))

    def _kill_if_running(self, record: SessionRecord) -> None:
        """A session stuck in teardown is killed, but only while it is unreaped (its pid
        cannot have been reused by another process yet)."""
        if self.sessions.get(record.process.pid) is record:
            log.warning('session %d did not end in time: killing it', record.process.pid)
            os.kill(record.process.pid, signal.SIGKILL)

    def lost_connection(self, connection: Connection, authkey: str | None) -> None:
        client = self.clients.pop(connection, None)
        if client is not None:
            self._close_session(client)
        record = self.links.pop(connection, None)
        if record is not None:
            for client in self.clients.values():
                if client.session is record:
                    client.session = None

    def joined_process(self, pid: int, exit: int | None) -> None:
        if self.lister is not None and pid == self.lister.pid:
            self._lister_ended(exit)
            return
        record = self.sessions.pop(pid, None)
        if record is None:
            return
        if exit not in (0, None):
            log.warning('session %d ended with status %s', pid, exit)
        for key in record.keys:
            self.allocator.finish_release(key)
        for client in self.clients.values():
            if client.session is record:
                client.session = None
        if record.link is not None:
            if not record.link.closed:
                self.remove_connection(record.link)
                record.link.close()
            self.links.pop(record.link, None)


def _item_state(item: Item) -> dict:
    return {'profile': dict(item.profile), 'settings': item.settings,
            'holder': item.holder, 'releasing': item.releasing, 'present': item.present,
            'tainted': item.tainted, 'static': item.static}


def _parse_request(profiles: tuple) -> list[dict | list[dict]]:
    """Check a get() request: profiles (dicts) and stack groups (lists of dicts)."""
    if not profiles:
        raise AveException('get() needs at least one profile')
    request: list[dict | list[dict]] = []
    count = 0
    for entry in profiles:
        if isinstance(entry, list):
            if not entry:
                raise AveException('an empty group cannot be allocated')
            request.append([_profile(member) for member in entry])
            count += len(entry)
        else:
            request.append(_profile(entry))
            count += 1
    if count > MAX_PROFILES_PER_GET:
        raise AveException(f'at most {MAX_PROFILES_PER_GET} profiles per get()')
    return request


def _profile(value: Any) -> dict:
    Profile.validate(value)
    return dict(value)

