"""``burrow demo``: a small upstream app, a tunnel to it and a trickle of traffic.

The upstream answers JSON, HTML, XML, form posts, redirects, 404s and 500s so every
part of the console has something to show.  Traffic goes through the edge's public
listener like any client's would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from http import HTTPStatus

import httpx

from console.client import AgentClient

_PAGES = [
    ("GET", "/api/users", None),
    ("GET", "/api/users/42", None),
    ("POST", "/api/orders", {"item": "coffee", "qty": 2}),
    ("GET", "/", None),
    ("GET", "/feed.xml", None),
    ("PUT", "/api/users/42", {"name": "Ada", "email": "ada@example.com"}),
    ("DELETE", "/api/sessions/abc", None),
    ("GET", "/missing", None),
    ("GET", "/api/crash", None),
    ("POST", "/login", "user=ada&password=hunter2"),
    ("GET", "/old-home", None),
    ("PATCH", "/api/orders/7", {"status": "shipped"}),
]


def _respond(method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
    if path == "/":
        return 200, "text/html; charset=utf-8", b"<!doctype html><html><head><title>demo</title></head><body><h1>Hello from the demo app</h1><p>Served through burrow.</p></body></html>"
    if path == "/feed.xml":
        return 200, "application/xml", b"<?xml version='1.0'?><feed><entry><title>first</title></entry><entry><title>second</title></entry></feed>"
    if path == "/missing":
        return 404, "application/json", b'{"error": "not found"}'
    if path == "/api/crash":
        return 500, "application/json", b'{"error": "internal", "trace_id": "7f3a9c"}'
    if path == "/old-home":
        return 301, "text/plain", b"moved"
    if path == "/login":
        return 302, "text/plain", b"welcome"
    if path.startswith("/api/users"):
        users = [{"id": 42, "name": "Ada", "roles": ["admin", "dev"]}, {"id": 7, "name": "Linus", "roles": ["dev"]}]
        data = users[0] if path.endswith("42") else {"users": users, "total": 2}
        return 200, "application/json", json.dumps(data).encode()
    if body:
        return 201 if method == "POST" else 200, "application/json", json.dumps({"ok": True, "echo": body.decode(errors="replace")}).encode()
    return 204, "", b""


async def _serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for ln in lines[1:]:
                if ln.lower().startswith("content-length:"):
                    length = int(ln.split(":", 1)[1])
            body = await r.readexactly(length) if length else b""
            await asyncio.sleep(random.uniform(0.001, 0.05))
            status, ctype, payload = _respond(method, path, body)
            extra = "Location: /\r\n" if status in (301, 302) else ""
            ct = f"Content-Type: {ctype}\r\n" if ctype else ""
            w.write(
                f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n{ct}{extra}Content-Length: {len(payload)}\r\n\r\n".encode() + payload
            )
            await w.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        w.close()


class Demo:
    def __init__(self, agent: AgentClient, http_url: str) -> None:
        self.agent = agent
        self.http_url = http_url
        self.server: asyncio.AbstractServer | None = None
        self.public_url = ""
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(_serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        t = await self.agent.start_tunnel({"name": "demo", "proto": "http", "addr": str(port), "url": "http://demo.burrow.localhost"})
        self.public_url = t["public_url"]
        self._task = asyncio.ensure_future(self._trickle())

    async def _trickle(self) -> None:
        host = self.public_url.split("://", 1)[1].split(":", 1)[0]
        async with httpx.AsyncClient(base_url=self.http_url, timeout=10, headers={"Host": host}) as c:
            burst = 8  # fill the panes quickly, then trickle
            while True:
                method, path, body = random.choice(_PAGES)
                kw = {}
                if isinstance(body, dict):
                    kw["json"] = body
                elif isinstance(body, str):
                    kw["content"] = body
                    kw["headers"] = {"Content-Type": "application/x-www-form-urlencoded"}
                with contextlib.suppress(httpx.HTTPError):
                    await c.request(method, path, **kw)
                burst -= 1
                await asyncio.sleep(0.05 if burst > 0 else random.uniform(0.4, 1.5))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.server is not None:
            self.server.close()
