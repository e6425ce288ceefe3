"""Tests for backend.http1: head parsing, framing rules, body relays and proxy_exchange.

Everything runs over real asyncio streams: Unix socket pairs, or a 127.0.0.1 port-0
server where TCP matters.  Every wait is bounded by ``within``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from dataclasses import dataclass

import pytest

from backend.http1 import (
    CHUNKED,
    LENGTH,
    MAX_HEAD,
    NO_BODY,
    UNTIL_CLOSE,
    ClientError,
    Head,
    HTTPError,
    UpstreamError,
    WriteTimeout,
    add_headers,
    normalize_target,
    parse_request_head,
    parse_response_head,
    proxy_exchange,
    read_head,
    relay_body,
)
from backend.relay import relay

T = 5.0  # seconds any single step may take


async def within(aw, timeout: float = T):
    return await asyncio.wait_for(aw, timeout)


@dataclass
class End:
    """One end of a connection: its reader and writer."""

    r: asyncio.StreamReader
    w: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.w.write(data)
        await within(self.w.drain())

    async def read_all(self, limit: int = 64 * 1024 * 1024) -> bytes:
        """Read until EOF (bounded in size and time)."""
        out = bytearray()
        while len(out) < limit:
            chunk = await within(self.r.read(256 * 1024))
            if not chunk:
                break
            out += chunk
        return bytes(out)


@pytest.fixture
async def connect():
    """Factory: ``await connect(tcp=False)`` returns two connected Ends."""
    writers: list[asyncio.StreamWriter] = []
    servers: list[asyncio.AbstractServer] = []

    async def make(tcp: bool = False) -> tuple[End, End]:
        if tcp:
            accepted: asyncio.Future = asyncio.get_running_loop().create_future()

            def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                if not accepted.done():
                    accepted.set_result((r, w))

            srv = await asyncio.start_server(on_conn, "127.0.0.1", 0, limit=MAX_HEAD)
            servers.append(srv)
            port = srv.sockets[0].getsockname()[1]
            a = End(*await within(asyncio.open_connection("127.0.0.1", port, limit=MAX_HEAD)))
            b = End(*await within(accepted))
        else:
            s1, s2 = socket.socketpair()
            a = End(*await asyncio.open_connection(sock=s1, limit=MAX_HEAD))
            b = End(*await asyncio.open_connection(sock=s2, limit=MAX_HEAD))
        writers.extend([a.w, b.w])
        return a, b

    yield make
    for w in writers:
        w.transport.abort()
    for srv in servers:
        srv.close()


class Recorder:
    """An Observer that keeps everything it is shown."""

    def __init__(self) -> None:
        self.req_body = bytearray()
        self.heads: list[Head] = []
        self.resp_body = bytearray()

    def request_body(self, chunk: bytes) -> None:
        self.req_body += chunk

    def response_head(self, head: Head) -> None:
        self.heads.append(head)

    def response_body(self, chunk: bytes) -> None:
        self.resp_body += chunk


def _head(framing: int, length: int = 0) -> Head:
    return Head(raw=b"", headers=[], version="1.1", keep_alive=True, framing=framing, length=length)


# ------------------------------------------------------------------ parse_request_head
def test_request_line_and_host() -> None:
    h = parse_request_head(
        b"GET /a/b?c=1&d=%20 HTTP/1.1\r\nHost: Example.COM:8080\r\nAccept: */*\r\n\r\n"
    )
    assert h.method == b"GET"
    assert h.target == b"/a/b?c=1&d=%20"
    assert h.host == "Example.COM:8080"
    assert h.version == "1.1"
    assert h.framing == NO_BODY and h.length == 0
    assert not h.upgrade and not h.expect_continue
    assert h.header(b"accept") == b"*/*"
    assert h.header(b"ACCEPT") == b"*/*"
    assert h.header(b"x-missing") is None
    assert h.headers == [(b"Host", b"Example.COM:8080"), (b"Accept", b"*/*")]


def test_absolute_form_target_is_kept() -> None:
    h = parse_request_head(b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert h.target == b"http://a.example/x"
    assert h.host == "a.example"


@pytest.mark.parametrize(
    "version, connection, keep_alive",
    [
        ("1.1", None, True),
        ("1.1", "close", False),
        ("1.1", "Close", False),
        ("1.1", "keep-alive", True),
        ("1.1", "foo, close", False),
        ("1.0", None, False),
        ("1.0", "keep-alive", True),
        ("1.0", "Keep-Alive", True),
        ("1.0", "keep-alive, close", False),
    ],
)
def test_keep_alive_rules(version: str, connection: str | None, keep_alive: bool) -> None:
    raw = f"GET / HTTP/{version}\r\nHost: a\r\n"
    if connection is not None:
        raw += f"Connection: {connection}\r\n"
    h = parse_request_head((raw + "\r\n").encode())
    assert h.version == version
    assert h.keep_alive is keep_alive


def test_connection_tokens_over_several_header_lines() -> None:
    h = parse_request_head(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n"
    )
    assert h.keep_alive is False


@pytest.mark.parametrize(
    "headers, upgrade",
    [
        (b"Connection: Upgrade\r\nUpgrade: websocket\r\n", True),
        (b"Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n", True),
        (b"Upgrade: websocket\r\n", False),  # not listed in Connection
        (b"Connection: Upgrade\r\n", False),  # no Upgrade header
    ],
)
def test_upgrade_detection(headers: bytes, upgrade: bool) -> None:
    h = parse_request_head(b"GET /ws HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n")
    assert h.upgrade is upgrade
    assert h.method == b"GET" and h.target == b"/ws"


@pytest.mark.parametrize(
    "value, expect", [(b"100-continue", True), (b"100-Continue", True), (b"something", False)]
)
def test_expect_continue(value: bytes, expect: bool) -> None:
    h = parse_request_head(
        b"POST /u HTTP/1.1\r\nHost: a\r\nExpect: " + value + b"\r\nContent-Length: 3\r\n\r\n"
    )
    assert h.expect_continue is expect


@pytest.mark.parametrize(
    "headers, framing, length",
    [
        (b"Content-Length: 42\r\n", LENGTH, 42),
        (b"Content-Length: 0\r\n", NO_BODY, 0),
        (b"Transfer-Encoding: chunked\r\n", CHUNKED, 0),
        (b"Transfer-Encoding:  Chunked \r\n", CHUNKED, 0),
        (b"", NO_BODY, 0),
    ],
    ids=["length", "zero-length", "chunked", "chunked-case", "none"],
)
def test_request_framing(headers: bytes, framing: int, length: int) -> None:
    h = parse_request_head(b"POST /x HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n")
    assert (h.framing, h.length) == (framing, length)


@pytest.mark.parametrize(
    "headers, status",
    [
        (b"Transfer-Encoding: gzip, chunked\r\n", 501),  # nginx and Go: only chunked
        (b"Transfer-Encoding: close\r\n", 400),  # llhttp: not a coding at all
        (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", 400),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 400),
        (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", 400),
        (b"Content-Length: +5\r\n", 400),
        (b"Content-Length: 1_0\r\n", 400),
        (b"Content-Length: 0x5\r\n", 400),
        (b"Content-Length: 5, 5\r\n", 400),
        (b"Content-Length: 99999999999999999999\r\n", 400),
    ],
    ids=["gzip-chunked", "te-close", "te-two-lines", "te-twice", "te-and-cl", "cl-plus", "cl-underscore",
         "cl-hex", "cl-list", "cl-huge"],
)
def test_request_framing_that_could_smuggle_is_refused(headers: bytes, status: int) -> None:
    """Framing another hop could read differently is refused, never guessed at."""
    with pytest.raises(HTTPError) as info:
        parse_request_head(b"POST /x HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n")
    assert info.value.status == status


@pytest.mark.parametrize(
    "version, status",
    [(b"HTTP/2.0", 505), (b"HTTP/0.9", 505), (b"HTTP/1.2", 400), (b"HTTP/3.0", 400)],
)
def test_request_versions_other_than_http1_are_refused(version: bytes, status: int) -> None:
    """Versions llhttp knows but we do not proxy: 505 (as nginx and Go); others: its 400."""
    with pytest.raises(HTTPError) as info:
        parse_request_head(b"GET / " + version + b"\r\nHost: a\r\n\r\n")
    assert info.value.status == status


@pytest.mark.parametrize(
    "raw",
    [
        b"hello world\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost a\r\n\r\n",
        b"GET / HTTP/9.9x\r\nHost: a\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
    ],
    ids=["words", "tls-hello", "no-colon", "bad-version", "nul", "space-in-name", "bare-cr"],
)
def test_garbage_is_400(raw: bytes) -> None:
    with pytest.raises(HTTPError) as info:
        parse_request_head(raw)
    assert info.value.status == 400


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    ],
    ids=["cl-then-te", "te-then-cl"],
)
def test_content_length_with_transfer_encoding_is_400(headers: bytes) -> None:
    with pytest.raises(HTTPError) as info:
        parse_request_head(b"POST / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n")
    assert info.value.status == 400


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Content-Length: 5, 6\r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: abc\r\n",
    ],
    ids=["two-lines", "list", "negative", "not-a-number"],
)
def test_conflicting_or_invalid_content_length_is_400(headers: bytes) -> None:
    with pytest.raises(HTTPError) as info:
        parse_request_head(b"POST / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n")
    assert info.value.status == 400


def test_connect_is_405() -> None:
    with pytest.raises(HTTPError) as info:
        parse_request_head(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n")
    assert info.value.status == 405


@pytest.mark.parametrize(
    "te", [b"gzip", b"chunked, gzip", b"identity"], ids=["gzip", "chunked-not-last", "identity"]
)
def test_unsupported_transfer_encoding_in_request_is_400(te: bytes) -> None:
    with pytest.raises(HTTPError) as info:
        parse_request_head(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + te + b"\r\n\r\n")
    assert info.value.status == 400


@pytest.mark.parametrize("raw", [b"", b"\r\n"], ids=["empty", "crlf"])
def test_empty_head_is_400_not_a_phantom_request(raw: bytes) -> None:
    with pytest.raises(HTTPError) as info:
        parse_request_head(raw)
    assert info.value.status == 400


def test_two_host_headers_are_400() -> None:
    with pytest.raises(HTTPError) as info:
        parse_request_head(b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n")
    assert info.value.status == 400


# ------------------------------------------------------------------------- read_head
async def test_read_head_returns_one_head_at_a_time(connect) -> None:
    a, b = await connect()
    h1 = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
    h2 = b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
    await a.send(h1 + h2 + b"partial")
    assert await within(read_head(b.r)) == h1
    assert await within(read_head(b.r)) == h2
    assert await within(b.r.read(100)) == b"partial"


async def test_read_head_assembles_a_head_sent_byte_by_byte(connect) -> None:
    a, b = await connect()
    head = b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Long: " + b"v" * 300 + b"\r\n\r\n"

    async def trickle() -> None:
        for i in range(len(head)):
            await a.send(head[i : i + 1])

    t = asyncio.create_task(trickle())
    assert await within(read_head(b.r)) == head
    await within(t)


async def test_read_head_drops_one_stray_crlf_between_requests(connect) -> None:
    a, b = await connect()
    head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    await a.send(b"\r\n" + head)
    assert await within(read_head(b.r)) == head


async def test_read_head_431_past_max_head(connect) -> None:
    a, b = await connect()
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * (MAX_HEAD + 10) + b"\r\n\r\n"
    sender = asyncio.create_task(a.send(head))
    with pytest.raises(HTTPError) as info:
        await within(read_head(b.r))
    assert info.value.status == 431
    sender.cancel()


async def test_read_head_431_without_any_terminator(connect) -> None:
    a, b = await connect()
    sender = asyncio.create_task(a.send(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 20000))
    with pytest.raises(HTTPError) as info:
        await within(read_head(b.r))
    assert info.value.status == 431
    sender.cancel()


async def test_read_head_boundary_at_max_head(connect) -> None:
    a, b = await connect()
    prefix = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: "
    exact = prefix + b"p" * (MAX_HEAD - len(prefix) - 4) + b"\r\n\r\n"
    assert len(exact) == MAX_HEAD
    await a.send(exact)
    assert await within(read_head(b.r)) == exact
    over = prefix + b"p" * (MAX_HEAD - len(prefix) - 3) + b"\r\n\r\n"
    assert len(over) == MAX_HEAD + 1
    await a.send(over)
    with pytest.raises(HTTPError) as info:
        await within(read_head(b.r))
    assert info.value.status == 431


@pytest.mark.parametrize("before_eof", [b"", b"\r\n"], ids=["nothing", "crlf"])
async def test_read_head_none_at_clean_eof(connect, before_eof: bytes) -> None:
    a, b = await connect()
    await a.send(before_eof)
    a.w.write_eof()
    assert await within(read_head(b.r)) is None


@pytest.mark.parametrize(
    "partial", [b"G", b"GET / HTTP/1.1\r\nHost: a\r\n", b"GET / HTTP/1.1\r\n\r"]
)
async def test_read_head_400_on_eof_mid_head(connect, partial: bytes) -> None:
    a, b = await connect()
    await a.send(partial)
    a.w.write_eof()
    with pytest.raises(HTTPError) as info:
        await within(read_head(b.r))
    assert info.value.status == 400


# ---------------------------------------------------------------- parse_response_head
def test_response_status_reason_and_length() -> None:
    h = parse_response_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\n")
    assert (h.status, h.reason, h.version) == (404, b"Not Found", "1.1")
    assert (h.framing, h.length, h.keep_alive) == (LENGTH, 9, True)


def test_response_to_head_has_no_body() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    h = parse_response_head(raw, b"HEAD")
    assert (h.framing, h.length, h.keep_alive) == (NO_BODY, 0, True)
    chunked = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"HEAD")
    assert chunked.framing == NO_BODY
    # and a HEAD response without any length does not mean "read until close"
    bare = parse_response_head(b"HTTP/1.1 200 OK\r\n\r\n", b"HEAD")
    assert (bare.framing, bare.keep_alive) == (NO_BODY, True)
    assert parse_response_head(raw, b"GET").framing == LENGTH


@pytest.mark.parametrize("status", [100, 102, 103, 204, 304])
def test_statuses_without_body(status: int) -> None:
    h = parse_response_head(f"HTTP/1.1 {status} X\r\nContent-Length: 20\r\n\r\n".encode())
    assert h.status == status
    assert (h.framing, h.length) == (NO_BODY, 0)
    bare = parse_response_head(f"HTTP/1.1 {status} X\r\n\r\n".encode())
    assert bare.framing == NO_BODY and bare.keep_alive is True


def test_switching_protocols_has_no_body() -> None:
    h = parse_response_head(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 20\r\n\r\n"
    )
    assert h.status == 101
    assert (h.framing, h.length) == (NO_BODY, 0)


def test_response_without_length_reads_until_close() -> None:
    h = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
    assert h.framing == UNTIL_CLOSE
    assert h.keep_alive is False


def test_response_with_non_chunked_transfer_encoding_reads_until_close() -> None:
    h = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert (h.framing, h.keep_alive) == (UNTIL_CLOSE, False)


@pytest.mark.parametrize(
    "raw, framing, keep_alive",
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", CHUNKED, True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n", LENGTH, False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n", LENGTH, False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n", LENGTH, True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", NO_BODY, True),
    ],
)
def test_response_framing_and_keep_alive(raw: bytes, framing: int, keep_alive: bool) -> None:
    h = parse_response_head(raw)
    assert (h.framing, h.keep_alive) == (framing, keep_alive)


@pytest.mark.parametrize(
    "raw",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_malformed_response_is_upstream_error(raw: bytes) -> None:
    with pytest.raises(UpstreamError):
        parse_response_head(raw)


def test_empty_response_head_is_upstream_error() -> None:
    with pytest.raises(UpstreamError):
        parse_response_head(b"")


# ------------------------------------------------------------------------ relay_body
CHUNKED_BODY = (
    b"5;name=value\r\nhello\r\n"
    b'1A; ext="quoted;semi" ;x\r\n' + b"abcdefghijklmnopqrstuvwxyz" + b"\r\n"
    b"000a\r\n0123456789\r\n"
    b"4\r\n\r\n\r\n\r\n"  # chunk data that looks like framing
    b"0;final=yes\r\nX-Trailer: one\r\nX-Checksum: abc\r\n\r\n"
)
NEXT = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"


async def _trickle(end: End, data: bytes, step: int) -> None:
    for i in range(0, len(data), step):
        end.w.write(data[i : i + step])
        await within(end.w.drain())
        await asyncio.sleep(0)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 100_000])
async def test_relay_chunked_verbatim_with_extensions_and_trailers(connect, step: int) -> None:
    src_w, src = await connect()
    dst, dst_r = await connect()
    tee: list[bytes] = []
    writer = asyncio.create_task(_trickle(src_w, CHUNKED_BODY + NEXT, step))
    n = await within(relay_body(src.r, dst.w, _head(CHUNKED), tee.append))
    dst.w.close()
    assert await dst_r.read_all() == CHUNKED_BODY
    assert b"".join(tee) == CHUNKED_BODY
    assert n > 0
    await within(writer)
    # the relay stopped exactly at the end of the message: the next request is intact
    assert await within(read_head(src.r)) == NEXT


async def test_relay_chunked_large_chunks_over_tcp(connect) -> None:
    src_w, src = await connect(tcp=True)
    dst, dst_r = await connect(tcp=True)
    chunks = [os.urandom(n) for n in (1, 300_000, 65536, 1_000_003)]
    body = b"".join(b"%X\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    writer = asyncio.create_task(src_w.send(body + NEXT))
    reader = asyncio.create_task(dst_r.read_all())
    await within(relay_body(src.r, dst.w, _head(CHUNKED)), 20)
    dst.w.close()
    assert hashlib.sha256(await within(reader, 20)).digest() == hashlib.sha256(body).digest()
    await within(writer)
    assert await within(read_head(src.r)) == NEXT


async def test_relay_length_stops_at_the_length(connect) -> None:
    src_w, src = await connect(tcp=True)
    dst, dst_r = await connect(tcp=True)
    body = os.urandom(700_001)
    writer = asyncio.create_task(_trickle(src_w, body + NEXT, 65_537))
    tee: list[bytes] = []
    reader = asyncio.create_task(within(dst_r.r.readexactly(len(body)), 20))
    n = await within(relay_body(src.r, dst.w, _head(LENGTH, len(body)), tee.append), 20)
    assert n == len(body)
    assert await reader == body
    assert b"".join(tee) == body
    await within(writer, 20)
    assert await within(read_head(src.r)) == NEXT


async def test_relay_until_close(connect) -> None:
    src_w, src = await connect()
    dst, dst_r = await connect()
    body = os.urandom(1024 * 1024 + 17)
    reader = asyncio.create_task(dst_r.read_all())

    async def send_and_close() -> None:
        await _trickle(src_w, body, 100_000)
        src_w.w.write_eof()

    writer = asyncio.create_task(send_and_close())
    n = await within(relay_body(src.r, dst.w, _head(UNTIL_CLOSE)), 20)
    dst.w.close()
    assert n == len(body)
    assert await within(reader) == body
    await within(writer)


async def test_relay_no_body_reads_nothing(connect) -> None:
    src_w, src = await connect()
    dst, _ = await connect()
    await src_w.send(NEXT)
    assert await within(relay_body(src.r, dst.w, _head(NO_BODY))) == 0
    assert await within(read_head(src.r)) == NEXT


@pytest.mark.parametrize(
    "framing, length, data",
    [
        (LENGTH, 100, b"x" * 50),
        (CHUNKED, 0, b"10\r\nshort"),
        (CHUNKED, 0, b"5\r\nhello\r\n"),  # EOF where the next chunk-size line should be
        (CHUNKED, 0, b"5\r\nhello\r\n0\r\nX-Trailer: x\r\n"),  # EOF inside the trailers
        (CHUNKED, 0, b"zz\r\nhello\r\n0\r\n\r\n"),  # not hex
        (CHUNKED, 0, b"\r\nhello\r\n0\r\n\r\n"),  # empty size
        (CHUNKED, 0, b"-5\r\nhello\r\n0\r\n\r\n"),  # negative
    ],
    ids=["length-short", "chunk-short", "eof-at-size", "eof-in-trailer", "not-hex", "empty", "neg"],
)
async def test_relay_broken_bodies_raise_upstream_error(connect, framing, length, data) -> None:
    src_w, src = await connect()
    dst, _ = await connect()
    await src_w.send(data)
    src_w.w.write_eof()
    with pytest.raises(UpstreamError):
        await within(relay_body(src.r, dst.w, _head(framing, length)))


async def test_relay_chunk_size_line_too_long(connect) -> None:
    src_w, src = await connect()
    dst, _ = await connect()
    sender = asyncio.create_task(src_w.send(b"5;" + b"e" * (MAX_HEAD + 100) + b"\r\nhello\r\n"))
    with pytest.raises(UpstreamError, match="too long"):
        await within(relay_body(src.r, dst.w, _head(CHUNKED)))
    sender.cancel()


@pytest.mark.parametrize(
    "data",
    [
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"1_0\r\n" + b"h" * 16 + b"\r\n0\r\n\r\n",
        b"5\r\nhelloXY0\r\n\r\n",
    ],
    ids=["0x-prefix", "plus-sign", "underscore", "no-crlf-after-data"],
)
async def test_relay_refuses_invalid_chunk_framing(connect, data: bytes) -> None:
    src_w, src = await connect()
    dst, _ = await connect()
    await src_w.send(data)
    src_w.w.write_eof()
    with pytest.raises(UpstreamError):
        await within(relay_body(src.r, dst.w, _head(CHUNKED)))


@pytest.mark.parametrize("framing", [LENGTH, CHUNKED], ids=["length", "chunked"])
async def test_relay_respects_backpressure(connect, framing: int, request) -> None:
    """A destination that does not read must stall the relay, not fill its memory."""
    src_w, src = await connect()
    dst, _dst_r = await connect()  # nobody reads _dst_r
    n = 32 * 1024 * 1024
    if framing == LENGTH:
        body, head = b"x" * n, _head(LENGTH, n)
    else:
        body, head = b"%x\r\n" % n + b"x" * n + b"\r\n0\r\n\r\n", _head(CHUNKED)
    task = asyncio.create_task(relay_body(src.r, dst.w, head))
    src_w.w.write(body)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(src_w.w.drain(), 2)
    buffered = dst.w.transport.get_write_buffer_size()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert buffered < 4 * 1024 * 1024, f"relay buffered {buffered} bytes for a stalled reader"


# -------------------------------------------------------------------- proxy_exchange
@dataclass
class Rig:
    """client ⇄ (proxy: pc) … (proxy: pu) ⇄ server, as two socket pairs."""

    client: End
    pc: End
    pu: End
    server: End

    async def start(self, head: bytes, observer=None) -> tuple[Head, asyncio.Task]:
        """Let the proxy read the client's next head and start proxy_exchange on it."""
        raw = await within(read_head(self.pc.r))
        assert raw == head
        req = parse_request_head(raw)
        task = asyncio.create_task(
            proxy_exchange(req, raw, self.pc.r, self.pc.w, self.pu.r, self.pu.w, observer)
        )
        return req, task


@pytest.fixture
async def rig(connect) -> Rig:
    client, pc = await connect()
    pu, server = await connect()
    return Rig(client, pc, pu, server)


async def test_proxy_body_with_100_continue_and_keep_alive(rig: Rig) -> None:
    obs = Recorder()
    head = b"POST /upload HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n"
    await rig.client.send(head)
    req, task = await rig.start(head, obs)
    assert req.expect_continue
    # the upstream sees the head verbatim and asks for the body
    assert await within(read_head(rig.server.r)) == head
    await rig.server.send(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert await within(rig.client.r.readuntil(b"\r\n\r\n")) == b"HTTP/1.1 100 Continue\r\n\r\n"
    await rig.client.send(b"hello world")
    assert await within(rig.server.r.readexactly(11)) == b"hello world"
    resp = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    await rig.server.send(resp)
    res = await within(task)
    assert await within(rig.client.r.readexactly(len(resp))) == resp
    assert res.response is not None and res.response.status == 201
    assert res.keep_alive is True and res.upgraded is False
    assert (res.request_bytes, res.response_bytes) == (11, 2)
    assert bytes(obs.req_body) == b"hello world"
    assert [h.status for h in obs.heads] == [201]
    assert bytes(obs.resp_body) == b"ok"

    # same connections, second exchange: a chunked response relayed verbatim
    head2 = b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n"
    await rig.client.send(head2)
    _, task2 = await rig.start(head2)
    assert await within(read_head(rig.server.r)) == head2
    resp2 = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY
    await rig.server.send(resp2)
    res2 = await within(task2)
    assert await within(rig.client.r.readexactly(len(resp2))) == resp2
    assert res2.keep_alive is True


async def test_proxy_1mib_chunked_request_over_tcp(connect) -> None:
    client, pc = await connect(tcp=True)
    pu, server = await connect(tcp=True)
    rig = Rig(client, pc, pu, server)
    payload = os.urandom(1024 * 1024)
    body = b"".join(
        b"%x\r\n%s\r\n" % (len(payload[i : i + 100_000]), payload[i : i + 100_000])
        for i in range(0, len(payload), 100_000)
    )
    body += b"0\r\n\r\n"
    head = b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    sender = asyncio.create_task(client.send(head + body))
    _, task = await rig.start(head)
    assert await within(read_head(server.r)) == head
    got = await within(server.r.readexactly(len(body)), 20)
    assert got == body
    digest = hashlib.sha256(payload).hexdigest().encode()
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n" + digest
    await server.send(resp)
    res = await within(task, 20)
    assert await within(client.r.readexactly(len(resp))) == resp
    assert res.keep_alive is True
    await within(sender)


async def test_proxy_upstream_answers_before_reading_the_body(rig: Rig) -> None:
    head = b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n"
    await rig.client.send(head + b"x" * 1000)  # the rest never comes
    _, task = await rig.start(head)
    assert await within(read_head(rig.server.r)) == head
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly"
    await rig.server.send(resp)
    res = await within(task)  # must not wait for the rest of the body
    assert await within(rig.client.r.readexactly(len(resp))) == resp
    assert res.response is not None and res.response.status == 200
    assert res.keep_alive is False


async def test_proxy_upgrade_returns_upgraded_and_relays_raw_bytes(rig: Rig) -> None:
    head = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    await rig.client.send(head)
    req, task = await rig.start(head)
    assert req.upgrade
    assert await within(read_head(rig.server.r)) == head
    switch = (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    await rig.server.send(switch + b"server-first")
    res = await within(task)
    assert res.upgraded is True and res.keep_alive is False
    assert res.response is not None and res.response.status == 101
    assert await within(rig.client.r.readexactly(len(switch))) == switch
    # after the switch the same streams carry raw bytes both ways
    relaying = asyncio.create_task(relay(rig.pc.r, rig.pc.w, rig.pu.r, rig.pu.w))
    assert await within(rig.client.r.readexactly(12)) == b"server-first"
    await rig.client.send(b"\x81\x05hello")
    assert await within(rig.server.r.readexactly(7)) == b"\x81\x05hello"
    rig.client.w.write_eof()
    rig.server.w.write_eof()
    assert await within(relaying) == (7, 12)


async def test_proxy_passes_interim_responses_through(rig: Rig) -> None:
    head = b"GET /hints HTTP/1.1\r\nHost: a\r\n\r\n"
    await rig.client.send(head)
    obs = Recorder()
    _, task = await rig.start(head, obs)
    await within(read_head(rig.server.r))
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
    await rig.server.send(hints + final)
    res = await within(task)
    assert await within(rig.client.r.readexactly(len(hints + final))) == hints + final
    assert res.response is not None and res.response.status == 200
    assert [h.status for h in obs.heads] == [200]


async def test_proxy_head_request_does_not_wait_for_a_body(rig: Rig) -> None:
    head = b"HEAD /file HTTP/1.1\r\nHost: a\r\n\r\n"
    await rig.client.send(head)
    _, task = await rig.start(head)
    await within(read_head(rig.server.r))
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"
    await rig.server.send(resp)
    res = await within(task)
    assert res.keep_alive is True and res.response_bytes == 0
    assert await within(rig.client.r.readexactly(len(resp))) == resp


async def test_proxy_response_until_close(rig: Rig) -> None:
    head = b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n"
    await rig.client.send(head)
    _, task = await rig.start(head)
    await within(read_head(rig.server.r))
    resp = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"all of it" * 1000
    await rig.server.send(resp)
    rig.server.w.close()
    res = await within(task)
    assert res.keep_alive is False
    assert await within(rig.client.r.readexactly(len(resp))) == resp


async def test_proxy_request_connection_close_is_not_kept_alive(rig: Rig) -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    await rig.client.send(head)
    _, task = await rig.start(head)
    await within(read_head(rig.server.r))
    await rig.server.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n!")
    assert (await within(task)).keep_alive is False


@pytest.mark.parametrize("with_body", [False, True], ids=["no-body", "body-in-flight"])
async def test_proxy_upstream_closes_before_answering(rig: Rig, with_body: bool) -> None:
    if with_body:
        head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n"
        await rig.client.send(head + b"y" * 10)
    else:
        head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
        await rig.client.send(head)
    _, task = await rig.start(head)
    await within(read_head(rig.server.r))
    rig.server.w.close()
    with pytest.raises(UpstreamError) as info:
        await within(task)
    assert info.value.response_started is False
    rig.pc.w.close()
    assert await rig.client.read_all() == b""  # nothing at all reached the client


async def test_proxy_upstream_sends_garbage_instead_of_a_response(rig: Rig) -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    await rig.client.send(head)
    _, task = await rig.start(head)
    await within(read_head(rig.server.r))
    await rig.server.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    with pytest.raises(UpstreamError) as info:
        await within(task)
    assert info.value.response_started is False


@pytest.mark.parametrize(
    "resp",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"z" * 10,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nonly-part",
    ],
    ids=["length", "chunked"],
)
async def test_proxy_upstream_closes_mid_body(rig: Rig, resp: bytes) -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    await rig.client.send(head)
    _, task = await rig.start(head)
    await within(read_head(rig.server.r))
    await rig.server.send(resp)
    rig.server.w.close()
    with pytest.raises(UpstreamError) as info:
        await within(task)
    assert info.value.response_started is True
    rig.pc.w.close()
    assert await rig.client.read_all() == resp  # everything up to the break was relayed


async def test_proxy_client_vanishing_mid_body_is_a_client_error(rig: Rig) -> None:
    # The client's fault, not the upstream's: a 400 for whoever proxies, never a 502.
    head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n"
    await rig.client.send(head + b"q" * 10)
    _, task = await rig.start(head)
    await within(read_head(rig.server.r))
    rig.client.w.close()
    with pytest.raises(ClientError) as info:
        await within(task)
    assert info.value.status == 400


# ------------------------------------------------------------------------ add_headers
def test_add_headers_keeps_the_head_well_formed() -> None:
    raw = b"POST /p?q=1 HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\n\r\n"
    out = add_headers(raw, [(b"X-Forwarded-For", b"127.0.0.1"), (b"X-Forwarded-Proto", b"http")])
    assert out.startswith(b"POST /p?q=1 HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\n")
    assert out.endswith(b"\r\nX-Forwarded-Proto: http\r\n\r\n")
    assert out.count(b"\r\n\r\n") == 1
    h = parse_request_head(out)
    assert h.headers == [
        (b"Host", b"a.example"),
        (b"Content-Length", b"3"),
        (b"X-Forwarded-For", b"127.0.0.1"),
        (b"X-Forwarded-Proto", b"http"),
    ]
    assert (h.method, h.target, h.framing, h.length) == (b"POST", b"/p?q=1", LENGTH, 3)


def test_add_headers_nothing_to_add_returns_the_head_unchanged() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert add_headers(raw, []) is raw


def test_add_headers_to_a_head_without_headers_and_to_a_response() -> None:
    out = add_headers(b"GET / HTTP/1.0\r\n\r\n", [(b"Host", b"a")])
    assert out == b"GET / HTTP/1.0\r\nHost: a\r\n\r\n"
    assert parse_request_head(out).host == "a"
    resp = add_headers(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", [(b"X-B", b"2")])
    assert resp == b"HTTP/1.1 204 No Content\r\nX-A: 1\r\nX-B: 2\r\n\r\n"
    assert parse_response_head(resp).headers == [(b"X-A", b"1"), (b"X-B", b"2")]


async def test_add_headers_output_reads_back_as_exactly_one_head(connect) -> None:
    a, b = await connect()
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    out = add_headers(raw, [(b"X-One", b"1")])
    await a.send(out + NEXT)
    assert await within(read_head(b.r)) == out
    assert await within(read_head(b.r)) == NEXT


# ------------------------------------------------- issue 12: hostile request bodies
@pytest.mark.parametrize(
    "data",
    [
        b"0x3\r\nabc\r\n0\r\n\r\n",
        b"-3\r\nabc\r\n0\r\n\r\n",
        b"+3\r\nabc\r\n0\r\n\r\n",
        b" 3\r\nabc\r\n0\r\n\r\n",
        b"3\nabc\r\n0\r\n\r\n",  # bare LF after the size
        b"3;\r\nabc\r\n0\r\n\r\n",  # ';' without an extension name
        b"3;a=b c\r\nabc\r\n0\r\n\r\n",
        b"3 \r\nabc\r\n0\r\n\r\n",  # BWS only around ';' (the fuzz found this one)
    ],
    ids=["0x", "minus", "plus", "leading-space", "bare-lf", "empty-ext", "bad-ext", "trailing-space"],
)
async def test_relay_validates_a_chunk_line_before_forwarding_it(connect, data: bytes) -> None:
    src_w, src = await connect()
    dst, dst_far = await connect()
    await src_w.send(data)
    with pytest.raises(ClientError) as info:
        await within(relay_body(src.r, dst.w, _head(CHUNKED), error=ClientError))
    assert info.value.status == 400
    dst.w.close()
    assert await dst_far.read_all() == b""  # not one byte of the bad framing went out


async def test_relay_refuses_a_bare_lf_trailer_after_forwarding_only_valid_lines(connect) -> None:
    src_w, src = await connect()
    dst, dst_far = await connect()
    await src_w.send(b"3\r\nabc\r\n0\r\nX-T: 1\n\r\n")
    with pytest.raises(UpstreamError):
        await within(relay_body(src.r, dst.w, _head(CHUNKED)))
    dst.w.close()
    assert await dst_far.read_all() == b"3\r\nabc\r\n0\r\n"


@pytest.mark.parametrize("te", [b"chunked", b"gzip, chunked", b"identity"])
def test_transfer_encoding_on_http10_request_is_400(te: bytes) -> None:
    with pytest.raises(HTTPError) as info:
        parse_request_head(b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: " + te + b"\r\n\r\n")
    assert info.value.status == 400


@pytest.mark.parametrize(
    "target, expect",
    [
        (b"/plain/path?q=1", b"/plain/path?q=1"),
        (b"/%61dmin/secret", b"/admin/secret"),
        (b"/%2e%2e/admin", b"/admin"),
        (b"/a/./b/../../admin/", b"/admin/"),
        (b"/a/..", b"/"),
        (b"/../../x", b"/x"),
        (b"/a%2fb/%7e?x=%2f%41", b"/a%2Fb/~?x=%2FA"),  # reserved stays encoded, upper-cased
        (b"/%E2%82%AC", b"/%E2%82%AC"),
        (b"http://h.example/admin?x", b"/admin?x"),
        (b"HTTPS://h.example:8443", b"/"),
        (b"http://h.example?q", b"/?q"),
    ],
)
def test_normalize_target(target: bytes, expect: bytes) -> None:
    req = normalize_target(parse_request_head(b"GET " + target + b" HTTP/1.1\r\nHost: h.example\r\nX-A: 1\r\n\r\n"))
    assert req.target == expect
    again = parse_request_head(req.raw)  # the forwarded head says the same
    assert again.target == expect
    assert again.host in ("h.example", "h.example:8443")
    assert again.header(b"x-a") == b"1"


def test_normalize_target_unchanged_head_is_the_same_object() -> None:
    req = parse_request_head(b"GET /a/b.txt?x=%20 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert normalize_target(req) is req


def test_absolute_form_authority_replaces_the_host_header() -> None:
    req = normalize_target(parse_request_head(b"GET http://Real.example:81/p HTTP/1.1\r\nHost: fake\r\n\r\n"))
    assert req.host == "Real.example:81"
    assert req.raw == b"GET /p HTTP/1.1\r\nHost: Real.example:81\r\n\r\n"


@pytest.mark.parametrize(
    "target", [b"/%zz", b"/a%2", b"ftp://h/x", b"http://user@h/x", b"http:///x", b"*"]
)
def test_normalize_target_refuses_what_it_cannot_read(target: bytes) -> None:
    with pytest.raises(HTTPError) as info:
        normalize_target(parse_request_head(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n"))
    assert info.value.status == 400


async def test_proxy_malformed_chunked_request_is_a_400_client_error(rig: Rig) -> None:
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    await rig.client.send(head + b"0x3\r\nabc\r\n0\r\n\r\n")
    _, task = await rig.start(head)
    assert await within(read_head(rig.server.r)) == head
    with pytest.raises(ClientError) as info:
        await within(task)
    assert info.value.status == 400


async def test_proxy_stalled_request_body_is_a_408_after_the_body_timeout(rig: Rig) -> None:
    head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n"
    await rig.client.send(head + b"x" * 10)
    raw = await within(read_head(rig.pc.r))
    task = asyncio.create_task(
        proxy_exchange(parse_request_head(raw), raw, rig.pc.r, rig.pc.w, rig.pu.r, rig.pu.w, body_timeout=0.3)
    )
    with pytest.raises(ClientError) as info:
        await within(task)
    assert info.value.status == 408


async def test_proxy_slow_but_moving_body_is_not_cut_off(rig: Rig) -> None:
    head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\n"
    await rig.client.send(head)
    raw = await within(read_head(rig.pc.r))
    task = asyncio.create_task(
        proxy_exchange(parse_request_head(raw), raw, rig.pc.r, rig.pc.w, rig.pu.r, rig.pu.w, body_timeout=0.4)
    )
    for piece in (b"ab", b"cd", b"ef"):  # 0.75 s in all, 0.25 s between pieces
        await asyncio.sleep(0.25)
        await rig.client.send(piece)
    assert await within(read_head(rig.server.r)) == head
    assert await within(rig.server.r.readexactly(6)) == b"abcdef"
    await rig.server.send(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert (await within(task)).response.status == 204


@pytest.mark.parametrize("tcp", [False, True], ids=["streams", "splice"])
async def test_proxy_client_that_never_reads_hits_the_send_timeout(connect, tcp: bool) -> None:
    client, pc = await connect(tcp=tcp)
    pu, server = await connect(tcp=tcp)
    client.w.transport.pause_reading()  # the client never reads
    head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    await client.send(head)
    raw = await within(read_head(pc.r))
    task = asyncio.create_task(
        proxy_exchange(parse_request_head(raw), raw, pc.r, pc.w, pu.r, pu.w, send_timeout=0.5)
    )
    n = 64 * 1024 * 1024
    server.w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
    server.w.write(b"z" * n)
    with pytest.raises(WriteTimeout):
        await within(task, 10)


async def test_splice_body_read_stall_is_a_408(connect) -> None:
    src_w, src = await connect(tcp=True)
    dst, _far = await connect(tcp=True)
    n = 1024 * 1024
    await src_w.send(b"y" * 1000)
    with pytest.raises(ClientError) as info:
        await within(
            relay_body(src.r, dst.w, _head(LENGTH, n), src=src.w, error=ClientError, read_timeout=0.3)
        )
    assert info.value.status == 408
