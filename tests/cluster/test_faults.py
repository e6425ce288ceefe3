"""Cluster faults (issue 17): PostgreSQL down for everyone, an edge frozen by SIGSTOP.

One cluster of three real edges for the module; the tests run in order (PostgreSQL's
outage first, then the frozen edge).
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time

import httpx
import pytest

from tests.cluster.edges import (
    HA1,
    IPS,
    http_get,
    port_of,
    sql,
    start_cluster,
    status_of,
    stop_cluster,
    tcp_echo,
    wait_until,
)
from tests.procs import BurrowProc, host_of, start_agent


@pytest.fixture(scope="module")
def cluster(postgres_server, tmp_path_factory):
    c = start_cluster(postgres_server, tmp_path_factory.mktemp("faults"))
    started: list[BurrowProc] = []
    c["agents"] = started
    yield c
    for a in started:
        a.stop()
    stop_cluster(c)


def agent(c: dict, edge: int, proto: str, addr: str, name: str) -> BurrowProc:
    proc = start_agent(c["edges"][edge], proto, addr, *HA1, home=c["root"] / "home" / name)
    c["agents"].append(proc)
    return proc


def drain(proc: BurrowProc) -> list[dict]:
    """Every event the process printed so far."""
    while True:
        try:
            proc.seen.append(proc.events.get_nowait())
        except queue.Empty:
            return proc.seen


def named(proc: BurrowProc, name: str) -> list[dict]:
    return [e for e in drain(proc) if e.get("event") == name]


class Traffic:
    """Requests in a loop from a thread until stopped: http via the owning edge and via a
    peer edge, tcp via a peer edge; every failure is recorded."""

    def __init__(self, targets: list) -> None:
        self.targets = targets
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        clients = {}
        n = 0
        try:
            while not self._stop.is_set() and n < 100_000:
                for kind, ip, port, host in self.targets:
                    n += 1
                    try:
                        if kind == "http":
                            c = clients.get((ip, port))
                            if c is None:
                                c = clients[(ip, port)] = httpx.Client(base_url=f"http://{ip}:{port}", timeout=5)
                            r = c.get(f"/n{n}", headers={"Host": host})
                            good = r.status_code == 200 and r.text == f"GET /n{n}\n"
                            detail = f"{r.status_code} {r.text[:80]!r}"
                        else:
                            payload = b"n%d" % n
                            got = tcp_echo(ip, port, payload)
                            good = got == payload
                            detail = repr(got)
                    except (httpx.HTTPError, OSError) as exc:
                        good, detail = False, repr(exc)
                    if good:
                        self.ok += 1
                    else:
                        self.errors.append(f"{time.monotonic():.3f} {kind} {ip}:{port}: {detail}")
                time.sleep(0.01)
        finally:
            for c in clients.values():
                c.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def test_postgres_down_for_10s(cluster):
    c = cluster
    e1, e2, _e3 = c["edges"]
    ups = c["ups"]
    web = agent(c, 1, "http", str(ups.http.port), "web")
    tcp = agent(c, 1, "tcp", str(ups.echo.port), "tcp")
    probe = agent(c, 2, "http", str(ups.http.port), "probe")
    host, probe_host = host_of(web.public_url), host_of(probe.public_url)
    tport = port_of(tcp.public_url)
    ip1, p1 = e1.http_addr
    ip2, p2 = e2.http_addr
    assert wait_until(lambda: http_get(ip1, p1, host).status_code == 200, 5)
    assert wait_until(lambda: http_get(ip1, p1, probe_host).status_code == 200, 5)
    assert wait_until(lambda: tcp_echo(IPS[0], tport, b"hi") == b"hi", 5)
    before = {r["id"]: r["node_id"] for r in sql(c["dsn"], "SELECT id, node_id FROM sessions")}
    epochs = {r["node_id"]: r["epoch"] for r in sql(c["dsn"], "SELECT node_id, epoch FROM edges")}
    assert len(before) == 3

    traffic = Traffic([("http", ip1, p1, host), ("http", ip2, p2, host), ("tcp", IPS[0], tport, "")])
    try:
        time.sleep(0.5)
        c["pg"].stop()
        down_at = time.monotonic()
        # the API: a retryable 503 in ngrok's error format
        api = httpx.get(
            e1.ready["api_url"] + "/endpoints",
            headers={"Authorization": "Bearer test-api-key", "Ngrok-Version": "2"},
            timeout=10,
        )
        assert api.status_code == 503, api.text
        assert api.headers.get("retry-after") == "1"
        assert api.json()["status_code"] == 503
        # while it is down an agent leaves: its edge cannot write that yet
        time.sleep(max(0.0, 2 - (time.monotonic() - down_at)))
        probe.stop()
        time.sleep(max(0.0, 10 - (time.monotonic() - down_at)))
        served_during = traffic.ok
        c["pg"].start()
        up_at = time.monotonic()
        # resync: edge 1 learns that the probe's endpoint (on edge 3) is gone
        gone = wait_until(lambda: http_get(ip1, p1, probe_host).status_code == 404, 10)
        resync = time.monotonic() - up_at
        assert gone, "edge 1 still routes the endpoint that went away during the outage"
        # past the janitors' grace (one TTL of healthy renewals) and then some
        time.sleep(max(0.0, 5 - (time.monotonic() - up_at)))
    finally:
        traffic.stop()
        if c["pg"].psql("SELECT 1") != "1":
            c["pg"].start()
    print(f"PostgreSQL down 10 s: {traffic.ok} requests served, {served_during} during the outage; "
          f"resync {resync * 1000:.0f} ms after it came back")
    assert traffic.errors == [], traffic.errors[:5]
    assert served_during > 50
    assert resync < 5.0
    after = {r["id"]: r["node_id"] for r in sql(c["dsn"], "SELECT id, node_id FROM sessions")}
    # nobody reaped: the two sessions that stayed are there, the probe's is gone
    assert {k: v for k, v in before.items() if v == "edge2"} == after
    assert {r["node_id"]: r["epoch"] for r in sql(c["dsn"], "SELECT node_id, epoch FROM edges")} == epochs
    for e in c["edges"]:
        assert named(e, "cluster_reaped") == [] and named(e, "cluster_fenced") == []


def test_sigstop_edge_is_reaped_and_fences_itself(cluster):
    c = cluster
    e1, e2, _e3 = c["edges"]
    ups = c["ups"]
    victim = agent(c, 1, "http", str(ups.http.port), "victim")
    host = host_of(victim.public_url)
    ip1, p1 = e1.http_addr
    assert wait_until(lambda: http_get(ip1, p1, host).status_code == 200, 5)
    old_epoch = sql(c["dsn"], "SELECT epoch FROM edges WHERE node_id = 'edge2'")[0]["epoch"]

    samples: list[tuple[float, list, list]] = []
    stop = threading.Event()

    def sample() -> None:
        import asyncio

        import asyncpg

        async def run() -> None:
            conn = await asyncpg.connect(c["dsn"])
            try:
                for _ in range(2000):
                    if stop.is_set():
                        return
                    async with conn.transaction(isolation="repeatable_read"):
                        edges = await conn.fetch("SELECT node_id, epoch FROM edges")
                        sess = await conn.fetch("SELECT id, client_id, node_id, epoch FROM sessions")
                    samples.append((time.monotonic(), [tuple(r) for r in edges], [tuple(r) for r in sess]))
                    await asyncio.sleep(0.02)
            finally:
                await conn.close()

        asyncio.run(run())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        time.sleep(0.3)
        os.kill(e2.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            reaped = wait_until(
                lambda: not sql(c["dsn"], "SELECT 1 FROM sessions WHERE node_id = 'edge2'"), 8, step=0.02
            )
            reaped_after = time.monotonic() - stopped_at
            # the other edges stop routing to it
            seen: list[tuple[float, int | None]] = []

            def offline() -> bool:
                seen.append((round(time.monotonic() - stopped_at, 2), status_of(ip1, p1, host)))
                return seen[-1][1] == 404

            assert wait_until(offline, 6), f"reaped after {reaped_after:.2f} s; edge 1 answered {seen}: {e1.stderr[-3000:]}"
        finally:
            os.kill(e2.pid, signal.SIGCONT)
        assert reaped
        fenced = e2.wait_event("cluster_fenced", 5)
        assert fenced["epoch"] == old_epoch
        again = wait_until(lambda: [e for e in named(e2, "cluster_registered") if e["epoch"] > old_epoch], 5)
        assert again, "edge 2 did not register again after fencing itself"
        registered = again[0]
        # the agent comes back (its session was dropped by the fence) and is served again
        assert wait_until(lambda: http_get(ip1, p1, host).status_code == 200, 15)
        time.sleep(0.5)
    finally:
        stop.set()
        sampler.join(10)
    print(f"SIGSTOP: edge 2's sessions reaped {reaped_after * 1000:.0f} ms after it froze")
    assert reaped_after < 3.5
    # never two owners: at every instant each session row belongs to a live (node, epoch),
    # and the frozen epoch's rows never come back once reaped
    reaped_seen = False
    for _t, edges, sess in samples:
        live = set(edges)
        for sid, _client, node, epoch in sess:
            assert (node, epoch) in live, (sid, node, epoch, live)
        old_rows = [s for s in sess if s[2] == "edge2" and s[3] == old_epoch]
        if ("edge2", old_epoch) not in live:
            reaped_seen = True
        if reaped_seen:
            assert old_rows == [], old_rows
    assert reaped_seen
    # the agent is back (on whichever live edge it dialled: an agent that lost a session
    # tries the other edges of the cluster first), never on edge 2's fenced epoch
    live = {(r["node_id"], r["epoch"]) for r in sql(c["dsn"], "SELECT node_id, epoch FROM edges")}
    new = sql(c["dsn"], "SELECT node_id, epoch FROM sessions")
    assert new and all((r["node_id"], r["epoch"]) in live for r in new), (new, live)
    assert all(r["epoch"] == registered["epoch"] for r in new if r["node_id"] == "edge2"), new


def test_kill9_of_one_pool_members_edge_loses_no_new_request(cluster):
    """A URL held on edges 2 and 3 (pooled), clients on edge 1: kill -9 of edge 3 fails
    no new request (the dead peer is skipped for the other member) and is reaped."""
    c = cluster
    e1, e2, e3 = c["edges"]
    ups = c["ups"]
    url = "http://pooled.burrow.localhost"
    flags = ("--url", url, "--pooling-enabled", *HA1)
    a2 = start_agent(e2, "http", str(ups.http.port), *flags, home=c["root"] / "home" / "pool2")
    c["agents"].append(a2)
    a3 = start_agent(e3, "http", str(ups.http.port), *flags, home=c["root"] / "home" / "pool3")
    c["agents"].append(a3)
    host = "pooled.burrow.localhost"
    ip1, p1 = e1.http_addr
    assert wait_until(lambda: len(sql(c["dsn"], "SELECT 1 FROM agent_endpoints WHERE host = $1", host)) == 2, 5)
    assert wait_until(lambda: http_get(ip1, p1, host).status_code == 200, 5)
    time.sleep(0.3)  # both members in edge 1's table
    failures, ok = [], 0
    killed_at = None
    start = time.monotonic()
    # a new connection per request (Connection: close): every request is a new one
    with httpx.Client(base_url=f"http://{ip1}:{p1}", headers={"Host": host, "Connection": "close"}, timeout=5) as cl:
        while time.monotonic() - start < 6:
            if killed_at is None and time.monotonic() - start > 1:
                e3.kill()
                killed_at = time.monotonic()
            try:
                r = cl.get(f"/k{ok}")
                good = r.status_code == 200 and r.text == f"GET /k{ok}\n"
            except httpx.HTTPError as exc:
                good, r = False, exc
            if good:
                ok += 1
            else:
                failures.append((round(time.monotonic() - killed_at, 3) if killed_at else None, repr(r)))
            time.sleep(0.005)
    print(f"kill -9 of one pool member's edge: {ok} requests, {len(failures)} failed")
    assert failures == []
    assert ok > 100
    assert wait_until(lambda: not sql(c["dsn"], "SELECT 1 FROM edges WHERE node_id = 'edge3'"), 5)
