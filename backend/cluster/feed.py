"""The change feed: keeps an edge's in-memory route tables in step with PostgreSQL.

One dedicated connection LISTENs on ``burrow_changes``; a payload only names what
changed (``<kind>:<key>``) and the feed re-reads it (through the pool):

- ``agent_endpoint:<id>``, ``session:<id>``, ``edge:<node_id>`` — agent endpoints held
  by *other* edges, put into the Registry as :class:`RemoteEndpoint` (routed like local
  ones; their data connections go through the peer link).  Only rows of a live
  ``(node_id, epoch)`` count.  A remote tcp endpoint gets a listener on this edge too.
- ``cloud_endpoint:<id>`` — cloud endpoints, served by every edge.
- ``account:<id>`` — a disabled account's sessions end and its cloud endpoints stop;
  enabled again, they come back.
- ``tcp_port:<port>`` — nothing of its own: the endpoint holding a port is announced
  by its own key, and the periodic reconcile catches the rest.

NOTIFY has no replay, so after every (re)connect of the listening connection the feed
reloads everything, and it reconciles everything every :data:`RECONCILE_INTERVAL`
seconds.  The feed never runs on a request's path: requests read memory only.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from backend.edge.sessions import AgentEndpoint, SessionClosed
from backend.netutil import parse_hostport
from backend.policy.document import PolicyError
from backend.policy.engine import compile_policy
from backend.relay import close

if TYPE_CHECKING:
    from backend.cluster.node import ClusterNode

log = logging.getLogger("burrow.cluster.feed")

RECONCILE_INTERVAL = 30.0
#: seconds between health checks of the listening connection (a dead one is replaced)
CHECK_INTERVAL = 1.0
RECONNECT_DELAY = 0.25
QUERY_TIMEOUT = 2.0
CONNECT_TIMEOUT = 5.0
START_TRIES = 5


async def _maybe(value):
    """A store call's result, awaited when the store is async."""
    if inspect.isawaitable(value):
        return await value
    return value


@dataclass(eq=False)
class RemoteSession:
    """An agent session held by another edge, as the data path sees it.

    ``open_data`` opens a connection through the peer link to the owning edge, which
    splices it onto one of that session's data connections."""

    node: ClusterNode
    id: str
    account_id: str
    client_id: str
    node_id: str
    epoch: int
    peer_addr: str
    peer_tls: bool = False
    edge_forwarded_headers: bool = False
    endpoints: dict = field(default_factory=dict)
    closed: bool = False
    region: str = ""
    remote: bool = True
    #: data connections taken from another endpoint of the route (see open_data)
    _owners: dict = field(default_factory=dict)

    async def open_data(self, ep, client_addr: str, client_port: int, scheme: str | None = None, timeout: float = 10.0):
        """A connection through the peer link; if the owning edge cannot give one (it
        died, froze, or no longer holds the endpoint) and the route has another endpoint
        on a working edge — an HA agent's other session, a pool member — that one."""
        try:
            if self.closed:
                raise SessionClosed("the session has ended")
            return await self.node.peer.open(ep, client_addr, client_port, scheme, timeout)
        except SessionClosed:
            alt = self.node.feed.alternative(ep)
            if alt is None:
                raise
        r, w = await alt.session.open_data(alt, client_addr, client_port, scheme, timeout)
        self._owners[w] = alt.session
        return r, w

    def release(self, writer: asyncio.StreamWriter) -> None:
        owner = self._owners.pop(writer, None)
        if owner is not None:
            owner.release(writer)
        else:
            close(writer)

    def shutdown(self) -> None:
        self.closed = True

    def send(self, msg) -> None:  # nothing to tell an agent we do not hold
        pass


@dataclass(eq=False)
class RemoteEndpoint(AgentEndpoint):
    """An agent endpoint held by another edge (``session`` is a RemoteSession)."""

    remote: ClassVar[bool] = True
    signature: tuple = ()

    @property
    def node_id(self) -> str:
        return self.session.node_id

    @property
    def peer_addr(self) -> str:
        return self.session.peer_addr

    @property
    def session_id(self) -> str:
        return self.session.id


_EP_SQL = """
SELECT a.id, a.session_id, a.node_id, a.epoch, a.account_id, a.client_id, a.name, a.binding,
       a.proto, a.host, a.port, a.url, a.pooling, a.policy, a.edge_headers, a.metadata,
       a.description, a.upstream_url, a.created_at, e.peer_addr, e.peer_tls
FROM agent_endpoints a JOIN edges e ON e.node_id = a.node_id AND e.epoch = a.epoch
WHERE a.node_id <> $1
"""


class Feed:
    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.edge = node.edge
        self.remote: dict[str, RemoteEndpoint] = {}
        self.sessions: dict[str, RemoteSession] = {}
        self.edge_addrs: dict[str, str] = {}  # node_id -> advertise addr, live edges
        self.edge_epochs: dict[str, int] = {}
        self._pending: set[str] = set()
        self._wake = asyncio.Event()
        self._reload = False
        self._conn = None
        self._lost = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.reloads = 0

    async def start(self) -> None:
        # a loaded machine or a busy PostgreSQL may take a moment: a few tries before the
        # edge gives up starting
        for attempt in range(START_TRIES):
            try:
                if self._conn is None:
                    await self._connect()
                await self.reload()
                break
            except Exception as exc:
                if attempt == START_TRIES - 1:
                    from backend.cluster.node import ClusterError

                    raise ClusterError(f"cannot start the cluster's change feed: {exc!r}") from None
                log.warning("cluster feed: start failed (%r); trying again", exc)
                if self._conn is not None and self._conn.is_closed():
                    self._conn = None
                await asyncio.sleep(0.5)
        self._tasks = [asyncio.ensure_future(self._listen_loop()), asyncio.ensure_future(self._process_loop())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 1.0)
        for ep in list(self.remote.values()):
            self._remove(ep)

    def reload_soon(self) -> None:
        self._reload = True
        self._wake.set()

    # ---------------------------------------------------------- the LISTEN connection
    async def _connect(self) -> None:
        import asyncpg

        self._lost = asyncio.Event()
        conn = await asyncpg.connect(self.node.dsn, timeout=CONNECT_TIMEOUT)
        conn.add_termination_listener(lambda _c: self._lost.set())
        await conn.add_listener("burrow_changes", self._on_notify)
        self._conn = conn

    def _on_notify(self, _conn, _pid, _channel, payload: str) -> None:
        self._pending.add(payload)
        self._wake.set()

    async def _listen_loop(self) -> None:
        """Watch the listening connection; after a reconnect, reload everything."""
        loop = asyncio.get_running_loop()
        last_reconcile = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), CHECK_INTERVAL)
            ok = False
            if self._conn is not None and not self._lost.is_set() and not self._conn.is_closed():
                try:
                    await asyncio.wait_for(self._conn.fetchval("SELECT 1"), QUERY_TIMEOUT)
                    ok = True
                except asyncio.CancelledError:
                    raise
                except Exception:
                    ok = False
            if ok:
                if loop.time() - last_reconcile >= RECONCILE_INTERVAL:
                    last_reconcile = loop.time()
                    self.reload_soon()
                continue
            if self._conn is not None:
                log.warning("cluster feed: the LISTEN connection was lost; reconnecting")
                with contextlib.suppress(Exception):
                    self._conn.terminate()
                self._conn = None
            try:
                await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("cluster feed: cannot reconnect yet: %s", exc)
                await asyncio.sleep(RECONNECT_DELAY)
                continue
            log.info("cluster feed: LISTEN connection back; full reload")
            last_reconcile = loop.time()
            self.reload_soon()

    async def _process_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            keys, self._pending = self._pending, set()
            reload, self._reload = self._reload, False
            try:
                if reload:
                    await self.reload()
                elif keys:
                    await self._apply(keys)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # PostgreSQL went away mid-read (the reconnect reloads everything), or a
                # bug: either way the routes are stale until a re-read succeeds
                log.warning("cluster feed: re-read failed (%r); will reload", exc)
                self._pending |= keys
                self._reload = True
                await asyncio.sleep(RECONNECT_DELAY)
                self._wake.set()

    # ------------------------------------------------------------------ re-reads
    async def reload(self) -> None:
        """Everything, from scratch: edges, remote agent endpoints, cloud endpoints, accounts."""
        pool = self.node.pool
        async with pool.acquire() as c:
            edges = await c.fetch("SELECT node_id, epoch, advertise_addr FROM edges")
            rows = await c.fetch(_EP_SQL, self.node.node_id)
        self._set_edges(edges)
        await self._apply_rows(rows, lambda ep: True)
        await self._reload_cloud()
        await self._reload_accounts()
        self.node.peer.prune(self.edge_epochs)
        self.reloads += 1

    async def _apply(self, keys: set[str]) -> None:
        by: dict[str, set[str]] = {}
        for k in keys:
            kind, _, key = k.partition(":")
            by.setdefault(kind, set()).add(key)
        pool = self.node.pool
        me = self.node.node_id
        if "edge" in by:
            async with pool.acquire() as c:
                edges = await c.fetch("SELECT node_id, epoch, advertise_addr FROM edges")
                nodes = list(by["edge"] - {me})
                rows = await c.fetch(_EP_SQL + " AND a.node_id = ANY($2::text[])", me, nodes) if nodes else []
            self._set_edges(edges)
            await self._apply_rows(rows, lambda ep: ep.session.node_id in nodes)
            self.node.peer.prune(self.edge_epochs)
        if "session" in by:
            sids = list(by["session"])
            async with pool.acquire() as c:
                rows = await c.fetch(_EP_SQL + " AND a.session_id = ANY($2::text[])", me, sids)
            await self._apply_rows(rows, lambda ep: ep.session.id in by["session"])
        if "agent_endpoint" in by:
            ids = list(by["agent_endpoint"])
            async with pool.acquire() as c:
                rows = await c.fetch(_EP_SQL + " AND a.id = ANY($2::text[])", me, ids)
            await self._apply_rows(rows, lambda ep: ep.id in by["agent_endpoint"])
        for eid in by.get("cloud_endpoint", ()):
            await self._cloud_one(eid)
        for aid in by.get("account", ()):
            await self._account(aid)

    def _set_edges(self, rows) -> None:
        self.edge_addrs = {r["node_id"]: r["advertise_addr"] for r in rows}
        self.edge_epochs = {r["node_id"]: r["epoch"] for r in rows}

    async def _apply_rows(self, rows, in_scope) -> None:
        """Make the remote endpoints within ``in_scope`` exactly ``rows``."""
        seen = set()
        for r in rows:
            seen.add(r["id"])
            sig = tuple(r.values())
            old = self.remote.get(r["id"])
            if old is not None and old.signature == sig:
                continue
            if old is not None:
                self._remove(old)
            await self._add(r, sig)
        for ep in list(self.remote.values()):
            if ep.id not in seen and in_scope(ep):
                self._remove(ep)
        self.node.peer.warm()

    async def _add(self, r, sig: tuple) -> None:
        policy = None
        if r["policy"]:
            try:
                policy = compile_policy(r["policy"])
            except PolicyError as exc:
                log.error("cluster feed: endpoint %s has a policy this edge cannot compile: %s", r["id"], exc)
                return
        s = self.sessions.get(r["session_id"])
        if s is None or s.epoch != r["epoch"] or s.peer_addr != r["peer_addr"] or s.peer_tls != r["peer_tls"]:
            s = RemoteSession(
                node=self.node,
                id=r["session_id"],
                account_id=r["account_id"],
                client_id=r["client_id"],
                node_id=r["node_id"],
                epoch=r["epoch"],
                peer_addr=r["peer_addr"],
                peer_tls=r["peer_tls"],
                edge_forwarded_headers=r["edge_headers"],
            )
            self.sessions[s.id] = s
        ep = RemoteEndpoint(
            id=r["id"],
            session=s,  # type: ignore[arg-type]
            name=r["name"],
            proto=r["proto"],
            url=r["url"],
            host=r["host"],
            port=r["port"],
            binding=r["binding"],
            pooling_enabled=r["pooling"],
            metadata=r["metadata"],
            description=r["description"],
            upstream_url=r["upstream_url"],
            created_at=r["created_at"],
            policy=policy,
            policy_text=r["policy"],
            signature=sig,
        )
        reg = self.edge.registry
        if ep.proto == "tcp" and ep.binding == "public" and reg.route("public", "tcp", ep.port) is None:
            bind_host = parse_hostport(self.edge.config.http_addr)[0]
            try:
                ep.server = await asyncio.start_server(
                    lambda rd, wr, _port=ep.port: self.edge._public_tcp(rd, wr, _port), bind_host, ep.port, backlog=1024
                )
            except OSError as exc:
                log.error("cluster feed: cannot listen on tcp port %d for %s: %s", ep.port, ep.url, exc)
                return
            if reg.route("public", "tcp", ep.port) is not None:  # a local bind won the port meanwhile
                ep.server.close()
                ep.server = None
        self.remote[ep.id] = ep
        reg.add_endpoint(ep)

    def alternative(self, ep) -> AgentEndpoint | None:
        """Another endpoint of ``ep``'s route not held by ``ep``'s edge (local ones first)."""
        eps = self.edge.registry._routes.get(ep.route_key) or ()
        node = ep.session.node_id
        best = None
        for other in eps:
            if other is ep or other.session is None or other.session.closed:
                continue
            if not other.remote:
                return other
            if other.session.node_id != node and not self.node.peer.is_down(other.session):
                best = best or other
        return best

    def _remove(self, ep: RemoteEndpoint) -> None:
        self.remote.pop(ep.id, None)
        self.edge.registry.remove_endpoint(ep)
        s = ep.session
        if not s.endpoints and self.sessions.get(s.id) is s:
            del self.sessions[s.id]
            s.shutdown()

    # ------------------------------------------------------------ cloud endpoints
    async def _reload_cloud(self) -> None:
        store = self.edge.store
        recs = await _maybe(store.all_cloud_endpoints())
        ids = {rec.id for rec in recs}
        for ep in list(self.edge.registry.endpoints()):
            if ep.session is None and ep.id not in ids:
                self.edge.unserve_cloud_endpoint(ep.id)
        for rec in recs:
            await self._serve_cloud(rec)

    async def _cloud_one(self, endpoint_id: str) -> None:
        store = self.edge.store
        find = getattr(store, "find_cloud_endpoint", None)
        if find is not None:
            rec = await _maybe(find(endpoint_id))
        else:
            rec = next((r for r in await _maybe(store.all_cloud_endpoints()) if r.id == endpoint_id), None)
        if rec is None:
            cur = self.edge.registry.find(endpoint_id)
            if cur is not None and cur.session is None:
                self.edge.unserve_cloud_endpoint(endpoint_id)
            return
        await self._serve_cloud(rec)

    async def _serve_cloud(self, rec) -> None:
        cur = self.edge.registry.find(rec.id)
        if cur is not None and cur.session is None and getattr(cur, "record", None) == rec:
            return  # served as it is (e.g. by the API call on this edge that wrote it)
        try:
            await _maybe(self.edge.serve_cloud_endpoint(rec, checked=True))
        except Exception as exc:
            log.error("cluster feed: cloud endpoint %s (%s) is not served: %s", rec.id, rec.url, exc)

    # ------------------------------------------------------------------ accounts
    async def _reload_accounts(self) -> None:
        from backend.edge import accounts

        store = self.edge.store
        ids = await _maybe(store.disabled_account_ids())
        live = {s.account_id for s in self.edge.registry.sessions.values()}
        for aid in ids & live:
            acct = await _maybe(store.get_account(aid))
            if acct is not None:
                accounts.cut_off(self.edge, acct)

    async def _account(self, account_id: str) -> None:
        from backend.edge import accounts

        acct = await _maybe(self.edge.store.get_account(account_id))
        if acct is None:
            return
        if acct.disabled_at is not None:
            accounts.cut_off(self.edge, acct)
        else:
            with contextlib.suppress(Exception):
                await _maybe(accounts.restore(self.edge, acct))
