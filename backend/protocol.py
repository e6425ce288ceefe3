"""The agent ⇄ edge wire protocol.

Every message is a pydantic model framed as a 4-byte big-endian length followed by
that many bytes of JSON. Frames larger than :data:`MAX_FRAME` are refused before
any byte of the body is read, so a broken or hostile peer cannot make either side
buffer without bound.

Two kinds of connection reach the edge's ingress port:

* a **control** connection starts with :class:`Auth` and then carries the other
  control messages for the life of the session;
* a **data** connection starts with :class:`DataHello` (session id + key), waits in
  the edge's pool, and receives exactly one :class:`StartData` header when the edge
  hands it a public connection.  After that header it carries raw bytes only.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1
MAX_FRAME = 64 * 1024
_LEN = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame or message."""


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# ----------------------------------------------------------------- control: agent → edge
class Auth(_Msg):
    type: Literal["auth"] = "auth"
    authtoken: str
    client_id: str
    version: str = ""
    os: str = ""
    hostname: str = ""
    metadata: str = ""
    protocol: int = PROTOCOL_VERSION
    #: which of an HA agent's sessions this is (``--ha-connections``: 0..N-1, each on its
    #: own edge); a new session with the same client id *and* slot replaces the stale one
    slot: int = Field(default=0, ge=0, le=15)
    #: the agent takes a data connection back after an HTTP public connection ends
    #: cleanly (between two exchanges): the edge may then pool it again and hand it out
    #: with a new ``start`` frame, which the agent tells from a request by its first
    #: byte (a frame's length starts with 0; a request with a method's letter).  Older
    #: agents leave it out: their data connections serve one public connection each.
    reuse_data: bool = False


class Bind(_Msg):
    """Ask for an endpoint.  ``url`` empty means "pick a random name"."""

    type: Literal["bind"] = "bind"
    req_id: int
    name: str
    proto: Literal["http", "https", "tcp", "tls"]
    url: str = ""
    binding: Literal["public", "internal", "kubernetes"] | None = None
    pooling_enabled: bool = False
    metadata: str = ""
    description: str = ""
    upstream_url: str = ""
    traffic_policy: str = ""


class Unbind(_Msg):
    type: Literal["unbind"] = "unbind"
    req_id: int
    endpoint_id: str


# ----------------------------------------------------------------- control: edge → agent
class AuthOk(_Msg):
    type: Literal["auth_ok"] = "auth_ok"
    session_id: str
    session_key: str
    account_id: str
    region: str = "local"
    heartbeat_interval: float = 10.0
    heartbeat_timeout: float = 20.0
    #: the edge has an https listener, so an http tunnel that names no scheme gets an
    #: https URL (ngrok v3's default); absent from older edges = no
    https: bool = False
    #: where this session's data connections must go (``host:port`` of this edge's
    #: ingress): behind a load balancer or DNS name for several edges, they must reach
    #: the edge that holds the session.  None (older or single edges) = the address the
    #: control connection dialled
    direct_addr: str | None = None
    #: ingress addresses of the live edges of the cluster (this one included), for an
    #: agent holding sessions on several edges; empty from older or single edges
    edges: list[str] = Field(default_factory=list, max_length=256)


class BindOk(_Msg):
    type: Literal["bind_ok"] = "bind_ok"
    req_id: int
    endpoint_id: str
    name: str
    url: str


class UnbindOk(_Msg):
    type: Literal["unbind_ok"] = "unbind_ok"
    req_id: int


class Error(_Msg):
    """A refusal.  ``req_id`` ties it to a Bind/Unbind; 0 means the session itself."""

    type: Literal["error"] = "error"
    req_id: int = 0
    code: str
    msg: str


class NeedData(_Msg):
    """The edge's pool for this session ran low: dial ``count`` more data connections."""

    type: Literal["need_data"] = "need_data"
    count: int = 1


class Stop(_Msg):
    """The edge ends the session (API stop); the agent must not reconnect."""

    type: Literal["stop"] = "stop"
    reason: str = ""


class Restart(_Msg):
    """The edge asks the agent to reconnect (API restart)."""

    type: Literal["restart"] = "restart"
    reason: str = ""


# ----------------------------------------------------------------- control: both ways
class Ping(_Msg):
    type: Literal["ping"] = "ping"
    id: int
    sent: float = 0.0


class Pong(_Msg):
    type: Literal["pong"] = "pong"
    id: int
    sent: float = 0.0


# ----------------------------------------------------------------- data connections
class DataHello(_Msg):
    type: Literal["data"] = "data"
    session_id: str
    key: str


class StartData(_Msg):
    """Header the edge writes on a pooled data connection when it hands it out."""

    type: Literal["start"] = "start"
    endpoint_id: str
    name: str
    proto: str
    url: str
    client_addr: str
    client_port: int = 0


class DataPooled(_Msg):
    """The edge took a data connection back into its pool after an HTTP public
    connection ended between two exchanges (only to agents that sent
    ``Auth.reuse_data``): the agent lets go of its upstream connection and waits for
    the next ``start``."""

    type: Literal["pooled"] = "pooled"


Message = Annotated[
    Auth | Bind | Unbind | AuthOk | BindOk | UnbindOk | Error | NeedData | Stop | Restart
    | Ping | Pong | DataHello | StartData | DataPooled,
    Field(discriminator="type"),
]
_adapter: TypeAdapter[Message] = TypeAdapter(Message)


def encode(msg: _Msg) -> bytes:
    """Frame one message.  Raises ProtocolError if it would exceed MAX_FRAME."""
    body = msg.model_dump_json().encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(body)) + body


def decode(body: bytes) -> Message:
    try:
        return _adapter.validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "message"
        raise ProtocolError(f"invalid message ({where}: {first.get('msg')})") from None


async def read_msg(reader: asyncio.StreamReader, prefix: bytes = b"") -> Message:
    """Read one framed message, of which ``prefix`` (the first bytes) may already have
    been read.  Raises ProtocolError on a bad frame, EOF errors as-is."""
    head = prefix[:4] + (await reader.readexactly(4 - len(prefix)) if len(prefix) < 4 else b"")
    (length,) = _LEN.unpack(head)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    got = prefix[4:]
    if len(got) > length:
        raise ProtocolError("frame shorter than the bytes that started it")
    return decode(got + await reader.readexactly(length - len(got)))


def write_msg(writer: asyncio.StreamWriter, msg: _Msg) -> None:
    writer.write(encode(msg))
