"""The ``filter`` query parameter of list resources: a CEL predicate over each object.

ngrok's API filtering (``GET /endpoints?filter=obj.type == "cloud"``): the expression
sees one resource at a time as ``obj`` (every documented field, ``null`` when empty,
``*_at`` fields as CEL timestamps) and ``time.now``; objects for which it is ``true``
are listed, then paged as usual. Besides standard CEL, ngrok's timestamp helpers
``timestamp(time.now).subtract("7d")`` and ``.add("1h")`` work.

Compiled by the traffic policy engine's :func:`~backend.policy.engine.compile_expr`
(same CEL library, same bounds on length and comprehension nesting); evaluating a whole
list has a time budget. Every problem is ngrok's 400 ``ERR_NGROK_215`` naming it.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from typing import Any

import cel

from backend.edge.api.core import APIError
from backend.policy import PolicyError
from backend.policy.engine import compile_expr

__all__ = ["MAX_FILTER_CHARS", "Filter", "compile_filter"]

#: Longest filter accepted (ngrok documents no number; a query string stays well under it).
MAX_FILTER_CHARS = 2048
#: Seconds one list request may spend evaluating its filter over every object.
EVAL_BUDGET = 0.5

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|d|h|m|s)")
_UNITS = {
    "d": dt.timedelta(days=1),
    "h": dt.timedelta(hours=1),
    "m": dt.timedelta(minutes=1),
    "s": dt.timedelta(seconds=1),
    "ms": dt.timedelta(milliseconds=1),
    "us": dt.timedelta(microseconds=1),
    "µs": dt.timedelta(microseconds=1),
    "ns": dt.timedelta(microseconds=0.001),
}


def _bad(msg: str) -> APIError:
    return APIError(400, "ERR_NGROK_215", f"Invalid filter: {msg}")


def parse_duration(value: Any) -> dt.timedelta:
    """``"7d"``, ``"1h30m"``, ``"90s"`` (or a CEL duration) as a timedelta."""
    if isinstance(value, dt.timedelta):
        return value
    text = str(value).strip()
    sign = -1 if text.startswith("-") else 1
    text = text.lstrip("+-")
    pos, total = 0, dt.timedelta()
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise ValueError(f"{value!r} is not a duration such as \"7d\", \"12h\" or \"30m\"")
    return sign * total


def _subtract(ts: Any, amount: Any) -> dt.datetime:
    if not isinstance(ts, dt.datetime):
        raise ValueError("subtract() applies to a timestamp")
    return ts - parse_duration(amount)


def _add(ts: Any, amount: Any) -> dt.datetime:
    if not isinstance(ts, dt.datetime):
        raise ValueError("add() applies to a timestamp")
    return ts + parse_duration(amount)


_STRING = re.compile(r"'''.*?'''|\"\"\".*?\"\"\"|'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"", re.S)
_FIELD = re.compile(r"(?<![\w.])obj\s*\.\s*([A-Za-z_]\w*)")


def fields_named(source: str) -> set[str]:
    """The top-level fields of ``obj`` an expression names (outside string literals)."""
    code = _STRING.sub('""', source)
    return {m.group(1) for m in _FIELD.finditer(code)}


class Filter:
    """A compiled filter; :meth:`select` keeps the objects it holds true for."""

    def __init__(self, source: str, fields: frozenset[str] | None = None) -> None:
        if len(source) > MAX_FILTER_CHARS:
            raise _bad(f"the expression is longer than {MAX_FILTER_CHARS} characters.")
        try:
            self.expr = compile_expr(source, "filter")
        except PolicyError as exc:
            raise _bad(str(exc).removeprefix("filter: ") + ".") from None
        unknown = set(self.expr.names) - {"obj", "time"}
        if unknown:
            raise _bad(
                f"unknown variable {sorted(unknown)[0]!r}; the object is 'obj' (e.g. obj.id == \"...\")."
            )
        if fields is not None:
            missing = sorted(fields_named(source) - fields)
            if missing:
                raise _bad(f"{missing[0]!r} is not a field of this resource.")
        self.source = source

    def _context(self) -> cel.Context:
        ctx = cel.Context()
        ctx.add_variable("time", {"now": dt.datetime.now(dt.UTC)})
        ctx.add_function("subtract", _subtract)
        ctx.add_function("add", _add)
        return ctx

    def select(self, items: list, as_obj) -> list:
        """The items whose ``as_obj(item)`` (a dict of the wire fields) the filter accepts."""
        ctx = self._context()
        deadline = time.perf_counter() + EVAL_BUDGET
        kept = []
        for item in items:
            if time.perf_counter() > deadline:
                raise _bad("evaluating it took too long; narrow it or page through the list.")
            ctx.add_variable("obj", as_obj(item))
            try:
                result = self.expr.program.execute(ctx)
            except KeyError as exc:
                raise _bad(f"the object has no field {exc.args[0]!r}.") from None
            except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
                first = str(exc).split("\n", 1)[0]
                raise _bad(f"{first}.") from None
            if not isinstance(result, bool):
                raise _bad(f"the expression must be true or false, not {type(result).__name__}.")
            if result:
                kept.append(item)
        return kept


def compile_filter(source: str | None, fields: frozenset[str] | None = None) -> Filter | None:
    """The request's ``filter`` compiled, or None when it is absent or blank.

    ``fields`` (the resource's wire fields) lets an unknown ``obj.field`` fail at once,
    even on an empty list (``obj["field"]`` is checked when evaluated).
    """
    if source is None or not source.strip():
        return None
    return Filter(source, fields)


def wire_obj(model) -> dict:
    """What a filter sees of a wire model: every field (None when empty), datetimes kept."""
    return model.model_dump(mode="python", context={"all_fields": True})
