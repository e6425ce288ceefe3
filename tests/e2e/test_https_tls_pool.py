"""HTTPS termination with the edge's CA, TLS passthrough by SNI, and endpoint pooling."""

from __future__ import annotations

import asyncio
import ssl

import httpx
from cryptography import x509

from backend.tls import LocalCA
from tests.procs import host_of
from tests.upstreams import HTTPUpstream


async def _tls_get(port: int, sni: str, ctx: ssl.SSLContext, path: str = "/") -> tuple[bytes, ssl.SSLObject]:
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni)
    w.write(f"GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(r.read(), 10)
    peer = w.get_extra_info("ssl_object")
    w.close()
    return data, peer


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_https_endpoint_verified_with_edge_ca(edge, agents):
    async with HTTPUpstream() as up:
        a = agents("http", up.port, "--url", "https://secure.burrow.localhost")
        url = a.public_url
        assert url.startswith("https://secure.burrow.localhost:")
        ctx = ssl.create_default_context(cafile=edge.ready["ca_file"])
        data, _ = await _tls_get(_port(url), "secure.burrow.localhost", ctx, "/over-tls")
        assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"GET /over-tls\n")
        assert b"X-Forwarded-Proto: https" in up.requests[0][0]
        # a client that does not trust the edge's CA refuses the certificate
        strict = ssl.create_default_context()
        try:
            await _tls_get(_port(url), "secure.burrow.localhost", strict)
            raise AssertionError("handshake should fail without the edge's CA")
        except ssl.SSLCertVerificationError:
            pass


async def test_tls_endpoint_passes_upstream_tls_through(edge, agents, tmp_path):
    up_ca = LocalCA.load_or_create(tmp_path / "upstream-ca")
    server_ctx = up_ca.server_context(["passthru.burrow.localhost"])

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        body = b"terminated by the upstream"
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    try:
        port = server.sockets[0].getsockname()[1]
        a = agents("tls", port, "--url", "tls://passthru.burrow.localhost")
        assert a.public_url.startswith("tls://passthru.burrow.localhost:")
        # trust only the upstream's CA: the handshake succeeds only if the edge did not terminate
        ctx = ssl.create_default_context(cafile=str(up_ca.ca_file))
        data, peer = await _tls_get(_port(a.public_url), "passthru.burrow.localhost", ctx)
        assert data.endswith(b"terminated by the upstream")
        leaf = x509.load_der_x509_certificate(peer.getpeercert(binary_form=True))
        leaf.verify_directly_issued_by(up_ca.cert)  # the upstream's own certificate
        # and the edge's own CA does not verify it
        edge_ctx = ssl.create_default_context(cafile=edge.ready["ca_file"])
        try:
            await _tls_get(_port(a.public_url), "passthru.burrow.localhost", edge_ctx)
            raise AssertionError("the edge's CA must not verify the upstream's certificate")
        except ssl.SSLCertVerificationError:
            pass
    finally:
        server.close()


async def test_pooled_agents_share_traffic_and_unpooled_bind_conflicts(edge, agents):
    async with HTTPUpstream() as up1, HTTPUpstream() as up2:
        url = "http://pool.burrow.localhost"
        a = agents("http", up1.port, "--url", url, "--pooling-enabled")
        b = agents("http", up2.port, "--url", url, "--pooling-enabled")
        assert a.public_url == b.public_url
        host, port = edge.http_addr
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as c:
            for i in range(20):
                r = await c.get(f"/r{i}", headers={"Host": host_of(a.public_url)})
                assert r.status_code == 200
        assert len(up1.requests) + len(up2.requests) == 20
        assert len(up1.requests) >= 5 and len(up2.requests) >= 5

        c3 = agents("http", up1.port, "--url", url, check=False)
        assert c3.wait_exit() != 0
        err = c3.stderr.strip()
        assert "already online" in err and len(err.splitlines()) == 1
