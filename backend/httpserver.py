"""A small asyncio HTTP/1.1 server for burrow's JSON APIs (agent API, cloud API).

It reuses the data path's head parser (:mod:`backend.http1`), so burrow has one HTTP
parser.  Routes are ``(method, pattern)`` pairs where ``{name}`` matches one path
segment; handlers are ``async def handler(req) -> Response``.  A handler may return
a :class:`StreamResponse` (used for Server-Sent Events).

Every wait has a deadline (:class:`ServerLimits`, like Go's ``ReadHeaderTimeout`` /
``IdleTimeout`` and nginx's ``client_header_timeout`` / ``client_body_timeout`` /
``send_timeout``), and every refusal is an answer in the API's own error format
(``error(req, status, msg)``), never a dropped connection or a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, unquote, urlsplit

from backend.http1 import LENGTH, MAX_HEAD, NO_BODY, HTTPError, parse_request_head
from backend.netutil import connection_handler, format_hostport, parse_hostport
from backend.relay import close

log = logging.getLogger("burrow.http")

MAX_BODY = 1024 * 1024
#: A body over MAX_BODY but under this is read and thrown away, so the client gets the
#: 413 answer instead of a connection reset while it is still sending.
MAX_DRAIN = 16 * 1024 * 1024
#: Stray empty lines allowed before a request line (RFC 9112 §2.2 says "at least one").
_MAX_EMPTY_LINES = 8
#: After refusing a request whose bytes were not all read, read and drop what the client
#: still sends (at most this much, for at most ``linger`` seconds) before closing, so its
#: kernel does not turn our answer into a reset (nginx's ``lingering_close``).
_LINGER_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Deadlines for one API connection, in seconds."""

    #: waiting for the first byte of a request (a kept-alive connection's idle time)
    idle_timeout: float = 75.0
    #: from a request's first byte to the end of its head
    head_timeout: float = 10.0
    #: a request body: this much, plus ``length / body_min_rate`` for large bodies
    body_timeout: float = 10.0
    body_min_rate: int = 64 * 1024
    #: writing one answer (or one event of a stream) to a client that does not read
    send_timeout: float = 30.0
    #: reading and dropping the rest of a refused request before closing
    linger: float = 2.0

    def body_deadline(self, length: int) -> float:
        return self.body_timeout + length / max(1, self.body_min_rate)


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    params: dict[str, str] = field(default_factory=dict)
    base_url: str = ""
    body_too_large: bool = False
    #: the client's IP address (the TCP peer)
    remote: str = ""
    #: Per-request values set by the ``before`` hook for handlers (e.g. the caller's account).
    state: dict = field(default_factory=dict)

    def arg(self, name: str) -> str | None:
        v = self.query.get(name)
        return v[-1] if v else None

    def json(self):
        return json.loads(self.body)


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(data, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, json.dumps(data, separators=(",", ":")).encode(), headers=headers or [])


def empty(status: int = 204) -> Response:
    return Response(status, b"", content_type="")


@dataclass(slots=True)
class StreamResponse:
    """A response whose body is produced by an async iterator (chunked encoding)."""

    chunks: AsyncIterator[bytes]
    content_type: str = "text/event-stream"
    headers: list[tuple[str, str]] = field(default_factory=list)
    status: int = 200


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


class Router:
    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern, Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        rx = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern.rstrip("/")) + "/?$")
        self._routes.append((method, rx, handler))

    def route(self, method: str, path: str) -> tuple[Handler | None, dict[str, str], bool]:
        """Return (handler, params, path_exists)."""
        exists = False
        for m, rx, h in self._routes:
            match = rx.match(path)
            if match:
                exists = True
                if m == method:
                    return h, {k: unquote(v) for k, v in match.groupdict().items()}, True
        return None, {}, exists


class APIServer:
    """Serve a Router on one address.  ``error(req, status, msg)`` builds error bodies.

    ``guard(req)`` runs first for every request, matched route or not (the agent API's
    Host / Origin / Content-Type checks); ``before(req)`` runs for a matched route,
    before its handler (the cloud API's authentication).  Either may answer instead.
    ``public_url`` is what ``req.base_url`` says (absolute URLs in answers); by default
    the listen address, never the request's Host header.
    """

    def __init__(
        self,
        router: Router,
        error: Callable[[Request | None, int, str], Response],
        before: Callable[[Request], Response | Awaitable[Response | None] | None] | None = None,
        *,
        guard: Callable[[Request], Response | None] | None = None,
        limits: ServerLimits | None = None,
        public_url: str | None = None,
    ) -> None:
        self.router = router
        self.error = error
        self.before = before
        self.guard = guard
        self.limits = limits or ServerLimits()
        self.public_url = public_url.rstrip("/") if public_url else None
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.addr: tuple[str, int] = ("", 0)
        self.base_url = ""

    async def start(self, addr: str) -> tuple[str, int]:
        host, port = parse_hostport(addr)
        self._server = await asyncio.start_server(self._conn, host, port, limit=MAX_HEAD)
        self.addr = self._server.sockets[0].getsockname()[:2]
        self.base_url = self.public_url or f"http://{format_hostport(*self.addr)}"
        return self.addr

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._conns):
            close(w)

    @connection_handler
    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        peer = writer.get_extra_info("peername")
        remote = peer[0] if isinstance(peer, tuple) else ""
        limits = self.limits
        try:
            while True:
                try:
                    raw = await self._read_head(reader)
                except TimeoutError:  # idle between requests: just close
                    break
                except HTTPError as exc:  # 431 too large, 408 too slow, 400 cut short / junk
                    await self._refuse(reader, writer, exc.status, exc.msg)
                    break
                if raw is None:
                    break
                try:
                    head = parse_request_head(raw)
                    parts = urlsplit(head.target.decode("latin-1"))
                    method = head.method.decode("ascii")
                except HTTPError as exc:
                    await self._refuse(reader, writer, exc.status, exc.msg)
                    break
                except ValueError as exc:  # e.g. an unparsable authority in the target
                    await self._refuse(reader, writer, 400, f"malformed request target: {exc}")
                    break
                body = b""
                too_large = False
                drained = False
                try:
                    async with asyncio.timeout(limits.body_deadline(min(head.length, MAX_DRAIN))):
                        if head.framing == LENGTH:
                            if head.length > MAX_BODY:
                                too_large = True
                                if head.length <= MAX_DRAIN:
                                    drained = await self._discard(reader, head.length)
                            else:
                                body = await reader.readexactly(head.length)
                except TimeoutError:
                    await self._refuse(reader, writer, 408, "timed out reading the request body")
                    break
                if head.framing not in (LENGTH, NO_BODY):
                    too_large = True  # chunked request bodies are not accepted here
                headers: dict[str, str] = {}
                for k, v in head.headers:
                    lk = k.decode("latin-1").lower()
                    vs = v.decode("latin-1")
                    headers[lk] = f"{headers[lk]}, {vs}" if lk in headers else vs
                req = Request(
                    method=method,
                    path=unquote(parts.path) or "/",
                    query=parse_qs(parts.query, keep_blank_values=True),
                    headers=headers,
                    body=body,
                    base_url=self.base_url,
                    body_too_large=too_large,
                    remote=remote,
                )
                resp = await self._dispatch(req)
                if isinstance(resp, StreamResponse):
                    await self._stream(writer, resp, limits.send_timeout)
                    break
                keep = head.keep_alive and (drained or not too_large)
                async with asyncio.timeout(limits.send_timeout):
                    await self._send(writer, resp, keep, head_only=method == "HEAD")
                if not keep:
                    if too_large and not drained:
                        await self._linger(reader, writer)
                    break
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass  # the server is shutting down: this connection just ends
        except Exception:  # a bug; the connection ends, the server goes on
            log.exception("API connection from %s failed", remote)
        finally:
            self._conns.discard(writer)
            close(writer)

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request head: ``idle_timeout`` for its first byte, ``head_timeout`` for the rest.

        None on a clean EOF between requests; TimeoutError when idle; HTTPError 431 past
        MAX_HEAD bytes, 408 past ``head_timeout``, 400 when the stream ends inside the head.
        """
        first = b""
        async with asyncio.timeout(self.limits.idle_timeout):
            for _ in range(_MAX_EMPTY_LINES):
                first = await reader.read(1)
                if first not in (b"\r", b"\n"):
                    break
            else:
                raise HTTPError(400, "too many empty lines before the request line")
        if not first:
            return None
        try:
            async with asyncio.timeout(self.limits.head_timeout):
                rest = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            raise HTTPError(408, "timed out reading the request head") from None
        except asyncio.LimitOverrunError:
            raise HTTPError(431, "request header fields too large") from None
        except asyncio.IncompleteReadError:
            raise HTTPError(400, "connection closed inside the request head") from None
        if len(rest) + 1 > MAX_HEAD:
            raise HTTPError(431, "request header fields too large")
        return first + rest

    async def _refuse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, msg: str
    ) -> None:
        """Answer a request that cannot be read to its end, then close politely."""
        try:
            async with asyncio.timeout(self.limits.send_timeout):
                await self._send(writer, self.error(None, status, msg), False)
        except (OSError, TimeoutError):
            return
        await self._linger(reader, writer)

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then drop what the client still sends (bounded) so it reads our answer."""
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
        left = _LINGER_BYTES
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(self.limits.linger):
                while left > 0:
                    chunk = await reader.read(min(left, 64 * 1024))
                    if not chunk:
                        break
                    left -= len(chunk)

    @staticmethod
    async def _discard(reader: asyncio.StreamReader, length: int) -> bool:
        """Read and drop ``length`` body bytes; True if all arrived (the caller sets the deadline)."""
        while length > 0:
            chunk = await reader.read(min(length, 256 * 1024))
            if not chunk:
                return False
            length -= len(chunk)
        return True

    async def _dispatch(self, req: Request) -> Response | StreamResponse:
        try:
            if self.guard is not None:
                refused = self.guard(req)
                if refused is not None:
                    return refused
            if req.body_too_large:
                return self.error(req, 413, f"request body larger than {MAX_BODY} bytes")
            handler, params, exists = self.router.route(req.method, req.path)
            if handler is None:
                if exists:
                    return self.error(req, 405, f"method {req.method} not allowed on {req.path}")
                return self.error(req, 404, f"no such resource {req.path}")
            if self.before is not None:
                refused = self.before(req)
                if inspect.isawaitable(refused):
                    refused = await refused
                if refused is not None:
                    return refused
            req.params = params
            return await handler(req)
        except Exception as exc:  # a bug must not take the server down; say so plainly
            log.exception("handler failed for %s %s", req.method, req.path[:200])
            return self.error(req, 500, f"internal error: {type(exc).__name__}")

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter, resp: Response, keep: bool, head_only: bool = False
    ) -> None:
        """Write ``resp``; a HEAD request gets its head only (RFC 9110 §9.3.2), the
        Content-Length still telling the size of the body a GET would get."""
        reason = HTTPStatus(resp.status).phrase if resp.status in HTTPStatus._value2member_map_ else ""
        lines = [f"HTTP/1.1 {resp.status} {reason}"]
        if resp.content_type and resp.status != 204:
            lines.append(f"Content-Type: {resp.content_type}")
        if resp.status != 204:
            lines.append(f"Content-Length: {len(resp.body)}")
        lines.extend(f"{k}: {v}" for k, v in resp.headers)
        if not keep:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        writer.write(head if head_only else head + resp.body)
        await writer.drain()

    @staticmethod
    async def _stream(writer: asyncio.StreamWriter, resp: StreamResponse, send_timeout: float) -> None:
        lines = [
            f"HTTP/1.1 {resp.status} OK",
            f"Content-Type: {resp.content_type}",
            "Cache-Control: no-store",
            "Transfer-Encoding: chunked",
            "Connection: close",
        ]
        lines.extend(f"{k}: {v}" for k, v in resp.headers)
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        try:
            async with asyncio.timeout(send_timeout):
                await writer.drain()
            async for chunk in resp.chunks:
                if chunk:
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    async with asyncio.timeout(send_timeout):
                        await writer.drain()
            writer.write(b"0\r\n\r\n")
            async with asyncio.timeout(send_timeout):
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                await resp.chunks.aclose()  # type: ignore[attr-defined]
