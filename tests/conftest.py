"""Shared test fixtures: real burrow processes on 127.0.0.1 with port 0."""

from __future__ import annotations

import os
import sys

import pytest

from tests.procs import BurrowProc, start_agent, start_edge

# Textual and rich must render colours in snapshot tests regardless of the caller's env.
os.environ.pop("NO_COLOR", None)
# Commands installed with the test extras (burrow, http) must be found by the shells and
# tools the tests start, also when pytest runs as .venv/bin/pytest without activation.
_bin = os.path.dirname(sys.executable)
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture
def edge(tmp_path) -> BurrowProc:
    proc = start_edge(tmp_path / "edge")
    yield proc
    proc.stop()


@pytest.fixture
def agents(edge, tmp_path):
    """Factory: ``agents(proto, addr, *flags)`` starts an agent against ``edge``."""
    started: list[BurrowProc] = []

    def make(proto: str, addr: str | int, *flags: str, check: bool = True) -> BurrowProc:
        proc = start_agent(edge, proto, str(addr), *flags, home=tmp_path / "home", check=check)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server per test process (see tests/pg.py)."""
    from tests.pg import PostgresServer, pg_bindir

    if pg_bindir() is None:  # like pebble and the SDKs: .ci/run installs it
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql; .ci/run does it)")
    server = PostgresServer()
    yield server
    server.close()


@pytest.fixture
def postgres_dsn(postgres_server) -> str:
    """A fresh empty database on the test process's PostgreSQL server."""
    return postgres_server.new_database()
