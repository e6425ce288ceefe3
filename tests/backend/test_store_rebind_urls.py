"""The store's memory of ngrok agents' tunnel URLs (re-binds after an edge restart)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import backend.store.sqlite as sqlite_store
from backend.store import SQLiteStore
from backend.store.base import format_timestamp, utcnow


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "burrow.db"


def test_remembered_urls_survive_reopening_and_stay_per_account(db_path: Path) -> None:
    s = SQLiteStore(db_path)
    a = s.default_account().id
    b = s.create_account("other").id
    s.remember_rebind_url(a, "ep_1", "http://one.burrow.localhost", limit=10)
    s.remember_rebind_url(b, "ep_1", "http://two.burrow.localhost", limit=10)
    s.remember_rebind_url(a, "ep_1", "http://one-again.burrow.localhost", limit=10)  # replaces
    s.close()
    s = SQLiteStore(db_path)
    try:
        assert s.rebind_url(a, "ep_1") == "http://one-again.burrow.localhost"
        assert s.rebind_url(b, "ep_1") == "http://two.burrow.localhost"
        assert s.rebind_url(a, "ep_2") is None
        s.forget_rebind_url(a, "ep_1")
        s.forget_rebind_url(a, "ep_1")  # idempotent
        assert s.rebind_url(a, "ep_1") is None
        assert s.rebind_url(b, "ep_1") == "http://two.burrow.localhost"
    finally:
        s.close()


def test_remembered_urls_are_bounded_oldest_first(db_path: Path) -> None:
    s = SQLiteStore(db_path)
    try:
        a = s.default_account().id
        for i in range(5):
            s.remember_rebind_url(a, f"ep_{i}", f"http://n{i}.burrow.localhost", limit=3)
        assert [s.rebind_url(a, f"ep_{i}") for i in range(5)] == [
            None,
            None,
            "http://n2.burrow.localhost",
            "http://n3.burrow.localhost",
            "http://n4.burrow.localhost",
        ]
        # remembering again makes an entry the newest: ep_2 outlives ep_3 now
        s.remember_rebind_url(a, "ep_2", "http://n2.burrow.localhost", limit=3)
        s.remember_rebind_url(a, "ep_5", "http://n5.burrow.localhost", limit=3)
        assert s.rebind_url(a, "ep_3") is None
        assert s.rebind_url(a, "ep_2") == "http://n2.burrow.localhost"
        (n,) = s.conn.execute("SELECT COUNT(*) FROM ngrok_rebind_urls").fetchone()
        assert n == 3
    finally:
        s.close()


def test_a_database_of_the_previous_schema_gains_the_table(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An edge's existing database (the schema before this table) is migrated when the
    new edge opens it."""
    before = next(i for i, m in enumerate(sqlite_store.MIGRATIONS) if "ngrok_rebind_urls" in m)
    with monkeypatch.context() as mp:
        mp.setattr(sqlite_store, "MIGRATIONS", sqlite_store.MIGRATIONS[:before])
        old = SQLiteStore(db_path)  # today's code on yesterday's schema: only open and close
        assert old.schema_version() == before
        old.close()
    account = "acc_from_before"
    with sqlite3.connect(db_path) as raw:  # the old edge's default account
        raw.execute(
            "INSERT INTO accounts (id, name, is_default, created_at) VALUES (?, 'default', 1, ?)",
            (account, format_timestamp(utcnow())),
        )
    s = SQLiteStore(db_path)
    try:
        assert s.schema_version() == len(sqlite_store.MIGRATIONS) >= 2
        assert s.default_account().id == account
        s.remember_rebind_url(account, "ep_1", "http://x.burrow.localhost", limit=10)
        assert s.rebind_url(account, "ep_1") == "http://x.burrow.localhost"
    finally:
        s.close()
