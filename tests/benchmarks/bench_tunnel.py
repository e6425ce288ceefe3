"""Benchmark burrow's data path against direct access to the same upstream.

Run from the repository root:

    .venv/bin/python tests/benchmarks/bench_tunnel.py [--quick] [--rounds N] ...

It starts, all on 127.0.0.1 with port 0:
  * an upstream process (this file with ``--serve-upstream``): a small asyncio HTTP
    server answering ``/small`` with a fixed 13-byte body and ``/1m`` with 1 MiB, plus
    a threaded TCP sink that counts what it receives and, at EOF, answers the count;
  * a burrow edge and agents (one http tunnel, one tcp tunnel), via tests/procs.py.

Then it measures, interleaved round by round, direct vs through the tunnel:
  (a) small GET: req/s, p50 and p99 latency; 32 keep-alive connections, a fixed
      number of requests (also capped in time).  Load from ``wrk`` if it is on PATH
      (one thread; a Lua script stops it at the request count), else from an asyncio
      raw-socket client here (no pipelining).
  (b) 1 MiB GET throughput in MB/s (asyncio raw-socket client, a few connections).
  (c) TCP bulk upload in MB/s: N MiB sent through the sink with 4 MiB writes (the sink
      answers once it has counted N bytes, so no half-close is needed).

and prints the median of each over the rounds, with the ratio tunnel / direct.
Every process it started is stopped by pid at the end, also on Ctrl+C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SMALL_BODY = b"Hello, world!"  # 13 bytes
BIG_SIZE = 1024 * 1024
LOCAL = "127.0.0.1"
MB = 1_000_000  # throughput is reported in MB/s (10^6 bytes)


# =============================================================== the upstream process
class _HTTPServerProtocol(asyncio.Protocol):
    """Keep-alive HTTP/1.1 for GET only: /1m answers 1 MiB, anything else 13 bytes."""

    small = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
        % len(SMALL_BODY)
        + SMALL_BODY
    )
    big_head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\n\r\n" % BIG_SIZE
    )
    big_body = bytes(range(256)) * (BIG_SIZE // 256)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buf = bytearray()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    self.transport.close()
                return
            head = bytes(self.buf[:end])
            del self.buf[: end + 4]
            line = head.split(b"\r\n", 1)[0].split(b" ")
            path = line[1] if len(line) > 2 else b"/"
            if path == b"/1m":
                self.transport.write(self.big_head)
                self.transport.write(self.big_body)
            else:
                self.transport.write(self.small)
            if b"\r\nconnection: close" in head.lower():
                self.transport.close()
                return


def _sink_conn(conn: socket.socket) -> None:
    """Read an 8-byte length N, then N bytes; answer the count at once (no half-close:
    the reply must not depend on the tunnel propagating a FIN), then drain to EOF."""
    buf = bytearray(4 * 1024 * 1024)
    total = 0
    try:
        head = b""
        while len(head) < 8:
            chunk = conn.recv(8 - len(head))
            if not chunk:
                return
            head += chunk
        (expected,) = struct.unpack(">Q", head)
        while total < expected:
            n = conn.recv_into(buf)
            if not n:
                break
            total += n
        conn.sendall(struct.pack(">Q", total))
        while conn.recv_into(buf):
            pass
    except OSError:
        pass
    finally:
        conn.close()


def _sink_accept(lsock: socket.socket) -> None:
    while True:
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        threading.Thread(target=_sink_conn, args=(conn,), daemon=True).start()


def serve_upstream() -> None:
    """Entry point of the upstream child process: prints one JSON line with its ports."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        server = await loop.create_server(_HTTPServerProtocol, LOCAL, 0, backlog=1024)
        lsock = socket.socket()
        lsock.bind((LOCAL, 0))
        lsock.listen(128)
        threading.Thread(target=_sink_accept, args=(lsock,), daemon=True).start()
        ports = {
            "http_port": server.sockets[0].getsockname()[1],
            "sink_port": lsock.getsockname()[1],
        }
        print(json.dumps(ports), flush=True)
        await stop.wait()
        server.close()
        lsock.close()

    runner(main())


# ==================================================================== load generators
@dataclass
class Sample:
    requests: int
    seconds: float
    body_bytes: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mbps(self) -> float:
        return self.body_bytes / MB / self.seconds if self.seconds else 0.0


def _percentile(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return 0.0
    i = min(len(sorted_ns) - 1, max(0, round(q / 100 * len(sorted_ns)) - 1))
    return sorted_ns[i] / 1e6


async def _http_worker(
    port: int, request: bytes, quota: list[int], deadline: float, lat: list[int], out: dict
) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    buf = bytearray(BIG_SIZE + 65536)
    mv = memoryview(buf)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (LOCAL, port)), 5)
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
            if got != length:
                raise ConnectionError("pipelined bytes after the body")
            lat.append(time.perf_counter_ns() - t0)
            out["bytes"] += length
    except (OSError, TimeoutError, ValueError, IndexError) as exc:
        out["errors"] += 1
        out["last_error"] = str(exc)
    finally:
        sock.close()


async def _http_load(
    port: int, host: str, path: str, conns: int, total: int, max_seconds: float
) -> Sample:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bench\r\n\r\n".encode()
    quota = [total]
    lat: list[int] = []
    out = {"bytes": 0, "errors": 0}
    t0 = time.perf_counter()
    deadline = time.monotonic() + max_seconds
    await asyncio.wait_for(
        asyncio.gather(
            *(_http_worker(port, request, quota, deadline, lat, out) for _ in range(conns))
        ),
        max_seconds + 15,
    )
    elapsed = time.perf_counter() - t0
    lat.sort()
    if out["errors"]:
        print(
            f"    ! {out['errors']} connection errors, last: {out.get('last_error')}",
            file=sys.stderr,
        )
    return Sample(
        requests=len(lat),
        seconds=elapsed,
        body_bytes=out["bytes"],
        p50_ms=_percentile(lat, 50),
        p99_ms=_percentile(lat, 99),
        errors=out["errors"],
    )


def http_load(
    port: int, host: str, path: str, conns: int, total: int, max_seconds: float
) -> Sample:
    try:
        import uvloop

        return uvloop.run(_http_load(port, host, path, conns, total, max_seconds))
    except ImportError:
        return asyncio.run(_http_load(port, host, path, conns, total, max_seconds))


WRK_SCRIPT = r"""
-- Count responses; at the limit stop this thread and SIGINT our own process, so that
-- wrk's main thread wakes at once and reports the real duration (it otherwise sleeps
-- for all of -d).  Meant for one wrk thread (-t1).
local ffi = require("ffi")
ffi.cdef[[ int kill(int pid, int sig); int getpid(void); ]]
local limit = tonumber(os.getenv("BENCH_REQUESTS") or "0")
local count = 0
function response(status, headers, body)
  count = count + 1
  if count == limit then
    wrk.thread:stop()
    ffi.C.kill(ffi.C.getpid(), 2)
  end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d errors=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout + e.status))
end
"""


class Runner:
    """Owns every child process (by pid) and the temporary directories."""

    def __init__(self) -> None:
        self.procs: list = []  # BurrowProc or Popen
        self.tmp = tempfile.TemporaryDirectory(prefix="burrow-bench-")
        self.wrk_script = Path(self.tmp.name) / "count.lua"
        self.wrk_script.write_text(WRK_SCRIPT)

    def wrk(
        self, port: int, host: str, path: str, conns: int, total: int, max_seconds: float
    ) -> Sample:
        cmd = [
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{max(1, int(max_seconds))}s",
            "--timeout",
            "5s",
            "-s",
            str(self.wrk_script),
            "-H",
            f"Host: {host}",
            f"http://{LOCAL}:{port}{path}",
        ]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "BENCH_REQUESTS": str(total)},
            text=True,
        )
        self.procs.append(proc)
        try:
            out, err = proc.communicate(timeout=max_seconds + 15)
        finally:
            _stop_popen(proc)
            self.procs.remove(proc)
        line = next((ln for ln in out.splitlines() if ln.startswith("BENCH ")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no result: {out[-500:]} {err[-500:]}")
        kv = dict(item.split("=") for item in line.split()[1:])
        return Sample(
            requests=int(kv["requests"]),
            seconds=int(kv["duration_us"]) / 1e6,
            p50_ms=int(kv["p50_us"]) / 1000,
            p99_ms=int(kv["p99_us"]) / 1000,
            errors=int(kv["errors"]),
        )

    def start_upstream(self) -> dict:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-upstream"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("upstream process did not start")
        return json.loads(line)

    def stop_all(self) -> None:
        from tests.procs import BurrowProc

        for proc in reversed(self.procs):
            if isinstance(proc, BurrowProc):
                proc.stop()
            else:
                _stop_popen(proc)
        self.procs.clear()
        self.tmp.cleanup()


def _stop_popen(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def tcp_upload(port: int, total_mib: int, max_seconds: float) -> Sample:
    """Send ``total_mib`` MiB to the sink in 4 MiB writes; time until it confirms the count."""
    block = memoryview(os.urandom(4 * 1024 * 1024))
    blocks = max(1, total_mib // 4)
    total = blocks * len(block)
    deadline = time.monotonic() + max_seconds
    with socket.create_connection((LOCAL, port), timeout=10) as s:
        s.settimeout(max(1.0, max_seconds))
        t0 = time.perf_counter()
        s.sendall(struct.pack(">Q", total))
        sent = 0
        for _ in range(blocks):
            if time.monotonic() > deadline:
                break
            s.sendall(block)
            sent += len(block)
        reply = b""
        if sent == total:
            while len(reply) < 8:
                chunk = s.recv(8 - len(reply))
                if not chunk:
                    break
                reply += chunk
        elapsed = time.perf_counter() - t0
    received = struct.unpack(">Q", reply)[0] if len(reply) == 8 else 0
    errors = 0 if received == sent == total else 1
    if errors:
        print(f"    ! tcp: sent {sent} of {total}, sink counted {received}", file=sys.stderr)
    return Sample(requests=1, seconds=elapsed, body_bytes=received, errors=errors)


# ============================================================================ driver
@dataclass
class Path_:
    """One way to reach the upstream: direct, or through a tunnel."""

    name: str
    http_port: int
    http_host: str
    tcp_port: int


@dataclass
class Results:
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)

    def add(self, test: str, path: str, s: Sample) -> None:
        self.samples.setdefault((test, path), []).append(s)

    def median(self, test: str, path: str, attr: str) -> float:
        vals = [getattr(s, attr) for s in self.samples.get((test, path), [])]
        return statistics.median(vals) if vals else float("nan")

    def errors(self, test: str, path: str) -> int:
        return sum(s.errors for s in self.samples.get((test, path), []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=50000, help="small GETs per run")
    ap.add_argument("--conns", type=int, default=32, help="connections for small GETs")
    ap.add_argument("--big-requests", type=int, default=1000, help="1 MiB GETs per run")
    ap.add_argument("--big-conns", type=int, default=4, help="connections for 1 MiB GETs")
    ap.add_argument("--tcp-mib", type=int, default=512, help="MiB per TCP bulk run")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="time cap of each run")
    ap.add_argument("--no-wrk", action="store_true", help="use the Python client for small GETs")
    ap.add_argument(
        "--plain-data",
        action="store_true",
        help="also measure a tunnel whose agent uses --no-data-tls",
    )
    ap.add_argument(
        "--agent-args",
        default="",
        help='extra flags for the tunnel agents, e.g. "--inspect false"',
    )
    ap.add_argument("--quick", action="store_true", help="small counts, 1 round (smoke test)")
    args = ap.parse_args(argv)
    if args.serve_upstream:
        serve_upstream()
        return 0
    if args.quick:
        args.rounds, args.requests, args.big_requests, args.tcp_mib = 1, 2000, 20, 64

    def on_term(signum, frame):
        raise KeyboardInterrupt

    # Ctrl+C and SIGTERM both end the run through the same cleanup, even when this
    # process was started with SIGINT ignored (as background jobs of a script are).
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    runner = Runner()
    try:
        return _bench(runner, args)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        runner.stop_all()


def _bench(runner: Runner, args) -> int:
    from tests.procs import host_of, start_agent, start_edge

    use_wrk = shutil.which("wrk") is not None and not args.no_wrk
    tmp = Path(runner.tmp.name)
    up = runner.start_upstream()
    edge = start_edge(tmp / "edge")
    runner.procs.append(edge)

    def agent(proto: str, port: int, name: str, *flags: str):
        a = start_agent(edge, proto, str(port), *flags, home=tmp / f"home-{name}")
        runner.procs.append(a)
        return a.public_url

    paths = [Path_("direct", up["http_port"], f"{LOCAL}:{up['http_port']}", up["sink_port"])]
    edge_http_port = edge.http_addr[1]
    extra = tuple(shlex.split(args.agent_args))
    variants = [("tunnel", extra)]
    if args.plain_data:
        variants.append(("tunnel-plain", ("--no-data-tls", *extra)))
    for name, flags in variants:
        http_url = agent("http", up["http_port"], f"{name}-http", *flags)
        tcp_url = agent("tcp", up["sink_port"], f"{name}-tcp", *flags)
        paths.append(Path_(name, edge_http_port, host_of(http_url), int(tcp_url.rsplit(":", 1)[1])))

    small_client = "wrk (1 thread)" if use_wrk else "asyncio raw sockets"
    print(f"burrow data-path benchmark — {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    print(
        f"  (a) {args.requests} small GETs over {args.conns} keep-alive conns, load: {small_client}\n"
        f"  (b) {args.big_requests} x 1 MiB GETs over {args.big_conns} conns, load: asyncio raw sockets\n"
        f"  (c) {args.tcp_mib} MiB TCP upload into a sink, 4 MiB writes\n"
        f"  {args.rounds} interleaved rounds, medians reported; each run capped at {args.max_seconds:.0f}s"
    )
    for p in paths[1:]:
        print(f"  {p.name}: http Host {p.http_host} via :{p.http_port}, tcp :{p.tcp_port}")
    if extra:
        print(f"  agent flags: {' '.join(extra)}")

    def small(p: Path_, n: int) -> Sample:
        if use_wrk:
            return runner.wrk(p.http_port, p.http_host, "/small", args.conns, n, args.max_seconds)
        return http_load(p.http_port, p.http_host, "/small", args.conns, n, args.max_seconds)

    def big(p: Path_, n: int) -> Sample:
        return http_load(p.http_port, p.http_host, "/1m", args.big_conns, n, args.max_seconds)

    def bulk(p: Path_, mib: int) -> Sample:
        return tcp_upload(p.tcp_port, mib, args.max_seconds)

    tests = [
        ("small", small, args.requests),
        ("big", big, args.big_requests),
        ("tcp", bulk, args.tcp_mib),
    ]

    print("warming up ...", flush=True)
    for p in paths:
        small(p, min(2000, args.requests))
        big(p, min(8, args.big_requests))
        bulk(p, min(32, args.tcp_mib))

    res = Results()
    for rnd in range(1, args.rounds + 1):
        for test, fn, amount in tests:
            for p in paths:
                s = fn(p, amount)
                res.add(test, p.name, s)
                detail = (
                    f"{s.rps:9.0f} req/s  p50 {s.p50_ms:6.2f} ms  p99 {s.p99_ms:6.2f} ms"
                    if test == "small"
                    else f"{s.mbps:9.1f} MB/s"
                )
                print(
                    f"  round {rnd}  {test:5}  {p.name:12} {detail}  "
                    f"({s.requests} done in {s.seconds:.2f}s, {s.errors} errors)",
                    flush=True,
                )

    _print_table(res, [p.name for p in paths], args)
    total_errors = sum(res.errors(t, p.name) for t, _, _ in tests for p in paths)
    return 1 if total_errors else 0


def _print_table(res: Results, names: list[str], args) -> None:
    rows = [
        (f"small GET req/s ({args.conns} conns)", "small", "rps", "{:,.0f}"),
        ("small GET p50 latency ms", "small", "p50_ms", "{:.2f}"),
        ("small GET p99 latency ms", "small", "p99_ms", "{:.2f}"),
        (f"1 MiB GET MB/s ({args.big_conns} conns)", "big", "mbps", "{:,.1f}"),
        (f"TCP bulk MB/s ({args.tcp_mib} MiB)", "tcp", "mbps", "{:,.1f}"),
    ]
    others = names[1:]
    header = [f"metric (median of {args.rounds})", "direct"]
    for n in others:
        header += [n, f"{n}/direct"]
    table = [header]
    for label, test, attr, fmt in rows:
        d = res.median(test, "direct", attr)
        line = [label, fmt.format(d)]
        for n in others:
            v = res.median(test, n, attr)
            line += [fmt.format(v), f"{v / d:.2f}x" if d else "-"]
        table.append(line)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    print()
    for i, r in enumerate(table):
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        print("| " + " | ".join(cells) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print()


if __name__ == "__main__":
    sys.exit(main())
