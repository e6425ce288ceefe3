"""The agent: dials the edge, keeps a session and a pool of data connections.

The control connection is TLS and carries typed frames (:mod:`backend.protocol`).
Data connections are dialled ahead of need (a small pre-warmed pool, topped up on
every take and whenever the edge asks), each serving exactly one public connection.

Connection loss is normal: the agent reconnects forever (a few fast retries, then
exponential backoff with full jitter), keeps its client id so the edge replaces the
stale session at once, and re-binds the same URLs it had.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import platform
import random
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from backend import __version__, tlshalf
from backend import protocol as p
from backend.agent import forward
from backend.agent.events import EventHub
from backend.agent.inspect import DEFAULT_BODY_CAP, InspectionStore
from backend.agent.tunnels import Tunnel, TunnelConfig
from backend.netutil import is_ip, is_loopback, parse_hostport
from backend.relay import close, tune
from backend.tlsclient import client_context

log = logging.getLogger("burrow.agent")


class AgentError(Exception):
    """A failure the agent cannot retry its way out of (bad authtoken, bad config)."""

    def __init__(self, msg: str, code: str = "") -> None:
        super().__init__(msg)
        self.code = code


@dataclass
class AgentConfig:
    server_addr: str = "127.0.0.1:4042"
    authtoken: str = ""
    root_cas: str | Path | None = None
    # TLS on data connections: None = automatic (plain TCP when the edge is on this
    # machine's loopback, where TLS protects nothing; TLS otherwise).
    data_tls: bool | None = None
    pool_size: int = 4
    metadata: str = ""
    # Connect attempts before giving up when the edge was never reached (0 = forever).
    initial_attempts: int = 3
    tunnels: list[TunnelConfig] = field(default_factory=list)
    # Inspection: ngrok's inspect_db_size (0 = 50 MB, -1 = off), body cap, SQLite file.
    inspect_db_size: int = 0
    inspect_body_cap: int = DEFAULT_BODY_CAP
    inspect_db: str | Path | None = None
    # How long a finished capture may wait for its batch write to inspect_db (ms).
    inspect_db_flush_ms: int = 100
    #: sessions held at once, each on a different edge of a cluster, all binding the same
    #: URLs (cloudflared's ha-connections); None = 2 when the edge lists 2 or more live
    #: edges, else 1.  1 = a single session.
    ha_connections: int | None = None


MAX_HA_CONNECTIONS = 8
MAX_KNOWN_EDGES = 32
#: most data connections a leg keeps ready after bursts of new public connections
POOL_GROW_MAX = 32
#: seconds without a burst after which the grown pool shrinks back, one per take
POOL_SHRINK_AFTER = 60.0
#: refusals that say "try again" (a cluster edge whose PostgreSQL is away for a moment)
RETRYABLE = frozenset({"ERR_NGROK_503"})


def backoff(attempt: int, fast: int = 3, base: float = 0.5, cap: float = 30.0) -> float:
    """Delay before reconnect ``attempt`` (1-based): fast retries, then full jitter."""
    if attempt <= fast:
        return 0.05 * attempt
    return random.uniform(0, min(cap, base * 2 ** (attempt - fast)))


@dataclass(eq=False)
class Leg:
    """One of the agent's sessions: HA slot ``slot``, on one edge.

    An agent holds one leg, or ``ha_connections`` legs on different edges of a cluster;
    each has its own control connection, session key, data connections and endpoints
    (the same URLs), and reconnects on its own.
    """

    slot: int
    status: str = "connecting"
    #: the ingress address its control connection dialled
    addr: str = ""
    #: the edge it holds: AuthOk's direct_addr (where its data connections go), else addr
    edge: str = ""
    session_id: str | None = None
    key: str = ""
    region: str = ""
    https: bool = False  # learnt from auth_ok: may http tunnels default to https?
    latency: float | None = None
    writer: asyncio.StreamWriter | None = None
    #: data connections: (host to dial, port, TLS server name) and whether TLS is on
    data_target: tuple[str, int, str] = ("", 0, "")
    data_tls: bool = False
    pending: dict[int, asyncio.Future] = field(default_factory=dict)
    #: this leg's endpoints: endpoint id -> tunnel
    endpoints: dict[str, Tunnel] = field(default_factory=dict)
    connected: bool = False
    #: the current (or last) session got as far as its auth_ok
    up: bool = False
    #: data connections dialled or waiting in the edge's pool, and how many to keep
    #: (``pool_size``, grown by the edge's asks for more: see Agent._data_conn)
    pooled: int = 0
    pool_target: int = 0
    grown_at: float = 0.0

    def info(self) -> dict:
        return {
            "slot": self.slot,
            "edge": self.edge or self.addr,
            "status": self.status,
            "session_id": self.session_id if self.connected else None,
            "latency_ms": round(self.latency * 1000, 3) if self.latency is not None else None,
        }


class Agent:
    def __init__(self, config: AgentConfig, on_event: Callable[[dict], None] | None = None):
        self.config = config
        self._on_event = on_event or (lambda ev: None)
        self.events = EventHub()
        self.capture: InspectionStore | None = None
        if config.inspect_db_size != -1:
            self.capture = InspectionStore(
                config.inspect_db_size,
                config.inspect_body_cap,
                config.inspect_db,
                db_flush=max(0, config.inspect_db_flush_ms) / 1000,
            )
            self.capture.subscribe(self.events.publish)
            self.capture.listening = lambda: self.events.active
        if config.ha_connections is not None and not 1 <= config.ha_connections <= MAX_HA_CONNECTIONS:
            raise AgentError(f"ha_connections must be between 1 and {MAX_HA_CONNECTIONS}")
        self.client_id = uuid.uuid4().hex
        self.tunnels: dict[str, Tunnel] = {}
        self.legs: list[Leg] = [Leg(0)]
        #: ingress addresses of the cluster's live edges, as the latest auth_ok gave them
        self.edges: list[str] = []
        self._failed = False
        self._by_endpoint: dict[str, Tunnel] = {}  # every leg's endpoints
        self._req_ids = 0
        self._tasks: set[asyncio.Task] = set()
        self._stopped = asyncio.Event()
        self._connected = asyncio.Event()
        self._host, self._port = parse_hostport(config.server_addr)
        self._ctx = client_context(config.root_cas)
        self._data_ctx: ssl.SSLContext | None = None  # made on first use (tlshalf.ALPN)
        self._ping_ids = 0
        for tc in config.tunnels:
            self._add_tunnel(tc)

    # ------------------------------------------------------- the sessions, summed up
    def _main(self) -> Leg:
        """The leg that speaks for the agent: the first one online, else slot 0."""
        return next((leg for leg in self.legs if leg.connected), self.legs[0])

    @property
    def session_id(self) -> str | None:
        return self._main().session_id

    @property
    def latency(self) -> float | None:
        return self._main().latency

    @property
    def region(self) -> str:
        return self._main().region

    @property
    def edge_https(self) -> bool:
        return self._main().https

    @property
    def status(self) -> str:
        """online while any session is; else slot 0's state (connecting, reconnecting)."""
        if self._failed:
            return "failed"
        if any(leg.connected for leg in self.legs):
            return "online"
        return self.legs[0].status

    @property
    def data_tls(self) -> bool:
        return self._main().data_tls

    def sessions_info(self) -> list[dict]:
        return [leg.info() for leg in self.legs]

    # ----------------------------------------------------------------- public
    async def run(self) -> None:
        """Keep the session(s) alive until :meth:`stop`.  Raises AgentError on fatal errors."""
        self._spawn(self._metrics_ticker())
        try:
            await self._keep(self.legs[0])
        except AgentError:
            self._failed = True
            raise

    async def _keep(self, leg: Leg) -> None:
        """Keep one leg's session alive: reconnect with backoff, on an edge of its own.

        Slot 0 is the agent's life: a fatal error there (bad authtoken, a tunnel the
        edge refuses at start, an edge never reached) ends the agent.  Another slot that
        fails only logs it and tries again later.
        """
        attempt = 0
        ever = False
        while not self._stopped.is_set():
            addr = self._pick_edge(leg, max(attempt - 1, 0))  # first try after a loss: 0
            try:
                await self._session(leg, addr)
                attempt = 0
                ever = True
            except AgentError as exc:
                # the edge's store (PostgreSQL) away for a moment is worth waiting out
                if leg.slot == 0 and exc.code not in RETRYABLE:
                    raise
                msg = str(exc)
                self._on_disconnect(leg, msg)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, p.ProtocolError, ssl.SSLError) as exc:
                if leg.session_id is not None:
                    ever = True
                if leg.up:  # a session that was up was lost: start over with fast retries
                    attempt = 0
                msg = _describe(exc)
                if (
                    leg.slot == 0
                    and not ever
                    and self.config.initial_attempts
                    and attempt + 1 >= self.config.initial_attempts
                ):
                    raise AgentError(f"cannot reach the edge at {self.config.server_addr}: {msg}") from None
                log.debug("session ended (slot %d, %s): %s", leg.slot, addr, msg)
                self._on_disconnect(leg, msg)
            if self._stopped.is_set():
                break
            attempt += 1
            # fast retries until every known edge was tried once, then backoff with jitter
            delay = backoff(attempt, fast=max(3, len(self.edges) + 1))
            leg.status = "reconnecting"
            self.on_event({"event": "reconnecting", "attempt": attempt, "delay": round(delay, 3), **self._slot(leg)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), delay)

    def _slot(self, leg: Leg) -> dict:
        """Fields that tell an HA agent's sessions apart in its events (none for one)."""
        return {"slot": leg.slot, "edge": leg.edge or leg.addr} if len(self.legs) > 1 else {}

    def _pick_edge(self, leg: Leg, attempt: int) -> str:
        """The ingress address ``leg`` dials next.

        Until an edge has listed the cluster, the configured address.  Then the live
        edges no other leg holds (all of them when the others hold every one), the one
        this leg just lost last (it may be down), and
        the configured address (a DNS name or load balancer: the way back when every
        edge known has gone); each attempt takes the next one in that order.
        """
        server = self.config.server_addr
        if not self.edges:
            return server
        # an edge another leg is on, or is setting up a session with
        held = {other.edge or other.addr for other in self.legs if other is not leg and other.writer is not None}
        free = [e for e in self.edges if e not in held] or list(self.edges)  # else share one
        lost = leg.edge or leg.addr
        order = [e for e in free if e != lost] + [e for e in free if e == lost]
        if server not in order:
            order.append(server)
        return order[attempt % len(order)]

    def _learn(self, edges: list[str]) -> None:
        """Take the cluster's live edges from an auth_ok and start the HA legs it calls for."""
        if edges:
            # the latest list first, then edges seen before (one may be back by now, and
            # the list of an edge that came up alone may lack the others): a refused dial
            # costs little, a list with no live edge left in it would strand the leg
            self.edges = list(dict.fromkeys([*edges, *self.edges]))[:MAX_KNOWN_EDGES]
        want = self.config.ha_connections or (2 if len(self.edges) >= 2 else 1)
        while len(self.legs) < want and not self._stopped.is_set():
            leg = Leg(len(self.legs))
            self.legs.append(leg)
            self._spawn(self._keep(leg))

    def on_event(self, ev: dict) -> None:
        self._on_event(ev)
        if self.events.active:
            self.events.publish(ev["event"], ev)

    async def stop(self) -> None:
        self._stopped.set()
        for leg in self.legs:
            close(leg.writer)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.capture is not None:
            self.capture.close()

    async def wait_connected(self, timeout: float) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def start_tunnel(self, tc: TunnelConfig) -> Tunnel:
        """Add a tunnel and bind it now on every session that is up (raises AgentError
        when the first refuses it; a later one's refusal is an event)."""
        t = self._add_tunnel(tc)
        first = True
        for leg in list(self.legs):
            if leg.writer is None or not leg.connected:
                continue
            try:
                await self._bind(leg, t)
            except AgentError as exc:
                if first:
                    self.tunnels.pop(t.name, None)
                    raise
                self.on_event({"event": "bind_failed", "name": t.name, "error": str(exc), **self._slot(leg)})
            first = False
        return t

    async def stop_tunnel(self, name: str) -> bool:
        t = self.tunnels.pop(name, None)
        if t is None:
            return False
        for slot, eid in list(t.endpoint_ids.items()):
            self._by_endpoint.pop(eid, None)
            leg = self.legs[slot]
            leg.endpoints.pop(eid, None)
            if leg.writer is not None:
                with contextlib.suppress(AgentError, OSError, TimeoutError):
                    await self._request(leg, p.Unbind(req_id=0, endpoint_id=eid))
        t.endpoint_ids.clear()
        self.on_event({"event": "tunnel_stopped", "name": name})
        return True

    # --------------------------------------------------------------- internals
    def default_name(self, proto: str) -> str:
        """The name of a tunnel started without one (ngrok's ``command_line`` first)."""
        return "command_line" if not self.tunnels else f"{proto}-{len(self.tunnels)}"

    def _add_tunnel(self, tc: TunnelConfig) -> Tunnel:
        if not tc.name:
            tc = tc.model_copy(update={"name": self.default_name(tc.proto)})
        if tc.name in self.tunnels:
            raise AgentError(f"a tunnel named {tc.name!r} already exists", "ERR_NGROK_102")
        try:
            t = Tunnel(tc)
        except ValueError as exc:
            raise AgentError(str(exc), "ERR_NGROK_104") from None
        t.capture = self.capture if tc.inspect else None
        self.tunnels[tc.name] = t
        return t

    def _target(self, addr: str) -> tuple[str, int, str]:
        """(host to dial, port, TLS server name) for an ingress address.

        *.localhost names are loopback (RFC 6761 §6.3) as in curl and browsers, though
        the system resolver often does not know them.  The TLS name is the configured
        one (the cluster's name: every edge's certificate comes from the shared CA),
        unless that is an IP address, which only the edge bound to it has."""
        host, port = parse_hostport(addr)
        dial = "127.0.0.1" if host.endswith(".localhost") else host
        return dial, port, host if is_ip(self._host) else self._host

    async def _dial(self, addr: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port, name = self._target(addr)
        r, w = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=self._ctx, server_hostname=name, limit=2 * p.MAX_FRAME),
            10,
        )
        tune(w)
        return r, w

    async def _session(self, leg: Leg, addr: str) -> None:
        leg.up = False
        r, w = await self._dial(addr)
        leg.writer, leg.addr, leg.edge = w, addr, ""
        try:
            p.write_msg(
                w,
                p.Auth(
                    authtoken=self.config.authtoken,
                    client_id=self.client_id,
                    version=__version__,
                    os=platform.system().lower(),
                    hostname=socket.gethostname(),
                    metadata=self.config.metadata,
                    slot=leg.slot,
                    reuse_data=True,
                ),
            )
            await w.drain()
            msg = await asyncio.wait_for(p.read_msg(r), 10)
            if isinstance(msg, p.Error):
                raise AgentError(msg.msg, msg.code)
            if not isinstance(msg, p.AuthOk):
                raise p.ProtocolError(f"expected auth_ok, got {msg.type}")
            leg.session_id = msg.session_id
            leg.up = True
            leg.key = msg.session_key
            leg.region = msg.region
            leg.https = msg.https
            # data connections go where the edge says (behind a load balancer they must
            # reach this very edge), else where the control connection went
            leg.edge = msg.direct_addr or addr
            leg.data_target = self._target(leg.edge)
            leg.data_tls = (
                self.config.data_tls if self.config.data_tls is not None else not is_loopback(leg.data_target[0])
            )
            leg.status = "online"
            reader = self._spawn(self._read_loop(leg, r, msg.heartbeat_timeout))
            pinger = self._spawn(self._pinger(leg, msg.heartbeat_interval))
            leg.pool_target = self.config.pool_size
            for _ in range(self.config.pool_size):
                self._spawn(self._data_conn(leg))
            self._learn(msg.edges)
            try:
                for t in list(self.tunnels.values()):
                    await self._bind(leg, t)
            except AgentError as exc:
                raise AgentError(f"failed to start tunnel: {exc}", exc.code) from None
            leg.connected = True
            self._connected.set()
            self.on_event(
                {
                    "event": "session",
                    "session_id": leg.session_id,
                    "tunnels": [self.tunnel_info(t) for t in self.tunnels.values()],
                    **self._slot(leg),
                }
            )
            try:
                await reader
            finally:
                pinger.cancel()
        finally:
            close(w)
            leg.writer = None
            leg.connected = False
            if not any(other.connected for other in self.legs):
                self._connected.clear()
            for fut in leg.pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionResetError("session ended"))
            leg.pending.clear()

    def _on_disconnect(self, leg: Leg, why: str) -> None:
        for eid, t in leg.endpoints.items():
            self._by_endpoint.pop(eid, None)
            t.endpoint_ids.pop(leg.slot, None)
        leg.endpoints.clear()
        self.on_event({"event": "disconnected", "reason": why, **self._slot(leg)})

    async def _read_loop(self, leg: Leg, r: asyncio.StreamReader, timeout: float) -> None:
        while True:
            msg = await asyncio.wait_for(p.read_msg(r), timeout)
            if isinstance(msg, p.Ping):
                self._send(leg, p.Pong(id=msg.id, sent=msg.sent))
            elif isinstance(msg, p.Pong):
                leg.latency = max(0.0, asyncio.get_running_loop().time() - msg.sent)
            elif isinstance(msg, p.NeedData):
                # a burst of new public connections emptied the pool: serve it, and keep
                # that many more ready for the next burst (a TLS data connection costs a
                # handshake of ~2 ms on each side that the request would wait for)
                count = min(msg.count, 64)
                leg.pool_target = min(max(leg.pool_target, self.config.pool_size) + count, POOL_GROW_MAX)
                leg.grown_at = time.monotonic()
                for _ in range(count):
                    self._spawn(self._data_conn(leg))
            elif isinstance(msg, p.BindOk | p.UnbindOk | p.Error) and msg.req_id in leg.pending:
                fut = leg.pending.pop(msg.req_id)
                if not fut.done():
                    fut.set_result(msg)
            elif isinstance(msg, p.Error):
                raise AgentError(msg.msg, msg.code)
            elif isinstance(msg, p.Stop):
                self.on_event({"event": "stopped", "reason": msg.reason})
                self._stopped.set()
                for other in self.legs:  # the agent stops: every session ends
                    if other is not leg:
                        close(other.writer)
                return
            elif isinstance(msg, p.Restart):
                self.on_event({"event": "restart", "reason": msg.reason})
                raise ConnectionResetError("restart requested by the edge")

    async def _metrics_ticker(self, interval: float = 1.0) -> None:
        """Publish every tunnel's metrics once a second, only while someone listens.

        Ten times a second it also moves what survived out of the garbage collector's
        sight (``gc.freeze``).  Captures are many and long-lived: left in the young
        generations, each full collection rescanned hundreds of thousands of them and
        stalled the data path (p99 15 ms at 16k req/s; 3 ms with this, and 15% more
        requests).  Frozen objects are still freed by reference counting when evicted;
        once a minute everything is unfrozen and collected, so that rare reference
        cycles (exceptions and their tracebacks) cannot pile up.
        """
        ticks = 0
        while True:
            await asyncio.sleep(interval / 10)
            ticks += 1
            if ticks % 600 == 0:
                gc.unfreeze()
                gc.collect()
            gc.freeze()
            if ticks % 10:
                continue
            if self.events.active:
                self.events.publish(
                    "metrics",
                    {"tunnels": {t.name: t.metrics.to_api() for t in self.tunnels.values()}},
                )

    async def _pinger(self, leg: Leg, interval: float) -> None:
        """Ping at once (so latency is known from the start), then every ``interval``."""
        loop = asyncio.get_running_loop()
        while True:
            self._ping_ids += 1
            self._send(leg, p.Ping(id=self._ping_ids, sent=loop.time()))
            await asyncio.sleep(interval)

    @staticmethod
    def _send(leg: Leg, msg: p._Msg) -> None:
        if leg.writer is not None and not leg.writer.is_closing():
            p.write_msg(leg.writer, msg)

    async def _request(self, leg: Leg, msg: p.Bind | p.Unbind) -> p.Message:
        self._req_ids += 1
        msg = msg.model_copy(update={"req_id": self._req_ids})
        fut = asyncio.get_running_loop().create_future()
        leg.pending[self._req_ids] = fut
        self._send(leg, msg)
        reply = await asyncio.wait_for(fut, 15)
        if isinstance(reply, p.Error):
            raise AgentError(reply.msg, reply.code)
        return reply

    async def _bind(self, leg: Leg, t: Tunnel) -> None:
        async with t.bind_lock:
            await self._bind_locked(leg, t)

    async def _bind_locked(self, leg: Leg, t: Tunnel) -> None:
        tc = t.config
        url = t.public_url or tc.url  # re-bind the URL we had (or another leg got)
        twin = self.tunnels.get(tc.same_host_as) if tc.same_host_as else None
        if not t.public_url and twin is not None and twin.public_url and url.endswith("://"):
            url += twin.public_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
        proto = tc.proto
        if proto in ("http", "https") and "://" in url:
            scheme = url.split("://", 1)[0].lower()
            if scheme in ("http", "https"):
                proto = scheme  # `burrow http 80 --url https://x` makes an https endpoint
        elif proto == "http" and tc.auto_https and leg.https:
            proto = "https"  # ngrok v3: an http tunnel that names no scheme is https
        reply = await self._request(
            leg,
            p.Bind(
                req_id=0,
                name=tc.name,
                proto=proto,
                url=url,
                binding=tc.binding,
                pooling_enabled=tc.pooling_enabled,
                metadata=tc.metadata,
                description=tc.description,
                upstream_url=t.upstream.display,
                traffic_policy=tc.traffic_policy,
            ),
        )
        assert isinstance(reply, p.BindOk)
        if self.tunnels.get(t.name) is not t:  # stopped while the bind was on its way
            with contextlib.suppress(AgentError, OSError, TimeoutError):
                await self._request(leg, p.Unbind(req_id=0, endpoint_id=reply.endpoint_id))
            return
        was_online = t.online
        t.endpoint_ids[leg.slot] = reply.endpoint_id
        t.public_url = reply.url
        t.error = None
        self._by_endpoint[reply.endpoint_id] = t
        leg.endpoints[reply.endpoint_id] = t
        if not was_online:  # one tunnel, however many sessions serve it
            self.on_event({"event": "tunnel_started", **self.tunnel_info(t)})

    @staticmethod
    def tunnel_info(t: Tunnel) -> dict:
        return {"name": t.name, "public_url": t.public_url, "proto": t.proto, "addr": t.config.addr}

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------ data path
    async def _data_conn(self, leg: Leg) -> None:
        """Dial one data connection to the leg's edge, wait in its pool, then serve it."""
        session_id, key = leg.session_id, leg.key
        if session_id is None or self._stopped.is_set():
            return
        host, port, name = leg.data_target
        leg.pooled += 1  # a connection being dialled counts towards the pool
        try:
            if leg.data_tls:
                # TLS that can half-close (backend/tlshalf.py), offered to the edge by ALPN
                if self._data_ctx is None:
                    self._data_ctx = tlshalf.data_context(client_context(self.config.root_cas))
                r, w = await asyncio.wait_for(
                    tlshalf.open_connection(host, port, self._data_ctx, name, 2 * p.MAX_FRAME),
                    10,
                )
            else:
                r, w = await asyncio.wait_for(asyncio.open_connection(host, port, limit=2 * p.MAX_FRAME), 10)
            tune(w)
        except (OSError, TimeoutError, ssl.SSLError):
            return
        finally:
            leg.pooled -= 1
        p.write_msg(w, p.DataHello(session_id=session_id, key=key))
        start = await self._wait_in_pool(leg, r, w)
        while start is not None:
            self._top_up(leg, session_id)
            if not isinstance(start, p.StartData):
                close(w)
                return
            t = self._by_endpoint.get(start.endpoint_id)
            if t is None:
                close(w)
                return
            t.metrics.conn_opened()
            t0 = time.perf_counter_ns()
            handed_back = False
            try:
                if t.config.proto in ("http", "https"):
                    handed_back = await forward.serve_http(t, start, r, w)
                else:
                    await forward.serve_tcp(t, r, w, start)
            finally:
                t.metrics.conn_closed(time.perf_counter_ns() - t0)
                if not handed_back:
                    close(w)
            if not handed_back:
                return
            # the edge pooled it again (protocol.Auth.reuse_data): wait for its next start
            start = await self._wait_in_pool(leg, r, w)

    @staticmethod
    async def _wait_in_pool(leg: Leg, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> p.Message | None:
        """Wait in the edge's pool for the frame that hands the connection out (after
        the ``pooled`` notice of a connection given back); None, and the connection
        closed, if it broke meanwhile."""
        leg.pooled += 1
        try:
            msg = await p.read_msg(r)
            if isinstance(msg, p.DataPooled):
                msg = await p.read_msg(r)
            return msg
        except (OSError, asyncio.IncompleteReadError, p.ProtocolError):
            close(w)
            return None
        finally:
            leg.pooled -= 1

    def _top_up(self, leg: Leg, session_id: str) -> None:
        """A data connection was taken: dial another while the leg's pool is below its
        target (one more than that while it grows); a target grown by a burst shrinks
        back by one per take after a quiet minute."""
        if session_id != leg.session_id or leg.writer is None:
            return
        if leg.pool_target > self.config.pool_size and time.monotonic() - leg.grown_at > POOL_SHRINK_AFTER:
            leg.pool_target -= 1
        missing = leg.pool_target - leg.pooled
        for _ in range(min(max(missing, 0), 2)):
            self._spawn(self._data_conn(leg))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS verification failed ({exc.verify_message})"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed by the edge"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
