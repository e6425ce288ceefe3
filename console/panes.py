"""The four panes: Endpoints, Agent Ingresses, Tunnels and Requests."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import BindingsMap
from textual.containers import Vertical
from textual.widgets import DataTable, Input, Static

from console.keymap import bindings
from console.render import human_duration, plural
from console.widgets.request_list import ListModeChanged, RequestList, RequestSelected
from console.widgets.request_summary import RequestSummary

SPLIT_WIDTH = 150
"""From this width on, Requests shows the selected request's headers under the list."""

SPARK = "▁▂▃▄▅▆▇█"
# console.manage (the cloud forms, with a TextArea) is imported by the actions that open
# them: the first frame does not need it.


def sparkline(values: list[float], width: int = 12) -> str:
    """The last ``width`` values as bars scaled to the highest; an idle tick is the
    lowest bar (not a blank), so a quiet tunnel still shows a line."""
    vals = list(values)[-width:]
    if not vals:
        return ""
    top = max(vals) or 1.0
    steps = len(SPARK) - 2
    return "".join(SPARK[1 + min(steps, int(v / top * steps))] if v > 0 else SPARK[0] for v in vals)


class Pane(Vertical):
    """Base: a pane knows its keymap context and can be filtered with ``/``."""

    context = "list"

    def __init__(self, *, id: str, read_only: bool = False) -> None:
        super().__init__(id=id)
        # Bindings come from the keymap table; dangerous ones are absent in read-only mode.
        self._bindings = BindingsMap(bindings("list", read_only) + bindings(self.context, read_only))
        self.read_only = read_only
        self.filter_text = ""

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter…  (enter to apply, esc to clear)", id=f"{self.id}-filter", classes="filter")

    def action_filter(self) -> None:
        box = self.query_one(Input)
        box.display = True
        box.value = self.filter_text
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one(Input)
        if self.filter_text or box.display:
            box.display = False
            self.apply_filter("")
            self.focus_main()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.apply_filter(event.value.strip())
        if not event.value.strip():
            self.query_one(Input).display = False
        self.focus_main()

    def on_key(self, event) -> None:
        if event.key == "escape" and self.query_one(Input).has_focus:
            event.stop()
            self.action_clear_filter()

    def apply_filter(self, text: str) -> None:
        self.filter_text = text

    def focus_main(self) -> None:
        self.focus()


class TablePane(Pane):
    """A pane showing rows of dicts in a DataTable, filtered by substring as you type."""

    COLUMNS: tuple[tuple[str, Callable[[dict], object]], ...] = ()
    FLEX: tuple[str, ...] = ()  # columns cut to fit the width, so the ones after stay on screen
    EMPTY = "nothing here yet"

    def __init__(self, *, id: str, read_only: bool = False) -> None:
        super().__init__(id=id, read_only=read_only)
        self.rows: list[dict] = []
        self.shown: list[dict] = []

    def compose(self) -> ComposeResult:
        yield from super().compose()
        table = DataTable(cursor_type="row", zebra_stripes=False, id=f"{self.id}-table")
        table.add_columns(*(name for name, _ in self.COLUMNS))
        yield table
        yield Static(self.empty_text(), classes="empty")

    def on_mount(self) -> None:
        box = self.query_one(Input)
        box.display = False
        box.placeholder = "filter…  (applies as you type; enter goes to the rows, esc clears)"

    def on_input_changed(self, event: Input.Changed) -> None:
        # a substring match over rows already here is instant: no enter needed
        event.stop()
        if event.input.display and event.value.strip() != self.filter_text:
            self.apply_filter(event.value.strip())

    def empty_text(self) -> Text:
        """What this pane is for and the key that fills it (shown while it has no rows)."""
        return Text.from_markup(self.EMPTY)

    def focus_main(self) -> None:
        self.query_one(DataTable).focus()

    def key_of(self, row: dict) -> str:
        return str(row.get("id") or row.get("name") or id(row))

    def set_rows(self, rows: list[dict]) -> None:
        self.rows = rows
        self._render_rows()

    def apply_filter(self, text: str) -> None:
        super().apply_filter(text)
        self._render_rows()

    def on_resize(self) -> None:
        self._render_rows()
        # and again once the table has its new size (it may still have an in-between one)
        self.call_after_refresh(self._render_rows)

    def _render_rows(self) -> None:
        table = self.query_one(DataTable)
        keep = self.selected
        needle = self.filter_text.lower()
        columns = self.COLUMNS  # may depend on the width: take one set for this pass
        labels = tuple(name for name, _ in columns)
        cells_of = [[fn(r) for _, fn in columns] for r in self.rows]
        self.shown = []
        kept = []
        for row, cells in zip(self.rows, cells_of, strict=True):
            if needle and not any(needle in str(c).lower() for c in cells):
                continue
            self.shown.append(row)
            kept.append(cells)
        # Columns are made anew each time, so their widths follow the rows shown now (a
        # DataTable column only ever grows); a FLEX column gives up width to the others.
        table.clear(columns=True)
        table.add_columns(*labels)
        self._fit_flex(labels, kept, table)
        for row, cells in zip(self.shown, kept, strict=True):
            table.add_row(*cells, key=self.key_of(row))
        if keep is not None:
            for i, row in enumerate(self.shown):
                if self.key_of(row) == self.key_of(keep):
                    table.move_cursor(row=i, animate=False)
                    break
        empty = self.query_one(".empty", Static)
        empty.display = not self.shown
        if not self.shown and self.filter_text:
            empty.update(f"no rows match “{self.filter_text}”")
        elif not self.shown:
            empty.update(self.empty_text())

    def _fit_flex(self, labels: tuple[str, ...], rows: list[list], table: DataTable) -> None:
        """Cut the cells of the FLEX columns (with …, in FLEX order) until every column fits."""
        width = table.size.width or self.size.width
        if not width or not rows:
            return

        def cell_width(c) -> int:
            return c.cell_len if isinstance(c, Text) else len(str(c))

        widths = [max([len(name)] + [cell_width(r[i]) for r in rows]) for i, name in enumerate(labels)]
        pad = 2 * table.cell_padding * len(labels) + 1  # +1: a vertical scrollbar's gutter
        over = sum(widths) + pad - width
        for name in self.FLEX:
            if over <= 0:
                break
            if name not in labels:
                continue
            i = labels.index(name)
            cut = min(over, widths[i] - max(len(name), 8))
            if cut <= 0:
                continue
            widths[i] -= cut
            over -= cut
            for r in rows:
                text = str(r[i])
                if len(text) > widths[i]:
                    r[i] = text[: widths[i] - 1] + "…"

    @property
    def selected(self) -> dict | None:
        table = self.query_one(DataTable)
        if not self.shown or table.cursor_row is None or table.cursor_row >= len(self.shown):
            return None
        return self.shown[table.cursor_row]

    def action_cursor_down(self) -> None:
        self.query_one(DataTable).action_cursor_down()

    def action_cursor_up(self) -> None:
        self.query_one(DataTable).action_cursor_up()

    def action_top(self) -> None:
        self.query_one(DataTable).move_cursor(row=0)

    def action_bottom(self) -> None:
        self.query_one(DataTable).move_cursor(row=max(0, len(self.shown) - 1))


def _ref(v) -> str:
    if isinstance(v, dict):
        return v.get("id") or ""
    return v or ""


class EndpointsPane(TablePane):
    context = "endpoints"
    FLEX = ("UPSTREAM", "SESSION", "URL")  # the URL is cut last
    EMPTY = (
        "[b]No endpoints.[/b] An endpoint is a public URL the edge serves.\n"
        "Every tunnel adds one: run [b]burrow http 8000[/b], or [b]3[/b] then [b]n[/b].\n"
        "[b]n[/b] here creates a cloud endpoint (a URL with a traffic policy, no agent needed)."
    )
    COLUMNS = (
        ("TYPE", lambda r: r.get("type", "")),
        ("URL", lambda r: r.get("url") or r.get("public_url", "")),
        ("PROTO", lambda r: r.get("proto", "")),
        ("BINDINGS", lambda r: ",".join(r.get("bindings") or [])),
        ("UPSTREAM", lambda r: r.get("upstream_url") or ""),
        ("SESSION", lambda r: _ref(r.get("tunnel_session"))),
    )

    def _cloud_ok(self) -> bool:
        if self.app.cloud is None:
            self.app.notify("no cloud API", severity="error")
            return False
        return True

    def _selected_cloud(self, verb: str) -> dict | None:
        row = self.selected
        if row is None:
            self.app.notify(f"No endpoint selected to {verb}.", severity="warning")
            return None
        if row.get("type") == "agent":
            from console.manage import AGENT_READ_ONLY

            self.app.notify(AGENT_READ_ONLY, severity="warning")
            return None
        return row

    def action_new_endpoint(self) -> None:
        from console.manage import EndpointForm, open_form

        if not self.app.refuse_read_only("creating endpoints") and self._cloud_ok():
            open_form(self, EndpointForm(self.app.cloud))

    def action_edit_endpoint(self) -> None:
        from console.manage import EndpointForm, open_form

        if self.app.refuse_read_only("editing endpoints and policies"):
            return
        if self._cloud_ok() and (row := self._selected_cloud("edit")) is not None:
            open_form(self, EndpointForm(self.app.cloud, row))

    def action_delete_endpoint(self) -> None:
        from console.manage import confirm_delete

        if self.app.refuse_read_only("deleting endpoints"):
            return
        if not self._cloud_ok():
            return
        if (row := self.selected) is None:
            self.app.notify("No endpoint selected to delete.", severity="warning")
            return
        url = row.get("url") or row.get("public_url") or row["id"]
        if row.get("type") == "agent":
            # the API tells an ngrok SDK agent to stop this tunnel (StopTunnel); burrow's
            # own agents refuse, and the API's answer says what to do instead
            detail = "SDK agents are told to stop it; burrow agents refuse."
            confirm_delete(self, f"/endpoints/{row['id']}", f"agent endpoint {url}", detail)
            return
        confirm_delete(self, f"/endpoints/{row['id']}", f"cloud endpoint {url}", "Its traffic policy is deleted with it.")

    def action_sessions(self) -> None:
        from console.manage import SessionsScreen

        if self._cloud_ok():
            self.app.push_screen(SessionsScreen(read_only=self.read_only))


class IngressesPane(TablePane):
    context = "ingresses"
    EMPTY = (
        "[b]No agent ingresses.[/b] Agents connect to the edge's own address.\n"
        "An agent ingress is a domain of yours that agents dial instead (with its certificate).\n"
        "[b]n[/b] registers one."
    )
    COLUMNS = (
        ("DOMAIN", lambda r: r.get("domain", "")),
        ("REGION DOMAINS", lambda r: ", ".join(r.get("region_domains") or [])),
        ("CERTIFICATE", lambda r: _cert_status(r)),
        ("DESCRIPTION", lambda r: r.get("description", "")),
    )

    def _cloud_ok(self) -> bool:
        if self.app.cloud is None:
            self.app.notify("no cloud API", severity="error")
            return False
        return True

    def _picked(self, verb: str) -> dict | None:
        row = self.selected
        if row is None:
            self.app.notify(f"No agent ingress selected to {verb}.", severity="warning")
        return row

    def action_new_ingress(self) -> None:
        from console.manage import IngressForm, open_form

        if not self.app.refuse_read_only("registering agent ingresses") and self._cloud_ok():
            open_form(self, IngressForm(self.app.cloud))

    def action_edit_ingress(self) -> None:
        from console.manage import IngressForm, open_form

        if self.app.refuse_read_only("editing agent ingresses"):
            return
        if self._cloud_ok() and (row := self._picked("edit")) is not None:
            open_form(self, IngressForm(self.app.cloud, row))

    def action_delete_ingress(self) -> None:
        from console.manage import confirm_delete

        if self.app.refuse_read_only("deleting agent ingresses"):
            return
        if not self._cloud_ok() or (row := self._picked("delete")) is None:
            return
        domain = row.get("domain") or row["id"]
        confirm_delete(self, f"/agent_ingresses/{row['id']}", f"agent ingress {domain}", "Agents can no longer use its names.")


def _cert_status(r: dict) -> str:
    st = r.get("certificate_management_status") or {}
    job = st.get("provisioning_job") if isinstance(st, dict) else None
    if job:
        return f"provisioning: {job.get('msg', '')}"
    if st.get("renews_at"):
        return f"ok, renews {str(st['renews_at'])[:10]}"
    return "—" if not r.get("certificate_management_policy") else "pending"


class TunnelsPane(TablePane):
    context = "tunnels"
    FLEX = ("PUBLIC URL → ADDR", "PUBLIC URL", "NAME")
    EMPTY = (
        "[b]No tunnels[/b] — [b]n[/b] starts one, or run [b]burrow http 8000[/b].\n"
        "A tunnel gives an app on this machine a public URL; its live traffic shows here."
    )

    def __init__(self, *, id: str, read_only: bool = False) -> None:
        super().__init__(id=id, read_only=read_only)
        self.history: dict[str, deque] = {}
        self._last_count: dict[str, int] = {}

    @property
    def COLUMNS(self):
        def m(r, part, key):
            return (r.get("metrics") or {}).get(part, {}).get(key, 0)

        wide = self.size.width >= 110 or not self.size.width
        cols = [
            ("NAME", lambda r: r.get("name", ""), True),
            (
                "PUBLIC URL → ADDR",
                lambda r: f"{r.get('public_url') or '(offline)'} → {(r.get('config') or {}).get('addr', '')}",
                wide,
            ),
            ("PUBLIC URL", lambda r: r.get("public_url") or "(offline)", not wide),
            ("PROTO", lambda r: r.get("proto", ""), wide),
            ("TTL", lambda r: str(m(r, "conns", "count")), True),
            ("OPN", lambda r: str(m(r, "conns", "gauge")), True),
            ("RT1", lambda r: f"{m(r, 'conns', 'rate1'):.2f}", True),
            ("RT5", lambda r: f"{m(r, 'conns', 'rate5'):.2f}", wide),
            ("P50", lambda r: human_duration(int(m(r, "http", "p50") or m(r, "conns", "p50"))), wide),
            ("P90", lambda r: human_duration(int(m(r, "http", "p90") or m(r, "conns", "p90"))), True),
            (
                "REQ/S",
                lambda r: Text(sparkline(list(self.history.get(r.get("name", ""), ())), 12 if wide else 8), style="bold"),
                True,
            ),
        ]
        return tuple((name, fn) for name, fn, show in cols if show)

    def key_of(self, row: dict) -> str:
        return row.get("name", "")

    def record_metrics(self, metrics_by_name: dict[str, dict]) -> None:
        """One tick of per-tunnel metrics (from the event stream): extend the sparklines."""
        for name, m in metrics_by_name.items():
            count = (m.get("http") or {}).get("count", 0) or (m.get("conns") or {}).get("count", 0)
            last = self._last_count.get(name)
            self._last_count[name] = count
            if last is not None:
                self.history.setdefault(name, deque(maxlen=40)).append(max(0, count - last))
        for row in self.rows:
            if row.get("name") in metrics_by_name:
                row["metrics"] = metrics_by_name[row["name"]]
        self._render_rows()

    def action_new_tunnel(self) -> None:
        self.app.action_new_tunnel()

    def action_stop_tunnel(self) -> None:
        row = self.selected
        if row is None:
            self.app.notify("No tunnel selected.", severity="warning")
            return
        self.app.confirm_stop_tunnel(row["name"], row.get("public_url", ""))


def public_addresses(tunnels: list[dict], endpoints: list[dict]) -> list[tuple[str, str]]:
    """The edge's public HTTP addresses the console knows: ``(url, what serves it)`` from
    the tunnels' public URLs, then the endpoints' (never invented)."""
    seen: dict[str, str] = {}
    for t in tunnels:
        url = t.get("public_url") or ""
        if url.startswith(("http://", "https://")) and url not in seen:
            addr = (t.get("config") or {}).get("addr", "")
            seen[url] = f"tunnel {t.get('name', '')}" + (f" → {addr}" if addr else "")
    for e in endpoints:
        url = e.get("url") or e.get("public_url") or ""
        if url.startswith(("http://", "https://")) and url not in seen:
            seen[url] = f"{e.get('type', '')} endpoint".strip()
    return list(seen.items())


def edge_pattern(url: str) -> str | None:
    """``http://web.burrow.localhost:4080`` → ``http://*.burrow.localhost:4080``: where
    a new tunnel's random name will live (None when the host has no parent domain)."""
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0]
    parent = host.partition(".")[2]
    parent_name = parent.split(":", 1)[0]
    if host.split(":", 1)[0].replace(".", "").isdigit() or ("." not in parent_name and parent_name != "localhost"):
        return None  # an IP address, or a name right under a top-level domain
    return f"{scheme}://*.{parent}"


def first_steps(
    tunnels: list[dict], endpoints: list[dict], read_only: bool = False, edge: dict | None = None
) -> Text:
    """The Requests pane before the first request: what to do next, with the edge's
    real address when a tunnel or an endpoint tells it, or when the console started or
    found the local backend (``edge``: its ``http_url`` and ``domain``)."""
    out = Text()
    out.append("No requests yet.", style="bold")
    out.append(" Every HTTP request through a tunnel shows here as it arrives.\n\n")

    def row(label: str, value: str, note: str = "", style: str = "bold") -> None:
        out.append(f"  {label:<20}", style="dim")
        out.append(value, style=style)
        if note:
            out.append(f"   {note}", style="dim")
        out.append("\n")

    row("Put an app online", "burrow http 8000", "(then open the URL it prints)")
    addresses = public_addresses(tunnels, endpoints)
    patterns = list(dict.fromkeys(p for p in (edge_pattern(u) for u, _ in addresses) if p))
    if not patterns and edge and edge.get("domain") and edge.get("http_url"):
        scheme, _, hostport = edge["http_url"].partition("://")
        port = hostport.rpartition(":")[2]
        default = {"http": "80", "https": "443"}.get(scheme)
        patterns = [f"{scheme}://*.{edge['domain']}" + ("" if port == default else f":{port}")]
    if patterns:
        row("Your edge serves", patterns[0])
    for url, what in addresses[:3]:
        row("Try", url, what)
    if not addresses and not patterns:
        row("Your edge", "its public address shows here once a tunnel is up", style="dim italic")
    if not read_only:
        row("Or from here", "3 then n", "starts a tunnel;  ? lists every key")
    return out


_TOKEN = re.compile(r"""(?:[^\s"']+|"[^"]*"?|'[^']*'?)+""")


def bad_token(query: str, error: str) -> tuple[int, int] | None:
    """Where in ``query`` the token is that the agent's error names: ``(start, end)``.

    The agent names the token (``status:abc — expected…``, ``'OR' is not supported``,
    ``unknown field 'foo'``) but not its place; the first token the message quotes
    (without a leading ``-``, case aside) or whose field it names is the one."""
    low = error.lower()
    for m in _TOKEN.finditer(query):
        tok = m.group().lower()
        bare = tok[1:] if tok.startswith("-") and len(tok) > 1 else tok
        field = bare.partition(":")[0] if ":" in bare else None
        if (
            re.search(rf"(^|: ){re.escape(bare)} ", low)  # "invalid query: status:abc — …"
            or f"'{bare}'" in low
            or (field and f"field '{field}'" in low)
        ):
            return m.start(), m.end()
    return None


def filter_error_line(query: str, error: str) -> Text:
    """``bad filter: path:/b status:abc ← status:abc — expected…`` with the bad token
    underlined in red (and the rest of the query plain), so the eye goes to it."""
    line = Text("bad filter: ", style="bold red")
    span = bad_token(query, error)
    if span is None:
        line.append(error, style="bold red")
        return line
    start, end = span
    line.append(query[:start])
    line.append(query[start:end], style="bold red underline reverse")
    line.append(query[end:])
    line.append(f"  ← {error}", style="red")
    return line


class RequestsPane(Pane):
    context = "requests"

    def __init__(self, *, id: str, read_only: bool = False, clock=None) -> None:
        super().__init__(id=id, read_only=read_only)
        self._bindings = BindingsMap(
            [b for b in bindings("requests", read_only) if not b.action.startswith(("cursor", "top", "bottom", "page"))]
        )
        self._clock = clock

    def compose(self) -> ComposeResult:
        yield Static("", id="requests-status", classes="status-line")
        yield from super().compose()
        yield RequestList(id="request-list", clock=self._clock)
        yield Static("", id="requests-empty", classes="empty")
        yield RequestSummary(id="request-summary")

    def on_mount(self) -> None:
        self.query_one(Input).display = False
        self.query_one(Input).placeholder = "filter: status:5xx method:POST path:/api body:\"token\" tunnel:web dur>200ms"
        self.update_status()

    @property
    def list(self) -> RequestList:
        return self.query_one(RequestList)

    def focus_main(self) -> None:
        self.list.focus()

    def update_status(self) -> None:
        """``filter: status:5xx · 3 marked · paused · 12/230``: what narrows the list,
        what is marked, whether the newest request stays selected, matched/total."""
        rl = self.list
        line = Text()
        if self.filter_error:
            # The rejected filter stays in the box; the list and the old filter stay as they were.
            line.append_text(filter_error_line(self.filter_error_query, self.filter_error))
            line.append("  (esc clears)  ")
        parts: list[tuple[str, str]] = []
        if self.filter_text:
            parts.append((f"filter: {self.filter_text}", "bold"))
        if rl.marked:
            parts.append((f"{len(rl.marked):,} marked", "bold"))
        parts.append(("following", "") if rl.following else ("paused (f follows)", "bold"))
        if self.filter_text:
            parts.append((f"{rl.total:,}/{max(self.stored, rl.total):,}", ""))
        else:
            parts.append((plural(rl.total, "request"), ""))
        for i, (text, style) in enumerate(parts):
            if i:
                line.append(" · ", style="dim")
            line.append(text, style=style)
        self.query_one("#requests-status", Static).update(line)
        self._update_empty()

    def _update_empty(self) -> None:
        """Until a request is there, say what to do next (or that the filter hides all)."""
        rl = self.list
        empty = rl.total == 0
        self.set_class(empty, "-empty")
        hint = self.query_one("#requests-empty", Static)
        hint.display = empty
        if not empty:
            return
        if self.filter_text:
            text = Text.assemble(("No requests match ", ""), (self.filter_text, "bold"), (".  esc clears the filter.", ""))
        else:
            app = self.app
            text = first_steps(
                getattr(app, "tunnels", []), getattr(app, "endpoints", []), self.read_only,
                getattr(app, "edge_info", None),
            )
        hint.update(text)

    def on_resize(self) -> None:
        split = self.size.width >= SPLIT_WIDTH
        if split != self.has_class("-split"):
            self.set_class(split, "-split")
            if split:
                self.summary.select(self.list.selected)

    @property
    def summary(self) -> RequestSummary:
        return self.query_one(RequestSummary)

    def on_request_selected(self, event: RequestSelected) -> None:
        event.stop()
        if self.has_class("-split"):
            self.summary.select(event.row)

    def on_list_mode_changed(self, event: ListModeChanged) -> None:
        event.stop()
        self.update_status()

    stored = 0  # every capture the agent holds (the "/230" of "12/230")
    filter_error: str | None = None
    filter_error_query = ""

    def apply_filter(self, text: str) -> None:
        if not text:
            self.filter_checked(text, None)
            return
        # Validate first: an invalid filter must not blank the list it would replace.
        self.app.check_filter(text)

    def filter_checked(self, text: str, error: str | None) -> None:
        if error is not None:
            self.filter_error = error
            self.filter_error_query = text
            box = self.query_one(Input)
            box.display = True
            box.value = text
            box.focus()
            self.update_status()
            return
        self.filter_error = None
        super().apply_filter(text)
        self.app.reload_requests()
        self.update_status()

    def action_detail(self) -> None:
        row = self.list.selected
        if row is not None:
            self.app.open_detail(row["id"])

    def action_replay(self) -> None:
        row = self.list.selected
        if row is None:
            self.app.notify("No request selected.", severity="warning")
            return
        self.app.replay(row["id"])

    def action_toggle_follow(self) -> None:
        rl = self.list
        rl.following = not rl.following
        if rl.following:
            rl.cursor = 0
        self.update_status()

    def action_clear(self) -> None:
        self.app.confirm_clear()
