"""Files and faults, with real edge and agent processes: data on disk is private, a
broken CA refuses to start, capture-database write failures are reported and retried,
and a clean stop writes the pending capture batch."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import READY_TIMEOUT, BurrowProc, edge_args, host_of, start_agent, start_edge
from tests.upstreams import HTTPUpstream

REPO = Path(__file__).resolve().parent.parent.parent


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@contextlib.contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def api(agent) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://{agent.ready['web_addr']}", timeout=20)


def public(edge) -> httpx.AsyncClient:
    host, port = edge.http_addr
    return httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=20)


async def until(cond, timeout: float = 20.0, what: str = "condition"):
    """Poll an async ``cond`` (bounded) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        got = await cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def rows_on_disk(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT count(*) FROM captures").fetchone()[0]


async def send(edge, agent, n: int) -> None:
    async with public(edge) as p:
        for i in range(n):
            r = await p.get(f"/r{i}", headers={"Host": host_of(agent.public_url)})
            assert r.status_code == 200


# ------------------------------------------------------------------ 17: private files
def start_edge_first_run(data_dir: Path) -> BurrowProc:
    """An edge given no credentials: it makes a pair and writes bootstrap.json."""
    args = edge_args(data_dir)
    for flag in ("--authtoken", "--api-key"):
        i = args.index(flag)
        del args[i : i + 2]
    proc = BurrowProc(args)
    proc.ready = proc.wait_event("ready", READY_TIMEOUT)
    return proc


async def test_data_dirs_and_databases_are_private_under_umask_022(tmp_path):
    edge_dir, db_dir = tmp_path / "edge", tmp_path / "home" / "captures"
    with umask(0o022):  # the processes inherit it
        edge = start_edge_first_run(edge_dir)
        try:
            token = json.loads((edge_dir / "bootstrap.json").read_text())["authtoken"]
            async with HTTPUpstream() as up:
                agent = start_agent(
                    edge,
                    "http",
                    str(up.port),
                    "--authtoken",
                    token,
                    "--inspect-db",
                    str(db_dir / "captures.db"),
                    home=tmp_path / "home",
                )
                try:
                    await send(edge, agent, 1)
                    await until(lambda: _written(db_dir / "captures.db", 1), what="capture on disk")
                    assert mode(db_dir) == 0o700
                    for name in ("captures.db", "captures.db-wal", "captures.db-shm"):
                        assert mode(db_dir / name) == 0o600, name
                finally:
                    agent.stop()
            for name in ("burrow.db", "burrow.db-wal", "burrow.db-shm", "bootstrap.json", "ca-key.pem"):
                assert mode(edge_dir / name) == 0o600, name
        finally:
            edge.stop()
    assert mode(edge_dir) == 0o700
    assert mode(edge_dir / "ca.pem") == 0o644  # the certificate is public: agents load it


async def _written(db: Path, n: int) -> bool:
    return db.exists() and rows_on_disk(db) >= n


def test_too_open_data_dir_and_files_are_tightened_on_start(tmp_path):
    """Files left 0644 by an older burrow (or a copy) are made 0600 and the dir 0700."""
    edge_dir = tmp_path / "edge"
    start_edge_first_run(edge_dir).stop()
    os.chmod(edge_dir, 0o755)
    loose = ["burrow.db", "bootstrap.json", "ca-key.pem"]
    for name in loose:
        os.chmod(edge_dir / name, 0o644)
    for side in ("burrow.db-wal", "burrow.db-shm"):  # as a crashed old run leaves them
        (edge_dir / side).touch(0o644)
        os.chmod(edge_dir / side, 0o644)
    with umask(0o022):
        edge = start_edge(edge_dir)
    try:
        assert mode(edge_dir) == 0o700
        for name in [*loose, "burrow.db-wal", "burrow.db-shm"]:
            assert mode(edge_dir / name) == 0o600, name
    finally:
        edge.stop()


def test_a_shared_directory_is_refused_as_data_dir(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    out = run_serve(shared)
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "shared directory" in out.stderr
    assert mode(shared) == 0o1777 and list(shared.iterdir()) == []


# ------------------------------------------------------------------ 18: a lost ca.pem
def run_serve(data_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backend", *edge_args(data_dir), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT,
    )


def test_missing_ca_certificate_refuses_to_start_and_keeps_the_key(tmp_path):
    data = tmp_path / "edge"
    start_edge(data).stop()
    key_before = (data / "ca-key.pem").read_bytes()
    (data / "ca.pem").unlink()
    # the database too is left as it was: the CA is checked before anything is written
    db_before = {p.name: p.read_bytes() for p in data.glob("burrow.db*")}
    out = run_serve(data, "--authtoken", "another-token")
    assert out.returncode != 0
    err = out.stderr.strip()
    assert err.count("\n") == 0, err  # one line, no traceback
    assert "ca.pem" in err and "missing" in err
    assert (data / "ca-key.pem").read_bytes() == key_before
    assert not (data / "ca.pem").exists()
    assert {p.name: p.read_bytes() for p in data.glob("burrow.db*")} == db_before


# ------------------------------------------------------------------ 19: failing capture db
@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs Linux prlimit")
async def test_capture_db_write_failure_is_reported_retried_and_recovers(edge, tmp_path):
    """RLIMIT_FSIZE on the running agent makes every write past byte 1 fail (EFBIG; Python
    ignores SIGXFSZ), like a full disk; lifting it must let the queued captures land."""
    db = tmp_path / "caps" / "captures.db"
    async with HTTPUpstream() as up:
        agent = start_agent(edge, "http", str(up.port), "--inspect-db", str(db), home=tmp_path / "home")
        try:
            async with api(agent) as c:
                await send(edge, agent, 1)
                await until(lambda: _written(db, 1), what="first capture on disk")

                async def healthy():
                    return (await c.get("/api/status")).json()["inspect_db"] == {
                        "ok": True,
                        "error": None,
                        "pending": 0,
                    }

                await until(healthy, what="a healthy inspect_db status")

                resource.prlimit(agent.pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
                await send(edge, agent, 20)

                async def failing():
                    st = (await c.get("/api/status")).json()["inspect_db"]
                    return st if not st["ok"] and st["pending"] == 20 else None

                st = await until(failing, what="the status to report the failing db")
                assert st["error"]
                await asyncio.sleep(2.0)  # a few retries (0.5 s, 1 s, ...) go by
                assert rows_on_disk(db) == 1
                logged = [ln for ln in agent.stderr.splitlines() if "write failed" in ln]
                assert len(logged) == 1, agent.stderr  # rate-limited: one line, not one per retry
                assert re.search(r"write failed \(.+\); \d+ captures kept in memory, retrying$", logged[0])
                assert len((await c.get("/api/requests/http")).json()["requests"]) == 21

                resource.prlimit(agent.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)

                async def recovered():
                    st = (await c.get("/api/status")).json()["inspect_db"]
                    return st["ok"] and st["pending"] == 0

                await until(recovered, what="the queued captures to be written")
                assert rows_on_disk(db) == 21
                assert "writing again" in agent.stderr
        finally:
            assert agent.stop() == 0
        # and they survive a restart
        again = start_agent(edge, "http", str(up.port), "--inspect-db", str(db), home=tmp_path / "home")
        try:
            async with api(again) as c:
                reqs = (await c.get("/api/requests/http")).json()["requests"]
                assert len(reqs) == 21
                assert sorted(r["request"]["uri"] for r in reqs) == sorted(["/r0", *(f"/r{i}" for i in range(20))])
        finally:
            again.stop()


# ------------------------------------------------------------------ 20: the pending batch
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
async def test_a_clean_stop_writes_the_pending_capture_batch(edge, tmp_path, sig):
    """With a batch interval of a minute the captures are surely still pending when the
    signal comes: only the stop path can have written them."""
    db = tmp_path / "captures.db"
    flags = ("--inspect-db", str(db), "--inspect-db-flush-ms", "60000")
    async with HTTPUpstream() as up:
        agent = start_agent(edge, "http", str(up.port), *flags, home=tmp_path / "home")
        async with api(agent) as c:
            await send(edge, agent, 5)
            assert (await c.get("/api/status")).json()["inspect_db"]["pending"] == 5
        assert rows_on_disk(db) == 0
        agent.proc.send_signal(sig)
        assert agent.wait_exit() == 0, agent.stderr
        assert rows_on_disk(db) == 5
        again = start_agent(edge, "http", str(up.port), *flags, home=tmp_path / "home")
        try:
            async with api(again) as c:
                assert len((await c.get("/api/requests/http")).json()["requests"]) == 5
        finally:
            again.stop()


async def test_kill_9_keeps_every_capture_already_written(edge, tmp_path):
    """What kill -9 can lose is what /api/status still counts as pending, nothing more."""
    db = tmp_path / "captures.db"
    async with HTTPUpstream() as up:
        agent = start_agent(edge, "http", str(up.port), "--inspect-db", str(db), home=tmp_path / "home")
        async with api(agent) as c:
            await send(edge, agent, 5)

            async def written():
                return (await c.get("/api/status")).json()["inspect_db"]["pending"] == 0

            await until(written, what="the batch to be written")
        agent.kill()
        again = start_agent(edge, "http", str(up.port), "--inspect-db", str(db), home=tmp_path / "home")
        try:
            async with api(again) as c:
                assert len((await c.get("/api/requests/http")).json()["requests"]) == 5
        finally:
            again.stop()


def test_agent_refuses_an_unusable_inspect_db_in_one_line(edge, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    agent = BurrowProc(
        [
            "http", "1", "--server-addr", edge.ready["ingress_addr"], "--root-cas", edge.ready["ca_file"],
            "--web-addr", "127.0.0.1:0", "--authtoken", "test-authtoken", "--json",
            "--inspect-db", str(blocker / "captures.db"),
        ],
        env={"BURROW_DATA_DIR": str(tmp_path / "home")},
    )
    assert agent.wait_exit() != 0
    err = agent.stderr.strip()
    assert err.count("\n") == 0 and "--inspect-db" in err, err
