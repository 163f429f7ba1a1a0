"""The test job's side: ``Broker`` allocates, resource proxies drive what it got."""
from __future__ import annotations

import functools
import logging
from typing import Any

from ave.config import load_broker_config, resolve_home
from ave.equipment import load_types
from ave.network.control import RemoteControl
from ave.network.exceptions import ConnectionClosed, ConnectionRefused

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


class Resource(RemoteControl):
    """A proxy for one allocated item; its methods run in the holder's session.

    Calls wait as long as the resource works (a workspace command may run for an
    hour); only connecting is bounded by the broker client's timeout. A session's
    listening socket exists before the session runs, so a refused connection means
    the session is gone: no retrying.
    """

    def __init__(self, address: tuple[str, int], authkey: str, profile: dict,
                 timeout: float | None) -> None:
        super().__init__(address, authkey, timeout, optimist=False)
        self._resource = profile
        self._reply_timeout = None

    def __repr__(self) -> str:
        return f'<Resource {self._resource}>'

    def _call(self, method: str, vargs: tuple, kwargs: dict) -> Any:
        try:
            return super()._call(method, vargs, kwargs)
        except (ConnectionClosed, ConnectionRefused) as error:
            raise ConnectionClosed(f'the session holding {self._resource} is gone '
                                   f'({error})') from None


class Broker(RemoteControl):
    """A client of the broker: ``get()`` equipment by profile, use it, let go.

    Everything this object allocated is released when it (or its process) goes away,
    because the broker reclaims equipment when the connection drops.
    """

    def __init__(self, address: tuple[str, int] | None = None,
                 authkey: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                 home: str | None = None) -> None:
        if address is None:
            config = load_broker_config(resolve_home(home))
            address = (config['host'], config['port'])
        super().__init__(address, authkey, timeout)
        _import_equipment()

    def get(self, *profiles: dict | tuple) -> Resource | tuple[Resource, ...]:
        """Allocate equipment: one proxy for one profile, else a tuple in request order.

        A tuple of profiles must be satisfied from one stack. ``get(a, (b, c))``
        returns three proxies. On Busy or NoSuch everything this client held is
        released (its earlier proxies stop working) and the exception is raised.
        """
        reply = self._call('get', tuple(_wire(p) for p in profiles), {})
        host, port = reply['session']
        address = (host or self._address[0], port)
        proxies = tuple(Resource(address, reply['authkey'], profile, self._timeout)
                        for profile in reply['resources'])
        return proxies[0] if len(proxies) == 1 else proxies

    def yield_resources(self, *resources: Resource | dict) -> None:
        """Give some equipment back before the job ends."""
        profiles = [r._resource if isinstance(r, Resource) else dict(r) for r in resources]
        self._call('yield_resources', tuple(profiles), {})


def _wire(profile: Any) -> Any:
    """Stack groups travel as lists; anything else goes as given, for the broker to judge."""
    return list(profile) if isinstance(profile, tuple) else profile
