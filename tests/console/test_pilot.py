"""Pilot tests: keys pressed in the console act on a real backend started by the test."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from console.app import BurrowApp
from console.config import Settings
from console.widgets.request_list import RequestList
from tests.procs import host_of
from tests.upstreams import HTTPUpstream


def make_app(edge, agent) -> BurrowApp:
    settings = Settings(
        agent_url=f"http://{agent.ready['web_addr']}",
        api_url=edge.ready["api_url"],
        api_key="test-api-key",
        context="test",
        cloud_poll_seconds=0.5,
    )

    async def starter(progress):
        return settings.agent_url, settings.api_url, settings.api_key

    return BurrowApp(settings, starter)


async def until(pilot, cond, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def public(edge) -> httpx.AsyncClient:
    host, port = edge.http_addr
    return httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10)


@pytest.fixture
async def setup(edge, agents):
    async with HTTPUpstream() as up:
        agent = agents("http", up.port, "--name", "web")
        yield edge, agent, up


async def test_replay_by_key(setup):
    edge, agent, up = setup
    app = make_app(edge, agent)
    async with app.run_test(size=(120, 36)) as pilot, public(edge) as c:
        rl = app.query_one(RequestList)
        await until(pilot, lambda: app.agent is not None and rl.generation > 0, what="connect")
        await c.post("/orders", content=b'{"a": 1}', headers={"Host": host_of(agent.public_url)})
        await until(pilot, lambda: rl.total == 1 and rl.selected and rl.selected.get("status_code"), what="row")
        await pilot.press("r")
        await until(pilot, lambda: len(up.requests) == 2, what="upstream to see the replay")
        assert up.requests[1] == (up.requests[1][0], b'{"a": 1}')
        await until(pilot, lambda: rl.total == 2 and rl.rows.get(0, {}).get("replay_of"), what="replay row")
        assert rl.rows[0]["replay_of"] == rl.rows[1]["id"]
    assert app.return_code in (None, 0)


async def test_stop_tunnel_by_key_confirmed(setup):
    edge, agent, _up = setup
    app = make_app(edge, agent)
    host = host_of(agent.public_url)
    async with app.run_test(size=(120, 36)) as pilot, public(edge) as c:
        assert (await c.get("/", headers={"Host": host})).status_code == 200
        await pilot.press("3")
        await until(pilot, lambda: len(app.tunnels) == 1, what="tunnels")
        await pilot.press("s")
        await pilot.pause()
        await pilot.press("n")  # cancel first: nothing happens
        await pilot.pause(0.2)
        assert (await c.get("/", headers={"Host": host})).status_code == 200
        await pilot.press("s")
        await pilot.pause()
        await pilot.press("y")
        await until(pilot, lambda: app.tunnels == [], what="tunnel to stop")
        r = await c.get("/", headers={"Host": host})
        assert r.status_code == 404 and r.headers["ngrok-error-code"] == "ERR_NGROK_3200"


async def test_start_tunnel_by_form(setup):
    edge, agent, up = setup
    app = make_app(edge, agent)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("3")
        await until(pilot, lambda: len(app.tunnels) == 1, what="tunnels")
        await pilot.press("n")
        await pilot.pause()
        await pilot.press(*str(up.port))
        await pilot.press("tab")  # to the name field
        await pilot.press(*"second")
        await pilot.press("enter")
        await until(pilot, lambda: len(app.tunnels) == 2, what="the new tunnel")
        new = next(t for t in app.tunnels if t["name"] == "second")
        # no scheme asked for: https, ngrok v3's default, since the edge has an https listener
        assert new["public_url"].startswith("https://") and new["proto"] == "https"
        port = edge.ready["https_url"].rsplit(":", 1)[1]
        async with httpx.AsyncClient(verify=False, timeout=10) as s:
            r = await s.get(f"https://127.0.0.1:{port}/via-form", headers={"Host": host_of(new["public_url"])})
        assert r.status_code == 200 and r.text == "GET /via-form\n"


async def test_invalid_filter_keeps_the_previous_list_and_names_the_bad_token(setup):
    edge, agent, _up = setup
    app = make_app(edge, agent)
    async with app.run_test(size=(120, 36)) as pilot, public(edge) as c:
        rl = app.query_one(RequestList)
        await until(pilot, lambda: app.agent is not None and rl.generation > 0, what="connect")
        host = host_of(agent.public_url)
        for path in ("/a", "/b/1", "/b/2"):
            await c.get(path, headers={"Host": host})
        await until(pilot, lambda: rl.total == 3 and len(rl.rows) == 3, what="3 rows")
        await pilot.press("slash")
        await pilot.press(*"path:/b")
        await pilot.press("enter")
        await until(pilot, lambda: rl.total == 2 and len(rl.rows) == 2, what="filtered rows")
        pane = app.query_one("#requests-pane")
        status = app.query_one("#requests-status")
        for bad, token in (("status:abc", "status:abc"), ("dur>banana", "dur>banana"), ("a OR b", "OR")):
            await pilot.press("slash")
            box = app.query_one("#requests-pane-filter")
            box.value = ""
            await pilot.press(*bad)
            await pilot.press("enter")
            await until(pilot, lambda t=token: t in str(status.render()), timeout=5, what=f"error for {bad}")
            assert "filter: path:/b" in str(status.render())
            # the previous list is kept whole: no placeholder rows, the old filter still applies
            assert pane.filter_text == "path:/b"
            assert rl.total == 2 and sorted(r["path"] for r in rl.rows.values()) == ["/b/1", "/b/2"]
            assert box.display and box.value == bad and box.has_focus
        await pilot.press("escape")
        await until(pilot, lambda: rl.total == 3 and "bad filter" not in str(status.render()), what="cleared")


async def test_new_tunnel_form_keeps_input_and_shows_errors_inline(setup):
    from console.screens import NewTunnelScreen

    edge, agent, up = setup
    app = make_app(edge, agent)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("3")
        await until(pilot, lambda: len(app.tunnels) == 1, what="tunnels")
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, NewTunnelScreen), what="the form")
        form = app.screen
        error = form.query_one("#nt-error")
        await pilot.press(*"not a port!!")
        await pilot.press("enter")
        await until(pilot, lambda: "invalid host" in str(error.render()), timeout=5, what="inline address error")
        assert app.screen is form and form.query_one("#nt-addr").value == "not a port!!"
        # a valid address, but a URL the agent refuses: the API's error inline, input kept
        form.query_one("#nt-addr").value = str(up.port)
        form.query_one("#nt-url").value = "ftp://x.burrow.localhost"
        form.query_one("#nt-url").focus()
        await pilot.press("enter")
        await until(pilot, lambda: "ftp" in str(error.render()), timeout=5, what="the API's error inline")
        assert app.screen is form
        assert form.query_one("#nt-url").value == "ftp://x.burrow.localhost"
        assert len(app.tunnels) == 1
        form.query_one("#nt-url").value = ""
        form.query_one("#nt-name").value = "second"
        form.query_one("#nt-name").focus()
        await pilot.press("enter")
        await until(pilot, lambda: len(app.tunnels) == 2, what="the new tunnel")
        assert not isinstance(app.screen, NewTunnelScreen)


async def test_filter_narrows_and_clear_empties(setup):
    edge, agent, _up = setup
    app = make_app(edge, agent)
    async with app.run_test(size=(120, 36)) as pilot, public(edge) as c:
        rl = app.query_one(RequestList)
        await until(pilot, lambda: app.agent is not None and rl.generation > 0, what="connect")
        host = host_of(agent.public_url)
        for path in ("/a", "/b/1", "/b/2", "/c"):
            await c.get(path, headers={"Host": host})
        await until(pilot, lambda: rl.total == 4, what="4 rows")
        await pilot.press("slash")
        await pilot.press(*"path:/b")
        await pilot.press("enter")
        await until(pilot, lambda: rl.total == 2 and len(rl.rows) == 2, what="filtered rows")
        assert sorted(r["path"] for r in rl.rows.values()) == ["/b/1", "/b/2"]
        await pilot.press("escape")
        await until(pilot, lambda: rl.total == 4, what="filter cleared")
        await pilot.press("z")
        await pilot.pause()
        await pilot.press("y")
        await until(pilot, lambda: rl.total == 0, what="cleared")
        async with httpx.AsyncClient() as a:
            body = (await a.get(f"http://{agent.ready['web_addr']}/api/requests/http")).json()
        assert body["requests"] == []


async def test_unreachable_backend_says_so(tmp_path):
    settings = Settings(agent_url="http://127.0.0.1:9", context="test")

    async def starter(progress):
        return settings.agent_url, None, None

    app = BurrowApp(settings, starter)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.connection == "unreachable", what="unreachable state")
        header = str(app.query_one("#header").render())
        assert "unreachable" in header
        await asyncio.sleep(0)
    assert app.return_code in (None, 0)
