"""``/tunnels`` and the CEL ``filter`` of lists, through the official ``ngrok-api`` client."""

from __future__ import annotations

from urllib.parse import urlencode

import ngrok
import pytest

from tests.api.conftest import POLICY_JSON, wait_until
from tests.api.test_api_endpoints import free_port


def test_tunnels_list_and_get_follow_agent_endpoints(api, raw, agents):
    a = agents("http", free_port(), "--name", "web")
    b = agents("tcp", free_port())
    eps = wait_until(lambda: len(api.endpoints.list().endpoints) == 2 and api.endpoints.list().endpoints)
    by_url = {e.public_url: e for e in eps}

    listed = api.tunnels.list()
    assert len(listed.tunnels) == 2 and listed.next_page_uri is None
    assert listed.uri.endswith("/tunnels")
    for t in listed.tunnels:
        ep = by_url[t.public_url]
        # every agent endpoint's tunnel ref names a tunnel that exists, and back
        assert ep.tunnel.id == t.id and t.id.startswith("tn_")
        assert t.endpoint.id == ep.id and t.endpoint.uri.endswith(f"/endpoints/{ep.id}")
        assert t.tunnel_session.id == ep.tunnel_session.id
        assert raw.get(ep.tunnel.uri.removeprefix(raw.base)).status_code == 200
        got = api.tunnels.get(t.id)
        assert got.id == t.id and got.public_url == t.public_url and got.proto == t.proto
        assert got.forwards_to == ep.upstream_url and got.region == ep.region
        assert got.started_at.endswith("Z") and got.metadata is None
    assert {t.public_url for t in listed.tunnels} == {a.public_url, b.public_url}

    page = api.tunnels.list(limit="1")
    assert len(page.tunnels) == 1 and page.next_page_uri
    assert [t.id for t in page] == [t.id for t in listed.tunnels]

    # a tunnel lives as long as its session
    gone = next(t for t in listed.tunnels if t.public_url == b.public_url)
    b.stop()
    wait_until(lambda: len(api.tunnels.list().tunnels) == 1, what="the tcp tunnel gone")
    with pytest.raises(ngrok.NotFoundError):
        api.tunnels.get(gone.id)
    for odd in ("tn_unknown", "ep_" + "0" * 27, "tn_" + "0" * 27):
        with pytest.raises(ngrok.NotFoundError):
            api.tunnels.get(odd)


def test_endpoints_list_filter(api, agents):
    agents("http", free_port(), "--name", "web")
    made = [
        api.endpoints.create(
            url=f"https://f{i}.example.com", type="cloud", traffic_policy=POLICY_JSON, metadata=f"m{i}"
        ).id
        for i in range(3)
    ]
    wait_until(lambda: len(api.endpoints.list().endpoints) == 4)

    def ids(expr: str) -> list[str]:
        return [e.id for e in api.endpoints.list(filter=expr)]

    assert ids('obj.type == "cloud"') == made[::-1]
    assert len(ids('obj.type == "agent"')) == 1
    assert ids('obj.type == "cloud" || obj.type == "agent"') == [e.id for e in api.endpoints.list()]
    assert ids(f'obj.id == "{made[1]}"') == [made[1]]
    assert ids('obj.metadata in ["m0", "m2"]') == [made[2], made[0]]
    assert ids('obj.type == "cloud" && obj.created_at > timestamp(time.now).subtract("1h")') == made[::-1]
    assert ids('obj.created_at > timestamp(time.now).add("1h")') == []
    assert ids('obj.url.startsWith("https://f1.")') == [made[1]]
    assert ids('obj.tunnel == null && obj.metadata != ""') == made[::-1]
    assert ids("obj.tunnel_session != null") == [e.id for e in api.endpoints.list() if e.type == "agent"]
    # paging applies to what the filter kept, and the next page keeps the filter
    page = api.endpoints.list(filter='obj.type == "cloud"', limit="2")
    assert [e.id for e in page.endpoints] == made[::-1][:2] and "filter=" in page.next_page_uri
    assert [e.id for e in page] == made[::-1]

    # the filter works on the other lists too
    sess = api.tunnel_sessions.list(filter='obj.agent_version != ""')
    assert len(sess.tunnel_sessions) == 1
    assert api.api_keys.list(filter='obj.description == "no such key"').keys == []

    for bad in ("obj.type ==", "obj.nosuch == 1", "obj.id", 'req.method == "GET"', 'obj.created_at > "x"'):
        with pytest.raises(ngrok.Error) as exc:
            api.endpoints.list(filter=bad)
        assert exc.value.http_status_code == 400 and exc.value.error_code == "ERR_NGROK_215", bad
        assert "filter" in str(exc.value)


def test_filter_evaluation_is_bounded(raw):
    deep = "[1,2,3].all(a, [1,2,3].all(b, [1,2,3].all(c, true)))"
    r = raw.get("/endpoints?" + urlencode({"filter": deep}))
    assert r.status_code == 400 and "nests comprehensions" in r.json()["msg"]
    r = raw.get("/endpoints?" + urlencode({"filter": "obj.id == '" + "x" * 3000 + "'"}))
    assert r.status_code == 400 and "longer than" in r.json()["msg"]
