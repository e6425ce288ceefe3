"""Muxado framing on the edge (backend.edge.muxado) against raw frames over real sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

from backend.edge import muxado as m

U32 = struct.Struct(">I")


class Peer:
    """The agent's side, written by hand: raw frames over a real TCP connection."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w

    def send(self, ftype: int, flags: int, sid: int, body: bytes = b"") -> None:
        self.w.write(m.header(ftype, flags, sid, len(body)) + body)

    async def send_cut(self, blob: bytes, sizes: list[int]) -> None:
        """``blob`` in pieces of the given sizes (in turn), each read by the edge on
        its own, as a network may cut it."""
        pos = i = 0
        while pos < len(blob):
            n = sizes[i % len(sizes)]
            self.w.write(blob[pos : pos + n])
            await self.w.drain()
            await asyncio.sleep(0)
            pos, i = pos + n, i + 1

    async def frame(self, timeout: float = 5.0) -> tuple[int, int, int, bytes]:
        ftype, flags, sid, length = m.parse_header(
            await asyncio.wait_for(self.r.readexactly(8), timeout)
        )
        body = await asyncio.wait_for(self.r.readexactly(length), timeout) if length else b""
        return ftype, flags, sid, body

    async def frame_of(
        self, ftype: int, sid: int | None = None, timeout: float = 5.0
    ) -> tuple[int, int, int, bytes]:
        """The next frame of a type (and stream), skipping others (window updates...)."""
        while True:
            f = await self.frame(timeout)
            if f[0] == ftype and (sid is None or f[2] == sid):
                return f

    async def read_stream(self, sid: int, n: int) -> bytes:
        got = b""
        while len(got) < n:
            f = await self.frame_of(m.DATA, sid)
            got += f[3]
        return got


async def _collector() -> tuple[asyncio.Queue, asyncio.StreamWriter, asyncio.Server]:
    """(queue, writer, server): a connection whose far end puts on the queue all that
    was written to it, once the writer closes."""
    got: asyncio.Queue = asyncio.Queue()

    async def client(r, _w):
        data = b""
        while chunk := await r.read(65536):
            data += chunk
        await got.put(data)

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    _, cw = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    return got, cw, server


async def _two_streams(peer: Peer, held: list) -> tuple[m.Stream, m.Stream]:
    """Streams 3 and 5, opened by the peer with "start" and "other"; 3's "start" read."""
    peer.send(m.DATA, m.SYN, 3, b"start")
    peer.send(m.DATA, m.SYN, 5, b"other")
    await peer.w.drain()
    for _ in range(200):
        if len(held) == 2:
            break
        await asyncio.sleep(0.01)
    st3, st5 = held
    assert await asyncio.wait_for(st3.reader.readexactly(5), 5) == b"start"
    return st3, st5


@pytest.fixture
async def mux():
    """A MuxSession on a real socket whose streams echo (``echo``) or are kept (``held``)."""
    state: dict = {"held": [], "sessions": []}

    async def echo(st: m.Stream) -> None:
        while data := await st.reader.read(65536):
            st.writer.write(data)
            await st.writer.drain()
        st.writer.write_eof()

    def on_stream(st: m.Stream) -> None:
        if state.get("mode") == "hold":
            state["held"].append(st)
        else:
            state.setdefault("tasks", []).append(asyncio.ensure_future(echo(st)))

    async def conn(r, w):
        if state.get("sndbuf"):  # a small kernel send buffer on the edge's side
            w.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, state["sndbuf"]
            )
        s = m.MuxSession(
            r,
            w,
            on_stream,
            max_streams=state.get("max_streams", 8),
            max_buffered=1 << 20,
            max_send_buffer=state.get("max_send_buffer", m.SEND_BUFFER),
        )
        state["sessions"].append(s)
        await s.run()

    server = await asyncio.start_server(conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def connect(rcvbuf: int = 0, **opts) -> Peer:
        state.update(opts)
        sock = None
        if rcvbuf:  # a small receive buffer: the kernel holds little of what is not read
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            r, w = await asyncio.open_connection(sock=sock)
        else:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        return Peer(r, w)

    state["connect"] = connect
    yield state
    server.close()
    for s in state["sessions"]:
        s.close()


async def test_stream_echo_half_close_and_window_credit(mux):
    peer = await mux["connect"]()
    payload = bytes(range(256)) * 1536  # 384 KiB: more than a window, so it needs credit
    sent = m.WINDOW
    peer.send(m.DATA, m.SYN, 3, payload[:1000])
    for i in range(1000, sent, 60000):
        peer.send(m.DATA, 0, 3, payload[i : min(i + 60000, sent)])
    got, credited, fin = b"", 0, False
    while not fin:
        ftype, flags, sid, body = await peer.frame()
        assert sid == 3
        if ftype == m.WNDINC:
            credited += U32.unpack(body)[0]
            if sent < len(payload) and credited >= len(payload) - sent:
                # the edge consumed enough to take the rest within its window
                peer.send(m.DATA, m.FIN, 3, payload[sent:])
                sent = len(payload)
        elif ftype == m.DATA:
            got += body
            fin = bool(flags & m.FIN)
            if body:  # credit the edge's sends so that it can write everything back
                peer.send(m.WNDINC, 0, 3, U32.pack(len(body)))
    assert got == payload


async def test_window_overrun_resets_only_that_stream(mux):
    peer = await mux["connect"](mode="hold")
    peer.send(m.DATA, m.SYN, 3, b"x")
    peer.send(m.DATA, m.SYN, 5, b"y")
    await asyncio.sleep(0.05)
    # nobody reads stream 3: overrun its window
    for _ in range(5):
        peer.send(m.DATA, 0, 3, b"z" * 65536)
    assert await peer.frame_of(m.RST, 3) == (m.RST, 0, 3, U32.pack(m.FLOW_CONTROL_ERROR))
    # the session and its other stream carry on
    st5 = mux["held"][1]
    peer.send(m.DATA, 0, 5, b"still here")
    assert await asyncio.wait_for(st5.reader.readexactly(11), 5) == b"ystill here"
    st5.writer.write(b"ok")
    assert await peer.read_stream(5, 2) == b"ok"


async def test_unknown_frame_type_gets_goaway_protocol_error(mux):
    peer = await mux["connect"]()
    peer.send(9, 0, 3, b"")
    _, _, sid, body = await peer.frame_of(m.GOAWAY)
    assert sid == 0 and U32.unpack(body[4:8])[0] == m.PROTOCOL_ERROR
    assert await asyncio.wait_for(peer.r.read(), 5) == b""  # and the connection closes


async def test_oversized_frame_gets_goaway_frame_size_error(mux):
    peer = await mux["connect"]()
    peer.w.write(m.header(m.DATA, m.SYN, 3, 0xFFFFFF))  # 16 MiB announced, never sent
    _, _, _, body = await peer.frame_of(m.GOAWAY)
    assert U32.unpack(body[4:8])[0] == m.FRAME_SIZE_ERROR


async def test_streams_over_the_limit_are_refused(mux):
    peer = await mux["connect"](mode="hold", max_streams=2)
    for sid in (3, 5, 7):
        peer.send(m.DATA, m.SYN, sid, b"a")
    assert await peer.frame_of(m.RST, 7) == (m.RST, 0, 7, U32.pack(m.STREAM_REFUSED))
    assert len(mux["held"]) == 2


async def test_edge_opened_stream_waits_for_window(mux):
    peer = await mux["connect"](mode="hold")
    peer.send(m.DATA, m.SYN, 3, b"hello")  # any stream, so that the session exists
    await asyncio.sleep(0.05)
    s = mux["sessions"][-1]
    st = s.open_stream()
    assert st.id == 2
    st.writer.write(b"a" * (m.WINDOW + 1000))
    first = await peer.frame_of(m.DATA, 2)
    assert first[1] & m.SYN
    got = len(first[3]) + len(await peer.read_stream(2, m.WINDOW - len(first[3])))
    assert got == m.WINDOW
    with pytest.raises(TimeoutError):  # no window left: nothing more until a WNDINC
        await peer.frame_of(m.DATA, 2, timeout=0.3)
    peer.send(m.WNDINC, 0, 2, U32.pack(1000))
    assert await peer.read_stream(2, 1000) == b"a" * 1000


async def test_peer_reset_ends_the_stream_reader(mux):
    peer = await mux["connect"](mode="hold")
    peer.send(m.DATA, m.SYN, 3, b"abc")
    await asyncio.sleep(0.05)
    st = mux["held"][0]
    assert await st.reader.readexactly(3) == b"abc"
    peer.send(m.RST, 0, 3, U32.pack(m.STREAM_CANCELLED))
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(st.reader.read(10), 5)


async def test_a_peer_that_stops_reading_costs_the_session_a_bounded_send_buffer(mux):
    """Eight streams with plenty of window write 1 MiB each to a peer that reads nothing:
    what the edge queues for the connection stays near max_send_buffer (not streams x
    window), every writer's drain() waits, and all bytes arrive once the peer reads."""
    limit = 128 * 1024
    peer = await mux["connect"](
        rcvbuf=64 * 1024, sndbuf=64 * 1024, mode="hold", max_send_buffer=limit
    )
    peer.send(m.DATA, m.SYN, 3, b"hi")  # any stream, so that the session exists
    for _ in range(100):
        if mux["sessions"]:
            break
        await asyncio.sleep(0.01)
    s = mux["sessions"][-1]
    streams = [s.open_stream() for _ in range(8)]
    for st in streams:  # window is no limit here: only the connection is
        peer.send(m.WNDINC, 0, st.id, U32.pack(4 * 1024 * 1024))
    size = 1024 * 1024
    payloads = {st.id: bytes([st.id]) * size for st in streams}

    async def write_all(st: m.Stream) -> None:
        data = payloads[st.id]
        for i in range(0, size, 65536):
            st.writer.write(data[i : i + 65536])
            await st.writer.drain()

    writers = [asyncio.ensure_future(write_all(st)) for st in streams]
    try:
        queued_max, held_max = 0, 0
        for _ in range(100):  # 1 s of a peer that reads nothing
            await asyncio.sleep(0.01)
            queued = s._out_size + s.writer.transport.get_write_buffer_size()
            queued_max = max(queued_max, queued)
            held_max = max(held_max, sum(len(st.transport._buf) for st in streams))
        # the kernel holds a few hundred KiB at most: no stream got its 1 MiB out
        assert not any(w.done() for w in writers)
        assert s.streams  # the session is alive, only waiting
        # the connection's buffer: the limit plus at most one frame past it
        assert queued_max <= limit + m.MAX_DATA_FRAME + 64, queued_max
        # and each stream holds at most what one write put in before drain() waited
        assert held_max <= 8 * 65536, held_max

        # the peer reads again: every stream completes, bytes intact and in order
        got: dict[int, bytearray] = {st.id: bytearray() for st in streams}
        while sum(map(len, got.values())) < 8 * size:
            ftype, _, sid, body = await peer.frame(timeout=10)
            if ftype == m.DATA and sid in got:
                got[sid] += body
        await asyncio.wait_for(asyncio.gather(*writers), 10)
        assert all(bytes(got[i]) == payloads[i] for i in got)
    finally:
        for w in writers:
            w.cancel()


async def test_frames_split_at_any_byte_and_runs_of_frames_arrive_intact(mux):
    """Frames cut anywhere by the network (a header split, a body split) and runs of
    DATA frames of one stream in one read reach each stream whole and in order."""
    peer = await mux["connect"](mode="hold")
    a = [bytes([65 + i]) * (100 + 37 * i) for i in range(6)]
    b = [bytes([97 + i]) * (50 + 11 * i) for i in range(6)]
    blob = m.header(m.DATA, m.SYN, 3, len(a[0])) + a[0]
    blob += m.header(m.DATA, m.SYN, 5, len(b[0])) + b[0]
    for i in range(1, 6):  # a run on 3, then one on 5, with window updates between
        blob += m.header(m.DATA, 0, 3, len(a[i])) + a[i]
        if i % 2:
            blob += m.header(m.WNDINC, 0, 3, 4) + U32.pack(1000)
        blob += m.header(m.DATA, 0, 5, len(b[i])) + b[i]
    blob += m.header(m.DATA, m.FIN, 3, 0) + m.header(m.DATA, m.FIN, 5, 3) + b"end"
    await peer.send_cut(blob, [1, 2, 3, 5, 8, 13, 7])
    for _ in range(100):
        if len(mux["held"]) == 2:
            break
        await asyncio.sleep(0.01)
    st3, st5 = mux["held"]
    assert st3.id == 3 and st5.id == 5
    assert await asyncio.wait_for(st3.reader.read(), 5) == b"".join(a)
    assert await asyncio.wait_for(st5.reader.read(), 5) == b"".join(b) + b"end"
    assert mux["sessions"][-1].streams  # nothing was reset


async def test_a_body_relay_takes_its_bytes_from_split_frames_and_leaves_the_rest(mux):
    """``_Reader.relay_to``: a body's frames, cut anywhere by the network and mixed with
    another stream's, reach the relay's connection whole and in order (after the head
    it is given); the stream's bytes past the body stay for its reader, and the other
    stream gets all of its own."""
    peer = await mux["connect"](mode="hold")
    got, cw, server = await _collector()
    st3, st5 = await _two_streams(peer, mux["held"])
    body = bytes(range(256)) * 800  # 200 KiB: with what follows, inside one window
    relay = asyncio.ensure_future(st3.reader.relay_to(cw, len(body), b"HEAD", lambda w: w.drain()))
    await asyncio.sleep(0)
    blob, others = b"", b""
    for i in range(0, len(body), 8192):
        piece = body[i : i + 8192]
        if i + 8192 >= len(body):
            piece += b"next head"  # the body ends inside this frame
        blob += m.header(m.DATA, 0, 3, len(piece)) + piece
        if i % 3 == 0:
            blob += m.header(m.DATA, 0, 5, 7) + b"%07d" % i
            others += b"%07d" % i
    blob += m.header(m.DATA, 0, 3, 5) + b" more" + m.header(m.DATA, m.FIN, 3, 0)
    await peer.send_cut(blob, [1000, 7, 8191, 3, 20000, 8, 65536])
    assert await asyncio.wait_for(relay, 5) == 0
    assert await asyncio.wait_for(st3.reader.read(), 5) == b"next head more"
    cw.close()
    assert await asyncio.wait_for(got.get(), 5) == b"HEAD" + body
    assert await asyncio.wait_for(st5.reader.readexactly(5 + len(others)), 5) == b"other" + others
    server.close()


def _on_tls(tmp_path, test) -> None:
    """Run ``await test(peer, sessions, held)`` on uvloop, with ``peer`` a TLS client of
    a MuxSession server (as the edge serves ngrok's SDK), whose sessions and
    peer-opened streams are listed in ``sessions`` and ``held``."""
    import uvloop

    from backend.tls import LocalCA, client_context

    host = "mux.burrow.localhost"
    ca = LocalCA.load_or_create(tmp_path / "ca")

    async def main() -> None:
        sessions: list[m.MuxSession] = []
        held: list[m.Stream] = []

        async def conn(r, w):
            s = m.MuxSession(r, w, held.append, max_buffered=1 << 20)
            sessions.append(s)
            await s.run()

        server = await asyncio.start_server(conn, "127.0.0.1", 0, ssl=ca.server_context([host]))
        port = server.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(ca.ca_file), server_hostname=host)
        try:
            await test(Peer(r, w), sessions, held)
        finally:
            w.close()
            server.close()

    uvloop.run(asyncio.wait_for(main(), 30))


def test_a_tls_session_reads_into_its_own_buffers_and_relays_split_frames_intact(tmp_path):
    """On uvloop over TLS: the session's connection reads through ``_Intake`` (its TLS
    decrypts into the session's buffers), and a body relayed from 8 KiB frames (the
    SDK's size), cut anywhere, mixed with another stream's frames, reaches the relay's
    connection whole, as does the other stream."""
    import hashlib

    body = os.urandom(200 * 1024)  # inside one window

    async def test(peer: Peer, sessions: list, held: list) -> None:
        got, cw, sink_server = await _collector()
        st3, st5 = await _two_streams(peer, held)
        assert type(sessions[0].reader._transport.get_protocol()) is m._Intake
        relay = asyncio.ensure_future(st3.reader.relay_to(cw, len(body), b"", lambda x: x.drain()))
        await asyncio.sleep(0)
        blob, others = b"", b""
        for i in range(0, len(body), 8192):
            blob += m.header(m.DATA, 0, 3, 8192) + body[i : i + 8192]
            if i % 3 == 0:
                blob += m.header(m.DATA, 0, 5, 7) + b"%07d" % i
                others += b"%07d" % i
        blob += m.header(m.DATA, m.FIN, 3, 0)
        await peer.send_cut(blob, [1000, 7, 8191, 3, 20000, 8, 16384, 65536])
        assert await asyncio.wait_for(relay, 5) == 0
        cw.close()
        assert hashlib.sha256(await asyncio.wait_for(got.get(), 5)).hexdigest() == hashlib.sha256(body).hexdigest()
        assert await asyncio.wait_for(st5.reader.readexactly(5 + len(others)), 5) == b"other" + others
        sink_server.close()

    _on_tls(tmp_path, test)


def test_a_frame_that_comes_in_small_pieces_is_copied_at_most_once(tmp_path, monkeypatch):
    """A peer that sends a large frame a TLS record of 1,000 bytes at a time (each
    read by the edge on its own) costs the session one copy of that frame, not one
    copy of all of it so far per read."""
    copied: list[int] = []
    renew = m._Intake._renew

    def counting(self, want):
        copied.append(self.end - self.start)
        return renew(self, want)

    monkeypatch.setattr(m._Intake, "_renew", counting)
    body = os.urandom(m.WINDOW - 8)

    async def test(peer: Peer, sessions: list, held: list) -> None:
        peer.send(m.DATA, m.SYN, 3, b"start")
        await peer.w.drain()
        for _ in range(200):
            if held:
                break
            await asyncio.sleep(0.01)
        await peer.send_cut(m.header(m.DATA, 0, 3, len(body)) + body, [1000])
        assert await asyncio.wait_for(held[0].reader.readexactly(5 + len(body)), 5) == b"start" + body

    _on_tls(tmp_path, test)
    assert sum(copied) <= len(body) + 8, copied


async def test_quickack_only_for_reads_that_nothing_answers_in_the_same_pass(mux):
    """A read is acknowledged at once (TCP_QUICKACK: the SDK's small writes would wait
    out the delayed ACK) unless the edge writes in the same loop pass, whose segments
    carry the ACK: the SDK's credits during an upload, answered with DATA, cost no
    setsockopt each."""
    peer = await mux["connect"](mode="hold")
    peer.send(m.DATA, m.SYN, 3, b"start")
    await peer.w.drain()
    for _ in range(200):
        if mux["held"]:
            break
        await asyncio.sleep(0.01)
    st = mux["held"][0]
    assert await asyncio.wait_for(st.reader.readexactly(5), 5) == b"start"
    session = mux["sessions"][0]

    class Recorder:
        def __init__(self) -> None:
            self.calls: list = []

        def setsockopt(self, *args) -> None:
            self.calls.append(args)

        def close(self) -> None:
            pass

    rec = Recorder()
    session._sock = rec
    st.writer.write(os.urandom(m.WINDOW + 1000))  # the window takes all but 1000 bytes
    assert len(await peer.read_stream(3, m.WINDOW)) == m.WINDOW
    rec.calls.clear()
    peer.send(m.WNDINC, 0, 3, U32.pack(1000))  # answered with the last 1000 bytes
    await peer.w.drain()
    assert len(await peer.read_stream(3, 1000)) == 1000
    assert rec.calls == []
    peer.send(m.DATA, 0, 3, b"ping")  # nothing answers it
    await peer.w.drain()
    assert await asyncio.wait_for(st.reader.readexactly(4), 5) == b"ping"
    assert rec.calls == [(socket.IPPROTO_TCP, m.QUICKACK, 1)]
