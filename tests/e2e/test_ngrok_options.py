"""ngrok's tunnel options, driven by the real pyngrok (burrow as ``ngrok_path``) and
by the agent API: schemes, names, basic auth, traffic policy, file:// upstreams, config
files, and errors in ngrok's words."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.procs import BurrowProc, host_of
from tests.upstreams import HTTPUpstream

BURROW = os.path.join(os.path.dirname(sys.executable), "burrow")


# ------------------------------------------------------------------ helpers
def fetch(edge, url: str, path: str = "/", *, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One request to a public URL of ``edge`` (https verified with the edge's CA, by SNI)."""
    scheme, rest = url.split("://", 1)
    host = rest.split("/", 1)[0].rsplit(":", 1)[0]
    port = int(edge.ready[f"{scheme}_url"].rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if scheme == "https":
        ctx = ssl.create_default_context(cafile=edge.ready["ca_file"])
        sock = ctx.wrap_socket(sock, server_hostname=host)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *hdr_lines = head.decode("latin-1").split("\r\n")
    hdrs = {}
    for ln in hdr_lines:
        k, _, v = ln.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), hdrs, body


def agent_config(edge, tmp_path: Path, extra: str = "", version: str = "3") -> Path:
    """An ngrok config file for this edge: v3 (settings under ``agent:``) or v2 (top level)."""
    settings = {
        "authtoken": "test-authtoken",
        "server_addr": edge.ready["ingress_addr"],
        "root_cas": edge.ready["ca_file"],
        "web_addr": "127.0.0.1:0",
    }
    if version == "3":
        text = "version: '3'\nagent:\n" + "".join(f"  {k}: {v}\n" for k, v in settings.items())
    else:
        text = "version: '2'\n" + "".join(f"{k}: {v}\n" for k, v in settings.items())
    config = tmp_path / f"ngrok-v{version}.yml"
    config.write_text(text + extra)
    return config


@pytest.fixture
def pyngrok(edge, tmp_path):
    """(ngrok module, PyngrokConfig factory): pyngrok runs this checkout's burrow."""
    from pyngrok import conf, ngrok

    made = []

    def config(extra: str = "", version: str = "3") -> conf.PyngrokConfig:
        """``version``: of the config file and of pyngrok's API use (v2: /api/tunnels)."""
        path = agent_config(edge, tmp_path, extra, version)
        pc = conf.PyngrokConfig(ngrok_path=BURROW, config_path=str(path), startup_timeout=20, config_version=version)
        made.append(pc)
        return pc

    yield ngrok, config
    for pc in made:
        ngrok.kill(pyngrok_config=pc)


def upstream_server():
    """A threaded HTTP upstream for the sync pyngrok tests: answers its path, records heads."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[dict] = []

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(dict(self.headers))
            body = f"upstream {self.path}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Secret", "leak")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, seen


# ------------------------------------------------------------------ pyngrok
def test_pyngrok_schemes_and_bind_tls(edge, pyngrok):
    ngrok, config = pyngrok
    srv, _ = upstream_server()
    port = str(srv.server_address[1])
    try:
        pc = config(version="2")
        both = ngrok.connect(port, name="web", schemes=["http", "https"], pyngrok_config=pc)
        assert both.public_url.startswith("https://") and both.name == "web"
        listed = {t.name: t.public_url for t in ngrok.get_tunnels(pyngrok_config=pc)}
        assert set(listed) == {"web", "web (http)"}
        assert listed["web (http)"].startswith("http://")
        assert listed["web (http)"].split("://")[1].split(":")[0] == listed["web"].split("://")[1].split(":")[0]
        for url in listed.values():
            status, _, body = fetch(edge, url, "/both")
            assert (status, body) == (200, b"upstream /both\n"), url
        plain = ngrok.connect(port, bind_tls=False, pyngrok_config=pc)
        assert plain.public_url.startswith("http://") and plain.proto == "http"
        tls = ngrok.connect(port, bind_tls=True, pyngrok_config=pc)
        assert tls.public_url.startswith("https://") and tls.proto == "https"
        assert fetch(edge, tls.public_url, "/t")[0] == 200
    finally:
        srv.shutdown()


def test_pyngrok_domain_basic_auth_and_traffic_policy_mapping(edge, pyngrok):
    ngrok, config = pyngrok
    srv, _ = upstream_server()
    port = str(srv.server_address[1])
    try:
        pc = config()
        t = ngrok.connect(port, domain="site.burrow.localhost", basic_auth=["alice:wonderland"], pyngrok_config=pc)
        assert t.public_url.startswith("https://site.burrow.localhost:")
        status, hdrs, _ = fetch(edge, t.public_url, "/private")
        assert status == 401 and hdrs["www-authenticate"].startswith("Basic")
        good = "Basic " + base64.b64encode(b"alice:wonderland").decode()
        assert fetch(edge, t.public_url, "/private", headers={"Authorization": good})[0] == 200
        bad = "Basic " + base64.b64encode(b"alice:nope").decode()
        assert fetch(edge, t.public_url, "/private", headers={"Authorization": bad})[0] == 401

        policy = {"on_http_request": [{"expressions": ["req.url.path.startsWith('/admin')"],
                                       "actions": [{"type": "deny", "config": {"status_code": 403}}]}]}
        p = ngrok.connect(port, traffic_policy=policy, pyngrok_config=pc)
        assert fetch(edge, p.public_url, "/admin/x")[0] == 403
        assert fetch(edge, p.public_url, "/open")[0] == 200
    finally:
        srv.shutdown()


def test_pyngrok_file_upstream(edge, pyngrok, tmp_path):
    ngrok, config = pyngrok
    root = tmp_path / "www"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text("alpha\n")
    (tmp_path / "secret.txt").write_text("outside\n")
    (root / "escape").symlink_to(tmp_path / "secret.txt")
    t = ngrok.connect(f"file://{root}", pyngrok_config=config())
    status, hdrs, body = fetch(edge, t.public_url, "/")
    assert status == 200 and hdrs["content-type"].startswith("text/html")
    assert b'href="docs/"' in body and b'href="escape"' in body
    status, hdrs, body = fetch(edge, t.public_url, "/docs/a.txt")
    assert (status, body, hdrs["content-type"]) == (200, b"alpha\n", "text/plain")
    assert fetch(edge, t.public_url, "/docs")[0] == 301
    head = fetch(edge, t.public_url, "/docs/a.txt", method="HEAD")
    assert head[0] == 200 and head[1]["content-length"] == "6" and head[2] == b""
    assert fetch(edge, t.public_url, "/escape")[0] == 403  # a symlink out of the root
    assert fetch(edge, t.public_url, "/docs/%2e%2e/%2e%2e/secret.txt")[0] in (400, 403, 404)
    assert fetch(edge, t.public_url, "/nope")[0] == 404
    assert fetch(edge, t.public_url, "/docs/a.txt", method="DELETE")[0] == 405
    assert (tmp_path / "www" / "docs" / "a.txt").read_text() == "alpha\n"


def test_pyngrok_v2_tunnels_and_v3_endpoints_from_the_config(edge, pyngrok):
    ngrok, config = pyngrok
    srv, seen = upstream_server()
    port = srv.server_address[1]
    extra = (
        "tunnels:\n"
        "  web:\n"
        "    proto: http\n"
        f"    addr: {port}\n"
        "    schemes: [http]\n"
        "    basic_auth: ['bob:builder1']\n"
        "    request_header: {add: ['X-From: config'], remove: ['User-Agent']}\n"
        "    response_header: {remove: ['X-Secret']}\n"
        "    host_header: rewrite\n"
        "endpoints:\n"
        "  - name: guarded\n"
        "    url: https://guarded.burrow.localhost\n"
        f"    upstream: {{url: 'http://127.0.0.1:{port}'}}\n"
        "    traffic_policy:\n"
        "      on_http_request:\n"
        "        - actions: [{type: deny, config: {status_code: 403}}]\n"
    )
    try:
        pc = config(extra, version="2")
        web = ngrok.connect(name="web", pyngrok_config=pc)  # pyngrok reads the definition
        assert web.public_url.startswith("http://")
        auth = "Basic " + base64.b64encode(b"bob:builder1").decode()
        assert fetch(edge, web.public_url, "/")[0] == 401
        status, hdrs, _ = fetch(edge, web.public_url, "/h", headers={"Authorization": auth, "User-Agent": "ua"})
        assert status == 200 and "x-secret" not in hdrs
        assert seen[-1]["X-From"] == "config" and "User-Agent" not in seen[-1]
        assert seen[-1]["Host"] == f"127.0.0.1:{port}" or seen[-1]["Host"] == f"localhost:{port}"
        assert seen[-1]["X-Original-Host"] == host_of(web.public_url)  # the Host the client sent

        ngrok.kill(pyngrok_config=pc)
        pc3 = config(extra.replace("    schemes: [http]\n", ""))  # the same definitions in a v3 file
        guarded = ngrok.connect(name="guarded", pyngrok_config=pc3)
        assert guarded.public_url.startswith("https://guarded.burrow.localhost:")
        assert fetch(edge, guarded.public_url, "/")[0] == 403
    finally:
        srv.shutdown()


def test_burrow_start_runs_config_endpoints_with_their_policy(edge, tmp_path):
    async def go():
        async with HTTPUpstream() as up:
            extra = (
                "endpoints:\n"
                "  - name: denied\n"
                "    url: https://denied.burrow.localhost\n"
                f"    upstream: {{url: {up.port}}}\n"
                "    traffic_policy: {on_http_request: [{actions: [{type: deny, config: {status_code: 403}}]}]}\n"
                "tunnels:\n"
                "  both:\n"
                "    proto: http\n"
                f"    addr: {up.port}\n"
                "    bind_tls: both\n"
                "    inspect: false\n"
            )
            cfg = agent_config(edge, tmp_path, extra)
            proc = BurrowProc(["start", "--all", "--config", str(cfg), "--json"],
                              env={"XDG_DATA_HOME": str(tmp_path / "h"), "BURROW_DATA_DIR": str(tmp_path / "h")})
            try:
                ready = await asyncio.to_thread(proc.wait_event, "ready", 20)
                urls = {t["name"]: t["public_url"] for t in ready["tunnels"]}
                assert set(urls) == {"denied", "both", "both (http)"}
                status = await asyncio.to_thread(fetch, edge, urls["denied"], "/")
                assert status[0] == 403 and up.requests == []
                for name in ("both", "both (http)"):
                    assert (await asyncio.to_thread(fetch, edge, urls[name], "/x"))[0] == 200
                web = ready["web_addr"]
                async with httpx.AsyncClient(base_url=f"http://{web}") as c:
                    tunnels = {t["name"]: t for t in (await c.get("/api/tunnels")).json()["tunnels"]}
                    assert tunnels["both"]["proto"] == "https" and tunnels["both (http)"]["proto"] == "http"
                    assert tunnels["both"]["config"]["inspect"] is False
                    assert (await c.get("/api/requests/http")).json()["requests"] == []
            finally:
                proc.stop()

    asyncio.run(go())


def test_bad_config_fails_start_with_logfmt_error_on_stdout(tmp_path):
    """Checked before the edge is dialled: no edge needed (server_addr is never reached)."""
    from pyngrok import conf, ngrok
    from pyngrok.exception import PyngrokNgrokError

    head = "version: '3'\nagent:\n  authtoken: t\n  server_addr: 127.0.0.1:9\n  web_addr: 127.0.0.1:0\n"
    cases = [
        ("tunnels:\n  w: {proto: gopher, addr: 80}\n", "protocol name"),  # (pyngrok reads this one)
        ("tunnels:\n  w: {proto: http, addr: 80, bogus_key: 1}\n", "unknown option 'bogus_key'"),
        ("endpoints:\n  - {name: e, upstream: {url: 80}, circuit_breaker: 0.5}\n", "circuit_breaker is not supported"),
        ("not_an_ngrok_key: 1\n", "unknown key 'not_an_ngrok_key'"),
    ]
    for i, (extra, err) in enumerate(cases):
        cfg = tmp_path / f"bad{i}.yml"
        cfg.write_text(head + extra)
        if i == 0:
            continue  # pyngrok's turn, below
        out = subprocess.run([sys.executable, "-m", "backend", "start", "--none", "--log", "stdout", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=20)
        assert out.returncode != 0, extra
        line = next(ln for ln in out.stdout.splitlines() if "lvl=eror" in ln)
        assert "err=" in line and err in line, (line, err)
    # pyngrok reads that line and says why ngrok (burrow) would not start
    pc = conf.PyngrokConfig(ngrok_path=BURROW, config_path=str(tmp_path / "bad0.yml"), startup_timeout=20)
    try:
        with pytest.raises(PyngrokNgrokError) as info:
            ngrok.get_tunnels(pyngrok_config=pc)
        assert "invalid protocol name 'gopher'" in str(info.value)
    finally:
        ngrok.kill(pyngrok_config=pc)


# ------------------------------------------------------------------ agent API
async def test_agent_api_refuses_invalid_definitions_in_ngroks_words(edge, agents):
    from pyngrok import ngrok
    from pyngrok.exception import PyngrokNgrokHTTPError

    a = agents("http", "8080")
    base = f"http://{a.ready['web_addr']}"
    cases = [
        ({"name": "x", "addr": "80", "proto": "gopher"}, "protocol name"),
        ({"name": "x", "addr": "80", "oauth": {"provider": "google"}}, "oauth is not supported"),
        ({"name": "x", "addr": "80", "oidc": {"issuer_url": "https://i"}}, "oidc is not supported"),
        ({"name": "x", "addr": "80", "circuit_breaker": 0.5}, "circuit_breaker is not supported"),
        ({"name": "x", "addr": "80", "compression": True}, "compression is not supported"),
        ({"name": "x", "addr": "80", "no_such_option": 1}, "unknown option 'no_such_option'"),
        ({"name": "x", "addr": "22", "proto": "tcp", "basic_auth": ["a:bbbbbbbb"]}, "basic_auth is not an option of tcp"),
        ({"name": "x", "addr": "80", "schemes": ["ftp"]}, "schemes"),
        ({"name": "x", "addr": "80", "bind_tls": "sometimes"}, "bind_tls"),
        ({"name": "x", "addr": "80", "ip_restriction": {"allow_cidrs": ["not-a-cidr"]}}, "not-a-cidr"),
        ({"name": "x", "addr": "80", "domain": "a.example", "subdomain": "b"}, "only one of"),
    ]
    async with httpx.AsyncClient(base_url=base) as c:
        for body, text in cases:
            r = await c.post("/api/tunnels", json=body)
            got = r.json()
            assert r.status_code == 400, (body, got)
            assert got["error_code"] == 102 and got["status_code"] == 400, got
            assert got["msg"] == "invalid tunnel configuration", got
            assert text in got["details"]["err"], (text, got)
        r = await c.post("/api/endpoints", json={"name": "e", "upstream": {"url": "80"}, "oauth": {"provider": "x"}})
        assert r.status_code == 400 and "oauth" in r.json()["details"]["err"]
        names = [t["name"] for t in (await c.get("/api/tunnels")).json()["tunnels"]]
        assert names == ["command_line"]
    # what pyngrok's own tests check of ngrok
    with pytest.raises(PyngrokNgrokHTTPError) as info:
        ngrok.api_request(f"{base}/api/tunnels", "POST", data={"name": "y", "addr": "8080", "proto": "invalid-proto"})
    assert info.value.status_code == 400
    assert "invalid tunnel configuration" in str(info.value) and "protocol name" in str(info.value)


async def test_tcp_remote_addr_proxy_proto_and_ip_restriction(edge, agents):
    got: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got.append(await r.readline())
        w.write(b"hi\n")
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    up_port = server.sockets[0].getsockname()[1]
    a = agents("http", "8080")
    async with httpx.AsyncClient(base_url=f"http://{a.ready['web_addr']}") as c:
        r = await c.post("/api/tunnels", json={"name": "pp", "proto": "tcp", "addr": up_port,
                                               "remote_addr": "localhost:31777", "proxy_proto": 1})
        assert r.status_code == 201, r.text
        assert r.json()["public_url"].endswith(":31777") and r.json()["proto"] == "tcp"
        rd, wr = await asyncio.open_connection("127.0.0.1", 31777)
        assert await asyncio.wait_for(rd.readline(), 10) == b"hi\n"
        wr.close()
        assert got[0].startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
        # a tcp tunnel that denies this client's address closes on connect
        r = await c.post("/api/tunnels", json={"name": "deny", "proto": "tcp", "addr": up_port,
                                               "remote_addr": "localhost:31778",
                                               "ip_restriction": {"deny_cidrs": ["127.0.0.0/8"]}})
        assert r.status_code == 201, r.text
        rd, wr = await asyncio.open_connection("127.0.0.1", 31778)
        assert await asyncio.wait_for(rd.read(), 10) == b""
        wr.close()
        # .internal with pooling: the URL and proto say https, the binding is internal
        r = await c.post("/api/tunnels", json={"name": "int", "addr": up_port, "domain": "api.internal",
                                               "pooling_enabled": True})
        assert r.status_code == 201, r.text
        assert (r.json()["public_url"], r.json()["proto"]) == ("https://api.internal", "https")
        ep = (await c.get("/api/endpoints/int")).json()
        assert ep["bindings"] == ["internal"]
        assert ep["pooling_enabled"] is True
    server.close()
