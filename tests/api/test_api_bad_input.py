"""Bad input gets a 4xx in ngrok's error format, never a 5xx; auth, version and rate limits."""

from __future__ import annotations

import socket

import httpx
import ngrok
import pytest

from tests.api.conftest import POLICY_JSON, Raw, add_account, client_for
from tests.procs import READY_TIMEOUT, BurrowProc, edge_args

CREATES = ["/endpoints", "/agent_ingresses", "/credentials", "/api_keys"]
ID_PATHS = {
    "/endpoints": "ep",
    "/agent_ingresses": "agin",
    "/tunnel_sessions": "ts",
    "/credentials": "cr",
    "/api_keys": "ak",
    "/reserved_domains": "rd",
    "/tunnels": "tn",
}


def assert_ngrok_error(
    r: httpx.Response, status: int | None = None, code: str | None = None
) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if status is not None:
        assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error_code", "status_code", "msg", "details"}
    assert body["status_code"] == r.status_code
    assert body["error_code"].startswith("ERR_NGROK_") and body["msg"]
    assert body["details"]["operation_id"].startswith("op_")
    if code is not None:
        assert body["error_code"] == code, body
    return body


# --------------------------------------------------------------------- auth, version
@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "ERR_NGROK_200"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 401, "ERR_NGROK_201"),
        ({"Authorization": "Bearer"}, 401, "ERR_NGROK_201"),
        ({"Authorization": "Bearer not-a-key"}, 401, "ERR_NGROK_202"),
        ({"Authorization": "Bearer test-authtoken"}, 401, "ERR_NGROK_206"),
    ],
)
def test_auth_errors(raw, headers, status, code):
    r = raw.get("/endpoints", headers=headers, auth=False)
    assert_ngrok_error(r, status, code)


def test_version_header(raw):
    r = raw.http.get("/endpoints", headers={"Authorization": "Bearer test-api-key"})
    assert_ngrok_error(r, 400, "ERR_NGROK_218")
    r = raw.get("/endpoints", headers={"Ngrok-Version": "1"})
    assert_ngrok_error(r, 400, "ERR_NGROK_217")


def test_unknown_paths_and_methods(raw):
    assert_ngrok_error(raw.get("/nowhere"), 404, "ERR_NGROK_404")
    assert_ngrok_error(raw.request("PUT", "/endpoints"), 405)
    assert_ngrok_error(raw.request("POST", "/reserved_domains", json={}), 405)


# ------------------------------------------------------------------------- bodies
BROKEN = [
    b"{",
    b"{'a': 1}",
    b'{"a": }',
    b"\xff\xfe\x00",
    b"[1, 2]",
    b'"text"',
    b"null",
    b"1e999999",
    b"[" * 100_000,
]


def test_broken_json(raw, api):
    ing = api.agent_ingresses.create(domain="b.example.com")
    ep = api.endpoints.create(url="https://b.example.com", type="cloud", traffic_policy=POLICY_JSON)
    targets = [("POST", p) for p in CREATES] + [
        ("PATCH", f"/agent_ingresses/{ing.id}"),
        ("PATCH", f"/endpoints/{ep.id}"),
    ]
    for method, path in targets:
        for body in BROKEN:
            r = raw.request(
                method, path, content=body, headers={"Content-Type": "application/json"}
            )
            err = assert_ngrok_error(r, 400)
            assert err["error_code"] == "ERR_NGROK_213", (path, body[:20], err)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/endpoints", {"url": 1, "traffic_policy": POLICY_JSON}, "url"),
        (
            "/endpoints",
            {"url": "https://a.example.com", "traffic_policy": {"on_http_request": []}},
            "traffic_policy",
        ),
        (
            "/endpoints",
            {"url": "https://a.example.com", "traffic_policy": POLICY_JSON, "bindings": "public"},
            "bindings",
        ),
        (
            "/endpoints",
            {"url": "https://a.example.com", "traffic_policy": POLICY_JSON, "bindings": [1]},
            "bindings[0]",
        ),
        (
            "/endpoints",
            {
                "url": "https://a.example.com",
                "traffic_policy": POLICY_JSON,
                "pooling_enabled": "yes",
            },
            "pooling_enabled",
        ),
        (
            "/endpoints",
            {"url": "https://a.example.com", "traffic_policy": POLICY_JSON, "description": 5},
            "description",
        ),
        ("/agent_ingresses", {"domain": None}, "domain"),
        ("/agent_ingresses", {"domain": ["a.example.com"]}, "domain"),
        (
            "/agent_ingresses",
            {"domain": "a.example.com", "certificate_management_policy": "rsa"},
            "certificate_management_policy",
        ),
        ("/agent_ingresses", {"domain": "a.example.com", "metadata": {"k": "v"}}, "metadata"),
        ("/credentials", {"acl": "bind:x"}, "acl"),
        ("/credentials", {"description": True}, "description"),
        ("/api_keys", {"metadata": 3.5}, "metadata"),
    ],
)
def test_wrong_types(raw, path, body, field):
    err = assert_ngrok_error(raw.post(path, json=body), 400, "ERR_NGROK_215")
    assert repr(field) in err["msg"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "/endpoints",
            {"url": "https://a.example.com", "traffic_policy": POLICY_JSON, "region": "eu"},
            "region",
        ),
        ("/agent_ingresses", {"domain": "a.example.com", "ns_targets": []}, "ns_targets"),
        (
            "/agent_ingresses",
            {"domain": "a.example.com", "certificate_management_policy": {"key_type": "rsa"}},
            "certificate_management_policy.key_type",
        ),
        ("/credentials", {"token": "mine"}, "token"),
        ("/api_keys", {"secret": 1}, "secret"),
    ],
)
def test_unknown_fields(raw, path, body, field):
    err = assert_ngrok_error(raw.post(path, json=body), 400, "ERR_NGROK_214")
    assert repr(field) in err["msg"]


def test_unknown_fields_on_update(raw, api):
    ing = api.agent_ingresses.create(domain="u.example.com")
    ep = api.endpoints.create(url="https://u.example.com", type="cloud", traffic_policy=POLICY_JSON)
    assert_ngrok_error(
        raw.patch(f"/agent_ingresses/{ing.id}", json={"bogus": 1}), 400, "ERR_NGROK_214"
    )
    assert_ngrok_error(
        raw.patch(f"/endpoints/{ep.id}", json={"type": "cloud"}), 400, "ERR_NGROK_214"
    )
    assert_ngrok_error(
        raw.patch(f"/endpoints/{ep.id}", json={"pooling_enabled": 1}), 400, "ERR_NGROK_215"
    )


def test_content_type(raw):
    r = raw.post("/api_keys", content=b'{"description": "x"}')
    assert_ngrok_error(r, 400, "ERR_NGROK_216")
    r = raw.post(
        "/api_keys", content=b'{"description": "x"}', headers={"Content-Type": "text/plain"}
    )
    assert_ngrok_error(r, code="ERR_NGROK_210")
    r = raw.post(
        "/api_keys",
        content=b'{"description": "x"}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 201


def test_one_megabyte_bodies(raw):
    mb = 1000 * 1000
    # valid JSON with a 1 MB string: too long for the field
    err = assert_ngrok_error(
        raw.post("/agent_ingresses", json={"domain": "a.example.com", "description": "d" * mb}),
        400,
        "ERR_NGROK_215",
    )
    assert "description" in err["msg"]
    assert_ngrok_error(
        raw.post("/endpoints", json={"url": "https://a.example.com", "traffic_policy": "x" * mb}),
        400,
        "ERR_NGROK_215",
    )
    # 1 MB of junk
    assert_ngrok_error(
        raw.post("/endpoints", content=b"\x00" * mb, headers={"Content-Type": "application/json"}),
        400,
        "ERR_NGROK_213",
    )
    # over the 1 MiB cap: refused without parsing, and the connection stays usable
    for size in (1024 * 1024 + 1, 5 * 1024 * 1024):
        assert_ngrok_error(
            raw.post(
                "/endpoints", content=b"{" * size, headers={"Content-Type": "application/json"}
            ),
            413,
        )
    assert raw.get("/endpoints").status_code == 200


def test_chunked_body_is_refused(raw):
    def gen():
        yield b'{"description":'
        yield b' "x"}'

    r = raw.post("/api_keys", content=gen(), headers={"Content-Type": "application/json"})
    assert_ngrok_error(r, 413)


ODD_IDS = [
    "x",
    "ep_",
    "...",
    "%2e%2e%2f%2e%2e",
    "%00",
    "%ff%fe",
    "%E2%98%83",
    "agin_" + "!" * 27,
    "a" * 10_000,
    "ep_" + "0" * 28,
    "' OR 1=1 --",
]


def test_odd_ids(raw):
    for path in ID_PATHS:
        for odd in ODD_IDS:
            for method in ("GET", "PATCH", "DELETE", "POST"):
                suffix = "/stop" if method == "POST" else ""
                r = raw.request(
                    method, f"{path}/{odd}{suffix}", json={} if method == "PATCH" else None
                )
                assert_ngrok_error(r)


def test_well_formed_unknown_ids_are_404(raw):
    for path, prefix in ID_PATHS.items():
        r = raw.get(f"{path}/{prefix}_{'0' * 27}")
        assert_ngrok_error(r, 404, "ERR_NGROK_404")
        r = raw.get(f"{path}/zz_{'0' * 27}")  # right shape, wrong kind: missing all the same
        assert_ngrok_error(r, 404, "ERR_NGROK_404")
        r = raw.get(f"{path}/{prefix}_unknown")  # malformed: ngrok answers 404 too
        assert_ngrok_error(r, 404, "ERR_NGROK_404")


BAD_QUERIES = [
    ("limit=abc", "ERR_NGROK_215"),
    ("limit=0", "ERR_NGROK_215"),
    ("limit=-5", "ERR_NGROK_215"),
    ("limit=1.5", "ERR_NGROK_215"),
    ("limit=101", "ERR_NGROK_215"),
    ("limit=99999999999999999999", "ERR_NGROK_215"),
    ("colour=blue", "ERR_NGROK_214"),
    ("filter=obj.id%20%3D%3D", "ERR_NGROK_215"),  # not CEL
    ("filter=obj.nosuch%20%3D%3D%201", "ERR_NGROK_215"),  # no such field
    ("filter=req.method%20%3D%3D%20%27GET%27", "ERR_NGROK_215"),  # unknown variable
]


def test_bad_query_parameters(raw):
    for path in ID_PATHS:
        for query, code in BAD_QUERIES:
            assert_ngrok_error(raw.get(f"{path}?{query}"), 400, code)


def test_odd_but_harmless_queries(raw):
    for path in ID_PATHS:
        assert raw.get(f"{path}?before_id=%00%ff").status_code == 200
        assert raw.get(f"{path}?limit=").status_code == 200


def test_tunnel_session_action_without_body_or_length(edge, raw):
    """The official client's POST: no body, no Content-Type (here not even Content-Length)."""
    host, port = edge.ready["api_url"].split("://", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            f"POST /tunnel_sessions/ts_{'0' * 27}/stop HTTP/1.1\r\nHost: {host}\r\n"
            "Authorization: Bearer test-api-key\r\nNgrok-Version: 2\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 404 ") and b"ERR_NGROK_404" in data


# --------------------------------------------------------------------- rate limit
@pytest.fixture
def limited_edge(tmp_path):
    proc = BurrowProc([*edge_args(tmp_path / "edge"), "--api-rate-limit", "5"])
    proc.ready = proc.wait_event("ready", READY_TIMEOUT)
    yield proc
    proc.stop()


def test_rate_limit(limited_edge):
    raw = Raw(limited_edge)
    for _ in range(5):
        assert raw.get("/endpoints").status_code == 200
    r = raw.get("/endpoints")
    assert_ngrok_error(r, 429, "ERR_NGROK_226")
    assert int(r.headers["retry-after"]) >= 1
    # another account has its own bucket; the official client sees ngrok.Error
    other = add_account(limited_edge, "other")
    assert other.raw.get("/endpoints").status_code == 200
    with pytest.raises(ngrok.Error) as exc:
        client_for(limited_edge).api_keys.list()
    assert exc.value.error_code == "ERR_NGROK_226" and exc.value.http_status_code == 429
