"""ClientHello parsing: the server name and the ALPN protocols, from real hellos."""

from __future__ import annotations

import ssl

import pytest

from backend.sni import Incomplete, NotTLS, parse_hello, parse_sni


def _hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight of a real ssl client."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_server_name_and_alpn():
    data = _hello("Shop.Example.com", ["acme-tls/1"])
    assert parse_hello(data) == ("shop.example.com", ("acme-tls/1",))
    assert parse_sni(data) == "shop.example.com"
    assert parse_hello(_hello("a.example", ["h2", "http/1.1"])) == ("a.example", ("h2", "http/1.1"))
    assert parse_hello(_hello("a.example")) == ("a.example", ())
    assert parse_hello(_hello(None, ["acme-tls/1"])) == (None, ("acme-tls/1",))


def test_truncated_and_foreign_bytes():
    data = _hello("a.example", ["acme-tls/1"])
    with pytest.raises(Incomplete):
        parse_hello(data[: len(data) // 2])
    with pytest.raises(NotTLS):
        parse_hello(b"GET / HTTP/1.1\r\n\r\n")
