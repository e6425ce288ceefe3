"""Managing the cloud from the keyboard: endpoint and ingress forms, tunnel sessions.

The forms call the cloud API themselves, in workers, so an error from the API (an
invalid traffic policy, a taken URL) is shown inline and the form stays open with what
was typed; on success they dismiss with the API's answer and the caller refreshes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from textual.app import ComposeResult
from textual.binding import Binding, BindingsMap
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, DataTable, Input, Label, Select, Static, TextArea

from console.client import CloudClient
from console.keymap import bindings
from console.screens import (
    FieldInput,
    InlineErrors,
    cancel_form,
    error_text,
    form_values,
    submit_inline,
)
from console.widgets.footer import BurrowFooter

AGENT_READ_ONLY = "agent endpoints are read-only: stop the agent or its tunnel instead"

DEFAULT_POLICY = """\
on_http_request:
  - actions:
      - type: custom-response
        config:
          status_code: 200
          body: Hello from burrow
"""


def yaml_language() -> str | None:
    """``"yaml"`` when this Textual install can highlight YAML (tree-sitter), else None."""
    try:
        from textual._tree_sitter import get_language

        return "yaml" if get_language("yaml") is not None else None
    except Exception:  # no tree-sitter, or a Textual without the helper
        return None


FORM_CSS = """
EndpointForm, IngressForm { align: center middle; }
EndpointForm .form, IngressForm .form {
    width: 96;
    max-width: 98%;
    height: auto;
    max-height: 100%;
    padding: 0 1;
    border: thick $primary;
    background: $surface;
}
EndpointForm .form { height: 100%; max-height: 30; }
.form .title { text-style: bold; margin: 0 0 1 0; }
.form .row { height: 1; margin-bottom: 1; }
.form .row Label { width: 14; color: $text-muted; }
.form .row Input, .form .row Select { width: 1fr; }
.form .row .value { width: 1fr; }
.form #ef-policy { height: 1fr; min-height: 4; }
.form .error { color: $error; width: 100%; height: auto; }
.form .error.-empty { display: none; }
.form .buttons { height: 1; margin-top: 1; }
.form .buttons Button { margin-right: 2; }
.form .hint { color: $text-muted; width: 1fr; }
.form .buttons .hint { width: auto; }
"""


class _Form(InlineErrors, ModalScreen[dict | None]):
    """Shared behaviour: ctrl+s submits in a worker, errors inline, esc cancels."""

    BINDINGS = [
        Binding("ctrl+s", "submit", "save", priority=True),
        Binding("escape", "cancel", "cancel"),
        Binding("q", "cancel", "back", show=False),  # text fields take q as text
    ]
    PREFIX = "f"

    def __init__(self, cloud: CloudClient | None) -> None:
        super().__init__()
        self.cloud = cloud
        self.busy = False

    def _row(self, label: str, widget) -> Horizontal:
        return Horizontal(Label(label), widget, classes="row")

    def _buttons(self, verb: str) -> ComposeResult:
        yield Label("", id=f"{self.PREFIX}-error", classes="error -empty")
        with Horizontal(classes="buttons"):
            yield Button(verb, variant="primary", id=f"{self.PREFIX}-save", compact=True)
            yield Button("Cancel", id=f"{self.PREFIX}-cancel", compact=True)
            yield Static("ctrl+s save · esc cancel", classes="hint")

    def show_error(self, text: str) -> None:
        label = self.query_one(f"#{self.PREFIX}-error", Label)
        label.update(text)
        label.set_class(not text, "-empty")

    @property
    def error(self) -> str:
        label = self.query_one(f"#{self.PREFIX}-error", Label)
        return "" if label.has_class("-empty") else str(label.render())

    def build(self) -> tuple[Callable[[], Awaitable[dict]], str] | str:
        """The API call to make and its success message, or an error to show.

        Each form (endpoint, ingress) defines its own; this base has no fields to save.
        """
        raise TypeError(f"{type(self).__name__} must define build()")

    def action_submit(self) -> None:
        if self.busy:
            return
        if self.cloud is None:
            self.show_error("no cloud API")
            return
        plan = self.build()
        if isinstance(plan, str):
            self.show_error(plan)
            return
        call, done = plan
        submit_inline(self, call, lambda result: self.dismiss({"message": done, "result": result}), "form")

    def action_cancel(self) -> None:
        cancel_form(self)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == f"{self.PREFIX}-save":
            self.action_submit()
        else:
            self.dismiss(None)  # the Cancel button is explicit: no question

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_submit()


def _host(url: str) -> str:
    try:
        return (urlsplit(url if "://" in url else f"https://{url}").hostname or "").lower()
    except ValueError:
        return ""


class EndpointForm(_Form):
    """Create or edit a cloud endpoint: URL, binding, description, metadata, policy."""

    DEFAULT_CSS = FORM_CSS
    PREFIX = "ef"

    def __init__(self, cloud: CloudClient | None, endpoint: dict | None = None) -> None:
        super().__init__(cloud)
        self.endpoint = endpoint
        self._auto_internal = False

    def compose(self) -> ComposeResult:
        ep = self.endpoint or {}
        binding = (ep.get("bindings") or ["public"])[0]
        lang = yaml_language()
        with Vertical(classes="form", id="endpoint-form"):
            title = f"Edit cloud endpoint {ep.get('id', '')}" if ep else "New cloud endpoint"
            yield Label(title, classes="title")
            yield self._row(
                "URL", FieldInput(ep.get("url", ""), placeholder="https://app.burrow.localhost", id="ef-url", compact=True)
            )
            yield self._row(
                "Binding",
                Select(
                    [("public", "public"), ("internal", "internal")],
                    value=binding if binding in ("public", "internal") else "public",
                    allow_blank=False,
                    id="ef-binding",
                    compact=True,
                ),
            )
            yield self._row(
                "Description", FieldInput(ep.get("description") or "", placeholder="optional", id="ef-description", compact=True)
            )
            yield self._row(
                "Metadata", FieldInput(ep.get("metadata") or "", placeholder="optional, e.g. JSON", id="ef-metadata", compact=True)
            )
            yield Label(
                "Traffic policy (YAML" + (", highlighted" if lang else "") + "; tab indents, esc leaves the editor)",
                classes="hint",
            )
            yield TextArea(
                ep.get("traffic_policy") or (DEFAULT_POLICY if not ep else ""),
                language=lang,
                id="ef-policy",
                tab_behavior="indent",
                show_line_numbers=True,
                soft_wrap=False,
            )
            yield from self._buttons("Save" if ep else "Create")

    def on_mount(self) -> None:
        self.query_one("#ef-url", Input).focus()
        self.pristine = form_values(self)

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id != "ef-url":
            return
        select = self.query_one("#ef-binding", Select)
        if _host(event.value).endswith(".internal"):
            if select.value != "internal":
                select.value = "internal"
                self._auto_internal = True
        elif self._auto_internal:
            select.value = "public"
            self._auto_internal = False

    def values(self) -> dict:
        return {
            "url": self.query_one("#ef-url", Input).value.strip(),
            "bindings": [str(self.query_one("#ef-binding", Select).value)],
            "description": self.query_one("#ef-description", Input).value,
            "metadata": self.query_one("#ef-metadata", Input).value,
            "traffic_policy": self.query_one("#ef-policy", TextArea).text,
        }

    def build(self):
        v = self.values()
        if not v["url"]:
            self.query_one("#ef-url", Input).focus()
            return "A URL is required, e.g. https://app.burrow.localhost"
        if not v["traffic_policy"].strip():
            return "A traffic policy is required (it must end in a terminating action)."
        cloud = self.cloud
        assert cloud is not None
        ep = self.endpoint
        if ep is None:
            body = {"type": "cloud", **v}
            return (lambda: cloud.create("/endpoints", body)), f"Created {v['url']}"
        old = {
            "url": ep.get("url") or "",
            "bindings": list(ep.get("bindings") or ["public"]),
            "description": ep.get("description") or "",
            "metadata": ep.get("metadata") or "",
            "traffic_policy": ep.get("traffic_policy") or "",
        }
        body = {k: val for k, val in v.items() if val != old[k]}
        if "url" in body or "bindings" in body:
            body["url"], body["bindings"] = v["url"], v["bindings"]
        if not body:
            return "Nothing changed."
        return (lambda: cloud.update(f"/endpoints/{ep['id']}", body)), f"Updated {v['url']}"


CERT_CHOICES = [
    ("none", "none"),
    ("letsencrypt, RSA key", "letsencrypt:rsa"),
    ("letsencrypt, ECDSA key", "letsencrypt:ecdsa"),
]


def _cert_value(ing: dict) -> str:
    policy = ing.get("certificate_management_policy")
    if not policy:
        return "none"
    return f"{policy.get('authority') or 'letsencrypt'}:{policy.get('private_key_type') or 'rsa'}"


class IngressForm(_Form):
    """Register or edit an agent ingress: domain (create only), description, metadata, certificate."""

    DEFAULT_CSS = FORM_CSS
    PREFIX = "if"

    def __init__(self, cloud: CloudClient | None, ingress: dict | None = None) -> None:
        super().__init__(cloud)
        self.ingress = ingress

    def compose(self) -> ComposeResult:
        ing = self.ingress or {}
        with Vertical(classes="form", id="ingress-form"):
            yield Label(f"Edit agent ingress {ing.get('id', '')}" if ing else "New agent ingress", classes="title")
            if ing:
                yield self._row("Domain", Label(ing.get("domain", ""), classes="value"))
            else:
                yield self._row("Domain", FieldInput(placeholder="connect.example.com", id="if-domain", compact=True))
            yield self._row(
                "Description", FieldInput(ing.get("description") or "", placeholder="optional", id="if-description", compact=True)
            )
            yield self._row(
                "Metadata", FieldInput(ing.get("metadata") or "", placeholder="optional, e.g. JSON", id="if-metadata", compact=True)
            )
            yield self._row(
                "Certificate",
                Select(CERT_CHOICES, value=_cert_value(ing), allow_blank=False, id="if-cert", compact=True),
            )
            yield Label(
                "Agents connect through tunnel.<region>.<domain>; the certificate comes from the edge's CA.",
                classes="hint",
            )
            yield from self._buttons("Save" if ing else "Create")

    def on_mount(self) -> None:
        first = "#if-description" if self.ingress else "#if-domain"
        self.query_one(first, Input).focus()
        self.pristine = form_values(self)

    def build(self):
        cloud = self.cloud
        assert cloud is not None
        desc = self.query_one("#if-description", Input).value
        meta = self.query_one("#if-metadata", Input).value
        cert = str(self.query_one("#if-cert", Select).value)
        policy = None
        if cert != "none":
            authority, _, key = cert.partition(":")
            policy = {"authority": authority, "private_key_type": key}
        ing = self.ingress
        if ing is None:
            domain = self.query_one("#if-domain", Input).value.strip()
            if not domain:
                self.query_one("#if-domain", Input).focus()
                return "A domain is required, e.g. connect.example.com"
            body: dict = {"domain": domain, "description": desc, "metadata": meta}
            if policy:
                body["certificate_management_policy"] = policy
            return (lambda: cloud.create("/agent_ingresses", body)), f"Registered {domain}"
        body = {}
        if desc != (ing.get("description") or ""):
            body["description"] = desc
        if meta != (ing.get("metadata") or ""):
            body["metadata"] = meta
        if cert != _cert_value(ing):
            body["certificate_management_policy"] = policy  # None: turn certificates off
        if not body:
            return "Nothing changed."
        return (lambda: cloud.update(f"/agent_ingresses/{ing['id']}", body)), f"Updated {ing.get('domain', '')}"


def _started(s: dict) -> str:
    at = str(s.get("started_at") or "")
    return at[:19].replace("T", " ")


class SessionsScreen(Screen):
    """The account's online tunnel sessions, with stop and restart (both confirmed)."""

    DEFAULT_CSS = """
    SessionsScreen #sessions-title { height: 1; padding: 0 1; background: $panel; }
    SessionsScreen DataTable { height: 1fr; }
    SessionsScreen .empty { padding: 1 2; color: $text-muted; }
    """
    COLUMNS = ("ID", "AGENT VERSION", "OS", "IP", "REGION", "STARTED")

    def __init__(self, read_only: bool = False) -> None:
        super().__init__()
        # from the keymap (so ? lists them); dangerous ones not bound at all in read-only mode
        # q is listed in help but left to the app's q (which goes back here and keeps "q" in the footer)
        self._bindings = BindingsMap([b for b in bindings("sessions", read_only) if b.id != "sessions.quit"])
        self.read_only = read_only
        self.sessions: list[dict] = []
        self.loaded = False

    def compose(self) -> ComposeResult:
        yield Static("[b]Tunnel sessions[/b]  [dim]online agents of this account[/dim]", id="sessions-title")
        table = DataTable(cursor_type="row", id="sessions-table")
        table.add_columns(*self.COLUMNS)
        yield table
        yield Static("loading…", classes="empty", id="sessions-empty")
        yield BurrowFooter()

    # after a stop or restart, look again at these delays (seconds): the agent takes a
    # moment to go away or to come back with a new session
    AFTER_COMMAND = (0.5, 1.5, 3.0, 6.0)

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()
        self.action_reload()
        # like the panes, the sessions refresh by themselves
        every = getattr(getattr(self.app, "settings", None), "cloud_poll_seconds", 10.0)
        self.set_interval(every, self.action_reload)

    def action_reload(self) -> None:
        if not self.is_attached:  # a timer firing as the screen closes
            return
        cloud = getattr(self.app, "cloud", None)
        if cloud is None:
            self._show([], "no cloud API")
            return

        async def go() -> None:
            try:
                sessions = await cloud.tunnel_sessions()
            except Exception as exc:
                self._show([], f"cannot list tunnel sessions: {error_text(exc)}")
                return
            self._show(sessions, "No tunnel sessions: no agent is online.")

        self.run_worker(go, group="sessions-load", exclusive=True)  # (a function: a cancelled worker leaves no coroutine behind)

    def _show(self, sessions: list[dict], empty: str) -> None:
        self.sessions = sessions
        self.loaded = True
        table = self.query_one(DataTable)
        keep = self.selected
        table.clear()
        for s in sessions:
            table.add_row(
                s.get("id", ""),
                s.get("agent_version") or "",
                s.get("os") or "",
                s.get("ip") or "",
                s.get("region") or "",
                _started(s),
                key=s.get("id"),
            )
        if keep is not None:
            for i, s in enumerate(sessions):
                if s.get("id") == keep.get("id"):
                    table.move_cursor(row=i, animate=False)
        box = self.query_one("#sessions-empty", Static)
        box.update(empty)
        box.display = not sessions

    @property
    def selected(self) -> dict | None:
        table = self.query_one(DataTable)
        row = table.cursor_row
        if not self.sessions or row is None or row >= len(self.sessions):
            return None
        return self.sessions[row]

    def action_cursor(self, where: str) -> None:
        table = self.query_one(DataTable)
        (table.action_cursor_down if where == "down" else table.action_cursor_up)()

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_stop(self) -> None:
        self._command("stop", "Stop tunnel session {id}?", "The agent exits and its endpoints go offline.")

    def action_restart(self) -> None:
        self._command("restart", "Restart tunnel session {id}?", "The agent reconnects; its tunnels come back.")

    def _command(self, verb: str, question: str, detail: str) -> None:
        if self.read_only:
            self.app.notify(f"read-only: {verb} is off (the console was started with --read-only)", severity="warning")
            return
        s = self.selected
        cloud = getattr(self.app, "cloud", None)
        if cloud is None:
            self.app.notify("no cloud API", severity="error")
            return
        if s is None:
            self.app.notify("No tunnel session selected.", severity="warning")
            return
        sid = s["id"]
        from console.screens import ConfirmScreen

        def answered(yes: bool | None) -> None:
            if not yes:
                return

            async def go() -> None:
                try:
                    await cloud.post_action(f"/tunnel_sessions/{sid}/{verb}")
                except Exception as exc:
                    self.app.notify(f"cannot {verb} {sid}: {error_text(exc)}", severity="error", timeout=8)
                    return
                self.app.notify(f"{'Stopped' if verb == 'stop' else 'Restarted'} {sid}")
                self.action_reload()
                for delay in self.AFTER_COMMAND:
                    self.set_timer(delay, self.action_reload)
                refresh = getattr(self.app, "refresh_all", None)
                if refresh is not None:
                    refresh()

            self.run_worker(go(), group="sessions-action")

        self.app.push_screen(ConfirmScreen(question.format(id=sid), detail), answered)


# ---------------------------------------------------------------- pane helpers
def open_form(widget, form: _Form) -> None:
    """Push ``form``; on success notify the API's answer and reload the panes."""

    def done(result: dict | None) -> None:
        if result:
            widget.app.notify(result["message"])
            widget.app.refresh_all()

    widget.app.push_screen(form, done)


def confirm_delete(widget, path: str, what: str, detail: str) -> None:
    """Ask, then DELETE ``path`` in a worker; errors become notifications."""
    cloud = widget.app.cloud
    if cloud is None:
        widget.app.notify("no cloud API", severity="error")
        return
    from console.screens import ConfirmScreen

    def answered(yes: bool | None) -> None:
        if not yes:
            return

        async def go() -> None:
            try:
                await cloud.delete(path)
            except Exception as exc:
                widget.app.notify(f"cannot delete {what}: {error_text(exc)}", severity="error", timeout=8)
                return
            widget.app.notify(f"Deleted {what}")
            widget.app.refresh_all()

        widget.run_worker(go(), group="manage")

    widget.app.push_screen(ConfirmScreen(f"Delete {what}?", detail), answered)
