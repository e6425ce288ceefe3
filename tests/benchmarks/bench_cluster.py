"""Benchmark the peer path of a cluster against the local path, in one run.

Run from the repository root (needs PostgreSQL's binaries, as the cluster tests do):

    .venv/bin/python tests/benchmarks/bench_cluster.py [--rounds N] [--quick]

It starts, all on loopback with port 0: a PostgreSQL server (tests/pg.py), two edges
on it (``burrow serve --store postgresql://...``; edge 1 on 127.0.0.2, edge 2 on
127.0.0.3, tests/cluster/harness.py), the upstream of bench_tunnel.py (``/small``: 13
bytes, ``/1m``: 1 MiB) and one agent on edge 2 (``--ha-connections 1``, so that it has
no session on edge 1, and ``--inspect false``: the agent's work is the same on both
paths and only adds noise).  Then, interleaved round by round:

* **local**: the client sends to edge 2, which holds the agent's session;
* **peer**: the client sends to edge 1, which forwards each public connection to edge 2
  over the peer link (one connection per public connection, spliced).

Per path: latency at one keep-alive connection (p50/p99 of sequential small GETs),
small GET req/s at 32 connections, 1 MiB GET MB/s at 4 connections (each a fixed
number of requests, also capped in time), and the CPU time (utime + stime from
/proc/PID/stat of both edges and the agent) per request, which the other load on a
shared machine disturbs less than the rates.  It prints the medians and the ratios
peer / local (goals of issue 17: added latency at most +150 µs, small req/s and 1 MiB
MB/s at least 0.6×).  Every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BIG_SIZE = 1024 * 1024
MB = 1_000_000
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    requests: int
    seconds: float
    body_bytes: int
    p50_us: float
    p99_us: float
    errors: int
    cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mbps(self) -> float:
        return self.body_bytes / MB / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_req(self) -> float:
        return self.cpu_s * 1e6 / self.requests if self.requests else 0.0


def _pct(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return 0.0
    i = min(len(sorted_ns) - 1, max(0, round(q / 100 * len(sorted_ns)) - 1))
    return sorted_ns[i] / 1e3


async def _worker(addr: tuple[str, int], request: bytes, quota: list[int], deadline: float, lat: list[int], out: dict):
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    buf = bytearray(BIG_SIZE + 65536)
    mv = memoryview(buf)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, addr), 5)
        while quota[0] > 0 and time.monotonic() < deadline:
            quota[0] -= 1
            t0 = time.perf_counter_ns()
            await loop.sock_sendall(sock, request)
            have = 0
            while True:
                n = await loop.sock_recv_into(sock, mv[have:])
                if not n:
                    raise ConnectionError("server closed the connection")
                have += n
                end = buf.find(b"\r\n\r\n", 0, have)
                if end >= 0:
                    break
                if have > 65536:
                    raise ConnectionError("response head too large")
            head = bytes(buf[:end]).lower()
            if not head.startswith(b"http/1.1 200"):
                raise ConnectionError(f"bad response {head[:60]!r}")
            length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            got = have - end - 4
            while got < length:
                n = await loop.sock_recv_into(sock, mv[: min(length - got, len(mv))])
                if not n:
                    raise ConnectionError("server closed inside the body")
                got += n
            lat.append(time.perf_counter_ns() - t0)
            out["bytes"] += length
    except (OSError, TimeoutError, ValueError, IndexError) as exc:
        out["errors"] += 1
        out["last_error"] = str(exc)
    finally:
        sock.close()


def load(addr: tuple[str, int], host: str, path: str, conns: int, total: int, max_seconds: float) -> Sample:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bench-cluster\r\n\r\n".encode()

    async def run() -> Sample:
        quota, lat, out = [total], [], {"bytes": 0, "errors": 0}
        deadline = time.monotonic() + max_seconds
        t0 = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(*(_worker(addr, request, quota, deadline, lat, out) for _ in range(conns))),
            max_seconds + 15,
        )
        elapsed = time.perf_counter() - t0
        lat.sort()
        if out["errors"]:
            print(f"    ! {out['errors']} connection errors, last: {out.get('last_error')}", file=sys.stderr)
        return Sample(len(lat), elapsed, out["bytes"], _pct(lat, 50), _pct(lat, 99), out["errors"])

    try:
        import uvloop

        return uvloop.run(run())
    except ImportError:
        return asyncio.run(run())


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / TICK


def measured(pids: list[int], fn) -> Sample:
    c0 = cpu_seconds(pids)
    s = fn()
    s.cpu_s = cpu_seconds(pids) - c0
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer requests per measurement")
    args = ap.parse_args(argv)
    scale = 0.25 if args.quick else 1.0
    n_lat, n_small, n_big = int(2000 * scale), int(20000 * scale), int(400 * scale)

    from tests.cluster.harness import Cluster
    from tests.pg import PostgresServer
    from tests.procs import host_of

    pg = PostgresServer()
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    up = None
    cluster = None
    try:
        up = subprocess.Popen(
            [sys.executable, str(ROOT / "tests/benchmarks/bench_tunnel.py"), "--serve-upstream"],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        ports = json.loads(up.stdout.readline())
        cluster = Cluster(pg.new_database(), root, n=2).start()
        agent = cluster.agent(1, "http", str(ports["http_port"]), "--ha-connections", "1", "--inspect", "false",
                              home=root / "agent")
        host = host_of(agent.public_url)
        pids = [cluster.edge(0).pid, cluster.edge(1).pid, agent.pid]
        paths = {"local": cluster.http_addr(1), "peer": cluster.http_addr(0)}
        for name, addr in paths.items():  # warm up both (peer connections, pools)
            s = load(addr, host, "/small", 4, 400, 10)
            assert s.errors == 0 and s.requests == 400, f"{name}: {s}"
        res: dict[str, dict[str, list[Sample]]] = {p: {"lat": [], "small": [], "big": []} for p in paths}
        for rnd in range(args.rounds):
            order = list(paths) if rnd % 2 == 0 else list(reversed(paths))
            for name in order:
                addr = paths[name]
                res[name]["lat"].append(measured(pids, lambda a=addr: load(a, host, "/small", 1, n_lat, 20)))
                res[name]["small"].append(measured(pids, lambda a=addr: load(a, host, "/small", 32, n_small, 20)))
                res[name]["big"].append(measured(pids, lambda a=addr: load(a, host, "/1m", 4, n_big, 20)))
                r = res[name]
                print(
                    f"round {rnd + 1} {name:5}: c1 p50 {r['lat'][-1].p50_us:7.0f} µs  "
                    f"small {r['small'][-1].rps:8.0f} req/s  1 MiB {r['big'][-1].mbps:7.0f} MB/s  "
                    f"cpu {r['small'][-1].cpu_us_per_req:6.0f} µs/req",
                    file=sys.stderr,
                    flush=True,
                )

        def med(name: str, kind: str, attr: str) -> float:
            return statistics.median(getattr(s, attr) for s in res[name][kind])

        rows = [
            ("latency c=1 p50 (µs)", "lat", "p50_us"),
            ("latency c=1 p99 (µs)", "lat", "p99_us"),
            ("small GET req/s (c=32)", "small", "rps"),
            ("small GET p99 (µs, c=32)", "small", "p99_us"),
            ("1 MiB GET MB/s (c=4)", "big", "mbps"),
            ("CPU µs per small GET (edges + agent)", "small", "cpu_us_per_req"),
            ("CPU µs per 1 MiB GET (edges + agent)", "big", "cpu_us_per_req"),
        ]
        print(f"\nbench_cluster: {args.rounds} interleaved rounds, medians; agent on edge 2, "
              f"local = client on edge 2, peer = client on edge 1\n")
        print(f"| {'measure':<38} | {'local':>10} | {'peer':>10} | {'peer / local':>12} |")
        print(f"|{'-' * 40}|{'-' * 11}:|{'-' * 11}:|{'-' * 13}:|")
        for label, kind, attr in rows:
            lo, pe = med("local", kind, attr), med("peer", kind, attr)
            print(f"| {label:<38} | {lo:>10,.0f} | {pe:>10,.0f} | {pe / lo if lo else 0:>11.2f}× |")
        added = med("peer", "lat", "p50_us") - med("local", "lat", "p50_us")
        print(f"\nadded latency (p50, one connection): {added:+.0f} µs (goal ≤ +150 µs)")
        print(f"small req/s peer / local: {med('peer', 'small', 'rps') / med('local', 'small', 'rps'):.2f}× (goal ≥ 0.6×)")
        print(f"1 MiB MB/s peer / local: {med('peer', 'big', 'mbps') / med('local', 'big', 'mbps'):.2f}× (goal ≥ 0.6×)")
        return 0
    finally:
        if cluster is not None:
            cluster.close()
        if up is not None:
            up.terminate()
            try:
                up.wait(10)
            except subprocess.TimeoutExpired:
                up.kill()
        pg.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
