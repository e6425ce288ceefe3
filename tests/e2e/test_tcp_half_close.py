"""A TCP client's half-close must reach the upstream without losing the reply.

Request/response protocols over a tcp endpoint often send their request, shut down
their writing side (``nc -N``, ``shutdown(SHUT_WR)``) and then read the answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable, Iterator

import pytest

from tests.upstreams import TCPEcho


@pytest.mark.parametrize(
    "flags",
    [
        # TLS data connections (forced here; the default for a remote edge) half-close
        # with close_notify (TLS 1.3, see backend/tlshalf.py)
        pytest.param(("--data-tls",), id="tls-data"),
        pytest.param((), id="default-loopback-plain"),
        pytest.param(("--no-data-tls",), id="plain-data"),
    ],
)
async def test_reply_after_client_half_close_comes_back(edge, agents, flags) -> None:
    async with TCPEcho() as up:
        a = agents("tcp", up.port, *flags)
        port = int(a.public_url.rsplit(":", 1)[1])
        payload = os.urandom(256 * 1024)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            w.write(payload)
            w.write_eof()  # nothing more to send; the echo is still on its way back
            got = await asyncio.wait_for(r.read(), 10)
        finally:
            w.close()
        assert len(got) == len(payload)
        assert got == payload


def _chunks(data: bytes | Callable[[], Iterator[bytes]]) -> Iterator[bytes]:
    if callable(data):
        yield from data()
        return
    view = memoryview(data)
    for i in range(0, len(view), 1 << 20):
        yield view[i : i + (1 << 20)]


def generated(mib: int) -> Callable[[], Iterator[bytes]]:
    """``mib`` MiB of incompressible bytes, made as they are sent: one random MiB with
    each block's number written over its start (no two blocks alike)."""
    base = os.urandom(1 << 20)

    def blocks() -> Iterator[bytes]:
        for i in range(mib):
            yield i.to_bytes(8, "big") + base[8:]

    return blocks


def digest_of(blocks: Callable[[], Iterator[bytes]]) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    for b in blocks():
        h.update(b)
        n += len(b)
    return n, h.hexdigest()


class HalfCloseUpstream:
    """An upstream that sends ``greeting`` and half-closes at once, while it reads what
    the client sends until EOF; ``received`` resolves to (byte count, sha256)."""

    def __init__(self, greeting: bytes | Callable[[], Iterator[bytes]]) -> None:
        # bytes, or a factory of the chunks to send (a GiB need not sit in memory)
        self.greeting = greeting
        self.port = 0
        self.received: asyncio.Future[tuple[int, str]] | None = None
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> HalfCloseUpstream:
        self.received = asyncio.get_running_loop().create_future()

        async def conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            async def send() -> None:
                for chunk in _chunks(self.greeting):
                    w.write(chunk)
                    await w.drain()
                w.write_eof()

            sender = asyncio.ensure_future(send())
            h, n = hashlib.sha256(), 0
            try:
                while chunk := await r.read(1 << 20):
                    h.update(chunk)
                    n += len(chunk)
                await sender
                if not self.received.done():
                    self.received.set_result((n, h.hexdigest()))
            except (ConnectionError, OSError) as exc:
                if not self.received.done():
                    self.received.set_exception(exc)
            finally:
                sender.cancel()
                w.close()

        self._server = await asyncio.start_server(conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()


@pytest.mark.parametrize("flags", [("--data-tls",), ("--no-data-tls",)], ids=["tls-data", "plain-data"])
async def test_client_sends_after_upstream_half_close(edge, agents, flags) -> None:
    """The reverse direction: the upstream says its piece and half-closes first; the
    client reads it to EOF and only then sends its own, which must reach the upstream."""
    greeting = os.urandom(256 * 1024)
    async with HalfCloseUpstream(greeting) as up:
        a = agents("tcp", up.port, *flags)
        port = int(a.public_url.rsplit(":", 1)[1])
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            got = await asyncio.wait_for(r.read(), 10)  # EOF: the upstream half-closed
            assert got == greeting
            payload = os.urandom(256 * 1024)
            w.write(payload)
            await w.drain()
            w.write_eof()
            n, digest = await asyncio.wait_for(up.received, 10)
        finally:
            w.close()
        assert (n, digest) == (len(payload), hashlib.sha256(payload).hexdigest())


async def test_large_transfer_both_ways_with_half_close_over_tls_data(edge, agents) -> None:
    """1 GiB each way at once through a --data-tls tunnel, each side half-closing when
    it has sent its part while the other direction is still flowing; both arrive whole
    and in order (hashed)."""
    mib = 1024
    down, up_blocks = generated(mib), generated(mib)
    async with HalfCloseUpstream(down) as up:
        a = agents("tcp", up.port, "--data-tls")
        port = int(a.public_url.rsplit(":", 1)[1])
        r, w = await asyncio.open_connection("127.0.0.1", port)

        async def send() -> None:
            for chunk in up_blocks():
                w.write(chunk)
                await w.drain()
            w.write_eof()

        async def receive() -> tuple[int, str]:
            h, n = hashlib.sha256(), 0
            while chunk := await r.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
            return n, h.hexdigest()

        try:
            _, got = await asyncio.wait_for(asyncio.gather(send(), receive()), 100)
            sent = await asyncio.wait_for(up.received, 10)
        finally:
            w.close()
    assert got == digest_of(down) and got[0] == mib << 20
    assert sent == digest_of(up_blocks)


async def test_100_mb_http_bodies_both_ways_over_tls_data(edge, agents) -> None:
    """A 100 MB request body to an upstream that answers it back (a 100 MB response)
    through a --data-tls http tunnel: both directions whole (hashed)."""
    import httpx

    from tests.procs import host_of
    from tests.upstreams import HTTPUpstream

    blocks = generated(100)
    async with HTTPUpstream() as up:
        a = agents("http", up.port, "--data-tls")

        async def body():
            for b in blocks():
                yield b

        h, n = hashlib.sha256(), 0
        async with httpx.AsyncClient(timeout=60) as c, c.stream(
            "POST", f"http://127.0.0.1:{edge.http_addr[1]}/echo", content=body(),
            headers={"Host": host_of(a.public_url), "Content-Length": str(100 << 20)},
        ) as resp:
            assert resp.status_code == 200
            async for chunk in resp.aiter_raw():
                h.update(chunk)
                n += len(chunk)
        expected = digest_of(blocks)
        assert resp.headers["x-body-sha256"] == expected[1]  # what the upstream received
        assert (n, h.hexdigest()) == expected  # what came back
        up.requests.clear()
