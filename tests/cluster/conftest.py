"""Fixtures for the multi-edge tests (see tests/cluster/harness.py).

- ``cluster3``: three edges on one fresh PostgreSQL database, on 127.0.0.2, .3 and .4,
  started once per test module (kill or freeze edges only in a module of your own, or
  restart them with ``cluster3.restart(i)`` before the next test needs them).
- ``make_cluster``: ``make_cluster(n=3, extra=(...), pg_proxy=False, start=True)`` for a
  cluster of a test's own (closed at the end of the test).
- ``fault_proxy``: ``fault_proxy(listen_host, (target_host, target_port))`` -> a started
  :class:`~tests.cluster.harness.FaultProxy`, closed at the end of the test.
"""

from __future__ import annotations

import pytest

from tests.cluster.harness import Cluster, FaultProxy


@pytest.fixture(scope="module")
def cluster3(postgres_server, tmp_path_factory):
    c = Cluster(postgres_server.new_database(), tmp_path_factory.mktemp("cluster3"), n=3)
    try:
        c.start()
        yield c
    finally:
        c.close()


@pytest.fixture
def make_cluster(postgres_server, tmp_path):
    made: list[Cluster] = []

    def make(n: int = 3, extra: tuple[str, ...] = (), pg_proxy: bool = False, start: bool = True) -> Cluster:
        c = Cluster(postgres_server.new_database(), tmp_path / f"cluster{len(made)}", n=n, extra=extra,
                    pg_proxy=pg_proxy)
        made.append(c)
        return c.start() if start else c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def fault_proxy():
    made: list[FaultProxy] = []

    def make(listen_host: str, target: tuple[str, int]) -> FaultProxy:
        px = FaultProxy(listen_host, target).start()
        made.append(px)
        return px

    yield make
    for px in made:
        px.close()
