"""The edge's cloud API (ngrok API v2 wire format).

:mod:`.core` holds the conventions (auth, version header, rate limit, errors, bodies,
paging) and :mod:`.filtering` the CEL ``filter`` of every list; one module per resource
registers its routes:

- :mod:`.endpoints` — ``/endpoints`` (cloud endpoints in the store, agent endpoints live)
- :mod:`.agent_ingresses` — ``/agent_ingresses``
- :mod:`.tunnel_sessions` — ``/tunnel_sessions`` and their stop / restart / update
- :mod:`.tunnels` — ``/tunnels`` (read-only: one per agent endpoint)
- :mod:`.keys` — ``/credentials`` (authtokens) and ``/api_keys``
- :mod:`.reserved_domains` — ``/reserved_domains`` (read-only; claimed by cloud endpoints)
- :mod:`.admin` — ``/healthz``, ``/readyz``, ``/metrics`` and the admin API
  ``/admin/accounts`` (their own auth, not the cloud API's)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backend.edge.api.admin import AdminAPI, own_auth
from backend.edge.api.agent_ingresses import AgentIngressesAPI
from backend.edge.api.core import APIError, RateLimiter, SharedRateLimiter, api_error, make_before
from backend.edge.api.endpoints import EndpointsAPI
from backend.edge.api.keys import APIKeysAPI, CredentialsAPI
from backend.edge.api.reserved_domains import ReservedDomainsAPI
from backend.edge.api.tunnel_sessions import TunnelSessionsAPI
from backend.edge.api.tunnels import TunnelsAPI
from backend.httpserver import APIServer, Request, Response, Router, ServerLimits, json_response

if TYPE_CHECKING:
    from backend.edge.server import Edge

__all__ = ["APIError", "api_error", "build_router", "start_api"]


def build_router(edge: Edge) -> Router:
    router = Router()

    async def root(req: Request) -> Response:
        return json_response({"uri": req.base_url + "/"})

    router.add("GET", "/", root)
    for resource in (
        EndpointsAPI(edge),
        AgentIngressesAPI(edge),
        TunnelSessionsAPI(edge),
        TunnelsAPI(edge),
        CredentialsAPI(edge),
        APIKeysAPI(edge),
        ReservedDomainsAPI(edge),
        AdminAPI(edge),
    ):
        resource.register(router)
    return router


async def start_api(edge: Edge, addr: str) -> tuple[APIServer, tuple[str, int]]:
    """Serve the cloud API on ``addr``; return the server and the bound address."""
    cfg = edge.config
    # the per-account limit: this edge's memory, or the shared store's (every edge counts)
    shared = edge.store is not None and edge.store.shared
    limiter = SharedRateLimiter(edge.store, cfg.api_rate_limit) if shared else RateLimiter(cfg.api_rate_limit)
    cloud = make_before(edge, limiter, RateLimiter(cfg.api_auth_fail_limit))

    async def before(req: Request) -> Response | None:
        return None if own_auth(req.path) else await cloud(req)

    server = APIServer(
        build_router(edge),
        api_error,
        before=before,
        limits=ServerLimits(head_timeout=cfg.api_read_timeout, body_timeout=cfg.api_read_timeout),
        public_url=cfg.api_public_url,
    )
    bound = await server.start(addr)
    return server, bound
