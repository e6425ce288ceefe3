"""The traffic policy document: parsing YAML or JSON text into pydantic models.

A policy is a mapping from phase (``on_http_request``, ``on_http_response``,
``on_tcp_connect``) to a list of rules; a rule has an optional ``name``, optional CEL
``expressions`` (all must match) and a list of ``actions`` (``{type, config}``).
This module only checks the *shape*; what an action's ``config`` means, and whether
an expression compiles, is the engine's business.

:func:`parse_policy` is the one entry point. It refuses YAML aliases (a few lines of
anchors can expand into billions of nodes) and bounds the text size, so it is safe to
run on anything an API client sends.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "MAX_POLICY_BYTES",
    "PHASES",
    "Action",
    "PolicyError",
    "Rule",
    "TrafficPolicy",
    "parse_policy",
]

#: The phases a policy may have, in the order they run.
PHASES = ("on_tcp_connect", "on_http_request", "on_http_response")
#: Largest policy text accepted.
MAX_POLICY_BYTES = 64 * 1024
#: Deepest ``[``/``{`` nesting accepted: PyYAML takes seconds on thousands of levels,
#: and a real policy needs fewer than ten.
MAX_NESTING = 100


class PolicyError(ValueError):
    """The text is not a valid traffic policy; the message says where and why."""


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Action(_Doc):
    """One action of a rule: ``type`` names it, ``config`` is the action's own settings."""

    type: str = Field(min_length=1, max_length=128)
    config: dict[str, Any] | None = None


class Rule(_Doc):
    """A rule runs its actions in order when all of its expressions match."""

    name: str | None = None
    expressions: list[str] | None = None
    actions: list[Action] = Field(default_factory=list)


class TrafficPolicy(_Doc):
    """A whole policy document; a phase left out has no rules."""

    on_tcp_connect: list[Rule] | None = None
    on_http_request: list[Rule] | None = None
    on_http_response: list[Rule] | None = None

    def rules(self, phase: str) -> list[Rule]:
        """The rules of ``phase`` (empty when the phase is absent)."""
        if phase not in PHASES:
            raise KeyError(phase)
        return list(getattr(self, phase) or [])


def _nesting(text: str) -> int:
    """The deepest bracket nesting in ``text`` (brackets inside strings count too)."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
    return deepest


def _load_text(text: str) -> Any:
    """JSON first (exact errors for JSON input), then YAML without aliases."""
    if _nesting(text) > MAX_NESTING:
        raise PolicyError(f"traffic_policy is nested more than {MAX_NESTING} levels deep")
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            return json.loads(text)
        except ValueError:
            pass  # YAML flow style also starts with "{": let YAML have a go
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise PolicyError("traffic_policy: YAML aliases (*name) are not supported")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PolicyError(
            f"traffic_policy is neither valid JSON nor YAML: {problem}{where}"
        ) from None


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_policy(text: str | dict) -> TrafficPolicy:
    """Parse a policy given as YAML/JSON text (or an already-decoded mapping).

    Raises :class:`PolicyError` naming the first problem, e.g.
    ``traffic_policy.on_http_request[0].actions[0].type: field required``.
    """
    if isinstance(text, str):
        if len(text.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
            raise PolicyError(f"traffic_policy is larger than {MAX_POLICY_BYTES} bytes")
        if not text.strip():
            raise PolicyError("traffic_policy is empty")
        try:
            data = _load_text(text)
        except RecursionError:
            raise PolicyError("traffic_policy is nested too deeply") from None
    else:
        data = text
    if not isinstance(data, dict):
        raise PolicyError("traffic_policy must be a mapping of phases (on_http_request, ...)")
    for key in data:
        if key not in PHASES:
            raise PolicyError(
                f"traffic_policy has an unknown phase {key!r}; expected one of {', '.join(PHASES)}"
            )
    try:
        return TrafficPolicy.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = _where(("traffic_policy", *err["loc"]))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        raise PolicyError(f"{where}: {msg}") from None
    except RecursionError:
        raise PolicyError("traffic_policy is nested too deeply") from None
