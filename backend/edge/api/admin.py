"""The edge's operator endpoints on the API port: health, metrics and the admin API.

- ``GET /healthz`` — the process answers (200), no auth: a liveness probe.
- ``GET /readyz`` — 200 when every listener is up and the store answers a query, else
  503 naming what is not; no auth: a readiness probe / load balancer check.
- ``GET /metrics`` — Prometheus text format.  It needs the admin key (``Authorization:
  Bearer``; Prometheus's ``authorization`` setting sends it) unless the edge runs with
  ``--metrics-public``: the API port is the one a public edge exposes, and traffic
  volumes and process details are nobody else's business.
- ``/admin/accounts`` — ``GET`` (list), ``POST {"name": ...}`` (create: the answer holds
  the new authtoken and API key, shown once), ``GET /admin/accounts/{id}``, ``POST
  /admin/accounts/{id}/disable`` and ``/enable`` (``{id}``: an id or a name).  Only with
  ``--admin-key``; the edge keeps the key's hash and compares in constant time.  Wrong
  keys are throttled per client IP like the cloud API's.  Errors are ngrok's error body.

The cloud API's ``before`` hook (API keys, ``Ngrok-Version``) does not run for these
paths (:func:`own_auth`); each handler here checks what it needs.
"""

from __future__ import annotations

import functools
import hmac
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from backend import metrics
from backend.edge import accounts
from backend.edge.api.core import (
    STORE_FAILURES,
    APIError,
    RateLimiter,
    _retry_after,
    api_error,
    handler,
    parse_body,
    store_failed,
)
from backend.httpserver import Request, Response, Router, json_response
from backend.store import Account, hash_token
from backend.store.base import format_timestamp

if TYPE_CHECKING:
    from backend.edge.server import Edge

__all__ = ["AdminAPI", "own_auth"]

_OPEN = frozenset({"/healthz", "/readyz", "/metrics"})


def own_auth(path: str) -> bool:
    """Paths that do their own auth (or none), not the cloud API's."""
    path = path.rstrip("/") or "/"
    return path in _OPEN or path == "/admin" or path.startswith("/admin/")


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def _guarded(fn):
    """Turn an auth refusal into its answer, and a failed store into ngrok's 500."""
    @functools.wraps(fn)
    async def wrapped(self, req: Request) -> Response:
        try:
            return await fn(self, req)
        except _Refused as r:
            return r.response
        except STORE_FAILURES as exc:
            return store_failed(req, exc)

    return wrapped


class _CreateAccount(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str


class AdminAPI:
    def __init__(self, edge: Edge) -> None:
        self.edge = edge
        self.failures = RateLimiter(edge.config.api_auth_fail_limit)

    def register(self, router: Router) -> None:
        for method in ("GET", "HEAD"):
            router.add(method, "/healthz", self.healthz)
            router.add(method, "/readyz", self.readyz)
        router.add("GET", "/metrics", self.metrics)
        router.add("GET", "/admin/accounts", handler(self.list_accounts))
        router.add("POST", "/admin/accounts", handler(self.create_account))
        router.add("GET", "/admin/accounts/{ref}", handler(self.get_account))
        router.add("POST", "/admin/accounts/{ref}/disable", handler(self.disable_account))
        router.add("POST", "/admin/accounts/{ref}/enable", handler(self.enable_account))

    # ------------------------------------------------------------------ probes
    async def healthz(self, req: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(self, req: Request) -> Response:
        checks = {"listeners": self._listeners(), "store": await self._store()}
        ok = all(v == "ok" for v in checks.values())
        return json_response({"status": "ready" if ok else "unavailable", "checks": checks}, 200 if ok else 503)

    def _listeners(self) -> str:
        edge = self.edge
        down = [f"listener {i + 1}" for i, s in enumerate(edge._listen_socks) if s.fileno() < 0]
        down += ["http" for srv in edge._servers[:1] if not srv.is_serving()]
        api = edge._api_server
        if api is None or api._server is None or not api._server.is_serving():
            down.append("api")
        return "ok" if not down else f"down: {', '.join(down)}"

    async def _store(self) -> str:
        if self.edge.store is None:
            return "not open"
        try:
            await self.edge.store.disabled_account_ids()
        except Exception as exc:
            return f"error: {type(exc).__name__}: {exc}"
        return "ok"

    # ----------------------------------------------------------------- metrics
    async def metrics(self, req: Request) -> Response:
        if not self.edge.config.metrics_public:
            if self.edge.config.admin_key_hash is None:
                return _error(
                    404, "ERR_NGROK_404",
                    "Metrics are off: start the edge with --admin-key (and scrape with it as a "
                    "bearer token) or with --metrics-public.",
                )
            refused = self._check_key(req)
            if refused is not None:
                return refused
        return Response(200, metrics.render(self.edge), content_type=metrics.CONTENT_TYPE)

    # ------------------------------------------------------------------- auth
    def _check_key(self, req: Request) -> Response | None:
        wanted = self.edge.config.admin_key_hash
        if wanted is None:
            return _error(
                404, "ERR_NGROK_404",
                "The admin API is off: start the edge with --admin-key (admin_key in its config file).",
            )
        auth = req.headers.get("authorization")
        if auth is None:
            return _error(401, "ERR_NGROK_200", "The admin API requires 'Authorization: Bearer <admin key>'.")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _error(401, "ERR_NGROK_201", "The authorization header could not be parsed; use 'Authorization: Bearer <admin key>'.")
        blocked = self.failures.wait(req.remote)
        if blocked > 0:
            return _error(
                429, "ERR_NGROK_429",
                f"Too many failed authentication attempts from {req.remote}. Try again later.",
                _retry_after(blocked),
            )
        if not hmac.compare_digest(hash_token(token.strip()), wanted):
            self.failures.take(req.remote)
            return _error(401, "ERR_NGROK_202", "The admin key is invalid.")
        return None

    def _admin(self, req: Request):
        refused = self._check_key(req)
        if refused is not None:
            raise _Refused(refused)
        if self.edge.store is None:
            raise APIError(503, "ERR_NGROK_500", "The edge is not ready.")
        return self.edge.store

    # --------------------------------------------------------------- accounts
    def _view(self, acct: Account, req: Request) -> dict:
        sessions = sum(1 for s in self.edge.registry.sessions.values() if s.account_id == acct.id)
        return {
            "id": acct.id,
            "uri": f"{req.base_url}/admin/accounts/{acct.id}",
            "name": acct.name,
            "created_at": format_timestamp(acct.created_at),
            "disabled_at": format_timestamp(acct.disabled_at) if acct.disabled_at else None,
            "agent_sessions": sessions,
        }

    async def _resolve(self, store, ref: str) -> Account:
        try:
            return await accounts.aresolve(store, ref)
        except accounts.AccountError as exc:
            raise _account_error(exc) from None

    @_guarded
    async def list_accounts(self, req: Request) -> Response:
        store = self._admin(req)
        items = [self._view(a, req) for a in reversed(await store.list_accounts())]
        return json_response({"accounts": items, "uri": f"{req.base_url}/admin/accounts", "next_page_uri": None})

    @_guarded
    async def create_account(self, req: Request) -> Response:
        store = self._admin(req)
        body = parse_body(req, _CreateAccount)
        try:
            made = await accounts.acreate(store, body.name)
        except accounts.AccountError as exc:
            raise _account_error(exc) from None
        return json_response(
            {**self._view(made.account, req), "authtoken": made.authtoken, "api_key": made.api_key}, 201
        )

    @_guarded
    async def get_account(self, req: Request) -> Response:
        store = self._admin(req)
        return json_response(self._view(await self._resolve(store, req.params["ref"]), req))

    @_guarded
    async def disable_account(self, req: Request) -> Response:
        store = self._admin(req)
        acct = await self._resolve(store, req.params["ref"])
        acct = await store.set_account_disabled(acct.id, True) or acct
        accounts.cut_off(self.edge, acct)
        return json_response(self._view(acct, req))

    @_guarded
    async def enable_account(self, req: Request) -> Response:
        store = self._admin(req)
        acct = await self._resolve(store, req.params["ref"])
        acct = await store.set_account_disabled(acct.id, False) or acct
        await accounts.restore(self.edge, acct)
        return json_response(self._view(acct, req))


def _account_error(exc: accounts.AccountError) -> APIError:
    status, code = {"not_found": (404, "ERR_NGROK_404"), "exists": (409, "ERR_NGROK_409")}.get(
        exc.kind, (400, "ERR_NGROK_400")
    )
    return APIError(status, code, str(exc))


def _error(status: int, code: str, msg: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return api_error(None, status, msg, code, headers)
