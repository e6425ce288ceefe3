"""Issue 13 §3 behaviour: g/G/j/k in detail and diff, filters as you type on panes 1–3,
``:`` completion and unique prefixes, a read-only mode that refuses every change, the
jump to a replay just made and D on an original, and forms that ask before discarding."""

from __future__ import annotations

import pytest
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Input, TextArea

from console.app import BurrowApp
from console.config import Settings
from console.manage import EndpointForm, IngressForm
from console.request_actions import CommandScreen, DiffScreen, EditReplayScreen
from console.screens import ConfirmScreen, DetailScreen, HelpScreen, NewTunnelScreen
from console.widgets.request_list import RequestList
from tests.console.fixture_api import FixtureServer, fixed_clock
from tests.console.test_keys13 import help_keys
from tests.console.test_pilot import public, until
from tests.console.test_request_tools import make_app, ready
from tests.console.test_snapshots import fixture_app, settle
from tests.procs import host_of
from tests.upstreams import HTTPUpstream


@pytest.fixture(scope="module")
def url():
    with FixtureServer() as server:
        yield server.url


def notices(app) -> list[str]:
    return [str(n.message) for n in app._notifications]


# ---------------------------------------------------------------- 1. g/G/j/k in detail and diff
async def _scroll_keys(pilot, scroll: VerticalScroll) -> None:
    assert scroll.max_scroll_y > 2, "the view must be taller than the screen for this test"
    await pilot.press("G")
    await pilot.pause(0.1)
    assert scroll.scroll_y == scroll.max_scroll_y
    await pilot.press("g")
    await pilot.pause(0.1)
    assert scroll.scroll_y == 0
    await pilot.press("j", "j")
    await pilot.pause(0.1)
    assert scroll.scroll_y == 2
    await pilot.press("k")
    await pilot.pause(0.1)
    assert scroll.scroll_y == 1


async def test_g_G_j_k_scroll_the_detail_view_and_the_diff(url):
    app = fixture_app(url)
    async with app.run_test(size=(80, 14)) as pilot:
        await settle(pilot)
        await pilot.press("j", "enter")
        await pilot.pause(0.5)
        assert isinstance(app.screen, DetailScreen)
        await _scroll_keys(pilot, app.screen.query_one("#detail-scroll", VerticalScroll))
        await pilot.press("question_mark")
        await pilot.pause(0.2)
        keys = help_keys(app)
        assert keys["g"] == "scroll to the top" and keys["G"] == "scroll to the bottom"
        await pilot.press("escape", "escape")
        await pilot.pause(0.2)
        # row 2 of the fixture is a replay: D diffs it against its original
        await pilot.press("j", "D")
        await pilot.pause(0.5)
        assert isinstance(app.screen, DiffScreen)
        await _scroll_keys(pilot, app.screen.query_one("#diff-scroll", VerticalScroll))
        cmds = {c.title for c in app.get_system_commands(app.screen)}
        assert {"diff: scroll to the top", "diff: scroll to the bottom", "diff: show the diff side by side"} <= cmds
        await pilot.press("question_mark")
        await pilot.pause(0.2)
        assert isinstance(app.screen, HelpScreen) and app.screen.contexts == ["diff"]
        assert help_keys(app)["G"] == "scroll to the bottom"


# ---------------------------------------------------------------- 2. filters as you type
async def test_filters_on_panes_1_to_3_apply_as_you_type(url):
    app = fixture_app(url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        for key, pane_id, typed, expect in (
            ("1", "endpoints-pane", "front", 1),
            ("2", "ingresses-pane", "nomatch", 0),
            ("3", "tunnels-pane", "db", 1),
        ):
            await pilot.press(key, "slash", *typed)
            await pilot.pause(0.2)
            pane = app.query_one(f"#{pane_id}")
            assert isinstance(app.focused, Input)  # still typing: no enter pressed
            assert len(pane.shown) == expect and pane.query_one(DataTable).row_count == expect
            await pilot.press("escape")
            await pilot.pause(0.1)
            assert pane.shown == pane.rows
        # Requests keeps its query language applied on enter
        await pilot.press("4", "slash", *"crash")
        await pilot.pause(0.3)
        rl = app.query_one(RequestList)
        assert rl.total == 30
        await pilot.press("enter")
        await pilot.pause(0.5)
        assert rl.total == 3


# ---------------------------------------------------------------- 3. : completes
async def test_colon_completes_and_takes_unique_prefixes(url):
    from console.manage import SessionsScreen

    app = fixture_app(url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        await pilot.press("colon", *"ses", "enter")
        await pilot.pause(0.3)
        assert isinstance(app.screen, SessionsScreen)
        await pilot.press("escape")
        await pilot.pause(0.2)
        # ambiguous: stays open with the candidates named
        await pilot.press("colon", "t")
        await pilot.pause(0.1)
        screen = app.screen
        assert isinstance(screen, CommandScreen)
        hint = screen.query_one("#command-hint")
        assert str(hint.render()).split() == [":tunnels", ":theme"]
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert app.screen is screen
        assert "ambiguous" in str(hint.render()) and ":tunnels, :theme" in str(hint.render())
        # tab completes a unique prefix
        await pilot.press("u", "tab")
        await pilot.pause(0.1)
        box = screen.query_one(Input)
        assert box.value == "tunnels"
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert app.active_pane == "tunnels" and app.screen is app.screen_stack[0]
        # theme names complete too: the common prefix first, then the unique one
        await pilot.press("colon", *"th", "tab")
        await pilot.pause(0.1)
        box = app.screen.query_one(Input)
        assert box.value == "theme "
        await pilot.press(*"bu", "tab")
        await pilot.pause(0.1)
        assert box.value == "theme burrow-"
        assert "burrow-light" in str(app.screen.query_one("#command-hint").render())
        await pilot.press("l", "tab")
        await pilot.pause(0.1)
        assert box.value == "theme burrow-light"
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert app.theme == "burrow-light"
        # unknown
        await pilot.press("colon", *"zz", "enter")
        await pilot.pause(0.1)
        assert "unknown command :zz" in str(app.screen.query_one("#command-hint").render())


# ---------------------------------------------------------------- 4. read-only
def read_only_app(url: str) -> BurrowApp:
    settings = Settings(agent_url=url, api_url=url, api_key="k", context="fixture", theme="burrow-dark", read_only=True)

    async def starter(progress):
        return url, url, "k"

    return BurrowApp(settings, starter, clock=fixed_clock)


async def test_read_only_refuses_tunnels_forms_and_replay(url):
    app = read_only_app(url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        main = app.screen
        for keys in (("4", "r"), ("4", "e"), ("4", "R"), ("3", "n"), ("1", "n"), ("1", "e"), ("2", "n"), ("2", "e")):
            await pilot.press(*keys)
            await pilot.pause(0.2)
            assert app.screen is main, keys
        titles = " | ".join(c.title for c in app.get_system_commands(app.screen))
        for gone in ("replay the selected", "then replay it", "replay to another", "start a tunnel",
                     "create a cloud endpoint", "edit the selected", "register an agent"):
            assert gone not in titles, gone
        assert "diff replay ↔ original" in titles and "export" in titles and "copy as a curl" in titles
        # the detail view: looking works, replaying is not offered
        await pilot.press("4", "enter")
        await pilot.pause(0.3)
        assert isinstance(app.screen, DetailScreen)
        shown = {b.binding.action for b in app.screen.active_bindings.values()}
        assert not shown & {"replay", "app.edit_replay"}
        assert {"app.copy_curl", "app.export", "app.diff", "scroll_top"} <= shown
        await pilot.press("r", "e")
        await pilot.pause(0.2)
        assert isinstance(app.screen, DetailScreen)
        await pilot.press("escape")
        await pilot.pause(0.1)
        # triggered anyway (a rebound key, a script): refused with a clear notice
        app.action_new_tunnel()
        app.replay("0000000000000001")
        app.action_edit_replay()
        app.action_replay_to()
        await app.query_one("#endpoints-pane").run_action("new_endpoint")
        await app.query_one("#ingresses-pane").run_action("edit_ingress")
        await pilot.pause(0.2)
        assert app.screen is main
        said = notices(app)
        for what in ("starting tunnels", "replay", "edit and replay", "replay to another tunnel",
                     "creating endpoints", "editing agent ingresses"):
            assert any(f"read-only: {what} is off" in n for n in said), what


async def test_read_only_replay_reaches_no_upstream(setup):
    edge, agent, up = setup
    app = make_app(edge, agent, read_only=True)
    async with app.run_test(size=(120, 36)) as pilot, public(edge) as c:
        await until(pilot, lambda: app.agent is not None and app.query_one(RequestList).generation > 0)
        await c.get("/look", headers={"Host": host_of(agent.public_url)})
        rl = await ready(pilot, 1)
        await pilot.press("r", "enter", "r")
        await pilot.pause(0.3)
        app.replay(rl.rows[0]["id"])
        await pilot.pause(0.5)
        assert len(up.requests) == 1
        assert any("read-only: replay is off" in n for n in notices(app))


# ---------------------------------------------------------------- 5. replay → jump; D on an original
@pytest.fixture
async def setup(edge, agents):
    async with HTTPUpstream() as up:
        agent = agents("http", up.port, "--name", "web")
        yield edge, agent, up


async def test_replay_from_detail_offers_the_new_capture_and_D_diffs_an_original(setup):
    edge, agent, up = setup
    app = make_app(edge, agent)
    async with app.run_test(size=(120, 36)) as pilot, public(edge) as c:
        await until(pilot, lambda: app.agent is not None and app.query_one(RequestList).generation > 0)
        await c.get("/orig", headers={"Host": host_of(agent.public_url)})
        rl = await ready(pilot, 1)
        original = rl.rows[0]["id"]
        # D on an original with no replay yet says what to do
        await pilot.press("D")
        await until(pilot, lambda: any("No replay of this request yet" in n for n in notices(app)), what="the hint")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DetailScreen) and app.screen.capture is not None)
        detail = app.screen
        await pilot.press("r")
        await until(pilot, lambda: len(up.requests) == 2, what="the replay upstream")
        await until(pilot, lambda: any(f"Replayed {original} → 200 · J opens it" in n for n in notices(app)),
                    what="the replay notice with its status and key")
        new_id = app.replays[original]
        await pilot.press("J")
        await until(pilot, lambda: isinstance(app.screen, DetailScreen) and app.screen is not detail, what="J")
        assert app.screen.capture_id == new_id
        await until(pilot, lambda: (app.screen.capture or {}).get("replay_of") == original, what="the replay's detail")
        await pilot.press("escape")
        await pilot.pause(0.1)
        assert app.screen is detail
        # D on the original diffs it against its latest replay (asked of the agent)
        app.replays.clear()
        await pilot.press("D")
        await until(pilot, lambda: isinstance(app.screen, DiffScreen), what="the diff")
        diff = app.screen.diff
        assert diff.original_id == original and diff.replay_id == new_id


# ---------------------------------------------------------------- 6. discarding forms asks
async def test_discarding_a_changed_form_asks_and_an_unchanged_one_closes(url):
    app = fixture_app(url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        main = app.screen
        # unchanged: closes at once
        await pilot.press("3", "n")
        await pilot.pause(0.3)
        assert isinstance(app.screen, NewTunnelScreen)
        await pilot.press("escape")
        await pilot.pause(0.2)
        assert app.screen is main
        # changed: asks; n keeps the form and what was typed; y discards
        await pilot.press("n", *"8080")
        await pilot.pause(0.2)
        form = app.screen
        await pilot.press("escape")
        await pilot.pause(0.2)
        assert isinstance(app.screen, ConfirmScreen) and "Discard changes?" in app.screen.question
        await pilot.press("n")
        await pilot.pause(0.2)
        assert app.screen is form and form.query_one("#nt-addr", Input).value == "8080"
        await pilot.press("escape", "y")
        await pilot.pause(0.2)
        assert app.screen is main
        # the policy editor: esc leaves the editor, then esc asks
        await pilot.press("1", "n")
        await pilot.pause(0.5)
        form = app.screen
        assert isinstance(form, EndpointForm)
        form.query_one("#ef-policy", TextArea).focus()
        await pilot.pause(0.1)
        await pilot.press("x", "escape", "escape")
        await pilot.pause(0.2)
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await pilot.pause(0.2)
        assert app.screen is main
        # an unchanged ingress form and edit-and-replay form close at once; a changed one asks
        await pilot.press("2", "e")
        await pilot.pause(0.3)
        assert isinstance(app.screen, IngressForm)
        await pilot.press("escape")
        await pilot.pause(0.2)
        assert app.screen is main
        await pilot.press("4", "e")
        await pilot.pause(0.5)
        assert isinstance(app.screen, EditReplayScreen)
        await pilot.press("escape")
        await pilot.pause(0.2)
        assert app.screen is main
        await pilot.press("e")
        await pilot.pause(0.5)
        await pilot.press("P")  # into the method field
        await pilot.pause(0.1)
        await pilot.press("escape")
        await pilot.pause(0.2)
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("escape")  # n/esc: back to the form
        await pilot.pause(0.2)
        assert isinstance(app.screen, EditReplayScreen)
