"""The edge's cloud-state store: models and the interface every backend implements.

The edge keeps accounts, API keys, authtokens, cloud endpoints and agent ingresses here.
SQLite is the single-node default; a PostgreSQL implementation of the same
:class:`Store` lets several edge nodes share state.

Every read or change of an account's object takes the ``account_id`` as well as the
object id, so one account can never reach another's objects by guessing an id.

Secrets are never stored: only ``sha256(token).hexdigest()`` is kept and looked up by an
indexed equality match. The tokens are 256-bit random strings, so a fast hash is the
right tool (a slow password hash would add latency and no security).

Adding an entity means: a pydantic model here, abstract methods on :class:`Store`, a
migration plus methods in each implementation.
"""

from __future__ import annotations

import abc
import datetime as dt
import hashlib
import secrets
from types import TracebackType

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "APIKey",
    "Account",
    "AgentIngress",
    "CertJob",
    "CertPolicy",
    "CloudEndpoint",
    "ConflictError",
    "Credential",
    "IngressCertificate",
    "NotFoundError",
    "ReservedDomain",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "format_timestamp",
    "hash_token",
    "new_token",
    "parse_timestamp",
    "utcnow",
]

#: Id prefixes, as ngrok uses them.
ACCOUNT_PREFIX = "acct"
CREDENTIAL_PREFIX = "cr"
API_KEY_PREFIX = "ak"
ENDPOINT_PREFIX = "ep"
AGENT_INGRESS_PREFIX = "agin"
RESERVED_DOMAIN_PREFIX = "rd"

_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class StoreError(Exception):
    """Base class for store failures the API layer turns into error responses."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now (PostgreSQL down or unreachable).

    Nothing was written; the caller may retry.  The cloud API answers it with
    503 and ``Retry-After: 1``.
    """


class ConflictError(StoreError):
    """The request clashes with existing state (e.g. a token owned by another account).

    ``kind`` says which rule was broken so the API can pick its error code:
    ``"url_taken"`` (the account already has a cloud endpoint on this URL),
    ``"host_taken"`` (a public hostname or tcp port belongs to another account),
    ``"domain_taken"`` (an agent ingress domain exists already), or None.
    """

    def __init__(self, msg: str, kind: str | None = None) -> None:
        super().__init__(msg)
        self.kind = kind


class NotFoundError(StoreError):
    """A referenced row (e.g. the account of a new authtoken) does not exist."""


def utcnow() -> dt.datetime:
    """Current UTC time truncated to whole seconds, the precision timestamps are stored at."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def format_timestamp(value: dt.datetime) -> str:
    """Format a datetime as an RFC 3339 UTC string like ``2026-11-23T19:48:57Z``."""
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return value.astimezone(dt.UTC).strftime(_TIMESTAMP_FORMAT)


def parse_timestamp(text: str) -> dt.datetime:
    """Parse a string made by :func:`format_timestamp` back into an aware UTC datetime."""
    return dt.datetime.strptime(text, _TIMESTAMP_FORMAT).replace(tzinfo=dt.UTC)


def hash_token(token: str) -> str:
    """Return the stored form of a secret: the hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token(prefix: str = "") -> str:
    """Return a new random secret (256 bits, URL-safe), as ``prefix_<random>`` if prefixed."""
    body = secrets.token_urlsafe(32)
    return f"{prefix}_{body}" if prefix else body


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Account(_Model):
    """An account: the owner of credentials, API keys and (later) endpoints."""

    id: str
    name: str
    created_at: dt.datetime
    #: when an administrator disabled it: its API keys and authtokens stop working, its
    #: sessions end and its cloud endpoints stop serving (None = enabled)
    disabled_at: dt.datetime | None = None


class Credential(_Model):
    """An authtoken agents present when they connect (ngrok's "tunnel credential")."""

    id: str
    account_id: str
    description: str = ""
    metadata: str = ""
    acl: list[str] = Field(default_factory=list)
    created_at: dt.datetime
    token_hash: str = Field(repr=False)


class APIKey(_Model):
    """A key for the cloud API (``Authorization: Bearer ...``)."""

    id: str
    account_id: str
    description: str = ""
    metadata: str = ""
    created_at: dt.datetime
    token_hash: str = Field(repr=False)


class CloudEndpoint(_Model):
    """An endpoint created through the API and served by the edge itself.

    ``url`` is normalised (``scheme://host[:port]``, the port left out when it is the
    scheme's default or the edge's own listener); ``host`` is lower-case, so routing can
    use ``(binding, proto, host)`` or, for tcp, ``(binding, "tcp", port)``. ``port`` 0
    means "the edge's http/https listener, whatever its port" (public http, https, tls).
    """

    id: str
    account_id: str
    url: str
    proto: str
    host: str
    port: int
    binding: str = "public"
    pooling_enabled: bool = False
    description: str = ""
    metadata: str = ""
    traffic_policy: str = ""
    created_at: dt.datetime
    updated_at: dt.datetime
    #: The reservation of ``host`` (public http/https/tls endpoints); set by the store.
    domain_id: str | None = None


class ReservedDomain(_Model):
    """A public hostname claimed by one account.

    The store claims a hostname when an account's first public cloud endpoint uses it
    and releases it when the last one goes, so a hostname belongs to one account.
    """

    id: str
    account_id: str
    domain: str
    created_at: dt.datetime


class CertPolicy(_Model):
    """How an agent ingress domain's certificate is managed."""

    authority: str = "letsencrypt"
    private_key_type: str = "rsa"


class CertJob(_Model):
    """A provisioning attempt that has not (yet) produced a certificate."""

    error_code: str | None = None
    msg: str
    started_at: dt.datetime
    retries_at: dt.datetime | None = None


class IngressCertificate(_Model):
    """A certificate issued for an agent ingress's domains (PEM chain and key)."""

    chain_pem: str = Field(repr=False)
    key_pem: str = Field(repr=False)
    not_after: dt.datetime
    renews_at: dt.datetime


class AgentIngress(_Model):
    """A domain of the user's through which agents may reach the edge."""

    id: str
    account_id: str
    domain: str
    description: str = ""
    metadata: str = ""
    created_at: dt.datetime
    cert_policy: CertPolicy | None = None
    certificate: IngressCertificate | None = None
    cert_job: CertJob | None = None


class Store(abc.ABC):
    """The cloud-state store interface; implementations must be safe to share on one loop.

    Methods are synchronous and fast (indexed lookups); call them from the event loop.
    Usable as a context manager that closes the store.
    """

    # -- accounts ---------------------------------------------------------------------

    @abc.abstractmethod
    def default_account(self) -> Account:
        """Return the account named "default", creating it on first call."""

    @abc.abstractmethod
    def create_account(self, name: str) -> Account:
        """Create and return a new account."""

    @abc.abstractmethod
    def get_account(self, account_id: str) -> Account | None:
        """Return the account with this id, or None."""

    @abc.abstractmethod
    def list_accounts(self) -> list[Account]:
        """Return every account, oldest first."""

    @abc.abstractmethod
    def set_account_disabled(self, account_id: str, disabled: bool) -> Account | None:
        """Disable (or enable again) an account; return it, or None if there is none.

        Disabling keeps its first ``disabled_at``; the account keeps its names.
        """

    @abc.abstractmethod
    def disabled_account_ids(self) -> set[str]:
        """The ids of the disabled accounts (a small set; the edge polls it)."""

    @abc.abstractmethod
    def disabled_owner(self, token: str) -> Account | None:
        """The disabled account an authtoken or API key ``token`` belongs to, or None.

        :meth:`find_authtoken` and :meth:`find_api_key` never return a disabled
        account's secrets; this tells a refusal why, on the failure path only.
        """

    # -- authtokens (credentials) -----------------------------------------------------

    @abc.abstractmethod
    def add_authtoken(
        self,
        account_id: str,
        token: str,
        description: str = "",
        *,
        metadata: str = "",
        acl: list[str] | None = None,
    ) -> Credential:
        """Register an authtoken for an account; the same token again returns the existing row.

        Raises :class:`ConflictError` if the token already belongs to another account.
        """

    @abc.abstractmethod
    def find_authtoken(self, token: str) -> Credential | None:
        """Return the credential whose secret is ``token``, or None (also when its
        account is disabled)."""

    @abc.abstractmethod
    def get_authtoken(self, credential_id: str) -> Credential | None:
        """Return the credential with this id, or None."""

    @abc.abstractmethod
    def list_authtokens(self, account_id: str) -> list[Credential]:
        """Return an account's credentials, oldest first (ids sort by creation)."""

    @abc.abstractmethod
    def delete_authtoken(self, credential_id: str) -> bool:
        """Delete a credential; return False if there was none with that id."""

    # -- API keys ---------------------------------------------------------------------

    @abc.abstractmethod
    def add_api_key(
        self, account_id: str, token: str, description: str = "", *, metadata: str = ""
    ) -> APIKey:
        """Register an API key for an account; the same token again returns the existing row.

        Raises :class:`ConflictError` if the key already belongs to another account.
        """

    @abc.abstractmethod
    def find_api_key(self, token: str) -> APIKey | None:
        """Return the API key whose secret is ``token``, or None (also when its account
        is disabled)."""

    @abc.abstractmethod
    def get_api_key(self, api_key_id: str) -> APIKey | None:
        """Return the API key with this id, or None."""

    @abc.abstractmethod
    def list_api_keys(self, account_id: str) -> list[APIKey]:
        """Return an account's API keys, oldest first."""

    @abc.abstractmethod
    def delete_api_key(self, api_key_id: str) -> bool:
        """Delete an API key; return False if there was none with that id."""

    @abc.abstractmethod
    def update_api_key(
        self, api_key_id: str, *, description: str | None = None, metadata: str | None = None
    ) -> APIKey | None:
        """Change the given fields (None = unchanged); return the new row or None if absent."""

    @abc.abstractmethod
    def update_authtoken(
        self,
        credential_id: str,
        *,
        description: str | None = None,
        metadata: str | None = None,
        acl: list[str] | None = None,
    ) -> Credential | None:
        """Change the given fields (None = unchanged); return the new row or None if absent."""

    # -- cloud endpoints --------------------------------------------------------------

    @abc.abstractmethod
    def create_cloud_endpoint(self, endpoint: CloudEndpoint) -> CloudEndpoint:
        """Store a new cloud endpoint.

        Raises :class:`ConflictError` with ``kind="url_taken"`` if the account already has
        one on the same URL and binding, or ``kind="host_taken"`` if a public hostname (or
        public tcp port) is used by another account's cloud endpoint.
        """

    @abc.abstractmethod
    def get_cloud_endpoint(self, account_id: str, endpoint_id: str) -> CloudEndpoint | None:
        """Return the account's cloud endpoint with this id, or None."""

    @abc.abstractmethod
    def list_cloud_endpoints(
        self, account_id: str, *, before_id: str | None = None, limit: int | None = None
    ) -> list[CloudEndpoint]:
        """Return the account's cloud endpoints newest first, ids below ``before_id`` only."""

    @abc.abstractmethod
    def all_cloud_endpoints(self) -> list[CloudEndpoint]:
        """Return every enabled account's cloud endpoints (for the edge's routing table)."""

    @abc.abstractmethod
    def update_cloud_endpoint(self, endpoint: CloudEndpoint) -> CloudEndpoint:
        """Replace a stored cloud endpoint (same id and account) with ``endpoint``.

        Raises :class:`NotFoundError` if it is gone and :class:`ConflictError` as create does.
        """

    @abc.abstractmethod
    def delete_cloud_endpoint(self, account_id: str, endpoint_id: str) -> bool:
        """Delete the account's cloud endpoint; False if there was none."""

    @abc.abstractmethod
    def public_host_owner(self, host: str) -> str | None:
        """Return the account that has reserved the public hostname ``host``, or None."""

    @abc.abstractmethod
    def public_tcp_port_owner(self, port: int) -> str | None:
        """Return the account whose public tcp cloud endpoint uses ``port``, or None."""

    # -- reserved domains -------------------------------------------------------------

    @abc.abstractmethod
    def get_reserved_domain(self, account_id: str, domain_id: str) -> ReservedDomain | None:
        """Return the account's reserved domain with this id, or None."""

    @abc.abstractmethod
    def list_reserved_domains(
        self, account_id: str, *, before_id: str | None = None, limit: int | None = None
    ) -> list[ReservedDomain]:
        """Return the account's reserved domains newest first, ids below ``before_id`` only."""

    # -- agent ingresses --------------------------------------------------------------

    @abc.abstractmethod
    def create_agent_ingress(self, ingress: AgentIngress) -> AgentIngress:
        """Store a new agent ingress; ``ConflictError(kind="domain_taken")`` if the domain exists."""

    @abc.abstractmethod
    def get_agent_ingress(self, account_id: str, ingress_id: str) -> AgentIngress | None:
        """Return the account's agent ingress with this id, or None."""

    @abc.abstractmethod
    def list_agent_ingresses(
        self, account_id: str, *, before_id: str | None = None, limit: int | None = None
    ) -> list[AgentIngress]:
        """Return the account's agent ingresses newest first, ids below ``before_id`` only."""

    @abc.abstractmethod
    def find_agent_ingress(self, domain: str) -> AgentIngress | None:
        """Return the agent ingress (any account) registered for ``domain``, or None."""

    @abc.abstractmethod
    def all_agent_ingresses(self) -> list[AgentIngress]:
        """Return every account's agent ingresses (for the edge's certificate manager)."""

    @abc.abstractmethod
    def update_agent_ingress(self, ingress: AgentIngress) -> AgentIngress:
        """Replace the mutable fields of a stored agent ingress; NotFoundError if it is gone."""

    @abc.abstractmethod
    def delete_agent_ingress(self, account_id: str, ingress_id: str) -> bool:
        """Delete the account's agent ingress; False if there was none."""

    # -- ngrok agents' re-bind URLs -----------------------------------------------------
    # An ngrok agent that reconnects re-binds each listener with the tunnel id the edge
    # gave it; the edge gives it back the same URL if it is free, also after a restart.

    @abc.abstractmethod
    def remember_rebind_url(self, account_id: str, tunnel_id: str, url: str, limit: int) -> None:
        """Remember ``url`` for the account's tunnel id; keep the newest ``limit`` entries."""

    @abc.abstractmethod
    def rebind_url(self, account_id: str, tunnel_id: str) -> str | None:
        """The URL remembered for the account's tunnel id, or None."""

    @abc.abstractmethod
    def forget_rebind_url(self, account_id: str, tunnel_id: str) -> None:
        """Forget the URL of the account's tunnel id (idempotent)."""

    # -- lifecycle --------------------------------------------------------------------

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection(s); the store is unusable afterwards."""

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
