"""Snapshots of every pane, the detail view, help and a confirm dialog, at 80×24 and
120×36, and the wide layouts (the Requests split, Tunnels' sparklines) at 200×50.
An empty fixture (a fresh install) shows the first-steps hint and each pane's empty state.

The data is the fixed fixture of ``fixture_api`` (fixed ids, clock and metrics), so the
pixels are the same on every run.  Regenerate on purpose only:
``pytest tests/console/test_snapshots.py --snapshot-update``, then look at the SVGs.
"""

from __future__ import annotations

import time

import pytest
from textual.widgets import Input, TextArea

from console.app import BurrowApp
from console.config import Settings
from console.panes import TunnelsPane
from console.widgets.request_list import RequestList
from tests.console.fixture_api import RATES, FixtureServer, fixed_clock

SIZES = [(120, 36), (80, 24)]
ALL_SIZES = [(80, 24), (120, 36), (200, 50)]
EMPTY = {"tunnels": [], "rows": [], "endpoints": [], "ingresses": []}


@pytest.fixture(scope="module")
def fixture_url():
    with FixtureServer() as server:
        yield server.url


@pytest.fixture(scope="module")
def empty_url():
    """A fresh install: no tunnels, no requests, no endpoints, no ingresses."""
    with FixtureServer(**EMPTY) as server:
        yield server.url


@pytest.fixture(scope="module")
def quiet_url():
    """Tunnels up, no request yet: the first-steps hint names their real addresses."""
    with FixtureServer(rows=[]) as server:
        yield server.url


def fixture_app(url: str) -> BurrowApp:
    settings = Settings(agent_url=url, api_url=url, api_key="k", context="fixture", theme="burrow-dark")

    async def starter(progress):
        return url, url, "k"

    return BurrowApp(settings, starter, clock=fixed_clock)


async def settle(pilot, rows: int = 30, tunnels: int = 2, endpoints: int = 3, ingresses: int = 1) -> None:
    """Wait until the fixture is all on screen (rows, panes, every sparkline tick)."""
    app = pilot.app
    # generous: under CI's -n 3 the fixture's answers can take seconds; a fixture that
    # never all arrives fails here, saying what is missing, not as a snapshot diff
    deadline = time.monotonic() + 30
    while True:
        rl = app.query_one(RequestList)
        history = app.query_one(TunnelsPane).history
        state = {
            "connection": app.connection,
            "total": rl.total,
            "rows": len(rl.rows),
            "tunnels": len(app.tunnels),
            "endpoints": len(app.endpoints),
            "ingresses": len(app.ingresses),
            "history": {k: len(h) for k, h in history.items()},
        }
        if (
            app.connection == "online"
            and rl.total == rows
            and len(rl.rows) == rows
            and len(app.tunnels) == tunnels
            and len(app.endpoints) == endpoints
            and len(app.ingresses) == ingresses
            and len(history) == tunnels
            and all(len(h) == len(RATES["web"]) - 1 for h in history.values())
        ):
            break
        assert time.monotonic() < deadline, f"the fixture did not all arrive: {state}"
        await pilot.pause(0.05)
    for box in app.query(Input):
        box.cursor_blink = False
    await pilot.pause()


def _snap(snap_compare, url, size, *keys, data: dict | None = None):
    app = fixture_app(url)

    async def before(pilot):
        if data is None:
            await settle(pilot)
        else:
            await settle(pilot, **data)
        for k in keys:
            await pilot.press(k)
            await pilot.pause(0.1)
        for box in pilot.app.screen.query(Input):
            box.cursor_blink = False
        for area in pilot.app.screen.query(TextArea):
            area.cursor_blink = False
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=size, run_before=before)
    assert app._exception is None


@pytest.mark.parametrize("size", SIZES)
def test_requests_pane(snap_compare, fixture_url, size):
    _snap(snap_compare, fixture_url, size)


@pytest.mark.parametrize("size", SIZES)
def test_tunnels_pane(snap_compare, fixture_url, size):
    _snap(snap_compare, fixture_url, size, "3")


@pytest.mark.parametrize("size", SIZES)
def test_endpoints_pane(snap_compare, fixture_url, size):
    _snap(snap_compare, fixture_url, size, "1")


@pytest.mark.parametrize("size", SIZES)
def test_ingresses_pane(snap_compare, fixture_url, size):
    _snap(snap_compare, fixture_url, size, "2")


@pytest.mark.parametrize("size", SIZES)
def test_detail_view(snap_compare, fixture_url, size):
    _snap(snap_compare, fixture_url, size, "j", "enter")


@pytest.mark.parametrize("size", SIZES)
def test_help(snap_compare, fixture_url, size):
    _snap(snap_compare, fixture_url, size, "question_mark")


@pytest.mark.parametrize("size", SIZES)
def test_confirm_dialog(snap_compare, fixture_url, size):
    _snap(snap_compare, fixture_url, size, "z")


@pytest.mark.parametrize("size", SIZES)
def test_edit_and_replay_form(snap_compare, fixture_url, size):
    _snap(snap_compare, fixture_url, size, "j", "e")


@pytest.mark.parametrize("size", SIZES)
def test_replay_diff(snap_compare, fixture_url, size):
    _snap(snap_compare, fixture_url, size, "j", "j", "D")


@pytest.mark.parametrize("size", SIZES)
def test_export_chooser(snap_compare, fixture_url, size):
    _snap(snap_compare, fixture_url, size, "j", "x")


@pytest.mark.parametrize("size", SIZES)
def test_command_line(snap_compare, fixture_url, size):
    _snap(snap_compare, fixture_url, size, "colon", *"tun")


# ---------------------------------------------------------------- wide layouts (200×50)
def test_requests_split_wide(snap_compare, fixture_url):
    """At 200 columns: the list above, the selected request's headers below."""
    _snap(snap_compare, fixture_url, (200, 50), "j", "j", "j")


def test_tunnels_sparkline_wide(snap_compare, fixture_url):
    _snap(snap_compare, fixture_url, (200, 50), "3")


# ---------------------------------------------------------------- a fresh install
@pytest.mark.parametrize("size", ALL_SIZES)
def test_first_screen_empty(snap_compare, empty_url, size):
    """No tunnel, no request: the Requests pane says what to do next."""
    _snap(snap_compare, empty_url, size, data={"rows": 0, "tunnels": 0, "endpoints": 0, "ingresses": 0})


def test_first_screen_with_tunnels(snap_compare, quiet_url):
    """Tunnels up but no request yet: the hint names the edge's real addresses."""
    _snap(snap_compare, quiet_url, (120, 36), data={"rows": 0})


@pytest.mark.parametrize("pane", ["1", "2", "3"])
def test_empty_pane(snap_compare, empty_url, pane):
    _snap(snap_compare, empty_url, (80, 24), pane, data={"rows": 0, "tunnels": 0, "endpoints": 0, "ingresses": 0})


def test_empty_tunnels_wide(snap_compare, empty_url):
    _snap(snap_compare, empty_url, (200, 50), "3", data={"rows": 0, "tunnels": 0, "endpoints": 0, "ingresses": 0})


@pytest.mark.parametrize("size", [(80, 24), (120, 36)])
def test_quit_dialog_of_a_console_that_started_the_backend(snap_compare, fixture_url, size):
    """q in a console that started the local backend asks: stop it, stay, or leave it."""
    app = fixture_app(fixture_url)
    app.owned_backend = {"agent_url": fixture_url, "agent_pid": 0}

    async def before(pilot):
        await settle(pilot)
        await pilot.press("q")
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=size, run_before=before)
    assert app._exception is None
