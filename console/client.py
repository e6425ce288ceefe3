"""HTTP clients for the two APIs the console drives: the agent API and the cloud API.

They speak ngrok's wire formats, so the same console drives burrow and a real ngrok
account and agent.  burrow's additive extensions (``/api/events``, ``offset``/``q``/
``summary`` on the capture list) are used when present and detected when absent.
Nothing here touches widgets: the app calls these from workers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

# httpx is imported where it is first used, not with this module: it costs ~40 ms that
# the console's first frame does not need (the clients are made after it).


class APIError(Exception):
    """An API answered with an error body, or could not be reached."""

    def __init__(self, msg: str, status: int = 0, code: str | int | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.status = status
        self.code = code

    @property
    def unreachable(self) -> bool:
        return self.status == 0


def _error(resp: httpx.Response) -> APIError:
    try:
        body = resp.json()
        msg = body.get("msg") or resp.reason_phrase
        details = body.get("details") or {}
        if isinstance(details, dict) and details.get("err"):
            msg = f"{msg}: {details['err']}"
        return APIError(msg, resp.status_code, body.get("error_code"))
    except (ValueError, AttributeError):
        return APIError(f"{resp.status_code} {resp.reason_phrase}", resp.status_code)


async def _call(client: httpx.AsyncClient, method: str, url: str, **kw) -> httpx.Response:
    import httpx

    try:
        resp = await client.request(method, url, **kw)
    except httpx.HTTPError as exc:
        raise APIError(f"cannot reach {client.base_url}: {type(exc).__name__}") from None
    if resp.status_code >= 400:
        raise _error(resp)
    return resp


@dataclass
class Page:
    items: list[dict]
    total: int
    newest: str | None = None  # newest capture id at the time of the answer (burrow only)
    stored: int | None = None  # every capture the agent holds, matched or not (burrow only)


class AgentClient:
    """The agent API (``http://127.0.0.1:4040``)."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout)
        self.extended: bool | None = None  # does it serve burrow's extensions?

    async def close(self) -> None:
        await self.http.aclose()

    async def status(self) -> dict:
        try:
            return (await _call(self.http, "GET", "/api/status")).json()
        except APIError as exc:
            if exc.status == 404:  # older ngrok agents have no /api/status
                await _call(self.http, "GET", "/api/tunnels")
                return {"status": "online", "session": {"legs": []}}
            raise

    async def tunnels(self) -> list[dict]:
        return (await _call(self.http, "GET", "/api/tunnels")).json().get("tunnels", [])

    async def start_tunnel(self, body: dict) -> dict:
        return (await _call(self.http, "POST", "/api/tunnels", json=body)).json()

    async def stop_tunnel(self, name: str) -> None:
        await _call(self.http, "DELETE", f"/api/tunnels/{name}")

    async def requests(
        self, offset: int = 0, limit: int = 200, query: str = "", tunnel_name: str | None = None
    ) -> Page:
        """A newest-first window of captures (summaries where the agent offers them)."""
        params: dict[str, Any] = {"limit": limit}
        if self.extended is not False:
            params.update(offset=offset, summary=1)
            if query:
                params["q"] = query
        if tunnel_name:
            params["tunnel_name"] = tunnel_name
        try:
            body = (await _call(self.http, "GET", "/api/requests/http", params=params)).json()
        except APIError as exc:
            # a real ngrok agent refuses parameters it does not know (400 "failed to
            # deserialize request parameter"): ask again the way ngrok documents it
            if exc.status != 400 or self.extended is not None or "deserialize" not in exc.msg:
                raise
            self.extended = False
            return await self.requests(offset, limit, query, tunnel_name)
        if "total" in body:
            self.extended = True
            return Page(body.get("requests", []), body["total"], body.get("newest"), body.get("stored"))
        # a plain ngrok agent: no paging, no server-side query; summarise here
        self.extended = False
        items = [summarise(r) for r in body.get("requests", [])]
        if query:
            q = query.lower()
            items = [i for i in items if q in i["path"].lower() or q in i["method"].lower()]
        return Page(items[offset : offset + limit], len(items), stored=len(body.get("requests", [])))

    async def request(self, capture_id: str) -> dict:
        return (await _call(self.http, "GET", f"/api/requests/http/{capture_id}")).json()

    async def replay(self, capture_id: str, tunnel_name: str | None = None, **edits: Any) -> str | None:
        body: dict[str, Any] = {"id": capture_id}
        if tunnel_name:
            body["tunnel_name"] = tunnel_name
        body.update({k: v for k, v in edits.items() if v is not None})
        resp = await _call(self.http, "POST", "/api/requests/http", json=body)
        return resp.headers.get("burrow-capture-id")

    async def delete_request(self, capture_id: str) -> None:
        await _call(self.http, "DELETE", f"/api/requests/http/{capture_id}")

    async def clear(self) -> None:
        await _call(self.http, "DELETE", "/api/requests/http")

    async def events(self) -> AsyncIterator[tuple[str, dict]]:
        """Server-Sent Events from ``/api/events``; raises APIError(404) on a plain ngrok."""
        import httpx

        try:
            async with self.http.stream("GET", "/api/events", timeout=httpx.Timeout(10, read=None)) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise _error(resp)
                name = "message"
                async for line in resp.aiter_lines():
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        try:
                            yield name, json.loads(line[6:])
                        except ValueError:
                            continue
                        name = "message"
        except httpx.HTTPError as exc:
            raise APIError(f"event stream from {self.base_url} ended: {type(exc).__name__}") from None


def summarise(r: dict) -> dict:
    """A list row from a full ngrok capture (for agents without ``summary=1``)."""
    req = r.get("request") or {}
    resp = r.get("response") or {}
    headers = req.get("headers") or {}
    host = (headers.get("Host") or headers.get("host") or [""])[0]
    return {
        "id": r.get("id", ""),
        "tunnel_name": r.get("tunnel_name", ""),
        "remote_addr": r.get("remote_addr", ""),
        "start": r.get("start", ""),
        "duration": r.get("duration", 0),
        "method": req.get("method", ""),
        "path": req.get("uri", ""),
        "host": host,
        "status_code": resp.get("status_code"),
        "request_size": _body_size(req),
        "response_size": _body_size(resp),
        "replay_of": r.get("replay_of"),
    }


def _body_size(part: dict) -> int:
    """A capture's body size: burrow's ``body_size``, else from ngrok's ``raw`` (the whole
    message, base64) or its Content-Length header."""
    if isinstance(part.get("body_size"), int):
        return part["body_size"]
    raw = part.get("raw")
    if isinstance(raw, str) and raw:
        import base64
        import binascii

        try:
            data = base64.b64decode(raw, validate=False)
        except (binascii.Error, ValueError):
            data = b""
        _, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            return len(body)
    for name, values in (part.get("headers") or {}).items():
        if name.lower() == "content-length" and values:
            try:
                return max(0, int(values[0]))
            except (TypeError, ValueError):
                return 0
    return 0


class CloudClient:
    """The cloud API (ngrok API v2: Bearer key, ``Ngrok-Version: 2``)."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 10.0) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {api_key}", "Ngrok-Version": "2"},
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def _list(self, path: str, key: str, max_pages: int = 20) -> list[dict]:
        out: list[dict] = []
        url: str | None = path
        for _ in range(max_pages):
            if url is None:
                break
            body = (await _call(self.http, "GET", url)).json()
            out.extend(body.get(key) or [])
            url = body.get("next_page_uri")
        return out

    async def endpoints(self) -> list[dict]:
        return await self._list("/endpoints", "endpoints")

    async def agent_ingresses(self) -> list[dict]:
        return await self._list("/agent_ingresses", "ingresses")

    async def tunnel_sessions(self) -> list[dict]:
        return await self._list("/tunnel_sessions", "tunnel_sessions")

    async def create(self, path: str, body: dict) -> dict:
        return (await _call(self.http, "POST", path, json=body)).json()

    async def update(self, path: str, body: dict) -> dict:
        return (await _call(self.http, "PATCH", path, json=body)).json()

    async def delete(self, path: str) -> None:
        await _call(self.http, "DELETE", path)

    async def post_action(self, path: str) -> dict:
        return (await _call(self.http, "POST", path)).json()
