"""Console with 100,000 captures: time to open the Requests pane and to move the cursor.

    .venv/bin/python tests/benchmarks/bench_console.py [--captures 100000]

Fills a real agent with captures (wrk through a real tunnel, bounded by count and
time, loopback only), then drives the real console headless (Textual's pilot) against
it and prints: time from app start to the first screenful of rows, time to switch to
the Requests pane from another pane, and per-keypress times for cursor moves
(``j``, ``G`` to the oldest capture, ``g`` back, page down).  Goals: ≤ 150 ms to open,
≤ 30 ms per move.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from console.app import BurrowApp  # noqa: E402
from console.config import Settings  # noqa: E402
from console.widgets.request_list import RequestList  # noqa: E402
from tests.benchmarks.bench_policy import UPSTREAM  # noqa: E402
from tests.procs import host_of, start_agent, start_edge  # noqa: E402


def fill(edge, agent, count: int) -> int:
    """Send requests through the tunnel in 2-second wrk runs until ``count`` are stored."""
    web = f"http://{agent.ready['web_addr']}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        stored = httpx.get(f"{web}/api/requests/http", params={"limit": 1, "summary": 1}).json()["total"]
        if stored >= count:
            return stored
        subprocess.run(
            ["wrk", "-t1", "-c8", "-d2s", "-H", f"Host: {host_of(agent.public_url)}", edge.ready["http_url"] + "/item"],
            capture_output=True, timeout=60, check=True,
        )
    raise SystemExit("could not fill the agent in time")


async def measure(agent_url: str) -> dict[str, float | list[float]]:
    settings = Settings(agent_url=agent_url, context="bench")

    async def starter(progress):
        return agent_url, None, None

    app = BurrowApp(settings, starter)
    t0 = time.perf_counter()
    out: dict = {}
    async with app.run_test(size=(120, 40)) as pilot:
        rl = app.query_one(RequestList)
        while not (rl.total and len(rl.rows) >= 30):
            if time.perf_counter() - t0 > 30:
                raise SystemExit("no rows within 30 s")
            await asyncio.sleep(0.001)
        out["start_to_rows_ms"] = (time.perf_counter() - t0) * 1000
        await pilot.press("3")
        await pilot.pause()
        t1 = time.perf_counter()
        await pilot.press("4")
        while not rl.has_focus:
            if time.perf_counter() - t1 > 10:
                raise SystemExit("the Requests list did not get the focus")
            await asyncio.sleep(0.0005)
        await pilot.pause()
        out["switch_to_requests_ms"] = (time.perf_counter() - t1) * 1000

        async def timed(key: str, done) -> float:
            t = time.perf_counter()
            await pilot.press(key)
            while not done():
                if time.perf_counter() - t > 10:
                    raise SystemExit(f"key {key!r} had no effect within 10 s (focus: {app.focused})")
                await asyncio.sleep(0.0005)
            await pilot.pause()
            return (time.perf_counter() - t) * 1000

        # What the pilot itself costs per key (an unbound key: nothing to do), so that
        # the figures below can be read net of it.
        base = [await timed("f12", lambda: True) for _ in range(10)]
        out["pilot_ms"] = base
        # The widget's own cost: move the cursor and render the visible rows.
        work = []
        for _ in range(20):
            t = time.perf_counter()
            rl.action_cursor_down()
            for y in range(rl.size.height):
                rl.render_line(y)
            work.append((time.perf_counter() - t) * 1000)
        out["widget_ms"] = work
        moves = []
        for _ in range(20):
            before = rl.cursor
            moves.append(await timed("j", lambda b=before: rl.cursor == b + 1))
        out["j_ms"] = moves
        out["G_ms"] = await timed("G", lambda: rl.cursor == rl.total - 1 and rl.selected is not None)
        out["g_ms"] = await timed("g", lambda: rl.cursor == 0 and rl.selected is not None)
        pages = []
        for _ in range(10):
            before = rl.cursor
            pages.append(await timed("pagedown", lambda b=before: rl.cursor > b and rl.selected is not None))
        out["pagedown_ms"] = pages
        out["total"] = rl.total
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captures", type=int, default=100_000)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install -y wrk")
    tmp = Path(tempfile.mkdtemp(prefix="burrow-bench-console-"))
    up = subprocess.Popen([sys.executable, "-c", UPSTREAM], stdout=subprocess.PIPE, text=True)
    procs = []
    try:
        port = up.stdout.readline().strip()
        edge = start_edge(tmp / "edge")
        procs.append(edge)
        agent = start_agent(edge, "http", port, "--inspect-db-size", str(1024 * 1024 * 1024), home=tmp / "h")
        procs.append(agent)
        t = time.perf_counter()
        stored = fill(edge, agent, args.captures)
        print(f"filled {stored:,} captures in {time.perf_counter() - t:.1f}s")
        res = asyncio.run(measure(f"http://{agent.ready['web_addr']}"))
        print(f"\n| console, {res['total']:,} captures | ms | goal |")
        print("|---|---:|---:|")
        print(f"| start → first rows on screen | {res['start_to_rows_ms']:.0f} | |")
        print(f"| switch to the Requests pane | {res['switch_to_requests_ms']:.0f} | ≤ 150 |")
        print(f"| pilot overhead per key (unbound key), median | {statistics.median(res['pilot_ms']):.1f} | |")
        print(f"| cursor move + render of the visible rows, widget only, median | {statistics.median(res['widget_ms']):.2f} | ≤ 30 |")
        print(f"| cursor down (j) through the pilot, median of 20 | {statistics.median(res['j_ms']):.1f} | ≤ 30 |")
        print(f"| cursor down (j), worst of 20 | {max(res['j_ms']):.1f} | ≤ 30 |")
        print(f"| G: jump to the oldest capture | {res['G_ms']:.1f} | ≤ 30 |")
        print(f"| g: back to the newest | {res['g_ms']:.1f} | ≤ 30 |")
        print(f"| page down, median of 10 | {statistics.median(res['pagedown_ms']):.1f} | ≤ 30 |")
    finally:
        for p in reversed(procs):
            p.stop()
        up.terminate()
        up.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
