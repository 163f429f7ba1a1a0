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

A session outlives its broker. A broker that stops in order says ``end()`` first,
and the session ends at once. A link that drops without that notice means the broker
crashed: the session is *orphaned*. It keeps serving its client, looks for the next
broker of its home every ``RETRY_INTERVAL`` seconds (``ave.broker.rendezvous``) and
presents itself there; adopted, it carries on with the new broker as its link. If no
broker adopts it within ``crash_grace`` seconds it tears down and ends as if its
client had left. SIGTERM still means: tear down and end now.

A session may be forked as the broker's *spare* before any client needs it
(``ave.broker.sessions``): it is called ``SPARE_PROC_NAME`` and serves nobody until the
broker's ``assigned`` names its client, which comes before any resource. When its
client is gone the broker may ``recycle`` it instead of ending it: the session takes
a new key, closes every client connection, tears everything down as an ending session
does and, if all of that finished cleanly, becomes a spare again. A new process per
job cost more CPU than the rest of a job's start together (the fork, copy-on-write
faults in broker and session alike, a thread's start, the exit); what a job could
leave in the process is gone by then: its connections, its resources, its commands
(each command's sandbox dies with it), and nothing a client sends is ever run as code.
Anything unusual (a teardown that failed or did not finish, a call still running)
ends the process as before.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import signal
import socket as socketlib
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from ave import sandbox
from ave.broker import rendezvous
from ave.broker.exceptions import NotAllocated
from ave.equipment import EquipmentType, Resource
from ave.exceptions import AuthError, AveException, Exit, details_of
from ave.network.connection import Connection
from ave.network.control import Control
from ave.network.exceptions import ConnectionClosed

log = logging.getLogger(__name__)

Key = tuple[str, str]

#: How long ending the session waits for a call still running on a resource (after
#: its commands were killed) before tearing the resource down regardless.
CALL_DRAIN_TIMEOUT = 2.0

#: How long ending the session waits for the teardowns of resources it gave back
#: earlier (a relay reset under way). One that takes longer is killed and left to the
#: broker, which reclaims what a session ended without reporting released.
RELEASE_DRAIN_TIMEOUT = 20.0

#: How long a recycled session waits for its worker threads to finish what they were
#: doing (a teardown's last steps) before it gives up and ends instead.
RECYCLE_IDLE_TIMEOUT = 1.0
#: The shortest session key ``recycle`` accepts (as made by ``secrets.token_urlsafe(32)``).
MIN_KEY_LENGTH = 32
#: Keys of the jobs a recycled session served last, still recognised so that a job
#: whose session ended hears ``Exit`` (as from a session that is gone) rather than
#: that its key is wrong; each costs every handshake one more HMAC.
RETIRED_KEYS = 8
RETIRED = 'retired-'  # the accounts that recognise them: retired-0, retired-1, ...
#: How far a session's resident memory and open descriptors may have grown since the
#: process started (as a spare, mostly) and still be recycled. Nothing a job does is known to leave
#: either behind (a test watches both over 44 jobs); these bounds make that a promise
#: even for a plug-in that leaks, by ending such a process instead of reusing it.
RECYCLE_MEMORY_GROWTH = 64 * 2**20
RECYCLE_DESCRIPTOR_GROWTH = 32

#: Process names: a session's, and a spare's until it is assigned (the kernel keeps
#: 15 characters, so the two still differ there).
SESSION_PROC_NAME = 'ave-broker-session'
SPARE_PROC_NAME = 'ave-broker-spare'


class Hosted:
    """One resource in a session: built at once, set up in a thread, used one call
    at a time. Calls that arrive during set-up wait for it; after a failed set-up
    they raise its error."""

    def __init__(self, key: Key, profile: dict, resource: Resource | None,
                 failure: dict | None = None) -> None:
        self.key = key
        self.profile = profile
        self.since = time.time()
        self.resource = resource
        self.failure = failure
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.released = threading.Event()  # set once release() has torn it down
        self.clean = False  # what release() found
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

    def release(self) -> bool:
        """Tear down for a release, in a worker thread. ``released`` tells a session
        that ends meanwhile when the outcome (``clean``) is known."""
        try:
            self.clean = self.tear_down()
        finally:
            self.released.set()
        return self.clean


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

    home: str  # always given: the rendezvous and its marker live there

    def __init__(self, listener: socketlib.socket, authkey: str,
                 broker_socket: socketlib.socket, types: dict[str, EquipmentType],
                 home: str, logging: bool = False,
                 isolated: bool = False, hidden: tuple[str, ...] = (),
                 crash_grace: float = 0.0, client: dict | None = None,
                 spare: bool = False) -> None:
        super().__init__(0, authkey=authkey, socket=listener, home=home, logging=logging,
                         proc_name=SPARE_PROC_NAME if spare else SESSION_PROC_NAME)
        self.broker = Connection(('broker', 0), broker_socket)
        self.types = types
        self.hosted: dict[Key, Hosted] = {}
        self.releasing: dict[Key, Hosted] = {}  # torn down now, not yet reported released
        self.isolated = isolated
        self.hidden = hidden
        self.crash_grace = crash_grace
        client = client or {}
        self.client_identity: dict = client.get('identity') or {}
        self.client_token: str | None = client.get('token')
        self.orphaned_at: float | None = None  # monotonic time the broker was lost
        self.spare = spare
        self.ending = False  # tearing down for good: a broker that leaves now is expected
        self.retired_keys: deque[str] = deque(maxlen=RETIRED_KEYS)
        self._marker = -1
        self._footprint_at_start = Footprint(0, 0)

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
        self._hold_marker()
        self._footprint_at_start = Footprint.now()
        if self.spare:  # start the worker thread now, not on the first client's time
            self.run_in_thread(lambda: None, _Then(lambda _: None, self._log_failure))

    def _hold_marker(self) -> None:
        """A session that may outlive its broker lets the next broker know it exists."""
        if self.crash_grace <= 0 or self._marker >= 0:
            return
        try:
            self._marker = rendezvous.hold_marker(self.home)
        except OSError as error:
            log.warning('cannot open %s (%s): a broker started after a crash will '
                        'not wait for this session', rendezvous.marker_path(self.home),
                        error)

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
            self.hosted[key] = Hosted(key, dict(profile), None, details_of(error))
            return
        hosted = self.hosted[key] = Hosted(key, dict(profile), resource)
        self.run_in_thread(lambda: hosted.set_up(tainted),
                           _Then(lambda _: None, self._log_failure))

    @Control.rpc
    def assigned(self, client: Any, crash_grace: Any = 0.0) -> None:
        """A spare becomes the session of ``client`` (its identity and resume-token
        digest, or None for a lab's job from another host), outliving a crash of its
        broker for ``crash_grace`` seconds (one-way, broker only)."""
        self._require_broker()
        client = client if isinstance(client, dict) else {}
        self.client_identity = client.get('identity') or {}
        self.client_token = client.get('token')
        self.crash_grace = _grace_or(crash_grace, self.crash_grace)
        self.spare = False
        self.proc_name = SESSION_PROC_NAME
        self.perform_prctl()
        self._hold_marker()

    @Control.rpc
    def remove_resource(self, profile: dict) -> None:
        """Tear an item down, then tell the broker it may go to someone else."""
        self._require_broker()
        key = self._key_of(profile)
        hosted = self.hosted.pop(key, None)
        if hosted is None:
            self._report_released(profile, False)
            return
        self.releasing[key] = hosted
        self.stop_commands(hosted)
        self.run_in_thread(hosted.release, _Then(
            lambda clean: self._torn_down(key, profile, clean is True),
            lambda error: self._torn_down(key, profile, False)))

    def _torn_down(self, key: Key, profile: dict, clean: bool) -> None:
        if self.releasing.pop(key, None) is not None:  # else shutdown() reported it
            self._report_released(profile, clean)

    def stop_commands(self, hosted: Hosted | None = None) -> None:
        """Kill the commands running for one resource (None: for all of them but the
        teardowns of resources being released), so a call blocked in them returns
        and the resource can be torn down. This waits (briefly) until they are gone:
        nothing of them outlives the teardown."""
        if hosted is None:
            sandbox.current().kill(spare=[releasing.resource for releasing
                                          in self.releasing.values()
                                          if releasing.resource is not None])
        elif hosted.resource is not None:
            sandbox.current().kill(hosted.resource)

    def _report_released(self, profile: dict, clean: bool) -> None:
        """Tell the broker an item is free, and whether its teardown succeeded.

        Without a broker the report is dropped: the next broker, not told about the
        item, takes it for free and has it reset before its next holder uses it. (A
        broker that stops in order does not wait for the reports of ending sessions.)
        """
        try:
            self.notify(self.broker, 'released', profile, clean)
        except ConnectionClosed:
            log.info('broker gone: could not report %s released', profile)

    @Control.rpc
    def end(self) -> None:
        """The broker stops in order: end now (one-way, broker only)."""
        self._require_broker()
        self.shutdown('the broker has stopped')

    @Control.rpc
    def recycle(self, authkey: Any) -> None:
        """The client is gone: tear its equipment down and wait for the next client as
        a spare under the new ``authkey``, or end if anything did not come down cleanly
        or the process has grown past the bounds of reuse (one-way, broker only). The
        broker hears ``recycled`` or sees the process end."""
        self._require_broker()
        if not isinstance(authkey, str) or len(authkey) < MIN_KEY_LENGTH:
            raise AveException('recycle() takes a new session key')
        self._retire_key(authkey)
        self.crash_grace = 0.0  # no client to outlive a broker crash for
        self.ending = True  # a broker lost meanwhile is seen below, not halfway through
        self._drop_marker()
        self.drop_peers('the session has ended', keep=self.broker)
        clean = self._tear_down_everything(time.monotonic() + RELEASE_DRAIN_TIMEOUT)
        if not (clean and self.threads_idle(RECYCLE_IDLE_TIMEOUT)):
            log.warning('not every resource came down cleanly; ending the session')
            self.shutdown('the session has ended')
            return
        growth = self._footprint_at_start.outgrown_by(Footprint.now())
        if growth:
            log.warning('%s since the session started; ending it instead of reusing it',
                        growth)
            self.shutdown('the session has ended')
            return
        self._forget_client()
        try:
            self.notify(self.broker, 'recycled')
        except ConnectionClosed:
            self.shutdown('the broker is gone')

    def _retire_key(self, authkey: str) -> None:
        """Serve under ``authkey`` from now on: the old key opens nothing any more, and
        is only recognised to tell its holder that its session ended."""
        if self.authkey is not None:
            self.retired_keys.append(self.authkey)
        self.alt_keys = {f'{RETIRED}{n}': key for n, key in enumerate(self.retired_keys)}
        self.authkey = authkey

    def _forget_client(self) -> None:
        """Become a spare: nothing of the client stays, its garbage included (a
        resource's cycles may hold descriptors)."""
        self.client_identity = {}
        self.client_token = None
        self.orphaned_at = None
        self.spare = True
        self.ending = False
        self.proc_name = SPARE_PROC_NAME
        self.perform_prctl()
        sandbox.install(sandbox.Sandbox(self.isolated, self.hidden))
        gc.collect()

    @Control.rpc
    def adopted(self, crash_grace: Any = None) -> None:
        """A new broker took this session over (one-way, broker only); its
        ``crash_grace`` applies from now on."""
        self._require_broker()
        if self.orphaned_at is not None:
            log.info('adopted by the broker of %s after %.1f s on our own', self.home,
                     time.monotonic() - self.orphaned_at)
        self.orphaned_at = None
        self.crash_grace = _grace_or(crash_grace, self.crash_grace)

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
            if self.caller is not None and any(account.startswith(RETIRED)
                                               for account in self.caller.accounts):
                raise Exit('the session has ended')
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

    # -- outliving the broker ----------------------------------------------------------

    def lost_connection(self, connection: Connection, authkey: str | None) -> None:
        """The broker went without saying ``end()``: it crashed. Serve on and look
        for the next one (with a grace of 0, end as sessions always did)."""
        if connection is not self.broker or not self.keep_going or self.ending:
            return
        if self.crash_grace <= 0:
            log.warning('broker connection lost; ending the session')
            self.shutdown()
            return
        if self.orphaned_at is None:
            self.orphaned_at = orphaned_at = time.monotonic()
            log.warning('lost the broker without notice (a crash?): serving on, and '
                        'ending in %g s unless a new broker adopts this session',
                        self.crash_grace)
            self.call_later(self.crash_grace, lambda: self._grace_over(orphaned_at))
        self.call_later(rendezvous.RETRY_INTERVAL, self._seek_broker)

    def _seek_broker(self) -> None:
        """Try once to reach a broker of this home and present this session to it; the
        broker closes the connection if it does not adopt it, and we try again."""
        if self.orphaned_at is None or not self.keep_going or not self.broker.closed:
            return
        sock = rendezvous.connect(self.home)
        if sock is None:
            self.call_later(rendezvous.RETRY_INTERVAL, self._seek_broker)
            return
        link = Connection(('broker', 0), sock)
        link.queue(self.presentation().encode())
        self.broker = link
        self.add_connection(link, self.authkey)

    def presentation(self) -> rendezvous.Presentation:
        """What a new broker must know to adopt this session."""
        return rendezvous.Presentation(
            os.getpid(), self.port or 0, self.authkey or '', self.client_identity,
            self.client_token,
            tuple(rendezvous.Hosting(h.profile, h.since) for h in self.hosted.values()),
            tuple(hosted.profile for hosted in self.releasing.values()))

    def _grace_over(self, orphaned_at: float) -> None:
        if self.orphaned_at == orphaned_at and self.keep_going:
            log.warning('no broker adopted this session within %g s; ending it',
                        self.crash_grace)
            self.shutdown('no broker adopted the session after its broker was lost')

    # -- ending ------------------------------------------------------------------------

    def shutdown(self, details: dict | str | None = None) -> None:
        """Stop every command, tear every resource down and report it, then tell the
        clients that the session ended.

        Resources given back earlier are still being torn down in worker threads, and
        the process ends with this call: their teardowns are waited for and reported
        here, so a relay released just before its client left is reset once, by its
        session, and not cut off halfway.
        """
        if not self.keep_going:
            return
        self.ending = True
        self._drop_marker()
        self._tear_down_everything(time.monotonic() + RELEASE_DRAIN_TIMEOUT)
        super().shutdown(details or 'the session has ended')

    def _drop_marker(self) -> None:
        """A session without a client to serve presents itself to no broker."""
        if self._marker >= 0:
            os.close(self._marker)
            self._marker = -1

    def _tear_down_everything(self, releases_due: float) -> bool:
        """Stop every command, tear every resource down and report it released;
        True if every teardown finished and succeeded."""
        self.stop_commands()
        clean = True
        for hosted in list(self.hosted.values()):
            torn_down = hosted.tear_down(CALL_DRAIN_TIMEOUT)
            self._report_released(hosted.profile, torn_down)
            clean = clean and torn_down
        self.hosted.clear()
        return self._finish_releases(releases_due) and clean

    def _finish_releases(self, due: float) -> bool:
        """Report the teardowns under way that end by ``due``; kill what is left of
        the others, which the broker reclaims once this session has ended. True if
        every one ended in time and succeeded."""
        clean = True
        for hosted in list(self.releasing.values()):
            if hosted.released.wait(max(0.0, due - time.monotonic())):
                self._report_released(hosted.profile, hosted.clean)
                clean = clean and hosted.clean
            else:
                clean = False
        self.releasing.clear()
        sandbox.current().kill()
        return clean


@dataclass(frozen=True)
class Footprint:
    """What a process holds that a leak would grow: resident bytes, open descriptors."""
    resident: int
    descriptors: int

    @staticmethod
    def now() -> 'Footprint':
        with open('/proc/self/statm', 'rb') as statm:
            resident_pages = int(statm.read().split()[1])
        return Footprint(resident_pages * os.sysconf('SC_PAGE_SIZE'),
                         len(os.listdir('/proc/self/fd')))

    def outgrown_by(self, later: 'Footprint') -> str:
        """What grew past the bounds a recycled session keeps to ('' if nothing)."""
        if later.resident - self.resident > RECYCLE_MEMORY_GROWTH:
            return (f'resident memory grew by {(later.resident - self.resident) >> 20} '
                    'MiB')
        if later.descriptors - self.descriptors > RECYCLE_DESCRIPTOR_GROWTH:
            return f'{later.descriptors - self.descriptors} more descriptors are open'
        return ''


def _grace_or(value: Any, current: float) -> float:
    """The crash grace the broker sent, if it is a number of seconds; else ``current``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value) and value >= 0:
        return float(value)
    return current


class _ResourceCall:
    """A resource method as ``rpc_function`` found it, bound to the resource it runs
    on: calling it waits for the resource's set-up and for its other calls."""

    __slots__ = ('hosted', 'method')

    def __init__(self, hosted: Hosted, method: Callable) -> None:
        self.hosted = hosted
        self.method = method

    def __call__(self, *vargs: Any, **kwargs: Any) -> Any:
        return self.hosted.call(self.method, list(vargs), kwargs)
