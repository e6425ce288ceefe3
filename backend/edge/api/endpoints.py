"""``/endpoints``: cloud endpoints from the store and agent endpoints from live sessions.

Agent endpoints (``type: "agent"``) exist while the agent session that bound them is
online; they are read-only here. Cloud endpoints (``type: "cloud"``) are created,
changed and deleted through this API and kept in the store across restarts.

URL rules (seed ``004`` for ``.internal``): scheme ``http``, ``https``, ``tcp`` or ``tls``
(``https`` when left out); a hostname is required (no random names); a ``.internal``
hostname infers the ``internal`` binding, has at most 5 labels before ``.internal``,
and any port; tcp URLs need a port (public ones inside the edge's tcp range); a bare
name like ``https://app`` means ``app.<edge domain>``; public http(s)/tls URLs without a
port get the edge's listener port, as agent endpoints do.

``traffic_policy`` (YAML or JSON) is compiled by the policy engine when it is given, so
a bad shape, an unknown action, a CEL expression that does not compile or a policy
without a terminating action is refused with a 400 naming the problem. Each change is
handed to the edge (``serve_cloud_endpoint`` / ``unserve_cloud_endpoint``) so traffic
follows the API at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from backend.edge import ngrok_agent
from backend.edge.api.core import (
    MAX_DESCRIPTION,
    MAX_METADATA,
    APIError,
    caller,
    check_id,
    check_text,
    dump,
    handler,
    not_found,
    page_params,
    paged,
    parse_body,
)
from backend.edge.api.filtering import wire_obj
from backend.edge.api.tunnels import tunnel_id
from backend.edge.sessions import AgentEndpoint
from backend.httpserver import Request, Response, Router, empty
from backend.ids import new_id
from backend.netutil import is_ip, valid_hostname
from backend.ownership import NameConflict
from backend.policy import PolicyError
from backend.schema import cloud as w
from backend.store import CloudEndpoint, ConflictError, NotFoundError
from backend.store.base import ENDPOINT_PREFIX, parse_timestamp, utcnow

if TYPE_CHECKING:
    from backend.edge.server import Edge

log = logging.getLogger("burrow.api")

SCHEMES = ("http", "https", "tcp", "tls")
DEFAULT_PORTS = {"http": 80, "https": 443, "tls": 443}
BINDINGS = ("public", "internal", "kubernetes")
MAX_INTERNAL_LABELS = 5
MAX_URL = 2048

_CONFLICT_CODES = {"url_taken": "ERR_NGROK_18009", "host_taken": "ERR_NGROK_414"}


def _bad(msg: str) -> APIError:
    return APIError(400, "ERR_NGROK_215", msg)


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """A validated endpoint URL: what the store keeps and routing keys on."""

    url: str
    proto: str
    host: str
    port: int
    binding: str


def parse_url(edge: Edge, raw: str, bindings: list[str] | None) -> Target:
    """Validate and normalise a cloud endpoint URL and its bindings (400 on any problem)."""
    text = raw.strip()
    if not text:
        raise _bad(
            "Parameter 'url' is required: give the endpoint's URL, e.g. https://app.example.com."
        )
    if len(text) > MAX_URL:
        raise _bad(f"Parameter 'url' must be at most {MAX_URL} characters.")
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "https", text
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise _bad(f"Invalid url {text!r}: the scheme must be one of http, https, tcp or tls.")
    if rest.endswith("/"):
        rest = rest[:-1]
    if not rest or any(c in rest for c in "/?#@[] \t\r\n\\"):
        raise _bad(
            f"Invalid url {text!r}: expected scheme://hostname[:port] with no path, query or user info."
        )
    host, port = rest, None
    if ":" in rest:
        host, port_s = rest.rsplit(":", 1)
        if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
            raise _bad(f"Invalid url {text!r}: the port must be a number from 1 to 65535.")
        port = int(port_s)
    host = host.lower().rstrip(".")
    if not host:
        raise _bad(
            f"Invalid url {text!r}: a hostname is required (random hostnames are not supported)."
        )
    internal = host == "internal" or host.endswith(".internal")

    if bindings is None or len(bindings) == 0:
        binding = "internal" if internal else "public"
    elif len(bindings) != 1:
        raise _bad("Parameter 'bindings' must hold exactly one binding: public or internal.")
    else:
        binding = bindings[0]
        if binding not in BINDINGS:
            raise _bad(f"Invalid binding {binding[:40]!r}: expected public or internal.")
    if binding == "kubernetes":
        raise _bad("The kubernetes binding is not available on this edge.")
    if internal and binding != "internal":
        raise _bad(f"{host} is a .internal hostname, which needs the internal binding.")
    if binding == "internal" and not internal:
        raise _bad(f"The internal binding needs a hostname ending in .internal, not {host!r}.")

    if internal:
        labels = host.split(".")[:-1]
        if not labels:
            raise _bad(
                "Internal hostnames need a name before .internal, e.g. https://api.internal."
            )
        if len(labels) > MAX_INTERNAL_LABELS:
            raise _bad(
                f"Internal hostnames may have at most {MAX_INTERNAL_LABELS} labels before .internal."
            )
        if not valid_hostname(host):
            raise _bad(f"Invalid hostname {host!r}.")
        if scheme == "tcp" and port is None:
            raise _bad("tcp URLs need a port, e.g. tcp://db.internal:5432.")
        if port is None:
            port = DEFAULT_PORTS[scheme]
    else:
        if "." not in host and host != "localhost":
            host = f"{host}.{edge.config.domain}"
        if is_ip(host) or not valid_hostname(host):
            raise _bad(f"Invalid hostname {host!r}.")
        if scheme != "tcp" and host in ("localhost", edge.config.domain):
            # the edge's own names: an endpoint there would answer for the edge itself
            raise _bad(f"{host!r} is the edge's own name; choose a name under {edge.config.domain}.")
        if scheme == "tcp":
            lo, hi = edge.config.tcp_ports
            if port is None:
                raise _bad(f"tcp URLs need a port from this edge's range {lo}-{hi}.")
            if not lo <= port <= hi:
                raise _bad(f"tcp port {port} is outside this edge's range {lo}-{hi}.")
        else:
            listener = "http" if scheme == "http" else "https"
            if listener not in edge.addrs:
                raise _bad(f"This edge has no {listener} listener for {scheme} endpoints.")
            lport = edge.addrs[listener][1]
            if port is None or port == lport:
                port = 0  # whatever port the edge's listener has: resolved when shown
            elif port != DEFAULT_PORTS[scheme]:
                raise _bad(
                    f"This edge serves {scheme} on port {lport} (or {DEFAULT_PORTS[scheme]} behind a proxy), not {port}."
                )
    shown_port = "" if port in (0, DEFAULT_PORTS.get(scheme)) else f":{port}"
    return Target(
        url=f"{scheme}://{host}{shown_port}", proto=scheme, host=host, port=port, binding=binding
    )


def shown_address(edge: Edge, proto: str, host: str, port: int) -> tuple[str, int]:
    """The URL and port to show: port 0 means the edge's current listener port."""
    if port == 0:
        listener = "http" if proto == "http" else "https"
        port = edge.addrs[listener][1] if listener in edge.addrs else DEFAULT_PORTS[proto]
    suffix = "" if port == DEFAULT_PORTS.get(proto) else f":{port}"
    return f"{proto}://{host}{suffix}", port


# ------------------------------------------------------------------------ wire shapes
def _agent_parts(ep: AgentEndpoint) -> tuple[str, int | None]:
    try:
        parts = urlsplit(ep.url)
        host = parts.hostname or ep.host
        port = parts.port or DEFAULT_PORTS.get(ep.proto) or ep.port or None
    except ValueError:
        host, port = ep.host, ep.port or None
    return host, port


def agent_wire(base: str, ep: AgentEndpoint) -> w.Endpoint:
    s = ep.session
    host, port = _agent_parts(ep)
    policy = getattr(ep, "policy", None)
    up = ep.upstream_url or None
    up_proto = None
    if up:
        up_proto = (
            up.split("://", 1)[0].lower()
            if "://" in up
            else ("tcp" if ep.proto in ("tcp", "tls") else "http")
        )
    created = _ts(ep.created_at)
    return w.Endpoint(
        id=ep.id,
        region=s.region or None,
        created_at=created,
        updated_at=created,
        public_url=ep.url,
        proto=ep.proto,
        scheme=ep.proto,
        hostport=f"{host}:{port}" if port else host,
        host=host,
        port=port,
        type="agent",
        metadata=ep.metadata or None,
        description=ep.description or None,
        tunnel=w.Ref(id=tunnel_id(ep), uri=f"{base}/tunnels/{tunnel_id(ep)}"),
        upstream_url=up,
        upstream_proto=up_proto,
        upstream_protocol=up_proto,
        url=ep.url,
        principal=w.Ref(id=s.account_id, uri=""),
        traffic_policy=getattr(policy, "source", None) or None,
        bindings=[ep.binding],
        tunnel_session=w.Ref(id=s.id, uri=f"{base}/tunnel_sessions/{s.id}"),
        uri=f"{base}/endpoints/{ep.id}",
        name=ep.name or None,
        pooling_enabled=ep.pooling_enabled,
    )


def cloud_wire(edge: Edge, base: str, ep: CloudEndpoint) -> w.Endpoint:
    url, port = shown_address(edge, ep.proto, ep.host, ep.port)
    return w.Endpoint(
        id=ep.id,
        created_at=ep.created_at,
        updated_at=ep.updated_at,
        public_url=url,
        proto=ep.proto,
        scheme=ep.proto,
        hostport=f"{ep.host}:{port}",
        host=ep.host,
        port=port,
        type="cloud",
        metadata=ep.metadata or None,
        description=ep.description or None,
        url=url,
        principal=w.Ref(id=ep.account_id, uri=""),
        traffic_policy=ep.traffic_policy or None,
        bindings=[ep.binding],
        uri=f"{base}/endpoints/{ep.id}",
        pooling_enabled=ep.pooling_enabled,
        domain=(
            w.Ref(id=ep.domain_id, uri=f"{base}/reserved_domains/{ep.domain_id}")
            if ep.domain_id
            else None
        ),
    )


def _ts(text: str):
    try:
        return parse_timestamp(text)
    except ValueError:
        return utcnow()


# ------------------------------------------------------------------------- resource
class EndpointsAPI:
    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    @property
    def store(self):
        assert self.edge.store is not None
        return self.edge.store

    def register(self, router: Router) -> None:
        router.add("GET", "/endpoints", handler(self.list))
        router.add("POST", "/endpoints", handler(self.create))
        router.add("GET", "/endpoints/{id}", handler(self.get))
        router.add("PATCH", "/endpoints/{id}", handler(self.update))
        router.add("DELETE", "/endpoints/{id}", handler(self.delete))

    def _agent_endpoints(self, account_id: str) -> list[AgentEndpoint]:
        return [
            ep
            for ep in self.edge.registry.endpoints()
            if ep.session is not None and ep.session.account_id == account_id
        ]

    def _check_policy(self, text: str) -> None:
        try:
            self.edge.compile_cloud_policy(text)
        except (PolicyError, ValueError, TypeError) as exc:
            raise _bad(f"Invalid traffic_policy: {exc}") from None

    async def _serve(self, ep: CloudEndpoint) -> None:
        """Hand a stored cloud endpoint to the data path (APIError if it cannot serve it)."""
        try:
            await self.edge.serve_cloud_endpoint(ep)
        except OSError as exc:
            raise APIError(
                409,
                "ERR_NGROK_414",
                f"This edge cannot listen for {ep.url}: {exc.strerror or exc}.",
            ) from None
        except (PolicyError, ValueError, TypeError) as exc:
            raise _bad(f"Invalid traffic_policy: {exc}") from None

    def _agent_endpoint(self, account_id: str, id_: str) -> AgentEndpoint | None:
        for ep in self._agent_endpoints(account_id):
            if ep.id == id_:
                return ep
        return None

    async def _claim(self, ep: CloudEndpoint) -> None:
        """Claim the endpoint's name through :mod:`backend.ownership` (409 if refused).

        The same check agent binds go through: a hostname (any protocol) or public tcp
        port belongs to one account; one account's endpoints on one URL must all pool.
        """
        try:
            await self.edge.claim_cloud_name(ep)
        except NameConflict as exc:
            if exc.reason == "other_account":
                what = f"tcp port {ep.port}" if ep.proto == "tcp" else f"the hostname {ep.host}"
                raise APIError(409, "ERR_NGROK_414", f"{what} is in use by another account.") from None
            if exc.other is not None and exc.other.kind == "cloud":
                raise APIError(
                    409, "ERR_NGROK_18009", f"This account already has a cloud endpoint on {ep.url}."
                ) from None
            if exc.reason == "online":
                raise APIError(
                    409,
                    "ERR_NGROK_18017",
                    f"An endpoint is online at {ep.url}; enable pooling (pooling_enabled) on both to share it.",
                ) from None
            raise APIError(
                409,
                "ERR_NGROK_18016",
                f"The endpoint online at {ep.url} has pooling disabled, so this one cannot pool with it.",
            ) from None

    async def _check_cap(self, account_id: str) -> None:
        cap = self.edge.config.max_endpoints_per_account
        if cap and await self.edge.endpoint_count(account_id) >= cap:
            raise APIError(
                400,
                "ERR_NGROK_18021",
                f"You have exceeded the maximum number of endpoints allowed for this account ({cap}).",
            )

    async def list(self, req: Request) -> Response:
        who = caller(req)
        page = page_params(req, extra=("id", "url"), item=w.Endpoint)
        ids = set(req.query.get("id", []))
        urls = set(req.query.get("url", []))
        filtered = bool(ids or urls)
        cloud = await self.store.list_cloud_endpoints(
            who.account_id, before_id=page.before_id, limit=None if filtered else page.store_limit
        )
        items = [cloud_wire(self.edge, req.base_url, ep) for ep in cloud]
        items += [agent_wire(req.base_url, ep) for ep in self._agent_endpoints(who.account_id)]
        if ids:
            items = [e for e in items if e.id in ids]
        if urls:
            items = [e for e in items if e.url in urls or e.public_url in urls]
        items.sort(key=lambda e: e.id, reverse=True)
        if page.before_id is not None:
            items = [e for e in items if e.id < page.before_id]
        items = page.select(items, wire_obj)
        items, next_uri = paged(req, page, items)
        return dump(
            w.EndpointList(endpoints=items, uri=f"{req.base_url}/endpoints", next_page_uri=next_uri)
        )

    async def get(self, req: Request) -> Response:
        who = caller(req)
        id_ = check_id(req.params["id"], ENDPOINT_PREFIX, "endpoint")
        cloud = await self.store.get_cloud_endpoint(who.account_id, id_)
        if cloud is not None:
            return dump(cloud_wire(self.edge, req.base_url, cloud))
        agent = self._agent_endpoint(who.account_id, id_)
        if agent is not None:
            return dump(agent_wire(req.base_url, agent))
        raise not_found("endpoint", id_)

    async def create(self, req: Request) -> Response:
        who = caller(req)
        body = parse_body(req, w.EndpointCreate)
        kind = body.type if body.type is not None else "cloud"
        if kind != "cloud":
            raise _bad(
                f"Only cloud endpoints can be created through the API (type {kind[:20]!r}); agent endpoints are created by agents."
            )
        check_text("description", body.description, MAX_DESCRIPTION)
        check_text("metadata", body.metadata, MAX_METADATA)
        t = parse_url(self.edge, body.url, body.bindings)
        if not body.traffic_policy:
            raise _bad("Parameter 'traffic_policy' is required for cloud endpoints (YAML or JSON).")
        self._check_policy(body.traffic_policy)
        pooling = bool(body.pooling_enabled)
        await self._check_cap(who.account_id)
        now = utcnow()
        ep = CloudEndpoint(
            id=new_id(ENDPOINT_PREFIX),
            account_id=who.account_id,
            url=t.url,
            proto=t.proto,
            host=t.host,
            port=t.port,
            binding=t.binding,
            pooling_enabled=pooling,
            description=body.description or "",
            metadata=body.metadata or "",
            traffic_policy=body.traffic_policy,
            created_at=now,
            updated_at=now,
        )
        await self._claim(ep)
        try:
            ep = await self.store.create_cloud_endpoint(ep)
        except ConflictError as exc:
            self.edge.names.release(ep.id)
            raise APIError(
                409, _CONFLICT_CODES.get(exc.kind or "", "ERR_NGROK_409"), str(exc)
            ) from None
        try:
            await self._serve(ep)
        except APIError:
            await self.store.delete_cloud_endpoint(ep.account_id, ep.id)
            self.edge.unserve_cloud_endpoint(ep.id)
            raise
        self.edge.on_event({"event": "cloud_endpoint_created", "id": ep.id, "url": ep.url})
        return dump(cloud_wire(self.edge, req.base_url, ep), 201)

    def _agent_refusal(self, id_: str) -> APIError:
        return APIError(
            400,
            "ERR_NGROK_215",
            f"Endpoint {id_} is an agent endpoint: the agent that started it owns it. "
            "Stop its tunnel session (POST /tunnel_sessions/{id}/stop) instead.",
        )

    async def update(self, req: Request) -> Response:
        who = caller(req)
        id_ = check_id(req.params["id"], ENDPOINT_PREFIX, "endpoint")
        body = parse_body(req, w.EndpointUpdate)
        current = await self.store.get_cloud_endpoint(who.account_id, id_)
        if current is None:
            if self._agent_endpoint(who.account_id, id_) is not None:
                raise self._agent_refusal(id_)
            raise not_found("endpoint", id_)
        check_text("description", body.description, MAX_DESCRIPTION)
        check_text("metadata", body.metadata, MAX_METADATA)
        changes: dict = {}
        if body.url is not None or body.bindings is not None:
            t = parse_url(
                self.edge,
                body.url if body.url is not None else current.url,
                body.bindings
                if body.bindings is not None
                else ([current.binding] if body.url is None else None),
            )
            changes.update(url=t.url, proto=t.proto, host=t.host, port=t.port, binding=t.binding)
        if body.traffic_policy is not None:
            if not body.traffic_policy:
                raise _bad("Parameter 'traffic_policy' cannot be empty for a cloud endpoint.")
            self._check_policy(body.traffic_policy)
            changes["traffic_policy"] = body.traffic_policy
        if body.description is not None:
            changes["description"] = body.description
        if body.metadata is not None:
            changes["metadata"] = body.metadata
        if body.pooling_enabled is not None:
            changes["pooling_enabled"] = body.pooling_enabled
        new = current.model_copy(update={**changes, "updated_at": utcnow()})

        async def restore_claim() -> None:
            self.edge.names.release(id_)
            with contextlib.suppress(NameConflict):
                await self.edge.claim_cloud_name(current)

        if "url" in changes or "pooling_enabled" in changes:
            await self._claim(new)  # moves this endpoint's claim to its new name
        try:
            new = await self.store.update_cloud_endpoint(new)
        except ConflictError as exc:
            await restore_claim()
            raise APIError(
                409, _CONFLICT_CODES.get(exc.kind or "", "ERR_NGROK_409"), str(exc)
            ) from None
        except NotFoundError:
            await restore_claim()
            raise not_found("endpoint", id_) from None
        try:
            await self._serve(new)
        except APIError:  # put the old one back, in the store and on the data path
            await self.store.update_cloud_endpoint(current)
            try:
                await self.edge.serve_cloud_endpoint(current)
            except (OSError, PolicyError) as exc:
                log.error("cloud endpoint %s could not be restored: %s", current.id, exc)
            raise
        return dump(cloud_wire(self.edge, req.base_url, new))

    async def delete(self, req: Request) -> Response:
        who = caller(req)
        id_ = check_id(req.params["id"], ENDPOINT_PREFIX, "endpoint")
        if await self.store.delete_cloud_endpoint(who.account_id, id_):
            self.edge.unserve_cloud_endpoint(id_)
            self.edge.on_event({"event": "cloud_endpoint_deleted", "id": id_})
            return empty(204)
        agent_ep = self._agent_endpoint(who.account_id, id_)
        if agent_ep is not None:
            # an ngrok agent is told (StopTunnel) and keeps its session; burrow's own
            # agents have no per-endpoint stop: their endpoints are refused as before
            if ngrok_agent.stop_endpoint(self.edge, agent_ep, "the endpoint was deleted through the API"):
                return empty(204)
            raise self._agent_refusal(id_)
        raise not_found("endpoint", id_)
