"""``burrow serve --config serve.yml``: every flag as a key, env overrides, one-line errors."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
import yaml

from backend import serveconfig
from backend.cli import build_parser
from tests.procs import READY_TIMEOUT, BurrowProc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["serve"]


#: a value for every setting, none of them the default
EVERY_KEY = {
    "data_dir": "/srv/burrow",
    "api_addr": "127.0.0.1:14041",
    "ingress_addr": "127.0.0.1:14042",
    "http_addr": "127.0.0.1:14080",
    "https_addr": "127.0.0.1:14443",
    "tcp_ports": "31000-31099",
    "tcp_host": "tcp.example.com",
    "domain": "tunnels.example.com",
    "api_key": ["key-one", "key-two"],
    "authtoken": "token-one",
    "allow_remote": True,
    "api_rate_limit": 60,
    "api_auth_fail_limit": 5,
    "api_public_url": "https://api.example.com/",
    "api_read_timeout": 3.5,
    "max_sessions_per_authtoken": 3,
    "max_endpoints_per_account": 20,
    "max_tcp_ports_per_account": 4,
    "max_data_conns_per_session": 50,
    "policy_eval_budget": 0.25,
    "body_timeout": 30,
    "send_timeout": 31,
    "max_conns": 500,
    "max_conns_per_ip": 16,
    "max_handshakes": 64,
    "max_handshakes_per_ip": 8,
    "first_byte_timeout": 2,
    "handshake_timeout": 4,
    "admin_key": "an-admin-key-of-32-characters-xx",
    "metrics_public": True,
    "log_format": "logfmt",
    "log_level": "debug",
    "acme_directory": "https://acme.example.com/directory",
    "acme_email": "ops@example.com",
    "acme_ca_root": "/srv/burrow/acme-root.pem",
    "acme_rate_limit": 5,
    "acme_challenges": "http-01",
    "store": "postgresql://burrow@db.example.com/burrow",
    "node_id": "edge-a",
    "peer_addr": "10.0.0.5:4043",
    "advertise_addr": "edge-a.example.com:4042",
    "peer_tls": "on",
}
EXPECTED = {
    **EVERY_KEY,
    "data_dir": Path("/srv/burrow"),
    "acme_ca_root": Path("/srv/burrow/acme-root.pem"),
    "tcp_ports": (31000, 31099),
    "api_key": ["key-one", "key-two"],
    "authtoken": ["token-one"],
    "api_public_url": "https://api.example.com",
}


@pytest.fixture
def clean_env(monkeypatch):
    """No BURROW_* setting from the environment running the tests."""
    import os

    for name in list(os.environ):
        if name.upper().startswith(serveconfig.ENV_PREFIX) and name[7:].lower() in serveconfig.ServeSettings.model_fields:
            monkeypatch.delenv(name)
    return monkeypatch


def test_every_serve_flag_is_a_key_and_back():
    flags = {a.dest for a in _serve_parser()._actions if a.dest != "help"}
    assert flags - serveconfig.PROCESS_FLAGS == set(serveconfig.ServeSettings.model_fields)
    assert set(EVERY_KEY) == set(serveconfig.ServeSettings.model_fields)


def test_a_file_sets_every_key(tmp_path, clean_env):
    path = tmp_path / "serve.yml"
    path.write_text(yaml.safe_dump(EVERY_KEY))
    conf = serveconfig.load({}, path)
    got = {k: getattr(conf, k) for k in EVERY_KEY}
    assert got == EXPECTED
    defaults = serveconfig.load({}, None)
    assert all(getattr(defaults, k) != v for k, v in EXPECTED.items())


def test_precedence_flag_env_file_default(tmp_path, clean_env):
    path = tmp_path / "serve.yml"
    path.write_text("domain: file.example\nmax_conns: 7\nauthtoken: [from-file]\n")
    assert serveconfig.load({}, path).domain == "file.example"
    clean_env.setenv("BURROW_DOMAIN", "env.example")
    clean_env.setenv("BURROW_AUTHTOKEN", "env-a,env-b")
    clean_env.setenv("BURROW_TCP_PORTS", "31000-31010")
    conf = serveconfig.load({}, path)
    assert (conf.domain, conf.max_conns, conf.authtoken) == ("env.example", 7, ["env-a", "env-b"])
    assert conf.tcp_ports == (31000, 31010)
    clean_env.setenv("BURROW_TCP_PORTS", "[31000, 31020]")
    assert serveconfig.load({}, path).tcp_ports == (31000, 31020)
    args = _serve_parser().parse_args(["--domain", "flag.example", "--max-handshakes", "9"])
    conf = serveconfig.load(vars(args), path)
    assert (conf.domain, conf.max_conns, conf.max_handshakes) == ("flag.example", 7, 9)
    assert conf.http_addr == "127.0.0.1:4080"  # nobody set it: the default


def test_serve_starts_from_a_file_and_answers_on_its_ports(tmp_path, clean_env):
    api, ingress, http = free_port(), free_port(), free_port()
    conf = {
        "data_dir": str(tmp_path / "data"),
        "api_addr": f"127.0.0.1:{api}",
        "ingress_addr": f"127.0.0.1:{ingress}",
        "http_addr": f"127.0.0.1:{http}",
        "https_addr": "off",
        "domain": "file.example",
        "api_key": "file-api-key",
        "authtoken": ["file-authtoken"],
        "log_format": "json",
    }
    path = tmp_path / "serve.yml"
    path.write_text(yaml.safe_dump(conf))
    # the environment beats the file, a flag beats both
    env = {"BURROW_DOMAIN": "env.example", "BURROW_MAX_CONNS": "5"}
    proc = BurrowProc(["serve", "--config", str(path), "--json", "--http-addr", "127.0.0.1:0"], env=env)
    try:
        ready = proc.wait_event("ready", READY_TIMEOUT)
        assert ready["api_url"] == f"http://127.0.0.1:{api}"
        assert ready["ingress_addr"] == f"127.0.0.1:{ingress}"
        assert ready["http_url"] != f"http://127.0.0.1:{http}"  # the flag's port 0 won
        assert ready["https_url"] is None
        assert ready["domain"] == "env.example"
        assert ready["data_dir"] == conf["data_dir"]
        h = {"Authorization": "Bearer file-api-key", "Ngrok-Version": "2"}
        r = httpx.get(f"http://127.0.0.1:{api}/credentials", headers=h, timeout=10)
        assert r.status_code == 200
        assert [c["description"] for c in r.json()["credentials"]] == ["from the command line"]
        with socket.create_connection(("127.0.0.1", ingress), timeout=5):
            pass
        # the public http listener answers with burrow's page for an unknown host
        r = httpx.get(ready["http_url"] + "/", headers={"Host": "nobody.env.example"}, timeout=10)
        assert r.status_code == 404
    finally:
        assert proc.stop() == 0
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "text, words",
    [
        ("api_addr: 127.0.0.1:0\nmax_connz: 5\n", "unknown key 'max_connz' (did you mean 'max_conns'?)"),
        ("max_conns: lots\n", "max_conns: Input should be a valid integer"),
        ("http_addr: 'nope:xx'\n", "http_addr: invalid port"),
        ("tcp_ports: 9-1\n", "tcp_ports: invalid port range 9-1"),
        ("log_format: xml\n", "log_format:"),
        ("- a list\n", "expected a mapping of settings"),
        ("a: [\n", "not valid YAML at line 2"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_key_and_exit_2(tmp_path, text, words):
    path = tmp_path / "serve.yml"
    path.write_text(text)
    p = BurrowProc(["serve", "--config", str(path), "--data-dir", str(tmp_path / "d")])
    assert p.wait_exit() == 2
    err = p.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"burrow serve: error: {path}: ") and words in err, err
    assert not (tmp_path / "d").exists()  # nothing started


def test_a_bad_env_value_names_the_variable(tmp_path):
    p = BurrowProc(["serve", "--data-dir", str(tmp_path / "d")], env={"BURROW_MAX_CONNS_PER_IP": "-3"})
    assert p.wait_exit() == 2
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and "BURROW_MAX_CONNS_PER_IP: Input should be greater than or equal to 0" in err, err


def test_a_missing_file_is_one_line(tmp_path):
    p = BurrowProc(["serve", "--config", str(tmp_path / "nope.yml")])
    assert p.wait_exit() == 2
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and "nope.yml: No such file or directory" in err, err


def test_a_readable_file_with_secrets_gets_a_warning(tmp_path):
    path = tmp_path / "serve.yml"
    path.write_text("admin_key: a-long-enough-admin-key-123\n")
    path.chmod(0o644)
    assert "admin_key" in serveconfig.exposed_secrets(path) and "chmod 600" in serveconfig.exposed_secrets(path)
    path.chmod(0o600)
    assert serveconfig.exposed_secrets(path) is None
    path.write_text("domain: a.example\n")
    path.chmod(0o644)
    assert serveconfig.exposed_secrets(path) is None


def test_store_takes_a_postgresql_url_or_a_path_and_never_echoes_it(clean_env, tmp_path):
    assert serveconfig.load({"store": "postgresql://u:pw@db/burrow"}).store == "postgresql://u:pw@db/burrow"
    assert serveconfig.load({"store": "sqlite:///x.db"}).store == "sqlite:///x.db"
    assert serveconfig.load({}).store is None
    with pytest.raises(serveconfig.ServeConfigError) as exc:
        serveconfig.load({"store": "mysql://u:s3cret@db/burrow"})
    assert "postgresql://" in str(exc.value) and "s3cret" not in str(exc.value)
    path = tmp_path / "serve.yml"
    path.write_text("store: postgresql://u:s3cret@db/burrow\n")
    path.chmod(0o644)
    assert "store" in (serveconfig.exposed_secrets(path) or "")
    path.write_text("store: postgresql://u@db/burrow\n")
    assert serveconfig.exposed_secrets(path) is None
