"""Export of captured requests: curl/HTTPie commands that really reproduce the request,
raw bytes, HAR 1.2 and the OSC 52 clipboard sequences.

The commands are run for real (``sh`` and ``bash``) against a recording HTTP server on
127.0.0.1 port 0, and what the server received is compared with the captured request
byte for byte; one test goes through a real edge and agent with the public URL.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import shutil
import stat
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from console import export
from console.export import (
    HOP_BY_HOP,
    clipboard_sequence,
    osc52,
    parse_message,
    raw_request,
    raw_response,
    request_url,
    tmux_passthrough,
    to_curl,
    to_har,
    to_httpie,
    write_har,
)
from tests.console.captures import capture, chunk, head
from tests.procs import host_of
from tests.upstreams import HTTPUpstream, raw_exchange

# --- helpers ---------------------------------------------------------------------------


def received(raw_head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    """``(method, target, version, headers)`` of a head as a server received it."""
    msg = parse_message(raw_head)
    method, target, version = msg.start_line.split(" ", 2)
    return method, target, version, msg.headers


def end_to_end_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers that must arrive unchanged: not Host, framing or hop-by-hop."""
    skip = HOP_BY_HOP | {"host", "content-length"}
    return [(k.lower(), v) for k, v in headers if k.lower() not in skip]


async def run_shell(shell: str, command: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``command`` as a script file (a large body would not fit in ``sh -c``'s argv)."""
    script = tmp_path / "command.sh"
    script.write_text(command + "\n", encoding="utf-8")
    return await asyncio.to_thread(
        subprocess.run,
        [shell, str(script)],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _httpie() -> str | None:
    """The path of HTTPie's ``http`` (3.x, for ``--raw``), or ``None``."""
    path = shutil.which("http")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return path if out.stdout.strip()[:1].isdigit() and int(out.stdout.split(".")[0]) >= 3 else None


HTTPIE = _httpie()
SHELLS = [s for s in ("sh", "bash", "zsh") if shutil.which(s)]

BINARY = bytes(range(256)) + b"\x00\x00%s%%\\n'\"\r\n\t$HOME`id`\xff\xfe" + os.urandom(512)
UTF8_JSON = json.dumps(
    {"name": "Zoë 'O'Brien", "emoji": "🦡", "note": 'say "hi" $HOME `id`'}, ensure_ascii=False
).encode()

# (id, captured request bytes) — each is re-sent and compared byte for byte.
CASES: list[tuple[str, bytes]] = [
    (
        "get-query-duplicate-and-empty-headers",
        head(
            "GET /search?q=a%20b&x=1&x=2&u=%C3%A9 HTTP/1.1\nHost: web.example\n"
            "User-Agent: Mozilla/5.0 (X11) burrow-test\nAccept: text/html,*/*;q=0.8\n"
            "X-Dup: one\nX-Dup: two\nX-Empty:\nCookie: a=1; b=two words\n"
            'X-Shell: it\'s "quoted" $HOME `id` \\ back; $(echo no) !x'
        ),
    ),
    (
        "post-json-utf8",
        head(
            f"POST /api/users HTTP/1.1\nHost: web.example\nUser-Agent: app/1\nAccept: */*\n"
            f"Content-Type: application/json; charset=utf-8\nContent-Length: {len(UTF8_JSON)}"
        )
        + UTF8_JSON,
    ),
    (
        "put-binary-with-nul",
        head(
            f"PUT /upload/blob.bin HTTP/1.1\nHost: web.example\nUser-Agent: up/2\nAccept: */*\n"
            f"Content-Type: application/octet-stream\nContent-Length: {len(BINARY)}"
        )
        + BINARY,
    ),
    (
        "post-chunked",
        head(
            "POST /stream HTTP/1.1\nHost: web.example\nUser-Agent: up/2\nAccept: */*\n"
            "Content-Type: text/plain\nTransfer-Encoding: chunked"
        )
        + chunk(b"hello chunked world, line one\nline two\n"),
    ),
    (
        "text-with-tabs-and-crlf",
        head(
            "POST /form HTTP/1.1\nHost: web.example\nUser-Agent: x\nAccept: */*\n"
            "Content-Type: text/tab-separated-values\nContent-Length: 17"
        )
        + b"a\tb\r\nc\td\r\n100%\\n",
    ),
    (
        "delete-no-body",
        head("DELETE /items/42 HTTP/1.1\nHost: web.example\nUser-Agent: x\nAccept: */*"),
    ),
    (
        "post-empty-body-no-content-type",
        head(
            "POST /ping HTTP/1.1\nHost: web.example\nUser-Agent: x\nAccept: */*\nContent-Length: 0"
        ),
    ),
    (
        "patch-without-user-agent-accept-or-content-type",
        head("PATCH /things/7 HTTP/1.1\nHost: web.example\nContent-Length: 11") + b"plain words",
    ),
    (
        "gzip-request-body-sent-compressed",
        head(
            "POST /gz HTTP/1.1\nHost: web.example\nUser-Agent: x\nAccept: */*\n"
            "Content-Type: application/json\nContent-Encoding: gzip\nContent-Length: {n}"
        ).replace(b"{n}", str(len(gzip.compress(b'{"a": 1}', mtime=0))).encode())
        + gzip.compress(b'{"a": 1}', mtime=0),
    ),
    (
        "path-with-dot-segments-and-brackets",
        head(
            "GET /a/../b/./c?x[0]=1&y={z} HTTP/1.1\nHost: web.example\nUser-Agent: x\nAccept: */*"
        ),
    ),
    ("head-request", head("HEAD /h HTTP/1.1\nHost: web.example\nUser-Agent: x\nAccept: */*")),
    (
        "utf8-header-value",
        head("GET /u HTTP/1.1\nHost: web.example\nUser-Agent: x\nAccept: */*\nX-Name: Zoë 🦡"),
    ),
    (
        "large-text-body-over-exec-arg-limit",
        head(
            "POST /big HTTP/1.1\nHost: web.example\nUser-Agent: x\nAccept: */*\n"
            "Content-Type: text/plain\nContent-Length: 300000"
        )
        + (b"0123456789abcdef 'quote' %s\n" * 12000)[:300000],
    ),
    (
        "connection-named-headers-dropped",
        head(
            "GET /c HTTP/1.1\nHost: web.example\nUser-Agent: x\nAccept: */*\n"
            "Connection: keep-alive, X-Hop\nX-Hop: gone\nKeep-Alive: timeout=5\nX-Keep: kept"
        ),
    ),
]

# HTTPie (requests) re-quotes ``{}`` in URLs, so that case is checked for curl only.
HTTPIE_CASES = [c for c in CASES if c[0] != "path-with-dot-segments-and-brackets"]


def expected(raw: bytes) -> tuple[str, str, list[tuple[str, str]], bytes]:
    """What the server must receive for a captured request: method, target, headers, body."""
    msg = parse_message(raw)
    method, target, _ = msg.start_line.split(" ", 2)
    named = {t.strip().lower() for v in msg.header_values("connection") for t in v.split(",")}
    headers = [(k, v) for k, v in end_to_end_headers(msg.headers) if k not in named]
    return method, target, headers, msg.body


async def check_reproduces(
    tmp_path: Path, shell: str, raw: bytes, make: Any, ordered: bool = True
) -> None:
    cap = capture(raw)
    async with HTTPUpstream() as up:
        command = make(cap, base_url=f"http://127.0.0.1:{up.port}")
        result = await run_shell(shell, command, tmp_path)
        assert result.returncode == 0, (command[:2000], result.stderr.decode(errors="replace"))
        assert len(up.requests) == 1, command[:2000]
        got_head, got_body = up.requests[0]
    method, target, headers, body = expected(raw)
    got_method, got_target, _, got_headers = received(got_head)
    assert got_method == method
    assert got_target == target
    got = [(k, v) for k, v in end_to_end_headers(got_headers)]
    if ordered:
        assert got == headers, command[:2000]
    else:
        assert sorted(got) == sorted(headers), command[:2000]
    assert got_body == body
    if body or b"content-length" in raw.lower():
        # the body framing is re-done by the client, with the same length
        assert parse_message(got_head).header("content-length") == str(len(body))


# --- curl ------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(("name", "raw"), CASES, ids=[c[0] for c in CASES])
async def test_curl_command_reproduces_the_request(tmp_path, shell, name, raw):
    await check_reproduces(tmp_path, shell, raw, to_curl)


def test_curl_http10_without_host_uses_http10():
    cap = capture(b"GET /old HTTP/1.0\r\nUser-Agent: x\r\n\r\n")
    command = to_curl(cap, "http://127.0.0.1:1")
    assert "--http1.0" in command
    assert "'http://127.0.0.1:1/old'" in command or "http://127.0.0.1:1/old" in command


async def test_curl_http10_request_arrives_as_http10(tmp_path):
    raw = b"GET /old HTTP/1.0\r\nUser-Agent: x\r\nAccept: */*\r\n\r\n"
    async with HTTPUpstream() as up:
        result = await run_shell(
            "sh", to_curl(capture(raw), f"http://127.0.0.1:{up.port}"), tmp_path
        )
        assert result.returncode == 0, result.stderr
        got_head, _ = up.requests[0]
    assert got_head.startswith(b"GET /old HTTP/1.0\r\n")


def test_curl_output_shape():
    raw = (
        head(
            "POST /api/orders?x=1 HTTP/1.1\nHost: web.burrow.localhost\nUser-Agent: t\n"
            "Accept: */*\nContent-Type: application/json\nContent-Length: 9"
        )
        + b'{"a": 1}\n'
    )
    cap = capture(raw)
    command = to_curl(cap, public_url="https://web.burrow.localhost")
    lines = command.split("\n")
    assert lines[0] == "curl 'https://web.burrow.localhost/api/orders?x=1' \\"
    assert "  -H 'Content-Type: application/json' \\" in lines
    assert command.endswith("  --data-binary '{\"a\": 1}\n'")  # text body inline, newline kept
    assert "-X" not in command  # POST is implied by the body
    assert "--compressed" not in command
    assert "Content-Length" not in command and "Host:" not in command


def test_curl_binary_body_is_piped_through_printf():
    raw = head("PUT /b HTTP/1.1\nHost: h\nContent-Length: 4") + b"\x00\xff%\\"
    command = to_curl(capture(raw))
    assert command.startswith("printf '\\000\\377%%\\\\' | curl -X PUT 'http://h/b'")
    assert command.rstrip().endswith("--data-binary @-")


def test_curl_truncated_body_is_flagged_in_a_comment():
    raw = head("POST /t HTTP/1.1\nHost: h\nContent-Length: 100") + b"x" * 10
    command = to_curl(capture(raw, truncated=True, body_size=100))
    assert command.startswith("# the captured body was truncated (10 of 100 bytes)")


def test_request_url_scheme_host_and_override():
    cap = capture(head("GET /p?q=1 HTTP/1.1\nHost: web.burrow.localhost:8443"))
    assert request_url(cap) == "http://web.burrow.localhost:8443/p?q=1"
    assert request_url(cap, public_url="https://web.burrow.localhost:8443") == (
        "https://web.burrow.localhost:8443/p?q=1"
    )
    # the tunnel's public URL wins over the Host header: it is where the request can go again
    assert request_url(cap, public_url="http://x:4080") == "http://x:4080/p?q=1"
    no_port = capture(head("GET /big.json HTTP/1.1\nHost: web.burrow.localhost"))
    assert request_url(no_port, public_url="http://web.burrow.localhost:4080") == (
        "http://web.burrow.localhost:4080/big.json"
    )
    assert request_url(no_port) == "http://web.burrow.localhost/big.json"  # unknown tunnel
    assert request_url(no_port, public_url="tcp://localhost:20001") == "http://web.burrow.localhost/big.json"
    assert request_url(cap, "https://other.example/") == "https://other.example/p?q=1"
    raw_target = capture(head("GET /a b/\xe9#x HTTP/1.1\nHost: h"))  # bytes a URL cannot hold
    raw_target["request"]["uri"] = "/a b/\xc3\xa9#x"
    assert request_url(raw_target) == "http://h/a%20b/%C3%A9%23x"
    absolute = capture(head("GET http://proxy.example/x HTTP/1.1\nHost: proxy.example"))
    assert request_url(absolute) == "http://proxy.example/x"


async def test_curl_against_the_public_url_reproduces_the_request(edge, agents, tmp_path):
    """Through a real edge and agent: capture a request, fetch it from the agent API,
    run the generated command against the tunnel's public URL, and compare what the
    upstream received both times."""
    async with HTTPUpstream() as up:
        agent = agents("http", up.port)
        host = host_of(agent.public_url)
        body = b"\x00binary\xff body 'with' $quotes %s\r\n" + bytes(range(40))
        sent = (
            head(
                f"POST /echo?q=1&r=%20 HTTP/1.1\nHost: {host}:{edge.http_addr[1]}\nUser-Agent: probe/1\n"
                f"Accept: */*\nX-Test: yes\nX-Test: again\nCookie: sid=abc\n"
                f"Content-Type: application/octet-stream\nContent-Length: {len(body)}\nConnection: close"
            )
            + body
        )
        await raw_exchange(*edge.http_addr, sent)
        async with httpx.AsyncClient(
            base_url=f"http://{agent.ready['web_addr']}", timeout=20
        ) as api:
            cap = await _wait_capture(api)
            detail = (await api.get(f"/api/requests/http/{cap['id']}")).json()
            assert raw_request(detail) == sent
            # The tunnel's public URL gives the scheme; curl resolves *.localhost itself.
            public = next(t for t in (await api.get("/api/tunnels")).json()["tunnels"])
            command = to_curl(detail, public_url=public["public_url"])
            assert f"'http://{host}:{edge.http_addr[1]}/echo?q=1&r=%20'" in command
            result = await run_shell("sh", command, tmp_path)
            assert result.returncode == 0, (command, result.stderr.decode(errors="replace"))
            assert result.stdout == b"POST /echo?q=1&r=%20\n"  # the upstream's answer
            await _wait_capture(api, 2)
    (head1, body1), (head2, body2) = up.requests
    assert body1 == body2 == body
    m1, t1, _, h1 = received(head1)
    m2, t2, _, h2 = received(head2)
    assert (m1, t1) == (m2, t2) == ("POST", "/echo?q=1&r=%20")
    # The agent adds X-Forwarded-* itself both times; everything else arrives the same.
    assert end_to_end_headers(h1) == end_to_end_headers(h2)
    assert ("x-test", "again") in end_to_end_headers(h2)


async def _wait_capture(api: httpx.AsyncClient, n: int = 1) -> dict:
    for _ in range(300):
        reqs = (await api.get("/api/requests/http")).json()["requests"]
        done = [r for r in reqs if r["response"] is not None]
        if len(done) >= n:
            return done[-1]
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {n} captures")


# --- HTTPie ----------------------------------------------------------------------------


@pytest.mark.skipif(HTTPIE is None, reason="HTTPie 3 (`http`) is not installed")
@pytest.mark.parametrize(("name", "raw"), HTTPIE_CASES, ids=[c[0] for c in HTTPIE_CASES])
async def test_httpie_command_reproduces_the_request(tmp_path, name, raw):
    # HTTPie (requests) puts its own headers first, so order is compared per name only.
    await check_reproduces(tmp_path, "sh", raw, to_httpie, ordered=False)


def test_httpie_output_shape():
    raw = (
        head(
            "PUT /api/x HTTP/1.1\nHost: web.example\nUser-Agent: t\nAccept: */*\n"
            "X-Eq: =starts-with-equals\nX-At: @file\nX-Empty:\nContent-Type: text/plain\n"
            "Content-Length: 5"
        )
        + b"hello"
    )
    command = to_httpie(capture(raw), public_url="https://web.example")
    lines = command.split("\n")
    assert lines[0] == "http --ignore-stdin PUT 'https://web.example/api/x' \\"
    assert "  'X-Eq:\\=starts-with-equals' \\" in lines
    assert "  'X-At:\\@file' \\" in lines
    assert "  'X-Empty;' \\" in lines
    assert "  'Accept-Encoding:' \\" in lines  # HTTPie's default is switched off
    assert lines[-1] == "  --raw 'hello'"
    binary = to_httpie(capture(head("POST /b HTTP/1.1\nHost: h\nContent-Length: 2") + b"\x00\x01"))
    assert binary.startswith("printf '\\000\\001' | http POST 'http://h/b'")
    assert "--ignore-stdin" not in binary and "--raw" not in binary


# --- raw -------------------------------------------------------------------------------


def test_raw_request_and_response_are_the_captured_bytes():
    req = head("POST /r HTTP/1.1\nHost: h\nTransfer-Encoding: chunked") + chunk(b"abcdefgh")
    resp = head("HTTP/1.1 200 OK\nContent-Length: 3") + b"\x00\x01\x02"
    cap = capture(req, resp)
    assert raw_request(cap) == req
    assert raw_response(cap) == resp
    assert raw_response(capture(req)) == b""  # no response yet
    assert raw_request({"request": {"raw": "%%%not base64"}}) == b""


# --- HAR -------------------------------------------------------------------------------


def _iso(value: Any) -> bool:
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return False
    return "T" in value


def _require(
    obj: Any, path: str, fields: dict[str, type | tuple[type, ...]], errors: list[str]
) -> None:
    if not isinstance(obj, dict):
        errors.append(f"{path}: not an object")
        return
    for name, kind in fields.items():
        if name not in obj:
            errors.append(f"{path}.{name}: missing")
        elif not isinstance(obj[name], kind) or (kind is int and isinstance(obj[name], bool)):
            errors.append(f"{path}.{name}: {type(obj[name]).__name__}, want {kind}")
    for name in obj:
        if (
            name not in fields
            and not name.startswith("_")
            and name not in _OPTIONAL.get(path.split("[")[0].split(".")[-1], set())
        ):
            errors.append(f"{path}.{name}: not a HAR 1.2 field (custom fields need a leading _)")


NUM = (int, float)
_OPTIONAL = {
    "log": {"browser", "pages", "comment"},
    "entries": {"pageref", "serverIPAddress", "connection", "comment"},
    "request": {"postData", "comment"},
    "response": {"comment"},
    "content": {"compression", "text", "encoding", "comment"},
    "timings": {"blocked", "dns", "connect", "ssl", "comment"},
    "postData": {"comment"},
    "cookies": {"path", "domain", "expires", "httpOnly", "secure", "comment"},
    "headers": {"comment"},
    "queryString": {"comment"},
    "params": {"value", "fileName", "contentType", "comment"},
    "creator": {"comment"},
    "cache": {"beforeRequest", "afterRequest", "comment"},
}


def har_errors(har: Any) -> list[str]:
    """Check a HAR against the HAR 1.2 spec's required fields, types and value rules."""
    errors: list[str] = []
    _require(har, "har", {"log": dict}, errors)
    log = har.get("log") if isinstance(har, dict) else None
    _require(log, "log", {"version": str, "creator": dict, "entries": list}, errors)
    if not isinstance(log, dict):
        return errors
    if log.get("version") != "1.2":
        errors.append("log.version: not 1.2")
    _require(log.get("creator"), "creator", {"name": str, "version": str}, errors)
    for i, e in enumerate(log.get("entries") or []):
        p = f"entries[{i}]"
        _require(
            e,
            "entries",
            {
                "startedDateTime": str,
                "time": NUM,
                "request": dict,
                "response": dict,
                "cache": dict,
                "timings": dict,
            },
            errors,
        )
        if not _iso(e.get("startedDateTime")):
            errors.append(f"{p}.startedDateTime: not ISO 8601")
        req, resp, t = e.get("request", {}), e.get("response", {}), e.get("timings", {})
        _require(
            req,
            "request",
            {
                "method": str,
                "url": str,
                "httpVersion": str,
                "cookies": list,
                "headers": list,
                "queryString": list,
                "headersSize": int,
                "bodySize": int,
            },
            errors,
        )
        _require(
            resp,
            "response",
            {
                "status": int,
                "statusText": str,
                "httpVersion": str,
                "cookies": list,
                "headers": list,
                "content": dict,
                "redirectURL": str,
                "headersSize": int,
                "bodySize": int,
            },
            errors,
        )
        _require(resp.get("content"), "content", {"size": int, "mimeType": str}, errors)
        _require(e.get("cache"), "cache", {}, errors)
        _require(t, "timings", {"send": NUM, "wait": NUM, "receive": NUM}, errors)
        for name in ("blocked", "dns", "connect", "ssl"):
            if name in t and not (t[name] == -1 or t[name] >= 0):
                errors.append(f"{p}.timings.{name}: must be -1 or >= 0")
        if all(isinstance(t.get(k), NUM) for k in ("send", "wait", "receive")):
            total = sum(
                v for k, v in t.items() if isinstance(v, NUM) and v != -1 and not k.startswith("_")
            )
            if abs(total - e.get("time", 0)) > 0.01:
                errors.append(f"{p}.time: {e.get('time')} is not the sum of timings {total}")
        for part, fields in (
            ("cookies", {"name": str, "value": str}),
            ("headers", {"name": str, "value": str}),
        ):
            for obj in (req.get(part) or []) + (resp.get(part) or []):
                _require(obj, part, fields, errors)
        for obj in req.get("queryString") or []:
            _require(obj, "queryString", {"name": str, "value": str}, errors)
        if "postData" in req:
            _require(
                req["postData"], "postData", {"mimeType": str, "params": list, "text": str}, errors
            )
            for obj in req["postData"].get("params") or []:
                _require(obj, "params", {"name": str}, errors)
        content = resp.get("content") or {}
        if content.get("encoding") not in (None, "base64"):
            errors.append(f"{p}.content.encoding: {content.get('encoding')!r}")
    return errors


def sample_captures() -> list[dict[str, Any]]:
    """A mixed list: JSON, form, multipart, gzip+chunked, binary, cookies, 304, pending."""
    form = b"name=Ada+Lovelace&lang=en&empty="
    multipart = (
        b'--XyZ\r\nContent-Disposition: form-data; name="title"\r\n\r\nHello\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG\x00\x01\r\n--XyZ--\r\n"
    )
    gz = gzip.compress(b'{"users": [1, 2, 3]}' * 50, mtime=0)
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    return [
        capture(
            head(
                f"POST /login?next=/home&x= HTTP/1.1\nHost: web.example\nCookie: sid=abc; theme=dark\n"
                f"Content-Type: application/x-www-form-urlencoded\nContent-Length: {len(form)}"
            )
            + form,
            head(
                "HTTP/1.1 302 Found\nLocation: /home\nSet-Cookie: sid=new; Path=/; HttpOnly; Secure; "
                "SameSite=Lax; Max-Age=3600\nSet-Cookie: theme=light; Expires=Wed, 21 Oct 2026 07:28:00 GMT; "
                "Domain=example\nContent-Length: 0"
            ),
            cid="0000000000000001",
        ),
        capture(
            head(
                f"POST /upload HTTP/1.1\nHost: web.example\nContent-Type: multipart/form-data; boundary=XyZ\n"
                f"Content-Length: {len(multipart)}"
            )
            + multipart,
            head("HTTP/1.1 201 Created\nContent-Type: application/json\nContent-Length: 2") + b"{}",
            cid="0000000000000002",
        ),
        capture(
            head("GET /api/users HTTP/1.1\nHost: web.example\nAccept-Encoding: gzip"),
            head(
                "HTTP/1.1 200 OK\nContent-Type: application/json; charset=utf-8\nContent-Encoding: gzip\n"
                "Transfer-Encoding: chunked"
            )
            + chunk(gz, 100),
            cid="0000000000000003",
            replay_of="0000000000000009",
        ),
        capture(
            head("GET /logo.png HTTP/1.1\nHost: web.example"),
            head(f"HTTP/1.1 200 OK\nContent-Type: image/png\nContent-Length: {len(png)}") + png,
            cid="0000000000000004",
        ),
        capture(
            head(
                "PUT /blob HTTP/1.1\nHost: web.example\nContent-Type: application/octet-stream\n"
                "Content-Length: 1000"
            )
            + b"\x00\xff" * 50,
            head('HTTP/1.1 304 Not Modified\nETag: "x"'),
            cid="0000000000000005",
            truncated=True,
            body_size=1000,
        ),
        capture(head("GET /slow HTTP/1.1\nHost: web.example"), None, cid="0000000000000006"),
    ]


def test_har_is_valid_har_12_and_json():
    har = to_har(sample_captures(), "1.2.3", public_urls={"web": "https://web.example"})
    assert har_errors(har) == []
    text = json.dumps(har, allow_nan=False)  # strict JSON: no NaN/Infinity
    assert json.loads(text) == har
    log = har["log"]
    assert log["creator"] == {"name": "burrow", "version": "1.2.3"}
    assert [e["_burrow"]["id"] for e in log["entries"]] == [
        f"000000000000000{i}" for i in range(1, 7)
    ]


def test_har_request_fields():
    login, upload, users, _, blob, _ = to_har(sample_captures(), "1")["log"]["entries"]
    req = login["request"]
    assert req["method"] == "POST"
    assert req["url"] == "http://web.example/login?next=/home&x="
    assert req["httpVersion"] == "HTTP/1.1"
    assert req["queryString"] == [{"name": "next", "value": "/home"}, {"name": "x", "value": ""}]
    assert req["cookies"] == [{"name": "sid", "value": "abc"}, {"name": "theme", "value": "dark"}]
    assert {"name": "Cookie", "value": "sid=abc; theme=dark"} in req["headers"]
    assert req["headersSize"] == len(raw_request(sample_captures()[0])) - req["bodySize"]
    post = req["postData"]
    assert post["mimeType"] == "application/x-www-form-urlencoded"
    assert post["text"] == "name=Ada+Lovelace&lang=en&empty="
    assert post["params"] == [
        {"name": "name", "value": "Ada Lovelace"},
        {"name": "lang", "value": "en"},
        {"name": "empty", "value": ""},
    ]
    params = upload["request"]["postData"]["params"]
    assert params == [
        {"name": "title", "value": "Hello"},
        {"name": "file", "fileName": "a.png", "contentType": "image/png"},
    ]
    assert "postData" not in users["request"]  # a GET without a body
    binary = blob["request"]["postData"]
    assert binary["_encoding"] == "base64"
    assert base64.b64decode(binary["text"]) == b"\x00\xff" * 50
    assert blob["request"]["bodySize"] == 1000  # the full size, not the captured part


def test_har_response_fields():
    login, _, users, logo, blob, pending = to_har(sample_captures(), "1")["log"]["entries"]
    resp = login["response"]
    assert (resp["status"], resp["statusText"], resp["httpVersion"]) == (302, "Found", "HTTP/1.1")
    assert resp["redirectURL"] == "/home"
    sid, theme = resp["cookies"]
    assert sid["name"] == "sid" and sid["value"] == "new" and sid["path"] == "/"
    assert sid["httpOnly"] is True and sid["secure"] is True and sid["_sameSite"] == "Lax"
    assert sid["expires"] == "2026-01-02T04:04:05.000+00:00"  # start + Max-Age
    assert theme["expires"] == "2026-10-21T07:28:00.000+00:00" and theme["domain"] == "example"
    content = users["response"]["content"]
    assert content["mimeType"] == "application/json; charset=utf-8"
    assert content["text"] == '{"users": [1, 2, 3]}' * 50  # de-chunked and gunzipped
    assert content["size"] == len(content["text"]) and "encoding" not in content
    assert content["compression"] > 0
    image = logo["response"]["content"]
    assert image["encoding"] == "base64"
    assert base64.b64decode(image["text"]).startswith(b"\x89PNG")
    assert image["size"] == 264
    assert blob["response"]["status"] == 304 and "text" not in blob["response"]["content"]
    assert (
        pending["response"]["status"] == 0
        and pending["response"]["content"]["mimeType"] == "x-unknown"
    )


def test_har_timing_time_and_custom_fields():
    entries = to_har(sample_captures(), "1", public_urls={"web": "https://web.example"})["log"][
        "entries"
    ]
    first = entries[0]
    assert first["startedDateTime"] == "2026-01-02T03:04:05.000+00:00"
    assert first["time"] == pytest.approx(12.346)
    assert first["timings"]["wait"] == first["time"]
    assert first["timings"]["send"] == first["timings"]["receive"] == 0
    assert first["request"]["url"].startswith("https://web.example/")
    assert first["cache"] == {}
    assert entries[2]["_burrow"]["replay_of"] == "0000000000000009"
    assert entries[4]["_burrow"]["truncated"] == {"request": True, "response": False}
    assert "truncated" in entries[4]["comment"]
    assert entries[0]["_burrow"]["tunnel_name"] == "web"


def test_write_har_writes_a_loadable_file(tmp_path):
    path = write_har(tmp_path / "export.har", sample_captures(), "0.1.0")
    assert path == tmp_path / "export.har"
    loaded = json.loads(path.read_text(encoding="utf-8"))
    assert har_errors(loaded) == []
    assert len(loaded["log"]["entries"]) == 6
    assert not list(tmp_path.glob(".*.tmp"))


def test_written_har_is_private_whatever_the_umask(tmp_path):
    """A HAR holds the captures' Authorization headers and cookies (issue 12, item 17)."""
    old = os.umask(0o022)
    try:
        path = write_har(tmp_path / "export.har", sample_captures(), "0.1.0")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_har_of_nothing_is_valid():
    assert har_errors(to_har([], "1")) == []


def test_har_checker_catches_mistakes():
    har = to_har(sample_captures()[:1], "1")
    del har["log"]["entries"][0]["request"]["headersSize"]
    har["log"]["entries"][0]["response"]["status"] = "200"
    har["log"]["entries"][0]["bogus"] = 1
    errors = har_errors(har)
    assert any("headersSize: missing" in e for e in errors)
    assert any("status: str" in e for e in errors)
    assert any("bogus" in e for e in errors)


async def test_har_from_real_captures_validates(edge, agents, tmp_path):
    async with HTTPUpstream() as up:
        agent = agents("http", up.port)
        host = host_of(agent.public_url)
        async with httpx.AsyncClient(
            base_url=f"http://{edge.http_addr[0]}:{edge.http_addr[1]}"
        ) as pub:
            await pub.get("/bytes/300", headers={"Host": host})
            await pub.post("/echo", content=b"hello", headers={"Host": host})
            await pub.get("/chunked", headers={"Host": host, "Cookie": "a=b"})
        async with httpx.AsyncClient(
            base_url=f"http://{agent.ready['web_addr']}", timeout=20
        ) as api:
            await _wait_capture(api, 3)
            listed = (await api.get("/api/requests/http")).json()["requests"]
            details = [(await api.get(f"/api/requests/http/{c['id']}")).json() for c in listed]
    # the test fixtures build captures in exactly this shape
    made = capture(raw_request(details[0]), raw_response(details[0]))
    assert set(made) == set(details[0])
    assert set(made["request"]) == set(details[0]["request"])
    assert set(made["response"]) == set(details[0]["response"])
    path = write_har(tmp_path / "real.har", details, "0.1.0")
    har = json.loads(path.read_text(encoding="utf-8"))
    assert har_errors(har) == []
    by_path = {
        e["request"]["url"].split(host, 1)[1].split("/", 1)[1]: e for e in har["log"]["entries"]
    }
    assert set(by_path) == {"bytes/300", "echo", "chunked"}
    assert by_path["echo"]["request"]["postData"]["text"] == "hello"
    assert by_path["chunked"]["response"]["content"]["text"].startswith("first second x")
    assert by_path["chunked"]["request"]["cookies"] == [{"name": "a", "value": "b"}]
    assert (
        base64.b64decode(by_path["bytes/300"]["response"]["content"]["text"])
        == (bytes(range(256)) * 2)[:300]
    )


# --- clipboard -------------------------------------------------------------------------


def test_osc52_sequence():
    assert osc52("hi") == "\x1b]52;c;aGk=\x07"
    text = "curl 'https://x/ü' \\\n  -H 'A: 🦡'"
    seq = osc52(text)
    assert seq.startswith("\x1b]52;c;") and seq.endswith("\x07")
    assert base64.b64decode(seq[7:-1]).decode("utf-8") == text


def test_clipboard_sequence_outside_tmux_is_plain_osc52():
    assert clipboard_sequence("hi", env={"TERM": "xterm-256color"}) == osc52("hi")
    assert clipboard_sequence("hi", env={"TMUX": ""}) == osc52("hi")


def test_clipboard_sequence_in_tmux_adds_passthrough():
    seq = clipboard_sequence("hi", env={"TMUX": "/tmp/tmux-0/default,123,0"})
    plain = osc52("hi")
    wrapped = "\x1bPtmux;\x1b\x1b]52;c;aGk=\x07\x1b\\"
    assert tmux_passthrough(plain) == wrapped
    assert seq == plain + wrapped  # plain for set-clipboard on, wrapped for allow-passthrough


def test_clipboard_sequence_uses_the_real_environment(monkeypatch):
    monkeypatch.setenv("TMUX", "/tmp/tmux-1/default,1,0")
    assert export.clipboard_sequence("x", env=os.environ).startswith(osc52("x") + "\x1bPtmux;")
