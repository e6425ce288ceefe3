"""PostgreSQL tables of the cluster runtime (edges, their sessions and agent endpoints).

The store (:mod:`backend.store`) owns the cloud state's migrations; these tables are the
cluster's own, applied after the store's, with their own version table so the two never
clash.  Every statement is idempotent and the whole migration runs in one transaction
under an advisory lock, so edges starting at once do not race.
"""

from __future__ import annotations

#: pg_advisory_xact_lock key serialising the migration (any constant of our own)
MIGRATION_LOCK = 0x6275_7272_6F77_0001  # "burrow" + 1
#: pg_try_advisory_xact_lock key of the janitor (one edge reaps at a time)
JANITOR_LOCK = 0x6275_7272_6F77_0002

MIGRATIONS: list[str] = [
    # 1: membership, sessions, agent endpoints, the peers' shared secret
    """
    CREATE SEQUENCE IF NOT EXISTS burrow_edge_epoch;
    CREATE TABLE IF NOT EXISTS edges (
        node_id        text PRIMARY KEY,
        epoch          bigint NOT NULL,
        ingress_addr   text NOT NULL,
        advertise_addr text NOT NULL,
        peer_addr      text NOT NULL,
        peer_tls       boolean NOT NULL DEFAULT false,
        started_at     timestamptz NOT NULL DEFAULT now(),
        lease_expires  timestamptz NOT NULL
    );
    CREATE TABLE IF NOT EXISTS sessions (
        id          text PRIMARY KEY,
        account_id  text NOT NULL,
        client_id   text NOT NULL,
        slot        integer NOT NULL DEFAULT 0,
        node_id     text NOT NULL,
        epoch       bigint NOT NULL,
        ip          text NOT NULL DEFAULT '',
        started_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX IF NOT EXISTS sessions_node ON sessions (node_id, epoch);
    CREATE TABLE IF NOT EXISTS agent_endpoints (
        id            text PRIMARY KEY,
        session_id    text NOT NULL,
        node_id       text NOT NULL,
        epoch         bigint NOT NULL,
        account_id    text NOT NULL,
        client_id     text NOT NULL DEFAULT '',
        name          text NOT NULL DEFAULT '',
        binding       text NOT NULL,
        proto         text NOT NULL,
        host          text NOT NULL,
        port          integer NOT NULL,
        url           text NOT NULL,
        pooling       boolean NOT NULL,
        policy        text NOT NULL DEFAULT '',
        edge_headers  boolean NOT NULL DEFAULT false,
        metadata      text NOT NULL DEFAULT '',
        description   text NOT NULL DEFAULT '',
        upstream_url  text NOT NULL DEFAULT '',
        created_at    text NOT NULL DEFAULT ''
    );
    CREATE INDEX IF NOT EXISTS agent_endpoints_node ON agent_endpoints (node_id, epoch);
    CREATE INDEX IF NOT EXISTS agent_endpoints_session ON agent_endpoints (session_id);
    CREATE TABLE IF NOT EXISTS cluster_secret (
        id     integer PRIMARY KEY CHECK (id = 1),
        secret bytea NOT NULL
    );
    """,
    # 2: the cluster's CA (every edge presents certificates of one CA; agents trust one file)
    """
    CREATE TABLE IF NOT EXISTS cluster_ca (
        id       integer PRIMARY KEY CHECK (id = 1),
        cert_pem bytea NOT NULL,
        key_pem  bytea NOT NULL
    );
    """,
    # 3: what /tunnel_sessions shows of a session, so that every edge lists every one
    # (JSON text: agent_version, os, metadata, transport, region, credential_id, started_at)
    """
    ALTER TABLE sessions ADD COLUMN IF NOT EXISTS info text NOT NULL DEFAULT '{}';
    CREATE INDEX IF NOT EXISTS sessions_account ON sessions (account_id);
    """,
]


async def migrate(pool) -> int:
    """Bring the cluster tables to the newest version; return it."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS burrow_cluster_version (version integer NOT NULL)")
        version = await conn.fetchval("SELECT max(version) FROM burrow_cluster_version") or 0
        for n, sql in enumerate(MIGRATIONS[version:], start=version + 1):
            await conn.execute(sql)
            await conn.execute("INSERT INTO burrow_cluster_version (version) VALUES ($1)", n)
        return len(MIGRATIONS)


async def cluster_secret(pool) -> bytes:
    """The peers' shared secret: 32 random bytes made by the first edge, kept in PostgreSQL."""
    import os

    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO cluster_secret (id, secret) VALUES (1, $1) ON CONFLICT (id) DO NOTHING", os.urandom(32)
        )
        return bytes(await conn.fetchval("SELECT secret FROM cluster_secret WHERE id = 1"))
