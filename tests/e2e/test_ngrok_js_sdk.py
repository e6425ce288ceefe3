"""ngrok's JavaScript Agent SDK (npm ``@ngrok/ngrok``, built on ngrok-rust) against burrow's edge.

A second, newer implementation of ngrok's agent protocol than the Python SDK (1.7 here
against 1.4), run unchanged in a ``node`` subprocess.  ``.ci/run`` installs it with
``npm install --prefix .jssdk``; ``BURROW_NGROK_JS_SDK`` points elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.procs import BurrowProc, host_of
from tests.upstreams import HTTPUpstream, TCPEcho, raw_exchange

ROOT = Path(__file__).resolve().parents[2]
JS_SDK = Path(os.environ.get("BURROW_NGROK_JS_SDK", ROOT / ".jssdk"))
DRIVER = Path(__file__).with_name("ngrok_js_driver.mjs")

pytestmark = pytest.mark.skipif(
    not (JS_SDK / "node_modules" / "@ngrok" / "ngrok" / "package.json").exists() or not shutil.which("node"),
    reason=f"ngrok's JavaScript SDK is not installed in {JS_SDK} "
    f"(npm install --prefix {JS_SDK} @ngrok/ngrok; .ci/run does it)",
)


class JsSDK:
    def __init__(self, proc: asyncio.subprocess.Process, line: dict) -> None:
        self.proc = proc
        self.url: str = line.get("url", "")
        self.error: str = line.get("error", "")
        self.code: str | None = line.get("code")

    @classmethod
    async def start(
        cls, edge: BurrowProc, upstream: str, authtoken: str = "test-authtoken", proto: str = "http", **options
    ) -> JsSDK:
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(DRIVER),
            upstream,
            authtoken,
            edge.ready["ingress_addr"],
            edge.ready["ca_file"],
            proto,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={
                "PATH": os.environ.get("PATH", ""),
                "BURROW_NGROK_JS_SDK": str(JS_SDK),
                "BURROW_SDK_OPTIONS": json.dumps(options),
            },
        )
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line, "the JavaScript SDK printed nothing"
        return cls(proc, json.loads(line))

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
        base_url=edge.ready["api_url"], headers={"Authorization": "Bearer test-api-key", "Ngrok-Version": "2"}
    ) as c:
        r = await c.get(path)
        r.raise_for_status()
        return r.json()


async def test_js_sdk_forwards_http_get_and_1mib_post_then_goes_offline(edge):
    async with HTTPUpstream() as up:
        sdk = await JsSDK.start(edge, f"127.0.0.1:{up.port}", schemes=["HTTP"])
        try:
            assert not sdk.error, sdk.error
            assert sdk.url == f"http://{host_of(sdk.url)}:{edge.http_addr[1]}"
            [ts] = (await _api(edge, "/tunnel_sessions"))["tunnel_sessions"]
            assert ts["agent_version"] and ts["os"]
            host = host_of(sdk.url)
            raw = await raw_exchange(
                *edge.http_addr, f"GET /bytes/70000 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            assert raw == up.sent[0]
            body = os.urandom(1024 * 1024)
            async with httpx.AsyncClient(base_url=f"http://{edge.http_addr[0]}:{edge.http_addr[1]}", timeout=20) as c:
                r = await c.post("/echo", content=body, headers={"Host": host})
                assert r.status_code == 200 and r.content == body
                assert r.headers["x-body-sha256"] == hashlib.sha256(body).hexdigest()
        finally:
            await sdk.stop()
        for _ in range(50):
            if not (await _api(edge, "/endpoints"))["endpoints"]:
                break
            await asyncio.sleep(0.1)
        raw = await raw_exchange(*edge.http_addr, f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert raw.startswith(b"HTTP/1.1 404") and b"ERR_NGROK_3200" in raw


async def test_js_sdk_forwards_tcp_with_half_close(edge):
    async with TCPEcho() as echo:
        sdk = await JsSDK.start(edge, f"127.0.0.1:{echo.port}", proto="tcp")
        try:
            assert not sdk.error, sdk.error
            port = int(sdk.url.rsplit(":", 1)[1])
            data = os.urandom(300 * 1024)
            r, w = await asyncio.open_connection(edge.http_addr[0], port)
            w.write(data)
            w.write_eof()
            got = await asyncio.wait_for(r.read(), 10)
            w.close()
            assert got == data
        finally:
            await sdk.stop()


async def test_js_sdk_with_wrong_authtoken_gets_ngroks_error(edge):
    sdk = await JsSDK.start(edge, "127.0.0.1:9", authtoken="not-a-burrow-token")
    try:
        assert not sdk.url
        assert sdk.code == "ERR_NGROK_107"
        assert "The authtoken you specified is properly formed, but it is invalid." in sdk.error
    finally:
        await sdk.stop()


async def test_two_js_sdk_sessions_and_a_burrow_agent_pool_on_one_url(edge, tmp_path):
    """Pooling with real SDKs (the Python SDK 1.4 has no pooling option; this one has)."""
    from tests.procs import start_agent

    host = "js-pool.burrow.localhost"
    async with HTTPUpstream() as up1, HTTPUpstream() as up2, HTTPUpstream() as up3:
        a = await JsSDK.start(edge, f"127.0.0.1:{up1.port}", pooling_enabled=True, domain=host)
        b = await JsSDK.start(edge, f"127.0.0.1:{up2.port}", pooling_enabled=True, domain=host)
        burrow = start_agent(
            edge, "http", str(up3.port), "--url", f"http://{host}", "--pooling-enabled", home=tmp_path / "home"
        )
        try:
            assert not a.error and not b.error, (a.error, b.error)
            assert a.url == b.url == burrow.public_url == f"http://{host}:{edge.http_addr[1]}"
            pooled = [e for e in (await _api(edge, "/endpoints"))["endpoints"] if e["url"] == a.url]
            assert len(pooled) == 3 and all(e["pooling_enabled"] for e in pooled)
            for i in range(18):
                raw = await raw_exchange(
                    *edge.http_addr, f"GET /p{i} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
                )
                assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
            counts = [len(up.requests) for up in (up1, up2, up3)]
            assert sum(counts) == 18 and min(counts) >= 3, counts  # every member takes a share

            # an SDK that asks for no pooling is refused on the pooled URL, in ngrok's words
            c = await JsSDK.start(edge, f"127.0.0.1:{up1.port}", domain=host, schemes=["HTTP"])
            try:
                assert not c.url and "ERR_NGROK_334" in (c.code or c.error), c.error
            finally:
                await c.stop()
        finally:
            await a.stop()
            await b.stop()
            burrow.stop()
