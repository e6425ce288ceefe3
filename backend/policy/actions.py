"""Traffic policy actions.  Each validates its config when the policy is set.

An action's ``run(ctx, phase)`` returns None to let the request go on, or an outcome
(:class:`Reply`, :class:`Forward`, ``CLOSE``) that ends the phase.
"""

from __future__ import annotations

import abc
import base64
import collections
import functools
import hmac
import ipaddress
import re
import time
from typing import Any, ClassVar

import re2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from backend.policy.document import PolicyError
from backend.policy.engine import (
    CLOSE,
    Context,
    EvalLimit,
    Forward,
    Outcome,
    Reply,
    Template,
    compile_expr,
)

TERMINATING = {"custom-response", "deny", "forward-internal", "close-connection", "redirect"}
_HTTP = ("on_http_request", "on_http_response")


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Action(abc.ABC):
    type: ClassVar[str]
    phases: ClassVar[tuple[str, ...]] = ("on_http_request",)
    Config: ClassVar[type[_Config]]

    def __init__(self, cfg: _Config, where: str) -> None:
        self.cfg = cfg

    @abc.abstractmethod
    def run(self, ctx: Context, phase: str) -> Outcome:
        """Act on the request (or connection); an outcome other than None ends the phase."""


_REGISTRY: dict[str, type[Action]] = {}


def _register(cls: type[Action]) -> type[Action]:
    _REGISTRY[cls.type] = cls
    return cls


def build_action(type_: str, config: dict[str, Any], phase: str, where: str) -> Action:
    cls = _REGISTRY.get(type_)
    if cls is None:
        raise PolicyError(
            f"{where}.type: unknown action {type_!r}; known: {', '.join(sorted(_REGISTRY))}"
        )
    if phase not in cls.phases:
        raise PolicyError(f"{where}: action {type_!r} cannot run in {phase}")
    try:
        cfg = cls.Config.model_validate(config)
    except ValidationError as exc:
        e = exc.errors(include_url=False)[0]
        loc = ".".join(str(x) for x in e["loc"])
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        raise PolicyError(f"{where}.config{'.' + loc if loc else ''}: {msg}") from None
    return cls(cfg, where)


def _status(v: int) -> int:
    if not 100 <= v <= 599:
        raise ValueError("status_code must be between 100 and 599")
    return v


def _header_name(name: str) -> str:
    if not name or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
        raise ValueError(f"invalid header name {name!r}")
    return name


def _templates(d: dict[str, str], where: str) -> list[tuple[str, Template]]:
    return [(k, Template(v, f"{where}.config.headers.{k}")) for k, v in d.items()]


# ---------------------------------------------------------------------- responses
@_register
class CustomResponse(Action):
    type = "custom-response"
    phases = _HTTP

    class Config(_Config):
        status_code: int = 200
        headers: dict[str, str] = Field(default_factory=dict)
        body: str = ""
        content: str | None = None  # older name for body

        _s = field_validator("status_code")(classmethod(lambda cls, v: _status(v)))

        @field_validator("headers")
        @classmethod
        def _h(cls, v: dict[str, str]) -> dict[str, str]:
            for k in v:
                _header_name(k)
            return v

    def __init__(self, cfg: Config, where: str) -> None:
        self.cfg = cfg
        self.headers = _templates(cfg.headers, where)
        self.body = Template(
            cfg.content if cfg.content is not None else cfg.body, f"{where}.config.body"
        )

    def run(self, ctx: Context, phase: str) -> Outcome:
        return Reply(
            self.cfg.status_code,
            [(k, t.render(ctx)) for k, t in self.headers],
            self.body.render(ctx).encode(),
        )


@_register
class Deny(Action):
    type = "deny"
    phases = ("on_tcp_connect", *_HTTP)

    class Config(_Config):
        status_code: int = 403

        _s = field_validator("status_code")(classmethod(lambda cls, v: _status(v)))

    def run(self, ctx: Context, phase: str) -> Outcome:
        if phase == "on_tcp_connect":
            return CLOSE
        return Reply(self.cfg.status_code)


@_register
class CloseConnection(Action):
    type = "close-connection"
    phases = ("on_tcp_connect", *_HTTP)

    class Config(_Config):
        pass

    def run(self, ctx: Context, phase: str) -> Outcome:
        return CLOSE


@_register
class Redirect(Action):
    type = "redirect"

    class Config(_Config):
        from_: str | None = Field(default=None, alias="from")
        to: str
        status_code: int = 302
        headers: dict[str, str] = Field(default_factory=dict)

        @field_validator("status_code")
        @classmethod
        def _s(cls, v: int) -> int:
            if v not in (301, 302, 303, 307, 308):
                raise ValueError("status_code must be one of 301, 302, 303, 307, 308")
            return v

    def __init__(self, cfg: Config, where: str) -> None:
        self.cfg = cfg
        self.rx = _regex(cfg.from_, f"{where}.config.from") if cfg.from_ else None
        self.to = Template(cfg.to, f"{where}.config.to")
        self.headers = _templates(cfg.headers, where)

    def run(self, ctx: Context, phase: str) -> Outcome:
        assert ctx.req is not None
        url = ctx.req.url
        if self.rx is not None:
            m = self.rx.search(url)
            if m is None:
                return None
            to = self.to.render(ctx, lambda s: m.expand(_py_template(s)))
        else:
            to = self.to.render(ctx)
        headers = [("Location", _location(to)), *((k, t.render(ctx)) for k, t in self.headers)]
        return Reply(self.cfg.status_code, headers)


# ------------------------------------------------------------------- rewriting
@_register
class AddHeaders(Action):
    type = "add-headers"
    phases = _HTTP

    class Config(_Config):
        headers: dict[str, str]

        @field_validator("headers")
        @classmethod
        def _h(cls, v: dict[str, str]) -> dict[str, str]:
            if not v:
                raise ValueError("at least one header is required")
            for k in v:
                _header_name(k)
            return v

    def __init__(self, cfg: Config, where: str) -> None:
        self.cfg = cfg
        self.headers = _templates(cfg.headers, where)

    def run(self, ctx: Context, phase: str) -> Outcome:
        target = ctx.res if phase == "on_http_response" else ctx.req
        assert target is not None
        for k, t in self.headers:
            target.add_header(k, t.render(ctx))
        ctx.changed("res" if phase == "on_http_response" else "req")
        return None


@_register
class RemoveHeaders(Action):
    type = "remove-headers"
    phases = _HTTP

    class Config(_Config):
        headers: list[str]

        @field_validator("headers")
        @classmethod
        def _h(cls, v: list[str]) -> list[str]:
            if not v:
                raise ValueError("at least one header is required")
            return [_header_name(k) for k in v]

    def run(self, ctx: Context, phase: str) -> Outcome:
        target = ctx.res if phase == "on_http_response" else ctx.req
        assert target is not None
        for k in self.cfg.headers:
            target.remove_header(k)
        ctx.changed("res" if phase == "on_http_response" else "req")
        return None


@_register
class URLRewrite(Action):
    """Rewrite the request target.  ``from`` is matched against the path and query."""

    type = "url-rewrite"

    class Config(_Config):
        from_: str = Field(alias="from")
        to: str

    def __init__(self, cfg: Config, where: str) -> None:
        self.cfg = cfg
        self.rx = _regex(cfg.from_, f"{where}.config.from")
        self.to = Template(cfg.to, f"{where}.config.to")

    def run(self, ctx: Context, phase: str) -> Outcome:
        req = ctx.req
        assert req is not None
        target = req.target
        m = self.rx.search(target)
        if m is None:
            return None
        to = self.to.render(ctx, lambda s: m.expand(_py_template(s)))
        new = target[: m.start()] + _NON_ASCII.sub(_pct, to) + target[m.end() :]
        if not new.startswith("/") or _NOT_IN_TARGET.search(new):
            return Reply(
                500, [("Content-Type", "text/plain")], b"url-rewrite produced an invalid target\n"
            )
        req.path, _, req.query = new.partition("?")
        req.changed = True
        ctx.changed("req")
        return None


# ------------------------------------------------------------------- access
@_register
class BasicAuth(Action):
    type = "basic-auth"

    class Config(_Config):
        credentials: list[str]
        realm: str = "burrow"
        enforce: bool = True

        @field_validator("credentials")
        @classmethod
        def _c(cls, v: list[str]) -> list[str]:
            if not v:
                raise ValueError("at least one credential (user:password) is required")
            for c in v:
                user, sep, pw = c.partition(":")
                if not sep or not user or not pw:
                    raise ValueError("credentials must look like user:password")
            return v

        @field_validator("realm")
        @classmethod
        def _r(cls, v: str) -> str:
            if any(c in v for c in '"\\\r\n\0'):
                raise ValueError("realm must not contain quotes, backslashes or line breaks")
            return v

    def __init__(self, cfg: Config, where: str) -> None:
        self.cfg = cfg
        self.valid = [c.encode() for c in cfg.credentials]

    def run(self, ctx: Context, phase: str) -> Outcome:
        assert ctx.req is not None
        given = b""
        for k, v in ctx.req.headers:
            if k.lower() == "authorization" and v[:6].lower() == "basic ":
                try:
                    given = base64.b64decode(v[6:].strip(), validate=True)
                except ValueError:
                    given = b""
        ok = False
        for cred in self.valid:
            ok |= hmac.compare_digest(cred, given)  # no early exit: constant time over the list
        if ok or not self.cfg.enforce:
            return None
        return Reply(
            401,
            [
                ("WWW-Authenticate", f'Basic realm="{self.cfg.realm}"'),
                ("Content-Type", "text/plain"),
            ],
            b"401 Unauthorized\n",
        )


@_register
class RestrictIPs(Action):
    type = "restrict-ips"
    phases = ("on_tcp_connect", "on_http_request")

    class Config(_Config):
        allow: list[str] = Field(default_factory=list)
        deny: list[str] = Field(default_factory=list)
        enforce: bool = True

    def __init__(self, cfg: Config, where: str) -> None:
        self.cfg = cfg
        if not cfg.allow and not cfg.deny:
            raise PolicyError(f"{where}.config: give at least one CIDR in allow or deny")
        self.allow = [_cidr(c, f"{where}.config.allow") for c in cfg.allow]
        self.deny = [_cidr(c, f"{where}.config.deny") for c in cfg.deny]

    def run(self, ctx: Context, phase: str) -> Outcome:
        ip = _ip(ctx.conn.get("client_ip", ""))
        denied = (
            ip is None
            or any(ip in n for n in self.deny)
            or (bool(self.allow) and not any(ip in n for n in self.allow))
        )
        if not denied or not self.cfg.enforce:
            return None
        if phase == "on_tcp_connect":
            return CLOSE
        return Reply(
            403, [("Content-Type", "text/plain")], b"403 Forbidden: your address is not allowed\n"
        )


@_register
class RateLimit(Action):
    """Sliding-window rate limit per bucket (default: per client IP).

    The windows live in this edge's memory: with several edges (cluster mode) each edge
    counts on its own, so a client spread over N edges may get up to N times the
    capacity.  That is deliberate: the data path never waits on PostgreSQL, and behind
    a load balancer a client usually sticks to one edge.  (The cloud API's per-account
    limit, by contrast, is global: one row per account in PostgreSQL.)
    """

    type = "rate-limit"
    phases = ("on_tcp_connect", "on_http_request")

    class Config(_Config):
        name: str = ""
        algorithm: str = "sliding_window"
        capacity: int = Field(gt=0, le=1_000_000)
        rate: str
        bucket_key: list[str] = Field(default_factory=lambda: ["conn.client_ip"])

        @field_validator("algorithm")
        @classmethod
        def _a(cls, v: str) -> str:
            if v != "sliding_window":
                raise ValueError("algorithm must be sliding_window")
            return v

    MAX_BUCKETS = 100_000

    def __init__(self, cfg: Config, where: str) -> None:
        self.cfg = cfg
        self.window = _duration(cfg.rate, f"{where}.config.rate")
        self.keys = [compile_expr(k, f"{where}.config.bucket_key") for k in cfg.bucket_key]
        self.buckets: collections.OrderedDict[tuple, collections.deque] = collections.OrderedDict()

    def run(self, ctx: Context, phase: str) -> Outcome:
        key = []
        for p in self.keys:
            try:
                key.append(_to_key(p.eval(ctx)))
            except EvalLimit:
                raise
            except Exception:
                key.append("")
        k = tuple(key)
        now = time.monotonic()
        q = self.buckets.get(k)
        if q is None:
            q = self.buckets[k] = collections.deque()
            if len(self.buckets) > self.MAX_BUCKETS:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(k)
        while q and q[0] <= now - self.window:
            q.popleft()
        if len(q) >= self.cfg.capacity:
            retry = max(1, int(q[0] + self.window - now + 0.999))
            if phase == "on_tcp_connect":
                return CLOSE
            return Reply(
                429,
                [("Retry-After", str(retry)), ("Content-Type", "text/plain")],
                b"429 Too Many Requests\n",
            )
        q.append(now)
        return None


# --------------------------------------------------------------------- routing
@_register
class ForwardInternal(Action):
    type = "forward-internal"
    phases = ("on_tcp_connect", "on_http_request")

    class Config(_Config):
        url: str
        binding: str = "internal"
        on_error: str = "halt"

        @field_validator("url")
        @classmethod
        def _u(cls, v: str) -> str:
            if "${" in v:
                return v
            host = v.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
            if not host.endswith(".internal"):
                raise ValueError("url must name an internal endpoint (a .internal host)")
            return v

        @field_validator("on_error")
        @classmethod
        def _e(cls, v: str) -> str:
            if v not in ("halt", "continue"):
                raise ValueError("on_error must be halt or continue")
            return v

        @field_validator("binding")
        @classmethod
        def _b(cls, v: str) -> str:
            if v != "internal":
                raise ValueError("binding must be internal")
            return v

    def __init__(self, cfg: Config, where: str) -> None:
        self.cfg = cfg
        self.url = Template(cfg.url, f"{where}.config.url")

    def run(self, ctx: Context, phase: str) -> Outcome:
        return Forward(self.url.render(ctx), self.cfg.on_error)


# --------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad pattern is the PolicyError below, not a stderr line


def _regex(src: str, where: str):
    """Compile a user's pattern with RE2: matching is linear in the input, so a crafted
    URL cannot make a tenant's ``(a+)+$`` stall the edge (Python's ``re`` backtracks
    exponentially and cannot be interrupted).  RE2 is also the syntax ngrok documents
    (Go's regexp): no backreferences or lookaround."""
    try:
        return re2.compile(src, options=_RE2_OPTIONS)
    except re2.error as exc:
        msg = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise PolicyError(f"{where}: invalid regular expression (RE2 syntax): {msg}") from None


_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_NOT_IN_TARGET = re.compile(r"[\x00-\x20\x7f#]")


def _pct(m: re.Match) -> str:
    return "".join(f"%{b:02X}" for b in m.group().encode("utf-8", "surrogateescape"))


def _location(url: str) -> str:
    """A Location value: non-ASCII percent-encoded (Go's hexEscapeNonASCII), no controls."""
    url = _NON_ASCII.sub(_pct, url)
    return re.sub(r"[\x00-\x1f\x7f ]", lambda m: f"%{ord(m.group()):02X}", url)


def _py_template(to: str) -> str:
    """Accept ``$1`` and ``${1}`` group references as well as Python's ``\\1``."""
    return re.sub(r"\$(\d+)|\$\{(\d+)\}", lambda m: "\\g<" + (m.group(1) or m.group(2)) + ">", to)


def _cidr(text: str, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise PolicyError(f"{where}: invalid CIDR {text!r}") from None


_DUR = re.compile(r"^(\d+)(ms|s|m|h)$")


def _duration(text: str, where: str) -> float:
    m = _DUR.match(text.strip())
    if not m:
        raise PolicyError(f"{where}: invalid duration {text!r} (e.g. 60s, 1m)")
    n, unit = int(m.group(1)), m.group(2)
    secs = n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    if secs <= 0:
        raise PolicyError(f"{where}: duration must be positive")
    return secs


def _to_key(v: Any) -> str:
    if isinstance(v, list | tuple):
        return ",".join(str(x) for x in v)
    return str(v)
