"""The edge's store interface: the methods of :class:`~backend.store.base.Store`, awaited.

The edge calls ``await edge.store.method(...)``.  Two implementations:

- :class:`SQLiteAsync` (single machine, the default) wraps the synchronous
  :class:`~backend.store.sqlite.SQLiteStore` with direct calls: SQLite answers an
  indexed lookup in microseconds from the page cache, so a thread hop would cost more
  than it saves, and the store is never on the per-request path (routing reads memory).
  Such a coroutine never suspends, so a check-then-claim sequence (backend.ownership)
  stays as atomic on one edge as it was with synchronous calls.
- :class:`~backend.store.postgres.PostgresStore` (``--store postgresql://...``), shared
  by several edges (``shared`` is True); it also has the cluster methods (claims, tcp
  ports, the API bucket), used only when ``shared``.

Every method of :class:`Store` exists here as a coroutine with the same signature and
meaning; ``tests/backend/test_store*.py`` run the same contract against both.
"""

from __future__ import annotations

import abc
import inspect
from typing import Any

from backend.store.base import Store

__all__ = ["STORE_METHODS", "AsyncStore", "SQLiteAsync"]

#: The names of the store's methods (all but ``close``), each a coroutine here.
STORE_METHODS: tuple[str, ...] = tuple(
    name
    for name, value in vars(Store).items()
    if getattr(value, "__isabstractmethod__", False) and name != "close"
)


class AsyncStore(abc.ABC):
    """The store as the edge sees it: each :class:`Store` method is a coroutine.

    ``shared`` is True when several edges use the same state (PostgreSQL): live name
    claims, tcp ports and the API rate limit are then kept in the store too.
    """

    shared: bool = False

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the connection(s); the store is unusable afterwards."""


def _forward(name: str):
    def method(self: SQLiteAsync, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.sync, name)(*args, **kwargs)

    async def coro(self: SQLiteAsync, *args: Any, **kwargs: Any) -> Any:
        return method(self, *args, **kwargs)

    sig = getattr(Store, name)
    coro.__name__ = name
    coro.__qualname__ = f"SQLiteAsync.{name}"
    coro.__doc__ = sig.__doc__
    coro.__signature__ = inspect.signature(sig)  # type: ignore[attr-defined]
    return coro


class SQLiteAsync(AsyncStore):
    """A synchronous :class:`Store` (SQLite) behind the async interface, by direct calls."""

    shared = False

    def __init__(self, sync: Store) -> None:
        self.sync = sync

    def close(self) -> None:
        """Close the wrapped store now (synchronous; also what :meth:`aclose` does)."""
        self.sync.close()

    async def aclose(self) -> None:
        self.sync.close()

    @property
    def path(self):
        return getattr(self.sync, "path", None)


for _name in STORE_METHODS:
    setattr(SQLiteAsync, _name, _forward(_name))
del _name
