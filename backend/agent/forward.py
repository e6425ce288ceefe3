"""The agent's side of a data connection: forward it to the tunnel's upstream.

HTTP tunnels are proxied exchange by exchange (so each can be captured); TCP and TLS
tunnels are relayed as raw bytes.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import re
import ssl
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backend import pages
from backend.agent import fileserver
from backend.http1 import (
    MAX_HEAD,
    UNTIL_CLOSE,
    Head,
    HTTPError,
    UpstreamClosed,
    UpstreamError,
    add_fields,
    field_lines,
    field_value,
    parse_request_head,
    proxy_exchange,
    read_head,
    retryable,
)
from backend.relay import close, relay, tune

if TYPE_CHECKING:
    from backend.agent.tunnels import Tunnel
    from backend.protocol import StartData


_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _check_host(host: str, addr: str) -> str:
    """An upstream host must be an IP literal or a DNS name we can dial (IDNA-encodable).

    Checked when the tunnel is defined, so a bad ``addr`` is a 400 for the API caller
    instead of a UnicodeError on every request later.
    """
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"invalid host in upstream address {addr!r}") from None
    name = ascii_host[:-1] if ascii_host.endswith(".") else ascii_host
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(x) for x in name.split(".")):
        raise ValueError(f"invalid host in upstream address {addr!r}")
    return host


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a tunnel forwards to, parsed from ``addr`` the way ngrok reads it."""

    scheme: str  # http | https | tcp | tls | file
    host: str
    port: int
    path: str = ""  # file:// only: the directory served

    @classmethod
    def parse(cls, addr: str, proto: str) -> Upstream:
        text = addr.strip()
        if text[:7].lower() == "file://":
            return cls("file", "", 0, fileserver.root_of(text))
        scheme = {"http": "http", "https": "http", "tcp": "tcp", "tls": "tcp"}[proto]
        if "://" in text:
            scheme, text = text.split("://", 1)
            scheme = scheme.lower()
            if scheme not in ("http", "https", "tcp", "tls"):
                raise ValueError(f"unsupported upstream scheme {scheme!r}")
        text = text.split("/", 1)[0]
        if text.isdigit():
            host, port = "localhost", int(text)
        elif text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port_s = rest.removeprefix(":") or str(_default_port(scheme))
            if not port_s.isdigit() or ":" not in host:
                raise ValueError(f"invalid address in upstream address {addr!r}")
            port = int(port_s)
        elif ":" in text:
            host, port_s = text.rsplit(":", 1)
            if not port_s.isdigit():
                raise ValueError(f"invalid port in upstream address {addr!r}")
            port = int(port_s)
        else:
            host, port = text, _default_port(scheme)
        if not 0 < port < 65536:
            raise ValueError(f"port out of range in upstream address {addr!r}")
        return cls(scheme, _check_host(host, addr) if host else "localhost", port)

    @property
    def host_port(self) -> str:
        """``host[:port]`` as a Host header names this upstream (the port left out when default)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _default_port(self.scheme) else f"{host}:{self.port}"

    @property
    def display(self) -> str:
        if self.scheme == "file":
            return f"file://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.scheme == "file":
            raise OSError(errno.EOPNOTSUPP, "a file:// upstream is served by the agent itself")
        ctx = None
        if self.scheme in ("https", "tls"):
            # Like ngrok, the agent does not verify local upstream certificates.
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        r, w = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=ctx, limit=MAX_HEAD), 10
        )
        tune(w)
        return r, w


def _default_port(scheme: str) -> int:
    return {"http": 80, "https": 443}.get(scheme, 80)


async def serve_http(
    tunnel: Tunnel, start: StartData, r: asyncio.StreamReader, w: asyncio.StreamWriter
) -> bool:
    """Proxy HTTP exchanges arriving on a data connection to the tunnel's upstream.

    True when the edge handed the connection back between two exchanges (its next
    bytes are a ``start`` frame, whose first byte is 0, not a request's): the caller
    keeps it open for that.  False when it is done with (the caller closes it)."""
    if tunnel.upstream.scheme == "file":
        await fileserver.serve(tunnel, start, r, w)
        return False
    up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    host_header = tunnel.config.host_header
    fields_host: str | None = None  # the X-Forwarded-* lines below were made for this Host
    fields = b""
    last_req: Head | None = None  # the previous request's head, and the head sent for it
    fwd = b""
    served = handed_back = False
    try:
        while True:
            if served:  # between two exchanges: a request, or the edge's next start frame
                if not r._buffer and not r.at_eof():
                    await r._wait_for_data("serve_http")
                if r._buffer[:1] == b"\x00":
                    handed_back = True
                    return True
            served = True
            raw = await read_head(r)
            if raw is None:
                return False
            req = parse_request_head(raw)
            obs = tunnel.observe(start, req)
            reused = up is not None and not up[0].at_eof()
            if not reused:
                close(up[1] if up else None)
                try:
                    up = await _connect(tunnel, start)
                except (OSError, TimeoutError) as exc:
                    up = None
                    resp = pages.upstream_refused(tunnel.upstream.display, _connect_error(exc))
                    if obs is not None:
                        obs.synthetic_response(resp)
                        # Every request_started gets its request_completed (with the 502).
                        obs.finish()
                    w.write(resp)
                    await w.drain()
                    return
            if req is last_req:  # a repeated request (the same cached Head): the same head out
                pass
            elif req.host == fields_host:  # the same Host as before, usually
                last_req, fwd = req, _forwarded(req.raw, fields, tunnel)
            else:
                fields_host = req.host
                extra = [
                    (b"X-Forwarded-For", start.client_addr.encode()),
                    (b"X-Forwarded-Host", req.host.encode("latin-1")),
                    (b"X-Forwarded-Proto", start.proto.encode()),
                ]
                if host_header:
                    # as ngrok does when it rewrites Host: the name the client asked for
                    extra.append((b"X-Original-Host", req.host.encode("latin-1")))
                fields = field_lines(extra)
                last_req, fwd = req, _forwarded(req.raw, fields, tunnel)
            edit = _client_keep_alive if req.keep_alive else None
            try:
                try:
                    res = await proxy_exchange(req, fwd, r, w, up[0], up[1], obs, edit_response=edit)
                except UpstreamClosed:
                    # a kept-alive upstream connection the app closed as the request
                    # went out (its idle timeout): a bodiless idempotent request goes
                    # once more on a new connection
                    if not reused or not retryable(req):
                        raise
                    close(up[1])
                    up = None
                    try:
                        up = await _connect(tunnel, start)
                    except (OSError, TimeoutError) as exc:
                        raise UpstreamError(_connect_error(exc)) from None
                    res = await proxy_exchange(req, fwd, r, w, up[0], up[1], obs, edit_response=edit)
            except UpstreamError as exc:
                if not exc.response_started:
                    resp = pages.upstream_refused(tunnel.upstream.display, str(exc))
                    if obs is not None:
                        obs.synthetic_response(resp)
                    w.write(resp)
                    await w.drain()
                return
            finally:
                if obs is not None:
                    obs.finish()
            if res.upgraded:
                await relay(r, w, up[0], up[1])
                return
            if not res.keep_alive:
                return
            if not res.upstream_keep_alive:
                # the app closed its connection, not the client's: the next request on
                # this data connection dials the app again
                close(up[1])
                up = None
    except HTTPError as exc:
        w.write(pages.bad_request(exc.status, exc.msg))
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        if up is not None:
            close(up[1])
        if not handed_back:
            close(w)
    return False


def _connect_error(exc: OSError | TimeoutError) -> str:
    """Why dialling the app failed, for the 502 page."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return "timeout"


def _client_keep_alive(resp: Head) -> bytes | None:
    """``edit_response`` for a request whose client keeps its connection: an app that
    closes its own connection after a response that ends by itself (a length, chunks, or
    no body) does not close the client's, since Connection is hop-by-hop (RFC 9110
    §7.6.1; ngrok's agent, a Go reverse proxy, does the same).  Its Connection field is
    dropped and the data connection (and the TLS handshake it cost) stays; the agent
    dials the app again for the next request."""
    if resp.keep_alive or resp.version != "1.1" or resp.framing == UNTIL_CLOSE:
        return None
    lines = resp.raw.split(b"\r\n")
    kept = [ln for ln in lines[1:] if ln[:11].lower() != b"connection:"]
    if len(kept) == len(lines) - 1:
        return None
    return b"\r\n".join([lines[0], *kept])


def _forwarded(raw: bytes, fields: bytes, tunnel: Tunnel) -> bytes:
    """The request head as it goes to the upstream: Host per ``host_header``, and the
    X-Forwarded-* ``fields`` added."""
    host_header = tunnel.config.host_header
    if host_header:
        raw = replace_host(raw, tunnel.upstream.host_port if host_header == "rewrite" else host_header)
    return add_fields(raw, fields)


async def _connect(tunnel: Tunnel, start: StartData) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Dial the upstream; with ``proxy_proto``, first say who the public client is."""
    up_r, up_w = await tunnel.upstream.connect()
    version = tunnel.config.proxy_proto
    if version:
        peer = up_w.get_extra_info("peername") or ("127.0.0.1", tunnel.upstream.port)
        up_w.write(proxy_header(version, start.client_addr, start.client_port, peer[0], peer[1]))
    return up_r, up_w


def proxy_header(version: int, src: str, src_port: int, dst: str, dst_port: int) -> bytes:
    """A PROXY protocol header (v1 text or v2 binary) for one TCP connection."""
    try:
        s_ip, d_ip = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    except ValueError:
        return b"PROXY UNKNOWN\r\n" if version == 1 else _V2_SIG + b"\x20\x00\x00\x00"
    if s_ip.version != d_ip.version:  # e.g. an IPv4 client and an upstream on ::1
        d_ip = ipaddress.ip_address("0.0.0.0" if s_ip.version == 4 else "::")
    if version == 1:
        fam = "TCP4" if s_ip.version == 4 else "TCP6"
        return f"PROXY {fam} {s_ip} {d_ip} {src_port} {dst_port}\r\n".encode()
    fam = b"\x11" if s_ip.version == 4 else b"\x21"
    addrs = s_ip.packed + d_ip.packed + struct.pack(">HH", src_port, dst_port)
    return _V2_SIG + b"\x21" + fam + struct.pack(">H", len(addrs)) + addrs


_V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def replace_host(raw: bytes, host: str) -> bytes:
    """The request head with its Host field set to ``host`` (ngrok's host_header)."""
    lines = raw.split(b"\r\n")
    value = field_value(host).encode("utf-8", "surrogateescape")
    out = [lines[0]]
    done = False
    for ln in lines[1:]:
        if ln[:5].lower() == b"host:":
            if not done:
                out.append(b"Host: " + value)
                done = True
            continue
        out.append(ln)
    if not done:
        out.insert(1, b"Host: " + value)
    return b"\r\n".join(out)


async def serve_tcp(tunnel: Tunnel, r: asyncio.StreamReader, w: asyncio.StreamWriter, start: StartData) -> None:
    try:
        up_r, up_w = await _connect(tunnel, start)
    except (OSError, TimeoutError):
        close(w)
        return
    await relay(r, w, up_r, up_w)
