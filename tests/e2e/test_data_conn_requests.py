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
from collections.abc import Callable

from backend import protocol as p
from tests.procs import host_of


async def _first_request(
    ingress: tuple[str, int], session_id: str, key: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Dial a data connection: hello, wait for ``start``, read the head of the request
    it carries.  Returns (reader, writer, head); the caller closes the writer."""
    r, w = await asyncio.open_connection(*ingress)
    try:
        p.write_msg(w, p.DataHello(session_id=session_id, key=key))
        msg = await asyncio.wait_for(p.read_msg(r), 30)
        assert isinstance(msg, p.StartData)
        return r, w, await r.readuntil(b"\r\n\r\n")
    except BaseException:
        w.close()
        raise


async def _serve_one(ingress: tuple[str, int], session_id: str, key: str, answer: bool = True) -> bytes:
    """One data connection: hello, wait for ``start``, answer one HTTP request (or,
    ``answer`` false, read its head and close: a connection that dies as a request
    goes out).  Returns the request head."""
    _, w, head = await _first_request(ingress, session_id, key)
    try:
        if answer:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await w.drain()
        return head
    finally:
        w.close()


async def _hand_written_agent(edge, reuse_data: bool = False):
    """A hand-written agent's control connection with an http endpoint bound:
    (ingress address, reader, writer, AuthOk, BindOk)."""
    host, port = edge.ready["ingress_addr"].rsplit(":", 1)
    ingress = (host, int(port))
    ctx = ssl.create_default_context(cafile=edge.ready["ca_file"])
    r, w = await asyncio.open_connection(*ingress, ssl=ctx, server_hostname="127.0.0.1")
    p.write_msg(w, p.Auth(authtoken="test-authtoken", client_id="hand-written", reuse_data=reuse_data))
    ok = await asyncio.wait_for(p.read_msg(r), 10)
    assert isinstance(ok, p.AuthOk), ok
    p.write_msg(w, p.Bind(req_id=1, name="web", proto="http"))
    bound = await asyncio.wait_for(p.read_msg(r), 10)
    assert isinstance(bound, p.BindOk), bound
    return ingress, r, w, ok, bound


async def _control(r: asyncio.StreamReader, w: asyncio.StreamWriter, on_need: Callable[[int], None]) -> None:
    """The hand-written agent's control loop: a pong for each ping, and each
    ``need_data``'s count to ``on_need``."""
    while True:
        msg = await p.read_msg(r)
        if isinstance(msg, p.Ping):
            p.write_msg(w, p.Pong(id=msg.id, sent=msg.sent))
        elif isinstance(msg, p.NeedData):
            on_need(msg.count)


async def _stop(ctl: asyncio.Task, tasks: list[asyncio.Task], w: asyncio.StreamWriter) -> None:
    """End a hand-written agent: its control loop, its data connections' tasks, its
    control connection."""
    ctl.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await ctl
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    w.close()


async def test_a_data_connection_that_never_comes_is_asked_for_again(edge) -> None:
    ingress, r, w, ok, bound = await _hand_written_agent(edge)

    asks: list[int] = []
    served: list[asyncio.Task] = []

    def need(count: int) -> None:
        asks.append(count)
        if len(asks) > 1:  # the first request for a connection is "lost"
            served.extend(
                asyncio.create_task(_serve_one(ingress, ok.session_id, ok.session_key)) for _ in range(count)
            )

    ctl = asyncio.create_task(_control(r, w, need))
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
        await _stop(ctl, served, w)


async def _public(edge, raw: bytes) -> bytes:
    h, hp = edge.http_addr
    pr, pw = await asyncio.open_connection(h, hp)
    try:
        pw.write(raw)
        return await asyncio.wait_for(pr.read(), 30)
    finally:
        pw.close()


async def test_a_bodiless_get_whose_data_connection_dies_goes_once_more(edge) -> None:
    """A data connection that closes as the request reaches it (the agent dropped it,
    its edge died behind a peer link): a GET goes again on a fresh connection and is
    answered; a POST with a body, which cannot go twice, gets the 502 page; and a GET
    whose second connection dies as well gets the 502 page too, not a third try."""
    ingress, r, w, ok, bound = await _hand_written_agent(edge)
    plan: list[bool] = []  # answer or drop, one per data connection the edge asks for
    heads: list[bytes] = []
    served: list[asyncio.Task] = []

    async def one(answer: bool) -> None:
        heads.append(await _serve_one(ingress, ok.session_id, ok.session_key, answer))

    def need(count: int) -> None:
        for _ in range(count):
            served.append(asyncio.create_task(one(plan.pop(0) if plan else False)))

    ctl = asyncio.create_task(_control(r, w, need))
    host = host_of(bound.url)
    try:
        plan[:] = [False, True]
        resp = await _public(edge, f"GET /again HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert resp.startswith(b"HTTP/1.1 200 OK") and resp.endswith(b"ok"), resp[:300]
        assert [h.split(b"\r\n", 1)[0] for h in heads] == [b"GET /again HTTP/1.1"] * 2

        heads.clear()
        plan[:] = [False, True]
        resp = await _public(
            edge, f"POST /once HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc".encode()
        )
        assert resp.startswith(b"HTTP/1.1 502 "), resp[:300]
        assert [h.split(b"\r\n", 1)[0] for h in heads] == [b"POST /once HTTP/1.1"]

        heads.clear()
        plan[:] = [False, False]
        resp = await _public(edge, f"GET /twice HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert resp.startswith(b"HTTP/1.1 502 "), resp[:300]
        assert [h.split(b"\r\n", 1)[0] for h in heads].count(b"GET /twice HTTP/1.1") == 2
    finally:
        await _stop(ctl, served, w)


async def test_a_pooled_data_connection_that_speaks_out_of_turn_is_not_handed_out(edge) -> None:
    """An agent that takes data connections back (reuse_data) but, once one is pooled
    again, writes a response nobody asked for: that connection is closed when it would
    be handed out, and the next public request is served by a clean one, never answered
    with the unsolicited bytes."""
    ingress, r, w, ok, bound = await _hand_written_agent(edge, reuse_data=True)
    pooled = asyncio.Event()
    tasks: list[asyncio.Task] = []

    async def rogue() -> None:  # serves one request, then speaks out of turn when pooled
        dr, dw, _ = await _first_request(ingress, ok.session_id, ok.session_key)
        try:
            dw.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            assert isinstance(await asyncio.wait_for(p.read_msg(dr), 30), p.DataPooled)
            dw.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nspoof")
            await dw.drain()
            pooled.set()
            await dr.read()  # until the edge closes it
        finally:
            dw.close()

    async def honest() -> None:
        await _serve_one(ingress, ok.session_id, ok.session_key)

    def need(count: int) -> None:  # the first connection asked for is the rogue one
        for _ in range(count):
            tasks.append(asyncio.create_task(honest() if tasks else rogue()))

    ctl = asyncio.create_task(_control(r, w, need))
    host = host_of(bound.url)
    try:
        h, hp = edge.http_addr
        pr, pw = await asyncio.open_connection(h, hp)
        pw.write(f"GET /one HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert (await asyncio.wait_for(pr.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(pr.readexactly(2), 10) == b"ok"
        pw.close()  # between two exchanges: the data connection goes back to the pool
        await asyncio.wait_for(pooled.wait(), 10)
        await asyncio.sleep(0.2)
        pr, pw = await asyncio.open_connection(h, hp)
        pw.write(f"GET /two HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        resp = await asyncio.wait_for(pr.read(), 30)
        pw.close()
        assert resp.startswith(b"HTTP/1.1 200 OK") and resp.endswith(b"ok") and b"spoof" not in resp, resp[:300]
    finally:
        await _stop(ctl, tasks, w)


async def test_data_connections_given_back_after_a_burst_are_pooled_up_to_a_bound(edge) -> None:
    """40 keep-alive public connections, each served on its own data connection, all end
    between two exchanges: at most Session.GIVE_BACK_MAX (32) of their data connections
    go back to the edge's pool (a ``pooled`` frame), the rest are closed, so a burst
    leaves no pool of hundreds behind."""
    ingress, r, w, ok, bound = await _hand_written_agent(edge, reuse_data=True)
    host = host_of(bound.url)
    fates: list[str] = []
    tasks: list[asyncio.Task] = []

    async def keeper() -> None:  # one exchange, answered keep-alive, then its fate
        dr, dw, _ = await _first_request(ingress, ok.session_id, ok.session_key)
        try:
            dw.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            try:
                msg = await asyncio.wait_for(p.read_msg(dr), 30)
                fates.append("pooled" if isinstance(msg, p.DataPooled) else repr(msg))
            except asyncio.IncompleteReadError:
                fates.append("closed")
        finally:
            dw.close()

    def need(count: int) -> None:
        tasks.extend(asyncio.create_task(keeper()) for _ in range(count))

    ctl = asyncio.create_task(_control(r, w, need))
    clients = []
    try:
        for _ in range(40):
            pr, pw = await asyncio.open_connection(*edge.http_addr)
            pw.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            clients.append((pr, pw))
        for pr, _ in clients:  # every one answered on its own data connection, kept open
            assert (await asyncio.wait_for(pr.readuntil(b"ok"), 30)).startswith(b"HTTP/1.1 200 OK")
        for _, pw in clients:
            pw.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while len(fates) < 40 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert len(fates) == 40, fates
        pooled = fates.count("pooled")  # fewer if spare connections the edge asked for hold slots
        assert 0 < pooled <= 32 and fates.count("closed") == 40 - pooled, fates
    finally:
        await _stop(ctl, tasks, w)
