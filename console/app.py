"""The burrow console: a Textual app over the agent API and the cloud API.

All I/O happens in workers that post messages (:mod:`console.messages`); handlers on
the app own the state and update the panes.  The console reaches burrow only over
HTTP, so it works the same against a remote burrow over SSH and against ngrok.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Static, TabbedContent, TabPane

from console import messages as m
from console.client import AgentClient, APIError, CloudClient
from console.config import Settings
from console.keymap import KEYMAP, bindings, check_keymap, display_key
from console.panes import EndpointsPane, IngressesPane, RequestsPane, TunnelsPane
from console.render import plural
from console.screens import ConfirmScreen, DetailScreen, HelpScreen, NewTunnelScreen, QuitScreen
from console.themes import BUNDLED_THEMES_DIR, DEFAULT_VARIABLES, load_themes, user_themes_dir
from console.widgets.footer import BurrowFooter
from console.widgets.request_list import NeedRows, RequestList

PANES = ("endpoints", "ingresses", "tunnels", "requests")
# console.diff, console.export and console.request_actions are imported by the actions
# that use them: the first frame does not need them (~20 ms of imports).

# Agent events redraw the header and the Requests status line at most this often: at
# 1,000 requests a second, re-rendering them for each of the 2,000 events took half of
# the event loop.  An event after a quiet spell is drawn at once.
REDRAW_EVERY = 1 / 30
#: seconds a key of a burst waits for the one before it (and a dialog it opened) at most
KEY_WAIT = 5.0


def _while_mounted(handler):
    """Data arriving from a worker after the panes are gone (the app is closing) is dropped."""

    @functools.wraps(handler)
    def wrapper(self, msg):
        try:
            return handler(self, msg)
        except NoMatches:
            if self.is_running and self.screen_stack and self.screen_stack[0].is_attached:
                raise
            return None

    return wrapper

def _db_failing(db: dict) -> str:
    """Header text for an agent whose ``--inspect-db`` file is not being written."""
    from rich.markup import escape

    error = escape(str(db.get("error") or "write failed")[:60])
    return f"  [dim]│[/dim] [$error]capture db failing: {error} ({db.get('pending', 0):,} unsaved)[/]"


# Resolves where to connect, possibly starting a bundled backend; returns
# (agent_url, api_url, api_key).  ``progress`` shows what is happening.
Starter = Callable[[Callable[[str], None]], Awaitable[tuple[str | None, str | None, str | None]]]


class BurrowApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "burrow"
    BINDINGS = bindings("app")

    def __init__(
        self,
        settings: Settings,
        starter: Starter,
        *,
        clock=None,
        theme_dirs: Iterable[Path] | None = None,
        on_exit: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self._theme_dirs = list(theme_dirs) if theme_dirs is not None else [BUNDLED_THEMES_DIR, user_themes_dir()]
        super().__init__()
        self.starter = starter
        self.clock = clock
        self.on_exit_hook = on_exit
        self.agent: AgentClient | None = None
        self.cloud: CloudClient | None = None
        self.status: dict = {}
        self.tunnels: list[dict] = []
        self.endpoints: list[dict] = []
        self.ingresses: list[dict] = []
        self.connection = "connecting"
        self.connection_error = ""
        self.keymap_overrides: dict[str, str] = dict(settings.keymap)
        self._reload_pending = False
        self._redraw_timer = None
        self._redrawn_at = 0.0
        self._redraw_header = self._redraw_status = False
        self._key_backlog: collections.deque = collections.deque()
        self._key_in_flight = False
        self._key_watch: asyncio.Task | None = None
        self.last_copied: str | None = None
        # capture id → the newest replay of it made from this console (J opens it)
        self.replays: dict[str, str] = {}
        self.last_export: Path | None = None
        # the local backend this console started (or adopted), set by the starter: quitting
        # asks whether to stop it (backend_choice: "stop" or "leave")
        self.owned_backend: dict | None = None
        self.backend_choice: str | None = None
        # the local backend's public HTTP address and domain, when the console knows them
        # (it started or found the backend): the first screen names them
        self.edge_info: dict | None = None
        # The theme is chosen here, before Textual first parses the stylesheet: chosen in
        # on_mount, it made Textual parse and apply every style a second time (~40 ms
        # before the first frame).  Problems are reported on mount.
        themes, self._theme_errors = load_themes(self._theme_dirs)
        for theme in themes.values():
            self.register_theme(theme)
        self._theme_known = settings.theme in self.available_themes
        if self._theme_known:
            self._use_theme_before_start(settings.theme)
        else:
            self._use_theme_before_start("burrow-dark" if "burrow-dark" in self.available_themes else "textual-dark")

    def _use_theme_before_start(self, name: str) -> None:
        """What setting ``self.theme`` does (App._watch_theme), minus the stylesheet
        refresh, which has nothing to refresh before the app runs."""
        self.set_reactive(App.theme, name)
        theme = self.current_theme
        classes = {c: False for c in self.classes if c.startswith("-theme-")}
        classes[f"-theme-{name}"] = True
        classes["-dark-mode"] = theme.dark
        classes["-light-mode"] = not theme.dark
        self.update_classes(classes, update=False)
        self._refresh_truecolor_filter(self.ansi_theme)
        self.stylesheet.set_variables(self.get_css_variables())

    # ------------------------------------------------------------ keys, one at a time
    # Textual hands each key to the focused widget's queue at once, and runs the key's
    # binding only when the key has bubbled back up to the app.  Keys arriving in one
    # burst (fast typing, a terminal without bracketed paste) were therefore all given
    # to the old widget before the first one ran: "n8080" opened the new-tunnel form
    # but "8080" went to the table behind it, and a tab among them switched panes.
    # Here each key is delivered only once the one before has been handled, and once
    # a dialog the previous key opened is mounted and focused.
    async def on_event(self, event) -> None:
        from textual import events

        if not isinstance(event, events.Key) or event.is_forwarded:
            await super().on_event(event)
            return
        if self._key_in_flight and not getattr(event, "_burrow_go", False):
            self._key_backlog.append(event)  # after the key before it
            return
        # nothing before it: delivered now, as Textual does, and followed until handled
        self._key_in_flight = True
        event._burrow_done = asyncio.Event()
        await super().on_event(event)
        if not event.is_forwarded:  # a priority binding took it, here and now
            event._burrow_done.set()
        self._key_watch = asyncio.create_task(self._follow_key(event))

    def _on_key(self, event) -> None:
        # Textual calls App._on_key (the bindings) after this one: done after that
        done = getattr(event, "_burrow_done", None)
        if done is not None:
            self.call_next(done.set)

    async def _follow_key(self, event) -> None:
        """Wait until ``event`` is handled, then deliver the next key of a burst."""
        with contextlib.suppress(Exception):  # a closing app: never block input
            # Handled: it came back up to the app (where bindings run), or a widget on
            # the way stopped it (an Input took a letter).  Stopped on its way into the
            # app, the app handles it before a round trip through its queue.
            done = event._burrow_done
            deadline = time.monotonic() + 1.0
            while not done.is_set() and not event._stop_propagation and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            if not done.is_set():
                await self._round_trip(self)
            if self._key_backlog:
                screen = self.screen
                if not screen._mounted_event.is_set():  # a dialog the key opened
                    # (bounded, never forever; generous, for a loaded machine or slow SSH)
                    await asyncio.wait_for(screen._mounted_event.wait(), KEY_WAIT)
                    await self._round_trip(self)  # the focus its on_mount asked for
        if not self._key_backlog:
            self._key_in_flight = False
            return
        nxt = self._key_backlog.popleft()
        nxt._burrow_go = True
        self.post_message(nxt)

    @staticmethod
    async def _round_trip(node) -> None:
        """Wait until ``node`` has handled everything posted to it so far."""
        done = asyncio.Event()
        if node.call_later(done.set):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), KEY_WAIT)

    # ------------------------------------------------------------ set-up
    def get_theme_variable_defaults(self) -> dict[str, str]:
        return {**super().get_theme_variable_defaults(), **DEFAULT_VARIABLES}

    def compose(self) -> ComposeResult:
        ro = self.settings.read_only
        yield Static("", id="header")
        with TabbedContent(initial="requests", id="panes"):
            with TabPane("1 Endpoints", id="endpoints"):
                yield EndpointsPane(id="endpoints-pane", read_only=ro)
            with TabPane("2 Agent Ingresses", id="ingresses"):
                yield IngressesPane(id="ingresses-pane", read_only=ro)
            with TabPane("3 Tunnels", id="tunnels"):
                yield TunnelsPane(id="tunnels-pane", read_only=ro)
            with TabPane("4 Requests", id="requests"):
                yield RequestsPane(id="requests-pane", read_only=ro, clock=self.clock)
        yield BurrowFooter()

    def on_mount(self) -> None:
        if not self.settings.animations:
            self.animation_level = "none"
        for err in self._theme_errors:
            self.notify(err, severity="warning", timeout=8)
        if not self._theme_known:
            self.notify(f"unknown theme {self.settings.theme!r}; using the default", severity="warning")
        if self.keymap_overrides:
            self.set_keymap(self.keymap_overrides)
            # "?" and "question_mark" are the same key: compare them as Textual will
            from textual.keys import _normalize_key_list

            for warning in check_keymap(self.keymap_overrides, _normalize_key_list):
                self.notify(warning, severity="warning", timeout=12)
        self.query_one(RequestList).focus()
        self._draw_header()

    def on_ready(self) -> None:
        # Textual's Ready comes once the first frame is on screen: connecting from
        # on_mount put the HTTP clients and the first requests (~60 ms) before it.
        self.start()

    @work(exclusive=True, group="startup")
    async def start(self) -> None:
        def progress(msg: str) -> None:
            self.connection = msg
            self._draw_header()

        try:
            agent_url, api_url, api_key = await self.starter(progress)
        except Exception as exc:  # a backend that cannot start: say so, never a traceback
            self.connection = "offline"
            self.connection_error = str(exc)
            self._draw_header()
            self.notify(f"Cannot start or reach burrow: {exc}", severity="error", timeout=15)
            return
        if agent_url:
            self.agent = AgentClient(agent_url)
        if api_url and api_key:
            self.cloud = CloudClient(api_url, api_key)
        if self.agent is None and self.cloud is None:
            self.connection = "offline"
            self.connection_error = "no agent API or cloud API to talk to"
            self._draw_header()
            return
        self.refresh_all()
        if self.agent is not None:
            self.watch_events()
        if self.cloud is not None:
            self.poll_cloud()

    async def on_unmount(self) -> None:
        if self._key_watch is not None:
            self._key_watch.cancel()
        for c in (self.agent, self.cloud):
            if c is not None:
                with contextlib.suppress(Exception):
                    await c.close()
        if self.on_exit_hook is not None:
            await self.on_exit_hook()

    # ------------------------------------------------------------ workers
    @work(exclusive=True, group="load")
    async def refresh_all(self) -> None:
        await asyncio.gather(self._load_agent(), self._load_cloud(), return_exceptions=True)

    async def _load_agent(self) -> None:
        if self.agent is None:
            return
        try:
            self.post_message(m.StatusLoaded(await self.agent.status()))
            self.post_message(m.TunnelsLoaded(await self.agent.tunnels()))
            self.post_message(m.Connection("agent", True))
        except APIError as exc:
            self.post_message(m.Connection("agent", False, exc.msg))
            return
        self.reload_requests()

    async def _load_cloud(self) -> None:
        if self.cloud is None:
            return
        try:
            self.post_message(m.EndpointsLoaded(await self.cloud.endpoints()))
        except APIError as exc:
            self.post_message(m.Connection("cloud", False, exc.msg))
            return
        try:
            self.post_message(m.IngressesLoaded(await self.cloud.agent_ingresses()))
        except APIError as exc:
            if exc.status != 404:  # an account without ingresses support is fine
                self.post_message(m.Connection("cloud", False, exc.msg))

    @work(exclusive=True, group="events")
    async def watch_events(self) -> None:
        """Follow the agent's event stream; fall back to polling a plain ngrok agent."""
        assert self.agent is not None
        delay = 0.5
        while True:
            try:
                async for name, data in self.agent.events():
                    delay = 0.5
                    self.post_message(m.AgentEvent(name, data))
            except APIError as exc:
                if exc.status in (404, 405):
                    await self._poll_agent()
                    return
                self.post_message(m.Connection("agent", False, exc.msg))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10)
            self.refresh_all()

    async def _poll_agent(self) -> None:
        assert self.agent is not None
        while True:
            await asyncio.sleep(1.0)
            try:
                self.post_message(m.TunnelsLoaded(await self.agent.tunnels()))
                self.post_message(m.Connection("agent", True))
            except APIError as exc:
                self.post_message(m.Connection("agent", False, exc.msg))
                continue
            self.reload_requests()

    @work(exclusive=True, group="cloud")
    async def poll_cloud(self) -> None:
        while True:
            await asyncio.sleep(self.settings.cloud_poll_seconds)
            await self._load_cloud()

    @work(group="rows")
    async def load_rows(self, offset: int, limit: int, generation: int, query: str) -> None:
        if self.agent is None:
            return
        try:
            page = await self.agent.requests(offset, limit, query)
        except APIError as exc:
            if exc.status == 400:
                self.post_message(m.ActionFailed(exc.msg))
            return
        self.post_message(m.RowsLoaded(offset, page.items, page.total, generation, page.newest, page.stored))

    @work(exclusive=True, group="filter")
    async def check_filter(self, text: str) -> None:
        """Ask the agent whether a Requests filter is valid before dropping the current list."""
        error = None
        if self.agent is not None:
            try:
                await self.agent.requests(0, 1, text)
            except APIError as exc:
                if exc.status == 400:
                    error = exc.msg
        self.post_message(m.FilterChecked(text, error))

    @on(m.FilterChecked)
    def _filter_checked(self, msg: m.FilterChecked) -> None:
        try:
            pane = self.query_one(RequestsPane)
        except NoMatches:  # closing
            return
        pane.filter_checked(msg.text, msg.error)

    @work(group="capture")
    async def load_capture(self, capture_id: str) -> None:
        if self.agent is None:
            return
        try:
            self.post_message(m.CaptureLoaded(await self.agent.request(capture_id)))
        except APIError as exc:
            self.post_message(m.ActionFailed(f"cannot load {capture_id}: {exc.msg}"))

    @work(exclusive=True, group="summary")
    async def load_summary(self, capture_id: str) -> None:
        """The capture under the cursor, for the Requests split (debounced by the pane)."""
        if self.agent is None:
            return
        try:
            self.post_message(m.SummaryLoaded(await self.agent.request(capture_id)))
        except APIError:
            return  # deleted meanwhile: the list will catch up

    def _run_action(self, coro_fn: Callable[[], Awaitable[str]], refresh: tuple[str, ...] = ()) -> None:
        async def go() -> None:
            try:
                text = await coro_fn()
            except APIError as exc:
                self.post_message(m.ActionFailed(exc.msg))
                return
            self.post_message(m.ActionDone(text, refresh))

        self.run_worker(go(), group="actions")

    # ------------------------------------------------------------ messages
    @on(m.StatusLoaded)
    @_while_mounted
    def _status(self, msg: m.StatusLoaded) -> None:
        self.status = msg.status
        self._draw_header()

    @on(m.TunnelsLoaded)
    @_while_mounted
    def _tunnels(self, msg: m.TunnelsLoaded) -> None:
        several = len(self.tunnels) > 1
        self.tunnels = msg.tunnels
        self.query_one(TunnelsPane).set_rows(msg.tunnels)
        self.query_one(RequestsPane).update_status()  # the first-steps hint names their URLs
        if several != (len(msg.tunnels) > 1):
            self.query_one(RequestList).refresh()  # the TUNNEL column comes or goes
        self._draw_header()

    @on(m.EndpointsLoaded)
    @_while_mounted
    def _endpoints(self, msg: m.EndpointsLoaded) -> None:
        self.endpoints = msg.endpoints
        self.query_one(EndpointsPane).set_rows(msg.endpoints)
        self.query_one(RequestsPane).update_status()
        self._draw_header()

    @on(m.IngressesLoaded)
    @_while_mounted
    def _ingresses(self, msg: m.IngressesLoaded) -> None:
        self.ingresses = msg.ingresses
        self.query_one(IngressesPane).set_rows(msg.ingresses)

    @on(NeedRows)
    @_while_mounted
    def _need_rows(self, msg: NeedRows) -> None:
        self.load_rows(msg.offset, msg.limit, msg.generation, self.query_one(RequestsPane).filter_text)

    @on(m.RowsLoaded)
    @_while_mounted
    def _rows(self, msg: m.RowsLoaded) -> None:
        self.query_one(RequestList).apply_page(msg.offset, msg.items, msg.total, msg.generation, msg.newest)
        pane = self.query_one(RequestsPane)
        if msg.stored is not None and msg.generation == self.query_one(RequestList).generation:
            pane.stored = msg.stored
        pane.update_status()
        self._draw_header()

    @on(m.CaptureLoaded)
    @_while_mounted
    def _capture(self, msg: m.CaptureLoaded) -> None:
        screen = self.screen
        if isinstance(screen, DetailScreen) and screen.capture_id == msg.capture.get("id"):
            screen.show(msg.capture)

    @on(m.SummaryLoaded)
    @_while_mounted
    def _summary(self, msg: m.SummaryLoaded) -> None:
        self.query_one(RequestsPane).summary.show_capture(msg.capture)

    @on(m.Connection)
    @_while_mounted
    def _connection(self, msg: m.Connection) -> None:
        state = "online" if msg.ok else "unreachable"
        if msg.which == "agent" or self.agent is None:
            if state != self.connection and not msg.ok:
                self.notify(f"{msg.which} API unreachable: {msg.error} — retrying", severity="error")
            self.connection = state
            self.connection_error = msg.error
        self._draw_header()

    @on(m.AgentEvent)
    @_while_mounted
    def _event(self, msg: m.AgentEvent) -> None:
        name, data = msg.name, msg.data
        rl = self.query_one(RequestList)
        filtered = bool(self.query_one(RequestsPane).filter_text)
        if name == "hello":
            self.status = data.get("status") or self.status
            self.post_message(m.TunnelsLoaded(data.get("tunnels") or []))
            self.post_message(m.Connection("agent", True))
            self.reload_requests()
        elif name == "request_started":
            self.query_one(RequestsPane).stored += 1
            self._redraw_status = True
            if filtered:
                self._schedule_reload()
            else:
                rl.insert_new(data)
                self._redraw_status = True
        elif name == "request_completed":
            if not rl.update_row(data) and filtered:
                self._schedule_reload()
            if isinstance(self.screen, DetailScreen) and self.screen.capture_id == data.get("id"):
                self.load_capture(data["id"])
        elif name in ("request_deleted", "requests_cleared"):
            self.reload_requests()
        elif name == "metrics":
            self.query_one(TunnelsPane).record_metrics(data.get("tunnels") or {})
        elif name == "dropped":
            self.reload_requests()
        elif name == "inspect_db":  # the agent's --inspect-db file failing or writing again
            self.status = {**self.status, "inspect_db": data}
        elif name in ("tunnel_started", "tunnel_stopped", "session", "disconnected", "stopped"):
            self.refresh_all()
        self._redraw_header = True
        self._redraw_soon()

    def _redraw_soon(self) -> None:
        """Draw what agent events changed now, or at the end of the current REDRAW_EVERY."""
        if self._redraw_timer is not None:
            return
        wait = self._redrawn_at + REDRAW_EVERY - time.monotonic()
        if wait <= 0:
            self._redraw()
        else:
            self._redraw_timer = self.set_timer(wait, self._redraw)

    def _redraw(self) -> None:
        self._redraw_timer = None
        self._redrawn_at = time.monotonic()
        status, self._redraw_status = self._redraw_status, False
        header, self._redraw_header = self._redraw_header, False
        if status:
            with contextlib.suppress(NoMatches):  # closing
                self.query_one(RequestsPane).update_status()
        if header:
            self._draw_header()

    @on(m.ActionDone)
    def _done(self, msg: m.ActionDone) -> None:
        self.notify(msg.text)
        if "all" in msg.refresh:
            self.refresh_all()

    @on(m.ActionFailed)
    def _failed(self, msg: m.ActionFailed) -> None:
        self.notify(msg.text, severity="error", timeout=8)

    # ------------------------------------------------------------ helpers
    def reload_requests(self) -> None:
        """Start the Requests list over (filter changed, cleared, reconnected)."""
        try:
            rl = self.query_one(RequestList)
        except NoMatches:  # closing
            return
        rl.reset(rl.total)
        self.load_rows(0, 100, rl.generation, self.query_one(RequestsPane).filter_text)

    def _schedule_reload(self) -> None:
        if self._reload_pending:
            return
        self._reload_pending = True

        def go() -> None:
            self._reload_pending = False
            try:
                rl = self.query_one(RequestList)
            except NoMatches:  # closing
                return
            top = rl.scroll_offset.y
            self.load_rows(top - top % 100, 100, rl.generation, self.query_one(RequestsPane).filter_text)

        self.set_timer(0.3, go)

    def _draw_header(self) -> None:
        with contextlib.suppress(Exception):
            header = self.query_one("#header", Static)
            where = self.settings.context or (self.agent.base_url if self.agent else "") or "burrow"
            legs = (self.status.get("session") or {}).get("legs") or []
            region = f"{legs[0].get('region', '')} {legs[0].get('latency', '')}".strip() if legs else "-"
            status = self.status.get("status") if self.connection == "online" else self.connection
            total = self.query_one(RequestList).total
            colour = {"online": "$success", "unreachable": "$error", "offline": "$error"}.get(status or "", "$warning")
            db = self.status.get("inspect_db") or {}
            header.update(
                f"[b]burrow[/b] [dim]›[/dim] {where}  [{colour}]● {status}[/]  {region}"
                f"  [dim]│[/dim] {plural(len(self.tunnels), 'tunnel')} · {plural(len(self.endpoints), 'endpoint')}"
                f" · {plural(total, 'request')}"
                + (f"  [dim]│[/dim] [$error]{self.connection_error}[/]" if status in ("unreachable", "offline") else "")
                + (_db_failing(db) if db.get("ok") is False and self.connection == "online" else "")
            )

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """Pane switching only makes sense on the main screen (hidden elsewhere)."""
        if action in ("pane", "next_pane", "prev_pane"):
            return self.screen is self.screen_stack[0]
        return True

    @property
    def active_pane(self) -> str:
        return self.query_one(TabbedContent).active or "requests"

    # ------------------------------------------------------------ actions
    async def action_quit(self) -> None:
        """``q`` quits only from the main screen; in a sub-screen it goes back (as mitmproxy).

        A console that started the local backend asks first whether to stop it, leave it
        running, or stay (when it holds tunnels or captures: other terminals' work)."""
        if len(self.screen_stack) > 1:
            self.screen.dismiss(None)
            return
        if self.owned_backend is None or self.backend_choice is not None:
            self.exit()
            return
        tunnels = len(self.tunnels)
        captures = 0
        if self.agent is not None:
            with contextlib.suppress(Exception):
                captures = (await self.agent.requests(limit=0)).total
        # other agents on the local edge (ngrok's SDKs, `burrow agent`s): the local
        # agent holds one session itself
        others = 0
        if self.cloud is not None:
            with contextlib.suppress(Exception):
                others = max(0, len(await self.cloud.tunnel_sessions()) - (self.agent is not None))
        if not tunnels and not captures and not others:
            self.backend_choice = "stop"
            self.exit()
            return

        def answered(choice: str | None) -> None:
            if choice in ("stop", "leave"):
                self.backend_choice = choice
                self.exit()

        self.push_screen(QuitScreen(tunnels, captures, others), answered)

    def action_pane(self, name: str) -> None:
        if self.screen is not self.screen_stack[0]:
            return
        self.query_one(TabbedContent).active = name
        pane = self.query_one(f"#{name}-pane")
        pane.focus_main()

    def action_next_pane(self) -> None:
        i = PANES.index(self.active_pane)
        self.action_pane(PANES[(i + 1) % len(PANES)])

    def action_prev_pane(self) -> None:
        i = PANES.index(self.active_pane)
        self.action_pane(PANES[(i - 1) % len(PANES)])

    @on(TabbedContent.TabActivated)
    def _tab(self, event: TabbedContent.TabActivated) -> None:
        pane_id = event.pane.id if event.pane else None
        if pane_id:
            self.call_after_refresh(self.query_one(f"#{pane_id}-pane").focus_main)

    def action_help(self) -> None:
        ctx = self.active_pane
        from console.manage import SessionsScreen
        from console.request_actions import DiffScreen

        if isinstance(self.screen, DetailScreen):
            contexts = ["detail"]
        elif isinstance(self.screen, DiffScreen):
            contexts = ["diff"]
        elif isinstance(self.screen, SessionsScreen):
            contexts = ["sessions"]
        else:
            contexts = [ctx, "list" if ctx != "requests" else "", "app"]
        self.push_screen(HelpScreen([c for c in contexts if c], self.settings.read_only))

    def action_refresh(self) -> None:
        self.refresh_all()

    def refuse_read_only(self, what: str) -> bool:
        """In read-only mode, say so and refuse: the keys are unbound and out of the
        palette, but a rebound key or a stray action must not change anything either."""
        if not self.settings.read_only:
            return False
        self.notify(f"read-only: {what} is off (the console was started with --read-only)", severity="warning")
        return True

    def action_new_tunnel(self) -> None:
        if self.refuse_read_only("starting tunnels"):
            return
        if self.agent is None:
            self.notify("No agent API to start tunnels on.", severity="error")
            return

        agent = self.agent

        async def start(body: dict) -> str:
            t = await agent.start_tunnel(body)
            return f"Started {t.get('name')}: {t.get('public_url')}"

        def started(result: dict | None) -> None:
            # the form stayed open until the agent accepted; errors were shown in it
            if result:
                self.post_message(m.ActionDone(result["message"], ("all",)))

        self.push_screen(NewTunnelScreen(start), started)

    def confirm_stop_tunnel(self, name: str, url: str) -> None:
        if self.refuse_read_only("stopping tunnels") or self.agent is None:
            return
        agent = self.agent

        def answered(yes: bool | None) -> None:
            if yes:
                async def go() -> str:
                    await agent.stop_tunnel(name)
                    return f"Stopped {name}"

                self._run_action(go, ("all",))

        self.push_screen(ConfirmScreen(f"Stop tunnel {name}?", f"{url} will go offline."), answered)

    def confirm_clear(self) -> None:
        if self.refuse_read_only("clearing captures") or self.agent is None:
            return
        agent = self.agent

        def answered(yes: bool | None) -> None:
            if yes:
                async def go() -> str:
                    await agent.clear()
                    return "Cleared all captured requests"

                self._run_action(go)

        self.push_screen(ConfirmScreen("Delete all captured requests?", "This cannot be undone."), answered)

    def replay(self, capture_id: str) -> None:
        """Replay one capture, or every marked one when rows are marked on the list.

        From the detail view the notice offers the new capture: ``J`` opens it."""
        if self.refuse_read_only("replay") or self.agent is None:
            return
        agent = self.agent
        rl = self.query_one(RequestList)
        in_detail = isinstance(self.screen, DetailScreen)
        ids = list(rl.marked) if rl.marked and not in_detail else [capture_id]

        async def go() -> str:
            new = None
            for cid in ids:
                new = await agent.replay(cid)
                if new:
                    self.replays[cid] = new
            if len(ids) > 1:
                return f"Replayed {plural(len(ids), 'marked request')}"
            return await self._replayed(ids[0], new, in_detail)

        self._run_action(go)

    async def _replayed(self, original: str, new: str | None, offer: bool) -> str:
        """The notice after one replay: the new capture's status, and (``offer``) the key to open it."""
        if not new or self.agent is None:
            return f"Replayed {original}"
        try:
            resp = (await self.agent.request(new)).get("response") or {}
            status = resp.get("status_code") or "sent"
        except APIError:
            status = "sent"
        return f"Replayed {original} → {status}" + (" · J opens it" if offer else "")

    def open_last_replay(self, capture_id: str) -> None:
        """Open the newest replay of ``capture_id`` made from this console."""
        new = self.replays.get(capture_id)
        if new is None:
            self.notify("No replay of this request yet: r replays it, then J opens the replay.", severity="warning")
            return
        self.open_detail(new)

    def action_delete_requests(self) -> None:
        if self.refuse_read_only("deleting captures") or self.agent is None:
            return
        rl = self.query_one(RequestList)
        targets = rl.targets()
        if not targets:
            self.notify("No request selected.", severity="warning")
            return
        agent = self.agent
        ids = {r["id"] for r in targets}

        def answered(yes: bool | None) -> None:
            if yes:
                async def go() -> str:
                    for cid in ids:
                        await agent.delete_request(cid)
                    return f"Deleted {plural(len(ids), 'request')}"

                rl.forget(ids)
                self._run_action(go)

        what = "the marked requests" if rl.marked else f"{targets[0].get('method', '')} {targets[0].get('path', '')}"
        self.push_screen(ConfirmScreen(f"Delete {plural(len(ids), 'captured request')}?", what), answered)

    def open_detail(self, capture_id: str) -> None:
        self.push_screen(DetailScreen(capture_id, self.settings.read_only))

    # ------------------------------------------------------------ request tools
    def _current_capture_id(self) -> str | None:
        if isinstance(self.screen, DetailScreen):
            return self.screen.capture_id
        row = self.query_one(RequestList).selected
        if row is None:
            self.notify("No request selected.", severity="warning")
            return None
        return row["id"]

    def _with_capture(self, then: Callable[[dict], Awaitable[None]]) -> None:
        """Fetch the selected capture in a worker, then continue with it."""
        cid = self._current_capture_id()
        if cid is None or self.agent is None:
            return
        agent = self.agent

        async def go() -> None:
            try:
                capture = await agent.request(cid)
            except APIError as exc:
                self.post_message(m.ActionFailed(f"cannot load {cid}: {exc.msg}"))
                return
            await then(capture)

        self.run_worker(go(), group="actions")

    def _public_url(self, tunnel_name: str) -> str | None:
        for t in self.tunnels:
            if t.get("name") == tunnel_name:
                return t.get("public_url")
        return None

    def action_edit_replay(self) -> None:
        from console.request_actions import EditReplayScreen

        if self.refuse_read_only("edit and replay"):
            return
        agent = self.agent
        offer = isinstance(self.screen, DetailScreen)

        async def edit(capture: dict) -> None:
            async def send(edits: dict) -> str:
                new = await agent.replay(capture["id"], **edits)
                if new:
                    self.replays[capture["id"]] = new
                return f"Replayed an edited {edits['method']} {edits['uri']}" + (
                    f" → {new}" + (" · J opens it" if offer else "") if new else ""
                )

            def sent(result: dict | None) -> None:
                # the dialog stayed open until the agent accepted; errors were shown in it
                if result:
                    self.post_message(m.ActionDone(result["message"], ()))

            self.push_screen(EditReplayScreen(capture, send), sent)

        self._with_capture(edit)

    def action_replay_to(self) -> None:
        from console.request_actions import PickScreen

        if self.refuse_read_only("replay to another tunnel"):
            return
        cid = self._current_capture_id()
        if cid is None or self.agent is None:
            return
        agent = self.agent
        offer = isinstance(self.screen, DetailScreen)
        options = [(t["name"], f"{t['name']}  {t.get('public_url', '')}") for t in self.tunnels if t.get("name")]
        if not options:
            self.notify("No tunnels to replay to.", severity="warning")
            return

        def picked(name: str | None) -> None:
            if name:
                async def go() -> str:
                    new = await agent.replay(cid, tunnel_name=name)
                    if new:
                        self.replays[cid] = new
                    return f"Replayed {cid} to {name}" + (f" → {new}" + (" · J opens it" if offer else "") if new else "")

                self._run_action(go)

        self.push_screen(PickScreen("Replay to which tunnel?", options), picked)

    def action_diff(self) -> None:
        from console.diff import diff_captures
        from console.request_actions import DiffScreen

        agent = self.agent

        async def diff(capture: dict) -> None:
            original_id = capture.get("replay_of")
            if not original_id:  # an original: diff its latest replay against it
                replay_id = await self._latest_replay(capture["id"])
                if replay_id is None:
                    self.post_message(m.ActionFailed("No replay of this request yet: r replays it, then D diffs the two."))
                    return
                try:
                    replay = await agent.request(replay_id)
                except APIError as exc:
                    self.post_message(m.ActionFailed(f"the replay {replay_id} is gone: {exc.msg}"))
                    return
                self.call_later(self.push_screen, DiffScreen(diff_captures(capture, replay)))
                return
            try:
                original = await agent.request(original_id)
            except APIError as exc:
                self.post_message(m.ActionFailed(f"the original {original_id} is gone: {exc.msg}"))
                return
            self.call_later(self.push_screen, DiffScreen(diff_captures(original, capture)))

        self._with_capture(diff)

    async def _latest_replay(self, capture_id: str) -> str | None:
        """The newest capture that replays ``capture_id``: asked of the agent
        (``replay_of:ID``), else the one made from this console."""
        if self.agent is not None:
            try:
                page = await self.agent.requests(0, 1, f"replay_of:{capture_id}")
            except APIError:  # an agent without the term (ngrok): fall back
                page = None
            if page is not None and page.items and page.items[0].get("replay_of") == capture_id:
                return page.items[0]["id"]
        return self.replays.get(capture_id)

    def _copy(self, text: str) -> None:
        from console.export import clipboard_sequence

        driver = getattr(self, "_driver", None)
        if driver is not None:
            driver.write(clipboard_sequence(text))
            driver.flush()

    def action_copy_curl(self) -> None:
        from console.export import to_curl

        async def copy(capture: dict) -> None:
            cmd = to_curl(capture, public_url=self._public_url(capture.get("tunnel_name", "")))
            self.last_copied = cmd
            self.call_later(self._copy, cmd)
            self.post_message(m.ActionDone("Copied as curl (OSC 52). Y shows it."))

        self._with_capture(copy)

    def action_show_curl(self) -> None:
        from console.export import to_curl
        from console.request_actions import TextScreen

        async def show(capture: dict) -> None:
            cmd = to_curl(capture, public_url=self._public_url(capture.get("tunnel_name", "")))
            self.call_later(self.push_screen, TextScreen("curl", cmd))

        self._with_capture(show)

    def action_export(self) -> None:
        from console.request_actions import PickScreen

        cid = self._current_capture_id()
        if cid is None:
            return
        options = [
            ("curl", "copy as curl"),
            ("httpie", "copy as HTTPie"),
            ("raw-request", "show the raw request"),
            ("raw-response", "show the raw response"),
            ("har", "write a HAR file of the marked requests, or of the current (filtered) list"),
        ]
        self.push_screen(PickScreen("Export", options), self._export)

    def _export(self, choice: str | None) -> None:
        from console.export import export_har, raw_request, raw_response, to_curl, to_httpie
        from console.request_actions import TextScreen

        if not choice or self.agent is None:
            return
        agent = self.agent
        if choice == "har":
            query = self.query_one(RequestsPane).filter_text

            marked = list(self.query_one(RequestList).marked)

            async def har() -> str:
                from backend import __version__
                from console.config import export_dir

                ids = marked or [r["id"] for r in (await agent.requests(0, 1000, query)).items]
                captures = [await agent.request(cid) for cid in ids]
                publics = {t["name"]: t.get("public_url", "") for t in self.tunnels if t.get("name")}
                try:
                    path = export_har(export_dir(self.settings), captures, __version__, public_urls=publics)
                except OSError as exc:
                    raise APIError(f"cannot write the HAR file: {exc}") from None
                self.last_export = path
                return f"Wrote {plural(len(captures), 'request')} to {path}"

            self._run_action(har)
            return

        async def one(capture: dict) -> None:
            public = self._public_url(capture.get("tunnel_name", ""))
            if choice in ("curl", "httpie"):
                text = (to_curl if choice == "curl" else to_httpie)(capture, public_url=public)
                self.call_later(self._copy, text)
                self.call_later(self.push_screen, TextScreen(f"{choice} (also copied with OSC 52)", text))
            else:
                raw = raw_request(capture) if choice == "raw-request" else raw_response(capture)
                self.call_later(self.push_screen, TextScreen(choice, raw.decode("utf-8", "replace")))

        self._with_capture(one)

    def action_command(self) -> None:
        from console.request_actions import CommandScreen

        self.push_screen(CommandScreen(self.available_themes), self._command)

    def _command(self, text: str | None) -> None:
        from console.request_actions import COMMANDS, complete

        if not text:
            return
        word, _, arg = text.partition(" ")
        word = complete(word, COMMANDS)[0] or word  # a unique prefix is enough
        if word in PANES:
            self.action_pane(word)
        elif word == "sessions":
            self.action_pane("endpoints")
            self.call_later(self.query_one("#endpoints-pane").run_action, "sessions")
        elif word == "theme":
            if arg.strip() in self.available_themes:
                self.theme = arg.strip()
            else:
                self.notify(f"no theme {arg.strip()!r}; have: {', '.join(sorted(self.available_themes))}", severity="error")
        elif word in ("q", "quit"):
            self.exit()
        else:
            self.notify(f"unknown command :{word}", severity="error")

    # ------------------------------------------------------------ palette
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """Every keymap entry that works on this screen, with its key as the user types it."""
        from console.manage import SessionsScreen
        from console.request_actions import DiffScreen

        yield from super().get_system_commands(screen)
        groups = {
            "app": "console", "list": "list", "endpoints": "endpoint", "ingresses": "ingress",
            "tunnels": "tunnel", "requests": "request", "detail": "request", "sessions": "session",
            "diff": "diff",
        }
        main = screen is self.screen_stack[0]
        for k in KEYMAP:
            if k.context not in groups or (self.settings.read_only and k.dangerous):
                continue
            if k.context == "detail" and not isinstance(screen, DetailScreen):
                continue
            if k.context == "sessions" and not isinstance(screen, SessionsScreen):
                continue
            if k.context == "diff" and not isinstance(screen, DiffScreen):
                continue
            if k.context not in ("app", "detail", "sessions", "diff") and not main:
                continue
            key = display_key(self.keymap_overrides.get(k.id, k.key))
            yield SystemCommand(
                f"{groups[k.context]}: {k.description or k.help}",
                f"key {key}",
                lambda k=k: self._palette_run(k),
            )

    async def _palette_run(self, k) -> None:
        # run_action returns a coroutine: not awaiting it ran nothing
        if k.context == "app":
            await self.run_action(k.action)
        elif k.context in ("detail", "sessions", "diff"):
            await self.screen.run_action(k.action)
        else:
            pane = k.context if k.context in PANES else self.active_pane
            self.action_pane(pane)
            target = self.query_one(f"#{pane}-pane")
            name = k.action.split("(", 1)[0]
            if not name.startswith("app.") and not hasattr(target, f"action_{name}") and hasattr(target, "list"):
                target = target.list  # the request list's own keys (cursor, mark)
            await target.run_action(k.action)
