"""Hypothesis strategies shared by the API fuzz tests: odd text, any JSON, policies, URLs."""

from __future__ import annotations

from hypothesis import strategies as st

B62 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
odd_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "é", "€", "\ud800", "\u202e", "a" * 300, "a" * 5000, "../..", "%2e%2e",
                     "${req.url}", "*", "x\r\nSet-Cookie: a=b"]),
)
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63, max_value=2**200),
    st.floats(allow_nan=False), odd_text,
)
json_any = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)
URLS = ["https://a.burrow.localhost", "http://b.burrow.localhost", "tcp://burrow.localhost:31001", "tcp://",
        "tls://c.burrow.localhost", "https://fuzzshop.burrow.localhost", "http://x.internal", "https://*.burrow.localhost",
        "https://shop", "http://127.0.0.1", "https://localhost", "ftp://x", "https://a..b", "https://[::1]:80",
        "https://xn--80ak6aa92e.burrow.localhost", "https://é.burrow.localhost", "https://a.burrow.localhost:99999"]
POLICIES = ['{"on_http_request":[{"actions":[{"type":"deny"}]}]}', "on_http_request: [", "{}", "[]", "null",
            '{"on_http_request":[{"expressions":["req.url.path.matches(\'(a+)+$\')"],"actions":[{"type":"deny"}]}]}',
            '{"on_http_request":[{"actions":[{"type":"custom-response","config":{"headers":{"x":"${req.url.query}"}}}]}]}',
            "a: " + "[" * 500, '{"on_tcp_connect":[{"actions":[{"type":"restrict-ips","config":{"allow":["x"]}}]}]}']
