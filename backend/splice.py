"""Zero-copy relay between two plain TCP sockets with ``splice(2)`` through a pipe.

Used for raw relays (TCP and passed-through TLS tunnels, upgraded connections) when
both sides are plain sockets on Linux.  The bytes go socket → pipe → socket inside the
kernel; Python only sees readiness events, one per up-to-a-pipe-full of data.

The sockets start out owned by asyncio transports with stream readers in front of them.
:func:`detach` takes one over: it stops the transport reading, hands back whatever the
reader had already buffered, waits for the transport's write buffer to empty, and
returns a duplicate of the socket before closing the transport (closing one of two
descriptors of a socket does not end the connection).

Pipes come from a small per-process free list and are held only while data sits in
them, so an idle relayed connection costs no pipe descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import socket
from collections.abc import Callable

PIPE_SIZE = 1024 * 1024
FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
MAX_ROUNDS = 8  # splices per readiness event before giving the loop back
_FREE_MAX = 64  # empty pipes kept for reuse

# BURROW_NO_SPLICE=1 turns it off (to compare against the stream relay).
AVAILABLE = (
    hasattr(os, "splice")
    and hasattr(fcntl, "F_SETPIPE_SZ")
    and not os.environ.get("BURROW_NO_SPLICE")
)

_free: list[tuple[int, int]] = []
_pipe_size = PIPE_SIZE


def _take_pipe() -> tuple[int, int]:
    global _pipe_size
    if _free:
        return _free.pop()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _pipe_size)
    except OSError:  # above /proc/sys/fs/pipe-max-size for this user: keep the default
        _pipe_size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    return r, w


def _give_pipe(p: tuple[int, int]) -> None:
    """Return an empty pipe to the free list (or close it)."""
    if len(_free) < _FREE_MAX:
        _free.append(p)
    else:
        _close_pipe(p)


def _close_pipe(p: tuple[int, int]) -> None:
    for fd in p:
        with contextlib.suppress(OSError):
            os.close(fd)


def _buffer_of(reader: asyncio.StreamReader) -> bytearray | None:
    # StreamReader has no public "take what is buffered without waiting"; its buffer
    # is a bytearray attribute in every CPython version this project supports.
    buf = getattr(reader, "_buffer", None)
    return buf if isinstance(buf, bytearray) else None


def spliceable(writer: asyncio.StreamWriter) -> bool:
    """True for a writer over a plain (not TLS) TCP or Unix stream socket."""
    if not AVAILABLE or writer.transport.is_closing():
        return False
    if (
        writer.get_extra_info("ssl_object") is not None
        or writer.get_extra_info("sslcontext") is not None
    ):
        return False
    sock = writer.get_extra_info("socket")
    return sock is not None and sock.fileno() >= 0 and sock.type == socket.SOCK_STREAM


async def detach(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float | None = None
) -> tuple[socket.socket, bytes]:
    """Take the socket away from its transport: (duplicate socket, bytes already read)."""
    transport = writer.transport
    transport.pause_reading()
    buf = _buffer_of(reader)
    assert buf is not None
    pending = bytes(buf)
    buf.clear()
    await _drain_all(writer, timeout)
    sock = writer.get_extra_info("socket")
    dup = socket.socket(fileno=os.dup(sock.fileno()))
    dup.setblocking(False)
    transport.abort()  # closes the transport's descriptor only; the connection stays
    return dup, pending


async def drain_within(
    writer: asyncio.StreamWriter, timeout: float | None, stall: type[Exception] = TimeoutError
) -> None:
    """``writer.drain()``, giving up (the connection aborted, ``stall`` raised) when the
    peer takes nothing for ``timeout`` seconds.  The timer is armed only when bytes are
    waiting, so the common case costs what ``drain()`` does."""
    if timeout is None or not writer.transport.get_write_buffer_size():
        await writer.drain()
        return
    transport = writer.transport
    fired = False

    def expire() -> None:
        nonlocal fired
        fired = True
        transport.abort()

    timer = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        await writer.drain()
    except OSError:
        if fired:
            raise stall(f"no progress for {timeout:g}s") from None
        raise
    finally:
        timer.cancel()
    if fired:
        raise stall(f"no progress for {timeout:g}s")


async def _drain_all(writer: asyncio.StreamWriter, timeout: float | None = None) -> None:
    """Wait until the transport has nothing left to send (drain() alone stops at the
    low-water mark), then restore its limits.  WriteStall (and the connection aborted)
    if the peer takes nothing for ``timeout`` seconds."""
    transport = writer.transport
    low, high = transport.get_write_buffer_limits()
    transport.set_write_buffer_limits(0)
    try:
        await drain_within(writer, timeout, WriteStall)
    finally:
        if not transport.is_closing():
            transport.set_write_buffer_limits(high, low)


class _Direction:
    """src → dst: splice into a pipe on readable, out of it until dst would block."""

    __slots__ = ("dst", "loop", "pipe", "queued", "relay", "src", "timer", "total")

    def __init__(self, relay: SpliceRelay, src: socket.socket, dst: socket.socket) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.src = src
        self.dst = dst
        self.pipe: tuple[int, int] | None = None
        self.queued = 0  # bytes sitting in the pipe
        self.total = 0
        self.timer: asyncio.TimerHandle | None = None  # dst has taken nothing since

    def start(self) -> None:
        self.loop.add_reader(self.src.fileno(), self.on_readable)

    def on_readable(self) -> None:
        src, dst = self.src.fileno(), self.dst.fileno()
        try:
            for _ in range(MAX_ROUNDS):
                if self.pipe is None:
                    self.pipe = _take_pipe()
                try:
                    n = os.splice(src, self.pipe[1], _pipe_size, flags=FLAGS)
                except BlockingIOError:
                    break
                if n == 0:
                    self.loop.remove_reader(src)
                    self.relay.ended(self)
                    break
                self.queued += n
                self.total += n
                if not self.flush(dst):
                    self.loop.remove_reader(src)
                    self.loop.add_writer(dst, self.on_writable)
                    self.arm()
                    return
        except OSError as exc:
            self.relay.fail(exc)
            return
        if self.pipe is not None and not self.queued:
            _give_pipe(self.pipe)
            self.pipe = None

    def flush(self, dst: int) -> bool:
        """Move the pipe's bytes to dst; False if dst would block first."""
        assert self.pipe is not None
        while self.queued:
            try:
                self.queued -= os.splice(self.pipe[0], dst, self.queued, flags=FLAGS)
            except BlockingIOError:
                return False
        return True

    def arm(self) -> None:
        """dst is full: it must take some bytes within the relay's stall timeout."""
        t = self.relay.stall_timeout
        if t is not None:
            self.timer = self.loop.call_later(t, self.relay.fail, WriteStall(f"no progress for {t:g}s"))

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def on_writable(self) -> None:
        dst = self.dst.fileno()
        before = self.queued
        try:
            if not self.flush(dst):
                if self.queued != before:  # some progress: the stall clock restarts
                    self.disarm()
                    self.arm()
                return
        except OSError as exc:
            self.relay.fail(exc)
            return
        self.disarm()
        self.loop.remove_writer(dst)
        if self.pipe is not None:
            _give_pipe(self.pipe)
            self.pipe = None
        self.loop.add_reader(self.src.fileno(), self.on_readable)

    def stop(self) -> None:
        self.disarm()
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.src.fileno())
        with contextlib.suppress(Exception):
            self.loop.remove_writer(self.dst.fileno())
        if self.pipe is not None:
            if self.queued:
                _close_pipe(self.pipe)  # holds bytes nobody will read
            else:
                _give_pipe(self.pipe)
            self.pipe = None


class SpliceRelay:
    """Relay a ↔ b until both directions have ended (EOF) or one fails (a side that
    takes none of the bytes waiting for it for ``stall_timeout`` seconds fails it)."""

    def __init__(self, a: socket.socket, b: socket.socket, stall_timeout: float | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.stall_timeout = stall_timeout
        self.a, self.b = a, b
        self.up = _Direction(self, a, b)
        self.down = _Direction(self, b, a)
        self._open = 2
        self.done = self.loop.create_future()

    async def run(self) -> tuple[int, int]:
        self.up.start()
        self.down.start()
        try:
            await self.done
        finally:
            self.close()
        return self.up.total, self.down.total

    def ended(self, d: _Direction) -> None:
        with contextlib.suppress(OSError):
            d.dst.shutdown(socket.SHUT_WR)
        self._open -= 1
        if not self._open and not self.done.done():
            self.done.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        self.up.stop()
        self.down.stop()
        for s in (self.a, self.b):
            with contextlib.suppress(OSError):
                s.close()


async def _send_all(sock: socket.socket, data: bytes, timeout: float | None = None) -> None:
    if data:
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(sock, data), timeout)
        except TimeoutError:
            raise WriteStall(f"no progress for {timeout:g}s") from None


# The task running each spliced relay, by the writers it took over: closing one of
# those writers (a session shutting down its data connections) must end the relay,
# which no longer goes through the writer's transport.
_running: dict[asyncio.StreamWriter, asyncio.Task] = {}
# Relays ended by abort(): their task's cancellation is theirs alone, and the relay
# returns normally (a connection handler that ends cancelled makes asyncio log a
# CancelledError traceback for every cut connection on Python 3.11).
_aborted: set[asyncio.Task] = set()


def abort(writer: asyncio.StreamWriter) -> None:
    """End the spliced relay that took over ``writer``'s connection, if one is running."""
    task = _running.pop(writer, None)
    if task is not None and not task.done() and task not in _aborted:
        _aborted.add(task)
        task.cancel()


async def splice_relay(
    a_r: asyncio.StreamReader,
    a_w: asyncio.StreamWriter,
    b_r: asyncio.StreamReader,
    b_w: asyncio.StreamWriter,
    stall_timeout: float | None = None,
) -> tuple[int, int]:
    """Detach both connections from their transports and splice between them."""
    task = asyncio.current_task()
    assert task is not None
    _running[a_w] = _running[b_w] = task
    socks: list[socket.socket] = []
    try:
        a, a_pending = await detach(a_r, a_w, stall_timeout)
        socks.append(a)
        b, b_pending = await detach(b_r, b_w, stall_timeout)
        socks.append(b)
        await _send_all(b, a_pending, stall_timeout)
        await _send_all(a, b_pending, stall_timeout)
        up, down = await SpliceRelay(a, b, stall_timeout).run()
        return up + len(a_pending), down + len(b_pending)
    except asyncio.CancelledError:
        if task not in _aborted:
            raise
        if task.uncancel() > 0:  # ended by abort(), and cancelled by its caller too
            raise
        return 0, 0  # ended by abort() alone: not a cancellation of the caller
    finally:
        _aborted.discard(task)
        for w in (a_w, b_w):
            if _running.get(w) is task:
                del _running[w]
        for sock in socks:
            sock.close()


# ------------------------------------------------------------- one body, in place
SPLICE_MIN = 256 * 1024  # smaller bodies are cheaper through the streams
# A body observer (the capture): called with each chunk, or with an int for bytes that
# passed unseen; returns how many more bytes it wants to see (None: no limit).
Tee = Callable[[bytes | int], int | None]
_YIELD_EVERY = 16  # splice rounds in a row before letting other tasks run


class Incomplete(Exception):
    """The source ended before the announced number of bytes."""


class ReadStall(TimeoutError):
    """The source sent nothing for the read timeout."""


class WriteStall(TimeoutError):
    """The destination took nothing for the write timeout."""


def can_splice_body(
    reader: asyncio.StreamReader,
    src: asyncio.StreamWriter | None,
    dst: asyncio.StreamWriter,
    n: int,
    teed: bool = False,
) -> bool:
    """Worth and possible to move the next ``n`` bytes of ``reader`` to ``dst`` in the
    kernel (``teed``: while a capture sees every byte)."""
    if src is None or n < SPLICE_MIN or (teed and not TEE_AVAILABLE):
        return False
    buf = _buffer_of(reader)
    return buf is not None and len(buf) < n // 2 and spliceable(src) and spliceable(dst)


async def _ready(
    loop: asyncio.AbstractEventLoop, fd: int, write: bool, timeout: float | None = None
) -> None:
    """Wait until ``fd`` is readable (writable); ReadStall (WriteStall) after ``timeout``."""
    fut = loop.create_future()
    timer = None
    if timeout is not None:
        stall = WriteStall if write else ReadStall
        timer = loop.call_later(timeout, _stall, fut, stall(f"no progress for {timeout:g}s"))

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await fut
    finally:
        if timer is not None:
            timer.cancel()
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _stall(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


async def splice_body(
    reader: asyncio.StreamReader,
    src: asyncio.StreamWriter,
    dst: asyncio.StreamWriter,
    n: int,
    prefix: bytes = b"",
    tee: Tee | None = None,
    read_timeout: float | None = None,
    write_timeout: float | None = None,
) -> None:
    """Copy exactly ``n`` bytes from ``reader`` (whose connection ``src`` writes to) to
    ``dst``, ``prefix`` first; both connections stay open and usable afterwards.

    What the reader already buffered goes through ``dst``'s transport; the rest is
    spliced between duplicates of the two sockets while ``src`` is paused (so nothing
    else reads it) and ``dst``'s transport has nothing buffered (so nothing else writes).
    ``tee`` (a capture) gets the bytes it wants: the spliced ones are duplicated in the
    kernel with tee(2) and read from the copy, one memory copy instead of four through
    streams.  Once it answers that it wants no more (0), the rest is only spliced and
    handed to it as a count.  Raises :class:`Incomplete` if the source ends early, OSError if a socket fails,
    :class:`ReadStall` / :class:`WriteStall` when a side makes no progress for its timeout.
    """
    loop = asyncio.get_running_loop()
    src_t = src.transport
    src_t.pause_reading()
    buf = _buffer_of(reader)
    assert buf is not None
    head: bytes | bytearray
    if len(buf) <= n:  # all of it is body: hand the buffer itself over, no copy
        head, reader._buffer = buf, bytearray()
    else:
        with memoryview(buf) as view:
            head = bytes(view[:n])
        del buf[:n]
    left = n - len(head)
    want: int | None = None
    if tee is not None and head:
        head = bytes(head)
        want = tee(head)
    if prefix or head:
        dst.writelines((prefix, head))
    await _drain_all(dst, write_timeout)
    fds: list[int] = []
    pipes: list[tuple[int, int]] = []
    clean = False
    try:
        fds.append(os.dup(src.get_extra_info("socket").fileno()))
        fds.append(os.dup(dst.get_extra_info("socket").fileno()))
        pipes.append(_take_pipe())
        if tee is not None and want != 0:
            pipes.append(_take_pipe())
            left = await _move_teed(
                loop, fds[0], fds[1], pipes[0], pipes[1], left, tee, read_timeout, write_timeout
            )
        if left:
            await _move(loop, fds[0], fds[1], pipes[0], left, read_timeout, write_timeout)
            if tee is not None:
                tee(left)  # passed on unseen: counted only
        clean = True
    finally:
        for fd in fds:
            os.close(fd)
        for p in pipes:
            (_give_pipe if clean else _close_pipe)(p)
        if not src_t.is_closing():
            if getattr(reader, "_paused", False):
                reader._paused = False  # it paused itself for a buffer we emptied
            src_t.resume_reading()


async def _move(
    loop: asyncio.AbstractEventLoop,
    sfd: int,
    dfd: int,
    pipe: tuple[int, int],
    left: int,
    read_timeout: float | None = None,
    write_timeout: float | None = None,
) -> None:
    """sfd → pipe → dfd, ``left`` bytes, reading ahead while dst is slower."""
    pr, pw = pipe
    queued = 0
    rounds = 0
    while left or queued:
        moved = False
        if left:
            try:
                k = os.splice(sfd, pw, min(left, _pipe_size), flags=FLAGS)
            except BlockingIOError:
                pass
            else:
                if k == 0:
                    raise Incomplete(f"connection closed {left} bytes before the end of the body")
                left -= k
                queued += k
                moved = True
        if queued:
            try:
                queued -= os.splice(pr, dfd, queued, flags=FLAGS)
                moved = True
            except BlockingIOError:
                pass
        if not moved:
            if queued:
                await _ready(loop, dfd, True, write_timeout)
            else:
                await _ready(loop, sfd, False, read_timeout)
        else:
            rounds += 1
            if rounds % _YIELD_EVERY == 0:
                await asyncio.sleep(0)


async def _move_teed(
    loop: asyncio.AbstractEventLoop,
    sfd: int,
    dfd: int,
    pipe: tuple[int, int],
    copy: tuple[int, int],
    left: int,
    tee: Tee,
    read_timeout: float | None = None,
    write_timeout: float | None = None,
) -> int:
    """Like :func:`_move`, handing the bytes to ``tee`` on the way, until it wants no
    more; returns how many bytes are left to move then (both pipes are empty).

    Each round fills the empty pipe from the source, duplicates its contents into the
    (empty) second pipe, reads the duplicate for ``tee`` and empties the first pipe
    into dst.  tee(2) always starts at the head of the pipe, hence the lock-step.
    """
    pr, pw = pipe
    cr, cw = copy
    while left:
        try:
            k = os.splice(sfd, pw, min(left, _pipe_size), flags=FLAGS)
        except BlockingIOError:
            await _ready(loop, sfd, False, read_timeout)
            continue
        if k == 0:
            raise Incomplete(f"connection closed {left} bytes before the end of the body")
        left -= k
        want: int | None = None
        while k:
            t = _tee(pr, cw, k)  # only reached when TEE_AVAILABLE
            want = tee(_read_exact(cr, t))
            k -= t
            while t:
                try:
                    t -= os.splice(pr, dfd, t, flags=FLAGS)
                except BlockingIOError:
                    await _ready(loop, dfd, True, write_timeout)
        if want == 0:
            return left
        await asyncio.sleep(0)
    return 0


def _read_exact(fd: int, n: int) -> bytes:
    data = os.read(fd, n)
    if len(data) == n:
        return data
    parts = [data]
    n -= len(data)
    while n:
        data = os.read(fd, n)
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def _load_tee() -> Callable[[int, int, int], int] | None:
    """tee(2) from libc (the os module has splice but not tee)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.tee
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)
    fn.restype = ctypes.c_ssize_t

    def tee(fd_in: int, fd_out: int, n: int) -> int:
        got = fn(fd_in, fd_out, n, FLAGS)
        if got <= 0:
            err = ctypes.get_errno()
            raise OSError(err, f"tee: {os.strerror(err)}" if got < 0 else "tee: empty pipe")
        return got

    return tee


_tee = _load_tee()
TEE_AVAILABLE = _tee is not None
