"""/endpoints: cloud endpoints (CRUD, URL rules, traffic policy) and live agent endpoints."""

from __future__ import annotations

import socket

import httpx
import ngrok
import pytest

from tests.api.conftest import POLICY_JSON, POLICY_YAML, wait_until


def ports(edge) -> dict[str, int]:
    return {k: int(edge.ready[f"{k}_url"].rsplit(":", 1)[1]) for k in ("http", "https")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------ cloud CRUD
def test_cloud_endpoint_create_get_update_delete(api):
    ep = api.endpoints.create(
        url="https://endpoint-example2.com:443",
        type="cloud",
        traffic_policy=POLICY_JSON,
        description="sample cloud endpoint",
        metadata='{"environment": "staging"}',
        bindings=["public"],
    )
    assert ep.id.startswith("ep_") and len(ep.id) == 30
    assert ep.type == "cloud"
    assert ep.url == ep.public_url == "https://endpoint-example2.com"
    assert ep.hostport == "endpoint-example2.com:443"
    assert (ep.proto, ep.scheme, ep.host, ep.port) == (
        "https",
        "https",
        "endpoint-example2.com",
        443,
    )
    assert ep.bindings == ["public"]
    assert ep.traffic_policy == POLICY_JSON
    assert ep.description == "sample cloud endpoint"
    assert ep.metadata == '{"environment": "staging"}'
    assert ep.pooling_enabled is False
    assert ep.tunnel_session is None and ep.tunnel is None and ep.edge is None
    # what only agent endpoints have is left out, as in ngrok's examples (seed 001)
    for agent_only in ("upstream_url", "upstream_proto", "upstream_protocol", "name", "region"):
        assert agent_only not in ep._props
    assert ep.domain.id.startswith("rd_")
    assert ep.created_at == ep.updated_at and ep.created_at.endswith("Z")
    assert ep.uri.endswith(f"/endpoints/{ep.id}")

    got = api.endpoints.get(ep.id)
    assert got.id == ep.id and got.traffic_policy == POLICY_JSON and got.domain == ep.domain

    upd = api.endpoints.update(ep.id, description="Sample Cloud Endpoint")
    assert upd.description == "Sample Cloud Endpoint"
    assert upd.metadata == ep.metadata and upd.url == ep.url and upd.traffic_policy == POLICY_JSON
    upd = api.endpoints.update(
        ep.id,
        traffic_policy=POLICY_YAML,
        pooling_enabled=True,
        url="https://renamed.example.com:443",
    )
    assert upd.traffic_policy == POLICY_YAML and upd.pooling_enabled is True
    assert upd.url == "https://renamed.example.com" and upd.domain.id != ep.domain.id
    assert api.endpoints.get(ep.id).url == "https://renamed.example.com"

    api.endpoints.delete(ep.id)
    with pytest.raises(ngrok.NotFoundError):
        api.endpoints.get(ep.id)
    with pytest.raises(ngrok.NotFoundError):
        api.endpoints.delete(ep.id)
    with pytest.raises(ngrok.NotFoundError):
        api.endpoints.update(ep.id, description="x")


def test_list_pages_newest_first_and_filters(api):
    made = [
        api.endpoints.create(
            url=f"https://e{i}.example.com:443", type="cloud", traffic_policy=POLICY_JSON
        ).id
        for i in range(5)
    ]
    page = api.endpoints.list(limit="2")
    assert [e.id for e in page.endpoints] == made[::-1][:2]
    assert page.next_page_uri and "limit=2" in page.next_page_uri
    assert [e.id for e in page] == made[::-1]
    assert [e.id for e in api.endpoints.list(id=[made[1], made[3]])] == [made[3], made[1]]
    assert [e.id for e in api.endpoints.list(url=["https://e2.example.com"])] == [made[2]]


def test_more_than_a_page_of_cloud_endpoints(api):
    made = {
        api.endpoints.create(
            url=f"https://p{i}.example.com", type="cloud", traffic_policy=POLICY_JSON
        ).id
        for i in range(102)
    }
    first = api.endpoints.list()
    assert len(first.endpoints) == 100 and first.next_page_uri
    assert {e.id for e in first} == made


def test_reserved_domain_follows_cloud_endpoints(api, raw):
    a = api.endpoints.create(
        url="https://shared.example.com", type="cloud", traffic_policy=POLICY_JSON
    )
    b = api.endpoints.create(
        url="http://shared.example.com", type="cloud", traffic_policy=POLICY_JSON
    )
    assert a.domain.id == b.domain.id
    rd = raw.get(f"/reserved_domains/{a.domain.id}").json()
    assert rd["domain"] == "shared.example.com" and rd["id"] == a.domain.id
    assert [d["id"] for d in raw.get("/reserved_domains").json()["reserved_domains"]] == [
        a.domain.id
    ]
    api.endpoints.delete(a.id)
    assert raw.get(f"/reserved_domains/{a.domain.id}").status_code == 200
    api.endpoints.delete(b.id)
    assert raw.get(f"/reserved_domains/{a.domain.id}").status_code == 404


# ----------------------------------------------------------------------- URL rules
@pytest.mark.parametrize(
    ("url", "bindings", "want_url", "want_binding"),
    [
        ("https://example.internal", None, "https://example.internal", "internal"),
        ("https://example.foo.bar.internal", None, "https://example.foo.bar.internal", "internal"),
        ("https://a.b.c.d.e.internal", ["internal"], "https://a.b.c.d.e.internal", "internal"),
        ("https://example.internal:12345", None, "https://example.internal:12345", "internal"),
        ("tls://example.internal", None, "tls://example.internal", "internal"),
        ("tls://example.internal:12345", None, "tls://example.internal:12345", "internal"),
        ("tcp://example.internal:12345", None, "tcp://example.internal:12345", "internal"),
        ("http://example.internal", None, "http://example.internal", "internal"),
        ("https://*.wild.internal", None, "https://*.wild.internal", "internal"),
        # no port: the edge's listener port, as agent endpoints get it
        ("HTTPS://Upper.Example.COM", None, "https://upper.example.com:{https}", "public"),
        ("app.example.com", None, "https://app.example.com:{https}", "public"),
        ("http://app.example.com", None, "http://app.example.com:{http}", "public"),
        ("tls://app.example.com", None, "tls://app.example.com:{https}", "public"),
        ("https://app.example.com:{https}", None, "https://app.example.com:{https}", "public"),
        # the scheme's default port (an edge behind a proxy or port forward)
        ("https://app.example.com:443/", ["public"], "https://app.example.com", "public"),
        ("http://app.example.com:80", None, "http://app.example.com", "public"),
        ("tcp://tcp.example.com:31500", None, "tcp://tcp.example.com:31500", "public"),
    ],
)
def test_valid_urls(edge, api, url, bindings, want_url, want_binding):
    p = ports(edge)
    ep = api.endpoints.create(
        url=url.format(**p), type="cloud", traffic_policy=POLICY_JSON, bindings=bindings
    )
    assert ep.url == want_url.format(**p)
    assert ep.bindings == [want_binding]


def test_bare_name_uses_edge_domain_and_listener_port(edge, api):
    ep = api.endpoints.create(url="http://myapp", type="cloud", traffic_policy=POLICY_JSON)
    port = ports(edge)["http"]
    assert ep.url == f"http://myapp.burrow.localhost:{port}"
    assert ep.hostport == f"myapp.burrow.localhost:{port}"


@pytest.mark.parametrize(
    ("url", "bindings", "fragment"),
    [
        ("ftp://example.com", None, "scheme"),
        ("https://", None, "hostname"),
        ("", None, "required"),
        ("https://example.com/path", None, "path"),
        ("https://user@example.com", None, "user"),
        ("https://example.com?q=1", None, "query"),
        ("https://example.com:0", None, "port"),
        ("https://example.com:99999", None, "port"),
        ("https://example.com:8443", None, "port"),
        ("https://exa mple.com", None, "path"),
        ("https://-bad-.example.com", None, "hostname"),
        ("https://10.1.2.3", None, "hostname"),
        ("tcp://example.internal", None, "port"),
        ("tcp://tcp.example.com", None, "port"),
        ("tcp://tcp.example.com:80", None, "range"),
        ("https://internal", None, "before .internal"),
        ("https://a.b.c.d.e.f.internal", None, "at most 5"),
        ("https://example.internal", ["public"], "internal binding"),
        ("https://example.com", ["internal"], ".internal"),
        ("https://example.com", ["kubernetes"], "kubernetes"),
        ("https://example.com", ["public", "internal"], "exactly one"),
        ("https://example.com", ["elsewhere"], "binding"),
    ],
)
def test_invalid_urls(api, url, bindings, fragment):
    with pytest.raises(ngrok.Error) as exc:
        api.endpoints.create(url=url, type="cloud", traffic_policy=POLICY_JSON, bindings=bindings)
    assert exc.value.error_code == "ERR_NGROK_215", str(exc.value)
    assert exc.value.http_status_code == 400
    assert fragment in str(exc.value)


def test_type_and_limits(api):
    for kwargs, fragment in [
        ({"type": "agent"}, "agent"),
        ({"type": "edge"}, "cloud"),
        ({"description": "d" * 256}, "description"),
        ({"metadata": "m" * 4097}, "metadata"),
    ]:
        args = {
            "url": "https://limits.example.com",
            "type": "cloud",
            "traffic_policy": POLICY_JSON,
            **kwargs,
        }
        with pytest.raises(ngrok.Error) as exc:
            api.endpoints.create(**args)
        assert exc.value.error_code == "ERR_NGROK_215" and fragment in str(exc.value)
    ep = api.endpoints.create(
        url="https://limits.example.com",
        type="cloud",
        traffic_policy=POLICY_JSON,
        description="d" * 255,
        metadata="m" * 4096,
    )
    assert len(ep.description) == 255 and len(ep.metadata) == 4096


def test_same_url_twice_is_a_conflict(edge, api):
    api.endpoints.create(
        url="https://twice.example.com:{}".format(ports(edge)["https"]),
        type="cloud",
        traffic_policy=POLICY_JSON,
    )
    with pytest.raises(ngrok.Error) as exc:
        api.endpoints.create(
            url="https://twice.example.com", type="cloud", traffic_policy=POLICY_JSON
        )
    assert exc.value.error_code == "ERR_NGROK_18009" and exc.value.http_status_code == 409


# ------------------------------------------------------------------- traffic policy
@pytest.mark.parametrize(
    "policy",
    [
        POLICY_JSON,
        POLICY_YAML,
        "on_tcp_connect:\n  - actions:\n      - type: close-connection\n",
        '{"on_http_request": [{"actions": [{"type": "redirect", "config": {"to": "https://example.org/"}}]}],'
        ' "on_http_response": [{"actions": [{"type": "add-headers", "config": {"headers": {"x": "y"}}}]}]}',
        "on_http_request:\n  - actions:\n      - type: forward-internal\n        config: {url: 'https://app.internal'}\n",
    ],
)
def test_traffic_policy_accepted(api, policy):
    ep = api.endpoints.create(url="https://policy.example.com", type="cloud", traffic_policy=policy)
    assert ep.traffic_policy == policy


@pytest.mark.parametrize(
    ("policy", "fragment"),
    [
        ("inbound: []", "unknown phase 'inbound'"),
        ("[1, 2]", "mapping"),
        ("just text", "mapping"),
        ("on_http_request: {actions: []}", "on_http_request"),
        (
            "on_http_request:\n  - actions:\n      - config: {}\n",
            "on_http_request[0].actions[0].type",
        ),
        ("on_http_request:\n  - expressions: [1]\n", "expressions[0]"),
        ("on_http_request:\n  - actions: [{type: deny, extra: 1}]\n", "actions[0].extra"),
        (
            "on_http_request:\n  - actions: [{type: deny}]\n    when: now\n",
            "on_http_request[0].when",
        ),
        ('{"on_http_request": [', "neither valid JSON nor YAML"),
        ("a: &x [1]\nb: *x\n", "aliases"),
        ("on_http_request: [" + "{" * 5000, "traffic_policy"),
        ("x" * (65 * 1024), "larger than"),
        ("on_http_request: []", "terminating action"),
        (
            "on_http_request:\n  - actions: [{type: add-headers, config: {headers: {a: b}}}]\n",
            "terminating action",
        ),
        ("on_http_request:\n  - actions: [{type: teleport}]\n", "teleport"),
        (
            "on_http_request:\n  - expressions: ['req.url.path ==']\n    actions: [{type: deny}]\n",
            "expressions[0]",
        ),
    ],
)
def test_traffic_policy_rejected_with_a_message(api, policy, fragment):
    with pytest.raises(ngrok.Error) as exc:
        api.endpoints.create(url="https://policy.example.com", type="cloud", traffic_policy=policy)
    assert exc.value.error_code == "ERR_NGROK_215" and exc.value.http_status_code == 400
    assert fragment in str(exc.value)


def test_traffic_policy_required_and_validated_on_update(api):
    with pytest.raises(ngrok.Error) as exc:
        api.endpoints.create(url="https://nopolicy.example.com", type="cloud", traffic_policy=None)
    assert exc.value.error_code == "ERR_NGROK_215" and "traffic_policy" in str(exc.value)
    ep = api.endpoints.create(
        url="https://nopolicy.example.com", type="cloud", traffic_policy=POLICY_JSON
    )
    with pytest.raises(ngrok.Error) as exc:
        api.endpoints.update(ep.id, traffic_policy="inbound: []")
    assert exc.value.error_code == "ERR_NGROK_215"
    assert api.endpoints.get(ep.id).traffic_policy == POLICY_JSON


# ------------------------------------------------------------------ agent endpoints
def test_agent_endpoint_listed_while_its_agent_runs(api, agents):
    a = agents("http", free_port(), "--name", "command_line", "--metadata", "m1")
    url = a.public_url
    eps = wait_until(
        lambda: [e for e in api.endpoints.list() if e.url == url], what="agent endpoint"
    )
    ep = eps[0]
    assert ep.type == "agent"
    assert ep.name == "command_line" and ep.metadata == "m1"
    assert ep.proto == "http" and ep.bindings == ["public"]
    assert ep.upstream_url and ep.upstream_url.startswith("http://")
    assert ep.upstream_protocol == ep._props["upstream_proto"] == "http"
    assert ep.tunnel.id == "tn_" + ep.id[3:]
    assert ep.traffic_policy is None and ep.domain is None
    sessions = list(api.tunnel_sessions.list())
    assert [s.id for s in sessions] == [ep.tunnel_session.id]
    assert ep.tunnel_session.uri.endswith(f"/tunnel_sessions/{sessions[0].id}")
    assert api.endpoints.get(ep.id).url == url

    # read-only through the API
    for call in (
        lambda: api.endpoints.update(ep.id, description="x"),
        lambda: api.endpoints.delete(ep.id),
    ):
        with pytest.raises(ngrok.Error) as exc:
            call()
        assert exc.value.http_status_code == 400 and "agent endpoint" in str(exc.value)

    # listed together with cloud endpoints, newest first
    cloud = api.endpoints.create(
        url="https://mixed.example.com", type="cloud", traffic_policy=POLICY_JSON
    )
    assert [e.id for e in api.endpoints.list()] == [cloud.id, ep.id]
    assert [e.id for e in api.endpoints.list(limit="1")] == [cloud.id, ep.id]

    a.stop()
    wait_until(
        lambda: all(e.type == "cloud" for e in api.endpoints.list()), what="agent endpoint gone"
    )
    with pytest.raises(ngrok.NotFoundError):
        api.endpoints.get(ep.id)
    assert list(api.tunnel_sessions.list()) == []


def test_cloud_endpoint_cannot_take_an_online_agent_url(api, agents):
    a = agents("http", free_port(), "--url", "http://busy.burrow.localhost")
    host = a.public_url.split("://", 1)[1]
    with pytest.raises(ngrok.Error) as exc:
        api.endpoints.create(url=f"http://{host}", type="cloud", traffic_policy=POLICY_JSON)
    assert exc.value.error_code == "ERR_NGROK_18017" and exc.value.http_status_code == 409


def test_cloud_endpoints_serve_traffic_as_the_api_changes_them(edge, api):
    port = ports(edge)["http"]

    def get(host: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{port}/hi", headers={"Host": host}, timeout=10)

    def offline(r: httpx.Response) -> bool:
        return r.status_code == 404 and "ERR_NGROK_3200" in r.text

    ep = api.endpoints.create(
        url="http://cloudy.burrow.localhost", type="cloud", traffic_policy=POLICY_YAML
    )
    r = get("cloudy.burrow.localhost")
    assert (r.status_code, r.text) == (200, "Hello world!")
    api.endpoints.update(ep.id, traffic_policy=POLICY_JSON)  # deny with 404
    r = get("cloudy.burrow.localhost")
    assert r.status_code == 404 and not offline(r)
    api.endpoints.update(ep.id, url="http://moved.burrow.localhost")
    assert offline(get("cloudy.burrow.localhost"))
    r = get("moved.burrow.localhost")
    assert r.status_code == 404 and not offline(r)
    api.endpoints.delete(ep.id)
    assert offline(get("moved.burrow.localhost"))


def test_pooled_agent_and_cloud_endpoint_share_a_url(api, agents):
    a = agents("http", free_port(), "--url", "http://pool.burrow.localhost", "--pooling-enabled")
    host = a.public_url.split("://", 1)[1]
    ep = api.endpoints.create(
        url=f"http://{host}", type="cloud", traffic_policy=POLICY_JSON, pooling_enabled=True
    )
    assert ep.pooling_enabled is True
    assert sorted(e.type for e in api.endpoints.list(url=[f"http://{host}"])) == ["agent", "cloud"]
