"""HTTP/1.1 on the data path: parse heads with httptools, relay bodies in bulk.

The edge and the agent both proxy HTTP/1.1 between two byte streams.  Only message
*heads* are parsed (by httptools, so malformed input is refused by a real parser);
bodies are relayed in large blocks, with just enough framing logic (Content-Length,
chunked, read-until-close) to know where a message ends, so that keep-alive and
per-request routing work without ever buffering a whole body.

:func:`proxy_exchange` forwards one request and its response and is the single
place where the rules of message framing, ``Expect: 100-continue``, 1xx responses
and ``Upgrade`` live.  An :class:`Observer` sees every byte for capture.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import httptools

from backend import splice

MAX_HEAD = 64 * 1024  # bytes of request/response head before we answer 431 / 502
BLOCK = 256 * 1024  # relay block size

# Prefix marking a whole replacement response returned by an ``edit_response`` hook.
REPLACE = b"\x00replace\x00"

_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")

# Body framing kinds.
NO_BODY = 0
LENGTH = 1
CHUNKED = 2
UNTIL_CLOSE = 3


class HTTPError(Exception):
    """A request the proxy refuses before forwarding it (answered with ``status``)."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


class UpstreamError(Exception):
    """The other side of the proxy broke the protocol or vanished mid-message.

    ``response_started`` tells the caller whether part of the response already went to
    the client (then the only honest thing left is to close the connection).
    """

    response_started = False


@dataclass(slots=True)
class Head:
    """A parsed request or response head.  ``raw`` is exactly what goes on the wire."""

    raw: bytes
    headers: list[tuple[bytes, bytes]]
    version: str
    keep_alive: bool
    framing: int = NO_BODY
    length: int = 0
    # request only
    method: bytes = b""
    target: bytes = b""
    host: str = ""
    upgrade: bool = False
    expect_continue: bool = False
    # response only
    status: int = 0
    reason: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


class _Collector:
    __slots__ = ("headers", "reason", "url")

    def __init__(self) -> None:
        self.url = b""
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))


def _framing(headers: list[tuple[bytes, bytes]], is_request: bool) -> tuple[int, int, set[bytes]]:
    """Return (framing kind, content length, connection tokens) per RFC 9112 §6."""
    length: int | None = None
    te: bytes | None = None
    conn: set[bytes] = set()
    for k, v in headers:
        lk = k.lower()
        if lk == b"content-length":
            try:
                n = int(v.strip())
            except ValueError:
                raise HTTPError(400, "invalid Content-Length") from None
            if n < 0 or (length is not None and length != n):
                raise HTTPError(400, "conflicting Content-Length")
            length = n
        elif lk == b"transfer-encoding":
            te = v if te is None else te + b"," + v
        elif lk == b"connection":
            conn.update(t.strip().lower() for t in v.split(b","))
    if te is not None:
        if te.split(b",")[-1].strip().lower() == b"chunked":
            return CHUNKED, 0, conn
        if is_request:
            raise HTTPError(400, "unsupported Transfer-Encoding")
        return UNTIL_CLOSE, 0, conn
    if length is not None:
        return (LENGTH if length else NO_BODY), length, conn
    return (NO_BODY if is_request else UNTIL_CLOSE), 0, conn


def _keep_alive(version: str, conn: set[bytes]) -> bool:
    # Decided from the head itself: httptools resets its flags once a body-less
    # message completes, so its should_keep_alive() cannot be trusted here.
    if version == "1.1":
        return b"close" not in conn
    return b"keep-alive" in conn and b"close" not in conn


def parse_request_head(raw: bytes) -> Head:
    if not raw.strip():
        raise HTTPError(400, "empty request head")
    col = _Collector()
    parser = httptools.HttpRequestParser(col)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        raise HTTPError(400, f"malformed request: {exc}") from None
    method = parser.get_method()
    if method == b"CONNECT":
        raise HTTPError(405, "CONNECT is not supported")
    framing, length, conn = _framing(col.headers, True)
    host = ""
    upgrade = False
    expect = False
    for k, v in col.headers:
        lk = k.lower()
        if lk == b"host":
            if host:  # RFC 9112 §3.2: more than one Host is a 400, not a routing choice
                raise HTTPError(400, "more than one Host header")
            host = v.decode("latin-1").strip() or " "
        elif lk == b"upgrade":
            upgrade = b"upgrade" in conn
        elif lk == b"expect":
            expect = v.strip().lower() == b"100-continue"
    return Head(
        raw=raw,
        headers=col.headers,
        version=parser.get_http_version(),
        keep_alive=_keep_alive(parser.get_http_version(), conn),
        framing=framing,
        length=length,
        method=method,
        target=col.url,
        host=host.strip(),
        upgrade=upgrade,
        expect_continue=expect,
    )


def parse_response_head(raw: bytes, request_method: bytes = b"GET") -> Head:
    if not raw.strip():
        raise UpstreamError("empty response head")
    col = _Collector()
    parser = httptools.HttpResponseParser(col)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        raise UpstreamError(f"malformed response: {exc}") from None
    status = parser.get_status_code()
    try:
        framing, length, conn = _framing(col.headers, False)
    except HTTPError as exc:
        raise UpstreamError(exc.msg) from None
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        framing, length = NO_BODY, 0
    keep_alive = _keep_alive(parser.get_http_version(), conn) and framing != UNTIL_CLOSE
    return Head(
        raw=raw,
        headers=col.headers,
        version=parser.get_http_version(),
        keep_alive=keep_alive,
        framing=framing,
        length=length,
        status=status,
        reason=col.reason,
    )


async def read_head(reader: asyncio.StreamReader) -> bytes | None:
    """Read one message head up to and including the blank line.

    Returns None on a clean EOF before any byte; raises HTTPError(431) when the head
    is larger than MAX_HEAD and HTTPError(400) when the stream ends inside a head.
    The reader must have been created with ``limit >= MAX_HEAD``.
    """
    for _ in range(4):
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise HTTPError(431, "request header fields too large") from None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial.strip():
                return None
            raise HTTPError(400, "connection closed inside the message head") from None
        if len(raw) > MAX_HEAD:
            raise HTTPError(431, "request header fields too large")
        if raw[:1] not in (b"\r", b"\n"):
            return raw
        # Stray CRLFs before a message are ignored (RFC 9112 §2.2).
        raw = raw.lstrip(b"\r\n")
        if raw:
            return raw
    raise HTTPError(400, "too many empty lines before the message head")


# ------------------------------------------------------------------------- observers
class Observer(Protocol):
    """Sees one exchange as it streams; used by the agent's inspection capture."""

    # Body methods get each chunk, or an int for bytes that went past unseen (spliced
    # after the observer said it wanted no more); they return how many more bytes they
    # want to see (None: no limit).
    def request_body(self, chunk: bytes | int) -> int | None: ...
    def response_head(self, head: Head) -> None: ...
    def response_body(self, chunk: bytes | int) -> int | None: ...


# ----------------------------------------------------------------------- body relays
async def relay_body(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    head: Head,
    tee=None,
    prefix: bytes = b"",
    src: asyncio.StreamWriter | None = None,
) -> int:
    """Copy one message body from reader to writer according to ``head``'s framing.

    ``prefix`` (the message's head) goes out in the same write as the first block of
    the body, so a small response costs one send instead of two.  A large body with a
    Content-Length between two plain sockets (``src`` is the writer of the reader's
    connection) is spliced in the kernel; ``tee`` still sees all of it.
    """
    kind = head.framing
    if kind == NO_BODY:
        if prefix:
            writer.write(prefix)
        return 0
    total = 0
    if kind == LENGTH:
        left = head.length
        if splice.can_splice_body(reader, src, writer, left, teed=tee is not None):
            try:
                await splice.splice_body(reader, src, writer, left, prefix, tee)
            except splice.Incomplete as exc:
                raise UpstreamError(str(exc)) from None
            return left
        while left:
            chunk = await reader.read(min(left, BLOCK))
            if not chunk:
                raise UpstreamError("connection closed inside the message body")
            left -= len(chunk)
            total += len(chunk)
            if tee is not None:
                tee(chunk)
            if prefix:
                chunk, prefix = prefix + chunk, b""
            writer.write(chunk)
            await writer.drain()
        return total
    if prefix:
        writer.write(prefix)
    if kind == UNTIL_CLOSE:
        while chunk := await reader.read(BLOCK):
            total += len(chunk)
            writer.write(chunk)
            if tee is not None:
                tee(chunk)
            await writer.drain()
        return total
    # chunked: relay the framing verbatim, tracking only chunk sizes
    while True:
        line = await _read_line(reader)
        writer.write(line)
        if tee is not None:
            tee(line)
        size_txt = line.split(b";", 1)[0].strip()
        if not _HEX.fullmatch(size_txt):  # int(x, 16) would also take "0x5", "+5", "1_0"
            raise UpstreamError("invalid chunk size")
        size = int(size_txt, 16)
        if size == 0:
            # trailer section: lines until an empty one
            while True:
                line = await _read_line(reader)
                writer.write(line)
                if tee is not None:
                    tee(line)
                if line in (b"\r\n", b"\n"):
                    await writer.drain()
                    return total
        left = size
        while left:
            chunk = await reader.read(min(left, BLOCK))
            if not chunk:
                raise UpstreamError("connection closed inside a chunk")
            left -= len(chunk)
            total += len(chunk)
            writer.write(chunk)
            if tee is not None:
                tee(chunk)
            await writer.drain()  # a huge chunk must not pile up in memory
        try:
            crlf = await reader.readexactly(2)
        except asyncio.IncompleteReadError:
            raise UpstreamError("connection closed inside a chunk") from None
        if crlf != b"\r\n":
            raise UpstreamError("chunk data not followed by CRLF")
        writer.write(crlf)
        if tee is not None:
            tee(crlf)


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise UpstreamError("connection closed inside chunked framing") from None
    except asyncio.LimitOverrunError:
        raise UpstreamError("chunk header line too long") from None
    return line


# --------------------------------------------------------------------------- exchange
@dataclass(slots=True)
class Result:
    response: Head | None
    keep_alive: bool
    upgraded: bool = False
    request_bytes: int = 0
    response_bytes: int = 0
    extra: dict = field(default_factory=dict)


async def proxy_exchange(
    req: Head,
    req_raw: bytes,
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    up_r: asyncio.StreamReader,
    up_w: asyncio.StreamWriter,
    observer: Observer | None = None,
    edit_response: Callable[[Head], bytes | None] | None = None,
) -> Result:
    """Forward one request (head ``req_raw`` + body) and relay its response back.

    ``edit_response`` may rewrite the final response head: it returns a new head, or a
    whole replacement response (marked by ``REPLACE``), or None to keep it.

    The request body streams in its own task so that a server that answers early, or
    one that waits before sending ``100 Continue``, never deadlocks the exchange.
    Raises UpstreamError when the upstream breaks before a final response head.
    """
    up_w.write(req_raw)
    body_task: asyncio.Task | None = None
    if req.framing != NO_BODY:
        tee = observer.request_body if observer is not None else None
        body_task = asyncio.create_task(relay_body(client_r, up_w, req, tee, src=client_w))
    try:
        while True:
            if body_task is not None and not body_task.done():
                raw = await _head_or_body_failure(up_r, body_task)
            else:
                raw = await read_head(up_r)
            if raw is None:
                raise UpstreamError("upstream closed the connection without a response")
            resp = parse_response_head(raw, req.method)
            if 100 <= resp.status < 200 and resp.status != 101:
                client_w.write(raw)  # 100 Continue and friends pass through
                continue
            break
    except HTTPError as exc:
        _cancel(body_task)
        raise UpstreamError(f"bad response head: {exc.msg}") from None
    except BaseException:
        _cancel(body_task)
        raise
    if observer is not None:
        observer.response_head(resp)
    if edit_response is not None and resp.status != 101:
        edited = edit_response(resp)
        if edited is not None and edited.startswith(REPLACE):
            # a policy answered instead of the upstream: drop the upstream's response
            _cancel(body_task)
            client_w.write(edited[len(REPLACE) :])
            await client_w.drain()
            return Result(resp, keep_alive=False)
        if edited is not None:
            raw = edited
    if resp.status == 101:
        client_w.write(raw)
        await client_w.drain()
        _cancel(body_task)
        return Result(resp, keep_alive=False, upgraded=True)
    tee = observer.response_body if observer is not None else None
    try:
        nresp = await relay_body(up_r, client_w, resp, tee, prefix=raw, src=up_w)
    except UpstreamError as exc:
        _cancel(body_task)
        exc.response_started = True
        raise
    except BaseException:
        _cancel(body_task)
        raise
    if resp.framing == NO_BODY:
        await client_w.drain()
    keep_alive = req.keep_alive and resp.keep_alive
    nreq = 0
    if body_task is not None:
        if body_task.done():
            nreq = body_task.result()
        else:
            # The upstream answered before reading the whole request: this connection
            # cannot be reused, and the rest of the request body is abandoned.
            _cancel(body_task)
            keep_alive = False
    return Result(resp, keep_alive=keep_alive, request_bytes=nreq, response_bytes=nresp)


async def _head_or_body_failure(up_r: asyncio.StreamReader, body_task: asyncio.Task) -> bytes | None:
    """Wait for the response head, unless streaming the request body fails first."""
    head_task = asyncio.ensure_future(read_head(up_r))
    try:
        await asyncio.wait((head_task, body_task), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        head_task.cancel()
        raise
    if not head_task.done():
        exc = body_task.exception()
        if exc is not None:
            head_task.cancel()
            raise UpstreamError(f"request body failed: {exc}") from exc
    return await head_task


def _cancel(task: asyncio.Task | None) -> None:
    if task is not None and not task.done():
        task.cancel()
    elif task is not None:
        with contextlib.suppress(BaseException):
            task.result()


# ------------------------------------------------------------------------- heads out
# Text fields become bytes in one way everywhere a head is built from strings: UTF-8
# (RFC 9110 §5.5 obs-text; what Go and most servers put on the wire), with the
# ``surrogateescape`` handler so that bytes decoded by :func:`from_wire` go back out
# unchanged.  A field can never end its line: CR, LF and NUL in a value become spaces
# (Go's ``headerNewlineToSpace``), and a field whose name is not a token is dropped.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TOKEN_B = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_BYTES = re.compile(rb"[\r\n\0]")
_BAD_VALUE = str.maketrans({"\r": " ", "\n": " ", "\0": " "})


def from_wire(raw: bytes) -> str:
    """Bytes of a head as text: UTF-8, other bytes kept as surrogates (see :func:`head_bytes`)."""
    return raw.decode("utf-8", "surrogateescape")


def valid_field_name(name: str) -> bool:
    return _TOKEN.fullmatch(name) is not None


def field_value(value: str) -> str:
    """A header value that cannot end its line (CR, LF, NUL become spaces)."""
    return value.translate(_BAD_VALUE).strip(" \t")


def head_bytes(start: str, headers) -> bytes:
    """A message head from a start line and (name, value) strings, safe to put on the wire."""
    lines = [start, *(f"{k}: {v}" for k, v in headers)]
    text = "\r\n".join(lines)
    n = len(lines) - 1
    if text.count("\n") != n or text.count("\r") != n or "\0" in text:
        # something in there would end a line: sanitise field by field (rare path)
        lines = [field_value(start)]
        lines += [f"{k}: {field_value(v)}" for k, v in headers if valid_field_name(k)]
        text = "\r\n".join(lines)
    return (text + "\r\n\r\n").encode("utf-8", "surrogateescape")


# ------------------------------------------------------------------------- responses
def simple_response(
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    headers: list[tuple[str, str]] | None = None,
    close: bool = True,
) -> bytes:
    """Serialise a complete small response (error pages and the like)."""
    from http import HTTPStatus

    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    fields = [("Content-Type", content_type), ("Content-Length", str(len(body))), *(headers or ())]
    if close:
        fields.append(("Connection", "close"))
    return head_bytes(f"HTTP/1.1 {status} {reason}", fields) + body


def add_headers(raw: bytes, extra: list[tuple[bytes, bytes]]) -> bytes:
    """Append header lines to a head (before its final blank line) without reparsing."""
    if not extra:
        return raw
    end = raw.rindex(b"\r\n\r\n") if raw.endswith(b"\r\n\r\n") else raw.rindex(b"\n\n")
    add = b"".join(k + b": " + v + b"\r\n" for k, v in extra)
    if add.count(b"\n") != len(extra) or add.count(b"\r") != len(extra) or b"\0" in add:
        # no added field may end its line (see head_bytes): the rare careful path
        add = b"".join(
            k + b": " + _BAD_BYTES.sub(b" ", v).strip(b" \t") + b"\r\n" for k, v in extra if _TOKEN_B.fullmatch(k)
        )
    return raw[:end] + b"\r\n" + add + b"\r\n"
