"""Replay a captured request against a tunnel's upstream, optionally modified.

The replay goes through the same :func:`backend.http1.proxy_exchange` as live
traffic, with the captured (or edited) request bytes as the "client" side, so the
result is captured like any exchange and linked to its original by ``replay_of``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re

from pydantic import BaseModel, ConfigDict, field_validator

from backend.http1 import (
    MAX_HEAD,
    ClientError,
    HTTPError,
    UpstreamError,
    parse_request_head,
    proxy_exchange,
)
from backend.protocol import StartData
from backend.relay import close

_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")

# Request headers a modified replay recomputes instead of copying.
_FRAMING = {"content-length", "transfer-encoding"}


class ReplayError(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status


class ReplayRequest(BaseModel):
    """Body of ``POST /api/requests/http``: ngrok's fields plus burrow's edit fields."""

    model_config = ConfigDict(extra="forbid")

    id: str
    tunnel_name: str | None = None
    # burrow extension: replay a modified request
    method: str | None = None
    uri: str | None = None
    headers: dict[str, list[str] | str] | None = None
    body: str | None = None
    body_base64: str | None = None
    raw: str | None = None  # the whole request, base64

    @field_validator("method")
    @classmethod
    def _method(cls, v: str | None) -> str | None:
        if v is not None and (not v.isascii() or not v.isalpha()):
            raise ValueError("method must be letters only")
        return v.upper() if v else v

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is not None and ((not v.startswith("/") and v != "*") or any(c in v for c in " \r\n")):
            raise ValueError("uri must start with / and contain no spaces")
        return v

    @property
    def modified(self) -> bool:
        return any(
            x is not None for x in (self.method, self.uri, self.headers, self.body, self.body_base64, self.raw)
        )


class _Sink:
    """Stands in for the client's writer: the response is only captured."""

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


def build_request(capture, rr: ReplayRequest) -> bytes:
    """The bytes to send: the captured request, or the edited one."""
    if rr.raw is not None:
        try:
            return base64.b64decode(rr.raw, validate=True)
        except (binascii.Error, ValueError):
            raise ReplayError(400, "raw is not valid base64") from None
    if not rr.modified:
        if capture.req.truncated:
            raise ReplayError(
                400,
                f"the captured request body was truncated at {capture.req.stored} of "
                f"{capture.req.body_size} bytes; replay it with an explicit body",
            )
        return capture.req.raw
    head = capture._req_head
    method = rr.method or head.method.decode("latin-1")
    uri = rr.uri or head.target.decode("latin-1")
    if rr.headers is not None:
        pairs = []
        for k, v in rr.headers.items():
            if not k or any(c in k for c in ":\r\n ") or not k.isascii():
                raise ReplayError(400, f"invalid header name {k!r}")
            for item in [v] if isinstance(v, str) else v:
                if any(c in item for c in "\r\n"):
                    raise ReplayError(400, f"invalid value for header {k!r}")
                pairs.append((k, item))
    else:
        pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers]
    if rr.body_base64 is not None:
        try:
            body = base64.b64decode(rr.body_base64, validate=True)
        except (binascii.Error, ValueError):
            raise ReplayError(400, "body_base64 is not valid base64") from None
    elif rr.body is not None:
        body = rr.body.encode()
    else:
        if capture.req.truncated:
            raise ReplayError(400, "the captured request body was truncated; give a body")
        body = _decoded_body(capture)
    lines = [f"{method} {uri} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in pairs if k.lower() not in _FRAMING]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _decoded_body(capture) -> bytes:
    """The captured request body with chunked framing removed.

    Chunk lines ending in a bare LF (which older data paths let through) are read too;
    anything else malformed is the caller's 400, not a crash.
    """
    from backend.http1 import CHUNKED

    body = capture.req.body
    if capture._req_head.framing != CHUNKED:
        return body
    out = bytearray()
    pos = 0
    while True:
        nl = body.find(b"\n", pos)
        if nl < 0:
            break  # the capture ends inside the framing (e.g. the client went away)
        size_txt = body[pos:nl].rstrip(b"\r").split(b";", 1)[0].strip()
        if not _HEX.fullmatch(size_txt):
            raise ReplayError(
                400,
                f"the captured chunked body has an invalid chunk size {size_txt[:20]!r}; "
                "replay it with an explicit body",
            )
        size = int(size_txt, 16)
        if size == 0:
            break
        start = nl + 1
        out += body[start : start + size]
        pos = start + size
        # the chunk's data ends with CRLF (or a bare LF)
        if body[pos : pos + 2] == b"\r\n":
            pos += 2
        elif body[pos : pos + 1] == b"\n":
            pos += 1
        elif pos < len(body):
            raise ReplayError(
                400, "the captured chunked body is malformed; replay it with an explicit body"
            )
    return bytes(out)


async def replay(tunnel, capture, rr: ReplayRequest, timeout: float = 30.0) -> str | None:
    """Send the request to ``tunnel``'s upstream; return the new capture's id."""
    raw = build_request(capture, rr)
    end = raw.find(b"\r\n\r\n")
    if end < 0 or end + 4 > MAX_HEAD:
        raise ReplayError(400, "the request has no complete head")
    try:
        head = parse_request_head(raw[: end + 4])
    except HTTPError as exc:
        raise ReplayError(400, f"invalid request: {exc.msg}") from None
    reader = asyncio.StreamReader()
    reader.feed_data(raw[end + 4 :])
    reader.feed_eof()
    start = StartData(
        endpoint_id=tunnel.endpoint_id or "",
        name=tunnel.name,
        proto=tunnel.config.proto,
        url=tunnel.public_url,
        client_addr=capture.remote_addr,
    )
    ex = tunnel.observe(start, head, replay_of=capture.id)
    try:
        up_r, up_w = await tunnel.upstream.connect()
    except (OSError, TimeoutError) as exc:
        raise ReplayError(502, f"upstream {tunnel.upstream.display} refused the replay: {exc}") from None
    try:
        await asyncio.wait_for(proxy_exchange(head, head.raw, reader, _Sink(), up_r, up_w, ex), timeout)
    except ClientError as exc:  # the replayed body's own framing is broken
        raise ReplayError(400, f"invalid request body: {exc.msg}") from None
    except (UpstreamError, OSError, TimeoutError) as exc:
        raise ReplayError(502, f"replay failed: {exc or type(exc).__name__}") from None
    finally:
        ex.finish()
        close(up_w)
    return ex.capture.cap.id if ex.capture is not None else None
