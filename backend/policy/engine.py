"""The traffic policy engine: compile a policy once, run it per connection and request.

Expressions are CEL, evaluated by ``common-expression-language`` (Rust's cel-interpreter
behind Python bindings).  It was chosen over ``cel-python`` after measuring both here on
the same rules: ~0.6 µs per compiled expression plus ~17 µs to convert a request's
variables, against ~240 µs per evaluation (plus ~30 µs conversion) for cel-python,
with identical answers on the expressions we test.

Everything that can be checked is checked at compile time (:func:`compile_policy`):
unknown actions, bad action config, CEL syntax, ``${...}`` interpolations, actions in a
phase where they mean nothing.  Request time only evaluates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import cel

from backend.policy.document import PolicyError, TrafficPolicy, parse_policy

_INTERP = re.compile(r"\$\{(.+?)\}")


# ------------------------------------------------------------------------ outcomes
@dataclass(slots=True)
class Reply:
    """Terminate: answer with this response."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


@dataclass(slots=True)
class Forward:
    """Terminate: hand the request to an internal endpoint."""

    url: str
    on_error: str = "halt"


class Close:
    """Terminate: close the connection without answering."""


CLOSE = Close()
Outcome = Reply | Forward | Close | None


# ------------------------------------------------------------------------ expressions
def compile_expr(src: str, where: str) -> cel.Program:
    try:
        return cel.compile(src)
    except (ValueError, RuntimeError) as exc:
        first = str(exc).split("\n", 1)[0]
        raise PolicyError(f"{where}: invalid CEL expression {src!r}: {first}") from None


class Template:
    """A config string with ``${expr}`` parts, compiled once."""

    __slots__ = ("parts",)

    def __init__(self, text: str, where: str) -> None:
        self.parts: list[str | cel.Program] = []
        pos = 0
        for m in _INTERP.finditer(text):
            if m.start() > pos:
                self.parts.append(text[pos : m.start()])
            self.parts.append(compile_expr(m.group(1), where))
            pos = m.end()
        if pos < len(text):
            self.parts.append(text[pos:])

    @property
    def static(self) -> bool:
        return all(isinstance(p, str) for p in self.parts)

    def render(self, ctx: Context) -> str:
        out = []
        for p in self.parts:
            if isinstance(p, str):
                out.append(p)
            else:
                try:
                    v = p.execute(ctx.cel())
                except Exception:
                    v = ""  # a missing header or key interpolates as empty
                out.append(_to_str(v))
        return "".join(out)


def _to_str(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return ",".join(_to_str(x) for x in v)
    return "" if v is None else str(v)


# --------------------------------------------------------------------------- context
class Context:
    """The variables one evaluation sees, built lazily and cached until changed.

    ``req`` is None in ``on_tcp_connect``; ``res`` is set only in ``on_http_response``.
    """

    __slots__ = ("_cel", "conn", "endpoint", "req", "res")

    def __init__(self, conn: dict, endpoint: dict, req: RequestState | None = None) -> None:
        self.conn = conn
        self.endpoint = endpoint
        self.req = req
        self.res: ResponseState | None = None
        self._cel: cel.Context | None = None

    def changed(self) -> None:
        self._cel = None

    def cel(self) -> cel.Context:
        if self._cel is None:
            c = cel.Context()
            c.add_variable("conn", self.conn)
            c.add_variable("endpoint", self.endpoint)
            c.add_variable("time", {"now": datetime.now(UTC)})
            if self.req is not None:
                c.add_variable("req", self.req.vars())
            if self.res is not None:
                c.add_variable("res", self.res.vars())
            self._cel = c
        return self._cel


class RequestState:
    """A request head as the policy sees and edits it."""

    __slots__ = ("changed", "headers", "host", "method", "path", "query", "scheme", "version")

    def __init__(
        self,
        method: str,
        target: str,
        version: str,
        headers: list[tuple[str, str]],
        host: str,
        scheme: str,
    ) -> None:
        self.method = method
        path, _, query = target.partition("?")
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.host = host
        self.scheme = scheme
        self.changed = False

    @property
    def target(self) -> str:
        return self.path + ("?" + self.query if self.query else "")

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}{self.target}"

    def vars(self) -> dict:
        headers: dict[str, list[str]] = {}
        for k, v in self.headers:
            headers.setdefault(k.lower(), []).append(v)
        params: dict[str, list[str]] = {}
        if self.query:
            from urllib.parse import parse_qsl

            for k, v in parse_qsl(self.query, keep_blank_values=True):
                params.setdefault(k, []).append(v)
        return {
            "method": self.method,
            "host": self.host,
            "headers": headers,
            "query_params": params,
            "version": self.version,
            "url": {
                "path": self.path,
                "query": self.query,
                "raw_query": self.query,
                "host": self.host,
                "scheme": self.scheme,
                "url": self.url,
                "raw": self.url,
            },
        }

    def add_header(self, name: str, value: str) -> None:
        self.headers.append((name, value))
        self.changed = True

    def remove_header(self, name: str) -> None:
        low = name.lower()
        before = len(self.headers)
        self.headers = [(k, v) for k, v in self.headers if k.lower() != low]
        self.changed |= len(self.headers) != before

    def head(self) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/{self.version}"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class ResponseState:
    __slots__ = ("changed", "headers", "reason", "status", "version")

    def __init__(
        self, status: int, reason: str, version: str, headers: list[tuple[str, str]]
    ) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.changed = False

    def vars(self) -> dict:
        headers: dict[str, list[str]] = {}
        for k, v in self.headers:
            headers.setdefault(k.lower(), []).append(v)
        return {"status_code": self.status, "headers": headers}

    def add_header(self, name: str, value: str) -> None:
        self.headers.append((name, value))
        self.changed = True

    def remove_header(self, name: str) -> None:
        low = name.lower()
        before = len(self.headers)
        self.headers = [(k, v) for k, v in self.headers if k.lower() != low]
        self.changed |= len(self.headers) != before

    def head(self) -> bytes:
        lines = [f"HTTP/{self.version} {self.status} {self.reason}".rstrip()]
        lines += [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# ------------------------------------------------------------------------- compiled
@dataclass(slots=True)
class CompiledRule:
    name: str
    exprs: list[cel.Program]
    actions: list  # of actions.Action

    def matches(self, ctx: Context) -> bool:
        for p in self.exprs:
            try:
                if p.execute(ctx.cel()) is not True:
                    return False
            except Exception:
                return False  # an expression that cannot be evaluated does not match
        return True


class CompiledPolicy:
    """A policy ready to run.  ``source`` keeps the text it came from."""

    def __init__(self, source: str, phases: dict[str, list[CompiledRule]]) -> None:
        self.source = source
        self.phases = phases

    def has(self, phase: str) -> bool:
        return bool(self.phases.get(phase))

    def run(self, phase: str, ctx: Context) -> Outcome:
        """Run a phase's rules in order; the first terminating outcome wins."""
        for rule in self.phases.get(phase, ()):
            if not rule.matches(ctx):
                continue
            for action in rule.actions:
                out = action.run(ctx, phase)
                if out is not None:
                    return out
        return None

    def terminates(self) -> bool:
        from backend.policy.actions import TERMINATING

        return any(
            a.type in TERMINATING
            for phase in ("on_http_request", "on_tcp_connect")
            for r in self.phases.get(phase, ())
            for a in r.actions
        )


def compile_policy(
    source: str | dict | TrafficPolicy, *, require_termination: bool = False
) -> CompiledPolicy:
    """Parse and compile a policy; raises PolicyError naming the first problem."""
    from backend.policy.actions import build_action

    doc = source if isinstance(source, TrafficPolicy) else parse_policy(source)
    text = source if isinstance(source, str) else doc.model_dump_json(exclude_none=True)
    phases: dict[str, list[CompiledRule]] = {}
    for phase in ("on_tcp_connect", "on_http_request", "on_http_response"):
        rules = []
        for i, rule in enumerate(doc.rules(phase)):
            where = f"traffic_policy.{phase}[{i}]"
            exprs = [
                compile_expr(e, f"{where}.expressions[{j}]")
                for j, e in enumerate(rule.expressions or [])
            ]
            acts = [
                build_action(a.type, a.config or {}, phase, f"{where}.actions[{k}]")
                for k, a in enumerate(rule.actions)
            ]
            rules.append(CompiledRule(rule.name or f"rule {i}", exprs, acts))
        if rules:
            phases[phase] = rules
    policy = CompiledPolicy(text, phases)
    if require_termination and not policy.terminates():
        raise PolicyError(
            "traffic_policy: a cloud endpoint's policy must include a terminating action "
            "(custom-response, deny, forward-internal, close-connection or redirect) in "
            "on_http_request or on_tcp_connect"
        )
    return policy
