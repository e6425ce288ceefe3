"""The PostgreSQL harness itself: a real server, fresh databases, stop and start."""

from __future__ import annotations

import asyncpg
import pytest


async def test_fresh_databases_are_separate(postgres_server):
    a, b = postgres_server.new_database(), postgres_server.new_database()
    assert a != b
    conn = await asyncpg.connect(a)
    try:
        await conn.execute("CREATE TABLE t (x int)")
        assert await conn.fetchval("SELECT count(*) FROM t") == 0
    finally:
        await conn.close()
    conn = await asyncpg.connect(b)
    try:
        with pytest.raises(asyncpg.UndefinedTableError):
            await conn.fetchval("SELECT count(*) FROM t")
    finally:
        await conn.close()


async def test_stop_and_start_keeps_data(postgres_server):
    dsn = postgres_server.new_database()
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
    await conn.close()
    postgres_server.stop()
    try:
        with pytest.raises((OSError, asyncpg.PostgresError)):
            await asyncpg.connect(dsn, timeout=2)
    finally:
        postgres_server.start()
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT x FROM kept") == 7
    finally:
        await conn.close()
