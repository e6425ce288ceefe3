"""``/tunnels``: the tunnels of the account's online agent sessions (read-only).

ngrok lists one tunnel per agent endpoint; burrow's tunnel id is the endpoint's id body
with ngrok's ``tn_`` prefix, which is what every agent endpoint's ``tunnel`` reference
already names. A tunnel lives exactly as long as its endpoint (and so its session).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backend.edge.api.core import caller, check_id, dump, handler, not_found, page_params, paged
from backend.edge.api.filtering import wire_obj
from backend.edge.sessions import AgentEndpoint
from backend.httpserver import Request, Response, Router
from backend.schema import cloud as w
from backend.store.base import parse_timestamp, utcnow

if TYPE_CHECKING:
    from backend.edge.server import Edge

TUNNEL_PREFIX = "tn"

__all__ = ["TUNNEL_PREFIX", "TunnelsAPI", "tunnel_id", "wire"]


def tunnel_id(ep: AgentEndpoint) -> str:
    """The id of the tunnel serving an agent endpoint (``tn_`` + the endpoint's id body)."""
    return f"{TUNNEL_PREFIX}_{ep.id.partition('_')[2]}"


def wire(base: str, ep: AgentEndpoint) -> w.Tunnel:
    s = ep.session
    try:
        started = parse_timestamp(ep.created_at)
    except ValueError:
        started = utcnow()
    return w.Tunnel(
        id=tunnel_id(ep),
        public_url=ep.url,
        started_at=started,
        metadata=ep.metadata or None,
        proto=ep.proto,
        region=s.region or None,
        tunnel_session=w.Ref(id=s.id, uri=f"{base}/tunnel_sessions/{s.id}"),
        endpoint=w.Ref(id=ep.id, uri=f"{base}/endpoints/{ep.id}"),
        forwards_to=ep.upstream_url or None,
    )


class TunnelsAPI:
    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    def register(self, router: Router) -> None:
        router.add("GET", "/tunnels", handler(self.list))
        router.add("GET", "/tunnels/{id}", handler(self.get))

    def _endpoints(self, account_id: str) -> list[AgentEndpoint]:
        return [
            ep
            for ep in self.edge.registry.endpoints()
            if ep.session is not None
            and ep.session.account_id == account_id
            and not ep.session.closed
            and ep.type == "agent"
        ]

    async def list(self, req: Request) -> Response:
        who = caller(req)
        page = page_params(req, item=w.Tunnel)
        items = sorted(
            (wire(req.base_url, ep) for ep in self._endpoints(who.account_id)),
            key=lambda t: t.id,
            reverse=True,
        )
        if page.before_id is not None:
            items = [t for t in items if t.id < page.before_id]
        items, next_uri = paged(req, page, page.select(items, wire_obj))
        return dump(w.TunnelList(tunnels=items, uri=f"{req.base_url}/tunnels", next_page_uri=next_uri))

    async def get(self, req: Request) -> Response:
        id_ = check_id(req.params["id"], TUNNEL_PREFIX, "tunnel")
        for ep in self._endpoints(caller(req).account_id):
            if tunnel_id(ep) == id_:
                return dump(wire(req.base_url, ep))
        raise not_found("tunnel", id_)
