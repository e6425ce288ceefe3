"""Tests for the SQLite cloud-state store (backend.store)."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.store import (
    ConflictError,
    NotFoundError,
    SQLiteStore,
    Store,
    StoreError,
    hash_token,
    new_token,
    open_store,
)
from backend.store.sqlite import MIGRATIONS, split_statements

KSUID_BODY = r"[0-9A-Za-z]{27}"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "burrow.db"


@pytest.fixture
def sqlite_store(db_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(db_path)
    yield s
    s.close()


@pytest.fixture
def store(any_store):
    """The contract tests run on SQLite and on PostgreSQL (tests/backend/conftest.py)."""
    return any_store


def test_is_a_store(sqlite_store: SQLiteStore) -> None:
    assert isinstance(sqlite_store, Store)


def test_pragmas(sqlite_store: SQLiteStore) -> None:
    conn = sqlite_store.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_migration_version_recorded(sqlite_store: SQLiteStore, db_path: Path) -> None:
    assert sqlite_store.schema_version() == len(MIGRATIONS) >= 1
    sqlite_store.close()
    with sqlite3.connect(db_path) as raw:
        versions = [r[0] for r in raw.execute("SELECT version FROM schema_migrations")]
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    assert {"accounts", "credentials", "api_keys", "schema_migrations"} <= tables


def test_reopen_does_not_reapply_migrations(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    with SQLiteStore(db_path) as again:
        rows = again.conn.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0]
        assert rows == len(MIGRATIONS)


def test_newer_schema_is_refused(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    with sqlite3.connect(db_path) as raw:
        raw.execute("INSERT INTO schema_migrations VALUES (999, '2026-01-01T00:00:00Z')")
    with pytest.raises(StoreError, match="newer"):
        SQLiteStore(db_path)


def test_default_account_created_once(sqlite_store: SQLiteStore, db_path: Path) -> None:
    acct = sqlite_store.default_account()
    assert acct.name == "default"
    assert re.fullmatch(rf"acct_{KSUID_BODY}", acct.id)
    assert sqlite_store.default_account() == acct
    # A user account that happens to be named "default" does not confuse it.
    sqlite_store.create_account("default")
    assert sqlite_store.default_account() == acct
    sqlite_store.close()
    with SQLiteStore(db_path) as reopened:
        assert reopened.default_account() == acct


def test_create_and_get_account(store: SQLiteStore) -> None:
    acct = store.create_account("team")
    assert acct.created_at.tzinfo is not None
    assert store.get_account(acct.id) == acct
    assert store.get_account("acct_missing") is None


def test_authtoken_roundtrip_and_idempotent(store: SQLiteStore) -> None:
    acct = store.default_account()
    token = new_token("burrow")
    cred = store.add_authtoken(acct.id, token, "laptop", metadata='{"k":1}', acl=["bind:*"])
    assert re.fullmatch(rf"cr_{KSUID_BODY}", cred.id)
    assert cred.account_id == acct.id
    assert cred.description == "laptop"
    assert cred.metadata == '{"k":1}'
    assert cred.acl == ["bind:*"]
    assert cred.token_hash == hashlib.sha256(token.encode()).hexdigest()

    again = store.add_authtoken(acct.id, token, "other description")
    assert again == cred  # same token returns the existing row unchanged
    assert store.list_authtokens(acct.id) == [cred]
    assert store.find_authtoken(token) == cred
    assert store.get_authtoken(cred.id) == cred
    assert store.find_authtoken(token + "x") is None
    assert store.find_authtoken("") is None


def test_api_key_roundtrip_and_idempotent(store: SQLiteStore) -> None:
    acct = store.default_account()
    token = new_token("ak")
    key = store.add_api_key(acct.id, token, "ci")
    assert re.fullmatch(rf"ak_{KSUID_BODY}", key.id)
    assert store.add_api_key(acct.id, token) == key
    assert store.find_api_key(token) == key
    assert store.get_api_key(key.id) == key
    assert store.list_api_keys(acct.id) == [key]
    assert store.find_api_key(new_token("ak")) is None
    # An authtoken and an API key live in separate namespaces.
    assert store.find_authtoken(token) is None


def test_list_order_and_delete(store: SQLiteStore) -> None:
    acct = store.default_account()
    creds = [store.add_authtoken(acct.id, new_token(), f"t{i}") for i in range(5)]
    assert [c.id for c in store.list_authtokens(acct.id)] == [c.id for c in creds]
    assert store.delete_authtoken(creds[2].id) is True
    assert store.delete_authtoken(creds[2].id) is False
    assert creds[2] not in store.list_authtokens(acct.id)
    keys = [store.add_api_key(acct.id, new_token()) for _ in range(3)]
    assert store.list_api_keys(acct.id) == keys
    assert store.delete_api_key(keys[0].id) is True
    assert store.delete_api_key(keys[0].id) is False
    assert store.list_api_keys(acct.id) == keys[1:]


def test_secrets_stored_only_as_hashes(sqlite_store: SQLiteStore, db_path: Path) -> None:
    acct = sqlite_store.default_account()
    authtoken = new_token("2authtoken")
    api_key = new_token("apikey")
    sqlite_store.add_authtoken(acct.id, authtoken, "desc")
    sqlite_store.add_api_key(acct.id, api_key, "desc")
    sqlite_store.close()

    # No row in any table holds either secret.
    with sqlite3.connect(db_path) as raw:
        tables = [r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in raw.execute(f'SELECT * FROM "{table}"'):
                text = " ".join(str(v) for v in row)
                assert authtoken not in text and api_key not in text, table
        hashes = {r[0] for r in raw.execute("SELECT token_hash FROM credentials")}
        assert hashes == {hash_token(authtoken)}
    # Nor do the database file, its WAL or shared-memory file, byte for byte.
    for path in db_path.parent.iterdir():
        data = path.read_bytes()
        assert authtoken.encode() not in data, path
        assert api_key.encode() not in data, path


def test_model_repr_hides_hash(store: SQLiteStore) -> None:
    cred = store.add_authtoken(store.default_account().id, new_token())
    assert cred.token_hash not in repr(cred)


def test_persistence_across_reopen(db_path: Path) -> None:
    token, key_token = new_token(), new_token()
    with SQLiteStore(db_path) as first:
        acct = first.create_account("persist")
        cred = first.add_authtoken(acct.id, token, "kept", acl=["a", "b"])
        key = first.add_api_key(acct.id, key_token, "kept too")
    with SQLiteStore(db_path) as second:
        assert second.get_account(acct.id) == acct
        assert second.find_authtoken(token) == cred
        assert second.find_api_key(key_token) == key
        assert second.add_authtoken(acct.id, token) == cred


def test_two_accounts_are_separate(store: SQLiteStore) -> None:
    a = store.create_account("alpha")
    b = store.create_account("beta")
    assert a.id != b.id
    ta, tb = new_token(), new_token()
    ca = store.add_authtoken(a.id, ta)
    cb = store.add_authtoken(b.id, tb)
    assert store.list_authtokens(a.id) == [ca]
    assert store.list_authtokens(b.id) == [cb]
    assert store.find_authtoken(ta).account_id == a.id  # type: ignore[union-attr]
    assert store.find_authtoken(tb).account_id == b.id  # type: ignore[union-attr]
    ka = store.add_api_key(a.id, new_token())
    assert store.list_api_keys(b.id) == []
    assert store.list_api_keys(a.id) == [ka]
    # One account cannot claim another's secret.
    with pytest.raises(ConflictError):
        store.add_authtoken(b.id, ta)
    assert store.list_authtokens(b.id) == [cb]


def test_unknown_account_rejected(store: SQLiteStore) -> None:
    with pytest.raises(NotFoundError):
        store.add_authtoken("acct_nope", new_token())
    with pytest.raises(NotFoundError):
        store.add_api_key("acct_nope", new_token())


def test_timestamps_are_rfc3339_utc(sqlite_store: SQLiteStore) -> None:
    acct = sqlite_store.default_account()
    sqlite_store.add_authtoken(acct.id, new_token())
    for table in ("accounts", "credentials", "schema_migrations"):
        column = "applied_at" if table == "schema_migrations" else "created_at"
        for (value,) in sqlite_store.conn.execute(f"SELECT {column} FROM {table}"):
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", value), value
    now = dt.datetime.now(dt.UTC)
    assert abs((now - acct.created_at).total_seconds()) < 5


def test_closed_store_raises(db_path: Path) -> None:
    s = SQLiteStore(db_path)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError):
        s.default_account()


def test_open_store_locations(tmp_path: Path) -> None:
    with open_store(tmp_path / "a.db") as a:
        assert isinstance(a, SQLiteStore)
    with open_store(f"sqlite:///{tmp_path / 'b.db'}") as b:
        assert isinstance(b, SQLiteStore)
        assert b.path == tmp_path / "b.db"
    with open_store("sqlite:///:memory:") as m:
        assert m.default_account().name == "default"
    with pytest.raises(ValueError):
        open_store("postgresql://localhost/burrow")


def test_new_token_is_random_and_prefixed() -> None:
    a, b = new_token("bt"), new_token("bt")
    assert a != b
    assert a.startswith("bt_") and len(a) >= 3 + 43
    assert len(hash_token(a)) == 64


def test_split_statements() -> None:
    stmts = split_statements("CREATE TABLE t (a TEXT DEFAULT ';');\nINSERT INTO t VALUES ('x');\n")
    assert len(stmts) == 2
    with pytest.raises(ValueError):
        split_statements("CREATE TABLE t (a TEXT")
