"""The agent API with real traffic: captures, replay, filters, eviction, persistence."""

from __future__ import annotations

import asyncio
import base64
import json
import os

import httpx

from tests import shapes
from tests.procs import host_of
from tests.upstreams import HTTPUpstream, raw_exchange


def api(agent) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://{agent.ready['web_addr']}", timeout=20)


def public(edge) -> httpx.AsyncClient:
    host, port = edge.http_addr
    return httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30)


async def wait_captures(c: httpx.AsyncClient, n: int, **params) -> list[dict]:
    """Poll (bounded) until ``n`` completed captures are listed."""
    for _ in range(200):
        reqs = (await c.get("/api/requests/http", params=params)).json()["requests"]
        done = [r for r in reqs if r["response"] is not None]
        if len(done) >= n:
            return reqs
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {n} captures: {reqs}")


async def test_seed_shapes_of_every_agent_api_answer(edge, agents):
    async with HTTPUpstream() as up:
        a = agents("http", up.port)
        async with api(a) as c, public(edge) as p:
            await p.get("/x", headers={"Host": host_of(a.public_url)})
            status = (await c.get("/api/status")).json()
            assert shapes.shape_errors(shapes.STATUS, status) == []
            assert status["status"] == "online"
            tl = (await c.get("/api/tunnels")).json()
            assert shapes.shape_errors(shapes.TUNNEL_LIST, tl) == []
            t = (await c.get("/api/tunnels/command_line")).json()
            assert shapes.shape_errors(shapes.TUNNEL, t) == []
            r = await c.post("/api/tunnels", json={"addr": str(up.port), "proto": "http", "name": "second"})
            assert r.status_code == 201
            assert shapes.shape_errors(shapes.TUNNEL, r.json()) == []
            reqs = await wait_captures(c, 1)
            lst = (await c.get("/api/requests/http")).json()
            assert shapes.shape_errors(shapes.CAPTURED_LIST, lst) == []
            one = (await c.get(f"/api/requests/http/{reqs[0]['id']}")).json()
            assert shapes.shape_errors(shapes.CAPTURED, one) == []
            assert len(one["id"]) == 16 and int(one["id"], 16) >= 0
            r = await c.delete("/api/tunnels/second")
            assert r.status_code == 204 and r.content == b""
            err = await c.get("/api/tunnels/nope")
            assert err.status_code == 404
            assert set(err.json()) == {"error_code", "status_code", "msg", "details"}
            bad = await c.post("/api/tunnels", content=b"{nope", headers={"Content-Type": "application/json"})
            assert bad.status_code == 400 and "JSON" in bad.json()["msg"]
            bad = await c.post("/api/tunnels", json={"proto": "http"})
            assert bad.status_code == 400 and bad.json()["msg"] == "invalid tunnel configuration"
            assert "addr" in bad.json()["details"]["err"]


async def test_capture_raw_is_what_the_client_sent(edge, agents):
    async with HTTPUpstream() as up:
        a = agents("http", up.port)
        host = host_of(a.public_url)
        sent = (
            f"POST /echo?q=1 HTTP/1.1\r\nHost: {host}\r\nX-Test: yes\r\nContent-Length: 11\r\n"
            "Connection: close\r\n\r\nhello world"
        ).encode()
        await raw_exchange(*edge.http_addr, sent)
        async with api(a) as c:
            reqs = await wait_captures(c, 1)
        cap = reqs[0]
        assert base64.b64decode(cap["request"]["raw"]) == sent
        assert cap["request"]["method"] == "POST" and cap["request"]["uri"] == "/echo?q=1"
        assert cap["request"]["headers"]["X-Test"] == ["yes"]
        assert cap["response"]["status_code"] == 200
        assert base64.b64decode(cap["response"]["raw"]) == up.sent[0]
        assert cap["remote_addr"] == "127.0.0.1"
        assert cap["duration"] > 0
        # the upstream saw the forwarding headers the agent added
        assert b"X-Forwarded-For: 127.0.0.1" in up.requests[0][0]


async def test_replay_and_edit_and_replay(edge, agents):
    async with HTTPUpstream() as up:
        a = agents("http", up.port)
        async with api(a) as c, public(edge) as p:
            await p.post("/echo", content=b"original", headers={"Host": host_of(a.public_url)})
            orig = (await wait_captures(c, 1))[0]
            r = await c.post("/api/requests/http", json={"id": orig["id"]})
            assert r.status_code == 204
            assert len(up.requests) == 2
            assert up.requests[1][1] == b"original"
            assert up.requests[1][0].split(b"\r\n")[0] == b"POST /echo HTTP/1.1"
            reqs = await wait_captures(c, 2)
            assert reqs[0]["replay_of"] == orig["id"]
            assert reqs[0]["id"] == r.headers["burrow-capture-id"]

            r = await c.post(
                "/api/requests/http",
                json={
                    "id": orig["id"],
                    "method": "PUT",
                    "uri": "/echo?edited=1",
                    "headers": {"Host": "edited.example", "X-Edited": ["1", "2"]},
                    "body": "changed body",
                },
            )
            assert r.status_code == 204, r.text
            head, body = up.requests[2]
            assert head.startswith(b"PUT /echo?edited=1 HTTP/1.1\r\n")
            assert b"X-Edited: 1\r\nX-Edited: 2\r\n" in head
            assert b"Host: edited.example" in head
            assert body == b"changed body"
            reqs = await wait_captures(c, 3)
            assert reqs[0]["replay_of"] == orig["id"]
            assert reqs[0]["request"]["method"] == "PUT"

            bad = await c.post("/api/requests/http", json={"id": orig["id"], "uri": "no slash"})
            assert bad.status_code == 400
            missing = await c.post("/api/requests/http", json={"id": "0000000000000000"})
            assert missing.status_code == 404
            unknown = await c.post("/api/requests/http", json={"id": orig["id"], "bogus": 1})
            assert unknown.status_code == 400 and "bogus" in unknown.json()["msg"]


async def test_stop_tunnel_over_api_takes_url_offline(edge, agents):
    async with HTTPUpstream() as up:
        a = agents("http", up.port)
        host = host_of(a.public_url)
        async with api(a) as c, public(edge) as p:
            assert (await p.get("/", headers={"Host": host})).status_code == 200
            assert (await c.delete("/api/tunnels/command_line")).status_code == 204
            r = await p.get("/", headers={"Host": host})
            assert r.status_code == 404 and r.headers["ngrok-error-code"] == "ERR_NGROK_3200"
            assert (await c.get("/api/tunnels")).json()["tunnels"] == []


async def test_filters_and_delete_all(edge, agents):
    async with HTTPUpstream() as up:
        a = agents("http", up.port)
        async with api(a) as c, public(edge) as p:
            second = (await c.post("/api/tunnels", json={"addr": up.port, "proto": "http", "name": "two", "schemes": ["http"]})).json()
            for i in range(3):
                await p.get(f"/one/{i}", headers={"Host": host_of(a.public_url)})
            for i in range(2):
                await p.get(f"/two/{i}", headers={"Host": host_of(second["public_url"])})
            await wait_captures(c, 5)
            two = (await c.get("/api/requests/http", params={"tunnel_name": "two"})).json()["requests"]
            assert [r["request"]["uri"] for r in two] == ["/two/1", "/two/0"]
            lim = (await c.get("/api/requests/http", params={"limit": 2})).json()["requests"]
            assert [r["request"]["uri"] for r in lim] == ["/two/1", "/two/0"]
            bad = await c.get("/api/requests/http", params={"limit": "x"})
            assert bad.status_code == 400
            one = (await c.get("/api/requests/http", params={"limit": 1})).json()["requests"][0]["id"]
            assert (await c.delete(f"/api/requests/http/{one}")).status_code == 204
            assert (await c.get(f"/api/requests/http/{one}")).status_code == 404
            assert (await c.delete(f"/api/requests/http/{one}")).status_code == 404
            assert (await c.delete("/api/requests/http")).status_code == 204
            assert (await c.get("/api/requests/http")).json()["requests"] == []


async def test_20mb_response_whole_while_capture_capped(edge, agents):
    async with HTTPUpstream() as up:
        a = agents("http", up.port, "--inspect-body-cap", "65536")
        n = 20 * 1024 * 1024
        async with api(a) as c, public(edge) as p:
            r = await p.get(f"/bytes/{n}", headers={"Host": host_of(a.public_url)})
            expected = (bytes(range(256)) * (n // 256 + 1))[:n]
            assert len(r.content) == n
            assert r.content == expected
            cap = (await wait_captures(c, 1))[0]
            resp = cap["response"]
            assert resp["truncated"] is True and resp["body_size"] == n
            raw = base64.b64decode(resp["raw"])
            head_len = raw.index(b"\r\n\r\n") + 4
            assert raw[head_len:] == expected[:65536]


async def test_eviction_keeps_bytes_under_inspect_db_size(edge, agents):
    limit = 200_000
    async with HTTPUpstream() as up:
        a = agents("http", up.port, "--inspect-db-size", str(limit))
        async with api(a) as c, public(edge) as p:
            host = host_of(a.public_url)
            for i in range(60):
                await p.get(f"/bytes/{10_000 + i}", headers={"Host": host})
            reqs = (await c.get("/api/requests/http")).json()["requests"]
        stored = sum(
            len(base64.b64decode(r["request"]["raw"])) + len(base64.b64decode(r["response"]["raw"]))
            for r in reqs
        )
        assert stored <= limit
        assert 5 < len(reqs) < 60
        assert reqs[0]["request"]["uri"] == "/bytes/10059"  # the newest is kept
        uris = [r["request"]["uri"] for r in reqs]
        assert uris == [f"/bytes/{10_059 - i}" for i in range(len(reqs))]  # oldest went first


async def test_inspect_db_survives_agent_restart(edge, agents, tmp_path):
    db = tmp_path / "captures.db"
    async with HTTPUpstream() as up:
        a = agents("http", up.port, "--inspect-db", str(db))
        async with api(a) as c, public(edge) as p:
            await p.post("/echo", content=b"keep me", headers={"Host": host_of(a.public_url)})
            before = await wait_captures(c, 1)
        assert a.stop() == 0
        b = agents("http", up.port, "--inspect-db", str(db))
        async with api(b) as c:
            after = (await c.get("/api/requests/http")).json()["requests"]
        assert [r["id"] for r in after] == [before[0]["id"]]
        assert base64.b64decode(after[0]["request"]["raw"]).endswith(b"keep me")
        assert after[0]["response"]["status_code"] == 200


async def test_inspection_off(edge, agents):
    async with HTTPUpstream() as up:
        a = agents("http", up.port, "--inspect-db-size", "-1")
        async with api(a) as c, public(edge) as p:
            r = await p.get("/", headers={"Host": host_of(a.public_url)})
            assert r.status_code == 200
            assert (await c.get("/api/requests/http")).json()["requests"] == []


async def listen_until_completed(agent) -> tuple[list[tuple[str, dict]], asyncio.Task]:
    """Follow the agent's /api/events until the first request_completed; returns the
    events seen so far (filled as they come) and the task, once ``hello`` has arrived."""
    events: list[tuple[str, dict]] = []

    async def listen():
        async with api(agent) as c, c.stream("GET", "/api/events") as s:
            name = None
            async for line in s.aiter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
                    if name == "request_completed":
                        return

    task = asyncio.create_task(listen())
    for _ in range(100):
        if events:
            break
        await asyncio.sleep(0.02)
    assert events and events[0][0] == "hello"
    return events, task


async def test_event_stream_announces_exchanges(edge, agents):
    async with HTTPUpstream() as up:
        a = agents("http", up.port)
        events, task = await listen_until_completed(a)
        async with public(edge) as p:
            await p.get("/evented", headers={"Host": host_of(a.public_url)})
        await asyncio.wait_for(task, 10)
        names = [n for n, _ in events]
        assert names.index("request_started") < names.index("request_completed")
        done = events[-1][1]
        assert done["path"] == "/evented" and done["status_code"] == 200


async def test_event_stream_completes_a_refused_upstream_with_its_502(edge, agents):
    """An upstream that refuses the connection: request_started is followed by
    request_completed carrying the agent's 502 (the console row must not stay pending)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed_port = s.getsockname()[1]
    s.close()
    a = agents("http", closed_port)
    events, task = await listen_until_completed(a)
    async with public(edge) as p:
        r = await p.get("/refused", headers={"Host": host_of(a.public_url)})
    assert r.status_code == 502
    try:
        await asyncio.wait_for(task, 5)
    except TimeoutError:
        task.cancel()
        raise AssertionError(f"no request_completed after the 502: {[n for n, _ in events]}") from None
    names = [n for n, _ in events]
    assert names.index("request_started") < names.index("request_completed")
    started = dict(events)["request_started"]
    done = events[-1][1]
    assert done["id"] == started["id"]
    assert done["path"] == "/refused" and done["status_code"] == 502


async def test_invalid_query_is_400_naming_the_bad_token(edge, agents):
    async with HTTPUpstream() as up:
        a = agents("http", up.port)
        async with api(a) as c, public(edge) as p:
            await p.get("/x", headers={"Host": host_of(a.public_url)})
            await wait_captures(c, 1)
            for q, token in (
                ("status:abc", "status:abc"),
                ("dur>banana", "dur>banana"),
                ("status:404 OR status:501", "OR"),
                ("method:GET status>400", "status>400"),
            ):
                r = await c.get("/api/requests/http", params={"q": q})
                assert r.status_code == 400, (q, r.text)
                assert token in r.json()["msg"], (q, r.json())
            ok = await c.get("/api/requests/http", params={"q": "dur>0ms status:2xx"})
            assert ok.status_code == 200 and ok.json()["total"] == 1


def test_pyngrok_lists_starts_and_stops_tunnels(edge, tmp_path):
    """pyngrok launches burrow as if it were ngrok and drives its agent API."""
    from pyngrok import conf, ngrok

    burrow = os.path.join(os.path.dirname(os.sys.executable), "burrow")
    config = tmp_path / "ngrok.yml"
    config.write_text(
        "version: '3'\n"
        "agent:\n"
        "  authtoken: test-authtoken\n"
        f"  server_addr: {edge.ready['ingress_addr']}\n"
        f"  root_cas: {edge.ready['ca_file']}\n"
        "  web_addr: 127.0.0.1:0\n"
    )
    pc = conf.PyngrokConfig(ngrok_path=burrow, config_path=str(config), startup_timeout=20)
    try:
        tunnel = ngrok.connect("8080", pyngrok_config=pc)
        # ngrok v3's default: an https endpoint, since the edge has an https listener
        assert tunnel.public_url.startswith("https://")
        assert tunnel.public_url.endswith(".burrow.localhost:" + edge.ready["https_url"].rsplit(":", 1)[1])
        listed = ngrok.get_tunnels(pyngrok_config=pc)
        assert [t.public_url for t in listed] == [tunnel.public_url]
        ngrok.disconnect(tunnel.public_url, pyngrok_config=pc)
        assert ngrok.get_tunnels(pyngrok_config=pc) == []
    finally:
        ngrok.kill(pyngrok_config=pc)


def public_port(edge) -> int:
    return edge.http_addr[1]
