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


class StatusDisplay:
    """Redraws session status, forwarding lines and connection metrics once a second."""

    def __init__(self, agent: Agent, web_addr: str) -> None:
        self.agent = agent
        self.web_addr = web_addr
        self._task: asyncio.Task | None = None
        self._live: Live | None = None

    def render(self) -> Table | Group:
        a = self.agent
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", width=30)
        grid.add_column()
        status = {"online": "green", "reconnecting": "yellow"}.get(a.status, "red")
        grid.add_row(Text("burrow", style="bold cyan"), Text("(Ctrl+C to quit)", style="dim"))
        grid.add_row("", "")
        grid.add_row("Session Status", Text(a.status, style=status))
        grid.add_row("Version", __version__)
        grid.add_row("Region", a.region or "-")
        grid.add_row("Latency", f"{a.latency * 1000:.0f}ms" if a.latency is not None else "-")
        grid.add_row("Web Interface", f"http://{self.web_addr}" if self.web_addr else "off")
        for t in a.tunnels.values():
            grid.add_row("Forwarding", f"{t.public_url or '(offline)'} -> {t.upstream.display}")
        grid.add_row("", "")
        conns = Table.grid(padding=(0, 2))
        for _ in range(6):
            conns.add_column(justify="right", width=6)
        conns.add_row("ttl", "opn", "rt1", "rt5", "p50", "p90")
        for t in a.tunnels.values():
            m = t.metrics.to_api()
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
        if a.capture is None:
            return grid
        reqs = Table.grid(padding=(0, 2))
        reqs.add_row(Text("HTTP Requests", style="bold"))
        reqs.add_row("-------------")
        for cap in a.capture.list(10):
            s = cap.summary()
            when = time.strftime("%H:%M:%S", time.localtime(cap.start))
            code = s["status_code"]
            style = "red" if code and code >= 500 else "yellow" if code and code >= 400 else "green"
            line = Text(f"{when}  {s['method']:<7} {s['path'][:60]:<60} ")
            line.append(str(code or "..."), style=style)
            line.append(f"  {s['remote_addr']}", style="dim")
            reqs.add_row(line)
        return Group(grid, Text(""), reqs)

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
