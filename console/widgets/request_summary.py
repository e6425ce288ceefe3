"""The lower half of the Requests split (at 150 columns and wider): the selected
request's summary and headers, as in mitmproxy's or ngrok's inspector.

It never fetches per keypress: a new selection draws at once what the list row knows
(method, path, status, timing) and asks for the full capture only once the cursor has
rested for ``DEBOUNCE`` seconds (the app's fetch worker is exclusive, so an older fetch
still in flight is dropped).  Only the heads are parsed; bodies stay for the detail view.
"""

from __future__ import annotations

import base64

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.containers import VerticalScroll
from textual.timer import Timer
from textual.widgets import Static

from console.render import decode_body, human_duration, human_size

DEBOUNCE = 0.15
"""Seconds the selection must rest before the selected capture is fetched."""
REDRAW = 1 / 30
"""At most this often the summary line is drawn again while the selection moves."""


class RequestSummary(VerticalScroll, can_focus=False):
    DEFAULT_CSS = """
    RequestSummary { height: 45%; border-top: hkey $primary 50%; padding: 0 1; }
    RequestSummary > Static { width: 100%; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.row: dict | None = None
        self.capture: dict | None = None
        self._timer: Timer | None = None
        self._draw_timer: Timer | None = None
        self.fetches = 0  # how many captures this pane asked for (tests check the debounce)
        self.shown: RenderableType = ""  # what the pane shows now

    def compose(self):
        yield Static("", id="summary-body")

    def select(self, row: dict | None) -> None:
        """The list's cursor moved (or its row changed): draw, then fetch once it rests."""
        same = row is not None and self.row is not None and row.get("id") == self.row.get("id")
        self.row = row
        if not same:
            self.capture = None
        elif self.capture is not None and not (row.get("status_code") is not None and not self.capture.get("response")):
            self._draw_soon()  # already have it (a completed row only needs a refetch if it was pending)
            return
        self._draw_soon()
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        if row is not None:
            self._timer = self.set_timer(DEBOUNCE, self._fetch)

    def _fetch(self) -> None:
        self._timer = None
        if self.row is None or not self.display:
            return
        self.fetches += 1
        self.app.load_summary(self.row["id"])

    def show_capture(self, capture: dict) -> None:
        if self.row is not None and capture.get("id") == self.row.get("id"):
            self.capture = capture
            self._draw()

    def _draw_soon(self) -> None:
        """Draw within REDRAW seconds: following 1,000 new requests a second, the
        selection changes with each one, and drawing each would take the event loop."""
        if self._draw_timer is None:
            self._draw_timer = self.set_timer(REDRAW, self._draw)

    def _draw(self) -> None:
        if self._draw_timer is not None:
            self._draw_timer.stop()
            self._draw_timer = None
        self.shown = self._content()
        self.query_one("#summary-body", Static).update(self.shown)

    def _content(self) -> RenderableType:
        row = self.row
        if row is None:
            return Text("No request selected.", style="dim")
        line = Text()
        line.append(f"{row.get('method', '')} ", style="bold")
        line.append(row.get("path", ""))
        code = row.get("status_code")
        line.append(f"   {code if code is not None else 'pending'}", style="bold")
        if code is not None:
            line.append(f"   {human_duration(row.get('duration') or 0)}")
        line.append(f"   {human_size(row.get('response_size') or 0)}   {row.get('tunnel_name', '')}"
                    f"   from {row.get('remote_addr', '')}   {row['id']}", style="dim")
        if row.get("replay_of"):
            line.append(f"   ↻ replay of {row['replay_of']}", style="italic")
        line.append("   enter: full detail", style="dim")
        c = self.capture
        if c is None:
            return Group(line, Text("\nloading headers…", style="dim"))
        grid = Table.grid(padding=(0, 4), expand=True)
        grid.add_column(ratio=1)
        grid.add_column(ratio=1)
        resp = c.get("response")
        grid.add_row(
            _head("Request", c.get("request") or {}),
            _head("Response", resp) if resp else Text("Response: none yet", style="dim"),
        )
        return Group(line, Text(""), grid)


def _head(title: str, part: dict):
    """A message's first line and headers (the body is not decoded here)."""
    raw = base64.b64decode(part.get("raw") or "")
    head, sep, _ = raw.partition(b"\r\n\r\n")
    info = decode_body(head + sep)
    first = head.split(b"\r\n", 1)[0].decode("latin-1")
    top = Text()
    top.append(title, style="bold underline")
    top.append(f"  {first}", style="bold")
    size = part.get("body_size")
    if size is not None:
        top.append(f"   body {human_size(size)}", style="dim")
    headers = Table.grid(padding=(0, 1))
    headers.add_column(style="bold", no_wrap=True)
    headers.add_column(overflow="fold")
    for k, v in info.headers:
        headers.add_row(k, v)
    return Group(top, headers)
