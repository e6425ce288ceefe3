"""The edge: agent ingress, public HTTP/HTTPS and TCP listeners, and the cloud API.

One asyncio process.  Agents dial the ingress port (TLS; the first byte tells a TLS
ClientHello from a plain data connection), authenticate with an authtoken on a
control connection, and park pre-warmed data connections in their session's pool.
A public connection takes one data connection and keeps it for its lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from backend import metrics, tlshalf
from backend import protocol as p
from backend.connlimit import ConnLimit, ThrottledLog
from backend.edge import accounts, muxado, ngrok_agent, traffic
from backend.edge.sessions import AgentEndpoint, CloudRoute, Registry, Session
from backend.fsperm import private_dir, tighten_file
from backend.http1 import (
    MAX_HEAD,
)
from backend.ids import new_id, random_name
from backend.netutil import (
    connection_handler,
    format_hostport,
    parse_hostport,
    peek_byte,
    valid_hostname,
)
from backend.ownership import (
    Holder,
    NameConflict,
    Ownership,
    acl_allows,
    agent_host_allowed,
    name_of,
)
from backend.policy.document import PolicyError
from backend.policy.engine import compile_policy
from backend.relay import close
from backend.sni import NotTLS, peek_hello
from backend.store import AsyncStore, StoreError, open_edge_store
from backend.store.base import new_token
from backend.tls import LocalCA

if TYPE_CHECKING:
    from backend.cluster.node import ClusterNode
    from backend.edge.acme import EdgeAcme

#: The ALPN protocol of an ACME TLS-ALPN-01 validation (RFC 8737; backend/acme.py).
ACME_TLS_ALPN = "acme-tls/1"

log = logging.getLogger("burrow.edge")

HANDSHAKE_TIMEOUT = 10.0
LINGER = 0.5  # seconds a refused connection stays half-open to take the client's request
MAX_LINGERING = 64  # refused connections lingering at once; past it they close at once


@dataclass
class EdgeConfig:
    data_dir: Path
    #: where cloud state lives: None = SQLite in ``data_dir``; ``postgresql://...`` =
    #: a PostgreSQL shared by several edges (cluster mode)
    store: str | None = None
    api_addr: str = "127.0.0.1:4041"
    ingress_addr: str = "127.0.0.1:4042"
    http_addr: str = "127.0.0.1:4080"
    https_addr: str | None = "127.0.0.1:4443"
    tcp_ports: tuple[int, int] = (20000, 29999)
    domain: str = "burrow.localhost"
    tcp_host: str | None = None
    api_keys: list[str] = field(default_factory=list)
    authtokens: list[str] = field(default_factory=list)
    heartbeat_interval: float = 10.0
    heartbeat_timeout: float = 30.0
    region: str = "local"
    #: cloud API requests allowed per account per minute, over all its API keys (a token
    #: bucket); 0 = no limit
    api_rate_limit: int = 600
    #: failed API key checks allowed per client IP per minute (a token bucket); 0 = no limit
    api_auth_fail_limit: int = 30
    #: the cloud API's URL as clients reach it (absolute ``uri`` / ``next_page_uri``);
    #: None = ``http://`` + the API's listen address
    api_public_url: str | None = None
    #: deadline (s) for a cloud API request head, and for its body (plus 1 s per 64 KiB)
    api_read_timeout: float = 10.0
    #: NS records users point an agent ingress domain at (shown as its ``ns_targets``)
    ns_targets: list[str] = field(default_factory=list)
    # Per-tenant caps (0 = no limit); each refusal carries ngrok's error code.
    #: agent sessions online at once per authtoken (ERR_NGROK_108)
    max_sessions_per_authtoken: int = 10
    #: endpoints (agent + cloud) per account (ERR_NGROK_18021)
    max_endpoints_per_account: int = 1000
    #: public tcp ports per account (ERR_NGROK_508)
    max_tcp_ports_per_account: int = 100
    #: data connections (pooled + active) per agent session
    max_data_conns_per_session: int = 10000
    #: seconds a public request body may go without a byte (nginx client_body_timeout)
    body_timeout: float = 60.0
    #: seconds a public client may read nothing of a response (nginx send_timeout)
    send_timeout: float = 60.0
    #: concurrent public connections (http, https, tcp), overall and per client IP; 0 = no cap
    max_conns: int = 10_000
    max_conns_per_ip: int = 256
    #: connections still in a handshake: ingress before auth, https before TLS is up
    max_handshakes: int = 1024
    max_handshakes_per_ip: int = 128
    #: seconds an ingress connection may take to send its first byte
    first_byte_timeout: float = 5.0
    #: seconds for a TLS handshake (with the ClientHello / first message) to complete
    handshake_timeout: float = 10.0
    # ACME (backend/edge/acme.py): certificates from a real CA, on demand and for ingresses.
    #: the CA's directory URL; None = every certificate comes from the local CA
    acme_directory: str | None = None
    acme_email: str | None = None
    #: PEM file of the roots to trust for the directory's HTTPS (None = the system's)
    acme_ca_root: str | None = None
    #: new on-demand certificates per account per hour (renewals do not count); 0 = no limit
    acme_rate_limit: int = 20
    #: seconds a first handshake waits for its certificate before it gets the local CA's
    acme_wait: float = 5.0
    #: challenge types answered, in order of preference (tls-alpn-01 needs the https listener)
    acme_challenges: tuple[str, ...] = ("tls-alpn-01", "http-01")
    #: sha256 of the admin API's key (``/admin/...``); None = no admin API
    admin_key_hash: str | None = None
    #: serve ``/metrics`` without the admin key
    metrics_public: bool = False
    # Cluster mode (backend/cluster, with a postgresql:// store): several edges as one.
    #: this edge's name in the cluster (None = a new one per start)
    node_id: str | None = None
    #: where the peer listener binds (other edges forward public connections to it)
    peer_addr: str = "127.0.0.1:0"
    #: the ingress address agents should dial for data connections (None = the bound one)
    advertise_addr: str | None = None
    #: mutual TLS on the peer link: auto (unless the peer listener is on loopback), on, off
    peer_tls: str = "auto"


class Edge:
    def __init__(self, config: EdgeConfig, on_event: Callable[[dict], None] | None = None):
        self.config = config
        self.names = Ownership()
        self.registry = Registry(self.names)
        self.on_event = on_event or (lambda ev: None)
        self.store: AsyncStore | None = None
        self.ca: LocalCA | None = None
        self.acme: EdgeAcme | None = None
        #: the cluster runtime (membership, change feed, peers); None in SQLite mode
        self.cluster: ClusterNode | None = None
        self.bootstrap: dict[str, str] = {}
        self.created_credentials = False
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task] = set()
        self._listen_socks: list[socket.socket] = []
        self._api_server = None
        self.addrs: dict[str, tuple[str, int]] = {}
        # public connections (all listeners), and the two handshake stages
        self.public_conns = ConnLimit(config.max_conns, config.max_conns_per_ip)
        self.ingress_pending = ConnLimit(config.max_handshakes, config.max_handshakes_per_ip)
        self.tls_pending = ConnLimit(config.max_handshakes, config.max_handshakes_per_ip)
        self._throttled = ThrottledLog(log)
        self._lingering = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        cfg = self.config
        _raise_nofile_limit()
        private_dir(cfg.data_dir)  # 0700: the database and keys in it are secrets
        # The CA first: a data dir it refuses (a key without its certificate) is left
        # exactly as it was, database included.
        dsn = self._cluster_dsn()
        if dsn is not None:  # one CA for every edge of a cluster (backend/cluster/ca.py)
            from backend.cluster.ca import share_ca

            await share_ca(dsn, cfg.data_dir)
        self.ca = LocalCA.load_or_create(cfg.data_dir)
        self.store = await open_edge_store(cfg.store or cfg.data_dir / "burrow.db")
        self.names.store = self.store
        if dsn is not None:
            self._make_cluster(dsn)  # before any agent can bind: its rows and claims carry our node id
        await self._bootstrap_credentials()
        names = ["localhost", "127.0.0.1", "::1", cfg.domain]
        # the addresses agents dial (an edge of a cluster binds e.g. 127.0.0.3 or a LAN address)
        for addr in (cfg.ingress_addr, cfg.advertise_addr):
            host = parse_hostport(addr)[0] if addr else ""
            if host and host not in names and host not in ("0.0.0.0", "::"):
                names.append(host)
        if cfg.acme_directory:
            from backend.edge.acme import EdgeAcme

            self.acme = EdgeAcme(self)
            await self.acme.start()
            ingress_ctx = self.ca.sni_context(names, pick=self.acme.ingress_context)
        else:
            ingress_ctx = self.ca.sni_context(names)

        # The listeners are bound now (their addresses go into the cluster's edges row)
        # and accept once the edge is ready: in a cluster, after it has registered and
        # loaded the other edges' routes (a reconnecting agent or a public client waits
        # in the backlog meanwhile instead of meeting an edge that is not one yet).
        host, port = parse_hostport(cfg.ingress_addr)
        ingress_sock = self._listen(host, port)
        self.addrs["ingress"] = ingress_sock.getsockname()[:2]

        host, port = parse_hostport(cfg.http_addr)
        srv = await asyncio.start_server(
            lambda r, w: self._public_http(r, w, "http"), host, port, limit=MAX_HEAD, backlog=1024, start_serving=False
        )
        self._servers.append(srv)
        self.addrs["http"] = srv.sockets[0].getsockname()[:2]

        https_sock = None
        if cfg.https_addr:
            host, port = parse_hostport(cfg.https_addr)
            https_ctx = self.ca.sni_context([*names, f"*.{cfg.domain}"])
            https_sock = self._listen(host, port)
            self.addrs["https"] = https_sock.getsockname()[:2]

        await self._load_cloud_endpoints()
        self._spawn(accounts.watch(self))
        await self._start_cluster()

        self._spawn(self._accept_loop(ingress_sock, lambda s, ip: self._on_ingress(s, ip, ingress_ctx), "ingress"))
        await srv.start_serving()
        if https_sock is not None:
            self._spawn(self._accept_loop(https_sock, lambda s, ip: self._on_https(s, ip, https_ctx), "https"))

        if cfg.api_addr:
            from backend.edge.api import start_api

            self._api_server, self.addrs["api"] = await start_api(self, cfg.api_addr)

    def _cluster_dsn(self) -> str | None:
        """The cluster's PostgreSQL DSN; None for a single edge."""
        dsn = getattr(self.store, "dsn", None)
        store = self.config.store
        if dsn is None and store and store.startswith(("postgresql://", "postgres://")):
            dsn = store
        return dsn

    def _make_cluster(self, dsn: str) -> None:
        from backend.cluster.node import ClusterNode

        cfg = self.config
        # its own small pool, not the store's: API load must never delay a lease renewal
        self.cluster = ClusterNode(
            self,
            dsn,
            node_id=cfg.node_id,
            peer_addr=cfg.peer_addr,
            advertise_addr=cfg.advertise_addr,
            peer_tls=cfg.peer_tls,
        )
        self.registry.cluster = self.cluster
        self.names.node_id = self.cluster.node_id

    async def _start_cluster(self) -> None:
        if self.cluster is not None:
            await self.cluster.start()

    async def stop(self) -> None:
        if self.cluster is not None:
            await self.cluster.stop()
        for s in list(self.registry.sessions.values()):
            self.registry.remove_session(s)
        for srv in self._servers:
            srv.close()
        for sock in self._listen_socks:
            sock.close()
        if self._api_server is not None:
            await self._api_server.stop()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.names.settle()
        if self.store is not None:
            await self.store.aclose()

    def ready_info(self) -> dict:
        def url(scheme: str, key: str) -> str | None:
            if key not in self.addrs:
                return None
            return f"{scheme}://{format_hostport(*self.addrs[key])}"

        return {
            "api_url": url("http", "api"),
            "ingress_addr": format_hostport(*self.addrs["ingress"]),
            "http_url": url("http", "http"),
            "https_url": url("https", "https"),
            "ca_file": str(self.ca.ca_file) if self.ca else None,
            "domain": self.config.domain,
            "data_dir": str(self.config.data_dir),
            **({"node_id": self.cluster.node_id, "peer_addr": self.cluster.peer_addr} if self.cluster else {}),
        }

    async def _bootstrap_credentials(self) -> None:
        """Create the credentials given on the command line, or a first pair on first run.

        A generated pair is written once to ``bootstrap.json`` (mode 0600) in the data
        dir so that a local agent and console can find it, like ngrok's config file
        holds an authtoken; the database keeps only hashes.
        """
        assert self.store is not None
        acct = await self.store.default_account()
        for tok in self.config.authtokens:
            await self.store.add_authtoken(acct.id, tok, description="from the command line")
        for key in self.config.api_keys:
            await self.store.add_api_key(acct.id, key, description="from the command line")
        path = self.config.data_dir / "bootstrap.json"
        if tighten_file(path):
            with contextlib.suppress(OSError, ValueError):
                self.bootstrap = json.loads(path.read_text())
            return
        if self.config.authtokens and self.config.api_keys:
            return
        boot = {"authtoken": new_token("bat"), "api_key": new_token("bak")}
        await self.store.add_authtoken(acct.id, boot["authtoken"], description="bootstrap")
        await self.store.add_api_key(acct.id, boot["api_key"], description="bootstrap")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(boot, f)
        self.bootstrap = boot
        self.created_credentials = True

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    # ------------------------------------------------------------------- ingress
    def _listen(self, host: str, port: int) -> socket.socket:
        sock = _listen(host, port)
        self._listen_socks.append(sock)
        return sock

    async def _accept_loop(self, lsock: socket.socket, handler, name: str) -> None:
        """Accept raw sockets (for listeners that peek before choosing TLS or not).

        Out of descriptors (EMFILE/ENFILE) it backs off, 5 ms doubling to 1 s like Go's
        net/http, instead of retrying at once; the failure is logged once a second.
        """
        loop = asyncio.get_running_loop()
        backoff = 0.0
        while True:
            try:
                sock, addr = await loop.sock_accept(lsock)
            except OSError as exc:
                if lsock.fileno() < 0:
                    return
                self._throttled.warning("accept-" + name, "%s: accept failed: %s", name, exc)
                backoff = min(max(backoff * 2, 0.005), 1.0)
                await asyncio.sleep(backoff)
                continue
            backoff = 0.0
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ip = addr[0] if isinstance(addr, tuple) else ""
            self._spawn(handler(sock, ip))

    def _agent_address(self, ip: str) -> bool:
        """An address with a live session: its agent may dial many data connections at
        once (one NeedData asks for up to 64), so the per-address cap does not apply."""
        return any(s.ip == ip for s in self.registry.sessions.values())

    def _refuse(self, what: str, ip: str) -> None:
        self._throttled.warning("refuse-" + what, "%s: connection from %s refused: limit reached", what, ip)

    @staticmethod
    async def _streams(
        sock: socket.socket, ctx: ssl.SSLContext | None, limit: int, handshake_timeout: float = HANDSHAKE_TIMEOUT
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit)
        proto = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(
            lambda: proto,
            sock,
            ssl=ctx,
            ssl_handshake_timeout=handshake_timeout if ctx else None,
        )
        return reader, asyncio.StreamWriter(transport, proto, reader, loop)

    async def _on_https(self, sock: socket.socket, ip: str, ctx: ssl.SSLContext) -> None:
        """TLS passthrough for ``tls`` endpoints (by SNI), termination for the rest."""
        if not self.public_conns.acquire(ip):
            self._refuse("https", ip)
            sock.close()
            return
        try:
            if not self.tls_pending.acquire(ip):
                self._refuse("https handshake", ip)
                sock.close()
                return
            try:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + self.config.handshake_timeout
                sni, alpn = await peek_hello(sock, self.config.handshake_timeout)
                if self.acme is not None and sni and ACME_TLS_ALPN in alpn:
                    challenge = self.acme.answers.tls_alpn_context(sni)
                    if challenge is not None:  # an ACME CA validating (RFC 8737): answer, close
                        _, w = await self._streams(sock, challenge, MAX_HEAD, max(deadline - loop.time(), 0.1))
                        close(w)
                        return
                ep = self.registry.route("public", "tls", sni) if sni else None
                if ep is None:
                    use = ctx
                    if self.acme is not None and sni:
                        use = await self.acme.context_for(sni) or ctx
                    r, w = await self._streams(sock, use, MAX_HEAD, max(deadline - loop.time(), 0.1))
            except (OSError, TimeoutError, NotTLS, ssl.SSLError, EOFError) as exc:
                log.debug("https connection dropped: %s", exc)
                metrics.HANDSHAKE_FAILURES.labels(listener="https").inc()
                sock.close()
                return
            finally:
                self.tls_pending.release(ip)
            if ep is not None:
                try:
                    r, w = await self._streams(sock, None, 2**16)
                except OSError:
                    sock.close()
                    return
                await traffic.forward_raw(self, ep, r, w)
                return
            await traffic.serve_http(self, r, w, "https")
        finally:
            self.public_conns.release(ip)

    async def _on_ingress(self, sock: socket.socket, peer_ip: str, ctx: ssl.SSLContext) -> None:
        # Until a connection has authenticated (an Auth or a DataHello with a session's
        # key) it holds one of a bounded number of slots, overall and per address, and
        # has first_byte_timeout for its first byte and handshake_timeout for the rest.
        if not self.ingress_pending.acquire(peer_ip, self._agent_address):
            self._refuse("ingress", peer_ip)
            sock.close()
            return
        pending = True

        def authenticated() -> None:
            nonlocal pending
            if pending:
                pending = False
                self.ingress_pending.release(peer_ip)

        cfg = self.config
        writer = None
        try:
            first = await peek_byte(sock, cfg.first_byte_timeout)
            if not first:
                sock.close()
                return
            loop = asyncio.get_running_loop()
            deadline = loop.time() + cfg.handshake_timeout
            tls = first == b"\x16"  # a TLS handshake record; anything else is a plain data conn
            # an agent's TLS data connection (it offers tlshalf.ALPN) gets TLS that can
            # half-close; the rest the event loop's TLS
            if tls and await self._offers_half_close(sock, deadline - loop.time()):
                reader, writer = await tlshalf.accept(sock, ctx, 2 * p.MAX_FRAME, max(deadline - loop.time(), 0.1))
            else:
                reader, writer = await self._streams(sock, ctx if tls else None, 2 * p.MAX_FRAME, cfg.handshake_timeout)
            # The first bytes tell the three kinds apart without waiting for a byte that
            # a client may not send: a burrow message is a 4-byte length (< 64 KiB) and
            # JSON; an ngrok agent's first muxado frame header is DATA + SYN (low byte
            # 0x12) on stream 3, whose fifth byte is 0, never JSON's "{".  A burrow length
            # ending in 0x12 is at least 18, so its fifth byte is on its way.
            def left() -> float:
                return max(deadline - loop.time(), 0.1)

            first = await asyncio.wait_for(reader.readexactly(4), left())
            if tls and first[3] == 0x12:
                first += await asyncio.wait_for(reader.readexactly(1), left())
                if first[4:5] != b"{":
                    first += await asyncio.wait_for(reader.readexactly(3), left())
                    if not muxado.looks_like_muxado(first):
                        raise p.ProtocolError("neither a burrow message nor a muxado frame")
                    await ngrok_agent.serve(self, reader, writer, first, peer_ip, authenticated)
                    return
            msg = await asyncio.wait_for(p.read_msg(reader, first), left())
            authenticated()
            if isinstance(msg, p.Auth) and tls:
                await self._control(reader, writer, msg, peer_ip)
            elif isinstance(msg, p.DataHello):
                s = self.registry.sessions.get(msg.session_id)
                if s is None or not s.check_key(msg.key) or not s.add_data(reader, writer):
                    close(writer)
                writer = None  # owned by the pool now (or closed)
            else:
                close(writer)
        except (OSError, EOFError, TimeoutError, ssl.SSLError, p.ProtocolError) as exc:
            log.debug("ingress connection dropped: %s", exc)
            if pending:  # before an Auth or a DataHello: a failed handshake
                metrics.HANDSHAKE_FAILURES.labels(listener="ingress").inc()
            close(writer)
            if writer is None:
                sock.close()
        finally:
            authenticated()

    @staticmethod
    async def _offers_half_close(sock: socket.socket, timeout: float) -> bool:
        """Whether the ClientHello waiting in ``sock`` offers tlshalf.ALPN (not consumed)."""
        try:
            _, alpn = await peek_hello(sock, max(timeout, 0.1))
        except NotTLS:
            return False  # the handshake fails as it would have
        return tlshalf.ALPN in alpn

    async def _control(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, auth: p.Auth, peer_ip: str
    ) -> None:
        assert self.store is not None
        try:
            cred = await self.store.find_authtoken(auth.authtoken)
            disabled = await accounts.arefusal(self.store, auth.authtoken) if cred is None else None
        except StoreError as exc:  # PostgreSQL away: no answer, the agent retries (backoff)
            self._throttled.warning("auth-store", "agent auth from %s: %s", peer_ip, exc)
            close(w)
            return
        if cred is None:
            p.write_msg(
                w,
                p.Error(code=accounts.AGENT_CODE, msg=disabled)
                if disabled
                else p.Error(
                    code="ERR_NGROK_107",
                    msg="authentication failed: the authtoken is invalid or has been revoked",
                ),
            )
            with contextlib.suppress(OSError):
                await w.drain()
            close(w)
            self.on_event({"event": "auth_failed", "ip": peer_ip})
            return
        cfg = self.config
        cap = cfg.max_sessions_per_authtoken
        if cap:
            stale = self.registry.same_agent(cred.account_id, auth.client_id, auth.slot)
            live = self.registry.sessions_of(cred.id) - (stale is not None and stale.credential_id == cred.id)
            if live >= cap:
                p.write_msg(
                    w,
                    p.Error(
                        code="ERR_NGROK_108",
                        msg=f"Your authtoken is limited to {cap} simultaneous agent sessions; "
                        f"{live} are online. Stop one of them, or run several endpoints from one agent.",
                    ),
                )
                with contextlib.suppress(OSError):
                    await w.drain()
                close(w)
                self.on_event({"event": "session_refused", "ip": peer_ip, "code": "ERR_NGROK_108"})
                return
        s = Session(
            id=new_id("ts"),
            key=secrets.token_urlsafe(24),
            account_id=cred.account_id,
            client_id=auth.client_id,
            credential_id=cred.id,
            writer=w,
            slot=auth.slot,
            agent_version=auth.version,
            os=auth.os,
            hostname=auth.hostname,
            metadata=auth.metadata,
            ip=peer_ip,
            region=cfg.region,
            acl=tuple(cred.acl),
            max_data=cfg.max_data_conns_per_session,
            reuse_data=auth.reuse_data,
        )
        old = self.registry.add_session(s)
        if old is not None:
            self._end_session(old, "replaced by a new session of the same agent")
        p.write_msg(
            w,
            p.AuthOk(
                session_id=s.id,
                session_key=s.key,
                account_id=s.account_id,
                region=cfg.region,
                heartbeat_interval=cfg.heartbeat_interval,
                heartbeat_timeout=cfg.heartbeat_timeout,
                https="https" in self.addrs,
                **self._placement(),
            ),
        )
        self.on_event({"event": "session_started", "session_id": s.id, "ip": peer_ip})
        pinger = asyncio.ensure_future(self._pinger(s))
        reason = "agent disconnected"
        try:
            while not s.closed:
                msg = await asyncio.wait_for(p.read_msg(r), cfg.heartbeat_timeout)
                if isinstance(msg, p.Ping):
                    s.send(p.Pong(id=msg.id, sent=msg.sent))
                elif isinstance(msg, p.Pong):
                    s.latency = max(0.0, asyncio.get_running_loop().time() - msg.sent)
                elif isinstance(msg, p.Bind):
                    s.send(await self._bind(s, msg))
                elif isinstance(msg, p.Unbind):
                    ep = s.endpoints.get(msg.endpoint_id)
                    if ep is not None:
                        self.registry.remove_endpoint(ep)
                        self.on_event({"event": "endpoint_offline", "url": ep.url})
                    s.send(p.UnbindOk(req_id=msg.req_id))
                else:
                    reason = f"unexpected {msg.type} message"
                    break
        except TimeoutError:
            reason = "heartbeat timeout"
        except p.ProtocolError as exc:
            reason = str(exc)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            pinger.cancel()
            self._end_session(s, reason)

    def _placement(self) -> dict:
        """AuthOk's ``direct_addr`` and ``edges``: where the session's data connections
        must go (this edge's advertised ingress address) and the live edges an HA agent
        may hold its other sessions on.  A single edge advertises itself only when told
        its address (``advertise_addr``): the address it bound may not be the one agents
        reach it by (a port mapping), and its agents dial what they were given."""
        if self.cluster is None:
            own = self.config.advertise_addr
            return {"direct_addr": own, "edges": [own] if own else []}
        own = self.cluster.advertise_addr
        return {"direct_addr": own, "edges": self.cluster.live_edges() or [own]}

    def _end_session(self, s: Session, reason: str) -> None:
        if s.closed and s.id not in self.registry.sessions:
            return
        gone = self.registry.remove_session(s)
        self.on_event(
            {
                "event": "session_ended",
                "session_id": s.id,
                "reason": reason,
                "endpoints": [ep.url for ep in gone],
            }
        )

    def stop_session(self, session_id: str, restart: bool = False) -> bool:
        """End a live session from the API; ``restart`` asks the agent to come back."""
        s = self.registry.sessions.get(session_id)
        if s is None:
            return False
        s.send(p.Restart(reason="restart requested") if restart else p.Stop(reason="stopped"))
        self._end_session(s, "restarted by the API" if restart else "stopped by the API")
        return True

    async def _pinger(self, s: Session) -> None:
        loop = asyncio.get_running_loop()
        n = 0
        while not s.closed:
            await asyncio.sleep(self.config.heartbeat_interval)
            n += 1
            s.send(p.Ping(id=n, sent=loop.time()))

    # ---------------------------------------------------------------------- bind
    async def _bind(self, s: Session, msg: p.Bind) -> p._Msg:
        try:
            ep = await self._make_endpoint(s, msg)
        except BindError as exc:
            return p.Error(req_id=msg.req_id, code=exc.code, msg=str(exc))
        except StoreError as exc:  # PostgreSQL away: the bind is refused; the agent may retry
            self._throttled.warning("bind-store", "bind of %s: %s", msg.url or msg.proto, exc)
            return p.Error(req_id=msg.req_id, code="ERR_NGROK_503", msg="The edge's database is unavailable; retry shortly.")
        if s.closed:  # the session ended while its tcp listener was starting
            self.names.release(ep.id)
            if ep.server is not None:
                ep.server.close()
            return p.Error(req_id=msg.req_id, code="ERR_NGROK_334", msg="the session ended")
        self.registry.add_endpoint(ep)
        self.on_event({"event": "endpoint_online", "url": ep.url, "session_id": s.id})
        return p.BindOk(req_id=msg.req_id, endpoint_id=ep.id, name=ep.name, url=ep.url)

    def _tcp_host(self) -> str:
        cfg = self.config
        return cfg.tcp_host or ("localhost" if cfg.domain.endswith("localhost") else cfg.domain)

    async def _make_endpoint(self, s: Session, msg: p.Bind) -> AgentEndpoint:
        cfg = self.config
        scheme, host, port = _split_url(msg.url, msg.proto)
        if scheme != msg.proto:
            raise BindError("ERR_NGROK_9034", f"url scheme {scheme!r} does not match proto {msg.proto!r}")
        if host and "." not in host and host != "localhost" and not host.startswith("*"):
            host = f"{host}.{cfg.domain}"
        internal = host.endswith(".internal")
        binding = msg.binding or ("internal" if internal else "public")
        if internal and binding != "internal":
            raise BindError("ERR_NGROK_9036", ".internal hostnames need the internal binding")
        if binding == "internal" and not internal:
            raise BindError("ERR_NGROK_9036", "the internal binding needs a .internal hostname")
        if binding == "kubernetes":
            raise BindError("ERR_NGROK_9036", "the kubernetes binding is not available on this edge")
        if host and not valid_hostname(host):
            raise BindError("ERR_NGROK_9031", f"invalid hostname {host!r}")
        policy = None
        if msg.traffic_policy:
            try:
                policy = compile_policy(msg.traffic_policy)
            except PolicyError as exc:
                raise BindError("ERR_NGROK_2201", f"invalid traffic policy: {exc}") from None
        common = dict(
            policy=policy,
            id=new_id("ep"),
            session=s,
            name=msg.name,
            proto=msg.proto,
            binding=binding,
            pooling_enabled=msg.pooling_enabled,
            metadata=msg.metadata,
            description=msg.description,
            upstream_url=msg.upstream_url,
            policy_text=msg.traffic_policy or "",
        )
        if msg.proto in ("http", "https", "tls"):
            if internal:
                return await self._claim(AgentEndpoint(url=f"{scheme}://{host}", host=host, port=0, **common))
            listener = "http" if msg.proto == "http" else "https"
            if listener not in self.addrs:
                raise BindError("ERR_NGROK_9037", "this edge has no https listener")
            if not host:
                host = f"{random_name()}.{cfg.domain}"
            lport = self.addrs[listener][1]
            default = 80 if msg.proto == "http" else 443
            url = f"{scheme}://{host}" + ("" if lport == default else f":{lport}")
            return await self._claim(AgentEndpoint(url=url, host=host, port=lport, **common))
        # tcp
        if internal:
            if not port:
                raise BindError("ERR_NGROK_9038", "internal tcp endpoints need a port")
            return await self._claim(AgentEndpoint(url=f"tcp://{host}:{port}", host=host, port=port, **common))
        tcp_host = self._tcp_host()
        lo, hi = cfg.tcp_ports
        if port:
            if not lo <= port <= hi:
                raise BindError("ERR_NGROK_9039", f"tcp port {port} is outside the edge's range {lo}-{hi}")
            candidates = [port]
        elif self.names.shared:  # ports free on every edge, by one query (claims race below)
            candidates = await self.store.free_tcp_ports(lo, hi, 16)
        else:
            start = secrets.randbelow(hi - lo + 1)
            candidates = [lo + (start + i) % (hi - lo + 1) for i in range(min(64, hi - lo + 1))]
        bind_host = parse_hostport(cfg.http_addr)[0]
        for cand in candidates:
            if not port and not self.names.shared and await self.names.owner_of(f"tcp:{cand}") is not None:
                continue
            try:
                ep = await self._claim(AgentEndpoint(url=f"tcp://{tcp_host}:{cand}", host="", port=cand, **common))
            except BindError as exc:
                if port or exc.code not in ("ERR_NGROK_309", "ERR_NGROK_334"):
                    raise
                continue  # another edge took this free port first: the next one
            if self.registry.route("public", "tcp", cand) is not None:
                return ep  # pooled: shares the listener of the endpoint already online
            try:
                ep.server = await asyncio.start_server(
                    lambda r, w, _port=cand: self._public_tcp(r, w, _port), bind_host, cand, backlog=1024
                )
            except OSError:
                self.names.release(ep.id)
                continue
            return ep
        raise BindError("ERR_NGROK_9040", f"no free tcp port in {lo}-{hi}")

    async def _claim(self, ep: AgentEndpoint) -> AgentEndpoint:
        """Check that the session may bind ``ep`` and claim its name (raises BindError).

        In order: the names an agent may bind at all, the credential's ACL, the
        account's caps, then ownership (:mod:`backend.ownership`), which also decides
        pooling between endpoints of one account on one URL.
        """
        s, cfg = ep.session, self.config
        public = ep.binding == "public"
        name = ep.owned_name
        owner = await self.names.owner_of(name)
        if owner is not None and owner != s.account_id:
            raise self._taken(ep, NameConflict("other_account", name, ""))
        if public and ep.proto != "tcp":
            why = await agent_host_allowed(self.names, cfg.domain, s.account_id, ep.host)
            if why is not None:
                raise BindError(
                    "ERR_NGROK_319",
                    f"You may not bind {ep.url}: {why}. Use a name under {cfg.domain}, or "
                    "reserve the domain for your account first (an agent ingress or a cloud endpoint).",
                )
        if not acl_allows(s.acl, ep.proto, ep.host, ep.port, self._tcp_host()):
            raise BindError(
                "ERR_NGROK_308",
                f"The credential ACL policy does not permit binding this address. "
                f"Credential ID: {s.credential_id} Address: {ep.url}",
            )
        if cfg.max_endpoints_per_account:
            n = await self.endpoint_count(s.account_id)
            if n >= cfg.max_endpoints_per_account:
                raise BindError(
                    "ERR_NGROK_18021",
                    f"Your account has {n} endpoints, the most this edge allows "
                    f"({cfg.max_endpoints_per_account}). Stop one before starting {ep.url}.",
                )
        if public and ep.proto == "tcp" and owner is None and cfg.max_tcp_ports_per_account:
            n = self.names.names_of(s.account_id, "tcp:")
            if n >= cfg.max_tcp_ports_per_account:
                raise BindError(
                    "ERR_NGROK_508",
                    f"Your account is limited to {cfg.max_tcp_ports_per_account} tcp ports on this "
                    f"edge and holds {n}. Stop a tcp endpoint before starting another.",
                )
        try:
            await self.names.claim(
                name, Holder(ep.id, s.account_id, ep.proto, ep.pooling_enabled, "agent", s.client_id)
            )
        except NameConflict as exc:
            raise self._taken(ep, exc) from None
        return ep

    @staticmethod
    def _taken(ep: AgentEndpoint, exc: NameConflict) -> BindError:
        account = ep.session.account_id
        if exc.reason == "other_account":
            if exc.is_tcp:
                return BindError(
                    "ERR_NGROK_309",
                    f"The address {ep.url} is reserved for another account. Failed to "
                    f"create an endpoint with it for the account {account}.",
                )
            return BindError(
                "ERR_NGROK_320",
                f"The domain {ep.host} is reserved for another account. Failed to create "
                f"the endpoint {ep.url} for the account {account}.",
            )
        return BindError(
            "ERR_NGROK_334",
            f"The endpoint '{ep.url}' is already online. Stop the agent serving it, or "
            "enable pooling on both to share its traffic.",
        )

    async def endpoint_count(self, account_id: str) -> int:
        """Endpoints the account has: agent endpoints online and stored cloud endpoints."""
        assert self.store is not None
        agent = sum(len(s.endpoints) for s in self.registry.sessions.values() if s.account_id == account_id)
        return agent + len(await self.store.list_cloud_endpoints(account_id))

    # ------------------------------------------------------------- public traffic
    @connection_handler
    async def _public_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, scheme: str) -> None:
        ip = (writer.get_extra_info("peername") or ("",))[0]
        if not self.public_conns.acquire(ip):
            self._refuse(scheme, ip)
            writer.write(traffic.TOO_MANY_CONNECTIONS)
            self._close_lingering(writer)
            return
        try:
            await traffic.serve_http(self, reader, writer, scheme)
        finally:
            self.public_conns.release(ip)

    def _close_lingering(self, writer: asyncio.StreamWriter) -> None:
        """Close after a refusal, lingering a little (as nginx's lingering_close): FIN
        after the answer, reading (the stream takes what arrives) for LINGER seconds,
        then close.  Closing with the request's bytes unread makes the kernel send a RST,
        which destroys the answer at the client before it reads it.  Lingering holds a
        descriptor, so under a flood (more than MAX_LINGERING at once) it closes at once:
        running out of descriptors would cost the connections still queued."""
        if self._lingering >= MAX_LINGERING:
            writer.close()
            return
        try:
            writer.write_eof()
        except (OSError, RuntimeError):
            writer.close()
            return
        self._lingering += 1

        def done() -> None:
            self._lingering -= 1
            writer.close()

        asyncio.get_running_loop().call_later(LINGER, done)

    @connection_handler
    async def _public_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        ip = (writer.get_extra_info("peername") or ("",))[0]
        if not self.public_conns.acquire(ip):
            self._refuse("tcp", ip)
            writer.transport.abort()
            return
        try:
            ep = self.registry.route("public", "tcp", port)
            if ep is None:
                close(writer)
                return
            await traffic.forward_raw(self, ep, reader, writer)
        finally:
            self.public_conns.release(ip)

    # ------------------------------------------------------------ cloud endpoints
    def compile_cloud_policy(self, text: str):
        """Compile a cloud endpoint's policy (raises PolicyError with the reason)."""
        return compile_policy(text, require_termination=True)

    async def claim_cloud_name(self, rec) -> None:
        """Claim a cloud endpoint's name for its account (raises NameConflict)."""
        name = name_of(rec.binding, rec.account_id, rec.proto, rec.host, rec.port)
        await self.names.claim(name, Holder(rec.id, rec.account_id, rec.proto, rec.pooling_enabled, "cloud"))

    async def serve_cloud_endpoint(self, rec, checked: bool = False) -> None:
        """Route traffic for a stored cloud endpoint (new or updated).  ``checked``: the
        store granted its name already (a cluster's change feed): no store queries."""
        policy = self.compile_cloud_policy(rec.traffic_policy) if rec.traffic_policy else None
        self.unserve_cloud_endpoint(rec.id)
        if checked:
            name = name_of(rec.binding, rec.account_id, rec.proto, rec.host, rec.port)
            self.names.hold(name, Holder(rec.id, rec.account_id, rec.proto, rec.pooling_enabled, "cloud"))
        else:
            await self.claim_cloud_name(rec)
        route = CloudRoute(
            id=rec.id,
            account_id=rec.account_id,
            url=rec.url,
            proto=rec.proto,
            host=rec.host,
            port=rec.port,
            binding=rec.binding,
            policy=policy,
            pooling_enabled=rec.pooling_enabled,
            record=rec,
        )
        if route.proto == "tcp" and route.binding == "public":
            bind_host = parse_hostport(self.config.http_addr)[0]
            try:
                route.server = await asyncio.start_server(
                    lambda r, w, _port=route.port: self._public_tcp(r, w, _port), bind_host, route.port, backlog=1024
                )
            except OSError:
                self.names.release(rec.id)
                raise
        self.registry.add_endpoint(route)

    def unserve_cloud_endpoint(self, endpoint_id: str) -> None:
        ep = self.registry.find(endpoint_id)
        if ep is not None and ep.session is None:
            self.registry.remove_endpoint(ep)
        self.names.release(endpoint_id)

    async def _load_cloud_endpoints(self) -> None:
        assert self.store is not None
        for rec in await self.store.all_cloud_endpoints():
            try:
                await self.serve_cloud_endpoint(rec)
            except (PolicyError, OSError, NameConflict) as exc:
                log.error("cloud endpoint %s (%s) is not served: %s", rec.id, rec.url, exc)


class BindError(Exception):
    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code


def _split_url(url: str, proto: str) -> tuple[str, str, int]:
    """Split an endpoint URL into (scheme, lower-case host, port); all parts optional."""
    if not url:
        return proto, "", 0
    scheme = proto
    rest = url.strip()
    if "://" in rest:
        scheme, rest = rest.split("://", 1)
        scheme = scheme.lower()
    rest = rest.split("/", 1)[0]
    host, port = rest, 0
    if ":" in rest:
        host, port_s = rest.rsplit(":", 1)
        if not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise BindError("ERR_NGROK_9031", f"invalid port in url {url!r}")
        port = int(port_s)
    return scheme, host.lower().rstrip("."), port


def _raise_nofile_limit() -> None:
    """Raise the soft descriptor limit to the hard one, as Go's runtime does: each
    public connection costs the edge two descriptors (its own and a data connection)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def _listen(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock
