"""splice(2) relays between real sockets on 127.0.0.1: bodies in place, raw relays."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl

import pytest

from backend import splice
from backend.relay import relay

pytestmark = pytest.mark.skipif(not splice.AVAILABLE, reason="needs Linux splice(2)")

MiB = 1024 * 1024


async def _pair() -> tuple[tuple, tuple]:
    """A connected pair of stream pairs: (our end, the peer's end)."""
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    async def accept(r, w):
        got.set_result((r, w))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ours = await asyncio.open_connection("127.0.0.1", port)
    theirs = await got
    server.close()
    return ours, theirs


async def test_body_is_spliced_exactly_and_both_connections_stay_usable():
    (src_r, src_w), (feeder_r, feeder_w) = await _pair()
    (_, dst_w), (sink_r, sink_w) = await _pair()
    body = os.urandom(3 * MiB)
    feeder_w.write(b"HEAD" + body + b"NEXT")  # a head, the body, then the next message
    assert await src_r.readexactly(4) == b"HEAD"
    assert splice.can_splice_body(src_r, src_w, dst_w, len(body))
    task = asyncio.create_task(splice.splice_body(src_r, src_w, dst_w, len(body), prefix=b"P:"))
    assert await asyncio.wait_for(sink_r.readexactly(2 + len(body)), 10) == b"P:" + body
    await asyncio.wait_for(task, 10)
    # the source reader goes on with what followed the body; the writers still work
    assert await asyncio.wait_for(src_r.readexactly(4), 5) == b"NEXT"
    dst_w.write(b"after")
    assert await sink_r.readexactly(5) == b"after"
    src_w.write(b"back")
    assert await feeder_r.readexactly(4) == b"back"
    for w in (src_w, feeder_w, dst_w, sink_w):
        w.close()


async def test_body_cut_short_raises_incomplete():
    (src_r, src_w), (_, feeder_w) = await _pair()
    (_, dst_w), (sink_r, sink_w) = await _pair()
    feeder_w.write(b"x" * MiB)
    await feeder_w.drain()
    feeder_w.close()
    with pytest.raises(splice.Incomplete):
        await asyncio.wait_for(splice.splice_body(src_r, src_w, dst_w, 2 * MiB), 10)
    assert len(await sink_r.read(2 * MiB + 1)) <= MiB
    for w in (src_w, dst_w, sink_w):
        w.close()


async def test_small_or_tls_bodies_are_not_spliced(tmp_path):
    (src_r, src_w), (_, feeder_w) = await _pair()
    (_, dst_w), (_, sink_w) = await _pair()
    assert not splice.can_splice_body(src_r, src_w, dst_w, splice.SPLICE_MIN - 1)
    assert not splice.can_splice_body(src_r, None, dst_w, 10 * MiB)
    from backend.tls import LocalCA

    ca = LocalCA.load_or_create(tmp_path)
    cert, key = ca.issue(["localhost"])
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    client_ctx = ssl.create_default_context(cafile=str(ca.ca_file))
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0, ssl=server_ctx)
    port = srv.sockets[0].getsockname()[1]
    tls_r, tls_w = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
    )
    assert splice.spliceable(dst_w)
    assert not splice.spliceable(tls_w)
    assert not splice.can_splice_body(tls_r, tls_w, dst_w, 10 * MiB)
    tls_w.close()
    srv.close()
    for w in (src_w, feeder_w, dst_w, sink_w):
        w.close()


async def test_raw_relay_splices_both_ways_and_passes_half_close(monkeypatch):
    used = []
    real_run = splice.SpliceRelay.run

    async def spy(self):
        used.append(self)
        return await real_run(self)

    monkeypatch.setattr(splice.SpliceRelay, "run", spy)
    (a_r, a_w), (client_r, client_w) = await _pair()
    (b_r, b_w), (server_r, server_w) = await _pair()
    client_w.write(b"early")  # already buffered in a_r when the relay starts
    await asyncio.sleep(0.05)
    await a_r.readexactly(0)
    task = asyncio.create_task(relay(a_r, a_w, b_r, b_w))
    up = os.urandom(5 * MiB)
    client_w.write(up)
    await client_w.drain()
    client_w.write_eof()  # the client is done sending; the reply must still come back
    got = await asyncio.wait_for(server_r.read(-1), 10)  # until the relayed EOF
    assert got == b"early" + up
    server_w.write(b"reply" * 1000)
    await server_w.drain()
    server_w.close()
    assert await asyncio.wait_for(client_r.read(-1), 10) == b"reply" * 1000
    assert await asyncio.wait_for(task, 10) == (len(got), 5000)
    assert len(used) == 1  # it went through splice, not the stream relay
    client_w.close()


async def test_teed_body_gives_the_capture_every_byte():
    (src_r, src_w), (_, feeder_w) = await _pair()
    (_, dst_w), (sink_r, sink_w) = await _pair()
    body = os.urandom(5 * MiB + 123)
    feeder_w.write(b"HEAD" + body + b"NEXT")
    assert await src_r.readexactly(4) == b"HEAD"
    seen: list[bytes] = []
    assert splice.can_splice_body(src_r, src_w, dst_w, len(body), teed=True)
    task = asyncio.create_task(
        splice.splice_body(src_r, src_w, dst_w, len(body), prefix=b"P:", tee=seen.append)
    )
    assert await asyncio.wait_for(sink_r.readexactly(2 + len(body)), 10) == b"P:" + body
    await asyncio.wait_for(task, 10)
    assert b"".join(seen) == body
    assert await asyncio.wait_for(src_r.readexactly(4), 5) == b"NEXT"
    for w in (src_w, feeder_w, dst_w, sink_w):
        w.close()


async def test_closing_a_taken_over_writer_ends_the_spliced_relay():
    """A session closing its data connections must still cut relays that splice them."""
    from backend.relay import close

    (a_r, a_w), (client_r, client_w) = await _pair()
    (b_r, b_w), (server_r, server_w) = await _pair()
    task = asyncio.create_task(relay(a_r, a_w, b_r, b_w))
    client_w.write(b"ping")
    assert await asyncio.wait_for(server_r.readexactly(4), 5) == b"ping"
    close(b_w)  # what Session.shutdown does with an active data connection
    assert await asyncio.wait_for(client_r.read(), 5) == b""  # the client sees the end
    assert await asyncio.wait_for(server_r.read(), 5) == b""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert task.done()
    assert not splice._running  # nothing left registered
    client_w.close()
    server_w.close()


async def test_a_full_capture_stops_the_copies_and_gets_the_rest_as_a_count():
    (src_r, src_w), (_, feeder_w) = await _pair()
    (_, dst_w), (sink_r, sink_w) = await _pair()
    body = os.urandom(6 * MiB)
    feeder_w.write(b"HEAD" + body)
    assert await src_r.readexactly(4) == b"HEAD"
    cap = MiB
    seen: list[bytes] = []
    counted: list[int] = []

    def tee(chunk: bytes | int) -> int:
        if isinstance(chunk, int):
            counted.append(chunk)
        else:
            seen.append(chunk)
        return max(0, cap - sum(map(len, seen)))

    task = asyncio.create_task(splice.splice_body(src_r, src_w, dst_w, len(body), tee=tee))
    assert await asyncio.wait_for(sink_r.readexactly(len(body)), 10) == body
    await asyncio.wait_for(task, 10)
    got = b"".join(seen)
    assert got == body[: len(got)] and cap <= len(got) < 3 * MiB  # stopped soon after the cap
    assert len(got) + sum(counted) == len(body)  # every byte accounted for
    assert len(counted) == 1
    for w in (src_w, feeder_w, dst_w, sink_w):
        w.close()
