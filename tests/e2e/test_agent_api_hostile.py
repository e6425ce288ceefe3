"""The agent API against a hostile browser and hostile input (issue 12, items 13-15).

Everything goes through real sockets to a real agent: the browser's requests are
replayed byte for byte (DNS rebinding = a foreign ``Host``; CSRF = a foreign ``Origin``
and a ``text/plain`` body), and bad input must get the agent API's error shape, never
a 500, a hang or a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest

from tests.e2e.test_agent_api import api, public, wait_captures
from tests.procs import host_of
from tests.upstreams import HTTPUpstream, raw_request

ERROR_KEYS = {"error_code", "status_code", "msg", "details"}


def web(agent) -> tuple[str, int]:
    host, port = agent.ready["web_addr"].rsplit(":", 1)
    return host, int(port)


def assert_agent_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == ERROR_KEYS and body["status_code"] == status
    assert isinstance(body["error_code"], int) and body["msg"]
    return body


# ------------------------------------------------------------------ item 13: rebinding, CSRF
async def test_dns_rebinding_and_csrf_are_refused(edge, agents):
    async with HTTPUpstream() as up:
        a = agents("http", up.port)
        _, port = web(a)
        # a capture holding a secret, which a rebound page must not read
        async with public(edge) as p:
            await p.get("/x", headers={"Host": host_of(a.public_url), "Authorization": "Bearer s3cret"})
        async with api(a) as c:
            await wait_captures(c, 1)
            evil = {"Host": "rebind.evil.example", "Origin": "http://evil.example"}
            # the reported attack: a text/plain "simple" POST from a rebound page
            r = await c.post(
                "/api/tunnels",
                content=json.dumps({"addr": "22", "proto": "tcp", "name": "pwn"}),
                headers={**evil, "Content-Type": "text/plain"},
            )
            assert_agent_error(r, 403)
            # a foreign Host alone is enough to refuse, on every route
            for method, path in [
                ("GET", "/api/requests/http"),
                ("GET", "/api/tunnels"),
                ("GET", "/api/status"),
                ("GET", "/api/events"),
                ("GET", "/api/nope"),
                ("DELETE", "/api/requests/http"),
                ("POST", "/api/requests/http"),
            ]:
                r = await c.request(method, path, headers={"Host": f"rebind.evil.example:{port}"})
                body = assert_agent_error(r, 403)
                assert "s3cret" not in r.text and "Host" in body["msg"]
            # same Host, but a cross-origin page: refused
            r = await c.post(
                "/api/tunnels",
                json={"addr": "22", "proto": "tcp", "name": "pwn"},
                headers={"Origin": "http://evil.example"},
            )
            assert_agent_error(r, 403)
            r = await c.post(
                "/api/tunnels",
                json={"addr": "22", "proto": "tcp", "name": "pwn"},
                headers={"Sec-Fetch-Site": "cross-site"},
            )
            assert_agent_error(r, 403)
            # a body that is not declared JSON: refused even from a local tool
            for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
                r = await c.post(
                    "/api/tunnels",
                    content=json.dumps({"addr": "22", "proto": "tcp", "name": "pwn"}),
                    headers={"Content-Type": ctype},
                )
                assert_agent_error(r, 415)
            r = await c.post("/api/tunnels", content=json.dumps({"addr": "22", "proto": "tcp", "name": "pwn"}))
            assert_agent_error(r, 415)
            # nothing was started, nothing was deleted
            names = [t["name"] for t in (await c.get("/api/tunnels")).json()["tunnels"]]
            assert names == ["command_line"]
            assert len((await c.get("/api/requests/http")).json()["requests"]) == 1

            # what a local client sends is accepted: loopback names with the right port,
            # a same-origin Origin, JSON with a charset
            for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
                assert (await c.get("/api/tunnels", headers={"Host": host})).status_code == 200
            assert_agent_error(await c.get("/api/tunnels", headers={"Host": "localhost"}), 403)
            assert_agent_error(await c.get("/api/tunnels", headers={"Host": f"localhost:{port + 1}"}), 403)
            r = await c.post(
                "/api/tunnels",
                content=json.dumps({"addr": str(up.port), "proto": "http", "name": "ok"}),
                headers={
                    "Host": f"localhost:{port}",
                    "Origin": f"http://localhost:{port}",
                    "Content-Type": "application/json; charset=utf-8",
                },
            )
            assert r.status_code == 201, r.text
            assert (await c.delete("/api/tunnels/ok")).status_code == 204


async def test_web_allow_host_adds_a_name(edge, agents):
    async with HTTPUpstream() as up:
        a = agents("http", up.port, "--web-allow-host", "inspect.dev.test", "--web-allow-host", "other.test:81")
        _, port = web(a)
        async with api(a) as c:
            assert (await c.get("/api/status", headers={"Host": "inspect.dev.test"})).status_code == 200
            assert (await c.get("/api/status", headers={"Host": f"inspect.dev.test:{port}"})).status_code == 200
            assert (await c.get("/api/status", headers={"Host": "other.test:81"})).status_code == 200
            assert_agent_error(await c.get("/api/status", headers={"Host": "other.test:82"}), 403)
            assert_agent_error(await c.get("/api/status", headers={"Host": "evil.dev.test"}), 403)


def test_pyngrok_client_requests_pass_the_guard(edge, agents):
    """pyngrok's own HTTP client (urllib, JSON bodies) against this worktree's agent."""
    from pyngrok import ngrok as pyngrok

    a = agents("http", "8080")
    base = f"http://{a.ready['web_addr']}"
    made = pyngrok.api_request(f"{base}/api/tunnels", "POST", data={"addr": "8081", "proto": "http", "name": "py"})
    assert made["name"] == "py"
    listed = pyngrok.api_request(f"{base}/api/tunnels", "GET")
    assert {t["name"] for t in listed["tunnels"]} == {"command_line", "py"}
    assert pyngrok.api_request(f"{base}/api/tunnels/py", "DELETE") == {}
    assert pyngrok.api_request(f"{base}/api/requests/http", "GET")["requests"] == []


# ------------------------------------------------------------------------ item 15: 500s
async def test_deeply_nested_json_is_a_400(edge, agents):
    a = agents("http", "8080")
    async with api(a) as c:
        for path in ("/api/tunnels", "/api/endpoints", "/api/requests/http"):
            for body in (b"[" * 10_000, b'{"a":' * 10_000, b'{"addr": "80", "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}"):
                r = await c.post(path, content=body, headers={"Content-Type": "application/json"})
                assert r.status_code == 400, (path, r.status_code, r.text[:200])
                assert set(r.json()) == ERROR_KEYS
        assert (await c.get("/api/status")).status_code == 200
    assert "Traceback" not in a.stderr and "RecursionError" not in a.stderr


@pytest.mark.parametrize(
    "addr",
    ["\x93x:80", "http://\x93x:80", "a b:80", "exa\x00mple:80", "[zz]:80", "host:80x", "-bad-.example:1"],
)
async def test_unusable_addr_is_refused_at_creation(edge, agents, addr):
    a = agents("http", "8080")
    async with api(a) as c:
        r = await c.post("/api/tunnels", json={"addr": addr, "proto": "http", "name": "bad"})
        body = assert_agent_error(r, 400)
        assert body["msg"] == "invalid tunnel configuration" and "addr" in body["details"]["err"]
        r = await c.post("/api/endpoints", json={"name": "bad", "upstream": {"url": addr}})
        assert_agent_error(r, 400)
        names = [t["name"] for t in (await c.get("/api/tunnels")).json()["tunnels"]]
        assert names == ["command_line"]
    assert "UnicodeError" not in a.stderr and "never retrieved" not in a.stderr


async def test_upstream_url_must_be_a_string_or_port(edge, agents):
    a = agents("http", "8080")
    async with api(a) as c:
        for url in (True, {"x": 1}, [80], 1.5):
            r = await c.post("/api/endpoints", json={"name": "bad", "upstream": {"url": url}})
            assert "upstream.url" in assert_agent_error(r, 400)["details"]["err"], url
        # a lone surrogate (valid JSON escape, not encodable text): 400, not a 500
        r = await c.post(
            "/api/tunnels",
            content=rb'{"addr": "\ud800", "proto": "http", "name": "bad"}',
            headers={"Content-Type": "application/json"},
        )
        assert_agent_error(r, 400)
        names = [t["name"] for t in (await c.get("/api/tunnels")).json()["tunnels"]]
        assert names == ["command_line"]


async def test_replay_of_a_raw_request_with_lf_only_chunk_lines_is_a_400(edge, agents):
    """The data path refuses chunk lines ending in a bare LF (issue 12 item 8), and so
    does a raw replay: a 400 naming the body, not a 500."""
    async with HTTPUpstream() as up:
        a = agents("http", up.port)
        async with api(a) as c, public(edge) as p:
            await p.get("/seed", headers={"Host": host_of(a.public_url)})
            seed = (await wait_captures(c, 1))[0]
            lf = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\n\n"
            r = await c.post("/api/requests/http", json={"id": seed["id"], "raw": base64.b64encode(lf).decode()})
            assert r.status_code == 400 and "chunk" in r.json()["msg"], r.text
            assert not any(req[0].startswith(b"POST") for req in up.requests)
    assert "Traceback" not in a.stderr


def test_edited_replay_decodes_a_stored_capture_with_lf_only_chunk_lines():
    """Captures kept by older agents (``--inspect-db``) may hold bare-LF chunk lines; an
    edited replay re-frames their body: it must decode it, not crash."""
    from backend.agent.inspect import Capture
    from backend.agent.replay import ReplayRequest, build_request
    from backend.http1 import parse_request_head

    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    cap = Capture("web", "127.0.0.1", parse_request_head(head), 1 << 20)
    cap.req.add(b"3\nabc\r\n2\nde\n0\n\n")
    raw = build_request(cap, ReplayRequest(id=cap.id, method="PUT"))
    assert raw.startswith(b"PUT /echo HTTP/1.1\r\n")
    assert raw.endswith(b"Content-Length: 5\r\n\r\nabcde")


# -------------------------------------------------------------- item 14: stalls, big heads
async def test_agent_api_deadlines_and_huge_heads(edge, agents):
    a = agents("http", "8080", "--web-read-timeout", "0.5")
    addr = web(a)
    host = f"Host: {a.ready['web_addr']}\r\n".encode()
    # a head announcing a body that never comes: 408 and closed, not held open
    got, closed = await asyncio.to_thread(
        raw_request, addr, b"POST /api/tunnels HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    assert closed and got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert set(json.loads(got.split(b"\r\n\r\n", 1)[1])) == ERROR_KEYS
    # a head that never ends
    got, closed = await asyncio.to_thread(raw_request, addr, b"GET /api/tunnels HTTP/1.1\r\n" + host)
    assert closed and got.startswith(b"HTTP/1.1 408 "), got[:200]
    # 10,000 header lines: 431 in the API's shape
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
    got, closed = await asyncio.to_thread(raw_request, addr, b"GET /api/tunnels HTTP/1.1\r\n" + host + many + b"\r\n")
    assert closed and got.startswith(b"HTTP/1.1 431 "), got[:200]
    assert set(json.loads(got.split(b"\r\n\r\n", 1)[1])) == ERROR_KEYS
    async with api(a) as c:
        assert (await c.get("/api/status")).status_code == 200
    assert "Traceback" not in a.stderr
