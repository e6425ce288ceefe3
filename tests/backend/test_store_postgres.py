"""What only the PostgreSQL store does (the shared contract is in test_store*.py, run on
both backends): migrations under a lock, hashed secrets, the change feed, live name
claims, tcp ports, the global API bucket, and a clear failure when it is unreachable."""

from __future__ import annotations

import asyncio
import socket
import sys

import asyncpg
import pytest

from backend.ownership import Holder, NameConflict, Ownership
from backend.store import StoreError, StoreUnavailable, new_token, open_edge_store
from backend.store.aio import STORE_METHODS, SQLiteAsync
from backend.store.base import CloudEndpoint, utcnow
from backend.store.postgres import CHANNEL, MIGRATIONS, PostgresStore


@pytest.fixture
async def pg(postgres_dsn):
    store = await PostgresStore.connect(postgres_dsn)
    yield store
    await store.aclose()


def _ep(account: str, url: str, **kw) -> CloudEndpoint:
    scheme, rest = url.split("://")
    host, _, port = rest.partition(":")
    now = utcnow()
    return CloudEndpoint(
        id=kw.pop("id", f"ep_{abs(hash((account, url)))}"),
        account_id=account,
        url=url,
        proto=scheme,
        host=host if scheme != "tcp" else "",
        port=int(port or 0),
        created_at=now,
        updated_at=now,
        traffic_policy="x",
        **kw,
    )


def test_every_store_method_is_a_coroutine_on_both_backends():
    for name in STORE_METHODS:
        assert asyncio.iscoroutinefunction(getattr(PostgresStore, name)), name
        assert asyncio.iscoroutinefunction(getattr(SQLiteAsync, name)), name


async def test_edges_starting_together_migrate_once(postgres_dsn):
    stores = await asyncio.gather(*(PostgresStore.connect(postgres_dsn) for _ in range(5)))
    try:
        rows = await stores[0].pool.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == list(range(1, len(MIGRATIONS) + 1))
        assert await stores[3].schema_version() == len(MIGRATIONS)
    finally:
        await asyncio.gather(*(s.aclose() for s in stores))


async def test_a_newer_schema_is_refused(pg, postgres_dsn):
    await pg.pool.execute("INSERT INTO schema_migrations (version) VALUES (999)")
    with pytest.raises(StoreError, match="newer than this burrow"):
        await PostgresStore.connect(postgres_dsn)


async def test_secrets_are_stored_only_as_hashes(pg):
    acct = await pg.default_account()
    token, key = new_token("bat"), new_token("bak")
    await pg.add_authtoken(acct.id, token)
    await pg.add_api_key(acct.id, key)
    dump = []
    for table in ("accounts", "credentials", "api_keys"):
        dump += [str(dict(r)) for r in await pg.pool.fetch(f"SELECT * FROM {table}")]
    text = "\n".join(dump)
    assert token not in text and key not in text
    assert (await pg.find_authtoken(token)).account_id == acct.id


async def test_writes_notify_the_change_feed_with_keys_only(pg, postgres_dsn):
    got: list[str] = []
    conn = await asyncpg.connect(postgres_dsn)
    await conn.add_listener(CHANNEL, lambda *args: got.append(args[3]))
    try:
        acct = await pg.create_account("feed")
        ep = await pg.create_cloud_endpoint(_ep(acct.id, "https://feed.example.com", id="ep_feed"))
        tcp = await pg.create_cloud_endpoint(_ep(acct.id, "tcp://x:31005", id="ep_tcp"))
        await pg.delete_cloud_endpoint(acct.id, ep.id)
        await pg.set_account_disabled(acct.id, True)
        await pg.claim_name("tcp:31007", Holder("ep_agent", acct.id, "tcp", False), "node-1")
        await pg.release_claim("ep_agent")
        for _ in range(100):
            if len(got) >= 8:
                break
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
    assert got == [
        f"account:{acct.id}",
        "cloud_endpoint:ep_feed",
        "cloud_endpoint:ep_tcp",
        "tcp_port:31005",
        "cloud_endpoint:ep_feed",
        f"account:{acct.id}",
        "tcp_port:31007",
        "tcp_port:31007",
    ]
    assert tcp.port == 31005


async def test_a_failed_write_notifies_nothing(pg, postgres_dsn):
    got: list[str] = []
    conn = await asyncpg.connect(postgres_dsn)
    await conn.add_listener(CHANNEL, lambda *args: got.append(args[3]))
    try:
        a, b = await pg.create_account("a"), await pg.create_account("b")
        await asyncio.sleep(0.1)
        got.clear()
        await pg.create_cloud_endpoint(_ep(a.id, "https://one.example.com", id="ep_1"))
        with pytest.raises(StoreError):
            await pg.create_cloud_endpoint(_ep(b.id, "https://one.example.com", id="ep_2"))
        await asyncio.sleep(0.2)
    finally:
        await conn.close()
    assert got == ["cloud_endpoint:ep_1"]


async def test_claims_one_account_per_name_pooling_and_one_agents_sessions(pg):
    a, b = (await pg.create_account("a")).id, (await pg.create_account("b")).id
    await pg.claim_name("host:x.example.com", Holder("ep_1", a, "https", False, "agent", "cli-1"), "n1")
    with pytest.raises(NameConflict) as other:
        await pg.claim_name("host:x.example.com", Holder("ep_2", b, "https", True, "agent", "cli-2"), "n2")
    assert other.value.reason == "other_account"
    with pytest.raises(NameConflict) as online:
        await pg.claim_name("host:x.example.com", Holder("ep_3", a, "https", True, "agent", "cli-3"), "n2")
    assert online.value.reason == "pooling_disabled"
    # the same agent (client id) on another edge: its second session shares the URL
    await pg.claim_name("host:x.example.com", Holder("ep_4", a, "https", False, "agent", "cli-1"), "n2")
    assert {h.id for h in await pg.claim_holders("host:x.example.com")} == {"ep_1", "ep_4"}
    assert await pg.claim_owner("host:x.example.com") == a
    # a hostname reserved by another account's cloud endpoint is refused too
    await pg.create_cloud_endpoint(_ep(b, "https://y.example.com", id="ep_cloud"))
    with pytest.raises(NameConflict):
        await pg.claim_name("host:y.example.com", Holder("ep_5", a, "https", False), "n1")
    # and a cloud endpoint cannot take a name another account's agent holds
    with pytest.raises(StoreError) as taken:
        await pg.create_cloud_endpoint(_ep(b, "https://x.example.com", id="ep_cloud2"))
    assert getattr(taken.value, "kind", None) == "host_taken"
    await pg.release_claim("ep_1")
    await pg.release_claim("ep_4")
    assert await pg.claim_owner("host:x.example.com") is None


async def test_concurrent_claims_of_one_name_by_two_accounts(pg, postgres_dsn):
    other = await PostgresStore.connect(postgres_dsn)  # a second edge's pool
    try:
        a, b = (await pg.create_account("a")).id, (await pg.create_account("b")).id
        for i in range(30):
            name = f"host:n{i}.example.com"
            res = await asyncio.gather(
                pg.claim_name(name, Holder(f"ep_a{i}", a, "http", False), "n1"),
                other.claim_name(name, Holder(f"ep_b{i}", b, "http", False), "n2"),
                return_exceptions=True,
            )
            assert sum(r is None for r in res) == 1, res
            assert sum(isinstance(r, NameConflict) for r in res) == 1, res
    finally:
        await other.aclose()


async def test_free_and_allocated_tcp_ports(pg):
    a = (await pg.create_account("a")).id
    await pg.claim_name("tcp:40001", Holder("ep_t1", a, "tcp", False), "n1")
    await pg.create_cloud_endpoint(_ep(a, "tcp://x:40002", id="ep_t2"))
    free = await pg.free_tcp_ports(40000, 40003, 10)
    assert sorted(free) == [40000, 40003]
    assert await pg.allocated_tcp_ports() == {40001: a, 40002: a}


async def test_the_api_bucket_is_one_for_every_pool(pg, postgres_dsn):
    other = await PostgresStore.connect(postgres_dsn)
    try:
        waits = await asyncio.gather(*((pg, other)[i % 2].rate_take("acct_x", 10) for i in range(15)))
    finally:
        await other.aclose()
    allowed = [w for w in waits if w == 0]
    assert 10 <= len(allowed) <= 11  # 10 in the bucket (+1 if a 6 s refill slipped in)
    assert all(0 < w <= 6.0 for w in waits if w)
    assert await pg.rate_take("acct_y", 10) == 0  # another key, another bucket


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_an_unreachable_server_is_one_clear_line():
    dsn = f"postgresql://burrow:s3cret@127.0.0.1:{_closed_port()}/burrow"
    with pytest.raises(StoreUnavailable) as exc:
        await open_edge_store(dsn)
    assert "cannot reach PostgreSQL at 127.0.0.1" in str(exc.value)
    assert "s3cret" not in str(exc.value)


async def test_a_server_that_goes_away_raises_store_unavailable(postgres_server):
    store = await PostgresStore.connect(postgres_server.new_database())
    try:
        acct = await store.default_account()
        postgres_server.stop()
        try:
            with pytest.raises(StoreUnavailable):
                await store.get_account(acct.id)
        finally:
            postgres_server.start()
        for _ in range(50):  # the pool reconnects by itself
            try:
                assert (await store.get_account(acct.id)) == acct
                break
            except StoreUnavailable:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the store did not come back")
    finally:
        await store.aclose()


async def test_without_asyncpg_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    with pytest.raises(StoreError, match=r"pip install 'burrow\[cluster\]'"):
        await open_edge_store("postgresql://127.0.0.1/burrow")


async def test_ownership_on_a_shared_store_claims_in_postgresql(pg):
    a, b = (await pg.create_account("a")).id, (await pg.create_account("b")).id
    edge1, edge2 = Ownership(pg, node_id="n1"), Ownership(pg, node_id="n2")
    await edge1.claim("host:o.example.com", Holder("ep_o1", a, "http", False, "agent", "c1"))
    assert await edge2.owner_of("host:o.example.com") == a
    with pytest.raises(NameConflict):
        await edge2.claim("host:o.example.com", Holder("ep_o2", b, "http", False, "agent", "c2"))
    row = await pg.pool.fetchrow("SELECT * FROM claims WHERE holder_id = 'ep_o1'")
    assert row["node_id"] == "n1" and row["client_id"] == "c1"
    edge1.release("ep_o1")
    await edge1.settle()
    assert await edge2.owner_of("host:o.example.com") is None
    await edge2.claim("host:o.example.com", Holder("ep_o2", b, "http", False, "agent", "c2"))
