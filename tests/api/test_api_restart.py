"""Restarting the edge keeps every cloud endpoint, agent ingress, API key and authtoken."""

from __future__ import annotations

from pathlib import Path

import httpx
import ngrok

from tests.api.conftest import POLICY_YAML, add_account, client_for
from tests.api.test_api_endpoints import free_port
from tests.procs import start_agent, start_edge


def test_state_survives_a_restart(edge, api, tmp_path):
    ep = api.endpoints.create(
        url="https://kept.example.com:443",
        type="cloud",
        traffic_policy=POLICY_YAML,
        description="kept",
        bindings=["public"],
    )
    internal = api.endpoints.create(
        url="tcp://db.internal:5432", type="cloud", traffic_policy=POLICY_YAML
    )
    served = api.endpoints.create(
        url="http://served.burrow.localhost", type="cloud", traffic_policy=POLICY_YAML
    )
    ing = api.agent_ingresses.create(
        domain="kept.example.net",
        metadata="meta",
        certificate_management_policy=ngrok.datatypes.AgentIngressCertPolicy(
            api, {"private_key_type": "ecdsa"}
        ),
    )
    key = api.api_keys.create(description="kept key")
    cred = api.credentials.create(description="kept token")
    second = add_account(edge, "second")
    theirs = second.client.agent_ingresses.create(domain="theirs.example.net")

    before = {
        "endpoints": [e._props for e in api.endpoints.list()],
        "ingresses": [i._props for i in api.agent_ingresses.list()],
        "keys": [k._props for k in api.api_keys.list()],
        "credentials": [c._props for c in api.credentials.list()],
    }
    data_dir = Path(edge.ready["data_dir"])
    edge.stop()
    again = start_edge(data_dir)
    try:
        fresh = client_for(again, key.token)  # the key minted before the restart still works
        after = {
            "endpoints": [e._props for e in fresh.endpoints.list()],
            "ingresses": [i._props for i in fresh.agent_ingresses.list()],
            "keys": [k._props for k in fresh.api_keys.list()],
            "credentials": [c._props for c in fresh.credentials.list()],
        }

        def strip(d):  # uris carry the new API port, URLs the new listener ports
            drop = ("uri", "domain", "credential", "url", "public_url", "hostport", "port")
            return {k: v for k, v in d.items() if k not in drop}

        for kind in before:
            assert [strip(x) for x in after[kind]] == [strip(x) for x in before[kind]], kind
        assert {e["id"] for e in after["endpoints"]} == {ep.id, internal.id, served.id}
        # the stored cloud endpoint is served again, at the edge's new listener port
        http_port = int(again.ready["http_url"].rsplit(":", 1)[1])
        assert fresh.endpoints.get(served.id).url == f"http://served.burrow.localhost:{http_port}"
        r = httpx.get(
            f"http://127.0.0.1:{http_port}/hi",
            headers={"Host": "served.burrow.localhost"},
            timeout=10,
        )
        assert (r.status_code, r.text) == (200, "Hello world!")
        got = fresh.endpoints.get(ep.id)
        assert got.domain.id == ep.domain.id and got.traffic_policy == POLICY_YAML
        kept = fresh.agent_ingresses.get(ing.id)
        assert (
            kept.certificate_management_status.renews_at
            == ing.certificate_management_status.renews_at
        )
        assert (
            client_for(again, second.api_key).agent_ingresses.get(theirs.id).domain
            == "theirs.example.net"
        )
        # the authtoken minted before the restart still connects an agent
        agent = start_agent(
            again, "http", str(free_port()), "--authtoken", cred.token, home=tmp_path / "home"
        )
        try:
            assert fresh.tunnel_sessions.get(agent.ready["session_id"]).credential.id == cred.id
        finally:
            agent.stop()
    finally:
        again.stop()
