"""One console for every local agent: ``burrow`` and ``burrow http`` meet, in any order.

Real processes: the console (pilot, built by the same ``make_app`` that ``burrow`` runs)
starts or finds the local backend (``backend.local``: a detached edge and agent), and
``burrow http PORT`` processes, started as a user types them, add their tunnels to it.
Every port is chosen by the kernel (``BURROW_LOCAL_PORTS=0``), every state file is under
the test's own HOME.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from backend import local
from console.cli import make_app
from console.config import Settings
from console.screens import QuitScreen
from console.widgets.request_list import RequestList
from tests.upstreams import HTTPUpstream

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.delenv("BURROW_DATA_DIR", raising=False)
    for v in ("BURROW_AGENT_URL", "BURROW_API_URL", "BURROW_API_KEY", "BURROW_SERVER_ADDR", "BURROW_AUTHTOKEN"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("BURROW_LOCAL_PORTS", "0")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    yield h
    rec = local.read_record()
    if rec is not None:
        local.stop(rec)


def settings() -> Settings:
    return Settings(agent_url=None, api_url=None, api_key=None, theme="burrow-dark")


class HttpCmd:
    """``burrow http PORT`` as a user runs it (stdout not a terminal: plain lines)."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "console.cli", "http", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            text=True,
        )

    def tunnel(self, timeout: float = 60) -> tuple[str, str]:
        """The first line: ``tunnel NAME: URL -> ADDR``."""
        line = _readline(self.proc, timeout)
        assert line.startswith("tunnel "), line
        name, rest = line[len("tunnel "):].split(": ", 1)
        return name, rest.split(" -> ")[0]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(15)
        finally:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(0.1):
            line = proc.stdout.readline()
            if line:
                return line.strip()
        if proc.poll() is not None:
            raise AssertionError(f"burrow http exited {proc.returncode}: {proc.stderr.read()}")
    raise AssertionError("no output from burrow http")


async def until(pred, timeout: float, what: str) -> float:
    """Wait (bounded) for pred(); returns the seconds it took."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} not within {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def get(url: str, path: str) -> int:
    """A public request to a tunnel URL, through the edge's address (with its Host)."""
    scheme, host = url.split("://", 1)  # https: a tunnel started with no scheme (ngrok v3)
    name, port = host.rsplit(":", 1)
    async with httpx.AsyncClient(timeout=10, verify=False) as c:
        r = await c.get(f"{scheme}://127.0.0.1:{port}{path}", headers={"Host": name})
    return r.status_code


def shown_tunnels(app) -> set[str]:
    return {t["name"] for t in app.tunnels}


def shown_request_tunnels(app) -> set[str]:
    rl = app.query_one(RequestList)
    return {r.get("tunnel_name") for r in rl.rows.values() if r}


async def connected(app) -> None:
    await until(lambda: app.agent is not None and app.connection == "online", 60, "the console connecting")


async def test_console_first_then_two_burrow_http(home):
    async with HTTPUpstream() as up1, HTTPUpstream() as up2:
        app = make_app(settings())
        cmds: list[HttpCmd] = []
        try:
            async with app.run_test(size=(120, 36)) as pilot:
                await connected(app)
                assert app.owned_backend is not None  # it started the backend
                cmds = [HttpCmd(up1.port), HttpCmd(up2.port)]
                urls = {}
                for cmd in cmds:
                    name, url = await asyncio.to_thread(cmd.tunnel)
                    urls[name] = url
                    took = await until(lambda n=name: n in shown_tunnels(app), 1.0, f"tunnel {name} in the console")
                    print(f"tunnel {name} shown {took * 1000:.0f} ms after burrow http printed it")
                assert len(urls) == 2
                for name, url in urls.items():
                    assert await get(url, f"/from-{name}") == 200
                took = await until(lambda: set(urls) <= shown_request_tunnels(app), 1.0, "both request streams")
                print(f"both tunnels' requests shown {took * 1000:.0f} ms after the last answer")
                # quitting a console that started the backend asks; y stops it
                await pilot.press("q")
                await pilot.pause()
                assert isinstance(app.screen, QuitScreen)
                await pilot.press("y")
                await pilot.pause()
            assert local.read_record() is None
            # their agent went away: each `burrow http` said so and exited 1
            codes = [await asyncio.to_thread(cmd.proc.wait, 20) for cmd in cmds]
            assert codes == [1, 1]
        finally:
            for cmd in cmds:
                cmd.stop()


async def test_two_burrow_http_first_then_the_console(home):
    async with HTTPUpstream() as up1, HTTPUpstream() as up2:
        cmds = [HttpCmd(up1.port), HttpCmd(up2.port)]
        try:
            urls = dict([await asyncio.to_thread(cmds[0].tunnel), await asyncio.to_thread(cmds[1].tunnel)])
            for name, url in urls.items():
                assert await get(url, f"/before-{name}") == 200
            rec = local.read_record()
            assert rec is not None and rec["by"] == "http"
            app = make_app(settings())
            async with app.run_test(size=(120, 36)) as pilot:
                await connected(app)
                await until(lambda: set(urls) <= shown_tunnels(app), 1.0, "both tunnels")
                await until(lambda: set(urls) <= shown_request_tunnels(app), 1.0, "both request streams")
                # a request made now shows too
                name = sorted(urls)[0]
                n = app.query_one(RequestList).total
                assert await get(urls[name], "/live") == 200
                await until(lambda: app.query_one(RequestList).total > n, 1.0, "the live request")
                # not its backend: q quits at once and leaves everything running
                assert app.owned_backend is None
                await pilot.press("q")
                await pilot.pause()
            assert all(cmd.proc.poll() is None for cmd in cmds)
            assert local.read_record() is not None
        finally:
            codes = [cmd.stop() for cmd in cmds]
        assert codes == [0, 0]
        # Ctrl+C removed both tunnels; the agent stays for the next one
        rec = local.read_record()
        async with httpx.AsyncClient(base_url=rec["agent_url"]) as c:
            assert (await c.get("/api/tunnels")).json()["tunnels"] == []
        out = subprocess.run([sys.executable, "-m", "console.cli", "stop"], capture_output=True, text=True,
                             cwd=ROOT, timeout=30)
        assert out.returncode == 0 and "stopped the local edge and agent (0 tunnels, 3 captures)" in out.stdout
        assert local.read_record() is None and not local.pid_alive(rec["agent_pid"])
        assert not local.pid_alive(rec["edge_pid"])


async def test_a_killed_burrow_http_takes_its_tunnel_with_it(home):
    async with HTTPUpstream() as up:
        cmd = HttpCmd(up.port)
        name, _ = await asyncio.to_thread(cmd.tunnel)
        agent_url = local.read_record()["agent_url"]
        cmd.proc.kill()  # no Ctrl+C, no cleanup: only the held event stream breaking
        cmd.proc.wait()
        async with httpx.AsyncClient(base_url=agent_url) as c:
            async def gone() -> bool:
                return (await c.get(f"/api/tunnels/{name}")).status_code == 404

            deadline = time.monotonic() + 10
            while not await gone():
                assert time.monotonic() < deadline, "the tunnel outlived its burrow http"
                await asyncio.sleep(0.1)


async def test_leave_running_then_the_next_console_attaches_and_keeps_captures(home):
    async with HTTPUpstream() as up:
        app = make_app(settings())
        async with app.run_test(size=(100, 30)) as pilot:
            await connected(app)
            # before any tunnel, the first screen names the edge it started
            port = app.owned_backend["http_url"].rsplit(":", 1)[1]
            hint = app.query_one("#requests-empty")
            await until(lambda: f"http://*.burrow.localhost:{port}" in str(hint.render()), 5, "the edge's address")
            r = await app.agent.start_tunnel({"name": "web", "proto": "http", "addr": str(up.port)})
            assert await get(r["public_url"], "/kept") == 200
            await until(lambda: app.query_one(RequestList).total >= 1, 5, "the capture")
            await pilot.press("q")
            await pilot.pause()
            assert isinstance(app.screen, QuitScreen)
            await pilot.press("d")
            await pilot.pause()
        rec = app.owned_backend
        assert app.backend_choice == "leave"
        local.leave(rec)  # what run_console does after the app returns
        assert local.pid_alive(rec["agent_pid"])
        again = make_app(settings())
        async with again.run_test(size=(100, 30)) as pilot:
            await connected(again)
            await until(lambda: "web" in shown_tunnels(again), 2, "the tunnel started from the console")
            await until(lambda: again.query_one(RequestList).total >= 1, 2, "the capture")
            assert again.owned_backend is not None  # adopted: its quit asks again
            assert any("left running" in n.message for n in again._notifications)
            await pilot.press("q")
            await pilot.pause()
            await pilot.press("y")
            await pilot.pause()
        assert local.read_record() is None and not local.pid_alive(rec["agent_pid"])
        # captures are on disk: a fresh backend shows them
        third = make_app(settings())
        async with third.run_test(size=(100, 30)):
            await connected(third)
            await until(lambda: third.query_one(RequestList).total >= 1, 5, "captures after a restart")


def test_a_closed_terminal_leaves_the_backend_running_and_the_next_burrow_says_so(home):
    """SIGHUP to a console in a pty: its backend lives on; the next console finds it."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "console.cli"], stdin=slave, stdout=slave, stderr=slave,
        cwd=ROOT, env=env, start_new_session=True,
    )
    os.close(slave)
    try:
        deadline = time.monotonic() + 60
        while local.read_record() is None:
            assert time.monotonic() < deadline and proc.poll() is None, "the console did not start a backend"
            with contextlib.suppress(OSError):
                os.read(master, 65536)  # keep the terminal drained
            time.sleep(0.05)
        rec = local.read_record()
        assert rec["by"] == "console" and rec["owner_pid"] == proc.pid
        os.kill(proc.pid, signal.SIGHUP)
        proc.wait(15)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        os.close(master)
    rec = local.read_record()
    assert rec is not None and local.orphaned(rec)
    out = subprocess.run([sys.executable, "-m", "console.cli", "status"], capture_output=True, text=True,
                         cwd=ROOT, timeout=30)
    assert out.returncode == 0 and "local backend: running" in out.stdout and "burrow stop" in out.stdout

    async def next_console() -> None:
        app = make_app(settings())
        async with app.run_test(size=(100, 30)) as pilot:
            await connected(app)
            assert any("went away" in n.message for n in app._notifications)
            assert app.owned_backend is not None
            await pilot.press("q")  # nothing on it: quitting stops it without asking
            await pilot.pause()

    asyncio.run(next_console())
    assert local.read_record() is None and not local.pid_alive(rec["agent_pid"])


def test_a_demo_whose_console_died_is_stopped_not_adopted(home, tmp_path):
    """`burrow demo`'s backend is a throwaway: once its console is gone (here: the
    record names a process that has exited), the next reader stops it."""
    rec = local.start("demo", state_dir=tmp_path / "demo", ephemeral=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    rec["owner_pid"] = gone.pid
    local.write_record(rec)
    assert local.pid_alive(rec["agent_pid"])
    assert local.read_record() is None
    assert not local.pid_alive(rec["agent_pid"]) and not local.pid_alive(rec["edge_pid"])
    assert local.reaped and local.reaped[-1]["agent_pid"] == rec["agent_pid"]


async def test_quitting_asks_while_an_ngrok_agent_is_on_the_local_edge(home):
    """An ngrok SDK (here its protocol, driven by hand) on the local edge is other work:
    q asks before stopping the edge under it, and names it."""
    import json
    from types import SimpleNamespace

    from tests.e2e.test_ngrok_agent_raw import RawAgent

    app = make_app(settings())
    raw = None
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await connected(app)
            rec = app.owned_backend
            token = json.loads((Path(rec["data_dir"]) / "bootstrap.json").read_text())["authtoken"]
            raw = await RawAgent.connect(SimpleNamespace(ready=rec))
            assert not (await raw.auth(AuthToken=token))["Error"]
            # `burrow status` (and `burrow stop`) count it too
            out = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "console.cli", "status"],
                capture_output=True, text=True, cwd=ROOT, timeout=30,
            )
            assert out.returncode == 0 and "1 other agent session on the edge" in out.stdout, out.stdout
            await pilot.press("q")
            await until(lambda: isinstance(app.screen, QuitScreen), 5, "the quit question")
            assert "1 other agent on the edge" in str(app.screen.query_one("#confirm-others").render())
            await pilot.press("y")
            await pilot.pause()
        assert app.backend_choice == "stop"
    finally:
        if raw is not None:
            raw.w.close()
