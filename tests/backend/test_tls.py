"""Tests for backend.tls: the local CA, issued certificates and real TLS handshakes."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ipaddress
import os
import socket
import ssl
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from backend import tlshalf
from backend.tls import LocalCA, client_context

HOST = "abc.burrow.localhost"


@pytest.fixture
def ca(tmp_path: Path) -> LocalCA:
    return LocalCA.load_or_create(tmp_path / "data")


def _strict_client(ca_file: Path) -> ssl.SSLContext:
    """A client context that also applies OpenSSL's strict X.509 checks."""
    ctx = client_context(ca_file)
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


@asynccontextmanager
async def tls_echo_server(ctx: ssl.SSLContext) -> AsyncIterator[int]:
    """Run a TLS echo server on 127.0.0.1 port 0 and yield its port."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await reader.readline()
            writer.write(data)
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def talk(port: int, ctx: ssl.SSLContext, server_hostname: str) -> x509.Certificate:
    """Handshake, echo a line, and return the certificate the server presented."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=server_hostname),
        timeout=10,
    )
    try:
        writer.write(b"hello burrow\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.readline(), timeout=10) == b"hello burrow\n"
        sslobj = writer.get_extra_info("ssl_object")
        assert sslobj.version() in ("TLSv1.2", "TLSv1.3")
        der = sslobj.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der)
    finally:
        writer.close()
        with suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def _dns_names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


# -- the CA on disk ---------------------------------------------------------------------


def test_ca_created_with_expected_properties(ca: LocalCA, tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert ca.ca_file == data / "ca.pem"
    assert ca.ca_file.is_file()
    key_file = data / "ca-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    cert = x509.load_pem_x509_certificate(ca.ca_file.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "burrow local CA"
    assert cert.subject == cert.issuer
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime >= dt.timedelta(days=3649)


def test_ca_reloaded_not_recreated(ca: LocalCA, tmp_path: Path) -> None:
    pem = ca.ca_file.read_bytes()
    again = LocalCA.load_or_create(tmp_path / "data")
    assert again.ca_file.read_bytes() == pem
    assert again.cert == ca.cert


def test_loose_key_permissions_are_tightened(ca: LocalCA, tmp_path: Path) -> None:
    key_file = tmp_path / "data" / "ca-key.pem"
    key_file.chmod(0o644)
    LocalCA.load_or_create(tmp_path / "data")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_cert_without_key_is_an_error(ca: LocalCA, tmp_path: Path) -> None:
    (tmp_path / "data" / "ca-key.pem").unlink()
    with pytest.raises(FileNotFoundError):
        LocalCA.load_or_create(tmp_path / "data")


def test_mismatched_key_is_an_error(tmp_path: Path) -> None:
    LocalCA.load_or_create(tmp_path / "one")
    LocalCA.load_or_create(tmp_path / "two")
    (tmp_path / "one" / "ca-key.pem").write_bytes((tmp_path / "two" / "ca-key.pem").read_bytes())
    with pytest.raises(ValueError, match="does not match"):
        LocalCA.load_or_create(tmp_path / "one")


# -- issued certificates ----------------------------------------------------------------


def test_issue_leaf(ca: LocalCA) -> None:
    chain, key_pem = ca.issue([HOST, "127.0.0.1", "::1", "Burrow.Localhost."])
    certs = x509.load_pem_x509_certificates(chain)
    assert len(certs) == 2
    leaf, root = certs
    assert root == ca.cert
    assert leaf.issuer == ca.cert.subject
    leaf.verify_directly_issued_by(ca.cert)
    assert b"PRIVATE KEY" in key_pem

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST, "burrow.localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    now = dt.datetime.now(dt.UTC)
    backdate = now - leaf.not_valid_before_utc
    assert dt.timedelta(minutes=59) <= backdate <= dt.timedelta(minutes=61)
    assert dt.timedelta(days=364) <= leaf.not_valid_after_utc - now <= dt.timedelta(days=366)


def test_issue_key_types(ca: LocalCA) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    for key_type, cls in (("ecdsa", ec.EllipticCurvePublicKey), ("rsa", rsa.RSAPublicKey)):
        chain, key_pem = ca.issue(["ingress.example.com"], key_type)
        leaf = x509.load_pem_x509_certificate(chain)
        assert isinstance(leaf.public_key(), cls)
        assert load_pem_private_key(key_pem, None).public_key().public_numbers() == leaf.public_key().public_numbers()
        leaf.verify_directly_issued_by(ca.cert)
    with pytest.raises(ValueError, match="key type"):
        ca.issue(["x.example.com"], "dsa")


def test_issue_needs_a_name(ca: LocalCA) -> None:
    with pytest.raises(ValueError):
        ca.issue([])


def test_server_context_is_cached(ca: LocalCA) -> None:
    first = ca.server_context([HOST, "localhost"])
    assert ca.server_context(["localhost", HOST]) is first
    assert ca.server_context([HOST]) is not first
    assert first.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ca.sni_context(["burrow.localhost"]) is ca.sni_context(["burrow.localhost"])


def test_client_context_defaults() -> None:
    ctx = client_context(None)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_no_leaf_key_left_on_disk(ca: LocalCA, tmp_path: Path) -> None:
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("burrow-leaf-*"))
    ca.server_context(["leftover.burrow.localhost"])
    after = set(Path(tempfile.gettempdir()).glob("burrow-leaf-*"))
    assert after == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ca-key.pem", "ca.pem"]


# -- real handshakes --------------------------------------------------------------------


@pytest.mark.parametrize("make_client", [client_context, _strict_client])
async def test_handshake_server_context(
    ca: LocalCA, make_client: Callable[[Path], ssl.SSLContext]
) -> None:
    async with tls_echo_server(ca.server_context([HOST])) as port:
        cert = await talk(port, make_client(ca.ca_file), HOST)
    assert _dns_names(cert) == [HOST]


async def test_handshake_by_ip(ca: LocalCA) -> None:
    async with tls_echo_server(ca.server_context(["127.0.0.1"])) as port:
        cert = await talk(port, _strict_client(ca.ca_file), "127.0.0.1")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


async def test_handshake_sni_issues_per_name(ca: LocalCA) -> None:
    ctx = ca.sni_context(["burrow.localhost"])
    client = _strict_client(ca.ca_file)
    async with tls_echo_server(ctx) as port:
        cert = await talk(port, client, HOST)
        assert _dns_names(cert) == [HOST]
        other = await talk(port, client, "xyz.burrow.localhost")
        assert _dns_names(other) == ["xyz.burrow.localhost"]
        again = await talk(port, client, HOST)  # served from the cache: same certificate
        assert again == cert
        default = await talk(port, client, "burrow.localhost")
        assert _dns_names(default) == ["burrow.localhost"]


async def test_handshake_sni_without_name_gets_default(ca: LocalCA) -> None:
    ctx = ca.sni_context(["burrow.localhost"])
    client = client_context(ca.ca_file)
    client.check_hostname = False  # lets us send no SNI at all
    async with tls_echo_server(ctx) as port:
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname=""
        )
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        await writer.wait_closed()
    assert _dns_names(x509.load_der_x509_certificate(der)) == ["burrow.localhost"]


async def test_handshake_fails_with_other_ca(ca: LocalCA, tmp_path: Path) -> None:
    other = LocalCA.load_or_create(tmp_path / "other")
    assert other.cert != ca.cert
    for server_ctx in (ca.server_context([HOST]), ca.sni_context(["burrow.localhost"])):
        async with tls_echo_server(server_ctx) as port:
            with pytest.raises(ssl.SSLCertVerificationError):
                await talk(port, client_context(other.ca_file), HOST)


async def test_handshake_fails_for_wrong_name(ca: LocalCA) -> None:
    async with tls_echo_server(ca.server_context(["other.burrow.localhost"])) as port:
        with pytest.raises(ssl.SSLCertVerificationError):
            await talk(port, client_context(ca.ca_file), HOST)


def test_sni_cache_is_bounded_lru(ca: LocalCA, monkeypatch: pytest.MonkeyPatch) -> None:
    import backend.tls as tls

    monkeypatch.setattr(tls, "SNI_CACHE_SIZE", 3)
    first = ca._context_for_name("a.burrow.localhost")
    ca._context_for_name("b.burrow.localhost")
    ca._context_for_name("c.burrow.localhost")
    assert ca._context_for_name("a.burrow.localhost") is first  # refreshes "a"
    ca._context_for_name("d.burrow.localhost")  # evicts "b", the least recently used
    assert list(ca._sni_cache) == ["c.burrow.localhost", "a.burrow.localhost", "d.burrow.localhost"]


async def test_handshake_sni_bad_name_gets_default(ca: LocalCA) -> None:
    ctx = ca.sni_context(["burrow.localhost"])
    client = client_context(ca.ca_file)
    client.check_hostname = False
    async with tls_echo_server(ctx) as port:
        cert = await talk(port, client, "-bad-.burrow.localhost")
    assert _dns_names(cert) == ["burrow.localhost"]
    assert "-bad-.burrow.localhost" not in ca._sni_cache


# --------------------------------------------------------- tlshalf: TLS that half-closes
@asynccontextmanager
async def half_close_pair(
    ca: LocalCA, client_ctx: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], ...]]:
    """A tlshalf client and server connected over 127.0.0.1: ((cr, cw), (sr, sw))."""
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    lsock.setblocking(False)
    port = lsock.getsockname()[1]
    ctx = client_ctx or tlshalf.data_context(client_context(ca.ca_file))
    try:
        accepted = asyncio.ensure_future(loop.sock_accept(lsock))
        client = asyncio.ensure_future(tlshalf.open_connection("127.0.0.1", port, ctx, HOST, 2**16))
        sock, _ = await asyncio.wait_for(accepted, 5)
        server = await tlshalf.accept(sock, ca.server_context([HOST]), 2**16, 5)
        client_pair = await asyncio.wait_for(client, 5)
        try:
            yield client_pair, server
        finally:
            client_pair[1].close()
            server[1].close()
    finally:
        lsock.close()


async def _send(w: asyncio.StreamWriter, data: bytes) -> None:
    view = memoryview(data)
    for i in range(0, len(view), 1 << 20):
        w.write(view[i : i + (1 << 20)])
        await w.drain()
    w.write_eof()


async def _digest(r: asyncio.StreamReader) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    while chunk := await r.read(1 << 20):
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


async def test_half_close_each_direction_on_its_own(ca: LocalCA) -> None:
    async with half_close_pair(ca) as ((cr, cw), (sr, sw)):
        assert cw.get_extra_info("ssl_object").version() == "TLSv1.3"
        assert cw.get_extra_info("ssl_object").selected_alpn_protocol() is None  # server offers none
        assert cw.can_write_eof() and sw.can_write_eof()
        cw.write(b"request")
        cw.write_eof()  # close_notify + FIN; the client keeps reading
        assert await asyncio.wait_for(sr.read(), 5) == b"request"
        assert sr.at_eof()
        reply = b"reply after the client's close_notify"
        sw.write(reply)
        await sw.drain()
        assert await asyncio.wait_for(cr.readexactly(len(reply)), 5) == reply
        with pytest.raises(RuntimeError):
            cw.write(b"more")  # after write_eof, as on a plain transport
        sw.write_eof()
        assert await asyncio.wait_for(cr.read(), 5) == b""
        # both directions closed: both ends close by themselves (nobody calls close())
        await asyncio.wait_for(cw.wait_closed(), 5)
        await asyncio.wait_for(sw.wait_closed(), 5)


async def test_half_close_large_both_ways_at_once(ca: LocalCA) -> None:
    """8 MiB each way while each side half-closes with the other direction still
    flowing (records arriving around our close_notify are not lost)."""
    up, down = os.urandom(8 << 20), os.urandom(8 << 20)
    async with half_close_pair(ca) as ((cr, cw), (sr, sw)):
        results = await asyncio.wait_for(
            asyncio.gather(_send(cw, up), _send(sw, down), _digest(sr), _digest(cr)), 30
        )
    assert results[2] == (len(up), hashlib.sha256(up).hexdigest())
    assert results[3] == (len(down), hashlib.sha256(down).hexdigest())


async def test_tls12_does_not_half_close(ca: LocalCA) -> None:
    ctx = tlshalf.data_context(client_context(ca.ca_file))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with half_close_pair(ca, ctx) as ((_, cw), (sr, sw)):
        assert cw.get_extra_info("ssl_object").version() == "TLSv1.2"
        assert not cw.can_write_eof() and not sw.can_write_eof()
        cw.write(b"last words")
        cw.close()  # close_notify: under TLS 1.2 the server closes its side too
        assert await asyncio.wait_for(sr.read(), 5) == b"last words"
        await asyncio.wait_for(sw.wait_closed(), 5)


async def test_half_close_handshake_fails_against_another_ca(ca: LocalCA, tmp_path: Path) -> None:
    other = LocalCA.load_or_create(tmp_path / "other")
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    lsock.setblocking(False)
    ctx = tlshalf.data_context(client_context(other.ca_file))
    try:
        client = asyncio.ensure_future(tlshalf.open_connection("127.0.0.1", lsock.getsockname()[1], ctx, HOST, 2**16))
        sock, _ = await asyncio.wait_for(loop.sock_accept(lsock), 5)
        server = asyncio.ensure_future(tlshalf.accept(sock, ca.server_context([HOST]), 2**16, 5))
        c_exc, s_exc = await asyncio.wait_for(asyncio.gather(client, server, return_exceptions=True), 10)
    finally:
        lsock.close()
    assert isinstance(c_exc, ssl.SSLCertVerificationError)
    assert isinstance(s_exc, ssl.SSLError)  # the client's unknown-CA alert
    assert sock.fileno() == -1  # closed


async def test_half_close_handshake_timeout(ca: LocalCA) -> None:
    """A client that connects and says nothing: accept() gives up and closes the socket."""
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    lsock.setblocking(False)
    r, w = await asyncio.open_connection("127.0.0.1", lsock.getsockname()[1])
    try:
        sock, _ = await asyncio.wait_for(loop.sock_accept(lsock), 5)
        with pytest.raises(TimeoutError):
            await tlshalf.accept(sock, ca.server_context([HOST]), 2**16, 0.2)
        assert await asyncio.wait_for(r.read(), 5) == b""  # the server side is gone
    finally:
        w.close()
        lsock.close()


async def test_half_close_fin_without_close_notify_ends_reading(ca: LocalCA) -> None:
    """A FIN with no close_notify before it ends the reader (as asyncio's TLS does); the
    other direction still works."""
    async with half_close_pair(ca) as ((cr, cw), (sr, sw)):
        cw.write(b"abc")
        await cw.drain()
        cw.transport.get_extra_info("socket").shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(sr.read(), 5) == b"abc"
        sw.write(b"still here")
        assert await asyncio.wait_for(cr.readexactly(10), 5) == b"still here"
