"""Cloud-state stores for the edge: one :class:`Store` interface, SQLite by default."""

from __future__ import annotations

from pathlib import Path

from backend.store.aio import AsyncStore, SQLiteAsync
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
    StoreUnavailable,
    hash_token,
    new_token,
)
from backend.store.sqlite import SQLiteStore

__all__ = [
    "POSTGRES_SCHEMES",
    "APIKey",
    "Account",
    "AgentIngress",
    "AsyncStore",
    "CertJob",
    "CertPolicy",
    "CloudEndpoint",
    "ConflictError",
    "Credential",
    "IngressCertificate",
    "NotFoundError",
    "ReservedDomain",
    "SQLiteAsync",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "hash_token",
    "new_token",
    "open_edge_store",
    "open_store",
]

#: URL schemes of a PostgreSQL store (cluster mode).
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(location: str | Path) -> Store:
    """Open the store at ``location``: a file path, or a URL ``sqlite:///relative.db``,
    ``sqlite:////absolute.db``, ``sqlite:///:memory:`` (SQLAlchemy's spelling).

    This is the one place that maps a configured location to an implementation, so a
    PostgreSQL store only needs a new scheme here.
    """
    text = str(location)
    if text.startswith(POSTGRES_SCHEMES):
        raise ValueError("a PostgreSQL store is async: use open_edge_store()")
    if text.startswith("sqlite:///"):
        return SQLiteStore(text.removeprefix("sqlite:///"))
    if "://" in text:
        raise ValueError(f"unsupported store location {text!r}; use a path or sqlite:///path")
    return SQLiteStore(Path(text))


async def open_edge_store(location: str | Path) -> AsyncStore:
    """Open the edge's store: PostgreSQL for a ``postgresql://`` URL (cluster mode),
    else SQLite as :func:`open_store` does, wrapped in :class:`SQLiteAsync`."""
    text = str(location)
    if text.startswith(POSTGRES_SCHEMES):
        from backend.store.postgres import PostgresStore

        return await PostgresStore.connect(text)
    return SQLiteAsync(open_store(location))
