"""The policy engine on its own: compile-time refusals and evaluation order."""

from __future__ import annotations

import pytest

from backend.policy.document import PolicyError
from backend.policy.engine import Context, Forward, Reply, RequestState, compile_policy

CONN = {"client_ip": "192.0.2.7", "client_port": 5555, "server_ip": "127.0.0.1", "server_port": 4080}


def run(policy: str, path: str = "/", headers=(("Host", "h"),), method: str = "GET"):
    p = compile_policy(policy)
    st = RequestState(method, path, "1.1", list(headers), "h", "http")
    return p.run("on_http_request", Context(CONN, {"id": "ep_1"}, st)), st


def test_later_rules_see_headers_added_by_earlier_ones():
    out, st = run(
        """
on_http_request:
  - expressions: ["req.method == 'GET'"]
    actions: [{type: add-headers, config: {headers: {x-a: "1"}}}]
  - expressions: ["req.headers['x-a'][0] == '1'"]
    actions: [{type: custom-response, config: {body: "saw ${req.headers['x-a'][0]} from ${conn.client_ip}"}}]
"""
    )
    assert isinstance(out, Reply) and out.body == b"saw 1 from 192.0.2.7"
    assert ("x-a", "1") in st.headers


def test_expression_errors_do_not_match_and_missing_keys_interpolate_empty():
    out, _ = run(
        """
on_http_request:
  - expressions: ["req.headers['nope'][0] == 'x'"]
    actions: [{type: deny}]
  - actions: [{type: custom-response, config: {status_code: 202, body: "[${req.headers['nope'][0]}]"}}]
"""
    )
    assert out == Reply(202, [], b"[]")


def test_forward_internal_outcome_and_url_rewrite():
    out, st = run(
        """
on_http_request:
  - actions:
      - {type: url-rewrite, config: {from: "^/old/(.*)", to: "/new/$1"}}
      - {type: forward-internal, config: {url: "https://svc${size(req.url.path)}.internal"}}
""",
        path="/old/x?q=1",
    )
    assert st.target == "/new/x?q=1"
    assert out == Forward("https://svc6.internal", "halt")  # sees the rewritten "/new/x"


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        ("on_http_request: [{actions: [{type: teleport}]}]", "unknown action 'teleport'"),
        ("on_http_request: [{expressions: ['req.method =='], actions: [{type: deny}]}]", "invalid CEL"),
        ("on_http_request: [{actions: [{type: deny, config: {status_code: 700}}]}]", "status_code"),
        ("on_http_request: [{actions: [{type: rate-limit, config: {capacity: 5, rate: soon}}]}]", "invalid duration"),
        ("on_http_request: [{actions: [{type: restrict-ips, config: {allow: [not-a-cidr]}}]}]", "invalid CIDR"),
        ("on_http_request: [{actions: [{type: redirect, config: {to: x, from: '('}}]}]", "regular expression"),
        ("on_tcp_connect: [{actions: [{type: add-headers, config: {headers: {a: b}}}]}]", "cannot run in on_tcp_connect"),
        ("on_http_request: [{actions: [{type: forward-internal, config: {url: 'https://public.example'}}]}]", ".internal"),
        ("on_http_request: [{actions: [{type: custom-response, config: {body: '${req.method ==}'}}]}]", "invalid CEL"),
    ],
)
def test_bad_policies_are_refused_when_set(policy, words):
    with pytest.raises(PolicyError) as info:
        compile_policy(policy)
    assert words in str(info.value)


def test_cloud_policies_must_terminate():
    with pytest.raises(PolicyError, match="terminating action"):
        compile_policy("on_http_request: [{actions: [{type: add-headers, config: {headers: {a: b}}}]}]", require_termination=True)
    compile_policy("on_http_request: [{actions: [{type: deny}]}]", require_termination=True)
