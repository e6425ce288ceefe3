"""Small HTML pages at the agent's web address, where ngrok serves its inspector.

``/`` redirects to ``/inspect/http`` (the captured requests, newest first, each one
opening to its heads and bodies, with a Replay button) and ``/status`` shows the
session, the tunnels and their metrics.  Pages are rendered on the server, whole, from
the same data as the agent API; one small script (``/static/inspector.js``) re-fetches
the page when ``/api/events`` announces a change and sends replays to the API.  The
full experience stays in the terminal console.

Captured requests are written by whoever reaches a tunnel, so every value is escaped
(``html.escape``), the script builds no markup from data, and each page carries a
strict Content-Security-Policy (``default-src 'self'``: no inline script or style, no
other origin).  The pages sit behind the agent API's :class:`LocalGuard` like the API.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from typing import TYPE_CHECKING

from backend import __version__
from backend.httpserver import Request, Response, Router

if TYPE_CHECKING:
    from backend.agent.agent import Agent

LIST_LIMIT = 100  # captures on the page
BODY_PREVIEW = 4096  # characters of each body shown

_SECURITY_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]

_CSS = """\
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#1f2933;color:#fff;padding:.6rem 1rem;display:flex;gap:1.2rem;align-items:baseline}
header a{color:#cbd2d9;text-decoration:none}header a.on{color:#fff;font-weight:600}
header .live{margin-left:auto;font-size:12px;color:#9aa5b1}
main{padding:1rem;max-width:72rem}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #e4e7eb;vertical-align:top}
th{font-weight:600;color:#52606d;font-size:12px;text-transform:uppercase}
details{background:#fff;border:1px solid #e4e7eb;margin:.3rem 0}
summary{cursor:pointer;padding:.35rem .6rem;font-family:ui-monospace,monospace;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.s2{color:#1b7a3d}.s3{color:#2d6cb5}.s4{color:#b7791f}.s5{color:#c53030}.sx{color:#7b8794}
pre{margin:0;padding:.5rem .6rem;background:#f5f7fa;white-space:pre-wrap;word-break:break-all;font-size:12px}
.parts{display:grid;grid-template-columns:1fr 1fr;gap:.5rem;padding:.5rem}
.parts h3{margin:.2rem 0;font-size:12px;color:#52606d}
.muted{color:#7b8794}button{font:inherit;margin:.4rem .6rem}
"""

# Vanilla JS, no build step.  It never turns data into markup: the page it swaps in is
# the server's escaped HTML (parsed with DOMParser, whose scripts never run), and the
# replay result is written with textContent.
_JS = """\
"use strict";
(function () {
  var pending = null, live = document.getElementById("live");
  function refresh() {
    pending = null;
    fetch(location.pathname, {credentials: "same-origin"}).then(function (r) {
      return r.ok ? r.text() : null;
    }).then(function (text) {
      if (text === null) return;
      var next = new DOMParser().parseFromString(text, "text/html").querySelector("main");
      var cur = document.querySelector("main");
      if (!next || !cur) return;
      cur.querySelectorAll("details[open]").forEach(function (d) {
        var same = next.querySelector('details[data-id="' + CSS.escape(d.dataset.id) + '"]');
        if (same) same.open = true;
      });
      cur.replaceWith(document.adoptNode(next));
    });
  }
  function soon() { if (!pending) pending = setTimeout(refresh, 300); }
  var es = new EventSource("/api/events");
  var kinds = document.body.dataset.events.split(" ");
  kinds.forEach(function (k) { es.addEventListener(k, soon); });
  es.onopen = function () { live.textContent = "live"; };
  es.onerror = function () { live.textContent = "reconnecting…"; };
  document.addEventListener("click", function (ev) {
    var b = ev.target.closest("button[data-replay]");
    if (!b) return;
    b.disabled = true;
    fetch("/api/requests/http", {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({id: b.dataset.replay})
    }).then(function (r) {
      b.textContent = r.ok ? "Replayed" : "Replay failed (" + r.status + ")";
    }, function () { b.textContent = "Replay failed"; }).finally(function () {
      setTimeout(function () { b.disabled = false; b.textContent = "Replay"; }, 1500);
    });
  });
})();
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _page(title: str, active: str, events: str, body: str) -> Response:
    nav = "".join(
        f'<a href="{href}"{" class=on" if href == active else ""}>{label}</a>'
        for href, label in (("/inspect/http", "Inspect"), ("/status", "Status"))
    )
    doc = (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)} · burrow agent</title>"
        '<link rel=stylesheet href="/static/inspector.css">'
        '<script src="/static/inspector.js" defer></script></head>'
        f'<body data-events="{_e(events)}"><header><strong>burrow</strong>{nav}'
        '<span class=live id=live>static</span></header>'
        f"<main>{body}</main></body></html>\n"
    )
    return Response(200, doc.encode(), "text/html; charset=utf-8", list(_SECURITY_HEADERS))


def _status_class(code: int | None) -> str:
    return f"s{code // 100}" if code and 200 <= code < 600 else "sx"


def _ms(ns: float | int | None) -> str:
    return "" if not ns else f"{ns / 1e6:.1f}ms"


def _split(raw_b64: str) -> tuple[str, str]:
    raw = base64.b64decode(raw_b64 or "")
    head, _, body = raw.partition(b"\r\n\r\n")
    text = body[: BODY_PREVIEW * 4].decode("utf-8", errors="replace")
    if len(text) > BODY_PREVIEW or len(body) > BODY_PREVIEW * 4:
        text = text[:BODY_PREVIEW] + "\n… (more in the console or the API)"
    return head.decode("latin-1"), text


def _capture_html(c: dict) -> str:
    req, resp = c["request"], c.get("response")
    code = resp["status_code"] if resp else None
    req_head, req_body = _split(req.get("raw", ""))
    if resp:
        resp_head, resp_body = _split(resp.get("raw", ""))
        status = _e(resp.get("status"))
    else:
        resp_head, resp_body, status = "(no response yet)", "", "…"
    replayed = f' <span class=muted>replay of {_e(c["replay_of"])}</span>' if c.get("replay_of") else ""
    return (
        f'<details data-id="{_e(c["id"])}"><summary>'
        f'<span class="{_status_class(code)}">{status}</span> {_e(req["method"])} {_e(req["uri"])}'
        f' <span class=muted>{_e(c.get("tunnel_name"))} · {_e(c.get("remote_addr"))} · '
        f'{_ms(c.get("duration"))} · {_e(c.get("start"))}</span>{replayed}</summary>'
        f'<div class=parts><div><h3>Request</h3><pre>{_e(req_head)}</pre>'
        f'<pre>{_e(req_body)}</pre></div><div><h3>Response</h3><pre>{_e(resp_head)}</pre>'
        f'<pre>{_e(resp_body)}</pre></div></div>'
        f'<button type=button data-replay="{_e(c["id"])}">Replay</button></details>'
    )


def add_pages(router: Router, agent: Agent, status_json: Callable[[], dict], tunnel_json: Callable) -> None:
    store = agent.capture

    async def root(req: Request) -> Response:
        return Response(302, b"", "", [("Location", "/inspect/http"), ("Cache-Control", "no-store")])

    async def inspect_http(req: Request) -> Response:
        if store is None:
            body = "<p>Inspection is off for this agent (<code>inspect_db_size: -1</code>).</p>"
            return _page("Inspect", "/inspect/http", "", body)
        caps, total = store.query(0, LIST_LIMIT, None, None)
        items = "".join(_capture_html(c.to_api()) for c in caps)
        shown = f"{len(caps)} of {total}" if total > len(caps) else str(total)
        body = (
            f"<h2>HTTP requests <span class=muted>({shown})</span></h2>"
            + (items or "<p class=muted>No requests yet. Send one through a tunnel.</p>")
        )
        return _page("Inspect", "/inspect/http", "request_started request_completed request_deleted", body)

    async def status(req: Request) -> Response:
        st = status_json()
        legs = st["session"]["legs"]
        rows = [
            ("Status", st["status"]),
            ("Session", st["session"]["id"] or "none"),
            ("Region", legs[0]["region"] if legs else ""),
            ("Latency", legs[0]["latency"] if legs else ""),
            ("Agent version", __version__),
            ("Edge", ", ".join(leg["edge"] for leg in legs if leg.get("edge")) or agent.config.server_addr),
        ]
        info = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
        trs = []
        for t in agent.tunnels.values():
            j = tunnel_json(t)
            m = j["metrics"]
            conns, http = m.get("conns", {}), m.get("http", {})
            trs.append(
                "<tr>"
                + "".join(
                    f"<td>{_e(v)}</td>"
                    for v in (
                        j["name"], j["public_url"] or "(offline)", j["proto"], j["config"]["addr"],
                        conns.get("count"), conns.get("gauge"), http.get("count"),
                        f'{http.get("rate1", 0):.2f}', _ms(http.get("p50")), _ms(http.get("p90")),
                    )
                )
                + "</tr>"
            )
        head = "".join(
            f"<th>{h}</th>"
            for h in ("Name", "URL", "Proto", "Upstream", "Conns", "Open", "Requests", "Rate/min", "p50", "p90")
        )
        tunnels = (
            f"<table><tr>{head}</tr>{''.join(trs)}</table>" if trs else "<p class=muted>No tunnels.</p>"
        )
        body = f"<h2>Session</h2><table>{info}</table><h2>Tunnels</h2>{tunnels}"
        return _page("Status", "/status", "tunnel_started tunnel_stopped session disconnected metrics", body)

    def asset(text: str, ctype: str):
        data = text.encode()

        async def serve(req: Request) -> Response:
            return Response(200, data, ctype, list(_SECURITY_HEADERS))

        return serve

    async def no_icon(req: Request) -> Response:
        return Response(204, b"", "", [("Cache-Control", "max-age=86400")])

    router.add("GET", "/", root)
    router.add("GET", "/favicon.ico", no_icon)
    router.add("GET", "/inspect/http", inspect_http)
    router.add("GET", "/status", status)
    router.add("GET", "/static/inspector.js", asset(_JS, "text/javascript; charset=utf-8"))
    router.add("GET", "/static/inspector.css", asset(_CSS, "text/css; charset=utf-8"))
