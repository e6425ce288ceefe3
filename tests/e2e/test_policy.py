"""Traffic policy on the data path: every action through real sockets, internal endpoints."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import httpx
import pytest

from backend.store import open_store
from tests.procs import host_of
from tests.upstreams import HTTPUpstream


def public(edge) -> httpx.AsyncClient:
    host, port = edge.http_addr
    return httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10, follow_redirects=False)


def policy_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / f"policy-{abs(hash(text))}.yml"
    path.write_text(text)
    return str(path)


async def _with_policy(edge, agents, tmp_path, up, text: str, *flags: str):
    a = agents("http", up.port, "--traffic-policy-file", policy_file(tmp_path, text), *flags)
    return a, host_of(a.public_url)


async def test_deny_and_custom_response(edge, agents, tmp_path):
    text = """
on_http_request:
  - expressions: ["req.url.path.startsWith('/admin')"]
    actions:
      - type: deny
        config: {status_code: 404}
  - expressions: ["req.method == 'DELETE'"]
    actions:
      - type: custom-response
        config:
          status_code: 200
          headers: {content-type: text/plain}
          body: "Hello ${req.method} ${req.url.path} from ${conn.client_ip}"
"""
    async with HTTPUpstream() as up, public(edge) as c:
        _, host = await _with_policy(edge, agents, tmp_path, up, text)
        r = await c.get("/admin/x", headers={"Host": host})
        assert r.status_code == 404
        r = await c.delete("/thing", headers={"Host": host})
        assert r.status_code == 200 and r.text == "Hello DELETE /thing from 127.0.0.1"
        assert r.headers["content-type"] == "text/plain"
        r = await c.get("/other", headers={"Host": host})
        assert r.status_code == 200 and r.text == "GET /other\n"
        assert [h.split(b" ")[1] for h, _ in up.requests] == [b"/other"]  # the others never arrived


async def test_add_remove_headers_both_phases(edge, agents, tmp_path):
    text = """
on_http_request:
  - actions:
      - type: add-headers
        config: {headers: {x-added: "yes", x-path: "${req.url.path}"}}
      - type: remove-headers
        config: {headers: [x-secret]}
on_http_response:
  - actions:
      - type: add-headers
        config: {headers: {x-served-by: burrow, x-status: "${res.status_code}"}}
      - type: remove-headers
        config: {headers: [x-upstream]}
"""
    async with HTTPUpstream() as up, public(edge) as c:
        _, host = await _with_policy(edge, agents, tmp_path, up, text)
        r = await c.get("/bytes/10", headers={"Host": host, "X-Secret": "hunter2"})
        assert r.status_code == 200 and len(r.content) == 10
        head = up.requests[0][0]
        assert b"x-added: yes" in head and b"x-path: /bytes/10" in head
        assert b"hunter2" not in head
        assert r.headers["x-served-by"] == "burrow" and r.headers["x-status"] == "200"
        assert "x-upstream" not in r.headers


async def test_redirect_and_url_rewrite(edge, agents, tmp_path):
    text = """
on_http_request:
  - actions:
      - type: redirect
        config: {from: "/old/(.*)$", to: "https://new.example/$1", status_code: 301}
      - type: url-rewrite
        config: {from: "^/api/v1/(.*)", to: "/v2/$1"}
"""
    async with HTTPUpstream() as up, public(edge) as c:
        _, host = await _with_policy(edge, agents, tmp_path, up, text)
        r = await c.get("/old/page?q=1", headers={"Host": host})
        assert r.status_code == 301 and r.headers["location"] == "https://new.example/page?q=1"
        r = await c.get("/api/v1/users?id=7", headers={"Host": host})
        assert r.status_code == 200 and r.text == "GET /v2/users?id=7\n"


async def test_rate_limit_answers_429_with_retry_after(edge, agents, tmp_path):
    text = """
on_http_request:
  - actions:
      - type: rate-limit
        config: {name: per-ip, algorithm: sliding_window, capacity: 3, rate: 60s, bucket_key: [conn.client_ip]}
"""
    async with HTTPUpstream() as up, public(edge) as c:
        _, host = await _with_policy(edge, agents, tmp_path, up, text)
        codes = [(await c.get(f"/{i}", headers={"Host": host})).status_code for i in range(3)]
        assert codes == [200, 200, 200]
        r = await c.get("/4", headers={"Host": host})
        assert r.status_code == 429
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert len(up.requests) == 3


async def test_basic_auth(edge, agents, tmp_path):
    text = """
on_http_request:
  - actions:
      - type: basic-auth
        config: {realm: private, credentials: ["alice:s3cret"]}
"""
    async with HTTPUpstream() as up, public(edge) as c:
        _, host = await _with_policy(edge, agents, tmp_path, up, text)
        r = await c.get("/", headers={"Host": host})
        assert r.status_code == 401 and r.headers["www-authenticate"] == 'Basic realm="private"'
        bad = base64.b64encode(b"alice:wrong").decode()
        assert (await c.get("/", headers={"Host": host, "Authorization": f"Basic {bad}"})).status_code == 401
        good = base64.b64encode(b"alice:s3cret").decode()
        r = await c.get("/in", headers={"Host": host, "Authorization": f"Basic {good}"})
        assert r.status_code == 200 and r.text == "GET /in\n"
        assert len(up.requests) == 1


async def test_restrict_ips(edge, agents, tmp_path):
    async with HTTPUpstream() as up, public(edge) as c:
        _, denied = await _with_policy(
            edge, agents, tmp_path, up,
            "on_http_request:\n  - actions:\n      - type: restrict-ips\n        config: {deny: [127.0.0.0/8]}\n",
        )
        _, allowed = await _with_policy(
            edge, agents, tmp_path, up,
            "on_http_request:\n  - actions:\n      - type: restrict-ips\n        config: {allow: [127.0.0.1/32]}\n",
        )
        assert (await c.get("/", headers={"Host": denied})).status_code == 403
        assert (await c.get("/", headers={"Host": allowed})).status_code == 200


async def test_close_connection(edge, agents, tmp_path):
    async with HTTPUpstream() as up:
        _, host = await _with_policy(
            edge, agents, tmp_path, up, "on_http_request:\n  - actions:\n      - type: close-connection\n"
        )
        r, w = await asyncio.open_connection(*edge.http_addr)
        w.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        assert up.requests == []


async def test_invalid_policy_is_refused_at_bind(edge, agents, tmp_path):
    async with HTTPUpstream() as up:
        bad = "on_http_request:\n  - actions:\n      - type: teleport\n"
        a = agents("http", up.port, "--traffic-policy-file", policy_file(tmp_path, bad), check=False)
        assert a.wait_exit() != 0
        err = a.stderr.strip()
        assert len(err.splitlines()) == 1 and "teleport" in err and "unknown action" in err


def add_account(edge, authtoken: str) -> None:
    """A second account, added to the edge's store while it runs (WAL allows it)."""
    store = open_store(Path(edge.ready["data_dir"]) / "burrow.db")
    try:
        acct = store.create_account("other")
        store.add_authtoken(acct.id, authtoken)
    finally:
        store.close()


async def test_forward_internal_same_account_only(edge, agents, tmp_path):
    front = """
on_http_request:
  - actions:
      - type: forward-internal
        config: {url: "https://example.internal"}
"""
    async with HTTPUpstream() as internal_up, HTTPUpstream() as other_up, HTTPUpstream() as front_up:
        agents("http", internal_up.port, "--url", "https://example.internal")
        add_account(edge, "other-authtoken")
        agents("http", other_up.port, "--url", "https://example.internal", "--authtoken", "other-authtoken")
        _, host = await _with_policy(edge, agents, tmp_path, front_up, front)
        async with public(edge) as c:
            for _ in range(3):
                r = await c.get("/via-front", headers={"Host": host})
                assert r.status_code == 200 and r.text == "GET /via-front\n"
            # internal hostnames are never served on the public listener
            r = await c.get("/", headers={"Host": "example.internal"})
            assert r.status_code == 404 and r.headers["ngrok-error-code"] == "ERR_NGROK_3200"
        assert len(internal_up.requests) == 3
        assert other_up.requests == [] and front_up.requests == []
        head = internal_up.requests[0][0]
        assert f"Host: {host}".encode() in head  # the front Host is kept
        assert b"X-Forwarded-For: 127.0.0.1" in head
        assert f"X-Forwarded-Host: {host}".encode() in head
        assert b"X-Forwarded-Proto: http\r\n" in head


async def test_forward_internal_to_missing_endpoint(edge, agents, tmp_path):
    halt = "on_http_request:\n  - actions:\n      - type: forward-internal\n        config: {url: 'https://gone.internal'}\n"
    cont = halt.replace("'https://gone.internal'", "'https://gone.internal', on_error: continue")
    async with HTTPUpstream() as up, public(edge) as c:
        _, h1 = await _with_policy(edge, agents, tmp_path, up, halt)
        _, h2 = await _with_policy(edge, agents, tmp_path, up, cont)
        r = await c.get("/", headers={"Host": h1})
        assert r.status_code == 404 and "gone.internal" in r.text
        r = await c.get("/fallback", headers={"Host": h2})
        assert r.status_code == 200 and r.text == "GET /fallback\n"


@pytest.mark.parametrize("url", ["https://example.internal", "tls://x.y.internal"])
def test_internal_url_binding_is_inferred(url, edge, agents):
    a = agents("http" if url.startswith("https") else "tls", 9, "--url", url)
    assert a.public_url == url


async def test_cloud_endpoint_forwards_to_internal_agent_endpoint(edge, agents):
    """Seed 004's example: a public cloud endpoint forwarding to an agent's .internal one."""
    import ngrok

    async with HTTPUpstream() as up:
        agents("http", up.port, "--url", "https://example.internal")
        client = ngrok.Client("test-api-key", base_url=edge.ready["api_url"])
        policy = "on_http_request:\n  - actions:\n      - type: forward-internal\n        config:\n          url: https://example.internal\n"
        ep = await asyncio.to_thread(
            client.endpoints.create, url="http://your-name.burrow.localhost", type="cloud", traffic_policy=policy
        )
        assert ep.type == "cloud"
        async with public(edge) as c:
            r = await c.get("/through-cloud", headers={"Host": "your-name.burrow.localhost"})
        assert r.status_code == 200 and r.text == "GET /through-cloud\n"
        head = up.requests[0][0]
        assert b"Host: your-name.burrow.localhost" in head
        assert b"X-Forwarded-Host: your-name.burrow.localhost" in head
        assert b"X-Forwarded-For: 127.0.0.1" in head and b"X-Forwarded-Proto: http\r\n" in head
