"""The test job's side: ``Broker`` allocates, resource proxies drive what it got.

A broker may die at any time (SIGKILL, the OOM killer, a bug); the sessions it
started keep serving their clients (DESIGN.md, "A broker crash loses no job"). So a
``Broker`` that holds equipment keeps the resume token of its first allocation and a
daemon thread that watches the broker connection for a hang-up without reading from
it. When it hangs up, the thread reconnects every ``RECONNECT_INTERVAL`` seconds
until a broker answers (refused connections are expected meanwhile), says ``hello``
again and ``resume``s with the token: the new broker has adopted the sessions and
binds the connection to the same holder, so ``get``, ``yield_resources`` and the
release at exit go on working. The thread notices the hang-up even while the job
sleeps for minutes between calls, which matters: a client that does not come back
within a few seconds of the new broker starting is taken for gone, and its
equipment is reclaimed.
"""
from __future__ import annotations

import getpass
import logging
import math
import os
import select
import socket
import sys
import threading
import time
import weakref
from typing import Any, Mapping

# Importing the module also makes every broker error arrive typed, without the job
# importing it.
from ave.broker.exceptions import Busy, NoSuch
from ave.broker.requests import RESET_PATIENCE
from ave.config import load_broker_config, resolve_home
from ave.equipment import load_types
from ave.exceptions import AveException, load_types_when_unknown
from ave.network.connection import BlockingConnection
from ave.network.exceptions import ConnectionClosed, ConnectionException, ConnectionRefused
from ave.network.remote import ClientConnection, ConnectionPool, RemoteControl

DEFAULT_TIMEOUT = 5.0
#: Seconds between attempts to reach a broker that went away. A broker restarted
#: after a crash is found this soon after it listens.
RECONNECT_INTERVAL = 0.2
#: How long the watcher keeps trying to resume after the broker went away: a little
#: longer than the sessions' default ``crash_grace`` (60 s), after which whatever
#: the client held has been torn down anyway. A later call still tries once more.
RESUME_PATIENCE = 75.0
#: How often the watcher looks up from waiting for a hang-up, to follow a new
#: connection or notice that its ``Broker`` object was dropped.
WATCH_TICK = 0.5
#: Sessions whose connections a client keeps for reuse (it has one per host it uses).
MAX_POOLS = 16

log = logging.getLogger(__name__)


def _import_equipment() -> None:
    """Import every equipment plug-in so that its exceptions arrive typed.

    A resource's error (RelayError, PathError, ...) is rebuilt by class name, which
    works only for classes this process has imported. Finding the plug-ins reads the
    metadata of every installed distribution (3-7 ms), so it is done when a reply
    first names a type this process does not know, not for every job's start. A
    broken plug-in must not stop a test job from using the rest, so its failure is
    only logged.
    """
    try:
        load_types()
    except Exception:
        log.warning('could not load every equipment plug-in', exc_info=True)


load_types_when_unknown(_import_equipment)


def job_label(job: str | None = None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The job a client works for: ``job``, else ``$AVE_JOB``, else the URL of the CI
    job running us (Jenkins, GitLab, GitHub Actions), else None."""
    if job:
        return job
    if environ.get('AVE_JOB'):
        return environ['AVE_JOB']
    for variable in ('BUILD_URL', 'CI_JOB_URL'):  # Jenkins, GitLab
        if environ.get(variable):
            return environ[variable]
    github = [environ.get(name) for name in
              ('GITHUB_SERVER_URL', 'GITHUB_REPOSITORY', 'GITHUB_RUN_ID')]
    if all(github):
        server, repository, run = github
        return f'{server}/{repository}/actions/runs/{run}'
    return None


def identity(job: str | None = None) -> dict:
    """What a client announces about itself: who runs it, where, and for which job.

    Self-declared and shown to people; the broker never decides anything by it.
    """
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {'user': user, 'host': socket.gethostname(), 'pid': os.getpid(),
            'program': sys.argv[0] if sys.argv and sys.argv[0] else sys.executable,
            'job': job_label(job)}


class ResourceProxy(RemoteControl):
    """A proxy for one allocated item; its methods run in the holder's session.

    Calls wait as long as the resource works (a workspace command may run for an
    hour); only connecting is bounded by the broker client's timeout. A session's
    listening socket exists before the session runs, so a refused connection means
    the session is gone: no retrying. The proxies of one session share the
    connections of its ``pool`` (the ``Broker`` keeps it), so a proxy may be used
    from several threads at once and a new proxy costs no new connection.
    """

    def __init__(self, address: tuple[str, int], authkey: str, profile: dict,
                 timeout: float | None, pool: ConnectionPool | None = None) -> None:
        super().__init__(address, authkey, timeout, optimist=False, resource=profile,
                         reply_timeout=None, pool=pool)

    @property
    def profile(self) -> dict:
        """The profile of the item this proxy drives."""
        assert self._resource is not None
        return dict(self._resource)

    def __repr__(self) -> str:
        return f'<ResourceProxy {self._resource}>'

    def _call(self, method: str, vargs: tuple, kwargs: dict, *args: Any) -> Any:
        try:
            return super()._call(method, vargs, kwargs, *args)
        except (ConnectionClosed, ConnectionRefused) as error:
            raise ConnectionClosed(f'the session holding {self._resource} is gone '
                                   f'({error})') from None


class Broker(RemoteControl):
    """A client of the broker: ``get()`` equipment by profile, use it, let go.

    Everything this object allocated is released when it (or its process) goes away,
    because the broker reclaims equipment when the connection drops. ``job`` labels
    what this client works for (else ``$AVE_JOB`` or the CI job's URL); the broker
    shows it beside everything this client holds.

    If the broker crashes, this object reconnects and resumes by itself (see the
    module's docstring); a call made while no broker runs waits up to ``timeout``
    for one to come back, then raises ConnectionRefused. One object may be used from
    several threads: calls on it take turns.
    """

    def __init__(self, address: tuple[str, int] | None = None,
                 authkey: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                 home: str | None = None, job: str | None = None) -> None:
        self._address_origin = 'given to Broker()'
        if address is None:
            config_home = resolve_home(home)
            self._address_origin = f'from {config_home}/.ave/config/broker.json'
            config = load_broker_config(config_home)
            address = (config['host'], config['port'])
        super().__init__(address, authkey, timeout, optimist=False)
        self._job = job
        # RemoteControl is not thread-safe; the watcher reconnects from its thread.
        self._lock = threading.RLock()
        self._token: str | None = None
        self._watcher: threading.Thread | None = None
        self._pools: dict[tuple[str, int, str], ConnectionPool] = {}  # see _pool_of

    def _call(self, method: str, vargs: tuple, kwargs: dict, *args: Any) -> Any:
        with self._lock:
            return super()._call(method, vargs, kwargs, *args)

    def _connect(self) -> ClientConnection:
        if self._connection is None and self._token is not None:
            return self._reconnect(self._timeout)
        try:
            return super()._connect()
        except ConnectionRefused:
            host, port = self._address
            raise ConnectionRefused(
                f'no broker listens on {host}:{port}: start one with ave-broker --start, '
                f'or check the address ({self._address_origin})') from None

    def _reconnect(self, patience: float | None) -> ClientConnection:
        """Reach the broker again after it went away, and resume (``_connected``).

        Tries every RECONNECT_INTERVAL seconds for up to ``patience`` seconds (None:
        until it works): while a crashed broker is being restarted, refused
        connections are the normal answer.
        """
        deadline = None if patience is None else time.monotonic() + patience
        while True:
            try:
                return super()._connect()
            except ConnectionException as error:
                if deadline is not None and time.monotonic() + RECONNECT_INTERVAL > deadline:
                    host, port = self._address
                    raise ConnectionRefused(
                        f'the broker at {host}:{port} went away and did not come back '
                        f'within {patience:g} s ({error}); this client resumes what it '
                        f'holds when one does') from None
            time.sleep(RECONNECT_INTERVAL)

    def _connected(self) -> None:
        """Introduce this client on a new connection, and after a lost one resume as
        the holder it was, if the broker still knows it."""
        self._call('hello', (identity(self._job),), {'__async__': True})
        if self._token is None:
            return
        try:
            self._call('resume', (self._token,), {})
        except AveException as error:
            log.warning('could not resume after losing the broker (%s); what this client '
                        'held is gone, and it carries on as a new client', error)
            self._token = None
            return
        log.info('resumed with the broker after losing the connection to it')

    def _hung_up(self, connection: BlockingConnection) -> None:
        """The watcher saw ``connection`` hang up: drop it, if it is still the one in use
        (a call may have dropped it already)."""
        with self._lock:
            if self._connection is connection:
                log.warning('the broker connection hung up (the broker stopped or '
                            'crashed); reconnecting')
                self._disconnect()

    def _retry_once(self) -> bool:
        """One attempt of the watcher to reconnect; True once connected."""
        with self._lock:
            if self._connection is None:
                try:
                    super()._connect()
                except ConnectionException:
                    return False
            return True

    def __exit__(self, *exc_info: Any) -> None:
        """Let go of everything: the broker reclaims it; nothing is resumed later."""
        with self._lock:
            self._token = None
            self._disconnect()
            self._close_pools()

    def _close_pools(self) -> None:
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()

    def get(self, *profiles: dict | tuple, wait: float | None = 0,
            priority: int = 0) -> ResourceProxy | tuple[ResourceProxy, ...]:
        """Allocate equipment: one proxy for one profile, else a tuple in request order.

        A tuple of profiles must be satisfied from one stack. ``get(a, (b, c))``
        returns three proxies. ``wait`` is how many seconds to wait while the
        equipment is held by others (None: as long as it takes); equipment that is
        only being reset is waited for even with 0, up to RESET_PATIENCE seconds (it
        is about to be free, where Busy would cost the session); ``priority`` puts
        the request ahead of lower ones. On Busy or NoSuch everything this client
        held is released (its earlier proxies stop working) and the exception is
        raised.

        A get in flight when the broker crashes (a waiting one, say) fails with
        ConnectionClosed saying so; what the client held before stays its own, and
        get() works again once a broker is back. The answer that was lost may have
        granted the request: ``list_allocations()`` then shows the items, which stay
        this client's until it yields them or ends.
        """
        kwargs = _waiting(wait, priority)
        try:
            reply = self._call('get', tuple(_wire(p) for p in profiles), kwargs,
                               self._wait_bound(wait))
        except (Busy, NoSuch):
            with self._lock:
                self._close_pools()  # the broker closed this client's sessions
            raise
        except ConnectionClosed as error:
            raise ConnectionClosed(
                f'lost the broker while waiting for the answer to get() ({error}); it '
                f'may have crashed. This client reconnects by itself: get() again '
                f'once it is back (an answer lost on its way would show in '
                f'list_allocations())') from None
        if reply.get('token') is not None:
            with self._lock:
                self._token = reply['token']
                self._watch()
        proxies = tuple(self._proxy(granted) for granted in reply['resources'])
        return proxies[0] if len(proxies) == 1 else proxies

    def _proxy(self, granted: dict) -> ResourceProxy:
        """A proxy for one granted resource; its session may be on another host."""
        host, port = granted['session']
        address = (host or self._address[0], port)
        return ResourceProxy(address, granted['authkey'], granted['profile'],
                             self._timeout, self._pool_of(address, granted['authkey']))

    def _pool_of(self, address: tuple[str, int], authkey: str) -> ConnectionPool:
        """The connections to one session, shared by its proxies. Only the most
        recently used MAX_POOLS sessions keep theirs (an older one has usually
        ended); the proxies of an evicted pool go on working, each call on a
        connection of its own."""
        key = (*address, authkey)
        with self._lock:
            pool = self._pools.pop(key, None) or ConnectionPool()
            self._pools[key] = pool  # last in the order: the most recently used
            while len(self._pools) > MAX_POOLS:
                self._pools.pop(next(iter(self._pools))).close()
        return pool

    def _watch(self) -> None:
        """Start the thread that resumes this client after a broker crash."""
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=_HangUpWatch(self).run,
                                             name='ave-broker-watch', daemon=True)
            self._watcher.start()

    def _wait_bound(self, wait: float | None) -> float | None:
        """How long the reply to a get may take: the wait (one that does not wait may
        still wait RESET_PATIENCE for items being reset), plus the usual bound."""
        if wait is None or self._reply_timeout is None:
            return None
        return self._reply_timeout + (wait or RESET_PATIENCE)

    def yield_resources(self, *resources: ResourceProxy | dict) -> None:
        """Give some equipment back before the job ends."""
        profiles = [r.profile if isinstance(r, ResourceProxy) else dict(r)
                    for r in resources]
        self._call('yield_resources', tuple(profiles), {})


class _HangUpWatch:
    """Watches a ``Broker``'s connection for a hang-up and resumes after one.

    It keeps only weak references to the ``Broker`` and its connection: a job that
    drops its ``Broker`` must still release everything at once, and that happens
    when the connection's socket is closed with the object. Waiting for the hang-up
    uses epoll on the socket with EPOLLRDHUP alone, so nothing is ever read from it
    (the replies belong to the calls) and a socket closed meanwhile simply leaves
    the interest list, whatever its descriptor number is reused for.
    """

    def __init__(self, broker: Broker) -> None:
        self._broker = weakref.ref(broker)
        self._poller = select.epoll()
        self._watched: weakref.ref[BlockingConnection] | None = None
        self._watched_fd = -1
        self._outage_began: float | None = None

    def run(self) -> None:
        try:
            while self._step():
                continue  # each step waits a tick for a hang-up, or tries to reconnect
        finally:
            self._poller.close()

    def _step(self) -> bool:
        """Wait a little for a hang-up, or try once to reconnect; False: stop watching."""
        broker = self._broker()
        if broker is None or broker._token is None:
            return False
        connection = self._follow(broker)
        if connection is None:
            return self._retry(broker)
        del broker  # not kept while waiting: the job may drop it meanwhile
        if self._poller.poll(WATCH_TICK):
            broker = self._broker()
            if broker is None:
                return False
            broker._hung_up(connection)
        return True

    def _follow(self, broker: Broker) -> BlockingConnection | None:
        """Watch the connection the broker uses now (None: it has none)."""
        connection = broker._connection
        watched = None if self._watched is None else self._watched()
        if connection is watched and connection is not None and not connection.closed:
            return connection
        if self._watched_fd >= 0:
            try:
                self._poller.unregister(self._watched_fd)
            except OSError:
                pass  # closed meanwhile: the kernel removed it already
        self._watched, self._watched_fd = None, -1
        if connection is None or connection.closed:
            return None
        try:
            self._poller.register(connection.fileno(), select.EPOLLRDHUP)
        except (OSError, ValueError):
            return None  # closed this very moment: the next step sees what replaced it
        self._watched_fd = connection.fileno()
        self._watched = weakref.ref(connection)
        self._outage_began = None
        return connection

    def _retry(self, broker: Broker) -> bool:
        now = time.monotonic()
        if self._outage_began is None:
            self._outage_began = now
        if now - self._outage_began > RESUME_PATIENCE:
            log.warning('no broker came back within %g s; no longer trying to resume '
                        '(the next call tries once more)', RESUME_PATIENCE)
            return False
        if not broker._retry_once():
            del broker
            time.sleep(RECONNECT_INTERVAL)
        return True


def _waiting(wait: float | None, priority: int) -> dict:
    """The get() keywords for waiting, checked here so a mistake is the caller's."""
    if wait is not None and (isinstance(wait, bool) or not isinstance(wait, (int, float))
                             or not math.isfinite(wait) or wait < 0):
        raise ValueError(f'wait must be a number of seconds >= 0, or None; got {wait!r}')
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f'priority must be an integer, got {priority!r}')
    if wait == 0 and priority == 0:
        return {}
    return {'wait': wait, 'priority': priority}


def _wire(profile: Any) -> Any:
    """Stack groups travel as lists; anything else goes as given, for the broker to judge."""
    return list(profile) if isinstance(profile, tuple) else profile
