"""Issue 12, items 1-5: who may bind which name, credential ACLs, per-tenant caps.

Everything goes through real processes: an edge, agents started as ``burrow http|tls|tcp``,
a second account created in the edge's store, the cloud API through the official
client, and public traffic over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from pathlib import Path

import httpx
import ngrok
import pytest

from tests.api.conftest import POLICY_YAML, add_account, client_for
from tests.procs import READY_TIMEOUT, BurrowProc, edge_args, host_of
from tests.upstreams import HTTPUpstream, TCPEcho

DOMAIN = "burrow.localhost"


def https_get(edge: BurrowProc, sni: str, path: str = "/hi") -> bytes:
    """One HTTPS request with ``sni`` as server name, verified against the edge's CA."""
    port = int(edge.ready["https_url"].rsplit(":", 1)[1])
    ctx = ssl.create_default_context(cafile=edge.ready["ca_file"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as s,
    ):
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def http_get(edge: BurrowProc, host: str, path: str = "/hi") -> httpx.Response:
    h, p = edge.http_addr
    return httpx.get(f"http://{h}:{p}{path}", headers={"Host": host}, timeout=10)


def refused(agent: BurrowProc) -> str:
    """The one-line error of an agent that must exit because its bind was refused."""
    assert agent.wait_exit(15) != 0
    err = agent.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def start_tunnel(agent: BurrowProc, **body) -> httpx.Response:
    """Start one more tunnel on a running agent through its agent API."""
    return httpx.post(f"http://{agent.ready['web_addr']}/api/tunnels", json=body, timeout=20)


@pytest.fixture
def api(edge) -> ngrok.Client:
    return client_for(edge)


def no_crash(edge: BurrowProc) -> None:
    assert "Traceback" not in edge.stderr and "AttributeError" not in edge.stderr, edge.stderr


# ------------------------------------------------------------------------- item 1
def test_reserved_hostnames_belong_to_one_account_across_protocols(edge, agents):
    a = add_account(edge, "shopowner")
    a.client.endpoints.create(url="https://shop", type="cloud", traffic_policy=POLICY_YAML)
    a.client.endpoints.create(url="http://shop2", type="cloud", traffic_policy=POLICY_YAML)
    # account B (the edge's default account) tries every protocol on A's names
    for proto, url in (
        ("tls", f"tls://shop.{DOMAIN}"),
        ("http", f"http://shop.{DOMAIN}"),
        ("http", f"https://shop2.{DOMAIN}"),
    ):
        b = agents(proto, 9, "--url", url, check=False)
        err = refused(b)
        assert "ERR_NGROK_320" in err and "reserved for another account" in err, err
    # A's traffic still reaches A
    resp = https_get(edge, f"shop.{DOMAIN}")
    assert resp.startswith(b"HTTP/1.1 200") and resp.endswith(b"Hello world!"), resp[:200]
    r = http_get(edge, f"shop2.{DOMAIN}")
    assert (r.status_code, r.text) == (200, "Hello world!")
    no_crash(edge)


def test_online_agent_names_refuse_other_accounts_cloud_endpoints(edge, agents):
    b = agents("http", 9, "--url", f"http://shop3.{DOMAIN}")
    t = agents("tcp", 9, "--url", "tcp://localhost:31950")
    assert t.public_url.endswith(":31950")
    a = add_account(edge, "late")
    for url in ("https://shop3", "tls://shop3", "tcp://x.example.com:31950"):
        with pytest.raises(ngrok.Error) as exc:
            a.client.endpoints.create(url=url, type="cloud", traffic_policy=POLICY_YAML)
        assert (exc.value.http_status_code, exc.value.error_code) == (409, "ERR_NGROK_414"), url
    assert list(a.client.endpoints.list()) == []
    # and B's agent still owns its name: a second agent of B may not take it unpooled
    assert b.proc.poll() is None
    no_crash(edge)


# ------------------------------------------------------------------------- item 5
def test_tcp_bind_on_a_cloud_endpoints_port_is_a_clear_conflict(edge, agents, api):
    other = add_account(edge, "tcpowner")
    other.client.endpoints.create(url="tcp://t.example.com:31901", type="cloud", traffic_policy=POLICY_YAML)
    api.endpoints.create(url="tcp://u.example.com:31902", type="cloud", traffic_policy=POLICY_YAML)
    started = time.monotonic()
    b = agents("tcp", 9, "--url", "tcp://localhost:31901", check=False)
    err = refused(b)
    assert "ERR_NGROK_309" in err and "reserved for another account" in err, err
    # the same account's own (unpooled) cloud endpoint: "already online", no crash either
    c = agents("tcp", 9, "--url", "tcp://localhost:31902", check=False)
    err = refused(c)
    assert "ERR_NGROK_334" in err and "already online" in err, err
    assert time.monotonic() - started < 60  # both agents exited instead of looping
    for proc in (b, c):
        assert not [e for e in proc.seen if e.get("event") == "reconnecting"]
    no_crash(edge)


# ------------------------------------------------------------------------- item 2
def test_agents_bind_only_names_under_the_edge_domain_or_owned(edge, agents, api):
    a = agents("http", 9, "--url", f"http://mine.{DOMAIN}")
    for url in (
        "http://www.example.com",
        "http://127.0.0.1",
        "http://localhost",
        f"http://*.{DOMAIN}",
        f"http://{DOMAIN}",
        "http://[::1]",
    ):
        r = start_tunnel(a, name=url.split("//")[1][:10], proto="http", addr="9", url=url)
        assert r.status_code in (400, 502), (url, r.text)
        assert "reserve" in r.text or "invalid" in r.text.lower(), (url, r.text)
    # the edge's own localhost Host is not answered by any agent
    r = http_get(edge, "localhost")
    assert r.status_code == 404 and "ERR_NGROK_3200" in r.text
    # a domain the account owns (its agent ingress) may be bound, wildcards included
    api.agent_ingresses.create(domain="owned.example.net")
    for i, url in enumerate(("http://app.owned.example.net", "http://*.owned.example.net")):
        r = start_tunnel(a, name=f"owned{i}", proto="http", addr="9", url=url)
        assert r.status_code == 201, r.text
    # another account may not bind under it
    other = add_account(edge, "intruder")
    b = agents("http", 9, "--url", "http://x.owned.example.net", "--authtoken", other.authtoken, check=False)
    assert "ERR_NGROK_320" in refused(b)
    no_crash(edge)


# ------------------------------------------------------------------------- item 3
def test_credential_acls_are_enforced_on_every_bind(edge, agents, api):
    only = api.credentials.create(acl=[f"bind:only-this.{DOMAIN}"])
    a = agents("http", 9, "--url", f"http://only-this.{DOMAIN}", "--authtoken", only.token)
    assert host_of(a.public_url) == f"only-this.{DOMAIN}"
    for body in (
        {"proto": "http", "url": f"http://something-else.{DOMAIN}"},
        {"proto": "http", "url": ""},  # a random name is not "only-this"
        {"proto": "tcp", "url": ""},
        {"proto": "http", "url": "https://api.internal"},
    ):
        r = start_tunnel(a, name=f"t{len(body['url'])}{body['proto']}", addr="9", **body)
        assert r.status_code == 502 and "ACL" in r.text, (body, r.text)
    c = agents("http", 9, "--url", f"http://something-else.{DOMAIN}", "--authtoken", only.token, check=False)
    assert "ERR_NGROK_308" in refused(c)
    wild = api.credentials.create(acl=[f"bind:*.{DOMAIN}", "bind:db.internal"])
    w = agents("http", 9, "--authtoken", wild.token)  # random name under the domain
    assert host_of(w.public_url).endswith(f".{DOMAIN}")
    assert start_tunnel(w, name="int", proto="tcp", addr="9", url="tcp://db.internal:5432").status_code == 201
    r = start_tunnel(w, name="tcp", proto="tcp", addr="9")
    assert r.status_code == 502 and "ACL" in r.text
    # an empty ACL allows everything
    free = api.credentials.create()
    f = agents("tcp", 9, "--authtoken", free.token)
    assert f.public_url.startswith("tcp://")


# ------------------------------------------------------------------------- item 4
@pytest.fixture
def capped_edge(tmp_path):
    args = [
        *edge_args(tmp_path / "edge"),
        "--max-sessions-per-authtoken", "2",
        "--max-endpoints-per-account", "3",
        "--max-tcp-ports-per-account", "1",
        "--max-data-conns-per-session", "2",
    ]  # fmt: skip
    proc = BurrowProc(args)
    proc.ready = proc.wait_event("ready", READY_TIMEOUT)
    yield proc
    proc.stop()


async def test_per_tenant_caps_refuse_one_account_and_serve_the_others(capped_edge, tmp_path):
    from tests.procs import start_agent

    edge = capped_edge
    started: list[BurrowProc] = []

    def agent(*args: str, check: bool = True) -> BurrowProc:
        p = start_agent(edge, *args, home=tmp_path / "home", check=check)
        started.append(p)
        return p

    try:
        async with HTTPUpstream() as up, TCPEcho() as echo:
            other = add_account(edge, "neighbour")
            neighbour = agent("http", str(up.port), "--authtoken", other.authtoken)
            # sessions per authtoken
            a1 = agent("tcp", str(echo.port))
            a2 = agent("http", str(up.port))
            err = refused(agent("http", str(up.port), check=False))
            assert "ERR_NGROK_108" in err and "2 simultaneous" in err, err
            # endpoints per account (a1 and a2 hold 2 of 3)
            assert start_tunnel(a2, name="third", proto="http", addr=str(up.port)).status_code == 201
            r = start_tunnel(a2, name="fourth", proto="http", addr=str(up.port))
            assert r.status_code == 502 and "most this edge allows" in r.text, r.text
            # tcp ports per account: a1 holds the only one; the API is refused too
            api = client_for(edge)
            with pytest.raises(ngrok.Error) as exc:
                api.endpoints.create(url="https://fifth", type="cloud", traffic_policy=POLICY_YAML)
            assert exc.value.error_code == "ERR_NGROK_18021"
            # data connections per session: two held, the third is turned away at once
            port = int(a1.public_url.rsplit(":", 1)[1])
            held = []
            for i in range(2):
                rd, wr = await asyncio.open_connection("127.0.0.1", port)
                wr.write(b"ping%d" % i)
                assert await asyncio.wait_for(rd.readexactly(5), 10) == b"ping%d" % i
                held.append((rd, wr))
            rd, wr = await asyncio.open_connection("127.0.0.1", port)
            wr.write(b"extra")
            # closed at once: a FIN, or a RST when the edge closes with "extra" unread
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(rd.read(100), 10) == b""
            wr.close()
            # the neighbouring account is served all along, and can still bind
            r = await asyncio.to_thread(http_get, edge, host_of(neighbour.public_url))
            assert r.status_code == 200
            assert start_tunnel(neighbour, name="more", proto="tcp", addr=str(echo.port)).status_code == 201
            for _, w in held:
                w.close()
    finally:
        for p in started:
            p.stop()
    # (the tcp relays cut when the agents stop log a CancelledError: a data-path matter)
    assert "AttributeError" not in edge.stderr and "SessionBusy" not in edge.stderr


def test_tcp_port_cap_per_account(capped_edge, tmp_path):
    from tests.procs import start_agent

    a = start_agent(capped_edge, "tcp", "9", home=tmp_path / "home")
    try:
        r = start_tunnel(a, name="second", proto="tcp", addr="9")
        assert r.status_code == 502 and "tcp ports" in r.text, r.text
    finally:
        a.stop()
    assert Path(capped_edge.ready["data_dir"]).exists()


def test_cloud_endpoints_cannot_take_the_edges_own_names(edge, api):
    """``localhost`` and the bare edge domain answer for the edge itself: refused (400)."""
    for url in ("https://localhost", f"http://{DOMAIN}"):
        with pytest.raises(ngrok.Error) as exc:
            api.endpoints.create(url=url, type="cloud", traffic_policy=POLICY_YAML)
        assert exc.value.http_status_code == 400, url
        assert "edge's own name" in str(exc.value), url
    assert list(api.endpoints.list()) == []
    no_crash(edge)
