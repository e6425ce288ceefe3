"""One CA for the whole cluster.

Agents verify the edge with one CA file (``--root-cas``) and fail over between edges,
and the edges' peer links use mutual TLS with it, so every edge of a cluster must
present certificates of the same CA.  The first edge to start puts its data dir's CA
(made on the spot if it has none) into PostgreSQL (``cluster_ca``); every edge then
writes the cluster's CA into its data dir (key 0600) before it loads it.  A data dir
whose CA differs keeps its old files as ``ca.pem.replaced`` / ``ca-key.pem.replaced``.

The CA key lives in the cluster's database: whoever can read that database can already
act as an edge (it holds every session, the peers' secret and the cloud state), so it
is the cluster's trust root either way; protect it as such.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from backend.cluster import schema
from backend.fsperm import private_dir
from backend.tls import CA_CERT_FILE, CA_KEY_FILE, LocalCA, _write_private, _write_public

log = logging.getLogger("burrow.cluster")


async def share_ca(dsn: str, data_dir: Path, timeout: float = 10.0) -> None:
    """Make ``data_dir``'s CA the cluster's (see the module docstring)."""
    import asyncpg

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1, timeout=timeout)
    try:
        await schema.migrate(pool)
        async with pool.acquire() as c:
            row = await c.fetchrow("SELECT cert_pem, key_pem FROM cluster_ca WHERE id = 1")
            if row is None:
                LocalCA.load_or_create(data_dir)  # ours (existing, or new) becomes the cluster's
                cert = (data_dir / CA_CERT_FILE).read_bytes()
                key = (data_dir / CA_KEY_FILE).read_bytes()
                await c.execute(
                    "INSERT INTO cluster_ca (id, cert_pem, key_pem) VALUES (1, $1, $2) ON CONFLICT (id) DO NOTHING",
                    cert,
                    key,
                )
                row = await c.fetchrow("SELECT cert_pem, key_pem FROM cluster_ca WHERE id = 1")
    finally:
        await pool.close()
    cert, key = bytes(row["cert_pem"]), bytes(row["key_pem"])
    private_dir(data_dir)
    cert_path, key_path = data_dir / CA_CERT_FILE, data_dir / CA_KEY_FILE
    have_cert = cert_path.read_bytes() if cert_path.exists() else None
    have_key = key_path.read_bytes() if key_path.exists() else None
    if have_cert == cert and have_key == key:
        return
    if have_cert is not None or have_key is not None:
        log.warning("cluster: %s holds another CA; using the cluster's (the old one is kept as *.replaced)", data_dir)
        for path in (cert_path, key_path):
            if path.exists():
                os.replace(path, path.with_name(path.name + ".replaced"))
    _write_private(key_path, key)
    _write_public(cert_path, cert)
