"""The cloud API's conventions (ngrok API v2), shared by every resource module.

- Auth: ``Authorization: Bearer <API key>``, looked up in the store on every request
  (a key added or deleted while the edge runs takes effect at once); an authtoken
  presented as a key gets ngrok's ``ERR_NGROK_206``.
- ``Ngrok-Version: 2`` is required (``ERR_NGROK_218`` missing, ``ERR_NGROK_217`` other).
- A per-account token bucket of ``EdgeConfig.api_rate_limit`` requests a minute (shared
  by all the account's API keys) answers 429 ``ERR_NGROK_226`` with ``Retry-After``.
- Failed key checks are throttled per client IP (``EdgeConfig.api_auth_fail_limit`` a
  minute): past it, that IP gets 429 ``ERR_NGROK_429`` (burrow's code) with
  ``Retry-After`` before any key is looked up.  Requests with a valid key take nothing
  from this bucket.
- A store failure while checking the key is a 500 ``ERR_NGROK_500``, logged on one line;
  a store that cannot be reached (PostgreSQL down, cluster mode) is a 503
  ``ERR_NGROK_503`` with ``Retry-After: 1``: nothing was changed, the client retries.
- The per-account bucket is this edge's memory with SQLite; with a shared store
  (cluster mode) it is one row per account in the store, updated by one upsert per
  request, so the limit holds across every edge (:class:`SharedRateLimiter`).
- Bodies are JSON objects (``ERR_NGROK_216`` without a Content-Type, ``ERR_NGROK_210``
  for another type, ``ERR_NGROK_213`` unparsable, ``ERR_NGROK_214`` unknown field,
  ``ERR_NGROK_215`` wrong type or value). A POST with no body at all is an empty object.
- Lists: ``limit`` (1-100, default 100; more is ``ERR_NGROK_215``, as ngrok answers),
  ``before_id`` and ``filter`` (a CEL predicate over ``obj``, see :mod:`.filtering`);
  newest first; ``uri`` and an absolute ``next_page_uri`` (or null) built from the API's
  public URL (``--api-public-url``, default the listen address), never from the Host
  header.
- Ids: an id that names nothing this account owns is ``ERR_NGROK_404`` (404), whoever
  else may own it, and so is one that cannot be an id at all (``ts_unknown``): ngrok
  answers a missing object with 404 whatever the id looks like.

Handlers raise :class:`APIError`; :func:`handler` turns it into ngrok's error body.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlencode

from pydantic import BaseModel, ValidationError

from backend.edge import accounts
from backend.httpserver import Request, Response, json_response
from backend.ids import new_id
from backend.store import StoreError, StoreUnavailable

if TYPE_CHECKING:
    from backend.edge.api.filtering import Filter
    from backend.edge.server import Edge

__all__ = [
    "MAX_DESCRIPTION",
    "MAX_METADATA",
    "APIError",
    "Caller",
    "Page",
    "RateLimiter",
    "SharedRateLimiter",
    "api_error",
    "caller",
    "check_id",
    "check_text",
    "dump",
    "handler",
    "make_before",
    "page_params",
    "paged",
    "parse_body",
]

MAX_DESCRIPTION = 255
MAX_METADATA = 4096
MAX_LIMIT = 100

_DEFAULT_CODES = {
    400: "ERR_NGROK_400",
    404: "ERR_NGROK_404",
    405: "ERR_NGROK_405",
    413: "ERR_NGROK_213",
    429: "ERR_NGROK_226",
    500: "ERR_NGROK_500",
}
_ID_BODY = re.compile(r"[0-9A-Za-z]{27}")

B = TypeVar("B", bound=BaseModel)

log = logging.getLogger("burrow.api")

#: what a broken or unreachable database raises (sqlite3's, and a closed store's)
STORE_FAILURES = (sqlite3.Error, StoreError)


class APIError(Exception):
    """An error answer: HTTP status, ngrok error code and a message for the user."""

    def __init__(
        self, status: int, code: str, msg: str, headers: list[tuple[str, str]] | None = None
    ):
        super().__init__(msg)
        self.status = status
        self.code = code
        self.msg = msg
        self.headers = headers or []


def api_error(
    req: Request | None,
    status: int,
    msg: str,
    code: str | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> Response:
    """ngrok's error body: ``error_code``, ``status_code``, ``msg``, ``details.operation_id``."""
    return json_response(
        {
            "error_code": code or _DEFAULT_CODES.get(status, f"ERR_NGROK_{status}"),
            "status_code": status,
            "msg": msg,
            "details": {"operation_id": new_id("op")},
        },
        status,
        headers,
    )


def handler(
    fn: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a resource handler so that :class:`APIError` becomes an error answer."""

    @functools.wraps(fn)
    async def wrapped(req: Request) -> Response:
        try:
            return await fn(req)
        except APIError as exc:
            return api_error(req, exc.status, exc.msg, exc.code, exc.headers)
        except (sqlite3.Error, StoreUnavailable) as exc:
            return store_failed(req, exc)

    return wrapped


def store_failed(req: Request, exc: BaseException) -> Response:
    """A 500 for a database that failed under us: one log line, no traceback, no secrets.

    A store that cannot be reached right now is a 503 with ``Retry-After: 1``.
    """
    if isinstance(exc, StoreUnavailable):
        log.warning("store unavailable during %s %s: %s", req.method, req.path[:100], exc)
        return api_error(
            req,
            503,
            "The service is temporarily unavailable (its database cannot be reached); retry shortly.",
            "ERR_NGROK_503",
            [("Retry-After", "1")],
        )
    log.error("store failed during %s %s: %s: %s", req.method, req.path[:100], type(exc).__name__, exc)
    return api_error(req, 500, "Internal error: the database is unavailable.", "ERR_NGROK_500")


def dump(model: BaseModel, status: int = 200) -> Response:
    """Answer with a wire model, every field present (``null`` when empty)."""
    return json_response(model.model_dump(mode="json"), status)


# ------------------------------------------------------------------------- auth, limits
@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the account and the API key used."""

    account_id: str
    key_id: str


def caller(req: Request) -> Caller:
    return req.state["caller"]


class RateLimiter:
    """A token bucket per key (an account, a client IP): ``per_minute``, refilled continuously."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)

    def take(self, key: str) -> float:
        """Spend one token; return 0 if allowed, else the seconds until one is free."""
        if self.per_minute <= 0:
            return 0.0
        now = time.monotonic()
        rate = self.per_minute / 60.0
        tokens, last = self._buckets.get(key, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - last) * rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > 10_000:  # forget keys that are full again
            full = [k for k, (t, _) in self._buckets.items() if t >= self.per_minute - 1]
            for k in full:
                self._buckets.pop(k, None)
        return 0.0

    async def acquire(self, key: str) -> float:
        """:meth:`take`, as the API's per-account limiter is called (see SharedRateLimiter)."""
        return self.take(key)

    def wait(self, key: str) -> float:
        """Seconds until ``key`` has a token again (0 if it has one); spends nothing."""
        if self.per_minute <= 0 or key not in self._buckets:
            return 0.0
        tokens, last = self._buckets[key]
        rate = self.per_minute / 60.0
        tokens = min(float(self.per_minute), tokens + (time.monotonic() - last) * rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / rate


class SharedRateLimiter:
    """The per-account API limit kept in a shared store (cluster mode): the same token
    bucket as :class:`RateLimiter`, one row per key, spent by one upsert per request so
    that every edge counts against the same bucket."""

    def __init__(self, store, per_minute: int) -> None:
        self.store = store
        self.per_minute = per_minute

    async def acquire(self, key: str) -> float:
        if self.per_minute <= 0:
            return 0.0
        return await self.store.rate_take(key, self.per_minute)


def _retry_after(wait: float) -> list[tuple[str, str]]:
    return [("Retry-After", str(max(1, round(wait + 0.5))))]


def make_before(
    edge: Edge, limiter: RateLimiter | SharedRateLimiter, auth_failures: RateLimiter | None = None
) -> Callable[[Request], Awaitable[Response | None]]:
    """The ``before`` hook: authenticate, check the API version, apply the rate limits.

    ``limiter`` counts requests per account; ``auth_failures`` counts wrong keys per
    client IP and, once that IP is out of tokens, answers 429 before looking anything up.
    """
    auth_failures = auth_failures or RateLimiter(0)

    async def before(req: Request) -> Response | None:
        try:
            return await check(req)
        except STORE_FAILURES as exc:
            return store_failed(req, exc)

    def failed(req: Request, msg: str, code: str) -> Response:
        auth_failures.take(req.remote)
        return api_error(req, 401, msg, code)

    async def check(req: Request) -> Response | None:
        auth = req.headers.get("authorization")
        if auth is None:
            return api_error(
                req,
                401,
                "The ngrok API requires that you set the Authorization header for authentication.",
                "ERR_NGROK_200",
            )
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return api_error(
                req,
                401,
                "The authorization header could not be parsed; use 'Authorization: Bearer <API key>'.",
                "ERR_NGROK_201",
            )
        blocked = auth_failures.wait(req.remote)
        if blocked > 0:
            return api_error(
                req,
                429,
                f"Too many failed authentication attempts from {req.remote}: at most "
                f"{auth_failures.per_minute} a minute. Try again later.",
                "ERR_NGROK_429",
                _retry_after(blocked),
            )
        if edge.store is None:
            raise StoreError("store is not open")
        key = await edge.store.find_api_key(token)
        if key is None:
            if await edge.store.find_authtoken(token) is not None:
                return failed(req, "You used an authtoken where an API key is required.", "ERR_NGROK_206")
            disabled = await accounts.arefusal(edge.store, token)
            if disabled is not None:
                return failed(req, disabled, accounts.API_CODE)
            return failed(req, "The API key is invalid.", "ERR_NGROK_202")
        version = req.headers.get("ngrok-version")
        if version is None:
            return api_error(
                req,
                400,
                "Missing the Ngrok-Version header; send 'Ngrok-Version: 2'.",
                "ERR_NGROK_218",
            )
        if version.strip() != "2":
            return api_error(
                req,
                400,
                f"Unsupported API version {version.strip()[:20]!r}; send 'Ngrok-Version: 2'.",
                "ERR_NGROK_217",
            )
        wait = await limiter.acquire(key.account_id)
        if wait > 0:
            return api_error(
                req,
                429,
                f"Your account is rate limited to {limiter.per_minute} API requests per minute.",
                "ERR_NGROK_226",
                _retry_after(wait),
            )
        req.state["caller"] = Caller(account_id=key.account_id, key_id=key.id)
        return None

    return before


# ------------------------------------------------------------------------------ bodies
def _where(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_body(req: Request, model: type[B]) -> B:
    """Decode the request body as a JSON object and validate it against ``model``."""
    if not req.body.strip():
        data: Any = {}
    else:
        ctype = req.headers.get("content-type")
        if ctype is None:
            raise APIError(
                400,
                "ERR_NGROK_216",
                "Missing Content-Type header; send 'Content-Type: application/json'.",
            )
        if ctype.split(";", 1)[0].strip().lower() != "application/json":
            raise APIError(
                415,
                "ERR_NGROK_210",
                f"Unsupported Content-Type {ctype[:60]!r}; send application/json.",
            )
        try:
            data = json.loads(req.body)
        except (ValueError, RecursionError) as exc:
            detail = (
                f": {exc.msg} at line {exc.lineno} column {exc.colno}"
                if isinstance(exc, json.JSONDecodeError)
                else ""
            )
            raise APIError(
                400, "ERR_NGROK_213", f"The request body is not valid JSON{detail}."
            ) from None
        if not isinstance(data, dict):
            raise APIError(400, "ERR_NGROK_213", "The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        unknown = [e for e in errors if e["type"] == "extra_forbidden"]
        if unknown:
            name = _where(unknown[0]["loc"])
            raise APIError(400, "ERR_NGROK_214", f"Unknown parameter {name!r}.") from None
        err = errors[0]
        name = _where(err["loc"])
        if err["type"] == "missing":
            raise APIError(400, "ERR_NGROK_215", f"Missing required parameter {name!r}.") from None
        raise APIError(
            400, "ERR_NGROK_215", f"Invalid value for parameter {name!r}: {err['msg']}."
        ) from None
    except RecursionError:
        raise APIError(400, "ERR_NGROK_213", "The request body is nested too deeply.") from None


def check_text(name: str, value: str | None, max_bytes: int) -> None:
    """Refuse a string parameter longer than ``max_bytes`` UTF-8 bytes."""
    if value is not None and len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise APIError(
            400, "ERR_NGROK_215", f"Parameter {name!r} must be at most {max_bytes} bytes."
        )


def check_id(value: str, prefix: str, kind: str = "resource") -> str:
    """Answer 404 at once for an id that cannot be one of ours (``prefix_`` + 27 base62).

    ngrok answers every id it has no object for with 404, malformed or not; checking the
    shape first only spares the lookup (and keeps junk out of the store's queries).
    """
    head, sep, body = value.partition("_")
    if not sep or head != prefix or not _ID_BODY.fullmatch(body):
        shown = value if len(value) <= 64 else value[:64] + "..."
        raise not_found(kind, shown)
    return value


def not_found(kind: str, id_: str) -> APIError:
    return APIError(404, "ERR_NGROK_404", f"{kind} {id_!r} not found.")


# ------------------------------------------------------------------------------ paging
@dataclass(frozen=True, slots=True)
class Page:
    limit: int
    before_id: str | None
    filter: Filter | None = None

    @property
    def store_limit(self) -> int | None:
        """How many rows to ask the store for: all of them when a filter must see each."""
        return None if self.filter is not None else self.limit + 1

    def select(self, items: list, as_obj: Callable[[Any], dict]) -> list:
        """``items`` the filter keeps (all without a filter); ``as_obj`` gives the wire dict."""
        return items if self.filter is None else self.filter.select(items, as_obj)


def page_params(
    req: Request, extra: Iterable[str] = (), item: type[BaseModel] | None = None
) -> Page:
    """Read ``limit``, ``before_id`` and ``filter``; refuse unknown query parameters.

    ``item`` is the wire model of the listed objects: a filter naming a field it lacks
    is refused.
    """
    from backend.edge.api.filtering import compile_filter

    allowed = {"limit", "before_id", "filter", *extra}
    for name in req.query:
        if name not in allowed:
            raise APIError(400, "ERR_NGROK_214", f"Unknown query parameter {name[:60]!r}.")
    fields = frozenset(item.model_fields) if item is not None else None
    flt = compile_filter(req.arg("filter"), fields)
    raw = req.arg("limit")
    limit = MAX_LIMIT
    if raw:
        try:
            limit = int(raw)
        except ValueError:
            raise APIError(
                400,
                "ERR_NGROK_215",
                f"Invalid value for parameter 'limit': {raw[:20]!r} is not an integer.",
            ) from None
        if not 1 <= limit <= MAX_LIMIT:
            raise APIError(
                400,
                "ERR_NGROK_215",
                f"Parameter 'limit' must be between 1 and {MAX_LIMIT}, not {raw[:20]}.",
            )
    return Page(limit=limit, before_id=req.arg("before_id") or None, filter=flt)


def paged(
    req: Request, page: Page, items: list, id_of: Callable[[Any], str] = lambda x: x.id
) -> tuple[list, str | None]:
    """Cut ``items`` (newest first) to the page after ``before_id``, with its next URI.

    Callers may pass everything or what their store already cut (ids older than
    ``before_id``, one more than the limit): both give the same page.
    """
    if page.before_id is not None:
        items = [x for x in items if id_of(x) < page.before_id]
    if len(items) <= page.limit:
        return items, None
    items = items[: page.limit]
    query = [(k, v) for k, vs in req.query.items() if k not in ("before_id", "limit") for v in vs]
    query += [("before_id", id_of(items[-1])), ("limit", str(page.limit))]
    return items, f"{req.base_url}{req.path.rstrip('/')}?{urlencode(query)}"
