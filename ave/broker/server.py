"""The broker: a Control that allocates equipment and runs one session per client.

Nothing here waits. Sessions are started and ended by ``SessionKeeper``; clients and
sessions are one model in ``BrokerState``; which item goes to whom is the pure
``Allocator``'s decision; a restart's handover is ``ave.broker.takeover``'s. Resources
are added to and removed from a session with one-way calls over a socket pair, and
the broker learns that a session ended from its pidfd. Equipment of an ended session
becomes available again once it has been torn down.

A broker may crash; its sessions outlive it. A fresh broker first adopts the sessions
of its home that present themselves (``ave.broker.adoption``), and their clients
come back with ``resume``. An orderly stop tells every session to ``end`` first.
"""
from __future__ import annotations

import logging
import os
import signal
import socket as socketlib
import time
from typing import Any, Callable

import ave
from ave import sandbox
from ave.broker import listing, requests, takeover
from ave.broker.adoption import Adopter
from ave.broker.allocator import Allocator, Key
from ave.broker.cgroups import SessionGroups
from ave.broker.exceptions import Busy
from ave.broker.labmode import LabMode
from ave.broker.queue import parse_priority, parse_wait
from ave.broker.sessions import SessionKeeper
from ave.broker.state import BrokerState, Client, identity_of
from ave.broker.statuspage import StatusPage
from ave.broker.waiting import Waiting
from ave.equipment import EquipmentType
from ave.exceptions import AuthError, AveException
from ave.lab.etcd import EtcdError
from ave.logs import clip
from ave.network.connection import Connection
from ave.network.control import Control
from ave.network.exceptions import ConnectionClosed
from ave.network.limits import Limits
from ave.network.process import Process

log = logging.getLogger(__name__)

LISTER_RESTART_DELAY = 1.0


class BrokerServer(Control):
    """Allocates equipment by profile; see DESIGN.md, section Broker."""

    home: str  # always given: the broker's files live there

    def __init__(self, home: str, config: dict, authkeys: dict,
                 types: dict[str, EquipmentType], type_settings: dict[str, dict],
                 socket: Any = None, logging: bool = False,
                 takeover_from: int | None = None) -> None:
        port = None if takeover_from is not None else config['port']
        limits = Limits.from_config(config['limits'])
        super().__init__(port, socket=socket, alt_keys=authkeys, home=home,
                         proc_name='ave-broker', logging=logging, host=config['host'],
                         limits=limits)
        self.takeover_from = takeover_from
        self.config = config
        self.types = types
        self.allocator = Allocator(types, config['stacks'], type_settings)
        for entry in config['equipment']:
            self.allocator.add(types[entry['type']].profile_of(entry), entry, static=True)
        self.state = BrokerState()
        self.keeper = SessionKeeper(self)
        self.adopter = Adopter(self)
        self.waiting = Waiting(self, config['queue']['aging_s'], config['queue']['limit'])
        self.lister: Process | None = None
        self.isolation = sandbox.Isolation.decide(config['isolation'])
        self.allocations_total = 0
        # A successor takes the running HTTP process over instead of binding anew.
        self.status_page = StatusPage(self, config['http'], bind=takeover_from is None)
        self.waiting.on_granted = self.status_page.observe_wait
        self.lab = None if config['lab'] is None else \
            LabMode(self, config['lab'], self.advertised_host())
        self._lab_lease: int | None = None  # a predecessor's, continued by join

    # -- client RPCs -------------------------------------------------------------------

    @Control.rpc
    def hello(self, identity: Any) -> None:
        """A client says who it is for (user, host, pid, program, job): shown to
        people and logged, never used to decide anything."""
        client = self._client()
        client.identity = identity_of(identity, client.address)

    @Control.rpc
    def get(self, *profiles: Any, wait: Any = 0, priority: Any = 0) -> dict | None:
        """Allocate every requested profile (tuples: one stack) or nothing at all.

        ``wait`` seconds (None: no limit) the request waits its turn while the
        equipment is held by others; the reply comes when it is granted, else Busy.
        On failure the client's session is closed and everything it held is freed,
        so no client can sit on half a set while it retries.
        """
        client, request = self._client(), requests.parse_request(profiles)
        if self.lab is None:
            return self.waiting.get(client, request, wait, priority)
        self.lab.get(client, request, parse_wait(wait), parse_priority(priority))
        return None

    @Control.rpc
    def resume(self, token: Any) -> dict:
        """Carry on as the holder one was before the broker crashed: ``token`` is the
        one the reply to the first allocation carried. The client must resume before
        it allocates anything on this connection. Returns what it holds."""
        assert self.caller is not None
        connection = self.caller.connection
        if self.state.is_link(connection):
            raise AuthError('sessions do not resume')
        client = self.adopter.claim(token)
        fresh = self.state.client(connection)
        if fresh is not None:
            if fresh.session is not None or self.allocator.held_by(fresh.holder) \
                    or self.waiting.queue.waiter_of(fresh.holder) is not None:
                raise AveException('resume() must come before this connection '
                                   'allocates anything')
            client.identity = fresh.identity or client.identity
            self.state.forget(fresh)
        self.state.bind(client, connection, str(connection.address[0]))
        log.info('%s is back after the broker restart', _who(client))
        return {'resources': self.allocator.allocations(client.holder)}

    def _roll_back(self, client: Client, keys: list[Key]) -> None:
        """A get failed after its items were chosen: none of them stays held.

        Items no session heard of go straight back; the rest go back through the
        client's session, which is closed as after any failed get.
        """
        log.warning('allocation to %s failed after its items were chosen; rolling back',
                    _who(client))
        record = client.session
        for key in keys:
            if record is None or key not in record.keys:
                item = self.allocator.items[key]
                self.allocator.finish_release(key, clean=not item.tainted)
        self.end_session(client)
        self.waiting.schedule()

    def hand_out(self, client: Client, keys: list[Key]) -> dict:
        """Give items the client was granted to its session (started if it has none);
        the result of its get. A failure rolls the grant back."""
        try:
            return self._hand_out(client, keys)
        except Exception:
            self._roll_back(client, keys)
            raise

    def _hand_out(self, client: Client, keys: list[Key]) -> dict:
        token = None
        if client.session is None:
            self._check_session_caps(client)
            # Each new session gets the token its client will resume with after a crash.
            token = self.state.issue_token(client)
        session = client.session or self.keeper.start(client)
        assert session.link is not None
        profiles = []
        for key in keys:
            item = self.allocator.items[key]
            session.keys.add(key)
            self.notify(session.link, 'add_resource', dict(item.profile), item.settings,
                        item.tainted)
            profiles.append(dict(item.profile))
        log.info('allocated %s to %s', ', '.join(f'{k[0]} {k[1]}' for k in keys),
                 _who(client))
        self.allocations_total += 1
        reply = requests.granted(profiles, [None, session.port], session.authkey)
        if token is not None:
            reply['token'] = token
        return reply

    def _check_session_caps(self, client: Client) -> None:
        sessions = self.config['limits']
        if len(self.state.sessions()) >= sessions['sessions']:
            raise Busy(f'the broker runs its limit of {sessions["sessions"]} sessions')
        if self.state.sessions_from(client.address) >= sessions['sessions_per_address']:
            raise Busy(f'{client.address} has its limit of '
                       f'{sessions["sessions_per_address"]} sessions')

    @Control.rpc
    def yield_resources(self, *profiles: Any) -> None:
        """Give items back early; they go to others once their session reset them."""
        client = self._client()
        if self.lab is not None:
            self.lab.yield_resources(client, [requests.checked_profile(p) for p in profiles])
            return
        keys = [self.allocator.check_holder(client.holder, requests.checked_profile(p)) for p in profiles]
        if client.session is None or client.session.link is None:
            return  # the session ended: its equipment is being reclaimed already
        for key in keys:
            profile = dict(self.allocator.items[key].profile)
            self._begin_release(key, client)
            self.notify(client.session.link, 'remove_resource', profile)

    @Control.rpc
    def list_allocations(self) -> list[dict]:
        """What the calling client holds."""
        assert self.caller is not None
        client = self.state.client(self.caller.connection)
        if client is None:
            return []
        if self.lab is not None:
            return self.lab.allocations_of(client)
        return self.allocator.allocations(client.holder)

    # -- public views ------------------------------------------------------------------

    @Control.rpc
    def who(self) -> list[dict]:
        """Every allocation: ``[{profile, holder, since}]``, holder as announced."""
        if self.lab is not None:
            return self.lab.who()
        return listing.allocations(self.allocator, self.identity_of)

    @Control.rpc
    def queue(self) -> list[dict]:
        """Waiting requests in the order they are served:
        ``[{position, holder, profiles, priority, waited_s}]``."""
        return self.waiting.describe() if self.lab is None else self.lab.queue()

    @Control.rpc
    def equipment(self) -> list[dict]:
        """Every item (workspaces aside): ``[{profile, state, holder, since}]``."""
        if self.lab is not None:
            return self.lab.equipment()
        return listing.equipment(self.allocator, self.identity_of)

    @Control.rpc
    def status(self) -> dict:
        """What runs here: pid, version, home, address, log and isolation."""
        return {'pid': os.getpid(), 'version': ave.__version__, 'home': self.home,
                'address': [self.config['host'], self.port],
                'log': self.log_path(), 'isolation': self.isolation.describe(),
                'http': self.status_page.describe(),
                'lab': None if self.lab is None else self.lab.name,
                'sessions': len(self.state.sessions()),
                'waiting': len(self.waiting.queue)}

    def log_path(self) -> str | None:
        """Where this broker logs (None: stderr, for a supervisor)."""
        return None

    def advertised_host(self) -> str:
        """The name other hosts and people know this broker by."""
        lab = self.config['lab']
        if lab is not None and lab.get('advertise'):
            return str(lab['advertise'])
        host = self.config['host']
        return socketlib.gethostname() if host in ('0.0.0.0', '::') else host

    def invoke(self, function: Callable, vargs: list, kwargs: dict) -> Any:
        """Every RPC is timed for the metrics, and may have changed what the status
        page shows."""
        started = time.perf_counter()
        try:
            return function(*vargs, **kwargs)
        finally:
            self.status_page.observe_rpc(getattr(function, '__name__', 'other'),
                                         time.perf_counter() - started)
            self.status_page.changed()

    def identity_of(self, holder: Any) -> dict:
        """The identity a holder's client announced ({} for one that has gone)."""
        client = self.state.client_by_holder(holder)
        return {} if client is None else client.describe()

    # -- administration ----------------------------------------------------------------

    @Control.rpc
    @Control.preauth('admin')
    def list_equipment(self) -> list[dict]:
        if self.lab is not None:
            return [row['profile'] for row in self.lab.equipment()]
        return self.allocator.equipment()

    @Control.rpc
    @Control.preauth('admin')
    def list_available(self) -> list[dict]:
        if self.lab is not None:
            return [row['profile'] for row in self.lab.equipment()
                    if row['state'] == 'available']
        return self.allocator.available()

    @Control.rpc
    @Control.preauth('admin')
    def list_allocations_all(self) -> list[dict]:
        if self.lab is not None:
            return [row['profile'] for row in self.lab.who()]
        return self.allocator.allocations()

    @Control.rpc
    @Control.preauth('admin')
    def list_stacks(self) -> list[list[dict]]:
        return self.allocator.stacks

    @Control.rpc
    @Control.preauth('admin')
    def close_session(self, profile: dict) -> None:
        """End the session of whoever holds ``profile`` (its equipment is reclaimed)."""
        key = self.allocator.key_of(requests.checked_profile(profile))
        item = self.allocator.items.get(key)
        client = None if item is None or item.holder is None \
            else self.state.client_by_holder(item.holder)
        if client is None or client.session is None:
            raise AveException(f'no session holds {key[0]} {key[1]}')
        self.end_session(client)

    @Control.rpc
    @Control.preauth('admin')
    def stop(self) -> None:
        """Shut the broker down; it tells its sessions to end first."""
        self.shutdown('the broker was stopped')

    # -- equipment reports -------------------------------------------------------------

    @Control.rpc
    @Control.preauth('share')
    def add_equipment(self, profile: dict) -> None:
        """A lister reports equipment that appeared or changed."""
        self.allocator.add(requests.checked_profile(profile))
        self._equipment_changed()

    @Control.rpc
    @Control.preauth('share')
    def remove_equipment(self, profile: dict) -> None:
        """A lister reports equipment that disappeared (kept while held)."""
        self.allocator.remove(self.allocator.key_of(requests.checked_profile(profile)))
        self._equipment_changed()

    @Control.rpc
    @Control.preauth('share')
    def sync_equipment(self, type_name: str, profiles: list) -> None:
        """A lister's complete view of one type, sent when it (re)starts."""
        if not isinstance(profiles, list):
            raise AveException('sync_equipment() takes a list of profiles')
        self.allocator.sync(type_name, [requests.checked_profile(p) for p in profiles])
        self._equipment_changed()

    def _equipment_changed(self) -> None:
        if self.lab is not None:
            self.lab.equipment_changed()
        self.waiting.schedule()

    # -- session reports ---------------------------------------------------------------

    @Control.rpc
    def released(self, profile: dict, clean: bool = True) -> None:
        """A session finished tearing an item down (one-way, sessions only).

        ``clean`` is False when the teardown failed: the next holder's session then
        resets the item before handing it over.
        """
        assert self.caller is not None
        record = self.state.session_of_link(self.caller.connection)
        if record is None:
            raise AuthError('only sessions report released equipment')
        key = self.allocator.key_of(profile)
        record.keys.discard(key)
        self.released_item(key, clean=clean is True)

    @Control.rpc
    def recycled(self) -> None:
        """A session asked to ``recycle`` is clean and waits as a spare (one-way,
        sessions only)."""
        assert self.caller is not None
        record = self.state.session_of_link(self.caller.connection)
        if record is None or not record.closing:
            raise AuthError('only a session asked to recycle reports recycled')
        self.keeper.recycled(record)

    def released_item(self, key: Key, clean: bool) -> None:
        """An item's teardown is over: it goes to the next waiter, if one can use it."""
        self.allocator.finish_release(key, clean=clean)
        if self.lab is not None:
            self.lab.released(key)
        self.waiting.schedule()

    # -- starting, restarting, stopping ------------------------------------------------

    def initialize(self) -> None:
        super().initialize()
        signal.signal(signal.SIGHUP, self.handle_SIGHUP)
        self.keeper.groups = SessionGroups.find()
        if self.takeover_from is not None:
            takeover.take_over(self, self.takeover_from, self._prepare)
        else:
            self._prepare()
            self.adopter.open()
            self._gather_orphans()
            self.keeper.sweep(self._sweeps())
            self.keeper.groups.sweep(self.call_later)
        self.adopter.arm_placeholders()
        self._start_lister()
        self.status_page.start()
        self.keeper.replenish()

    def _gather_orphans(self) -> None:
        """Adopt the sessions a crashed broker left, before any client is served:
        clients that connect meanwhile wait in the listener's queue."""
        assert self.listener is not None
        self.selector.unregister(self.listener.fileno())
        try:
            self.adopter.gather()
        finally:
            self._selector_made(self.selector)

    def _prepare(self) -> None:
        """Everything that can fail before serving; a lab broker joins its lab here,
        continuing a predecessor's lease."""
        self.prepare_to_serve()
        if self.lab is not None:
            try:
                self.lab.join(self._lab_lease)
            except EtcdError as error:
                raise AveException(f'cannot join the lab {self.lab.name!r}: {error}') \
                    from None

    def close_fds(self, exclude: list[int]) -> None:
        listener = self.status_page.listener
        super().close_fds(exclude + ([] if listener is None else [listener.fileno()]))

    def prepare_to_serve(self) -> None:
        """What must succeed before this broker serves (a successor: before the old
        broker lets go). Subclasses add the pid file and the like."""

    def hidden_paths(self) -> tuple[str, ...]:
        """What a job's commands must not see: this home's AVE files and every
        workspace (a session's own are mounted back on top)."""
        paths = [os.path.join(self.home, '.ave')]
        root = self.allocator.type_settings.get('workspace', {}).get('root')
        if root:
            paths.append(root)
        return tuple(paths)

    def _sweeps(self) -> dict[str, tuple[dict, set[str]]]:
        """Every type that leaves things on disk, with the identities still in use."""
        in_use: dict[str, set[str]] = {name: set() for name in self.types}
        for record in self.state.sessions():
            for type_name, identity in record.keys:
                in_use[type_name].add(identity)
        return {name: (self.allocator.type_settings.get(name, {}), in_use[name])
                for name, equipment_type in self.types.items() if equipment_type.sweeps}

    def handle_SIGHUP(self, signum: int, frame: Any) -> None:
        """A successor asks for everything; hand it over between two loop steps."""
        self.call_later(0, lambda: takeover.hand_over(self))

    def export_extra(self, index_of: Callable[[Connection], int | None]) -> dict:
        """State beyond clients, sessions and items that a successor needs."""
        return {'waiting': self.waiting.export(index_of),
                'allocations_total': self.allocations_total,
                'status_page': self.status_page.export(index_of),
                'lab': None if self.lab is None else self.lab.export(index_of),
                'reclaiming': self.keeper.export_reclaiming()}

    def adopt_extra(self, extra: dict, connections: list[Connection]) -> None:
        """Take over what ``export_extra`` exported."""
        self.waiting.adopt(extra['waiting'], connections)
        self.allocations_total = extra['allocations_total']
        self.status_page.adopt(extra['status_page'], connections)
        self.keeper.adopt_reclaiming(extra.get('reclaiming', []))
        if self.lab is not None and extra['lab'] is not None:
            self.lab.adopt(extra['lab'], connections)
            self._lab_lease = extra['lab']['lease']

    def let_go(self) -> None:
        """The successor took everything: stop what dies with this process."""
        if self.lister is not None:
            self.lister.terminate()
        self.status_page.let_go()
        if self.lab is not None:
            self.lab.let_go()

    def run(self) -> None:
        self.serve_imported()
        super().run()

    def shutdown(self, details: dict | str | None = None) -> None:
        """Stop the lister with the broker, leave the lab, and tell every session to
        end: a link that merely closed would look like a crash to it."""
        if self.keep_going:
            if self.lister is not None:
                self.lister.terminate()
            if self.lab is not None:
                self.lab.leave()
            self._end_sessions()
            self.keeper.drop_spares()
            self.adopter.close()
        super().shutdown(details)

    def _end_sessions(self) -> None:
        for record in self.state.sessions():
            try:
                if record.link is None:
                    raise ConnectionClosed()
                self.notify(record.link, 'end')
            except ConnectionClosed:
                record.process.terminate()  # it cannot hear us: the old way

    # -- the lister --------------------------------------------------------------------

    def _start_lister(self) -> None:
        """Run the udev lister as a child, if any installed type is found through udev."""
        listed = {name: t for name, t in self.types.items() if t.udev_subsystems}
        if not listed or not self.keep_going:
            return
        from ave.broker.lister import Lister
        assert self.port is not None
        self.lister = Lister((self.config['host'], self.port), self.alt_keys.get('share'),
                             listed, self.allocator.type_settings, self.home,
                             logging=self.logging)
        try:
            self.lister.start()
        except OSError as error:
            log.error('cannot start the lister (%s); retrying', error)
            self._lister_ended(None)
            return
        self.join_later(self.lister)

    def _lister_ended(self, exit: int | None) -> None:
        log.warning('lister ended with status %s; restarting it', exit)
        self.lister = None
        self.call_later(LISTER_RESTART_DELAY, self._start_lister)

    # -- clients and sessions ----------------------------------------------------------

    def _client(self) -> Client:
        assert self.caller is not None
        connection = self.caller.connection
        if self.state.is_link(connection):
            raise AuthError('sessions do not allocate equipment')
        client = self.state.client(connection)
        if client is None:
            client = self.state.add_client(connection, str(connection.address[0]))
        return client

    def end_session(self, client: Client) -> None:
        """Free the client's equipment: its session tears it down and exits."""
        for key in self.allocator.held_by(client.holder):
            self._begin_release(key, client)
        record = self.state.detach(client)
        if record is not None:
            self.keeper.close(record)

    def _begin_release(self, key: Key, client: Client) -> None:
        """The holder let go; one log line says who held it and for how long."""
        item = self.allocator.items[key]
        held = '' if item.since is None else f' for {time.time() - item.since:.1f} s'
        log.info('released %s %s held by %s%s', key[0], key[1], _who(client), held)
        self.allocator.begin_release(key)

    def lost_connection(self, connection: Connection, authkey: str | None) -> None:
        client = self.state.remove_client(connection)
        if client is not None:
            if self.lab is not None:
                self.lab.client_left(client)
            self.waiting.client_left(client)
            self.end_session(client)
        record = self.state.session_of_link(connection)
        if record is not None:
            self.state.forget_link(record)

    def joined_process(self, pid: int, exit: int | None) -> None:
        self.status_page.changed()
        if self.lister is not None and pid == self.lister.pid:
            self._lister_ended(exit)
            return
        if self.status_page.ended(pid, exit):
            return
        record = self.state.session(pid)
        self.keeper.ended(pid, exit)
        if record is not None and self.lab is not None:
            self.lab.session_ended(record)


def _who(client: Client) -> str:
    identity = client.describe()
    return clip(' '.join(f'{k}={v}' for k, v in identity.items()), 300)
