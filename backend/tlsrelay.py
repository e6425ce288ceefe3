"""Raw relays over TLS data connections, in threads (TCP tunnels, upgraded connections).

A raw relay between a TLS data connection (:mod:`backend.tlshalf`) and a plain socket,
or two of them, leaves the event loop: both connections are detached from their
transports (as :mod:`backend.splice` does for plain ones) and two threads, one per
direction, move the bytes with blocking socket calls.  The TLS connection keeps its
``ssl.SSLObject`` and memory BIOs (TLS 1.3 half-close works as on the loop); what
changes is who drives them: ``recv_into``/``sendall`` on the socket and the
encryption and decryption all run without the GIL, in big chunks, with no event-loop
round trip, stream-reader buffer or task wake-up per chunk.

Both threads use one ``SSLObject`` (OpenSSL does not allow concurrent calls on one
connection), so each SSL call runs under the connection's lock; socket reads run
outside it, and encrypted bytes leave in the order they were made (the send lock is
taken before the SSL lock is let go).  A record that arrives is decrypted under the
same lock hold that put it into the BIO, so the incoming BIO never holds a whole record
when ``unwrap()`` sends our close_notify (see :mod:`backend.tlshalf`).

Threads are kept for the next relay (up to :data:`MAX_IDLE`, for
:data:`IDLE_SECONDS`): through TLS, TCP connections that carry a few bytes each are
dominated by their handshake already, a thread start each would add to it.
Bounded: at most :data:`MAX_THREADED` relays run in threads per process; more (and
TLS below 1.3, and TLS other than a data connection's) go through the event loop's
stream relay.  A relay ended from outside (``relay.close`` of one of its writers) or a
cancelled caller shuts both sockets down, which wakes the blocked threads; the last
thread to finish closes the sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import socket
import ssl
import struct
import threading

from backend import splice, tlshalf

CHUNK = 256 * 1024  # bytes per socket read
MAX_THREADED = 64  # relays in threads per process (two threads each)
MAX_IDLE = 8  # relay threads kept waiting for the next relay
IDLE_SECONDS = 30.0  # how long an idle relay thread waits before it ends
_active = 0  # relays in threads now (changed on the event loop's thread only)
_busy = 0  # relay threads at work now
_idle: list[_Worker] = []
_pool_lock = threading.Lock()


def available(*writers: asyncio.StreamWriter) -> bool:
    """Whether a relay between these writers can run in threads: one at least a TLS 1.3
    data connection, the others that or a plain socket, and a thread pair free."""
    if _active >= MAX_THREADED or not any(_tls_of(w) for w in writers):
        return False
    for w in writers:
        half = _tls_of(w)
        if half is None and not splice.spliceable(w):
            return False
        if half is not None and not half.can_detach():
            return False
    return True


def _tls_of(writer: asyncio.StreamWriter) -> tlshalf.HalfCloseTLS | None:
    t = writer.transport
    return t if isinstance(t, tlshalf.HalfCloseTLS) else None


class _Buffers:
    """A worker thread's buffers: socket reads, and the plaintext of one TLS read (at
    most what came in plus the part of a record left over before)."""

    def __init__(self) -> None:
        self.raw = memoryview(bytearray(CHUNK))
        self.plain = memoryview(bytearray(CHUNK + 2 * tlshalf.RECORD))


class _Worker(threading.Thread):
    """A relay thread that, its job done, waits :data:`IDLE_SECONDS` for the next one
    (a short TCP connection then costs no thread start and no fresh buffers)."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="tls-relay")
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.bufs = _Buffers()

    def run(self) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with _pool_lock:
                    if self in _idle:  # nobody picked this thread meanwhile: end
                        _idle.remove(self)
                        return
                job = self.jobs.get()  # picked: its job is on the way
            job(self.bufs)
            with _pool_lock:
                if len(_idle) >= MAX_IDLE:
                    return
                _idle.append(self)


def _submit(job) -> None:
    """Run ``job(buffers)`` in an idle relay thread, or a new one."""
    with _pool_lock:
        worker = _idle.pop() if _idle else None
    if worker is None:
        worker = _Worker()
        worker.start()
    worker.jobs.put(job)


def busy() -> int:
    """Relay threads at work now (for tests)."""
    return _busy


class _Plain:
    """A plain socket end: blocking reads into one buffer, ``sendall`` writes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read(self, bufs: _Buffers) -> memoryview:
        n = self.sock.recv_into(bufs.raw)
        return bufs.raw[:n]

    def write(self, data) -> None:
        self.sock.sendall(data)

    def write_eof(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)


class _TLS:
    """A TLS data connection's end: the detached ``SSLObject`` with its BIOs."""

    def __init__(self, sock: socket.socket, state: tlshalf.State) -> None:
        self.sock = sock
        self.obj, self.inc, self.out = state.sslobj, state.incoming, state.outgoing
        self.read_eof, self.eof_sent = state.read_eof, state.eof_sent
        self.lock = threading.Lock()  # the SSLObject and its BIOs
        self.send_lock = threading.Lock()  # encrypted bytes onto the socket, in order

    def read(self, bufs: _Buffers) -> memoryview:
        """The next plaintext (empty at the peer's close_notify or FIN)."""
        raw, plain = bufs.raw, bufs.plain
        while not self.read_eof:
            n = self.sock.recv_into(raw)
            if not n:  # a FIN, with or without close_notify before it: reading ends
                self.read_eof = True
                break
            with self.lock:
                self.inc.write(raw[:n])
                got = self._decrypt(plain)
                if self.out.pending:  # TLS 1.3 post-handshake answers (a key update)
                    self._send_locked()
            if got:
                return plain[:got]
        return plain[:0]

    def _decrypt(self, plain: memoryview) -> int:
        """Every whole record waiting in the BIO, into ``plain`` (lock held)."""
        got = 0
        try:
            while got < len(plain):
                n = self.obj.read(len(plain) - got, plain[got:])
                if not n:
                    self.read_eof = True
                    break
                got += n
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.read_eof = True
        return got

    def _send_locked(self) -> None:
        """Send what the BIO holds; called with ``self.lock`` held, which is let go as
        soon as the send lock is ours (bytes leave in the order they were made)."""
        data = self.out.read()
        self.send_lock.acquire()
        self.lock.release()
        try:
            self.sock.sendall(data)
        finally:
            self.send_lock.release()
            self.lock.acquire()

    def write(self, data) -> None:
        view = memoryview(data)
        for i in range(0, view.nbytes, tlshalf.WRITE):  # (the reader gets the lock between)
            with self.lock:
                self.obj.write(view[i : i + tlshalf.WRITE])  # a memory BIO takes it whole
                self._send_locked()

    def write_eof(self) -> None:
        """close_notify, then a FIN; the peer may go on sending."""
        with self.lock:
            if not self.eof_sent:
                self.eof_sent = True
                # the incoming BIO holds at most part of a record (read() decrypts
                # every whole one under this lock), so unwrap() cannot trip on one
                with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    self.obj.unwrap()
                self._send_locked()
        self.sock.shutdown(socket.SHUT_WR)


class ThreadRelay:
    """Two threads relaying a ↔ b; ``done`` (a future of the loop) when both end."""

    def __init__(self, a, b, a_pending: bytes, b_pending: bytes, stall_timeout: float | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.ends = (a, b)
        self.done = self.loop.create_future()
        self.totals = [len(a_pending), len(b_pending)]
        self.failed = False
        self._left = 2
        self._lock = threading.Lock()
        for end in self.ends:
            if stall_timeout is not None:  # a send that moves nothing for this long fails
                tv = struct.pack("ll", int(stall_timeout), int(stall_timeout % 1 * 1e6))
                end.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self._jobs = [
            functools.partial(self._pump, 0, a, b, a_pending),
            functools.partial(self._pump, 1, b, a, b_pending),
        ]

    def start(self) -> None:
        for job in self._jobs:
            _submit(job)

    def _pump(self, i: int, src, dst, pending: bytes, bufs: _Buffers) -> None:
        global _busy
        with _pool_lock:
            _busy += 1
        try:
            if pending:
                dst.write(pending)
            while data := src.read(bufs):
                dst.write(data)
                self.totals[i] += len(data)
            dst.write_eof()
        except (OSError, ssl.SSLError, ValueError):
            self.abort()
        finally:
            with self._lock:
                self._left -= 1
                last = not self._left
            if last:
                self._close()
            with _pool_lock:
                _busy -= 1

    def abort(self) -> None:
        """End both directions now (from any thread): blocked calls wake up."""
        self.failed = True
        for end in self.ends:
            with contextlib.suppress(OSError):
                end.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                end.sock.shutdown(socket.SHUT_RDWR)

    def _close(self) -> None:
        for end in self.ends:
            end.sock.close()
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown)
            self.loop.call_soon_threadsafe(_resolve, self.done)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


async def _end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float | None):
    """Take one connection over from its transport: (its end, bytes already read)."""
    half = _tls_of(writer)
    sock, pending = await splice.detach(reader, writer, timeout)
    sock.setblocking(True)
    if half is None:
        return _Plain(sock), pending
    return _TLS(sock, half.state()), pending  # plaintext decrypted but not yet read


async def thread_relay(
    a_r: asyncio.StreamReader,
    a_w: asyncio.StreamWriter,
    b_r: asyncio.StreamReader,
    b_w: asyncio.StreamWriter,
    stall_timeout: float | None = None,
) -> tuple[int, int]:
    """Relay a ↔ b in two threads until both directions end; (bytes a→b, b→a)."""
    global _active
    task = asyncio.current_task()
    assert task is not None
    splice._running[a_w] = splice._running[b_w] = task
    _active += 1
    ends: list[_Plain | _TLS] = []
    relay: ThreadRelay | None = None
    try:
        for r, w in ((a_r, a_w), (b_r, b_w)):
            end, pending = await _end(r, w, stall_timeout)
            ends.append((end, pending))
        (a, a_pending), (b, b_pending) = ends
        relay = ThreadRelay(a, b, a_pending, b_pending, stall_timeout)
        relay.start()
        await asyncio.shield(relay.done)
        return relay.totals[0], relay.totals[1]
    except asyncio.CancelledError:
        if relay is not None:
            relay.abort()  # the threads wake up, end and close the sockets
        if task not in splice._aborted or task.uncancel() > 0:
            raise
        # ended by splice.abort() (its writer closed): not a cancellation of the caller.
        # The threads end at once (abort shut their sockets); wait for them, bounded, so
        # the counts include what they moved last
        if relay is None:
            return 0, 0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(relay.done), 5)
        return relay.totals[0], relay.totals[1]
    finally:
        _active -= 1
        splice._aborted.discard(task)
        for w in (a_w, b_w):
            if splice._running.get(w) is task:
                del splice._running[w]
        if relay is None:
            for end, _ in ends:
                end.sock.close()
