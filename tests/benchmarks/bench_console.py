"""Console benchmarks (issue 8): opening 100,000 captures, first paint, live traffic.

    .venv/bin/python tests/benchmarks/bench_console.py [--captures 100000]
    .venv/bin/python tests/benchmarks/bench_console.py --first-paint [--runs 10] [--importtime]
    .venv/bin/python tests/benchmarks/bench_console.py --live [--rate 1000] [--seconds 10]

Everything runs against a real edge, agent and upstream on 127.0.0.1 (ports picked by
the OS); every process started here is stopped by its pid at the end, also on Ctrl+C or
SIGTERM.

Default (``--captures``): fills a real agent with captures (wrk through a real tunnel,
bounded by count and time), then drives the real console headless (Textual's pilot)
against it and prints: time from app start to the first screenful of rows, time to
switch to the Requests pane from another pane, and per-keypress times for cursor moves
(``j``, ``G`` to the oldest capture, ``g`` back, page down).  Goals: ≤ 150 ms to open,
≤ 30 ms per move.

``--first-paint``: starts the real ``burrow`` entry point (``burrow --agent-url URL``)
in a pseudo-terminal (``--size`` 100x30, TERM=xterm-256color, no user config, no
BURROW_* variables) ``--runs`` times and measures the wall time from just before the
spawn until the pty has received the whole first frame (after the alternate-screen
switch: the tab label ``Requests``, the list header ``TIME`` and the cursor move to the
last row), and until the header says ``● online`` (the agent's data is in).  Twice: with
.pyc files (written to a private PYTHONPYCACHEPREFIX by a first, uncounted run, as an
installed package has them), and with PYTHONDONTWRITEBYTECODE=1, where this checkout's
own modules are compiled at every start.  Goal: ≤ 400 ms to the first frame.
``--importtime`` adds one run under ``python -X importtime`` and prints the costliest
imports made before the first frame.

``--live``: starts the console the same way, with a probe loaded before it (``python -c``
that patches Textual's ``Screen._on_timer_update`` and ``App._display`` to time every
frame that paints, wall and thread CPU time, and runs an asyncio task that sleeps 10 ms
and records how late it wakes: the event-loop stall), waits until it is online, then
sends exactly ``--rate`` x ``--seconds`` GETs through the tunnel, paced (request i at
t0 + i/rate) over ``--conns`` keep-alive connections from a separate process (raw
asyncio sockets), and stops at the count or at ``--seconds`` + 5 s.  It prints the
achieved req/s, the frames painted during the load (and 1 s after), their p50/p99/max
time, and the event-loop stall.  Goal: 1,000 req/s without a frame over 50 ms.

The exit status is 1 if a goal measured in the run was missed (or the load had errors).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
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

FIRST_PAINT_GOAL_MS = 400
FRAME_GOAL_MS = 50


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


# --------------------------------------------------------------------------- helpers
# The load generator: a separate process (so that it does not share a GIL with anything
# measured), raw asyncio sockets, keep-alive, no pipelining.  Request i is sent at
# t0 + i/rate; it stops after ``rate * seconds`` requests or at seconds + 5 s.
LOADGEN = r"""
import asyncio, json, sys, time
try:
    import uvloop
except ImportError:
    uvloop = None
host, port, vhost = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rate, seconds, conns = float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
total = int(rate * seconds)
REQ = f"GET /live HTTP/1.1\r\nHost: {vhost}\r\nUser-Agent: burrow-bench\r\n\r\n".encode()

async def read_response(r):
    head = await r.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            hdrs[k.strip().lower()] = v.strip().lower()
    if "content-length" in hdrs:
        await r.readexactly(int(hdrs["content-length"]))
    elif hdrs.get("transfer-encoding") == "chunked":
        while True:
            size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
            await r.readexactly(size + 2)
            if size == 0:
                break
    return status, hdrs.get("connection") == "close"

async def main():
    loop = asyncio.get_running_loop()
    tickets = iter(range(total))
    out = {"sent": 0, "ok": 0, "errors": 0, "non_2xx": 0, "max_behind_ms": 0.0, "lat": []}
    t0 = loop.time() + 0.05
    deadline = t0 + seconds + 5
    last = [t0]

    async def worker():
        r = w = None
        for i in tickets:
            at = t0 + i / rate
            now = loop.time()
            if now > deadline:
                break
            if at > now:
                await asyncio.sleep(at - now)
            else:
                out["max_behind_ms"] = max(out["max_behind_ms"], (now - at) * 1000)
            try:
                if w is None:
                    r, w = await asyncio.open_connection(host, port)
                t = time.perf_counter()
                w.write(REQ)
                out["sent"] += 1
                status, close = await asyncio.wait_for(read_response(r), max(0.1, deadline - loop.time()))
                last[0] = loop.time()
                out["lat"].append(time.perf_counter() - t)
                if 200 <= status < 300:
                    out["ok"] += 1
                else:
                    out["non_2xx"] += 1
                if close:
                    w.close()
                    r = w = None
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
                out["errors"] += 1
                if w is not None:
                    w.close()
                r = w = None
        if w is not None:
            w.close()

    await asyncio.gather(*(worker() for _ in range(conns)))
    lat = sorted(out.pop("lat"))
    out["elapsed"] = last[0] - t0
    out["rate"] = out["ok"] / out["elapsed"] if out["elapsed"] > 0 else 0.0
    out["p50_ms"] = lat[len(lat) // 2] * 1000 if lat else None
    out["p99_ms"] = lat[int(len(lat) * 0.99)] * 1000 if lat else None
    print(json.dumps(out), flush=True)

(uvloop.run if uvloop else asyncio.run)(main())
"""

# Loaded into the console process before ``console.cli.main``: times every frame (a
# Screen update-timer tick that painted, i.e. layout + compositor + the write of the
# terminal sequence; a layout refresh outside the timer counts as a frame too) and the
# event-loop stall (how late a 10 ms sleep wakes up).  Written as JSON at exit.
PROBE = r"""
import asyncio, atexit, json, os, sys, time
from textual.app import App
from textual.screen import Screen
OUT = os.environ.pop("BURROW_BENCH_PROBE_OUT")
frames, lags, totals = [], [], []
state = {"painted": False, "in_tick": False, "events": 0}

def _timed(orig):
    def wrapper(self, *a, **k):
        if state["in_tick"]:
            return orig(self, *a, **k)
        state["in_tick"], state["painted"] = True, False
        t, cpu = time.perf_counter(), time.thread_time()
        try:
            return orig(self, *a, **k)
        finally:
            state["in_tick"] = False
            if state["painted"]:
                frames.append((time.monotonic(), (time.perf_counter() - t) * 1000, (time.thread_time() - cpu) * 1000))
    return wrapper

Screen._on_timer_update = _timed(Screen._on_timer_update)
Screen._refresh_layout = _timed(Screen._refresh_layout)
_display = App._display
def display(self, screen, renderable):
    if renderable is not None:
        state["painted"] = True
    return _display(self, screen, renderable)
App._display = display

import console.messages
_ev_init = console.messages.AgentEvent.__init__
def ev_init(self, *a, **k):
    state["events"] += 1
    _ev_init(self, *a, **k)
console.messages.AgentEvent.__init__ = ev_init

async def lag_probe(app):
    from console.widgets.request_list import RequestList
    loop = asyncio.get_running_loop()
    n = 0
    while True:
        t = loop.time()
        await asyncio.sleep(0.01)
        lags.append((time.monotonic(), (loop.time() - t - 0.01) * 1000))
        n += 1
        if n % 20 == 0:
            try:
                totals.append((time.monotonic(), app.query_one(RequestList).total))
            except Exception:
                pass

import console.app
_mount = console.app.BurrowApp.on_mount
def on_mount(self):
    _mount(self)
    self._bench_probe = asyncio.get_running_loop().create_task(lag_probe(self))
console.app.BurrowApp.on_mount = on_mount

def dump():
    with open(OUT, "w") as f:
        json.dump({"frames": frames, "lags": lags, "totals": totals, "events": state["events"]}, f)
atexit.register(dump)

sys.argv[0] = "burrow"
from console.cli import main
sys.exit(main(sys.argv[1:]))
"""

ROWS, COLS = 30, 100


def burrow_command() -> list[str]:
    """The installed ``burrow`` entry point of this venv (else ``python -m console.cli``)."""
    script = Path(sys.executable).parent / "burrow"
    return [str(script)] if script.exists() else [sys.executable, "-m", "console.cli"]


def console_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BURROW_", "TEXTUAL"))}
    env.update(
        TERM="xterm-256color",
        BURROW_CONFIG_FILE=str(tmp / "no-config.yaml"),  # no user config, no user themes
        XDG_CONFIG_HOME=str(tmp / "config"),
    )
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    return env


class PtyConsole:
    """A console process on a pseudo-terminal, its output drained by a thread."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        rows, cols = ROWS, COLS
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.rows = rows
        self.buf = bytearray()
        self.keep = True  # stop keeping the output once nothing more is looked for
        self.lock = threading.Lock()
        self.painted_at: float | None = None  # perf_counter when the first frame was in
        self.painted_offset = 0  # how much output had come by then
        self.online_at: float | None = None  # when the header first said "● online"
        self.t0 = time.perf_counter()
        try:
            self.proc = subprocess.Popen(
                argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, start_new_session=True
            )
        finally:
            os.close(slave)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _first_frame_in(self) -> bool:
        alt = self.buf.find(b"\x1b[?1049h")
        if alt < 0:
            return False
        tail = self.buf[alt:]
        return b"Requests" in tail and b"TIME" in tail and f"\x1b[{self.rows};1H".encode() in tail

    def _read(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.master], [], [], 0.2)
                if not ready:
                    if self.proc.poll() is not None:
                        return
                    continue
                data = os.read(self.master, 65536)
            except OSError:  # EIO once the child side is closed
                return
            if not data:
                return
            now = time.perf_counter()
            with self.lock:
                if self.keep:
                    self.buf += data
                if self.painted_at is None and self._first_frame_in():
                    self.painted_at, self.painted_offset = now, len(self.buf)
                if self.online_at is None and self.painted_at is not None and "● online".encode() in self.buf:
                    self.online_at = now

    def wait_for(self, pred, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if pred(self):
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"the console exited ({self.proc.returncode}) before {what}: {self.text()[-800:]!r}")
            time.sleep(0.005)
        raise RuntimeError(f"no {what} within {timeout:.0f} s; output so far: {self.text()[-800:]!r}")

    def text(self) -> str:
        return bytes(self.buf).decode(errors="replace")

    def quit(self, timeout: float = 5.0) -> bool:
        """Ctrl+Q; True if it left on its own, else it is killed by pid."""
        if self.proc.poll() is None:
            try:
                os.write(self.master, b"\x11")
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        clean = self.proc.poll() is not None
        self.kill()
        return clean

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._reader.join(2)
        with contextlib.suppress(OSError):
            os.close(self.master)


class Procs:
    """Every process this script starts, stopped by its pid in reverse order."""

    def __init__(self) -> None:
        self.items: list = []

    def add(self, p):
        self.items.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.items):
            try:
                if isinstance(p, PtyConsole):
                    p.kill()
                elif isinstance(p, subprocess.Popen):
                    if p.poll() is None:
                        p.terminate()
                        try:
                            p.wait(10)
                        except subprocess.TimeoutExpired:
                            p.kill()
                            p.wait(10)
                else:  # tests.procs.BurrowProc
                    p.stop()
            except Exception as exc:  # keep stopping the others
                print(f"could not stop {p!r}: {exc}", file=sys.stderr)
        self.items.clear()


def start_stack(procs: Procs, tmp: Path, *agent_flags: str):
    """Upstream + edge + one http agent, all on 127.0.0.1."""
    up = procs.add(subprocess.Popen([sys.executable, "-c", UPSTREAM], stdout=subprocess.PIPE, text=True))
    port = up.stdout.readline().strip()
    if not port:
        raise SystemExit("the upstream did not start")
    edge = procs.add(start_edge(tmp / "edge"))
    agent = procs.add(start_agent(edge, "http", port, *agent_flags, home=tmp / "h"))
    return edge, agent


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))] if s else float("nan")


# ------------------------------------------------------------------- first paint
def bytecode_env(env: dict[str, str], cached: bool, tmp: Path) -> dict[str, str]:
    """``cached``: .pyc files are written to (and read from) a private prefix, as an
    installed package has them; else PYTHONDONTWRITEBYTECODE=1, and every module without
    a .pyc beside it (this repo's own, in a checkout) is compiled at each start."""
    env = dict(env)
    if cached:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    return env


def first_paint(procs: Procs, tmp: Path, agent_url: str, runs: int, cached: bool) -> tuple[list[float], list[float]]:
    """Times to the first frame and to the header saying online (data loaded), in ms."""
    env = bytecode_env(console_env(tmp), cached, tmp)
    argv = [*burrow_command(), "--agent-url", agent_url]
    times, online = [], []
    for i in range(-1 if cached else 0, runs):  # with a cache: one run to fill it first
        con = procs.add(PtyConsole(argv, env))
        con.wait_for(lambda c: c.painted_at is not None, 20, "first frame")
        con.wait_for(lambda c: c.online_at is not None, 20, "the header saying online")
        ms, on = (con.painted_at - con.t0) * 1000, (con.online_at - con.t0) * 1000
        clean = con.quit()
        procs.items.remove(con)
        if i >= 0:
            times.append(ms)
            online.append(on)
        label = "warm-up (fills the .pyc cache)" if i < 0 else f"run {i + 1}"
        print(f"  {label}: first frame after {ms:.0f} ms, online after {on:.0f} ms"
              + ("" if clean else " (did not quit on ctrl+q: killed)"))
        time.sleep(0.2)
    return times, online


IMPORT_LINE = re.compile(rb"import time:\s+(\d+) \|\s+(\d+) \|( *)([^\r\n\x1b]+)")


def importtime(procs: Procs, tmp: Path, agent_url: str, top: int = 20) -> None:
    """One run under ``python -X importtime``: the import lines are read off the pty."""
    argv = [sys.executable, "-X", "importtime", *burrow_command(), "--agent-url", agent_url]
    if argv[3:4] == [sys.executable]:  # no entry point script: python -X importtime -m console.cli
        argv = [sys.executable, "-X", "importtime", "-m", "console.cli", "--agent-url", agent_url]
    con = procs.add(PtyConsole(argv, bytecode_env(console_env(tmp), True, tmp)))
    con.wait_for(lambda c: c.painted_at is not None, 20, "first frame")
    time.sleep(0.5)
    with con.lock:
        raw = bytes(con.buf)
    con.quit()
    procs.items.remove(con)
    rows = [
        (int(m[1]), int(m[2]), len(m[3]) // 2, m[4].decode().strip(), m.start() < con.painted_offset)
        for m in IMPORT_LINE.finditer(raw)
    ]
    before = [r for r in rows if r[4]]
    print(f"\nfirst frame under -X importtime after {(con.painted_at - con.t0) * 1000:.0f} ms;"
          f" {len(before)} modules imported before it ({sum(r[0] for r in before) / 1000:.0f} ms),"
          f" {len(rows) - len(before)} in the 0.5 s after it ({sum(r[0] for r in rows if not r[4]) / 1000:.0f} ms)")
    print("| top-level import before the first frame | cumulative ms |\n|---|---:|")
    for _s, c, _d, name, _b in sorted((r for r in before if r[2] == 0), key=lambda r: -r[1])[:top]:
        print(f"| {name} | {c / 1000:.1f} |")
    print("\n| module imported before the first frame (any depth) | self ms |\n|---|---:|")
    for s, _c, _d, name, _b in sorted(before, key=lambda r: -r[0])[:top]:
        print(f"| {name} | {s / 1000:.1f} |")


# ---------------------------------------------------------------------- live traffic
def live(procs: Procs, tmp: Path, edge, agent, rate: float, seconds: float, conns: int) -> bool:
    agent_url = f"http://{agent.ready['web_addr']}"
    out = tmp / "probe.json"
    env = {**console_env(tmp), "BURROW_BENCH_PROBE_OUT": str(out)}
    con = procs.add(PtyConsole([sys.executable, "-c", PROBE, "--agent-url", agent_url], env))
    con.wait_for(lambda c: c.painted_at is not None, 20, "first frame")
    con.wait_for(lambda c: c.online_at is not None, 20, "the console going online")
    with con.lock:
        con.keep = False
        con.buf.clear()
    time.sleep(1.0)
    host, port = edge.http_addr
    gen = procs.add(
        subprocess.Popen(
            [sys.executable, "-c", LOADGEN, host, str(port), host_of(agent.public_url), str(rate), str(seconds), str(conns)],
            stdout=subprocess.PIPE, text=True,
        )
    )
    t_start = time.monotonic()
    try:
        stdout, _ = gen.communicate(timeout=seconds + 20)
    except subprocess.TimeoutExpired:
        gen.kill()
        stdout, _ = gen.communicate(10)
    t_load_end = time.monotonic()
    procs.items.remove(gen)
    time.sleep(1.0)  # what the console still does with the last events
    t_end = time.monotonic()
    clean = con.quit(10)
    procs.items.remove(con)
    load = json.loads(stdout) if stdout.strip() else {}
    if not out.exists():
        raise SystemExit("the console probe wrote nothing (the console did not exit normally)")
    probe = json.loads(out.read_text())
    frames = [ms for t, ms, _cpu in probe["frames"] if t_start <= t <= t_end]
    frames_cpu = [cpu for t, _ms, cpu in probe["frames"] if t_start <= t <= t_end]
    lags = [ms for t, ms in probe["lags"] if t_start <= t <= t_end]
    before = [n for t, n in probe["totals"] if t < t_start]
    after = [n for t, n in probe["totals"] if t <= t_end]
    shown = (after[-1] - (before[-1] if before else 0)) if after else 0
    print(f"\n| console, live traffic ({COLS}x{ROWS} pty, Requests pane, following) | value | goal |")
    print("|---|---:|---:|")
    print(f"| requests sent / ok / errors / non-2xx | {load.get('sent', 0):,} / {load.get('ok', 0):,}"
          f" / {load.get('errors', 0)} / {load.get('non_2xx', 0)} | |")
    print(f"| achieved rate (ok / time to the last answer) | {load.get('rate', 0):,.0f} req/s | {rate:,.0f} |")
    print(f"| load generator: latency p50 / p99, most behind schedule | {load.get('p50_ms') or 0:.1f} /"
          f" {load.get('p99_ms') or 0:.1f} ms, {load.get('max_behind_ms', 0):.1f} ms | |")
    print(f"| new rows counted by the console | {shown:,} | |")
    print(f"| agent events received by the console (whole run) | {probe['events']:,} | |")
    print(f"| frames painted (load + 1 s) | {len(frames)} | |")
    if frames:
        print(f"| frame time p50 / p99 / max | {statistics.median(frames):.1f} / {pct(frames, 0.99):.1f} /"
              f" {max(frames):.1f} ms | max ≤ {FRAME_GOAL_MS} |")
        print(f"| frames over {FRAME_GOAL_MS} ms | {sum(f > FRAME_GOAL_MS for f in frames)} | 0 |")
        print(f"| CPU time of the frame thread, p50 / p99 / max | {statistics.median(frames_cpu):.1f} /"
              f" {pct(frames_cpu, 0.99):.1f} / {max(frames_cpu):.1f} ms | |")
    if lags:
        print(f"| event-loop stall (10 ms timer lateness) p50 / p99 / max | {statistics.median(lags):.1f} /"
              f" {pct(lags, 0.99):.1f} / {max(lags):.1f} ms | max ≤ {FRAME_GOAL_MS} |")
        print(f"| stalls over {FRAME_GOAL_MS} ms | {sum(x > FRAME_GOAL_MS for x in lags)} | 0 |")
    print(f"| load window | {t_load_end - t_start:.1f} s | |")
    if not clean:
        print("(the console did not quit on ctrl+q and was killed)")
    ok = bool(frames) and max(frames) <= FRAME_GOAL_MS and bool(lags) and max(lags) <= FRAME_GOAL_MS
    return ok and load.get("errors", 1) == 0


# ------------------------------------------------------------------------------ main
def main() -> int:
    global COLS, ROWS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captures", type=int, default=100_000, help="default mode: captures to open")
    ap.add_argument("--first-paint", action="store_true", help="time to the first frame in a pty")
    ap.add_argument("--runs", type=int, default=10, help="--first-paint runs")
    ap.add_argument("--importtime", action="store_true", help="with --first-paint: one -X importtime run")
    ap.add_argument("--live", action="store_true", help="frame times under live traffic")
    ap.add_argument("--rate", type=float, default=1000.0, help="--live: requests per second")
    ap.add_argument("--seconds", type=float, default=10.0, help="--live: length of the load")
    ap.add_argument("--conns", type=int, default=32, help="--live: keep-alive connections")
    ap.add_argument("--size", default=f"{COLS}x{ROWS}", help="terminal COLSxROWS for --first-paint and --live")
    args = ap.parse_args()
    COLS, ROWS = (int(n) for n in args.size.lower().split("x"))

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="burrow-bench-console-"))
    ok = True
    try:
        if not (args.first_paint or args.live):
            open_captures(procs, tmp, args.captures)
            return 0
        edge, agent = start_stack(procs, tmp)
        agent_url = f"http://{agent.ready['web_addr']}"
        if args.first_paint:
            print(f"first paint: {' '.join(burrow_command())} --agent-url {agent_url} in a {COLS}x{ROWS} pty")
            results = {}
            for cached in (True, False):
                print("with a bytecode cache" if cached else "with PYTHONDONTWRITEBYTECODE=1")
                results[cached] = first_paint(procs, tmp, agent_url, args.runs, cached)
            print(f"\n| console start, {args.runs} runs each | median ms | max ms | min ms | goal |")
            print("|---|---:|---:|---:|---:|")
            for cached, (times, online) in results.items():
                how = ".pyc cached (as installed)" if cached else "PYTHONDONTWRITEBYTECODE=1 (repo modules compiled)"
                print(f"| first frame, {how} | {statistics.median(times):.0f} | {max(times):.0f} | {min(times):.0f} |"
                      f" ≤ {FIRST_PAINT_GOAL_MS} |")
                print(f"| header says online, {how} | {statistics.median(online):.0f} | {max(online):.0f} |"
                      f" {min(online):.0f} | |")
            ok = ok and max(results[True][0]) <= FIRST_PAINT_GOAL_MS
            if args.importtime:
                importtime(procs, tmp, agent_url)
        if args.live:
            ok = live(procs, tmp, edge, agent, args.rate, args.seconds, args.conns) and ok
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def open_captures(procs: Procs, tmp: Path, captures: int) -> None:
    """The default mode: open the Requests pane over ``captures`` stored captures."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install -y wrk")
    edge, agent = start_stack(procs, tmp, "--inspect-db-size", str(1024 * 1024 * 1024))
    t = time.perf_counter()
    stored = fill(edge, agent, captures)
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


if __name__ == "__main__":
    sys.exit(main())
