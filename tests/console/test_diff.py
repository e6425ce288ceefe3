"""Replay-vs-original diff: what is compared, how bodies are normalised, and rendering."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
from typing import Any

import httpx
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from console.diff import (
    DIFF_LIMIT,
    RENDER_LINES,
    CaptureDiff,
    diff_captures,
    render_side_by_side,
    render_unified,
)
from tests.console.captures import capture, chunk, head
from tests.procs import host_of
from tests.upstreams import HTTPUpstream


def text_of(renderable: RenderableType, width: int = 120) -> str:
    console = Console(record=True, width=width, color_system=None, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


def lines_of(renderable: RenderableType) -> list[Text]:
    assert isinstance(renderable, Group)
    return [r for r in renderable.renderables if isinstance(r, Text)]


def pair(
    req_a: bytes, resp_a: bytes | None, req_b: bytes, resp_b: bytes | None, **kw: Any
) -> tuple[dict, dict]:
    original = capture(req_a, resp_a, cid="00000000000000aa")
    replay = capture(req_b, resp_b, cid="00000000000000bb", replay_of="00000000000000aa", **kw)
    return original, replay


def json_response(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return (
        head(
            f"HTTP/1.1 {status}\nContent-Type: application/json\n{extra}Content-Length: {len(body)}"
        )
        + body
    )


GET = head("GET /api/users HTTP/1.1\nHost: web.example\nAccept: */*\nX-Token: abc")


# --- comparing -------------------------------------------------------------------------


def test_identical_captures_have_no_differences():
    resp = json_response(b'{"ok": true}')
    d = diff_captures(*pair(GET, resp, GET, resp))
    assert isinstance(d, CaptureDiff)
    assert not d.changed
    assert d.summary() == "no differences"
    assert d.request.headers.changes == [] and d.request.headers.unchanged == 3
    assert d.response.body.same and d.response.body.kind == "json"
    assert (d.original_id, d.replay_id) == ("00000000000000aa", "00000000000000bb")


def test_header_changes_are_case_insensitive_and_per_side():
    replay_req = head(
        "GET /api/users HTTP/1.1\nhost: web.example\nACCEPT: */*\nX-Token: xyz\nX-Added: 1"
    )
    a = json_response(b"{}", extra="Server: one\nX-Gone: bye\n")
    b = json_response(b"{}", extra="server: two\n")
    d = diff_captures(*pair(GET, a, replay_req, b))
    req = d.request.headers
    assert req.unchanged == 2  # Host and Accept differ only in case of the name
    changed = req.get("x-token")
    assert changed is not None and changed.kind == "changed"
    assert (changed.old, changed.new) == (("abc",), ("xyz",))
    assert [c.name for c in req.added] == ["X-Added"] and req.removed == []
    resp = d.response.headers
    assert [c.name for c in resp.changed] == ["Server"]
    assert [(c.name, c.old) for c in resp.removed] == [("X-Gone", ("bye",))]
    assert d.changed and "2 request headers" in d.summary() and "2 response headers" in d.summary()


def test_repeated_header_values_compare_in_order():
    a = head("GET / HTTP/1.1\nHost: h\nX-Dup: 1\nX-Dup: 2")
    b = head("GET / HTTP/1.1\nHost: h\nX-Dup: 2\nX-Dup: 1")
    change = diff_captures(*pair(a, None, b, None)).request.headers.get("X-Dup")
    assert change is not None and (change.old, change.new) == (("1", "2"), ("2", "1"))


def test_status_and_request_line_changes():
    a = json_response(b"{}")
    b = json_response(b"{}", status="503 Service Unavailable")
    put = head("PUT /api/users?x=1 HTTP/1.1\nHost: web.example\nAccept: */*\nX-Token: abc")
    d = diff_captures(*pair(GET, a, put, b))
    assert (d.status.old, d.status.new) == (200, 503)
    assert (d.status_text.old, d.status_text.new) == ("200 OK", "503 Service Unavailable")
    assert (d.method.old, d.method.new) == ("GET", "PUT")
    assert (d.uri.old, d.uri.new) == ("/api/users", "/api/users?x=1")
    assert "status 200 → 503" in d.summary() and "request line" in d.summary()


def test_missing_response_on_one_side():
    d = diff_captures(*pair(GET, json_response(b"{}"), GET, None))
    assert (d.status.old, d.status.new) == (200, None)
    assert d.response.body.kind == "json" and not d.response.body.same
    assert all(c.kind == "removed" for c in d.response.headers.changes)
    assert "(no response)" in text_of(render_unified(d))


def test_chunked_and_gzip_are_not_body_differences():
    body = b'{"users": [{"id": 1, "name": "Ada"}]}'
    plain = json_response(body)
    packed = head(
        "HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Encoding: gzip\n"
        "Transfer-Encoding: chunked"
    ) + chunk(gzip.compress(body), 7)
    d = diff_captures(*pair(GET, plain, GET, packed))
    assert d.response.body.same
    assert d.response.body.hunks == []
    assert d.response.body.old_sha256 == d.response.body.new_sha256
    # the framing headers themselves did change, and are reported as such
    assert {c.name.lower() for c in d.response.headers.changes} == {
        "content-length",
        "content-encoding",
        "transfer-encoding",
    }


def test_json_is_compared_normalised():
    a = json_response(b'{"b": 1, "a": [1, 2], "c": {"y": 2, "x": 1}}')
    b = json_response(b'{"a":[1,2],"c":{"x":1,"y":2},"b":1}')
    body = diff_captures(*pair(GET, a, GET, b)).response.body
    assert body.kind == "json" and body.same
    assert body.old_sha256 != body.new_sha256
    assert any("normalised" in n for n in body.notes)


def test_json_value_change_is_a_line_diff():
    a = json_response(b'{"user": {"id": 1, "name": "Ada"}, "ok": true}')
    b = json_response(b'{"ok": false, "user": {"name": "Ada", "id": 1}, "error": "nope"}')
    body = diff_captures(*pair(GET, a, GET, b)).response.body
    assert body.kind == "json" and not body.same
    lines = body.unified()
    assert lines[:2] == ["--- original", "+++ replay"]
    assert lines[2].startswith("@@ -1,")
    assert '-  "ok": true,' in lines
    assert '+  "ok": false,' in lines
    assert '+  "error": "nope",' in lines
    assert '     "name": "Ada"' in lines  # context, sorted keys line up


def test_invalid_json_falls_back_to_text():
    a = json_response(b'{"a": 1')
    b = json_response(b'{"a": 2')
    body = diff_captures(*pair(GET, a, GET, b)).response.body
    assert body.kind == "text" and body.unified()[-2:] == ['-{"a": 1', '+{"a": 2']


def test_text_bodies_diff_by_line():
    a = head("HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 12") + b"one\ntwo\nthree"
    b = head("HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 12") + b"one\n2\nthree"
    body = diff_captures(*pair(GET, a, GET, b)).response.body
    assert body.kind == "text"
    assert body.unified()[2:] == ["@@ -1,3 +1,3 @@", " one", "-two", "+2", " three"]


def test_request_bodies_are_compared_too():
    a = (
        head("POST /x HTTP/1.1\nHost: h\nContent-Type: application/json\nContent-Length: 8")
        + b'{"a": 1}'
    )
    b = head(
        "POST /x HTTP/1.1\nHost: h\nContent-Type: application/json\nTransfer-Encoding: chunked"
    )
    b += chunk(b'{"a": 2}')
    body = diff_captures(*pair(a, None, b, None)).request.body
    assert not body.same and '+  "a": 2' in body.unified()


def test_binary_bodies_compare_by_size_and_hash():
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    a = head(f"HTTP/1.1 200 OK\nContent-Type: image/png\nContent-Length: {len(png)}") + png
    b = (
        head(f"HTTP/1.1 200 OK\nContent-Type: image/png\nContent-Length: {len(png) + 1}")
        + png
        + b"!"
    )
    body = diff_captures(*pair(GET, a, GET, b)).response.body
    assert body.kind == "binary" and not body.same
    assert (body.old_size, body.new_size) == (len(png), len(png) + 1)
    assert body.old_lines == body.new_lines == [] and body.hunks == []
    same = diff_captures(*pair(GET, a, GET, a)).response.body
    assert same.kind == "binary" and same.same
    # undeclared binary (NUL bytes, no type) is still binary
    c = head("HTTP/1.1 200 OK\nContent-Length: 4") + b"\x00\x01\x02\x03"
    assert diff_captures(*pair(GET, c, GET, a)).response.body.kind == "binary"


def test_large_bodies_are_capped_and_say_so():
    big_a = json.dumps([{"id": i, "v": "x" * 40} for i in range(6000)]).encode()
    items = [{"id": i, "v": "x" * 40} for i in range(6000)]
    items[10]["v"] = "changed"
    big_b = json.dumps(items).encode()
    d = diff_captures(*pair(GET, json_response(big_a), GET, json_response(big_b)))
    unified = text_of(render_unified(d))
    side = text_of(render_side_by_side(d, 120))
    body = d.response.body
    assert not body.same
    assert sum(len(line) + 1 for line in body.old_lines) <= DIFF_LIMIT + 1
    assert any("only the first 200.0 KiB is compared" in n for n in body.notes)
    assert "only the first 200.0 KiB is compared" in unified
    assert '"changed"' in unified and '"changed"' in side


def test_difference_only_after_the_cap_is_reported():
    text = b"line\n" * 60_000
    a = head(f"HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: {len(text)}") + text
    b = (
        head(f"HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: {len(text) + 3}")
        + text
        + b"end"
    )
    body = diff_captures(*pair(GET, a, GET, b)).response.body
    assert not body.same and body.hunks == []
    assert any("differ after that" in n for n in body.notes)


def test_truncated_captures_are_noted():
    a = json_response(b'{"a": 1}')
    o, r = pair(GET, a, GET, a, resp_truncated=True)
    notes = diff_captures(o, r).response.body.notes
    assert "replay body was truncated by the capture limit" in notes


def test_headers_from_json_when_raw_is_missing():
    o, r = pair(GET, None, GET, None)
    r["request"]["raw"] = ""
    r["request"]["headers"] = {"Host": ["web.example"], "Accept": ["*/*"], "X-Token": ["zzz"]}
    change = diff_captures(o, r).request.headers.get("X-Token")
    assert change is not None and change.new == ("zzz",)


# --- rendering -------------------------------------------------------------------------


def _example() -> CaptureDiff:
    a = json_response(b'{"ok": true, "n": 1}', extra="X-Trace: a\n")
    b = json_response(
        b'{"ok": false, "n": 1}', status="500 Internal Server Error", extra="X-Trace: b\n"
    )
    replay_req = head("GET /api/users HTTP/1.1\nHost: web.example\nAccept: */*\nX-Token: NEW")
    return diff_captures(*pair(GET, a, replay_req, b))


def test_render_unified_colours_lines():
    lines = lines_of(render_unified(_example()))
    by_text = {line.plain.strip(): str(line.style) for line in lines}
    assert by_text["- X-Token: abc"] == "red"
    assert by_text["+ X-Token: NEW"] == "green"
    assert by_text["- 200 OK"] == "red" and by_text["+ 500 Internal Server Error"] == "green"
    assert by_text['-  "ok": true'] == "red" and by_text['+  "ok": false'] == "green"
    assert by_text["@@ -1,4 +1,4 @@"] == "cyan"
    assert by_text['"n": 1,'] == "dim"  # context
    text = text_of(render_unified(_example()))
    assert "replay 00000000000000bb vs original 00000000000000aa" in text
    assert "2 headers unchanged" in text


def test_render_side_by_side_is_a_two_column_table():
    table = render_side_by_side(_example(), 100)
    assert isinstance(table, Table)
    assert [c.header for c in table.columns] == [
        "original 00000000000000aa",
        "replay 00000000000000bb",
    ]
    text = text_of(table, 100)
    row = next(line for line in text.splitlines() if "X-Token: abc" in line)
    assert "X-Token: NEW" in row  # old and new on the same row
    row = next(line for line in text.splitlines() if '"ok": true' in line)
    assert '"ok": false' in row
    assert max(len(line) for line in text.splitlines()) <= 100
    narrow = text_of(render_side_by_side(_example(), 40), 40)
    assert max(len(line) for line in narrow.splitlines()) <= 40


def test_render_escapes_control_characters():
    a = head("HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 5") + b"a\x1b[2Jb"
    b = head("HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 3") + b"abc"
    d = diff_captures(*pair(GET, a, GET, b))
    for renderable in (render_unified(d), render_side_by_side(d, 100)):
        text = text_of(renderable)
        assert "\x1b" not in text and "\\e[2J" in text


def test_render_binary_and_empty():
    png = b"\x89PNG\r\n\x1a\n\x00"
    a = head(f"HTTP/1.1 200 OK\nContent-Type: image/png\nContent-Length: {len(png)}") + png
    b = head("HTTP/1.1 200 OK\nContent-Type: image/png\nContent-Length: 1") + b"x"
    d = diff_captures(*pair(GET, a, GET, b))
    unified = text_of(render_unified(d))
    assert "body (binary) differs" in unified and "sha256" in unified
    assert "body: none on either side" in unified  # GET requests
    assert "(no body)" in text_of(render_side_by_side(d, 120))


def test_render_caps_diff_lines():
    a = "\n".join(f"a{i}" for i in range(RENDER_LINES * 2)).encode()
    b = "\n".join(f"b{i}" for i in range(RENDER_LINES * 2)).encode()
    ra = head(f"HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: {len(a)}") + a
    rb = head(f"HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: {len(b)}") + b
    d = diff_captures(*pair(GET, ra, GET, rb))
    unified = lines_of(render_unified(d))
    assert len(unified) < RENDER_LINES + 40
    assert "more diff lines not shown" in unified[-1].plain or any(
        "more diff lines not shown" in line.plain for line in unified
    )
    table = render_side_by_side(d, 120)
    assert isinstance(table, Table) and table.row_count <= RENDER_LINES + 20
    assert "more diff lines not shown" in text_of(table)


# --- against a real agent --------------------------------------------------------------


async def test_diff_of_a_real_edited_replay_shows_the_changed_header(edge, agents):
    async with HTTPUpstream() as up:
        agent = agents("http", up.port)
        host = host_of(agent.public_url)
        async with (
            httpx.AsyncClient(base_url=f"http://{edge.http_addr[0]}:{edge.http_addr[1]}") as pub,
            httpx.AsyncClient(base_url=f"http://{agent.ready['web_addr']}", timeout=20) as api,
        ):
            await pub.post("/echo", content=b'{"a": 1}', headers={"Host": host, "X-Mode": "first"})
            original = await _one(api, 1)
            headers = dict(original["request"]["headers"])
            headers["X-Mode"] = ["second"]
            r = await api.post(
                "/api/requests/http",
                json={"id": original["id"], "headers": headers, "body": '{"a": 2}'},
            )
            assert r.status_code == 204, r.text
            replay = (await api.get(f"/api/requests/http/{r.headers['burrow-capture-id']}")).json()
    assert replay["replay_of"] == original["id"]
    d = diff_captures(original, replay)
    change = d.request.headers.get("x-mode")
    assert change is not None and (change.old, change.new) == (("first",), ("second",))
    assert not d.request.body.same and '+  "a": 2' in d.request.body.unified()
    assert not d.response.body.same  # /echo answers with the body
    assert d.status.old == d.status.new == 200
    text = text_of(render_unified(d))
    assert "- X-Mode: first" in text and "+ X-Mode: second" in text
    side = text_of(render_side_by_side(d, 120))
    assert any("X-Mode: first" in line and "X-Mode: second" in line for line in side.splitlines())


async def _one(api: httpx.AsyncClient, n: int) -> dict:
    for _ in range(300):
        reqs = (await api.get("/api/requests/http")).json()["requests"]
        done = [r for r in reqs if r["response"] is not None]
        if len(done) >= n:
            return (await api.get(f"/api/requests/http/{done[0]['id']}")).json()
        await asyncio.sleep(0.02)
    raise AssertionError("no capture")


def test_capture_helper_matches_the_api_shape():
    cap = capture(GET, json_response(b"{}"))
    assert base64.b64decode(cap["request"]["raw"]) == GET
    assert cap["response"]["status_code"] == 200
