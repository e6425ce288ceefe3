"""burrow in ngrok's place for the tools that drive ngrok: ``version``, ``config ...``,
start-up log lines and failures (as pyngrok reads them), and the inspector pages at the
web address (``/``, ``/status``, ``/inspect/http``), also through a tunnel to it."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import httpx
import pytest
import yaml

from tests.procs import READY_TIMEOUT, BurrowProc, host_of
from tests.upstreams import HTTPUpstream, raw_exchange

BURROW = os.path.join(os.path.dirname(sys.executable), "burrow")


def burrow(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BURROW, *args], capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})}
    )


def agent_config(path, edge, **agent) -> str:
    conf = {
        "version": "3",
        "agent": {
            "authtoken": "test-authtoken",
            "connect_url": edge.ready["ingress_addr"],
            "connect_cas": edge.ready["ca_file"],
            "web_addr": "127.0.0.1:0",
            **agent,
        },
    }
    path.write_text(yaml.safe_dump(conf))
    return str(path)


def pyngrok_config(config_path: str):
    from pyngrok import conf

    return conf.PyngrokConfig(ngrok_path=BURROW, config_path=config_path, startup_timeout=20)


# ------------------------------------------------------------------ version, config
def test_version_in_ngroks_shape_and_pyngrok_get_version(tmp_path):
    from pyngrok import __version__ as pyngrok_version
    from pyngrok import ngrok

    assert burrow("--version").stdout == "burrow version 0.1.0\n"
    assert burrow("version").stdout == "burrow version 0.1.0\n"
    pc = pyngrok_config(str(tmp_path / "ngrok.yml"))
    assert ngrok.get_version(pyngrok_config=pc) == ("0.1.0", pyngrok_version)


def test_pyngrok_set_auth_token_and_api_key_write_a_v3_file_ngrok_reads(tmp_path):
    from pyngrok import ngrok

    path = tmp_path / "conf" / "ngrok.yml"
    pc = pyngrok_config(str(path))
    ngrok.set_auth_token("tok-123", pyngrok_config=pc)
    assert yaml.safe_load(path.read_text()) == {"version": "3", "agent": {"authtoken": "tok-123"}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    from pyngrok import process

    process.set_api_key(pc, "key-456")
    data = yaml.safe_load(path.read_text())
    assert data["agent"] == {"authtoken": "tok-123", "api_key": "key-456"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    r = burrow("config", "check", "--config", str(path))
    assert (r.returncode, r.stdout) == (0, f"Valid configuration file at {path}\n")
    # a v2 file keeps its shape
    v2 = tmp_path / "v2.yml"
    v2.write_text("authtoken: old\ntunnels:\n  web: {proto: http, addr: 80}\n")
    r = burrow("config", "add-authtoken", "new", "--config", str(v2), "--log", "stdout")
    assert r.stdout == f"Authtoken saved to configuration file: {v2}\n"
    assert yaml.safe_load(v2.read_text()) == {"authtoken": "new", "tunnels": {"web": {"proto": "http", "addr": 80}}}


def test_config_default_path_is_burrows_own(tmp_path):
    r = burrow("config", "add-authtoken", "t", env={"XDG_CONFIG_HOME": str(tmp_path), "BURROW_CONFIG": ""})
    path = tmp_path / "burrow" / "burrow.yml"
    assert r.stdout == f"Authtoken saved to configuration file: {path}\n"
    assert yaml.safe_load(path.read_text())["agent"]["authtoken"] == "t"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("version: 3\nagent: [1]\n", "'agent' must be a mapping"),
        ("version: 7\n", "unsupported config version"),
        ("tunnels:\n  x: {proto: gopher, addr: 80}\n", "invalid tunnel"),
        ("agent: {web_addr: 'nope:port'}\n", "web_addr"),
        ("a: [unclosed\n", "not valid YAML"),
    ],
)
def test_config_check_refuses_a_bad_file(tmp_path, text, words):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    r = burrow("config", "check", "--config", str(path))
    assert r.returncode == 1 and r.stdout == ""
    assert words in r.stderr and r.stderr.startswith("burrow config: error:")


def test_config_upgrade_v2_to_v3_and_the_result_starts(edge, tmp_path):
    v2 = tmp_path / "v2.yml"
    original = (
        "authtoken: test-authtoken\n"
        f"server_addr: {edge.ready['ingress_addr']}\n"
        f"root_cas: {edge.ready['ca_file']}\n"
        "web_addr: 127.0.0.1:0\n"
        "tunnels:\n"
        "  web: {proto: http, addr: 8080, hostname: upgraded.burrow.localhost, schemes: [http]}\n"
        "  db: {proto: tcp, addr: 5432}\n"
        "  guarded: {proto: http, addr: 9000, basic_auth: ['a:b']}\n"
    )
    v2.write_text(original)
    dry = burrow("config", "upgrade", "--dry-run", "--config", str(v2))
    assert dry.returncode == 0 and v2.read_text() == original
    new = yaml.safe_load(dry.stdout)
    assert new["version"] == "3"
    assert new["agent"] == {
        "authtoken": "test-authtoken",
        "connect_url": edge.ready["ingress_addr"],
        "connect_cas": edge.ready["ca_file"],
        "web_addr": "127.0.0.1:0",
    }
    assert new["endpoints"] == [
        {"name": "web", "url": "http://upgraded.burrow.localhost", "upstream": {"url": 8080}},
        {"name": "db", "url": "tcp://", "upstream": {"url": 5432}},
    ]
    assert new["tunnels"] == {"guarded": {"proto": "http", "addr": 9000, "basic_auth": ["a:b"]}}
    assert "tunnel 'guarded' kept under tunnels:" in dry.stderr

    r = burrow("config", "upgrade", "--config", str(v2))
    assert r.returncode == 0 and r.stdout.startswith(f"Upgraded configuration file at {v2}")
    assert yaml.safe_load(v2.read_text()) == new
    assert stat.S_IMODE(v2.stat().st_mode) == 0o600
    assert (tmp_path / "v2.yml.v2.bak").read_text() == original
    again = burrow("config", "upgrade", "--config", str(v2))
    assert again.returncode == 0 and "already version 3" in again.stdout

    # the upgraded file runs: v3 names for the edge, endpoints from the old tunnels
    new["tunnels"] = {}  # basic_auth is another change's business; keep this start clean
    v2.write_text(yaml.safe_dump(new))
    agent = BurrowProc(["start", "--all", "--config", str(v2), "--json"], env={"XDG_DATA_HOME": str(tmp_path)})
    try:
        ready = agent.wait_event("ready", READY_TIMEOUT)
        urls = {t["name"]: t["public_url"] for t in ready["tunnels"]}
        assert urls["web"].startswith("http://upgraded.burrow.localhost:")
        assert urls["db"].startswith("tcp://")
    finally:
        agent.stop()


# ------------------------------------------------------------- start-up log lines
def _log_lines(proc: subprocess.Popen, until: str, limit: int = 40) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if until in line or len(lines) >= limit:
            break
    return lines


def _msg(line: str) -> str:
    from pyngrok.log import NgrokLog

    return NgrokLog(line).msg or ""


def test_start_up_log_lines_in_ngroks_order(edge, tmp_path):
    config = agent_config(tmp_path / "a.yml", edge)
    with open(config, "a") as f:
        f.write("tunnels:\n  web: {proto: http, addr: 8080}\n")
    proc = subprocess.Popen(
        [BURROW, "start", "--all", "--log", "stdout", "--config", config], stdout=subprocess.PIPE, text=True
    )
    try:
        lines = _log_lines(proc, "started tunnel")
    finally:
        proc.terminate()
        proc.wait(10)
    assert [_msg(x) for x in lines] == [
        "open config file",
        "starting web service",
        "client session established",
        "tunnel session started",
        "started tunnel",
    ]
    assert f"path={config} err=nil" in lines[0]
    assert "obj=web addr=127.0.0.1:" in lines[1]
    assert "name=web" in lines[-1] and "url=https://" in lines[-1]  # ngrok v3's default scheme


def test_start_up_failures_are_eror_lines_before_the_exit(edge, tmp_path):
    from pyngrok.log import NgrokLog

    bad_token = agent_config(tmp_path / "token.yml", edge, authtoken="wrong")
    r = burrow("start", "--none", "--log", "stdout", "--config", bad_token)
    last = NgrokLog(r.stdout.splitlines()[-1])
    assert r.returncode == 1
    assert (last.lvl, last.msg) == ("ERROR", "session closing")
    assert last.err.startswith("authentication failed") and last.err.endswith("ERR_NGROK_107")

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    nowhere = agent_config(tmp_path / "nowhere.yml", edge, connect_url=f"127.0.0.1:{closed.getsockname()[1]}")
    closed.close()
    r = burrow("start", "--none", "--log", "stdout", "--config", nowhere)
    logs = [NgrokLog(x) for x in r.stdout.splitlines()]
    assert r.returncode == 1
    assert "failed to reconnect session" in [x.msg for x in logs if x.lvl == "ERROR"]
    assert logs[-1].lvl == "ERROR" and "connection refused" in logs[-1].err


def test_pyngrok_reports_a_web_address_in_use_with_ngroks_error(edge, tmp_path):
    from pyngrok import ngrok
    from pyngrok.exception import PyngrokNgrokError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        addr = f"127.0.0.1:{busy.getsockname()[1]}"
        pc = pyngrok_config(agent_config(tmp_path / "busy.yml", edge, web_addr=addr))
        try:
            with pytest.raises(PyngrokNgrokError) as err:
                ngrok.connect("8080", pyngrok_config=pc)
        finally:
            ngrok.kill(pyngrok_config=pc)
    expected = f"listen tcp {addr}: bind: address already in use"
    assert expected in str(err.value)
    assert err.value.ngrok_error == expected
    assert any('msg="failed to start web service"' in log.line for log in err.value.ngrok_logs)


# -------------------------------------------------------------- inspector pages
def test_status_page_through_a_tunnel_to_the_agents_own_web_address(edge, tmp_path):
    """pyngrok starts burrow, then tunnels the agent's web address; /status answers
    through the public URL (the guard knows the agent's own tunnel names) and a
    foreign Host still gets 403."""
    from pyngrok import ngrok

    pc = pyngrok_config(agent_config(tmp_path / "self.yml", edge))
    try:
        api_url = ngrok.get_ngrok_process(pyngrok_config=pc).api_url
        web_port = api_url.rsplit(":", 1)[1]
        tunnel = ngrok.connect(web_port, pyngrok_config=pc, bind_tls=False)  # through the http port
        host, port = edge.http_addr
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=20) as public:
            page = public.get("/status", headers={"Host": host_of(tunnel.public_url) + f":{port}"})
            assert page.status_code == 200, page.text
            assert page.headers["content-type"].startswith("text/html")
            assert "<h2>Tunnels</h2>" in page.text and f"<td>{tunnel.public_url}</td>" in page.text
            inspect = public.get("/inspect/http", headers={"Host": host_of(tunnel.public_url)})
            assert inspect.status_code == 200 and "GET /status" in inspect.text
        with httpx.Client(base_url=api_url, timeout=20) as local:
            assert local.get("/status").status_code == 200
            assert local.get("/status", headers={"Host": "rebound.example"}).status_code == 403
            assert local.get("/status", headers={"Host": f"rebound.example:{web_port}"}).status_code == 403
            # only a tunnel whose upstream is this web address lends its name
            other = ngrok.connect("8080", pyngrok_config=pc)
            assert local.get("/status", headers={"Host": host_of(other.public_url)}).status_code == 403
            assert local.get("/status", headers={"Host": host_of(tunnel.public_url)}).status_code == 200
    finally:
        ngrok.kill(pyngrok_config=pc)


async def test_inspect_page_escapes_what_visitors_sent(edge, agents):
    """Captured data is written by strangers: a <script> in the path, a header or the
    body is shown as text, and the pages forbid inline script (CSP)."""
    async with HTTPUpstream() as up:
        a = agents("http", up.port)
        host = host_of(a.public_url)
        evil = '<script>window.__xss=1</script>"><img src=x onerror=alert(1)>'
        sent = (
            f"POST /<script>alert(1)</script>?q=\"><svg/onload=alert(2)> HTTP/1.1\r\nHost: {host}\r\n"
            f"X-Evil: {evil}\r\nContent-Length: {len(evil)}\r\nConnection: close\r\n\r\n{evil}"
        ).encode()
        await raw_exchange(*edge.http_addr, sent)
        async with httpx.AsyncClient(base_url=f"http://{a.ready['web_addr']}", timeout=20) as c:
            for _ in range(100):
                page = await c.get("/inspect/http")
                if "1 of" in page.text or "(1)" in page.text:
                    break
            root = await c.get("/")
            status = await c.get("/status")
            js = await c.get("/static/inspector.js")
            css = await c.get("/static/inspector.css")
            refused = await c.get("/inspect/http", headers={"Host": "attacker.example"})
    assert root.status_code == 302 and root.headers["location"] == "/inspect/http"
    assert page.status_code == 200 and "(1)" in page.text
    body = page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in body
    # the only tags are the page's own: one external script, no inline handlers
    assert body.count("<script") == 1 and '<script src="/static/inspector.js" defer></script>' in body
    assert "<img" not in body and "<svg" not in body and "<script>" not in body
    for r in (page, status, js, css):
        assert r.headers["content-security-policy"].startswith("default-src 'self'")
        assert r.headers["x-content-type-options"] == "nosniff"
    assert "innerHTML" not in js.text and "eval(" not in js.text
    assert status.status_code == 200 and "command_line" in status.text
    assert refused.status_code == 403
