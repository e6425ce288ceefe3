"""ngrok's Python SDK sessions over their lifetime on burrow's edge: the same URL after
the edge restarts, StopTunnel when an endpoint is deleted, the cloud API's stop reaching
the SDK's stop handler, and pooling.

The SDK runs in a subprocess (``tests/e2e/ngrok_sdk_driver.py``, the :class:`SDK` helper
of ``test_ngrok_sdk.py``); the tests skip when the SDK is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from types import SimpleNamespace

import httpx
import pytest

from backend.edge import muxado as m
from tests.e2e.test_ngrok_agent_raw import RawAgent
from tests.e2e.test_ngrok_sdk import SDK, _endpoint_urls, needs_sdk
from tests.procs import BurrowProc, host_of, start_agent, start_edge
from tests.upstreams import HTTPUpstream, raw_exchange

API_HEADERS = {"Authorization": "Bearer test-api-key", "Ngrok-Version": "2"}


@pytest.fixture(scope="module")
def shared_edge(tmp_path_factory) -> BurrowProc:
    """One edge for the tests of this module that leave it as they found it."""
    data = tmp_path_factory.mktemp("edge")
    proc = start_edge(data)
    proc.data_dir = data
    yield proc
    proc.stop()


class SessionSDK(SDK):
    """The driver with ``BURROW_SDK_SESSION=1``: a session built with a stop handler;
    it prints ``stop_command`` and ``listener_closed`` events after its first line."""

    def __init__(self, proc: asyncio.subprocess.Process, line: dict) -> None:
        super().__init__(proc, line)
        self.id: str = line.get("id", "")

    @classmethod
    async def start(cls, edge: BurrowProc, upstream: str, proto: str = "http", domain: str = ""):
        return await super().start(
            edge, upstream, proto=proto, domain=domain, env={"BURROW_SDK_SESSION": "1"}
        )

    async def event(self, name: str, timeout: float = 10.0) -> dict:
        """The next event line called ``name`` the driver prints (bounded in time)."""

        async def read() -> dict:
            while True:
                line = await self.proc.stdout.readline()
                assert line, f"the SDK process ended before printing {name!r}"
                ev = json.loads(line)
                if ev.get("event") == name:
                    return ev

        return await asyncio.wait_for(read(), timeout)


async def _get(edge: BurrowProc, host: str, path: str = "/") -> bytes:
    return await raw_exchange(
        *edge.http_addr,
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
    )


async def _sessions(edge: BurrowProc) -> list[dict]:
    async with httpx.AsyncClient(base_url=edge.ready["api_url"], headers=API_HEADERS) as c:
        r = await c.get("/tunnel_sessions")
        r.raise_for_status()
        return r.json()["tunnel_sessions"]


async def _endpoints(edge: BurrowProc) -> list[dict]:
    async with httpx.AsyncClient(base_url=edge.ready["api_url"], headers=API_HEADERS) as c:
        r = await c.get("/endpoints")
        r.raise_for_status()
        return r.json()["endpoints"]


async def _until(cond, timeout: float, what: str):
    """Poll the async ``cond()`` every 50 ms until it returns a true value (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = await cond()
        if got:
            return got
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- edge restart
def _edge_config(data_dir, ingress: int = 0, http: int = 0):
    from backend.edge.server import EdgeConfig

    return EdgeConfig(
        data_dir=data_dir,
        api_addr="",
        ingress_addr=f"127.0.0.1:{ingress}",
        http_addr=f"127.0.0.1:{http}",
        https_addr=None,
        authtokens=["test-authtoken"],
        api_keys=["test-api-key"],
    )


def _target(edge) -> SimpleNamespace:
    """What :class:`SDK` needs of an in-process edge."""
    host, port = edge.addrs["ingress"]
    return SimpleNamespace(ready={"ingress_addr": f"{host}:{port}", "ca_file": str(edge.ca.ca_file)})


@needs_sdk
async def test_sdk_gets_its_random_url_back_after_the_edge_restarts(tmp_path):
    """The edge stops and a new one starts on the same ports with the same data dir (a
    new Edge object: nothing is shared but the data dir); the SDK, still running,
    reconnects with its backoff, re-binds with its old tunnel Id and gets the same
    random URL, remembered in the edge's store.

    In-process, so that the edge is down for milliseconds: the SDK 1.4 redials 0 s,
    50 ms and 2.5 s after losing its connection and then only after ~125 s, so an edge
    process that takes longer than ~2.5 s to come back waits minutes for it."""
    from backend.edge.server import Edge

    data = tmp_path / "edge"
    edge = Edge(_edge_config(data))
    await edge.start()
    try:
        async with HTTPUpstream() as up:
            sdk = await SDK.start(_target(edge), f"127.0.0.1:{up.port}")
            try:
                assert not sdk.error, sdk.error
                host = host_of(sdk.url)
                http = edge.addrs["http"]
                [before] = edge.registry.sessions.values()
                raw = await raw_exchange(
                    *http, f"GET /before HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
                )
                assert raw.startswith(b"HTTP/1.1 200")
                await edge.stop()
                edge = Edge(_edge_config(data, edge.addrs["ingress"][1], http[1]))
                await edge.start()
                assert sdk.proc.returncode is None  # the SDK kept running, reconnecting

                async def served_again():
                    return [
                        s
                        for s in edge.registry.sessions.values()
                        if [ep.url for ep in s.endpoints.values()] == [sdk.url]
                    ]

                [after] = await _until(served_again, 5, f"{sdk.url} online again after the restart")
                # the SDK came back as the same agent: its ClientId, OS and version
                assert after.client_id == before.client_id
                assert (after.os, after.agent_version) == (before.os, before.agent_version)
                raw = await raw_exchange(
                    *http, f"GET /after HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
                )
                assert raw.startswith(b"HTTP/1.1 200") and b"/after" in raw
                assert up.requests[-1][0].startswith(b"GET /after HTTP/1.1\r\n")
            finally:
                await sdk.stop()
    finally:
        await edge.stop()


# --------------------------------------------------------------- StopTunnel
@needs_sdk
async def test_deleting_an_sdk_endpoint_sends_stop_tunnel_and_keeps_the_session(shared_edge):
    edge = shared_edge
    async with HTTPUpstream() as up:
        sdk = await SessionSDK.start(edge, f"127.0.0.1:{up.port}")
        try:
            assert not sdk.error, sdk.error
            host = host_of(sdk.url)
            assert (await _get(edge, host)).startswith(b"HTTP/1.1 200")
            [ep] = [e for e in await _endpoints(edge) if e["url"] == sdk.url]
            [ts] = [s for s in await _sessions(edge) if s["id"] == ep["tunnel_session"]["id"]]
            async with httpx.AsyncClient(base_url=edge.ready["api_url"], headers=API_HEADERS) as c:
                r = await c.delete(f"/endpoints/{ep['id']}")
                assert r.status_code == 204, r.text
                r = await c.delete(f"/endpoints/{ep['id']}")  # gone: a second delete is a 404
                assert r.status_code == 404, r.text
            # the SDK got StopTunnel: its listener stops forwarding
            closed = await sdk.event("listener_closed")
            assert closed["id"] == sdk.id
            assert sdk.url not in await _endpoint_urls(edge)
            raw = await _get(edge, host)
            assert raw.startswith(b"HTTP/1.1 404") and b"ERR_NGROK_3200" in raw
            # the session itself stays (StopTunnel ends one tunnel, not the agent)
            assert ts["id"] in [s["id"] for s in await _sessions(edge)]
            assert sdk.proc.returncode is None
        finally:
            await sdk.stop()
        # the edge is healthy: a new SDK session binds and serves
        other = await SDK.start(edge, f"127.0.0.1:{up.port}")
        try:
            assert not other.error, other.error
            assert (await _get(edge, host_of(other.url), "/next")).startswith(b"HTTP/1.1 200")
        finally:
            await other.stop()


# ------------------------------------------------------------- tunnel_sessions stop
@needs_sdk
async def test_tunnel_session_stop_reaches_the_sdks_stop_handler(shared_edge):
    edge = shared_edge
    async with HTTPUpstream() as up:
        sdk = await SessionSDK.start(edge, f"127.0.0.1:{up.port}")
        try:
            assert not sdk.error, sdk.error
            [ep] = [e for e in await _endpoints(edge) if e["url"] == sdk.url]
            ts_id = ep["tunnel_session"]["id"]
            async with httpx.AsyncClient(base_url=edge.ready["api_url"], headers=API_HEADERS) as c:
                r = await c.post(f"/tunnel_sessions/{ts_id}/stop", json={})
                assert r.status_code == 200, r.text  # the SDK's handler accepted it
            await sdk.event("stop_command")  # the handler ran in the SDK process
            # the driver's handler ends the session: it goes offline with its endpoint

            async def offline():
                return ts_id not in [s["id"] for s in await _sessions(edge)]

            await _until(offline, 10, f"session {ts_id} offline after stop")
            assert sdk.url not in await _endpoint_urls(edge)
            assert await asyncio.wait_for(sdk.proc.wait(), 10) == 0  # and the process exits
        finally:
            await sdk.stop()


async def test_rebind_memory_is_kept_in_the_store_and_skips_oversized_ids(shared_edge):
    """A re-bind Id is the agent's choice: a short one is remembered with its URL in the
    edge's database (what a restarted edge reads), an oversized one is not stored."""
    import sqlite3

    a = await RawAgent.connect(shared_edge)
    try:
        assert (await a.auth())["Error"] == ""
        ok = await a.request(1, {"Id": "ep_agents_own", "Proto": "http", "Opts": {}, "Extra": {}})
        big = await a.request(1, {"Id": "x" * 5000, "Proto": "http", "Opts": {}, "Extra": {}})
        assert ok["Error"] == "" and big["Error"] == "", (ok, big)
        assert ok["Id"] == "ep_agents_own" and big["Id"] == "x" * 5000  # the agent's Ids
        db = sqlite3.connect(f"file:{shared_edge.data_dir / 'burrow.db'}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT tunnel_id, url FROM ngrok_rebind_urls").fetchall()
        finally:
            db.close()
        assert ("ep_agents_own", ok["URL"]) in rows
        assert all(len(tid) <= 128 for tid, _ in rows)
    finally:
        a.w.close()


# ------------------------------------------------------------------------ pooling
class PoolingWireAgent(RawAgent):
    """ngrok's agent wire driven by hand, for what the Python SDK 1.4 cannot ask for:
    its ``forward``/builders have no ``pooling_enabled`` (it is dropped without a word),
    while ngrok-go and the newer SDKs send ``Extra.PoolingEnabled`` on Bind.  After its
    Auth and Bind this agent serves the Proxy streams the edge opens (type 3, an 8-byte
    little-endian header length, the JSON header, then the public connection's bytes)
    by piping them to a real upstream, as the SDK does."""

    upstream_port = 0

    async def bind_pooled(self, host: str) -> dict:
        assert (await self.auth())["Error"] == ""
        bound = await self.request(
            1,
            {
                "Id": "",
                "Proto": "http",
                "Opts": {"Hostname": host},
                "Extra": {"Token": "", "PoolingEnabled": True},
            },
        )
        self.queues: dict[int, asyncio.Queue] = {}
        self.tasks: set[asyncio.Task] = set()
        self.proxied = 0
        self.reader_task = asyncio.ensure_future(self._frames())
        return bound

    async def close(self) -> None:
        self.reader_task.cancel()
        for t in list(self.tasks):
            t.cancel()
        self.w.close()
        with contextlib.suppress(Exception):
            await self.w.wait_closed()

    async def _frames(self) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                ftype, flags, sid, length = m.parse_header(await self.r.readexactly(8))
                body = await self.r.readexactly(length) if length else b""
                if sid % 2 or ftype not in (m.DATA, m.RST):
                    continue  # our own (answered) request streams, window credits
                q = self.queues.get(sid)
                if q is None:
                    if not flags & m.SYN:
                        continue
                    q = self.queues[sid] = asyncio.Queue()
                    t = asyncio.ensure_future(self._serve(sid, q))
                    self.tasks.add(t)
                    t.add_done_callback(self.tasks.discard)
                if ftype == m.RST:
                    q.put_nowait(None)
                    continue
                if body:
                    q.put_nowait(body)
                if flags & m.FIN:
                    q.put_nowait(None)

    async def _serve(self, sid: int, q: asyncio.Queue) -> None:
        buf = b""
        while len(buf) < 12:
            chunk = await q.get()
            if chunk is None:
                return
            buf += chunk
        kind = struct.unpack(">I", buf[:4])[0]
        (n,) = struct.unpack("<q", buf[4:12])
        while len(buf) < 12 + n:
            chunk = await q.get()
            if chunk is None:
                return
            buf += chunk
        if kind != 3:  # only Proxy streams carry public connections
            self.send(m.RST, 0, sid, struct.pack(">I", m.STREAM_REFUSED))
            return
        json.loads(buf[12 : 12 + n])
        self.proxied += 1
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        uw.write(buf[12 + n :])

        async def to_upstream() -> None:
            while (chunk := await q.get()) is not None:
                uw.write(chunk)
            uw.write_eof()

        up = asyncio.ensure_future(to_upstream())
        try:
            while chunk := await ur.read(16 * 1024):
                self.send(m.DATA, 0, sid, chunk)
            self.send(m.DATA, m.FIN, sid)
        finally:
            up.cancel()
            uw.close()


async def _spread(edge: BurrowProc, host: str, n: int) -> list[int]:
    """``n`` requests to ``host``, each on its own public connection; their statuses."""
    statuses = []
    for i in range(n):
        raw = await _get(edge, host, f"/pooled{i}")
        statuses.append(int(raw.split(b" ", 2)[1]))
    return statuses


async def test_two_ngrok_agents_with_pooling_share_one_domain(shared_edge):
    edge = shared_edge
    host = "pool-wire.burrow.localhost"
    async with HTTPUpstream() as up1, HTTPUpstream() as up2:
        a = await PoolingWireAgent.connect(edge)
        b = await PoolingWireAgent.connect(edge)
        try:
            a.upstream_port, b.upstream_port = up1.port, up2.port
            ba, bb = await a.bind_pooled(host), await b.bind_pooled(host)
            assert ba["Error"] == "" and bb["Error"] == "", (ba, bb)
            assert ba["URL"] == bb["URL"] == f"http://{host}:{edge.http_addr[1]}"
            pooled = [e for e in await _endpoints(edge) if e["url"] == ba["URL"]]
            assert len(pooled) == 2 and all(e["pooling_enabled"] for e in pooled)
            assert await _spread(edge, host, 12) == [200] * 12
            assert a.proxied + b.proxied == 12
            assert len(up1.requests) + len(up2.requests) == 12
            assert len(up1.requests) >= 3 and len(up2.requests) >= 3  # round robin
        finally:
            await a.close()
            await b.close()


@needs_sdk
async def test_burrow_agent_and_ngrok_agent_pooled_on_one_url(shared_edge, tmp_path):
    edge = shared_edge
    host = "pool-mixed.burrow.localhost"
    async with HTTPUpstream() as up1, HTTPUpstream() as up2:
        burrow = start_agent(
            edge, "http", str(up1.port), "--url", f"http://{host}", "--pooling-enabled",
            home=tmp_path / "home",
        )
        wire = await PoolingWireAgent.connect(edge)
        try:
            wire.upstream_port = up2.port
            bound = await wire.bind_pooled(host)
            assert bound["Error"] == "", bound
            assert bound["URL"] == burrow.public_url
            assert await _spread(edge, host, 12) == [200] * 12
            assert len(up1.requests) + len(up2.requests) == 12
            assert len(up1.requests) >= 3 and len(up2.requests) >= 3
            assert wire.proxied == len(up2.requests)

            # the SDK asks for no pooling (1.4 cannot): its bind on the URL is refused
            sdk = await SDK.start(edge, f"127.0.0.1:{up2.port}", domain=host)
            try:
                assert not sdk.url and "ERR_NGROK_334" in sdk.error, sdk.error
            finally:
                await sdk.stop()

            # a burrow agent's endpoint is still not deleted through the API: burrow's
            # protocol has no per-endpoint stop (the ngrok agent's gets StopTunnel)
            eps = {e["id"]: e for e in await _endpoints(edge) if e["url"] == bound["URL"]}
            assert len(eps) == 2 and bound["Id"] in eps
            [ours] = [i for i in eps if i != bound["Id"]]
            async with httpx.AsyncClient(base_url=edge.ready["api_url"], headers=API_HEADERS) as c:
                r = await c.delete(f"/endpoints/{ours}")
                assert r.status_code == 400 and r.json()["error_code"] == "ERR_NGROK_215", r.text
            assert ours in [e["id"] for e in await _endpoints(edge)]
        finally:
            await wire.close()
            burrow.stop()



@needs_sdk
async def test_edge_stop_session_sends_an_ngrok_agent_its_stop_request(tmp_path):
    """``Edge.stop_session`` (burrow's own Stop message) reaches an ngrok agent as a
    Stop request stream (``NgrokSession.send``); an in-process edge, to call it."""
    from backend.edge.server import Edge

    edge = Edge(_edge_config(tmp_path / "edge"))
    await edge.start()
    try:
        sdk = await SessionSDK.start(_target(edge), "127.0.0.1:9")
        try:
            assert not sdk.error, sdk.error
            [s] = edge.registry.sessions.values()
            assert edge.stop_session(s.id)
            await sdk.event("stop_command")
            assert s.id not in edge.registry.sessions
            assert await asyncio.wait_for(sdk.proc.wait(), 10) == 0
            assert not edge.registry.sessions  # it did not come back
        finally:
            await sdk.stop()
    finally:
        await edge.stop()


@needs_sdk
async def test_another_accounts_agent_cannot_take_a_name_a_session_or_a_url(shared_edge):
    """Account B's SDK cannot bind account A's name; B's agent presenting A's ClientId
    and A's tunnel Id gets a session and a URL of its own, and A's stay online."""
    from pathlib import Path

    from backend.store import SQLiteStore

    with SQLiteStore(Path(shared_edge.ready["data_dir"]) / "burrow.db") as store:
        b = store.create_account("intruder")
        store.add_authtoken(b.id, "intruder-authtoken", description="test")
    name = "owned-by-a.burrow.localhost"
    a = await RawAgent.connect(shared_edge)
    intruder = await RawAgent.connect(shared_edge)
    try:
        auth_a = await a.auth()
        bind_a = await a.request(1, {"Id": "", "Proto": "http", "Opts": {"Hostname": name}, "Extra": {}})
        assert not bind_a["Error"], bind_a
        async with HTTPUpstream() as up:
            other = await SDK.start(
                shared_edge, f"127.0.0.1:{up.port}", authtoken="intruder-authtoken", domain=name
            )
            try:
                assert not other.url and "ERR_NGROK_320" in other.error, other.error
            finally:
                await other.stop()
        reply = await intruder.request(0, {
            "Version": ["3"], "ClientId": auth_a["ClientId"],
            "Extra": {"AuthToken": "intruder-authtoken"},
        })
        assert not reply["Error"], reply
        bind_b = await intruder.request(1, {"Id": bind_a["Id"], "Proto": "http", "Opts": {}, "Extra": {}})
        assert not bind_b["Error"] and bind_b["URL"] != bind_a["URL"], bind_b
        # A's session and endpoint are untouched: A's API key sees its one session, and
        # A's connection still takes requests (a replaced session would have been closed)
        assert len(await _sessions(shared_edge)) == 1
        again = await a.request(1, {"Id": "", "Proto": "http", "Opts": {}, "Extra": {}})
        assert not again["Error"], again
        assert bind_a["URL"] in await _endpoint_urls(shared_edge)
    finally:
        a.w.close()
        intruder.w.close()
