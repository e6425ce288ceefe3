"""The agent API at ``web_addr`` (ngrok's ``127.0.0.1:4040/api``).

Shapes follow ngrok's agent API documentation (seed ``003``); errors use its body
``{"error_code": int, "status_code": int, "msg": str, "details": {...}}``.  burrow's
additions are new fields and new paths only: ``replay_of``, ``body_size`` and
``truncated`` on captures, edit fields on replay, and ``GET /api/events`` (SSE).

The API has no authentication (like ngrok's), so it defends itself against the
browser next to it (:class:`LocalGuard`, on every route): the ``Host`` header must name
this listener (loopback names or the IP literal it listens on, with its port) or an
allowed host (``--web-allow-host``, ngrok's ``web_allow_hosts``), which stops DNS
rebinding; a request with a cross-origin ``Origin`` (or ``Sec-Fetch-Site``) is refused,
and a write with a body must say ``Content-Type: application/json``, which no HTML
form or "simple" cross-site request can.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pydantic import ValidationError

from backend import __version__
from backend.agent import options
from backend.agent.agent import AgentError
from backend.agent.query import QueryError, compile_query
from backend.agent.replay import ReplayError, ReplayRequest, replay
from backend.agent.tunnels import TunnelConfig
from backend.httpserver import (
    APIServer,
    Request,
    Response,
    Router,
    ServerLimits,
    StreamResponse,
    empty,
    json_response,
)

if TYPE_CHECKING:
    from backend.agent.agent import Agent
    from backend.agent.tunnels import Tunnel

_CODES = {400: 102, 403: 102, 404: 100, 405: 101, 408: 102, 413: 102, 415: 102, 431: 102, 500: 103, 502: 103}


def agent_error(req: Request | None, status: int, msg: str, details: dict | None = None) -> Response:
    return json_response(
        {"error_code": _CODES.get(status, 103), "status_code": status, "msg": msg, "details": details or {}},
        status,
    )


class BadRequest(Exception):
    pass


def _body(req: Request) -> dict:
    if not req.body.strip():
        raise BadRequest("a JSON object body is required")
    try:
        data = req.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def _validation_msg(exc: ValidationError) -> str:
    e = exc.errors()[0]
    loc = ".".join(str(x) for x in e.get("loc", ())) or "body"
    return f"{loc}: {e.get('msg')}"


def _addr_json(t: Tunnel) -> str:
    """``config.addr`` as ngrok shows it: ``http://localhost:80`` for http tunnels,
    ``localhost:22`` for tcp and tls ones (seed 003), unless the upstream is tls/https."""
    up = t.upstream
    if t.config.proto in ("tcp", "tls") and up.scheme == "tcp":
        host = f"[{up.host}]" if ":" in up.host else up.host
        return f"{host}:{up.port}"
    return up.display


def _inspects(t: Tunnel) -> bool:
    """Whether the tunnel's traffic is captured: only HTTP is, as with ngrok."""
    return bool(t.config.inspect) and t.config.proto in ("http", "https")


def tunnel_json(t: Tunnel) -> dict:
    return {
        "name": t.name,
        "ID": t.endpoint_id or "",
        "uri": f"/api/tunnels/{t.name}",
        "public_url": t.public_url,
        "proto": t.proto,
        "config": {"addr": _addr_json(t), "inspect": _inspects(t)},
        "metrics": t.metrics.to_api(),
    }


def _internal(url: str) -> bool:
    host = url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    return host.endswith(".internal")


def endpoint_json(t: Tunnel) -> dict:
    """The v3 ``/api/endpoints`` shape (what pyngrok 9 reads by default).

    ``config`` is the v2 block pyngrok falls back on; ``upstream.protocol`` (``http1``)
    is only for HTTP upstreams, as a tcp or tls endpoint speaks no HTTP version.
    """
    upstream: dict = {"url": _addr_json(t)}
    if t.config.proto in ("http", "https"):
        upstream["protocol"] = "http1"
    return {
        "id": t.endpoint_id or "",
        "name": t.name,
        "uri": f"/api/endpoints/{t.name}",
        "url": t.public_url,
        "public_url": t.public_url,
        "proto": t.proto,
        "upstream": upstream,
        "config": {"addr": _addr_json(t), "inspect": _inspects(t)},
        "traffic_policy": t.config.traffic_policy,
        "pooling_enabled": t.config.pooling_enabled,
        "bindings": [t.config.binding or ("internal" if _internal(t.public_url) else "public")],
        "metadata": t.config.metadata,
        "description": t.config.description,
        "inspect": _inspects(t),
        "metrics": t.metrics.to_api(),
    }


HOLD_HEARTBEAT = 1.0
_releasing: set[asyncio.Task] = set()


def build_router(agent: Agent) -> Router:
    router = Router()
    store = agent.capture

    async def root(req: Request) -> Response:
        return json_response(
            {
                "uri": "/api",
                "tunnels": "/api/tunnels",
                "endpoints": "/api/endpoints",
                "requests": "/api/requests/http",
                "status": "/api/status",
                "events": "/api/events",
            }
        )

    def status_json() -> dict:
        # one leg per session online: one, or one per edge (--ha-connections); ``edge``,
        # ``slot`` and ``session_id`` are burrow's additions to ngrok's leg
        legs = []
        for leg in agent.legs:
            if leg.connected:
                ms = f"{leg.latency * 1000:.0f}ms" if leg.latency is not None else ""
                legs.append(
                    {"region": leg.region, "latency": ms, "edge": leg.edge, "slot": leg.slot, "session_id": leg.session_id}
                )
        out = {
            "status": agent.status,
            "agent_version": __version__,
            "session": {"id": agent.session_id, "legs": legs},
            "uri": "/api/status",
        }
        db = store.db_status() if store is not None else None
        if db is not None:  # burrow's addition: is the --inspect-db file being written?
            out["inspect_db"] = db
        return out

    async def status(req: Request) -> Response:
        return json_response(status_json())

    # ------------------------------------------------------------- tunnels
    async def list_tunnels(req: Request) -> Response:
        return json_response(
            {"tunnels": [tunnel_json(t) for t in agent.tunnels.values()], "uri": "/api/tunnels"}
        )

    def _find(name: str) -> Tunnel | None:
        return agent.tunnels.get(name)

    async def get_tunnel(req: Request) -> Response:
        t = _find(req.params["name"])
        if t is None:
            return agent_error(req, 404, f"tunnel {req.params['name']!r} not found")
        return json_response(tunnel_json(t))

    def _configs(body: dict, name: str = "") -> list[TunnelConfig]:
        """The tunnels a v2 tunnel or v3 endpoint definition asks for (Invalid if none)."""
        try:
            if not name and not body.get("name"):
                proto = body.get("proto") if isinstance(body.get("proto"), str) else "http"
                name = agent.default_name(proto)
            return options.tunnel_configs(body, name)
        except options.OptionError as exc:
            raise _Invalid(str(exc)) from None

    async def _start(tcs: list[TunnelConfig]) -> Tunnel:
        """Start every tunnel of one definition (all or none); answer the first (https)."""
        started: list[Tunnel] = []
        try:
            for tc in tcs:
                started.append(await agent.start_tunnel(tc))
        except AgentError as exc:
            for t in started:
                await agent.stop_tunnel(t.name)
            raise _Failed(str(exc)) from None
        return started[0]

    async def start_tunnel(req: Request) -> Response:
        return json_response(tunnel_json(await _start(_configs(_body(req)))), 201)

    async def stop_tunnel(req: Request) -> Response:
        if not await agent.stop_tunnel(req.params["name"]):
            return agent_error(req, 404, f"tunnel {req.params['name']!r} not found")
        return empty(204)

    # ----------------------------------------------------------- endpoints
    async def list_endpoints(req: Request) -> Response:
        return json_response(
            {"endpoints": [endpoint_json(t) for t in agent.tunnels.values()], "uri": "/api/endpoints"}
        )

    async def get_endpoint(req: Request) -> Response:
        t = _find(req.params["name"])
        if t is None:
            return agent_error(req, 404, f"endpoint {req.params['name']!r} not found")
        return json_response(endpoint_json(t))

    async def create_endpoint(req: Request) -> Response:
        tcs = _configs(_body(req))
        return json_response(endpoint_json(await _start(tcs)), 201)

    async def put_endpoint(req: Request) -> Response:
        name = req.params["name"]
        tcs = _configs(_body(req), name)
        existed = await agent.stop_tunnel(name)
        t = await _start(tcs)
        return json_response(endpoint_json(t), 200 if existed else 201)

    async def delete_endpoint(req: Request) -> Response:
        if not await agent.stop_tunnel(req.params["name"]):
            return agent_error(req, 404, f"endpoint {req.params['name']!r} not found")
        return empty(204)

    # ------------------------------------------------------------ requests
    def _need_store() -> None:
        if store is None:
            raise _NotFound("inspection is off for this agent (inspect_db_size -1)")

    def _int_arg(req: Request, name: str) -> int | None:
        text = req.arg(name)
        if not text:
            return None
        try:
            n = int(text)
        except ValueError:
            raise BadRequest(f"{name} must be an integer, not {text!r}") from None
        if n < 0:
            raise BadRequest(f"{name} must not be negative")
        return n

    async def list_requests(req: Request) -> Response:
        """ngrok's list (``limit``, ``tunnel_name``) plus ``offset``, ``q`` and ``summary``."""
        limit = _int_arg(req, "limit")
        offset = _int_arg(req, "offset") or 0
        pred = None
        if req.arg("q"):
            try:
                pred = compile_query(req.arg("q"))
            except QueryError as exc:
                raise BadRequest(f"invalid query: {exc}") from None
        caps, total = (
            store.query(offset, limit, req.arg("tunnel_name"), pred) if store is not None else ([], 0)
        )
        summary = req.arg("summary") in ("1", "true", "yes")
        return json_response(
            {
                "uri": "/api/requests/http",
                "requests": [c.summary() if summary else c.to_api() for c in caps],
                "total": total,
                "stored": len(store) if store is not None else 0,
                # the newest capture when this answer was made, so a client merging the
                # event stream knows which events came after it
                "newest": store.newest_id() if store is not None else None,
            }
        )

    async def get_request(req: Request) -> Response:
        _need_store()
        cap = store.get(req.params["id"])
        if cap is None:
            return agent_error(req, 404, f"captured request {req.params['id']!r} not found")
        return json_response(cap.to_api())

    async def replay_request(req: Request) -> Response:
        _need_store()
        rr = ReplayRequest.model_validate(_body(req))
        cap = store.get(rr.id)
        if cap is None:
            return agent_error(req, 404, f"captured request {rr.id!r} not found")
        name = rr.tunnel_name or cap.tunnel_name
        t = _find(name)
        if t is None:
            return agent_error(req, 404, f"tunnel {name!r} not found")
        try:
            new_id = await replay(t, cap, rr)
        except ReplayError as exc:
            return agent_error(req, exc.status, str(exc))
        headers = [("Burrow-Capture-Id", new_id)] if new_id else []
        return Response(204, b"", content_type="", headers=headers)

    async def delete_request(req: Request) -> Response:
        _need_store()
        if not store.delete(req.params["id"]):
            return agent_error(req, 404, f"captured request {req.params['id']!r} not found")
        return empty(204)

    async def delete_requests(req: Request) -> Response:
        if store is not None:
            store.clear()
        return empty(204)

    async def events(req: Request) -> StreamResponse:
        hello = {
            "status": status_json(),
            "tunnels": [tunnel_json(t) for t in agent.tunnels.values()],
        }
        hold = req.arg("hold")
        if not hold:
            return StreamResponse(agent.events.stream(hello))
        if hold not in agent.tunnels:
            return agent_error(req, 404, f"tunnel {hold!r} not found")
        return StreamResponse(_held(hold, agent.events.stream(hello, heartbeat=HOLD_HEARTBEAT)))

    async def _held(name: str, stream):
        """burrow's addition: ``?hold=NAME`` ties tunnel NAME to this stream.

        ``burrow http`` attached to the local agent holds one; when its process goes away
        in any way (Ctrl+C, a closed terminal, kill -9), the stream breaks within a
        couple of heartbeats and the tunnel is stopped, so no tunnel outlives its owner.
        """
        t = agent.tunnels.get(name)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()
            if agent.tunnels.get(name) is t:  # not a newer tunnel that took the name
                task = asyncio.ensure_future(agent.stop_tunnel(name))
                _releasing.add(task)
                task.add_done_callback(_releasing.discard)

    async def guarded(handler, req: Request):
        try:
            return await handler(req)
        except BadRequest as exc:
            return agent_error(req, 400, str(exc))
        except ValidationError as exc:
            return agent_error(req, 400, f"invalid body: {_validation_msg(exc)}")
        except _Invalid as exc:
            return agent_error(req, 400, "invalid tunnel configuration", {"err": str(exc)})
        except _NotFound as exc:
            return agent_error(req, 404, str(exc))
        except _Failed as exc:
            return agent_error(req, 502, "failed to start tunnel", {"err": str(exc)})
        except RecursionError:
            return agent_error(req, 400, "the body is nested too deeply")

    def add(method: str, path: str, handler) -> None:
        router.add(method, path, lambda req, h=handler: guarded(h, req))

    add("GET", "/api", root)
    add("GET", "/api/status", status)
    add("GET", "/api/tunnels", list_tunnels)
    add("POST", "/api/tunnels", start_tunnel)
    add("GET", "/api/tunnels/{name}", get_tunnel)
    add("DELETE", "/api/tunnels/{name}", stop_tunnel)
    add("GET", "/api/endpoints", list_endpoints)
    add("POST", "/api/endpoints", create_endpoint)
    add("GET", "/api/endpoints/{name}", get_endpoint)
    add("PUT", "/api/endpoints/{name}", put_endpoint)
    add("DELETE", "/api/endpoints/{name}", delete_endpoint)
    add("GET", "/api/requests/http", list_requests)
    add("POST", "/api/requests/http", replay_request)
    add("DELETE", "/api/requests/http", delete_requests)
    add("GET", "/api/requests/http/{id}", get_request)
    add("DELETE", "/api/requests/http/{id}", delete_request)
    add("GET", "/api/events", events)
    # ngrok's inspector addresses: small HTML pages over the same data
    from backend.agent.inspector import add_pages

    add_pages(router, agent, status_json, tunnel_json)
    return router


class _NotFound(Exception):
    pass


class _Failed(Exception):
    pass


class _Invalid(Exception):
    """A tunnel definition that cannot run: 400 "invalid tunnel configuration" (ngrok's 102)."""


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_JSON_TYPES = ("application/json",)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``host[:port]`` / ``[v6][:port]`` from a Host header (lower-cased); None if malformed."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            return None
        host, rest = v[1:end], v[end + 1 :]
        if _ip(host) is None:
            return None
        if not rest:
            return host, None
        if not rest.startswith(":"):
            return None
        port_s = rest[1:]
    else:
        host, sep, port_s = v.partition(":")
        if not sep:
            return (host, None) if host else None
        if ":" in port_s:
            return None  # a bare IPv6 literal is not a valid Host
    if not port_s.isdigit() or len(port_s) > 5:
        return None
    return host, int(port_s)


def parse_allow_hosts(items: Iterable[str]) -> list[tuple[str, int | None]]:
    """Check ``NAME`` / ``NAME:PORT`` entries (ValueError names the bad one)."""
    out = []
    for item in items:
        parsed = _split_host(item)
        if parsed is None or not parsed[0]:
            raise ValueError(f"invalid allowed host {item!r} (expected NAME or NAME:PORT)")
        out.append(parsed)
    return out


class LocalGuard:
    """DNS-rebinding and CSRF checks for an unauthenticated local API.

    ``allow_hosts`` adds names a client may use (``name`` for any port or
    ``name:port``), e.g. when a reverse proxy or a container network puts another name
    in front of the API.
    """

    def __init__(
        self,
        server: APIServer,
        allow_hosts: Iterable[str] = (),
        tunnel_hosts: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self.server = server
        # host names of the agent's own tunnels whose upstream is this listener: a
        # tunnel pointed at the web address serves the API and the pages through it,
        # as ngrok's does (the name is one the user's edge gave the user, so no
        # attacker's DNS can rebind it to us)
        self.tunnel_hosts = tunnel_hosts
        self.extra_any_port: set[str] = set()
        self.extra_exact: set[tuple[str, int]] = set()
        for host, port in parse_allow_hosts(allow_hosts):
            if port is None:
                self.extra_any_port.add(host)
            else:
                self.extra_exact.add((host, port))

    def host_allowed(self, value: str) -> bool:
        parsed = _split_host(value)
        if parsed is None:
            return False
        host, port = parsed
        if host in self.extra_any_port or (port is not None and (host, port) in self.extra_exact):
            return True
        return self._local(host, port) or host in self.tunnel_hosts()

    def _local(self, host: str, port: int | None) -> bool:
        bound_host, bound_port = self.server.addr[0], self.server.addr[1]
        if (port if port is not None else 80) != bound_port:
            return False
        if host == "localhost":
            return True
        ip = _ip(host)
        if ip is None:
            return False  # any other name could be re-pointed at us by its DNS owner
        if ip.is_loopback:
            return True
        bound = _ip(bound_host)
        # an IP literal cannot be rebound: it is fine if we listen on it (or on all)
        return bound is not None and (bound.is_unspecified or ip == bound)

    def __call__(self, req: Request) -> Response | None:
        host = req.headers.get("host")
        # A browser always sends Host; a request without one is a local tool's (HTTP/1.0).
        if host is not None and not self.host_allowed(host):
            return agent_error(
                req,
                403,
                f"Host header {host[:100]!r} is not allowed; use localhost or the listen "
                "address, or add it with --web-allow-host",
            )
        site = req.headers.get("sec-fetch-site")
        if site is not None and site.strip().lower() not in ("same-origin", "none"):
            return agent_error(req, 403, f"cross-site request refused (Sec-Fetch-Site: {site[:40]})")
        origin = req.headers.get("origin")
        if origin is not None and not self._same_origin(origin, host):
            return agent_error(req, 403, f"cross-origin request from {origin[:100]!r} refused")
        if req.method not in _SAFE_METHODS:
            ctype = req.headers.get("content-type")
            if req.body or ctype is not None:
                media = (ctype or "").split(";", 1)[0].strip().lower()
                if media not in _JSON_TYPES:
                    return agent_error(
                        req,
                        415,
                        f"Content-Type {(ctype or '')[:60]!r} is not accepted; send "
                        "'Content-Type: application/json'",
                    )
        return None

    @staticmethod
    def _same_origin(origin: str, host: str | None) -> bool:
        if host is None:
            return False
        try:
            parts = urlsplit(origin.strip())
        except ValueError:
            return False
        scheme = parts.scheme.lower()
        # https: a page served through an https tunnel to this listener
        if scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            return False
        a, b = _split_host(parts.netloc), _split_host(host)
        if a is None or b is None:
            return False
        default = 443 if scheme == "https" else 80
        return (a[0], a[1] or default) == (b[0], b[1] or default)


def _own_tunnel_hosts(agent: Agent, addr: tuple) -> set[str]:
    """Host names of the agent's online http(s) tunnels whose upstream is ``addr``."""
    out = set()
    bound = _ip(str(addr[0]))
    for t in agent.tunnels.values():
        up = t.upstream
        if not t.public_url or t.config.proto not in ("http", "https") or getattr(up, "port", None) != addr[1]:
            continue
        ip = _ip(getattr(up, "host", ""))
        local = up.host == "localhost" or (ip is not None and (ip.is_loopback or ip == bound))
        if not local:
            continue
        parsed = _split_host(urlsplit(t.public_url).netloc)
        if parsed is not None:
            out.add(parsed[0])
    return out


async def start_agent_api(
    agent: Agent,
    addr: str,
    *,
    allow_hosts: Iterable[str] = (),
    limits: ServerLimits | None = None,
) -> APIServer:
    server = APIServer(build_router(agent), agent_error, limits=limits)

    def tunnel_hosts() -> set[str]:
        return _own_tunnel_hosts(agent, server.addr)

    server.guard = LocalGuard(server, allow_hosts, tunnel_hosts)
    await server.start(addr)
    return server
