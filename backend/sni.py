"""Read the server name (SNI) from a TLS ClientHello without consuming it.

The edge's HTTPS port serves two kinds of endpoint: ``https`` endpoints, whose TLS the
edge terminates, and ``tls`` endpoints, whose TLS passes through untouched to the
agent.  Which one a connection is for is known only from the ClientHello's SNI, so the
edge peeks at the first record (``MSG_PEEK``) before deciding.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import weakref

from backend.netutil import wait_readable

MAX_HELLO = 16389  # one TLS record: 5-byte header + 2^14 bytes


class Incomplete(Exception):
    """More bytes are needed to see the whole ClientHello."""


class NotTLS(Exception):
    pass


def parse_sni(data: bytes) -> str | None:
    """Return the SNI host name (lower case) of a ClientHello, or None if it has none.

    Raises Incomplete if ``data`` ends before the ClientHello does, NotTLS if it is not
    a TLS handshake.
    """
    return parse_hello(data)[0]


def parse_hello(data: bytes) -> tuple[str | None, tuple[str, ...]]:
    """Return a ClientHello's SNI host name (lower case, or None) and its ALPN protocols.

    The ALPN list tells an ACME TLS-ALPN-01 validation (``acme-tls/1``) from a client.
    Raises like :func:`parse_sni`.
    """
    if len(data) < 5:
        raise Incomplete
    if data[0] != 0x16 or data[1] != 0x03:
        raise NotTLS("not a TLS handshake record")
    rec_len = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + rec_len:
        raise Incomplete
    hs = data[5 : 5 + rec_len]
    if len(hs) < 4 or hs[0] != 0x01:
        raise NotTLS("not a ClientHello")
    hs_len = int.from_bytes(hs[1:4], "big")
    body = hs[4 : 4 + hs_len]
    if len(body) < hs_len:
        raise Incomplete  # a ClientHello spanning several records: rare; ask for more
    sni: str | None = None
    alpn: list[str] = []
    try:
        pos = 2 + 32  # client_version, random
        pos += 1 + body[pos]  # session_id
        pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher_suites
        pos += 1 + body[pos]  # compression_methods
        if pos + 2 > len(body):
            return None, ()  # no extensions
        end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            etype = int.from_bytes(body[pos : pos + 2], "big")
            elen = int.from_bytes(body[pos + 2 : pos + 4], "big")
            ext = body[pos + 4 : pos + 4 + elen]
            pos += 4 + elen
            if etype == 0 and sni is None:
                # server_name_list: u16 length, then (u8 type, u16 len, name)*
                p = 2
                while p + 3 <= len(ext):
                    ntype = ext[p]
                    nlen = int.from_bytes(ext[p + 1 : p + 3], "big")
                    name = ext[p + 3 : p + 3 + nlen]
                    p += 3 + nlen
                    if ntype == 0:
                        sni = name.decode("ascii", "replace").lower().rstrip(".")
                        break
            elif etype == 16:
                # protocol_name_list: u16 length, then (u8 len, name)*
                p = 2
                while p < len(ext):
                    plen = ext[p]
                    alpn.append(ext[p + 1 : p + 1 + plen].decode("ascii", "replace"))
                    p += 1 + plen
    except IndexError:
        raise NotTLS("malformed ClientHello") from None
    return sni, tuple(alpn)


class _EdgeTriggered:
    """Wakes a waiter when *new* bytes arrive on a socket whose bytes are only peeked at.

    The event loop's readiness is level-triggered: a socket holding an unread partial
    ClientHello is "readable" on every iteration, so waiting on it spins.  Sockets in
    the SNI stage are registered in one edge-triggered epoll set instead (whose own
    descriptor the loop watches): it reports a socket once per arrival of data, EOF or
    error, so a stalled handshake costs nothing until it times out.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ep = select.epoll()
        self.waiting: dict[int, asyncio.Future] = {}
        loop.add_reader(self.ep.fileno(), self._on_events)

    def _on_events(self) -> None:
        for fd, _ in self.ep.poll(0):
            fut = self.waiting.pop(fd, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def register(self, fd: int) -> None:
        self.ep.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)

    def unregister(self, fd: int) -> None:
        self.waiting.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(fd)

    async def wait(self, fd: int, timeout: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.waiting[fd] = fut
        try:
            await asyncio.wait_for(fut, max(timeout, 0.001))
        finally:
            self.waiting.pop(fd, None)


_watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _EdgeTriggered] = weakref.WeakKeyDictionary()


def _watcher(loop: asyncio.AbstractEventLoop) -> _EdgeTriggered | None:
    if not hasattr(select, "epoll"):
        return None
    w = _watchers.get(loop)
    if w is None:
        w = _watchers[loop] = _EdgeTriggered(loop)
    return w


async def peek_sni(sock: socket.socket, timeout: float = 10.0) -> str | None:
    """Wait for a ClientHello on a non-blocking socket and return its SNI (not consumed)."""
    return (await peek_hello(sock, timeout))[0]


async def peek_hello(sock: socket.socket, timeout: float = 10.0) -> tuple[str | None, tuple[str, ...]]:
    """Wait for a ClientHello on a non-blocking socket; return its SNI and ALPN protocols.

    Event-driven: after each look at the bytes so far it sleeps until more arrive
    (see :class:`_EdgeTriggered`), and gives up with TimeoutError after ``timeout``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    watcher = _watcher(loop)
    fd = sock.fileno()
    if watcher is not None:
        watcher.register(fd)
    try:
        size = -1
        while True:
            try:
                data = sock.recv(MAX_HELLO, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                data = None
            if data == b"":
                raise NotTLS("connection closed before the ClientHello")
            if data is not None and len(data) != size:
                size = len(data)
                try:
                    return parse_hello(data)
                except Incomplete:
                    if size >= MAX_HELLO:
                        raise NotTLS("ClientHello too large") from None
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError
            if watcher is not None:
                await watcher.wait(fd, left)
            elif data is None:
                await wait_readable(sock, left)
            else:  # no epoll: a level-triggered fd with bytes in it would spin
                await asyncio.sleep(0.01)
    finally:
        if watcher is not None:
            watcher.unregister(fd)
