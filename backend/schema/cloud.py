"""The cloud API's JSON shapes (ngrok API v2), as pydantic models.

Response models list every documented field; a field with no value is sent as ``null``
(the official clients read scalar fields by key), except the reference fields and the
agent-only fields that ngrok's own examples leave out when they do not apply
(``OMIT_WHEN_NULL`` of :class:`Endpoint` and :class:`Tunnel`): a client that tests
``"tunnel" in endpoint`` sees what it would see from ngrok. The official client sets
missing references to ``None`` itself. They ignore unknown fields when
parsing, so the console can read a real ngrok account with them too. Request bodies
(``*Create`` / ``*Update``) are strict and forbid unknown fields: the API turns those
validation errors into ``ERR_NGROK_214`` / ``ERR_NGROK_215``.

Timestamps are aware UTC datetimes, serialised as RFC 3339 (``2024-10-17T20:26:43Z``).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    PlainSerializer,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    model_serializer,
)

__all__ = [
    "APIKey",
    "APIKeyCreate",
    "APIKeyList",
    "APIKeyUpdate",
    "AgentIngress",
    "AgentIngressCertJob",
    "AgentIngressCertPolicy",
    "AgentIngressCertPolicyBody",
    "AgentIngressCertStatus",
    "AgentIngressCreate",
    "AgentIngressList",
    "AgentIngressUpdate",
    "Credential",
    "CredentialCreate",
    "CredentialList",
    "CredentialUpdate",
    "Endpoint",
    "EndpointCreate",
    "EndpointList",
    "EndpointUpdate",
    "Error",
    "Ref",
    "ReservedDomain",
    "ReservedDomainList",
    "Timestamp",
    "Tunnel",
    "TunnelList",
    "TunnelSession",
    "TunnelSessionList",
]


def _rfc3339(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


#: An aware datetime sent as RFC 3339 UTC with a ``Z``.
Timestamp = Annotated[dt.datetime, PlainSerializer(_rfc3339, return_type=str, when_used="json")]


class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore")

    #: Fields left out of the JSON when they are None, as ngrok's examples do. A dump
    #: with ``context={"all_fields": True}`` keeps them (what API filters see).
    OMIT_WHEN_NULL: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_nulls(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo):
        data = handler(self)
        if self.OMIT_WHEN_NULL and not (info.context or {}).get("all_fields"):
            for key in self.OMIT_WHEN_NULL:
                if key in data and data[key] is None:
                    del data[key]
        return data


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ---------------------------------------------------------------------------- shared
class Ref(_Out):
    id: str
    uri: str


class Error(_Out):
    error_code: str | None = None
    status_code: int
    msg: str
    details: dict


# -------------------------------------------------------------------------- endpoints
class Endpoint(_Out):
    OMIT_WHEN_NULL = frozenset(
        (
            "region", "domain", "tcp_addr", "tunnel", "edge", "upstream_url", "upstream_proto",
            "upstream_protocol", "tunnel_session", "name",
        )
    )  # fmt: skip

    id: str
    region: str | None = None
    created_at: Timestamp
    updated_at: Timestamp
    public_url: str
    proto: str
    scheme: str | None = None
    hostport: str
    host: str | None = None
    port: int | None = None
    type: str
    metadata: str | None = None
    description: str | None = None
    domain: Ref | None = None
    tcp_addr: Ref | None = None
    tunnel: Ref | None = None
    edge: Ref | None = None
    upstream_url: str | None = None
    upstream_proto: str | None = None
    #: The name the official client reads; the seed's table says ``upstream_proto``.
    upstream_protocol: str | None = None
    url: str
    principal: Ref | None = None
    traffic_policy: str | None = None
    bindings: list[str] | None = None
    tunnel_session: Ref | None = None
    uri: str
    name: str | None = None
    pooling_enabled: bool = False


class EndpointList(_Out):
    endpoints: list[Endpoint]
    uri: str
    next_page_uri: str | None = None


class EndpointCreate(_Body):
    url: str
    type: str | None = None
    traffic_policy: str | None = None
    description: str | None = None
    metadata: str | None = None
    bindings: list[str] | None = None
    pooling_enabled: bool | None = None


class EndpointUpdate(_Body):
    url: str | None = None
    traffic_policy: str | None = None
    description: str | None = None
    metadata: str | None = None
    bindings: list[str] | None = None
    pooling_enabled: bool | None = None


# --------------------------------------------------------------------- agent ingresses
class AgentIngressCertPolicy(_Out):
    authority: str
    private_key_type: str


class AgentIngressCertJob(_Out):
    error_code: str | None = None
    msg: str
    started_at: Timestamp
    retries_at: Timestamp | None = None


class AgentIngressCertStatus(_Out):
    renews_at: Timestamp | None = None
    provisioning_job: AgentIngressCertJob | None = None


class AgentIngress(_Out):
    id: str
    uri: str
    description: str | None = None
    metadata: str | None = None
    domain: str
    ns_targets: list[str]
    region_domains: list[str]
    created_at: Timestamp
    certificate_management_policy: AgentIngressCertPolicy | None = None
    certificate_management_status: AgentIngressCertStatus | None = None


class AgentIngressList(_Out):
    ingresses: list[AgentIngress]
    uri: str
    next_page_uri: str | None = None


class AgentIngressCertPolicyBody(_Body):
    authority: str | None = None
    private_key_type: str | None = None


class AgentIngressCreate(_Body):
    domain: str
    description: str | None = None
    metadata: str | None = None
    certificate_management_policy: AgentIngressCertPolicyBody | None = None


class AgentIngressUpdate(_Body):
    description: str | None = None
    metadata: str | None = None
    certificate_management_policy: AgentIngressCertPolicyBody | None = None


# -------------------------------------------------------------------- reserved domains
class ReservedDomain(_Out):
    id: str
    uri: str
    created_at: Timestamp
    description: str | None = None
    metadata: str | None = None
    domain: str
    region: str | None = None
    cname_target: str | None = None
    certificate: Ref | None = None
    certificate_management_policy: dict | None = None
    certificate_management_status: dict | None = None
    acme_challenge_cname_target: str | None = None
    resolves_to: list[dict] | None = None


class ReservedDomainList(_Out):
    reserved_domains: list[ReservedDomain]
    uri: str
    next_page_uri: str | None = None


# ---------------------------------------------------------------------------- tunnels
class Tunnel(_Out):
    """A tunnel of an online agent session (one per agent endpoint, ``tn_`` + its id body)."""

    OMIT_WHEN_NULL = frozenset(("tunnel_session", "endpoint", "labels", "backends"))

    id: str
    public_url: str
    started_at: Timestamp
    metadata: str | None = None
    proto: str
    region: str | None = None
    tunnel_session: Ref | None = None
    endpoint: Ref | None = None
    #: Only for labeled (backend) tunnels, which burrow does not have.
    labels: dict[str, str] | None = None
    backends: list[Ref] | None = None
    forwards_to: str | None = None


class TunnelList(_Out):
    tunnels: list[Tunnel]
    uri: str
    next_page_uri: str | None = None


# --------------------------------------------------------------------- tunnel sessions
class TunnelSession(_Out):
    agent_version: str | None = None
    credential: Ref | None = None
    id: str
    ip: str | None = None
    metadata: str | None = None
    os: str | None = None
    region: str | None = None
    started_at: Timestamp
    transport: str | None = None
    uri: str


class TunnelSessionList(_Out):
    tunnel_sessions: list[TunnelSession]
    uri: str
    next_page_uri: str | None = None


# ------------------------------------------------------------- credentials and API keys
class Credential(_Out):
    id: str
    uri: str
    created_at: Timestamp
    description: str | None = None
    metadata: str | None = None
    #: The authtoken itself: only in the answer to the create call, ``null`` afterwards.
    token: str | None = None
    acl: list[str]
    owner_id: str | None = None


class CredentialList(_Out):
    credentials: list[Credential]
    uri: str
    next_page_uri: str | None = None


class CredentialCreate(_Body):
    description: str | None = None
    metadata: str | None = None
    acl: list[str] | None = None
    owner_id: str | None = None


class CredentialUpdate(_Body):
    description: str | None = None
    metadata: str | None = None
    acl: list[str] | None = None


class APIKey(_Out):
    id: str
    uri: str
    description: str | None = None
    metadata: str | None = None
    created_at: Timestamp
    #: The key itself: only in the answer to the create call, ``null`` afterwards.
    token: str | None = None
    owner_id: str | None = None


class APIKeyList(_Out):
    keys: list[APIKey]
    uri: str
    next_page_uri: str | None = None


class APIKeyCreate(_Body):
    description: str | None = None
    metadata: str | None = None
    owner_id: str | None = None


class APIKeyUpdate(_Body):
    description: str | None = None
    metadata: str | None = None
