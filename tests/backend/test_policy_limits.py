"""Policy heads and evaluation limits (issue 12, items 6 and 12), without sockets."""

from __future__ import annotations

import pytest

from backend.http1 import from_wire, head_bytes, parse_request_head
from backend.policy import engine
from backend.policy.document import PolicyError
from backend.policy.engine import (
    Context,
    Reply,
    RequestState,
    ResponseState,
    compile_policy,
    comprehension_depth,
)


def _ctx(headers=(("Host", "h"),), target="/"):
    st = RequestState("GET", target, "1.1", list(headers), "h", "http")
    return Context({"client_ip": "127.0.0.1"}, {"id": "ep"}, st), st


def test_head_bytes_never_lets_a_value_end_its_line():
    raw = head_bytes("GET / HTTP/1.1", [("Host", "h"), ("X-A", "a\r\nSet-Cookie: x=1\r\n\r\nGET /admin HTTP/1.1"), ("X-N", "n\0m")])
    head = parse_request_head(raw)
    assert [k for k, _ in head.headers] == [b"Host", b"X-A", b"X-N"]
    assert head.header(b"x-a") == b"a  Set-Cookie: x=1    GET /admin HTTP/1.1"
    assert head.header(b"x-n") == b"n m"
    assert raw.count(b"\r\n") == 5  # start line, three fields, blank line


def test_text_is_utf8_on_the_wire_and_wire_bytes_round_trip():
    raw = b"GET / HTTP/1.1\r\nHost: h\r\nX-U: \xc3\xbc\r\nX-B: a\xffb\r\n\r\n"
    req = parse_request_head(raw)
    headers = [(from_wire(k), from_wire(v)) for k, v in req.headers]
    ctx, st = _ctx(headers)
    st.add_header("X-E", "€")
    assert st.head() == raw[:-2] + "X-E: €\r\n\r\n".encode()
    # CEL sees text: UTF-8 decoded, an invalid byte as U+FFFD (never an error)
    pol = compile_policy("on_http_request:\n  - expressions: [\"req.headers['x-u'][0] == 'ü' && req.headers['x-b'][0] == 'a\\uFFFDb'\"]\n    actions: [{type: deny}]\n")
    assert isinstance(pol.run("on_http_request", ctx), Reply)
    rs = ResponseState(200, "OK", "1.1", [("X-R", "é")])
    assert rs.head() == "HTTP/1.1 200 OK\r\nX-R: é\r\n\r\n".encode()


def test_add_header_refuses_invalid_names():
    _, st = _ctx()
    with pytest.raises(ValueError):
        st.add_header("X-A\r\nX-B", "v")


@pytest.mark.parametrize(
    ("src", "depth"),
    [
        ("req.method == 'GET'", 0),
        ("req.headers.exists(k, k.matches('^x-'))", 1),
        ("req.headers.exists(k, req.headers[k].exists(v, v == 'a')) && [1].all(x, x > 0)", 2),
        ("req.headers.all(a, req.headers.all(b, req.headers.all(c, a == b)))", 3),
        ("'.exists(x, .all(y, .map(z, ' == req.method", 0),  # inside a string literal
    ],
)
def test_comprehension_depth(src, depth):
    assert comprehension_depth(src) == depth


def test_compile_time_caps():
    rule = "  - expressions: [\"req.method == 'GET'\"]\n    actions: [{type: deny}]\n"
    compile_policy("on_http_request:\n" + rule * engine.LIMITS.max_rules)
    with pytest.raises(PolicyError, match=f"at most {engine.LIMITS.max_rules}"):
        compile_policy("on_http_request:\n" + rule * (engine.LIMITS.max_rules + 1))
    with pytest.raises(PolicyError, match="nests comprehensions"):
        compile_policy(
            "on_http_request:\n  - expressions: [\"[1].all(a, [1].all(b, [1].all(c, a == b)))\"]\n    actions: [{type: deny}]\n"
        )
    long = "req.method == '" + "a" * engine.LIMITS.max_expression_chars + "'"
    with pytest.raises(PolicyError, match="longer than"):
        compile_policy({"on_http_request": [{"expressions": [long], "actions": [{"type": "deny"}]}]})
    many = {"on_http_request": [{"expressions": ["true"] * 300, "actions": [{"type": "deny"}]}] * 2}
    with pytest.raises(PolicyError, match="CEL expressions"):
        compile_policy(many)


def test_too_many_headers_for_cel_is_431_alone():
    pol = compile_policy("on_http_request:\n  - expressions: [\"'x' in req.headers\"]\n    actions: [{type: deny}]\n")
    ctx, _ = _ctx([("Host", "h")] + [(f"h{i}", "v") for i in range(engine.LIMITS.max_headers)])
    out = pol.run("on_http_request", ctx)
    assert isinstance(out, Reply) and out.status == 431
    assert ("ngrok-error-code", "ERR_NGROK_2253") in out.headers
    # an expression that does not read headers does not care
    lite = compile_policy("on_http_request:\n  - expressions: [\"req.method == 'POST'\"]\n    actions: [{type: deny}]\n")
    assert lite.run("on_http_request", ctx) is None


def test_budget_is_per_request_and_checked_before_every_expression(monkeypatch):
    rule = "  - expressions: [\"req.headers.exists(k, k.matches('^x-debug-'))\"]\n    actions: [{type: deny}]\n"
    pol = compile_policy("on_http_request:\n" + rule * 5)
    monkeypatch.setattr(engine.LIMITS, "eval_budget", 1e-9)
    ctx, _ = _ctx()
    out = pol.run("on_http_request", ctx)
    assert isinstance(out, Reply) and out.status == 500 and b"time budget" in out.body
    monkeypatch.setattr(engine.LIMITS, "eval_budget", 10.0)
    ctx, _ = _ctx()
    assert pol.run("on_http_request", ctx) is None
    ctx.spent = 10.0  # what earlier phases/hops of this request used counts too
    assert pol.run("on_http_request", ctx).status == 500


def test_interpolated_values_are_not_regex_templates():
    pol = compile_policy(
        "on_http_request:\n  - actions:\n      - type: url-rewrite\n"
        "        config: {from: '^/a/(.*)', to: '/b/$1/${req.query_params[\"x\"][0]}'}\n"
    )
    ctx, st = _ctx(target="/a/z?x=%5Cg%3C7%3E%E2%82%AC")
    assert pol.run("on_http_request", ctx) is None
    assert st.target == "/b/z?x=%5Cg%3C7%3E%E2%82%AC/\\g<7>%E2%82%AC"


def test_rewrite_patterns_run_in_linear_time_and_use_re2_syntax():
    """A tenant's ``(a+)+$`` against a crafted path: Python's backtracking ``re`` takes
    longer than the universe; RE2 answers (no match) at once.  Lookaround is refused when
    the policy is set, with RE2 named, as ngrok's (Go) syntax has none either."""
    pol = compile_policy(
        "on_http_request:\n  - actions:\n      - type: url-rewrite\n"
        "        config: {from: '^/(a+)+$', to: '/x'}\n"
    )
    ctx, st = _ctx(target="/" + "a" * 5000 + "b")
    assert pol.run("on_http_request", ctx) is None  # would hang here with `re`
    assert st.target == "/" + "a" * 5000 + "b"
    with pytest.raises(PolicyError, match="RE2"):
        compile_policy(
            "on_http_request:\n  - actions:\n      - type: redirect\n"
            "        config: {from: '^/(?!admin)', to: '/x'}\n"
        )
