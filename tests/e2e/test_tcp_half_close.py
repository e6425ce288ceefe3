"""A TCP client's half-close must reach the upstream without losing the reply.

Request/response protocols over a tcp endpoint often send their request, shut down
their writing side (``nc -N``, ``shutdown(SHUT_WR)``) and then read the answer.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.upstreams import TCPEcho


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(
            ("--data-tls",),
            marks=pytest.mark.xfail(
                strict=True,
                reason="known limitation: asyncio's SSL transports cannot half-close, so with "
                "TLS data connections (forced here; the default for a remote edge) a client's "
                "half-close ends the whole connection and the upstream's reply is lost",
            ),
            id="tls-data",
        ),
        pytest.param((), id="default-loopback-plain"),
        pytest.param(("--no-data-tls",), id="plain-data"),
    ],
)
async def test_reply_after_client_half_close_comes_back(edge, agents, flags) -> None:
    async with TCPEcho() as up:
        a = agents("tcp", up.port, *flags)
        port = int(a.public_url.rsplit(":", 1)[1])
        payload = os.urandom(256 * 1024)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            w.write(payload)
            w.write_eof()  # nothing more to send; the echo is still on its way back
            got = await asyncio.wait_for(r.read(), 10)
        finally:
            w.close()
        assert len(got) == len(payload)
        assert got == payload
