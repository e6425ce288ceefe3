"""Traffic policy against hostile requests: header injection through interpolation,
non-latin-1 values, and evaluation that must not stall the edge (issue 12, items 6, 12)."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.e2e.test_policy import _with_policy, policy_file, public
from tests.upstreams import HTTPUpstream


async def _exchange(edge, data: bytes, responses: int = 1, timeout: float = 10.0) -> bytes:
    """Send ``data`` on one connection and read until ``responses`` complete responses arrived
    (each must have a Content-Length) or the edge closes."""
    r, w = await asyncio.open_connection(*edge.http_addr)
    w.write(data)
    got = b""
    try:
        deadline = time.monotonic() + timeout
        while _complete(got) < responses:
            chunk = await asyncio.wait_for(r.read(65536), max(0.1, deadline - time.monotonic()))
            if not chunk:
                break
            got += chunk
    finally:
        w.close()
    return got


def _complete(buf: bytes) -> int:
    n = 0
    while b"\r\n\r\n" in buf:
        head, rest = buf.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        if len(rest) < length:
            break
        n += 1
        buf = rest[length:]
    return n


def _head_lines(resp: bytes) -> list[bytes]:
    return resp.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


ECHO = """
on_http_request:
  - actions:
      - type: custom-response
        config:
          status_code: 200
          headers: {X-Echo: "${req.query_params['q'][0]}"}
          body: "q=${req.query_params['q'][0]}"
"""


async def test_custom_response_header_cannot_add_a_header_line(edge, agents, tmp_path):
    async with HTTPUpstream() as up:
        _, host = await _with_policy(edge, agents, tmp_path, up, ECHO)
        resp = await _exchange(
            edge, f"GET /?q=a%0d%0aSet-Cookie:%20session=x HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        )
        lines = _head_lines(resp)
        assert lines[0] == b"HTTP/1.1 200 OK"
        assert not any(ln.lower().startswith(b"set-cookie") for ln in lines)
        assert b"X-Echo: a  Set-Cookie: session=x" in lines  # CR and LF became spaces, as Go does
        assert "Traceback" not in edge.stderr


async def test_non_latin1_value_goes_out_as_utf8(edge, agents, tmp_path):
    fwd = """
on_http_request:
  - actions:
      - type: add-headers
        config: {headers: {x-q: "${req.query_params['q'][0]}", x-h: "${req.headers['x-in'][0]}"}}
"""
    async with HTTPUpstream() as up:
        _, host = await _with_policy(edge, agents, tmp_path, up, ECHO)
        resp = await _exchange(edge, f"GET /?q=%E2%82%AC HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert _head_lines(resp)[0] == b"HTTP/1.1 200 OK"
        assert "X-Echo: €".encode() in _head_lines(resp)
        assert resp.endswith("q=€".encode())

        _, host2 = await _with_policy(edge, agents, tmp_path, up, fwd)
        # a UTF-8 header value and an invalid byte (\xff) both reach the upstream unchanged
        req = f"GET /x?q=%E2%82%AC HTTP/1.1\r\nHost: {host2}\r\nX-In: ü\r\n".encode() + b"X-Raw: a\xffb\r\n\r\n"
        resp = await _exchange(edge, req)
        assert _head_lines(resp)[0] == b"HTTP/1.1 200 OK", resp
        head = up.requests[-1][0]
        assert "x-q: €\r\n".encode() in head and "x-h: ü\r\n".encode() in head
        assert "X-In: ü\r\n".encode() in head and b"X-Raw: a\xffb\r\n" in head
    assert "UnicodeEncodeError" not in edge.stderr and "Traceback" not in edge.stderr


async def test_add_headers_cannot_smuggle_a_request_past_deny(edge, agents, tmp_path):
    text = """
on_http_request:
  - expressions: ["req.url.path.startsWith('/admin')"]
    actions:
      - type: deny
  - actions:
      - type: add-headers
        config: {headers: {x-q: "${req.query_params['q'][0]}"}}
"""
    smuggled = "GET /admin/secret HTTP/1.1\r\nHost: x\r\n\r\n"
    q = "a\r\n\r\n" + smuggled
    from urllib.parse import quote

    async with HTTPUpstream() as up:
        _, host = await _with_policy(edge, agents, tmp_path, up, text)
        data = (
            f"GET /first?q={quote(q)} HTTP/1.1\r\nHost: {host}\r\n\r\n"
            f"GET /second HTTP/1.1\r\nHost: {host}\r\n\r\n"
        ).encode()
        resp = await _exchange(edge, data, responses=2)
        assert _complete(resp) == 2
        assert resp.count(b"HTTP/1.1 200 OK") == 2
        assert resp.endswith(b"GET /second\n")  # the second request got its own answer
        paths = [h.split(b" ")[1] for h, _ in up.requests]
        assert paths[0].startswith(b"/first") and paths[1:] == [b"/second"]
        assert b"\r\nx-q: a    GET /admin/secret HTTP/1.1  Host: x\r\n" in up.requests[0][0]


async def test_redirect_location_is_one_encoded_header(edge, agents, tmp_path):
    text = """
on_http_request:
  - actions:
      - type: redirect
        config: {from: "^http://[^/]+/go/(.*)$", to: "https://new.example/$1?from=${req.query_params['r'][0]}"}
"""
    async with HTTPUpstream() as up:
        _, host = await _with_policy(edge, agents, tmp_path, up, text)
        # the interpolated value is taken literally: no group references, no line breaks
        resp = await _exchange(
            edge, f"GET /go/x?r=%5Cg%3C9%3E%0d%0aX-Evil:%201%E2%82%AC HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        )
        lines = _head_lines(resp)
        assert lines[0] == b"HTTP/1.1 302 Found", resp
        loc = [ln for ln in lines if ln.lower().startswith(b"location:")]
        assert loc == [b"Location: https://new.example/x?r=%5Cg%3C9%3E%0D%0AX-Evil:%201%E2%82%AC?from=\\g<9>%0D%0AX-Evil:%201%E2%82%AC"]
        assert not any(ln.lower().startswith(b"x-evil") for ln in lines)
        assert "Traceback" not in edge.stderr


# ----------------------------------------------------------------------------- item 12
SLOW_RULE = """  - expressions: ["req.headers.exists(k, k.matches('^x-debug-.*$'))"]
    actions: [{type: deny}]
"""


async def test_expensive_policy_fails_alone_and_other_endpoints_are_served(edge, agents, tmp_path):
    """Endpoint A has 256 costly rules (each a regex over every header); one request with
    5,000 headers and a few with 99 must not stall endpoint B, and get a clear error."""
    async with HTTPUpstream() as up_a, HTTPUpstream() as up_b, public(edge) as c:
        _, host_a = await _with_policy(edge, agents, tmp_path, up_a, "on_http_request:\n" + SLOW_RULE * 256)
        _, host_b = await _with_policy(edge, agents, tmp_path, up_b, "on_http_request: []\n")
        flood = "".join(f"h-{i}: v\r\n" for i in range(5000))
        many = "".join(f"h-{i}: v\r\n" for i in range(98))

        async def expensive(hdrs: str) -> bytes:
            return await _exchange(edge, f"GET / HTTP/1.1\r\nHost: {host_a}\r\n{hdrs}\r\n".encode(), timeout=120)

        tasks = [asyncio.create_task(expensive(flood))] + [asyncio.create_task(expensive(many)) for _ in range(3)]
        await asyncio.sleep(0.2)  # let the expensive requests reach the edge first
        t0 = time.monotonic()
        for i in range(5):
            r = await asyncio.wait_for(c.get(f"/b{i}", headers={"Host": host_b}), 30)
            assert r.status_code == 200 and r.text == f"GET /b{i}\n"
        served_b = time.monotonic() - t0
        results = await asyncio.gather(*tasks)
        assert served_b < 30
        flood_resp, *many_resp = results
        assert _head_lines(flood_resp)[0] == b"HTTP/1.1 431 Request Header Fields Too Large", flood_resp[:200]
        assert b"ngrok-error-code: ERR_NGROK_2253" in flood_resp
        for resp in many_resp:
            assert _head_lines(resp)[0] == b"HTTP/1.1 500 Internal Server Error", resp[:200]
            assert b"ngrok-error-code: ERR_NGROK_2253" in resp and b"time budget" in resp
        assert up_a.requests == []
        assert "Traceback" not in edge.stderr


async def test_oversized_policy_is_refused_at_bind(edge, agents, tmp_path):
    async with HTTPUpstream() as up:
        text = "on_http_request:\n" + SLOW_RULE * 626  # 61 KiB: fits the size cap, not the rule cap
        a = agents("http", up.port, "--traffic-policy-file", policy_file(tmp_path, text), check=False)
        assert a.wait_exit() != 0
        assert "626 rules; at most 256" in a.stderr
        deep = "on_http_request:\n  - expressions: [\"req.headers.all(a, req.headers.all(b, req.headers.all(c, a == b)))\"]\n    actions: [{type: deny}]\n"
        a = agents("http", up.port, "--traffic-policy-file", policy_file(tmp_path, deep), check=False)
        assert a.wait_exit() != 0
        assert "more than 2 deep" in a.stderr


async def test_eval_budget_flag(tmp_path):
    """``--policy-eval-budget`` is honoured (a tiny budget fails a modest policy)."""
    from tests.procs import READY_TIMEOUT, BurrowProc, edge_args, start_agent

    edge = BurrowProc([*edge_args(tmp_path / "e2"), "--policy-eval-budget", "0.000001"])
    try:
        edge.ready = edge.wait_event("ready", READY_TIMEOUT)
        async with HTTPUpstream() as up:
            text = "on_http_request:\n" + SLOW_RULE * 3
            a = start_agent(edge, "http", str(up.port), "--traffic-policy-file", policy_file(tmp_path, text), home=tmp_path / "h2")
            try:
                host = a.public_url.split("://", 1)[1].rsplit(":", 1)[0]
                async with httpx.AsyncClient(base_url=f"http://{edge.http_addr[0]}:{edge.http_addr[1]}", timeout=10) as c:
                    r = await c.get("/", headers={"Host": host})
                assert r.status_code == 500 and r.headers["ngrok-error-code"] == "ERR_NGROK_2253"
            finally:
                a.stop()
    finally:
        edge.stop()
