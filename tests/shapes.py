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
