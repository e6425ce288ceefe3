"""Peer forwarding: a public connection on edge A for an agent held by edge B.

A routes it from memory and runs the endpoint's traffic policy itself (the policy text
is in the endpoint's row), then takes a pre-warmed connection to B's peer port, asks
for the endpoint and session, and B splices the connection onto one of that session's
data connections.  One connection per public connection, spliced; no multiplexer.
B only ever serves sessions it holds itself, so a forwarded connection is never
forwarded again.

Wire (every message a 2-byte big-endian length and a JSON object):

    B -> A  hello    {"v": 1, "nonce": <hex 16 bytes>, "node_id": B}
    A -> B  auth     {"node_id": A, "epoch": n, "mac": hex HMAC-SHA256(secret, "burrow-peer" nonce A B)}
    B -> A  ok       {"ok": true}                              (or {"ok": false, "error": ...}, closed)
            ... the connection now waits in A's pool ...
    A -> B  open     {"endpoint_id", "session_id", "client_ip", "client_port", "scheme"}
    B -> A  answer   {"ok": true}  then raw bytes both ways, spliced
                     {"ok": false, "code": 404|502, "error": ...}  then closed

The secret is 32 random bytes the first edge stored in PostgreSQL (``cluster_secret``):
only whoever can read the cluster's database (the edges) can open a data connection
through a peer port.  The MAC binds B's fresh nonce, so a recorded auth cannot be
replayed.

Between machines the link is **mutual TLS with the cluster's CA** (backend/cluster/ca.py:
every edge has the same one): B presents a certificate for its peer host, A one for its
node id, each verifies the other's against the CA.  On loopback it is plain TCP (and
spliced).  ``--peer-tls auto`` (the default) means TLS unless the peer listener is on a
loopback address; ``on``/``off`` force it.  Each edge's row says whether its peer port
speaks TLS, so the dialling edge knows.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import logging
import os
import ssl
import struct
from typing import TYPE_CHECKING

from backend.edge.sessions import SessionClosed
from backend.netutil import is_loopback, parse_hostport
from backend.relay import close, relay, tune
from backend.tls import load_chain

if TYPE_CHECKING:
    from backend.cluster.node import ClusterNode

log = logging.getLogger("burrow.cluster.peer")

VERSION = 1
#: idle authenticated connections kept per peer edge
WARM = 4
HANDSHAKE_TIMEOUT = 5.0
#: an idle pooled connection on B waits this long for its request, then closes
IDLE_TIMEOUT = 300.0
MAX_MSG = 4096
#: seconds a peer that failed to answer is skipped for routes that have an alternative
#: (until then, or until the janitor reaps it: at most a lease's TTL)
DOWN_FOR = 1.0
#: seconds to wait for the owning edge's answer when the route has an alternative
#: (a frozen edge accepts connections but never answers)
ANSWER_TIMEOUT_WITH_ALTERNATIVE = 1.0
#: seconds a tunnel-session command may take on the edge holding the session (an ngrok
#: agent answers it itself)
COMMAND_TIMEOUT = 15.0


class PeerRefused(SessionClosed):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code


def _pack(obj: dict) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">H", len(data)) + data


async def _read(reader: asyncio.StreamReader) -> dict:
    n = struct.unpack(">H", await reader.readexactly(2))[0]
    if n > MAX_MSG:
        raise ValueError("peer message too long")
    obj = json.loads(await reader.readexactly(n))
    if not isinstance(obj, dict):
        raise ValueError("peer message is not an object")
    return obj


def _mac(secret: bytes, nonce: str, a: str, b: str) -> str:
    msg = b"burrow-peer\0" + nonce.encode() + b"\0" + a.encode() + b"\0" + b.encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


class PeerLink:
    """Both ends: the peer listener (B's side) and the pools of warm connections (A's)."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.edge = node.edge
        self.server: asyncio.AbstractServer | None = None
        self.addr: tuple[str, int] = ("", 0)
        self._pools: dict[tuple, collections.deque] = {}
        self._filling: set[tuple] = set()
        self._tasks: set[asyncio.Task] = set()
        self.refused = 0  # peer connections refused authentication (B's side)
        self.tls = False
        self._client_ctx: ssl.SSLContext | None = None
        #: peers that just failed to answer: (node_id, epoch) -> loop time until which
        #: connections for them go straight to an alternative
        self._down: dict[tuple[str, int], float] = {}

    async def start(self, bind: str, mode: str = "auto") -> None:
        host, port = parse_hostport(bind)
        self.tls = mode == "on" or (mode == "auto" and not is_loopback(host))
        server_ctx = self._server_context(host) if self.tls else None
        self.server = await asyncio.start_server(
            self._serve, host, port, backlog=1024, ssl=server_ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self.tls else None
        )
        self.addr = self.server.sockets[0].getsockname()[:2]

    def _server_context(self, host: str) -> ssl.SSLContext:
        ca = self.edge.ca
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        load_chain(ctx, *ca.issue([host, self.node.node_id], client=True))
        ctx.verify_mode = ssl.CERT_REQUIRED  # the dialling edge shows a certificate of the cluster CA
        ctx.load_verify_locations(cadata=ca.cert_pem.decode())
        return ctx

    def client_context(self) -> ssl.SSLContext:
        if self._client_ctx is None:
            ca = self.edge.ca
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_verify_locations(cadata=ca.cert_pem.decode())
            load_chain(ctx, *ca.issue([self.node.node_id], client=True))
            self._client_ctx = ctx
        return self._client_ctx

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pool in self._pools.values():
            while pool:
                close(pool.popleft()[1])
        self._pools.clear()

    def _spawn(self, coro) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ B's side
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tune(writer)
        node = self.node
        try:
            nonce = os.urandom(16).hex()
            writer.write(_pack({"v": VERSION, "nonce": nonce, "node_id": node.node_id}))
            auth = await asyncio.wait_for(_read(reader), HANDSHAKE_TIMEOUT)
            peer = str(auth.get("node_id", ""))
            want = _mac(node.secret, nonce, peer, node.node_id)
            if not hmac.compare_digest(str(auth.get("mac", "")), want):
                self.refused += 1
                log.warning("cluster peer: connection from %s refused: bad credentials", writer.get_extra_info("peername"))
                writer.write(_pack({"ok": False, "error": "peer authentication failed"}))
                close(writer)
                return
            writer.write(_pack({"ok": True}))
            req = await asyncio.wait_for(_read(reader), IDLE_TIMEOUT)
        except (OSError, EOFError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            close(writer)
            return
        if "command" in req:  # /tunnel_sessions/{id}/stop|restart|update asked on another edge
            await self._command(req, writer)
            return
        s = self.edge.registry.sessions.get(str(req.get("session_id", "")))
        ep = s.endpoints.get(str(req.get("endpoint_id", ""))) if s is not None else None
        if s is None or ep is None or s.closed:
            writer.write(_pack({"ok": False, "code": 404, "error": "endpoint not held by this edge"}))
            close(writer)
            return
        try:
            dr, dw = await s.open_data(
                ep, str(req.get("client_ip", "")), int(req.get("client_port", 0) or 0), req.get("scheme") or None
            )
        except SessionClosed as exc:
            writer.write(_pack({"ok": False, "code": 502, "error": f"no data connection: {exc}"}))
            close(writer)
            return
        try:
            writer.write(_pack({"ok": True}))
            await relay(reader, writer, dr, dw, self.edge.config.send_timeout or None)
        finally:
            s.release(dw)
            close(writer)

    async def _command(self, req: dict, writer: asyncio.StreamWriter) -> None:
        """Run a tunnel-session command for another edge's API on a session held here."""
        from backend.edge.api.tunnel_sessions import COMMANDS, run_command

        s = self.edge.registry.sessions.get(str(req.get("session_id", "")))
        command = str(req.get("command", ""))
        try:
            if s is None or s.closed or s.account_id != str(req.get("account_id", "")):
                answer = {"ok": False, "code": 404, "error": "session not held by this edge"}
            elif command not in COMMANDS:
                answer = {"ok": False, "code": 400, "error": f"unknown command {command[:40]!r}"}
            else:
                failed = await run_command(self.edge, s, command)
                answer = {"ok": True} if failed is None else {"ok": False, "code": failed[0], "error": failed[1]}
            writer.write(_pack(answer))
            await writer.drain()
        except (OSError, RuntimeError):
            pass
        finally:
            close(writer)

    # ------------------------------------------------------------------ A's side
    async def command(self, info, command: str, timeout: float = COMMAND_TIMEOUT) -> tuple[int, str] | None:
        """Ask the edge holding session ``info`` (a RemoteSessionInfo) to run
        ``command``; None when it did, else (HTTP status, message)."""
        key = (info.node_id, info.epoch, info.peer_addr, info.peer_tls)
        try:
            r, w = await self._dial(key, min(timeout, HANDSHAKE_TIMEOUT))
        except (OSError, TimeoutError, EOFError, ValueError, asyncio.IncompleteReadError, SessionClosed) as exc:
            return 502, f"the edge holding the session cannot be reached: {exc or type(exc).__name__}"
        try:
            w.write(_pack({"command": command, "session_id": info.id, "account_id": info.account_id}))
            answer = await asyncio.wait_for(_read(r), timeout)
        except (OSError, TimeoutError, EOFError, ValueError, asyncio.IncompleteReadError) as exc:
            return 502, f"the edge holding the session did not answer: {exc or type(exc).__name__}"
        finally:
            close(w)
        if answer.get("ok"):
            return None
        return int(answer.get("code", 502) or 502), str(answer.get("error", "refused"))[:500]

    async def _dial(
        self, key: tuple[str, int, str, bool], timeout: float = HANDSHAKE_TIMEOUT
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        node_id, _epoch, addr, tls = key
        host, port = parse_hostport(addr)
        ctx = self.client_context() if tls else None
        r, w = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=host if tls else None), timeout
        )
        try:
            tune(w)
            hello = await asyncio.wait_for(_read(r), timeout)
            if hello.get("node_id") != node_id:
                raise SessionClosed(f"peer {addr} is {hello.get('node_id')!r}, not {node_id!r}")
            mac = _mac(self.node.secret, str(hello.get("nonce", "")), self.node.node_id, node_id)
            w.write(_pack({"node_id": self.node.node_id, "epoch": self.node.epoch, "mac": mac}))
            ok = await asyncio.wait_for(_read(r), timeout)
            if not ok.get("ok"):
                raise SessionClosed(f"peer {addr} refused us: {ok.get('error')}")
        except BaseException:
            close(w)
            raise
        return r, w

    async def _fill(self, key) -> None:
        if key in self._filling:
            return
        self._filling.add(key)
        try:
            pool = self._pools.setdefault(key, collections.deque())
            while len(pool) < WARM and key in self._pools:
                try:
                    pool.append(await self._dial(key))
                except (OSError, TimeoutError, EOFError, ValueError, asyncio.IncompleteReadError, SessionClosed) as exc:
                    log.debug("cluster peer: warming %s failed: %s", key[2], exc)
                    return
        finally:
            self._filling.discard(key)

    def _take(self, key):
        pool = self._pools.get(key)
        while pool:
            r, w = pool.popleft()
            if r.at_eof() or w.is_closing() or r._buffer:  # an idle one has nothing to read
                close(w)
                continue
            return r, w
        return None

    async def open(self, ep, client_ip: str, client_port: int, scheme: str | None, timeout: float = 10.0):
        """A spliced connection to ``ep``'s agent through its owning edge."""
        s = ep.session
        key = (s.node_id, s.epoch, s.peer_addr, s.peer_tls)
        has_alt = self.node.feed.alternative(ep) is not None
        if has_alt and self.is_down(s):
            raise SessionClosed(f"peer edge {s.peer_addr} failed a moment ago")
        if has_alt:
            timeout = min(timeout, ANSWER_TIMEOUT_WITH_ALTERNATIVE)
        req = _pack(
            {
                "endpoint_id": ep.id,
                "session_id": s.id,
                "client_ip": client_ip,
                "client_port": client_port,
                "scheme": scheme,
                "from": self.node.node_id,
            }
        )
        for attempt in range(2):
            conn = self._take(key)
            if key not in self._filling:
                self._spawn(self._fill(key))
            try:
                if conn is None:
                    conn = await self._dial(key, min(timeout, HANDSHAKE_TIMEOUT))
                r, w = conn
                w.write(req)
                answer = await asyncio.wait_for(_read(r), timeout)
            except (OSError, EOFError, asyncio.IncompleteReadError, ValueError) as exc:
                if conn is not None:
                    close(conn[1])
                if attempt == 0 and conn is not None:
                    continue  # a warm connection that died idle: once more with a fresh one
                self._mark_down(s)
                raise SessionClosed(f"peer edge {s.peer_addr} unreachable: {exc}") from None
            except TimeoutError:
                if conn is not None:
                    close(conn[1])
                self._mark_down(s)
                raise SessionClosed(f"peer edge {s.peer_addr} did not answer") from None
            if not answer.get("ok"):
                close(w)
                raise PeerRefused(int(answer.get("code", 502) or 502), str(answer.get("error", "refused")))
            return r, w
        raise SessionClosed("unreachable")

    def is_down(self, s) -> bool:
        until = self._down.get((s.node_id, s.epoch))
        if until is None:
            return False
        if asyncio.get_running_loop().time() < until:
            return True
        del self._down[(s.node_id, s.epoch)]
        return False

    def _mark_down(self, s) -> None:
        self._down[(s.node_id, s.epoch)] = asyncio.get_running_loop().time() + DOWN_FOR

    def prune(self, live: dict[str, int]) -> None:
        """Close the warm connections to edges (or epochs) that are no longer live."""
        for key in list(self._pools):
            if live.get(key[0]) != key[1]:
                pool = self._pools.pop(key)
                while pool:
                    close(pool.popleft()[1])

    def warm(self) -> None:
        """Start warming connections to every live edge holding endpoints we route to."""
        for s in self.node.feed.sessions.values():
            key = (s.node_id, s.epoch, s.peer_addr, s.peer_tls)
            if key not in self._pools:
                self._spawn(self._fill(key))
