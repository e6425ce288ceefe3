"""Global consistency of several edges on one PostgreSQL (issue 17, "must show").

Three ``burrow serve --store <dsn>`` processes on 127.0.0.2, .3 and .4 share one fresh
database per module:

- two accounts racing for one hostname through two edges, 100 rounds, with cloud
  endpoints (the cloud API) and with agent binds (the agent protocol, by hand): exactly
  one winner each round, the loser refused with ngrok's code;
- 150 random tcp binds over the three edges on a 100-port range: 100 distinct ports,
  50 clean refusals;
- an API limit of 60 a minute over three edges allows exactly 60 (one bucket in
  PostgreSQL, not one per edge);
- PostgreSQL stopped: the API answers 503 with ``Retry-After: 1`` in ngrok's format,
  and works again once it is back.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from backend import protocol as p
from tests.procs import READY_TIMEOUT, BurrowProc

ADMIN_KEY = "admin-key-for-the-cluster-tests"
IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
POLICY = "on_http_request: [{actions: [{type: custom-response, config: {status_code: 200, content: hi}}]}]"


def _serve(dsn: str, data_dir: Path, ip: str, ports: tuple[int, int], *extra: str) -> BurrowProc:
    return BurrowProc(
        [
            "serve",
            "--data-dir", str(data_dir),
            "--store", dsn,
            "--api-addr", f"{ip}:0",
            "--ingress-addr", f"{ip}:0",
            "--http-addr", f"{ip}:0",
            "--https-addr", f"{ip}:0",
            "--tcp-ports", f"{ports[0]}-{ports[1]}",
            "--authtoken", "test-authtoken",
            "--api-key", "test-api-key",
            "--admin-key", ADMIN_KEY,
            "--json",
            *extra,
        ]
    )


def _start_edges(dsn: str, ports: tuple[int, int], *extra: str) -> list[BurrowProc]:
    root = Path(tempfile.mkdtemp(prefix="burrow-cluster-"))
    edges = [_serve(dsn, root / f"edge{i}", ip, ports, *extra) for i, ip in enumerate(IPS)]
    try:
        for e in edges:
            e.ready = e.wait_event("ready", READY_TIMEOUT)
    except BaseException:
        for e in edges:
            e.kill()
        raise
    return edges


def _port_block() -> tuple[int, int]:
    """100 ports below Linux's ephemeral range (so no test's port-0 socket is in it)."""
    lo = 12000 + 100 * random.randrange(80)
    return lo, lo + 99


@pytest.fixture(scope="module")
def cluster(postgres_server):
    edges = _start_edges(postgres_server.new_database(), _port_block())
    yield edges
    for e in edges:
        e.stop()


def _api(edge: BurrowProc) -> str:
    return edge.ready["api_url"]


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Ngrok-Version": "2"}


def _new_account(edge: BurrowProc, name: str) -> dict:
    r = httpx.post(
        _api(edge) + "/admin/accounts", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, json={"name": name}
    )
    assert r.status_code == 201, r.text
    return r.json()


class Session:
    """A hand-driven agent session on one edge (control connection only)."""

    def __init__(self, edge: BurrowProc, authtoken: str, client_id: str) -> None:
        self.edge, self.authtoken, self.client_id = edge, authtoken, client_id
        self._next = 0

    async def __aenter__(self) -> Session:
        host, port = self.edge.ready["ingress_addr"].rsplit(":", 1)
        ctx = ssl.create_default_context(cafile=self.edge.ready["ca_file"])
        self.r, self.w = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname="127.0.0.1")
        p.write_msg(self.w, p.Auth(authtoken=self.authtoken, client_id=self.client_id))
        ok = await asyncio.wait_for(p.read_msg(self.r), 10)
        assert isinstance(ok, p.AuthOk), ok
        return self

    async def __aexit__(self, *exc) -> None:
        self.w.close()

    async def bind_many(self, binds: list[dict]) -> list[p.BindOk | p.Error]:
        """Send every Bind at once, then read the answers (by req_id)."""
        first = self._next + 1
        for i, kw in enumerate(binds):
            p.write_msg(self.w, p.Bind(req_id=first + i, name=f"t{first + i}", **kw))
        self._next += len(binds)
        await self.w.drain()
        got: dict[int, p.BindOk | p.Error] = {}
        deadline = time.monotonic() + 60
        while len(got) < len(binds):
            msg = await asyncio.wait_for(p.read_msg(self.r), max(0.1, deadline - time.monotonic()))
            if isinstance(msg, p.Ping):
                p.write_msg(self.w, p.Pong(id=msg.id, sent=msg.sent))
            elif isinstance(msg, p.BindOk | p.Error):
                got[msg.req_id] = msg
        return [got[first + i] for i in range(len(binds))]


# ------------------------------------------------------------------------------ races
async def test_two_accounts_racing_for_a_hostname_through_two_edges_never_both_win(cluster):
    a = _new_account(cluster[0], "racer-a")
    b = _new_account(cluster[1], "racer-b")
    rounds = 100
    async with httpx.AsyncClient(timeout=30) as http:

        async def create(edge: BurrowProc, key: str, host: str) -> httpx.Response:
            return await http.post(
                _api(edge) + "/endpoints",
                headers=_headers(key),
                json={"url": f"https://{host}", "traffic_policy": POLICY},
            )

        winners = {a["id"]: 0, b["id"]: 0}
        for i in range(rounds):
            host = f"race{i}.burrow.localhost"
            ea, eb = (cluster[0], cluster[1]) if i % 2 == 0 else (cluster[2], cluster[0])
            ra, rb = await asyncio.gather(create(ea, a["api_key"], host), create(eb, b["api_key"], host))
            codes = sorted([ra.status_code, rb.status_code])
            assert codes == [201, 409], (i, ra.text, rb.text)
            loser = ra if ra.status_code == 409 else rb
            assert loser.json()["error_code"] == "ERR_NGROK_414", loser.text
            winners[a["id"] if ra.status_code == 201 else b["id"]] += 1
        # the store agrees: one endpoint per hostname, owned by the winner
        la = (await http.get(_api(cluster[2]) + "/endpoints", headers=_headers(a["api_key"]))).json()
        lb = (await http.get(_api(cluster[1]) + "/endpoints", headers=_headers(b["api_key"]))).json()
    hosts_a = {e["host"] for e in la["endpoints"]}
    hosts_b = {e["host"] for e in lb["endpoints"]}
    assert not hosts_a & hosts_b
    assert len(hosts_a) + len(hosts_b) == rounds
    assert sum(winners.values()) == rounds


async def test_two_accounts_racing_to_bind_a_hostname_through_two_edges(cluster):
    a = _new_account(cluster[0], "binder-a")
    b = _new_account(cluster[0], "binder-b")
    rounds = 100
    async with (
        Session(cluster[1], a["authtoken"], "agent-a") as sa,
        Session(cluster[2], b["authtoken"], "agent-b") as sb,
    ):
        hosts = [f"bind{i}.burrow.localhost" for i in range(rounds)]
        for start in range(0, rounds, 10):  # ten names at a time, both sessions at once
            batch = [{"proto": "http", "url": f"http://{h}"} for h in hosts[start : start + 10]]
            ra, rb = await asyncio.gather(sa.bind_many(batch), sb.bind_many(batch))
            for x, y in zip(ra, rb, strict=True):
                ok = [m for m in (x, y) if isinstance(m, p.BindOk)]
                refused = [m for m in (x, y) if isinstance(m, p.Error)]
                assert len(ok) == 1 and len(refused) == 1, (x, y)
                assert refused[0].code == "ERR_NGROK_320", refused[0]
        # a name freed by its holder goes to the other account
        freed = await sa.bind_many([{"proto": "http", "url": "http://handover.burrow.localhost"}])
        assert isinstance(freed[0], p.BindOk)
    await asyncio.sleep(0)  # sa's session ends: its claims are released (in the background)
    async with Session(cluster[2], b["authtoken"], "agent-b2") as sb2:
        deadline = time.monotonic() + 10
        while True:
            got = await sb2.bind_many([{"proto": "http", "url": "http://handover.burrow.localhost"}])
            if isinstance(got[0], p.BindOk) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert isinstance(got[0], p.BindOk), got[0]


async def test_150_tcp_binds_over_three_edges_on_100_ports(cluster):
    lo, hi = (int(x) for x in cluster[0].args[cluster[0].args.index("--tcp-ports") + 1].split("-"))
    acct = _new_account(cluster[0], "tcp-binder")
    sessions = [Session(e, acct["authtoken"], f"tcp-{i}") for i, e in enumerate(cluster)]
    for s in sessions:
        await s.__aenter__()
    try:
        results = await asyncio.gather(*(s.bind_many([{"proto": "tcp"}] * 50) for s in sessions))
        ports = [int(m.url.rsplit(":", 1)[1]) for rs in results for m in rs if isinstance(m, p.BindOk)]
        refused = [m for rs in results for m in rs if isinstance(m, p.Error)]
        assert len(ports) == 100 and len(set(ports)) == 100, sorted(ports)
        assert all(lo <= port <= hi for port in ports)
        assert len(refused) == 50
        assert {m.code for m in refused} == {"ERR_NGROK_9040"}, {m.msg for m in refused}
        # each edge listens on the ports it gave out
        for s, rs in zip(sessions, results, strict=True):
            m = next(m for m in rs if isinstance(m, p.BindOk))
            _, w = await asyncio.open_connection(s.edge.ready["ingress_addr"].rsplit(":", 1)[0], int(m.url.rsplit(":", 1)[1]))
            w.close()
    finally:
        for s in sessions:
            await s.__aexit__()


# ------------------------------------------------------------------------- rate limit
async def test_an_api_limit_of_60_a_minute_over_three_edges_allows_exactly_60(postgres_server):
    edges = _start_edges(postgres_server.new_database(), _port_block(), "--api-rate-limit", "60")
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            h = _headers("test-api-key")
            # one connection per edge, opened before the burst (not counted: no key)
            for e in edges:
                assert (await http.get(_api(e) + "/")).status_code in (200, 401)
            t0 = time.monotonic()
            rs = await asyncio.gather(*(http.get(_api(edges[i % 3]) + "/credentials", headers=h) for i in range(120)))
            elapsed = time.monotonic() - t0
        ok = [r for r in rs if r.status_code == 200]
        limited = [r for r in rs if r.status_code == 429]
        assert len(ok) + len(limited) == 120, {r.status_code for r in rs}
        assert {r.json()["error_code"] for r in limited} == {"ERR_NGROK_226"}
        assert all(int(r.headers["retry-after"]) >= 1 for r in limited)
        # The bucket refills at 1 a second: a burst shorter than a second gets exactly 60.
        if elapsed < 1.0:
            assert len(ok) == 60
        else:
            assert 60 <= len(ok) <= 60 + int(elapsed) + 1, (len(ok), elapsed)
        # every edge spent from the one bucket (per-edge buckets would allow up to 120)
        assert all(r.status_code == 429 for r in limited)
    finally:
        for e in edges:
            e.stop()


# ------------------------------------------------------------------ PostgreSQL down
async def test_the_api_answers_503_while_postgresql_is_down(cluster, postgres_server):
    h = _headers("test-api-key")
    async with httpx.AsyncClient(timeout=30) as http, Session(cluster[2], "test-authtoken", "down-agent") as s:
        assert (await http.get(_api(cluster[0]) + "/credentials", headers=h)).status_code == 200
        postgres_server.stop()
        try:
            # an agent's bind is refused cleanly (its session lives on) ...
            (got,) = await s.bind_many([{"proto": "http", "url": "http://down-agent.burrow.localhost"}])
            assert isinstance(got, p.Error) and got.code == "ERR_NGROK_503", got
            # ... and a new session is not answered (the agent retries with backoff)
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                async with Session(cluster[1], "test-authtoken", "late-agent"):
                    pass
            r = await http.get(_api(cluster[0]) + "/credentials", headers=h)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert r.json()["error_code"] == "ERR_NGROK_503"
            r = await http.post(
                _api(cluster[1]) + "/endpoints",
                headers=h,
                json={"url": "https://down.burrow.localhost", "traffic_policy": POLICY},
            )
            assert r.status_code == 503, r.text
        finally:
            postgres_server.start()
        deadline = time.monotonic() + 10
        while True:
            r = await http.get(_api(cluster[0]) + "/credentials", headers=h)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert r.status_code == 200, r.text
        # nothing half-written: the refused create left no endpoint behind
        r = await http.get(_api(cluster[2]) + "/endpoints", headers=h)
        assert all(e["host"] != "down.burrow.localhost" for e in r.json()["endpoints"])


def test_burrow_admin_creates_an_account_in_the_clusters_store(cluster):
    dsn = cluster[0].args[cluster[0].args.index("--store") + 1]
    made = subprocess.run(
        [sys.executable, "-m", "backend", "admin", "account", "create", "from-the-cli", "--store", dsn, "--json"],
        capture_output=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert made.returncode == 0, made.stderr
    acct = json.loads(made.stdout)
    assert acct["name"] == "from-the-cli" and acct["api_key"]
    # every edge knows the new key at once (no restart, no copy of a database)
    for e in cluster:
        r = httpx.get(_api(e) + "/credentials", headers=_headers(acct["api_key"]))
        assert r.status_code == 200, r.text
