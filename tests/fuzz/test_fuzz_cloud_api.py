"""Fuzz the edge's cloud API (ngrok API v2) with hypothesis, bounded.

One edge (API rate limit off, so every case reaches the handlers), a second account made
for the fuzz (its own API key, so nothing it does can reach the bootstrap account) and an
agent of that account online (so ``/tunnel_sessions`` has a real id).  Real ids of an
endpoint, an agent ingress, a credential and a spare API key are mixed into the paths.

Each example is one request through one keep-alive ``httpx.Client`` (or, one time in
twenty, raw bytes on a fresh socket for what httpx cannot send).  Every answer must be
below 500; a 4xx must carry ngrok's error body (``error_code`` ``ERR_NGROK_*``,
``status_code``, ``msg``, ``details``); a 2xx other than 204 must be JSON; and no
traceback / ERROR line may appear in the edge's or the agent's log.  What a case creates
(201 with an ``id``) is deleted at once, so the fuzz holds no ports or names.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from backend.store import SQLiteStore
from tests.fuzz.harness import (
    TEST_TIMEOUT,
    BadShape,
    Hang,
    LogError,
    LogWatch,
    Recorder,
    ServerError,
    StrictUpstream,
    fuzz,
    http1_line,
    raw_exchange,
)
from tests.fuzz.strategies import B62, POLICIES, URLS, json_any, json_leaf, odd_text
from tests.procs import READY_TIMEOUT, BurrowProc, edge_args, start_agent

RESOURCES = ["endpoints", "agent_ingresses", "tunnel_sessions", "credentials", "api_keys", "reserved_domains"]
PREFIX = {"endpoints": "ep", "agent_ingresses": "agin", "tunnel_sessions": "ts", "credentials": "cr",
          "api_keys": "ak", "reserved_domains": "rd"}


@dataclass
class Stack:
    base: str
    addr: tuple[str, int]
    key: str
    ids: dict[str, list[str]]
    logs: LogWatch
    http: httpx.Client


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz-cloud")
    up = StrictUpstream().start()
    edge = BurrowProc([*edge_args(tmp / "edge"), "--api-rate-limit", "0"])
    edge.ready = edge.wait_event("ready", READY_TIMEOUT)
    with SQLiteStore(Path(edge.ready["data_dir"]) / "burrow.db") as store:
        acct = store.create_account("fuzz")
        store.add_api_key(acct.id, "fuzz-api-key", description="fuzz")
        store.add_authtoken(acct.id, "fuzz-authtoken", description="fuzz")
    agent = start_agent(edge, "http", str(up.port), "--authtoken", "fuzz-authtoken", home=tmp / "home")
    http = httpx.Client(base_url=edge.ready["api_url"], timeout=20,
                        headers={"Authorization": "Bearer fuzz-api-key", "Ngrok-Version": "2"})
    try:
        made = [
            http.post("/endpoints", json={"url": "https://fuzzshop.burrow.localhost", "traffic_policy":
                      '{"on_http_request":[{"actions":[{"type":"deny"}]}]}'}),
            http.post("/agent_ingresses", json={"domain": "connect.fuzz.example"}),
            http.post("/credentials", json={"description": "fuzz", "acl": ["bind:*.burrow.localhost"]}),
            http.post("/api_keys", json={"description": "spare"}),
        ]
        for r in made:
            assert r.status_code == 201, r.text
        ids = {res: [x["id"] for x in _items(http.get(f"/{res}").json())] for res in RESOURCES}
        assert ids["tunnel_sessions"] and ids["endpoints"] and ids["reserved_domains"], ids
        # the key the fuzz authenticates with must not be deleted by it: offer only the spare
        ids["api_keys"] = [made[3].json()["id"]]
        host, port = edge.ready["api_url"].split("://", 1)[1].rsplit(":", 1)
        yield Stack(edge.ready["api_url"], (host, int(port)), "fuzz-api-key", ids,
                    LogWatch({"edge": edge, "agent": agent}), http)
    finally:
        http.close()
        agent.stop()
        edge.stop()
        up.stop()


def _items(body: dict) -> list[dict]:
    return next(v for v in body.values() if isinstance(v, list))


# ------------------------------------------------------------------------- strategies
def _value(choices):
    return st.one_of(st.sampled_from(choices), json_any)


NEAR = {
    "endpoints": {"url": _value(URLS), "type": _value(["cloud", "agent", ""]), "traffic_policy": _value(POLICIES),
                  "description": odd_text, "metadata": odd_text, "bindings": _value([["public"], ["internal"], [], ["x", "y"]]),
                  "pooling_enabled": json_leaf},
    "agent_ingresses": {"domain": _value(["a.fuzz.example", "burrow.localhost", "x", "*.a.example", "é.example", "a" * 300]),
                        "description": odd_text, "metadata": odd_text,
                        "certificate_management_policy": _value([{"authority": "letsencrypt"}, {"private_key_type": "rsa"}, {}])},
    "credentials": {"description": odd_text, "metadata": odd_text, "owner_id": odd_text,
                    "acl": _value([["bind:a.burrow.localhost"], ["bind:*.burrow.localhost"], ["x"], ["bind:"], []])},
    "api_keys": {"description": odd_text, "metadata": odd_text, "owner_id": odd_text},
    "tunnel_sessions": {"id": odd_text},
    "reserved_domains": {"domain": odd_text},
}


@st.composite
def bodies(draw, resource: str) -> tuple[bytes | None, str | None]:
    """(body bytes or None, content type or None)."""
    kind = draw(st.sampled_from(["near"] * 5 + ["json"] * 2 + ["none", "empty", "invalid", "deep", "bytes"]))
    ctype = draw(st.sampled_from(["application/json"] * 10 + [None, "text/plain", "application/json; charset=latin-1",
                                                              "APPLICATION/JSON", "application/jsonx", "multipart/form-data; boundary=x"]))
    if kind == "none":
        return None, ctype
    if kind == "near":
        fields = NEAR[resource]
        names = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=len(fields)))
        obj = {n: draw(fields[n]) for n in names}
        if draw(st.integers(0, 9)) == 0:
            obj[draw(st.text(max_size=8))] = draw(json_leaf)
        return json.dumps(obj).encode(), ctype
    if kind == "json":
        return json.dumps(draw(json_any)).encode(), ctype
    if kind == "empty":
        return draw(st.sampled_from([b"", b" ", b"\n", b"{}"])), ctype
    if kind == "deep":
        n = draw(st.sampled_from([100, 1000, 10_000, 100_000]))
        opener = draw(st.sampled_from([b"[", b'{"a":', b'{"url":[']))
        return opener * n, ctype
    if kind == "invalid":
        return draw(st.sampled_from([b"{", b"{'a': 1}", b'{"a":1,}', b"NaN", b'{"url": NaN}', b"\xff\xfe{}",
                                     b'{"url": "\\ud800"}', b'{"a":1}{"b":2}', b"1e999999", b'"' + b"\\" * 3])), ctype
    return draw(st.binary(max_size=100)), ctype


@st.composite
def api_requests(draw, ids: dict[str, list[str]]) -> dict:
    resource = draw(st.sampled_from([*RESOURCES, "", "nope"]))
    path = "/" + resource
    res_key = resource if resource in PREFIX else "endpoints"
    shape = draw(st.sampled_from(["collection", "item", "item", "item", "action", "odd"]))
    if shape != "collection":
        kind = draw(st.sampled_from(["real", "real", "fake", "text"]))
        if kind == "real" and ids.get(res_key):
            ident = draw(st.sampled_from(ids[res_key]))
        elif kind == "fake":
            ident = draw(st.sampled_from(list(PREFIX.values()))) + "_" + draw(st.text(alphabet=B62, min_size=27, max_size=27))
        else:
            ident = draw(st.sampled_from(["", "%00", "%2F", "..", "%C3%A9", "x" * 500, "ep_", "%ff", "%"]) | st.text(
                alphabet="abc_%/:é", max_size=20))
        path += "/" + ident
        if shape == "action":
            path += "/" + draw(st.sampled_from(["stop", "restart", "update", "x"]))
        elif shape == "odd":
            path += draw(st.sampled_from(["/", "//", "/../endpoints", "?", "#x", ";a"]))
    method = draw(st.sampled_from(["GET"] * 4 + ["POST"] * 3 + ["PATCH"] * 2 + ["DELETE", "PUT", "HEAD", "OPTIONS", "TRACE", "BREW"]))
    if shape == "collection" and method == "DELETE":
        method = "GET"
    params: list[tuple[str, str]] = []
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(["limit", "limit", "before_id", "filter", "x", "é", ""]))
        value = draw(st.one_of(
            st.sampled_from(["1", "0", "-1", "100", "101", "99999999999999999999999", "1e3", "", " 5", "٣", "0x10",
                             "ep_zzzzzzzzzzzzzzzzzzzzzzzzzzz", "\x00"]),
            st.sampled_from([i for group in ids.values() for i in group]), st.text(max_size=20)))
        params.append((name, value))
    body, ctype = draw(bodies(res_key))
    headers = {}
    if ctype is not None:
        headers["Content-Type"] = ctype
    odd = draw(st.integers(0, 49))
    if odd == 0:
        headers["Authorization"] = draw(st.sampled_from(["", "Bearer", "Bearer wrong", "Basic x", "bearer fuzz-api-key",
                                                         "Bearer  fuzz-api-key ", "Bearer fuzz-authtoken"]))
    elif odd == 1:
        headers["Ngrok-Version"] = draw(st.sampled_from(["", "1", "3", "2.0", " 2", "é"]))
    elif odd == 2:
        headers["Host"] = draw(st.sampled_from(["evil.example", "", "a" * 300, "[::1]", "x:99999", "é.example"]))
    elif odd == 3:
        headers["X-" + draw(st.text(alphabet=B62, min_size=1, max_size=8))] = draw(
            st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=200))
    raw = None
    if draw(st.integers(0, 19)) == 0:
        raw = draw(raw_requests(path))
    return {"method": method, "path": path, "params": params, "body": body, "headers": headers, "raw": raw}


@st.composite
def raw_requests(draw, path: str) -> bytes:
    auth = b"Authorization: Bearer fuzz-api-key\r\nNgrok-Version: 2\r\nHost: x\r\n"
    kind = draw(st.sampled_from(["headers", "cl_short", "chunked", "garbage", "line", "bare_lf", "dup_cl"]))
    target = path.encode("utf-8", "surrogatepass")
    if kind == "headers":
        n = draw(st.sampled_from([100, 1000, 10_000]))
        return b"GET /endpoints HTTP/1.1\r\n" + auth + b"".join(b"X-%d: v\r\n" % i for i in range(n)) + b"\r\n"
    if kind == "cl_short":
        return b"POST /credentials HTTP/1.1\r\n" + auth + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{}"
    if kind == "chunked":
        return (b"POST /credentials HTTP/1.1\r\n" + auth + b"Content-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    if kind == "line":
        return draw(st.sampled_from([b"GET", b"GET " + target, b"GET " + target + b" HTTP/9.9", b"\r\n\r\n",
                                     b"GET http://x" + target + b" HTTP/1.1"])) + b"\r\n" + auth + b"\r\n"
    if kind == "bare_lf":
        return b"GET /endpoints HTTP/1.1\nAuthorization: Bearer fuzz-api-key\nNgrok-Version: 2\n\n"
    if kind == "dup_cl":
        return b"POST /api_keys HTTP/1.1\r\n" + auth + b"Content-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x"
    return draw(st.binary(max_size=200))


def _head_request(case: dict) -> bytes:
    query = urlencode(case["params"])
    target = quote(case["path"], safe="/%?#;:@") + ("?" + query if query else "")
    headers = {"Host": "127.0.0.1", "Authorization": "Bearer fuzz-api-key", "Ngrok-Version": "2", **case["headers"]}
    if case["body"]:
        headers["Content-Length"] = str(len(case["body"]))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"HEAD {target} HTTP/1.1\r\n{head}\r\n".encode("utf-8", "surrogateescape") + (case["body"] or b"")


# ------------------------------------------------------------------------- checks
def _error_shape(resp: httpx.Response) -> str:
    """'' if ``resp`` is ngrok's error body for its status, else what is wrong."""
    try:
        body = resp.json()
    except ValueError:
        return f"not JSON: {resp.content[:200]!r}"
    if not isinstance(body, dict):
        return f"not an object: {body!r}"[:200]
    problems = []
    if not (isinstance(body.get("error_code"), str) and body["error_code"].startswith("ERR_NGROK_")):
        problems.append(f"error_code {body.get('error_code')!r}")
    if body.get("status_code") != resp.status_code:
        problems.append(f"status_code {body.get('status_code')!r} != {resp.status_code}")
    if not isinstance(body.get("msg"), str) or not body["msg"]:
        problems.append("no msg")
    if not isinstance(body.get("details"), dict):
        problems.append("no details")
    return ", ".join(problems)


@pytest.mark.timeout(TEST_TIMEOUT)
def test_fuzz_cloud_api(stack):
    record = Recorder("cloud_api")
    count = {"n": 0}
    t0 = time.monotonic()

    @fuzz
    @given(case=api_requests(stack.ids))
    def run(case):
        count["n"] += 1
        record.case(case)
        if case["method"] == "HEAD" and case["raw"] is None:  # on a fresh socket: see what follows
            case["raw"] = _head_request(case)
            res = raw_exchange(stack.addr, case["raw"])
            after = res.data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in res.data else b""
            if after:
                record(BadShape, f"HEAD answered with a body: {res.data[:300]!r}", case["raw"])
        if case["raw"] is not None:
            res = raw_exchange(stack.addr, case["raw"])
            shown = f"raw {case['raw'][:400]!r}\ngot {res.data[:400]!r}"
            if res.hung:
                record(Hang, f"no answer and no close\n{shown}", case["raw"])
            for status in res.statuses():
                # 505 is the right answer to a request line that is not HTTP/1.0 or 1.1
                if status >= 500 and not (status == 505 and not http1_line(case["raw"])):
                    record(ServerError, f"{status}\n{shown}", case["raw"])
        else:
            try:
                resp = stack.http.request(case["method"], case["path"], params=case["params"],
                                          content=case["body"], headers=case["headers"])
            except (httpx.LocalProtocolError, httpx.InvalidURL, UnicodeEncodeError):
                return  # httpx itself refused to send it (e.g. an invalid header value)
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                record(ServerError, f"connection dropped: {exc!r}", case)
                resp = None
            except httpx.TimeoutException as exc:
                record(Hang, f"timeout: {exc!r}", case)
                resp = None
            if resp is not None:
                shown = f"{resp.status_code} {resp.content[:400]!r}"
                if resp.status_code >= 500:
                    record(ServerError, shown, case)
                elif resp.status_code >= 400:
                    problem = _error_shape(resp)
                    if problem:
                        record(BadShape, f"{problem}\n{shown}", case)
                elif resp.status_code != 204 and case["method"] != "HEAD":
                    try:
                        data = resp.json()
                    except ValueError:
                        record(BadShape, f"2xx not JSON\n{shown}", case)
                        data = None
                    path = case["path"].split("?", 1)[0].rstrip("/")
                    if resp.status_code == 201 and isinstance(data, dict) and isinstance(data.get("id"), str):
                        stack.http.delete(f"{path}/{data['id']}")  # hold nothing the fuzz made
        errs = stack.logs.new_errors()
        if errs:
            record(LogError, errs, case)

    run()
    print(f"cloud API fuzz: {count['n']} cases in {time.monotonic() - t0:.1f}s")
    time.sleep(0.5)
    tail = stack.logs.new_errors()
    assert not tail, f"log errors at the end of the run:\n{tail}"
    assert stack.logs.procs["edge"].proc.poll() is None, "the edge exited"
    assert record.count == 0, f"{record.count} findings written to the survey file"
