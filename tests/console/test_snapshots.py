"""Snapshots of every pane, the detail view, help and a confirm dialog, at two sizes.

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
from console.widgets.request_list import RequestList
from tests.console.fixture_api import FixtureServer, fixed_clock

SIZES = [(120, 36), (80, 24)]


@pytest.fixture(scope="module")
def fixture_url():
    with FixtureServer() as server:
        yield server.url


def fixture_app(url: str) -> BurrowApp:
    settings = Settings(agent_url=url, api_url=url, api_key="k", context="fixture", theme="burrow-dark")

    async def starter(progress):
        return url, url, "k"

    return BurrowApp(settings, starter, clock=fixed_clock)


async def settle(pilot) -> None:
    app = pilot.app
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rl = app.query_one(RequestList)
        if rl.total == 30 and len(rl.rows) == 30 and len(app.tunnels) == 2 and len(app.endpoints) == 3 and app.ingresses:
            break
        await pilot.pause(0.05)
    for box in app.query(Input):
        box.cursor_blink = False
    await pilot.pause()


def _snap(snap_compare, url, size, *keys):
    app = fixture_app(url)

    async def before(pilot):
        await settle(pilot)
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
