"""ngrok's own Python Agent SDK (``pip install ngrok``) against burrow's edge, unchanged.

The SDK runs in a subprocess with only its target directory on ``PYTHONPATH`` (see
``.ci/run``); these tests skip when that directory is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import ssl
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.procs import BurrowProc, host_of
from tests.upstreams import HTTPUpstream, TCPEcho, raw_exchange

ROOT = Path(__file__).resolve().parents[2]
SDK_DIR = Path(os.environ.get("BURROW_NGROK_SDK", ROOT / ".sdk"))
DRIVER = Path(__file__).with_name("ngrok_sdk_driver.py")

#: every test that runs the SDK carries this (the one place the skip is decided)
needs_sdk = pytest.mark.skipif(
    not (SDK_DIR / "ngrok" / "__init__.py").exists(),
    reason=f"ngrok's Python SDK is not installed in {SDK_DIR} "
    f"(pip install --target {SDK_DIR} ngrok; .ci/run does it)",
)
pytestmark = needs_sdk


class SDK:
    """One SDK process: ``await SDK.start(...)``, then ``url`` or ``error``."""

    def __init__(self, proc: asyncio.subprocess.Process, line: dict) -> None:
        self.proc = proc
        self.url: str = line.get("url", "")
        self.error: list[str] = line.get("error", [])

    @classmethod
    async def start(
        cls,
        edge: BurrowProc,
        upstream: str,
        authtoken: str = "test-authtoken",
        proto: str = "http",
        domain: str = "",
        options: dict | None = None,
        env: dict[str, str] | None = None,
    ):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(DRIVER),
            upstream,
            authtoken,
            edge.ready["ingress_addr"],
            edge.ready["ca_file"],
            proto,
            domain,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={
                "PYTHONPATH": str(SDK_DIR),
                "PATH": os.environ.get("PATH", ""),
                "BURROW_SDK_OPTIONS": json.dumps(options or {}),
                **(env or {}),
            },
        )
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line, "the SDK process printed nothing"
        return cls(proc, json.loads(line))

    @classmethod
    @contextlib.asynccontextmanager
    async def serving(cls, edge: BurrowProc, app, proto: str = "http"):
        """An SDK forwarding to ``app`` (an ``asyncio.start_server`` callback on
        127.0.0.1), both stopped at the end."""
        server = await asyncio.start_server(app, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sdk = await cls.start(edge, f"127.0.0.1:{port}", proto=proto)
        try:
            assert not sdk.error, sdk.error
            yield sdk
        finally:
            await sdk.stop()
            server.close()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def _api(edge: BurrowProc, path: str) -> dict:
    async with httpx.AsyncClient(
        base_url=edge.ready["api_url"],
        headers={"Authorization": "Bearer test-api-key", "Ngrok-Version": "2"},
    ) as c:
        r = await c.get(path)
        r.raise_for_status()
        return r.json()


async def _endpoint_urls(edge: BurrowProc) -> list[str]:
    return [e["url"] for e in (await _api(edge, "/endpoints"))["endpoints"]]


async def test_sdk_forward_http_serves_get_and_post_then_goes_offline(edge):
    async with HTTPUpstream() as up:
        sdk = await SDK.start(edge, f"127.0.0.1:{up.port}")
        try:
            assert not sdk.error, sdk.error
            assert sdk.url.startswith("http://") and sdk.url.endswith(
                f".burrow.localhost:{edge.http_addr[1]}"
            )
            assert sdk.url in await _endpoint_urls(edge)
            sessions = await _api(edge, "/tunnel_sessions")
            [ts] = sessions["tunnel_sessions"]
            assert ts["id"].startswith("ts_") and ts["os"] and ts["agent_version"]
            host = host_of(sdk.url)

            raw = await raw_exchange(
                *edge.http_addr,
                f"GET /bytes/70000 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
            )
            assert raw == up.sent[0]
            head = up.requests[0][0]
            assert head.startswith(b"GET /bytes/70000 HTTP/1.1\r\n")
            assert f"Host: {host}".encode() in head
            assert b"X-Forwarded-For: 127.0.0.1" in head  # added by the edge, as ngrok's does
            assert b"X-Forwarded-Proto: http" in head

            body = os.urandom(1024 * 1024)
            async with httpx.AsyncClient(
                base_url=f"http://{edge.http_addr[0]}:{edge.http_addr[1]}", timeout=20
            ) as c:
                r = await c.post("/echo", content=body, headers={"Host": host})
                assert r.status_code == 200
                assert r.headers["x-body-sha256"] == hashlib.sha256(body).hexdigest()
                assert r.content == body
                # several requests on one public keep-alive connection
                for i in range(3):
                    r = await c.get(f"/n{i}", headers={"Host": host})
                    assert r.status_code == 200 and f"/n{i}".encode() in r.content
        finally:
            await sdk.stop()
        # the SDK's session ended: its endpoint is offline
        for _ in range(50):
            if sdk.url not in await _endpoint_urls(edge):
                break
            await asyncio.sleep(0.1)
        assert sdk.url not in await _endpoint_urls(edge)
        raw = await raw_exchange(
            *edge.http_addr, f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        assert raw.startswith(b"HTTP/1.1 404") and b"ERR_NGROK_3200" in raw


async def test_sdk_with_wrong_authtoken_gets_ngroks_error(edge):
    sdk = await SDK.start(edge, "127.0.0.1:9", authtoken="not-a-burrow-token")
    try:
        assert not sdk.url
        text = " ".join(sdk.error)
        assert "The authtoken you specified is properly formed, but it is invalid." in text
        assert "ERR_NGROK_107" in sdk.error
    finally:
        await sdk.stop()


async def test_sdk_options_burrow_cannot_apply_are_refused_not_ignored(edge):
    """An OAuth dropped on the floor would put a private app on the internet (the options
    burrow does apply are tested in test_ngrok_sdk_options.py)."""
    sdk = await SDK.start(edge, "127.0.0.1:9", options={"oauth_provider": "google"})
    try:
        assert not sdk.url
        text = " ".join(sdk.error)
        assert "OAuth: not supported by burrow's edge for ngrok agents" in text, text
        assert "ERR_NGROK_9000" in sdk.error
    finally:
        await sdk.stop()


async def test_sdk_forward_tcp_echoes_with_half_close(edge):
    async with TCPEcho() as echo:
        sdk = await SDK.start(edge, f"127.0.0.1:{echo.port}", proto="tcp")
        try:
            assert not sdk.error, sdk.error
            assert sdk.url.startswith("tcp://")
            port = int(sdk.url.rsplit(":", 1)[1])
            data = os.urandom(300 * 1024)  # more than one muxado window
            r, w = await asyncio.open_connection(edge.http_addr[0], port)
            w.write(data)
            w.write_eof()  # half-close travels as FIN; the echo answers everything first
            got = await asyncio.wait_for(r.read(), 10)
            w.close()
            assert got == data
        finally:
            await sdk.stop()


async def test_sdk_tcp_upload_nobody_reads_is_held_back_and_others_go_on(edge):
    """A public client pushing into an SDK tcp tunnel whose app never reads: the edge
    stops reading that client (its bytes wait in the muxado window and the sockets'
    buffers, a few MiB) while another connection of the same session echoes a body."""
    held: list[asyncio.StreamWriter] = []

    async def app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if not held:  # the first connection: never read
            held.append(w)
            return
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    async with SDK.serving(edge, app, proto="tcp") as sdk:
        try:
            port = int(sdk.url.rsplit(":", 1)[1])
            _, stuck = await asyncio.open_connection(edge.http_addr[0], port)
            block = b"x" * 65536
            sent = 0
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 4
            while loop.time() < deadline and sent < 256 * 2**20:  # bounded in time and bytes
                stuck.write(block)
                try:
                    await asyncio.wait_for(stuck.drain(), 0.5)
                except TimeoutError:
                    break  # nobody takes more: held back
                sent += len(block)
            assert sent < 64 * 2**20, f"{sent} bytes went into a tunnel whose app reads nothing"
            r, w = await asyncio.open_connection(edge.http_addr[0], port)
            body = os.urandom(1 << 20)
            w.write(body)
            w.write_eof()
            got = await asyncio.wait_for(r.read(), 10)
            assert got == body
            w.close()
            stuck.close()
        finally:
            for w in held:
                w.close()


async def test_sdk_forward_http_with_domain(edge):
    async with HTTPUpstream() as up:
        sdk = await SDK.start(edge, f"127.0.0.1:{up.port}", domain="sdk-app.burrow.localhost")
        try:
            assert not sdk.error, sdk.error
            assert sdk.url == f"http://sdk-app.burrow.localhost:{edge.http_addr[1]}"
            raw = await raw_exchange(
                *edge.http_addr,
                b"GET /hi HTTP/1.1\r\nHost: sdk-app.burrow.localhost\r\nConnection: close\r\n\r\n",
            )
            assert raw.startswith(b"HTTP/1.1 200") and b"/hi" in raw
            # a second SDK session may not take the same name (no pooling asked for)
            other = await SDK.start(edge, f"127.0.0.1:{up.port}", domain="sdk-app.burrow.localhost")
            try:
                assert not other.url and "ERR_NGROK_334" in other.error
            finally:
                await other.stop()
        finally:
            await sdk.stop()


async def test_sdk_forward_https_terminated_by_the_edge(edge):
    async with HTTPUpstream() as up:
        sdk = await SDK.start(edge, f"127.0.0.1:{up.port}", proto="https")
        try:
            assert not sdk.error, sdk.error
            assert sdk.url.startswith("https://")
            host = host_of(sdk.url)
            port = int(sdk.url.rsplit(":", 1)[1])
            ctx = ssl.create_default_context(cafile=edge.ready["ca_file"])
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=host)
            w.write(f"GET /secure HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            raw = await asyncio.wait_for(r.read(), 10)
            w.close()
            assert raw.startswith(b"HTTP/1.1 200") and b"/secure" in raw
            assert b"X-Forwarded-Proto: https" in up.requests[0][0]
        finally:
            await sdk.stop()


async def test_tunnel_session_commands_reach_the_sdk_and_report_its_answer(edge):
    async with HTTPUpstream() as up:
        sdk = await SDK.start(edge, f"127.0.0.1:{up.port}")
        try:
            [ts] = (await _api(edge, "/tunnel_sessions"))["tunnel_sessions"]
            async with httpx.AsyncClient(
                base_url=edge.ready["api_url"],
                headers={"Authorization": "Bearer test-api-key", "Ngrok-Version": "2"},
            ) as c:
                for cmd in ("stop", "restart", "update"):
                    r = await c.post(f"/tunnel_sessions/{ts['id']}/{cmd}", json={})
                    # the SDK has no handler for it: its answer comes back, the session stays
                    assert r.status_code == 400, r.text
                    assert "has not defined a callback" in r.json()["msg"], r.text
            assert sdk.url in await _endpoint_urls(edge)
            r = await raw_exchange(
                *edge.http_addr,
                f"GET /still HTTP/1.1\r\nHost: {host_of(sdk.url)}\r\nConnection: close\r\n\r\n".encode(),
            )
            assert r.startswith(b"HTTP/1.1 200")
        finally:
            await sdk.stop()


async def test_sdk_reconnects_with_its_client_id_and_gets_the_same_random_url(tmp_path):
    """The edge drops the SDK's connection: the SDK comes back with its ClientId, re-binds
    with its old endpoint Id, and gets the same random URL (an in-process edge, so that
    the test can cut the connection)."""
    from backend.edge.server import Edge, EdgeConfig

    edge = Edge(
        EdgeConfig(
            data_dir=tmp_path / "edge",
            api_addr="",
            ingress_addr="127.0.0.1:0",
            http_addr="127.0.0.1:0",
            https_addr=None,
            authtokens=["test-authtoken"],
            api_keys=["test-api-key"],
        )
    )
    await edge.start()
    try:
        async with HTTPUpstream() as up:
            host, port = edge.addrs["ingress"]
            target = SimpleNamespace(ready={"ingress_addr": f"{host}:{port}", "ca_file": str(edge.ca.ca_file)})
            sdk = await SDK.start(target, f"127.0.0.1:{up.port}")
            try:
                [s] = edge.registry.sessions.values()
                assert [ep.url for ep in s.endpoints.values()] == [sdk.url]
                s.mux.close()  # the connection breaks
                loop = asyncio.get_running_loop()
                start = loop.time()
                while loop.time() - start < 5:
                    await asyncio.sleep(0.05)
                    back = [x for x in edge.registry.sessions.values() if x is not s and x.endpoints]
                    if back:
                        break
                [s2] = back
                assert s2.client_id == s.client_id
                assert [ep.url for ep in s2.endpoints.values()] == [sdk.url]
                raw = await raw_exchange(
                    *edge.addrs["http"],
                    f"GET /again HTTP/1.1\r\nHost: {host_of(sdk.url)}\r\nConnection: close\r\n\r\n".encode(),
                )
                assert raw.startswith(b"HTTP/1.1 200")
            finally:
                await sdk.stop()
    finally:
        await edge.stop()
