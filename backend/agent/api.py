"""The agent API at ``web_addr`` (ngrok's ``127.0.0.1:4040/api``).

Shapes follow ngrok's agent API documentation; errors use its body
``{"error_code": int, "status_code": int, "msg": str, "details": {...}}``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from pydantic import ValidationError

from backend import __version__
from backend.agent.agent import AgentError
from backend.agent.tunnels import TunnelConfig
from backend.httpserver import APIServer, Request, Response, Router, empty, json_response

if TYPE_CHECKING:
    from backend.agent.agent import Agent
    from backend.agent.tunnels import Tunnel

_CODES = {400: 102, 404: 100, 405: 101, 413: 102, 500: 103, 502: 103}


def agent_error(req: Request | None, status: int, msg: str, details: dict | None = None) -> Response:
    return json_response(
        {"error_code": _CODES.get(status, 103), "status_code": status, "msg": msg, "details": details or {}},
        status,
    )


def tunnel_json(t: Tunnel) -> dict:
    return {
        "name": t.name,
        "ID": t.endpoint_id or "",
        "uri": f"/api/tunnels/{t.name}",
        "public_url": t.public_url,
        "proto": t.config.proto,
        "config": {"addr": t.upstream.display, "inspect": t.config.inspect},
        "metrics": t.metrics.to_api(),
    }


def build_router(agent: Agent) -> Router:
    router = Router()

    async def root(req: Request) -> Response:
        return json_response(
            {
                "uri": "/api",
                "tunnels": "/api/tunnels",
                "endpoints": "/api/endpoints",
                "requests": "/api/requests/http",
                "status": "/api/status",
            }
        )

    async def status(req: Request) -> Response:
        legs = []
        if agent.session_id:
            ms = f"{agent.latency * 1000:.0f}ms" if agent.latency is not None else ""
            legs.append({"region": agent.region, "latency": ms})
        return json_response(
            {
                "status": agent.status,
                "agent_version": __version__,
                "session": {"id": agent.session_id, "legs": legs},
                "uri": "/api/status",
            }
        )

    async def list_tunnels(req: Request) -> Response:
        return json_response(
            {"tunnels": [tunnel_json(t) for t in agent.tunnels.values()], "uri": "/api/tunnels"}
        )

    async def get_tunnel(req: Request) -> Response:
        t = agent.tunnels.get(req.params["name"])
        if t is None:
            return agent_error(req, 404, f"tunnel {req.params['name']!r} not found")
        return json_response(tunnel_json(t))

    async def start_tunnel(req: Request) -> Response:
        try:
            body = req.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            tc = TunnelConfig.model_validate(body)
        except (ValueError, json.JSONDecodeError) as exc:
            msg = _validation_msg(exc) if isinstance(exc, ValidationError) else str(exc)
            return agent_error(req, 400, f"invalid tunnel configuration: {msg}")
        try:
            t = await agent.start_tunnel(tc)
        except AgentError as exc:
            return agent_error(req, 502, "failed to start tunnel", {"err": str(exc)})
        return json_response(tunnel_json(t), 201)

    async def stop_tunnel(req: Request) -> Response:
        if not await agent.stop_tunnel(req.params["name"]):
            return agent_error(req, 404, f"tunnel {req.params['name']!r} not found")
        return empty(204)

    router.add("GET", "/api", root)
    router.add("GET", "/api/status", status)
    router.add("GET", "/api/tunnels", list_tunnels)
    router.add("POST", "/api/tunnels", start_tunnel)
    router.add("GET", "/api/tunnels/{name}", get_tunnel)
    router.add("DELETE", "/api/tunnels/{name}", stop_tunnel)
    return router


def _validation_msg(exc: ValidationError) -> str:
    e = exc.errors()[0]
    loc = ".".join(str(x) for x in e.get("loc", ())) or "body"
    return f"{loc}: {e.get('msg')}"


async def start_agent_api(agent: Agent, addr: str) -> APIServer:
    server = APIServer(build_router(agent), agent_error)
    await server.start(addr)
    return server
