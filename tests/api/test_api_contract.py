"""Contract tests: burrow's answers have every key of the seeds' example responses, with the
same JSON types, when given the same requests (examples in tests/api/seed_examples.py)."""

from __future__ import annotations

import contextlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests import shapes
from tests.api import seed_examples as seed
from tests.api.conftest import wait_until
from tests.api.test_api_endpoints import free_port
from tests.procs import host_of

#: Keys a seed example has that burrow leaves out (or sends as null), and why.
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
            if key in NULL_BY_DESIGN and answer.get(key) is None:
                continue
            assert key in answer, f"{where}.{key}: missing from burrow's answer"
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
    """Fields the seeds' tables and the official client read are all sent, null when empty,
    except references and agent-only fields, left out where they do not apply (as ngrok's
    examples do: an agent endpoint has no domain, a cloud one no tunnel)."""
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
    by_type = {e["type"]: e for e in eps}
    assert set(by_type["agent"]) == endpoint_fields - {"domain", "tcp_addr", "edge"}
    agent_only = {"region", "tunnel", "upstream_url", "upstream_proto", "upstream_protocol", "tunnel_session", "name"}
    assert set(by_type["cloud"]) == endpoint_fields - agent_only - {"tcp_addr", "edge"}
    assert None not in [by_type["agent"][k] for k in agent_only]
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


# ------------------------------------------------------- every example in the seeds
SEEDS_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "seeds"

#: The in-repo copies, used when the seed documents are not beside the checkout.
REPO_COPIES = {
    "Create Endpoint": seed.ENDPOINTS_CREATE,
    "List Endpoints": seed.ENDPOINTS_LIST,
    "Get Endpoint": seed.ENDPOINTS_GET,
    "Update Endpoint": seed.ENDPOINTS_UPDATE,
    "Create Agent Ingress": seed.AGENT_INGRESSES_CREATE,
    "Get Agent Ingress": seed.AGENT_INGRESSES_GET,
    "List Agent Ingresses": seed.AGENT_INGRESSES_LIST,
    "Update Agent Ingress": seed.AGENT_INGRESSES_UPDATE,
    "List Tunnels": shapes.TUNNEL_LIST,
    "Start tunnel": {**shapes.TUNNEL, "proto": "tcp", "config": {"addr": "localhost:22", "inspect": False}},
    "Tunnel detail": shapes.TUNNEL,
    "List Captured Requests": shapes.CAPTURED_LIST,
    "Captured Request Detail": shapes.CAPTURED,
}

#: Keys of examples not compared, and why.
SKIPPED = {
    "edge": "burrow has no edges; the Get Endpoint example shows an edge ref on a cloud endpoint",
}
#: Keys burrow sends as null where an example leaves them out, and why.
NULLS_OK = {
    "description": "ngrok-api reads it by key (KeyError if absent); null when empty",
    "metadata": "ngrok-api reads it by key (KeyError if absent); null when empty",
    "traffic_policy": "ngrok-api reads it by key (KeyError if absent); null when empty",
    "response": "a capture whose response has not arrived yet (seed 003 allows null)",
    "replay_of": "burrow's additive capture field: the capture this one replays, or null",
}


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _upstream():
    """A small HTTP upstream on a thread, for tests that call burrow synchronously."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _examples() -> dict[str, object]:
    if not SEEDS_DIR.is_dir():
        return dict(REPO_COPIES)
    found = {section: value for _, section, value in shapes.seed_example_responses(SEEDS_DIR)}
    assert len(found) == len(shapes.seed_example_responses(SEEDS_DIR)), "two examples, one section"
    return found


def _no_header_names(example):
    """Header names in capture examples are the client's, not the schema: keep the type."""
    if isinstance(example, dict):
        return {k: ({} if k == "headers" else _no_header_names(v)) for k, v in example.items()}
    if isinstance(example, list):
        return [_no_header_names(v) for v in example]
    return example


def test_every_seed_example_response(edge, agents, raw):
    """Walk every "Example Response" of the seeds; make the same call on burrow; compare
    keys and JSON types (integers stay integers; no null where the example omits a key).

    Skipped: the List Endpoints example's second item (an ``edge`` endpoint: burrow has
    no edges) and the keys in SKIPPED; nulls allowed by NULLS_OK.
    """
    examples = _examples()
    answers: dict[str, object] = {}

    # cloud API, seeds 001 and 002, with the seeds' own request bodies
    r = raw.post("/endpoints", json=seed.ENDPOINTS_CREATE_REQUEST)
    assert r.status_code == 201, r.text
    answers["Create Endpoint"] = r.json()
    ep_id = r.json()["id"]
    answers["Update Endpoint"] = raw.patch(f"/endpoints/{ep_id}", json=seed.ENDPOINTS_UPDATE_REQUEST).json()
    answers["Get Endpoint"] = raw.get(f"/endpoints/{ep_id}").json()
    r = raw.post("/agent_ingresses", json=seed.AGENT_INGRESSES_CREATE_REQUEST)
    assert r.status_code == 201, r.text
    answers["Create Agent Ingress"] = r.json()
    ing = r.json()["id"]
    answers["Update Agent Ingress"] = raw.patch(
        f"/agent_ingresses/{ing}", json=seed.AGENT_INGRESSES_UPDATE_REQUEST
    ).json()
    answers["Get Agent Ingress"] = raw.get(f"/agent_ingresses/{ing}").json()
    answers["List Agent Ingresses"] = raw.get("/agent_ingresses").json()

    # agent API, seed 003: a tunnel named command_line with one captured request
    with httpx.Client(timeout=20) as http, _upstream() as port:
        a = agents("http", port, "--name", "command_line")
        web = f"http://{a.ready['web_addr']}"
        host, hport = edge.http_addr
        r = http.get(f"http://{host}:{hport}/favicon.ico", headers={"Host": host_of(a.public_url)})
        assert r.status_code == 200
        caps = wait_until(
            lambda: [c for c in http.get(f"{web}/api/requests/http").json()["requests"] if c["response"]],
            what="a capture",
        )
        answers["List Captured Requests"] = http.get(f"{web}/api/requests/http").json()
        answers["Captured Request Detail"] = http.get(f"{web}/api/requests/http/{caps[0]['id']}").json()
        answers["List Tunnels"] = http.get(f"{web}/api/tunnels").json()
        answers["Tunnel detail"] = http.get(f"{web}/api/tunnels/command_line").json()
        ssh = free_port()
        r = http.post(f"{web}/api/tunnels", json={"addr": str(ssh), "proto": "tcp", "name": "ssh"})
        assert r.status_code == 201, r.text
        answers["Start tunnel"] = r.json()
        # values seed 003 shows for a tcp tunnel, besides the shape
        assert r.json()["config"] == {"addr": f"localhost:{ssh}", "inspect": False}
        assert answers["Tunnel detail"]["config"]["inspect"] is True

        listed = wait_until(
            lambda: (b := raw.get("/endpoints").json()) and len(b["endpoints"]) == 3 and b,
            what="the agent's endpoints",
        )
        agent_ep = next(e for e in listed["endpoints"] if e.get("name") == "command_line")
        answers["List Endpoints"] = {**listed, "endpoints": [agent_ep]}

    assert set(answers) == set(examples), "a seed example without a call here (or the reverse)"
    problems = {}
    for section, example in examples.items():
        if section == "List Endpoints":  # its second item is an edge endpoint: skipped
            example = {**example, "endpoints": example["endpoints"][:1]}
        errs = shapes.strict_shape_errors(
            _no_header_names(example), answers[section], skip=frozenset(SKIPPED), nulls_ok=frozenset(NULLS_OK)
        )
        if errs:
            problems[section] = errs
    assert problems == {}
    for section in ("List Captured Requests", "Captured Request Detail"):
        cap = answers[section]["requests"][0] if "requests" in answers[section] else answers[section]
        for half in (cap["request"], cap["response"]):
            assert all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in half["headers"].values())
