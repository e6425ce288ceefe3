"""Hostile or broken input on the edge's agent ingress port.

A real edge and agent run as processes; a real upstream serves the tunnel.  Each test
opens its own raw connections to ``ingress_addr`` and misbehaves.  The edge must close
each bad connection promptly, keep serving the tunnel through its public HTTP
listener (on fresh and on already-open keep-alive connections), keep the agent's
session, and stay alive without logging an unhandled exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import struct
import time
from dataclasses import dataclass

import pytest

from backend import protocol as p
from tests.procs import BurrowProc, host_of
from tests.upstreams import HTTPUpstream, raw_exchange

CLOSE_WITHIN = 5.0  # seconds a bad connection may stay open after its bad input
TEN_MB = 10 * 1024 * 1024


@dataclass
class Conn:
    r: asyncio.StreamReader
    w: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.w.write(data)
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(self.w.drain(), CLOSE_WITHIN)

    async def closed_by_peer(self, timeout: float = CLOSE_WITHIN) -> bytes:
        """Read until the edge closes (EOF or reset); return what it sent before that.

        Fails if the connection is still open after ``timeout`` seconds, or if the edge
        sends more than a few kilobytes (it has nothing to say to a bad connection).
        """
        got = bytearray()
        deadline = time.monotonic() + timeout
        while len(got) < 64 * 1024:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"connection still open {timeout}s after bad input; got {bytes(got)!r}")
            try:
                chunk = await asyncio.wait_for(self.r.read(4096), left)
            except TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError, OSError):
                return bytes(got)
            if not chunk:
                return bytes(got)
            got += chunk
        pytest.fail(f"the edge kept sending to a bad connection: {bytes(got[:200])!r}")

    def close(self) -> None:
        self.w.transport.abort()


@dataclass
class Online:
    """An edge with one agent and one http tunnel online, serving HTTPUpstream."""

    edge: BurrowProc
    agent: BurrowProc
    upstream: HTTPUpstream
    host: str
    session_id: str
    keep: Conn | None = None  # a keep-alive public connection opened before the attack

    @property
    def ingress(self) -> tuple[str, int]:
        host, port = self.edge.ready["ingress_addr"].rsplit(":", 1)
        return host, int(port)

    async def plain(self) -> Conn:
        r, w = await asyncio.wait_for(asyncio.open_connection(*self.ingress), 5)
        return Conn(r, w)

    async def tls(self) -> Conn:
        ctx = ssl.create_default_context(cafile=self.edge.ready["ca_file"])
        r, w = await asyncio.wait_for(
            asyncio.open_connection(*self.ingress, ssl=ctx, server_hostname="127.0.0.1"), 5
        )
        return Conn(r, w)

    async def connect(self, transport: str) -> Conn:
        return await (self.tls() if transport == "tls" else self.plain())

    async def serving(self, path: str) -> None:
        """A fresh public connection and the long-lived keep-alive one both get answers."""
        req = f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n"
        raw = await raw_exchange(*self.edge.http_addr, req.encode())
        assert raw.startswith(b"HTTP/1.1 200 "), raw[:300]
        assert raw.endswith(f"GET {path}\n".encode()), raw[-300:]
        if self.keep is None:
            r, w = await asyncio.wait_for(asyncio.open_connection(*self.edge.http_addr), 5)
            self.keep = Conn(r, w)
        keep_path = path + "-keepalive"
        self.keep.w.write(f"GET {keep_path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await asyncio.wait_for(self.keep.r.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 "), head
        body = f"GET {keep_path}\n".encode()
        assert await asyncio.wait_for(self.keep.r.readexactly(len(body)), 10) == body

    async def still_fine(self, path: str = "/after") -> None:
        await self.serving(path)
        assert self.edge.proc.poll() is None, "the edge process died"
        assert self.agent.proc.poll() is None, "the agent process died"
        # the agent kept its session: no reconnect happened
        with pytest.raises(TimeoutError):
            self.agent.wait_event("disconnected", 0.2)
        await asyncio.sleep(0.2)  # let the edge write any late log line
        err = self.edge.stderr
        assert "Traceback" not in err and "exception" not in err.lower(), err[-3000:]


@pytest.fixture
async def online(edge, agents):
    async with HTTPUpstream() as up:
        a = agents("http", up.port)
        o = Online(edge, a, up, host_of(a.public_url), a.ready["session_id"])
        assert o.session_id.startswith("ts_")
        await o.serving("/before")
        try:
            yield o
        finally:
            if o.keep is not None:
                o.keep.close()


def frame(msg: p._Msg) -> bytes:
    return p.encode(msg)


def frames_in(data: bytes) -> list[p.Message]:
    out = []
    while len(data) >= 4:
        (n,) = struct.unpack(">I", data[:4])
        out.append(p.decode(data[4 : 4 + n]))
        data = data[4 + n :]
    assert data == b"", f"trailing partial frame {data!r}"
    return out


# -------------------------------------------------------------------- (a) plain garbage
PLAIN_GARBAGE = {
    "http-request": b"GET / HTTP/1.1\r\nHost: ingress\r\n\r\n",
    "ff-bytes": b"\xff" * 64,
    "bad-json-frame": b"\x00\x00\x00\x05hello",
    "json-not-a-message": struct.pack(">I", 2) + b"{}",
    "ping-first": frame(p.Ping(id=1)),
    "auth-without-tls": frame(p.Auth(authtoken="test-authtoken", client_id="plain")),
}


@pytest.mark.parametrize("payload", PLAIN_GARBAGE.values(), ids=PLAIN_GARBAGE.keys())
async def test_plain_tcp_garbage_is_closed(online: Online, payload: bytes) -> None:
    c = await online.plain()
    await c.send(payload)
    assert await c.closed_by_peer() == b""
    c.close()
    await online.still_fine()


# ------------------------------------------------------------------- (b) TLS + garbage
@pytest.mark.parametrize(
    "payload",
    [b"\xff" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00\x00\x00\x03abc"],
    ids=["ff-bytes", "http-request", "bad-json-frame"],
)
async def test_tls_handshake_then_garbage_is_closed(online: Online, payload: bytes) -> None:
    c = await online.tls()
    await c.send(payload)
    assert await c.closed_by_peer() == b""
    c.close()
    await online.still_fine()


async def test_fake_tls_record_is_closed(online: Online) -> None:
    # 0x16 makes the edge expect a TLS ClientHello; what follows is not one.
    c = await online.plain()
    await c.send(b"\x16\x03\x01\x00\x10" + b"not a client hello" * 4)
    await c.closed_by_peer()  # the edge may send a TLS alert before closing
    c.close()
    await online.still_fine()


# ---------------------------------------------------------------- (c) a 16 MB frame header
@pytest.mark.parametrize("transport", ["plain", "tls"])
async def test_16mb_frame_header_is_closed(online: Online, transport: str) -> None:
    c = await online.connect(transport)
    await c.send(struct.pack(">I", 16 * 1024 * 1024) + b"{" * 1000)
    assert await c.closed_by_peer() == b""
    c.close()
    await online.still_fine()


# ------------------------------------------------------------ (d) data hello, wrong key
@pytest.mark.parametrize("transport", ["plain", "tls"])
async def test_data_hello_with_wrong_key_is_closed(online: Online, transport: str) -> None:
    c = await online.connect(transport)
    await c.send(frame(p.DataHello(session_id=online.session_id, key="not-the-session-key")))
    assert await c.closed_by_peer() == b""
    c.close()
    # More requests than the agent's pool holds: every one takes a pooled data
    # connection, so the pool and its top-ups must be intact after the bad hello.
    for i in range(8):
        await online.serving(f"/after-{i}")
    await online.still_fine()


@pytest.mark.parametrize(
    "session_id, key",
    [("ts_2NoSuchSessionxxxxxxxxxxxxx", "whatever"), ("", ""), ("x" * 10_000, "k" * 10_000)],
    ids=["unknown-session", "empty", "huge-fields"],
)
async def test_data_hello_for_unknown_session_is_closed(online: Online, session_id, key) -> None:
    c = await online.tls()
    await c.send(frame(p.DataHello(session_id=session_id, key=key)))
    assert await c.closed_by_peer() == b""
    c.close()
    await online.still_fine()


# ----------------------------------------------------------------- (e) bad authtoken
async def test_bad_authtoken_gets_err_ngrok_107_then_close(online: Online) -> None:
    c = await online.tls()
    await c.send(frame(p.Auth(authtoken="wrong-token", client_id="intruder", version="0")))
    got = await c.closed_by_peer()
    c.close()
    msgs = frames_in(got)
    assert len(msgs) == 1, msgs
    err = msgs[0]
    assert isinstance(err, p.Error)
    assert err.code == "ERR_NGROK_107"
    assert err.req_id == 0
    assert "authtoken" in err.msg
    assert online.edge.wait_event("auth_failed", 5)["ip"] == "127.0.0.1"
    await online.still_fine()


# -------------------------------------------------- (f) a control connection misbehaving
CONTROL_BAD = {
    "oversize-frame": (struct.pack(">I", TEN_MB) + b"{" * 1000, "exceeds"),
    "bad-json": (b"\x00\x00\x00\x04nope", "invalid message"),
    "data-hello-on-control": (frame(p.DataHello(session_id="ts_x", key="k")), "unexpected"),
}


@pytest.mark.parametrize("bad, reason", CONTROL_BAD.values(), ids=CONTROL_BAD.keys())
async def test_control_connection_breaking_protocol_after_auth_is_closed(
    online: Online, bad: bytes, reason: str
) -> None:
    c = await online.tls()
    await c.send(
        frame(p.Auth(authtoken="test-authtoken", client_id="rogue-" + os.urandom(4).hex()))
    )
    first = await asyncio.wait_for(p.read_msg(c.r), 5)
    assert isinstance(first, p.AuthOk)
    assert first.session_id != online.session_id
    await c.send(bad)
    rest = frames_in(await c.closed_by_peer())
    assert all(isinstance(m, p.Ping | p.Pong) for m in rest), rest
    c.close()
    ended = online.edge.wait_event("session_ended", 5)
    assert ended["session_id"] == first.session_id
    assert reason in ended["reason"]
    await online.still_fine()


# ------------------------------------------------------------- many at once, all kinds
async def test_a_burst_of_bad_connections(online: Online) -> None:
    payloads = [
        ("plain", b"\xff" * 16),
        ("plain", struct.pack(">I", 16 * 1024 * 1024)),
        ("tls", b"GET / HTTP/1.1\r\n\r\n"),
        ("tls", frame(p.DataHello(session_id=online.session_id, key="bad"))),
        ("tls", frame(p.Auth(authtoken="wrong", client_id="burst"))),
    ]

    async def one(i: int) -> None:
        transport, data = payloads[i % len(payloads)]
        c = await online.connect(transport)
        try:
            await c.send(data)
            await c.closed_by_peer(10)
        finally:
            c.close()

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(100))), 30)
    await online.still_fine()
