"""Muxado, ngrok's stream multiplexer, from the server's side.

ngrok's agents and SDKs run every session over one TLS connection carrying muxado
frames (``../shared/ngrok-agent-protocol.md``): an 8-byte header ``u32 (length << 8) |
(type << 4) | flags`` + ``u32 stream id``, then ``length`` bytes.  Each stream looks
like a connection to the code above: a :class:`asyncio.StreamReader` fed by the frames
that arrive and an :class:`asyncio.StreamWriter` whose bytes leave as DATA frames.

Flow control is per stream and direction (a 256 KiB window): a stream's writer holds
bytes the peer has no window for (``drain()`` waits), and the edge credits the peer
(WNDINC) as its reader is consumed, so a slow consumer stops its sender.  Limits cost
only the stream or session that hits them: too many streams (RST StreamRefused), too
many bytes buffered in a session (RST EnhanceYourCalm), a window overrun (RST
FlowControl), a bad frame (GOAWAY and close).  All streams share the session's one
connection: when its write buffer holds more than ``max_send_buffer`` bytes (an agent
that stops reading its socket), every stream stops sending and its writer's ``drain()``
waits until the connection drains, so a session costs at most that much plus one write
per stream, not streams × window.

Speed: frames are parsed in batches from each read of the connection (not two awaits
per frame), the frames produced during one pass of the event loop leave in one write
(one TLS record run, one syscall), and the streams credited by window updates in one
batch send one DATA frame each after it (not one per update).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable

log = logging.getLogger("burrow.edge.muxado")

QUICKACK = getattr(socket, "TCP_QUICKACK", 0)
HEADER = struct.Struct(">II")
U32 = struct.Struct(">I")

# frame types
RST, DATA, WNDINC, GOAWAY = 0, 1, 2, 3
# flags
FIN, SYN = 1, 2

# error codes
NO_ERROR = 0
PROTOCOL_ERROR = 1
INTERNAL_ERROR = 2
FLOW_CONTROL_ERROR = 3
STREAM_CLOSED = 4
STREAM_REFUSED = 5
STREAM_CANCELLED = 6
STREAM_RESET = 7
FRAME_SIZE_ERROR = 8
ACCEPT_QUEUE_FULL = 9
ENHANCE_YOUR_CALM = 10
REMOTE_GONE_AWAY = 11
STREAMS_EXHAUSTED = 12
WRITE_TIMEOUT = 13
SESSION_CLOSED = 14
PEER_EOF = 15

WINDOW = 256 * 1024  # initial window per stream and direction
MAX_CONTROL_BODY = 64 * 1024  # RST / WNDINC / GOAWAY bodies are tiny
CREDIT_AFTER = 64 * 1024  # consumed bytes credited (WNDINC) in batches of this size
# (half the window was measured: fewer frames, but the SDK idles waiting for credit)
MAX_DATA_FRAME = 64 * 1024  # our DATA frames carry at most this
READ_LIMIT = 128 * 1024  # a stream's reader pauses (no more credit) past 2× this
SEND_BUFFER = 1024 * 1024  # default max_send_buffer: bytes queued towards the peer
READ_CHUNK = 256 * 1024  # bytes taken from the connection's reader at a time
WRITE_PIECE = 32 * 1024  # a loop pass's frames leave in writes of about this size
HOLD = 64 * 1024  # a body relay credits the peer while its connection holds at most this


def header(ftype: int, flags: int, stream_id: int, length: int) -> bytes:
    return HEADER.pack((length << 8) | (ftype << 4) | flags, stream_id & 0x7FFFFFFF)


def parse_header(raw: bytes) -> tuple[int, int, int, int]:
    """(type, flags, stream id, length) of an 8-byte frame header."""
    word, sid = HEADER.unpack(raw)
    return (word >> 4) & 0xF, word & 0xF, sid & 0x7FFFFFFF, word >> 8


def looks_like_muxado(raw: bytes) -> bool:
    """True if 8 bytes are the first frame an agent sends: DATA + SYN on an odd stream."""
    if len(raw) < 8:
        return False
    ftype, flags, sid, _ = parse_header(raw[:8])
    return ftype == DATA and bool(flags & SYN) and sid % 2 == 1


def _own_socket(writer: asyncio.StreamWriter) -> socket.socket | None:
    """A socket object of our own for the connection behind ``writer`` (a duplicate
    descriptor, closed with the session): uvloop's ``get_extra_info("socket")`` makes a
    new socket object for every ``setsockopt``, and the session sets TCP_QUICKACK after
    every read."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        return socket.socket(fileno=os.dup(sock.fileno()))
    except (OSError, ValueError):
        return None


class MuxError(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code


class _Pending:
    """Bytes written to a stream and not sent yet: the writes themselves (views of
    immutable bytes), cut into frames without copying; the one copy is the join of a
    loop pass's frames into the connection's write."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: collections.deque[memoryview] = collections.deque()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, data) -> None:
        if not isinstance(data, bytes):
            data = bytes(data)  # the caller may reuse its buffer
        self.parts.append(memoryview(data))
        self.size += len(data)

    def take(self, n: int) -> list[memoryview]:
        """The first ``n`` bytes (at most ``len(self)``), as views."""
        out = []
        parts = self.parts
        self.size -= n
        while n:
            first = parts[0]
            if len(first) <= n:
                out.append(parts.popleft())
                n -= len(first)
            else:
                out.append(first[:n])
                parts[0] = first[n:]
                n = 0
        return out

    def clear(self) -> None:
        self.parts.clear()
        self.size = 0


class _StreamTransport(asyncio.Transport):
    """One muxado stream as an asyncio transport (for StreamReader/StreamWriter)."""

    keeps_written_bytes = True  # write() keeps bytes objects as they are (no copy)

    def __init__(self, session: MuxSession, stream_id: int, syn: bool) -> None:
        super().__init__()
        self._session = session
        self.id = stream_id
        self._protocol: asyncio.StreamReaderProtocol | None = None
        self._syn = syn  # our first DATA frame must carry SYN
        self._send_window = WINDOW
        self._recv_window = WINDOW  # what the peer may still send us
        self._buf = _Pending()
        self._eof_wanted = False
        self.fin_sent = False
        self.fin_received = False
        self._closed = False  # close() or abort() called: no more writes
        self._gone = False  # forgotten by the session
        self._notified = False  # connection_lost delivered
        self._reading_paused = False
        self._writing_paused = False
        self._sink: _Sink | None = None  # a body relay that takes DATA straight out

    # ------------------------------------------------------------ asyncio.Transport
    def get_extra_info(self, name, default=None):
        if name == "peername":
            return self._session.peername
        if name == "stream_id":
            return self.id
        return default

    def is_closing(self) -> bool:
        return self._closed

    def write(self, data) -> None:
        if self._closed or self._eof_wanted or not data:
            return
        self._buf.add(data)
        self._flush()

    def writelines(self, list_of_data) -> None:
        for d in list_of_data:
            self.write(d)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_wanted or self._gone:
            return
        self._eof_wanted = True
        self._flush()

    def get_write_buffer_size(self) -> int:
        return len(self._buf)

    def close(self) -> None:
        """Close as a TCP socket does: what is buffered still goes out, then FIN; bytes
        the peer still sends reset the stream (RST StreamClosed)."""
        if self._closed:
            return
        self._closed = True
        self._eof_wanted = True
        self._flush()
        self._notify_lost(None)

    def abort(self) -> None:
        if self._gone:
            return
        self._session.send_frame(RST, 0, self.id, U32.pack(STREAM_CANCELLED))
        self._lost(None)

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False

    def is_reading(self) -> bool:
        return not self._reading_paused

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    # ----------------------------------------------------------------- internals
    def _flush(self) -> None:
        s = self._session
        buf = self._buf
        blocked = False
        while buf and self._send_window > 0 and not s.closed:
            if s.send_blocked():
                s.wait_to_send(self)  # the connection is backed up: wait for it to drain
                blocked = True
                break
            n = min(len(buf), self._send_window, MAX_DATA_FRAME)
            parts = buf.take(n)
            self._send_window -= n
            last = self._eof_wanted and not buf
            flags = (SYN if self._syn else 0) | (FIN if last else 0)
            self._syn = False
            s.send_data(flags, self.id, parts, n)
            if last:
                self.fin_sent = True
        if self._eof_wanted and not buf and not self.fin_sent and not s.closed:
            s.send_frame(DATA, (SYN if self._syn else 0) | FIN, self.id, b"")
            self._syn = False
            self.fin_sent = True
        if self._protocol is not None:
            # drain() waits while the peer has no window for what is buffered, and also
            # while the session's connection is backed up (whatever the window)
            if not self._writing_paused and (len(buf) > WINDOW or (blocked and buf)):
                self._writing_paused = True
                self._protocol.pause_writing()
            elif self._writing_paused and not blocked and len(buf) <= WINDOW // 2:
                self._writing_paused = False
                self._protocol.resume_writing()
        if self.fin_sent and self.fin_received:
            self._forget()

    def _consumed(self, unread: int) -> None:
        """The reader holds ``unread`` bytes: credit the peer for what it consumed, in
        batches (a window update per small read would double the frames)."""
        if self._gone or self.fin_received:
            return
        inc = (WINDOW - self._recv_window) - unread
        if inc >= CREDIT_AFTER or (inc > 0 and unread == 0 and inc >= WINDOW // 4):
            self._recv_window += inc
            self._session.buffered -= inc
            self._session.send_frame(WNDINC, 0, self.id, U32.pack(inc))

    def _on_data(self, data: bytes, fin: bool) -> None:
        if data:
            if len(data) > self._recv_window:
                raise MuxError(FLOW_CONTROL_ERROR, "window overrun")
            if self._closed:
                # nobody reads a closed stream: reset it, as a closed TCP socket does
                # (crediting and dropping let an app send a whole abandoned answer)
                self._session._reset(self, STREAM_CLOSED)
                return
            self._recv_window -= len(data)
            self._session.buffered += len(data)
            if self._sink is not None:
                self._to_sink([data], len(data))
            elif self._protocol is not None:
                self._protocol.data_received(data)
            else:
                self._consumed(0)
        if fin and not self.fin_received:
            self.fin_received = True
            self._session.buffered -= WINDOW - self._recv_window  # nothing more to credit
            self._recv_window = WINDOW
            if not self._closed and self._protocol is not None:
                self._protocol.eof_received()
            if self.fin_sent:
                self._forget()

    def _on_parts(self, parts: list, n: int) -> None:
        """``n`` bytes of DATA as views of immutable bytes, for the body relay
        (:meth:`_Reader.relay_to`): the window was checked by the session."""
        self._recv_window -= n
        self._session.buffered += n
        self._to_sink(parts, n)

    def _to_sink(self, parts: list, n: int) -> None:
        """Queue the body's bytes for the relay's transport (written once the read that
        brought them is parsed); bytes past the body go to the reader."""
        k = self._sink
        assert k is not None
        rest = b""
        if n > k.left:  # the body ends inside these bytes
            cut, body = k.left, []
            for i, p in enumerate(parts):
                if len(p) >= cut:
                    body.append(p[:cut])
                    rest = b"".join([p[cut:], *parts[i + 1 :]])
                    break
                body.append(p)
                cut -= len(p)
            parts, n = body, k.left
        k.parts.extend(parts)
        k.left -= n
        self._session.sink_later(k)
        if not k.left:
            self._sink = None
            if rest and self._protocol is not None:
                self._protocol.data_received(rest)

    def _on_window(self, inc: int) -> None:
        self._send_window += inc
        if self._send_window > 2**31:
            raise MuxError(FLOW_CONTROL_ERROR, "window overflow")
        if self._buf or (self._eof_wanted and not self.fin_sent):
            # flushed once the frames read in this batch are handled: several window
            # updates then make one DATA frame, not one small frame each
            self._session.flush_later(self)

    def _notify_lost(self, exc: Exception | None) -> None:
        if not self._notified:
            self._notified = True
            if self._protocol is not None:
                self._protocol.connection_lost(exc)

    def _lost(self, exc: Exception | None) -> None:
        """The stream is over (reset, or the session ended): forget it at once."""
        self._closed = True
        self._sink = None
        self._buf.clear()
        self._forget()
        self._notify_lost(exc)

    def _forget(self) -> None:
        if self._gone:
            return
        self._gone = True
        if not self.fin_received:
            self._session.buffered -= WINDOW - self._recv_window
            self._recv_window = WINDOW
        self._session.forget(self)


class _Sink:
    """A body relay in progress: the transport the stream's DATA goes to, and how
    many bytes of the body are still to come."""

    __slots__ = ("error", "held", "join", "left", "parts", "reader", "stream", "transport")

    def __init__(self, transport: asyncio.WriteTransport, left: int, reader: _Reader, stream: _StreamTransport) -> None:
        self.transport = transport
        self.left = left
        self.reader = reader
        self.stream = stream
        self.parts: list = []  # views of the reads' bytes, written at the end of a read
        self.held = False  # credit held back until the transport drains
        self.error: BaseException | None = None
        # a plain socket takes the views in one writev; anything else (TLS: a record
        # per piece) gets them joined
        self.join = transport.get_extra_info("ssl_object") is not None or transport.get_extra_info("socket") is None

    def flush(self) -> None:
        """Write what the last read brought (one write for all its frames), then credit
        the peer for it, unless the transport is backed up (the relay credits once it
        drains) or gone (the relay ends)."""
        parts, self.parts = self.parts, []
        out, t = self.transport, self.stream
        if parts and self.error is None:
            try:
                if out.is_closing():
                    raise ConnectionResetError("the relay's connection is closed")
                if self.join or out.get_write_buffer_size():
                    # (a backed-up transport keeps what it is given: views would keep
                    # whole reads, mostly other streams' bytes, alive with them)
                    out.write(b"".join(parts))
                elif len(parts) == 1:
                    out.write(parts[0])
                else:
                    out.writelines(parts)
            except (RuntimeError, OSError) as exc:  # the other side is gone
                self.error = ConnectionResetError(str(exc))
        if not self.left or self.error is not None:
            if t._sink is self:
                t._sink = None
            self.reader._wakeup_waiter()
            t._consumed(len(self.reader._buffer))
        elif out.get_write_buffer_size() > HOLD:
            if not self.held:
                self.held = True
                self.reader._wakeup_waiter()
        else:
            t._consumed(0)


class _Reader(asyncio.StreamReader):
    """A StreamReader that tells its stream what the application consumed."""

    _mux: _StreamTransport | None = None

    def _maybe_resume_transport(self) -> None:  # called after every read from the buffer
        super()._maybe_resume_transport()
        if self._mux is not None:
            self._mux._consumed(len(self._buffer))

    async def relay_to(self, writer: asyncio.StreamWriter, n: int, prefix: bytes, drain) -> int:
        """Copy the next ``n`` bytes of the stream to ``writer`` (after ``prefix``):
        the DATA frames that bring them are written to its transport as they are parsed
        (no copy into this reader, no wake-up of this task per frame), and the peer is
        credited as that transport takes them.  ``drain(writer)`` waits for the
        transport (and enforces its deadline).  Returns the bytes that did not come
        (the stream ended first); raises what a read would."""
        t = self._mux
        out = writer.transport
        buf = self._buffer
        if buf:
            take = min(len(buf), n)
            with memoryview(buf) as view:
                prefix += view[:take]
            del buf[:take]
            n -= take
        if prefix:
            out.write(prefix)
        if n and t is not None and not self._eof and self._exception is None:
            k = t._sink = _Sink(out, n, self, t)
            self._maybe_resume_transport()  # credit what was taken from the buffer
            # a client that leaves ends the relay even while the stream sends nothing
            gone = asyncio.ensure_future(writer.wait_closed())
            gone.add_done_callback(lambda f: (f.cancelled() or f.exception(), self._wakeup_waiter()))
            try:
                while k.left and k.error is None:
                    if self._exception is not None:
                        raise self._exception
                    if self._eof:
                        break
                    if out.is_closing():
                        raise ConnectionResetError("the client's connection is closed")
                    if k.held:
                        k.held = False
                        await drain(writer)
                        t._consumed(len(self._buffer))
                        continue
                    await self._wait_for_data("relay_to")
            finally:
                gone.cancel()
                if t._sink is k:
                    t._sink = None
            if k.error is not None:
                raise k.error
            n = k.left
        else:
            self._maybe_resume_transport()
            if self._exception is not None:
                raise self._exception
        await drain(writer)
        return n


class Stream:
    """A muxado stream: ``reader`` / ``writer`` as for a TCP connection."""

    def __init__(self, session: MuxSession, stream_id: int, syn: bool) -> None:
        loop = asyncio.get_running_loop()
        self.id = stream_id
        self.transport = _StreamTransport(session, stream_id, syn)
        self.reader = _Reader(limit=READ_LIMIT, loop=loop)
        self.reader._mux = self.transport
        proto = asyncio.StreamReaderProtocol(self.reader, loop=loop)
        proto.connection_made(self.transport)
        self.transport._protocol = proto
        self.writer = asyncio.StreamWriter(self.transport, proto, self.reader, loop)


class MuxSession:
    """The server side of one muxado session over ``reader`` / ``writer``.

    ``on_stream(stream)`` is called for every stream the peer opens (it should start a
    task).  :meth:`run` reads frames until the connection ends or breaks.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_stream: Callable[[Stream], None],
        max_streams: int = 1024,
        max_buffered: int = 32 * 1024 * 1024,
        max_send_buffer: int = SEND_BUFFER,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.on_stream = on_stream
        self.max_streams = max_streams
        self.max_buffered = max_buffered
        self.max_send_buffer = max_send_buffer
        # the transport pauses its protocol (and writer.drain() waits) past the same limit
        with contextlib.suppress(AttributeError, NotImplementedError, ValueError):
            writer.transport.set_write_buffer_limits(
                high=max_send_buffer, low=max_send_buffer // 2
            )
        self._out: list[bytes | memoryview] = []  # frames to write at the end of this loop pass
        self._out_size = 0
        self._tick_handle: asyncio.Handle | None = None
        # the loop the session runs on (asyncio.get_running_loop() makes a getpid()
        # syscall on every call)
        self._loop = asyncio.get_running_loop()
        self._to_flush: dict[_StreamTransport, None] = {}  # credited since the last tick
        self._sinks: dict[_Sink, None] = {}  # body relays given bytes by the current read
        self._waiting: dict[_StreamTransport, None] = {}  # held back by a full connection
        self._drainer: asyncio.Task | None = None
        self._pending = bytearray()  # the start of a frame whose end has not arrived
        self._ended: asyncio.Future | None = None  # set when the connection ends
        self.peername = writer.get_extra_info("peername")
        self.streams: dict[int, _StreamTransport] = {}
        self.buffered = 0  # bytes received on all streams and not yet credited back
        self.closed = False
        self.goaway_received = False
        self._next_id = 2  # we open even ids
        self._last_remote = 1  # the peer opens odd ids, increasing
        self._sock = _own_socket(writer) if QUICKACK else None
        self.last_frame = 0.0  # loop time of the last frame received

    # ------------------------------------------------------------------ writing
    def send_frame(self, ftype: int, flags: int, stream_id: int, body: bytes = b"") -> None:
        """Queue a frame; the frames queued during one pass of the event loop leave
        together (one write, so one run of TLS records and one syscall)."""
        if self.closed or self.writer.is_closing():
            return
        self._out.append(HEADER.pack((len(body) << 8) | (ftype << 4) | flags, stream_id & 0x7FFFFFFF))
        if body:
            self._out.append(body)
        self._out_size += 8 + len(body)
        if self._tick_handle is None:
            self._schedule()

    def send_data(self, flags: int, stream_id: int, parts: list, length: int) -> None:
        """Queue a DATA frame whose body is ``parts`` (views: joined, so copied once,
        in :meth:`_write_out`)."""
        if self.closed or self.writer.is_closing():
            return
        self._out.append(HEADER.pack((length << 8) | (DATA << 4) | flags, stream_id & 0x7FFFFFFF))
        self._out.extend(parts)
        self._out_size += 8 + length
        if self._tick_handle is None:
            self._schedule()

    def _schedule(self) -> None:
        """Run :meth:`_tick` at the end of this loop pass."""
        self._tick_handle = self._loop.call_soon(self._tick)

    def sink_later(self, k: _Sink) -> None:
        """Write ``k``'s bytes once the current read is parsed."""
        self._sinks[k] = None

    def flush_later(self, t: _StreamTransport) -> None:
        """Flush ``t`` at the end of this loop pass (after the frames read with it)."""
        self._to_flush[t] = None
        if self._tick_handle is None:
            self._schedule()

    def send_blocked(self) -> bool:
        """True while the connection holds more than ``max_send_buffer`` bytes unsent."""
        if self._out_size > self.max_send_buffer:
            return True
        try:
            queued = self.writer.transport.get_write_buffer_size()
        except (AttributeError, RuntimeError):
            return False
        return self._out_size + queued > self.max_send_buffer

    def wait_to_send(self, t: _StreamTransport) -> None:
        """``t`` has bytes to send but the connection is backed up: flush it once the
        connection drains (streams in the order they started waiting)."""
        self._waiting[t] = None
        if self._drainer is None and not self.closed:
            self._drainer = asyncio.ensure_future(self._drain())

    def _tick(self) -> None:
        self._tick_handle = None
        if self._to_flush:
            ready, self._to_flush = self._to_flush, {}
            for t in ready:
                if not t._gone:
                    t._flush()
        self._write_out()

    def _write_out(self) -> None:
        if not self._out:
            return
        out, self._out = self._out, []
        size, self._out_size = self._out_size, 0
        with contextlib.suppress(RuntimeError, OSError):  # the connection is gone
            if size <= WRITE_PIECE:
                self.writer.write(out[0] if len(out) == 1 else b"".join(out))
                return
            # a large batch leaves in pieces, each encrypted and sent before the next:
            # the peer starts on the first while the rest is encrypted
            piece: list = []
            n = 0
            for part in out:
                piece.append(part)
                n += len(part)
                if n >= WRITE_PIECE:
                    self.writer.write(b"".join(piece))
                    piece, n = [], 0
            if piece:
                self.writer.write(b"".join(piece))

    async def _drain(self) -> None:
        """Wait for the connection to drain, then let the waiting streams send again."""
        try:
            while self._waiting and not self.closed:
                self._write_out()
                if self.send_blocked():
                    await self.writer.drain()  # paused past max_send_buffer, until half
                    if self.send_blocked():  # not paused yet at exactly the limit
                        await asyncio.sleep(0.005)
                    continue
                waiting, self._waiting = self._waiting, {}
                for t in waiting:
                    if not t._gone:
                        t._flush()  # may wait again (and go back to the end of the line)
        except (ConnectionError, RuntimeError, OSError):
            pass
        finally:
            self._drainer = None

    def open_stream(self) -> Stream:
        """Open a stream towards the peer (its SYN goes out with the first bytes)."""
        if self.closed or self.goaway_received:
            raise MuxError(SESSION_CLOSED, "the session is closed")
        if len(self.streams) >= self.max_streams:
            raise MuxError(STREAMS_EXHAUSTED, "too many streams")
        sid = self._next_id
        self._next_id += 2
        st = Stream(self, sid, syn=True)
        self.streams[sid] = st.transport
        return st

    def forget(self, t: _StreamTransport) -> None:
        if self.streams.get(t.id) is t:
            del self.streams[t.id]

    def go_away(self, code: int = NO_ERROR, msg: str = "") -> None:
        self.send_frame(GOAWAY, 0, 0, U32.pack(self._last_remote) + U32.pack(code) + msg.encode())

    def close(self, code: int = NO_ERROR, msg: str = "") -> None:
        if self.closed:
            return
        self.go_away(code, msg)
        self._write_out()
        self.closed = True
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        if self._drainer is not None:
            self._drainer.cancel()
        self._waiting.clear()
        self._to_flush.clear()
        self._sinks.clear()
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)
        for t in list(self.streams.values()):
            t._lost(ConnectionResetError("muxado session closed"))
        self.streams.clear()
        with contextlib.suppress(Exception):
            self.writer.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ------------------------------------------------------------------ reading
    async def run(self, first: bytes = b"") -> None:
        """Read and dispatch frames until the connection ends or breaks; ``first`` is a
        frame header already read.

        The bytes are parsed as the connection delivers them: the reader's
        ``feed_data`` is this session's parser (no copy into the reader's buffer, no
        wake-up of a reading task per chunk), and every complete frame in a chunk is
        dispatched at once; a partial frame waits for the next chunk.  The connection is
        never paused for reading: streams are bounded by their windows and the session
        by ``max_buffered``."""
        loop = self._loop
        self.last_frame = loop.time()
        self._pending = bytearray(first)
        self._ended = loop.create_future()
        reader = self.reader
        held = bytes(reader._buffer)  # what the reader had already (after ``first``)
        reader._buffer.clear()
        reader.feed_data = self._feed  # type: ignore[method-assign]
        reader.feed_eof = self._feed_eof  # type: ignore[method-assign]
        reader.set_exception = self._feed_error  # type: ignore[method-assign]
        if held:
            self._feed(held)
        transport = reader._transport  # type: ignore[attr-defined]
        inner = transport.get_protocol() if transport is not None else None
        if isinstance(inner, asyncio.StreamReaderProtocol):
            # reads land in the session's own buffers (see _Intake), after the partial
            # frame ``held`` may have left; the reader's protocol still sees the
            # connection's end and its write flow control
            transport.set_protocol(_Intake(self, inner))
        reader._maybe_resume_transport()  # the reader may have paused the connection
        try:
            if reader._exception is not None:
                self._feed_error(reader._exception)
            if reader._eof:
                self._feed_eof()
            await self._ended
        except MuxError as exc:
            log.debug("muxado session broken: %s", exc)
            self.close(exc.code, str(exc))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.close(NO_ERROR)

    def _feed(self, chunk: bytes) -> None:
        """A read delivered as bytes (what the reader held; a connection without
        :class:`_Intake`)."""
        if self._ended is None or self._ended.done() or self.closed:
            return
        pending = self._pending
        if pending:
            pending += chunk
            # (views of ``pending``, which the next read changes, may not be kept)
            del pending[: self._take(pending, False)]
        else:
            used = self._take(chunk, isinstance(chunk, bytes))
            if used < len(chunk):
                self._pending = bytearray(memoryview(chunk)[used:])

    def _feed_read(self, data: memoryview) -> int:
        """What :class:`_Intake` has read and not parsed yet (in a buffer whose bytes
        never change once read, so views of them may be kept); returns the bytes used."""
        if self._ended is None or self._ended.done() or self.closed:
            return len(data)
        return self._take(data, True)

    def _take(self, data: bytes | bytearray | memoryview, stable: bool) -> int:
        """Dispatch the complete frames at the start of ``data`` and write what body
        relays were given; returns the bytes used (all of them once the session broke)."""
        try:
            used = self._frames(data, stable)
            if self._sinks:
                sinks, self._sinks = self._sinks, {}
                for k in sinks:
                    k.flush()
            if used:
                self._quickack()
                self.last_frame = self._loop.time()
            return used
        except Exception as exc:  # a bad frame (MuxError) or a bug: the session ends
            self._feed_error(exc)
            return len(data)

    def _feed_eof(self) -> None:
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    def _feed_error(self, exc: BaseException) -> None:
        if self._ended is not None and not self._ended.done():
            self._ended.set_exception(exc)

    def _frames(self, data: bytes | bytearray | memoryview, stable: bool) -> int:
        """Dispatch the complete frames at the start of ``data``; return the bytes used
        (``stable``: ``data`` is immutable, so views of it may be kept).

        Consecutive plain DATA frames of one stream (no flags) are handed to it as one
        body: one copy and one wake-up of its reader instead of one per frame (ngrok's
        SDK sends 8 KiB frames), or, while a body relay takes the stream's bytes, views
        of them written out without a copy.  Windows are checked on the sum, as they
        would be one by one."""
        pos, end = 0, len(data)
        unpack = HEADER.unpack_from
        run: list = []  # bodies (views) of the current run of DATA frames
        run_sid = -1
        streams = self.streams
        credit: dict[_StreamTransport, int] = {}  # WNDINC frames, summed per stream
        with memoryview(data) as view:
            try:
                while end - pos >= 8 and not self.closed:
                    word, sid = unpack(data, pos)
                    ftype, length = (word >> 4) & 0xF, word >> 8
                    if length > (WINDOW if ftype == DATA else MAX_CONTROL_BODY):
                        raise MuxError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                    if end - pos - 8 < length:
                        break
                    start = pos + 8
                    pos = start + length
                    sid &= 0x7FFFFFFF
                    if ftype == WNDINC and length == 4:
                        # the SDK credits every read of 8 KiB: a read brings dozens,
                        # applied together once it is parsed (they only add to a window
                        # that is used when the stream is flushed, after the read anyway)
                        t = streams.get(sid)
                        if t is not None:
                            credit[t] = credit.get(t, 0) + U32.unpack_from(data, start)[0]
                        continue
                    if ftype == DATA and not word & 0xF and length:
                        if sid != run_sid and run:
                            self._data_run(run_sid, run, stable)
                            run = []
                        run_sid = sid
                        run.append(view[start:pos])
                        continue
                    if run:
                        self._data_run(run_sid, run, stable)
                        run = []
                    body = bytes(view[start:pos]) if length else b""
                    self._dispatch(ftype, word & 0xF, sid, body)
                if run and not self.closed:
                    self._data_run(run_sid, run, stable)
            finally:
                run = []  # no view may outlive the with block
        for t, inc in credit.items():
            if not t._gone:
                try:
                    t._on_window(inc)
                except MuxError as exc:
                    self._reset(t, exc.code)
        return pos

    def _data_run(self, sid: int, parts: list, stable: bool) -> None:
        t = self.streams.get(sid)
        if t is not None and t._sink is not None and not t._closed:
            n = sum(map(len, parts))
            if self._admit(t, n):
                t._on_parts(parts if stable else [b"".join(parts)], n)
            return
        self._dispatch(DATA, 0, sid, bytes(parts[0]) if len(parts) == 1 else b"".join(parts))

    def _admit(self, t: _StreamTransport, n: int) -> bool:
        """Whether ``n`` more bytes fit ``t``'s window and the session's buffer (if
        not, the stream is reset)."""
        if n > t._recv_window:
            self._reset(t, FLOW_CONTROL_ERROR)
            return False
        if self.buffered + n > self.max_buffered:
            self._reset(t, ENHANCE_YOUR_CALM)
            return False
        return True

    def _quickack(self) -> None:
        """Acknowledge what was read at once (the SDK's small writes otherwise wait out
        the delayed ACK), unless frames leave in this loop pass anyway and carry the
        ACK: frames queued (or a stream credited by this read, flushed in that pass) and
        nothing unsent before them.  (The SDK's TCP upload brings thousands of reads a
        second, each answered with DATA: a setsockopt each was ~4 % of the edge's
        time in py-spy.)"""
        if self._tick_handle is not None and (self._out or self._to_flush):
            try:
                if not self.writer.transport.get_write_buffer_size():
                    return
            except (AttributeError, RuntimeError):
                pass
        if self._sock is not None:
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
            except OSError:
                self._sock.close()
                self._sock = None

    def _dispatch(self, ftype: int, flags: int, sid: int, body: bytes) -> None:
        if ftype == DATA:
            t = self.streams.get(sid)
            if t is None and flags & SYN:
                t = self._accept(sid)
                if t is None:
                    return
            if t is None:
                if not (flags & FIN and not body):
                    self.send_frame(RST, 0, sid, U32.pack(STREAM_CLOSED))
                return
            if self._admit(t, len(body)):
                t._on_data(body, bool(flags & FIN))
        elif ftype == WNDINC:
            if len(body) != 4:
                raise MuxError(PROTOCOL_ERROR, "bad WNDINC frame")
            t = self.streams.get(sid)
            if t is not None:
                try:
                    t._on_window(U32.unpack(body)[0])
                except MuxError as exc:
                    self._reset(t, exc.code)
        elif ftype == RST:
            t = self.streams.get(sid)
            if t is not None:
                t._lost(ConnectionResetError("stream reset by the agent"))
        elif ftype == GOAWAY:
            if sid != 0 or len(body) < 8:
                raise MuxError(PROTOCOL_ERROR, "bad GOAWAY frame")
            self.goaway_received = True
            # the peer opens no more streams; ours still running may finish
        else:
            raise MuxError(PROTOCOL_ERROR, f"unknown frame type {ftype}")

    def _accept(self, sid: int) -> _StreamTransport | None:
        if sid % 2 == 0 or sid <= self._last_remote:
            raise MuxError(PROTOCOL_ERROR, f"bad new stream id {sid}")
        self._last_remote = sid
        if self.goaway_received or len(self.streams) >= self.max_streams:
            self.send_frame(RST, 0, sid, U32.pack(STREAM_REFUSED))
            return None
        st = Stream(self, sid, syn=False)
        self.streams[sid] = st.transport
        self.on_stream(st)
        return st.transport

    def _reset(self, t: _StreamTransport, code: int) -> None:
        self.send_frame(RST, 0, t.id, U32.pack(code))
        t._lost(ConnectionResetError(f"stream reset (code {code})"))


class _Intake(asyncio.BufferedProtocol):
    """A session's connection's protocol while it runs: reads go into buffers of the
    session's, one after another, and no byte in them changes once read.  uvloop's TLS
    decrypts straight into them (an ``asyncio.Protocol`` would get each TLS record in
    a bytes object of its own, and the records of a read joined into one more), and
    DATA bodies are kept as views of them, also when a frame began in an earlier read.
    A new buffer starts with a copy of the partial frame the last one ended with and has
    room for all of that frame, so a frame is copied at most once, however thinly it
    comes.  The rest (the connection's end, flow control of the session's writes) goes
    to the reader's protocol, as before."""

    __slots__ = ("buf", "end", "inner", "session", "start")

    def __init__(self, session: MuxSession, inner: asyncio.StreamReaderProtocol) -> None:
        self.session = session
        self.inner = inner
        # the first buffer: the partial frame the session read before (its own from now on)
        self.buf, session._pending = session._pending, bytearray()
        self.start = 0  # the first byte not parsed yet
        self.end = len(self.buf)  # the end of what was read

    def get_buffer(self, sizehint: int) -> memoryview:
        # uvloop's TLS hints at the bytes it holds (+256), libuv at 64 KiB, asyncio -1
        want = READ_CHUNK if sizehint <= 0 else min(max(sizehint, 4096), READ_CHUNK)
        buf = self.buf
        free = len(buf) - self.end
        if free < want:
            keep = self.end - self.start
            # (a partial frame that fits stays: moving it on every read of a frame
            # that comes in small pieces would copy it over and over)
            if not keep or not free or free < self._rest(buf, keep):
                buf = self._renew(want)
        return memoryview(buf)[self.end :]

    def _rest(self, buf: bytearray, keep: int) -> int:
        """The bytes that the partial frame of ``keep`` bytes at ``start`` still lacks
        (its header's, while that is not whole)."""
        if keep < 8:
            return 8 - keep
        # its length was checked when its header was parsed
        return 8 + (HEADER.unpack_from(buf, self.start)[0] >> 8) - keep

    def _renew(self, want: int) -> bytearray:
        """A new buffer: the bytes not parsed yet (part of a frame), then room for
        ``want`` more and for the rest of that frame."""
        old, keep = self.buf, self.end - self.start
        room = max(want, self._rest(old, keep)) if keep else want
        buf = bytearray(keep + room)
        if keep:
            buf[:keep] = memoryview(old)[self.start : self.end]
        self.buf, self.start, self.end = buf, 0, keep
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        self.end += nbytes
        self.start += self.session._feed_read(memoryview(self.buf)[self.start : self.end])

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()
