"""SQLite implementation of the cloud-state :class:`~backend.store.base.Store`.

One connection in WAL mode (readers never block the writer), ``synchronous=NORMAL``
(durable at checkpoints, never corrupt), foreign keys on. The schema is a list of
versioned migration scripts; those not yet recorded in ``schema_migrations`` are applied
in order, in one ``BEGIN IMMEDIATE`` transaction, when the store opens, so two processes
opening the same file cannot both migrate it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from backend.ids import new_id
from backend.store.base import (
    ACCOUNT_PREFIX,
    API_KEY_PREFIX,
    CREDENTIAL_PREFIX,
    Account,
    APIKey,
    ConflictError,
    Credential,
    NotFoundError,
    Store,
    StoreError,
    format_timestamp,
    hash_token,
    parse_timestamp,
    utcnow,
)

__all__ = ["MIGRATIONS", "SQLiteStore"]

#: Migration scripts; version N is ``MIGRATIONS[N - 1]``. Append only, never edit.
#: Statements are split with :func:`sqlite3.complete_statement`, one or more lines each.
MIGRATIONS: list[str] = [
    # 1: accounts, authtokens, API keys
    """
    CREATE TABLE accounts (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        is_default  INTEGER NOT NULL DEFAULT 0,
        created_at  TEXT NOT NULL
    );
    CREATE UNIQUE INDEX accounts_one_default ON accounts (is_default) WHERE is_default = 1;

    CREATE TABLE credentials (
        id          TEXT PRIMARY KEY,
        account_id  TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
        description TEXT NOT NULL DEFAULT '',
        metadata    TEXT NOT NULL DEFAULT '',
        acl         TEXT NOT NULL DEFAULT '[]',
        created_at  TEXT NOT NULL,
        token_hash  TEXT NOT NULL
    );
    CREATE UNIQUE INDEX credentials_token_hash ON credentials (token_hash);
    CREATE INDEX credentials_account ON credentials (account_id, id);

    CREATE TABLE api_keys (
        id          TEXT PRIMARY KEY,
        account_id  TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
        description TEXT NOT NULL DEFAULT '',
        metadata    TEXT NOT NULL DEFAULT '',
        created_at  TEXT NOT NULL,
        token_hash  TEXT NOT NULL
    );
    CREATE UNIQUE INDEX api_keys_token_hash ON api_keys (token_hash);
    CREATE INDEX api_keys_account ON api_keys (account_id, id);
    """,
]


def split_statements(script: str) -> list[str]:
    """Split a migration script into complete SQL statements (line-based)."""
    statements: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            statements.append(buf.strip())
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement in migration: {buf.strip()[:80]!r}")
    return statements


class SQLiteStore(Store):
    """Cloud state in one SQLite file, shared by the code on one event loop."""

    def __init__(self, path: Path | str, *, timeout: float = 5.0) -> None:
        """Open (creating if needed) the database at ``path`` and bring its schema up to date."""
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # isolation_level=None: no implicit transactions, we BEGIN/COMMIT ourselves.
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            str(path), timeout=timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            self._migrate()
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    # -- plumbing ---------------------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        """The open connection; raises :class:`StoreError` once the store is closed."""
        if self._conn is None:
            raise StoreError("store is closed")
        return self._conn

    @contextmanager
    def _tx(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        """Hold the lock and run the block in a transaction, rolling back on error."""
        with self._lock:
            conn = self.conn
            conn.execute(f"BEGIN {mode}")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    def _migrate(self) -> None:
        with self._tx() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            current = conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"
            ).fetchone()[0]
            if current > len(MIGRATIONS):
                raise StoreError(
                    f"database schema version {current} is newer than this burrow "
                    f"({len(MIGRATIONS)}); upgrade burrow"
                )
            now = format_timestamp(utcnow())
            for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                for statement in split_statements(script):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, now),
                )

    def schema_version(self) -> int:
        """Return the highest migration version applied to this database."""
        rows = self._query("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        return int(rows[0][0])

    # -- row mapping ------------------------------------------------------------------

    @staticmethod
    def _account(row: sqlite3.Row) -> Account:
        return Account(
            id=row["id"], name=row["name"], created_at=parse_timestamp(row["created_at"])
        )

    @staticmethod
    def _credential(row: sqlite3.Row) -> Credential:
        return Credential(
            id=row["id"],
            account_id=row["account_id"],
            description=row["description"],
            metadata=row["metadata"],
            acl=json.loads(row["acl"]),
            created_at=parse_timestamp(row["created_at"]),
            token_hash=row["token_hash"],
        )

    @staticmethod
    def _api_key(row: sqlite3.Row) -> APIKey:
        return APIKey(
            id=row["id"],
            account_id=row["account_id"],
            description=row["description"],
            metadata=row["metadata"],
            created_at=parse_timestamp(row["created_at"]),
            token_hash=row["token_hash"],
        )

    # -- accounts ---------------------------------------------------------------------

    def default_account(self) -> Account:
        """Return the account flagged default, creating one named "default" on first call."""
        rows = self._query("SELECT * FROM accounts WHERE is_default = 1")
        if rows:
            return self._account(rows[0])
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO accounts (id, name, is_default, created_at) VALUES (?, ?, 1, ?)"
                " ON CONFLICT DO NOTHING",
                (new_id(ACCOUNT_PREFIX), "default", format_timestamp(utcnow())),
            )
            row = conn.execute("SELECT * FROM accounts WHERE is_default = 1").fetchone()
        return self._account(row)

    def create_account(self, name: str) -> Account:
        """Create an account with a new ``acct_`` id."""
        account = Account(id=new_id(ACCOUNT_PREFIX), name=name, created_at=utcnow())
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO accounts (id, name, created_at) VALUES (?, ?, ?)",
                (account.id, account.name, format_timestamp(account.created_at)),
            )
        return account

    def get_account(self, account_id: str) -> Account | None:
        """Return the account with this id, or None."""
        rows = self._query("SELECT * FROM accounts WHERE id = ?", (account_id,))
        return self._account(rows[0]) if rows else None

    # -- authtokens -------------------------------------------------------------------

    def add_authtoken(
        self,
        account_id: str,
        token: str,
        description: str = "",
        *,
        metadata: str = "",
        acl: list[str] | None = None,
    ) -> Credential:
        """Store the token's hash for the account; return the existing row for a known token."""
        token_hash = hash_token(token)
        with self._tx() as conn:
            row = conn.execute(
                "SELECT * FROM credentials WHERE token_hash = ?", (token_hash,)
            ).fetchone()
            if row is None:
                cred = Credential(
                    id=new_id(CREDENTIAL_PREFIX),
                    account_id=account_id,
                    description=description,
                    metadata=metadata,
                    acl=list(acl or []),
                    created_at=utcnow(),
                    token_hash=token_hash,
                )
                try:
                    conn.execute(
                        "INSERT INTO credentials (id, account_id, description, metadata, acl,"
                        " created_at, token_hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            cred.id,
                            cred.account_id,
                            cred.description,
                            cred.metadata,
                            json.dumps(cred.acl),
                            format_timestamp(cred.created_at),
                            cred.token_hash,
                        ),
                    )
                except sqlite3.IntegrityError as exc:
                    raise NotFoundError(f"no account {account_id!r}") from exc
                return cred
        existing = self._credential(row)
        if existing.account_id != account_id:
            raise ConflictError("this authtoken is already registered to another account")
        return existing

    def find_authtoken(self, token: str) -> Credential | None:
        """Look up a credential by the hash of the presented token."""
        rows = self._query("SELECT * FROM credentials WHERE token_hash = ?", (hash_token(token),))
        return self._credential(rows[0]) if rows else None

    def get_authtoken(self, credential_id: str) -> Credential | None:
        """Return the credential with this id, or None."""
        rows = self._query("SELECT * FROM credentials WHERE id = ?", (credential_id,))
        return self._credential(rows[0]) if rows else None

    def list_authtokens(self, account_id: str) -> list[Credential]:
        """Return the account's credentials, oldest first."""
        rows = self._query(
            "SELECT * FROM credentials WHERE account_id = ? ORDER BY id", (account_id,)
        )
        return [self._credential(r) for r in rows]

    def delete_authtoken(self, credential_id: str) -> bool:
        """Delete the credential; True if it existed."""
        with self._tx() as conn:
            cur = conn.execute("DELETE FROM credentials WHERE id = ?", (credential_id,))
            return cur.rowcount > 0

    # -- API keys ---------------------------------------------------------------------

    def add_api_key(
        self, account_id: str, token: str, description: str = "", *, metadata: str = ""
    ) -> APIKey:
        """Store the key's hash for the account; return the existing row for a known key."""
        token_hash = hash_token(token)
        with self._tx() as conn:
            row = conn.execute(
                "SELECT * FROM api_keys WHERE token_hash = ?", (token_hash,)
            ).fetchone()
            if row is None:
                key = APIKey(
                    id=new_id(API_KEY_PREFIX),
                    account_id=account_id,
                    description=description,
                    metadata=metadata,
                    created_at=utcnow(),
                    token_hash=token_hash,
                )
                try:
                    conn.execute(
                        "INSERT INTO api_keys (id, account_id, description, metadata,"
                        " created_at, token_hash) VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            key.id,
                            key.account_id,
                            key.description,
                            key.metadata,
                            format_timestamp(key.created_at),
                            key.token_hash,
                        ),
                    )
                except sqlite3.IntegrityError as exc:
                    raise NotFoundError(f"no account {account_id!r}") from exc
                return key
        existing = self._api_key(row)
        if existing.account_id != account_id:
            raise ConflictError("this API key is already registered to another account")
        return existing

    def find_api_key(self, token: str) -> APIKey | None:
        """Look up an API key by the hash of the presented bearer token."""
        rows = self._query("SELECT * FROM api_keys WHERE token_hash = ?", (hash_token(token),))
        return self._api_key(rows[0]) if rows else None

    def get_api_key(self, api_key_id: str) -> APIKey | None:
        """Return the API key with this id, or None."""
        rows = self._query("SELECT * FROM api_keys WHERE id = ?", (api_key_id,))
        return self._api_key(rows[0]) if rows else None

    def list_api_keys(self, account_id: str) -> list[APIKey]:
        """Return the account's API keys, oldest first."""
        rows = self._query("SELECT * FROM api_keys WHERE account_id = ? ORDER BY id", (account_id,))
        return [self._api_key(r) for r in rows]

    def delete_api_key(self, api_key_id: str) -> bool:
        """Delete the API key; True if it existed."""
        with self._tx() as conn:
            cur = conn.execute("DELETE FROM api_keys WHERE id = ?", (api_key_id,))
            return cur.rowcount > 0

    # -- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
