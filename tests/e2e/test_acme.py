"""Certificates from a real ACME server: Debian's pebble, validating against burrow's listeners.

The module starts ``pebble-challtestsrv`` as pebble's DNS (every name answers 127.0.0.1,
no AAAA) and pebble with ``httpPort``/``tlsPort`` set to the edge's own http and https
listeners, so each challenge really reaches burrow: PEBBLE_VA_ALWAYS_VALID is off.
Pebble's certificates live ``VALIDITY`` seconds, so renewal (at two thirds) happens while
the module runs.  A second edge with its own pebble answers http-01 only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.server
import json
import os
import queue
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from backend import serveconfig
from backend.cli import CLIError, _acme_options, build_parser
from backend.tls import LocalCA
from tests.api.conftest import add_account
from tests.procs import READY_TIMEOUT, BurrowProc, edge_args, host_of
from tests.upstreams import HTTPUpstream

_HELLO = {"on_http_request": [{"actions": [{"type": "custom-response", "config": {"status_code": 200, "body": "from the cloud"}}]}]}
PEBBLE = "/usr/bin/pebble"
CHALLTESTSRV = "/usr/bin/pebble-challtestsrv"
VALIDITY = 15  # seconds: pebble's certificateValidityPeriod, renewal due after 10 s
RATE = 2  # the edge's --acme-rate-limit (new on-demand certificates per account per hour)

NO_PEBBLE = "Debian's pebble is not installed (apt-get install -y pebble); .ci/run installs it"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Env:
    edge: BurrowProc
    root: Path  # pebble's root CA (PEM), from its management API
    procs: list[subprocess.Popen]
    api: httpx.Client
    data_dir: Path
    acme_flags: list[str]
    dns_api: str  # pebble-challtestsrv's management API

    def restart_edge(self) -> None:
        """Stop the edge and start it again on the same data dir and ports (pebble
        validates against those ports)."""
        ready = self.edge.ready
        ports = {
            "api": ready["api_url"], "ingress": ready["ingress_addr"],
            "http": ready["http_url"], "https": ready["https_url"],
        }
        self.edge.stop()
        self.edge = BurrowProc(
            [*edge_args(self.data_dir, **{k: int(v.rsplit(":", 1)[1]) for k, v in ports.items()}), *self.acme_flags]
        )
        self.edge.ready = self.edge.wait_event("ready", READY_TIMEOUT)

    @property
    def https_port(self) -> int:
        return int(self.edge.ready["https_url"].rsplit(":", 1)[1])

    @property
    def ingress_port(self) -> int:
        return int(self.edge.ready["ingress_addr"].rsplit(":", 1)[1])

    def close(self) -> None:
        self.api.close()
        self.edge.stop()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def _start_env(d: Path, *edge_flags: str) -> Env:
    if not (os.path.exists(PEBBLE) and os.path.exists(CHALLTESTSRV)):
        pytest.skip(NO_PEBBLE)
    d.mkdir(parents=True, exist_ok=True)
    # pebble's own HTTPS (the directory) needs a certificate: one from a throwaway CA
    wfe_ca = LocalCA.load_or_create(d / "wfe-ca")
    chain, key = wfe_ca.issue(["127.0.0.1", "localhost"])
    (d / "wfe.pem").write_bytes(chain)
    (d / "wfe-key.pem").write_bytes(key)
    acme_port, mgmt_port, dns_port, cts_port = (_free_port() for _ in range(4))
    # the edge first (it reaches the directory only when it needs a certificate) ...
    acme_flags = [
        "--acme-directory", f"https://127.0.0.1:{acme_port}/dir",
        "--acme-email", "ops@example.com",
        "--acme-ca-root", str(wfe_ca.ca_file),
        "--acme-rate-limit", str(RATE),
        "--metrics-public",
        *edge_flags,
    ]
    edge = BurrowProc([*edge_args(d / "edge"), *acme_flags])
    procs: list[subprocess.Popen] = []
    try:
        edge.ready = edge.wait_event("ready", READY_TIMEOUT)
        http_port = int(edge.ready["http_url"].rsplit(":", 1)[1])
        https_port = int(edge.ready["https_url"].rsplit(":", 1)[1])
        # ... then pebble, validating against the edge's http and https listeners
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{acme_port}",
                "managementListenAddress": f"127.0.0.1:{mgmt_port}",
                "certificate": str(d / "wfe.pem"),
                "privateKey": str(d / "wfe-key.pem"),
                "httpPort": http_port,
                "tlsPort": https_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
                "certificateValidityPeriod": VALIDITY,
            }
        }
        (d / "pebble.json").write_text(json.dumps(config))
        out = open(d / "challtestsrv.log", "wb")  # noqa: SIM115 - lives as long as the process
        procs.append(
            subprocess.Popen(
                [
                    CHALLTESTSRV, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                    "-dns01", f"127.0.0.1:{dns_port}", "-http01", "", "-https01", "",
                    "-tlsalpn01", "", "-management", f"127.0.0.1:{cts_port}",
                ],
                stdout=out, stderr=subprocess.STDOUT,
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("PEBBLE_")}
        env.update(PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0")
        out = open(d / "pebble.log", "wb")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [PEBBLE, "-config", str(d / "pebble.json"), "-dnsserver", f"127.0.0.1:{dns_port}"],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )
        )

        trust = ssl.create_default_context(cafile=str(wfe_ca.ca_file))

        def root() -> bytes | None:
            try:
                r = httpx.get(f"https://127.0.0.1:{mgmt_port}/roots/0", verify=trust, timeout=2)
            except httpx.TransportError:
                return None
            return r.content if r.status_code == 200 else None

        (d / "pebble-root.pem").write_bytes(_wait(root, 15, "pebble's management API"))
    except BaseException:
        edge.stop()
        for p in procs:
            p.kill()
            p.wait(10)
        raise
    api = httpx.Client(
        base_url=edge.ready["api_url"],
        headers={"Authorization": "Bearer test-api-key", "Ngrok-Version": "2"},
        timeout=20,
    )
    return Env(edge, d / "pebble-root.pem", procs, api, d / "edge", acme_flags, f"http://127.0.0.1:{cts_port}")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = _start_env(tmp_path_factory.mktemp("acme"))
    yield e
    e.close()


@pytest.fixture(scope="module")
def http01_env(tmp_path_factory):
    e = _start_env(tmp_path_factory.mktemp("acme-http01"), "--acme-challenges", "http-01")
    yield e
    e.close()


def _agent(env: Env, home: Path, *args: str, authtoken: str = "test-authtoken",
           server: str | None = None, root_cas: str | None = None) -> BurrowProc:
    """Start ``burrow <args>`` against the env's edge (not waiting for it to be ready)."""
    home.mkdir(parents=True)
    return BurrowProc(
        [
            *args,
            "--server-addr", server or env.edge.ready["ingress_addr"],
            "--root-cas", root_cas or env.edge.ready["ca_file"],
            "--authtoken", authtoken,
            "--web-addr", "127.0.0.1:0",
            "--json",
        ],
        env={"XDG_DATA_HOME": str(home), "BURROW_DATA_DIR": str(home / "burrow")},
    )


@pytest.fixture
def agents(env, tmp_path):
    """Factory: start agents; ``wait=False`` leaves waiting for ``ready`` to the caller."""
    started: list[BurrowProc] = []

    def make(*args: str, wait: bool = True, **kw) -> BurrowProc:
        proc = _agent(env, tmp_path / f"home{len(started)}", *args, **kw)
        started.append(proc)
        if wait:
            proc.ready = proc.wait_event("ready", READY_TIMEOUT)
        return proc

    yield make
    for p in started:
        p.stop()


class _Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"GET {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def shop(env, tmp_path_factory):
    """https://shop.burrow.localhost, online for the whole module (its certificate renews)."""
    up = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    a = _agent(env, tmp_path_factory.mktemp("shop") / "home", "http", str(up.server_address[1]),
               "--url", "https://shop.burrow.localhost")
    try:
        a.ready = a.wait_event("ready", READY_TIMEOUT)
        assert host_of(a.public_url) == "shop.burrow.localhost"
        yield "shop.burrow.localhost"
    finally:
        a.stop()
        up.shutdown()
        up.server_close()


def _acme_failures(edge: BurrowProc) -> float:
    r = httpx.get(edge.ready["api_url"] + "/metrics", timeout=10)
    assert r.status_code == 200, r.text
    return sum(
        s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
        if s.name == "burrow_acme_failures_total"
    )


def _events(edge: BurrowProc, event: str, name: str) -> list[dict]:
    """Every ``event`` for ``name`` the edge printed so far (without waiting)."""
    while True:
        try:
            edge.seen.append(edge.events.get_nowait())
        except queue.Empty:
            break
    return [e for e in edge.seen if e.get("event") == event and e.get("name") == name]


async def _tls_get(port: int, sni: str, ctx: ssl.SSLContext, path: str = "/") -> tuple[bytes, x509.Certificate]:
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni), 15)
    leaf = x509.load_der_x509_certificate(w.get_extra_info("ssl_object").getpeercert(binary_form=True))
    w.write(f"GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(r.read(), 10)
    w.close()
    return data, leaf


async def _peer_cert(port: int, sni: str) -> x509.Certificate:
    """The certificate presented for ``sni`` (not verified)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni), 15)
    der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
    w.close()
    return x509.load_der_x509_certificate(der)


def _pebble_ctx(env: Env) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(env.root))


def _issuer(cert: x509.Certificate) -> str:
    return cert.issuer.rfc4514_string()


async def test_agent_endpoint_gets_a_certificate_on_first_handshake(env, shop):
    # the first handshake waits for the order; the certificate verifies with pebble's root only
    data, leaf = await _tls_get(env.https_port, shop, _pebble_ctx(env), "/acme")
    assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"GET /acme\n")
    assert "Pebble" in _issuer(leaf)
    ev = _wait(lambda: _events(env.edge, "certificate_obtained", shop), 5, "the event")[0]
    assert ev["renewal"] is False
    assert ev["challenges"] == ["tls-alpn-01"]  # pebble reached the https listener (RFC 8737)
    stored = Path(env.edge.ready["data_dir"]) / "acme" / "certs" / f"{shop}.json"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert (stored.parent.stat().st_mode & 0o777) == 0o700
    accounts = list((Path(env.edge.ready["data_dir"]) / "acme").glob("account-*.json"))
    assert len(accounts) == 1 and accounts[0].stat().st_mode & 0o777 == 0o600
    # the edge's own CA does not verify it: it really is pebble's
    with pytest.raises(ssl.SSLCertVerificationError):
        await _tls_get(env.https_port, shop, ssl.create_default_context(cafile=env.edge.ready["ca_file"]))


async def test_name_nobody_holds_gets_no_acme_certificate(env):
    leaf = await _peer_cert(env.https_port, "nobody.burrow.localhost")
    # the local CA's certificate, and no order was placed for the name
    assert "burrow local CA" in _issuer(leaf)
    with pytest.raises(ssl.SSLCertVerificationError):
        await _tls_get(env.https_port, "nobody.burrow.localhost", _pebble_ctx(env))
    certs = Path(env.edge.ready["data_dir"]) / "acme" / "certs"
    assert not (certs / "nobody.burrow.localhost.json").exists()
    assert all(e.get("name") != "nobody.burrow.localhost" for e in env.edge.seen)


async def test_failed_order_falls_back_to_the_local_ca_and_backs_off(env, agents):
    name = "unreachable.burrow.localhost"
    # pebble's DNS sends the name to an address where nothing listens: validation fails
    r = httpx.post(f"{env.dns_api}/add-a", json={"host": name, "addresses": ["127.0.0.2"]})
    assert r.status_code == 200
    async with HTTPUpstream() as up:
        agents("http", str(up.port), "--url", f"https://{name}")
        leaf = await _peer_cert(env.https_port, name)
        assert "burrow local CA" in _issuer(leaf)  # the handshake still completes
        ev = _wait(lambda: _events(env.edge, "certificate_failed", name), 10, "the failure event")[0]
        assert "validation failed" in ev["error"] and name in ev["error"]
        _wait(lambda: f"acme: no certificate for {name}: validation failed" in env.edge.stderr, 5, "the log line")
        # within the backoff the next handshake gets the local CA's certificate without a new order
        assert "burrow local CA" in _issuer(await _peer_cert(env.https_port, name))
        assert len(_events(env.edge, "certificate_failed", name)) == 1
        assert _acme_failures(env.edge) >= 1  # and Prometheus sees it


async def test_on_demand_issuance_is_rate_limited_per_account(env, agents):
    other = add_account(env.edge, "ratelimited")
    other.raw.http.close()
    names = [f"r{i}.burrow.localhost" for i in range(RATE + 1)]
    async with HTTPUpstream() as up:
        procs = [agents("http", str(up.port), "--url", f"https://{n}", authtoken=other.authtoken, wait=False) for n in names]
        for proc in procs:
            proc.ready = proc.wait_event("ready", READY_TIMEOUT)
        issuers = [_issuer(await _peer_cert(env.https_port, name)) for name in names]
    assert ["Pebble" in i for i in issuers] == [True] * RATE + [False]
    assert "burrow local CA" in issuers[-1]
    warning = f"over its rate of {RATE} new certificates per hour; {names[-1]} gets the local CA's"
    _wait(lambda: warning in env.edge.stderr, 5, "the rate warning in the edge's log")


async def test_agent_ingress_certificate_status_and_agent_with_pebble_root_only(env, agents):
    domain = "connect.example.localhost"
    r = env.api.post(
        "/agent_ingresses",
        json={"domain": domain, "certificate_management_policy": {"authority": "letsencrypt", "private_key_type": "rsa"}},
    )
    assert r.status_code == 201, r.text
    ing = r.json()
    status = ing["certificate_management_status"]
    assert status["renews_at"] is None
    assert status["provisioning_job"]["msg"] == "Managed certificate provisioning in progress."
    assert status["provisioning_job"]["error_code"] is None

    def ready():
        body = env.api.get(f"/agent_ingresses/{ing['id']}").json()
        return body if body["certificate_management_status"]["renews_at"] else None

    body = _wait(ready, 30, "the agent ingress certificate")
    assert body["certificate_management_status"]["provisioning_job"] is None
    # the ingress port presents it for the ingress's names; renews_at is at two thirds
    region_name = f"tunnel.local.{domain}"
    assert body["region_domains"] == [region_name]
    leaf = await _peer_cert(env.ingress_port, region_name)
    assert "Pebble" in _issuer(leaf)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert set(sans) == {region_name, domain}
    assert leaf.public_key().key_size == 2048  # the policy's rsa key
    renews_at = dt.datetime.fromisoformat(body["certificate_management_status"]["renews_at"].replace("Z", "+00:00"))
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    expected = leaf.not_valid_before_utc + lifetime * 2 / 3
    if renews_at != expected.replace(microsecond=0):  # renewed in between: a newer certificate
        assert renews_at > expected
    # an agent that trusts pebble's root only connects through the ingress name
    async with HTTPUpstream() as up:
        a = agents(
            "http", str(up.port), "--url", "http://via-ingress.burrow.localhost",
            server=f"{region_name}:{env.ingress_port}", root_cas=str(env.root),
        )
        http = env.edge.ready["http_url"]
        async with httpx.AsyncClient() as c:
            resp = await c.get(f"{http}/hello", headers={"Host": host_of(a.public_url)})
        assert resp.status_code == 200 and resp.text == "GET /hello\n"
    # and without pebble's root (the edge's CA only) the agent cannot verify the ingress port
    strict = ssl.create_default_context(cafile=env.edge.ready["ca_file"])
    with pytest.raises(ssl.SSLCertVerificationError):
        await _tls_get(env.ingress_port, region_name, strict)
    # turning the policy off forgets the certificate
    r = env.api.patch(f"/agent_ingresses/{ing['id']}", json={"certificate_management_policy": None})
    assert r.status_code == 200 and r.json()["certificate_management_status"] is None
    assert "burrow local CA" in _issuer(await _peer_cert(env.ingress_port, region_name))


def test_agent_ingress_order_failure_is_reported_with_its_retry(env):
    domain = "broken.example.localhost"
    for name in (domain, f"tunnel.local.{domain}"):
        r = httpx.post(f"{env.dns_api}/add-a", json={"host": name, "addresses": ["127.0.0.2"]})
        assert r.status_code == 200
    r = env.api.post(
        "/agent_ingresses",
        json={"domain": domain, "certificate_management_policy": {"private_key_type": "ecdsa"}},
    )
    assert r.status_code == 201, r.text
    ing_id = r.json()["id"]

    def failed():
        status = env.api.get(f"/agent_ingresses/{ing_id}").json()["certificate_management_status"]
        return status if status["provisioning_job"]["error_code"] else None

    status = _wait(failed, 20, "the failed provisioning job")
    job = status["provisioning_job"]
    assert status["renews_at"] is None
    assert job["error_code"] == "ERR_ACME_ORDER_FAILED" and "validation failed" in job["msg"]
    started = dt.datetime.fromisoformat(job["started_at"].replace("Z", "+00:00"))
    retries = dt.datetime.fromisoformat(job["retries_at"].replace("Z", "+00:00"))
    assert retries - started == dt.timedelta(seconds=10)  # the first backoff step
    assert env.api.delete(f"/agent_ingresses/{ing_id}").status_code == 204


async def test_cloud_endpoint_certificate_over_http01(http01_env):
    env = http01_env
    r = env.api.post(
        "/endpoints",
        json={"url": "https://cloud.example.localhost", "type": "cloud", "traffic_policy": json.dumps(_HELLO)},
    )
    assert r.status_code == 201, r.text
    data, leaf = await _tls_get(env.https_port, "cloud.example.localhost", _pebble_ctx(env))
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"from the cloud")
    assert "Pebble" in _issuer(leaf)
    # this edge answers http-01 only: pebble fetched the token from its http listener


def test_acme_flags_are_checked(tmp_path):
    def conf(*flags: str):
        args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path), *flags])
        return serveconfig.load(vars(args), None)

    def check(*flags: str) -> str:
        with pytest.raises(CLIError) as exc:
            _acme_options(conf(*flags))
        return str(exc.value)

    assert "--acme-email needs --acme-directory" in check("--acme-email", "ops@example.com")
    assert "expected an https:// URL" in check("--acme-directory", "ftp://ca.example/dir")
    assert "expected tls-alpn-01 and/or http-01" in check(
        "--acme-directory", "https://ca.example/dir", "--acme-challenges", "dns-01"
    )
    assert "no such file" in check("--acme-directory", "https://ca.example/dir", "--acme-ca-root", str(tmp_path / "x.pem"))
    assert "expected an address" in check("--acme-directory", "https://ca.example/dir", "--acme-email", "nobody")
    ok = _acme_options(conf("--acme-directory", "https://ca.example/dir"))
    assert ok["acme_directory"] == "https://ca.example/dir" and ok["acme_challenges"] == ("tls-alpn-01", "http-01")


async def test_certificate_renews_at_two_thirds_of_its_lifetime(env, shop):
    """Last in the module, so that most of the wait has passed during the other tests."""
    await _peer_cert(env.https_port, shop)  # obtained (if this test runs alone)
    first = _wait(lambda: _events(env.edge, "certificate_obtained", shop), 10, "the first certificate")[0]
    renewal = _wait(
        lambda: [e for e in _events(env.edge, "certificate_obtained", shop) if e["renewal"]],
        3 * VALIDITY, f"the renewal of {shop}",
    )[0]
    renews_at = dt.datetime.fromisoformat(first["renews_at"])
    assert dt.datetime.fromisoformat(renewal["renews_at"]) > renews_at
    data, new = await _tls_get(env.https_port, shop, _pebble_ctx(env), "/again")
    assert data.endswith(b"GET /again\n")
    # the renewed certificate (or a later one) is served; it was ordered only after two
    # thirds of the first one's lifetime (1 s of clock slack)
    assert new.not_valid_before_utc >= renews_at - dt.timedelta(seconds=1)
    assert "Pebble" in _issuer(new)


async def test_certificates_and_account_survive_a_restart(env, shop):
    """Last: restarts the module's edge.  A fresh certificate is served from the data dir
    after the restart, without a new order, and the account key is the same."""
    acme_dir = Path(env.edge.ready["data_dir"]) / "acme"
    account = sorted(acme_dir.glob("account-*.json"))
    await _peer_cert(env.https_port, shop)
    seen = len(_events(env.edge, "certificate_obtained", shop))
    # restart right after an order, so the certificate outlives the restart with room to spare
    _wait(lambda: len(_events(env.edge, "certificate_obtained", shop)) > seen, 3 * VALIDITY, "a new certificate")
    before = await _peer_cert(env.https_port, shop)
    env.restart_edge()
    after = await _peer_cert(env.https_port, shop)
    assert after.serial_number == before.serial_number and "Pebble" in _issuer(after)
    assert sorted(acme_dir.glob("account-*.json")) == account
    # the restarted edge orders with the same account (the CA finds it by its key)
    env.api.close()
    env.api = httpx.Client(base_url=env.edge.ready["api_url"], headers=dict(env.api.headers), timeout=20)
    r = env.api.post("/endpoints", json={"url": "https://restarted.example.localhost", "type": "cloud", "traffic_policy": json.dumps(_HELLO)})
    assert r.status_code == 201, r.text
    data, leaf = await _tls_get(env.https_port, "restarted.example.localhost", _pebble_ctx(env))
    assert data.endswith(b"from the cloud") and "Pebble" in _issuer(leaf)
    assert sorted(acme_dir.glob("account-*.json")) == account
