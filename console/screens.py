"""Screens over the panes: request detail, confirm, help and the new-tunnel form."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingsMap
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Input, Label, Select, Static, TextArea

from console.keymap import KEYMAP, bindings, display_key
from console.render import decode_body, human_duration, human_size, render_body
from console.widgets.footer import BurrowFooter


def error_text(exc: Exception) -> str:
    """An API's refusal as the user should read it (its ``msg``), else the exception."""
    return getattr(exc, "msg", None) or f"{type(exc).__name__}: {exc}"


def submit_inline(screen, call: Callable[[], Awaitable], on_done: Callable[[object], None], group: str) -> None:
    """Run ``call`` in a worker while the dialog stays open: its error shown inline
    (``screen.show_error``) with the input kept, ``on_done(result)`` once it succeeds.
    A second submit while one is in flight does nothing (``screen.busy``)."""
    if screen.busy:
        return
    screen.busy = True
    screen.show_error("")

    async def go() -> None:
        try:
            result = await call()
        except Exception as exc:  # the API's refusal inline; the input stays
            screen.busy = False
            screen.show_error(error_text(exc))
            return
        screen.busy = False
        on_done(result)

    screen.run_worker(go, group=group, exclusive=True)


def form_values(screen) -> tuple:
    """What a form's fields hold now: compared with what they held on mount to tell a
    changed form (ask before discarding it) from an untouched one (close at once)."""
    return tuple(
        (w.id, w.text if isinstance(w, TextArea) else w.value) for w in screen.query("Input, TextArea, Select")
    )


def cancel_form(screen) -> None:
    """esc/q on a form: close it at once when nothing changed, else ask first."""
    if form_values(screen) == getattr(screen, "pristine", None):
        screen.dismiss(None)
        return

    def answered(yes: bool | None) -> None:
        if yes:
            screen.dismiss(None)

    screen.app.push_screen(
        ConfirmScreen("Discard changes?", "y throws away what you typed · n goes back to the form"), answered
    )


class FieldInput(Input):
    """A form field that takes a paste as typing would: a tab in it moves on to the next
    field (so ``8080<tab>web`` fills two fields), the paste ends at its first line
    break (never a submit), and other control characters are left out."""

    def _on_paste(self, event) -> None:
        event.stop()
        event.prevent_default()  # not Input's own paste, which keeps tabs in the value
        text = event.text.splitlines()[0] if event.text else ""
        field: Input = self
        for n, part in enumerate(text.split("\t")):
            if n:
                nxt = self.screen.focus_next()
                if not isinstance(nxt, Input):
                    return
                field = nxt
            clean = "".join(ch for ch in part if ch.isprintable())
            if field.selection.is_empty:
                field.insert_text_at_cursor(clean)
            else:
                field.replace(clean, *field.selection)


class InlineErrors:
    """For dialogs that show an error inline (``show_error``): editing any field clears
    it, so an error never stays next to the field that has been fixed since."""

    busy: bool = False

    def _edited(self) -> None:
        if not self.busy:  # while a submit is in flight its answer decides
            self.show_error("")

    def on_input_changed(self, event: Input.Changed) -> None:
        self._edited()

    def on_text_area_changed(self, event) -> None:
        self._edited()

    def on_select_changed(self, event: Select.Changed) -> None:
        self._edited()


class ConfirmScreen(ModalScreen[bool]):
    """Asks before a dangerous action: ``y``/``enter`` confirm, ``n``/``esc`` cancel."""

    BINDINGS = bindings("confirm")

    def __init__(self, question: str, detail: str = "") -> None:
        super().__init__()
        self.question = question
        self.detail = detail

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box", classes="dialog"):
            yield Label(self.question, id="confirm-question")
            if self.detail:
                yield Label(self.detail, id="confirm-detail", classes="dim")
            yield Label("[b]y[/b]/enter: yes    [b]n[/b]/esc: no", classes="dim")

    def action_confirm(self) -> None:
        self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)


class QuitScreen(ModalScreen[str | None]):
    """Quitting a console that started the local backend: stop it, leave it, or stay."""

    BINDINGS = [
        ("y", "choose('stop')", "stop"),
        ("d", "choose('leave')", "leave running"),
        ("n,escape,q", "choose(None)", "stay"),
    ]

    def __init__(self, tunnels: int, captures: int, others: int = 0) -> None:
        super().__init__()
        self.tunnels = tunnels
        self.captures = captures
        self.others = others  # sessions of other agents (ngrok SDKs...) on the local edge

    def compose(self) -> ComposeResult:
        t = f"{self.tunnels} tunnel{'s' * (self.tunnels != 1)}"
        c = f"{self.captures:,} capture{'s' * (self.captures != 1)}"
        with Vertical(id="confirm-box", classes="dialog"):
            yield Label(f"Stop the local edge and agent: {t}, {c}?", id="confirm-question")
            if self.others:  # an ngrok SDK or another agent, cut off with the edge
                n = f"{self.others} other agent{'s' * (self.others != 1)}"
                yield Label(f"{n} on the edge would be cut off too.", id="confirm-others")
            yield Label("Captures stay on disk either way.", id="confirm-detail", classes="dim")
            yield Label("`burrow` attaches again; `burrow stop` stops it.", classes="dim")
            yield Label("[b]y[/b]: stop    [b]n[/b]/esc: stay    [b]d[/b]: leave it running", classes="dim")

    def action_choose(self, choice: str | None) -> None:
        self.dismiss(choice)


class HelpScreen(ModalScreen[None]):
    """Every key that works in the current context, with its words."""

    BINDINGS = [("escape,question_mark,q", "dismiss_help", "close")]

    def __init__(self, contexts: list[str], read_only: bool = False) -> None:
        super().__init__()
        self.contexts = contexts
        self.read_only = read_only

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        keymap = getattr(self.app, "keymap_overrides", {})
        for ctx in self.contexts:
            rows = [k for k in KEYMAP if k.context == ctx and not (self.read_only and k.dangerous)]
            if not rows:
                continue
            table.add_row(Text(ctx.upper(), style="underline"), "")
            for k in rows:
                table.add_row(display_key(keymap.get(k.id, k.key)), k.description or k.help)
            table.add_row("", "")
        with VerticalScroll(id="help-box", classes="dialog"):
            yield Static(Text("Keys", style="bold"))
            yield Static(table)
            yield Static(Text("ctrl+p opens the command palette; esc closes this.", style="dim"))

    def action_dismiss_help(self) -> None:
        self.dismiss(None)


class NewTunnelScreen(InlineErrors, ModalScreen[dict | None]):
    """A small form: proto, upstream address, name, URL."""

    BINDINGS = [("escape", "cancel", "cancel"), Binding("q", "cancel", "back", show=False)]

    def __init__(self, start: Callable[[dict], Awaitable[str]] | None = None) -> None:
        """``start`` makes the API call; the form stays open with its error inline
        until it succeeds, then dismisses with ``{"message": ...}``.  Without it the
        form dismisses with the request body."""
        super().__init__()
        self.start = start
        self.busy = False

    def compose(self) -> ComposeResult:
        # One line per field (label left, compact input right), so the whole form, its
        # error and its buttons fit an 80×24 terminal.
        with Vertical(id="new-tunnel", classes="dialog"):
            yield Label("Start a tunnel", classes="title")
            with Horizontal(classes="row"):
                yield Label("Protocol")
                yield Select(
                    [(p, p) for p in ("http", "tcp", "tls")], value="http", allow_blank=False, id="nt-proto", compact=True
                )
            with Horizontal(classes="row"):
                yield Label("Upstream")
                yield FieldInput(placeholder="8080  (port, host:port or URL)", id="nt-addr", compact=True)
            with Horizontal(classes="row"):
                yield Label("Name")
                yield FieldInput(placeholder="optional, e.g. web", id="nt-name", compact=True)
            with Horizontal(classes="row"):
                yield Label("URL")
                yield FieldInput(placeholder="optional; random when empty", id="nt-url", compact=True)
            yield Label("", id="nt-error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Start", variant="primary", id="nt-start", compact=True)
                yield Button("Cancel", id="nt-cancel", compact=True)
                yield Static("esc cancels", classes="dim")

    def on_mount(self) -> None:
        self.query_one("#nt-addr", Input).focus()
        self.pristine = form_values(self)

    def _submit(self) -> None:
        addr = self.query_one("#nt-addr", Input).value.strip()
        if not addr:
            self.show_error("An upstream address is required.")
            self.query_one("#nt-addr", Input).focus()
            return
        proto = self.query_one("#nt-proto", Select).value
        from backend.agent.forward import Upstream

        try:
            Upstream.parse(addr, str(proto))
        except (ValueError, KeyError) as exc:
            self.show_error(f"Upstream address: {exc}" if str(exc) else "Upstream address is not valid.")
            self.query_one("#nt-addr", Input).focus()
            return
        body = {"proto": proto, "addr": addr}
        name = self.query_one("#nt-name", Input).value.strip()
        url = self.query_one("#nt-url", Input).value.strip()
        if name:
            body["name"] = name
        if url:
            body["url"] = url
        if self.start is None:
            self.dismiss(body)
            return
        start = self.start
        submit_inline(self, lambda: start(body), lambda message: self.dismiss({"message": message}), "new-tunnel")

    def show_error(self, text: str) -> None:
        label = self.query_one("#nt-error", Label)
        label.update(text)
        label.display = bool(text)  # no empty line while there is nothing to say

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "nt-start":
            self._submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        cancel_form(self)


class DetailScreen(Screen):
    """One captured exchange: request and response, headers and body."""

    def __init__(self, capture_id: str, read_only: bool = False) -> None:
        super().__init__()
        self._bindings = BindingsMap(bindings("detail", read_only))
        self.capture_id = capture_id
        self.capture: dict | None = None
        self.mode = "pretty"

    def compose(self) -> ComposeResult:
        yield Static("loading…", id="detail-summary")
        with VerticalScroll(id="detail-scroll"):
            yield Static("", id="detail-request")
            yield Static("", id="detail-response")
        yield BurrowFooter()

    def on_mount(self) -> None:
        self.app.load_capture(self.capture_id)

    def show(self, capture: dict) -> None:
        self.capture = capture
        self._draw()

    def _draw(self) -> None:
        c = self.capture
        if c is None:
            return
        req, resp = c.get("request") or {}, c.get("response")
        status = f"{resp['status_code']}" if resp else "pending"
        summary = Text()
        summary.append(f"{req.get('method', '')} ", style="bold")
        summary.append(req.get("uri", ""))
        summary.append(f"   {status}", style="bold")
        summary.append(f"   {human_duration(c.get('duration') or 0)}   {c.get('tunnel_name', '')}   from {c.get('remote_addr', '')}")
        if c.get("replay_of"):
            summary.append(f"   ↻ replay of {c['replay_of']}", style="italic")
        summary.append(f"   [{self.mode}]", style="dim")
        self.query_one("#detail-summary", Static).update(summary)
        self.query_one("#detail-request", Static).update(self._part("Request", req))
        self.query_one("#detail-response", Static).update(
            self._part("Response", resp) if resp else Text("\nResponse: none yet", style="dim")
        )

    def _part(self, title: str, part: dict):
        from rich.console import Group

        raw = base64.b64decode(part.get("raw") or "")
        info = decode_body(raw)
        headers = Table.grid(padding=(0, 1))
        headers.add_column(style="bold", no_wrap=True)
        headers.add_column()
        for k, v in info.headers:
            headers.add_row(k, v)
        first = raw.split(b"\r\n", 1)[0].decode("latin-1")
        size = part.get("body_size")
        head = Text("\n")
        head.append(title, style="bold underline")
        head.append(f"  {first}", style="bold")
        if size is not None:
            head.append(f"   body {human_size(size)}", style="dim")
        body = render_body(info, self.mode, truncated=bool(part.get("truncated")), full_size=size)
        return Group(head, headers, Text(""), body)

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_replay(self) -> None:
        self.app.replay(self.capture_id)

    def action_mode(self, mode: str) -> None:
        self.mode = mode
        self._draw()

    def action_focus_part(self, part: str) -> None:
        target = self.query_one(f"#detail-{part}", Static)
        self.query_one("#detail-scroll", VerticalScroll).scroll_to_widget(target, top=True, animate=False)

    def action_scroll_down(self) -> None:
        self.query_one("#detail-scroll", VerticalScroll).scroll_down(animate=False)

    def action_scroll_up(self) -> None:
        self.query_one("#detail-scroll", VerticalScroll).scroll_up(animate=False)

    def action_scroll_top(self) -> None:
        self.query_one("#detail-scroll", VerticalScroll).scroll_home(animate=False)

    def action_scroll_bottom(self) -> None:
        self.query_one("#detail-scroll", VerticalScroll).scroll_end(animate=False)

    def action_open_replay(self) -> None:
        """Open the replay last made from this view (``r``, then ``J``)."""
        self.app.open_last_replay(self.capture_id)
