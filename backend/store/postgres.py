"""PostgreSQL implementation of the edge's store (cluster mode: several edges, one state).

``burrow serve --store postgresql://user@host/db`` (needs ``pip install 'burrow[cluster]'``
for asyncpg).  Every method of :class:`~backend.store.base.Store` is here as a coroutine
with the same meaning as in SQLite (the same contract tests run against both), plus what
several edges need to agree on:

- **Migrations** are versioned scripts (:data:`MIGRATIONS`) applied at start inside one
  transaction under a session advisory lock, so edges starting together migrate once.
  NODE's tables (``edges``, ``sessions``, ``agent_endpoints``) have their own migration
  module (``backend.cluster.schema``) applied after these.
- **Live name claims** (``claims``, one row per name and holder): taken in one
  transaction under ``pg_advisory_xact_lock(hashtext(name))``, after checking the
  other holders and the durable reservations, so two edges never give one name to two
  accounts (:meth:`claim_name`).  Cloud endpoint writes take the same lock on their
  name.  A tcp port is the name ``tcp:<port>``: its owner is unique across edges the
  same way (the lock plus the check is the unique constraint; a plain unique index
  could not let pooled endpoints of one account share a port).
- **The change feed**: each write of a cloud endpoint, account or tcp port notifies
  ``burrow_changes`` with ``<kind>:<key>`` inside its transaction (sent at commit).
- **The API rate limit**: one upsert per request on an ``UNLOGGED`` table
  (:meth:`rate_take`): the same token bucket as the in-memory one, global.
- The cluster CA is the cluster runtime's (``backend.cluster.ca``, table ``cluster_ca``).

Secrets are stored hashed exactly as in SQLite.  A server that cannot be reached makes
every method raise :class:`~backend.store.base.StoreUnavailable` (nothing is written);
other database errors are :class:`~backend.store.base.StoreError`.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from backend.ids import new_id
from backend.ownership import Holder, NameConflict, check_sharing, name_of, other_account
from backend.store.aio import AsyncStore
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
    StoreError,
    StoreUnavailable,
    hash_token,
    utcnow,
)

__all__ = ["CHANNEL", "MIGRATIONS", "PostgresStore"]

#: the change feed's channel (payload ``<kind>:<key>``, never data)
CHANNEL = "burrow_changes"
#: advisory lock keys (session locks; pg_advisory_xact_lock(hashtext(name)) for names)
MIGRATION_LOCK = 0x62757272_6F770001  # "burrow" + 1
#: seconds a query may take before the store is considered unreachable
COMMAND_TIMEOUT = 5.0
#: seconds to wait for a free pooled connection (or a new one)
ACQUIRE_TIMEOUT = 5.0

#: Version N is ``MIGRATIONS[N - 1]``. Append only, never edit.
MIGRATIONS: list[str] = [
    # 1: cloud state (as SQLite's 1-4), live claims, the API rate limit
    """
    CREATE TABLE accounts (
        id          text PRIMARY KEY,
        name        text NOT NULL,
        is_default  boolean NOT NULL DEFAULT false,
        created_at  timestamptz NOT NULL,
        disabled_at timestamptz
    );
    CREATE UNIQUE INDEX accounts_one_default ON accounts (is_default) WHERE is_default;

    CREATE TABLE credentials (
        id          text PRIMARY KEY,
        account_id  text NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
        description text NOT NULL DEFAULT '',
        metadata    text NOT NULL DEFAULT '',
        acl         text NOT NULL DEFAULT '[]',
        created_at  timestamptz NOT NULL,
        token_hash  text NOT NULL UNIQUE
    );
    CREATE INDEX credentials_account ON credentials (account_id, id);

    CREATE TABLE api_keys (
        id          text PRIMARY KEY,
        account_id  text NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
        description text NOT NULL DEFAULT '',
        metadata    text NOT NULL DEFAULT '',
        created_at  timestamptz NOT NULL,
        token_hash  text NOT NULL UNIQUE
    );
    CREATE INDEX api_keys_account ON api_keys (account_id, id);

    CREATE TABLE reserved_domains (
        id          text PRIMARY KEY,
        account_id  text NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
        domain      text NOT NULL UNIQUE,
        created_at  timestamptz NOT NULL
    );
    CREATE INDEX reserved_domains_account ON reserved_domains (account_id, id);

    CREATE TABLE cloud_endpoints (
        id              text PRIMARY KEY,
        account_id      text NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
        url             text NOT NULL,
        proto           text NOT NULL,
        host            text NOT NULL,
        port            integer NOT NULL,
        binding         text NOT NULL,
        pooling_enabled boolean NOT NULL DEFAULT false,
        description     text NOT NULL DEFAULT '',
        metadata        text NOT NULL DEFAULT '',
        traffic_policy  text NOT NULL DEFAULT '',
        created_at      timestamptz NOT NULL,
        updated_at      timestamptz NOT NULL,
        domain_id       text REFERENCES reserved_domains (id)
    );
    CREATE INDEX cloud_endpoints_account ON cloud_endpoints (account_id, id);
    CREATE UNIQUE INDEX cloud_endpoints_url ON cloud_endpoints (account_id, binding, url);
    CREATE INDEX cloud_endpoints_host ON cloud_endpoints (binding, host);
    CREATE INDEX cloud_endpoints_port ON cloud_endpoints (binding, proto, port);

    CREATE TABLE agent_ingresses (
        id             text PRIMARY KEY,
        account_id     text NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
        domain         text NOT NULL UNIQUE,
        description    text NOT NULL DEFAULT '',
        metadata       text NOT NULL DEFAULT '',
        created_at     timestamptz NOT NULL,
        cert_policy    text,
        cert_chain     text,
        cert_key       text,
        cert_not_after timestamptz,
        cert_renews_at timestamptz,
        cert_job       text
    );
    CREATE INDEX agent_ingresses_account ON agent_ingresses (account_id, id);

    CREATE TABLE ngrok_rebind_urls (
        seq         bigserial PRIMARY KEY,
        account_id  text NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
        tunnel_id   text NOT NULL,
        url         text NOT NULL,
        UNIQUE (account_id, tunnel_id)
    );

    CREATE TABLE claims (
        name        text NOT NULL,
        holder_id   text NOT NULL,
        account_id  text NOT NULL,
        proto       text NOT NULL,
        pooling     boolean NOT NULL,
        client_id   text,
        node_id     text,
        created_at  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (name, holder_id)
    );
    CREATE INDEX claims_holder ON claims (holder_id);
    CREATE INDEX claims_node ON claims (node_id);

    CREATE UNLOGGED TABLE api_rate (
        key     text PRIMARY KEY,
        tokens  double precision NOT NULL,
        at      timestamptz NOT NULL,
        ok      boolean NOT NULL
    );
    """,
]


def _load_asyncpg():
    try:
        import asyncpg
    except ImportError:
        raise StoreError(
            "a PostgreSQL store needs asyncpg: pip install 'burrow[cluster]'"
        ) from None
    return asyncpg


def _unavailable_types(asyncpg) -> tuple[type[BaseException], ...]:
    return (
        OSError,
        asyncio.TimeoutError,
        TimeoutError,
        asyncpg.PostgresConnectionError,
        asyncpg.CannotConnectNowError,
        asyncpg.TooManyConnectionsError,
        asyncpg.AdminShutdownError,
        asyncpg.CrashShutdownError,
    )


def _where(dsn: str) -> str:
    """The host part of a DSN, for messages (never the password)."""
    rest = dsn.partition("://")[2]
    return rest.rpartition("@")[2] or "localhost"


def _guard(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Translate driver failures: unreachable -> StoreUnavailable, others -> StoreError."""

    @functools.wraps(fn)
    async def wrapped(self: PostgresStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(self, *args, **kwargs)
        except (StoreError, NameConflict):
            raise
        except self._asyncpg.InterfaceError as exc:
            if "closed" not in str(exc):  # a misuse, not the network
                raise StoreError(f"PostgreSQL client error: {exc}") from None
            raise StoreUnavailable(f"PostgreSQL at {self.where} is unavailable: {exc}") from None
        except self._unavailable as exc:
            raise StoreUnavailable(
                f"PostgreSQL at {self.where} is unavailable: {type(exc).__name__}: {exc}"
            ) from None
        except self._asyncpg.PostgresError as exc:
            raise StoreError(f"PostgreSQL error: {type(exc).__name__}: {exc}") from None

    return wrapped


def _notify(kind: str, key: object) -> tuple[str, str, str]:
    """``conn.execute(*_notify(kind, key))``: a change-feed message, sent at commit."""
    return "SELECT pg_notify($1, $2)", CHANNEL, f"{kind}:{key}"


class PostgresStore(AsyncStore):
    """Cloud state in PostgreSQL, shared by every edge of a cluster.

    ``dsn`` and ``pool`` (an asyncpg pool) are public: the cluster runtime reuses them.
    """

    shared = True

    def __init__(self, dsn: str, pool: Any, asyncpg: Any) -> None:
        self.dsn = dsn
        self.pool = pool
        self.where = _where(dsn)
        self._asyncpg = asyncpg
        self._unavailable = _unavailable_types(asyncpg)

    # -- lifecycle --------------------------------------------------------------------

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 1, max_size: int = 10) -> PostgresStore:
        """Open a pool to ``dsn`` and bring the schema up to date (one line on failure)."""
        asyncpg = _load_asyncpg()
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                command_timeout=COMMAND_TIMEOUT,
                timeout=ACQUIRE_TIMEOUT,
                server_settings={"application_name": "burrow"},
            )
        except _unavailable_types(asyncpg) as exc:
            raise StoreUnavailable(f"cannot reach PostgreSQL at {_where(dsn)}: {exc}") from None
        except (asyncpg.PostgresError, ValueError) as exc:
            raise StoreError(f"cannot open PostgreSQL at {_where(dsn)}: {exc}") from None
        store = cls(dsn, pool, asyncpg)
        try:
            await store._migrate()
        except BaseException:
            await pool.close()
            raise
        return store

    async def aclose(self) -> None:
        try:
            await asyncio.wait_for(self.pool.close(), 5)
        except (TimeoutError, *self._unavailable):
            self.pool.terminate()

    @asynccontextmanager
    async def _tx(self):
        async with self.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
            yield conn

    @_guard
    async def _migrate(self) -> None:
        async with self.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
            try:
                async with conn.transaction():
                    await conn.execute(
                        "CREATE TABLE IF NOT EXISTS schema_migrations ("
                        " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                    )
                    current = await conn.fetchval(
                        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"
                    )
                    if current > len(MIGRATIONS):
                        raise StoreError(
                            f"database schema version {current} is newer than this burrow "
                            f"({len(MIGRATIONS)}); upgrade burrow"
                        )
                    for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                        await conn.execute(script)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version) VALUES ($1)", version
                        )
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)

    @_guard
    async def schema_version(self) -> int:
        return int(await self.pool.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))

    # -- row mapping ------------------------------------------------------------------

    @staticmethod
    def _account(r: Any) -> Account:
        return Account(id=r["id"], name=r["name"], created_at=r["created_at"], disabled_at=r["disabled_at"])

    @staticmethod
    def _credential(r: Any) -> Credential:
        return Credential(
            id=r["id"],
            account_id=r["account_id"],
            description=r["description"],
            metadata=r["metadata"],
            acl=json.loads(r["acl"]),
            created_at=r["created_at"],
            token_hash=r["token_hash"],
        )

    @staticmethod
    def _api_key(r: Any) -> APIKey:
        return APIKey(
            id=r["id"],
            account_id=r["account_id"],
            description=r["description"],
            metadata=r["metadata"],
            created_at=r["created_at"],
            token_hash=r["token_hash"],
        )

    @staticmethod
    def _cloud_endpoint(r: Any) -> CloudEndpoint:
        return CloudEndpoint(
            id=r["id"],
            account_id=r["account_id"],
            url=r["url"],
            proto=r["proto"],
            host=r["host"],
            port=r["port"],
            binding=r["binding"],
            pooling_enabled=r["pooling_enabled"],
            description=r["description"],
            metadata=r["metadata"],
            traffic_policy=r["traffic_policy"],
            created_at=r["created_at"],
            updated_at=r["updated_at"],
            domain_id=r["domain_id"],
        )

    @staticmethod
    def _reserved_domain(r: Any) -> ReservedDomain:
        return ReservedDomain(id=r["id"], account_id=r["account_id"], domain=r["domain"], created_at=r["created_at"])

    @staticmethod
    def _agent_ingress(r: Any) -> AgentIngress:
        cert = None
        if r["cert_chain"] is not None:
            cert = IngressCertificate(
                chain_pem=r["cert_chain"],
                key_pem=r["cert_key"],
                not_after=r["cert_not_after"],
                renews_at=r["cert_renews_at"],
            )
        return AgentIngress(
            id=r["id"],
            account_id=r["account_id"],
            domain=r["domain"],
            description=r["description"],
            metadata=r["metadata"],
            created_at=r["created_at"],
            cert_policy=CertPolicy.model_validate_json(r["cert_policy"]) if r["cert_policy"] else None,
            certificate=cert,
            cert_job=CertJob.model_validate_json(r["cert_job"]) if r["cert_job"] else None,
        )

    @staticmethod
    def _page(sql: str, params: list[Any], before_id: str | None, limit: int | None) -> tuple[str, list[Any]]:
        if before_id is not None:
            params.append(before_id)
            sql += f" AND id < ${len(params)}"
        sql += " ORDER BY id DESC"
        if limit is not None:
            params.append(limit)
            sql += f" LIMIT ${len(params)}"
        return sql, params

    # -- accounts ---------------------------------------------------------------------

    @_guard
    async def default_account(self) -> Account:
        row = await self.pool.fetchrow("SELECT * FROM accounts WHERE is_default")
        if row is None:
            async with self._tx() as conn:
                await conn.execute(
                    "INSERT INTO accounts (id, name, is_default, created_at) VALUES ($1, 'default', true, $2)"
                    " ON CONFLICT DO NOTHING",
                    new_id(ACCOUNT_PREFIX),
                    utcnow(),
                )
                row = await conn.fetchrow("SELECT * FROM accounts WHERE is_default")
                await conn.execute(*_notify("account", row["id"]))
        return self._account(row)

    @_guard
    async def create_account(self, name: str) -> Account:
        account = Account(id=new_id(ACCOUNT_PREFIX), name=name, created_at=utcnow())
        async with self._tx() as conn:
            await conn.execute(
                "INSERT INTO accounts (id, name, created_at) VALUES ($1, $2, $3)",
                account.id,
                account.name,
                account.created_at,
            )
            await conn.execute(*_notify("account", account.id))
        return account

    @_guard
    async def get_account(self, account_id: str) -> Account | None:
        row = await self.pool.fetchrow("SELECT * FROM accounts WHERE id = $1", account_id)
        return self._account(row) if row else None

    @_guard
    async def list_accounts(self) -> list[Account]:
        return [self._account(r) for r in await self.pool.fetch("SELECT * FROM accounts ORDER BY id")]

    @_guard
    async def set_account_disabled(self, account_id: str, disabled: bool) -> Account | None:
        async with self._tx() as conn:
            if disabled:
                row = await conn.fetchrow(
                    "UPDATE accounts SET disabled_at = COALESCE(disabled_at, $1) WHERE id = $2 RETURNING *",
                    utcnow(),
                    account_id,
                )
            else:
                row = await conn.fetchrow(
                    "UPDATE accounts SET disabled_at = NULL WHERE id = $1 RETURNING *", account_id
                )
            if row is not None:
                await conn.execute(*_notify("account", account_id))
        return self._account(row) if row else None

    @_guard
    async def disabled_account_ids(self) -> set[str]:
        rows = await self.pool.fetch("SELECT id FROM accounts WHERE disabled_at IS NOT NULL")
        return {r["id"] for r in rows}

    @_guard
    async def disabled_owner(self, token: str) -> Account | None:
        h = hash_token(token)
        row = await self.pool.fetchrow(
            "SELECT a.* FROM accounts a WHERE a.disabled_at IS NOT NULL AND a.id IN ("
            " SELECT account_id FROM credentials WHERE token_hash = $1"
            " UNION SELECT account_id FROM api_keys WHERE token_hash = $1)",
            h,
        )
        return self._account(row) if row else None

    # -- secrets (authtokens, API keys) ---------------------------------------------

    async def _add_secret(self, table: str, values: dict, made, from_row, what: str):
        """Insert a hashed secret's row (``values``, keyed by column); the same token again
        returns the existing row, another account's gets :class:`ConflictError`."""
        cols = ", ".join(values)
        params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        async with self._tx() as conn:
            try:
                row = await conn.fetchrow(
                    f"INSERT INTO {table} ({cols}) VALUES ({params})"
                    " ON CONFLICT (token_hash) DO NOTHING RETURNING id",
                    *values.values(),
                )
            except self._asyncpg.ForeignKeyViolationError:
                raise NotFoundError(f"no account {values['account_id']!r}") from None
            if row is not None:
                return made
            existing = from_row(
                await conn.fetchrow(f"SELECT * FROM {table} WHERE token_hash = $1", values["token_hash"])
            )
        if existing.account_id != values["account_id"]:
            raise ConflictError(f"this {what} is already registered to another account")
        return existing

    # -- authtokens -------------------------------------------------------------------

    @_guard
    async def add_authtoken(
        self,
        account_id: str,
        token: str,
        description: str = "",
        *,
        metadata: str = "",
        acl: list[str] | None = None,
    ) -> Credential:
        token_hash = hash_token(token)
        cred = Credential(
            id=new_id(CREDENTIAL_PREFIX),
            account_id=account_id,
            description=description,
            metadata=metadata,
            acl=list(acl or []),
            created_at=utcnow(),
            token_hash=token_hash,
        )
        values = {
            "id": cred.id,
            "account_id": account_id,
            "description": description,
            "metadata": metadata,
            "acl": json.dumps(cred.acl),
            "created_at": cred.created_at,
            "token_hash": token_hash,
        }
        return await self._add_secret("credentials", values, cred, self._credential, "authtoken")

    @_guard
    async def find_authtoken(self, token: str) -> Credential | None:
        row = await self.pool.fetchrow(
            "SELECT c.* FROM credentials c JOIN accounts a ON a.id = c.account_id"
            " WHERE c.token_hash = $1 AND a.disabled_at IS NULL",
            hash_token(token),
        )
        return self._credential(row) if row else None

    @_guard
    async def get_authtoken(self, credential_id: str) -> Credential | None:
        row = await self.pool.fetchrow("SELECT * FROM credentials WHERE id = $1", credential_id)
        return self._credential(row) if row else None

    @_guard
    async def list_authtokens(self, account_id: str) -> list[Credential]:
        rows = await self.pool.fetch("SELECT * FROM credentials WHERE account_id = $1 ORDER BY id", account_id)
        return [self._credential(r) for r in rows]

    @_guard
    async def delete_authtoken(self, credential_id: str) -> bool:
        status = await self.pool.execute("DELETE FROM credentials WHERE id = $1", credential_id)
        return status != "DELETE 0"

    @_guard
    async def update_authtoken(
        self,
        credential_id: str,
        *,
        description: str | None = None,
        metadata: str | None = None,
        acl: list[str] | None = None,
    ) -> Credential | None:
        row = await self.pool.fetchrow(
            "UPDATE credentials SET description = COALESCE($1, description),"
            " metadata = COALESCE($2, metadata), acl = COALESCE($3, acl) WHERE id = $4 RETURNING *",
            description,
            metadata,
            None if acl is None else json.dumps(acl),
            credential_id,
        )
        return self._credential(row) if row else None

    # -- API keys ---------------------------------------------------------------------

    @_guard
    async def add_api_key(
        self, account_id: str, token: str, description: str = "", *, metadata: str = ""
    ) -> APIKey:
        token_hash = hash_token(token)
        key = APIKey(
            id=new_id(API_KEY_PREFIX),
            account_id=account_id,
            description=description,
            metadata=metadata,
            created_at=utcnow(),
            token_hash=token_hash,
        )
        values = {
            "id": key.id,
            "account_id": account_id,
            "description": description,
            "metadata": metadata,
            "created_at": key.created_at,
            "token_hash": token_hash,
        }
        return await self._add_secret("api_keys", values, key, self._api_key, "API key")

    @_guard
    async def find_api_key(self, token: str) -> APIKey | None:
        row = await self.pool.fetchrow(
            "SELECT k.* FROM api_keys k JOIN accounts a ON a.id = k.account_id"
            " WHERE k.token_hash = $1 AND a.disabled_at IS NULL",
            hash_token(token),
        )
        return self._api_key(row) if row else None

    @_guard
    async def get_api_key(self, api_key_id: str) -> APIKey | None:
        row = await self.pool.fetchrow("SELECT * FROM api_keys WHERE id = $1", api_key_id)
        return self._api_key(row) if row else None

    @_guard
    async def list_api_keys(self, account_id: str) -> list[APIKey]:
        rows = await self.pool.fetch("SELECT * FROM api_keys WHERE account_id = $1 ORDER BY id", account_id)
        return [self._api_key(r) for r in rows]

    @_guard
    async def delete_api_key(self, api_key_id: str) -> bool:
        status = await self.pool.execute("DELETE FROM api_keys WHERE id = $1", api_key_id)
        return status != "DELETE 0"

    @_guard
    async def update_api_key(
        self, api_key_id: str, *, description: str | None = None, metadata: str | None = None
    ) -> APIKey | None:
        row = await self.pool.fetchrow(
            "UPDATE api_keys SET description = COALESCE($1, description),"
            " metadata = COALESCE($2, metadata) WHERE id = $3 RETURNING *",
            description,
            metadata,
            api_key_id,
        )
        return self._api_key(row) if row else None

    # -- cloud endpoints --------------------------------------------------------------

    async def _claim_endpoint_name(self, conn: Any, ep: CloudEndpoint) -> str | None:
        """The rules of SQLite's ``_claim_name``, under the name's advisory lock, and
        against the live claims of every edge; return the hostname reservation's id."""
        if ep.binding == "public":
            name = name_of(ep.binding, ep.account_id, ep.proto, ep.host, ep.port)
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", name)
        same_url = await conn.fetchval(
            "SELECT 1 FROM cloud_endpoints WHERE account_id = $1 AND binding = $2 AND url = $3 AND id != $4",
            ep.account_id,
            ep.binding,
            ep.url,
            ep.id,
        )
        if same_url:
            raise ConflictError(f"This account already has a cloud endpoint on {ep.url}.", kind="url_taken")
        if ep.binding != "public":
            return None
        taken = await conn.fetchval(
            "SELECT 1 FROM claims WHERE name = $1 AND account_id != $2 LIMIT 1", name, ep.account_id
        )
        if ep.proto == "tcp":
            if taken or await self._tcp_owner(conn, ep.port, ep.account_id):
                raise ConflictError(f"tcp port {ep.port} is already used by another account.", kind="host_taken")
            return None
        if taken:
            raise ConflictError(f"The hostname {ep.host} is reserved by another account.", kind="host_taken")
        row = await conn.fetchrow("SELECT id, account_id FROM reserved_domains WHERE domain = $1", ep.host)
        if row is not None:
            if row["account_id"] != ep.account_id:
                raise ConflictError(f"The hostname {ep.host} is reserved by another account.", kind="host_taken")
            return row["id"]
        domain_id = new_id(RESERVED_DOMAIN_PREFIX)
        try:
            await conn.execute(
                "INSERT INTO reserved_domains (id, account_id, domain, created_at) VALUES ($1, $2, $3, $4)",
                domain_id,
                ep.account_id,
                ep.host,
                utcnow(),
            )
        except self._asyncpg.ForeignKeyViolationError:
            raise NotFoundError(f"no account {ep.account_id!r}") from None
        return domain_id

    @staticmethod
    async def _tcp_owner(conn: Any, port: int, not_account: str = "") -> str | None:
        return await conn.fetchval(
            "SELECT account_id FROM cloud_endpoints WHERE binding = 'public' AND proto = 'tcp'"
            " AND port = $1 AND account_id != $2 LIMIT 1",
            port,
            not_account,
        )

    @staticmethod
    async def _release_unused(conn: Any, domain_id: str | None) -> None:
        if domain_id is not None:
            await conn.execute(
                "DELETE FROM reserved_domains WHERE id = $1 AND NOT EXISTS"
                " (SELECT 1 FROM cloud_endpoints WHERE domain_id = $1)",
                domain_id,
            )

    @staticmethod
    async def _notify_endpoint(conn: Any, ep: CloudEndpoint, old: Any = None) -> None:
        await conn.execute(*_notify("cloud_endpoint", ep.id))
        ports = {ep.port} if ep.binding == "public" and ep.proto == "tcp" else set()
        if old is not None and old["binding"] == "public" and old["proto"] == "tcp":
            ports.add(old["port"])
        for port in sorted(ports):
            await conn.execute(*_notify("tcp_port", port))

    @_guard
    async def create_cloud_endpoint(self, endpoint: CloudEndpoint) -> CloudEndpoint:
        async with self._tx() as conn:
            endpoint = endpoint.model_copy(update={"domain_id": await self._claim_endpoint_name(conn, endpoint)})
            e = endpoint
            try:
                await conn.execute(
                    "INSERT INTO cloud_endpoints (id, account_id, url, proto, host, port, binding,"
                    " pooling_enabled, description, metadata, traffic_policy, created_at, updated_at,"
                    " domain_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                    e.id,
                    e.account_id,
                    e.url,
                    e.proto,
                    e.host,
                    e.port,
                    e.binding,
                    e.pooling_enabled,
                    e.description,
                    e.metadata,
                    e.traffic_policy,
                    e.created_at,
                    e.updated_at,
                    e.domain_id,
                )
            except self._asyncpg.ForeignKeyViolationError:
                raise NotFoundError(f"no account {e.account_id!r}") from None
            except self._asyncpg.UniqueViolationError:
                raise ConflictError(f"This account already has a cloud endpoint on {e.url}.", kind="url_taken") from None
            await self._notify_endpoint(conn, e)
        return endpoint

    @_guard
    async def get_cloud_endpoint(self, account_id: str, endpoint_id: str) -> CloudEndpoint | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM cloud_endpoints WHERE id = $1 AND account_id = $2", endpoint_id, account_id
        )
        return self._cloud_endpoint(row) if row else None

    @_guard
    async def find_cloud_endpoint(self, endpoint_id: str) -> CloudEndpoint | None:
        """Any account's cloud endpoint with this id (the change feed re-reads by id)."""
        row = await self.pool.fetchrow(
            "SELECT e.* FROM cloud_endpoints e JOIN accounts a ON a.id = e.account_id"
            " WHERE e.id = $1 AND a.disabled_at IS NULL",
            endpoint_id,
        )
        return self._cloud_endpoint(row) if row else None

    @_guard
    async def list_cloud_endpoints(
        self, account_id: str, *, before_id: str | None = None, limit: int | None = None
    ) -> list[CloudEndpoint]:
        sql, params = self._page("SELECT * FROM cloud_endpoints WHERE account_id = $1", [account_id], before_id, limit)
        return [self._cloud_endpoint(r) for r in await self.pool.fetch(sql, *params)]

    @_guard
    async def all_cloud_endpoints(self) -> list[CloudEndpoint]:
        rows = await self.pool.fetch(
            "SELECT e.* FROM cloud_endpoints e JOIN accounts a ON a.id = e.account_id"
            " WHERE a.disabled_at IS NULL ORDER BY e.id"
        )
        return [self._cloud_endpoint(r) for r in rows]

    @_guard
    async def update_cloud_endpoint(self, endpoint: CloudEndpoint) -> CloudEndpoint:
        async with self._tx() as conn:
            old = await conn.fetchrow(
                "SELECT * FROM cloud_endpoints WHERE id = $1 AND account_id = $2 FOR UPDATE",
                endpoint.id,
                endpoint.account_id,
            )
            if old is None:
                raise NotFoundError(f"no cloud endpoint {endpoint.id!r}")
            endpoint = endpoint.model_copy(update={"domain_id": await self._claim_endpoint_name(conn, endpoint)})
            e = endpoint
            try:
                await conn.execute(
                    "UPDATE cloud_endpoints SET url = $1, proto = $2, host = $3, port = $4, binding = $5,"
                    " pooling_enabled = $6, description = $7, metadata = $8, traffic_policy = $9,"
                    " updated_at = $10, domain_id = $11 WHERE id = $12 AND account_id = $13",
                    e.url,
                    e.proto,
                    e.host,
                    e.port,
                    e.binding,
                    e.pooling_enabled,
                    e.description,
                    e.metadata,
                    e.traffic_policy,
                    e.updated_at,
                    e.domain_id,
                    e.id,
                    e.account_id,
                )
            except self._asyncpg.UniqueViolationError:
                raise ConflictError(f"This account already has a cloud endpoint on {e.url}.", kind="url_taken") from None
            if old["domain_id"] != e.domain_id:
                await self._release_unused(conn, old["domain_id"])
            await self._notify_endpoint(conn, e, old)
        return endpoint

    @_guard
    async def delete_cloud_endpoint(self, account_id: str, endpoint_id: str) -> bool:
        async with self._tx() as conn:
            old = await conn.fetchrow(
                "DELETE FROM cloud_endpoints WHERE id = $1 AND account_id = $2 RETURNING *",
                endpoint_id,
                account_id,
            )
            if old is None:
                return False
            await self._release_unused(conn, old["domain_id"])
            await self._notify_endpoint(conn, self._cloud_endpoint(old))
            return True

    @_guard
    async def public_host_owner(self, host: str) -> str | None:
        return await self.pool.fetchval(
            "SELECT account_id FROM reserved_domains WHERE domain = $1", host.lower().rstrip(".")
        )

    @_guard
    async def public_tcp_port_owner(self, port: int) -> str | None:
        async with self.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
            return await self._tcp_owner(conn, port)

    # -- reserved domains -------------------------------------------------------------

    @_guard
    async def get_reserved_domain(self, account_id: str, domain_id: str) -> ReservedDomain | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM reserved_domains WHERE id = $1 AND account_id = $2", domain_id, account_id
        )
        return self._reserved_domain(row) if row else None

    @_guard
    async def list_reserved_domains(
        self, account_id: str, *, before_id: str | None = None, limit: int | None = None
    ) -> list[ReservedDomain]:
        sql, params = self._page("SELECT * FROM reserved_domains WHERE account_id = $1", [account_id], before_id, limit)
        return [self._reserved_domain(r) for r in await self.pool.fetch(sql, *params)]

    # -- agent ingresses --------------------------------------------------------------

    @staticmethod
    def _ingress_params(ing: AgentIngress) -> tuple[Any, ...]:
        cert = ing.certificate
        return (
            ing.description,
            ing.metadata,
            ing.cert_policy.model_dump_json() if ing.cert_policy else None,
            cert.chain_pem if cert else None,
            cert.key_pem if cert else None,
            cert.not_after if cert else None,
            cert.renews_at if cert else None,
            ing.cert_job.model_dump_json() if ing.cert_job else None,
        )

    @_guard
    async def create_agent_ingress(self, ingress: AgentIngress) -> AgentIngress:
        try:
            await self.pool.execute(
                "INSERT INTO agent_ingresses (description, metadata, cert_policy, cert_chain, cert_key,"
                " cert_not_after, cert_renews_at, cert_job, id, account_id, domain, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                *self._ingress_params(ingress),
                ingress.id,
                ingress.account_id,
                ingress.domain,
                ingress.created_at,
            )
        except self._asyncpg.UniqueViolationError:
            raise ConflictError(
                f'The agent ingress domain "{ingress.domain}" already exists, choose another domain.',
                kind="domain_taken",
            ) from None
        except self._asyncpg.ForeignKeyViolationError:
            raise NotFoundError(f"no account {ingress.account_id!r}") from None
        return ingress

    @_guard
    async def get_agent_ingress(self, account_id: str, ingress_id: str) -> AgentIngress | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM agent_ingresses WHERE id = $1 AND account_id = $2", ingress_id, account_id
        )
        return self._agent_ingress(row) if row else None

    @_guard
    async def list_agent_ingresses(
        self, account_id: str, *, before_id: str | None = None, limit: int | None = None
    ) -> list[AgentIngress]:
        sql, params = self._page("SELECT * FROM agent_ingresses WHERE account_id = $1", [account_id], before_id, limit)
        return [self._agent_ingress(r) for r in await self.pool.fetch(sql, *params)]

    @_guard
    async def find_agent_ingress(self, domain: str) -> AgentIngress | None:
        row = await self.pool.fetchrow("SELECT * FROM agent_ingresses WHERE domain = $1", domain.lower().rstrip("."))
        return self._agent_ingress(row) if row else None

    @_guard
    async def all_agent_ingresses(self) -> list[AgentIngress]:
        return [self._agent_ingress(r) for r in await self.pool.fetch("SELECT * FROM agent_ingresses ORDER BY id")]

    @_guard
    async def update_agent_ingress(self, ingress: AgentIngress) -> AgentIngress:
        status = await self.pool.execute(
            "UPDATE agent_ingresses SET description = $1, metadata = $2, cert_policy = $3, cert_chain = $4,"
            " cert_key = $5, cert_not_after = $6, cert_renews_at = $7, cert_job = $8"
            " WHERE id = $9 AND account_id = $10",
            *self._ingress_params(ingress),
            ingress.id,
            ingress.account_id,
        )
        if status == "UPDATE 0":
            raise NotFoundError(f"no agent ingress {ingress.id!r}")
        return ingress

    @_guard
    async def delete_agent_ingress(self, account_id: str, ingress_id: str) -> bool:
        status = await self.pool.execute(
            "DELETE FROM agent_ingresses WHERE id = $1 AND account_id = $2", ingress_id, account_id
        )
        return status != "DELETE 0"

    # -- ngrok agents' re-bind URLs -----------------------------------------------------

    @_guard
    async def remember_rebind_url(self, account_id: str, tunnel_id: str, url: str, limit: int) -> None:
        async with self._tx() as conn:
            await conn.execute(
                "DELETE FROM ngrok_rebind_urls WHERE account_id = $1 AND tunnel_id = $2", account_id, tunnel_id
            )
            await conn.execute(
                "INSERT INTO ngrok_rebind_urls (account_id, tunnel_id, url) VALUES ($1, $2, $3)",
                account_id,
                tunnel_id,
                url,
            )
            n = await conn.fetchval("SELECT COUNT(*) FROM ngrok_rebind_urls")
            if n > limit:
                await conn.execute(
                    "DELETE FROM ngrok_rebind_urls WHERE seq IN"
                    " (SELECT seq FROM ngrok_rebind_urls ORDER BY seq LIMIT $1)",
                    n - limit,
                )

    @_guard
    async def rebind_url(self, account_id: str, tunnel_id: str) -> str | None:
        return await self.pool.fetchval(
            "SELECT url FROM ngrok_rebind_urls WHERE account_id = $1 AND tunnel_id = $2", account_id, tunnel_id
        )

    @_guard
    async def forget_rebind_url(self, account_id: str, tunnel_id: str) -> None:
        await self.pool.execute(
            "DELETE FROM ngrok_rebind_urls WHERE account_id = $1 AND tunnel_id = $2", account_id, tunnel_id
        )

    # -- live name claims (cluster) -----------------------------------------------------

    @staticmethod
    def _holder(r: Any) -> Holder:
        return Holder(r["holder_id"], r["account_id"], r["proto"], r["pooling"], "agent", r["client_id"])

    @_guard
    async def claim_name(self, name: str, holder: Holder, node_id: str | None) -> None:
        """Give ``name`` to ``holder`` on every edge, or raise :class:`NameConflict`.

        One transaction under the name's advisory lock: the other holders (any edge)
        must be of the same account and share by :func:`check_sharing`; the durable
        reservations (a hostname reserved by a cloud endpoint, a public tcp port of one)
        must not belong to another account.  A holder that held another name moves.
        """
        async with self._tx() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", name)
            rows = await conn.fetch("SELECT * FROM claims WHERE name = $1 AND holder_id != $2", name, holder.id)
            if any(r["account_id"] != holder.account_id for r in rows):
                raise other_account(name)
            if name.startswith("tcp:"):
                if await self._tcp_owner(conn, int(name[4:]), holder.account_id):
                    raise other_account(name)
            elif name.startswith("host:"):
                owner = await conn.fetchval("SELECT account_id FROM reserved_domains WHERE domain = $1", name[5:])
                if owner is not None and owner != holder.account_id:
                    raise other_account(name)
            check_sharing(name, holder, [self._holder(r) for r in rows])
            moved = await conn.fetch(
                "DELETE FROM claims WHERE holder_id = $1 AND name != $2 RETURNING name", holder.id, name
            )
            await conn.execute(
                "INSERT INTO claims (name, holder_id, account_id, proto, pooling, client_id, node_id)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name, holder_id) DO UPDATE SET"
                " account_id = EXCLUDED.account_id, proto = EXCLUDED.proto, pooling = EXCLUDED.pooling,"
                " client_id = EXCLUDED.client_id, node_id = EXCLUDED.node_id",
                name,
                holder.id,
                holder.account_id,
                holder.proto,
                holder.pooling,
                holder.client_id,
                node_id,
            )
            for n in [name, *(r["name"] for r in moved)]:
                if n.startswith("tcp:"):
                    await conn.execute(*_notify("tcp_port", n[4:]))

    @_guard
    async def release_claim(self, holder_id: str) -> None:
        """Drop every claim of ``holder_id`` (idempotent)."""
        async with self._tx() as conn:
            rows = await conn.fetch("DELETE FROM claims WHERE holder_id = $1 RETURNING name", holder_id)
            for r in rows:
                if r["name"].startswith("tcp:"):
                    await conn.execute(*_notify("tcp_port", r["name"][4:]))

    @_guard
    async def claim_owner(self, name: str) -> str | None:
        """The account whose live claim (on any edge) holds ``name``, or None."""
        return await self.pool.fetchval("SELECT account_id FROM claims WHERE name = $1 LIMIT 1", name)

    @_guard
    async def claim_holders(self, name: str) -> list[Holder]:
        """The live holders (any edge) of ``name``."""
        return [self._holder(r) for r in await self.pool.fetch("SELECT * FROM claims WHERE name = $1", name)]

    @_guard
    async def free_tcp_ports(self, lo: int, hi: int, count: int) -> list[int]:
        """Up to ``count`` ports of ``lo..hi`` no edge holds (live claim or cloud
        endpoint), in random order: candidates, still to be claimed."""
        rows = await self.pool.fetch(
            "SELECT p FROM generate_series($1::int, $2::int) AS p"
            " WHERE NOT EXISTS (SELECT 1 FROM claims WHERE name = 'tcp:' || p)"
            " AND NOT EXISTS (SELECT 1 FROM cloud_endpoints WHERE binding = 'public'"
            " AND proto = 'tcp' AND port = p) ORDER BY random() LIMIT $3",
            lo,
            hi,
            count,
        )
        return [r["p"] for r in rows]

    @_guard
    async def allocated_tcp_ports(self) -> dict[int, str]:
        """Every public tcp port held on any edge (agents' claims, cloud endpoints) and
        its account: each edge listens on all of them."""
        rows = await self.pool.fetch(
            "SELECT substr(name, 5)::int AS port, account_id FROM claims WHERE name LIKE 'tcp:%'"
            " UNION SELECT port, account_id FROM cloud_endpoints WHERE binding = 'public' AND proto = 'tcp'"
        )
        return {r["port"]: r["account_id"] for r in rows}

    # -- the API rate limit (cluster) ---------------------------------------------------

    @_guard
    async def rate_take(self, key: str, per_minute: int) -> float:
        """Spend one token of ``key``'s bucket (``per_minute``, refilled continuously,
        judged on PostgreSQL's clock); 0 if allowed, else seconds until one is free."""
        rate = per_minute / 60.0
        row = await self.pool.fetchrow(
            "INSERT INTO api_rate AS b (key, tokens, at, ok) VALUES ($1, $2::float8 - 1, clock_timestamp(), true)"
            " ON CONFLICT (key) DO UPDATE SET"
            "  tokens = LEAST($2::float8, b.tokens + EXTRACT(EPOCH FROM clock_timestamp() - b.at) * $3::float8)"
            "   - CASE WHEN LEAST($2::float8, b.tokens + EXTRACT(EPOCH FROM clock_timestamp() - b.at)"
            "   * $3::float8) >= 1 THEN 1 ELSE 0 END,"
            "  ok = LEAST($2::float8, b.tokens + EXTRACT(EPOCH FROM clock_timestamp() - b.at) * $3::float8) >= 1,"
            "  at = clock_timestamp()"
            " RETURNING tokens, ok",
            key,
            float(per_minute),
            rate,
        )
        if row["ok"]:
            return 0.0
        return max(0.0, (1.0 - row["tokens"]) / rate)
