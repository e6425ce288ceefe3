"""Two accounts on one edge cannot see or change each other's objects, verb by verb."""

from __future__ import annotations

import ngrok
import pytest

from tests.api.conftest import POLICY_JSON
from tests.api.test_api_endpoints import free_port


def _denied(call) -> None:
    with pytest.raises(ngrok.NotFoundError) as exc:
        call()
    assert exc.value.error_code == "ERR_NGROK_404"


def test_cloud_endpoints_are_per_account(api, other):
    mine = api.endpoints.create(
        url="https://mine.example.com:443", type="cloud", traffic_policy=POLICY_JSON
    )
    theirs = other.client.endpoints.create(
        url="https://theirs.example.com:443", type="cloud", traffic_policy=POLICY_JSON
    )
    assert [e.id for e in api.endpoints.list()] == [mine.id]
    assert [e.id for e in other.client.endpoints.list()] == [theirs.id]
    for client, foreign in ((other.client, mine), (api, theirs)):
        _denied(lambda c=client, f=foreign: c.endpoints.get(f.id))
        _denied(lambda c=client, f=foreign: c.endpoints.update(f.id, description="hijack"))
        _denied(lambda c=client, f=foreign: c.endpoints.delete(f.id))
        assert [e.id for e in client.endpoints.list(id=[foreign.id])] == []
    assert api.endpoints.get(mine.id).description is None
    # the reserved hostname is refused to the other account; its reservation is hidden
    with pytest.raises(ngrok.Error) as exc:
        other.client.endpoints.create(
            url="http://mine.example.com:80", type="cloud", traffic_policy=POLICY_JSON
        )
    assert exc.value.error_code == "ERR_NGROK_414" and exc.value.http_status_code == 409
    with pytest.raises(ngrok.Error) as exc:
        other.client.endpoints.update(theirs.id, url="https://mine.example.com:443")
    assert exc.value.error_code == "ERR_NGROK_414"
    r = other.raw.get(f"/reserved_domains/{mine.domain.id}")
    assert r.status_code == 404
    # internal names are per account: both may use the same one
    a = api.endpoints.create(url="https://api.internal", type="cloud", traffic_policy=POLICY_JSON)
    b = other.client.endpoints.create(
        url="https://api.internal", type="cloud", traffic_policy=POLICY_JSON
    )
    assert a.id != b.id and a.url == b.url
    # public tcp ports belong to one account too
    api.endpoints.create(url="tcp://t.example.com:31900", type="cloud", traffic_policy=POLICY_JSON)
    with pytest.raises(ngrok.Error) as exc:
        other.client.endpoints.create(
            url="tcp://u.example.com:31900", type="cloud", traffic_policy=POLICY_JSON
        )
    assert exc.value.error_code == "ERR_NGROK_414"


def test_agent_ingresses_are_per_account(api, other):
    mine = api.agent_ingresses.create(domain="mine.example.net")
    assert list(other.client.agent_ingresses.list()) == []
    _denied(lambda: other.client.agent_ingresses.get(mine.id))
    _denied(lambda: other.client.agent_ingresses.update(mine.id, description="x"))
    _denied(lambda: other.client.agent_ingresses.delete(mine.id))
    theirs = other.client.agent_ingresses.create(domain="theirs.example.net")
    assert [i.id for i in api.agent_ingresses.list()] == [mine.id]
    _denied(lambda: api.agent_ingresses.get(theirs.id))
    assert api.agent_ingresses.get(mine.id).description is None


def test_sessions_and_agent_endpoints_are_per_account(api, other, agents):
    a = agents("http", free_port())
    b = agents("http", free_port(), "--authtoken", other.authtoken)
    sa, sb = a.ready["session_id"], b.ready["session_id"]
    assert [s.id for s in api.tunnel_sessions.list()] == [sa]
    assert [s.id for s in other.client.tunnel_sessions.list()] == [sb]
    ea = [e for e in api.endpoints.list()]
    eb = [e for e in other.client.endpoints.list()]
    assert [e.tunnel_session.id for e in ea] == [sa] and [e.tunnel_session.id for e in eb] == [sb]
    _denied(lambda: other.client.endpoints.get(ea[0].id))
    _denied(lambda: other.client.endpoints.delete(ea[0].id))
    _denied(lambda: other.client.tunnel_sessions.get(sa))
    for action in ("stop", "restart", "update"):
        _denied(lambda act=action: getattr(other.client.tunnel_sessions, act)(sa))
    assert a.proc.poll() is None and api.tunnel_sessions.get(sa).id == sa
    # a public hostname online for one account cannot become the other's cloud endpoint
    host = a.public_url.split("://", 1)[1]
    with pytest.raises(ngrok.Error) as exc:
        other.client.endpoints.create(
            url=f"http://{host}", type="cloud", traffic_policy=POLICY_JSON
        )
    assert exc.value.error_code == "ERR_NGROK_414"


def test_credentials_and_api_keys_are_per_account(api, other):
    cred = api.credentials.create(description="mine")
    key = api.api_keys.create(description="mine")
    assert cred.id not in {c.id for c in other.client.credentials.list()}
    assert key.id not in {k.id for k in other.client.api_keys.list()}
    for res, obj in ((other.client.credentials, cred), (other.client.api_keys, key)):
        _denied(lambda r=res, o=obj: r.get(o.id))
        _denied(lambda r=res, o=obj: r.update(o.id, description="x"))
        _denied(lambda r=res, o=obj: r.delete(o.id))
    assert api.credentials.get(cred.id).description == "mine"
    assert api.api_keys.get(key.id).description == "mine"
