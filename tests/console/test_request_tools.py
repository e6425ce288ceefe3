"""Pilot tests of the request tools against a real backend: edit-and-replay, replay to
another tunnel, diff, copy as curl, HAR export, query filters, read-only mode."""

from __future__ import annotations

import asyncio
import json
import subprocess

import httpx
import pytest
from rich.console import Console

from console.app import BurrowApp
from console.config import Settings
from console.diff import render_unified
from console.request_actions import DiffScreen, EditReplayScreen
from console.widgets.request_list import RequestList
from tests.console.test_pilot import public, until
from tests.procs import host_of
from tests.upstreams import HTTPUpstream


def make_app(edge, agent, **settings) -> BurrowApp:
    s = Settings(agent_url=f"http://{agent.ready['web_addr']}", api_url=edge.ready["api_url"],
                 api_key="test-api-key", context="test", cloud_poll_seconds=0.5, **settings)

    async def starter(progress):
        return s.agent_url, s.api_url, s.api_key

    return BurrowApp(s, starter)


@pytest.fixture
async def setup(edge, agents):
    async with HTTPUpstream() as up:
        agent = agents("http", up.port, "--name", "web")
        yield edge, agent, up


async def ready(pilot, n: int) -> RequestList:
    rl = pilot.app.query_one(RequestList)
    await until(pilot, lambda: rl.total >= n and all(r.get("status_code") for r in rl.rows.values()), what=f"{n} rows")
    return rl


async def test_edit_and_replay_sends_the_edited_request(setup):
    edge, agent, up = setup
    app = make_app(edge, agent)
    async with app.run_test(size=(120, 36)) as pilot, public(edge) as c:
        await until(pilot, lambda: app.agent is not None and app.query_one(RequestList).generation > 0)
        await c.post("/echo", content=b"original", headers={"Host": host_of(agent.public_url), "X-Keep": "1"})
        await ready(pilot, 1)
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, EditReplayScreen), what="the edit form")
        form = app.screen
        form.query_one("#er-method").value = "PUT"
        form.query_one("#er-uri").value = "/echo?edited=1"
        headers = form.query_one("#er-headers")
        headers.text = headers.text + "\nX-Edited: yes"
        form.query_one("#er-body").text = "changed body"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: len(up.requests) == 2, what="the edited replay upstream")
        head, body = up.requests[1]
        assert head.startswith(b"PUT /echo?edited=1 HTTP/1.1\r\n")
        assert b"X-Edited: yes" in head and b"X-Keep: 1" in head
        assert body == b"changed body"


async def test_edit_and_replay_keeps_the_edits_and_shows_the_agents_error(setup):
    edge, agent, up = setup
    app = make_app(edge, agent)
    async with app.run_test(size=(120, 36)) as pilot, public(edge) as c:
        await until(pilot, lambda: app.agent is not None and app.query_one(RequestList).generation > 0)
        await c.post("/echo", content=b"original", headers={"Host": host_of(agent.public_url)})
        await ready(pilot, 1)
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, EditReplayScreen), what="the edit form")
        form = app.screen
        headers = form.query_one("#er-headers")
        bad = headers.text + "\nBad Header: x"
        headers.text = bad
        form.query_one("#er-body").text = "my edited body"
        await pilot.press("ctrl+s")
        error = form.query_one("#er-error")
        await until(pilot, lambda: "header name" in str(error.render()), timeout=5, what="the agent's error inline")
        assert app.screen is form
        assert headers.text == bad and form.query_one("#er-body").text == "my edited body"
        assert len(up.requests) == 1
        headers.text = headers.text.replace("Bad Header", "Good-Header")
        await pilot.press("ctrl+s")
        await until(pilot, lambda: len(up.requests) == 2, what="the fixed replay upstream")
        await until(pilot, lambda: not isinstance(app.screen, EditReplayScreen), what="the form closed")
        assert b"Good-Header: x" in up.requests[1][0]


async def test_replay_to_another_tunnel_and_diff_shows_changed_header(setup):
    edge, agent, _up = setup
    async with HTTPUpstream() as up2:
        async with httpx.AsyncClient() as a:  # a second tunnel on the same agent
            r = await a.post(f"http://{agent.ready['web_addr']}/api/tunnels", json={"name": "other", "addr": str(up2.port)})
            assert r.status_code == 201
        app = make_app(edge, agent)
        async with app.run_test(size=(120, 36)) as pilot, public(edge) as c:
            await until(pilot, lambda: len(app.tunnels) == 2, what="two tunnels")
            await c.get("/thing", headers={"Host": host_of(agent.public_url)})
            await ready(pilot, 1)
            await pilot.press("R")
            await pilot.pause()
            options = app.screen.query_one("#pick")
            index = next(i for i in range(options.option_count) if options.get_option_at_index(i).id == "other")
            options.highlighted = index
            await pilot.press("enter")
            await until(pilot, lambda: len(up2.requests) == 1, what="the replay on the other tunnel")
            assert up2.requests[0][0].startswith(b"GET /thing HTTP/1.1")
            # an edited replay on the same tunnel, then diff it against its original
            rl = app.query_one(RequestList)
            original = rl.rows[rl.total - 1]["id"]
            new_id = await app.agent.replay(original, headers={"Host": host_of(agent.public_url), "X-Diff": "new"})
            await until(pilot, lambda: rl.rows.get(0, {}).get("id") == new_id and rl.rows[0].get("status_code"), what="replay row")
            rl.cursor = 0
            await pilot.press("D")
            await until(pilot, lambda: isinstance(app.screen, DiffScreen), what="the diff")
            diff = app.screen.diff
            assert "x-diff" in {c.name.lower() for c in diff.request.headers.added}
            console = Console(record=True, width=120)
            console.print(render_unified(diff))
            assert "+ X-Diff: new" in console.export_text()


async def test_copy_as_curl_reproduces_the_request(setup):
    edge, agent, up = setup
    app = make_app(edge, agent)
    async with app.run_test(size=(120, 36)) as pilot, public(edge) as c:
        await until(pilot, lambda: app.agent is not None and len(app.tunnels) == 1)
        await c.post("/echo?x=1", content=b'{"k": "v"}', headers={"Host": host_of(agent.public_url), "Content-Type": "application/json"})
        await ready(pilot, 1)
        await pilot.press("y")
        await until(pilot, lambda: app.last_copied is not None, what="the curl command")
    host, port = edge.http_addr
    cmd = app.last_copied
    # run it against the edge's public listener (the URL's host resolves only in browsers)
    proc = await asyncio.to_thread(
        subprocess.run,
        ["sh", "-c", cmd.replace("curl ", f"curl --connect-to ::{host}:{port} -sS ", 1)],
        capture_output=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(up.requests) == 2
    assert up.requests[1][1] == b'{"k": "v"}'
    assert up.requests[1][0].split(b"\r\n")[0] == b"POST /echo?x=1 HTTP/1.1"


async def test_har_export_of_the_filtered_list(setup, tmp_path):
    edge, agent, _up = setup
    app = make_app(edge, agent, export_dir=tmp_path)
    async with app.run_test(size=(120, 36)) as pilot, public(edge) as c:
        await until(pilot, lambda: app.agent is not None and app.query_one(RequestList).generation > 0)
        host = host_of(agent.public_url)
        for path in ("/a", "/b", "/api/c"):
            await c.get(path, headers={"Host": host})
        await ready(pilot, 3)
        await pilot.press("slash", *"path:/api", "enter")
        await until(pilot, lambda: app.query_one(RequestList).total == 1, what="filter")
        await pilot.press("x")
        await pilot.pause()
        options = app.screen.query_one("#pick")
        options.highlighted = options.option_count - 1  # HAR
        await pilot.press("enter")
        await until(pilot, lambda: app.last_export is not None, what="the HAR file")
    har = json.loads(app.last_export.read_text())
    log = har["log"]
    assert log["version"] == "1.2" and log["creator"]["name"]
    assert [e["request"]["url"].rsplit("/", 2)[-2:] for e in log["entries"]] == [["api", "c"]]
    entry = log["entries"][0]
    for key in ("startedDateTime", "time", "request", "response", "cache", "timings"):
        assert key in entry
    for key in ("method", "url", "httpVersion", "headers", "queryString", "cookies", "headersSize", "bodySize"):
        assert key in entry["request"]
    for key in ("status", "statusText", "httpVersion", "headers", "cookies", "content", "redirectURL", "headersSize", "bodySize"):
        assert key in entry["response"]
    assert entry["response"]["status"] == 200


@pytest.mark.parametrize(
    ("query", "expect"),
    [
        ("status:4xx", ["/missing"]),
        ("status:5xx", []),
        ("method:POST", ["/echo"]),
        ("path:/b", ["/b/2", "/b/1"]),
        ('body:"secret-token"', ["/echo"]),
        ("-path:/b method:GET", ["/missing", "/a"]),
        ("tunnel:web", ["/echo", "/missing", "/b/2", "/b/1", "/a"]),
        ("dur>1h", []),
    ],
)
async def test_each_filter_term_narrows(setup, query, expect):
    edge, agent, _up = setup
    app = make_app(edge, agent)
    async with app.run_test(size=(120, 36)) as pilot, public(edge) as c:
        await until(pilot, lambda: app.agent is not None and app.query_one(RequestList).generation > 0)
        host = host_of(agent.public_url)
        for path in ("/a", "/b/1", "/b/2"):
            await c.get(path, headers={"Host": host})
        await c.get("/missing", headers={"Host": host})
        await c.post("/echo", content=b"the secret-token is here", headers={"Host": host})
        await ready(pilot, 5)
        await pilot.press("slash", *query, "enter")
        rl = app.query_one(RequestList)
        await until(pilot, lambda: rl.total == len(expect) and len(rl.rows) == len(expect), what=f"{query} → {expect}")
        assert [rl.rows[i]["path"] for i in range(rl.total)] == expect


async def test_read_only_has_no_stop_delete_or_clear(setup):
    edge, agent, _up = setup
    app = make_app(edge, agent, read_only=True)
    host = host_of(agent.public_url)
    async with app.run_test(size=(120, 36)) as pilot, public(edge) as c:
        await c.get("/", headers={"Host": host})
        await ready(pilot, 1)
        await pilot.press("z")  # clear is not bound
        await pilot.press("3")
        await until(pilot, lambda: len(app.tunnels) == 1)
        await pilot.press("s")  # stop is not bound
        await pilot.pause(0.3)
        assert (await c.get("/", headers={"Host": host})).status_code == 200
        async with httpx.AsyncClient() as a:
            body = (await a.get(f"http://{agent.ready['web_addr']}/api/requests/http")).json()
        assert len(body["requests"]) == 2
        shown = {b.action for b in app.screen.active_bindings.values() for b in [b.binding]}
        assert not shown & {"stop_tunnel", "clear", "delete_endpoint", "delete_ingress"}


async def test_marked_rows_are_replayed_exported_and_deleted_together(setup, tmp_path):
    edge, agent, up = setup
    app = make_app(edge, agent, export_dir=tmp_path)
    async with app.run_test(size=(120, 36)) as pilot, public(edge) as c:
        await until(pilot, lambda: app.agent is not None and app.query_one(RequestList).generation > 0)
        host = host_of(agent.public_url)
        for path in ("/one", "/two", "/three"):
            await c.get(path, headers={"Host": host})
        rl = await ready(pilot, 3)
        await pilot.press("f")  # stop following so new replays do not move the cursor
        await pilot.press("space", "space")  # marks /three and /two
        assert {r["path"] for r in rl.marked.values()} == {"/three", "/two"}
        await pilot.press("r")
        await until(pilot, lambda: len(up.requests) == 5, what="two replays")
        assert sorted(h.split(b" ")[1] for h, _ in up.requests[3:]) == [b"/three", b"/two"]
        # export: a HAR of just the marked ones
        await pilot.press("x")
        await pilot.pause()
        options = app.screen.query_one("#pick")
        options.highlighted = options.option_count - 1
        await pilot.press("enter")
        await until(pilot, lambda: app.last_export is not None, what="the HAR file")
        har = json.loads(app.last_export.read_text())
        assert sorted(e["request"]["url"].rsplit("/", 1)[1] for e in har["log"]["entries"]) == ["three", "two"]
        # delete the marked ones (confirmed)
        await pilot.press("ctrl+d")
        await pilot.pause()
        await pilot.press("y")
        await until(pilot, lambda: rl.total == 3 and not rl.marked, what="the marked rows deleted")
        async with httpx.AsyncClient() as a:
            left = (await a.get(f"http://{agent.ready['web_addr']}/api/requests/http")).json()["requests"]
        assert sorted(r["request"]["uri"] for r in left) == ["/one", "/three", "/two"]  # the two replays and /one
        assert all(r["replay_of"] for r in left if r["request"]["uri"] != "/one")
