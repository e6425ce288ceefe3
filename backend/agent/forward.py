"""The agent's side of a data connection: forward it to the tunnel's upstream.

HTTP tunnels are proxied exchange by exchange (so each can be captured); TCP and TLS
tunnels are relayed as raw bytes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backend import pages
from backend.http1 import (
    MAX_HEAD,
    HTTPError,
    UpstreamError,
    add_headers,
    parse_request_head,
    proxy_exchange,
    read_head,
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

    scheme: str  # http | https | tcp | tls
    host: str
    port: int

    @classmethod
    def parse(cls, addr: str, proto: str) -> Upstream:
        text = addr.strip()
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
    def display(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
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
) -> None:
    """Proxy HTTP exchanges arriving on a data connection to the tunnel's upstream."""
    up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    try:
        while True:
            raw = await read_head(r)
            if raw is None:
                return
            req = parse_request_head(raw)
            obs = tunnel.observe(start, req)
            if up is None or up[0].at_eof():
                close(up[1] if up else None)
                try:
                    up = await tunnel.upstream.connect()
                except (OSError, TimeoutError) as exc:
                    up = None
                    err = exc.strerror or type(exc).__name__ if isinstance(exc, OSError) else "timeout"
                    resp = pages.upstream_refused(tunnel.upstream.display, str(err))
                    if obs is not None:
                        obs.synthetic_response(resp)
                        # Every request_started gets its request_completed (with the 502).
                        obs.finish()
                    w.write(resp)
                    await w.drain()
                    return
            fwd = add_headers(
                raw,
                [
                    (b"X-Forwarded-For", start.client_addr.encode()),
                    (b"X-Forwarded-Host", req.host.encode("latin-1")),
                    (b"X-Forwarded-Proto", start.proto.encode()),
                ],
            )
            try:
                res = await proxy_exchange(req, fwd, r, w, up[0], up[1], obs)
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
    except HTTPError as exc:
        w.write(pages.bad_request(exc.status, exc.msg))
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        if up is not None:
            close(up[1])
        close(w)


async def serve_tcp(tunnel: Tunnel, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        up_r, up_w = await tunnel.upstream.connect()
    except (OSError, TimeoutError):
        close(w)
        return
    await relay(r, w, up_r, up_w)
