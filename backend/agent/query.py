"""A small query language for captured requests (``GET /api/requests/http?q=...``).

    status:5xx method:POST path:/api body:"token" tunnel:web dur>200ms ip:10.0. -status:2xx

Terms are ANDed.  ``field:value`` matches a field (``status`` takes ``404``, ``4xx`` or
``4``; ``path``/``host``/``tunnel``/``ip``/``header`` match substrings, case-insensitive;
``body`` searches the captured request and response bodies); ``dur`` compares with
``>``, ``>=``, ``<``, ``<=`` against ``ms``/``s``/``us`` values; ``replay:yes`` keeps
replays and ``replay_of:ID`` the replays of one capture; a bare word matches method, path, host or tunnel; ``-`` negates a term.
``OR`` is refused (not silently searched for); every error names the bad token.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable

_DUR = re.compile(r"^dur(>=|<=|>|<|=)(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)?$")
_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000}
FIELDS = ("status", "method", "path", "host", "tunnel", "ip", "body", "header", "replay", "replay_of")

Pred = Callable[[object], bool]


class QueryError(ValueError):
    pass


def _status_pred(v: str) -> Pred:
    v = v.lower()
    if re.fullmatch(r"[1-5]xx|[1-5]", v):
        d = int(v[0])
        return lambda c: c.status_code is not None and c.status_code // 100 == d
    if v.isdigit():
        n = int(v)
        return lambda c: c.status_code == n
    if v in ("pending", "none"):
        return lambda c: c.status_code is None
    raise QueryError(f"status:{v} — expected a code (404), a class (4xx) or 'pending'")


_COMPARE = re.compile(r"^([a-z]+)(>=|<=|>|<|=)", re.IGNORECASE)


def _term(tok: str) -> Pred:
    m = _DUR.match(tok)
    if not m:
        c = _COMPARE.match(tok)
        if c and c.group(1).lower() == "dur":
            raise QueryError(f"{tok} — expected a duration such as dur>200ms or dur<=1.5s")
        if c and c.group(1).lower() in FIELDS:
            raise QueryError(f"{tok} — only dur compares with {c.group(2)}; write {c.group(1)}:value")
    if m:
        op, num, unit = m.group(1), float(m.group(2)), m.group(3) or "ms"
        limit = num * _UNITS[unit]
        ops = {
            ">": lambda d: d > limit,
            ">=": lambda d: d >= limit,
            "<": lambda d: d < limit,
            "<=": lambda d: d <= limit,
            "=": lambda d: d == limit,
        }
        f = ops[op]
        return lambda c: f(c.duration)
    if ":" in tok:
        field, _, value = tok.partition(":")
        field = field.lower()
        if field not in FIELDS:
            raise QueryError(f"unknown field {field!r}; use one of {', '.join(FIELDS)} or dur>…")
        if field == "status":
            return _status_pred(value)
        low = value.lower()
        if field == "method":
            return lambda c: c.method.lower() == low
        if field == "path":
            return lambda c: low in c.path.lower()
        if field == "host":
            return lambda c: low in c.host.lower()
        if field == "tunnel":
            return lambda c: low in c.tunnel_name.lower()
        if field == "ip":
            return lambda c: c.remote_addr.startswith(value)
        if field == "header":
            return lambda c: low.encode() in c.req.head.lower() or (
                c.resp is not None and low.encode() in c.resp.head.lower()
            )
        if field == "replay_of":
            return lambda c: c.replay_of == value
        if field == "replay":
            want = low in ("yes", "true", "1")
            return lambda c: (c.replay_of is not None) == want
        needle = value.encode()
        return lambda c: needle in c.req.body or (c.resp is not None and needle in c.resp.body)
    low = tok.lower()
    return lambda c: (
        low in c.path.lower() or low == c.method.lower() or low in c.host.lower() or low in c.tunnel_name.lower()
    )


def compile_query(q: str) -> Pred:
    """Compile a query into a predicate over captures.  Raises QueryError."""
    try:
        tokens = shlex.split(q)
    except ValueError as exc:
        raise QueryError(f"cannot read the query: {exc}") from None
    preds: list[tuple[bool, Pred]] = []
    for tok in tokens:
        if tok in ("OR", "||", "|"):
            raise QueryError(f"{tok!r} is not supported: terms are ANDed (status:4xx matches 404 and 401)")
        neg = tok.startswith("-") and len(tok) > 1
        preds.append((neg, _term(tok[1:] if neg else tok)))
    if not preds:
        return lambda c: True
    return lambda c: all(p(c) != neg for neg, p in preds)
