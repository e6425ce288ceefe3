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
from backend.netutil import is_loopback, parse_hostport
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


def backoff(attempt: int, fast: int = 3, base: float = 0.5, cap: float = 30.0) -> float:
    """Delay before reconnect ``attempt`` (1-based): fast retries, then full jitter."""
    if attempt <= fast:
        return 0.05 * attempt
    return random.uniform(0, min(cap, base * 2 ** (attempt - fast)))


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
        self.client_id = uuid.uuid4().hex
        self.tunnels: dict[str, Tunnel] = {}
        self.session_id: str | None = None
        self.region = ""
        self.edge_https = False  # learnt from auth_ok: may http tunnels default to https?
        self.latency: float | None = None
        self.status = "connecting"
        self._by_endpoint: dict[str, Tunnel] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._session_key = ""
        self._pending: dict[int, asyncio.Future] = {}
        self._req_ids = 0
        self._tasks: set[asyncio.Task] = set()
        self._pooled = 0
        self._stopped = asyncio.Event()
        self._connected = asyncio.Event()
        self._host, self._port = parse_hostport(config.server_addr)
        # *.localhost names are loopback (RFC 6761 §6.3) as in curl and browsers, though
        # the system resolver often does not know them; TLS still checks the name itself.
        self._dial_host = "127.0.0.1" if self._host.endswith(".localhost") else self._host
        self._ctx = client_context(config.root_cas)
        self._data_ctx: ssl.SSLContext | None = None  # made on first use (tlshalf.ALPN)
        self.data_tls = config.data_tls if config.data_tls is not None else not is_loopback(self._host)
        self._ping_ids = 0
        for tc in config.tunnels:
            self._add_tunnel(tc)

    # ----------------------------------------------------------------- public
    async def run(self) -> None:
        """Keep a session alive until :meth:`stop`.  Raises AgentError on fatal errors."""
        attempt = 0
        ever = False
        self._spawn(self._metrics_ticker())
        while not self._stopped.is_set():
            try:
                await self._session()
                attempt = 0
                ever = True
            except AgentError:
                self.status = "failed"
                raise
            except (OSError, TimeoutError, asyncio.IncompleteReadError, p.ProtocolError, ssl.SSLError) as exc:
                if self.session_id is not None:
                    ever = True
                msg = _describe(exc)
                if not ever and self.config.initial_attempts and attempt + 1 >= self.config.initial_attempts:
                    self.status = "failed"
                    raise AgentError(f"cannot reach the edge at {self.config.server_addr}: {msg}") from None
                log.debug("session ended: %s", msg)
                self._on_disconnect(msg)
            if self._stopped.is_set():
                break
            attempt += 1
            delay = backoff(attempt)
            self.status = "reconnecting"
            self.on_event({"event": "reconnecting", "attempt": attempt, "delay": round(delay, 3)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), delay)

    def on_event(self, ev: dict) -> None:
        self._on_event(ev)
        if self.events.active:
            self.events.publish(ev["event"], ev)

    async def stop(self) -> None:
        self._stopped.set()
        close(self._writer)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.capture is not None:
            self.capture.close()

    async def wait_connected(self, timeout: float) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def start_tunnel(self, tc: TunnelConfig) -> Tunnel:
        """Add a tunnel and bind it now if a session is up (raises AgentError on refusal)."""
        t = self._add_tunnel(tc)
        if self._writer is not None and self._connected.is_set():
            try:
                await self._bind(t)
            except AgentError:
                self.tunnels.pop(t.name, None)
                raise
        return t

    async def stop_tunnel(self, name: str) -> bool:
        t = self.tunnels.pop(name, None)
        if t is None:
            return False
        if t.endpoint_id is not None:
            self._by_endpoint.pop(t.endpoint_id, None)
            if self._writer is not None:
                with contextlib.suppress(AgentError, OSError, TimeoutError):
                    await self._request(p.Unbind(req_id=0, endpoint_id=t.endpoint_id))
            t.endpoint_id = None
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

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        r, w = await asyncio.wait_for(
            asyncio.open_connection(
                self._dial_host,
                self._port,
                ssl=self._ctx,
                server_hostname=self._host,
                limit=2 * p.MAX_FRAME,
            ),
            10,
        )
        tune(w)
        return r, w

    async def _session(self) -> None:
        r, w = await self._dial()
        self._writer = w
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
                ),
            )
            await w.drain()
            msg = await asyncio.wait_for(p.read_msg(r), 10)
            if isinstance(msg, p.Error):
                raise AgentError(msg.msg, msg.code)
            if not isinstance(msg, p.AuthOk):
                raise p.ProtocolError(f"expected auth_ok, got {msg.type}")
            self.session_id = msg.session_id
            self._session_key = msg.session_key
            self.region = msg.region
            self.edge_https = msg.https
            self.status = "online"
            reader = self._spawn(self._read_loop(r, msg.heartbeat_timeout))
            pinger = self._spawn(self._pinger(msg.heartbeat_interval))
            for _ in range(self.config.pool_size):
                self._spawn(self._data_conn())
            try:
                for t in list(self.tunnels.values()):
                    await self._bind(t)
            except AgentError as exc:
                raise AgentError(f"failed to start tunnel: {exc}", exc.code) from None
            self._connected.set()
            self.on_event(
                {
                    "event": "session",
                    "session_id": self.session_id,
                    "tunnels": [self.tunnel_info(t) for t in self.tunnels.values()],
                }
            )
            try:
                await reader
            finally:
                pinger.cancel()
        finally:
            close(w)
            self._writer = None
            self._connected.clear()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionResetError("session ended"))
            self._pending.clear()

    def _on_disconnect(self, why: str) -> None:
        for t in self.tunnels.values():
            if t.endpoint_id is not None:
                self._by_endpoint.pop(t.endpoint_id, None)
                t.endpoint_id = None
        self.on_event({"event": "disconnected", "reason": why})

    async def _read_loop(self, r: asyncio.StreamReader, timeout: float) -> None:
        while True:
            msg = await asyncio.wait_for(p.read_msg(r), timeout)
            if isinstance(msg, p.Ping):
                self._send(p.Pong(id=msg.id, sent=msg.sent))
            elif isinstance(msg, p.Pong):
                self.latency = max(0.0, asyncio.get_running_loop().time() - msg.sent)
            elif isinstance(msg, p.NeedData):
                for _ in range(min(msg.count, 64)):
                    self._spawn(self._data_conn())
            elif isinstance(msg, p.BindOk | p.UnbindOk | p.Error) and msg.req_id in self._pending:
                fut = self._pending.pop(msg.req_id)
                if not fut.done():
                    fut.set_result(msg)
            elif isinstance(msg, p.Error):
                raise AgentError(msg.msg, msg.code)
            elif isinstance(msg, p.Stop):
                self.on_event({"event": "stopped", "reason": msg.reason})
                self._stopped.set()
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

    async def _pinger(self, interval: float) -> None:
        """Ping at once (so latency is known from the start), then every ``interval``."""
        loop = asyncio.get_running_loop()
        while True:
            self._ping_ids += 1
            self._send(p.Ping(id=self._ping_ids, sent=loop.time()))
            await asyncio.sleep(interval)

    def _send(self, msg: p._Msg) -> None:
        if self._writer is not None and not self._writer.is_closing():
            p.write_msg(self._writer, msg)

    async def _request(self, msg: p.Bind | p.Unbind) -> p.Message:
        self._req_ids += 1
        msg = msg.model_copy(update={"req_id": self._req_ids})
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._req_ids] = fut
        self._send(msg)
        reply = await asyncio.wait_for(fut, 15)
        if isinstance(reply, p.Error):
            raise AgentError(reply.msg, reply.code)
        return reply

    async def _bind(self, t: Tunnel) -> None:
        tc = t.config
        url = t.public_url or tc.url  # re-bind the URL we had
        twin = self.tunnels.get(tc.same_host_as) if tc.same_host_as else None
        if not t.public_url and twin is not None and twin.public_url and url.endswith("://"):
            url += twin.public_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
        proto = tc.proto
        if proto in ("http", "https") and "://" in url:
            scheme = url.split("://", 1)[0].lower()
            if scheme in ("http", "https"):
                proto = scheme  # `burrow http 80 --url https://x` makes an https endpoint
        elif proto == "http" and tc.auto_https and self.edge_https:
            proto = "https"  # ngrok v3: an http tunnel that names no scheme is https
        reply = await self._request(
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
            )
        )
        assert isinstance(reply, p.BindOk)
        t.endpoint_id = reply.endpoint_id
        t.public_url = reply.url
        t.error = None
        self._by_endpoint[reply.endpoint_id] = t
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
    async def _data_conn(self) -> None:
        """Dial one data connection, wait in the edge's pool, then serve it."""
        session_id, key = self.session_id, self._session_key
        if session_id is None or self._stopped.is_set():
            return
        try:
            if self.data_tls:
                # TLS that can half-close (backend/tlshalf.py), offered to the edge by ALPN
                if self._data_ctx is None:
                    self._data_ctx = tlshalf.data_context(client_context(self.config.root_cas))
                r, w = await asyncio.wait_for(
                    tlshalf.open_connection(self._dial_host, self._port, self._data_ctx, self._host, 2 * p.MAX_FRAME),
                    10,
                )
                tune(w)
            else:
                r, w = await asyncio.wait_for(
                    asyncio.open_connection(self._dial_host, self._port, limit=2 * p.MAX_FRAME), 10
                )
                tune(w)
        except (OSError, TimeoutError, ssl.SSLError):
            return
        self._pooled += 1
        try:
            p.write_msg(w, p.DataHello(session_id=session_id, key=key))
            start = await p.read_msg(r)
        except (OSError, asyncio.IncompleteReadError, p.ProtocolError):
            close(w)
            return
        finally:
            self._pooled -= 1
        if session_id == self.session_id and self._writer is not None:
            self._spawn(self._data_conn())  # top the pool up
        if not isinstance(start, p.StartData):
            close(w)
            return
        t = self._by_endpoint.get(start.endpoint_id)
        if t is None:
            close(w)
            return
        t.metrics.conn_opened()
        t0 = time.perf_counter_ns()
        try:
            if t.config.proto in ("http", "https"):
                await forward.serve_http(t, start, r, w)
            else:
                await forward.serve_tcp(t, r, w, start)
        finally:
            t.metrics.conn_closed(time.perf_counter_ns() - t0)
            close(w)


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
