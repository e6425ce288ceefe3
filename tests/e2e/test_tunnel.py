"""The data path end to end: real edge and agent processes, real upstreams and clients."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import httpx
import pytest
import websockets

from tests.procs import READY_TIMEOUT, BurrowProc, host_of, start_edge
from tests.upstreams import HTTPUpstream, TCPEcho, raw_exchange


def _client(edge: BurrowProc) -> httpx.AsyncClient:
    host, port = edge.http_addr
    return httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=20)


async def test_get_returns_upstream_response_byte_for_byte(edge, agents):
    async with HTTPUpstream() as up:
        a = agents("http", up.port)
        host = host_of(a.public_url)
        raw = await raw_exchange(
            *edge.http_addr,
            f"GET /bytes/70000 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
        )
        assert raw == up.sent[0]
        head, _ = up.requests[0]
        assert head.startswith(b"GET /bytes/70000 HTTP/1.1\r\n")
        assert f"Host: {host}".encode() in head
        assert b"X-Forwarded-For: 127.0.0.1" in head
        assert b"X-Forwarded-Proto: http" in head


async def test_5mb_post_reaches_upstream_and_comes_back(edge, agents):
    body = os.urandom(5 * 1024 * 1024)
    async with HTTPUpstream() as up:
        a = agents("http", up.port)
        async with _client(edge) as c:
            r = await c.post("/echo", content=body, headers={"Host": host_of(a.public_url)})
        assert r.status_code == 200
        assert up.requests[0][1] == body
        assert r.headers["x-body-sha256"] == hashlib.sha256(body).hexdigest()
        assert r.content == body


async def test_chunked_expect_continue_and_keep_alive(edge, agents):
    async with HTTPUpstream() as up:
        a = agents("http", up.port)
        host = host_of(a.public_url).encode()
        r, w = await asyncio.open_connection(*edge.http_addr)
        # 1: a chunked response relayed verbatim
        w.write(b"GET /chunked HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        expected = up._respond("GET", "/chunked", b"")
        got = await asyncio.wait_for(r.readexactly(len(expected)), 10)
        assert got == expected
        # 2: same connection, Expect: 100-continue with a chunked request body
        w.write(
            b"POST /echo HTTP/1.1\r\nHost: " + host + b"\r\nExpect: 100-continue\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        cont = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        assert cont == b"HTTP/1.1 100 Continue\r\n\r\n"
        w.write(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert await asyncio.wait_for(r.readexactly(11), 10) == b"hello world"
        # 3: HEAD has no body even with a Content-Length
        w.write(b"HEAD /bytes/100 HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        assert b"Content-Length: 100" in head
        w.write(b"GET /last HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        rest = await asyncio.wait_for(r.read(), 10)
        assert rest.startswith(b"HTTP/1.1 200 OK") and rest.endswith(b"GET /last\n")
        w.close()
        assert len(up.requests) == 4


async def test_tcp_echo_through_tcp_endpoint(edge, agents):
    async with TCPEcho() as up:
        a = agents("tcp", up.port)
        url = a.public_url
        assert url.startswith("tcp://")
        port = int(url.rsplit(":", 1)[1])
        r, w = await asyncio.open_connection("127.0.0.1", port)
        payload = os.urandom(1024 * 1024)
        w.write(payload)
        await w.drain()
        got = await asyncio.wait_for(r.readexactly(len(payload)), 20)
        assert got == payload
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()


async def test_websocket_echo_through_http_endpoint(edge, agents):
    async def echo(ws):
        async for msg in ws:
            await ws.send(msg)

    async with websockets.serve(echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        a = agents("http", port)
        host = host_of(a.public_url)
        eh, ep = edge.http_addr
        async with websockets.connect(f"ws://{host}:{ep}/ws", host=eh, port=ep) as ws:
            for msg in ["hello", b"\x00\x01binary", "x" * 100_000]:
                await ws.send(msg)
                assert await asyncio.wait_for(ws.recv(), 10) == msg


async def test_refused_upstream_gives_502(edge, agents):
    with socket_port() as free_port:
        pass
    a = agents("http", free_port)
    async with _client(edge) as c:
        r = await c.get("/", headers={"Host": host_of(a.public_url)})
    assert r.status_code == 502
    assert r.headers["ngrok-error-code"] == "ERR_NGROK_8012"
    assert f"localhost:{free_port}" in r.text


async def test_unknown_host_gives_404_offline(edge):
    async with _client(edge) as c:
        r = await c.get("/", headers={"Host": "nobody.burrow.localhost"})
    assert r.status_code == 404
    assert r.headers["ngrok-error-code"] == "ERR_NGROK_3200"
    assert "ERR_NGROK_3200" in r.text
    assert "endpoint nobody.burrow.localhost is offline" in r.text


async def test_sigkill_takes_url_offline_and_restart_serves_again(edge, agents):
    async with HTTPUpstream() as up, _client(edge) as c:
        a = agents("http", up.port)
        url = a.public_url
        host = host_of(url)
        assert (await c.get("/", headers={"Host": host})).status_code == 200
        a.kill()
        killed = time.monotonic()
        while True:
            r = await c.get("/", headers={"Host": host})
            if r.status_code == 404:
                break
            assert time.monotonic() - killed < 1.0, "URL still online 1 s after SIGKILL"
            await asyncio.sleep(0.02)
        assert r.headers["ngrok-error-code"] == "ERR_NGROK_3200"
        assert time.monotonic() - killed < 1.0

        b = agents("http", up.port, "--url", url, check=False)
        # the same URL is free at once: the new agent is serving it by the time it says ready
        # (timed from its ready line, not from process start, which a loaded CI box stretches)
        assert (await asyncio.to_thread(b.wait_event, "ready", READY_TIMEOUT))["tunnels"][0]["public_url"] == url
        ready = time.monotonic()
        while True:
            r = await c.get("/hi", headers={"Host": host})
            if r.status_code == 200:
                break
            assert time.monotonic() - ready < 2.0, "restarted agent not serving 2 s after ready"
            await asyncio.sleep(0.02)
        assert r.text == "GET /hi\n"


async def test_edge_restart_brings_agent_back(tmp_path, agents, edge):
    async with HTTPUpstream() as up:
        a = agents("http", up.port)
        url = a.public_url
        host = host_of(url)
        ports = {
            "ingress": int(edge.ready["ingress_addr"].rsplit(":", 1)[1]),
            "http": edge.http_addr[1],
        }
        edge.stop()
        a.wait_event("disconnected", 10)
        edge2 = start_edge(tmp_path / "edge", **ports)
        try:
            ev = a.wait_event("session", 15)
            assert ev["tunnels"][0]["public_url"] == url
            async with _client(edge2) as c:
                r = await c.get("/again", headers={"Host": host})
            assert r.status_code == 200 and r.text == "GET /again\n"
        finally:
            edge2.stop()


def test_bad_authtoken_is_refused_with_one_line(edge, agents):
    a = agents("http", 9, "--authtoken", "wrong-token", check=False)
    assert a.wait_exit() != 0
    err = a.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert "authtoken" in err and "invalid" in err


def test_unreachable_server_is_one_line_error(tmp_path):
    with socket_port() as port:
        pass
    p = BurrowProc(
        ["http", "8080", "--server-addr", f"127.0.0.1:{port}", "--authtoken", "x", "--web-addr", "127.0.0.1:0"],
        env={"XDG_DATA_HOME": str(tmp_path), "BURROW_DATA_DIR": str(tmp_path / "b")},
    )
    assert p.wait_exit() != 0
    err = p.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "cannot reach the edge" in err


@pytest.mark.parametrize(
    "args, words",
    [
        (["http"], "ADDR"),
        (["http", "80", "--binding", "nope"], "--binding"),
        (["serve", "--tcp-ports", "9-1"], "port range"),
        (["serve", "--api-addr", "0.0.0.0:4041", "--data-dir", "/nonexistent/x"], "loopback"),
        (["agent", "--config", "/nonexistent/burrow.yml", "--authtoken", "x"], "no such file"),
    ],
)
def test_bad_flags_give_one_line_error(args, words, tmp_path):
    p = BurrowProc(args, env={"XDG_DATA_HOME": str(tmp_path), "BURROW_DATA_DIR": str(tmp_path / "b")})
    assert p.wait_exit() != 0
    err = p.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert words in err


class socket_port:
    """A port that was free a moment ago (nothing listens on it after the block)."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return self.port

    def __exit__(self, *exc) -> None:
        pass


async def test_idle_keep_alive_connection_gives_back_its_data_connection(edge, agents):
    """An idle client connection stops holding a data connection (and, through the
    agent, an upstream connection); its next request is served on a fresh one."""
    async with HTTPUpstream() as up:
        a = agents("http", up.port)
        host = host_of(a.public_url).encode()
        r, w = await asyncio.open_connection(*edge.http_addr)
        w.write(b"GET /one HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert (await asyncio.wait_for(r.readuntil(b"GET /one\n"), 10)).startswith(b"HTTP/1.1 200")
        assert up.open_connections == 1
        deadline = time.monotonic() + 10
        while up.open_connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert up.open_connections == 0  # the edge released the data connection
        w.write(b"GET /two HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert (await asyncio.wait_for(r.readuntil(b"GET /two\n"), 10)).startswith(b"HTTP/1.1 200")
        assert up.connections == 2
        w.close()


async def test_a_kept_alive_upstream_connection_closed_by_the_app_is_dialled_again(edge, agents):
    """The app closes a kept-alive connection just as the next request reaches it (its
    idle timeout, racing the request): the agent sends a bodiless GET once more on a new
    connection, while a POST, which cannot go twice, gets the agent's 502 page."""
    seen: list[bytes] = []

    async def app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # answers the first request of each connection, keeps it open, and closes it
        # without a word when the second request's head arrives
        try:
            for n in range(2):
                head = await r.readuntil(b"\r\n\r\n")
                seen.append(head.split(b"\r\n", 1)[0])
                if n == 1:
                    break
                if b"Content-Length: 3" in head:
                    await r.readexactly(3)
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(app, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        a = agents("http", port)
        host = host_of(a.public_url).encode()
        r, w = await asyncio.open_connection(*edge.http_addr)
        try:
            for path in (b"/one", b"/two"):
                w.write(b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
                got = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
                assert got.startswith(b"HTTP/1.1 200 OK"), got
                assert await asyncio.wait_for(r.readexactly(2), 10) == b"ok"
            # /two was sent on the kept-alive connection, dropped, and sent again
            assert seen == [b"GET /one HTTP/1.1", b"GET /two HTTP/1.1", b"GET /two HTTP/1.1"]
            w.write(b"POST /three HTTP/1.1\r\nHost: " + host + b"\r\nContent-Length: 3\r\n\r\nabc")
            got = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            assert got.startswith(b"HTTP/1.1 502 "), got
            assert seen[3:] == [b"POST /three HTTP/1.1"]
        finally:
            w.close()
    finally:
        server.close()


@pytest.mark.parametrize("flags", [("--data-tls",), ("--no-data-tls",)], ids=["tls-data", "plain-data"])
async def test_an_app_closing_its_connection_does_not_close_the_clients(edge, agents, flags):
    """An app that answers every request with ``Connection: close`` (as nginx does after
    its keepalive_requests) closes its own connection only: Connection is hop-by-hop,
    so the client's connection and its data connection (a TLS handshake each, with
    --data-tls) go on, and the agent dials the app again for the next request.  A
    response that ends only at the close still closes the client's connection."""
    conns: list[int] = []

    async def app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(1)
        try:
            head = await r.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET /until-close "):
                w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end")
            else:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(app, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        a = agents("http", port, *flags)
        host = host_of(a.public_url).encode()
        r, w = await asyncio.open_connection(*edge.http_addr)
        try:
            for i in range(3):
                w.write(b"GET /" + str(i).encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
                got = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
                assert got.startswith(b"HTTP/1.1 200 OK"), got
                assert b"connection: close" not in got.lower(), got
                assert await asyncio.wait_for(r.readexactly(2), 10) == b"ok"
            assert len(conns) == 3  # one app connection per request, one client connection
            w.write(b"GET /until-close HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            rest = await asyncio.wait_for(r.read(), 10)  # the edge closes after it
            assert rest.startswith(b"HTTP/1.1 200 OK") and rest.endswith(b"to the end"), rest
        finally:
            w.close()
    finally:
        server.close()


@pytest.mark.parametrize("flags", [("--data-tls",), ("--no-data-tls",)], ids=["tls-data", "plain-data"])
async def test_a_data_connection_serves_one_public_connection_after_another(edge, agents, flags):
    """A public HTTP connection that ends between two exchanges gives its data
    connection back to the session's pool (the agent lets go of its app connection and
    waits for the next start): 20 public connections one after another are served by
    the data connections the agent dialled at first, with no new one (no TLS handshake
    each)."""
    async with HTTPUpstream() as up:
        a = agents("http", up.port, *flags)
        host = host_of(a.public_url).encode()
        iport = int(edge.ready["ingress_addr"].rsplit(":", 1)[1])

        def data_conns() -> set[str]:
            """The local addresses of established connections to the ingress port (the
            agent's control and data connections), from /proc/net/tcp."""
            found = set()
            with open("/proc/net/tcp") as f:
                for line in list(f)[1:]:
                    local, remote, state = line.split()[1:4]
                    if state == "01" and int(remote.rsplit(":", 1)[1], 16) == iport:
                        found.add(local)
            return found

        async def one(path: str) -> httpx.Response:
            async with _client(edge) as c:  # a new public connection each
                return await c.get(path, headers={"Host": host.decode()})

        assert (await one("/warm")).status_code == 200
        await asyncio.sleep(0.5)
        before = data_conns()
        assert len(before) >= 2, before  # the control connection and the pooled ones
        for i in range(20):
            got = await one(f"/n{i}")
            assert got.status_code == 200 and got.text == f"GET /n{i}\n", got.text
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        after = data_conns()
        assert after <= before | set(list(after)[:2]) and len(after - before) <= 2, (before, after)
        assert [h.split(b"\r\n", 1)[0] for h, _ in up.requests[-20:]] == [
            f"GET /n{i} HTTP/1.1".encode() for i in range(20)
        ]
        assert up.open_connections <= 1  # the agent let go of the app connections
