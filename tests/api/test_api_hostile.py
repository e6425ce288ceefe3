"""The cloud API against hostile clients (issue 12, items 4, 14 and 16), over real sockets.

Per-account rate limits that extra keys cannot bypass, throttled key guessing, answers
(not dropped connections) for huge heads, stalled bodies and a broken database, and
absolute URLs that come from configuration, never from the request's Host header.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from backend.store import SQLiteStore
from tests.api.conftest import API_KEY, Raw, add_account
from tests.api.test_api_bad_input import assert_ngrok_error
from tests.procs import READY_TIMEOUT, BurrowProc, edge_args
from tests.upstreams import raw_request


def start(tmp_path: Path, *flags: str) -> BurrowProc:
    proc = BurrowProc([*edge_args(tmp_path / "edge"), *flags])
    proc.ready = proc.wait_event("ready", READY_TIMEOUT)
    return proc


@pytest.fixture
def procs():
    started: list[BurrowProc] = []
    yield started
    for p in started:
        p.stop()


def api_addr(edge: BurrowProc) -> tuple[str, int]:
    host, port = edge.ready["api_url"].split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


def error_body(got: bytes) -> dict:
    body = json.loads(got.split(b"\r\n\r\n", 1)[1])
    assert set(body) == {"error_code", "status_code", "msg", "details"}, body
    return body


def add_key(edge: BurrowProc, account_id: str, key: str) -> None:
    with SQLiteStore(Path(edge.ready["data_dir"]) / "burrow.db") as store:
        store.add_api_key(account_id, key, description="minted")


# ---------------------------------------------------------------- item 4: per account
def test_rate_limit_is_per_account_not_per_key(tmp_path, procs):
    edge = start(tmp_path, "--api-rate-limit", "5")
    procs.append(edge)
    with SQLiteStore(Path(edge.ready["data_dir"]) / "burrow.db") as store:
        owner = store.find_api_key(API_KEY).account_id
    add_key(edge, owner, "minted-2")
    add_key(edge, owner, "minted-3")
    keys = [Raw(edge, k) for k in (API_KEY, "minted-2", "minted-3")]
    ok = 0
    for _ in range(5):  # 15 requests over three keys of one account
        for raw in keys:
            r = raw.get("/endpoints")
            if r.status_code == 200:
                ok += 1
            else:
                body = assert_ngrok_error(r, 429, "ERR_NGROK_226")
                assert "account" in body["msg"]
                assert int(r.headers["retry-after"]) >= 1
    assert ok <= 5 + 1  # the bucket refills continuously: one more may fit in the run
    # another account has its own bucket
    other = add_account(edge, "other")
    assert other.raw.get("/endpoints").status_code == 200


# ------------------------------------------------------------- item 14: bad input, stalls
def test_huge_head_gets_431_without_traceback(edge):
    addr = api_addr(edge)
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
    head = b"GET /endpoints HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-api-key\r\n"
    for _ in range(3):
        got, closed = raw_request(addr, head + many + b"\r\n")
        assert closed and got.startswith(b"HTTP/1.1 431 "), got[:200]
        assert error_body(got)["status_code"] == 431
    assert Raw(edge).get("/endpoints").status_code == 200
    assert "Traceback" not in edge.stderr and "HTTPError" not in edge.stderr


def test_stalled_head_and_body_are_cut_off(tmp_path, procs):
    edge = start(tmp_path, "--api-read-timeout", "0.5")
    procs.append(edge)
    addr = api_addr(edge)
    auth = b"Host: x\r\nAuthorization: Bearer test-api-key\r\nNgrok-Version: 2\r\n"
    # Content-Length: 100 and no body: 408, then closed (not kept for 75 s)
    got, closed = raw_request(
        addr, b"POST /api_keys HTTP/1.1\r\n" + auth + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    assert closed and got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert error_body(got)["error_code"].startswith("ERR_NGROK_")
    # half a body
    got, closed = raw_request(
        addr, b"POST /api_keys HTTP/1.1\r\n" + auth + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"de"
    )
    assert closed and got.startswith(b"HTTP/1.1 408 "), got[:200]
    # a head that never ends
    got, closed = raw_request(addr, b"GET /endpoints HTTP/1.1\r\n" + auth)
    assert closed and got.startswith(b"HTTP/1.1 408 "), got[:200]
    # nothing was created, and the API still answers
    keys = Raw(edge).get("/api_keys").json()["keys"]
    assert len(keys) == 1
    assert "Traceback" not in edge.stderr


def test_database_failure_is_a_500_in_the_api_format(edge):
    raw = Raw(edge)
    assert raw.get("/endpoints").status_code == 200
    # break the store under the running edge: the database, its WAL and its index
    db = Path(edge.ready["data_dir"]) / "burrow.db"
    for suffix in ("", "-wal", "-shm"):
        f = Path(str(db) + suffix)
        if f.exists():
            size = f.stat().st_size
            with open(f, "r+b") as fh:
                fh.write(b"\xa5" * size)
    for key in ("test-api-key", "some-other-key"):
        r = Raw(edge, key).get("/endpoints")
        assert r.status_code == 500, r.text[:200]
        body = r.json()
        assert body["error_code"] == "ERR_NGROK_500" and body["status_code"] == 500
        assert body["details"]["operation_id"].startswith("op_")
    assert "Traceback" not in edge.stderr
    assert "some-other-key" not in edge.stderr and "test-api-key" not in edge.stderr


# ------------------------------------------------------------------ item 16: URIs, guessing
def test_uris_come_from_the_listen_address_not_the_host_header(edge):
    add_key(edge, _owner(edge), "second-key")
    raw = Raw(edge)
    base = edge.ready["api_url"]
    r = raw.get("/api_keys?limit=1", headers={"Host": "evil.example"})
    assert r.status_code == 200
    page = r.json()
    assert page["uri"] == f"{base}/api_keys"
    assert page["next_page_uri"].startswith(f"{base}/api_keys?")
    assert all(k["uri"].startswith(base + "/api_keys/") for k in page["keys"])
    assert "evil.example" not in r.text
    r = raw.get("/", headers={"Host": "evil.example"})
    assert r.json()["uri"] == base + "/"


def test_api_public_url_is_used_in_uris(tmp_path, procs):
    edge = start(tmp_path, "--api-public-url", "https://api.burrow.test/v2/")
    procs.append(edge)
    add_key(edge, _owner(edge), "second-key")
    page = Raw(edge).get("/api_keys?limit=1").json()
    assert page["uri"] == "https://api.burrow.test/v2/api_keys"
    assert page["next_page_uri"].startswith("https://api.burrow.test/v2/api_keys?")
    assert page["keys"][0]["uri"].startswith("https://api.burrow.test/v2/api_keys/ak_")


def test_failed_key_checks_are_throttled_per_client(tmp_path, procs):
    edge = start(tmp_path, "--api-auth-fail-limit", "10")
    procs.append(edge)
    good = Raw(edge)
    # valid keys never use up the failure budget
    for _ in range(30):
        assert good.get("/endpoints").status_code == 200
    codes: dict[int, int] = {}
    with httpx.Client(base_url=edge.ready["api_url"], timeout=10) as c:
        started = time.monotonic()
        for i in range(2000):
            r = c.get("/endpoints", headers={"Authorization": f"Bearer guess-{i}", "Ngrok-Version": "2"})
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if r.status_code == 429 and codes[429] == 1:
                body = assert_ngrok_error(r, 429, "ERR_NGROK_429")
                assert "failed authentication" in body["msg"]
                assert int(r.headers["retry-after"]) >= 1
            if time.monotonic() - started > 60:
                break
    assert set(codes) == {401, 429}, codes
    # a bucket of 10 that refills at 10 a minute: whatever time the run took, few got through
    elapsed_min = (time.monotonic() - started) / 60
    assert codes[401] <= 10 + 10 * elapsed_min + 1, codes
    assert "guess-" not in edge.stderr


def _owner(edge: BurrowProc) -> str:
    with SQLiteStore(Path(edge.ready["data_dir"]) / "burrow.db") as store:
        return store.find_api_key(API_KEY).account_id


def test_head_requests_get_no_body_and_keep_the_connection_in_sync(edge):
    """HEAD answers carry Content-Length but no body (RFC 9110 §9.3.2): a body would be
    read as the next response's status line by a keep-alive client."""
    addr = api_addr(edge)
    auth = f"Authorization: Bearer {API_KEY}\r\nNgrok-Version: 2\r\n"
    data = (
        f"HEAD /agent_ingresses/nope HTTP/1.1\r\nHost: x\r\n{auth}\r\n"
        f"HEAD /endpoints HTTP/1.1\r\nHost: x\r\n{auth}\r\n"
        f"GET /endpoints HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    ).encode()
    got, closed = raw_request(addr, data)
    assert closed
    heads = got.split(b"\r\n\r\n")
    assert heads[0].startswith(b"HTTP/1.1 40"), got[:300]
    assert heads[1].startswith(b"HTTP/1.1 "), got[:600]  # no JSON body in between
    assert heads[2].startswith(b"HTTP/1.1 200"), got[:900]
    assert json.loads(heads[3])["endpoints"] == []
