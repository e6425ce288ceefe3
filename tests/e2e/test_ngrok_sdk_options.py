"""Bind options of ngrok's own Python SDK, applied by burrow's edge, and tls endpoints.

BasicAuth, IPRestriction, request/response headers and the agent's TrafficPolicy run
as edge policy; ProxyProto reaches the upstream as a PROXY header; ``proto="tls"``
passes the upstream's own TLS through; what the edge cannot apply is refused.
One edge for the whole module (the SDK sessions share it, each on its own endpoint).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import os
import ssl
import struct

import pytest
import websockets

from backend.edge import ngrok_options
from backend.tls import LocalCA
from tests.e2e.test_ngrok_sdk import SDK, needs_sdk
from tests.procs import host_of, start_edge
from tests.upstreams import HTTPUpstream, TCPEcho, raw_exchange


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    proc = start_edge(tmp_path_factory.mktemp("sdk-options") / "edge")
    yield proc
    proc.stop()


async def _sdk(edge, upstream: str, **kw) -> SDK:
    sdk = await SDK.start(edge, upstream, **kw)
    assert not sdk.error, sdk.error
    return sdk


async def _get(edge, host: str, path: str = "/", headers: str = "") -> bytes:
    return await raw_exchange(
        *edge.http_addr,
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n".encode(),
    )


def _basic(cred: str) -> str:
    return f"Authorization: Basic {base64.b64encode(cred.encode()).decode()}\r\n"


# ------------------------------------------------------------- http options
@needs_sdk
async def test_basic_auth_runs_before_the_agents_traffic_policy_deny(edge):
    policy = {
        "on_http_request": [
            {
                "expressions": ["req.url.path.startsWith('/blocked')"],
                "actions": [{"type": "deny", "config": {"status_code": 418}}],
            }
        ]
    }
    async with HTTPUpstream() as up:
        sdk = await _sdk(
            edge,
            f"127.0.0.1:{up.port}",
            options={"basic_auth": ["user:password1234"], "traffic_policy": json.dumps(policy)},
        )
        try:
            host = host_of(sdk.url)
            raw = await _get(edge, host, "/private")
            assert raw.startswith(b"HTTP/1.1 401"), raw[:200]
            assert b'WWW-Authenticate: Basic realm="ngrok"' in raw
            raw = await _get(edge, host, "/private", _basic("user:wrong-password"))
            assert raw.startswith(b"HTTP/1.1 401"), raw[:200]
            # the agent's own deny does not answer before authentication
            raw = await _get(edge, host, "/blocked")
            assert raw.startswith(b"HTTP/1.1 401"), raw[:200]
            assert up.requests == []
            raw = await _get(edge, host, "/private", _basic("user:password1234"))
            assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"GET /private\n"), raw[:200]
            raw = await _get(edge, host, "/blocked/x", _basic("user:password1234"))
            assert raw.startswith(b"HTTP/1.1 418"), raw[:200]
            assert [h.split(b"\r\n", 1)[0] for h, _ in up.requests] == [b"GET /private HTTP/1.1"]
        finally:
            await sdk.stop()


@needs_sdk
async def test_traffic_policy_deny_alone(edge):
    policy = {"on_http_request": [{"actions": [{"type": "deny"}]}]}
    async with HTTPUpstream() as up:
        sdk = await _sdk(edge, f"127.0.0.1:{up.port}", options={"traffic_policy": json.dumps(policy)})
        try:
            raw = await _get(edge, host_of(sdk.url), "/x")
            assert raw.startswith(b"HTTP/1.1 403"), raw[:200]
            assert up.requests == []
        finally:
            await sdk.stop()


@needs_sdk
async def test_ip_restriction_http_denies_with_403_and_allows(edge):
    async with HTTPUpstream() as up:
        denied, allowed = await asyncio.gather(
            _sdk(edge, f"127.0.0.1:{up.port}", options={"deny_cidr": ["127.0.0.1/32"]}),
            _sdk(edge, f"127.0.0.1:{up.port}", options={"allow_cidr": ["127.0.0.0/8"], "deny_cidr": ["10.0.0.0/8"]}),
        )
        try:
            raw = await _get(edge, host_of(denied.url), "/no")
            assert raw.startswith(b"HTTP/1.1 403"), raw[:200]
            assert up.requests == []
            raw = await _get(edge, host_of(allowed.url), "/yes")
            assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"GET /yes\n"), raw[:200]
        finally:
            await asyncio.gather(denied.stop(), allowed.stop())


@needs_sdk
async def test_ip_restriction_tcp_closes_denied_connections(edge):
    async with TCPEcho() as echo:
        denied, allowed = await asyncio.gather(
            _sdk(edge, f"127.0.0.1:{echo.port}", proto="tcp", options={"allow_cidr": ["10.0.0.0/8"]}),
            _sdk(edge, f"127.0.0.1:{echo.port}", proto="tcp", options={"allow_cidr": ["127.0.0.1/32"]}),
        )
        try:
            for sdk, expect in ((denied, b""), (allowed, b"ping")):
                r, w = await asyncio.open_connection("127.0.0.1", int(sdk.url.rsplit(":", 1)[1]))
                try:
                    w.write(b"ping")
                    w.write_eof()
                    got = await asyncio.wait_for(r.read(), 10)
                except OSError:  # the edge closed first (reset, or not connected at write_eof)
                    got = b""
                finally:
                    w.close()
                assert got == expect, (sdk.url, got)
        finally:
            await asyncio.gather(denied.stop(), allowed.stop())


@needs_sdk
async def test_ip_restriction_tls_closes_denied_connections_before_the_handshake(edge, tmp_path):
    host = "sdk-tls-denied.burrow.localhost"
    ca = LocalCA.load_or_create(tmp_path / "upstream-ca")
    handshakes = 0

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal handshakes
        handshakes += 1
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ca.server_context([host]))
    sdk = await _sdk(
        edge, f"127.0.0.1:{server.sockets[0].getsockname()[1]}", proto="tls", domain=host,
        options={"deny_cidr": ["127.0.0.1/32"]},
    )
    try:
        port = int(sdk.url.rsplit(":", 1)[1])
        ctx = ssl.create_default_context(cafile=str(ca.ca_file))
        with pytest.raises(OSError):  # reset or EOF during the handshake
            await _tls_exchange(port, host, ctx, b"GET / HTTP/1.1\r\n\r\n")
        assert handshakes == 0
    finally:
        await sdk.stop()
        server.close()


@needs_sdk
async def test_request_and_response_headers_are_added_and_removed(edge):
    async with HTTPUpstream() as up:
        sdk = await _sdk(
            edge,
            f"127.0.0.1:{up.port}",
            options={
                "request_header_add": ["X-Added:from-the-edge"],
                "request_header_remove": ["X-Secret"],
                "response_header_add": ["X-Resp:added"],
                "response_header_remove": ["X-Upstream"],
            },
        )
        try:
            raw = await _get(edge, host_of(sdk.url), "/bytes/10", "X-Secret: s3cr3t\r\nX-Kept: k\r\n")
            head = raw.split(b"\r\n\r\n", 1)[0].lower()
            assert raw.startswith(b"HTTP/1.1 200")
            assert b"\r\nx-resp: added" in head and b"x-upstream" not in head, head
            [(req, _)] = up.requests
            req = req.lower()
            assert b"\r\nx-added: from-the-edge\r\n" in req and b"x-kept: k" in req
            assert b"x-secret" not in req
        finally:
            await sdk.stop()


# ------------------------------------------------------------- PROXY protocol
class ProxyEcho:
    """A TCP upstream that reads a PROXY v1/v2 header, records it, then echoes."""

    def __init__(self) -> None:
        self.headers: list[tuple[str, str, int, str, int]] = []  # (version, src, sport, dst, dport)
        self.port = 0

    async def __aenter__(self) -> ProxyEcho:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            first = await r.readexactly(5)
            if first == b"PROXY":
                line = (first + await r.readuntil(b"\r\n")).decode().split()
                self.headers.append(("v1", line[2], int(line[4]), line[3], int(line[5])))
            else:
                rest = await r.readexactly(11)
                assert first + rest[:7] == b"\r\n\r\n\x00\r\nQUIT\n", first + rest
                ver_cmd, fam, length = rest[7], rest[8], struct.unpack(">H", rest[9:11])[0]
                body = await r.readexactly(length)
                assert ver_cmd == 0x21 and fam == 0x11, (ver_cmd, fam)  # v2 PROXY, TCP over IPv4
                src, dst = ipaddress.ip_address(body[0:4]), ipaddress.ip_address(body[4:8])
                sport, dport = struct.unpack(">HH", body[8:12])
                self.headers.append(("v2", str(src), sport, str(dst), dport))
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()


@needs_sdk
@pytest.mark.parametrize("version", [1, 2])
async def test_proxy_proto_header_reaches_a_tcp_upstream(edge, version):
    async with ProxyEcho() as up:
        sdk = await _sdk(edge, f"127.0.0.1:{up.port}", proto="tcp", options={"proxy_proto": str(version)})
        try:
            port = int(sdk.url.rsplit(":", 1)[1])
            r, w = await asyncio.open_connection("127.0.0.1", port)
            client_port = w.get_extra_info("sockname")[1]
            w.write(b"hello through PROXY")
            w.write_eof()
            got = await asyncio.wait_for(r.read(), 10)
            w.close()
            assert got == b"hello through PROXY"
            assert up.headers == [(f"v{version}", "127.0.0.1", client_port, "127.0.0.1", port)]
        finally:
            await sdk.stop()


# ------------------------------------------------------------- tls endpoints
class TLSHTTPUpstream(HTTPUpstream):
    """:class:`HTTPUpstream` behind the upstream's own TLS certificate."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        super().__init__()
        self.ctx = ctx

    async def __aenter__(self) -> TLSHTTPUpstream:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self


async def _tls_exchange(port: int, host: str, ctx: ssl.SSLContext, request: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=host)
    try:
        w.write(request)
        await w.drain()
        return await asyncio.wait_for(r.read(), 20)
    finally:
        w.close()


@needs_sdk
async def test_tls_endpoint_passes_the_upstreams_tls_through(edge, tmp_path):
    host, ws_host = "sdk-tls.burrow.localhost", "sdk-wss.burrow.localhost"
    up_ca = LocalCA.load_or_create(tmp_path / "upstream-ca")  # certificates made with cryptography
    client = ssl.create_default_context(cafile=str(up_ca.ca_file))  # trusts the upstream only

    async def ws_echo(ws) -> None:
        async for msg in ws:
            await ws.send(msg)

    async with (
        TLSHTTPUpstream(up_ca.server_context([host])) as up,
        websockets.serve(ws_echo, "127.0.0.1", 0, ssl=up_ca.server_context([ws_host]), max_size=2**21) as wss,
    ):
        ws_port = wss.sockets[0].getsockname()[1]
        sdk, ws_sdk = await asyncio.gather(
            # a tls:// upstream: the SDK would wrap it in TLS itself unless told PassthroughTLS
            _sdk(edge, f"tls://127.0.0.1:{up.port}", proto="tls", domain=host),
            _sdk(edge, f"127.0.0.1:{ws_port}", proto="tls", domain=ws_host),
        )
        try:
            port = int(sdk.url.rsplit(":", 1)[1])
            assert sdk.url == f"tls://{host}:{port}"
            raw = await _tls_exchange(port, host, client, f"GET /hi HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"GET /hi\n"), raw[:200]
            # the edge did not add X-Forwarded-*: it never saw the plaintext
            assert b"x-forwarded" not in up.requests[0][0].lower()

            n = 1024 * 1024
            raw = await _tls_exchange(port, host, client, f"GET /bytes/{n} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            head, body = raw.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200") and body == (bytes(range(256)) * (n // 256 + 1))[:n]

            data = os.urandom(n)
            raw = await _tls_exchange(
                port, host, client,
                f"POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n".encode() + data,
            )
            head, body = raw.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200") and body == data
            assert hashlib.sha256(data).hexdigest().encode() in head

            # the edge's own CA does not verify what the client sees: it is the upstream's
            edge_only = ssl.create_default_context(cafile=edge.ready["ca_file"])
            with pytest.raises(ssl.SSLCertVerificationError):
                await _tls_exchange(port, host, edge_only, b"")

            wport = int(ws_sdk.url.rsplit(":", 1)[1])
            async with websockets.connect(
                f"wss://{ws_host}:{wport}/ws", host="127.0.0.1", port=wport, ssl=client,
                server_hostname=ws_host, max_size=2**21,
            ) as ws:
                await ws.send("hello over tls")
                assert await asyncio.wait_for(ws.recv(), 10) == "hello over tls"
                big = os.urandom(n)
                await ws.send(big)
                assert await asyncio.wait_for(ws.recv(), 20) == big
        finally:
            await asyncio.gather(sdk.stop(), ws_sdk.stop())


# ------------------------------------------------------------- refused
@needs_sdk
async def test_options_the_edge_cannot_apply_are_refused_naming_them(edge, tmp_path):
    ca = LocalCA.load_or_create(tmp_path / "ca")
    key = tmp_path / "key.pem"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a real key\n-----END PRIVATE KEY-----\n")
    cases = [
        ("http", {"oauth_provider": "google"}, "OAuth: not supported by burrow's edge for ngrok agents"),
        ("http", {"compression": True}, "Compression: not supported"),  # sent as an empty object
        ("http", {"mutual_tls_cas": {"bytes_from_file": str(ca.ca_file)}}, "MutualTLSCA: burrow's edge does not verify"),
        (
            "tls",
            {"crt": {"bytes_from_file": str(ca.ca_file)}, "key": {"bytes_from_file": str(key)}},
            "TLSTermination: burrow's edge passes tls endpoints through",
        ),
        ("http", {"allow_cidr": ["not-a-cidr"]}, "IPRestriction: "),
    ]
    sdks = await asyncio.gather(
        *(SDK.start(edge, "127.0.0.1:9", proto=proto, options=opts) for proto, opts, _ in cases)
    )
    try:
        for sdk, (_proto, opts, text) in zip(sdks, cases, strict=True):
            assert not sdk.url, (opts, sdk.url)
            assert text in " ".join(sdk.error), (opts, sdk.error)
    finally:
        await asyncio.gather(*(s.stop() for s in sdks))


# ------------------------------------------------------------- the translation itself
def test_translation_refuses_credentials_it_cannot_check():
    hashed = {"BasicAuth": {"credentials": [{"username": "u", "hashed_password": "$2a$10$abc"}]}}
    with pytest.raises(ngrok_options.BindOptionError, match="hashed passwords cannot be checked"):
        ngrok_options.translate("http", hashed)
    for bad in ([{"username": "", "cleartext_password": "password1"}],
                [{"username": "a:b", "cleartext_password": "password1"}],
                [{"username": "u"}], [], "nope"):
        with pytest.raises(ngrok_options.BindOptionError, match="BasicAuth"):
            ngrok_options.translate("http", {"BasicAuth": {"credentials": bad}})
    with pytest.raises(ngrok_options.BindOptionError, match="ProxyProto must be 1 or 2"):
        ngrok_options.translate("tcp", {"ProxyProto": 3})
    with pytest.raises(ngrok_options.BindOptionError, match="not both"):
        ngrok_options.translate("http", {"TrafficPolicy": "on_http_request: []", "Policy": {"inbound": []}})
    # http-only options on a tcp endpoint are refused too
    with pytest.raises(ngrok_options.BindOptionError, match="BasicAuth"):
        ngrok_options.translate("tcp", {"BasicAuth": {"credentials": [{"username": "u", "cleartext_password": "p"}]}})


def test_translation_orders_rules_around_the_agents_policy():
    own = {"on_http_request": [{"name": "mine", "actions": [{"type": "deny"}]}],
           "on_http_response": [{"name": "mine-out", "actions": [{"type": "add-headers", "config": {"headers": {"a": "b"}}}]}]}
    out = ngrok_options.translate("http", {
        "Auth": "legacy:password1",
        "BasicAuth": {"credentials": [{"username": "u", "cleartext_password": "p4ssword"}]},
        "IPRestriction": {"allow_cidrs": ["10.0.0.0/8"]},
        "RequestHeaders": {"add": ["x-a:1"], "remove": ["x-b"]},
        "ResponseHeaders": {"add": ["x-c: 2"]},
        "ProxyProto": 2,
        "TrafficPolicy": json.dumps(own),
    })
    doc = json.loads(out.traffic_policy)
    assert out.proxy_proto == 2
    assert [r["name"] for r in doc["on_http_request"]] == [
        "ngrok IPRestriction", "ngrok BasicAuth", "mine", "ngrok RequestHeaders",
    ]
    assert doc["on_http_request"][1]["actions"][0]["config"]["credentials"] == ["legacy:password1", "u:p4ssword"]
    assert [r["name"] for r in doc["on_http_response"]] == ["mine-out", "ngrok ResponseHeaders"]
    assert doc["on_http_response"][1]["actions"][0]["config"]["headers"] == {"x-c": "2"}
    # tcp and tls: IP restrictions on connect; the older inbound/outbound policy form is read
    tcp = json.loads(ngrok_options.translate("tls", {
        "IPRestriction": {"deny_cidrs": ["127.0.0.1/32"]},
        "Policy": json.dumps({"inbound": [{"name": "in", "actions": [{"type": "deny"}]}]}),
    }).traffic_policy)
    assert [r["name"] for r in tcp["on_tcp_connect"]] == ["ngrok IPRestriction", "in"]
    assert ngrok_options.translate("http", {"Hostname": "", "Compression": None, "HostHeaderRewrite": False}).traffic_policy == ""
