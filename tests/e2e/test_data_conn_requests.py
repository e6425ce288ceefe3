"""The edge's requests for data connections survive connections that never arrive.

A hand-written agent speaks the control protocol to a real edge: it authenticates,
binds an http endpoint, and serves public requests over data connections it dials when
the edge sends ``need_data``.  It ignores the first ``need_data`` (a connection lost on
the way, or refused before its hello by the edge's pre-auth caps).  The edge must not
count on that connection forever: it asks again, and the request is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from backend import protocol as p
from tests.procs import host_of


async def _serve_one(ingress: tuple[str, int], session_id: str, key: str) -> None:
    """One data connection: hello, wait for ``start``, answer one HTTP request."""
    r, w = await asyncio.open_connection(*ingress)
    try:
        p.write_msg(w, p.DataHello(session_id=session_id, key=key))
        msg = await asyncio.wait_for(p.read_msg(r), 30)
        assert isinstance(msg, p.StartData)
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await w.drain()
    finally:
        w.close()


async def test_a_data_connection_that_never_comes_is_asked_for_again(edge) -> None:
    host, port = edge.ready["ingress_addr"].rsplit(":", 1)
    ingress = (host, int(port))
    ctx = ssl.create_default_context(cafile=edge.ready["ca_file"])
    r, w = await asyncio.open_connection(*ingress, ssl=ctx, server_hostname="127.0.0.1")
    p.write_msg(w, p.Auth(authtoken="test-authtoken", client_id="hand-written"))
    ok = await asyncio.wait_for(p.read_msg(r), 10)
    assert isinstance(ok, p.AuthOk), ok
    p.write_msg(w, p.Bind(req_id=1, name="web", proto="http"))
    bound = await asyncio.wait_for(p.read_msg(r), 10)
    assert isinstance(bound, p.BindOk), bound

    asks: list[int] = []
    served: list[asyncio.Task] = []

    async def control() -> None:
        while True:
            msg = await p.read_msg(r)
            if isinstance(msg, p.Ping):
                p.write_msg(w, p.Pong(id=msg.id, sent=msg.sent))
            elif isinstance(msg, p.NeedData):
                asks.append(msg.count)
                if len(asks) > 1:  # the first request for a connection is "lost"
                    served.extend(
                        asyncio.create_task(_serve_one(ingress, ok.session_id, ok.session_key))
                        for _ in range(msg.count)
                    )

    ctl = asyncio.create_task(control())
    try:
        h, hp = edge.http_addr
        pr, pw = await asyncio.open_connection(h, hp)
        pw.write(f"GET / HTTP/1.1\r\nHost: {host_of(bound.url)}\r\nConnection: close\r\n\r\n".encode())
        resp = await asyncio.wait_for(pr.read(), 30)
        pw.close()
        # served through a connection the edge asked for a second time, before its
        # 10 s wait for a data connection ran out (which answers with an error page)
        assert resp.startswith(b"HTTP/1.1 200 OK") and resp.endswith(b"ok"), resp[:300]
        assert len(asks) >= 2
        await asyncio.gather(*served)
    finally:
        ctl.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await ctl
        w.close()
