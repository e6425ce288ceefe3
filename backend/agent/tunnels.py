"""Tunnel definitions (ngrok's config shape) and the agent's live tunnel objects."""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from backend.agent.forward import Upstream
from backend.agent.metrics import TunnelMetrics
from backend.http1 import Head
from backend.protocol import StartData


class TunnelConfig(BaseModel):
    """One tunnel, as in an ngrok config file or a ``POST /api/tunnels`` body."""

    model_config = ConfigDict(extra="ignore")

    name: str = ""
    proto: Literal["http", "https", "tcp", "tls"] = "http"
    addr: str
    url: str = Field(default="", description="public URL to ask for; empty = random")
    binding: Literal["public", "internal", "kubernetes"] | None = None
    pooling_enabled: bool = False
    metadata: str = ""
    description: str = ""
    inspect: bool = True
    traffic_policy: str = ""
    #: no scheme asked for: https when the edge has an https listener (ngrok v3's default)
    auto_https: bool = False
    #: ngrok's host_header: "rewrite" (the upstream's host:port) or a literal Host value
    host_header: str = ""
    #: ngrok's proxy_proto: 0 (off), 1 or 2 -- PROXY protocol header to the upstream
    proxy_proto: Literal[0, 1, 2] = 0
    #: the http half of ``schemes: [http, https]``: bind the host its https twin got
    same_host_as: str = ""

    @field_validator("addr", mode="before")
    @classmethod
    def _addr_str(cls, v):
        return str(v) if isinstance(v, int) else v

    @field_validator("url", mode="before")
    @classmethod
    def _url_alias(cls, v):
        return v or ""

    @field_validator("addr", mode="after")
    @classmethod
    def _addr_valid(cls, v: str, info: ValidationInfo) -> str:
        # checked now, so a bad addr is refused (400) instead of failing every request later
        up = Upstream.parse(v, info.data.get("proto") or "http")
        if up.scheme == "file" and info.data.get("proto") not in ("http", "https"):
            raise ValueError("a file:// upstream is served over http tunnels only")
        return v

    @model_validator(mode="after")
    def _proxy_proto_upstream(self) -> TunnelConfig:
        if self.proxy_proto and Upstream.parse(self.addr, self.proto).scheme in ("https", "tls", "file"):
            raise ValueError("proxy_proto needs a plain TCP or HTTP upstream (not https://, tls:// or file://)")
        return self


class Tunnel:
    """A running tunnel: its config, upstream, public URL (once bound) and metrics."""

    def __init__(self, config: TunnelConfig) -> None:
        self.config = config
        self.name = config.name
        self.upstream = Upstream.parse(config.addr, config.proto)
        #: endpoint ids by HA slot: each of the agent's sessions binds the tunnel's URL
        #: on its own edge and gets its own endpoint
        self.endpoint_ids: dict[int, str] = {}
        self.public_url: str = ""
        self.metrics = TunnelMetrics()
        self.error: str | None = None
        self.started = time.time()
        self.capture = None  # set by the agent when inspection is on
        #: an HA agent's sessions bind one at a time: the first gets the URL, the others ask for it
        self.bind_lock = asyncio.Lock()

    @property
    def proto(self) -> str:
        """What the tunnel serves: the public URL's scheme once bound (https for ngrok v3's default)."""
        if self.public_url and "://" in self.public_url and self.config.proto in ("http", "https"):
            return self.public_url.split("://", 1)[0]
        return self.config.proto

    @property
    def endpoint_id(self) -> str | None:
        """The endpoint of the lowest slot that has one (None while offline)."""
        return self.endpoint_ids[min(self.endpoint_ids)] if self.endpoint_ids else None

    @property
    def online(self) -> bool:
        return bool(self.endpoint_ids)

    def observe(self, start: StartData, req: Head, replay_of: str | None = None) -> Exchange:
        return Exchange(self, start, req, replay_of)


class Exchange:
    """Watches one HTTP exchange through the agent: timing, and capture when enabled."""

    __slots__ = ("_t0", "capture", "req", "resp", "start", "tunnel")

    def __init__(self, tunnel: Tunnel, start: StartData, req: Head, replay_of: str | None = None) -> None:
        self.tunnel = tunnel
        self.start = start
        self.req = req
        self.resp: Head | None = None
        self._t0 = time.perf_counter_ns()
        cap = tunnel.capture
        self.capture = cap.begin(tunnel, start, req, replay_of) if cap is not None else None

    def request_body(self, chunk: bytes | int) -> int | None:
        return self.capture.request_body(chunk) if self.capture is not None else 0

    def response_head(self, head: Head) -> None:
        self.resp = head
        if self.capture is not None:
            self.capture.response_head(head)

    def response_body(self, chunk: bytes | int) -> int | None:
        return self.capture.response_body(chunk) if self.capture is not None else 0

    def synthetic_response(self, raw: bytes) -> None:
        """Record a response the agent made itself (e.g. the 502 for a refused upstream)."""
        if self.capture is not None:
            self.capture.synthetic_response(raw)

    def finish(self) -> None:
        duration = time.perf_counter_ns() - self._t0
        self.tunnel.metrics.request_done(duration)
        if self.capture is not None:
            self.capture.finish(duration)
