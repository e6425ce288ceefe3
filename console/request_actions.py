"""Screens for working on captured requests: edit-and-replay, replay to another
tunnel, replay-vs-original diff, export, and the ``:`` command line."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Iterable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, Static, TextArea
from textual.widgets.option_list import Option

from console.diff import CaptureDiff, diff_title, render_side_by_side, render_unified
from console.keymap import bindings
from console.render import decode_body
from console.screens import FieldInput, InlineErrors, cancel_form, form_values, submit_inline


class EditReplayScreen(InlineErrors, ModalScreen[dict | None]):
    """Method, path, headers (one ``Name: value`` per line) and body of a replay."""

    BINDINGS = [
        Binding("escape", "cancel", "cancel"),
        Binding("q", "cancel", "back", show=False),  # text fields take q as text
        Binding("ctrl+s", "send", "send", priority=True),
    ]

    def __init__(self, capture: dict, send: Callable[[dict], Awaitable[str]] | None = None) -> None:
        """``send`` makes the replay; the dialog stays open with the agent's error
        inline until it succeeds, then dismisses with ``{"message": ...}``.  Without
        it the dialog dismisses with the edits."""
        super().__init__()
        self.capture = capture
        self.send = send
        self.busy = False

    def compose(self) -> ComposeResult:
        req = self.capture.get("request") or {}
        info = decode_body(base64.b64decode(req.get("raw") or ""))
        headers = "\n".join(f"{k}: {v}" for k, v in info.headers)
        try:
            body = info.body.decode("utf-8")
        except UnicodeDecodeError:
            body = ""
        # Compact fields and text areas that share the height, so the error and the
        # buttons stay on screen down to 80×24.
        with Vertical(id="edit-replay", classes="dialog wide"):
            yield Label("Edit and replay  (ctrl+s sends, esc cancels)", classes="title")
            with Horizontal(classes="row"):
                yield FieldInput(req.get("method", "GET"), id="er-method", classes="method", compact=True)
                yield FieldInput(req.get("uri", "/"), id="er-uri", compact=True)
            yield Label("Headers (one “Name: value” per line)")
            yield TextArea(headers, id="er-headers", classes="headers")
            yield Label("Body" + ("" if not info.body or body else " (binary: replaced by what you type)"))
            yield TextArea(body, id="er-body", classes="body")
            yield Label("", id="er-error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Send (ctrl+s)", variant="primary", id="er-send", compact=True)
                yield Button("Cancel", id="er-cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#er-method", Input).focus()
        self.pristine = form_values(self)

    def action_send(self) -> None:
        headers: dict[str, list[str]] = {}
        for n, line in enumerate(self.query_one("#er-headers", TextArea).text.splitlines(), 1):
            if not line.strip():
                continue
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                self.show_error(f"header line {n} is not “Name: value”")
                return
            headers.setdefault(name.strip(), []).append(value.strip())
        edits = {
            "method": self.query_one("#er-method", Input).value.strip() or "GET",
            "uri": self.query_one("#er-uri", Input).value.strip() or "/",
            "headers": headers,
            "body": self.query_one("#er-body", TextArea).text,
        }
        if self.send is None:
            self.dismiss(edits)
            return
        send = self.send
        submit_inline(self, lambda: send(edits), lambda message: self.dismiss({"message": message}), "edit-replay")

    def show_error(self, msg: str) -> None:
        label = self.query_one("#er-error", Label)
        label.update(msg)
        label.set_class(bool(msg), "-wrap")  # long errors wrap instead of being cut
        label.display = bool(msg)  # no empty line while there is nothing to say

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "er-send":
            self.action_send()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        cancel_form(self)


class PickScreen(ModalScreen[str | None]):
    """Choose one of a few options (a tunnel to replay to, an export format)."""

    BINDINGS = [Binding("escape", "cancel", "cancel"), Binding("q", "cancel", "back", show=False)]

    def __init__(self, title: str, options: list[tuple[str, str]]) -> None:
        super().__init__()
        self.title_text = title
        self.options = options

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="title")
            yield OptionList(*(Option(label, id=value) for value, label in self.options), id="pick")

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


class DiffScreen(ModalScreen[None]):
    """A replay against its original: status, headers and body; unified or side by side."""

    BINDINGS = bindings("diff")

    def __init__(self, diff: CaptureDiff) -> None:
        super().__init__()
        self.diff = diff
        self.mode = "unified"

    def compose(self) -> ComposeResult:
        with Vertical(id="diff-box", classes="dialog full"):
            # one title (ids and summary), shortened to the width; the body has none
            yield Static("", id="diff-title", classes="title")
            yield Label("u unified · s side by side · esc back", classes="dim")
            with VerticalScroll(id="diff-scroll"):
                yield Static(id="diff-body")

    def on_mount(self) -> None:
        self._draw()

    def on_resize(self) -> None:
        self._draw()

    def _draw(self) -> None:
        box = self.query_one("#diff-box")
        inner = box.content_region.width or max(20, self.size.width - 10)
        self.query_one("#diff-title", Static).update(Text(diff_title(self.diff, inner)))
        width = max(40, self.size.width - 8)
        if self.mode == "unified":
            body = render_unified(self.diff, title=False)
        else:
            body = render_side_by_side(self.diff, width, title=False)
        self.query_one("#diff-body", Static).update(body)

    def action_mode(self, mode: str) -> None:
        self.mode = mode
        self._draw()

    def action_close(self) -> None:
        self.dismiss(None)

    def action_scroll_down(self) -> None:
        self.query_one("#diff-scroll", VerticalScroll).scroll_down(animate=False)

    def action_scroll_up(self) -> None:
        self.query_one("#diff-scroll", VerticalScroll).scroll_up(animate=False)

    def action_scroll_top(self) -> None:
        self.query_one("#diff-scroll", VerticalScroll).scroll_home(animate=False)

    def action_scroll_bottom(self) -> None:
        self.query_one("#diff-scroll", VerticalScroll).scroll_end(animate=False)


class TextScreen(ModalScreen[None]):
    """Shows text to copy by hand (the fallback when OSC 52 does not reach a clipboard)."""

    BINDINGS = [Binding("escape,q", "close", "back")]

    def __init__(self, title: str, text: str) -> None:
        super().__init__()
        self.title_text = title
        self.text = text

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label(self.title_text, classes="title")
            yield TextArea(self.text, read_only=True, id="text-body", soft_wrap=True)
            yield Label("select with the mouse or keys; esc closes", classes="dim")

    def action_close(self) -> None:
        self.dismiss(None)


COMMANDS = {
    "endpoints": "show the Endpoints pane",
    "ingresses": "show the Agent Ingresses pane",
    "tunnels": "show the Tunnels pane",
    "requests": "show the Requests pane",
    "sessions": "show the tunnel sessions",
    "theme": "switch theme: :theme NAME",
    "quit": "leave the console",
}
TAKES_ARG = {"theme"}


def complete(word: str, names: Iterable[str]) -> tuple[str | None, list[str]]:
    """What ``word`` names among ``names``: itself, or the one name it is a prefix of
    (``ses`` → ``sessions``).  Returns (name or None, the candidates)."""
    names = list(names)
    if word in names:
        return word, [word]
    matches = [n for n in names if n.startswith(word.lower())]
    return (matches[0] if len(matches) == 1 else None), matches


def _common_prefix(words: list[str]) -> str:
    first, last = min(words), max(words)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


class CommandScreen(ModalScreen[str | None]):
    """k9s-style ``:`` command line at the bottom of the screen: the line above it shows
    the commands that match what is typed, tab completes, a unique prefix is enough."""

    BINDINGS = [Binding("escape", "cancel", "cancel"), Binding("tab", "complete", "complete", priority=True)]

    def __init__(self, themes: Iterable[str] = ()) -> None:
        super().__init__()
        self.themes = sorted(themes)

    def compose(self) -> ComposeResult:
        with Vertical(id="command-box"):
            yield Label("", id="command-hint")
            yield Input(placeholder=":" + " :".join(COMMANDS) + "   (tab completes)", id="command")

    def on_mount(self) -> None:
        self.query_one(Input).focus()
        self._hint("")

    def _parts(self, text: str) -> tuple[str, str, bool]:
        word, space, arg = text.lstrip(":").partition(" ")
        return word, arg.strip(), bool(space)

    def _candidates(self, text: str) -> tuple[str, list[str]]:
        """What is being completed (``command`` or ``theme``) and its candidates."""
        word, arg, spaced = self._parts(text)
        if spaced:
            name, _ = complete(word, COMMANDS)
            if name == "theme":
                return "theme", complete(arg, self.themes)[1]
            return "argument", []
        return "command", complete(word, COMMANDS)[1]

    def _hint(self, text: str, error: str = "") -> None:
        label = self.query_one("#command-hint", Label)
        label.set_class(bool(error), "error")
        if error:
            label.update(error)
            return
        what, found = self._candidates(text)
        if what == "command":
            if len(found) == 1:
                label.update(f":{found[0]} — {COMMANDS[found[0]]}")
            else:
                label.update("  ".join(f":{c}" for c in found) or f"no command starts with {text.lstrip(':')!r}")
        elif what == "theme":
            label.update("  ".join(found) or "no theme starts with that")
        else:
            label.update("")

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self._hint(event.value)

    def action_complete(self) -> None:
        box = self.query_one(Input)
        word = self._parts(box.value)[0]
        what, found = self._candidates(box.value)
        if not found:
            return
        common = _common_prefix(found)
        if what == "command":
            box.value = found[0] + (" " if found[0] in TAKES_ARG else "") if len(found) == 1 else common
        elif what == "theme":
            box.value = f"{word} {found[0] if len(found) == 1 else common}"
        box.cursor_position = len(box.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        word, arg, _ = self._parts(event.value.strip())
        if not word:
            self.dismiss(None)
            return
        name, found = complete(word, COMMANDS)
        if name is None:
            if found:
                self._hint(event.value, f":{word} is ambiguous: " + ", ".join(f":{c}" for c in found))
            else:
                self._hint(event.value, f"unknown command :{word}; have " + " ".join(f":{c}" for c in COMMANDS))
            return
        if name == "theme":
            theme, themes = complete(arg, self.themes)
            if theme is None:
                if not arg:
                    problem = "name a theme"
                else:
                    problem = f"{arg!r} is ambiguous" if themes else f"no theme {arg!r}"
                self._hint(event.value, f"{problem}; have " + ", ".join(themes or self.themes))
                return
            arg = theme
        self.dismiss(f"{name} {arg}".strip())

    def action_cancel(self) -> None:
        self.dismiss(None)
