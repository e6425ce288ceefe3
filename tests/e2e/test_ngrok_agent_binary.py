"""The real ``ngrok`` agent binary against burrow's edge, unchanged.

The binary is ngrok 2.3.41 for linux-x64 as Expo publishes it on npm
(``@expo/ngrok-bin-linux-x64``; ngrok's own download site is out of reach here).
``.ci/run`` installs it into ``.ngrokbin``; ``BURROW_NGROK_BIN`` points elsewhere.  It is
told the edge with its own config keys (``server_addr``, ``root_cas``), its update check
is off, and its web interface is on a free loopback port.  pyngrok drives it too, as
pyngrok's users do.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.procs import BurrowProc, host_of
from tests.upstreams import HTTPUpstream, TCPEcho, raw_exchange

ROOT = Path(__file__).resolve().parents[2]
NGROK = Path(
    os.environ.get("BURROW_NGROK_BIN", ROOT / ".ngrokbin/node_modules/@expo/ngrok-bin-linux-x64/ngrok")
)

pytestmark = pytest.mark.skipif(
    not NGROK.exists(),
    reason=f"the ngrok agent binary is not installed at {NGROK} "
    "(npm install --prefix .ngrokbin @expo/ngrok-bin-linux-x64; .ci/run does it)",
)

API_HEADERS = {"Authorization": "Bearer test-api-key", "Ngrok-Version": "2"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ngrok_config(path: Path, edge: BurrowProc, authtoken: str = "test-authtoken") -> tuple[str, str]:
    """An ngrok v2 config file pointing at ``edge``; returns (path, web address)."""
    web = f"127.0.0.1:{_free_port()}"
    conf = {
        "authtoken": authtoken,
        "server_addr": edge.ready["ingress_addr"],
        "root_cas": edge.ready["ca_file"],
        "web_addr": web,
        "update_check": False,
        "console_ui": False,
    }
    path.write_text(yaml.safe_dump(conf))
    return str(path), web


class Ngrok:
    """``ngrok PROTO ADDR`` with JSON logs on stdout, read by a thread-free poll."""

    def __init__(self, edge: BurrowProc, tmp: Path, proto: str, addr: str, authtoken: str = "test-authtoken") -> None:
        self.config, self.web = ngrok_config(tmp / "ngrok.yml", edge, authtoken)
        self.log = tmp / "ngrok.log"
        self.proc = subprocess.Popen(
            [str(NGROK), proto, addr, "--config", self.config, "--log", str(self.log), "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def lines(self) -> list[dict]:
        try:
            text = self.log.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    async def tunnels(self, want: int, timeout: float = 15) -> list[dict]:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=f"http://{self.web}", timeout=2) as c:
            while time.monotonic() < deadline:
                try:
                    tunnels = (await c.get("/api/tunnels")).json()["tunnels"]
                    if len(tunnels) >= want:
                        return tunnels
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                assert self.proc.poll() is None, f"ngrok exited: {self.lines()[-5:]}"
                await asyncio.sleep(0.1)
        raise AssertionError(f"ngrok did not start {want} tunnel(s): {self.lines()[-5:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _endpoint_urls(edge: BurrowProc) -> list[str]:
    async with httpx.AsyncClient(base_url=edge.ready["api_url"], headers=API_HEADERS) as c:
        return [e["url"] for e in (await c.get("/endpoints")).json()["endpoints"]]


async def _https_get(edge: BurrowProc, url: str, path: str) -> bytes:
    """GET over TLS verified against the edge's CA, with the tunnel's name as SNI."""
    ctx = ssl.create_default_context(cafile=edge.ready["ca_file"])
    host = host_of(url)
    port = int(edge.ready["https_url"].rsplit(":", 1)[1])
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=host)
    try:
        w.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(r.read(), 10)
    finally:
        w.close()


async def test_ngrok_agent_serves_http_and_https_and_inspects_them(edge, tmp_path):
    async with HTTPUpstream() as up:
        agent = Ngrok(edge, tmp_path, "http", str(up.port))
        try:
            tunnels = {t["proto"]: t for t in await agent.tunnels(2)}
            http_url, https_url = tunnels["http"]["public_url"], tunnels["https"]["public_url"]
            assert http_url.endswith(f".burrow.localhost:{edge.http_addr[1]}")
            assert set(await _endpoint_urls(edge)) == {http_url, https_url}
            async with httpx.AsyncClient(base_url=edge.ready["api_url"], headers=API_HEADERS) as c:
                [ts] = (await c.get("/tunnel_sessions")).json()["tunnel_sessions"]
            assert ts["agent_version"] == "2.3.41" and ts["os"] == "linux"

            host = host_of(http_url)
            raw = await raw_exchange(
                *edge.http_addr, f"GET /bytes/70000 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            assert raw == up.sent[0]
            raw = await _https_get(edge, https_url, "/over-tls")
            assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"GET /over-tls\n")
            # the edge added ngrok's forwarding headers, the agent passed them on
            assert b"X-Forwarded-Proto: https" in up.requests[1][0]

            # ngrok's own inspector saw both requests
            async with httpx.AsyncClient(base_url=f"http://{agent.web}") as c:
                for _ in range(50):
                    seen = [r["request"]["uri"] for r in (await c.get("/api/requests/http")).json()["requests"]]
                    if len(seen) == 2:
                        break
                    await asyncio.sleep(0.1)
            assert sorted(seen) == ["/bytes/70000", "/over-tls"]
        finally:
            agent.stop()
        for _ in range(50):
            if not await _endpoint_urls(edge):
                break
            await asyncio.sleep(0.1)
        raw = await raw_exchange(*edge.http_addr, f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert raw.startswith(b"HTTP/1.1 404") and b"ERR_NGROK_3200" in raw


async def test_ngrok_agent_tcp_tunnel_echoes(edge, tmp_path):
    async with TCPEcho() as echo:
        agent = Ngrok(edge, tmp_path, "tcp", str(echo.port))
        try:
            [t] = await agent.tunnels(1)
            assert t["public_url"].startswith("tcp://")
            port = int(t["public_url"].rsplit(":", 1)[1])
            data = os.urandom(300 * 1024)
            r, w = await asyncio.open_connection(edge.http_addr[0], port)
            w.write(data)
            got = await asyncio.wait_for(r.readexactly(len(data)), 10)
            assert got == data
            # ngrok 2.x ends both directions of its local connection when one ends (the
            # SDKs half-close); so this end closes after reading everything
            w.close()
        finally:
            agent.stop()


async def test_ngrok_agent_with_a_wrong_authtoken_logs_ngroks_error(edge, tmp_path):
    agent = Ngrok(edge, tmp_path, "http", "9", authtoken="not-a-burrow-token")
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            errors = [ln for ln in agent.lines() if "ERR_NGROK_107" in json.dumps(ln)]
            if errors:
                break
            await asyncio.sleep(0.1)
        assert errors, agent.lines()[-5:]
        assert "The authtoken you specified is properly formed, but it is invalid." in json.dumps(errors[0])
        assert await _endpoint_urls(edge) == []
    finally:
        agent.stop()


def test_pyngrok_drives_the_ngrok_binary_against_burrow(edge, tmp_path):
    from pyngrok import conf, ngrok

    config, _ = ngrok_config(tmp_path / "ngrok.yml", edge)
    pc = conf.PyngrokConfig(
        ngrok_path=str(NGROK), config_path=config, ngrok_version="v2", config_version="2", startup_timeout=20
    )

    try:
        with socket.socket() as s:  # an upstream answering one plain request
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            tunnel = ngrok.connect(str(port), "http", pyngrok_config=pc, bind_tls=False)
            assert tunnel.public_url.startswith("http://") and ".burrow.localhost:" in tunnel.public_url
            assert tunnel.public_url in asyncio.run(_endpoint_urls(edge))
            assert [t.public_url for t in ngrok.get_tunnels(pyngrok_config=pc)] == [tunnel.public_url]

            got: dict = {}

            def answer() -> None:
                conn, _ = s.accept()
                with conn:
                    got["head"] = conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\npyngrk")

            t = threading.Thread(target=answer, daemon=True)
            t.start()
            host = host_of(tunnel.public_url)
            with socket.create_connection(edge.http_addr, timeout=10) as c:
                c.sendall(f"GET /py HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                raw = b""
                while chunk := c.recv(65536):
                    raw += chunk
            t.join(5)
            assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"pyngrk")
            assert got["head"].startswith(b"GET /py HTTP/1.1\r\n")

            ngrok.disconnect(tunnel.public_url, pyngrok_config=pc)
            assert ngrok.get_tunnels(pyngrok_config=pc) == []
    finally:
        ngrok.kill(pyngrok_config=pc)


async def test_the_console_drives_the_ngrok_agent(edge, tmp_path, monkeypatch):
    """burrow's console on a real ngrok agent's API (no /api/events, none of burrow's
    list extensions): its requests with sizes, their detail, a replay, its tunnels."""
    from textual.widgets import DataTable

    from console.cli import make_app
    from console.config import Settings
    from console.widgets.request_list import RequestList

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    async with HTTPUpstream() as up:
        agent = Ngrok(edge, tmp_path, "http", str(up.port))
        try:
            tunnels = {t["proto"]: t for t in await agent.tunnels(2)}
            host = host_of(tunnels["http"]["public_url"])
            for i in range(3):
                raw = await raw_exchange(
                    *edge.http_addr, f"GET /bytes/{100 + i} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
                )
                assert raw.startswith(b"HTTP/1.1 200")
            app = make_app(
                Settings(
                    agent_url=f"http://{agent.web}", api_url=edge.ready["api_url"], api_key="test-api-key",
                    theme="burrow-dark",
                )
            )
            async with app.run_test(size=(100, 30)) as pilot:

                async def until(pred, what: str, timeout: float = 15) -> None:
                    deadline = time.monotonic() + timeout
                    while not pred():
                        assert time.monotonic() < deadline, f"timed out waiting for {what}"
                        await pilot.pause(0.05)

                rl = app.query_one(RequestList)
                await until(lambda: rl.total == 3, "three requests")
                rows = [rl.rows[i] for i in range(3)]
                assert sorted(r["path"] for r in rows) == ["/bytes/100", "/bytes/101", "/bytes/102"], rows
                # sizes from ngrok's raw messages (it has no body_size field)
                assert sorted(r["response_size"] for r in rows) == [100, 101, 102], rows

                await pilot.press("enter")
                await pilot.pause(0.5)
                await pilot.press("r")  # replay through ngrok's own replay API
                async with httpx.AsyncClient(base_url=f"http://{agent.web}") as c:
                    for _ in range(100):
                        if len((await c.get("/api/requests/http")).json()["requests"]) == 4:
                            break
                        await asyncio.sleep(0.1)
                    assert len((await c.get("/api/requests/http")).json()["requests"]) == 4
                assert len(up.requests) == 4
                await pilot.press("escape")
                await pilot.press("3")
                await pilot.pause(0.3)
                ttable = app.query_one("#tunnels-pane-table", DataTable)
                shown = {str(ttable.get_row_at(i)[1]) for i in range(ttable.row_count)}
                assert shown == {t["public_url"] for t in tunnels.values()}, shown
            assert app._exception is None
        finally:
            agent.stop()
