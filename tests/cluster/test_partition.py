"""An edge that loses PostgreSQL alone (backend/cluster/node.py, rules 1, 2 and 4).

Edge 2 reaches PostgreSQL through a proxy the test cuts: the other edges reap it after
its lease's TTL and stop routing to it; edge 2 keeps serving, from memory, what reaches
it directly; when PostgreSQL is back for it, it learns it was reaped and fences itself
(ends its sessions, registers with a new epoch), and its agent comes back.
"""

from __future__ import annotations

import time

from tests.cluster.edges import (
    HA1,
    IPS,
    CutProxy,
    Upstreams,
    cluster_edge,
    http_get,
    sql,
    status_of,
    wait_until,
)
from tests.procs import host_of, start_agent


def test_edge_that_loses_postgres_alone_is_reaped_then_fences_itself(postgres_server, tmp_path):
    dsn = postgres_server.new_database()
    proxy = CutProxy(IPS[1], ("127.0.0.1", postgres_server.port))
    ups = Upstreams()
    edges, agents = [], []
    try:
        edges.append(cluster_edge(tmp_path / "e1", IPS[0], dsn, "edge1"))
        edges.append(cluster_edge(tmp_path / "e2", IPS[1], proxy.dsn(dsn), "edge2"))
        e1, e2 = edges
        agents.append(start_agent(e2, "http", str(ups.http.port), *HA1, home=tmp_path / "a"))
        host = host_of(agents[0].public_url)
        ip1, p1 = e1.http_addr
        ip2, p2 = e2.http_addr
        assert wait_until(lambda: http_get(ip1, p1, host).status_code == 200, 5)
        old_epoch = sql(dsn, "SELECT epoch FROM edges WHERE node_id = 'edge2'")[0]["epoch"]

        proxy.cut()
        cut_at = time.monotonic()
        # the others reap it and stop routing to it
        assert wait_until(lambda: status_of(ip1, p1, host) == 404, 10)
        unrouted = time.monotonic() - cut_at
        assert not sql(dsn, "SELECT 1 FROM sessions WHERE node_id = 'edge2'")
        # rule 1: it still serves, from memory, what reaches it directly
        for i in range(10):
            r = http_get(ip2, p2, host, f"/alone{i}")
            assert r.status_code == 200 and r.text == f"GET /alone{i}\n"

        proxy.restore()
        restored_at = time.monotonic()
        fenced = e2.wait_event("cluster_fenced", 10)
        fenced_after = time.monotonic() - restored_at
        assert fenced["epoch"] == old_epoch
        again = wait_until(
            lambda: [ev for ev in e2.seen + _drain(e2) if ev.get("event") == "cluster_registered" and ev["epoch"] > old_epoch],
            5,
        )
        assert again
        # its agent came back (the fence ended its session) and is routed again everywhere
        assert wait_until(lambda: http_get(ip1, p1, host).status_code == 200, 20)
        # (on edge 1 or edge 2: it tries another edge of the cluster first), never on
        # edge 2's fenced epoch
        live = {(r["node_id"], r["epoch"]) for r in sql(dsn, "SELECT node_id, epoch FROM edges")}
        rows = sql(dsn, "SELECT node_id, epoch FROM sessions")
        assert rows and all((r["node_id"], r["epoch"]) in live for r in rows), (rows, live)
        assert all(r["epoch"] == again[0]["epoch"] for r in rows if r["node_id"] == "edge2"), rows
        print(f"edge 2 cut from PostgreSQL: unrouted by edge 1 after {unrouted * 1000:.0f} ms; "
              f"fenced {fenced_after * 1000:.0f} ms after PostgreSQL was back for it")
    finally:
        for a in agents:
            a.stop()
        for e in edges:
            e.stop()
        proxy.close()
        ups.close()


def _drain(proc) -> list[dict]:
    import queue

    out = []
    while True:
        try:
            ev = proc.events.get_nowait()
        except queue.Empty:
            return out
        proc.seen.append(ev)
        out.append(ev)
