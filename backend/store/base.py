"""The edge's cloud-state store: models and the interface every backend implements.

The edge keeps accounts, API keys and authtokens here (later also cloud endpoints, agent
ingresses and reserved domains). SQLite is the single-node default; a PostgreSQL
implementation of the same :class:`Store` lets several edge nodes share state.

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
    "ConflictError",
    "Credential",
    "NotFoundError",
    "Store",
    "StoreError",
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

_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class StoreError(Exception):
    """Base class for store failures the API layer turns into error responses."""


class ConflictError(StoreError):
    """The request clashes with existing state (e.g. a token owned by another account)."""


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
        """Return the credential whose secret is ``token``, or None."""

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
        """Return the API key whose secret is ``token``, or None."""

    @abc.abstractmethod
    def get_api_key(self, api_key_id: str) -> APIKey | None:
        """Return the API key with this id, or None."""

    @abc.abstractmethod
    def list_api_keys(self, account_id: str) -> list[APIKey]:
        """Return an account's API keys, oldest first."""

    @abc.abstractmethod
    def delete_api_key(self, api_key_id: str) -> bool:
        """Delete an API key; return False if there was none with that id."""

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
