"""ngrok-style terminal status for ``burrow http|tcp|tls`` (without ``--json``)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from backend import __version__

if TYPE_CHECKING:
    from backend.agent.agent import Agent


def render(snap: dict) -> Table | Group:
    """ngrok's status screen from a snapshot: ``status``, ``region``, ``latency_ms``,
    ``edges`` (of the sessions online), ``web_addr``, ``tunnels`` (``public_url``, ``addr``, ``metrics`` as in the agent API),
    ``requests`` (capture summaries, newest first; None when inspection is off) and
    ``note`` (a line under the title)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", width=30)
    grid.add_column()
    status = {"online": "green", "reconnecting": "yellow"}.get(snap["status"], "red")
    grid.add_row(Text("burrow", style="bold cyan"), Text("(Ctrl+C to quit)", style="dim"))
    if snap.get("note"):
        grid.add_row("", Text(snap["note"], style="dim"))
    grid.add_row("", "")
    grid.add_row("Session Status", Text(snap["status"], style=status))
    grid.add_row("Version", __version__)
    grid.add_row("Region", snap.get("region") or "-")
    lat = snap.get("latency_ms")
    grid.add_row("Latency", f"{lat:.0f}ms" if lat is not None else "-")
    edges = snap.get("edges") or []
    if len(edges) > 1:  # an HA agent: a session on each of these edges
        grid.add_row("Edges", ", ".join(edges))
    web = snap.get("web_addr")
    grid.add_row("Web Interface", f"http://{web}" if web else "off")
    for t in snap["tunnels"]:
        grid.add_row("Forwarding", f"{t.get('public_url') or '(offline)'} -> {t['addr']}")
    grid.add_row("", "")
    conns = Table.grid(padding=(0, 2))
    for _ in range(6):
        conns.add_column(justify="right", width=6)
    conns.add_row("ttl", "opn", "rt1", "rt5", "p50", "p90")
    for t in snap["tunnels"]:
        m = t["metrics"]
        c, h = m["conns"], m["http"]
        p50, p90 = (h["p50"], h["p90"]) if h["count"] else (c["p50"], c["p90"])
        conns.add_row(
            str(c["count"]),
            str(c["gauge"]),
            f"{c['rate1']:.2f}",
            f"{c['rate5']:.2f}",
            f"{p50 / 1e9:.2f}",
            f"{p90 / 1e9:.2f}",
        )
    grid.add_row("Connections", conns)
    if snap.get("requests") is None:
        return grid
    reqs = Table.grid(padding=(0, 2))
    reqs.add_row(Text("HTTP Requests", style="bold"))
    reqs.add_row("-------------")
    for s in snap["requests"]:
        when = time.strftime("%H:%M:%S", time.localtime(s["start_ts"])) if s.get("start_ts") else s["start"][11:19]
        code = s["status_code"]
        style = "red" if code and code >= 500 else "yellow" if code and code >= 400 else "green"
        line = Text(f"{when}  {s['method']:<7} {s['path'][:60]:<60} ")
        line.append(str(code or "..."), style=style)
        line.append(f"  {s['remote_addr']}", style="dim")
        reqs.add_row(line)
    return Group(grid, Text(""), reqs)


def local_snapshot(a: Agent, web_addr: str) -> dict:
    requests = None
    if a.capture is not None:
        requests = [{**cap.summary(), "start_ts": cap.start} for cap in a.capture.list(10)]
    return {
        "status": a.status,
        "region": a.region,
        "latency_ms": a.latency * 1000 if a.latency is not None else None,
        "edges": [leg.edge for leg in a.legs if leg.connected],
        "web_addr": web_addr,
        "tunnels": [
            {"public_url": t.public_url, "addr": t.upstream.display, "metrics": t.metrics.to_api()}
            for t in a.tunnels.values()
        ],
        "requests": requests,
    }


class StatusDisplay:
    """Redraws session status, forwarding lines and connection metrics once a second.

    ``source`` gives the snapshot to draw (see :func:`render`): the agent in this process,
    or the local agent's API for a tunnel attached to it (:mod:`backend.agent.attach`).
    """

    def __init__(self, agent: Agent | None, web_addr: str = "", source=None) -> None:
        self.source = source or (lambda: local_snapshot(agent, web_addr))
        self._task: asyncio.Task | None = None
        self._live: Live | None = None

    def render(self) -> Table | Group:
        return render(self.source())

    def start(self) -> None:
        console = Console(file=sys.stdout)
        self._live = Live(self.render(), console=console, auto_refresh=False, transient=False)
        self._live.start()
        self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(1)
            if self._live is not None:
                self._live.update(self.render(), refresh=True)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._live is not None:
            with contextlib.suppress(Exception):
                self._live.stop()
