"""The test job's side: ``Broker`` allocates, resource proxies drive what it got."""
from __future__ import annotations

import functools
import getpass
import logging
import math
import os
import socket
import sys
from typing import Any, Mapping

import ave.broker.exceptions  # noqa: F401 (Busy, NoSuch, ... arrive typed without the job importing them)
from ave.config import load_broker_config, resolve_home
from ave.equipment import load_types
from ave.network.exceptions import ConnectionClosed, ConnectionRefused
from ave.network.remote import RemoteControl

DEFAULT_TIMEOUT = 5.0

log = logging.getLogger(__name__)


@functools.cache
def _import_equipment() -> None:
    """Import every equipment plug-in so that its exceptions arrive typed.

    A resource's error (RelayError, PathError, ...) is rebuilt by class name, which
    works only for classes this process has imported. A broken plug-in must not stop
    a test job from using the rest, so its failure is only logged.
    """
    try:
        load_types()
    except Exception:
        log.warning('could not load every equipment plug-in', exc_info=True)


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
    the session is gone: no retrying.
    """

    def __init__(self, address: tuple[str, int], authkey: str, profile: dict,
                 timeout: float | None) -> None:
        super().__init__(address, authkey, timeout, optimist=False, resource=profile,
                         reply_timeout=None)

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
        _import_equipment()

    def _connect(self) -> Any:
        try:
            return super()._connect()
        except ConnectionRefused:
            host, port = self._address
            raise ConnectionRefused(
                f'no broker listens on {host}:{port}: start one with ave-broker --start, '
                f'or check the address ({self._address_origin})') from None

    def _connected(self) -> None:
        self._call('hello', (identity(self._job),), {'__async__': True})

    def get(self, *profiles: dict | tuple, wait: float | None = 0,
            priority: int = 0) -> ResourceProxy | tuple[ResourceProxy, ...]:
        """Allocate equipment: one proxy for one profile, else a tuple in request order.

        A tuple of profiles must be satisfied from one stack. ``get(a, (b, c))``
        returns three proxies. ``wait`` is how many seconds to wait while the
        equipment is held by others (None: as long as it takes); ``priority`` puts
        the request ahead of lower ones. On Busy or NoSuch everything this client
        held is released (its earlier proxies stop working) and the exception is
        raised.
        """
        kwargs = _waiting(wait, priority)
        reply = self._call('get', tuple(_wire(p) for p in profiles), kwargs,
                           self._wait_bound(wait))
        proxies = tuple(self._proxy(granted) for granted in reply['resources'])
        return proxies[0] if len(proxies) == 1 else proxies

    def _proxy(self, granted: dict) -> ResourceProxy:
        """A proxy for one granted resource; its session may be on another host."""
        host, port = granted['session']
        return ResourceProxy((host or self._address[0], port), granted['authkey'],
                             granted['profile'], self._timeout)

    def _wait_bound(self, wait: float | None) -> float | None:
        """How long the reply to a get may take: the wait, plus the usual bound."""
        if wait is None or self._reply_timeout is None:
            return None
        return self._reply_timeout + wait

    def yield_resources(self, *resources: ResourceProxy | dict) -> None:
        """Give some equipment back before the job ends."""
        profiles = [r.profile if isinstance(r, ResourceProxy) else dict(r)
                    for r in resources]
        self._call('yield_resources', tuple(profiles), {})


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
