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


class TunnelSessionsAPI:
    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    def register(self, router: Router) -> None:
        router.add("GET", "/tunnel_sessions", handler(self.list))
        router.add("GET", "/tunnel_sessions/{id}", handler(self.get))
        router.add("POST", "/tunnel_sessions/{id}/stop", handler(self.stop))
        router.add("POST", "/tunnel_sessions/{id}/restart", handler(self.restart))
        router.add("POST", "/tunnel_sessions/{id}/update", handler(self.update))

    def _session(self, req: Request) -> Session:
        id_ = check_id(req.params["id"], SESSION_PREFIX, "tunnel session")
        s = self.edge.registry.sessions.get(id_)
        if s is None or s.closed or s.account_id != caller(req).account_id:
            raise not_found("tunnel session", id_)
        return s

    async def list(self, req: Request) -> Response:
        who = caller(req)
        page = page_params(req, item=w.TunnelSession)
        sessions = [
            s
            for s in self.edge.registry.sessions.values()
            if s.account_id == who.account_id and not s.closed
        ]
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
        return dump(wire(req.base_url, self._session(req)))

    async def _ask_ngrok_agent(self, s: Session, kind: int, body: dict) -> None:
        """ngrok's agents get the command as a request and answer it; an agent that
        refuses (the SDK without a handler) keeps its session and the caller gets its text."""
        err = await s.command(kind, body)
        if err:
            raise APIError(400, "ERR_NGROK_400", f"The agent refused the command: {err}")

    async def stop(self, req: Request) -> Response:
        s = self._session(req)
        parse_body(req, _NoParams)
        if isinstance(s, NgrokSession):
            await self._ask_ngrok_agent(s, ngrok_agent.STOP, {})
            return json_response({})
        if not self.edge.stop_session(s.id):
            raise not_found("tunnel session", s.id)
        return json_response({})

    async def restart(self, req: Request) -> Response:
        s = self._session(req)
        parse_body(req, _NoParams)
        if isinstance(s, NgrokSession):
            await self._ask_ngrok_agent(s, ngrok_agent.RESTART, {})
            return json_response({})
        if not self.edge.stop_session(s.id, restart=True):
            raise not_found("tunnel session", s.id)
        return json_response({})

    async def update(self, req: Request) -> Response:
        s = self._session(req)
        parse_body(req, _NoParams)
        if isinstance(s, NgrokSession):
            await self._ask_ngrok_agent(
                s, ngrok_agent.UPDATE, {"Version": "", "PermitMajorVersion": False}
            )
        return json_response({})


__all__ = ["TunnelSessionsAPI"]
