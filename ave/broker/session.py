"""A client's session: the process that hosts the equipment it was allocated.

The broker forks one session per client at its first allocation. The session serves
the client directly (authenticated with a key only the two of them know), so the
broker loop never runs resource code. Broker and session talk over a socket pair with
one-way calls: the broker adds and removes resources, the session reports a resource
as released once its teardown (relay reset, workspace deletion) has finished.
"""
from __future__ import annotations

import logging
import signal
import socket as socketlib
from typing import Any, Callable

from ave.broker.exceptions import NotAllocated
from ave.equipment import EquipmentType, Resource
from ave.exceptions import AuthError, AveException, details_of
from ave.network.connection import Connection
from ave.network.exceptions import ConnectionClosed
from ave.network.control import Control

log = logging.getLogger(__name__)

Key = tuple[str, str]


class Session(Control):
    """Hosts one client's resources; the client calls their public methods."""

    def __init__(self, listener: socketlib.socket, authkey: str,
                 broker_socket: socketlib.socket, types: dict[str, EquipmentType],
                 home: str | None = None, logging: bool = False) -> None:
        super().__init__(0, authkey=authkey, socket=listener, home=home,
                         proc_name='ave-broker-session', logging=logging)
        self.broker = Connection(('broker', 0), broker_socket)
        self.types = types
        self.resources: dict[Key, Resource] = {}
        self.failures: dict[Key, dict] = {}

    def close_fds(self, exclude: list[int]) -> None:
        super().close_fds(exclude + [self.broker.fileno()])

    def initialize(self) -> None:
        super().initialize()
        # Ctrl-C on a foreground broker reaches the whole process group; the session
        # must not die untidily but end through its broker link, tearing down first.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the broker's restart signal
        self.add_connection(self.broker, self.authkey)

    # -- the broker's side -------------------------------------------------------------

    @Control.rpc
    def add_resource(self, profile: dict, settings: dict, tainted: bool = True) -> None:
        """Instantiate and set up an allocated item (called one-way by the broker)."""
        self._require_broker()
        key = self._key_of(profile)
        try:
            equipment_type = self.types[profile['type']]
            resource = equipment_type.resource_class(
                equipment_type.profile_class(profile), settings)
            resource._setup(tainted)
        except Exception as error:
            log.exception('could not set up %s', key)
            self.failures[key] = details_of(error)
            return
        self.resources[key] = resource

    @Control.rpc
    def remove_resource(self, profile: dict) -> None:
        """Tear an item down, then tell the broker it may go to someone else."""
        self._require_broker()
        key = self._key_of(profile)
        self.failures.pop(key, None)
        resource = self.resources.pop(key, None)
        clean = resource is not None and _teardown(resource)
        self._report_released(profile, clean)

    def _report_released(self, profile: dict, clean: bool) -> None:
        """Tell the broker an item is free, and whether its teardown succeeded."""
        try:
            self.notify(self.broker, 'released', profile, clean)
        except ConnectionClosed:
            log.warning('broker gone: could not report %s released', profile)

    def _require_broker(self) -> None:
        if self.caller is None or self.caller.connection is not self.broker:
            raise AuthError('only the broker manages a session\'s resources')

    # -- the client's side -------------------------------------------------------------

    def rpc_function(self, method: str, resource: Any) -> Callable:
        """Session RPCs for the broker; public resource methods for the key holder."""
        if resource is None:
            return super().rpc_function(method, resource)
        if not self.caller.primary:
            raise AuthError('resource calls require the session key')
        key = self._key_of(resource)
        if key not in self.resources and key not in self.failures:
            self.serve_pending(self.broker)
        if key in self.failures:
            raise AveException({**self.failures[key], 'message':
                                f'{key[0]} {key[1]} could not be set up: '
                                f'{self.failures[key].get("message")}'})
        target = self.resources.get(key)
        if target is None:
            raise NotAllocated(f'{key[0]} {key[1]} is not allocated in this session')
        if method.startswith('_') or not callable(getattr(type(target), method, None)):
            raise AveException(f'{key[0]} has no method {method!r}')
        return getattr(target, method)

    def _key_of(self, profile: Any) -> Key:
        if not isinstance(profile, dict) or profile.get('type') not in self.types:
            raise AveException(f'not an equipment profile: {profile!r}')
        equipment_type = self.types[profile['type']]
        try:
            return equipment_type.key_of(profile)
        except KeyError:
            raise AveException(f'profile lacks its identity {equipment_type.identity!r}: '
                               f'{profile!r}') from None

    # -- ending ------------------------------------------------------------------------

    def lost_connection(self, connection: Connection, authkey: str | None) -> None:
        """Without its broker nobody accounts for the equipment: hand it all back."""
        if connection is self.broker and self.keep_going:
            log.warning('broker connection lost; ending the session')
            self.shutdown()

    def shutdown(self, details: dict | str | None = None) -> None:
        """Tear every resource down before telling the clients that the session ended."""
        if not self.keep_going:
            return
        for resource in list(self.resources.values()):
            self._report_released(resource.get_profile(), _teardown(resource))
        self.resources.clear()
        super().shutdown(details or 'the session has ended')


def _teardown(resource: Resource) -> bool:
    """Tear a resource down; False (and a log entry) if that failed."""
    try:
        resource._teardown()
    except Exception:
        log.exception('teardown of %s failed', resource.get_profile())
        return False
    return True
