"""Layout and feel, driven by keys against the fixture API: the footer's order, the
Requests status line, the first-steps hint and empty panes, the split at 150 columns,
Tunnels' sparklines and column widths, and dialogs that fit 80×24."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from textual.widgets import Button, DataTable, Label, Static
from textual.widgets._footer import FooterKey

from console.panes import TunnelsPane, edge_pattern, first_steps, sparkline
from console.widgets.request_list import RequestList
from console.widgets.request_summary import RequestSummary
from tests.console.fixture_api import TUNNELS, FixtureServer
from tests.console.test_snapshots import EMPTY, fixture_app, settle

EMPTY_COUNTS = {"rows": 0, "tunnels": 0, "endpoints": 0, "ingresses": 0}


@pytest.fixture(scope="module")
def fixture_url():
    with FixtureServer() as server:
        yield server.url


@pytest.fixture(scope="module")
def empty_url():
    with FixtureServer(**EMPTY) as server:
        yield server.url


def _footer_keys(app) -> dict[str, FooterKey]:
    return {k.key: k for k in app.screen.query(FooterKey)}


@pytest.mark.parametrize("pane", ["1", "2", "3", "4"])
async def test_footer_keeps_help_and_quit_at_80_columns(fixture_url, pane):
    app = fixture_app(fixture_url)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press(pane)
        await pilot.pause(0.2)
        keys = _footer_keys(app)
        palette = next(k for k in keys.values() if k.has_class("-command-palette"))
        for key in ("question_mark", "q"):
            region = keys[key].region
            assert region.width and region.right <= palette.region.x, (key, region, palette.region)
    assert app._exception is None


async def test_footer_keeps_help_in_the_detail_view(fixture_url):
    app = fixture_app(fixture_url)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("enter")
        await pilot.pause(0.3)
        keys = _footer_keys(app)
        assert list(keys)[:2] == ["question_mark", "escape"]


async def test_status_line_shows_filter_marks_follow_and_counts(fixture_url):
    app = fixture_app(fixture_url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        status = app.query_one("#requests-status", Static)
        assert str(status.render()) == "following · 30 requests"
        rl = app.query_one(RequestList)
        await pilot.press("slash", *"users", "enter")
        await settle(pilot, rows=6)
        await pilot.press("space", "space")
        await pilot.pause(0.1)
        assert len(rl.marked) == 2
        assert str(status.render()) == "filter: users · 2 marked · paused (f follows) · 6/30"
        await pilot.press("f")
        await pilot.pause(0.1)
        assert str(status.render()) == "filter: users · 2 marked · following · 6/30"


async def test_first_screen_says_what_to_do_next(empty_url):
    app = fixture_app(empty_url)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, **EMPTY_COUNTS)
        await pilot.pause(0.2)
        hint = app.query_one("#requests-empty", Static)
        assert hint.display and hint.region.height > 3
        text = str(hint.render())
        assert "burrow http 8000" in text and "3 then n" in text
        assert app.query_one(RequestList).has_focus  # j, / and the pane keys still work


async def test_first_screen_names_the_edges_real_address(fixture_url):
    with FixtureServer(rows=[]) as quiet:
        app = fixture_app(quiet.url)
        async with app.run_test(size=(120, 36)) as pilot:
            await settle(pilot, rows=0)
            await pilot.pause(0.2)
            text = str(app.query_one("#requests-empty", Static).render())
    assert "https://*.burrow.localhost" in text
    assert "https://web.burrow.localhost" in text and "tunnel web → http://localhost:8080" in text
    assert "tcp://" not in text  # only HTTP addresses: the hint is about requests


def test_first_steps_never_invents_an_address():
    text = first_steps([], []).plain
    assert "burrow http 8000" in text
    assert "://" not in text
    assert edge_pattern("http://127.0.0.1:4080") is None


def test_first_steps_names_the_local_backends_edge_before_any_tunnel():
    edge = {"http_url": "http://127.0.0.1:4080", "domain": "burrow.localhost"}
    text = first_steps([], [], edge=edge).plain
    assert "http://*.burrow.localhost:4080" in text
    assert "shows here once a tunnel is up" not in text


async def test_the_hint_goes_when_the_first_request_arrives(fixture_url):
    with FixtureServer(rows=[]) as quiet:
        app = fixture_app(quiet.url)
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot, rows=0)
            hint = app.query_one("#requests-empty", Static)
            assert hint.display
            app.query_one(RequestList).insert_new(
                {"id": "0000000000000001", "method": "GET", "path": "/", "start": "2026-01-02T03:04:05+00:00"}
            )
            app.query_one("#requests-pane").update_status()
            await pilot.pause(0.1)
            assert not hint.display


@pytest.mark.parametrize(
    ("pane", "words"),
    [
        ("1", ("No endpoints", "burrow http 8000", "n")),
        ("2", ("No agent ingresses", "n registers one")),
        ("3", ("No tunnels", "n starts one", "burrow http 8000")),
    ],
)
async def test_empty_panes_say_what_they_are_for(empty_url, pane, words):
    app = fixture_app(empty_url)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, **EMPTY_COUNTS)
        await pilot.press(pane)
        await pilot.pause(0.2)
        name = {"1": "endpoints", "2": "ingresses", "3": "tunnels"}[pane]
        empty = app.query_one(f"#{name}-pane .empty", Static)
        assert empty.display and empty.region.height
        for w in words:
            assert w in str(empty.render()), w


async def test_split_at_150_columns_shows_the_selected_headers_lazily(fixture_url):
    app = fixture_app(fixture_url)
    async with app.run_test(size=(200, 50)) as pilot:
        await settle(pilot)
        summary = app.query_one(RequestSummary)
        await pilot.pause(0.4)
        assert summary.display and summary.region.height > 10
        assert summary.region.y > app.query_one(RequestList).region.bottom - 1  # below the list
        fetched: list[str] = []
        real = app.agent.request

        async def counting(cid):
            fetched.append(cid)
            return await real(cid)

        app.agent.request = counting
        rl = app.query_one(RequestList)
        # A burst of moves (key repeat): one fetch, for where the cursor rests.  Made in
        # one go, so a slow test machine cannot space them wider than the debounce.
        for _ in range(15):
            rl.action_cursor_down()
        await pilot.pause(0.5)
        assert fetched == [rl.selected["id"]]
        out = Console(width=200, file=io.StringIO(), record=True)
        out.print(summary.shown)
        text = out.export_text()
        assert rl.selected["path"] in text and "User-Agent" in text and "Content-Type" in text


async def test_no_split_below_150_columns(fixture_url):
    app = fixture_app(fixture_url)
    async with app.run_test(size=(149, 40)) as pilot:
        await settle(pilot)
        summary = app.query_one(RequestSummary)
        await pilot.press("j", "j")
        await pilot.pause(0.4)
        assert not summary.display and summary.fetches == 0


def test_sparkline_draws_idle_ticks():
    assert sparkline([0, 0, 0]) == "▁▁▁"
    line = sparkline([0, 1, 10])
    assert line[0] == "▁" and line[1] != "▁" and line[2] == "█"


async def test_tunnels_sparkline_at_120_columns(fixture_url):
    app = fixture_app(fixture_url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        await pilot.press("3")
        await pilot.pause(0.2)
        table = app.query_one("#tunnels-pane-table", DataTable)
        labels = [str(c.label) for c in table.columns.values()]
        assert labels[-1] == "REQ/S"
        assert sum(c.get_render_width(table) for c in table.columns.values()) <= table.size.width
        spark = str(table.get_row_at(0)[-1])
        assert len(spark) == 12 and set(spark) <= set("▁▂▃▄▅▆▇█") and "█" in spark


async def test_tunnels_columns_follow_the_content(fixture_url):
    """A long name widens its column (the REQ/S sparkline stays on screen); when the
    tunnel goes, the column shrinks back."""
    app = fixture_app(fixture_url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        await pilot.press("3")
        pane = app.query_one(TunnelsPane)
        table = app.query_one("#tunnels-pane-table", DataTable)
        base = [c.get_render_width(table) for c in table.columns.values()]
        long = dict(TUNNELS[0], name="a-very-long-tunnel-name-for-the-staging-api",
                    public_url="https://a-very-long-tunnel-name-for-the-staging-api.burrow.localhost")
        pane.set_rows([*app.tunnels, long])
        await pilot.pause(0.1)
        assert table.columns[next(iter(table.columns))].get_render_width(table) > base[0]
        assert sum(c.get_render_width(table) for c in table.columns.values()) <= table.size.width
        pane.set_rows(app.tunnels[:2])
        await pilot.pause(0.1)
        assert [c.get_render_width(table) for c in table.columns.values()] == base


async def test_rows_that_arrive_while_a_pane_is_hidden_fit_when_it_shows(fixture_url):
    """Rows set while another pane is on screen are cut to the width the pane has when
    it shows, not to the width it had hidden (a real ngrok agent sends no events that
    would redraw it soon after)."""
    app = fixture_app(fixture_url)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        await pilot.press("4")
        await pilot.pause(0.1)
        pane = app.query_one(TunnelsPane)
        url = "https://18176ae2.burrow.localhost:33389"
        pane.set_rows([dict(TUNNELS[0], name="command_line", public_url=url)])
        await pilot.press("3")
        await pilot.pause(0.3)
        table = app.query_one("#tunnels-pane-table", DataTable)
        row = [str(c) for c in table.get_row_at(0)]
        assert row[0] == "command_line" and row[1] == url, row
    assert app._exception is None


async def test_a_long_question_wraps_inside_the_confirm_dialog_at_80x24(fixture_url):
    from console.screens import ConfirmScreen

    app = fixture_app(fixture_url)
    question = "Delete agent endpoint http://a-rather-long-tunnel-name-for-staging.burrow.localhost:4080?"
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        app.push_screen(ConfirmScreen(question, "SDK agents are told to stop it."))
        await pilot.pause(0.2)
        box = app.screen.query_one("#confirm-box")
        label = app.screen.query_one("#confirm-question", Label)
        assert label.region.height > 1, label.region  # wrapped, not cut
        assert box.region.contains_region(label.region)
    assert app._exception is None


DIALOGS = {
    "new tunnel": ("3", "n"),
    "edit and replay": ("j", "e"),
    "endpoint form": ("1", "n"),
    "ingress form": ("2", "n"),
}


@pytest.mark.parametrize("dialog", list(DIALOGS))
async def test_dialogs_fit_80x24_with_buttons_visible(fixture_url, dialog):
    app = fixture_app(fixture_url)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        for k in DIALOGS[dialog]:
            await pilot.press(k)
            await pilot.pause(0.2)
        screen = app.screen

        def visible(w) -> bool:
            r = w.region
            # on screen, not cut off nor under a scrolled-away part of the dialog
            return bool(r.height) and r.y >= 0 and r.bottom <= 24 and screen.get_widget_at(
                r.x + r.width // 2, r.y + r.height // 2
            )[0] in (w, *w.walk_children())

        buttons = list(screen.query(Button))
        assert buttons, dialog
        assert all(visible(b) for b in buttons), dialog
        # an API's refusal, wrapped over two lines, shows inline with the buttons still there
        screen.show_error("url scheme 'ftp' does not match proto 'http'; " * 2)
        await pilot.pause(0.2)
        error = next(w for w in screen.query(Label) if "does not match" in str(w.render()))
        assert visible(error) and error.region.height >= 2, dialog
        assert all(visible(b) for b in buttons), dialog


async def test_split_does_not_fetch_per_new_request_while_following(fixture_url):
    """Following a flood of new requests moves the selection with each one: the
    summary waits for a pause before it fetches (here: once, for the newest)."""
    app = fixture_app(fixture_url)
    async with app.run_test(size=(200, 50)) as pilot:
        await settle(pilot)
        await pilot.pause(0.4)
        fetched: list[str] = []
        real = app.agent.request

        async def counting(cid):
            fetched.append(cid)
            return await real(cid)

        app.agent.request = counting
        rl = app.query_one(RequestList)
        assert rl.following
        for i in range(40):  # as fast as the event stream delivers them
            rl.insert_new({"id": f"{0x100 + i:016x}", "method": "GET", "path": f"/new/{i}",
                           "start": "2026-01-02T03:05:00+00:00", "tunnel_name": "web"})
        await pilot.pause(0.5)
        assert fetched == [f"{0x100 + 39:016x}"]
        out = Console(width=200, file=io.StringIO(), record=True)
        out.print(app.query_one(RequestSummary).shown)
        assert "/new/39" in out.export_text()
