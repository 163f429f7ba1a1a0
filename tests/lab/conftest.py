"""Fixtures for everything that needs a real etcd: one member, or a cluster of three.

``etcd_node`` is a started, healthy single-member cluster; ``etcd_cluster`` three
members with a leader. Both live in the test's tmp_path, are stopped (and killed if
they linger, resumed first if paused) whatever the test's outcome, and skip the test
with the reason when /usr/bin/etcd is not installed. When a test fails, the tail of
each member's log is added to its report.

The machinery is in ``etcd_process`` beside this file, for tests elsewhere (import it
after putting this directory on sys.path) and for ``bench/etcd_ops.py``.
"""
from __future__ import annotations

from typing import Iterator

import pytest

from etcd_process import EtcdCluster, EtcdNode, missing_reason, start_cluster

_NODES = pytest.StashKey[list[EtcdNode]]()


def _require_etcd() -> None:
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def etcd_node(request: pytest.FixtureRequest, tmp_path) -> Iterator[EtcdNode]:
    """One etcd member on 127.0.0.1, healthy; ``etcd_node.endpoint`` is its URL."""
    _require_etcd()
    cluster = start_cluster(tmp_path / 'etcd', 1)
    request.node.stash[_NODES] = cluster.nodes
    try:
        yield cluster.nodes[0]
    finally:
        cluster.stop()


@pytest.fixture
def etcd_cluster(request: pytest.FixtureRequest, tmp_path) -> Iterator[EtcdCluster]:
    """Three etcd members on 127.0.0.1 with a leader; see ``EtcdCluster``."""
    _require_etcd()
    cluster = start_cluster(tmp_path / 'etcd', 3)
    request.node.stash[_NODES] = cluster.nodes
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for node in item.stash.get(_NODES, []):
            report.sections.append((f'etcd {node.name} log (tail)', node.log_tail()))
