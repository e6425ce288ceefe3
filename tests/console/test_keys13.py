"""Issue 13 keys: the palette runs its entries, :sessions opens the sessions screen,
tab switches panes, q in a sub-screen goes back, Y and ? in sub-screens."""

from __future__ import annotations

import pytest

from console.manage import SessionsScreen
from console.screens import ConfirmScreen, DetailScreen, HelpScreen, NewTunnelScreen
from tests.console.fixture_api import FixtureServer
from tests.console.test_snapshots import fixture_app, settle


@pytest.fixture(scope="module")
def url():
    with FixtureServer() as server:
        yield server.url


async def palette(pilot, words: str) -> None:
    await pilot.press("ctrl+p")
    await pilot.pause(0.1)
    await pilot.press(*words)
    await pilot.pause(0.5)
    await pilot.press("enter")
    await pilot.pause(0.3)


@pytest.mark.parametrize(
    "words, screen",
    [("list the keys", HelpScreen), ("start a tunnel", NewTunnelScreen)],
)
async def test_palette_entry_runs_its_action(url, words, screen):
    app = fixture_app(url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        await palette(pilot, words)
        assert isinstance(app.screen, screen)


async def test_palette_open_request_opens_detail(url):
    app = fixture_app(url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        await palette(pilot, "open the selected request")
        assert isinstance(app.screen, DetailScreen)


async def test_colon_sessions_opens_sessions_screen(url):
    app = fixture_app(url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        await pilot.press("colon", *"sessions", "enter")
        await pilot.pause(0.3)
        assert isinstance(app.screen, SessionsScreen)


async def test_tab_switches_pane_and_j_moves_there(url):
    from textual.widgets import DataTable, Input

    app = fixture_app(url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        await pilot.press("3")  # tunnels
        await pilot.pause(0.2)
        await pilot.press("shift+tab")
        await pilot.pause(0.2)
        assert app.active_pane == "ingresses"
        await pilot.press("tab")
        await pilot.pause(0.2)
        assert app.active_pane == "tunnels"
        await pilot.press("shift+tab", "shift+tab")
        await pilot.pause(0.2)
        assert app.active_pane == "endpoints"
        table = app.query_one("#endpoints-pane").query_one(DataTable)
        assert app.focused is table
        before = table.cursor_row
        await pilot.press("j")
        await pilot.pause(0.1)
        assert table.cursor_row == before + 1
        # in a form, tab still moves between the fields
        await pilot.press("3", "n")
        await pilot.pause(0.3)
        assert isinstance(app.screen, NewTunnelScreen)
        assert app.focused.id == "nt-addr"
        await pilot.press("tab")
        await pilot.pause(0.1)
        assert isinstance(app.focused, Input) and app.focused.id == "nt-name"


async def test_q_in_sub_screens_goes_back(url):
    app = fixture_app(url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        main = app.screen
        # detail
        await pilot.press("4", "enter")
        await pilot.pause(0.3)
        assert isinstance(app.screen, DetailScreen)
        await pilot.press("q")
        await pilot.pause(0.2)
        assert app.screen is main and app.return_code is None
        # help
        await pilot.press("question_mark")
        await pilot.pause(0.2)
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("q")
        await pilot.pause(0.2)
        assert app.screen is main
        # sessions
        await pilot.press("1", "S")
        await pilot.pause(0.3)
        assert isinstance(app.screen, SessionsScreen)
        await pilot.press("q")
        await pilot.pause(0.2)
        assert app.screen is main
        # a form, focus off the text fields
        await pilot.press("3", "n")
        await pilot.pause(0.3)
        assert isinstance(app.screen, NewTunnelScreen)
        await pilot.press("q")  # a text field takes q as text
        await pilot.pause(0.1)
        assert isinstance(app.screen, NewTunnelScreen)
        assert app.screen.query_one("#nt-addr").value == "q"
        app.screen.query_one("#nt-start").focus()
        await pilot.pause(0.1)
        await pilot.press("q")  # the form was changed (the "q" typed): asks first
        await pilot.pause(0.2)
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await pilot.pause(0.2)
        assert app.screen is main
        assert app.return_code is None
        # on the main screen q still quits
        await pilot.press("q")
        await pilot.pause(0.2)
    assert app.return_code == 0


def help_keys(app) -> dict[str, str]:
    """What the help screen lists: shown key → description."""
    from console.keymap import KEYMAP, display_key

    screen = app.screen
    assert isinstance(screen, HelpScreen)
    return {display_key(k.key): k.description for k in KEYMAP if k.context in screen.contexts}


async def test_help_on_sessions_lists_its_keys_and_detail_help_has_q(url):
    app = fixture_app(url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        await pilot.press("1", "S")
        await pilot.pause(0.3)
        assert isinstance(app.screen, SessionsScreen)
        await pilot.press("question_mark")
        await pilot.pause(0.2)
        keys = help_keys(app)
        assert "stop the selected tunnel session" in keys["s"]
        assert "n" not in keys  # the Endpoints pane's "new" is not listed
        await pilot.press("escape", "escape")
        await pilot.pause(0.2)
        await pilot.press("4", "enter")
        await pilot.pause(0.3)
        assert isinstance(app.screen, DetailScreen)
        await pilot.press("question_mark")
        await pilot.pause(0.2)
        keys = help_keys(app)
        assert "q" in keys and "Y" in keys


async def test_Y_in_detail_shows_the_curl_command(url):
    from console.request_actions import TextScreen

    app = fixture_app(url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        await pilot.press("4", "enter")
        await pilot.pause(0.3)
        assert isinstance(app.screen, DetailScreen)
        await pilot.press("Y")
        await pilot.pause(0.5)
        assert isinstance(app.screen, TextScreen)
        assert app.screen.title_text == "curl" and app.screen.text.startswith("curl ")


async def test_palette_lists_every_key_as_typed_and_runs_pane_entries(url):
    from console.keymap import KEYMAP, display_key
    from console.widgets.request_list import RequestList

    app = fixture_app(url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        cmds = {c.title: c.help for c in app.get_system_commands(app.screen)}
        for k in KEYMAP:
            if k.context in ("detail", "diff", "sessions", "confirm"):
                continue
            assert any(t.endswith(k.description or k.help) for t in cmds), k.id
        assert cmds["console: list the keys that work here"] == "key ?"
        assert "question_mark" not in " ".join(cmds.values())
        assert display_key("slash") in cmds["list: filter the rows of this pane"]
        await palette(pilot, "show the tunnel sessions")
        assert isinstance(app.screen, SessionsScreen)
        await pilot.press("escape")
        await pilot.pause(0.2)
        await palette(pilot, "mark the request")
        assert app.active_pane == "requests"
        assert len(app.query_one(RequestList).marked) == 1
