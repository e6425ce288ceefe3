"""The console's keys: one declarative table, like mitmproxy's keymap.

Every key has an id (``context.action``), the key, the context it works in, the action
it runs and the words shown in the footer, the help screen and the command palette.
Users rebind keys by id from their config (``keymap: {requests.replay: R}``), which
goes through Textual's ``App.set_keymap``.  ``dangerous`` keys are left unbound
entirely in read-only mode: that is every key that changes something (starts, stops,
creates, edits, deletes or replays), since read-only is for looking.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding


@dataclass(frozen=True)
class Key:
    id: str
    key: str
    context: str
    action: str
    help: str
    description: str = ""
    dangerous: bool = False  # changes something: unbound (and out of the palette) in read-only mode
    show: bool = True
    priority: bool = False
    # Place in the footer, lowest first.  A narrow footer cuts from the right, so the
    # keys a newcomer needs to find everything else (``? help``, ``q quit``) go first.
    footer: int = 50


# Contexts: "app" (everywhere), the four panes, "list" (any table pane), "detail", "diff",
# "sessions", "confirm".
KEYMAP: tuple[Key, ...] = (
    # ---------------------------------------------------------------- everywhere
    # the pane keys are shown on the tabs themselves, so they stay out of the footer
    Key("app.endpoints", "1", "app", "pane('endpoints')", "endpoints", "show the Endpoints pane", show=False),
    Key("app.ingresses", "2", "app", "pane('ingresses')", "ingresses", "show the Agent Ingresses pane", show=False),
    Key("app.tunnels", "3", "app", "pane('tunnels')", "tunnels", "show the Tunnels pane", show=False),
    Key("app.requests", "4", "app", "pane('requests')", "requests", "show the Requests pane", show=False),
    Key("app.next_pane", "tab", "app", "next_pane", "next pane", "switch to the next pane", show=False, priority=True),
    Key("app.prev_pane", "shift+tab", "app", "prev_pane", "prev pane", "switch to the previous pane", show=False, priority=True),
    Key("app.help", "question_mark", "app", "help", "help", "list the keys that work here", footer=0),
    Key("app.refresh", "ctrl+r", "app", "refresh", "refresh", "reload everything from the APIs", show=False),
    Key("app.quit", "q", "app", "quit", "quit", "leave the console", footer=1),
    Key("app.command", "colon", "app", "command", "command", ":endpoints :ingresses :tunnels :requests :sessions :theme NAME :quit", show=False),
    # ---------------------------------------------------------------- table panes
    Key("list.filter", "slash", "list", "filter", "filter", "filter the rows of this pane"),
    Key("list.clear_filter", "escape", "list", "clear_filter", "back", "clear the filter", show=False),
    Key("list.down", "j", "list", "cursor_down", "down", "move down", show=False),
    Key("list.up", "k", "list", "cursor_up", "up", "move up", show=False),
    Key("list.top", "g", "list", "top", "top", "go to the first row", show=False),
    Key("list.bottom", "G", "list", "bottom", "bottom", "go to the last row", show=False),
    # ---------------------------------------------------------------- endpoints & ingresses
    Key("endpoints.new", "n", "endpoints", "new_endpoint", "new", "create a cloud endpoint (URL, bindings, policy)", dangerous=True),
    Key("endpoints.edit", "e", "endpoints", "edit_endpoint", "edit", "edit the selected cloud endpoint", dangerous=True),
    Key("endpoints.delete", "ctrl+d", "endpoints", "delete_endpoint", "delete", "delete the selected endpoint (an ngrok SDK agent's: stop its tunnel)", dangerous=True),
    Key("endpoints.sessions", "S", "endpoints", "sessions", "sessions", "show the tunnel sessions (stop, restart)"),
    Key("ingresses.new", "n", "ingresses", "new_ingress", "new", "register an agent ingress domain", dangerous=True),
    Key("ingresses.edit", "e", "ingresses", "edit_ingress", "edit", "edit the selected agent ingress", dangerous=True),
    Key("ingresses.delete", "ctrl+d", "ingresses", "delete_ingress", "delete", "delete the selected agent ingress", dangerous=True),
    # ---------------------------------------------------------------- tunnels
    Key("tunnels.new", "n", "tunnels", "new_tunnel", "new", "start a tunnel (proto, addr, name, URL)", dangerous=True),
    Key("tunnels.stop", "s", "tunnels", "stop_tunnel", "stop", "stop the selected tunnel", dangerous=True),
    # ---------------------------------------------------------------- requests
    Key("requests.detail", "enter", "requests", "detail", "detail", "open the selected request"),
    Key("requests.replay", "r", "requests", "replay", "replay", "replay the selected request", dangerous=True),
    Key("requests.follow", "f", "requests", "toggle_follow", "follow", "keep the newest request selected"),
    Key("requests.mark", "space", "requests", "toggle_mark", "mark", "mark the request (replay, export, delete act on marked ones)", show=False),
    Key("requests.delete", "ctrl+d", "requests", "app.delete_requests", "delete", "delete the marked (or selected) requests", dangerous=True, show=False),
    Key("requests.clear", "z", "requests", "clear", "clear", "delete all captured requests (zap)", dangerous=True),
    Key("requests.edit", "e", "requests", "app.edit_replay", "edit", "edit the request, then replay it", dangerous=True),
    Key("requests.replay_to", "R", "requests", "app.replay_to", "replay to", "replay to another tunnel", dangerous=True, show=False),
    Key("requests.diff", "D", "requests", "app.diff", "diff", "diff replay ↔ original (either one selected)"),
    Key("requests.copy", "y", "requests", "app.copy_curl", "copy curl", "copy as a curl command (OSC 52)", show=False),
    Key("requests.show_curl", "Y", "requests", "app.show_curl", "show curl", "show the curl command", show=False),
    Key("requests.export", "x", "requests", "app.export", "export", "export: curl, HTTPie, raw, or HAR of the list"),
    Key("requests.filter", "slash", "requests", "filter", "filter", "filter requests (status:5xx path:/api ...)"),
    Key("requests.clear_filter", "escape", "requests", "clear_filter", "back", "clear the filter", show=False),
    Key("requests.down", "j,down", "requests", "cursor_down", "down", "move down", show=False),
    Key("requests.up", "k,up", "requests", "cursor_up", "up", "move up", show=False),
    Key("requests.top", "g,home", "requests", "top", "top", "go to the newest request", show=False),
    Key("requests.bottom", "G,end", "requests", "bottom", "bottom", "go to the oldest request", show=False),
    Key("requests.page_down", "pagedown", "requests", "page_down", "page down", "move a page down", show=False),
    Key("requests.page_up", "pageup", "requests", "page_up", "page up", "move a page up", show=False),
    # ---------------------------------------------------------------- detail
    Key("detail.back", "escape", "detail", "back", "back", "back to the list", footer=1),
    Key("detail.quit", "q", "detail", "back", "back", "back to the list (q quits only from the panes)", show=False),
    Key("detail.replay", "r", "detail", "replay", "replay", "replay this request", dangerous=True),
    Key("detail.pretty", "p", "detail", "mode('pretty')", "pretty", "pretty-print bodies by content type"),
    Key("detail.raw", "w", "detail", "mode('raw')", "raw", "show bodies as raw text"),
    Key("detail.hex", "h", "detail", "mode('hex')", "hex", "show bodies as hex"),
    Key("detail.request", "left_square_bracket", "detail", "focus_part('request')", "request", "jump to the request"),
    Key("detail.response", "right_square_bracket", "detail", "focus_part('response')", "response", "jump to the response"),
    Key("detail.edit", "e", "detail", "app.edit_replay", "edit", "edit this request, then replay it", dangerous=True),
    Key("detail.diff", "D", "detail", "app.diff", "diff", "diff replay ↔ original (either one open)"),
    Key("detail.copy", "y", "detail", "app.copy_curl", "copy curl", "copy as a curl command (OSC 52)"),
    Key("detail.show_curl", "Y", "detail", "app.show_curl", "show curl", "show the curl command", show=False),
    Key("detail.export", "x", "detail", "app.export", "export", "export: curl, HTTPie, raw, or HAR"),
    Key("detail.replay_open", "J", "detail", "open_replay", "open replay", "open the replay just made from here", show=False),
    Key("detail.down", "j", "detail", "scroll_down", "down", "scroll down a line", show=False),
    Key("detail.up", "k", "detail", "scroll_up", "up", "scroll up a line", show=False),
    Key("detail.top", "g", "detail", "scroll_top", "top", "scroll to the top", show=False),
    Key("detail.bottom", "G", "detail", "scroll_bottom", "bottom", "scroll to the bottom", show=False),
    # ---------------------------------------------------------------- replay-vs-original diff
    Key("diff.back", "escape,q", "diff", "close", "back", "back to where the diff was opened"),
    Key("diff.help", "question_mark", "diff", "app.help", "help", "list the keys that work here"),
    Key("diff.unified", "u", "diff", "mode('unified')", "unified", "show the diff unified"),
    Key("diff.side", "s", "diff", "mode('side')", "side by side", "show the diff side by side"),
    Key("diff.down", "j", "diff", "scroll_down", "down", "scroll down a line", show=False),
    Key("diff.up", "k", "diff", "scroll_up", "up", "scroll up a line", show=False),
    Key("diff.top", "g", "diff", "scroll_top", "top", "scroll to the top", show=False),
    Key("diff.bottom", "G", "diff", "scroll_bottom", "bottom", "scroll to the bottom", show=False),
    # ---------------------------------------------------------------- tunnel sessions screen
    Key("sessions.back", "escape", "sessions", "back", "back", "back to the panes", footer=1),
    Key("sessions.stop", "s", "sessions", "stop", "stop", "stop the selected tunnel session", dangerous=True),
    Key("sessions.restart", "r", "sessions", "restart", "restart", "restart the selected tunnel session's agent", dangerous=True),
    Key("sessions.reload", "ctrl+r", "sessions", "reload", "refresh", "reload the sessions", show=False),
    Key("sessions.down", "j", "sessions", "cursor('down')", "down", "move down", show=False),
    Key("sessions.up", "k", "sessions", "cursor('up')", "up", "move up", show=False),
    Key("sessions.quit", "q", "sessions", "back", "back", "back to the panes (q quits only from the panes)", show=False),
    # ---------------------------------------------------------------- confirm dialog
    Key("confirm.yes", "y,enter", "confirm", "confirm", "yes", "confirm"),
    Key("confirm.no", "n,escape", "confirm", "cancel", "no", "cancel"),
)


# Contexts whose keys work at the same time: the app's keys everywhere, the table
# panes' shared keys (``list``) in each table pane.
_TABLES = {"list", "endpoints", "ingresses", "tunnels"}


def _together(a: str, b: str) -> bool:
    return a == b or "app" in (a, b) or ({a, b} <= _TABLES and "list" in (a, b))


def check_keymap(overrides: dict[str, str], normalize=lambda keys: keys) -> list[str]:
    """Warnings about a user keymap, to show at start: ids that name no key (with the
    closest known id), and keys taken from another action that works at the same time.

    The user's binding wins; the action it took the key from keeps working from the
    command palette (ctrl+p) and the warning names it, so it can get another key."""
    import difflib

    by_id = {k.id: k for k in KEYMAP}
    warnings: list[str] = []
    for kid in overrides:
        if kid not in by_id:
            close = difflib.get_close_matches(kid, list(by_id), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            warnings.append(f"keymap: no key has the id {kid!r}, ignored{hint}")

    def effective(k: Key) -> set[str]:
        return set(normalize(overrides.get(k.id, k.key)).split(","))

    for kid, new in overrides.items():
        mine = by_id.get(kid)
        if mine is None:
            continue
        taken = set(normalize(new).split(","))
        for other in KEYMAP:
            if other.id == kid or not _together(mine.context, other.context):
                continue
            both = taken & effective(other)
            if both:
                key = display_key(sorted(both)[0])
                warnings.append(
                    f"keymap: {kid} = {key} takes {key} from {other.id} ({other.description or other.help}); "
                    "that action is now only in the command palette (ctrl+p) unless you rebind it too"
                )
    return warnings


def keys(context: str, read_only: bool = False) -> list[Key]:
    return [k for k in KEYMAP if k.context == context and not (read_only and k.dangerous)]


def bindings(context: str, read_only: bool = False) -> list[Binding]:
    """Textual bindings for one context, each with its id so users can rebind it."""
    return [
        Binding(k.key, k.action, k.help, show=k.show, id=k.id, priority=k.priority)
        for k in keys(context, read_only)
    ]


def footer_rank(binding_id: str | None) -> int:
    """Where a binding goes in the footer (see ``Key.footer``); unknown ids go last."""
    return _FOOTER_RANK.get(binding_id or "", 100)


_FOOTER_RANK = {k.id: k.footer for k in KEYMAP}


def display_key(key: str) -> str:
    names = {
        "question_mark": "?",
        "colon": ":",
        "space": "space",
        "slash": "/",
        "escape": "esc",
        "left_square_bracket": "[",
        "right_square_bracket": "]",
        "shift+tab": "shift+tab",
    }
    return ", ".join(names.get(k, k) for k in key.split(","))
