"""Issue 13 §2 bugs, each against a real backend or the fixture API: URLs of copied
commands keep the tunnel's port, the list after a clear while paused, ``--web`` on a
taken port, keys in a burst, stale form errors, the sessions screen after a restart,
HAR file names, plurals, the diff title, keymap warnings and filter error markers."""

from __future__ import annotations

import json

import pytest

from console.screens import DetailScreen
from console.widgets.request_list import RequestList
from tests.console.test_pilot import public, until
from tests.console.test_request_tools import make_app, ready
from tests.procs import host_of
from tests.upstreams import HTTPUpstream


@pytest.fixture
async def setup(edge, agents):
    async with HTTPUpstream() as up:
        agent = agents("http", up.port, "--name", "web")
        yield edge, agent, up


# ---------------------------------------------------------------- copied URLs
async def test_copied_commands_keep_the_public_port_when_host_named_none(setup, tmp_path):
    """``curl -H 'Host: web.burrow.localhost' http://127.0.0.1:PORT/``: the Host header
    has no port, the copied command must still reach the edge."""
    edge, agent, up = setup
    app = make_app(edge, agent, export_dir=tmp_path)
    host = host_of(agent.public_url)
    port = edge.http_addr[1]
    async with app.run_test(size=(120, 36)) as pilot, public(edge) as c:
        await until(pilot, lambda: app.agent is not None and len(app.tunnels) == 1, what="the tunnel")
        await c.get("/big.json", headers={"Host": host})  # Host without a port
        await ready(pilot, 1)
        await pilot.press("y")
        await until(pilot, lambda: app.last_copied is not None, what="the curl command")
        assert f"'http://{host}:{port}/big.json'" in app.last_copied
        # HTTPie and HAR take the same URL
        await pilot.press("x")
        await pilot.pause()
        options = app.screen.query_one("#pick")
        options.highlighted = 1  # HTTPie
        await pilot.press("enter")
        await until(pilot, lambda: app.screen.query("#text-body"), what="the HTTPie command")
        assert f"http://{host}:{port}/big.json" in app.screen.query_one("#text-body").text
        await pilot.press("escape", "x")
        await pilot.pause()
        options = app.screen.query_one("#pick")
        options.highlighted = options.option_count - 1  # HAR
        await pilot.press("enter")
        await until(pilot, lambda: app.last_export is not None, what="the HAR file")
    har = json.loads(app.last_export.read_text())
    assert har["log"]["entries"][0]["request"]["url"] == f"http://{host}:{port}/big.json"
    assert up.requests  # the request went through


# ---------------------------------------------------------------- clear while paused
async def test_after_clear_while_paused_the_next_request_can_be_selected(setup):
    edge, agent, _up = setup
    app = make_app(edge, agent)
    host = host_of(agent.public_url)
    async with app.run_test(size=(120, 36)) as pilot, public(edge) as c:
        await until(pilot, lambda: app.agent is not None and app.query_one(RequestList).generation > 0)
        for path in ("/a", "/b"):
            await c.get(path, headers={"Host": host})
        rl = await ready(pilot, 2)
        await pilot.press("f")  # paused
        assert not rl.following
        await pilot.press("z")
        await pilot.pause()
        await pilot.press("y")
        await until(pilot, lambda: rl.total == 0, what="cleared")
        await pilot.pause(0.3)
        await c.get("/after", headers={"Host": host})
        await until(pilot, lambda: rl.total == 1 and rl.rows.get(0, {}).get("status_code"), what="the new row")
        assert rl.selected is not None and rl.selected["path"] == "/after"
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DetailScreen), what="the detail view")
        assert app.screen.capture_id == rl.rows[0]["id"]
