"""Cloud-state stores for the edge: one :class:`Store` interface, SQLite by default."""

from __future__ import annotations

from pathlib import Path

from backend.store.base import (
    Account,
    AgentIngress,
    APIKey,
    CertJob,
    CertPolicy,
    CloudEndpoint,
    ConflictError,
    Credential,
    IngressCertificate,
    NotFoundError,
    ReservedDomain,
    Store,
    StoreError,
    hash_token,
    new_token,
)
from backend.store.sqlite import SQLiteStore

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
    "SQLiteStore",
    "Store",
    "StoreError",
    "hash_token",
    "new_token",
    "open_store",
]


def open_store(location: str | Path) -> Store:
    """Open the store at ``location``: a file path, or a URL ``sqlite:///relative.db``,
    ``sqlite:////absolute.db``, ``sqlite:///:memory:`` (SQLAlchemy's spelling).

    This is the one place that maps a configured location to an implementation, so a
    PostgreSQL store only needs a new scheme here.
    """
    text = str(location)
    if text.startswith("sqlite:///"):
        return SQLiteStore(text.removeprefix("sqlite:///"))
    if "://" in text:
        raise ValueError(f"unsupported store location {text!r}; use a path or sqlite:///path")
    return SQLiteStore(Path(text))
