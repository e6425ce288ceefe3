"""The Requests list: a line-API widget that renders only the rows on screen.

It never holds every capture.  It knows how many rows match (``total``) and keeps a
bounded cache of row summaries by index; rows scrolled into view that are not cached
are asked for, a page at a time, with a :class:`NeedRows` message that the app answers
from a worker.  New captures arrive as events and are inserted at the top (newest
first); in follow mode the cursor stays on the newest.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator, MutableMapping
from datetime import datetime

from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from console.keymap import bindings
from console.render import human_duration, human_size

PAGE = 100
CACHE_MAX = 3000
# A trim walks the whole cache, so it waits until this many rows over CACHE_MAX have
# piled up (at 1,000 new captures a second a trim per capture cost a tenth of the loop).
TRIM_SLACK = 300


class Rows(MutableMapping[int, dict]):
    """Cached rows by list index (0 = newest), as a dict would hold them.

    New captures go on top, which moves every other row one index down: instead of
    re-keying the whole cache for each one, the keys are stored relative to ``_shift``.
    """

    __slots__ = ("_by_key", "_shift")

    def __init__(self) -> None:
        self._by_key: dict[int, dict] = {}
        self._shift = 0

    def shift(self, n: int = 1) -> None:
        """Every row moves ``n`` indexes down."""
        self._shift += n

    def __getitem__(self, index: int) -> dict:
        return self._by_key[index - self._shift]

    def get(self, index, default=None):
        return self._by_key.get(index - self._shift, default) if isinstance(index, int) else default

    def __setitem__(self, index: int, row: dict) -> None:
        self._by_key[index - self._shift] = row

    def __delitem__(self, index: int) -> None:
        del self._by_key[index - self._shift]

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and index - self._shift in self._by_key

    def __iter__(self) -> Iterator[int]:
        shift = self._shift
        return (k + shift for k in self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)

    def values(self):
        return self._by_key.values()

    def clear(self) -> None:
        self._by_key.clear()
        self._shift = 0

    def __repr__(self) -> str:
        return f"Rows({dict(self.items())!r})"


class NeedRows(Message):
    """Rows ``offset``..``offset+limit`` are on screen but not loaded."""

    def __init__(self, offset: int, limit: int, generation: int) -> None:
        super().__init__()
        self.offset = offset
        self.limit = limit
        self.generation = generation


class ListModeChanged(Message):
    """Marks or follow mode changed: the status line says so."""


class RequestSelected(Message):
    def __init__(self, row: dict | None) -> None:
        super().__init__()
        self.row = row


class RequestList(ScrollView, can_focus=True):
    """Captured requests, newest first."""

    BINDINGS: list[Binding] = [
        b for b in bindings("requests") if b.action.startswith(("cursor", "top", "bottom", "page", "toggle_mark"))
    ]

    COMPONENT_CLASSES = {
        "requestlist--header",
        "requestlist--cursor",
        "requestlist--dim",
        "requestlist--get",
        "requestlist--post",
        "requestlist--put",
        "requestlist--patch",
        "requestlist--delete",
        "requestlist--method",
        "requestlist--2xx",
        "requestlist--3xx",
        "requestlist--4xx",
        "requestlist--5xx",
        "requestlist--pending",
        "requestlist--replay",
        "requestlist--marked",
    }

    DEFAULT_CSS = """
    RequestList { height: 1fr; scrollbar-size-vertical: 1; }
    RequestList > .requestlist--header { text-style: bold; color: $text-muted; }
    RequestList > .requestlist--cursor { background: $block-cursor-background; color: $block-cursor-foreground; text-style: bold; }
    RequestList:blur > .requestlist--cursor { background: $block-cursor-blurred-background; text-style: none; }
    RequestList > .requestlist--dim { color: $text-muted; }
    RequestList > .requestlist--get { color: $method-get; }
    RequestList > .requestlist--post { color: $method-post; }
    RequestList > .requestlist--put { color: $method-put; }
    RequestList > .requestlist--patch { color: $method-patch; }
    RequestList > .requestlist--delete { color: $method-delete; }
    RequestList > .requestlist--method { color: $method-other; }
    RequestList > .requestlist--2xx { color: $status-2xx; }
    RequestList > .requestlist--3xx { color: $status-3xx; }
    RequestList > .requestlist--4xx { color: $status-4xx; }
    RequestList > .requestlist--5xx { color: $status-5xx; }
    RequestList > .requestlist--pending { color: $status-pending; }
    RequestList > .requestlist--replay { color: $replay; }
    RequestList > .requestlist--marked { text-style: bold reverse; }
    """

    cursor: reactive[int] = reactive(0)
    following: reactive[bool] = reactive(True)

    def __init__(self, *, id: str | None = None, clock=None) -> None:
        super().__init__(id=id)
        self.total = 0
        self.rows = Rows()
        self.by_id: dict[str, dict] = {}
        self.generation = 0  # bumped on every reset, so stale pages are dropped
        self._asked: dict[int, float] = {}  # page offset -> when it was requested
        self._event_ids: list[str] = []  # ids inserted from the event stream since reset
        self.marked: dict[str, dict] = {}  # marked rows by id, kept across paging
        self._clock = clock  # a fixed clock for tests; None = local time of the capture

    # ------------------------------------------------------------------ data in
    def reset(self, total: int = 0) -> None:
        """Forget every row (new filter, cleared captures, reconnect)."""
        self.generation += 1
        self.total = total
        self.rows.clear()
        self.by_id.clear()
        self._asked.clear()
        self._event_ids.clear()
        self.cursor = 0
        self._resize()
        self.refresh()

    def apply_page(
        self, offset: int, items: list[dict], total: int, generation: int, newest: str | None = None
    ) -> None:
        if generation != self.generation:
            return
        self._asked.pop(offset - offset % PAGE, None)
        if self._event_ids and (newest is not None or total == 0):
            # The page was made before some captures we already have from the event
            # stream: they sit above it (ids grow with time, so compare them).
            later = len(self._event_ids) - bisect.bisect_right(self._event_ids, newest or "")
            offset += later
            total += later
        if total != self.total:
            self.total = total
            self._resize()
        for i, row in enumerate(items):
            old = self.by_id.get(row["id"])
            if old is not None and old is not self.rows.get(offset + i):
                continue  # already present at another index (arrived by event)
            self.rows[offset + i] = row
            self.by_id[row["id"]] = row
        self._trim()
        self.cursor = min(self.cursor, max(0, self.total - 1))
        self.refresh()
        self._announce()

    def insert_new(self, row: dict) -> None:
        """A new capture that matches the current filter: it goes on top."""
        if row["id"] in self.by_id:
            return
        was_empty = self.total == 0
        self.rows.shift()
        self._asked = {o + 1: t for o, t in self._asked.items()}
        self.rows[0] = row
        self.by_id[row["id"]] = row
        self._event_ids.append(row["id"])
        if len(self._event_ids) > CACHE_MAX:
            del self._event_ids[: len(self._event_ids) - CACHE_MAX]
        self.total += 1
        self._trim()
        self._resize()
        if not self.following and not was_empty:
            # keep the same request selected; on an empty (e.g. just cleared) list there
            # is none, and the cursor stays on the new row instead of below the last one
            self.cursor += 1
            self.scroll_to(y=self.scroll_offset.y + 1, animate=False, immediate=True)
        self.refresh()
        self._announce()

    def update_row(self, row: dict) -> bool:
        """A capture completed (status, duration, sizes known); True if it was shown."""
        old = self.by_id.get(row["id"])
        if old is None:
            return False
        old.update(row)
        self.refresh()
        if self.selected is old:
            self._announce()
        return True

    @property
    def selected(self) -> dict | None:
        return self.rows.get(self.cursor)

    def action_toggle_mark(self) -> None:
        row = self.selected
        if row is None:
            return
        if self.marked.pop(row["id"], None) is None:
            self.marked[row["id"]] = row
        self.post_message(ListModeChanged())
        self.following = False
        self.action_cursor_down()
        self.refresh()

    def targets(self) -> list[dict]:
        """What bulk actions act on: the marked rows, else the selected one."""
        if self.marked:
            return list(self.marked.values())
        return [self.selected] if self.selected is not None else []

    def forget(self, ids: set[str]) -> None:
        for cid in ids:
            self.marked.pop(cid, None)
        self.post_message(ListModeChanged())
        self.refresh()

    def watch_following(self, old: bool, new: bool) -> None:
        if old != new:
            self.post_message(ListModeChanged())

    # ----------------------------------------------------------------- cursor
    def watch_cursor(self, old: int, new: int) -> None:
        self._scroll_to_cursor()
        self.refresh()
        self._announce()

    def _announce(self) -> None:
        self.post_message(RequestSelected(self.selected))

    def _scroll_to_cursor(self) -> None:
        body = max(1, self.size.height - 1)  # the first line is the column header
        top = self.scroll_offset.y
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + body:
            self.scroll_to(y=self.cursor - body + 1, animate=False, immediate=True)

    def _move(self, delta: int) -> None:
        if self.total:
            self.cursor = max(0, min(self.total - 1, self.cursor + delta))
        self.following = self.cursor == 0 and self.following

    def action_cursor_down(self) -> None:
        self.following = False
        self._move(1)

    def action_cursor_up(self) -> None:
        self._move(-1)

    def action_top(self) -> None:
        self.cursor = 0

    def action_bottom(self) -> None:
        self.following = False
        self.cursor = max(0, self.total - 1)

    def action_page_down(self) -> None:
        self.following = False
        self._move(max(1, self.size.height - 2))

    def action_page_up(self) -> None:
        self._move(-max(1, self.size.height - 2))

    # ---------------------------------------------------------------- drawing
    def _resize(self) -> None:
        self.virtual_size = Size(0, self.total + 1)  # never scrolls sideways: columns adapt

    def on_resize(self) -> None:
        self._resize()

    def _trim(self) -> None:
        if len(self.rows) <= CACHE_MAX + TRIM_SLACK:
            return
        keep_from = max(0, self.scroll_offset.y - CACHE_MAX // 3)
        keep_to = keep_from + CACHE_MAX
        for i in [i for i in self.rows if not keep_from <= i < keep_to]:
            self.by_id.pop(self.rows.pop(i)["id"], None)

    @property
    def _width(self) -> int:
        return self.scrollable_content_region.width

    def _columns(self) -> list[tuple[str, int]]:
        w = self._width
        if w >= 100:
            return [("TIME", 8), ("TUNNEL", 12), ("CLIENT", 15), ("METHOD", 7), ("PATH", 0), ("STATUS", 6), ("DURATION", 9), ("SIZE", 9)]
        if len(getattr(self.app, "tunnels", ())) > 1:
            # narrow, but several tunnels: which one a request came through matters more
            # than the path's last characters
            return [("TIME", 8), ("TUNNEL", 10), ("METHOD", 7), ("PATH", 0), ("STATUS", 6), ("DURATION", 9)]
        return [("TIME", 8), ("METHOD", 7), ("PATH", 0), ("STATUS", 6), ("DURATION", 9)]

    def _widths(self) -> list[int]:
        cols = self._columns()
        fixed = sum(w for _, w in cols if w) + len(cols) - 1
        flex = max(8, self._width - fixed)
        return [w or flex for _, w in cols]

    def render_line(self, y: int) -> Strip:
        width = self._width
        if y == 0:
            style = self.get_component_rich_style("requestlist--header")
            text = " ".join(_fit(name, w) for (name, _), w in zip(self._columns(), self._widths(), strict=True))
            return Strip([Segment(_fit(text, width), style)], width)
        index = self.scroll_offset.y + y - 1
        if index >= self.total:
            return Strip.blank(width, self.rich_style)
        row = self.rows.get(index)
        if row is None:
            self._ask(index)
            dim = self.get_component_rich_style("requestlist--dim")
            return Strip([Segment(_fit("  …", width), dim)], width)
        segs = self._row_segments(row)
        if index == self.cursor:  # the cursor's colours win over the cells' own
            cursor = self.get_component_rich_style("requestlist--cursor")
            segs = [Segment(t, (st or Style()) + cursor) for t, st, _ in segs]
            pad = cursor
        else:
            pad = self.rich_style
        return Strip(segs).adjust_cell_length(width, pad)

    def _row_segments(self, row: dict) -> list[Segment]:
        widths = self._widths()
        names = [n for n, _ in self._columns()]
        base = self.rich_style
        dim = self.get_component_rich_style("requestlist--dim")
        out: list[Segment] = []
        for i, (name, w) in enumerate(zip(names, widths, strict=True)):
            text, style = self._cell(name, row, dim)
            if i:
                out.append(Segment(" ", base))
            align_right = name in ("DURATION", "SIZE")
            out.append(Segment(_fit(text, w, align_right), base + style if style else base))
        return out

    def _cell(self, name: str, row: dict, dim: Style) -> tuple[str, Style | None]:
        if name == "TIME":
            text = _clock(row.get("start", ""), self._clock)
            if row["id"] in self.marked:  # marked rows show their time in reverse video
                return text, self.get_component_rich_style("requestlist--marked")
            return text, dim
        if name == "TUNNEL":
            return row.get("tunnel_name", ""), None
        if name == "CLIENT":
            return row.get("remote_addr", ""), dim
        if name == "METHOD":
            m = row.get("method", "")
            cls = m.lower() if m in ("GET", "POST", "PUT", "PATCH", "DELETE") else "method"
            return m, self.get_component_rich_style(f"requestlist--{cls}")
        if name == "PATH":
            mark = "↻ " if row.get("replay_of") else ""
            return mark + row.get("path", ""), (
                self.get_component_rich_style("requestlist--replay") if mark else None
            )
        if name == "STATUS":
            code = row.get("status_code")
            if code is None:
                return "…", self.get_component_rich_style("requestlist--pending")
            cls = f"{code // 100}xx" if 2 <= code // 100 <= 5 else "pending"
            return str(code), self.get_component_rich_style(f"requestlist--{cls}")
        if name == "DURATION":
            d = row.get("duration") or 0
            return (human_duration(d) if row.get("status_code") is not None else ""), dim
        if name == "SIZE":
            return human_size(row.get("response_size") or 0), dim
        return "", None

    def _ask(self, index: int) -> None:
        page = index - index % PAGE
        now = time.monotonic()
        if now - self._asked.get(page, 0.0) < 2.0:
            return
        self._asked[page] = now
        # Sent to the app after this render pass (from inside render_line, and bubbling up
        # through the tabbed panes, the message never arrived).
        self.call_later(self.app.post_message, NeedRows(page, PAGE, self.generation))


def _fit(text: str, width: int, right: bool = False) -> str:
    if len(text) > width:
        return text[: max(0, width - 1)] + "…" if width > 1 else text[:width]
    return text.rjust(width) if right else text.ljust(width)


def _clock(start: str, fixed) -> str:
    if fixed is not None:
        return fixed(start)
    try:
        return datetime.fromisoformat(start).astimezone().strftime("%H:%M:%S")
    except ValueError:
        return start[11:19]
