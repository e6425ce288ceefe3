"""The traffic policy document model (backend.policy.document): shapes accepted and refused."""

from __future__ import annotations

import pytest

from backend.policy.document import MAX_POLICY_BYTES, PolicyError, TrafficPolicy, parse_policy

JSON = '{"on_http_request":[{"actions":[{"type":"deny","config":{"status_code":404}}]}]}'
YAML = """\
on_http_request:
  - name: greet
    expressions: ["req.url.path == '/'"]
    actions:
      - type: custom-response
        config: {status_code: 200, body: hi}
on_http_response:
  - actions: [{type: add-headers, config: {headers: {x-a: b}}}]
on_tcp_connect:
"""


def test_json_and_yaml_give_the_same_models():
    j = parse_policy(JSON)
    assert j.rules("on_http_request")[0].actions[0].type == "deny"
    assert j.rules("on_http_request")[0].actions[0].config == {"status_code": 404}
    assert j.rules("on_tcp_connect") == []
    y = parse_policy(YAML)
    rule = y.rules("on_http_request")[0]
    assert (rule.name, rule.expressions) == ("greet", ["req.url.path == '/'"])
    assert (
        y.on_tcp_connect is None and y.rules("on_http_response")[0].actions[0].type == "add-headers"
    )
    assert parse_policy({"on_http_request": []}) == TrafficPolicy(on_http_request=[])
    with pytest.raises(KeyError):
        y.rules("inbound")


def test_yaml_flow_style_that_looks_like_json():
    assert parse_policy("{on_http_request: [{actions: [{type: deny}]}]}").rules("on_http_request")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("[]", "mapping"),
        ("42", "mapping"),
        ("inbound: []", "unknown phase 'inbound'"),
        ("on_http_request: 3", "on_http_request: Input should be a valid list"),
        ("on_http_request: [3]", "on_http_request[0]"),
        ("on_http_request: [{actions: [{type: ''}]}]", "actions[0].type"),
        ("on_http_request: [{actions: [{}]}]", "actions[0].type: Field required"),
        ("on_http_request: [{actions: [{type: deny, config: [1]}]}]", "actions[0].config"),
        ("on_http_request: [{actions: [{type: deny, cfg: {}}]}]", "actions[0].cfg: unknown field"),
        ("on_http_request: [{expressions: 'x == 1'}]", "expressions"),
        ("on_http_request: [{expressions: [true]}]", "expressions[0]"),
        ("on_http_request: [{name: 3}]", "on_http_request[0].name"),
        ("a: &a [1]\nb: *a\n", "aliases"),
        ("on_http_request: [\n", "neither valid JSON nor YAML"),
        ("{" * 10_000, "traffic_policy"),
        ("#" * (MAX_POLICY_BYTES + 1), "larger than"),
    ],
)
def test_refused_with_a_message(text, fragment):
    with pytest.raises(PolicyError) as exc:
        parse_policy(text)
    assert fragment in str(exc.value)
    assert str(exc.value).startswith("traffic_policy")


def test_billion_laughs_is_refused_quickly():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9)
    )
    with pytest.raises(PolicyError, match="aliases"):
        parse_policy(bomb)
