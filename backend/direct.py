"""Reads handed straight to a writer: a connection's protocol swapped for a forwarder.

A relay through a StreamReader copies every byte twice (``feed_data`` into the reader's
buffer, a read out of it) and wakes the relaying task once per read.  For the length
of a relay, :class:`Forward` stands in for the reader's StreamReaderProtocol: what the
connection reads goes to the writer's transport as it arrives, and the task wakes only
when the writer backs up or the relay ends.  The rest (the connection's loss, flow
control of the other direction) goes to the protocol it stands in for, which gets the
connection back afterwards.

Two uses:

- :func:`backend.relay.pipe` (raw relays until EOF; an SDK session's TCP upload);
- :func:`body`, a message body of known length (``relay_body`` for Content-Length
  bodies, e.g. responses over TLS data connections, whose TLS transport hands over
  views of one reused buffer, copied once here instead of twice).

This module does not import :mod:`backend.http1` (which uses it): the callers pass
their ``drain``.
"""

from __future__ import annotations

import asyncio

BLOCK = 256 * 1024  # bytes the writer may hold before the connection is paused


class Forward(asyncio.Protocol):
    """A connection's protocol for the length of a direct relay (see the module).

    ``left``: the bytes to forward (None: until EOF); what comes after them goes to the
    inner protocol, and so to its reader.  ``tee`` sees every forwarded chunk."""

    def __init__(
        self,
        inner: asyncio.StreamReaderProtocol,
        sink: asyncio.WriteTransport,
        wake: asyncio.Event,
        left: int | None = None,
        tee=None,
        source: asyncio.ReadTransport | None = None,
        pause_at_once: bool = True,
    ) -> None:
        self.inner = inner
        self.sink = sink
        self.wake = wake
        self.left = left
        self.tee = tee
        self.source = source
        # the source is paused in the read that backs the sink up (else by the relay, after
        # the reads the loop delivers meanwhile: more in flight, for a raw pipe's upload)
        self.pause_at_once = pause_at_once
        self.paused = False
        self.total = 0
        self.done = False  # ``left`` bytes forwarded
        self.eof = False
        self.lost = False

    @classmethod
    def of(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, left: int | None = None, tee=None, pause_at_once: bool = True) -> Forward:
        """A Forward standing in for ``reader``'s protocol, towards ``writer``."""
        transport = reader._transport  # type: ignore[attr-defined]
        return cls(transport.get_protocol(), writer.transport, asyncio.Event(), left, tee, transport, pause_at_once)

    def data_received(self, data) -> None:
        if self.done:  # read after the body, before the relay gave the connection back
            self.inner.data_received(data)
            return
        rest = None
        left = self.left
        if left is not None and len(data) >= left:
            if len(data) > left:
                rest = data[left:]
                data = data[:left]
            self.done = True
        if type(data) is not bytes:
            # a view of a buffer the transport reuses (TLS): a transport may keep what
            # it is given until it is sent
            data = bytes(data)
        n = len(data)
        self.total += n
        if left is not None:
            self.left = left - n
        if self.tee is not None:
            self.tee(data)
        self.sink.write(data)
        if self.done:
            self.wake.set()
            if rest:
                self.inner.data_received(rest)
        elif self.sink.get_write_buffer_size() > BLOCK or self.sink.is_closing():
            # the connection waits until the writer drains: the event loop may deliver
            # several reads before the relay runs again
            if self.pause_at_once and self.source is not None and not self.paused:
                self.source.pause_reading()
                self.paused = True
            self.wake.set()

    def eof_received(self) -> bool:
        self.eof = True
        self.wake.set()
        if self.left is None:
            return True  # a raw relay: the other direction may go on writing (half-close)
        return bool(self.inner.eof_received())  # the reader sees the EOF

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.wake.set()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def can_forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether :func:`forward` can relay from ``reader`` to ``writer``: a plain
    StreamReader of an open connection (any transport with ``set_protocol``, TLS
    included), and a writer with a live transport."""
    transport = getattr(reader, "_transport", None)
    out = getattr(writer, "transport", None)
    return (
        type(reader) is asyncio.StreamReader
        and transport is not None
        and out is not None
        and hasattr(out, "get_write_buffer_size")
        and not out.is_closing()
        and not transport.is_closing()
        and isinstance(transport.get_protocol(), asyncio.StreamReaderProtocol)
        and reader.exception() is None
        and not reader._eof  # type: ignore[attr-defined]
    )


async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fwd: Forward, drain, prefix: bytes = b"") -> None:
    """Copy ``reader``'s next ``fwd.left`` bytes (None: until EOF) to ``writer``, after
    ``prefix``: what the reader holds at once, the rest handed over as the connection
    reads it (``fwd``, :meth:`Forward.of` the two, in place of the reader's protocol
    until then; its ``total``, ``left``, ``eof`` and ``lost`` tell how it went).
    ``drain(writer)`` waits for the writer (and enforces its deadline).  Raises
    ConnectionResetError when the writer's connection closes first."""
    transport, inner, out, wake, n, tee = fwd.source, fwd.inner, fwd.sink, fwd.wake, fwd.left, fwd.tee
    buf = reader._buffer  # type: ignore[attr-defined]  # what the reader has already
    if buf:
        take = len(buf) if n is None else min(len(buf), n)
        with memoryview(buf) as view:
            chunk = view[:take].tobytes()
        del buf[:take]
        fwd.total = take
        if n is not None:
            fwd.left = n - take
            fwd.done = not fwd.left
        if tee is not None:
            tee(chunk)
        prefix = prefix + chunk if prefix else chunk
    if prefix:
        out.write(prefix)
    if fwd.done or reader._eof or reader.exception() is not None:  # type: ignore[attr-defined]
        fwd.eof = reader._eof  # type: ignore[attr-defined]
        reader._maybe_resume_transport()  # type: ignore[attr-defined]
        return
    transport.set_protocol(fwd)
    reader._paused = False  # type: ignore[attr-defined]
    transport.resume_reading()  # the StreamReader may have paused it
    # a writer whose connection ends wakes the relay even while the reader gets nothing
    gone = asyncio.ensure_future(writer.wait_closed())
    gone.add_done_callback(lambda f: (f.cancelled() or f.exception(), wake.set()))
    try:
        while not (fwd.done or fwd.eof or fwd.lost):
            await wake.wait()
            wake.clear()
            if out.is_closing():
                raise ConnectionResetError("the writer's connection is closed")
            ended = fwd.done or fwd.eof or fwd.lost
            if not fwd.paused and not ended and out.get_write_buffer_size() > BLOCK:
                transport.pause_reading()
                fwd.paused = True
            if fwd.paused and not ended:
                await drain(writer)
                fwd.paused = False
                transport.resume_reading()
    finally:
        gone.cancel()
        if not fwd.lost:
            if transport.get_protocol() is fwd:
                transport.set_protocol(inner)
            if fwd.paused and not transport.is_closing():
                transport.resume_reading()


async def body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, prefix: bytes, tee, drain) -> int:
    """:func:`forward` of a message body of ``n`` bytes: returns the bytes that did not
    come (the connection ended first); raises what a read would."""
    fwd = Forward.of(reader, writer, n, tee)
    await forward(reader, writer, fwd, drain, prefix)
    missing = fwd.left or 0
    if missing and reader.exception() is not None:
        raise reader.exception()
    await drain(writer)
    return missing
