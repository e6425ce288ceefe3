"""An edge's membership in a cluster: lease, epoch, fencing, janitor, and its rows.

Every edge of a cluster (``burrow serve --store postgresql://...``) runs one
:class:`ClusterNode`.  It

- **registers** in ``edges`` with a new **epoch** (``nextval('burrow_edge_epoch')``)
  and its ingress, advertise and peer addresses;
- **renews its lease** every :data:`RENEW_INTERVAL` s to ``now() + LEASE_TTL`` —
  PostgreSQL's clock, never the edge's, judges expiry;
- runs the **janitor** (every edge tries, one at a time under an advisory lock): it
  deletes edges whose lease expired and every session, agent endpoint and claim of an
  edge or epoch that is no longer live, and notifies the change;
- **writes its own sessions and agent endpoints** (with their traffic policy text)
  whenever they start, bind, unbind or end — from a background task, never on a
  request's path — and NOTIFYs ``session:<id>`` / ``agent_endpoint:<id>``;
- keeps the **change feed** (:mod:`backend.cluster.feed`) and the **peer link**
  (:mod:`backend.cluster.peer`) running.

Fencing
-------
A renewal updates the row ``(node_id, epoch)``; when it finds none, the edge's row was
reaped (it froze — SIGSTOP, a long GC pause, a VM migration — or it lost PostgreSQL
while the others reached it) or superseded.  The edge then **drops every session at
once** (its agents reconnect and bind again, through whichever edge they reach),
deletes what is left of its old epoch's rows and claims, and registers again with a new
epoch.  Every write of its rows checks, in the same transaction, that its
``(node_id, epoch)`` row still exists (``FOR SHARE``), so an edge that was reaped can
never write a session of the old epoch back: PostgreSQL never shows a session owned by
an edge that is not live.

"PostgreSQL unreachable": alone, or for everyone?
-------------------------------------------------
An edge cannot tell the two apart by itself, so the rule is the same for both, and the
decision belongs to PostgreSQL:

1. While an edge cannot reach PostgreSQL it **keeps serving every route it has in
   memory** (its own agents, remote endpoints through the peer link, cloud endpoints)
   and ends nothing.  The cloud API answers a retryable 503 (the store's
   StoreUnavailable).  Session and endpoint writes wait and are retried.
2. It **fences itself only when PostgreSQL says it was reaped** (its row is gone on the
   first renewal that reaches PostgreSQL again).
3. The **janitor reaps only while the edge running it has renewed its own lease without
   a gap for at least one TTL**.  When PostgreSQL comes back after an outage for
   everyone, every edge's lease has expired on PostgreSQL's clock, but no janitor is
   allowed to reap until it has been renewing for ``LEASE_TTL`` seconds — by then every
   live edge has renewed (every ``RENEW_INTERVAL`` s), so **nobody is reaped**.
4. An edge that lost PostgreSQL *alone* is reaped by the others after ``LEASE_TTL``:
   they stop routing to it, its names are free for others to take.  Meanwhile it still
   serves, from memory, the public connections that reach it directly (this is the
   price of rule 1; behind a load balancer's health check it drops out).  When it
   reaches PostgreSQL again it learns it was reaped and fences itself (rule 2), so from
   then on PostgreSQL and the edges agree on one owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backend.cluster import schema
from backend.edge.sessions import AgentEndpoint, Session
from backend.netutil import format_hostport
from backend.store.base import StoreError, StoreUnavailable

if TYPE_CHECKING:
    from backend.edge.server import Edge

log = logging.getLogger("burrow.cluster")

#: seconds between lease renewals, and the lease's time to live (PostgreSQL's clock)
RENEW_INTERVAL = 1.0
LEASE_TTL = 3.0
#: seconds one membership query may take before it counts as a failure
QUERY_TIMEOUT = 2.0
#: seconds between janitor runs (each edge; one at a time runs, under an advisory lock):
#: an expired lease is reaped at most this long after it expired
JANITOR_INTERVAL = 0.25
#: seconds an agent claim may exist without its endpoint's row before the janitor drops it
ORPHAN_CLAIM_GRACE = 30.0
CHANNEL = "burrow_changes"


class ClusterError(Exception):
    """This edge cannot join the cluster (a clear reason for the operator)."""


class Fenced(Exception):
    """Our (node_id, epoch) row is gone: PostgreSQL gave our place away."""


def _notify_sql() -> str:
    return "SELECT pg_notify('" + CHANNEL + "', x) FROM unnest($1::text[]) AS x"


class ClusterNode:
    def __init__(
        self,
        edge: Edge,
        dsn: str,
        pool=None,
        node_id: str | None = None,
        peer_addr: str | None = None,
        advertise_addr: str | None = None,
        peer_tls: str = "auto",
    ) -> None:
        from backend.cluster.feed import Feed
        from backend.cluster.peer import PeerLink

        self.edge = edge
        self.dsn = dsn
        self.pool = pool
        self._own_pool = pool is None
        self.node_id = node_id or f"edge_{secrets.token_hex(6)}"
        self.epoch = 0
        self.registered = False
        self._peer_bind = peer_addr or "127.0.0.1:0"
        self._peer_tls = peer_tls
        self.peer_addr = ""
        self._advertise = advertise_addr
        self.advertise_addr = ""
        self.secret = b""
        #: the last renewal reached PostgreSQL
        self.pg_ok = False
        self._healthy_since: float | None = None
        self._last_ok = 0.0
        self.fenced = 0  # times this edge fenced itself
        self.reaped = 0  # edges this edge's janitor reaped
        self._gen = itertools.count(1)
        self._dirty_sessions: dict[str, int] = {}
        self._dirty_eps: dict[str, int] = {}
        self._local_eps: dict[str, AgentEndpoint] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self.feed = Feed(self)
        self.peer = PeerLink(self)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        import asyncpg

        if self.pool is None:
            self.pool = await asyncpg.create_pool(self.dsn, min_size=2, max_size=4, timeout=5.0)
        await schema.migrate(self.pool)
        self.secret = await schema.cluster_secret(self.pool)
        _warm_policy_engine()
        host, port = self.edge.addrs["ingress"]
        self.ingress_addr = format_hostport(host, port)
        self.advertise_addr = self._advertise or self.ingress_addr
        await self.peer.start(self._peer_bind, self._peer_tls)
        self.peer_addr = format_hostport(*self.peer.addr)
        await self._wait_for_node_id()
        await self._register()
        self.edge.registry.cluster = self
        # the lease first: the feed's first load may take a few tries on a busy machine
        self._spawn(self._lease_loop())
        self._spawn(self._janitor_loop())
        self._spawn(self._writer())
        await self.feed.start()

    async def stop(self) -> None:
        """Leave the cluster: stop the loops, delete our rows (others stop routing to us)."""
        self.edge.registry.cluster = None
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.feed.stop()
        await self.peer.stop()
        if self.pool is not None and self.registered:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._leave(), QUERY_TIMEOUT)
        if self._own_pool and self.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(), QUERY_TIMEOUT)

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def info(self) -> dict:
        return {"node_id": self.node_id, "epoch": self.epoch, "peer_addr": self.peer_addr}

    def live_edges(self) -> list[str]:
        """Advertise addresses of the live edges (this one first)."""
        others = [a for n, a in self.feed.edge_addrs.items() if n != self.node_id]
        return [self.advertise_addr, *sorted(set(others) - {self.advertise_addr})]

    # ----------------------------------------------------------------- membership
    async def _wait_for_node_id(self) -> None:
        """A node id whose lease is live belongs to a running edge (or to this one's last
        run, killed less than a TTL ago): wait for the lease to lapse; still renewed after
        that, it is another edge with the same ``--node-id`` — refuse to start, since two
        of them would fence each other every second."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LEASE_TTL + 2 * RENEW_INTERVAL
        while True:
            async with self.pool.acquire() as c:
                live = await c.fetchval(
                    "SELECT lease_expires > now() FROM edges WHERE node_id = $1", self.node_id
                )
            if not live:
                return
            if loop.time() > deadline:
                raise ClusterError(
                    f"another edge is running with node id {self.node_id!r} (its lease keeps being "
                    "renewed); give each edge its own --node-id"
                )
            await asyncio.sleep(0.2)

    async def _register(self) -> None:
        local = list(self._local_eps)
        async with self.pool.acquire() as c, c.transaction():
            epoch = await c.fetchval("SELECT nextval('burrow_edge_epoch')")
            await c.execute(
                """
                INSERT INTO edges (node_id, epoch, ingress_addr, advertise_addr, peer_addr, lease_expires, peer_tls)
                VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6), $7)
                ON CONFLICT (node_id) DO UPDATE SET epoch = EXCLUDED.epoch,
                    ingress_addr = EXCLUDED.ingress_addr, advertise_addr = EXCLUDED.advertise_addr,
                    peer_addr = EXCLUDED.peer_addr, lease_expires = EXCLUDED.lease_expires,
                    peer_tls = EXCLUDED.peer_tls,
                    started_at = now()
                """,
                self.node_id,
                epoch,
                self.ingress_addr,
                self.advertise_addr,
                self.peer_addr,
                LEASE_TTL,
                self.peer.tls,
            )
            # what an earlier epoch of ours left behind
            await c.execute("DELETE FROM agent_endpoints WHERE node_id = $1 AND epoch <> $2", self.node_id, epoch)
            await c.execute("DELETE FROM sessions WHERE node_id = $1 AND epoch <> $2", self.node_id, epoch)
            if await c.fetchval("SELECT to_regclass('claims') IS NOT NULL"):
                await c.execute(
                    "DELETE FROM claims WHERE node_id = $1 AND NOT (holder_id = ANY($2::text[]))", self.node_id, local
                )
            await c.execute(_notify_sql(), [f"edge:{self.node_id}"])
        self.epoch = epoch
        self.registered = True
        now = time.monotonic()
        self._healthy_since, self._last_ok, self.pg_ok = now, now, True
        # whatever is live here now belongs to the new epoch
        for sid in self.edge.registry.sessions:
            self._dirty_sessions[sid] = next(self._gen)
        for eid in self._local_eps:
            self._dirty_eps[eid] = next(self._gen)
        self._wake.set()
        log.info("cluster: edge %s registered with epoch %d (peer %s)", self.node_id, epoch, self.peer_addr)
        self.edge.on_event({"event": "cluster_registered", "node_id": self.node_id, "epoch": epoch})

    async def _leave(self) -> None:
        async with self.pool.acquire() as c, c.transaction():
            await c.execute("DELETE FROM agent_endpoints WHERE node_id = $1", self.node_id)
            await c.execute("DELETE FROM sessions WHERE node_id = $1", self.node_id)
            await c.execute("DELETE FROM edges WHERE node_id = $1 AND epoch = $2", self.node_id, self.epoch)
            if await c.fetchval("SELECT to_regclass('claims') IS NOT NULL"):
                await c.execute("DELETE FROM claims WHERE node_id = $1", self.node_id)
            await c.execute(_notify_sql(), [f"edge:{self.node_id}"])
        self.registered = False

    async def _renew(self) -> bool:
        async with self.pool.acquire() as c:
            row = await c.fetchval(
                "UPDATE edges SET lease_expires = now() + make_interval(secs => $3)"
                " WHERE node_id = $1 AND epoch = $2 RETURNING 1",
                self.node_id,
                self.epoch,
                LEASE_TTL,
            )
        return row is not None

    async def _lease_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            try:
                if not self.registered:
                    await asyncio.wait_for(self._register(), QUERY_TIMEOUT)
                elif await asyncio.wait_for(self._renew(), QUERY_TIMEOUT):
                    self._renewed()
                else:
                    await self._fence("its lease was reaped or superseded")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # PostgreSQL unreachable, a timeout: keep serving
                if self.pg_ok:
                    log.warning("cluster: PostgreSQL unreachable (%s); serving from memory", exc)
                self.pg_ok = False
                self._healthy_since = None
            await asyncio.sleep(max(0.0, RENEW_INTERVAL - (loop.time() - t0)))

    def _renewed(self) -> None:
        now = time.monotonic()
        if self._healthy_since is None or now - self._last_ok > LEASE_TTL:
            self._healthy_since = now  # a gap (we froze, or PostgreSQL was away): start over
        self._last_ok = now
        if not self.pg_ok:
            log.info("cluster: PostgreSQL reachable again")
            self.pg_ok = True
            self._wake.set()

    async def _fence(self, why: str) -> None:
        """PostgreSQL gave our place away: end every session at once, register anew."""
        self.fenced += 1
        old = self.epoch
        self.registered = False
        log.warning("cluster: edge %s epoch %d fenced: %s; ending all its sessions", self.node_id, old, why)
        for s in list(self.edge.registry.sessions.values()):
            self.edge._end_session(s, "this edge was fenced (lease lost); reconnect")
        self._dirty_sessions.clear()
        self._dirty_eps.clear()
        self.edge.on_event({"event": "cluster_fenced", "node_id": self.node_id, "epoch": old})
        await asyncio.wait_for(self._register(), QUERY_TIMEOUT)
        self.feed.reload_soon()

    def may_reap(self) -> bool:
        """Rule 3: only an edge that has renewed without a gap for one TTL reaps."""
        if not self.registered or not self.pg_ok or self._healthy_since is None:
            return False
        now = time.monotonic()
        return now - self._last_ok <= RENEW_INTERVAL * 2 and now - self._healthy_since >= LEASE_TTL

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(JANITOR_INTERVAL)
            if not self.may_reap():
                continue
            try:
                await asyncio.wait_for(self._janitor(), QUERY_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("cluster: janitor failed: %s", exc)

    async def _janitor(self) -> None:
        """Reap expired edges and every row of an edge or epoch that is not live."""
        async with self.pool.acquire() as c, c.transaction():
            if not await c.fetchval("SELECT pg_try_advisory_xact_lock($1)", schema.JANITOR_LOCK):
                return
            gone = await c.fetch("DELETE FROM edges WHERE lease_expires < now() RETURNING node_id, epoch")
            dead = "NOT EXISTS (SELECT 1 FROM edges e WHERE e.node_id = t.node_id AND e.epoch = t.epoch)"
            eps = await c.fetch(f"DELETE FROM agent_endpoints t WHERE {dead} RETURNING node_id")
            ss = await c.fetch(f"DELETE FROM sessions t WHERE {dead} RETURNING node_id")
            claims = []
            if await c.fetchval("SELECT to_regclass('claims') IS NOT NULL"):
                claims = await c.fetch(
                    "DELETE FROM claims t WHERE t.node_id IS NOT NULL AND NOT EXISTS "
                    "(SELECT 1 FROM edges e WHERE e.node_id = t.node_id) RETURNING t.node_id"
                )
                # an agent endpoint's claim whose endpoint row never came or is gone (its
                # edge lost the release): after a grace for the row to be written
                claims += await c.fetch(
                    "DELETE FROM claims t WHERE t.node_id IS NOT NULL"
                    " AND t.created_at < now() - make_interval(secs => $1)"
                    " AND NOT EXISTS (SELECT 1 FROM agent_endpoints a WHERE a.id = t.holder_id) RETURNING t.node_id",
                    ORPHAN_CLAIM_GRACE,
                )
            nodes = {r["node_id"] for r in [*gone, *eps, *ss, *claims]}
            if nodes:
                await c.execute(_notify_sql(), [f"edge:{n}" for n in sorted(nodes)])
        for r in gone:
            self.reaped += 1
            log.warning("cluster: janitor reaped edge %s (epoch %d): its lease expired", r["node_id"], r["epoch"])
            self.edge.on_event({"event": "cluster_reaped", "node_id": r["node_id"], "epoch": r["epoch"]})

    # ------------------------------------------------------ our sessions and endpoints
    def session_changed(self, s: Session) -> None:
        """Called by the Registry when a local session starts or ends."""
        self._dirty_sessions[s.id] = next(self._gen)
        self._wake.set()

    def endpoint_changed(self, ep, up: bool) -> None:
        """Called by the Registry when a local agent endpoint goes online or offline."""
        if not isinstance(ep, AgentEndpoint) or getattr(ep, "remote", False):
            return
        if up:
            self._local_eps[ep.id] = ep
        else:
            self._local_eps.pop(ep.id, None)
        self._dirty_eps[ep.id] = next(self._gen)
        self._wake.set()

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.registered or not (self._dirty_sessions or self._dirty_eps):
                continue
            sessions = dict(self._dirty_sessions)
            eps = dict(self._dirty_eps)
            try:
                await asyncio.wait_for(self._write(list(sessions), list(eps)), QUERY_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Fenced:
                continue  # the lease loop fences us on its next renewal
            except Exception as exc:
                log.debug("cluster: writing sessions/endpoints failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                self._wake.set()
                continue
            for k, g in sessions.items():
                if self._dirty_sessions.get(k) == g:
                    del self._dirty_sessions[k]
            for k, g in eps.items():
                if self._dirty_eps.get(k) == g:
                    del self._dirty_eps[k]

    async def _write(self, session_ids: list[str], endpoint_ids: list[str]) -> None:
        # everything is read from memory before the first await: the rows say what is
        # live here at one instant
        reg = self.edge.registry
        epoch = self.epoch
        notes = [f"session:{i}" for i in session_ids] + [f"agent_endpoint:{i}" for i in endpoint_ids]
        up, down = [], []
        for sid in session_ids:
            s = reg.sessions.get(sid)
            if s is not None and not s.closed:
                up.append(
                    (s.id, s.account_id, s.client_id, int(getattr(s, "slot", 0) or 0), self.node_id, epoch, s.ip, _info(s))
                )
            else:
                down.append(sid)
        up_eps, down_eps = [], []
        for eid in endpoint_ids:
            ep = self._local_eps.get(eid)
            if ep is None or ep.session.closed:
                down_eps.append(eid)
                continue
            up_eps.append(
                (
                    ep.id,
                    ep.session.id,
                    self.node_id,
                    epoch,
                    ep.session.account_id,
                    ep.session.client_id,
                    ep.name,
                    ep.binding,
                    ep.proto,
                    ep.host,
                    ep.port,
                    ep.url,
                    ep.pooling_enabled,
                    ep.policy_text,
                    bool(type(ep.session).edge_forwarded_headers),
                    ep.metadata,
                    ep.description,
                    ep.upstream_url,
                    ep.created_at,
                )
            )
        async with self.pool.acquire() as c, c.transaction():
            mine = await c.fetchval(
                "SELECT 1 FROM edges WHERE node_id = $1 AND epoch = $2 FOR SHARE", self.node_id, epoch
            )
            if mine is None:
                raise Fenced
            if down:
                await c.execute("DELETE FROM sessions WHERE id = ANY($1::text[]) AND node_id = $2", down, self.node_id)
            if up:
                await c.executemany(
                    "INSERT INTO sessions (id, account_id, client_id, slot, node_id, epoch, ip, info)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO UPDATE SET"
                    " node_id = EXCLUDED.node_id, epoch = EXCLUDED.epoch, info = EXCLUDED.info",
                    up,
                )
            if down_eps:
                await c.execute(
                    "DELETE FROM agent_endpoints WHERE id = ANY($1::text[]) AND node_id = $2", down_eps, self.node_id
                )
                if await c.fetchval("SELECT to_regclass('claims') IS NOT NULL"):
                    # the store's own release gives up after a few tries; this one retries
                    # until PostgreSQL takes it
                    await c.execute(
                        "DELETE FROM claims WHERE holder_id = ANY($1::text[]) AND node_id = $2", down_eps, self.node_id
                    )
            if up_eps:
                await c.executemany(
                    """
                    INSERT INTO agent_endpoints (id, session_id, node_id, epoch, account_id, client_id, name,
                        binding, proto, host, port, url, pooling, policy, edge_headers, metadata,
                        description, upstream_url, created_at)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)
                    ON CONFLICT (id) DO UPDATE SET node_id = EXCLUDED.node_id, epoch = EXCLUDED.epoch,
                        policy = EXCLUDED.policy, pooling = EXCLUDED.pooling
                    """,
                    up_eps,
                )
            if notes:
                await c.execute(_notify_sql(), notes)

    # ------------------------------------------------- sessions held by other edges
    async def remote_sessions(self, account_id: str, session_id: str | None = None) -> list[RemoteSessionInfo]:
        """The account's live sessions held by the other edges (for ``/tunnel_sessions``:
        any edge lists every session of the cluster).  Raises StoreUnavailable when
        PostgreSQL cannot be asked."""
        sql = (
            "SELECT s.id, s.account_id, s.ip, s.info, s.node_id, s.epoch, e.peer_addr, e.peer_tls"
            " FROM sessions s JOIN edges e ON e.node_id = s.node_id AND e.epoch = s.epoch"
            " AND e.lease_expires > now() WHERE s.account_id = $1 AND s.node_id <> $2"
        )
        args: list = [account_id, self.node_id]
        if session_id is not None:
            sql += " AND s.id = $3"
            args.append(session_id)
        import asyncpg

        from backend.store.postgres import _unavailable_types

        try:
            async with self.pool.acquire(timeout=QUERY_TIMEOUT) as c:
                rows = await asyncio.wait_for(c.fetch(sql, *args), QUERY_TIMEOUT)
        except (*_unavailable_types(asyncpg), asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"PostgreSQL is unavailable: {type(exc).__name__}: {exc}") from None
        except asyncpg.PostgresError as exc:
            raise StoreError(f"PostgreSQL error: {type(exc).__name__}: {exc}") from None
        return [RemoteSessionInfo.from_row(r) for r in rows]

    async def command_remote(self, info: RemoteSessionInfo, command: str) -> tuple[int, str] | None:
        """Have the edge holding ``info``'s session run ``command`` (stop, restart,
        update) on it; None when done, else (HTTP status, message)."""
        return await self.peer.command(info, command)

    # --------------------------------------------------------------- remote traffic
    async def open_remote(self, ep, client_ip: str, client_port: int, scheme: str | None = None):
        """A connection to ``ep``'s agent through its edge's peer port (raises SessionClosed)."""
        return await self.peer.open(ep, client_ip, client_port, scheme)


def _info(s: Session) -> str:
    """What ``/tunnel_sessions`` shows of a session, as the ``sessions.info`` column."""
    return json.dumps(
        {
            "agent_version": s.agent_version,
            "os": s.os,
            "metadata": s.metadata,
            "transport": s.transport,
            "region": s.region,
            "credential_id": s.credential_id,
            "started_at": s.started_at,
        },
        separators=(",", ":"),
    )


@dataclass
class RemoteSessionInfo:
    """A session held by another edge, as ``/tunnel_sessions`` shows it (the same
    attributes as :class:`~backend.edge.sessions.Session` that the API's wire uses)."""

    id: str
    account_id: str
    ip: str
    node_id: str
    epoch: int
    peer_addr: str
    peer_tls: bool
    agent_version: str = ""
    os: str = ""
    metadata: str = ""
    transport: str = ""
    region: str = ""
    credential_id: str = ""
    started_at: str = ""
    closed: bool = False

    @classmethod
    def from_row(cls, r) -> RemoteSessionInfo:
        try:
            info = json.loads(r["info"] or "{}")
        except ValueError:
            info = {}
        if not isinstance(info, dict):
            info = {}
        extra = {k: str(info.get(k) or "") for k in ("agent_version", "os", "metadata", "transport", "region", "credential_id", "started_at")}
        return cls(
            id=r["id"],
            account_id=r["account_id"],
            ip=r["ip"] or "",
            node_id=r["node_id"],
            epoch=int(r["epoch"]),
            peer_addr=r["peer_addr"] or "",
            peer_tls=bool(r["peer_tls"]),
            **extra,
        )


def _warm_policy_engine() -> None:
    """Compile one policy now: the engine's first compile costs ~90 ms (it builds its
    schemas), which would otherwise land on the first endpoint the change feed serves."""
    from backend.policy.engine import compile_policy

    with contextlib.suppress(Exception):
        compile_policy(
            '{"on_http_request":[{"actions":[{"type":"custom-response","config":{"status_code":200,"body":"x"}}]}]}',
            require_termination=True,
        )
