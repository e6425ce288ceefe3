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
        # TLS data connections (forced here; the default for a remote edge) half-close
        # with close_notify (TLS 1.3, see backend/tlshalf.py)
        pytest.param(("--data-tls",), id="tls-data"),
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
