"""The store's cloud endpoints, reserved domains and agent ingresses (SQLite)."""

from __future__ import annotations

import datetime as dt

import pytest

from backend.ids import new_id
from backend.store import (
    AgentIngress,
    CertJob,
    CertPolicy,
    CloudEndpoint,
    ConflictError,
    IngressCertificate,
    NotFoundError,
)
from backend.store.base import utcnow


@pytest.fixture
def store(any_store):
    """Every test here runs on SQLite and on PostgreSQL (tests/backend/conftest.py)."""
    return any_store


def ep(account: str, url: str = "https://a.example.com", **kw) -> CloudEndpoint:
    scheme, host = url.split("://")
    host, _, port = host.partition(":")
    now = utcnow()
    fields = dict(
        id=new_id("ep"), account_id=account, url=url, proto=scheme, host=host,
        port=int(port or 443), created_at=now, updated_at=now, traffic_policy="p",
    )  # fmt: skip
    fields.update(kw)
    return CloudEndpoint(**fields)


def test_cloud_endpoint_round_trip_and_paging(store):
    a = store.default_account().id
    made = [store.create_cloud_endpoint(ep(a, f"https://e{i}.example.com")) for i in range(5)]
    assert all(m.domain_id and m.domain_id.startswith("rd_") for m in made)
    assert store.get_cloud_endpoint(a, made[0].id) == made[0]
    ids = [m.id for m in made]
    assert [e.id for e in store.list_cloud_endpoints(a)] == ids[::-1]
    assert [e.id for e in store.list_cloud_endpoints(a, limit=2)] == ids[::-1][:2]
    assert [e.id for e in store.list_cloud_endpoints(a, before_id=ids[2])] == [ids[1], ids[0]]
    assert [e.id for e in store.all_cloud_endpoints()] == ids
    changed = made[0].model_copy(update={"description": "d", "pooling_enabled": True})
    assert store.update_cloud_endpoint(changed).description == "d"
    assert store.get_cloud_endpoint(a, made[0].id).pooling_enabled is True
    assert store.delete_cloud_endpoint(a, made[0].id) is True
    assert store.delete_cloud_endpoint(a, made[0].id) is False
    with pytest.raises(NotFoundError):
        store.update_cloud_endpoint(changed)


def test_accounts_are_separate(store):
    a, b = store.default_account().id, store.create_account("b").id
    mine = store.create_cloud_endpoint(ep(a))
    assert store.get_cloud_endpoint(b, mine.id) is None
    assert store.list_cloud_endpoints(b) == []
    assert store.delete_cloud_endpoint(b, mine.id) is False
    with pytest.raises(NotFoundError):
        store.update_cloud_endpoint(mine.model_copy(update={"account_id": b}))
    assert store.get_reserved_domain(b, mine.domain_id) is None
    assert store.get_reserved_domain(a, mine.domain_id).domain == "a.example.com"


def test_hostnames_and_urls_conflicts(store):
    a, b = store.default_account().id, store.create_account("b").id
    first = store.create_cloud_endpoint(ep(a))
    with pytest.raises(ConflictError) as exc:
        store.create_cloud_endpoint(ep(a))
    assert exc.value.kind == "url_taken"
    # same host, other scheme, same account: shares the reservation
    http = store.create_cloud_endpoint(ep(a, "http://a.example.com:80", port=80))
    assert http.domain_id == first.domain_id
    assert store.public_host_owner("A.example.com.") == a
    with pytest.raises(ConflictError) as exc:
        store.create_cloud_endpoint(ep(b, "http://a.example.com:80", port=80))
    assert exc.value.kind == "host_taken"
    # internal names are per account
    store.create_cloud_endpoint(ep(a, "https://x.internal", binding="internal"))
    store.create_cloud_endpoint(ep(b, "https://x.internal", binding="internal"))
    # public tcp ports are per edge
    store.create_cloud_endpoint(ep(a, "tcp://t.example.com:31000", port=31000))
    with pytest.raises(ConflictError) as exc:
        store.create_cloud_endpoint(ep(b, "tcp://u.example.com:31000", port=31000))
    assert exc.value.kind == "host_taken"
    # the reservation goes with the last endpoint that used it
    store.delete_cloud_endpoint(a, first.id)
    assert store.public_host_owner("a.example.com") == a
    store.delete_cloud_endpoint(a, http.id)
    assert store.public_host_owner("a.example.com") is None
    store.create_cloud_endpoint(ep(b))
    assert store.public_host_owner("a.example.com") == b


def test_moving_an_endpoint_moves_its_reservation(store):
    a = store.default_account().id
    e = store.create_cloud_endpoint(ep(a))
    moved = store.update_cloud_endpoint(
        e.model_copy(update={"url": "https://b.example.com", "host": "b.example.com"})
    )
    assert moved.domain_id != e.domain_id
    assert store.public_host_owner("a.example.com") is None
    assert store.public_host_owner("b.example.com") == a


def test_agent_ingress_round_trip(store):
    a, b = store.default_account().id, store.create_account("b").id
    now = utcnow()
    ing = AgentIngress(
        id=new_id("agin"), account_id=a, domain="connect.example.com", created_at=now
    )
    store.create_agent_ingress(ing)
    assert store.get_agent_ingress(a, ing.id) == ing
    assert store.get_agent_ingress(b, ing.id) is None
    assert store.find_agent_ingress("Connect.Example.com.") == ing
    with pytest.raises(ConflictError) as exc:
        store.create_agent_ingress(ing.model_copy(update={"id": new_id("agin"), "account_id": b}))
    assert exc.value.kind == "domain_taken"
    cert = IngressCertificate(
        chain_pem="C", key_pem="K", not_after=now + dt.timedelta(days=90), renews_at=now
    )
    job = CertJob(error_code="DNS_ERROR", msg="m", started_at=now, retries_at=None)
    full = ing.model_copy(
        update={
            "description": "d",
            "metadata": "m",
            "cert_policy": CertPolicy(private_key_type="ecdsa"),
            "certificate": cert,
            "cert_job": job,
        }
    )
    store.update_agent_ingress(full)
    assert store.get_agent_ingress(a, ing.id) == full
    assert [i.id for i in store.list_agent_ingresses(a)] == [ing.id]
    assert store.list_agent_ingresses(a, before_id=ing.id) == []
    assert store.delete_agent_ingress(b, ing.id) is False
    assert store.delete_agent_ingress(a, ing.id) is True
    with pytest.raises(NotFoundError):
        store.update_agent_ingress(full)


def test_key_and_token_updates(store):
    a = store.default_account().id
    cred = store.add_authtoken(a, "tok", "first", acl=["bind:x"])
    upd = store.update_authtoken(cred.id, metadata="m")
    assert (upd.description, upd.metadata, upd.acl) == ("first", "m", ["bind:x"])
    assert store.update_authtoken(cred.id, acl=[]).acl == []
    assert store.update_authtoken("cr_missing", description="x") is None
    key = store.add_api_key(a, "key", "k")
    assert store.update_api_key(key.id, description="renamed").description == "renamed"
    assert store.update_api_key("ak_missing") is None
