"""``burrow http|tcp|tls ADDR`` on a machine with a local backend: add a tunnel to it.

The tunnel goes to the one local agent (:mod:`backend.local`, started in the background
if there is none) over its API, so the console shows it and its requests next to every
other tunnel on this machine.  This process shows ngrok's status screen from the agent
API and holds ``GET /api/events?hold=NAME`` open: when it exits (Ctrl+C, a closed
terminal, even kill -9) the agent stops the tunnel.  ``--standalone`` (or any flag that
picks an edge or configures an agent) runs a private agent in this process instead, as
``ngrok http`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys

import httpx

from backend.agent.tunnels import TunnelConfig


class AttachError(Exception):
    pass


def _tunnel_name(tc: TunnelConfig, taken: set[str]) -> str:
    if tc.name:
        return tc.name
    tail = re.sub(r"[^A-Za-z0-9_.-]+", "-", tc.addr.rsplit("/", 1)[-1].rsplit(":", 1)[-1]).strip("-")
    base = f"{tc.proto}-{tail or 'tunnel'}"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def _err(r: httpx.Response) -> str:
    try:
        body = r.json()
        msg = body.get("msg") or r.text
        detail = (body.get("details") or {}).get("err")
        return f"{msg}: {detail}" if detail else msg
    except ValueError:
        return r.text.strip() or f"HTTP {r.status_code}"


async def run(tc: TunnelConfig, rec: dict, started: bool, stop: asyncio.Event) -> int:
    from backend.agent.status import StatusDisplay

    url = rec["agent_url"]
    interactive = sys.stdout.isatty()
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        try:
            taken = {t["name"] for t in (await c.get("/api/tunnels")).json()["tunnels"]}
            for _ in range(5):
                name = _tunnel_name(tc, taken)
                body = tc.model_dump(exclude_defaults=True) | {"name": name, "proto": tc.proto, "addr": tc.addr}
                if tc.proto == "http" and "://" not in tc.url:
                    body["schemes"] = ["http"]  # burrow http: http unless --url says https
                r = await c.post("/api/tunnels", json=body)
                if r.status_code == 201:
                    break
                if tc.name or "already exists" not in r.text:
                    raise AttachError(_err(r))
                taken.add(name)
            else:
                raise AttachError(_err(r))
        except httpx.HTTPError as exc:
            raise AttachError(f"cannot reach the local agent at {url}: {exc}") from None
        tunnel = r.json()
        note = ("started the local edge and agent in the background" if started else
                "added to the local agent") + f" (http://{url.split('://', 1)[1]}); `burrow stop` stops it"
        held = asyncio.Event()
        holder = asyncio.ensure_future(_hold(url, name, held))
        # the tunnel is ours once the agent holds it to our stream: only then say it is up
        waiting = asyncio.ensure_future(held.wait())
        await asyncio.wait({holder, waiting}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        snap = {"status": "online", "web_addr": url.split("://", 1)[1], "note": note,
                "tunnels": [_tunnel_row(tunnel)], "requests": []}
        display = None
        if interactive:
            display = StatusDisplay(None, source=lambda: snap)
            display.start()
        else:
            print(f"tunnel {name}: {tunnel['public_url']} -> {tunnel['config']['addr']}", flush=True)
            print(f"burrow: {note}", flush=True)
        why = "stopped"
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while True:
                done, _ = await asyncio.wait({stopper, holder}, timeout=1.0)
                if stopper in done:
                    break
                if holder in done:
                    why = "the local agent went away"
                    break
                try:
                    r = await c.get(f"/api/tunnels/{name}")
                    if r.status_code == 404:
                        why = "the tunnel was stopped (from the console or the agent API)"
                        break
                    snap["tunnels"] = [_tunnel_row(r.json())]
                    st = (await c.get("/api/status")).json()
                    snap["status"] = st.get("status", "?")
                    legs = st.get("session", {}).get("legs") or [{}]
                    snap["region"] = legs[0].get("region")
                    lat = (legs[0].get("latency") or "").removesuffix("ms")
                    snap["latency_ms"] = float(lat) if lat else None
                    snap["edges"] = [leg["edge"] for leg in legs if leg.get("edge")]
                    if display is not None:
                        q = await c.get("/api/requests/http", params={"tunnel_name": name, "limit": 10, "summary": 1})
                        snap["requests"] = q.json().get("requests", []) if q.status_code == 200 else None
                except (httpx.HTTPError, ValueError, KeyError):
                    continue  # the holder notices a dead agent
        finally:
            if display is not None:
                display.stop()
            stopper.cancel()
            holder.cancel()
        if why == "stopped":
            with contextlib.suppress(httpx.HTTPError):
                await c.delete(f"/api/tunnels/{name}")
            print(f"burrow: tunnel {name} closed; the local agent keeps running (`burrow stop` stops it)",
                  file=sys.stderr)
            return 0
        print(f"burrow: {why}", file=sys.stderr)
        return 0 if why.startswith("the tunnel was stopped") else 1


def _tunnel_row(t: dict) -> dict:
    return {"public_url": t.get("public_url"), "addr": t.get("config", {}).get("addr", ""),
            "metrics": t["metrics"]}


async def _hold(url: str, name: str, held: asyncio.Event) -> None:
    """Keep ``/api/events?hold=NAME`` open; returns when the agent goes away."""
    with contextlib.suppress(httpx.HTTPError):
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(10, read=30)) as c,
            c.stream("GET", f"{url}/api/events", params={"hold": name}) as r,
        ):
            async for _ in r.aiter_raw():
                held.set()

