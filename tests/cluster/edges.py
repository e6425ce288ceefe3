"""Helpers for tests with several real edges on one PostgreSQL (127.0.0.2-.4)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

import asyncpg
import httpx

from tests.procs import READY_TIMEOUT, BurrowProc
from tests.upstreams import HTTPUpstream, TCPEcho

IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def cluster_edge(data_dir: Path, ip: str, dsn: str, node_id: str, *extra: str) -> BurrowProc:
    args = [
        "serve",
        "--data-dir", str(data_dir),
        "--api-addr", f"{ip}:0",
        "--ingress-addr", f"{ip}:0",
        "--http-addr", f"{ip}:0",
        "--https-addr", f"{ip}:0",
        "--tcp-ports", "31000-31999",
        "--authtoken", "test-authtoken",
        "--api-key", "test-api-key",
        "--store", dsn,
        "--node-id", node_id,
        "--peer-addr", f"{ip}:0",
        "--json",
        *extra,
    ]  # fmt: skip
    proc = BurrowProc(args)
    proc.ready = proc.wait_event("ready", READY_TIMEOUT)
    return proc


class Upstreams:
    """An HTTP upstream and a TCP echo in a background event loop (the test is sync)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.http = HTTPUpstream()
        self.echo = TCPEcho()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self.http.__aenter__(), self.loop).result(10)
        asyncio.run_coroutine_threadsafe(self.echo.__aenter__(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.http.__aexit__(), self.loop).result(10)
        asyncio.run_coroutine_threadsafe(self.echo.__aexit__(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def sql(dsn: str, query: str, *args):
    async def run():
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def http_get(ip: str, port: int, host: str, path: str = "/", timeout: float = 5.0) -> httpx.Response:
    return httpx.get(f"http://{ip}:{port}{path}", headers={"Host": host}, timeout=timeout)


def status_of(ip: str, port: int, host: str, timeout: float = 2.0) -> int | None:
    """The status of one GET, or None when it times out (a request routed to a frozen
    edge just before the others reaped it waits for that edge's answer)."""
    try:
        return http_get(ip, port, host, timeout=timeout).status_code
    except httpx.TimeoutException:
        return None


def tcp_echo(ip: str, port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection((ip, port), timeout=timeout) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def wait_until(pred, timeout: float, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            return got
        time.sleep(step)


def start_cluster(postgres_server, root: Path, n: int = 3, extra: tuple[str, ...] = ()) -> dict:
    dsn = postgres_server.new_database()
    edges: list[BurrowProc] = []
    ups = Upstreams()
    try:
        for i, ip in enumerate(IPS[:n], start=1):
            edges.append(cluster_edge(root / f"edge{i}", ip, dsn, f"edge{i}", *extra))
    except BaseException:
        stop_cluster({"edges": edges, "ups": ups})
        raise
    return {"dsn": dsn, "edges": edges, "root": root, "ups": ups, "pg": postgres_server}


def stop_cluster(c: dict) -> None:
    for e in c["edges"]:
        with contextlib.suppress(Exception):
            os.kill(e.pid, signal.SIGCONT)
        e.stop()
    c["ups"].close()


def try_echo(ip: str, port: int) -> bool:
    try:
        return tcp_echo(ip, port, b"x", timeout=1.0) == b"x"
    except OSError:
        return False


#: one session per agent: with HA's ``--ha-connections`` (when this checkout's agent has
#: it) an agent in a cluster opens a second session on another edge, which would take the
#: peer path out of a test about the peer path
HA1: tuple[str, ...] = (
    ("--ha-connections", "1")
    if "--ha-connections" in (Path(__file__).resolve().parents[2] / "backend" / "cli.py").read_text()
    else ()
)


class CutProxy:
    """A TCP proxy to PostgreSQL for one edge (in a background event loop): ``cut()``
    drops every proxied connection and refuses new ones (that edge alone loses
    PostgreSQL); ``restore()`` listens again on the same port."""

    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.listen_host = listen_host
        self.target = target
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self._call(self._listen())

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.listen_host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            w.close()
            return
        self._conns |= {w, uw}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, RuntimeError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))
        self._conns -= {w, uw}

    def dsn(self, database_dsn: str) -> str:
        """``database_dsn`` with its host:port replaced by the proxy's."""
        scheme, rest = database_dsn.split("://", 1)
        userhost, db = rest.split("/", 1)
        user = userhost.split("@", 1)[0]
        return f"{scheme}://{user}@{self.listen_host}:{self.port}/{db}"

    def cut(self) -> None:
        async def go() -> None:
            assert self._server is not None
            self._server.close()
            for w in list(self._conns):
                w.transport.abort()
            self._conns.clear()

        self._call(go())

    def restore(self) -> None:
        self._call(self._listen())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
