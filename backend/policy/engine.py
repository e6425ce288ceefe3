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

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import cel

from backend.http1 import head_bytes, valid_field_name
from backend.policy.document import PolicyError, TrafficPolicy, parse_policy

_INTERP = re.compile(r"\$\{(.+?)\}")
log = logging.getLogger("burrow.policy")


# ------------------------------------------------------------------------- limits
@dataclass(slots=True)
class Limits:
    """What one policy may cost.  The CEL library has no cost limits of its own and runs
    synchronously in the event loop, so the bounds are ours:

    * at compile time: rules and expressions per policy, the length of one expression
      and how deeply its comprehension macros (``exists``, ``all``, ``map``...) nest;
    * at request time: how many headers and query parameters a request may show to CEL
      (a request with more gets 431, as Apache's ``LimitRequestFields``), and a budget
      of evaluation time per request, checked before every expression: past it the
      request gets a 500 error page alone and the edge goes on serving everyone else.

    One expression cannot be interrupted, so its own worst case is bounded by the
    caps: two nested comprehensions over ``max_headers`` headers, each step a regex
    ``matches`` (the CEL library compiles the pattern on every call, ~40 µs).
    """

    eval_budget: float = 0.1  # seconds of evaluation per request
    max_headers: int = 100
    max_query_params: int = 100
    max_rules: int = 256
    max_expressions: int = 512
    max_expression_chars: int = 4096
    max_comprehension_depth: int = 2


LIMITS = Limits()


#: called with the seconds each phase evaluation took (the edge's metrics set it; the
#: engine itself does not import prometheus_client, so agents do not load it)
observe_eval: Callable[[float], None] | None = None


def configure(**kw: Any) -> None:
    """Change :data:`LIMITS` (``burrow serve --policy-eval-budget``)."""
    for k, v in kw.items():
        if not hasattr(LIMITS, k):
            raise AttributeError(k)
        setattr(LIMITS, k, v)


class EvalLimit(Exception):
    """Evaluating this request went past a limit; the request fails alone with ``status``."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


def _cel_text(s: str) -> str:
    """Text CEL can hold: bytes that were not UTF-8 (surrogates, see from_wire) become U+FFFD."""
    if s.isascii():
        return s
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


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
class Expr:
    """A compiled CEL expression and the top-level variables it reads."""

    __slots__ = ("names", "program", "source")

    def __init__(self, source: str, program: cel.Program) -> None:
        self.source = source
        self.program = program
        names = list(program.references().get("variables", ()))
        # Headers and query parameters are the costly part of ``req`` to convert:
        # expressions that never mention them get a ``req`` without them.
        if "req" in names and "headers" not in source and "query_params" not in source:
            names[names.index("req")] = "req-lite"
        self.names = tuple(names)

    def eval(self, ctx: Context):
        if time.perf_counter() > ctx.deadline:
            ctx.check_budget()
        return self.program.execute(ctx.cel(self.names))


_MACROS = frozenset(("all", "exists", "exists_one", "map", "filter"))


def _macro_before(src: str, i: int) -> bool:
    """Does the ``(`` at ``i`` open the arguments of a ``.macro(`` call?"""
    j = i - 1
    while j >= 0 and src[j].isspace():
        j -= 1
    end = j + 1
    while j >= 0 and (src[j].isalnum() or src[j] == "_"):
        j -= 1
    name = src[j + 1 : end]
    while j >= 0 and src[j].isspace():
        j -= 1
    return name in _MACROS and j >= 0 and src[j] == "."


def comprehension_depth(src: str) -> int:
    """How deeply comprehension macros nest in ``src`` (string literals skipped)."""
    depth = deepest = 0
    stack: list[bool] = []  # per open "(": is it a macro's?
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if c in "'\"":
            q = src[i : i + 3] if src[i : i + 3] in ("'''", '"""') else c
            j = i + len(q)
            while j < n and not src.startswith(q, j):
                j += 2 if src[j] == "\\" else 1
            i = j + len(q)
            continue
        if c == "(":
            macro = _macro_before(src, i)
            stack.append(macro)
            if macro:
                depth += 1
                deepest = max(deepest, depth)
        elif c == ")" and stack and stack.pop():
            depth -= 1
        i += 1
    return deepest


def compile_expr(src: str, where: str) -> Expr:
    if len(src) > LIMITS.max_expression_chars:
        raise PolicyError(f"{where}: CEL expression is longer than {LIMITS.max_expression_chars} characters")
    try:
        program = cel.compile(src)
    except (ValueError, RuntimeError) as exc:
        first = str(exc).split("\n", 1)[0]
        raise PolicyError(f"{where}: invalid CEL expression {src!r}: {first}") from None
    if comprehension_depth(src) > LIMITS.max_comprehension_depth:
        raise PolicyError(
            f"{where}: CEL expression nests comprehensions (all, exists, map, filter...) "
            f"more than {LIMITS.max_comprehension_depth} deep"
        )
    return Expr(src, program)


class Template:
    """A config string with ``${expr}`` parts, compiled once."""

    __slots__ = ("parts",)

    def __init__(self, text: str, where: str) -> None:
        self.parts: list[str | Expr] = []
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

    def render(self, ctx: Context, static=None) -> str:
        """The text with every ``${expr}`` replaced by its value.

        ``static`` transforms only the literal parts (e.g. regex group references), so
        that interpolated values are always taken literally.
        """
        out = []
        for p in self.parts:
            if isinstance(p, str):
                out.append(p if static is None else static(p))
            else:
                try:
                    v = p.eval(ctx)
                except EvalLimit:
                    raise
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
    """The variables one evaluation sees, converted for CEL only when a program needs them.

    Converting a variable into CEL costs microseconds (``req`` with its headers ~20 µs),
    so each program asks for the top-level names it references, and a variable is
    converted once and again only after an action changed it (``changed``).
    ``req`` is None in ``on_tcp_connect``; ``res`` is set only in ``on_http_response``.
    """

    __slots__ = ("_cel", "_fresh", "conn", "cpu0", "deadline", "endpoint", "req", "res", "spent")

    def __init__(self, conn: dict, endpoint: dict, req: RequestState | None = None) -> None:
        self.conn = conn
        self.endpoint = endpoint
        self.req = req
        self.res: ResponseState | None = None
        self._cel = cel.Context()
        self._fresh: set[str] = set()
        # The request's evaluation budget: ``spent`` adds up every phase and hop that
        # ran for it; CompiledPolicy.run sets ``deadline`` from what is left.
        self.spent = 0.0
        self.deadline = float("inf")
        self.cpu0 = 0.0

    def check_budget(self) -> None:
        """The wall-clock deadline passed: fail unless it was the OS, not us, that took the time.

        The cheap wall clock is checked before every expression; only once it is past
        the deadline does the thread's CPU time decide (a loaded machine that preempts
        the edge must not fail a cheap request).
        """
        used = time.thread_time() - self.cpu0
        left = LIMITS.eval_budget - self.spent - used
        if left <= 0:
            raise EvalLimit(500, "traffic policy evaluation went past its time budget")
        self.deadline = time.perf_counter() + left

    def changed(self, *names: str) -> None:
        """Forget converted variables (all of them when no names are given)."""
        if names:
            self._fresh.difference_update(names)
            if "req" in names:
                self._fresh.discard("req-lite")
        else:
            self._fresh.clear()

    def _value(self, name: str):
        if name == "req":
            return self.req.vars() if self.req is not None else None
        if name == "req-lite":
            return self.req.vars(lite=True) if self.req is not None else None
        if name == "res":
            return self.res.vars() if self.res is not None else None
        if name == "conn":
            return self.conn
        if name == "endpoint":
            return self.endpoint
        if name == "time":
            return {"now": datetime.now(UTC)}
        return None

    def cel(self, names: tuple[str, ...] = ("conn", "endpoint", "time", "req", "res")) -> cel.Context:
        for name in names:
            if name not in self._fresh:
                if name == "req-lite" and "req" in self._fresh:
                    continue  # the full req is already there
                value = self._value(name)
                if value is not None:
                    self._cel.add_variable("req" if name == "req-lite" else name, value)
                self._fresh.add(name)
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

    def vars(self, lite: bool = False) -> dict:
        c = _cel_text
        url = {"path": c(self.path), "query": c(self.query), "host": c(self.host), "scheme": self.scheme, "raw": c(self.url)}
        if lite:
            return {"method": self.method, "host": url["host"], "version": self.version, "url": url}
        if len(self.headers) > LIMITS.max_headers:
            raise EvalLimit(431, f"more than {LIMITS.max_headers} header fields")
        headers: dict[str, list[str]] = {}
        for k, v in self.headers:
            headers.setdefault(k.lower(), []).append(v if v.isascii() else c(v))
        params: dict[str, list[str]] = {}
        if self.query:
            from urllib.parse import parse_qsl

            pairs = parse_qsl(url["query"], keep_blank_values=True, max_num_fields=LIMITS.max_query_params)
            for k, v in pairs:
                params.setdefault(k, []).append(v)
        return {
            "method": self.method,
            "host": url["host"],
            "headers": headers,
            "query_params": params,
            "version": self.version,
            "url": url,
        }

    def add_header(self, name: str, value: str) -> None:
        _add_header(self.headers, name, value)
        self.changed = True

    def remove_header(self, name: str) -> None:
        low = name.lower()
        before = len(self.headers)
        self.headers = [(k, v) for k, v in self.headers if k.lower() != low]
        self.changed |= len(self.headers) != before

    def head(self) -> bytes:
        return head_bytes(f"{self.method} {self.target} HTTP/{self.version}", self.headers)


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
        if len(self.headers) > LIMITS.max_headers:
            raise EvalLimit(502, f"the response has more than {LIMITS.max_headers} header fields")
        headers: dict[str, list[str]] = {}
        for k, v in self.headers:
            headers.setdefault(k.lower(), []).append(v if v.isascii() else _cel_text(v))
        return {"status_code": self.status, "headers": headers}

    def add_header(self, name: str, value: str) -> None:
        _add_header(self.headers, name, value)
        self.changed = True

    def remove_header(self, name: str) -> None:
        low = name.lower()
        before = len(self.headers)
        self.headers = [(k, v) for k, v in self.headers if k.lower() != low]
        self.changed |= len(self.headers) != before

    def head(self) -> bytes:
        return head_bytes(f"HTTP/{self.version} {self.status} {self.reason}".rstrip(), self.headers)


def _add_header(headers: list[tuple[str, str]], name: str, value: str) -> None:
    """Add a field; a rendered value can never end the header line (see head_bytes)."""
    if not valid_field_name(name):
        raise ValueError(f"invalid header name {name!r}")
    headers.append((name, value))


# ------------------------------------------------------------------------- compiled
@dataclass(slots=True)
class CompiledRule:
    name: str
    exprs: list[Expr]
    actions: list  # of actions.Action

    def matches(self, ctx: Context) -> bool:
        for p in self.exprs:
            try:
                if p.eval(ctx) is not True:
                    return False
            except EvalLimit:
                raise
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
        """Run a phase's rules in order; the first terminating outcome wins.

        A request that goes past a limit (see :class:`Limits`) gets an error page alone.
        """
        start = time.perf_counter()
        ctx.cpu0 = time.thread_time()
        ctx.deadline = start + LIMITS.eval_budget - ctx.spent
        try:
            for rule in self.phases.get(phase, ()):
                if not rule.matches(ctx):
                    continue
                for action in rule.actions:
                    out = action.run(ctx, phase)
                    if out is not None:
                        return out
            return None
        except EvalLimit as exc:
            log.warning(
                "traffic policy: %s in %s of endpoint %s; answered %d",
                exc.msg, phase, ctx.endpoint.get("id", "?"), exc.status,
            )
            return limit_reply(exc)
        finally:
            took = time.perf_counter() - start
            ctx.spent += took
            ctx.deadline = float("inf")
            if observe_eval is not None:
                observe_eval(took)

    def terminates(self) -> bool:
        from backend.policy.actions import TERMINATING

        return any(
            a.type in TERMINATING
            for phase in ("on_http_request", "on_tcp_connect")
            for r in self.phases.get(phase, ())
            for a in r.actions
        )


def limit_reply(exc: EvalLimit) -> Reply:
    """The ngrok-style error page for a request that went past a policy limit."""
    from backend import pages

    code = "ERR_NGROK_2253"  # "Failed to evaluate CEL expression ... at runtime"
    title = "Request header fields too large" if exc.status == 431 else "Traffic policy error"
    body = pages.error_body(code, title, f"The endpoint's traffic policy could not evaluate this request: {exc.msg}.")
    return Reply(
        exc.status,
        [("Content-Type", "text/html; charset=utf-8"), ("ngrok-error-code", code), ("Cache-Control", "no-store")],
        body,
    )


def compile_policy(
    source: str | dict | TrafficPolicy, *, require_termination: bool = False
) -> CompiledPolicy:
    """Parse and compile a policy; raises PolicyError naming the first problem."""
    from backend.policy.actions import build_action

    doc = source if isinstance(source, TrafficPolicy) else parse_policy(source)
    text = source if isinstance(source, str) else doc.model_dump_json(exclude_none=True)
    nrules = sum(len(doc.rules(p)) for p in ("on_tcp_connect", "on_http_request", "on_http_response"))
    if nrules > LIMITS.max_rules:
        raise PolicyError(f"traffic_policy has {nrules} rules; at most {LIMITS.max_rules} are allowed")
    nexpr = _count_expressions(doc)
    if nexpr > LIMITS.max_expressions:
        raise PolicyError(
            f"traffic_policy has {nexpr} CEL expressions (with ${{...}} interpolations); "
            f"at most {LIMITS.max_expressions} are allowed"
        )
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


def _count_expressions(doc: TrafficPolicy) -> int:
    """Expressions and ``${...}`` interpolations (and bucket keys) in a whole policy."""

    def interp(v: Any) -> int:
        if isinstance(v, str):
            return len(_INTERP.findall(v))
        if isinstance(v, dict):
            return sum(interp(x) for x in v.values())
        if isinstance(v, list):
            return sum(interp(x) for x in v)
        return 0

    n = 0
    for phase in ("on_tcp_connect", "on_http_request", "on_http_response"):
        for rule in doc.rules(phase):
            n += len(rule.expressions or [])
            for a in rule.actions:
                cfg = a.config or {}
                n += interp(cfg) + len(cfg.get("bucket_key") or []) if isinstance(cfg, dict) else 0
    return n
