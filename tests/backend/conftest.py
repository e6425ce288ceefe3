"""The store contract runs against both backends: ``any_store`` is a synchronous view of
SQLite (the class itself) or of PostgreSQL (:class:`SyncBridge` over the async
:class:`~backend.store.postgres.PostgresStore`, on a fresh database of the test process's
real server)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.store import SQLiteStore
from backend.store.aio import STORE_METHODS


class SyncBridge:
    """Call an async store's methods synchronously, on its own loop in a thread."""

    def __init__(self, dsn: str) -> None:
        from backend.store.postgres import PostgresStore

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.astore = self.run(PostgresStore.connect(dsn))

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def __getattr__(self, name: str):
        if name not in STORE_METHODS and not hasattr(self.astore, name):
            raise AttributeError(name)
        fn = getattr(self.astore, name)
        return lambda *a, **kw: self.run(fn(*a, **kw))

    def close(self) -> None:
        if self.loop.is_running():
            self.run(self.astore.aclose())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture(params=["sqlite", "postgres"])
def any_store(request, tmp_path: Path) -> Iterator[SQLiteStore | SyncBridge]:
    if request.param == "sqlite":
        s: SQLiteStore | SyncBridge = SQLiteStore(tmp_path / "state" / "burrow.db")
    else:
        s = SyncBridge(request.getfixturevalue("postgres_dsn"))
    try:
        yield s
    finally:
        s.close()
