"""Deterministic data for console snapshots and screenshots, served over real HTTP.

Snapshots need the same pixels on every run, so the ids, times, ports and metrics
here are fixed.  They are served in the exact wire shapes of the agent API and the
cloud API (using burrow's own HTTP server), so the console code under test is the
real one, from the HTTP client up.  Behaviour is tested against a real backend in
``test_pilot.py``; this module only pins what the screen shows.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading

from backend.httpserver import APIServer, Request, Response, Router, StreamResponse, json_response

START = "2026-01-02T03:04:{:02d}+00:00"


def _metrics(count: int) -> dict:
    return {
        "conns": {"count": count, "gauge": 2, "rate1": 1.25, "rate5": 0.8, "rate15": 0.31,
                  "p50": 12_000_000, "p90": 48_000_000, "p95": 60_000_000, "p99": 90_000_000},
        "http": {"count": count, "rate1": 1.25, "rate5": 0.8, "rate15": 0.31,
                 "p50": 9_500_000, "p90": 41_000_000, "p95": 55_000_000, "p99": 80_000_000},
    }


TUNNELS = [
    {"name": "web", "ID": "ep_web", "uri": "/api/tunnels/web", "public_url": "https://web.burrow.localhost",
     "proto": "https", "config": {"addr": "http://localhost:8080", "inspect": True}, "metrics": _metrics(128)},
    {"name": "db", "ID": "ep_db", "uri": "/api/tunnels/db", "public_url": "tcp://localhost:20001",
     "proto": "tcp", "config": {"addr": "tcp://localhost:5432", "inspect": False}, "metrics": _metrics(7)},
]

_ROWS = [
    ("GET", "/api/users", 200, 9_200_000, 1_834),
    ("POST", "/api/orders", 201, 48_100_000, 212),
    ("GET", "/", 200, 3_900_000, 5_120),
    ("PUT", "/api/users/42", 200, 11_700_000, 96),
    ("DELETE", "/api/sessions/abc", 204, 2_100_000, 0),
    ("GET", "/missing", 404, 1_500_000, 22),
    ("GET", "/api/crash", 500, 230_400_000, 41),
    ("POST", "/login", 302, 6_600_000, 7),
    ("PATCH", "/api/orders/7", 200, 15_000_000, 48),
    ("GET", "/feed.xml", 200, 7_700_000, 105),
]


def _capture_rows() -> list[dict]:
    rows = []
    n = 30
    for i in range(n):
        method, path, status, dur, size = _ROWS[i % len(_ROWS)]
        idx = n - i  # newest first
        rows.append({
            "id": f"{idx:016x}",
            "uri": f"/api/requests/http/{idx:016x}",
            "tunnel_name": "web",
            "remote_addr": f"203.0.113.{10 + i % 5}",
            "start": START.format(59 - i),
            "duration": dur,
            "method": method,
            "path": path,
            "host": "web.burrow.localhost",
            "status_code": None if i == 0 else status,
            "request_size": 34 if method in ("POST", "PUT", "PATCH") else 0,
            "response_size": size,
            "replay_of": f"{idx - 3:016x}" if i == 2 else None,
        })
    return rows


ROWS = _capture_rows()

# Requests per second of each tunnel over the last ticks, sent as the agent's ``metrics``
# events after ``hello`` so the Tunnels pane has a sparkline to draw.  The counts end at
# the tunnels' own totals (128 and 7).
RATES = {
    "web": [0, 2, 5, 3, 8, 13, 9, 4, 6, 11, 7, 3, 1],
    "db": [0, 0, 1, 0, 0, 2, 0, 1, 0, 0, 0, 1, 0],
}


def _metrics_ticks(tunnels: list[dict]) -> list[dict]:
    ticks = []
    for i in range(len(RATES["web"])):
        tick = {}
        for t in tunnels:
            rates = RATES.get(t["name"], [0] * len(RATES["web"]))
            end = t["metrics"]["http"]["count"]
            tick[t["name"]] = _metrics(end - sum(rates[i + 1:]))
        ticks.append({"tunnels": tick})
    return ticks


def _detail(row: dict) -> dict:
    body = b'{"users": [{"id": 42, "name": "Ada", "roles": ["admin", "dev"]}], "total": 1}'
    req_raw = (f"{row['method']} {row['path']} HTTP/1.1\r\nHost: web.burrow.localhost\r\n"
               "User-Agent: curl/8.5.0\r\nAccept: application/json\r\n\r\n").encode()
    resp_raw = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    return {
        "uri": row["uri"], "id": row["id"], "tunnel_name": row["tunnel_name"],
        "remote_addr": row["remote_addr"], "start": row["start"], "duration": row["duration"],
        "request": {"method": row["method"], "proto": "HTTP/1.1",
                    "headers": {"Host": ["web.burrow.localhost"], "User-Agent": ["curl/8.5.0"], "Accept": ["application/json"]},
                    "uri": row["path"], "raw": base64.b64encode(req_raw).decode(), "body_size": 0, "truncated": False},
        "response": {"status": "200 OK", "status_code": 200, "proto": "HTTP/1.1",
                     "headers": {"Content-Type": ["application/json"], "Content-Length": [str(len(body))]},
                     "raw": base64.b64encode(resp_raw).decode(), "body_size": len(body), "truncated": False},
        "replay_of": row["replay_of"],
    }


def _ref(kind: str, id_: str) -> dict:
    return {"id": id_, "uri": f"http://api.invalid/{kind}/{id_}"}


ENDPOINTS = [
    {"id": "ep_web", "type": "agent", "url": "https://web.burrow.localhost", "proto": "https",
     "bindings": ["public"], "upstream_url": "http://localhost:8080", "tunnel_session": _ref("tunnel_sessions", "ts_2abc")},
    {"id": "ep_db", "type": "agent", "url": "tcp://localhost:20001", "proto": "tcp",
     "bindings": ["public"], "upstream_url": "tcp://localhost:5432", "tunnel_session": _ref("tunnel_sessions", "ts_2abc")},
    {"id": "ep_front", "type": "cloud", "url": "https://front.burrow.localhost", "proto": "https",
     "bindings": ["public"], "upstream_url": None, "tunnel_session": None},
]

INGRESSES = [
    {"id": "agin_1", "domain": "connect.example.com", "description": "office agents",
     "region_domains": ["tunnel.local.connect.example.com"],
     "certificate_management_policy": {"authority": "letsencrypt", "private_key_type": "ecdsa"},
     "certificate_management_status": {"renews_at": "2026-03-01T00:00:00Z", "provisioning_job": None}},
]


def build_router(
    tunnels: list[dict] = TUNNELS,
    rows: list[dict] = ROWS,
    endpoints: list[dict] = ENDPOINTS,
    ingresses: list[dict] = INGRESSES,
) -> Router:
    """The fixture's agent API and cloud API; pass empty lists for a fresh install."""
    router = Router()
    sessions_data = [
        {"id": "ts_2abc", "uri": "http://api.invalid/tunnel_sessions/ts_2abc", "agent_version": "0.4.0",
         "os": "linux", "ip": "203.0.113.10", "region": "local", "started_at": "2026-01-02T02:58:11Z",
         "transport": "tls", "credential": _ref("credentials", "cr_1xyz"), "metadata": None},
        {"id": "ts_1def", "uri": "http://api.invalid/tunnel_sessions/ts_1def", "agent_version": "3.19.0",
         "os": "darwin", "ip": "198.51.100.7", "region": "local", "started_at": "2026-01-01T22:14:05Z",
         "transport": "tls", "credential": _ref("credentials", "cr_1xyz"), "metadata": None},
    ]

    def page(items, key):
        return json_response({key: items, "uri": f"/{key}", "next_page_uri": None})

    async def status(req: Request) -> Response:
        return json_response({"status": "online", "agent_version": "x", "uri": "/api/status",
                              "session": {"legs": [{"region": "local", "latency": "3ms"}]}})

    async def list_tunnels(req: Request) -> Response:
        return json_response({"tunnels": tunnels, "uri": "/api/tunnels"})

    async def requests(req: Request) -> Response:
        offset = int(req.arg("offset") or 0)
        limit = int(req.arg("limit") or 100)
        q = (req.arg("q") or "").lower()
        matched = [r for r in rows if q in r["path"].lower()] if q else rows
        return json_response({"uri": "/api/requests/http", "requests": matched[offset: offset + limit],
                              "total": len(matched), "stored": len(rows)})

    async def detail(req: Request) -> Response:
        row = next((r for r in rows if r["id"] == req.params["id"]), None)
        if row is None:
            return json_response({"error_code": 100, "status_code": 404, "msg": "not found", "details": {}}, 404)
        return json_response(_detail(row))

    async def events(req: Request) -> StreamResponse:
        async def gen():
            yield b"event: hello\ndata: " + json.dumps({"status": {"status": "online", "session": {"legs": [{"region": "local", "latency": "3ms"}]}}, "tunnels": tunnels}).encode() + b"\n\n"
            for tick in _metrics_ticks(tunnels):
                yield b"event: metrics\ndata: " + json.dumps(tick).encode() + b"\n\n"
            await asyncio.sleep(3600)

        return StreamResponse(gen())

    async def list_endpoints(req: Request) -> Response:
        return page(endpoints, "endpoints")

    async def list_ingresses(req: Request) -> Response:
        return page(ingresses, "ingresses")

    async def sessions(req: Request) -> Response:
        return page(sessions_data, "tunnel_sessions")

    router.add("GET", "/api/status", status)
    router.add("GET", "/api/tunnels", list_tunnels)
    router.add("GET", "/api/requests/http", requests)
    router.add("GET", "/api/requests/http/{id}", detail)
    router.add("GET", "/api/events", events)
    router.add("GET", "/endpoints", list_endpoints)
    router.add("GET", "/agent_ingresses", list_ingresses)
    router.add("GET", "/tunnel_sessions", sessions)
    return router


class FixtureServer:
    """Serves the fixture on 127.0.0.1 (port 0) from its own thread and event loop."""

    def __init__(self, **data) -> None:
        """``data``: what to serve instead of the fixture (see :func:`build_router`)."""
        self.data = data
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        def err(req, status, msg):
            return json_response({"error_code": 100, "status_code": status, "msg": msg, "details": {}}, status)

        server = APIServer(build_router(**self.data), err)
        host, port = self.loop.run_until_complete(server.start("127.0.0.1:0"))
        self.url = f"http://{host}:{port}"
        self._ready.set()
        self.loop.run_forever()
        # shut down tidily: stop serving, cancel the open connections' tasks
        self.loop.run_until_complete(server.stop())
        tasks = asyncio.all_tasks(self.loop)
        for t in tasks:
            t.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.close()

    def __enter__(self) -> FixtureServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def fixed_clock(start: str) -> str:
    return start[11:19]
