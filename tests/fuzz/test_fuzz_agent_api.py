"""Fuzz the agent API (``web_addr``'s ``/api``) with hypothesis, bounded.

One edge, one agent with an http tunnel ``command_line`` to a strict upstream, and a few
captures made through the edge at the start (a GET, a POST with a body and a chunked
POST with bare-LF chunk lines, which today's edge accepts), so the capture and replay
routes get real ids.

Each example is one request through one keep-alive ``httpx.Client`` with
``Host: 127.0.0.1:<port>`` and ``Content-Type: application/json``.  Every answer must be
below 500, except the ngrok-documented ``502 {"error_code": 103, "msg": "failed to start
tunnel"}`` when the edge refuses a tunnel (seeds/README); a 4xx must be the agent API's
error body; no traceback / ERROR line may appear in the agent's or the edge's log.

One case in eight instead sends a foreign ``Host``, a cross-site ``Origin`` on a write or
a non-JSON ``Content-Type`` on a write (DNS rebinding / CSRF, issue 12 item 13): those
must be refused with a 4xx.  Tunnels a case creates are deleted at once (the fuzz holds
no ports); the ``command_line`` tunnel and the seeded captures are never deleted.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.harness import (
    TEST_TIMEOUT,
    Accepted,
    BadShape,
    Hang,
    LogError,
    LogWatch,
    Recorder,
    ServerError,
    StrictUpstream,
    fuzz,
    raw_exchange,
    wait_for,
)
from tests.fuzz.strategies import POLICIES, json_any, json_leaf, odd_text
from tests.procs import host_of, start_agent, start_edge


@dataclass
class Stack:
    web: str
    host_header: str
    upstream_port: int
    capture_ids: list[str]
    logs: LogWatch
    http: httpx.Client


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz-agent")
    up = StrictUpstream().start()
    edge = start_edge(tmp / "edge")
    agent = start_agent(edge, "http", str(up.port), home=tmp / "home")
    web = agent.ready["web_addr"]
    host = host_of(agent.public_url).encode()
    for req in (
        b"GET /seed?a=1 HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer x\r\n\r\n" % host,
        b"POST /seed HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}" % host,
        b"POST /seed HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n" % host,
    ):
        raw_exchange(edge.http_addr, req)
    http = httpx.Client(base_url=f"http://{web}", timeout=20,
                        headers={"Host": web, "Content-Type": "application/json"})
    try:
        caps = wait_for(lambda: http.get("/api/requests/http").json()["requests"], what="seed captures")
        yield Stack(f"http://{web}", web, up.port, [c["id"] for c in caps],
                    LogWatch({"edge": edge, "agent": agent}), http)
    finally:
        http.close()
        agent.stop()
        edge.stop()
        up.stop()


# ------------------------------------------------------------------------- strategies
NAMES = ["command_line", "fz1", "fz2", "", "a/b", "%2F", "é", "x" * 300, "..", "%00"]


def _addrs(port: int):
    return st.one_of(
        st.sampled_from([str(port), port, f"127.0.0.1:{port}", f"http://localhost:{port}", f"https://127.0.0.1:{port}",
                         f"[::1]:{port}", "\x93x:80", "127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1:x", "", "tcp://127.0.0.1:1",
                         "ftp://127.0.0.1:1", "http://", "[::1", "é:80", "127.0.0.1:" + "9" * 50, -1, 0, 2**70]),
        json_leaf,
    )


def _near(port: int) -> dict:
    addr = _addrs(port)
    url = st.one_of(st.sampled_from(["", "http://fz.burrow.localhost", "https://fz.burrow.localhost", "tcp://",
                                     "tls://fz.burrow.localhost", "http://x.internal", "http://127.0.0.1",
                                     "http://" + "a" * 300 + ".burrow.localhost", "fz", "http://é.burrow.localhost"]), json_leaf)
    policy = st.one_of(st.sampled_from(POLICIES), json_any)
    return {
        "tunnel": {"addr": addr, "proto": st.one_of(st.sampled_from(["http", "https", "tcp", "tls", "udp", ""]), json_leaf),
                   "name": st.one_of(st.sampled_from(NAMES), odd_text), "url": url,
                   "binding": st.one_of(st.sampled_from(["public", "internal", "kubernetes", "x"]), json_leaf),
                   "traffic_policy": policy, "inspect": json_leaf, "pooling_enabled": json_leaf,
                   "metadata": odd_text, "description": odd_text},
        "endpoint": {"url": url, "upstream": st.one_of(st.fixed_dictionaries({"url": addr}), json_any),
                     "name": st.one_of(st.sampled_from(NAMES), odd_text), "traffic_policy": policy,
                     "bindings": st.one_of(st.sampled_from([["public"], ["internal"], []]), json_any),
                     "pooling_enabled": json_leaf, "inspect": json_leaf, "metadata": odd_text, "description": odd_text},
    }


REPLAY_RAW = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
              b"GET / HTTP/1.1\r\n\r\n", b"garbage", b"", b"POST / HTTP/1.1\r\nContent-Length: 99\r\n\r\nx"]


@st.composite
def replay_body(draw, ids: list[str]) -> dict:
    fields = {
        "id": st.one_of(st.sampled_from(ids), st.sampled_from(["", "0" * 16, "x"]), json_leaf),
        "tunnel_name": st.one_of(st.sampled_from(NAMES), json_leaf),
        "method": st.one_of(st.sampled_from(["GET", "post", "X", "G T", "é"]), json_leaf),
        "uri": st.one_of(st.sampled_from(["/", "*", "/a b", "/\r\nX: y", "http://x/", "/" + "a" * 70000]), json_leaf),
        "headers": st.one_of(st.dictionaries(odd_text, st.one_of(odd_text, st.lists(odd_text, max_size=3)), max_size=3), json_any),
        "body": odd_text,
        "body_base64": st.one_of(st.sampled_from(["", "!!", "YWJj", "====="]), odd_text),
        "raw": st.one_of(st.sampled_from(REPLAY_RAW).map(lambda b: base64.b64encode(b).decode()), odd_text),
    }
    names = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=4))
    obj = {n: draw(fields[n]) for n in ["id", *names]} if draw(st.integers(0, 9)) else {n: draw(fields[n]) for n in names}
    return obj


@st.composite
def agent_requests(draw, ids: list[str], port: int) -> dict:
    near = _near(port)
    route = draw(st.sampled_from([
        "GET /api", "GET /api/status", "GET /api/tunnels", "POST /api/tunnels", "GET /api/tunnels/{name}",
        "DELETE /api/tunnels/{name}", "GET /api/endpoints", "POST /api/endpoints", "GET /api/endpoints/{name}",
        "PUT /api/endpoints/{name}", "DELETE /api/endpoints/{name}", "GET /api/requests/http",
        "POST /api/requests/http", "GET /api/requests/http/{id}", "DELETE /api/requests/http/{id}",
        "PATCH /api/tunnels", "GET /api/nope", "OPTIONS /api/tunnels", "GET /", "GET /api/tunnels/{name}/x",
    ]))
    method, path = route.split(" ")
    name = draw(st.one_of(st.sampled_from(NAMES), st.text(max_size=12)))
    if method in ("DELETE", "PUT") and name == "command_line":
        name = "fz1"  # keep the tunnel the replays use
    if method == "DELETE":
        ident = draw(st.sampled_from(["0" * 16, "zz", "", "%00"]))  # keep the seeded captures
    else:
        ident = draw(st.one_of(st.sampled_from(ids), st.sampled_from(["0" * 16, "zz", "%00", "x" * 500]), st.text(max_size=20)))
    path = path.replace("{name}", name.replace("/", "%2F") or "%20").replace("{id}", ident or "%20")
    params: list[tuple[str, str]] = []
    for _ in range(draw(st.integers(0, 2))):
        params.append((draw(st.sampled_from(["limit", "offset", "q", "tunnel_name", "summary", "x"])), draw(st.one_of(
            st.sampled_from(["1", "0", "-1", "99999999999999999999", "abc", "", "true", "method == 'GET'",
                             "status >= 500 and", "(((((((", "path ~ '(a+)+$'", "body ~ 'x'", "headers.x == 1"]),
            st.text(max_size=30)))))
    kind = draw(st.sampled_from(["near"] * 6 + ["json", "none", "invalid", "deep"]))
    if route in ("POST /api/tunnels", "POST /api/endpoints", "PUT /api/endpoints/{name}") and kind == "near":
        fields = near["tunnel" if "tunnels" in route else "endpoint"]
        picked = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=len(fields)))
        obj = {n: draw(fields[n]) for n in picked}
        if "tunnels" in route and draw(st.integers(0, 3)):
            obj["addr"] = draw(fields["addr"])
        body = json.dumps(obj).encode()
    elif route == "POST /api/requests/http" and kind == "near":
        body = json.dumps(draw(replay_body(ids))).encode()
    elif kind == "json" or kind == "near":
        body = json.dumps(draw(json_any)).encode()
    elif kind == "none":
        body = None
    elif kind == "invalid":
        body = draw(st.sampled_from([b"{", b"\xff", b"[1,]", b"{'a':1}", b"1e9999", b'{"addr":"\\ud800"}', b"null"]))
    else:
        body = draw(st.sampled_from([b"[", b'{"a":']) ) * draw(st.sampled_from([100, 1000, 10_000, 100_000]))
    guard = None
    if draw(st.integers(0, 7)) == 0:
        guard = draw(st.sampled_from(["host", "origin", "ctype"]))
    return {"method": method, "path": path, "params": params, "body": body, "guard": guard,
            "guard_value": draw(st.sampled_from({
                "host": ["rebind.evil.example", "evil.example:4040", "127.0.0.1.evil.example", "", "localhost.evil", "0.0.0.0"],
                "origin": ["http://evil.example", "null", "https://127.0.0.1.evil.example", "http://localhost:1"],
                "ctype": ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "", "text/json"],
                None: [""],
            }[guard]))}


# ------------------------------------------------------------------------- checks
def _agent_error_shape(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return f"not JSON: {resp.content[:200]!r}"
    if not isinstance(body, dict):
        return "not an object"
    problems = []
    if not isinstance(body.get("error_code"), int):
        problems.append(f"error_code {body.get('error_code')!r}")
    if body.get("status_code") != resp.status_code:
        problems.append(f"status_code {body.get('status_code')!r}")
    if not isinstance(body.get("msg"), str):
        problems.append("no msg")
    if not isinstance(body.get("details"), dict):
        problems.append("no details")
    return ", ".join(problems)


def _start_refused(resp: httpx.Response) -> bool:
    """ngrok's documented answer when the edge refuses a tunnel (seeds/README.md)."""
    try:
        body = resp.json()
    except ValueError:
        return False
    return resp.status_code == 502 and body.get("error_code") == 103 and body.get("msg") == "failed to start tunnel"


@pytest.mark.timeout(TEST_TIMEOUT)
def test_fuzz_agent_api(stack):
    record = Recorder("agent_api")
    count = {"n": 0, "refused_starts": 0}
    t0 = time.monotonic()

    @fuzz
    @given(case=agent_requests(stack.capture_ids, stack.upstream_port))
    def run(case):
        count["n"] += 1
        record.case(case)
        headers = {}
        write = case["method"] in ("POST", "PUT", "DELETE", "PATCH")
        if case["guard"] == "host":
            headers["Host"] = case["guard_value"]
        elif case["guard"] == "origin":
            headers["Origin"] = case["guard_value"]
        elif case["guard"] == "ctype":
            headers["Content-Type"] = case["guard_value"]
        try:
            resp = stack.http.request(case["method"], case["path"], params=case["params"], content=case["body"],
                                      headers=headers)
        except (httpx.LocalProtocolError, httpx.InvalidURL, UnicodeEncodeError):
            return
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            record(ServerError, f"connection dropped: {exc!r}", case)
            resp = None
        except httpx.TimeoutException as exc:
            record(Hang, f"timeout: {exc!r}", case)
            resp = None
        if resp is not None:
            shown = f"{resp.status_code} {resp.content[:400]!r}"
            if resp.status_code >= 500:
                if _start_refused(resp):
                    count["refused_starts"] += 1
                else:
                    record(ServerError, shown, case)
            elif resp.status_code >= 400:
                problem = _agent_error_shape(resp)
                if problem:
                    record(BadShape, f"{problem}\n{shown}", case)
            must_refuse = case["guard"] == "host" or (
                write and (case["guard"] == "origin" or (case["guard"] == "ctype" and case["body"])))
            if must_refuse and resp.status_code < 400:
                record(Accepted, f"{case['guard']} {case['guard_value']!r} was served: {shown}", case)
            if resp.status_code in (200, 201) and case["method"] in ("POST", "PUT") and "/requests/" not in case["path"]:
                try:
                    made = resp.json().get("name")
                except (ValueError, AttributeError):
                    made = None
                if isinstance(made, str) and made != "command_line":  # hold nothing the fuzz made
                    stack.http.delete(f"/api/tunnels/{made.replace('/', '%2F')}")
        errs = stack.logs.new_errors()
        if errs:
            record(LogError, errs, case)

    run()
    print(f"agent API fuzz: {count['n']} cases in {time.monotonic() - t0:.1f}s "
          f"({count['refused_starts']} documented 502 'failed to start tunnel')")
    time.sleep(0.5)
    tail = stack.logs.new_errors()
    assert not tail, f"log errors at the end of the run:\n{tail}"
    assert not stack.logs.alive(), stack.logs.alive()
    assert record.count == 0, f"{record.count} findings written to the survey file"
