"""Scale and memory: one edge with 1,000 tunnels and 10,000 open connections, and the
agent's RSS after many captured requests against its ``inspect_db_size`` bound.

Run from the repository root (or ``tests/benchmarks/run.sh --scale ...``):

    .venv/bin/python tests/benchmarks/bench_scale.py                 # 200,000 requests
    .venv/bin/python tests/benchmarks/bench_scale.py --requests 1000000
    .venv/bin/python tests/benchmarks/bench_scale.py --million        # the same

Part 1 (scale): an nginx upstream and one burrow edge on 127.0.0.1; ``--agents``
agent processes started with ``burrow agent --config`` files that together hold
``--tunnels`` http tunnels to nginx.  This process then opens ``--conns`` keep-alive
connections to the edge's public http port, spread over the tunnels, sends one GET on
each and leaves them all open and idle; after ``--idle`` seconds it reports the RSS and
open fds of the edge and agents (from /proc/PID/status and /proc/PID/fd) and sends a
second GET on a random sample of the open connections.

A tunnelled keep-alive connection costs the edge two descriptors (the client's and its
data connection) and the agent two (data connection and upstream) while a request is
in flight; once it has been idle for a second the edge gives the data connection back
(``RELEASE_AFTER`` in ``backend/edge/traffic.py``) and the agent closes the upstream
one, so an idle connection costs the edge one descriptor and the agent none.  This
script raises RLIMIT_NOFILE for itself and its children as far as the hard limit
allows, and spreads the tunnels over several agents.

Part 2 (agent memory): a fresh agent with one http tunnel, capture on; first
``--big-requests`` 1 MiB GETs (bodies captured up to the body cap), then ``--requests``
small GETs with wrk in chunks, printing the agent's RSS after each chunk against the
goal ``RSS <= inspect_db_size + 80 MB``.

Everything it started is stopped by pid at the end, also on Ctrl+C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl
from benchlib import LOCAL, Registry

MiB = 1024 * 1024
GOAL_SLACK = 80 * 1_000_000  # "RSS <= inspect_db_size + 80 MB"


# ================================================================== raw HTTP client
async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> int:
    """One keep-alive GET /small; returns the status (the body is read and checked)."""
    writer.write(f"GET /small HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bench-scale\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length)
    if status == 200 and body != bl.SMALL_BODY.encode():
        raise ValueError(f"unexpected body {body[:40]!r}")
    return status


async def open_connections(
    port: int, hosts: list[str], n: int, parallel: int, deadline: float
) -> tuple[list, Counter, list[float]]:
    """Open ``n`` connections, one GET on each, keep them open.  Returns the open ones
    as (reader, writer, host), a Counter of outcomes and the GET latencies in ms."""
    sem = asyncio.Semaphore(parallel)
    conns: list = []
    outcomes: Counter = Counter()
    lat: list[float] = []

    async def one(i: int) -> None:
        host = hosts[i % len(hosts)]
        async with sem:
            if time.monotonic() > deadline:
                outcomes["skipped (time cap)"] += 1
                return
            writer = None
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(LOCAL, port), 15)
                t0 = time.perf_counter()
                status = await asyncio.wait_for(_get(reader, writer, host), 15)
                lat.append((time.perf_counter() - t0) * 1000)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                outcomes[f"error {type(exc).__name__}: {str(exc)[:60]}"] += 1
                if writer is not None:
                    writer.close()
                return
            outcomes[f"HTTP {status}"] += 1
            if status == 200:
                conns.append((reader, writer, host))
            else:
                writer.close()

    await asyncio.gather(*(one(i) for i in range(n)))
    return conns, outcomes, lat


async def sample_requests(conns: list, k: int, parallel: int) -> Counter:
    sem = asyncio.Semaphore(parallel)
    out: Counter = Counter()

    async def one(c) -> None:
        reader, writer, host = c
        async with sem:
            try:
                status = await asyncio.wait_for(_get(reader, writer, host), 15)
                out[f"HTTP {status}"] += 1
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                out[f"error {type(exc).__name__}: {str(exc)[:60]}"] += 1

    await asyncio.gather(*(one(c) for c in random.sample(conns, min(k, len(conns)))))
    return out


def run_async(coro):
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


# ====================================================================== reporting
def mem(pid: int) -> str:
    try:
        m = bl.rss_kib(pid)
    except OSError:
        return "gone"
    return f"RSS {m['VmRSS'] / 1024:,.1f} MiB (peak {m['VmHWM'] / 1024:,.1f}), {bl.fd_count(pid):,} fds"


def stored_captures(web_addr: str) -> str:
    try:
        with urllib.request.urlopen(
            f"http://{web_addr}/api/requests/http?limit=1&summary=true", timeout=10
        ) as r:
            data = json.load(r)
        return f"{data.get('stored', '?'):,} captures held"
    except (OSError, ValueError) as exc:
        return f"captures: {exc}"


# ============================================================================ parts
def part_scale(reg: Registry, args, edge, nginx: int, out: list[str]) -> None:
    from tests.procs import host_of, start_agent

    per_agent = -(-args.tunnels // args.agents)
    agents = []
    t0 = time.monotonic()
    for a in range(args.agents):
        names = range(a * per_agent, min(args.tunnels, (a + 1) * per_agent))
        cfg = reg.tmp / f"agent-{a}.yml"
        lines = ["version: 3", "agent:", "  pool_size: 16", "tunnels:"]
        for i in names:
            lines += [f"  t{i:05d}:", "    proto: http", f"    addr: {LOCAL}:{nginx}"]
        cfg.write_text("\n".join(lines) + "\n")
        proc = start_agent(
            edge, "agent", f"--config={cfg}", home=reg.tmp / f"home-{a}", check=False
        )
        reg.add(proc)
        agents.append(proc)
    hosts: list[str] = []
    for proc in agents:
        proc.ready = proc.wait_event("ready", args.ready_timeout)
        hosts += [host_of(t["public_url"]) for t in proc.ready["tunnels"]]
    started = time.monotonic() - t0
    line = (
        f"{len(hosts):,} tunnels online in {started:.1f} s "
        f"({args.agents} agent processes, {per_agent} tunnels each)"
    )
    bl.log(line)
    out.append(f"- {line}")
    out.append(f"- edge after start: {mem(edge.pid)}")

    async def go() -> None:
        port = edge.http_addr[1]
        t1 = time.monotonic()
        conns, outcomes, lat = await open_connections(
            port, hosts, args.conns, args.parallel, time.monotonic() + args.max_seconds
        )
        took = time.monotonic() - t1
        lat.sort()
        p50 = lat[len(lat) // 2] if lat else 0
        p99 = lat[int(len(lat) * 0.99)] if lat else 0
        ok = len(conns)
        line = (
            f"{ok:,} of {args.conns:,} connections open with one GET done each, in {took:.1f} s "
            f"(GET p50 {p50:.1f} ms, p99 {p99:.1f} ms); outcomes: {dict(outcomes)}"
        )
        bl.log(line)
        out.append(f"- {line}")
        bl.log(f"idle {args.idle:g} s ...")
        await asyncio.sleep(args.idle)
        out.append(f"- edge with {ok:,} idle keep-alive connections: {mem(edge.pid)}")
        for i, a in enumerate(agents):
            out.append(f"- agent {i} ({len(a.ready['tunnels'])} tunnels): {mem(a.pid)}")
        res = await sample_requests(conns, args.sample, args.parallel)
        line = (
            f"second GET on a random sample of {min(args.sample, ok)} open connections: {dict(res)}"
        )
        bl.log(line)
        out.append(f"- {line}")
        for _, w, _ in conns:
            w.close()
        await asyncio.sleep(2)
        out.append(f"- edge after closing them: {mem(edge.pid)}")

    run_async(go())
    for proc in agents:
        reg.remove(proc)


def part_memory(reg: Registry, args, edge, nginx: int, out: list[str]) -> None:
    from tests.procs import host_of, start_agent

    flags = ["--inspect-db-size", str(args.inspect_db_size)]
    agent = start_agent(edge, "http", f"{LOCAL}:{nginx}", *flags, home=reg.tmp / "home-mem")
    reg.add(agent)
    host = host_of(agent.public_url)
    port = edge.http_addr[1]
    web = agent.ready["web_addr"]
    bound = 50 * 1_000_000 if args.inspect_db_size == 0 else args.inspect_db_size
    # the store's own constant is 50 * 1024 * 1024; use it when importable
    try:
        from backend.agent.inspect import resolve_db_size

        bound = resolve_db_size(args.inspect_db_size)
    except ImportError:
        pass
    goal = bound + GOAL_SLACK
    out.append(
        f"- inspect_db_size {bound / MiB:,.0f} MiB; goal RSS ≤ {goal / MiB:,.0f} MiB "
        f"(bound + 80 MB)"
    )
    out.append(f"- agent at start: {mem(agent.pid)}")
    bl.log(out[-1])
    if args.big_requests:
        w = bl.wrk(
            reg,
            port,
            "/1m",
            host=host,
            threads=1,
            conns=4,
            seconds=120,
            max_requests=args.big_requests,
        )
        line = f"- after {w.requests:,} x 1 MiB GETs ({w.mbps:,.0f} MB/s): {mem(agent.pid)}, {stored_captures(web)}"
        out.append(line)
        bl.log(line)
    done = 0
    t0 = time.monotonic()
    while done < args.requests and time.monotonic() - t0 < args.max_memory_seconds:
        chunk = min(args.chunk, args.requests - done)
        left = args.max_memory_seconds - (time.monotonic() - t0)
        w = bl.wrk(
            reg,
            port,
            "/small",
            host=host,
            threads=2,
            conns=32,
            seconds=max(1, left),
            max_requests=chunk,
        )
        done += w.requests
        errs = w.errors + w.status_errors
        line = (
            f"- after {done:,} small GETs ({w.rps:,.0f} req/s{f', {errs} errors' if errs else ''}): "
            f"{mem(agent.pid)}, {stored_captures(web)}"
        )
        out.append(line)
        bl.log(line)
    rss = bl.rss_kib(agent.pid)
    verdict = "met" if rss["VmRSS"] * 1024 <= goal else "NOT met"
    out.append(
        f"- **agent memory goal {verdict}**: RSS {rss['VmRSS'] / 1024:,.1f} MiB "
        f"(peak {rss['VmHWM'] / 1024:,.1f}) vs bound {bound / MiB:,.0f} MiB + 80 MB = "
        f"{goal / MiB:,.0f} MiB after {done:,} requests"
    )
    out.append(f"- edge at the end: {mem(edge.pid)}")


# ============================================================================== main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tunnels", type=int, default=1000)
    ap.add_argument("--agents", type=int, default=2, help="agent processes sharing the tunnels")
    ap.add_argument("--conns", type=int, default=10_000, help="open connections to hold")
    ap.add_argument("--parallel", type=int, default=200, help="connections being opened at once")
    ap.add_argument("--idle", type=float, default=5, help="seconds to leave them idle")
    ap.add_argument("--sample", type=int, default=500, help="open connections to GET again")
    ap.add_argument("--max-seconds", type=float, default=120, help="time cap for opening them")
    ap.add_argument("--ready-timeout", type=float, default=180)
    ap.add_argument("--requests", type=int, default=200_000, help="small GETs for part 2")
    ap.add_argument("--million", action="store_true", help="--requests 1000000")
    ap.add_argument("--chunk", type=int, default=100_000, help="GETs between RSS readings")
    ap.add_argument("--big-requests", type=int, default=200, help="1 MiB GETs before them")
    ap.add_argument("--inspect-db-size", type=int, default=0, help="agent flag; 0 = 50 MB")
    ap.add_argument("--max-memory-seconds", type=float, default=900, help="time cap of part 2")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--no-install", action="store_true")
    args = ap.parse_args(argv)
    if args.million:
        args.requests = 1_000_000

    bl.install_signal_handlers()
    # up to 2 fds per tunnelled connection in the edge and the agents while they are busy
    soft, hard = bl.raise_nofile(4 * args.conns + 4096)
    bl.log(f"RLIMIT_NOFILE now soft {soft}, hard {hard}")
    if not args.no_install:
        bl.ensure_debian(["nginx", "wrk"])

    m = bl.machine_info()
    out = [
        f"burrow scale benchmark — {m['nproc']} CPUs ({m['cpu']}), {m['kernel']}, Python {m['python']}",
        f"RLIMIT_NOFILE for the edge, agents and this client: soft {soft}, hard {hard}",
    ]
    if soft < args.conns + 2000:
        out.append(
            f"(note: each idle tunnelled keep-alive connection holds 1 fd in the edge, so "
            f"{args.conns:,} connections need ~{args.conns:,}; the hard limit here is {hard:,} "
            f"and cannot be raised without CAP_SYS_RESOURCE)"
        )
    reg = Registry(prefix="burrow-scale-")
    try:
        from tests.procs import start_edge

        nginx = bl.start_nginx(reg, conns=args.conns + 2048)
        edge = start_edge(reg.tmp / "edge")
        reg.add(edge)
        if not args.skip_scale:
            out.append("")
            out.append(
                f"Part 1: one edge, {args.tunnels:,} tunnels, {args.conns:,} open connections"
            )
            part_scale(reg, args, edge, nginx, out)
        if not args.skip_memory:
            out.append("")
            out.append(f"Part 2: agent memory after {args.requests:,} requests, capture on")
            part_memory(reg, args, edge, nginx, out)
        print("\n".join(out))
        return 0
    except KeyboardInterrupt:
        bl.log("\ninterrupted; stopping everything")
        print("\n".join(out))
        return 130
    finally:
        reg.stop_all()


if __name__ == "__main__":
    sys.exit(main())
