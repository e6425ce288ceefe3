"""Fixtures for cloud API tests: the official ngrok client, raw HTTP, a second account."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import ngrok
import pytest

from backend.store import SQLiteStore
from tests.procs import BurrowProc

API_KEY = "test-api-key"
AUTHTOKEN = "test-authtoken"


def client_for(edge: BurrowProc, api_key: str = API_KEY) -> ngrok.Client:
    return ngrok.Client(api_key, base_url=edge.ready["api_url"])


class Raw:
    """Plain HTTP to the cloud API, for what the official client cannot send."""

    def __init__(self, edge: BurrowProc, api_key: str = API_KEY) -> None:
        self.base = edge.ready["api_url"]
        self.api_key = api_key
        self.http = httpx.Client(base_url=self.base, timeout=20)

    def headers(self, extra: dict | None = None, auth: bool = True) -> dict:
        h = {"Ngrok-Version": "2"}
        if auth:
            h["Authorization"] = f"Bearer {self.api_key}"
        h.update(extra or {})
        return h

    def request(
        self, method: str, path: str, *, json=None, content=None, headers=None, auth=True
    ) -> httpx.Response:
        return self.http.request(
            method, path, json=json, content=content, headers=self.headers(headers, auth)
        )

    def get(self, path: str, **kw) -> httpx.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return self.request("POST", path, **kw)

    def patch(self, path: str, **kw) -> httpx.Response:
        return self.request("PATCH", path, **kw)

    def delete(self, path: str, **kw) -> httpx.Response:
        return self.request("DELETE", path, **kw)


@dataclass
class Account:
    account_id: str
    api_key: str
    authtoken: str
    client: ngrok.Client
    raw: Raw


def add_account(edge: BurrowProc, name: str) -> Account:
    """Create an account with its own API key and authtoken in the running edge's store.

    The edge looks keys up per request, and SQLite's WAL lets this second connection
    write while the edge holds the file open.
    """
    with SQLiteStore(Path(edge.ready["data_dir"]) / "burrow.db") as store:
        acct = store.create_account(name)
        key, token = f"{name}-api-key", f"{name}-authtoken"
        store.add_api_key(acct.id, key, description="test")
        store.add_authtoken(acct.id, token, description="test")
    return Account(acct.id, key, token, client_for(edge, key), Raw(edge, key))


@pytest.fixture
def api(edge) -> ngrok.Client:
    return client_for(edge)


@pytest.fixture
def raw(edge) -> Raw:
    r = Raw(edge)
    yield r
    r.http.close()


@pytest.fixture
def other(edge) -> Account:
    """A second account on the same edge."""
    acct = add_account(edge, "other")
    yield acct
    acct.raw.http.close()


def wait_until(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


POLICY_JSON = '{"on_http_request":[{"actions":[{"type":"deny","config":{"status_code":404}}]}]}'
POLICY_YAML = """\
on_http_request:
  - name: hello
    expressions:
      - "req.url.path.startsWith('/hi')"
    actions:
      - type: custom-response
        config:
          status_code: 200
          body: Hello world!
"""
