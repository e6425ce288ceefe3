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
from dataclasses import dataclass
from typing import Protocol

import httptools

from backend import direct, splice

MAX_HEAD = 64 * 1024  # bytes of request/response head before we answer 431 / 502
BLOCK = 256 * 1024  # relay block size
DIRECT_MIN = 64 * 1024  # bodies at least this long are relayed without the StreamReader (direct, muxado)

# Prefix marking a whole replacement response returned by an ``edit_response`` hook.
REPLACE = b"\x00replace\x00"

# One chunk-size line (RFC 9112 §7.1): strict hex (no "0x", sign or "_"), then optional
# chunk extensions (§7.1.1: BWS ";" BWS name [BWS "=" BWS (token / quoted-string)]),
# ended by CRLF (a bare LF is refused: a smuggling vector between lenient parsers). BWS is
# allowed only around ";" and "=": "3 \r\n" is refused, since an upstream that reads the
# size differently would see another body (found by tests/fuzz/test_fuzz_public_http.py).
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[^\x00-\x08\x0a-\x1f\x7f])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*\r\n"
)
# A trailer field line (or the final empty line), CRLF-terminated, no bare CR/LF/NUL.
_TRAILER_LINE = re.compile(rb"(?:" + _TOKEN + rb":[^\x00\r\n]*)?\r\n")

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


class ClientError(HTTPError):
    """The client broke its request body (bad chunk framing, EOF, a stall past the body
    timeout): answered with ``status`` (400, or 408 for a timeout) by whoever proxies."""


class UpstreamError(Exception):
    """The other side of the proxy broke the protocol or vanished mid-message.

    ``response_started`` tells the caller whether part of the response already went to
    the client (then the only honest thing left is to close the connection).
    """

    response_started = False


class UpstreamClosed(UpstreamError):
    """The upstream closed its connection before a byte of the response: a pooled or
    forwarded connection that died as the request went out.  A request without a body
    and with an idempotent method may go again on another connection (as nginx's
    ``proxy_next_upstream error`` does)."""


#: methods a proxy may send twice (RFC 9110 §9.2.2)
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))


def retryable(req: Head) -> bool:
    """Whether ``req`` may be sent again after :class:`UpstreamClosed`."""
    return req.framing == NO_BODY and req.method in IDEMPOTENT


class WriteTimeout(TimeoutError):
    """The peer did not take the bytes written to it within the send timeout."""



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
    tes = 0
    conn: set[bytes] = set()
    for k, v in headers:
        lk = k.lower()
        if lk == b"content-length":
            v = v.strip()
            # digits only: int() would also take "+5", "1_0" and " 5 " differently from
            # the next hop, which is how requests are smuggled
            if not v.isdigit() or len(v) > 18:
                raise HTTPError(400, "invalid Content-Length")
            n = int(v)
            if length is not None and length != n:
                raise HTTPError(400, "conflicting Content-Length")
            length = n
        elif lk == b"transfer-encoding":
            te = v if te is None else te + b"," + v
            tes += 1
        elif lk == b"connection":
            conn.update(t.strip().lower() for t in v.split(b","))
    if te is not None:
        if is_request:
            # As nginx and Go: one Transfer-Encoding, exactly "chunked", and no
            # Content-Length beside it (RFC 9112 §6.1: a request with both is a
            # smuggling attempt or a broken client either way).
            if tes > 1:
                raise HTTPError(400, "repeated Transfer-Encoding")
            if te.strip().lower() != b"chunked":
                raise HTTPError(501, "unsupported Transfer-Encoding (only chunked)")
            if length is not None:
                raise HTTPError(400, "both Transfer-Encoding and Content-Length")
            return CHUNKED, 0, conn
        if te.split(b",")[-1].strip().lower() == b"chunked":
            return CHUNKED, 0, conn
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


# Parsed heads, by their exact bytes (and, for responses, the request's method): a
# proxied connection mostly repeats the same heads (a client's requests, an upstream's
# responses differ in a Date once a second), and parsing one costs ~8 us of the ~35 us
# the edge spends per small request.  A Head is never changed once made, so the same
# object can be handed out again.  Only small heads are kept, and the cache is emptied
# when full: at most HEAD_CACHE_SIZE heads of HEAD_CACHE_MAX bytes each.
HEAD_CACHE_SIZE = 256
HEAD_CACHE_MAX = 2048
_request_heads: dict[bytes, Head] = {}
_response_heads: dict[tuple[bytes, bytes], Head] = {}


def parse_request_head(raw: bytes) -> Head:
    """The parsed request head ``raw`` (raising HTTPError for a bad one); cached."""
    head = _request_heads.get(raw) if type(raw) is bytes else None
    if head is None:
        head = _parse_request_head(raw)
        if len(raw) <= HEAD_CACHE_MAX and type(raw) is bytes:
            if len(_request_heads) >= HEAD_CACHE_SIZE:
                _request_heads.clear()
            _request_heads[raw] = head
    return head


def _parse_request_head(raw: bytes) -> Head:
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
    version = parser.get_http_version()
    if version not in ("1.1", "1.0"):  # HTTP/2.0, HTTP/0.9 and friends: as nginx and Go
        raise HTTPError(505, f"HTTP/{version} is not supported here")
    if version == "1.0" and any(k.lower() == b"transfer-encoding" for k, _ in col.headers):
        # RFC 9112 §6.1: a 1.0 peer cannot mean chunked; its framing is ambiguous (smuggling)
        raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
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
        version=version,
        keep_alive=_keep_alive(version, conn),
        framing=framing,
        length=length,
        method=method,
        target=col.url,
        host=host.strip(),
        upgrade=upgrade,
        expect_continue=expect,
    )


# RFC 3986 §2.3 unreserved characters: their percent-encodings are equivalent to them.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEXDIGITS = frozenset(b"0123456789ABCDEFabcdef")


def _normalize_escapes(part: bytes) -> bytes:
    """Decode %XX of unreserved characters (§6.2.2.2), upper-case the others (§6.2.2.1)."""
    out = bytearray()
    i = 0
    n = len(part)
    while i < n:
        j = part.find(b"%", i)
        if j < 0:
            out += part[i:]
            break
        out += part[i:j]
        hx = part[j + 1 : j + 3]
        if len(hx) != 2 or hx[0] not in _HEXDIGITS or hx[1] not in _HEXDIGITS:
            raise HTTPError(400, "invalid percent-encoding in the request target")
        c = int(hx, 16)
        if c in _UNRESERVED:
            out.append(c)
        else:
            out += b"%" + hx.upper()
        i = j + 3
    return bytes(out)


def _remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 §5.2.4 for an absolute path."""
    out: list[bytes] = []
    segs = path.split(b"/")[1:]
    for k, seg in enumerate(segs):
        last = k == len(segs) - 1
        if seg == b".":
            if last:
                out.append(b"")
        elif seg == b"..":
            if out:
                out.pop()
            if last:
                out.append(b"")
        else:
            out.append(seg)
    return b"/" + b"/".join(out)


def normalize_target(req: Head) -> Head:
    """The request with its target in normal origin form, as policy must see it.

    RFC 9112 §3.2.2: an absolute-form target (``GET http://host/p``) becomes origin form
    and its authority replaces the Host header.  The path's percent-encoded unreserved
    characters are decoded (RFC 3986 §6.2.2.2), other escapes upper-cased, and dot
    segments removed (§5.2.4), and runs of slashes merged (as nginx does by default), so
    ``/%61dmin``, ``/x/../admin`` and ``//admin`` read ``/admin``.
    Returns ``req`` itself when nothing changes (the common case costs one scan);
    otherwise a new Head whose ``raw`` is what must be forwarded.
    """
    target = req.target
    if target.startswith(b"/") and b"%" not in target and b"/." not in target and b"//" not in target:
        return req
    host = None
    if target[:1] != b"/":
        if target == b"*" and req.method == b"OPTIONS":
            return req
        scheme, sep, rest = target.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            raise HTTPError(400, "invalid request target")
        cut = len(rest)
        for ch in b"/?#":
            k = rest.find(bytes((ch,)))
            if 0 <= k < cut:
                cut = k
        authority, rest = rest[:cut], rest[cut:]
        if not authority or b"@" in authority:
            raise HTTPError(400, "invalid authority in the request target")
        host = authority
        target = rest if rest[:1] == b"/" else b"/" + rest
    path, q, query = target.partition(b"?")
    path = _normalize_escapes(path) if b"%" in path else path
    if b"/." in path:
        path = _remove_dot_segments(path)
    while b"//" in path:  # nginx's merge_slashes (on by default): //admin is /admin
        path = path.replace(b"//", b"/")
    if q:
        query = _normalize_escapes(query) if b"%" in query else query
    new_target = path + q + query
    if new_target == req.target and host is None:
        return req
    raw = req.raw
    eol = raw.find(b"\n")
    line = raw[:eol].rstrip(b"\r")
    method, _, rest = line.partition(b" ")
    _, _, version = rest.rpartition(b" ")
    head_lines = [method + b" " + new_target + b" " + version]
    headers = req.headers
    if host is not None:
        headers = [(k, v) for k, v in req.headers if k.lower() != b"host"]
        headers.insert(0, (b"Host", host))
        body = b"".join(k + b": " + v + b"\r\n" for k, v in headers)
        new_raw = head_lines[0] + b"\r\n" + body + b"\r\n"
    else:
        new_raw = head_lines[0] + b"\r\n" + raw[eol + 1 :]
    return Head(
        raw=new_raw,
        headers=headers,
        version=req.version,
        keep_alive=req.keep_alive,
        framing=req.framing,
        length=req.length,
        method=req.method,
        target=new_target,
        host=host.decode("latin-1") if host is not None else req.host,
        upgrade=req.upgrade,
        expect_continue=req.expect_continue,
    )


def parse_response_head(raw: bytes, request_method: bytes = b"GET") -> Head:
    """The parsed response head ``raw`` to a ``request_method`` request (raising
    UpstreamError for a bad one); cached like request heads."""
    key = (raw, request_method)
    head = _response_heads.get(key) if type(raw) is bytes else None
    if head is None:
        head = _parse_response_head(raw, request_method)
        if len(raw) <= HEAD_CACHE_MAX and type(raw) is bytes:
            if len(_response_heads) >= HEAD_CACHE_SIZE:
                _response_heads.clear()
            _response_heads[key] = head
    return head


def _parse_response_head(raw: bytes, request_method: bytes) -> Head:
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


# ----------------------------------------------------------------------- deadlines
# A deadline costs one timer handle, armed only around a read or a drain that would
# actually wait (the bytes are not buffered yet / the write buffer is not empty), so a
# small request that arrives in one segment pays for none.  Each timer bounds the gap
# between two pieces of progress (nginx's client_body_timeout / send_timeout), not the
# whole body, so a slow but moving transfer is never cut off.


def _expire_read(reader: asyncio.StreamReader, exc: BaseException) -> None:
    reader.set_exception(exc)  # wakes the waiting read with ``exc``


def _read_stall(error: type[Exception], timeout: float) -> Exception:
    msg = f"no body bytes for {timeout:g}s"
    if issubclass(error, HTTPError):
        return error(408, "request body timeout: " + msg)
    return error(msg)


def _arm_read(
    reader: asyncio.StreamReader, timeout: float | None, error: type[Exception], ready: bool
) -> asyncio.TimerHandle | None:
    if timeout is None or ready or reader.at_eof():
        return None
    return asyncio.get_running_loop().call_later(timeout, _expire_read, reader, _read_stall(error, timeout))


def _take(reader: asyncio.StreamReader, n: int) -> bytes | None:
    """The next ``n`` bytes of ``reader`` if it holds them all already (what
    ``await reader.read(n)`` would return then, without a coroutine); else None."""
    buf = getattr(reader, "_buffer", None)
    if not isinstance(buf, bytearray) or len(buf) < n or reader.exception() is not None:
        return None
    return _cut(reader, buf, n)


def _cut(reader: asyncio.StreamReader, buf: bytearray, n: int) -> bytes:
    """The first ``n`` bytes of ``reader``'s buffer ``buf`` (at most all of it), copied
    once: ``StreamReader.read`` copies twice (a bytearray slice, then bytes of it),
    which was 13% of an edge's samples relaying 1 MiB bodies from TLS data connections."""
    if len(buf) <= n:
        data = bytes(buf)
        buf.clear()
    else:
        with memoryview(buf) as view:
            data = view[:n].tobytes()
        del buf[:n]
    reader._maybe_resume_transport()  # as read() does: reading may go on if it was paused
    return data


async def read_some(reader: asyncio.StreamReader, n: int) -> bytes:
    """``await reader.read(n)`` for ``n`` > 0 (up to ``n`` bytes, b"" at EOF), with one
    copy of the bytes instead of two."""
    buf = getattr(reader, "_buffer", None)
    wait = getattr(reader, "_wait_for_data", None)
    if not isinstance(buf, bytearray) or wait is None:
        return await reader.read(n)
    exc = reader.exception()
    if exc is not None:
        raise exc
    if not buf:
        if reader.at_eof():
            return b""
        await wait("read")  # raises what set_exception() set
        if not buf:
            return b""  # EOF
    return _cut(reader, buf, n)


def _transport_of(writer: asyncio.StreamWriter) -> asyncio.BaseTransport | None:
    """The transport of a writer that has a live one (not a stand-in writer)."""
    transport = getattr(writer, "transport", None)
    if transport is None or not hasattr(transport, "get_write_buffer_size") or transport.is_closing():
        return None
    return transport


def _buffered(reader: asyncio.StreamReader) -> bytearray:
    buf = getattr(reader, "_buffer", None)
    return buf if isinstance(buf, bytearray) else bytearray()


async def _read(reader: asyncio.StreamReader, n: int, timeout: float | None, error: type[Exception]) -> bytes:
    timer = _arm_read(reader, timeout, error, bool(_buffered(reader)))
    try:
        return await read_some(reader, n)
    finally:
        if timer is not None:
            timer.cancel()


async def drain(writer: asyncio.StreamWriter, timeout: float | None = None) -> None:
    """``writer.drain()``, giving up (abort + :class:`WriteTimeout`) when the peer takes
    nothing for ``timeout`` seconds.  Nothing waiting in an open transport (a small
    write went straight to the socket, the usual case) returns at once: what
    ``drain()`` would do then, without its three coroutine layers."""
    transport = getattr(writer, "transport", None)  # a stand-in writer may have none
    if transport is not None and not transport.get_write_buffer_size() and not transport.is_closing():
        return
    await splice.drain_within(writer, timeout, WriteTimeout)


# ----------------------------------------------------------------------- body relays
async def relay_body(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    head: Head,
    tee=None,
    prefix: bytes = b"",
    src: asyncio.StreamWriter | None = None,
    error: type[Exception] = UpstreamError,
    read_timeout: float | None = None,
    write_timeout: float | None = None,
) -> int:
    """Copy one message body from reader to writer according to ``head``'s framing.

    ``prefix`` (the message's head) goes out in the same write as the first block of
    the body, so a small response costs one send instead of two.  A large body with a
    Content-Length between two plain sockets (``src`` is the writer of the reader's
    connection) is spliced in the kernel; ``tee`` still sees all of it.

    Faults of the reading side (broken framing, EOF inside the body, no bytes for
    ``read_timeout`` seconds) raise ``error`` (:class:`UpstreamError` for a response,
    :class:`ClientError` for a request body); a writer that takes nothing for
    ``write_timeout`` seconds raises :class:`WriteTimeout`.  Chunked framing is checked
    line by line *before* it is forwarded, so a malformed chunk never leaves the proxy.
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
                await splice.splice_body(reader, src, writer, left, prefix, tee, read_timeout, write_timeout)
            except splice.Incomplete as exc:
                raise _err(error, str(exc)) from None
            except splice.ReadStall:
                raise _read_stall(error, read_timeout or 0) from None
            except splice.WriteStall as exc:
                raise WriteTimeout(str(exc)) from None
            return left
        relay_to = getattr(reader, "relay_to", None)
        if relay_to is not None and tee is None and read_timeout is None and left >= DIRECT_MIN and _transport_of(writer):
            # a muxado stream's body: written out from the frames as they are parsed
            missing = await relay_to(writer, left, prefix, lambda w: drain(w, write_timeout))
            if missing:
                raise _err(error, "connection closed inside the message body")
            return left
        if len(_buffered(reader)) >= left:
            # all of it is here already (a small response read with its head): no
            # deadline to arm, one read, and the head goes out in the same write
            chunk = await read_some(reader, left)
            if tee is not None:
                tee(chunk)
            writer.write(prefix + chunk if prefix else chunk)
            await drain(writer, write_timeout)
            return left
        if read_timeout is None and left >= DIRECT_MIN and direct.can_forward(reader, writer):
            # e.g. a response from a TLS data connection: handed to the writer as the
            # connection decrypts it (one copy instead of two, no task step per read)
            missing = await direct.body(reader, writer, left, prefix, tee, lambda w: drain(w, write_timeout))
            if missing:
                raise _err(error, "connection closed inside the message body")
            return left
        while left:
            chunk = await _read(reader, min(left, BLOCK), read_timeout, error)
            if not chunk:
                raise _err(error, "connection closed inside the message body")
            left -= len(chunk)
            total += len(chunk)
            if tee is not None:
                tee(chunk)
            if prefix:
                chunk, prefix = prefix + chunk, b""
            writer.write(chunk)
            await drain(writer, write_timeout)
        return total
    if prefix:
        writer.write(prefix)
    if kind == UNTIL_CLOSE:
        while chunk := await _read(reader, BLOCK, read_timeout, error):
            total += len(chunk)
            writer.write(chunk)
            if tee is not None:
                tee(chunk)
            await drain(writer, write_timeout)
        return total
    # chunked: relay the framing verbatim once each line is known to be valid
    while True:
        line = await _read_line(reader, error, read_timeout)
        m = _CHUNK_LINE.fullmatch(line)
        if m is None:  # int(x, 16) alone would take "0x5", "+5", "1_0"; LF alone is refused
            raise _err(error, "invalid chunk size line")
        writer.write(line)
        if tee is not None:
            tee(line)
        size = int(m.group(1), 16)
        if size == 0:
            # trailer section: field lines until an empty one
            while True:
                line = await _read_line(reader, error, read_timeout)
                if _TRAILER_LINE.fullmatch(line) is None:
                    raise _err(error, "invalid chunked trailer line")
                writer.write(line)
                if tee is not None:
                    tee(line)
                if line == b"\r\n":
                    await drain(writer, write_timeout)
                    return total
        left = size
        while left:
            chunk = await _read(reader, min(left, BLOCK), read_timeout, error)
            if not chunk:
                raise _err(error, "connection closed inside a chunk")
            left -= len(chunk)
            total += len(chunk)
            writer.write(chunk)
            if tee is not None:
                tee(chunk)
            await drain(writer, write_timeout)  # a huge chunk must not pile up in memory
        timer = _arm_read(reader, read_timeout, error, len(_buffered(reader)) >= 2)
        try:
            crlf = await reader.readexactly(2)
        except asyncio.IncompleteReadError:
            raise _err(error, "connection closed inside a chunk") from None
        finally:
            if timer is not None:
                timer.cancel()
        if crlf != b"\r\n":
            raise _err(error, "chunk data not followed by CRLF")
        writer.write(crlf)
        if tee is not None:
            tee(crlf)


def _err(error: type[Exception], msg: str) -> Exception:
    return error(400, msg) if issubclass(error, HTTPError) else error(msg)


async def _read_line(
    reader: asyncio.StreamReader, error: type[Exception] = UpstreamError, timeout: float | None = None
) -> bytes:
    timer = _arm_read(reader, timeout, error, _buffered(reader).find(b"\n") >= 0)
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise _err(error, "connection closed inside chunked framing") from None
    except asyncio.LimitOverrunError:
        raise _err(error, "chunk header line too long") from None
    finally:
        if timer is not None:
            timer.cancel()
    return line


# --------------------------------------------------------------------------- exchange
@dataclass(slots=True)
class Result:
    response: Head | None
    keep_alive: bool
    upgraded: bool = False
    request_bytes: int = 0
    response_bytes: int = 0
    #: the upstream's connection may carry another request (``keep_alive`` is the
    #: client's: what the forwarded head, edited or not, says, and the request whole)
    upstream_keep_alive: bool = True


async def proxy_exchange(
    req: Head,
    req_raw: bytes,
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    up_r: asyncio.StreamReader,
    up_w: asyncio.StreamWriter,
    observer: Observer | None = None,
    edit_response: Callable[[Head], bytes | None] | None = None,
    body_timeout: float | None = None,
    send_timeout: float | None = None,
) -> Result:
    """Forward one request (head ``req_raw`` + body) and relay its response back.

    ``edit_response`` may rewrite the final response head: it returns a new head, or a
    whole replacement response (marked by ``REPLACE``), or None to keep it.

    The request body streams in its own task so that a server that answers early, or
    one that waits before sending ``100 Continue``, never deadlocks the exchange.
    Raises UpstreamError when the upstream breaks before a final response head, and
    :class:`ClientError` (an HTTPError: answer it) when the client's request body is
    malformed, ends early or stalls for ``body_timeout`` seconds before one.  A client
    that reads nothing of the response for ``send_timeout`` seconds raises WriteTimeout.
    """
    up_w.write(req_raw)
    body_task: asyncio.Task | None = None
    if req.framing != NO_BODY:
        tee = observer.request_body if observer is not None else None
        body_task = asyncio.create_task(
            relay_body(
                client_r,
                up_w,
                req,
                tee,
                src=client_w,
                error=ClientError,
                read_timeout=body_timeout,
                write_timeout=send_timeout,
            )
        )
    try:
        while True:
            if body_task is not None and not body_task.done():
                raw = await _head_or_body_failure(up_r, body_task)
            else:
                raw = await read_head(up_r)
            if raw is None:
                raise UpstreamClosed("upstream closed the connection without a response")
            resp = parse_response_head(raw, req.method)
            if 100 <= resp.status < 200 and resp.status != 101:
                client_w.write(raw)  # 100 Continue and friends pass through
                continue
            break
    except ClientError:
        _cancel(body_task)
        raise
    except HTTPError as exc:
        _cancel(body_task)
        raise UpstreamError(f"bad response head: {exc.msg}") from None
    except ConnectionError as exc:  # reset before a byte of the response
        _cancel(body_task)
        raise UpstreamClosed(f"upstream connection lost: {exc}") from None
    except BaseException:
        _cancel(body_task)
        raise
    if observer is not None:
        observer.response_head(resp)
    client_keep = resp.keep_alive
    if edit_response is not None and resp.status != 101:
        edited = edit_response(resp)
        if edited is not None and edited.startswith(REPLACE):
            # a policy answered instead of the upstream: drop the upstream's response
            _cancel(body_task)
            client_w.write(edited[len(REPLACE) :])
            await drain(client_w, send_timeout)
            return Result(resp, keep_alive=False)
        if edited is not None:
            raw = edited
            # the client's connection goes on as the head it gets says (an edit may drop
            # the upstream's "Connection: close", which is hop-by-hop)
            with contextlib.suppress(HTTPError):
                client_keep = parse_response_head(edited, req.method).keep_alive
    if resp.status == 101:
        client_w.write(raw)
        await drain(client_w, send_timeout)
        _cancel(body_task)
        return Result(resp, keep_alive=False, upgraded=True)
    tee = observer.response_body if observer is not None else None
    try:
        body = _take(up_r, resp.length) if resp.framing == LENGTH else None
        if body is not None:
            # a small response that came in with its head: out in one write, and no
            # body relay (relay_body's general case does the same, at more cost)
            if tee is not None:
                tee(body)
            client_w.write(raw + body)
            await drain(client_w, send_timeout)
            nresp = resp.length
        else:
            nresp = await relay_body(up_r, client_w, resp, tee, prefix=raw, src=up_w, write_timeout=send_timeout)
    except UpstreamError as exc:
        _cancel(body_task)
        exc.response_started = True
        raise
    except BaseException:
        _cancel(body_task)
        raise
    if resp.framing == NO_BODY:
        await drain(client_w, send_timeout)
    keep_alive = req.keep_alive and client_keep
    nreq = 0
    if body_task is not None:
        if body_task.done():
            if body_task.cancelled() or body_task.exception() is not None:
                keep_alive = False  # the response is out; the broken request ends the connection
            else:
                nreq = body_task.result()
        else:
            # The upstream answered before reading the whole request: this connection
            # cannot be reused, and the rest of the request body is abandoned.
            _cancel(body_task)
            keep_alive = False
    return Result(
        resp, keep_alive=keep_alive, request_bytes=nreq, response_bytes=nresp, upstream_keep_alive=resp.keep_alive
    )


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
            if isinstance(exc, ClientError):
                raise exc
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
    return add_fields(raw, field_lines(extra))


def field_lines(extra: list[tuple[bytes, bytes]]) -> bytes:
    """``Name: value`` lines, each ended by CRLF, none of which can end its line early."""
    add = b"".join(k + b": " + v + b"\r\n" for k, v in extra)
    if add.count(b"\n") != len(extra) or add.count(b"\r") != len(extra) or b"\0" in add:
        # no added field may end its line (see head_bytes): the rare careful path
        add = b"".join(
            k + b": " + _BAD_BYTES.sub(b" ", v).strip(b" \t") + b"\r\n" for k, v in extra if _TOKEN_B.fullmatch(k)
        )
    return add


def add_fields(raw: bytes, lines: bytes) -> bytes:
    """A head with ``lines`` (from :func:`field_lines`) added before its final blank line."""
    if raw.endswith(b"\r\n\r\n"):
        return raw[:-2] + lines + b"\r\n"
    end = raw.rindex(b"\n\n")
    return raw[:end] + b"\r\n" + lines + b"\r\n"
