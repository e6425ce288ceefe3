"""A small asyncio HTTP/1.1 server for burrow's JSON APIs (agent API, cloud API).

It reuses the data path's head parser (:mod:`backend.http1`), so burrow has one HTTP
parser.  Routes are ``(method, pattern)`` pairs where ``{name}`` matches one path
segment; handlers are ``async def handler(req) -> Response``.  A handler may return
a :class:`StreamResponse` (used for Server-Sent Events).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, unquote, urlsplit

from backend.http1 import LENGTH, MAX_HEAD, NO_BODY, HTTPError, parse_request_head, read_head
from backend.netutil import parse_hostport
from backend.relay import close

log = logging.getLogger("burrow.http")

MAX_BODY = 1024 * 1024
#: A body over MAX_BODY but under this is read and thrown away, so the client gets the
#: 413 answer instead of a connection reset while it is still sending.
MAX_DRAIN = 16 * 1024 * 1024


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
    """Serve a Router on one address.  ``fallback(req, status)`` builds error bodies."""

    def __init__(
        self,
        router: Router,
        error: Callable[[Request | None, int, str], Response],
        before: Callable[[Request], Response | None] | None = None,
    ) -> None:
        self.router = router
        self.error = error
        self.before = before
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.addr: tuple[str, int] = ("", 0)

    async def start(self, addr: str) -> tuple[str, int]:
        host, port = parse_hostport(addr)
        self._server = await asyncio.start_server(self._conn, host, port, limit=MAX_HEAD)
        self.addr = self._server.sockets[0].getsockname()[:2]
        return self.addr

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._conns):
            close(w)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        host = "{}:{}".format(*self.addr) if ":" not in self.addr[0] else "[{}]:{}".format(*self.addr)
        try:
            while True:
                try:
                    raw = await asyncio.wait_for(read_head(reader), 75)
                except TimeoutError:
                    break
                if raw is None:
                    break
                try:
                    head = parse_request_head(raw)
                except HTTPError as exc:
                    await self._send(writer, self.error(None, exc.status, exc.msg), False)
                    break
                body = b""
                too_large = False
                drained = False
                if head.framing == LENGTH:
                    if head.length > MAX_BODY:
                        too_large = True
                        if head.length <= MAX_DRAIN:
                            drained = await self._discard(reader, head.length)
                    else:
                        body = await reader.readexactly(head.length)
                elif head.framing != NO_BODY:
                    too_large = True  # chunked request bodies are not accepted here
                parts = urlsplit(head.target.decode("latin-1"))
                headers: dict[str, str] = {}
                for k, v in head.headers:
                    lk = k.decode("latin-1").lower()
                    vs = v.decode("latin-1")
                    headers[lk] = f"{headers[lk]}, {vs}" if lk in headers else vs
                req = Request(
                    method=head.method.decode(),
                    path=unquote(parts.path) or "/",
                    query=parse_qs(parts.query, keep_blank_values=True),
                    headers=headers,
                    body=body,
                    base_url=f"http://{headers.get('host') or host}",
                    body_too_large=too_large,
                )
                resp = await self._dispatch(req)
                keep = head.keep_alive and (drained or not too_large)
                if isinstance(resp, StreamResponse):
                    await self._stream(writer, resp)
                    break
                await self._send(writer, resp, keep)
                if not keep:
                    break
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the server is shutting down: this connection just ends
        finally:
            self._conns.discard(writer)
            close(writer)

    @staticmethod
    async def _discard(reader: asyncio.StreamReader, length: int) -> bool:
        """Read and drop ``length`` body bytes (30 s at most); True if all arrived."""
        try:
            async with asyncio.timeout(30):
                while length > 0:
                    chunk = await reader.read(min(length, 256 * 1024))
                    if not chunk:
                        return False
                    length -= len(chunk)
        except TimeoutError:
            return False
        return True

    async def _dispatch(self, req: Request) -> Response | StreamResponse:
        if req.body_too_large:
            return self.error(req, 413, f"request body larger than {MAX_BODY} bytes")
        handler, params, exists = self.router.route(req.method, req.path)
        if handler is None:
            if exists:
                return self.error(req, 405, f"method {req.method} not allowed on {req.path}")
            return self.error(req, 404, f"no such resource {req.path}")
        if self.before is not None:
            refused = self.before(req)
            if refused is not None:
                return refused
        req.params = params
        try:
            return await handler(req)
        except Exception as exc:  # a bug must not take the server down; say so plainly
            log.exception("handler failed for %s %s", req.method, req.path)
            return self.error(req, 500, f"internal error: {type(exc).__name__}")

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, resp: Response, keep: bool) -> None:
        reason = HTTPStatus(resp.status).phrase if resp.status in HTTPStatus._value2member_map_ else ""
        lines = [f"HTTP/1.1 {resp.status} {reason}"]
        if resp.content_type and resp.status != 204:
            lines.append(f"Content-Type: {resp.content_type}")
        if resp.status != 204:
            lines.append(f"Content-Length: {len(resp.body)}")
        lines.extend(f"{k}: {v}" for k, v in resp.headers)
        if not keep:
            lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + resp.body)
        await writer.drain()

    @staticmethod
    async def _stream(writer: asyncio.StreamWriter, resp: StreamResponse) -> None:
        lines = [
            f"HTTP/1.1 {resp.status} OK",
            f"Content-Type: {resp.content_type}",
            "Cache-Control: no-store",
            "Transfer-Encoding: chunked",
            "Connection: close",
        ]
        lines.extend(f"{k}: {v}" for k, v in resp.headers)
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        try:
            async for chunk in resp.chunks:
                if chunk:
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                await resp.chunks.aclose()  # type: ignore[attr-defined]
