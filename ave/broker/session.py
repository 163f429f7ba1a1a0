"""A client's session: the process that hosts the equipment it was allocated.

The broker forks one session per client at its first allocation. The session serves
the client directly (authenticated with a key only the two of them know), so the
broker loop never runs resource code. Broker and session talk over a socket pair with
one-way calls: the broker adds and removes resources, the session reports a resource
as released once its teardown (relay reset, workspace deletion) has finished.

Resource code never runs on the session's loop either: set-up, every client call and
teardown run in worker threads, one resource at a time (``Hosted``). So a session
inside an hour-long ``run()`` still hears its broker at once, and when the client is
gone it kills the call's commands, tears down and ends within a second or two.
"""
from __future__ import annotations

import logging
import signal
import socket as socketlib
import threading
from typing import Any, Callable

from ave import sandbox
from ave.broker.exceptions import NotAllocated
from ave.equipment import EquipmentType, Resource
from ave.exceptions import AuthError, AveException, details_of
from ave.network.connection import Connection
from ave.network.control import Control
from ave.network.exceptions import ConnectionClosed

log = logging.getLogger(__name__)

Key = tuple[str, str]

#: How long ending the session waits for a call still running on a resource (after
#: its commands were killed) before tearing the resource down regardless.
CALL_DRAIN_TIMEOUT = 2.0


class Hosted:
    """One resource in a session: built at once, set up in a thread, used one call
    at a time. Calls that arrive during set-up wait for it; after a failed set-up
    they raise its error."""

    def __init__(self, key: Key, resource: Resource | None,
                 failure: dict | None = None) -> None:
        self.key = key
        self.resource = resource
        self.failure = failure
        self.ready = threading.Event()
        self.lock = threading.Lock()
        if resource is None:
            self.ready.set()

    def set_up(self, tainted: bool) -> None:
        try:
            assert self.resource is not None
            self.resource._setup(tainted)
        except Exception as error:
            log.exception('could not set up %s', self.key)
            self.failure = details_of(error)
        finally:
            self.ready.set()

    def call(self, method: Callable, vargs: list, kwargs: dict) -> Any:
        self.ready.wait()
        self.check()
        with self.lock:
            return method(*vargs, **kwargs)

    def check(self) -> None:
        if self.failure is not None:
            raise AveException({**self.failure, 'message':
                                f'{self.key[0]} {self.key[1]} could not be set up: '
                                f'{self.failure.get("message")}'})

    def tear_down(self, drain: float | None = None) -> bool:
        """Return the resource to its resting state; False (logged) if that failed.

        ``drain`` bounds the wait for a call still using it; past that the teardown
        goes ahead anyway, because the session is ending and must not hang on it.
        """
        self.ready.wait(drain)
        acquired = self.lock.acquire(timeout=-1 if drain is None else drain)
        try:
            if self.resource is not None:
                self.resource._teardown()
        except Exception:
            log.exception('teardown of %s failed', self.key)
            return False
        finally:
            if acquired:
                self.lock.release()
        return self.resource is not None and self.failure is None


class _Then:
    """Outcome of background work that no client waits for: run a follow-up."""

    def __init__(self, on_result: Callable[[Any], None],
                 on_failure: Callable[[BaseException], None]) -> None:
        self._on_result = on_result
        self._on_failure = on_failure

    def result(self, value: Any = None) -> None:
        self._on_result(value)

    def fail(self, error: BaseException) -> None:
        self._on_failure(error)


class Session(Control):
    """Hosts one client's resources; the client calls their public methods."""

    def __init__(self, listener: socketlib.socket, authkey: str,
                 broker_socket: socketlib.socket, types: dict[str, EquipmentType],
                 home: str | None = None, logging: bool = False,
                 isolated: bool = False, hidden: tuple[str, ...] = ()) -> None:
        super().__init__(0, authkey=authkey, socket=listener, home=home,
                         proc_name='ave-broker-session', logging=logging)
        self.broker = Connection(('broker', 0), broker_socket)
        self.types = types
        self.hosted: dict[Key, Hosted] = {}
        self.isolated = isolated
        self.hidden = hidden

    def close_fds(self, exclude: list[int]) -> None:
        super().close_fds(exclude + [self.broker.fileno()])

    def initialize(self) -> None:
        super().initialize()
        # Ctrl-C on a foreground broker reaches the whole process group; the session
        # must not die untidily but end through its broker link, tearing down first.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the broker's restart signal
        # Commands of this client's jobs see its own equipment and nothing else.
        sandbox.install(sandbox.Sandbox(self.isolated, self.hidden))
        self.add_connection(self.broker, self.authkey)

    # -- the broker's side -------------------------------------------------------------

    @Control.rpc
    def add_resource(self, profile: dict, settings: dict, tainted: bool = True) -> None:
        """Host an allocated item and set it up in the background (one-way, broker)."""
        self._require_broker()
        key = self._key_of(profile)
        try:
            equipment_type = self.types[profile['type']]
            resource = equipment_type.resource_class(
                equipment_type.profile_class(profile), settings)
        except Exception as error:
            log.exception('could not set up %s', key)
            self.hosted[key] = Hosted(key, None, details_of(error))
            return
        hosted = self.hosted[key] = Hosted(key, resource)
        self.run_in_thread(lambda: hosted.set_up(tainted),
                           _Then(lambda _: None, self._log_failure))

    @Control.rpc
    def remove_resource(self, profile: dict) -> None:
        """Tear an item down, then tell the broker it may go to someone else."""
        self._require_broker()
        key = self._key_of(profile)
        hosted = self.hosted.pop(key, None)
        if hosted is None:
            self._report_released(profile, False)
            return
        self.stop_commands(hosted)
        self.run_in_thread(hosted.tear_down, _Then(
            lambda clean: self._report_released(profile, clean is True),
            lambda error: self._report_released(profile, False)))

    def stop_commands(self, hosted: Hosted | None = None) -> None:
        """Kill the commands running for one resource (None: for all of them), so a
        call blocked in them returns and the resource can be torn down. This waits
        (briefly) until they are gone: nothing of them outlives the teardown."""
        if hosted is None:
            sandbox.current().kill()
        elif hosted.resource is not None:
            sandbox.current().kill(hosted.resource)

    def _report_released(self, profile: dict, clean: bool) -> None:
        """Tell the broker an item is free, and whether its teardown succeeded."""
        try:
            self.notify(self.broker, 'released', profile, clean)
        except ConnectionClosed:
            log.warning('broker gone: could not report %s released', profile)

    def _require_broker(self) -> None:
        if self.caller is None or self.caller.connection is not self.broker:
            raise AuthError('only the broker manages a session\'s resources')

    @staticmethod
    def _log_failure(error: BaseException) -> None:
        log.error('background work failed: %s', error)

    # -- the client's side -------------------------------------------------------------

    def rpc_function(self, method: str, resource: Any) -> Callable:
        """Session RPCs for the broker; public resource methods for the key holder."""
        if resource is None:
            return super().rpc_function(method, resource)
        if self.caller is None or not self.caller.primary:
            raise AuthError('resource calls require the session key')
        key = self._key_of(resource)
        if key not in self.hosted:
            self.serve_pending(self.broker)
        hosted = self.hosted.get(key)
        if hosted is None:
            raise NotAllocated(f'{key[0]} {key[1]} is not allocated in this session')
        hosted.check()
        target = hosted.resource
        if method.startswith('_') or not callable(getattr(type(target), method, None)):
            raise AveException(f'{key[0]} has no method {method!r}')
        return _ResourceCall(hosted, getattr(target, method))

    def invoke(self, function: Callable, vargs: list, kwargs: dict) -> Any:
        """Resource calls run in a worker thread; the loop stays free meanwhile."""
        if not isinstance(function, _ResourceCall):
            return function(*vargs, **kwargs)
        self.run_in_thread(lambda: function(*vargs, **kwargs), self.defer())
        return None

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
        """Stop every command, tear every resource down and report it, then tell the
        clients that the session ended."""
        if not self.keep_going:
            return
        self.stop_commands()
        for key, hosted in list(self.hosted.items()):
            profile = hosted.resource.get_profile() if hosted.resource else {
                'type': key[0], self.types[key[0]].identity: key[1]}
            self._report_released(profile, hosted.tear_down(CALL_DRAIN_TIMEOUT))
        self.hosted.clear()
        super().shutdown(details or 'the session has ended')


class _ResourceCall:
    """A resource method as ``rpc_function`` found it, bound to the resource it runs
    on: calling it waits for the resource's set-up and for its other calls."""

    __slots__ = ('hosted', 'method')

    def __init__(self, hosted: Hosted, method: Callable) -> None:
        self.hosted = hosted
        self.method = method

    def __call__(self, *vargs: Any, **kwargs: Any) -> Any:
        return self.hosted.call(self.method, list(vargs), kwargs)
