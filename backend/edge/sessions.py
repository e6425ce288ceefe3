"""Live edge state: agent sessions, their data-connection pools and agent endpoints.

Nothing here is persisted: agent endpoints exist exactly as long as the session that
bound them, and are rebuilt when agents reconnect.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import itertools
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, ClassVar

from backend import protocol as p
from backend.ownership import name_of
from backend.relay import close

if TYPE_CHECKING:
    from backend.ownership import Ownership
    from backend.policy.engine import CompiledPolicy


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(eq=False)
class AgentEndpoint:
    id: str
    session: Session
    name: str
    proto: str  # http | https | tcp | tls
    url: str  # public URL as shown to users
    host: str  # lower-case hostname ("" for tcp)
    port: int  # public port (the tcp port for tcp endpoints)
    binding: str
    pooling_enabled: bool
    metadata: str = ""
    description: str = ""
    upstream_url: str = ""
    created_at: str = field(default_factory=now_rfc3339)
    server: asyncio.AbstractServer | None = None  # tcp listener
    policy: CompiledPolicy | None = None
    #: the traffic policy as the agent sent it (a cluster's other edges compile it too)
    policy_text: str = ""
    type: str = "agent"
    #: held by another edge of the cluster (backend/cluster/feed.RemoteEndpoint)
    remote: ClassVar[bool] = False

    @property
    def account_id(self) -> str:
        return self.session.account_id

    @property
    def route_key(self) -> tuple:
        return route_key(self.binding, self.account_id, self.proto, self.host, self.port)

    @property
    def owned_name(self) -> str:
        """The name this endpoint holds (:func:`backend.ownership.name_of`)."""
        return name_of(self.binding, self.account_id, self.proto, self.host, self.port)


def route_key(binding: str, account_id: str, proto: str, host: str, port: int) -> tuple:
    """Key under which the edge routes traffic to an endpoint.

    Public endpoints share one namespace; internal ones are per account (seed 004), so
    two accounts may both have ``https://api.internal``.
    """
    if binding == "internal":
        return ("internal", account_id, proto, host if proto != "tcp" else f"{host}:{port}")
    if proto == "tcp":
        return (binding, "tcp", port)
    return (binding, proto, host)


@dataclass(eq=False)
class CloudRoute:
    """A cloud endpoint as the data path sees it: no agent, only a traffic policy."""

    id: str
    account_id: str
    url: str
    proto: str
    host: str
    port: int
    binding: str
    policy: CompiledPolicy | None
    pooling_enabled: bool = False
    server: asyncio.AbstractServer | None = None
    session: None = None
    type: str = "cloud"
    #: the stored record it was made from (a cluster's change feed compares it)
    record: object = None
    remote: ClassVar[bool] = False

    @property
    def route_key(self) -> tuple:
        return route_key(self.binding, self.account_id, self.proto, self.host, self.port)

    @property
    def owned_name(self) -> str:
        """The name this endpoint holds (:func:`backend.ownership.name_of`)."""
        return name_of(self.binding, self.account_id, self.proto, self.host, self.port)


class SessionClosed(Exception):
    pass


class SessionBusy(SessionClosed):
    """The session has as many data connections (pooled + active) as it may have."""


@dataclass(eq=False)
class Session:
    id: str
    key: str
    account_id: str
    client_id: str
    credential_id: str
    writer: asyncio.StreamWriter
    #: which of the agent's HA sessions this is (one per edge; protocol.Auth.slot)
    slot: int = 0
    agent_version: str = ""
    os: str = ""
    hostname: str = ""
    metadata: str = ""
    ip: str = ""
    transport: str = "ngrok/2"
    region: str = "local"
    started_at: str = field(default_factory=now_rfc3339)
    endpoints: dict[str, AgentEndpoint] = field(default_factory=dict)
    latency: float | None = None
    closed: bool = False
    #: the credential's ACL rules, loaded at auth time (empty = may bind anything)
    acl: tuple[str, ...] = ()
    #: most data connections (pooled + active) at once; 0 = no limit
    max_data: int = 0
    #: the agent takes data connections back after an HTTP connection (protocol.Auth)
    reuse_data: bool = False
    _pool: collections.deque = field(default_factory=collections.deque)
    _pool_event: asyncio.Event = field(default_factory=asyncio.Event)
    _waiters: int = 0
    _requested: int = 0
    _active: set = field(default_factory=set)

    POOL_MAX = 256
    #: data connections given back after a public connection are pooled up to this
    #: many (what an agent keeps ready after a burst at most, agent.POOL_GROW_MAX); the
    #: rest are closed, so a burst of keep-alive clients leaves no pool of hundreds
    GIVE_BACK_MAX = 32
    #: the edge adds X-Forwarded-For/-Host/-Proto to requests (ngrok's agents expect it;
    #: burrow's agent adds them itself)
    edge_forwarded_headers: ClassVar[bool] = False
    ASK_AGAIN = 2.0  # seconds a waiter trusts data connections already asked for

    def send(self, msg: p._Msg) -> None:
        if not self.closed and not self.writer.is_closing():
            p.write_msg(self.writer, msg)

    def check_key(self, key: str) -> bool:
        return hmac.compare_digest(self.key.encode(), key.encode())

    # ------------------------------------------------------------- data connections
    def add_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Park a fresh data connection in the pool.  False if it was refused."""
        # whatever happens to it, this is one of the connections asked for
        self._requested = max(0, self._requested - 1)
        if self.closed or len(self._pool) >= self.POOL_MAX:
            return False
        if self.max_data and len(self._pool) + len(self._active) >= self.max_data:
            return False
        self._pool.append((reader, writer))
        self._pool_event.set()
        return True

    async def open_data(
        self,
        ep: AgentEndpoint,
        client_addr: str,
        client_port: int,
        scheme: str | None = None,
        timeout: float = 10.0,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Take a pooled data connection and announce which endpoint it now serves."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            while self._pool:
                r, w = self._pool.popleft()
                if r.at_eof() or w.is_closing() or getattr(r, "_buffer", None):
                    close(w)  # gone, or (given back) the agent sent bytes nobody asked for
                    continue
                p.write_msg(
                    w,
                    p.StartData(
                        endpoint_id=ep.id,
                        name=ep.name,
                        proto=scheme or ep.proto,
                        url=ep.url,
                        client_addr=client_addr,
                        client_port=client_port,
                    ),
                )
                self._active.add(w)
                return r, w
            if self.max_data and len(self._active) >= self.max_data:
                raise SessionBusy(f"the agent session has {self.max_data} data connections open")
            # Pool is dry: ask the agent for more, sized to the queue of waiters.
            self._waiters += 1
            try:
                want = self._waiters - self._requested
                if want > 0:
                    self._requested += want
                    self.send(p.NeedData(count=want))
                self._pool_event.clear()
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self._pool_event.wait(), min(left, self.ASK_AGAIN))
                except TimeoutError:
                    # Connections asked for may never come (refused before their hello,
                    # lost on the way): stop counting on them and ask again.
                    self._requested = 0
            finally:
                self._waiters -= 1
        raise SessionClosed("no data connection from the agent")

    def release(self, writer: asyncio.StreamWriter) -> None:
        self._active.discard(writer)
        close(writer)

    def give_back(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Pool a data connection again after its HTTP public connection ended between
        two exchanges (no handshake for the next public connection); False if it cannot
        be (an agent without ``reuse_data``, bytes left unread, closing, GIVE_BACK_MAX
        pooled already): then :meth:`release` it."""
        if (
            not self.reuse_data
            or self.closed
            or writer not in self._active
            or writer.is_closing()
            or reader.at_eof()
            or reader.exception() is not None
            or getattr(reader, "_buffer", b"x")
            or len(self._pool) >= self.GIVE_BACK_MAX
        ):
            return False
        self._active.discard(writer)
        p.write_msg(writer, p.DataPooled())  # the agent lets go of its upstream connection
        self._pool.append((reader, writer))
        self._pool_event.set()
        return True

    def shutdown(self) -> None:
        """End the session: close control, pooled and active data connections."""
        if self.closed:
            return
        self.closed = True
        self._pool_event.set()
        while self._pool:
            close(self._pool.popleft()[1])
        for w in list(self._active):
            close(w)
        self._active.clear()
        close(self.writer)


class Registry:
    """Sessions by id and by (account, client id, slot); endpoints by route key."""

    def __init__(self, names: Ownership | None = None) -> None:
        self.names = names  # releases an endpoint's name when it goes offline
        self.sessions: dict[str, Session] = {}
        self._by_client: dict[tuple[str, str, int], Session] = {}
        self._routes: dict[tuple, list[AgentEndpoint]] = {}
        self._rr = itertools.count()
        #: the cluster runtime (backend.cluster.node.ClusterNode) told of every local
        #: session and agent endpoint coming and going; None on a single edge
        self.cluster = None

    def same_agent(self, account_id: str, client_id: str, slot: int = 0) -> Session | None:
        """The live session a new one of this agent (and HA slot) would replace."""
        return self._by_client.get((account_id, client_id, slot))

    def add_session(self, s: Session) -> Session | None:
        """Register ``s``; return the stale session of the same agent and slot it
        replaces (an HA agent's sessions in other slots stay)."""
        old = self._by_client.get((s.account_id, s.client_id, s.slot))
        self.sessions[s.id] = s
        self._by_client[(s.account_id, s.client_id, s.slot)] = s
        if self.cluster is not None:
            self.cluster.session_changed(s)
        return old

    def remove_session(self, s: Session) -> list[AgentEndpoint]:
        """Forget a session and take all of its endpoints offline at once."""
        self.sessions.pop(s.id, None)
        if self._by_client.get((s.account_id, s.client_id, s.slot)) is s:
            del self._by_client[(s.account_id, s.client_id, s.slot)]
        gone = list(s.endpoints.values())
        for ep in gone:
            self.remove_endpoint(ep)
        s.shutdown()
        if self.cluster is not None:
            self.cluster.session_changed(s)
        return gone

    # ---------------------------------------------------------------- endpoints
    def add_endpoint(self, ep: Endpoint) -> None:
        self._routes.setdefault(ep.route_key, []).append(ep)
        if ep.session is not None:
            ep.session.endpoints[ep.id] = ep
            if self.cluster is not None:
                self.cluster.endpoint_changed(ep, True)

    def remove_endpoint(self, ep: Endpoint) -> None:
        if self.names is not None:
            self.names.release(ep.id)
        eps = self._routes.get(ep.route_key)
        if eps is not None:
            with contextlib.suppress(ValueError):
                eps.remove(ep)
            if not eps:
                del self._routes[ep.route_key]
        if ep.session is not None:
            ep.session.endpoints.pop(ep.id, None)
            if self.cluster is not None:
                self.cluster.endpoint_changed(ep, False)
        if ep.server is not None:
            if eps:  # a pooled tcp endpoint remains: it inherits the listener
                eps[0].server = ep.server
            else:
                ep.server.close()
            ep.server = None

    def route(self, binding: str, proto: str, host_or_port: str | int) -> Endpoint | None:
        """Pick the public endpoint for a connection (round robin across a pool)."""
        return self._pick(self._routes.get((binding, proto, host_or_port)))

    def route_internal(self, account_id: str, proto: str, host: str) -> Endpoint | None:
        return self._pick(self._routes.get(("internal", account_id, proto, host)))

    def _pick(self, eps: list | None) -> Endpoint | None:
        """One of a route's endpoints, round robin; in a cluster, the ones held by this
        edge first (no peer hop; an HA agent holds the URL on two edges), remote ones
        only when this edge holds none."""
        if not eps:
            return None
        if len(eps) == 1:
            return eps[0]
        if self.cluster is not None:
            local = [ep for ep in eps if not ep.remote]
            if local and len(local) < len(eps):
                eps = local
                if len(eps) == 1:
                    return eps[0]
        return eps[next(self._rr) % len(eps)]

    def sessions_of(self, credential_id: str) -> int:
        return sum(1 for s in self.sessions.values() if s.credential_id == credential_id)

    def endpoints(self) -> list[Endpoint]:
        return [ep for eps in self._routes.values() for ep in eps]

    def find(self, endpoint_id: str) -> Endpoint | None:
        for ep in self.endpoints():
            if ep.id == endpoint_id:
                return ep
        return None


Endpoint = AgentEndpoint | CloudRoute
