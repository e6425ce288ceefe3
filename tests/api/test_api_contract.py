"""Contract tests: burrow's answers have every key of the seeds' example responses, with the
same JSON types, when given the same requests (examples in tests/api/seed_examples.py)."""

from __future__ import annotations

import pytest

from tests.api import seed_examples as seed
from tests.api.conftest import wait_until
from tests.api.test_api_endpoints import free_port

#: Keys a seed example has that burrow sends as null, and why.
NULL_BY_DESIGN = {
    "edge": "burrow has no edges (a pre-cloud-endpoint ngrok object)",
}


def json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def assert_same_shape(example, answer, where: str = "$") -> None:
    """Every key of ``example`` is in ``answer`` with the same JSON type (recursively)."""
    if isinstance(example, dict):
        assert isinstance(answer, dict), f"{where}: expected an object, got {json_type(answer)}"
        for key, value in example.items():
            assert key in answer, f"{where}.{key}: missing from burrow's answer"
            if key in NULL_BY_DESIGN and answer[key] is None:
                continue
            assert_same_shape(value, answer[key], f"{where}.{key}")
    elif isinstance(example, list):
        assert isinstance(answer, list), f"{where}: expected an array, got {json_type(answer)}"
        if example and answer:
            for item in answer:
                assert_same_shape(example[0], item, f"{where}[]")
    else:
        assert json_type(answer) == json_type(example), (
            f"{where}: seed has {json_type(example)} {example!r}, burrow sent {json_type(answer)} {answer!r}"
        )


def test_endpoint_examples(raw, agents):
    r = raw.post("/endpoints", json=seed.ENDPOINTS_CREATE_REQUEST)
    assert r.status_code == 201, r.text
    created = r.json()
    assert_same_shape(seed.ENDPOINTS_CREATE, created)
    assert created["url"] == seed.ENDPOINTS_CREATE["url"]
    assert created["hostport"] == seed.ENDPOINTS_CREATE["hostport"]
    assert created["public_url"] == seed.ENDPOINTS_CREATE["public_url"]

    r = raw.patch(f"/endpoints/{created['id']}", json=seed.ENDPOINTS_UPDATE_REQUEST)
    assert r.status_code == 200, r.text
    assert_same_shape(seed.ENDPOINTS_UPDATE, r.json())
    assert r.json()["description"] == seed.ENDPOINTS_UPDATE["description"]

    r = raw.get(f"/endpoints/{created['id']}")
    assert r.status_code == 200
    assert_same_shape(seed.ENDPOINTS_GET, r.json())

    # the list example's first item is an agent's endpoint ("ephemeral" then, "agent" now);
    # its second is an edge endpoint, which burrow does not have.
    agents("http", free_port(), "--name", "command_line")
    listed = wait_until(
        lambda: len(raw.get("/endpoints").json()["endpoints"]) == 2 and raw.get("/endpoints").json()
    )
    agent_ep = next(e for e in listed["endpoints"] if e["type"] == "agent")
    example_list = {**seed.ENDPOINTS_LIST, "endpoints": seed.ENDPOINTS_LIST["endpoints"][:1]}
    assert_same_shape(example_list, {**listed, "endpoints": [agent_ep]})
    assert listed["next_page_uri"] is None and listed["uri"].endswith("/endpoints")


def test_agent_ingress_examples(raw):
    r = raw.post("/agent_ingresses", json=seed.AGENT_INGRESSES_CREATE_REQUEST)
    assert r.status_code == 201, r.text
    created = r.json()
    assert_same_shape(seed.AGENT_INGRESSES_CREATE, created)
    assert created["domain"] == seed.AGENT_INGRESSES_CREATE["domain"]

    r = raw.patch(f"/agent_ingresses/{created['id']}", json=seed.AGENT_INGRESSES_UPDATE_REQUEST)
    assert r.status_code == 200, r.text
    assert_same_shape(seed.AGENT_INGRESSES_UPDATE, r.json())

    r = raw.get(f"/agent_ingresses/{created['id']}")
    assert_same_shape(seed.AGENT_INGRESSES_GET, r.json())
    assert {k: r.json()[k] for k in ("description", "metadata", "domain")} == {
        k: seed.AGENT_INGRESSES_GET[k] for k in ("description", "metadata", "domain")
    }

    r = raw.get("/agent_ingresses")
    assert_same_shape(seed.AGENT_INGRESSES_LIST, r.json())


def test_every_documented_field_is_present(raw, agents):
    """Fields the seeds' tables and the official client read are all sent, null when empty."""
    endpoint_fields = {
        "id", "region", "created_at", "updated_at", "public_url", "proto", "scheme", "hostport", "host",
        "port", "type", "metadata", "description", "domain", "tcp_addr", "tunnel", "edge", "upstream_url",
        "upstream_proto", "upstream_protocol", "url", "principal", "traffic_policy", "bindings",
        "tunnel_session", "uri", "name", "pooling_enabled",
    }  # fmt: skip
    ingress_fields = {
        "id", "uri", "description", "metadata", "domain", "ns_targets", "region_domains", "created_at",
        "certificate_management_policy", "certificate_management_status",
    }  # fmt: skip
    session_fields = {
        "id", "uri", "agent_version", "credential", "ip", "metadata", "os", "region", "started_at", "transport",
    }  # fmt: skip
    agents("http", free_port())
    raw.post(
        "/endpoints",
        json={
            "url": "https://f.example.com",
            "traffic_policy": seed.ENDPOINTS_CREATE["traffic_policy"],
        },
    )
    raw.post("/agent_ingresses", json={"domain": "f.example.com"})
    eps = raw.get("/endpoints").json()["endpoints"]
    assert sorted(e["type"] for e in eps) == ["agent", "cloud"]
    for e in eps:
        assert set(e) == endpoint_fields
    ing = raw.get("/agent_ingresses").json()["ingresses"][0]
    assert set(ing) == ingress_fields
    sess = raw.get("/tunnel_sessions").json()
    assert set(sess) == {"tunnel_sessions", "uri", "next_page_uri"}
    assert set(sess["tunnel_sessions"][0]) == session_fields
    cred = raw.get("/credentials").json()["credentials"][0]
    assert set(cred) == {
        "id",
        "uri",
        "created_at",
        "description",
        "metadata",
        "token",
        "acl",
        "owner_id",
    }
    key = raw.get("/api_keys").json()["keys"][0]
    assert set(key) == {"id", "uri", "description", "metadata", "created_at", "token", "owner_id"}


@pytest.mark.parametrize(
    "path",
    [
        "/endpoints",
        "/agent_ingresses",
        "/tunnel_sessions",
        "/credentials",
        "/api_keys",
        "/reserved_domains",
    ],
)
def test_list_envelopes(raw, path):
    body = raw.get(path).json()
    key = {
        "/endpoints": "endpoints",
        "/agent_ingresses": "ingresses",
        "/tunnel_sessions": "tunnel_sessions",
        "/credentials": "credentials",
        "/api_keys": "keys",
        "/reserved_domains": "reserved_domains",
    }[path]
    assert set(body) == {key, "uri", "next_page_uri"}
    assert body["uri"] == raw.base + path and body["next_page_uri"] is None
