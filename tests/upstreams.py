"""Real upstream servers for tests, each on 127.0.0.1 port 0 in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time


class HTTPUpstream:
    """A raw HTTP/1.1 server that records what it received and answers byte-exactly.

    Routes:
      ``GET /bytes/N``  -> N bytes of a fixed pattern (Content-Length)
      ``POST /echo``    -> the request body back, plus ``X-Body-Sha256``
      ``GET /chunked``  -> a chunked response of several chunks
      ``GET /missing``  -> 404
      anything else     -> a small text body naming the method and path
    ``sent`` keeps the exact response bytes written for each request, in order.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)
        self.sent: list[bytes] = []
        self.connections = 0  # accepted so far
        self.open_connections = 0  # accepted and not yet ended
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> HTTPUpstream:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_connections += 1
        try:
            while True:
                try:
                    head = await r.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                hdrs = {}
                for ln in lines[1:]:
                    if ":" in ln:
                        k, v = ln.split(":", 1)
                        hdrs[k.strip().lower()] = v.strip()
                if hdrs.get("expect", "").lower() == "100-continue":
                    w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = b""
                if "content-length" in hdrs:
                    body = await r.readexactly(int(hdrs["content-length"]))
                elif hdrs.get("transfer-encoding", "").lower() == "chunked":
                    while True:
                        size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
                        if size == 0:
                            await r.readuntil(b"\r\n")
                            break
                        body += await r.readexactly(size)
                        await r.readexactly(2)
                self.requests.append((head, body))
                resp = self._respond(method, path, body)
                self.sent.append(resp)
                w.write(resp)
                await w.drain()
                if hdrs.get("connection", "").lower() == "close":
                    break
        finally:
            self.open_connections -= 1
            with contextlib.suppress(Exception):
                w.close()

    @staticmethod
    def _respond(method: str, path: str, body: bytes) -> bytes:
        if path.startswith("/bytes/"):
            n = int(path.rsplit("/", 1)[1])
            payload = (bytes(range(256)) * (n // 256 + 1))[:n]
            return (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"X-Upstream: yes\r\nContent-Length: %d\r\n\r\n" % n
            ) + (payload if method != "HEAD" else b"")
        if path == "/echo":
            digest = hashlib.sha256(body).hexdigest().encode()
            return (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"X-Body-Sha256: " + digest + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
            ) + body
        if path == "/chunked":
            parts = [b"first ", b"second ", b"x" * 5000, b" last"]
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in parts)
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
        if path == "/missing":
            return b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nnot found\n"
        text = f"{method} {path}\n".encode()
        return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(text) + text


class TCPEcho:
    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> TCPEcho:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except ConnectionError:
                pass
            finally:
                w.close()

        self._server = await asyncio.start_server(echo, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()


async def raw_exchange(host: str, port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes."""
    r, w = await asyncio.open_connection(host, port)
    try:
        w.write(data)
        await w.drain()
        return await asyncio.wait_for(r.read(), timeout)
    finally:
        w.close()


def raw_request(addr: tuple[str, int], data: bytes, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Send ``data``; read until the server closes (True) or ``timeout`` passes (False)."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(data)
        got = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                return got, False
            if not chunk:
                return got, True
            got += chunk
        return got, False
