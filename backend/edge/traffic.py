"""Public traffic through the edge: route, run traffic policy, forward to an agent.

HTTP connections are handled request by request: each request is routed by Host,
passed through the endpoint's policy (which may answer, close, rewrite or forward it to
an internal endpoint), then proxied over a data connection to the owning agent.  TCP
and passed-through TLS connections run ``on_tcp_connect`` and are relayed raw.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from backend import metrics, pages
from backend.edge.sessions import Endpoint, SessionClosed
from backend.http1 import (
    NO_BODY,
    REPLACE,
    Head,
    HTTPError,
    UpstreamClosed,
    UpstreamError,
    add_headers,
    drain,
    from_wire,
    normalize_target,
    parse_request_head,
    proxy_exchange,
    read_head,
    retryable,
    simple_response,
)
from backend.netutil import normalize_host
from backend.policy.engine import Close, Context, Forward, Reply, RequestState, ResponseState
from backend.relay import close, relay, tune

if TYPE_CHECKING:
    from backend.edge.server import Edge

HEAD_TIMEOUT = 30.0  # first request head must arrive within this (408 otherwise)
IDLE_TIMEOUT = 75.0  # keep-alive connections idle longer than this are closed
# A keep-alive connection that sends no request for this long gives its data connection
# back (the agent then closes its upstream connection too), so an idle client costs the
# edge one descriptor instead of two; its next request takes a fresh pooled one.
RELEASE_AFTER = 1.0
MAX_HOPS = 8  # forward-internal chain length
ACME_CHALLENGE = b"/.well-known/acme-challenge/"

# Answer to a connection over the overall or per-address cap (then closed).
TOO_MANY_CONNECTIONS = simple_response(
    503, b"too many connections\n", headers=[("Retry-After", "1"), ("Cache-Control", "no-store")]
)


def endpoint_vars(ep: Endpoint) -> dict:
    return {"id": ep.id, "url": ep.url, "host": ep.host, "proto": ep.proto, "binding": ep.binding, "type": ep.type}


def conn_vars(writer: asyncio.StreamWriter) -> dict:
    peer = writer.get_extra_info("peername") or ("", 0)
    local = writer.get_extra_info("sockname") or ("", 0)
    return {"client_ip": peer[0], "client_port": peer[1], "server_ip": local[0], "server_port": local[1]}


def reply_bytes(r: Reply, keep_alive: bool) -> bytes:
    ctype = "text/plain; charset=utf-8"
    extra = []
    for k, v in r.headers:
        if k.lower() == "content-type":
            ctype = v
        elif k.lower() != "content-length":
            extra.append((k, v))
    return simple_response(r.status, r.body, ctype, extra, close=not keep_alive)


def _split_url(url: str) -> tuple[str, str, int]:
    scheme, _, rest = url.partition("://")
    hostport = rest.split("/", 1)[0]
    host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
    return scheme.lower(), host.lower(), int(port) if port.isdigit() else 0


def internal_target(edge: Edge, front: Endpoint, url: str) -> Endpoint | None:
    """The internal endpoint ``url`` names, in the front endpoint's account only."""
    scheme, host, port = _split_url(url)
    reg = edge.registry
    if scheme == "tcp":
        return reg.route_internal(front.account_id, "tcp", f"{host}:{port}")
    target = reg.route_internal(front.account_id, scheme, host)
    if target is None and scheme in ("http", "https"):  # either scheme reaches an http endpoint
        target = reg.route_internal(front.account_id, "https" if scheme == "http" else "http", host)
    return target


async def serve_http(edge: Edge, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, scheme: str) -> None:
    conn = conn_vars(writer)
    tune(writer)
    dc: tuple[Endpoint, asyncio.StreamReader, asyncio.StreamWriter] | None = None
    clean = False  # dc sits between two exchanges (it may be pooled again)
    connected: set[str] = set()  # endpoints whose on_tcp_connect already ran on this connection
    first = True
    last_head: Head | None = None  # the previous request's head, and from it:
    req = host = None  # its normal form and its Host, normalised
    loop = asyncio.get_running_loop()
    expired = False
    cfg = edge.config
    body_timeout = cfg.body_timeout or None
    send_timeout = cfg.send_timeout or None

    # One timer per connection, not one per request (a uvloop call_later + cancel costs
    # ~3 us, a tenth of the edge's time for a small request): it is armed when a head
    # wait starts and none is pending, and when it fires it looks at how long the
    # current wait has lasted, acts if that is long enough and otherwise re-arms for the
    # rest.  A timer that fires while a request is in flight just lapses.
    timer: asyncio.TimerHandle | None = None
    due = 0.0  # when the timer fires
    waiting = False  # awaiting a request head (the only time the deadlines run)
    since = 0.0  # loop.time() when that wait began

    def expire() -> None:  # a head that does not arrive in time closes the connection
        nonlocal expired
        expired = True
        if first:
            writer.write(pages.bad_request(408, "request timeout"))
        writer.transport.close()

    def limit() -> float:  # how long the current wait may last before the next step
        return HEAD_TIMEOUT if first else RELEASE_AFTER if dc is not None else IDLE_TIMEOUT

    def arm() -> None:
        nonlocal timer, due
        due = since + limit()
        timer = loop.call_at(due, check)

    def check() -> None:
        nonlocal dc, timer
        timer = None
        if not waiting or expired:
            return
        elapsed = loop.time() - since
        if elapsed >= limit():
            if first or dc is None:
                expire()
                return
            # idle with a data connection: give it back, keep waiting for the rest
            _let_go(dc, True)
            dc = None
        arm()

    try:
        while True:
            waiting, since = True, loop.time()
            if timer is None:
                arm()
            elif due > since + limit():  # armed for a longer wait (the first head's)
                timer.cancel()
                arm()
            try:
                raw = await read_head(reader)
            finally:
                waiting = False
            if raw is None or expired:
                break
            first = False
            # Policy sees, and the agent gets, the target in one normal form (origin form,
            # unreserved escapes decoded, no dot segments): /%61dmin is /admin for both.
            head = parse_request_head(raw)
            if head is not last_head:  # a repeated request is the same (cached) Head
                req = normalize_target(head)
                host = normalize_host(req.host)
                last_head = head
            if edge.acme is not None and req.target.startswith(ACME_CHALLENGE) and scheme == "http":
                # an ACME CA validating an http-01 challenge: answered before routing
                answer = edge.acme.answers.http01(req.target[len(ACME_CHALLENGE) :].decode("latin-1"))
                if answer is not None:
                    writer.write(simple_response(200, answer, "application/octet-stream"))
                    break
            ep = edge.registry.route("public", scheme, host) if host else None
            if ep is None:
                writer.write(pages.endpoint_offline(host or "(no Host header)"))
                metrics.http_request(404)
                break

            # ---- traffic policy: on_tcp_connect (once per endpoint), on_http_request
            state: RequestState | None = None
            ctx: Context | None = None
            responders: list[Endpoint] = []
            outcome = None
            hops = 0
            while True:
                policy = ep.policy
                if policy is not None:
                    if ctx is None:
                        state = RequestState(
                            req.method.decode("latin-1"),
                            from_wire(req.target),
                            req.version,
                            [(from_wire(k), from_wire(v)) for k, v in req.headers],
                            host,
                            scheme,
                        )
                        ctx = Context(conn, endpoint_vars(ep), state)
                    else:
                        ctx.endpoint = endpoint_vars(ep)
                        ctx.changed("endpoint")
                    if ep.id not in connected and policy.has("on_tcp_connect"):
                        connected.add(ep.id)
                        outcome = policy.run("on_tcp_connect", ctx)
                    if outcome is None:
                        outcome = policy.run("on_http_request", ctx)
                    if policy.has("on_http_response"):
                        responders.append(ep)
                if isinstance(outcome, Forward):
                    target = internal_target(edge, ep, outcome.url) if hops < MAX_HOPS else None
                    if target is not None:
                        ep, outcome, hops = target, None, hops + 1
                        continue
                    if outcome.on_error == "continue":
                        outcome = None
                    else:
                        outcome = pages.endpoint_offline(_split_url(outcome.url)[1] or outcome.url)
                break
            if isinstance(outcome, Close):
                break
            if isinstance(outcome, Reply):
                keep = req.keep_alive and req.framing == NO_BODY
                answer = reply_bytes(outcome, keep)
                writer.write(answer)
                metrics.http_request(outcome.status, 0, len(answer))
                await drain(writer, send_timeout)
                if not keep:
                    break
                continue
            if isinstance(outcome, bytes):  # the page of an offline forward-internal target
                writer.write(outcome)
                metrics.http_request(404, 0, len(outcome))
                break
            if ep.session is None:  # a cloud endpoint whose policy did not answer
                writer.write(pages.no_termination(host))
                metrics.http_request(502)
                break

            send = state.head() if state is not None and state.changed else req.raw
            if ep.session.edge_forwarded_headers:  # ngrok's agents expect the edge's X-Forwarded-*
                send = add_headers(
                    send,
                    [
                        (b"X-Forwarded-For", str(conn["client_ip"]).encode()),
                        (b"X-Forwarded-Host", req.host.encode("latin-1")),
                        (b"X-Forwarded-Proto", scheme.encode()),
                    ],
                )
            if dc is not None and (dc[0] is not ep or dc[1].at_eof()):
                _let_go(dc, True)
                dc = None
            clean = False  # the data connection is mid-exchange from here
            edit = _response_editor(responders, ctx) if responders else None
            res = None
            for attempt in range(2):
                if dc is None:
                    try:
                        dr, dw = await ep.session.open_data(ep, conn["client_ip"], conn["client_port"], scheme)
                    except SessionClosed:
                        writer.write(pages.endpoint_offline(host))
                        metrics.http_request(404)
                        break
                    dc = (ep, dr, dw)
                # Without a policy edit the request goes to the agent as the client sent
                # it, save the target's normal form (so the capture holds what policy
                # judged); the agent adds X-Forwarded-*.
                try:
                    res = await proxy_exchange(
                        req,
                        send,
                        reader,
                        writer,
                        dc[1],
                        dc[2],
                        edit_response=edit,
                        body_timeout=body_timeout,
                        send_timeout=send_timeout,
                    )
                    break
                except UpstreamClosed:
                    # the data connection (or the owning edge behind a peer link) died
                    # as the request went out: a bodiless idempotent request goes once
                    # more, on a fresh connection or the route's other endpoint
                    dc[0].session.release(dc[2])
                    dc = None
                    if attempt == 0 and retryable(req):
                        continue
                    writer.write(pages.no_agent(host))
                    metrics.http_request(502)
                    break
                except UpstreamError as exc:
                    if not exc.response_started:
                        writer.write(pages.no_agent(host))
                        metrics.http_request(502)
                    break
            if res is None:
                break
            status = res.response.status if res.response is not None else 502
            metrics.http_request(status, res.request_bytes, res.response_bytes)
            if res.upgraded:
                metrics.relayed(*await relay(reader, writer, dc[1], dc[2], send_timeout))
                break
            if not res.keep_alive:
                break
            clean = True
    except HTTPError as exc:
        writer.write(pages.bad_request(exc.status, exc.msg))
        metrics.http_request(exc.status)
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        if timer is not None:
            timer.cancel()
        if dc is not None:
            _let_go(dc, clean)
        with contextlib.suppress(Exception):
            await drain(writer, send_timeout)
        close(writer)


def _let_go(dc: tuple, clean: bool) -> None:
    """Done with a data connection: pooled again when it sits between two exchanges
    and its agent takes connections back (Session.give_back), else closed."""
    s = dc[0].session
    give_back = getattr(s, "give_back", None)
    if not (clean and give_back is not None and give_back(dc[1], dc[2])):
        s.release(dc[2])


def _response_editor(responders: list[Endpoint], ctx: Context):
    """Run ``on_http_response`` of every endpoint the request passed, innermost first."""

    def edit(resp: Head) -> bytes | None:
        rs = ResponseState(
            resp.status,
            from_wire(resp.reason),
            resp.version,
            [(from_wire(k), from_wire(v)) for k, v in resp.headers],
        )
        ctx.res = rs
        ctx.changed("res", "time")
        for ep in reversed(responders):
            ctx.endpoint = endpoint_vars(ep)
            ctx.changed("endpoint")
            out = ep.policy.run("on_http_response", ctx)
            if isinstance(out, Reply):
                return REPLACE + reply_bytes(out, keep_alive=False)
            if isinstance(out, Close):
                return REPLACE
        return rs.head() if rs.changed else None

    return edit


async def forward_raw(
    edge: Edge, ep: Endpoint, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Relay a TCP or passed-through TLS connection over one data connection."""
    tune(writer)
    conn = conn_vars(writer)
    hops = 0
    while ep.policy is not None and ep.policy.has("on_tcp_connect"):
        out = ep.policy.run("on_tcp_connect", Context(conn, endpoint_vars(ep)))
        if isinstance(out, Forward) and hops < MAX_HOPS:
            target = internal_target(edge, ep, out.url)
            if target is not None:
                ep, hops = target, hops + 1
                continue
            if out.on_error == "continue":
                break
        if out is not None:
            close(writer)
            return
        break
    if ep.session is None:
        close(writer)
        return
    try:
        dr, dw = await ep.session.open_data(ep, conn["client_ip"], conn["client_port"])
    except SessionClosed:
        close(writer)
        return
    try:
        metrics.relayed(*await relay(reader, writer, dr, dw, edge.config.send_timeout or None))
    finally:
        ep.session.release(dw)
