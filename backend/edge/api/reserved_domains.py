"""``/reserved_domains`` (read-only): the public hostnames an account holds.

burrow reserves a hostname automatically when the account's first public http, https
or tls cloud endpoint uses it, and releases it when the last one goes; a reserved
hostname cannot be used by another account. Cloud endpoints point at their
reservation with their ``domain`` ref.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backend.edge.api.core import caller, check_id, dump, handler, not_found, page_params, paged
from backend.edge.api.filtering import wire_obj
from backend.httpserver import Request, Response, Router
from backend.schema import cloud as w
from backend.store import ReservedDomain
from backend.store.base import RESERVED_DOMAIN_PREFIX

if TYPE_CHECKING:
    from backend.edge.server import Edge


def wire(base: str, rd: ReservedDomain) -> w.ReservedDomain:
    return w.ReservedDomain(
        id=rd.id, uri=f"{base}/reserved_domains/{rd.id}", created_at=rd.created_at, domain=rd.domain
    )


class ReservedDomainsAPI:
    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    @property
    def store(self):
        assert self.edge.store is not None
        return self.edge.store

    def register(self, router: Router) -> None:
        router.add("GET", "/reserved_domains", handler(self.list))
        router.add("GET", "/reserved_domains/{id}", handler(self.get))

    async def list(self, req: Request) -> Response:
        who = caller(req)
        page = page_params(req, item=w.ReservedDomain)
        rows = await self.store.list_reserved_domains(
            who.account_id, before_id=page.before_id, limit=page.store_limit
        )
        items = page.select([wire(req.base_url, r) for r in rows], wire_obj)
        items, next_uri = paged(req, page, items)
        return dump(
            w.ReservedDomainList(
                reserved_domains=items,
                uri=f"{req.base_url}/reserved_domains",
                next_page_uri=next_uri,
            )
        )

    async def get(self, req: Request) -> Response:
        id_ = check_id(req.params["id"], RESERVED_DOMAIN_PREFIX, "reserved domain")
        rd = await self.store.get_reserved_domain(caller(req).account_id, id_)
        if rd is None:
            raise not_found("reserved domain", id_)
        return dump(wire(req.base_url, rd))
