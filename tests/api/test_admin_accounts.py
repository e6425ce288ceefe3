"""Accounts for self-hosting: the admin API and ``burrow admin account ...`` on a real edge.

create → the new account's agent binds and its API key works, isolated from the others;
disable → its API keys get 401, its authtokens fail Auth, its live sessions end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import ngrok
import pytest

from tests.api.conftest import POLICY_YAML
from tests.e2e.test_ngrok_sdk import SDK, needs_sdk
from tests.procs import READY_TIMEOUT, BurrowProc, edge_args, host_of, start_agent
from tests.upstreams import raw_request

ADMIN_KEY = "admin-key-for-the-tests-0123456789"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def admin_edge(tmp_path_factory):
    data = tmp_path_factory.mktemp("admin") / "edge"
    proc = BurrowProc([*edge_args(data), "--admin-key", ADMIN_KEY])
    proc.ready = proc.wait_event("ready", READY_TIMEOUT)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def admin(admin_edge):
    with httpx.Client(
        base_url=admin_edge.ready["api_url"], headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=20
    ) as c:
        yield c


@pytest.fixture
def started(admin_edge, tmp_path):
    procs: list[BurrowProc] = []

    def agent(authtoken: str, *flags: str, check: bool = True) -> BurrowProc:
        p = start_agent(
            admin_edge, "http", "127.0.0.1:9", "--authtoken", authtoken, *flags,
            home=tmp_path / f"home{len(procs)}", check=check,
        )
        procs.append(p)
        return p

    yield agent
    for p in procs:
        p.stop()


def _cloud(edge: BurrowProc, api_key: str) -> ngrok.Client:
    return ngrok.Client(api_key, base_url=edge.ready["api_url"])


def _raw_cloud(edge: BurrowProc, api_key: str, path: str) -> httpx.Response:
    return httpx.get(
        edge.ready["api_url"] + path,
        headers={"Authorization": f"Bearer {api_key}", "Ngrok-Version": "2"},
        timeout=20,
    )


def _ngrok_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error_code", "status_code", "msg", "details"}
    assert body["error_code"] == code and body["status_code"] == status
    return body


def _public_get(edge: BurrowProc, url: str) -> bytes:
    data, _ = raw_request(
        edge.http_addr, f"GET / HTTP/1.1\r\nHost: {host_of(url)}\r\nConnection: close\r\n\r\n".encode()
    )
    return data


def _wait(cond, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------------------ auth
def test_the_admin_api_needs_the_admin_key(admin_edge):
    base = admin_edge.ready["api_url"]
    _ngrok_error(httpx.get(f"{base}/admin/accounts"), 401, "ERR_NGROK_200")
    _ngrok_error(httpx.get(f"{base}/admin/accounts", headers={"Authorization": "Basic x"}), 401, "ERR_NGROK_201")
    wrong = {"Authorization": "Bearer not-the-admin-key-at-all"}
    _ngrok_error(httpx.get(f"{base}/admin/accounts", headers=wrong), 401, "ERR_NGROK_202")
    # an account's API key is no admin key
    cloud = {"Authorization": "Bearer test-api-key", "Ngrok-Version": "2"}
    _ngrok_error(httpx.post(f"{base}/admin/accounts", json={"name": "x"}, headers=cloud), 401, "ERR_NGROK_202")
    # and the admin key is no API key
    _ngrok_error(_raw_cloud(admin_edge, ADMIN_KEY, "/endpoints"), 401, "ERR_NGROK_202")


def test_without_an_admin_key_the_admin_api_is_off(edge):
    r = httpx.get(edge.ready["api_url"] + "/admin/accounts", headers={"Authorization": "Bearer whatever-key-0123456"})
    assert "--admin-key" in _ngrok_error(r, 404, "ERR_NGROK_404")["msg"]


def test_bad_requests_get_ngroks_error_body(admin):
    _ngrok_error(admin.post("/admin/accounts", json={"name": "x", "plan": "pro"}), 400, "ERR_NGROK_214")
    _ngrok_error(admin.post("/admin/accounts", json={"name": 5}), 400, "ERR_NGROK_215")
    _ngrok_error(admin.post("/admin/accounts", json={}), 400, "ERR_NGROK_215")
    _ngrok_error(admin.post("/admin/accounts", json={"name": "  "}), 400, "ERR_NGROK_400")
    _ngrok_error(admin.post("/admin/accounts", content=b"{", headers={"Content-Type": "application/json"}), 400, "ERR_NGROK_213")
    _ngrok_error(admin.post("/admin/accounts/nobody/disable"), 404, "ERR_NGROK_404")
    _ngrok_error(admin.get("/admin/accounts/acct_2abcdefghijklmnopqrstuvwxyz"), 404, "ERR_NGROK_404")
    assert admin.post("/admin/accounts", json={"name": "twice"}).status_code == 201
    _ngrok_error(admin.post("/admin/accounts", json={"name": "twice"}), 409, "ERR_NGROK_409")


# ------------------------------------------------------------------- create, isolate
def test_accounts_made_by_the_admin_api_are_isolated(admin_edge, admin, started):
    made = {}
    for name in ("alice", "bob"):
        r = admin.post("/admin/accounts", json={"name": name})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["name"] == name and body["id"].startswith("acct_") and body["disabled_at"] is None
        assert body["authtoken"].startswith("bat_") and body["api_key"].startswith("bak_")
        made[name] = body
    listed = {a["name"]: a for a in admin.get("/admin/accounts").json()["accounts"]}
    assert {"alice", "bob", "default"} <= set(listed)
    assert all("authtoken" not in a and "api_key" not in a for a in listed.values())  # shown once
    assert admin.get(f"/admin/accounts/{made['alice']['id']}").json()["name"] == "alice"

    a = started(made["alice"]["authtoken"])
    b = started(made["bob"]["authtoken"])
    alice, bob = _cloud(admin_edge, made["alice"]["api_key"]), _cloud(admin_edge, made["bob"]["api_key"])
    assert [s.id for s in alice.tunnel_sessions.list()] == [a.ready["session_id"]]
    assert [s.id for s in bob.tunnel_sessions.list()] == [b.ready["session_id"]]
    assert [e.url for e in alice.endpoints.list()] == [a.public_url]
    assert [e.url for e in bob.endpoints.list()] == [b.public_url]
    assert [c.id for c in alice.credentials.list()] != [c.id for c in bob.credentials.list()]
    with pytest.raises(ngrok.NotFoundError):
        bob.tunnel_sessions.get(a.ready["session_id"])
    with pytest.raises(ngrok.NotFoundError):
        alice.endpoints.get(next(iter(bob.endpoints.list())).id)
    # the bootstrap account sees neither
    default = _cloud(admin_edge, "test-api-key")
    assert {s.id for s in default.tunnel_sessions.list()}.isdisjoint({a.ready["session_id"], b.ready["session_id"]})
    assert listed["alice"]["agent_sessions"] == 0
    assert admin.get(f"/admin/accounts/{made['alice']['id']}").json()["agent_sessions"] == 1


# --------------------------------------------------------------------------- disable
def test_disable_cuts_an_account_off_and_enable_lets_it_back(admin_edge, admin, started):
    made = admin.post("/admin/accounts", json={"name": "carol"}).json()
    client = _cloud(admin_edge, made["api_key"])
    ep = client.endpoints.create(url="http://carol.example.com", type="cloud", traffic_policy=POLICY_YAML)
    cloud_host = "carol.example.com"
    hello = f"GET /hi HTTP/1.1\r\nHost: {cloud_host}\r\nConnection: close\r\n\r\n".encode()
    assert raw_request(admin_edge.http_addr, hello)[0].endswith(b"Hello world!")
    agent = started(made["authtoken"])
    assert _public_get(admin_edge, agent.public_url).startswith(b"HTTP/1.1 502")  # upstream :9 is down
    assert client.tunnel_sessions.list()

    r = admin.post(f"/admin/accounts/{made['id']}/disable")
    assert r.status_code == 200 and r.json()["disabled_at"] and r.json()["agent_sessions"] == 0
    # its live agent is told why and stops for good
    assert agent.wait_exit(10) != 0
    assert "ERR_NGROK_338" in agent.stderr and "disabled" in agent.stderr, agent.stderr
    assert b"ERR_NGROK_3200" in _public_get(admin_edge, agent.public_url)
    # its API key: 401 in ngrok's format
    body = _ngrok_error(_raw_cloud(admin_edge, made["api_key"], "/endpoints"), 401, "ERR_NGROK_205")
    assert "carol" in body["msg"] and "disabled" in body["msg"]
    # its authtoken fails Auth
    again = started(made["authtoken"], check=False)
    assert again.wait_exit(15) != 0
    assert "ERR_NGROK_338" in again.stderr and "carol" in again.stderr
    # its cloud endpoint no longer serves, but its name stays its own
    assert b"ERR_NGROK_3200" in raw_request(admin_edge.http_addr, hello)[0]
    other = _cloud(admin_edge, "test-api-key")
    with pytest.raises(ngrok.Error) as exc:
        other.endpoints.create(url=f"http://{cloud_host}", type="cloud", traffic_policy=POLICY_YAML)
    assert exc.value.error_code == "ERR_NGROK_414"

    r = admin.post(f"/admin/accounts/{made['id']}/enable")
    assert r.status_code == 200 and r.json()["disabled_at"] is None
    assert [e.id for e in client.endpoints.list()] == [ep.id]
    page = raw_request(admin_edge.http_addr, hello)[0]
    assert page.startswith(b"HTTP/1.1 200") and page.endswith(b"Hello world!")
    started(made["authtoken"])  # binds again


# -------------------------------------------------------------------------- the CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backend", "admin", "account", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )


def test_the_cli_on_the_data_dir_of_a_running_edge(admin_edge, started):
    data = admin_edge.ready["data_dir"]
    r = _cli("create", "dave", "--data-dir", data, "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["name"] == "dave" and made["authtoken"].startswith("bat_")
    agent = started(made["authtoken"])  # the running edge sees the new account at once
    assert [s.id for s in _cloud(admin_edge, made["api_key"]).tunnel_sessions.list()] == [agent.ready["session_id"]]

    listing = _cli("list", "--data-dir", data)
    assert listing.returncode == 0 and "dave" in listing.stdout and "enabled" in listing.stdout
    assert made["authtoken"] not in listing.stdout

    r = _cli("disable", "dave", "--data-dir", data)
    assert r.returncode == 0 and "disabled" in r.stdout, r.stderr
    assert agent.wait_exit(10) != 0  # the edge picks the change up by itself
    assert "ERR_NGROK_338" in agent.stderr
    _ngrok_error(_raw_cloud(admin_edge, made["api_key"], "/tunnel_sessions"), 401, "ERR_NGROK_205")

    # the same through the admin API of the running edge
    r = _cli("enable", made["id"], "--api-url", admin_edge.ready["api_url"], "--admin-key", ADMIN_KEY)
    assert r.returncode == 0 and "enabled" in r.stdout, r.stderr
    assert _raw_cloud(admin_edge, made["api_key"], "/tunnel_sessions").status_code == 200


def test_cli_errors_are_one_line(tmp_path, admin_edge):
    for args, words in (
        (("list", "--data-dir", str(tmp_path / "none")), "no edge data"),
        (("disable", "nobody", "--data-dir", admin_edge.ready["data_dir"]), "no account named 'nobody'"),
        (("create", "x", "--api-url", admin_edge.ready["api_url"], "--admin-key", "wrong-key-0123456789"), "ERR_NGROK_202"),
    ):
        r = _cli(*args)
        assert r.returncode == 1
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr


# ---------------------------------------------------------------- ngrok's own agents
@needs_sdk
async def test_disable_ends_an_ngrok_sdk_session_and_refuses_its_auth(admin_edge, admin):
    made = admin.post("/admin/accounts", json={"name": "erin"}).json()
    sdk = await SDK.start(admin_edge, "127.0.0.1:9", authtoken=made["authtoken"])
    try:
        assert not sdk.error and sdk.url
        assert b"ERR_NGROK_3200" not in _public_get(admin_edge, sdk.url)
        assert admin.post(f"/admin/accounts/{made['id']}/disable").status_code == 200
        assert b"ERR_NGROK_3200" in _public_get(admin_edge, sdk.url)  # its session ended at once
        assert admin.get(f"/admin/accounts/{made['id']}").json()["agent_sessions"] == 0
    finally:
        await sdk.stop()
    refused = await SDK.start(admin_edge, "127.0.0.1:9", authtoken=made["authtoken"])
    try:
        assert not refused.url
        assert "ERR_NGROK_338" in refused.error and "erin" in " ".join(refused.error), refused.error
    finally:
        await refused.stop()
