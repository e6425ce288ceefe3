"""Hostile clients on the public data path and the ingress port (issue 12, items 7-11).

A real edge and agent run as processes with small deadlines; real upstreams serve the
tunnels; the attackers are raw sockets.  Attack connections come from 127.0.0.2 (a
loopback source address) so that per-address caps can be told apart from the legit
client on 127.0.0.1.  The edge runs with 1,024 descriptors, as in the issue's reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import ssl
import time
from pathlib import Path

import pytest

from tests.procs import READY_TIMEOUT, BurrowProc, edge_args, host_of, start_agent
from tests.upstreams import HTTPUpstream, TCPEcho, raw_exchange

ATTACKER = "127.0.0.2"


def start_edge(tmp_path: Path, *flags: str, nofile: int = 1024) -> BurrowProc:
    proc = BurrowProc([*edge_args(tmp_path / "edge"), *flags])
    proc.ready = proc.wait_event("ready", READY_TIMEOUT)
    resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (nofile, nofile))
    return proc


@pytest.fixture
def procs():
    started: list[BurrowProc] = []
    yield started
    for p in reversed(started):
        p.stop()


def _addr(url_or_addr: str) -> tuple[str, int]:
    host, port = url_or_addr.split("://", 1)[-1].rsplit(":", 1)
    return host, int(port)


async def _open_from(src: str, dst: tuple[str, int]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.bind((src, 0))
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, dst), 5)
    except BaseException:
        s.close()
        raise
    return s


async def _get(edge: BurrowProc, host: str, path: str) -> bytes:
    req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    return await raw_exchange(*edge.http_addr, req)


async def _closed_within(sock: socket.socket, timeout: float) -> bytes:
    """Read until the peer closes; fail if it is still open after ``timeout``."""
    loop = asyncio.get_running_loop()
    got = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"connection still open after {timeout}s; got {got[:200]!r}")
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), left)
        except TimeoutError:
            continue
        except ConnectionError:
            return got
        if not chunk:
            return got
        got += chunk


def _no_tracebacks(edge: BurrowProc) -> None:
    err = edge.stderr
    assert "Traceback" not in err, err[-3000:]


# ------------------------------------------------------------------ 7. path rules
DENY_ADMIN = """
on_http_request:
  - expressions: ["req.url.path.startsWith('/admin')"]
    actions:
      - type: deny
        config: {status_code: 403}
"""


@pytest.mark.parametrize(
    "target",
    [
        "http://{host}/admin/secret",  # absolute form (RFC 9112 §3.2.2)
        "/%61dmin/secret",  # an unreserved character percent-encoded
        "/%2e%2e/admin/secret",  # encoded dot segments
        "/x/../admin/secret",
        "/./admin/secret",
        "//admin//secret",  # merged like nginx's merge_slashes
    ],
    ids=["absolute-form", "pct-a", "pct-dots", "dot-dot", "dot", "slashes"],
)
async def test_path_rules_see_the_normalised_target(tmp_path, procs, target: str) -> None:
    edge = start_edge(tmp_path)
    procs.append(edge)
    (tmp_path / "p.yml").write_text(DENY_ADMIN)
    async with HTTPUpstream() as up:
        a = start_agent(edge, "http", str(up.port), "--traffic-policy-file", str(tmp_path / "p.yml"), home=tmp_path / "h")
        procs.append(a)
        host = host_of(a.public_url)
        t = target.format(host=host)
        raw = await raw_exchange(*edge.http_addr, f"GET {t} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert raw.startswith(b"HTTP/1.1 403 "), raw[:200]
        assert up.requests == [], "a denied path reached the upstream"
        # the normal form is what the upstream gets, not what the client wrote
        ok = await raw_exchange(
            *edge.http_addr,
            f"GET /%7Euser/a/./b/../c?q=%41%2f HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
        )
        assert ok.startswith(b"HTTP/1.1 200 "), ok[:200]
        assert up.requests[-1][0].startswith(b"GET /~user/a/c?q=A%2F HTTP/1.1\r\n")
    _no_tracebacks(edge)


async def test_absolute_form_routes_by_its_authority(tmp_path, procs) -> None:
    edge = start_edge(tmp_path)
    procs.append(edge)
    async with HTTPUpstream() as up:
        a = start_agent(edge, "http", str(up.port), home=tmp_path / "h")
        procs.append(a)
        host = host_of(a.public_url)
        raw = await raw_exchange(
            *edge.http_addr,
            f"GET http://{host}/ok HTTP/1.1\r\nHost: elsewhere.example\r\nConnection: close\r\n\r\n".encode(),
        )
        assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"GET /ok\n"), raw[:300]
        head = up.requests[0][0]
        assert head.startswith(b"GET /ok HTTP/1.1\r\n")
        assert f"\r\nHost: {host}\r\n".encode() in head and b"elsewhere" not in head


# -------------------------------------------------------------- 8. chunked bodies
BAD_CHUNKED = {
    "0x-size": b"0x3\r\nabc\r\n0\r\n\r\n",
    "negative-size": b"-3\r\nabc\r\n0\r\n\r\n",
    "plus-size": b"+3\r\nabc\r\n0\r\n\r\n",
    "bare-lf-size": b"3\nabc\r\n0\r\n\r\n",
    "bare-lf-last": b"3\r\nabc\r\n0\n\n",
}


@pytest.mark.parametrize("body", BAD_CHUNKED.values(), ids=BAD_CHUNKED.keys())
async def test_malformed_chunked_request_gets_400_and_never_reaches_the_upstream(
    tmp_path, procs, body: bytes
) -> None:
    edge = start_edge(tmp_path)
    procs.append(edge)
    async with HTTPUpstream() as up:
        a = start_agent(edge, "http", str(up.port), home=tmp_path / "h")
        procs.append(a)
        host = host_of(a.public_url)
        head = f"POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        raw = await raw_exchange(*edge.http_addr, head + body)
        assert raw.startswith(b"HTTP/1.1 400 "), raw[:300]
        assert up.requests == []
        # a well-formed chunked body with extensions still goes through
        good = b"3;ext=1\r\nabc\r\n0\r\n\r\n"
        raw = await raw_exchange(*edge.http_addr, head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + good)
        assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"abc"), raw[:300]
    _no_tracebacks(edge)


async def test_transfer_encoding_on_http10_is_400(tmp_path, procs) -> None:
    edge = start_edge(tmp_path)
    procs.append(edge)
    async with HTTPUpstream() as up:
        a = start_agent(edge, "http", str(up.port), home=tmp_path / "h")
        procs.append(a)
        host = host_of(a.public_url)
        req = f"POST /echo HTTP/1.0\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        raw = await raw_exchange(*edge.http_addr, req.encode())
        assert raw.startswith(b"HTTP/1.1 400 "), raw[:300]
        assert up.requests == []


# ------------------------------------------------------- 9. deadlines and caps
async def test_a_stalled_request_body_is_closed_after_the_body_timeout(tmp_path, procs) -> None:
    edge = start_edge(tmp_path, "--body-timeout", "1")
    procs.append(edge)
    async with HTTPUpstream() as up:
        a = start_agent(edge, "http", str(up.port), home=tmp_path / "h")
        procs.append(a)
        host = host_of(a.public_url)
        s = await _open_from("127.0.0.1", edge.http_addr)
        try:
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(s, f"POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000\r\n\r\n".encode())
            got = await _closed_within(s, 8)
        finally:
            s.close()
        assert got.startswith(b"HTTP/1.1 408 "), got[:200]
        # a slow body that keeps moving is not cut off: 4 pieces, 0.5 s apart (> 1 s in all)
        s = await _open_from("127.0.0.1", edge.http_addr)
        try:
            await loop.sock_sendall(s, f"POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 8\r\nConnection: close\r\n\r\n".encode())
            for piece in (b"ab", b"cd", b"ef", b"gh"):
                await asyncio.sleep(0.5)
                await loop.sock_sendall(s, piece)
            got = await _closed_within(s, 8)
        finally:
            s.close()
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"abcdefgh"), got[:300]
    _no_tracebacks(edge)


@pytest.mark.parametrize("flags", [("--data-tls",), ("--no-data-tls",)], ids=["tls-data", "plain-data"])
async def test_a_client_that_never_reads_is_closed_after_the_send_timeout(tmp_path, procs, flags) -> None:
    edge = start_edge(tmp_path, "--send-timeout", "1")
    procs.append(edge)
    n = 50 * 1024 * 1024
    async with HTTPUpstream() as up:
        a = start_agent(edge, "http", str(up.port), *flags, home=tmp_path / "h")
        procs.append(a)
        host = host_of(a.public_url)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(s, edge.http_addr), 5)
            await loop.sock_sendall(s, f"GET /bytes/{n} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            await asyncio.sleep(6)  # read nothing, well past the send timeout
            got = 0
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    chunk = await asyncio.wait_for(loop.sock_recv(s, 1024 * 1024), 1)
                except (ConnectionError, TimeoutError):
                    break
                if not chunk:
                    break
                got += len(chunk)
        finally:
            s.close()
        assert got < n // 2, f"the edge kept the connection and sent {got} of {n} bytes"
    _no_tracebacks(edge)


async def test_600_stalled_bodies_do_not_take_legit_requests_down(tmp_path, procs) -> None:
    # The reproduction: 600 heads with Content-Length: 1000 and no body, an edge
    # with 1,024 descriptors.  Default caps; a body timeout long enough to outlast the test.
    edge = start_edge(tmp_path, "--body-timeout", "60")
    procs.append(edge)
    async with HTTPUpstream() as up:
        a = start_agent(edge, "http", str(up.port), home=tmp_path / "h")
        procs.append(a)
        host = host_of(a.public_url)
        head = f"POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000\r\n\r\n".encode()
        loop = asyncio.get_running_loop()
        socks: list[socket.socket] = []
        try:
            for _ in range(600):
                with contextlib.suppress(OSError, TimeoutError):
                    s = await _open_from(ATTACKER, edge.http_addr)
                    socks.append(s)
                    with contextlib.suppress(OSError):
                        await loop.sock_sendall(s, head)
            await asyncio.sleep(1.5)
            for i in range(20):
                raw = await _get(edge, host, f"/legit-{i}")
                assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(f"GET /legit-{i}\n".encode()), raw[:300]
            # past the per-address cap the attacker was refused with a 503
            refused = 0
            for s in socks[-50:]:
                with contextlib.suppress(OSError, TimeoutError):
                    if (await asyncio.wait_for(loop.sock_recv(s, 4096), 2)).startswith(b"HTTP/1.1 503 "):
                        refused += 1
            assert refused == 50
        finally:
            for s in socks:
                s.close()
    _no_tracebacks(edge)


async def test_overall_connection_cap_refuses_new_connections_with_503(tmp_path, procs) -> None:
    edge = start_edge(tmp_path, "--max-conns", "10", "--max-conns-per-ip", "0")
    procs.append(edge)
    socks = [await _open_from("127.0.0.1", edge.http_addr) for _ in range(10)]
    try:
        await asyncio.sleep(0.3)
        raw = await raw_exchange(*edge.http_addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 503 "), raw[:200]
    finally:
        for s in socks:
            s.close()
    await asyncio.sleep(0.3)
    raw = await raw_exchange(*edge.http_addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 404 "), raw[:200]  # served again once they are gone


async def test_running_out_of_descriptors_on_public_http_is_quiet_and_recovers(tmp_path, procs) -> None:
    """With the caps off and 128 descriptors, 300 connections exhaust the edge (uvloop's
    accept loop for public HTTP meets EMFILE): no traceback, and it serves again after."""
    edge = start_edge(tmp_path, "--max-conns", "0", "--max-conns-per-ip", "0", nofile=128)
    procs.append(edge)
    socks: list[socket.socket] = []
    try:
        for _ in range(300):
            with contextlib.suppress(OSError, TimeoutError):
                socks.append(await _open_from(ATTACKER, edge.http_addr))
        await asyncio.sleep(1.5)
    finally:
        for s in socks:
            s.close()
    await asyncio.sleep(1.5)  # the accept loop may pause for a while after EMFILE
    raw = await raw_exchange(*edge.http_addr, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 404 "), raw[:200]  # served again
    _no_tracebacks(edge)


# ------------------------------------------------------------- 10. ingress pre-auth
async def test_silent_ingress_connections_do_not_take_public_http_down(tmp_path, procs) -> None:
    edge = start_edge(tmp_path, "--first-byte-timeout", "2")
    procs.append(edge)
    async with HTTPUpstream() as up:
        a = start_agent(edge, "http", str(up.port), home=tmp_path / "h")
        procs.append(a)
        host = host_of(a.public_url)
        ingress = _addr(edge.ready["ingress_addr"])
        socks: list[socket.socket] = []
        try:
            for _ in range(1100):
                with contextlib.suppress(OSError, TimeoutError):
                    socks.append(await _open_from(ATTACKER, ingress))
            await asyncio.sleep(0.5)
            for i in range(10):
                raw = await _get(edge, host, f"/during-{i}")
                assert raw.startswith(b"HTTP/1.1 200 "), raw[:300]
            # one that got a pre-auth slot is closed after the first-byte timeout
            await _closed_within(socks[0], 6)
        finally:
            for s in socks:
                s.close()
        raw = await _get(edge, host, "/after")
        assert raw.startswith(b"HTTP/1.1 200 "), raw[:300]
    assert edge.proc.poll() is None
    # the accept-failure log (if any) is throttled, not one line per 50 ms
    assert edge.stderr.count("accept failed") <= 20, edge.stderr[-2000:]
    _no_tracebacks(edge)


# --------------------------------------------------------- 11. partial ClientHellos
PARTIAL_HELLO = bytes.fromhex("160301400001003ffc0303")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_partial_client_hellos_do_not_burn_cpu(tmp_path, procs) -> None:
    # every partial hello may sit in the SNI stage: this tests the waiting, not the cap
    edge = start_edge(tmp_path, "--max-handshakes-per-ip", "1000")
    procs.append(edge)
    async with HTTPUpstream() as up:
        a = start_agent(edge, "http", str(up.port), "--url", "https://secure.burrow.localhost", home=tmp_path / "h")
        procs.append(a)
        https = _addr(a.public_url)
        loop = asyncio.get_running_loop()
        socks: list[socket.socket] = []
        try:
            for _ in range(400):
                s = await _open_from(ATTACKER, ("127.0.0.1", https[1]))
                socks.append(s)
                await loop.sock_sendall(s, PARTIAL_HELLO)
            await asyncio.sleep(0.5)
            before = _cpu_seconds(edge.pid)
            t0 = time.monotonic()
            await asyncio.sleep(1.0)
            used = (_cpu_seconds(edge.pid) - before) / (time.monotonic() - t0)
            # polling them took 39% of a core here (96% in the issue); waiting costs ~0
            assert used < 0.15, f"the edge used {used:.0%} of a core for 400 idle partial ClientHellos"
            ctx = ssl.create_default_context(cafile=edge.ready["ca_file"])
            for i in range(5):
                r, w = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", https[1], ssl=ctx, server_hostname="secure.burrow.localhost"), 5
                )
                w.write(f"GET /tls-{i} HTTP/1.1\r\nHost: secure.burrow.localhost\r\nConnection: close\r\n\r\n".encode())
                data = await asyncio.wait_for(r.read(), 10)
                w.close()
                assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(f"GET /tls-{i}\n".encode()), data[:300]
        finally:
            for s in socks:
                s.close()
    _no_tracebacks(edge)


@pytest.mark.parametrize("flags", [("--data-tls",), ("--no-data-tls",)], ids=["tls-data", "plain-data"])
async def test_a_tcp_client_that_never_reads_is_closed_after_the_send_timeout(tmp_path, procs, flags) -> None:
    # A raw relay (TCP tunnel) to a client that reads nothing: idle is fine, but bytes
    # waiting for it longer than the send timeout end the connection.
    edge = start_edge(tmp_path, "--send-timeout", "1")
    procs.append(edge)
    async with TCPEcho() as up:
        a = start_agent(edge, "tcp", str(up.port), *flags, home=tmp_path / "h")
        procs.append(a)
        port = int(a.public_url.rsplit(":", 1)[1])
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", port)), 5)
            await asyncio.sleep(2)  # idle for longer than the send timeout: still open
            await loop.sock_sendall(s, b"ping")
            assert await asyncio.wait_for(loop.sock_recv(s, 4), 5) == b"ping"
            sent = 0
            t0 = time.monotonic()
            with contextlib.suppress(OSError, TimeoutError):  # the edge resets us: expected
                while sent < 512 * 1024 * 1024 and time.monotonic() - t0 < 15:
                    await asyncio.wait_for(loop.sock_sendall(s, b"x" * 1024 * 1024), 15 - (time.monotonic() - t0))
                    sent += 1024 * 1024
            # the echo never got read back; the edge must have dropped the connection
            got = 0
            with contextlib.suppress(OSError, TimeoutError):
                while chunk := await asyncio.wait_for(loop.sock_recv(s, 1024 * 1024), 3):
                    got += len(chunk)
        finally:
            s.close()
        assert time.monotonic() - t0 < 15, "the edge never gave up on a client that reads nothing"
        assert got < sent, (got, sent)


async def test_stopping_with_connections_open_logs_no_tracebacks(tmp_path, procs) -> None:
    """SIGTERM while public and API connections are open: each handler is cancelled, and
    none may end in a logged CancelledError traceback (Python 3.11 logs one per open
    connection for a start_server handler that ends cancelled)."""
    edge = start_edge(tmp_path)
    socks = [
        await _open_from("127.0.0.1", edge.http_addr),
        await _open_from("127.0.0.1", _addr(edge.ready["api_url"])),
    ]
    try:
        await asyncio.sleep(0.3)
        edge.stop()
    finally:
        for s in socks:
            s.close()
    assert edge.proc.returncode is not None
    _no_tracebacks(edge)
