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

from backend.fsperm import private_dir, private_sqlite, sqlite_side_files
from backend.ids import new_id
from backend.store.base import (
    ACCOUNT_PREFIX,
    API_KEY_PREFIX,
    CREDENTIAL_PREFIX,
    RESERVED_DOMAIN_PREFIX,
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
    # 2: reserved domains, cloud endpoints and agent ingresses
    """
    CREATE TABLE reserved_domains (
        id          TEXT PRIMARY KEY,
        account_id  TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
        domain      TEXT NOT NULL,
        created_at  TEXT NOT NULL
    );
    CREATE UNIQUE INDEX reserved_domains_domain ON reserved_domains (domain);
    CREATE INDEX reserved_domains_account ON reserved_domains (account_id, id);

    CREATE TABLE cloud_endpoints (
        id              TEXT PRIMARY KEY,
        account_id      TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
        url             TEXT NOT NULL,
        proto           TEXT NOT NULL,
        host            TEXT NOT NULL,
        port            INTEGER NOT NULL,
        binding         TEXT NOT NULL,
        pooling_enabled INTEGER NOT NULL DEFAULT 0,
        description     TEXT NOT NULL DEFAULT '',
        metadata        TEXT NOT NULL DEFAULT '',
        traffic_policy  TEXT NOT NULL DEFAULT '',
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        domain_id       TEXT REFERENCES reserved_domains (id)
    );
    CREATE INDEX cloud_endpoints_account ON cloud_endpoints (account_id, id);
    CREATE UNIQUE INDEX cloud_endpoints_url ON cloud_endpoints (account_id, binding, url);
    CREATE INDEX cloud_endpoints_host ON cloud_endpoints (binding, host);
    CREATE INDEX cloud_endpoints_port ON cloud_endpoints (binding, proto, port);

    CREATE TABLE agent_ingresses (
        id             TEXT PRIMARY KEY,
        account_id     TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
        domain         TEXT NOT NULL,
        description    TEXT NOT NULL DEFAULT '',
        metadata       TEXT NOT NULL DEFAULT '',
        created_at     TEXT NOT NULL,
        cert_policy    TEXT,
        cert_chain     TEXT,
        cert_key       TEXT,
        cert_not_after TEXT,
        cert_renews_at TEXT,
        cert_job       TEXT
    );
    CREATE UNIQUE INDEX agent_ingresses_domain ON agent_ingresses (domain);
    CREATE INDEX agent_ingresses_account ON agent_ingresses (account_id, id);
    """,
    # 3: the URL each ngrok agent tunnel id got, so that it re-binds to it after a restart
    """
    CREATE TABLE ngrok_rebind_urls (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        account_id  TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
        tunnel_id   TEXT NOT NULL,
        url         TEXT NOT NULL
    );
    CREATE UNIQUE INDEX ngrok_rebind_urls_key ON ngrok_rebind_urls (account_id, tunnel_id);
    """,
    # 4: accounts an administrator disabled
    """
    ALTER TABLE accounts ADD COLUMN disabled_at TEXT;
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
        on_disk = str(path) != ":memory:"
        if on_disk:  # it holds secrets: 0600 files in a 0700 dir, whatever the umask
            private_dir(self.path.parent, tighten=False)
            private_sqlite(self.path)
        self._lock = threading.RLock()
        # isolation_level=None: no implicit transactions, we BEGIN/COMMIT ourselves.
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            str(path), timeout=timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            if on_disk:
                sqlite_side_files(self.path)
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
        disabled = row["disabled_at"]
        return Account(
            id=row["id"],
            name=row["name"],
            created_at=parse_timestamp(row["created_at"]),
            disabled_at=parse_timestamp(disabled) if disabled else None,
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

    @staticmethod
    def _cloud_endpoint(row: sqlite3.Row) -> CloudEndpoint:
        return CloudEndpoint(
            id=row["id"],
            account_id=row["account_id"],
            url=row["url"],
            proto=row["proto"],
            host=row["host"],
            port=row["port"],
            binding=row["binding"],
            pooling_enabled=bool(row["pooling_enabled"]),
            description=row["description"],
            metadata=row["metadata"],
            traffic_policy=row["traffic_policy"],
            created_at=parse_timestamp(row["created_at"]),
            updated_at=parse_timestamp(row["updated_at"]),
            domain_id=row["domain_id"],
        )

    @staticmethod
    def _reserved_domain(row: sqlite3.Row) -> ReservedDomain:
        return ReservedDomain(
            id=row["id"],
            account_id=row["account_id"],
            domain=row["domain"],
            created_at=parse_timestamp(row["created_at"]),
        )

    @staticmethod
    def _agent_ingress(row: sqlite3.Row) -> AgentIngress:
        cert = None
        if row["cert_chain"] is not None:
            cert = IngressCertificate(
                chain_pem=row["cert_chain"],
                key_pem=row["cert_key"],
                not_after=parse_timestamp(row["cert_not_after"]),
                renews_at=parse_timestamp(row["cert_renews_at"]),
            )
        return AgentIngress(
            id=row["id"],
            account_id=row["account_id"],
            domain=row["domain"],
            description=row["description"],
            metadata=row["metadata"],
            created_at=parse_timestamp(row["created_at"]),
            cert_policy=(
                CertPolicy.model_validate_json(row["cert_policy"]) if row["cert_policy"] else None
            ),
            certificate=cert,
            cert_job=CertJob.model_validate_json(row["cert_job"]) if row["cert_job"] else None,
        )

    @staticmethod
    def _page(
        sql: str, params: list[object], before_id: str | None, limit: int | None
    ) -> tuple[str, tuple[object, ...]]:
        """Add ``id < before_id``, newest-first order and a limit to a WHERE query."""
        if before_id is not None:
            sql += " AND id < ?"
            params.append(before_id)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return sql, tuple(params)

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

    def list_accounts(self) -> list[Account]:
        """Return every account, oldest first."""
        return [self._account(r) for r in self._query("SELECT * FROM accounts ORDER BY id")]

    def set_account_disabled(self, account_id: str, disabled: bool) -> Account | None:
        """Set or clear ``disabled_at`` (a second disable keeps the first time)."""
        with self._tx() as conn:
            if disabled:
                conn.execute(
                    "UPDATE accounts SET disabled_at = COALESCE(disabled_at, ?) WHERE id = ?",
                    (format_timestamp(utcnow()), account_id),
                )
            else:
                conn.execute("UPDATE accounts SET disabled_at = NULL WHERE id = ?", (account_id,))
            row = conn.execute("SELECT * FROM accounts WHERE id = ?", (account_id,)).fetchone()
        return self._account(row) if row else None

    def disabled_account_ids(self) -> set[str]:
        rows = self._query("SELECT id FROM accounts WHERE disabled_at IS NOT NULL")
        return {r["id"] for r in rows}

    def disabled_owner(self, token: str) -> Account | None:
        rows = self._query(
            "SELECT a.* FROM accounts a WHERE a.disabled_at IS NOT NULL AND a.id IN ("
            " SELECT account_id FROM credentials WHERE token_hash = ?"
            " UNION SELECT account_id FROM api_keys WHERE token_hash = ?)",
            (hash_token(token), hash_token(token)),
        )
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
        rows = self._query(
            "SELECT c.* FROM credentials c JOIN accounts a ON a.id = c.account_id"
            " WHERE c.token_hash = ? AND a.disabled_at IS NULL",
            (hash_token(token),),
        )
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
        rows = self._query(
            "SELECT k.* FROM api_keys k JOIN accounts a ON a.id = k.account_id"
            " WHERE k.token_hash = ? AND a.disabled_at IS NULL",
            (hash_token(token),),
        )
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

    def update_api_key(
        self, api_key_id: str, *, description: str | None = None, metadata: str | None = None
    ) -> APIKey | None:
        """Change the given fields (None = unchanged); return the new row or None if absent."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE api_keys SET description = COALESCE(?, description),"
                " metadata = COALESCE(?, metadata) WHERE id = ?",
                (description, metadata, api_key_id),
            )
            row = conn.execute("SELECT * FROM api_keys WHERE id = ?", (api_key_id,)).fetchone()
        return self._api_key(row) if row else None

    def update_authtoken(
        self,
        credential_id: str,
        *,
        description: str | None = None,
        metadata: str | None = None,
        acl: list[str] | None = None,
    ) -> Credential | None:
        """Change the given fields (None = unchanged); return the new row or None if absent."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE credentials SET description = COALESCE(?, description),"
                " metadata = COALESCE(?, metadata), acl = COALESCE(?, acl) WHERE id = ?",
                (description, metadata, None if acl is None else json.dumps(acl), credential_id),
            )
            row = conn.execute(
                "SELECT * FROM credentials WHERE id = ?", (credential_id,)
            ).fetchone()
        return self._credential(row) if row else None

    # -- cloud endpoints --------------------------------------------------------------

    @staticmethod
    def _claim_name(conn: sqlite3.Connection, ep: CloudEndpoint) -> str | None:
        """Check and record who owns ``ep``'s name; return its hostname reservation's id.

        The durable half of :mod:`backend.ownership` (the edge asks that module first,
        for live agent endpoints too): one cloud endpoint per URL and account; a public
        hostname (any protocol) or public tcp port belongs to one account. A public
        http/https/tls endpoint reserves its hostname on first use.
        """
        same_url = conn.execute(
            "SELECT 1 FROM cloud_endpoints WHERE account_id = ? AND binding = ? AND url = ?"
            " AND id != ?",
            (ep.account_id, ep.binding, ep.url, ep.id),
        ).fetchone()
        if same_url:
            raise ConflictError(
                f"This account already has a cloud endpoint on {ep.url}.", kind="url_taken"
            )
        if ep.binding != "public":
            return None  # internal names are per account
        if ep.proto == "tcp":
            owner = SQLiteStore._tcp_owner(conn, ep.port, ep.account_id)
            if owner is not None:
                raise ConflictError(
                    f"tcp port {ep.port} is already used by another account.", kind="host_taken"
                )
            return None
        row = conn.execute(
            "SELECT id, account_id FROM reserved_domains WHERE domain = ?", (ep.host,)
        ).fetchone()
        if row is not None:
            if row["account_id"] != ep.account_id:
                raise ConflictError(
                    f"The hostname {ep.host} is reserved by another account.", kind="host_taken"
                )
            return row["id"]
        domain_id = new_id(RESERVED_DOMAIN_PREFIX)
        conn.execute(
            "INSERT INTO reserved_domains (id, account_id, domain, created_at) VALUES (?, ?, ?, ?)",
            (domain_id, ep.account_id, ep.host, format_timestamp(utcnow())),
        )
        return domain_id

    @staticmethod
    def _tcp_owner(conn: sqlite3.Connection, port: int, not_account: str = "") -> str | None:
        row = conn.execute(
            "SELECT account_id FROM cloud_endpoints WHERE binding = 'public' AND proto = 'tcp'"
            " AND port = ? AND account_id != ? LIMIT 1",
            (port, not_account),
        ).fetchone()
        return row[0] if row else None

    @staticmethod
    def _release_unused(conn: sqlite3.Connection, domain_id: str | None) -> None:
        if domain_id is not None:
            conn.execute(
                "DELETE FROM reserved_domains WHERE id = ? AND NOT EXISTS"
                " (SELECT 1 FROM cloud_endpoints WHERE domain_id = ?)",
                (domain_id, domain_id),
            )

    @staticmethod
    def _endpoint_params(ep: CloudEndpoint) -> tuple[object, ...]:
        return (
            ep.url,
            ep.proto,
            ep.host,
            ep.port,
            ep.binding,
            int(ep.pooling_enabled),
            ep.description,
            ep.metadata,
            ep.traffic_policy,
            format_timestamp(ep.updated_at),
            ep.domain_id,
        )

    def create_cloud_endpoint(self, endpoint: CloudEndpoint) -> CloudEndpoint:
        """Store a new cloud endpoint (see :meth:`Store.create_cloud_endpoint`)."""
        with self._tx() as conn:
            endpoint = endpoint.model_copy(update={"domain_id": self._claim_name(conn, endpoint)})
            try:
                conn.execute(
                    "INSERT INTO cloud_endpoints (url, proto, host, port, binding, pooling_enabled,"
                    " description, metadata, traffic_policy, updated_at, domain_id, id, account_id,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        *self._endpoint_params(endpoint),
                        endpoint.id,
                        endpoint.account_id,
                        format_timestamp(endpoint.created_at),
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise NotFoundError(f"no account {endpoint.account_id!r}") from exc
        return endpoint

    def get_cloud_endpoint(self, account_id: str, endpoint_id: str) -> CloudEndpoint | None:
        """Return the account's cloud endpoint with this id, or None."""
        rows = self._query(
            "SELECT * FROM cloud_endpoints WHERE id = ? AND account_id = ?",
            (endpoint_id, account_id),
        )
        return self._cloud_endpoint(rows[0]) if rows else None

    def list_cloud_endpoints(
        self, account_id: str, *, before_id: str | None = None, limit: int | None = None
    ) -> list[CloudEndpoint]:
        """Return the account's cloud endpoints newest first, ids below ``before_id`` only."""
        sql, params = self._page(
            "SELECT * FROM cloud_endpoints WHERE account_id = ?", [account_id], before_id, limit
        )
        return [self._cloud_endpoint(r) for r in self._query(sql, params)]

    def all_cloud_endpoints(self) -> list[CloudEndpoint]:
        """Return every account's cloud endpoints, oldest first."""
        rows = self._query(
            "SELECT e.* FROM cloud_endpoints e JOIN accounts a ON a.id = e.account_id"
            " WHERE a.disabled_at IS NULL ORDER BY e.id"
        )
        return [self._cloud_endpoint(r) for r in rows]

    def update_cloud_endpoint(self, endpoint: CloudEndpoint) -> CloudEndpoint:
        """Replace a stored cloud endpoint (see :meth:`Store.update_cloud_endpoint`)."""
        with self._tx() as conn:
            old = conn.execute(
                "SELECT domain_id FROM cloud_endpoints WHERE id = ? AND account_id = ?",
                (endpoint.id, endpoint.account_id),
            ).fetchone()
            if old is None:
                raise NotFoundError(f"no cloud endpoint {endpoint.id!r}")
            endpoint = endpoint.model_copy(update={"domain_id": self._claim_name(conn, endpoint)})
            conn.execute(
                "UPDATE cloud_endpoints SET url = ?, proto = ?, host = ?, port = ?, binding = ?,"
                " pooling_enabled = ?, description = ?, metadata = ?, traffic_policy = ?,"
                " updated_at = ?, domain_id = ? WHERE id = ? AND account_id = ?",
                (*self._endpoint_params(endpoint), endpoint.id, endpoint.account_id),
            )
            if old["domain_id"] != endpoint.domain_id:
                self._release_unused(conn, old["domain_id"])
        return endpoint

    def delete_cloud_endpoint(self, account_id: str, endpoint_id: str) -> bool:
        """Delete the account's cloud endpoint; False if there was none."""
        with self._tx() as conn:
            row = conn.execute(
                "SELECT domain_id FROM cloud_endpoints WHERE id = ? AND account_id = ?",
                (endpoint_id, account_id),
            ).fetchone()
            if row is None:
                return False
            conn.execute("DELETE FROM cloud_endpoints WHERE id = ?", (endpoint_id,))
            self._release_unused(conn, row["domain_id"])
            return True

    def public_host_owner(self, host: str) -> str | None:
        """Return the account that has reserved the public hostname ``host``, or None."""
        rows = self._query(
            "SELECT account_id FROM reserved_domains WHERE domain = ?", (host.lower().rstrip("."),)
        )
        return rows[0][0] if rows else None

    def public_tcp_port_owner(self, port: int) -> str | None:
        """Return the account whose public tcp cloud endpoint uses ``port``, or None."""
        with self._lock:
            return self._tcp_owner(self.conn, port)

    # -- reserved domains -------------------------------------------------------------

    def get_reserved_domain(self, account_id: str, domain_id: str) -> ReservedDomain | None:
        """Return the account's reserved domain with this id, or None."""
        rows = self._query(
            "SELECT * FROM reserved_domains WHERE id = ? AND account_id = ?", (domain_id, account_id)
        )
        return self._reserved_domain(rows[0]) if rows else None

    def list_reserved_domains(
        self, account_id: str, *, before_id: str | None = None, limit: int | None = None
    ) -> list[ReservedDomain]:
        """Return the account's reserved domains newest first, ids below ``before_id`` only."""
        sql, params = self._page(
            "SELECT * FROM reserved_domains WHERE account_id = ?", [account_id], before_id, limit
        )
        return [self._reserved_domain(r) for r in self._query(sql, params)]

    # -- agent ingresses --------------------------------------------------------------

    @staticmethod
    def _ingress_params(ing: AgentIngress) -> tuple[object, ...]:
        cert = ing.certificate
        return (
            ing.description,
            ing.metadata,
            ing.cert_policy.model_dump_json() if ing.cert_policy else None,
            cert.chain_pem if cert else None,
            cert.key_pem if cert else None,
            format_timestamp(cert.not_after) if cert else None,
            format_timestamp(cert.renews_at) if cert else None,
            ing.cert_job.model_dump_json() if ing.cert_job else None,
        )

    def create_agent_ingress(self, ingress: AgentIngress) -> AgentIngress:
        """Store a new agent ingress; ``ConflictError(kind="domain_taken")`` if the domain exists."""
        with self._tx() as conn:
            if conn.execute(
                "SELECT 1 FROM agent_ingresses WHERE domain = ?", (ingress.domain,)
            ).fetchone():
                raise ConflictError(
                    f'The agent ingress domain "{ingress.domain}" already exists, choose another'
                    " domain.",
                    kind="domain_taken",
                )
            try:
                conn.execute(
                    "INSERT INTO agent_ingresses (description, metadata, cert_policy, cert_chain,"
                    " cert_key, cert_not_after, cert_renews_at, cert_job, id, account_id, domain,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        *self._ingress_params(ingress),
                        ingress.id,
                        ingress.account_id,
                        ingress.domain,
                        format_timestamp(ingress.created_at),
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise NotFoundError(f"no account {ingress.account_id!r}") from exc
        return ingress

    def get_agent_ingress(self, account_id: str, ingress_id: str) -> AgentIngress | None:
        """Return the account's agent ingress with this id, or None."""
        rows = self._query(
            "SELECT * FROM agent_ingresses WHERE id = ? AND account_id = ?",
            (ingress_id, account_id),
        )
        return self._agent_ingress(rows[0]) if rows else None

    def list_agent_ingresses(
        self, account_id: str, *, before_id: str | None = None, limit: int | None = None
    ) -> list[AgentIngress]:
        """Return the account's agent ingresses newest first, ids below ``before_id`` only."""
        sql, params = self._page(
            "SELECT * FROM agent_ingresses WHERE account_id = ?", [account_id], before_id, limit
        )
        return [self._agent_ingress(r) for r in self._query(sql, params)]

    def find_agent_ingress(self, domain: str) -> AgentIngress | None:
        """Return the agent ingress (any account) registered for ``domain``, or None."""
        rows = self._query(
            "SELECT * FROM agent_ingresses WHERE domain = ?", (domain.lower().rstrip("."),)
        )
        return self._agent_ingress(rows[0]) if rows else None

    def all_agent_ingresses(self) -> list[AgentIngress]:
        """Return every account's agent ingresses, oldest first."""
        return [self._agent_ingress(r) for r in self._query("SELECT * FROM agent_ingresses ORDER BY id")]

    def update_agent_ingress(self, ingress: AgentIngress) -> AgentIngress:
        """Replace the mutable fields of a stored agent ingress; NotFoundError if it is gone."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE agent_ingresses SET description = ?, metadata = ?, cert_policy = ?,"
                " cert_chain = ?, cert_key = ?, cert_not_after = ?, cert_renews_at = ?,"
                " cert_job = ? WHERE id = ? AND account_id = ?",
                (*self._ingress_params(ingress), ingress.id, ingress.account_id),
            )
            if cur.rowcount == 0:
                raise NotFoundError(f"no agent ingress {ingress.id!r}")
        return ingress

    def delete_agent_ingress(self, account_id: str, ingress_id: str) -> bool:
        """Delete the account's agent ingress; False if there was none."""
        with self._tx() as conn:
            cur = conn.execute(
                "DELETE FROM agent_ingresses WHERE id = ? AND account_id = ?",
                (ingress_id, account_id),
            )
            return cur.rowcount > 0

    # -- ngrok agents' re-bind URLs -----------------------------------------------------

    def remember_rebind_url(self, account_id: str, tunnel_id: str, url: str, limit: int) -> None:
        """Remember ``url`` for the account's tunnel id, newest last; keep ``limit`` rows."""
        with self._tx() as conn:
            conn.execute(
                "DELETE FROM ngrok_rebind_urls WHERE account_id = ? AND tunnel_id = ?",
                (account_id, tunnel_id),
            )
            conn.execute(
                "INSERT INTO ngrok_rebind_urls (account_id, tunnel_id, url) VALUES (?, ?, ?)",
                (account_id, tunnel_id, url),
            )
            (n,) = conn.execute("SELECT COUNT(*) FROM ngrok_rebind_urls").fetchone()
            if n > limit:
                conn.execute(
                    "DELETE FROM ngrok_rebind_urls WHERE seq IN"
                    " (SELECT seq FROM ngrok_rebind_urls ORDER BY seq LIMIT ?)",
                    (n - limit,),
                )

    def rebind_url(self, account_id: str, tunnel_id: str) -> str | None:
        """The URL remembered for the account's tunnel id, or None."""
        rows = self._query(
            "SELECT url FROM ngrok_rebind_urls WHERE account_id = ? AND tunnel_id = ?",
            (account_id, tunnel_id),
        )
        return rows[0]["url"] if rows else None

    def forget_rebind_url(self, account_id: str, tunnel_id: str) -> None:
        """Forget the URL of the account's tunnel id (idempotent)."""
        with self._tx() as conn:
            conn.execute(
                "DELETE FROM ngrok_rebind_urls WHERE account_id = ? AND tunnel_id = ?",
                (account_id, tunnel_id),
            )

    # -- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
