"""Raw relays over TLS data connections in threads (backend/tlsrelay.py): bytes intact
both ways with half-close, and the threads and sockets gone after every way a relay
can end (EOF both ways, an abrupt close, a peer that never reads, a close from outside)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from backend import relay, tlshalf, tlsrelay
from backend.tls import LocalCA, client_context

HOST = "abc.burrow.localhost"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA.load_or_create(tmp_path_factory.mktemp("ca") / "data")


def relay_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tls-relay")]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def no_relay_threads() -> None:
    """No relay thread at work (idle ones wait for the next relay, at most MAX_IDLE)."""
    for _ in range(200):  # bounded: 10 s
        if not tlsrelay.busy():
            assert len(relay_threads()) <= tlsrelay.MAX_IDLE
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"relay threads still busy: {tlsrelay.busy()}")


@asynccontextmanager
async def relayed(ca: LocalCA, stall_timeout: float | None = None) -> AsyncIterator[tuple]:
    """A tlshalf client (cr, cw) whose server side is relayed to a plain socket whose
    far end ``peer`` (non-blocking) the test drives; yields (cr, cw, peer, relay task)."""
    loop = asyncio.get_running_loop()
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)
    port = lsock.getsockname()[1]
    ctx = tlshalf.data_context(client_context(ca.ca_file))
    try:
        accepted = asyncio.ensure_future(loop.sock_accept(lsock))
        client = asyncio.ensure_future(tlshalf.open_connection("127.0.0.1", port, ctx, HOST, 2**16))
        sock, _ = await asyncio.wait_for(accepted, 5)
        sr, sw = await tlshalf.accept(sock, ca.server_context([HOST]), 2**16, 5)
        cr, cw = await asyncio.wait_for(client, 5)
        accepted = asyncio.ensure_future(loop.sock_accept(lsock))
        pr, pw = await asyncio.open_connection("127.0.0.1", port)
        peer, _ = await asyncio.wait_for(accepted, 5)
        task = asyncio.ensure_future(relay.relay(sr, sw, pr, pw, stall_timeout))
        try:
            yield cr, cw, peer, task
        finally:
            task.cancel()
            cw.close()
            peer.close()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        lsock.close()


async def recv_all(peer: socket.socket, limit: int = 1 << 30) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < limit and (chunk := await asyncio.wait_for(loop.sock_recv(peer, 1 << 20), 10)):
        out += chunk
    return bytes(out)


async def threads_busy(n: int, timeout: float = 5.0) -> bool:
    """Whether ``n`` relay threads are at work within ``timeout`` (bounded poll)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while tlsrelay.busy() != n:
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_bytes_intact_both_ways_with_half_close_in_threads(ca: LocalCA) -> None:
    up, down = os.urandom(8 << 20), os.urandom(8 << 20)
    loop = asyncio.get_running_loop()
    fds = open_fds()
    async with relayed(ca) as (cr, cw, peer, task):
        cw.write(b"hello")
        await cw.drain()
        assert await asyncio.wait_for(loop.sock_recv(peer, 5), 5) == b"hello"
        # the relay left the event loop: both threads at work (the second may start a
        # moment after the first has carried the hello)
        assert await threads_busy(2)

        async def send_up() -> None:
            cw.write(up)
            await cw.drain()
            cw.write_eof()  # close_notify: the peer sees EOF, the client keeps reading

        async def send_down() -> None:
            got = await recv_all(peer)  # until the client's half-close arrives as a FIN
            assert hashlib.sha256(got).digest() == hashlib.sha256(up).digest()
            await loop.sock_sendall(peer, down)  # after the client's EOF: still delivered
            peer.shutdown(socket.SHUT_WR)

        async def read_down() -> bytes:
            return await cr.read()

        _, _, got = await asyncio.wait_for(asyncio.gather(send_up(), send_down(), read_down()), 30)
        assert hashlib.sha256(got).digest() == hashlib.sha256(down).digest()
        assert await asyncio.wait_for(task, 10) == (5 + len(up), len(down))
    await no_relay_threads()
    assert open_fds() <= fds


async def test_an_abrupt_close_ends_the_relay_and_its_threads(ca: LocalCA) -> None:
    loop = asyncio.get_running_loop()
    async with relayed(ca) as (_cr, cw, peer, task):
        cw.write(b"x" * 100_000)
        await cw.drain()
        assert len(await recv_all(peer, 100_000)) == 100_000
        sock = cw.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        cw.transport.abort()  # an RST on the TLS side in mid-stream
        assert await asyncio.wait_for(task, 10) == (100_000, 0)
        with pytest.raises(OSError):  # the relay reset the plain side too
            for _ in range(100):
                if not await asyncio.wait_for(loop.sock_recv(peer, 1 << 16), 5):
                    raise ConnectionResetError("EOF")
    await no_relay_threads()


async def test_a_peer_that_never_reads_is_given_up_after_the_stall_timeout(ca: LocalCA) -> None:
    async with relayed(ca, stall_timeout=0.5) as (_cr, cw, peer, task):
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        t0 = time.monotonic()
        for _ in range(64):  # far more than the socket buffers hold
            if cw.is_closing():
                break
            cw.write(b"y" * (1 << 20))
            await asyncio.sleep(0)
        await asyncio.wait_for(task, 15)
        assert time.monotonic() - t0 < 15
    await no_relay_threads()


async def test_closing_a_relayed_writer_ends_the_relay_without_cancelling_it(ca: LocalCA) -> None:
    async with relayed(ca) as (cr, cw, peer, task):
        cw.write(b"ping")
        await cw.drain()
        assert await asyncio.wait_for(asyncio.get_running_loop().sock_recv(peer, 4), 5) == b"ping"
        assert await threads_busy(2)
        writers = list(tlsrelay.splice._running)
        assert len(writers) == 2
        relay.close(writers[0])  # what a session shutting down does to its data connections
        assert await asyncio.wait_for(task, 10) == (4, 0)  # returned, not cancelled
        assert await asyncio.wait_for(cr.read(), 5) == b""
    await no_relay_threads()


async def test_no_threads_or_descriptors_left_after_many_relays(ca: LocalCA) -> None:
    loop = asyncio.get_running_loop()
    fds = open_fds()
    for i in range(20):
        async with relayed(ca) as (cr, cw, peer, task):
            msg = b"%d" % i
            cw.write(msg)
            cw.write_eof()
            assert await recv_all(peer) == msg
            await loop.sock_sendall(peer, msg[::-1])
            peer.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(cr.read(), 5) == msg[::-1]
            await asyncio.wait_for(task, 5)
    await no_relay_threads()
    assert open_fds() <= fds


async def test_idle_relay_threads_are_reused_then_end(ca: LocalCA, monkeypatch) -> None:
    monkeypatch.setattr(tlsrelay, "IDLE_SECONDS", 0.3)
    for _ in range(3):
        async with relayed(ca) as (cr, cw, peer, task):
            cw.write(b"x")
            cw.write_eof()
            assert await recv_all(peer) == b"x"
            peer.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(cr.read(), 5) == b""
            await asyncio.wait_for(task, 5)
        await no_relay_threads()
        assert len(relay_threads()) <= 2  # the same two threads each time
    for _ in range(100):  # bounded: 5 s
        if not relay_threads():
            break
        await asyncio.sleep(0.05)
    assert not relay_threads()


async def test_beyond_the_thread_limit_relays_stay_on_the_event_loop(ca: LocalCA, monkeypatch) -> None:
    monkeypatch.setattr(tlsrelay, "MAX_THREADED", 0)
    async with relayed(ca) as (cr, cw, peer, task):
        cw.write(b"on the loop")
        cw.write_eof()
        assert await recv_all(peer) == b"on the loop"
        assert not tlsrelay.busy()
        peer.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(cr.read(), 5) == b""
        await asyncio.wait_for(task, 5)


def test_tls12_connections_are_not_taken_into_threads(ca: LocalCA, tmp_path: Path) -> None:
    """Below TLS 1.3 nothing half-closes: such relays stay on the loop's stream relay."""

    async def main() -> None:
        ctx = tlshalf.data_context(client_context(ca.ca_file))
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        loop = asyncio.get_running_loop()
        accepted = asyncio.ensure_future(loop.sock_accept(lsock))
        client = asyncio.ensure_future(
            tlshalf.open_connection("127.0.0.1", lsock.getsockname()[1], ctx, HOST, 2**16)
        )
        sock, _ = await asyncio.wait_for(accepted, 5)
        _sr, sw = await tlshalf.accept(sock, ca.server_context([HOST]), 2**16, 5)
        _cr, cw = await asyncio.wait_for(client, 5)
        assert not tlsrelay.available(sw)
        cw.close()
        sw.close()
        lsock.close()

    asyncio.run(main())
