"""TLS data connections that can half-close (TLS 1.3 close_notify, then a FIN).

asyncio's and uvloop's TLS transports cannot half-close: ``write_eof()`` is not
supported, and a peer's close_notify shuts the whole connection down.  TLS 1.3 closes
each direction on its own (RFC 8446 §6.1): one side sends close_notify and keeps
reading.  So a TLS data connection between agent and edge runs its TLS here, on a
plain socket transport, with an ``ssl.SSLObject`` over memory BIOs (what asyncio's
``sslproto`` does too): the stream pair's ``write_eof()`` sends close_notify and a FIN,
and its reader ends at the peer's close_notify while writing goes on.  A raw relay's
half-close then crosses the tunnel as it does over plain data connections.

The agent offers the ALPN protocol :data:`ALPN` on its data connections; the edge peeks
at the ClientHello and runs those through here (everything else, and data connections
of agents that do not offer it, through the event loop's TLS as before).  Below TLS 1.3
nothing half-closes: ``can_write_eof()`` is False and a close_notify closes the
connection, as before.  Once both directions are done the connection closes itself.

``SSLObject.unwrap()`` sends close_notify and, on a non-blocking memory BIO, ends with
``SSLWantReadError`` (it then tries to read the peer's close_notify).  That read fails
with APPLICATION_DATA_AFTER_CLOSE_NOTIFY if a whole application-data record waits in
the incoming BIO, so every record is decrypted as soon as it arrives and once more right
before ``unwrap()``: the BIO then holds at most part of a record, and OpenSSL goes on
decrypting later records for ``read()`` after our close_notify.

Not done instead: taking a connection over from the loop's TLS transport after the
handshake (uvloop's is Cython, its SSLObject and BIOs out of reach; asyncio's acts on a
close_notify that arrives before the takeover by closing), an in-band end-of-stream
marker (TLS already has one), or blocking ``ssl.SSLSocket`` connections (an
``SSLSocket`` cannot half-close: ``unwrap()`` waits for the peer's close_notify).  Raw
relays (TCP tunnels, upgrades) do leave the loop: :mod:`backend.tlsrelay` takes this
connection's ``SSLObject`` and BIOs (:meth:`HalfCloseTLS.state`) into two threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from typing import NamedTuple

ALPN = "burrow-data/1"
READ = 256 * 1024  # bytes per socket read, and plaintext per batch to the app
RECORD = 16 * 1024  # a TLS record's plaintext at most
WRITE = 64 * 1024  # plaintext encrypted per BIO read (the bytes stay below malloc's
# mmap threshold: a 256 KiB bytes object per write costs an mmap, page faults, munmap)
CLOSE_TIMEOUT = 30.0  # a closed connection whose peer takes none of the rest is aborted


_local = threading.local()


def _buffers() -> tuple[memoryview, memoryview]:
    """This thread's (records in, plaintext out) buffers, made on first use."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = (memoryview(bytearray(READ)), memoryview(bytearray(READ)))
    return bufs


class State(NamedTuple):
    """A connection's TLS, handed over to a relay in threads (backend/tlsrelay.py)."""

    sslobj: ssl.SSLObject
    incoming: ssl.MemoryBIO  # at most part of a record
    outgoing: ssl.MemoryBIO  # empty
    read_eof: bool
    eof_sent: bool


class HalfCloseTLS(asyncio.BufferedProtocol, asyncio.Transport):
    """The socket transport's protocol and the stream pair's transport: TLS records in,
    plaintext out, each direction closed on its own."""

    def __init__(self, ctx: ssl.SSLContext, server_side: bool, server_hostname: str | None, limit: int) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._sslobj = ctx.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=server_hostname)
        self._limit = limit
        self._raw: asyncio.Transport | None = None
        self._app: asyncio.Protocol | None = None
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._ready: asyncio.Future = self._loop.create_future()  # the handshake's end
        # (retrieved here too, so that a handshake given up on logs nothing)
        self._ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        # records in, plaintext out: buffers of this thread's event loop, shared by its
        # connections (each is filled and emptied within one callback: the socket
        # transport's get_buffer/buffer_updated pair, and _decrypt, whose app copies
        # what it is given), so an idle connection holds none of its 2 x 256 KiB
        self._view, self._plain = _buffers()
        self._read_eof = False  # the peer's close_notify (or FIN) has arrived
        self._eof_sent = False  # our close_notify has gone out
        self._closing = False
        self._lost = False
        self._app_paused = False  # the app was told to stop writing
        self._reading_paused = False  # the app asked us to stop reading
        self._close_timer: asyncio.TimerHandle | None = None
        self._error: Exception | None = None  # why we aborted, for the app's reader

    # ------------------------------------------------ protocol side (socket transport)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]
        self._handshake()

    def _handshake(self) -> None:
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError, ValueError) as exc:
            self._flush()  # the alert, if any
            self._fail(exc)
            return
        self._flush()
        loop = self._loop
        reader = asyncio.StreamReader(limit=self._limit, loop=loop)
        proto = asyncio.StreamReaderProtocol(reader, loop=loop)
        self._app = proto
        proto.connection_made(self)
        self._streams = (reader, asyncio.StreamWriter(self, proto, reader, loop))
        if not self._ready.done():
            self._ready.set_result(None)
        self._decrypt()  # records that came in with the handshake's last flight

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        if self._read_eof or self._closing:
            return  # nothing after the peer's close_notify is for us
        self._in.write(self._view[:nbytes])
        if self._app is None:
            self._handshake()
        else:
            self._decrypt()

    def _decrypt(self) -> None:
        """Hand every whole record waiting in the incoming BIO to the app: decrypted into
        one buffer (no allocation per record) and passed on in batches of up to READ
        bytes (the StreamReader copies them into its own buffer)."""
        app = self._app
        if self._read_eof or app is None:
            return
        eof = False
        sslobj, plain, incoming = self._sslobj, self._plain, self._in
        got = 0
        try:
            # a read consumes a whole record (each fits in what is left of ``plain``), so
            # an empty BIO means nothing left to decrypt: no SSLWantReadError to raise
            while incoming.pending:
                n = sslobj.read(READ - got, plain[got:] if got else plain)
                if not n:  # close_notify (SSLObject.read returns 0 for it)
                    eof = True
                    break
                got += n
                if READ - got < RECORD:
                    app.data_received(plain[:got])
                    got = 0
        except ssl.SSLWantReadError:
            pass  # part of a record: the rest is on its way
        except ssl.SSLZeroReturnError:
            eof = True
        except (ssl.SSLError, ValueError) as exc:
            self._fail(exc)
            return
        if got:
            app.data_received(plain[:got])
        if self._out.pending:  # TLS 1.3 post-handshake answers (a key update)
            self._flush()
        if eof:
            self._read_eof = True
            app.eof_received()
            # TLS 1.2 has no half-close (close as asyncio does); both directions done
            if self._eof_sent or not self.can_write_eof():
                self.close()

    def eof_received(self) -> bool:
        """A FIN.  Without close_notify before it, it ends the reading side all the same
        (asyncio's TLS transports treat it so too); the socket stays open for writing."""
        if self._app is None:
            self._fail(ConnectionResetError("connection closed during the TLS handshake"))
            return False
        if not self._read_eof:
            self._read_eof = True
            self._app.eof_received()
        if self._eof_sent:  # both directions done
            self.close()
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        err = exc or self._error
        if not self._ready.done():
            self._ready.set_exception(err or ConnectionResetError("connection lost during the TLS handshake"))
        if self._app is not None:
            self._app.connection_lost(err)

    def pause_writing(self) -> None:
        if not self._app_paused and self._app is not None:
            self._app_paused = True
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app_paused and self._app is not None:
            self._app_paused = False
            self._app.resume_writing()

    # ---------------------------------------------------- transport side (the app's)
    def _flush(self) -> None:
        data = self._out.read()
        if data and self._raw is not None and not self._raw.is_closing():
            self._raw.write(data)

    def write(self, data) -> None:
        if self._eof_sent and not self._closing:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._closing or not data:
            return
        sslobj, out = self._sslobj, self._out
        view = memoryview(data)
        try:  # (a memory BIO takes every write whole)
            if view.nbytes <= WRITE:
                sslobj.write(view)
                records = out.read()
            else:
                records = []
                for i in range(0, view.nbytes, WRITE):
                    sslobj.write(view[i : i + WRITE])
                    records.append(out.read())
        except (ssl.SSLError, ValueError) as exc:
            self._fail(exc)
            return
        raw = self._raw
        if raw is not None and not raw.is_closing():
            if isinstance(records, bytes):
                raw.write(records)
            else:
                raw.writelines(records)  # one writev for all of it

    def writelines(self, list_of_data) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return self._sslobj.version() == "TLSv1.3"

    def write_eof(self) -> None:
        """Send close_notify, then a FIN; reading goes on until the peer's close_notify."""
        if not self.can_write_eof():
            raise NotImplementedError("half-close needs TLS 1.3")
        if self._eof_sent or self._closing:
            return
        self._send_close_notify()
        if self._read_eof:  # both directions done
            self.close()
        elif self._raw is not None and not self._raw.is_closing():
            self._raw.write_eof()

    def _send_close_notify(self) -> None:
        if self._eof_sent:
            return
        self._eof_sent = True
        self._decrypt()  # no whole record may wait in the BIO while unwrap() reads
        try:
            self._sslobj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass  # our close_notify is out; the peer's is still to come
        except (ssl.SSLError, ValueError):
            pass  # a broken connection: it is closed or aborted next anyway
        self._flush()

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def close(self) -> None:
        """Send close_notify (if not sent yet), flush, close; a peer that takes none of
        what is left for CLOSE_TIMEOUT seconds gets the connection aborted."""
        if self._closing or self._raw is None:
            return
        if not self._lost and self._app is not None:
            with contextlib.suppress(Exception):
                self._send_close_notify()
        self._closing = True
        if not self._lost and self._raw.get_write_buffer_size():
            self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self._raw.abort)
        self._raw.close()

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def _fail(self, exc: Exception) -> None:
        """A TLS error: abort; the reader gets ``exc`` when the socket reports the loss."""
        if self._error is None:
            self._error = exc
        self.abort()

    def get_write_buffer_size(self) -> int:
        return (self._raw.get_write_buffer_size() if self._raw is not None else 0) + self._out.pending

    def get_write_buffer_limits(self) -> tuple[int, int]:
        assert self._raw is not None
        return self._raw.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def is_reading(self) -> bool:
        return not self._reading_paused and self._raw is not None and self._raw.is_reading()

    def pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            if self._raw is not None and not self._raw.is_closing():
                self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if self._raw is not None and not self._raw.is_closing():
                self._raw.resume_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app  # type: ignore[return-value]

    def get_extra_info(self, name: str, default=None):
        if name == "ssl_object":
            return self._sslobj
        if name == "sslcontext":
            return self._sslobj.context
        if name == "peercert":
            return self._sslobj.getpeercert()
        if name == "cipher":
            return self._sslobj.cipher()
        if name == "compression":
            return self._sslobj.compression()
        return self._raw.get_extra_info(name, default) if self._raw is not None else default

    def can_detach(self) -> bool:
        """Whether a relay in threads may take the connection over (TLS 1.3, open)."""
        return self._app is not None and not self.is_closing() and self.can_write_eof()

    def state(self) -> State:
        """The TLS state, once the socket has been taken away (``splice.detach``: reading
        paused, the write buffer empty, the transport aborted without a close_notify)."""
        return State(self._sslobj, self._in, self._out, self._read_eof, self._eof_sent)

    async def _wait_ready(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            await asyncio.shield(self._ready)
        except BaseException:
            self.abort()
            raise
        assert self._streams is not None
        return self._streams


async def open_connection(
    host: str, port: int, ctx: ssl.SSLContext, server_hostname: str | None, limit: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Dial, handshake as a client and return the stream pair (cancel to give up)."""
    half = HalfCloseTLS(ctx, False, server_hostname, limit)
    await asyncio.get_running_loop().create_connection(lambda: half, host, port)
    return await half._wait_ready()


async def accept(
    sock: socket.socket, ctx: ssl.SSLContext, limit: int, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Handshake as a server on an accepted socket (TimeoutError after ``timeout``)."""
    half = HalfCloseTLS(ctx, True, None, limit)
    await asyncio.get_running_loop().connect_accepted_socket(lambda: half, sock)
    return await asyncio.wait_for(half._wait_ready(), timeout)


def data_context(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """``ctx`` offering :data:`ALPN` (set on ``ctx`` itself: a client context made for
    data connections only)."""
    ctx.set_alpn_protocols([ALPN])
    return ctx
