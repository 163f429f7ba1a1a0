"""A pytest plugin for test engineers: lab equipment as fixtures.

Installed with AVE (entry point group ``pytest11``), so every pytest run in that
environment loads it. It adds two options, one marker and two fixtures, and does
nothing at all for a test that uses none of them: nothing is imported from the
broker and nobody is connected to until a test asks.

    import pytest

    @pytest.mark.ave('relay,uid=r1', {'type': 'workspace'}, wait=60)
    def test_power_cycle(ave_resources):
        relay, workspace = ave_resources
        relay.set_circuit('usb.pc.vcc', False)

- ``@pytest.mark.ave(PROFILE, ..., wait=0, priority=0)`` allocates the equipment
  before the test (all or nothing, as ``Broker.get``) and releases it after. A
  PROFILE is a dict, a string as ``ave`` takes it (``'relay,uid=r1'``), or a tuple
  of those for equipment of one stack. ``wait`` is how many seconds to wait while
  others hold it (None: as long as it takes). Busy and NoSuch are errors of the
  test's set-up, in one line.
- ``ave_resources``: the proxies, a tuple in profile order (a stack's members in
  place of its tuple).
- ``ave_broker``: a ``Broker`` for the test, disconnected (so everything it holds is
  released) when the test ends. Its job label, shown by ``ave who``, is the test's
  node id (after ``$AVE_JOB`` or the CI job's URL, when there is one).
- ``--ave-broker HOST:PORT`` names the broker; otherwise it is found through
  ``--ave-home DIR``, else the default home (``/etc/ave/user``, ``$HOME``).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

MARKER = 'ave'
_MARKER_KEYWORDS = ('wait', 'priority')
#: Longest wait, after a test, for its equipment to be reset by the broker.
RELEASE_WAIT = 60.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup('ave', 'AVE lab equipment (fixtures ave_broker, ave_resources)')
    group.addoption('--ave-broker', metavar='HOST:PORT',
                    help="the AVE broker to allocate from (default: the home's broker.json)")
    group.addoption('--ave-home', metavar='DIR',
                    help='the AVE home whose broker.json names the broker (default: the '
                         'one in /etc/ave/user, else $HOME)')


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        'markers', f'{MARKER}(*profiles, wait=0, priority=0): allocate AVE equipment '
                   'before the test and release it after; the ave_resources fixture '
                   'holds the proxies')


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test with the marker gets its equipment even when it does not ask for the
    proxies: holding the equipment may be all it needs."""
    for item in items:
        names = getattr(item, 'fixturenames', None)
        if names is not None and 'ave_resources' not in names \
                and item.get_closest_marker(MARKER) is not None:
            names.append('ave_resources')


@pytest.fixture
def ave_broker(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A Broker for this test; everything it holds is released after the test."""
    from ave.broker import Broker
    from ave.broker.client import job_label
    from ave.cli.connect import parse_address
    from ave.config import existing_home
    from ave.exceptions import AveException

    address, home = request.config.getoption('--ave-broker'), \
        request.config.getoption('--ave-home')
    label = job_label()
    job = request.node.nodeid if label is None else f'{label} {request.node.nodeid}'
    try:
        broker = Broker(parse_address(address) if address else None,
                        home=existing_home(home) if home else None, job=job)
    except (AveException, ValueError) as error:
        pytest.fail(f'ave: {error}', pytrace=False)
    with broker:
        yield broker


@pytest.fixture
def ave_resources(request: pytest.FixtureRequest, ave_broker: Any) -> Iterator[tuple]:
    """The equipment ``@pytest.mark.ave`` asked for, as proxies in profile order.

    After the test it is given back, and the fixture waits (up to RELEASE_WAIT
    seconds) until the broker has reset it, so that the next test asking for the
    same equipment finds it available rather than still being released.
    """
    from ave.cli.holding import release
    from ave.exceptions import AveException
    from ave.network.exceptions import ConnectionException

    marker = request.node.get_closest_marker(MARKER)
    if marker is None:
        pytest.fail(f'ave_resources needs @pytest.mark.{MARKER}(PROFILE, ...) on the test',
                    pytrace=False)
    profiles = [_request(arg) for arg in marker.args]
    unknown = sorted(set(marker.kwargs) - set(_MARKER_KEYWORDS))
    if not profiles or unknown:
        pytest.fail(f'@pytest.mark.{MARKER} takes profiles and the keywords wait and '
                    f'priority; got {len(profiles)} profiles and {unknown or "no other"} '
                    'keywords', pytrace=False)
    try:
        granted = ave_broker.get(*profiles, **marker.kwargs)
    except (AveException, ConnectionException, ValueError) as error:
        pytest.fail(f'ave: {type(error).__name__}: {error}', pytrace=False)
    proxies = granted if isinstance(granted, tuple) else (granted,)
    yield proxies
    release(ave_broker, [proxy.profile for proxy in proxies], RELEASE_WAIT)


def _request(value: Any) -> Any:
    """A marker argument as ``Broker.get`` takes it: strings parsed as ``ave`` parses
    PROFILE arguments, tuples (and JSON lists) becoming stack groups."""
    from ave.cli.profiles import ProfileSyntaxError, parse_request

    if isinstance(value, tuple):
        return tuple(_request(member) for member in value)
    if isinstance(value, str):
        try:
            parsed = parse_request(value)
        except ProfileSyntaxError as error:
            pytest.fail(f'@pytest.mark.{MARKER}: {error}', pytrace=False)
        return tuple(parsed) if isinstance(parsed, list) else parsed
    return value
