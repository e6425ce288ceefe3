"""ngrok's own agents and SDKs on burrow's ingress port (``ngrok-agent-protocol.md``).

After TLS an ngrok agent speaks muxado (:mod:`backend.edge.muxado`).  It opens typed
streams: a heartbeat (echoed), Auth (a burrow authtoken), one Bind per listener and
Unbind; each request is one JSON object, each reply one JSON object and FIN.  Binds go
through the same code as burrow agents' (:meth:`Edge._bind`: ownership, ACLs, caps,
the registry), so the endpoints show in ``/endpoints`` and route public traffic; each
public connection reaches the agent as a Proxy stream (type 3) that the edge opens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from backend import protocol as p
from backend.agent.forward import proxy_header
from backend.edge import accounts, muxado, ngrok_options
from backend.edge.sessions import AgentEndpoint, Session, SessionClosed
from backend.ids import new_id
from backend.store import StoreError

if TYPE_CHECKING:
    from backend.edge.server import Edge

log = logging.getLogger("burrow.edge.ngrok")

# stream types
AUTH, BIND, UNBIND, PROXY, RESTART, STOP, UPDATE, START_LABELED, SRV_INFO, STOP_TUNNEL = range(10)
HEARTBEAT = 0xFFFFFFFF

MAX_REQUEST = 64 * 1024  # one JSON request
REQUEST_TIMEOUT = 10.0  # seconds for a request's bytes to arrive
AUTH_TIMEOUT = 10.0  # seconds from the first frame to a successful Auth
HEARTBEAT_INTERVAL = 10.0  # ngrok's defaults, when the agent's Auth names none
HEARTBEAT_TOLERANCE = 15.0
MIN_HEARTBEAT_LIMIT = 2.0  # an agent cannot ask the edge to time it out faster than this
U32 = struct.Struct(">I")
I64LE = struct.Struct("<q")

BAD_AUTHTOKEN = (
    "The authtoken you specified is properly formed, but it is invalid.\n"
    "This usually happens when the authtoken was revoked, or belongs to another edge.\n"
    "Check the authtoken this burrow edge gave you (its bootstrap.json, or the cloud API's /credentials).\n"
    "\nERR_NGROK_107"
)


def _get(d: Any, key: str, default: Any = None) -> Any:
    """``d[key]`` matched case-insensitively (Go sends ``Authtoken``, Rust ``AuthToken``)."""
    if not isinstance(d, dict):
        return default
    if key in d:
        return d[key]
    low = key.lower()
    for k, v in d.items():
        if isinstance(k, str) and k.lower() == low:
            return v
    return default


def _str(v: Any) -> str:
    return v if isinstance(v, str) else ""


@dataclass(eq=False)
class NgrokSession(Session):
    """A burrow session whose data connections are muxado Proxy streams."""

    mux: muxado.MuxSession | None = None
    #: endpoint id → the tunnel id the agent knows it by (its old one after a re-bind)
    agent_ids: dict[str, str] = field(default_factory=dict)
    #: endpoint id → (PROXY protocol version, edge listener host, port) for its streams
    proxy_proto: dict[str, tuple[int, str, int]] = field(default_factory=dict)
    edge_forwarded_headers: ClassVar[bool] = True
    _streams: set = field(default_factory=set)

    def send(self, msg: p._Msg) -> None:
        """Burrow's session messages, as the ngrok agent's requests: Stop and Restart go
        out as their own request streams (the edge ends the session right after, so the
        agent's answer is not awaited).  The rest have no muxado equivalent: heartbeats
        are muxado's own, and data connections are Proxy streams the edge opens."""
        if isinstance(msg, p.Stop):
            self._request(STOP, {})
        elif isinstance(msg, p.Restart):
            self._request(RESTART, {})

    def stop_tunnel(self, endpoint_id: str, message: str, error_code: str = "") -> bool:
        """Tell the agent that the edge stopped one of its tunnels (StopTunnel, no
        reply): the SDK closes that listener and keeps the session."""
        tid = self.agent_ids.pop(endpoint_id, endpoint_id)
        return self._request(STOP_TUNNEL, {"Id": tid, "Message": message, "ErrorCode": error_code})

    def _open(self, kind: int, body: dict) -> muxado.Stream | str:
        """Open a stream of type ``kind`` carrying ``body``; or why it cannot be opened."""
        if self.closed or self.mux is None:
            return "the agent session has ended"
        try:
            st = self.mux.open_stream()
        except muxado.MuxError as exc:
            return str(exc)
        st.writer.write(U32.pack(kind) + json.dumps(body).encode())
        return st

    def _request(self, kind: int, body: dict) -> bool:
        """A request the agent does not answer: ``body``, then FIN."""
        st = self._open(kind, body)
        if isinstance(st, str):
            return False
        st.writer.write_eof()
        return True

    async def open_data(
        self,
        ep: AgentEndpoint,
        client_addr: str,
        client_port: int,
        scheme: str | None = None,
        timeout: float = 10.0,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.closed or self.mux is None:
            raise SessionClosed("the agent session has ended")
        try:
            st = self.mux.open_stream()
        except muxado.MuxError as exc:
            raise SessionClosed(str(exc)) from None
        head = json.dumps(
            {
                "Id": self.agent_ids.get(ep.id, ep.id),
                "ClientAddr": f"{client_addr}:{client_port}",
                "Proto": scheme or ep.proto,
                "EdgeType": "",
                "PassthroughTLS": ep.proto == "tls",  # the edge routed it by SNI, unterminated
            }
        ).encode()
        st.writer.write(U32.pack(PROXY) + I64LE.pack(len(head)) + head)
        pp = self.proxy_proto.get(ep.id)
        if pp is not None:
            st.writer.write(proxy_header(pp[0], client_addr, client_port, pp[1], pp[2]))
        self._streams.add(st.writer)
        return st.reader, st.writer

    async def command(self, kind: int, body: dict, timeout: float = 5.0) -> str:
        """Send Stop / Restart / Update to the agent and return its error ("" = done)."""
        st = self._open(kind, body)
        if isinstance(st, str):
            return st
        try:
            reply = await asyncio.wait_for(_read_json(st.reader), timeout)
        except (ValueError, TimeoutError, OSError) as exc:
            return f"the agent did not answer: {exc or type(exc).__name__}"
        finally:
            st.writer.close()
        return _str(_get(reply, "Error"))

    def release(self, writer: asyncio.StreamWriter) -> None:
        self._streams.discard(writer)
        writer.close()

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        for w in list(self._streams):
            w.close()
        self._streams.clear()
        if self.mux is not None:
            self.mux.close(muxado.NO_ERROR, "session ended")


class AgentConnection:
    """One ngrok agent's TLS connection: its muxado session and its burrow session."""

    def __init__(
        self, edge: Edge, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer_ip: str
    ) -> None:
        self.edge = edge
        self.writer = writer
        self.peer_ip = peer_ip
        self.mux = muxado.MuxSession(
            reader,
            writer,
            self._on_stream,
            max_streams=edge.config.max_data_conns_per_session or 10000,
        )
        self.session: NgrokSession | None = None
        self.auth_failed = False
        self._tasks: set[asyncio.Task] = set()
        self._auth_started = False
        self.heartbeat_limit = HEARTBEAT_INTERVAL + HEARTBEAT_TOLERANCE
        self.on_auth: Callable[[], None] = lambda: None

    async def run(self, first: bytes) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.call_later(AUTH_TIMEOUT, self._auth_deadline)
        watchdog = asyncio.ensure_future(self._watchdog())
        self.reason = "agent disconnected"
        try:
            await self.mux.run(first)
        finally:
            watchdog.cancel()
            deadline.cancel()
            for t in list(self._tasks):
                t.cancel()
            if self.session is not None:
                self.edge._end_session(self.session, self.reason)
            self.mux.close()

    async def _watchdog(self) -> None:
        """End a session that sends nothing (its heartbeats included) for the agent's
        heartbeat interval + tolerance (from its Auth; ngrok's defaults 10 s + 15 s)."""
        loop = asyncio.get_running_loop()
        while not self.mux.closed:
            silent = loop.time() - self.mux.last_frame
            if silent > self.heartbeat_limit:
                self.reason = "heartbeat timeout"
                self.mux.close(muxado.NO_ERROR, "heartbeat timeout")
                return
            await asyncio.sleep(
                min(max(self.heartbeat_limit - silent, 0.05), 1.0)
            )  # the limit may change at Auth

    def _auth_deadline(self) -> None:
        if self.session is None:
            self.mux.close(muxado.PROTOCOL_ERROR, "no authentication in time")

    def _on_stream(self, st: muxado.Stream) -> None:
        t = asyncio.ensure_future(self._serve_stream(st))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _serve_stream(self, st: muxado.Stream) -> None:
        try:
            kind = U32.unpack(await asyncio.wait_for(st.reader.readexactly(4), REQUEST_TIMEOUT))[0]
            if kind == HEARTBEAT:
                await self._heartbeat(st)
                return
            if kind not in (AUTH, BIND, UNBIND, SRV_INFO):
                st.writer.transport.abort()
                return
            req = await asyncio.wait_for(_read_json(st.reader), REQUEST_TIMEOUT)
            if kind == AUTH:
                reply = await self._auth(req)
            elif self.session is None:
                reply = {"Error": "the session is not authenticated\nERR_NGROK_105"}
            elif kind == BIND:
                reply = await self._bind(req)
            elif kind == UNBIND:
                reply = self._unbind(req)
            else:
                reply = {"Region": self.edge.config.region}
            st.writer.write(json.dumps(reply).encode())
            st.writer.write_eof()
            if kind == AUTH and self.auth_failed:
                # let the agent read its error, then end the session
                await asyncio.sleep(0.2)
                self.mux.close(muxado.NO_ERROR, "authentication failed")
        except (ValueError, TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
            log.debug("ngrok agent stream %d dropped: %s", st.id, exc)
            st.writer.transport.abort()

    @staticmethod
    async def _heartbeat(st: muxado.Stream) -> None:
        """Echo every 4-byte beat the agent sends on its heartbeat stream."""
        while True:
            beat = await st.reader.readexactly(4)
            st.writer.write(beat)

    # ------------------------------------------------------------------ requests
    async def _auth(self, req: dict) -> dict:
        edge = self.edge
        assert edge.store is not None
        extra = _get(req, "Extra", {}) or {}
        if self.session is not None or self._auth_started:
            return {"Version": "3", "ClientId": "", "Error": "already authenticated\nERR_NGROK_105"}
        self._auth_started = True
        token = _str(_get(extra, "AuthToken"))
        try:
            cred = await edge.store.find_authtoken(token)
            disabled = await accounts.arefusal(edge.store, token) if cred is None else None
        except (StoreError, sqlite3.Error) as exc:  # the agent retries; this session ends
            log.warning("ngrok agent auth from %s: %s", self.peer_ip, exc)
            self.auth_failed = True
            return {"Version": "3", "ClientId": "", "Error": "the edge's database is unavailable; retry\nERR_NGROK_503", "Extra": {}}
        if cred is None:
            self.auth_failed = True
            edge.on_event({"event": "auth_failed", "ip": self.peer_ip})
            error = f"{disabled}\n\n{accounts.AGENT_CODE}" if disabled else BAD_AUTHTOKEN
            return {"Version": "3", "ClientId": "", "Error": error, "Extra": {}}
        interval, tolerance = _get(extra, "HeartbeatInterval"), _get(extra, "HeartbeatTolerance")
        if (
            isinstance(interval, int)
            and isinstance(tolerance, int)
            and interval > 0
            and tolerance > 0
        ):
            self.heartbeat_limit = max((interval + tolerance) / 1e9, MIN_HEARTBEAT_LIMIT)
        client_id = _str(_get(req, "ClientId")) or new_id("ngc")
        cap = edge.config.max_sessions_per_authtoken
        if cap:
            stale = edge.registry.same_agent(cred.account_id, client_id)
            live = edge.registry.sessions_of(cred.id) - (
                stale is not None and stale.credential_id == cred.id
            )
            if live >= cap:
                self.auth_failed = True
                return {
                    "Version": "3",
                    "ClientId": "",
                    "Error": f"Your authtoken is limited to {cap} simultaneous agent sessions; "
                    f"{live} are online.\n\nERR_NGROK_108",
                    "Extra": {},
                }
        s = NgrokSession(
            id=new_id("ts"),
            key="",
            account_id=cred.account_id,
            client_id=client_id,
            credential_id=cred.id,
            writer=self.writer,
            agent_version=_str(_get(extra, "Version")),
            os=_str(_get(extra, "OS")),
            hostname=_str(_get(extra, "Hostname")),
            metadata=_str(_get(extra, "Metadata")),
            ip=self.peer_ip,
            region=edge.config.region,
            acl=tuple(cred.acl),
            max_data=edge.config.max_data_conns_per_session,
            mux=self.mux,
        )
        old = edge.registry.add_session(s)
        if old is not None:
            edge._end_session(old, "replaced by a new session of the same agent")
        self.session = s
        self.on_auth()
        edge.on_event(
            {"event": "session_started", "session_id": s.id, "ip": self.peer_ip, "agent": "ngrok"}
        )
        return {
            "Version": "3",
            "ClientId": client_id,
            "Error": "",
            "Extra": {
                "Version": "burrow",
                "Region": edge.config.region,
                "Cookie": "",
                "AccountName": cred.account_id,
                "SessionDuration": 0,
                "PlanName": "",
                "Banner": "",
            },
        }

    async def _bind(self, req: dict) -> dict:
        assert self.session is not None
        proto = _str(_get(req, "Proto")).lower()
        opts = _get(req, "Opts") or {}
        extra = _get(req, "Extra") or {}
        fail = {"Id": "", "URL": "", "Proto": proto, "Opts": opts, "Extra": {"Token": ""}}
        if proto not in ("http", "https", "tcp", "tls"):
            return {
                **fail,
                "Error": f"burrow does not serve {proto or 'this'} endpoints for ngrok agents\nERR_NGROK_9000",
            }
        try:
            # options become policy rules or stream settings; what the edge cannot apply
            # is refused naming the option, never ignored
            applied = ngrok_options.translate(proto, opts)
        except ngrok_options.BindOptionError as exc:
            return {**fail, "Error": f"{exc}\n{exc.code}"}
        url = _str(_get(opts, "URL"))
        addr = _str(_get(opts, "Addr"))
        if proto == "tcp" and not url and addr:
            url = f"tcp://{addr}"  # a reserved address: host:port
        host = _str(_get(opts, "Hostname")) or _str(_get(opts, "Domain"))
        sub = _str(_get(opts, "Subdomain"))
        if not url and host:
            url = f"{proto}://{host}"
        elif not url and sub:
            url = f"{proto}://{sub}"  # a bare label: the edge appends its domain
        bindings = _get(extra, "Bindings") or []
        binding = (
            bindings[0]
            if isinstance(bindings, list) and bindings and isinstance(bindings[0], str)
            else None
        )
        if binding not in (None, "public", "internal", "kubernetes"):
            return {**fail, "Error": f"unknown binding {binding!r}\nERR_NGROK_9036"}
        try:
            msg = p.Bind(
                req_id=0,
                name=_str(_get(extra, "Name")),
                proto=proto,
                url=url,
                binding=binding,
                pooling_enabled=bool(_get(extra, "PoolingEnabled")),
                metadata=_str(_get(extra, "Metadata")),
                description=_str(_get(extra, "Description")),
                upstream_url=_str(_get(req, "ForwardsTo")),
                traffic_policy=applied.traffic_policy,
            )
        except ValueError as exc:
            return {**fail, "Error": f"invalid bind request: {exc}\nERR_NGROK_9000"}
        old_id = _str(_get(req, "Id"))
        remembered = await _remembered(self.edge, self.session.account_id, old_id) if old_id else None
        res = None
        if remembered and not url:
            # a reconnecting agent re-binds with its old Id: same URL as before if still free
            res = await self.edge._bind(self.session, msg.model_copy(update={"url": remembered}))
            if isinstance(res, p.Error):
                res = None
        if res is None:
            res = await self.edge._bind(self.session, msg)
        if isinstance(res, p.Error):
            return {**fail, "Error": f"{res.msg}\n{res.code}"}
        assert isinstance(res, p.BindOk)
        # The agent routes Proxy streams by the Id it knows: a re-bind keeps its old one.
        tid = old_id if old_id and old_id not in self.session.agent_ids.values() else res.endpoint_id
        self.session.agent_ids[res.endpoint_id] = tid
        # no await since the endpoint went online: no Proxy stream can start without its header
        self._stream_settings(res.endpoint_id, proto, applied)
        await _remember(self.edge, self.session.account_id, tid, res.url)
        return {
            "Id": tid,
            "URL": res.url,
            "Proto": proto,
            "Opts": opts,
            "Error": "",
            "Extra": {"Token": "", "TunnelID": tid},
        }

    def _stream_settings(self, endpoint_id: str, proto: str, applied: ngrok_options.BindOptions) -> None:
        """Remember what the endpoint's Proxy streams start with (a PROXY header naming
        the public client and the edge's listener address)."""
        assert self.session is not None
        ep = self.session.endpoints.get(endpoint_id)
        if ep is None or not applied.proxy_proto:
            return
        listener = {"http": "http", "tcp": "http"}.get(proto, "https")  # tcp binds http's host
        host = self.edge.addrs.get(listener, ("", 0))[0]
        self.session.proxy_proto[endpoint_id] = (applied.proxy_proto, host, ep.port)

    def _unbind(self, req: dict) -> dict:
        assert self.session is not None
        tid = _str(_get(req, "Id"))
        ep_id = next((e for e, t in self.session.agent_ids.items() if t == tid), tid)
        self.session.agent_ids.pop(ep_id, None)
        self.session.proxy_proto.pop(ep_id, None)
        ep = self.session.endpoints.get(ep_id)
        if ep is not None:  # idempotent: the SDK may unbind one listener twice
            self.edge.registry.remove_endpoint(ep)
            self.edge.on_event({"event": "endpoint_offline", "url": ep.url})
        return {"Error": "", "Extra": None}


MAX_REMEMBERED = 10_000  # tunnel ids whose URL the edge remembers for re-binds
MAX_TUNNEL_ID = 128  # longer Ids (the agent chooses its re-bind Id) are not remembered


async def _remember(edge: Edge, account_id: str, tunnel_id: str, url: str) -> None:
    """Remember the URL a tunnel id got, in the edge's store, so that an agent that
    reconnects and re-binds with its old Id gets the same random URL, also after the
    edge restarts (bounded: the oldest entries go first)."""
    if edge.store is None or len(tunnel_id) > MAX_TUNNEL_ID:
        return
    try:
        await edge.store.remember_rebind_url(account_id, tunnel_id, url, MAX_REMEMBERED)
    except (StoreError, sqlite3.Error) as exc:  # a URL not remembered is not a failed bind
        log.warning("could not remember the URL of tunnel %s: %s", tunnel_id, exc)


async def _remembered(edge: Edge, account_id: str, tunnel_id: str) -> str | None:
    if edge.store is None or len(tunnel_id) > MAX_TUNNEL_ID:
        return None
    try:
        return await edge.store.rebind_url(account_id, tunnel_id)
    except (StoreError, sqlite3.Error) as exc:
        log.warning("could not look up the URL of tunnel %s: %s", tunnel_id, exc)
        return None


async def _forget(edge: Edge, account_id: str, tunnel_id: str) -> None:
    if edge.store is None:
        return
    try:
        await edge.store.forget_rebind_url(account_id, tunnel_id)
    except (StoreError, sqlite3.Error) as exc:
        log.warning("could not forget the URL of tunnel %s: %s", tunnel_id, exc)


def stop_endpoint(edge: Edge, ep: AgentEndpoint, message: str, error_code: str = "") -> bool:
    """Take an ngrok agent's endpoint offline and send its agent StopTunnel; False if
    ``ep`` is not an ngrok agent's (burrow's own protocol has no per-endpoint stop)."""
    s = ep.session
    if not isinstance(s, NgrokSession) or s.closed:
        return False
    tid = s.agent_ids.get(ep.id, ep.id)
    s.stop_tunnel(ep.id, message, error_code)
    edge.registry.remove_endpoint(ep)
    if edge.store is not None:  # a deleted endpoint is not re-bound to its URL by a later reconnect
        edge._spawn(_forget(edge, s.account_id, tid))
    edge.on_event({"event": "endpoint_offline", "url": ep.url, "reason": message})
    return True


async def _read_json(reader: asyncio.StreamReader) -> dict:
    """One JSON object, no length prefix, no FIN: decode as the bytes arrive."""
    buf = b""
    dec = json.JSONDecoder()
    while True:
        chunk = await reader.read(MAX_REQUEST)
        if not chunk:
            raise ValueError("stream ended inside a request")
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too large")
        try:
            obj, _ = dec.raw_decode(buf.decode().lstrip())
        except ValueError:  # incomplete (or a split UTF-8 sequence): read on
            continue
        if not isinstance(obj, dict):
            raise ValueError("request is not a JSON object")
        return obj


async def serve(
    edge: Edge,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    first: bytes,
    peer_ip: str,
    authenticated: Callable[[], None],
) -> None:
    """Serve one ngrok agent connection whose first frame header is ``first``;
    ``authenticated()`` is called once its Auth succeeds."""
    conn = AgentConnection(edge, reader, writer, peer_ip)
    conn.on_auth = authenticated
    await conn.run(first)
