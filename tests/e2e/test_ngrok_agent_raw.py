"""ngrok's agent protocol driven by hand against a real edge: what the SDK never does
(goes silent, sends garbage), so the edge's answers can be checked."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import ssl
import struct

import httpx

from backend.edge import muxado as m
from tests.procs import BurrowProc

U32 = struct.Struct(">I")


class RawAgent:
    """A minimal muxado client over TLS: opens typed streams, reads their replies."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w
        self.next_id = 3
        self.inbox: dict[int, bytearray] = {}
        self.fins: set[int] = set()
        self.frames: list[tuple[int, int, int, bytes]] = []

    @classmethod
    async def connect(cls, edge: BurrowProc) -> RawAgent:
        ctx = ssl.create_default_context(cafile=edge.ready["ca_file"])
        host, port = edge.ready["ingress_addr"].rsplit(":", 1)
        r, w = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=host)
        return cls(r, w)

    def send(self, ftype: int, flags: int, sid: int, body: bytes = b"") -> None:
        self.w.write(m.header(ftype, flags, sid, len(body)) + body)

    def open(self, kind: int, payload: bytes = b"") -> int:
        sid, self.next_id = self.next_id, self.next_id + 2
        self.send(m.DATA, m.SYN, sid, U32.pack(kind) + payload)
        return sid

    async def pump(self, until, timeout: float = 5.0) -> None:
        async def run():
            while not until():
                ftype, flags, sid, length = m.parse_header(await self.r.readexactly(8))
                body = await self.r.readexactly(length) if length else b""
                self.frames.append((ftype, flags, sid, body))
                if ftype == m.DATA:
                    self.inbox.setdefault(sid, bytearray()).extend(body)
                    if flags & m.FIN:
                        self.fins.add(sid)

        await asyncio.wait_for(run(), timeout)

    async def request(self, kind: int, obj: dict) -> dict:
        sid = self.open(kind, json.dumps(obj).encode())
        await self.pump(lambda: sid in self.fins)
        return json.loads(bytes(self.inbox[sid]))

    async def auth(self, **extra) -> dict:
        return await self.request(
            0,
            {
                "Version": ["3", "2"],
                "ClientId": "",
                "Extra": {"AuthToken": "test-authtoken", **extra},
            },
        )


async def _endpoint_urls(edge: BurrowProc) -> list[str]:
    async with httpx.AsyncClient(
        base_url=edge.ready["api_url"],
        headers={"Authorization": "Bearer test-api-key", "Ngrok-Version": "2"},
    ) as c:
        return [e["url"] for e in (await c.get("/endpoints")).json()["endpoints"]]


async def test_silent_agent_goes_offline_after_heartbeat_interval_plus_tolerance(edge):
    a = await RawAgent.connect(edge)
    reply = await a.auth(
        HeartbeatInterval=1_000_000_000, HeartbeatTolerance=1_000_000_000
    )  # 1 s + 1 s
    assert reply["Error"] == "" and reply["ClientId"]
    bound = await a.request(1, {"Id": "", "Proto": "http", "Opts": {}, "Extra": {"Token": ""}})
    assert bound["Error"] == "" and bound["Extra"]["Token"] == ""
    assert bound["URL"] in await _endpoint_urls(edge)
    loop = asyncio.get_running_loop()
    start = loop.time()
    # silence: no heartbeat, no frame; the edge ends the session (GOAWAY, then close)
    await a.pump(lambda: any(f[0] == m.GOAWAY for f in a.frames), timeout=6)
    assert 1.5 < loop.time() - start < 4
    assert bound["URL"] not in await _endpoint_urls(edge)
    a.w.close()


async def test_heartbeats_are_echoed_and_keep_the_session(edge):
    a = await RawAgent.connect(edge)
    hb = a.open(0xFFFFFFFF, b"\x01\x02\x03\x04")
    await a.pump(lambda: len(a.inbox.get(hb, b"")) >= 4)
    assert bytes(a.inbox[hb]) == b"\x01\x02\x03\x04"
    assert (await a.auth(HeartbeatInterval=500_000_000, HeartbeatTolerance=1_500_000_000))[
        "Error"
    ] == ""
    for i in range(6):  # 3 s of beats every 0.5 s: longer than the 2 s limit
        a.send(m.DATA, 0, hb, bytes([i] * 4))
        await a.pump(lambda n=8 + 4 * i: len(a.inbox[hb]) >= n)
        await asyncio.sleep(0.5)
    assert not any(f[0] == m.GOAWAY for f in a.frames)
    a.w.close()


async def test_fuzzed_frames_cost_only_their_session(edge):
    """Bounded fuzz: random, truncated and unknown frames after a valid Auth; the edge
    answers with RST/GOAWAY or closes, and a fresh agent still authenticates."""
    rng = random.Random(15)
    for _ in range(20):
        a = await RawAgent.connect(edge)
        await a.auth()
        for _ in range(rng.randrange(1, 8)):
            kind = rng.random()
            if kind < 0.3:  # random header and body
                a.w.write(rng.randbytes(8) + rng.randbytes(rng.randrange(0, 64)))
            elif kind < 0.5:  # unknown type
                a.send(rng.randrange(4, 16), 0, rng.randrange(0, 100), rng.randbytes(4))
            elif kind < 0.7:  # a window overrun on a new stream
                sid = a.next_id
                a.next_id += 2
                a.send(m.DATA, m.SYN, sid, U32.pack(99))
                for _ in range(5):
                    a.send(m.DATA, 0, sid, b"x" * 65536)
            else:  # truncated: a header announcing more than follows
                a.w.write(m.header(m.DATA, 0, 3, 1000) + b"short")
        a.w.close()
    b = await RawAgent.connect(edge)
    assert (await b.auth())["Error"] == ""
    bound = await b.request(1, {"Id": "", "Proto": "http", "Opts": {}, "Extra": {"Token": ""}})
    assert bound["Error"] == ""
    b.w.close()


async def test_burrow_control_message_whose_length_looks_like_a_muxado_header(edge):
    """A burrow Auth whose length ends in 0x12 starts as a muxado DATA|SYN header does:
    its fifth byte ("{") still marks it as burrow's, and it is answered at once."""
    from backend import protocol as p

    pad = 0
    while True:
        frame = p.encode(
            p.Auth(authtoken="test-authtoken", client_id="lookalike", metadata="m" * pad)
        )
        if frame[3] == 0x12:
            break
        pad += 1
    ctx = ssl.create_default_context(cafile=edge.ready["ca_file"])
    host, port = edge.ready["ingress_addr"].rsplit(":", 1)
    r, w = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=host)
    w.write(frame)
    reply = await asyncio.wait_for(p.read_msg(r), 5)
    assert isinstance(reply, p.AuthOk)
    w.close()


async def test_a_client_that_resets_mid_body_ends_the_relay_while_the_agent_is_silent(edge):
    """A large answer leaves the agent's stream for the client as its frames arrive
    (muxado ``_Reader.relay_to``).  The client resets its connection after the first
    bytes while the agent sends nothing more: the edge ends the relay anyway (the
    stream gets FIN or RST), and later bytes on that stream are answered with RST."""
    a = await RawAgent.connect(edge)
    assert (await a.auth())["Error"] == ""
    bound = await a.request(1, {"Id": "", "Proto": "http", "Opts": {}, "Extra": {"Token": ""}})
    host = bound["URL"].split("://", 1)[1].split(":", 1)[0]
    r, w = await asyncio.open_connection(*edge.http_addr)
    w.write(f"GET /big HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await w.drain()
    await a.pump(lambda: any(s % 2 == 0 and b"\r\n\r\n" in a.inbox[s] for s in a.inbox))
    sid = next(s for s in a.inbox if s % 2 == 0)
    a.send(m.DATA, 0, sid, b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n" + b"x" * 100_000)
    await asyncio.wait_for(r.readexactly(100_000), 5)
    w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.close()

    def ended() -> bool:
        return any(f[2] == sid and (f[0] == m.RST or (f[0] == m.DATA and f[1] & m.FIN)) for f in a.frames)

    await a.pump(ended, timeout=5)
    a.send(m.DATA, 0, sid, b"y" * 1000)
    await a.pump(lambda: any(f[0] == m.RST and f[2] == sid for f in a.frames), timeout=5)
    # the session goes on: a new request is proxied on a new stream
    r2, w2 = await asyncio.open_connection(*edge.http_addr)
    w2.write(f"GET /small HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await a.pump(lambda: any(s % 2 == 0 and s > sid and b"\r\n\r\n" in a.inbox[s] for s in a.inbox))
    sid2 = max(s for s in a.inbox if s % 2 == 0)
    a.send(m.DATA, m.FIN, sid2, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    assert (await asyncio.wait_for(r2.read(), 5)).endswith(b"\r\n\r\nok")
    w2.close()
    a.w.close()
