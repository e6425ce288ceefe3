"""Compare JSON answers with the seeds' example responses: same keys, same JSON types."""

from __future__ import annotations


def _kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "number"
    return type(v).__name__


def shape_errors(expected, actual, path: str = "$", extra_ok: bool = True) -> list[str]:
    """Every key of ``expected`` must be in ``actual`` with the same JSON type.

    Lists are compared element-wise against the expected list's first element.
    Additive fields in ``actual`` are allowed (the APIs may extend, never change).
    """
    errs: list[str] = []
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected object, got {_kind(actual)}"]
        for k, v in expected.items():
            if k not in actual:
                errs.append(f"{path}.{k}: missing")
            else:
                errs += shape_errors(v, actual[k], f"{path}.{k}", extra_ok)
        if not extra_ok:
            errs += [f"{path}.{k}: unexpected" for k in actual if k not in expected]
        return errs
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [f"{path}: expected array, got {_kind(actual)}"]
        if expected and actual:
            for i, item in enumerate(actual):
                errs += shape_errors(expected[0], item, f"{path}[{i}]", extra_ok)
        return errs
    if _kind(expected) != _kind(actual) and expected is not None:
        return [f"{path}: expected {_kind(expected)}, got {_kind(actual)}"]
    return errs


# Seed 003 (ngrok agent API), example responses with the placeholder bytes made real.
METRICS = {
    "conns": {
        "count": 0, "gauge": 0, "rate1": 0, "rate5": 0, "rate15": 0,
        "p50": 0, "p90": 0, "p95": 0, "p99": 0,
    },
    "http": {
        "count": 0, "rate1": 0, "rate5": 0, "rate15": 0,
        "p50": 0, "p90": 0, "p95": 0, "p99": 0,
    },
}
TUNNEL = {
    "name": "command_line",
    "uri": "/api/tunnels/command_line",
    "public_url": "https://d95211d2.ngrok.io",
    "proto": "https",
    "config": {"addr": "localhost:80", "inspect": True},
    "metrics": METRICS,
}
TUNNEL_LIST = {"tunnels": [TUNNEL], "uri": "/api/tunnels"}
CAPTURED = {
    "uri": "/api/requests/http/548fb5c700000002",
    "id": "548fb5c700000002",
    "tunnel_name": "command_line (http)",
    "remote_addr": "192.168.100.25",
    "start": "2014-12-15T20:32:07-08:00",
    "duration": 3893202,
    "request": {
        "method": "GET",
        "proto": "HTTP/1.1",
        "headers": {"Accept": ["*/*"]},
        "uri": "/favicon.ico",
        "raw": "R0VU",
    },
    "response": {
        "status": "502 Bad Gateway",
        "status_code": 502,
        "proto": "HTTP/1.1",
        "headers": {"Content-Length": ["1716"]},
        "raw": "SFRUUA==",
    },
}
CAPTURED_LIST = {"uri": "/api/requests/http", "requests": [CAPTURED]}
STATUS = {
    "status": "online",
    "agent_version": "3.0.0",
    "session": {"legs": [{"region": "us", "latency": "87ms"}]},
    "uri": "/api/status",
}


# ------------------------------------------------------------- strict, key-by-key walk
#: Numbers in ngrok's metrics that are rates or percentiles: float64 in ngrok's agent,
#: so a fraction is right there even where the seed's example shows ``0``.
FRACTIONAL_OK = frozenset(("rate1", "rate5", "rate15", "p50", "p90", "p95", "p99"))


def _strict_kind(v) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "float"
    return _kind(v)


def strict_shape_errors(
    expected, actual, path: str = "$", skip: frozenset[str] = frozenset(), nulls_ok: frozenset[str] = frozenset()
) -> list[str]:
    """:func:`shape_errors`, stricter in two ways, for walking the seeds' examples:

    - an integer in the example must be an integer in the answer (not ``0.0``), except
      for fractional rates and percentiles (:data:`FRACTIONAL_OK`);
    - a key the example leaves out must not be sent as ``null`` (a client testing
      ``"tunnel" in obj`` would disagree with ngrok), unless named in ``nulls_ok``.

    ``skip`` names keys not compared at all (each documented by the caller).
    """
    key = path.rsplit(".", 1)[-1].split("[", 1)[0]
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected object, got {_kind(actual)}"]
        errs: list[str] = []
        for k, v in expected.items():
            if k in skip:
                continue
            if k not in actual:
                errs.append(f"{path}.{k}: missing")
            else:
                errs += strict_shape_errors(v, actual[k], f"{path}.{k}", skip, nulls_ok)
        errs += [
            f"{path}.{k}: sent as null, the example leaves it out"
            for k, v in actual.items()
            if v is None and k not in expected and k not in nulls_ok
        ]
        return errs
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [f"{path}: expected array, got {_kind(actual)}"]
        errs = []
        if expected and actual:
            for i, item in enumerate(actual):
                errs += strict_shape_errors(expected[0], item, f"{path}[{i}]", skip, nulls_ok)
        return errs
    if expected is None:
        return []
    want, got = _strict_kind(expected), _strict_kind(actual)
    if want == "integer" and got == "float" and key in FRACTIONAL_OK and not actual.is_integer():
        return []  # a fractional rate; a whole one is written as Go writes it: 0, not 0.0
    if want != got:
        return [f"{path}: expected {want} {expected!r}, got {got} {actual!r}"]
    return []


def _loose_json(text: str):
    """Parse an example as printed in the seeds: ``...`` elisions and trailing commas."""
    import json
    import re

    lines = [ln for ln in text.splitlines() if ln.strip() not in ("...", "...,")]
    cleaned = re.sub(r",(\s*[}\]])", r"\1", "\n".join(lines))
    return json.loads(cleaned)


def seed_example_responses(seeds_dir) -> list[tuple[str, str, object]]:
    """Every "Example Response" JSON in the seed documents: (file, section, value).

    The section is the nearest heading-like line above (e.g. "List Endpoints").
    """
    from pathlib import Path

    found = []
    for path in sorted(Path(seeds_dir).glob("*.txt")):
        text = path.read_text()
        pos = 0
        while (at := text.find("Example Response", pos)) != -1:
            start = text.find("{", at)
            depth, i = 0, start
            while i < len(text):
                c = text[i]
                if c == '"':
                    i = text.find('"', i + 1)
                    while text[i - 1] == "\\":
                        i = text.find('"', i + 1)
                elif c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            section = _section_before(text, at)
            found.append((path.name, section, _loose_json(text[start : i + 1])))
            pos = i + 1
    return found


_SECTIONS = (
    "Create Endpoint", "List Endpoints", "Get Endpoint", "Update Endpoint",
    "Create Agent Ingress", "Get Agent Ingress", "List Agent Ingresses", "Update Agent Ingress",
    "List Tunnels", "Start tunnel", "Tunnel detail", "List Captured Requests",
    "Captured Request Detail",
)  # fmt: skip


def _section_before(text: str, at: int) -> str:
    best, best_pos = "", -1
    for name in _SECTIONS:
        p = text.rfind(f"\n{name}\n", 0, at)
        if p > best_pos:
            best, best_pos = name, p
    return best
