"""Raw bidirectional byte relay between two stream pairs (TCP tunnels, upgrades)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from backend import direct, splice, tlsrelay
from backend.http1 import drain, read_some

BLOCK = 256 * 1024
# how a copy learns that one of its connections is gone: WriteTimeout is an OSError, and
# uvloop's write() to a closed connection raises RuntimeError ("the handler is closed")
_GONE = (ConnectionError, OSError, RuntimeError)


def tune(writer: asyncio.StreamWriter) -> None:
    """Set TCP_NODELAY and large buffers on the socket behind a writer, if any."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stall_timeout: float | None = None
) -> int:
    """Copy until EOF, then half-close the writer (or close it if it cannot).  A writer
    that takes nothing for ``stall_timeout`` seconds ends the copy (and is aborted)."""
    if _direct_ok(reader, writer):
        return await _direct_pipe(reader, writer, stall_timeout)
    total = 0
    try:
        while chunk := await read_some(reader, BLOCK):
            total += len(chunk)
            writer.write(chunk)
            await drain(writer, stall_timeout)
    except _GONE:
        pass
    finally:
        _half_close(writer)
    return total


def _half_close(writer: asyncio.StreamWriter) -> None:
    """The copy's end: half-close the writer (or close it if it cannot)."""
    try:
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
        else:
            writer.close()
    except (OSError, RuntimeError):
        writer.close()


def _direct_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether ``reader``'s socket can hand its reads straight to ``writer``: what
    :func:`direct.can_forward` asks, on a plain socket transport, and a writer whose
    transport keeps the bytes it is given without copying them (a muxado stream's)."""
    return (
        getattr(writer.transport, "keeps_written_bytes", False)
        and direct.can_forward(reader, writer)
        and reader._transport.get_extra_info("ssl_object") is None  # type: ignore[attr-defined]
        and reader._transport.get_extra_info("socket") is not None  # type: ignore[attr-defined]
    )


async def _direct_pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stall_timeout: float | None
) -> int:
    """:func:`pipe` with the socket's protocol swapped for :class:`direct.Forward` (an SDK
    session's TCP upload spent a fifth of the edge's loop in the StreamReader's copies
    and the copying task)."""
    # paused by the loop, after the reads it delivers meanwhile: pausing in the read
    # itself cost the SDK's TCP upload ~15 % in a same-run A/B (fewer bytes in flight)
    fwd = direct.Forward.of(reader, writer, pause_at_once=False)
    try:
        await direct.forward(reader, writer, fwd, lambda w: drain(w, stall_timeout))
        await drain(writer, stall_timeout)
    except _GONE:
        pass
    finally:
        _half_close(writer)
    return fwd.total


async def relay(
    a_r: asyncio.StreamReader,
    a_w: asyncio.StreamWriter,
    b_r: asyncio.StreamReader,
    b_w: asyncio.StreamWriter,
    stall_timeout: float | None = None,
) -> tuple[int, int]:
    """Relay a↔b until both directions end; returns (bytes a→b, bytes b→a).

    Two plain sockets are relayed with splice(2) (no copies through Python), a TLS data
    connection and a plain socket in two threads (backend/tlsrelay.py); anything else
    (other TLS) through the stream pairs.  A side that takes none of the
    bytes waiting for it for ``stall_timeout`` seconds ends the relay (idle is fine).
    """
    if splice.spliceable(a_w) and splice.spliceable(b_w):
        try:
            return await splice.splice_relay(a_r, a_w, b_r, b_w, stall_timeout)
        except (OSError, RuntimeError):
            close(a_w)
            close(b_w)
            return 0, 0
    if tlsrelay.available(a_w, b_w):
        try:
            return await tlsrelay.thread_relay(a_r, a_w, b_r, b_w, stall_timeout)
        except (OSError, RuntimeError):
            close(a_w)
            close(b_w)
            return 0, 0
    t1 = asyncio.ensure_future(pipe(a_r, b_w, stall_timeout))
    t2 = asyncio.ensure_future(pipe(b_r, a_w, stall_timeout))
    try:
        up, down = await asyncio.gather(t1, t2)
    finally:
        t1.cancel()
        t2.cancel()
        close(a_w)
        close(b_w)
    return up, down


def close(writer: asyncio.StreamWriter | None) -> None:
    """Close a connection, also when a spliced relay has taken it over."""
    if writer is not None:
        splice.abort(writer)
        with contextlib.suppress(Exception):
            writer.close()
