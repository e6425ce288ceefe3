"""Bodies handed straight from a connection to a writer (backend/direct.py, used by
``http1.relay_body`` for Content-Length bodies of 64 KiB and more).

Each test runs on uvloop, as the edge and the agent do (``uvloop.run``): uvloop's
transports keep what they are given until it is sent, which is what makes a view of
a reused TLS buffer dangerous.  Real sockets on 127.0.0.1; the TLS source is a
``tlshalf`` connection, as a TLS data connection is.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from contextlib import asynccontextmanager

import pytest
import uvloop

from backend import direct, http1, tlshalf
from backend.tls import LocalCA, client_context

HOST = "abc.burrow.localhost"
HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA.load_or_create(tmp_path_factory.mktemp("ca") / "data")


@pytest.fixture
def used(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths of the bodies that went through direct.body (so a test knows it
    tested that path, not the StreamReader loop)."""
    calls: list[int] = []
    real = direct.body

    async def counting(reader, writer, n, *args):
        calls.append(n)
        return await real(reader, writer, n, *args)

    monkeypatch.setattr(direct, "body", counting)
    return calls


_KEEP: list = []  # the source's own writers: a StreamWriter collected closes its connection


async def _pair(tls_ca: LocalCA | None):
    """(source reader, source's far-end writer): a tlshalf connection when ``tls_ca``,
    else plain TCP."""
    loop = asyncio.get_running_loop()
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)
    port = lsock.getsockname()[1]
    try:
        accepted = asyncio.ensure_future(loop.sock_accept(lsock))
        if tls_ca is None:
            _far_r, far_w = await asyncio.open_connection("127.0.0.1", port)
            sock, _ = await asyncio.wait_for(accepted, 5)
            r, w = await asyncio.open_connection(sock=sock)
            _KEEP.append(w)
            return r, far_w
        ctx = tlshalf.data_context(client_context(tls_ca.ca_file))
        client = asyncio.ensure_future(tlshalf.open_connection("127.0.0.1", port, ctx, HOST, 2**16))
        sock, _ = await asyncio.wait_for(accepted, 5)
        r, w = await tlshalf.accept(sock, tls_ca.server_context([HOST]), 2**16, 5)
        _KEEP.append(w)
        _far_r, far_w = await asyncio.wait_for(client, 5)
        return r, far_w
    finally:
        lsock.close()


async def _sink() -> tuple[asyncio.StreamWriter, socket.socket]:
    """A writer to a plain TCP connection whose far end (a blocking socket with a small
    receive buffer) the test reads, or not."""
    lsock = socket.create_server(("127.0.0.1", 0))
    try:
        far = socket.socket()
        far.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        far.setblocking(False)
        with pytest.raises(BlockingIOError):
            far.connect(lsock.getsockname())
        loop = asyncio.get_running_loop()
        sock, _ = await asyncio.wait_for(loop.sock_accept(lsock), 5)
        far.setblocking(True)
        _r, w = await asyncio.open_connection(sock=sock)
        return w, far
    finally:
        lsock.close()


async def _read_n(far: socket.socket, n: int) -> bytes:
    return await asyncio.to_thread(_recv_n, far, n)


def _recv_n(far: socket.socket, n: int) -> bytes:
    far.settimeout(30)
    got = bytearray()
    while len(got) < n:
        chunk = far.recv(min(1 << 20, n - len(got)))
        if not chunk:
            break
        got += chunk
    return bytes(got)


def _run(main) -> None:
    """Run a test's body on uvloop, bounded (a hang in uvloop's loop is out of
    pytest-timeout's reach)."""
    try:
        uvloop.run(asyncio.wait_for(main(), 60))
    finally:
        _KEEP.clear()


@asynccontextmanager
async def _relay(length: int, ca: LocalCA | None = None, prefix: bytes = b"", before: bytes = b""):
    """``relay_body`` of a ``length``-byte body from a source connection (TLS when
    ``ca``; ``before`` already sent on it) to a sink.  Yields (the source's far-end
    writer, the sink's far-end socket, the source's reader, the relay task)."""
    src, far_w = await _pair(ca)
    sink, far = await _sink()
    if before:
        far_w.write(before)  # in the source's reader before the relay starts
        await asyncio.sleep(0.1)
    head = http1.parse_response_head(HEAD % length, "GET")
    task = asyncio.ensure_future(http1.relay_body(src, sink, head, prefix=prefix))
    try:
        yield far_w, far, src, sink, task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        far.close()
        sink.close()
        far_w.close()


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_a_body_reaches_a_slow_reader_intact(ca: LocalCA, used: list[int], tls: bool) -> None:
    """16 MiB from a TLS connection (decrypted into one reused buffer) or a plain one to
    a client that starts reading only after 0.5 s, so its transport holds much of the
    body: every byte arrives as sent, and the bytes after the body (sent with its end)
    stay in the source's reader."""
    body = os.urandom(16 << 20)

    async def main() -> None:
        async with _relay(len(body), ca if tls else None, b"HEAD", body[: 1 << 20]) as (far_w, far, src, _, relaying):

            async def rest() -> None:
                for i in range(1 << 20, len(body), 1 << 20):
                    piece = body[i : i + (1 << 20)]
                    if i + len(piece) == len(body):
                        piece += b"NEXT"  # the next message, not this body's, in the same read
                    far_w.write(piece)
                    await far_w.drain()

            sending = asyncio.ensure_future(rest())
            await asyncio.sleep(0.5)  # nobody reads yet
            got = await _read_n(far, 4 + len(body))
            assert await asyncio.wait_for(relaying, 10) == len(body)
            await sending
            assert got[:4] == b"HEAD"
            assert hashlib.sha256(got[4:]).hexdigest() == hashlib.sha256(body).hexdigest()
            assert await asyncio.wait_for(src.readexactly(4), 5) == b"NEXT"

    _run(main)
    assert used == [len(body) - (1 << 20)] or used == [len(body)]


def test_a_source_that_ends_inside_the_body_is_an_upstream_error(used: list[int]) -> None:
    async def main() -> None:
        async with _relay(1 << 20) as (far_w, far, _, _, relaying):
            far_w.write(b"x" * 300_000)
            await far_w.drain()
            far_w.close()
            got = await _read_n(far, 300_000)
            with pytest.raises(http1.UpstreamError, match="closed inside the message body"):
                await asyncio.wait_for(relaying, 5)
            assert len(got) == 300_000

    _run(main)
    assert used == [1 << 20]


def test_a_writer_that_reads_nothing_pauses_the_source(used: list[int]) -> None:
    """The client reads nothing: the relay holds at most about a block in the client's
    transport, and the source is paused (its sender blocks), instead of the whole
    64 MiB piling up in the relaying process."""
    n = 64 << 20

    async def main() -> None:
        async with _relay(n) as (far_w, _, src, sink, relaying):
            block = b"y" * (1 << 20)
            sent = 0

            async def send() -> None:
                nonlocal sent
                while sent < n:
                    far_w.write(block)
                    sent += len(block)
                    await far_w.drain()

            sending = asyncio.ensure_future(send())
            await asyncio.sleep(1.5)
            held = sink.transport.get_write_buffer_size()
            assert held <= 2 * direct.BLOCK, held
            assert len(src._buffer) <= 2 * direct.BLOCK  # type: ignore[attr-defined]
            assert sent < n // 2, sent  # the sender is blocked: nobody reads
            assert not relaying.done()
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)

    _run(main)
    assert used == [n]


def test_a_writer_that_leaves_ends_the_relay_while_the_source_is_silent(used: list[int]) -> None:
    """The client resets its connection while the source sends nothing more: the relay
    ends at once (ConnectionError), not when the source sends again or ends."""

    async def main() -> None:
        async with _relay(1 << 20) as (far_w, far, _, _, relaying):
            far_w.write(b"z" * 100_000)
            await far_w.drain()
            assert len(await _read_n(far, 100_000)) == 100_000
            far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            far.close()  # an RST
            with pytest.raises(ConnectionError):  # (not TimeoutError)
                await asyncio.wait_for(relaying, 5)

    _run(main)
    assert used == [1 << 20]


def test_a_pipe_whose_writer_is_gone_ends_quietly() -> None:
    """``relay.pipe`` (the StreamReader loop, as for an agent's answer to a public TCP
    client) into a connection that is already closed: uvloop's ``write()`` raises
    RuntimeError there, and the copy ends like for any other lost connection, instead
    of failing its task (a public client that resets mid-upload, then the app's answer)."""
    from backend import relay

    async def main() -> None:
        src, far_w = await _pair(None)
        sink, _far = await _sink()
        sink.close()
        await sink.wait_closed()
        far_w.write(b"answer" * 1000)
        await far_w.drain()
        far_w.close()
        assert await asyncio.wait_for(relay.pipe(src, sink), 10) == 6000

    _run(main)
