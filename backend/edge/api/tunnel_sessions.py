"""``/tunnel_sessions``: the account's live agent sessions, and commands to them.

``stop`` ends the session and takes its endpoints offline at once (the agent exits);
``restart`` ends it and tells the agent to reconnect (it comes back with a new session
id and re-binds the same URLs); ``update`` is accepted and does nothing, since burrow
agents are updated with the package, not in place. All three answer 200 with ``{}``,
with or without a body, because the official client expects JSON back. Sessions of
ngrok's own agents (:mod:`backend.edge.ngrok_agent`) get each command as ngrok's request
and answer it; a refusal comes back as a 400 with the agent's text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from backend.edge import ngrok_agent
from backend.edge.api.core import (
    APIError,
    caller,
    check_id,
    dump,
    handler,
    not_found,
    page_params,
    paged,
    parse_body,
)
from backend.edge.api.filtering import wire_obj
from backend.edge.ngrok_agent import NgrokSession
from backend.edge.sessions import Session
from backend.httpserver import Request, Response, Router, json_response
from backend.schema import cloud as w
from backend.store.base import parse_timestamp, utcnow

if TYPE_CHECKING:
    from backend.edge.server import Edge

SESSION_PREFIX = "ts"


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def wire(base: str, s: Session) -> w.TunnelSession:
    try:
        started = parse_timestamp(s.started_at)
    except ValueError:
        started = utcnow()
    cred = None
    if s.credential_id:
        cred = w.Ref(id=s.credential_id, uri=f"{base}/credentials/{s.credential_id}")
    return w.TunnelSession(
        agent_version=s.agent_version or None,
        credential=cred,
        id=s.id,
        ip=s.ip or None,
        metadata=s.metadata or None,
        os=s.os or None,
        region=s.region or None,
        started_at=started,
        transport=s.transport or None,
        uri=f"{base}/tunnel_sessions/{s.id}",
    )


#: the commands of ``POST /tunnel_sessions/{id}/<command>``
COMMANDS = ("stop", "restart", "update")
_NGROK_COMMANDS = {
    "stop": (ngrok_agent.STOP, {}),
    "restart": (ngrok_agent.RESTART, {}),
    "update": (ngrok_agent.UPDATE, {"Version": "", "PermitMajorVersion": False}),
}


async def run_command(edge: Edge, s: Session, command: str) -> tuple[int, str] | None:
    """Run ``command`` on a session this edge holds: None when done, else (HTTP status,
    message).  ngrok's agents get the command as a request and answer it; an agent that
    refuses (the SDK without a handler) keeps its session and the caller gets its text.
    (Also run for another edge's API: backend/cluster/peer.py.)"""
    if isinstance(s, NgrokSession):
        kind, body = _NGROK_COMMANDS[command]
        err = await s.command(kind, body)
        return (400, f"The agent refused the command: {err}") if err else None
    if command == "update":  # burrow agents are updated with the package, not in place
        return None
    if not edge.stop_session(s.id, restart=command == "restart"):
        return 404, ""
    return None


class TunnelSessionsAPI:
    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    def register(self, router: Router) -> None:
        router.add("GET", "/tunnel_sessions", handler(self.list))
        router.add("GET", "/tunnel_sessions/{id}", handler(self.get))
        router.add("POST", "/tunnel_sessions/{id}/stop", handler(self.stop))
        router.add("POST", "/tunnel_sessions/{id}/restart", handler(self.restart))
        router.add("POST", "/tunnel_sessions/{id}/update", handler(self.update))

    async def _session(self, req: Request):
        """The caller's live session ``{id}``: one this edge holds, or (cluster mode) a
        RemoteSessionInfo of one another edge holds."""
        id_ = check_id(req.params["id"], SESSION_PREFIX, "tunnel session")
        account_id = caller(req).account_id
        s = self.edge.registry.sessions.get(id_)
        if s is not None and not s.closed and s.account_id == account_id:
            return s
        if self.edge.cluster is not None:
            found = await self.edge.cluster.remote_sessions(account_id, id_)
            if found:
                return found[0]
        raise not_found("tunnel session", id_)

    async def list(self, req: Request) -> Response:
        who = caller(req)
        page = page_params(req, item=w.TunnelSession)
        sessions: list = [
            s
            for s in self.edge.registry.sessions.values()
            if s.account_id == who.account_id and not s.closed
        ]
        if self.edge.cluster is not None:  # every edge lists every session of the cluster
            mine = {s.id for s in sessions}
            sessions += [r for r in await self.edge.cluster.remote_sessions(who.account_id) if r.id not in mine]
        sessions.sort(key=lambda s: s.id, reverse=True)
        if page.before_id is not None:
            sessions = [s for s in sessions if s.id < page.before_id]
        items = page.select([wire(req.base_url, s) for s in sessions], wire_obj)
        items, next_uri = paged(req, page, items)
        return dump(
            w.TunnelSessionList(
                tunnel_sessions=items,
                uri=f"{req.base_url}/tunnel_sessions",
                next_page_uri=next_uri,
            )
        )

    async def get(self, req: Request) -> Response:
        return dump(wire(req.base_url, await self._session(req)))

    async def _command(self, req: Request, command: str) -> Response:
        s = await self._session(req)
        parse_body(req, _NoParams)
        if isinstance(s, Session):
            failed = await run_command(self.edge, s, command)
        else:  # held by another edge of the cluster: that edge runs it
            assert self.edge.cluster is not None
            failed = await self.edge.cluster.command_remote(s, command)
        if failed is not None:
            status, msg = failed
            if status == 404:
                raise not_found("tunnel session", s.id)
            if status == 400:
                raise APIError(400, "ERR_NGROK_400", msg)
            raise APIError(502, "ERR_NGROK_502", f"The command could not be delivered: {msg}")
        return json_response({})

    async def stop(self, req: Request) -> Response:
        return await self._command(req, "stop")

    async def restart(self, req: Request) -> Response:
        return await self._command(req, "restart")

    async def update(self, req: Request) -> Response:
        return await self._command(req, "update")


__all__ = ["TunnelSessionsAPI"]
