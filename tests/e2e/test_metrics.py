"""Operations: /healthz, /readyz, Prometheus /metrics after real traffic, --log-format."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backend.edge.api.admin import AdminAPI
from backend.edge.server import Edge, EdgeConfig
from backend.httpserver import Request
from backend.store import hash_token
from tests.api.conftest import POLICY_YAML
from tests.procs import READY_TIMEOUT, BurrowProc, edge_args, host_of, start_agent
from tests.upstreams import HTTPUpstream, TCPEcho, raw_exchange

ADMIN_KEY = "metrics-admin-key-0123456789abcdef"


@pytest.fixture(scope="module")
def ops_edge(tmp_path_factory):
    data = tmp_path_factory.mktemp("ops") / "edge"
    proc = BurrowProc([*edge_args(data), "--admin-key", ADMIN_KEY, "--log-format", "json"])
    proc.ready = proc.wait_event("ready", READY_TIMEOUT)
    yield proc
    proc.stop()


def scrape(edge: BurrowProc, key: str | None = ADMIN_KEY) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(edge.ready["api_url"] + "/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_health_and_readiness_need_no_auth(ops_edge):
    base = ops_edge.ready["api_url"]
    r = httpx.get(base + "/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = httpx.get(base + "/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "checks": {"listeners": "ok", "store": "ok"}}
    assert httpx.head(base + "/healthz").status_code == 200


def test_metrics_need_the_admin_key(ops_edge):
    url = ops_edge.ready["api_url"] + "/metrics"
    r = httpx.get(url)
    assert r.status_code == 401 and r.json()["error_code"] == "ERR_NGROK_200"
    r = httpx.get(url, headers={"Authorization": "Bearer test-api-key"})  # an account's key is not enough
    assert r.status_code == 401 and r.json()["error_code"] == "ERR_NGROK_202"


async def test_metrics_move_with_real_traffic(ops_edge, tmp_path):
    before = scrape(ops_edge)
    assert val(before, "burrow_acme_failures_total") == 0
    assert val(before, "burrow_agent_sessions", agent="burrow") == 0
    async with HTTPUpstream() as up:
        agent = start_agent(ops_edge, "http", str(up.port), home=tmp_path / "home")
        try:
            api = httpx.AsyncClient(
                base_url=ops_edge.ready["api_url"],
                headers={"Authorization": "Bearer test-api-key", "Ngrok-Version": "2"},
            )
            r = await api.post(
                "/endpoints", json={"url": "http://hello.example.com", "type": "cloud", "traffic_policy": POLICY_YAML}
            )
            assert r.status_code == 201, r.text
            host = host_of(agent.public_url)
            base = "http://{}:{}".format(*ops_edge.http_addr)
            async with httpx.AsyncClient(base_url=base, timeout=20) as c:
                for _ in range(3):
                    r = await c.get("/bytes/10000", headers={"Host": host})
                    assert r.status_code == 200 and len(r.content) == 10000
                body = b"x" * 5000
                assert (await c.post("/echo", content=body, headers={"Host": host})).status_code == 200
                assert (await c.get("/missing", headers={"Host": host})).status_code == 404
                assert (await c.get("/", headers={"Host": "nobody.burrow.localhost"})).status_code == 404
                r = await c.get("/hi", headers={"Host": "hello.example.com"})  # answered by the policy
                assert r.status_code == 200 and r.text == "Hello world!"
            # a client that is not TLS on the https port, and junk on the ingress port
            https = tuple(ops_edge.ready["https_url"].split("://")[1].rsplit(":", 1))
            ing_host, ing_port = ops_edge.ready["ingress_addr"].rsplit(":", 1)
            for h, port, junk in ((https[0], https[1], b"GET / HTTP/1.1\r\n\r\n"), (ing_host, ing_port, b"\x00\x00\x00\x05nope!")):
                with contextlib.suppress(ConnectionError):  # the edge may reset it
                    await raw_exchange(h, int(port), junk)

            during = scrape(ops_edge)
            await api.aclose()
        finally:
            agent.stop()
    after = scrape(ops_edge)

    def delta(name: str, **labels: str) -> float:
        return val(during, name, **labels) - val(before, name, **labels)

    assert delta("burrow_http_requests_total", code="2xx") == 5  # 3 downloads, 1 echo, 1 policy answer
    assert delta("burrow_http_requests_total", code="4xx") == 2  # the upstream's 404 and the edge's
    assert delta("burrow_http_requests_total", code="5xx") == 0
    assert delta("burrow_public_bytes_total", direction="out") >= 3 * 10000 + 5000
    assert delta("burrow_public_bytes_total", direction="in") >= 5000
    assert delta("burrow_public_connections_total") >= 2
    assert delta("burrow_handshake_failures_total", listener="https") == 1
    assert delta("burrow_handshake_failures_total", listener="ingress") == 1
    assert delta("burrow_policy_evaluation_seconds_count") >= 1
    assert delta("burrow_policy_evaluation_seconds_sum") > 0
    assert val(during, "burrow_agent_sessions", agent="burrow") == 1
    assert val(during, "burrow_endpoints", type="agent", proto="http") == 1
    assert val(during, "burrow_endpoints", type="cloud", proto="http") == 1
    assert val(during, "process_open_fds") > 0
    # the agent is gone: its session and endpoint with it; counters never go back
    for _ in range(50):
        if val(after, "burrow_agent_sessions", agent="burrow") == 0:
            break
        await asyncio.sleep(0.1)
        after = scrape(ops_edge)
    assert val(after, "burrow_agent_sessions", agent="burrow") == 0
    assert val(after, "burrow_endpoints", type="agent", proto="http") == 0
    assert val(after, "burrow_http_requests_total", code="2xx") >= val(during, "burrow_http_requests_total", code="2xx")


def test_log_lines_are_json(ops_edge):
    lines = [ln for ln in ops_edge.stderr.splitlines() if ln.strip()]
    assert lines, "the edge logged nothing (it logs the creation of its CA)"
    for ln in lines:
        obj = json.loads(ln)
        assert {"t", "lvl", "logger", "msg"} <= set(obj)
    assert any("created local CA" in json.loads(ln)["msg"] for ln in lines)


def test_metrics_public_and_logfmt(tmp_path):
    proc = BurrowProc([*edge_args(tmp_path / "edge"), "--metrics-public", "--log-format", "logfmt"])
    try:
        proc.ready = proc.wait_event("ready", READY_TIMEOUT)
        samples = scrape(proc, key=None)
        assert val(samples, "burrow_acme_failures_total") == 0
        # no admin key: the admin API is off
        r = httpx.get(proc.ready["api_url"] + "/admin/accounts", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 404 and r.json()["error_code"] == "ERR_NGROK_404"
    finally:
        proc.stop()
    line = next(ln for ln in proc.stderr.splitlines() if "created local CA" in ln)
    assert line.startswith("t=") and " lvl=info obj=backend.tls msg=" in line


def test_metrics_are_off_without_a_key_or_the_flag(edge):
    r = httpx.get(edge.ready["api_url"] + "/metrics")
    assert r.status_code == 404 and "--metrics-public" in r.json()["msg"]


async def test_readyz_names_a_closed_listener_and_a_broken_store(tmp_path):
    edge = Edge(
        EdgeConfig(
            data_dir=tmp_path / "edge", api_addr="127.0.0.1:0", ingress_addr="127.0.0.1:0",
            http_addr="127.0.0.1:0", https_addr="127.0.0.1:0", admin_key_hash=hash_token(ADMIN_KEY),
        )
    )
    await edge.start()
    try:
        ops = AdminAPI(edge)
        req = Request("GET", "/readyz", {}, {}, b"")
        assert (await ops.readyz(req)).status == 200
        edge._listen_socks[0].close()  # the ingress listener
        r = await ops.readyz(req)
        assert r.status == 503
        assert json.loads(r.body)["checks"]["listeners"].startswith("down: ")
        edge.store.close()
        checks = json.loads((await ops.readyz(req)).body)["checks"]
        assert checks["store"].startswith("error: ") and "closed" in checks["store"]
    finally:
        await edge.stop()



async def test_tcp_bytes_are_counted_both_ways(ops_edge, tmp_path):
    async with TCPEcho() as up:
        agent = start_agent(ops_edge, "tcp", str(up.port), home=tmp_path / "home")
        try:
            port = int(agent.public_url.rsplit(":", 1)[1])
            before = scrape(ops_edge)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            payload = bytes(range(256)) * 12  # 3072 bytes
            w.write(payload)
            await w.drain()
            assert await asyncio.wait_for(r.readexactly(len(payload)), 10) == payload
            w.write_eof()  # both directions end: the relay ends and counts
            assert await asyncio.wait_for(r.read(), 10) == b""
            w.close()
            for _ in range(100):
                after = scrape(ops_edge)
                if val(after, "burrow_public_bytes_total", direction="out") > val(
                    before, "burrow_public_bytes_total", direction="out"
                ):
                    break
                await asyncio.sleep(0.05)
        finally:
            agent.stop()

    def delta(direction: str) -> float:
        return val(after, "burrow_public_bytes_total", direction=direction) - val(
            before, "burrow_public_bytes_total", direction=direction
        )

    assert delta("in") == len(payload) and delta("out") == len(payload)
    assert val(after, "burrow_http_requests_total", code="2xx") == val(before, "burrow_http_requests_total", code="2xx")
