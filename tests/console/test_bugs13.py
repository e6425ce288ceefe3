"""Issue 13 §2 bugs, each against a real backend or the fixture API: URLs of copied
commands keep the tunnel's port, the list after a clear while paused, ``--web`` on a
taken port, keys in a burst, stale form errors, the sessions screen after a restart,
HAR file names, plurals, the diff title, keymap warnings and filter error markers."""

from __future__ import annotations

import json

import pytest

from console.screens import DetailScreen
from console.widgets.request_list import RequestList
from tests.console.fixture_api import FixtureServer
from tests.console.test_pilot import public, until
from tests.console.test_request_tools import make_app, ready
from tests.console.test_snapshots import fixture_app, settle
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
        # one of each, said in the singular
        await pilot.pause(0.2)
        header = str(app.query_one("#header").render())
        assert "1 tunnel ·" in header and "1 request" in header and "1 requests" not in header
        status = str(app.query_one("#requests-status").render())
        assert status.endswith("· 1 request") and "1 requests" not in status
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DetailScreen), what="the detail view")
        assert app.screen.capture_id == rl.rows[0]["id"]


# ---------------------------------------------------------------- stale inline errors
@pytest.fixture(scope="module")
def fixture_url():
    with FixtureServer() as server:
        yield server.url


@pytest.mark.parametrize(
    "keys, screen_type, error_id, field",
    [
        (("2", "n"), "IngressForm", "#if-error", "#if-domain"),
        (("1", "n"), "EndpointForm", "#ef-error", "#ef-url"),
        (("3", "n"), "NewTunnelScreen", "#nt-error", "#nt-addr"),
    ],
)
async def test_inline_error_goes_once_the_field_is_edited(fixture_url, keys, screen_type, error_id, field):
    app = fixture_app(fixture_url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        await pilot.press(*keys)
        await until(pilot, lambda: type(app.screen).__name__ == screen_type, what=screen_type)
        form = app.screen
        error = form.query_one(error_id)
        form.query_one(field).focus()
        await pilot.press("enter")  # the field is empty: refused inline
        await until(pilot, lambda: "required" in str(error.render()), timeout=5, what="the inline error")
        await pilot.press("c")
        await pilot.pause(0.2)
        assert "required" not in str(error.render())
        assert form.query_one(field).value == "c"


async def test_edit_replay_error_goes_once_the_headers_are_edited(fixture_url):
    app = fixture_app(fixture_url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        await pilot.press("j", "e")
        await until(pilot, lambda: type(app.screen).__name__ == "EditReplayScreen", what="the edit form")
        form = app.screen
        headers = form.query_one("#er-headers")
        headers.text = headers.text + "\nno colon here"
        before_x = headers.text.count("x")
        await pilot.press("ctrl+s")
        error = form.query_one("#er-error")
        await until(pilot, lambda: "Name: value" in str(error.render()), timeout=5, what="the inline error")
        headers.focus()
        await pilot.pause(0.1)
        await pilot.press("x")
        await until(pilot, lambda: str(error.render()).strip() == "", timeout=5, what="the error to go")
        assert headers.text.count("x") > before_x


# ---------------------------------------------------------------- sessions refresh
async def test_sessions_screen_shows_the_new_session_after_a_restart(edge, agents):
    from console.manage import SessionsScreen
    from console.screens import ConfirmScreen
    from tests.console.test_manage import cloud_app

    agent = agents("http", 9, "--name", "web")
    app = cloud_app(edge, agent, cloud_poll_seconds=60)  # no periodic refresh in time
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, lambda: len(app.endpoints) == 1, what="agent endpoint")
        await pilot.press("1", "S")
        await until(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.sessions, what="sessions")
        screen = app.screen
        [old] = [s["id"] for s in screen.sessions]
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("y")
        await until(
            pilot, lambda: [s["id"] for s in screen.sessions if s["id"] != old], timeout=15, what="the new session"
        )
        assert old not in [s["id"] for s in screen.sessions]


async def test_sessions_screen_refreshes_by_itself(edge, agents):
    from console.manage import SessionsScreen
    from tests.console.test_manage import api, cloud_app

    agent = agents("http", 9, "--name", "web")
    app = cloud_app(edge, agent)  # polls every 0.5 s
    async with app.run_test(size=(120, 36)) as pilot, api(edge) as a:
        await until(pilot, lambda: len(app.endpoints) == 1, what="agent endpoint")
        await pilot.press("1", "S")
        await until(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.sessions, what="sessions")
        screen = app.screen
        [s] = screen.sessions
        assert (await a.post(f"/tunnel_sessions/{s['id']}/stop", json={})).status_code < 300  # from elsewhere
        await until(pilot, lambda: screen.sessions == [], timeout=10, what="the list to follow")


# ---------------------------------------------------------------- HAR files
def test_har_exports_get_new_timestamped_names_and_never_overwrite(tmp_path):
    import os
    import stat
    from datetime import datetime

    from console.export import export_har
    from tests.console.test_export import sample_captures

    at = datetime(2026, 1, 2, 3, 4, 5)
    caps = sample_captures()
    first = export_har(tmp_path / "out", caps, "1", now=at)
    second = export_har(tmp_path / "out", caps, "1", now=at)
    one = export_har(tmp_path / "out", caps[:1], "1", now=at)
    assert first.name == "burrow-20260102-030405-6-requests.har"
    assert second.name == "burrow-20260102-030405-6-requests-2.har"
    assert one.name == "burrow-20260102-030405-1-request.har"
    assert first.is_absolute() and first.read_text() == second.read_text()
    for p in (first, second, one):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    with pytest.raises(FileExistsError):
        from console.export import write_har

        write_har(first, caps, "1")


def test_default_export_dir_is_downloads_else_the_data_dir(tmp_path, monkeypatch):
    from console.config import Settings, export_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("BURROW_DATA_DIR", str(tmp_path / "data"))
    assert export_dir(Settings()) == tmp_path / "data" / "exports"
    (tmp_path / "Downloads").mkdir()
    assert export_dir(Settings()) == tmp_path / "Downloads"
    assert export_dir(Settings(export_dir="~/hars")) == tmp_path / "hars"


async def test_two_har_exports_make_two_files_and_the_toast_names_the_path(setup, tmp_path):
    edge, agent, _up = setup
    app = make_app(edge, agent, export_dir=tmp_path / "exports")
    async with app.run_test(size=(120, 36)) as pilot, public(edge) as c:
        await until(pilot, lambda: app.agent is not None and app.query_one(RequestList).generation > 0)
        await c.get("/only", headers={"Host": host_of(agent.public_url)})
        await ready(pilot, 1)
        paths = []
        for _ in range(2):
            app.last_export = None
            await pilot.press("x")
            await pilot.pause()
            options = app.screen.query_one("#pick")
            options.highlighted = options.option_count - 1  # HAR
            await pilot.press("enter")
            await until(pilot, lambda: app.last_export is not None, what="the HAR file")
            paths.append(app.last_export)
        await pilot.pause(0.2)
        toasts = [str(n.message) for n in app._notifications]
    assert paths[0] != paths[1] and all(p.parent == tmp_path / "exports" for p in paths)
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == sorted(p.name for p in paths)
    assert paths[0].name.endswith("-1-request.har")
    assert f"Wrote 1 request to {paths[1]}" in toasts


# ---------------------------------------------------------------- plurals
def test_plural():
    from console.render import plural

    assert plural(0, "tunnel") == "0 tunnels"
    assert plural(1, "tunnel") == "1 tunnel"
    assert plural(1234, "request") == "1,234 requests"
    assert plural(2, "entry", "entries") == "2 entries"


# ---------------------------------------------------------------- diff title
def test_diff_title_shortens_to_the_width():
    from console.diff import diff_title, render_side_by_side, render_unified
    from tests.console.test_diff import _example, text_of

    d = _example()
    full = diff_title(d, 200)
    assert full.startswith("Replay 00000000000000bb vs original 00000000000000aa — differs: ")
    mid = diff_title(d, 70)
    assert mid.startswith("Replay vs original — differs: status 200 → 500") and len(mid) <= 70
    for width in (60, 40, 30):
        short = diff_title(d, width)
        assert len(short) <= width and short.endswith("…") and not short.endswith(",…")
    # the bodies under that title do not say it again
    assert "vs original" not in text_of(render_unified(d, title=False))
    assert d.summary() not in text_of(render_side_by_side(d, 100, title=False))


async def test_diff_screen_shows_its_title_once_at_80_columns(fixture_url):
    from console.request_actions import DiffScreen

    app = fixture_app(fixture_url)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("j", "j", "D")
        await until(pilot, lambda: isinstance(app.screen, DiffScreen), what="the diff")
        await pilot.pause(0.2)
        title = app.screen.query_one("#diff-title")
        text = str(title.render())
        assert text.startswith("Replay vs original — differs: request line")
        assert len(text) <= title.content_region.width
        await pilot.press("s")  # side by side: still one title
        await pilot.pause(0.2)
        assert str(app.screen.query_one("#diff-title").render()) == text


# ---------------------------------------------------------------- keymap warnings
def test_check_keymap_names_unknown_ids_and_stolen_keys():
    from textual.keys import _normalize_key_list

    from console.keymap import check_keymap

    assert check_keymap({"requests.replay": "R2"}, _normalize_key_list) == []
    [unknown] = check_keymap({"request.replay": "R"}, _normalize_key_list)
    assert "'request.replay'" in unknown and "did you mean 'requests.replay'" in unknown
    [stolen] = check_keymap({"requests.replay": "z"}, _normalize_key_list)
    assert stolen.startswith("keymap: requests.replay = z takes z from requests.clear")
    # the app's keys clash everywhere; "?" is question_mark
    [help_] = check_keymap({"tunnels.new": "?"}, _normalize_key_list)
    assert "takes ? from app.help" in help_
    # keys of screens that never show together do not clash
    assert check_keymap({"detail.pretty": "z"}, _normalize_key_list) == []


async def test_keymap_problems_are_shown_at_start_and_the_rebinding_wins(fixture_url):
    from console.app import BurrowApp
    from console.config import Settings
    from console.screens import ConfirmScreen
    from tests.console.fixture_api import fixed_clock

    url = fixture_url
    settings = Settings(agent_url=url, api_url=url, api_key="k", context="fixture",
                        keymap={"requests.replay": "z", "requests.folow": "F"})

    async def starter(progress):
        return url, url, "k"

    app = BurrowApp(settings, starter, clock=fixed_clock)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        toasts = [str(n.message) for n in app._notifications]
        assert any("requests.replay = z takes z from requests.clear" in t for t in toasts), toasts
        assert any("'requests.folow'" in t and "'requests.follow'" in t for t in toasts), toasts
        await pilot.press("z")
        await pilot.pause(0.3)
        assert not isinstance(app.screen, ConfirmScreen)  # z replays now, it does not clear


# ---------------------------------------------------------------- filter error marker
@pytest.mark.parametrize(
    "query, token",
    [
        ("status:abc", "status:abc"),
        ("s path:/b dur>banana", "dur>banana"),
        ("a OR b", "OR"),
        ("method:GET -status:ABC", "-status:ABC"),
        ("foo:bar path:/x", "foo:bar"),
    ],
)
def test_filter_error_marks_the_bad_token(query, token):
    from backend.agent.query import QueryError, compile_query
    from console.panes import filter_error_line

    with pytest.raises(QueryError) as err:
        compile_query(query)
    for message in (str(err.value), f"invalid query: {err.value}"):  # the agent API's 400 adds the prefix
        line = filter_error_line(query, message)
        marked = [line.plain[s.start:s.end] for s in line.spans if "underline" in str(s.style)]
        assert marked == [token]
        assert query in line.plain and message in line.plain


async def test_filter_error_line_underlines_the_token_in_the_query(setup):
    edge, agent, _up = setup
    app = make_app(edge, agent)
    async with app.run_test(size=(120, 36)) as pilot, public(edge) as c:
        rl = app.query_one(RequestList)
        await until(pilot, lambda: app.agent is not None and rl.generation > 0, what="connect")
        await c.get("/a", headers={"Host": host_of(agent.public_url)})
        await ready(pilot, 1)
        await pilot.press("slash", *"path:/a dur>banana", "enter")
        status = app.query_one("#requests-status")
        await until(pilot, lambda: "bad filter" in str(status.render()), timeout=5, what="the error")
        text = str(status.render())
        assert text.startswith("bad filter: path:/a dur>banana  ← invalid query: dur>banana — expected a duration")
        pane = app.query_one("#requests-pane")
        from console.panes import bad_token

        assert bad_token(pane.filter_error_query, pane.filter_error) == (8, 18)


# ---------------------------------------------------------------- keys in a burst, pastes
def _burst(app, *keys: str) -> None:
    """Keys as the terminal delivers a burst: all posted before any is handled
    (``pilot.press`` waits for the app between keys, which hid the problem)."""
    from textual import events

    for k in keys:
        app.post_message(events.Key(k, k if len(k) == 1 else None))


async def test_keys_typed_right_after_n_go_to_the_new_form(fixture_url):
    from console.screens import NewTunnelScreen

    app = fixture_app(fixture_url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        await pilot.press("3")
        await pilot.pause(0.2)
        _burst(app, "n", *"8081", "tab", *"web")
        await until(pilot, lambda: isinstance(app.screen, NewTunnelScreen)
                    and app.screen.query_one("#nt-name").value == "web", timeout=5, what="the typed fields")
        assert app.screen.query_one("#nt-addr").value == "8081"
        assert app.active_pane == "tunnels"  # the tab moved between fields, not panes
        assert app.focused.id == "nt-name"


async def test_keys_in_a_burst_on_the_list_each_act_once(fixture_url):
    app = fixture_app(fixture_url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        rl = app.query_one(RequestList)
        _burst(app, *"jjjjj", "k")
        await until(pilot, lambda: rl.cursor == 4, timeout=5, what="four rows down")
        await pilot.pause(0.2)
        assert rl.cursor == 4


async def test_a_paste_with_tabs_fills_the_next_fields_without_control_characters(fixture_url):
    from textual import events

    from console.screens import NewTunnelScreen

    app = fixture_app(fixture_url)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        await pilot.press("3", "n")
        await until(pilot, lambda: isinstance(app.screen, NewTunnelScreen), what="the form")
        app.post_message(events.Paste("8081\tweb\x07\nhttp://ignored.example"))
        await pilot.pause(0.3)
        form = app.screen
        assert isinstance(form, NewTunnelScreen)  # the newline did not submit it
        assert form.query_one("#nt-addr").value == "8081"
        assert form.query_one("#nt-name").value == "web"
        assert form.query_one("#nt-url").value == ""
        assert app.focused.id == "nt-name"
