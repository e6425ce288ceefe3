"""CPU time per MB of burrow's edge and agent on a TCP tunnel (and 1 MiB GETs), for
TLS and plain data connections, this tree against an older checkout, interleaved.

    python tests/benchmarks/bench_tlscpu.py [--base DIR] [--mib 256] [--rounds 3]

CPU time (utime + stime of every thread, from /proc/PID/stat) per MB moved is what a
shared, noisy machine disturbs least; MB/s is printed too ("small": ms per 1000 small
GETs over 8 keep-alive connections, i.e. µs per request, and thousands of requests/s;
"churn": the same per short TCP connection, 4 at a time, each a new data connection).  Upload: a client sends N MiB
through the tunnel to a sink on 127.0.0.1; download: a source sends N MiB to the
client; get: N one-MiB GETs over 4 keep-alive connections (a threaded upstream).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.procs import host_of, start_agent, start_edge  # noqa: E402

LOCAL = "127.0.0.1"
BLOCK = memoryview(os.urandom(1024 * 1024))
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _serve(lsock: socket.socket, handle) -> None:
    while True:
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _sink(conn: socket.socket) -> None:
    """Read to EOF, then answer b"ok" (the client half-closes)."""
    buf = bytearray(1 << 20)
    with conn:
        while conn.recv_into(buf):
            pass
        conn.sendall(b"ok")


def _source(conn: socket.socket) -> None:
    """Read the MiB count (4 bytes), send that many MiB, close."""
    with conn:
        n = int.from_bytes(conn.recv(4), "big")
        for _ in range(n):
            conn.sendall(BLOCK)


def _http(conn: socket.socket) -> None:
    """Keep-alive GETs answered with 1 MiB (/small: 13 bytes)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BLOCK)
    small = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nHello, world!"
    buf = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            req, buf = buf.split(b"\r\n\r\n", 1)
            if req.startswith(b"GET /small "):
                conn.sendall(small)
                continue
            conn.sendall(head)
            conn.sendall(BLOCK)


def listen(handle) -> int:
    s = socket.create_server((LOCAL, 0))
    threading.Thread(target=_serve, args=(s, handle), daemon=True).start()
    return s.getsockname()[1]


def upload(port: int, mib: int) -> int:
    with socket.create_connection((LOCAL, port)) as s:
        for _ in range(mib):
            s.sendall(BLOCK)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(2) == b"ok"
    return mib * len(BLOCK)


def download(port: int, mib: int) -> int:
    got = 0
    buf = bytearray(1 << 20)
    with socket.create_connection((LOCAL, port)) as s:
        s.sendall(mib.to_bytes(4, "big"))
        while n := s.recv_into(buf):
            got += n
    assert got == mib * len(BLOCK), got
    return got


def gets(port: int, host: str, count: int, conns: int = 4) -> int:
    total = [0]

    def one(k: int) -> None:
        buf = bytearray(1 << 20)
        with socket.create_connection((LOCAL, port)) as s:
            for _ in range(k):
                s.sendall(b"GET /1m HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")
                data = b""
                while b"\r\n\r\n" not in data:
                    data += s.recv(4096)
                head, rest = data.split(b"\r\n\r\n", 1)
                assert b" 200 " in head.split(b"\r\n", 1)[0], head
                left = len(BLOCK) - len(rest)
                while left > 0:
                    n = s.recv_into(buf, min(left, len(buf)))
                    assert n
                    left -= n
                total[0] += len(BLOCK)

    ts = [threading.Thread(target=one, args=(count // conns,)) for _ in range(conns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return total[0]


class _SDK:
    """ngrok's Python SDK forwarding to ``addr`` through ``edge`` (the "agent" here)."""

    def __init__(self, edge, proto: str, addr: str) -> None:
        sdk = os.environ.get("BURROW_NGROK_SDK", str(ROOT / ".sdk"))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "e2e" / "ngrok_sdk_driver.py"),
                addr,
                "test-authtoken",
                edge.ready["ingress_addr"],
                edge.ready["ca_file"],
                proto,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={"PYTHONPATH": sdk, "PATH": os.environ.get("PATH", "")},
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else b""
        self.public_url = json.loads(line or b"{}").get("url")
        if not self.public_url:
            self.stop()
            raise SystemExit(f"the SDK did not forward {proto}: {line!r}")
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def churn(port: int, count: int, conns: int = 4) -> int:
    """``count`` short TCP connections (connect, half-close, read the sink's b"ok"),
    ``conns`` at a time: each takes a fresh data connection from the pool."""

    def one(k: int) -> None:
        for _ in range(k):
            with socket.create_connection((LOCAL, port)) as s:
                s.shutdown(socket.SHUT_WR)
                assert s.recv(2) == b"ok"

    ts = [threading.Thread(target=one, args=(count // conns,)) for _ in range(conns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return count // conns * conns


def smalls(port: int, host: str, count: int, conns: int = 8) -> int:
    """``count`` small GETs over ``conns`` keep-alive connections; returns the count."""
    req = b"GET /small HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n"

    def one(k: int) -> None:
        with socket.create_connection((LOCAL, port)) as s:
            for _ in range(k):
                s.sendall(req)
                data = b""
                while not data.endswith(b"Hello, world!"):
                    chunk = s.recv(4096)
                    assert chunk
                    data += chunk
                assert b" 200 " in data.split(b"\r\n", 1)[0], data

    ts = [threading.Thread(target=one, args=(count // conns,)) for _ in range(conns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return count // conns * conns


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, help="a checkout of an older commit to compare with")
    ap.add_argument("--mib", type=int, default=256, help="MiB per transfer")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tests", default="up,down,get", help="up,down,get,small,churn")
    ap.add_argument("--small", type=int, default=8000, help="small GETs per run")
    ap.add_argument("--plain", action="store_true", help="also plain data connections (this tree)")
    ap.add_argument(
        "--tls", action=argparse.BooleanOptionalAction, default=True, help="burrow agents over TLS"
    )
    ap.add_argument(
        "--sdk", action="store_true", help="also ngrok's Python SDK (and against --base's edge)"
    )
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="burrow-tlscpu-"))
    ports = {"up": listen(_sink), "down": listen(_source), "get": listen(_http)}
    ports["small"] = ports["get"]
    ports["churn"] = ports["up"]
    procs = []
    paths: dict[str, tuple] = {}
    variants = []
    if args.tls:
        variants.append(("tls", None, ("--data-tls",)))
        if args.base:
            variants.append(("tls-base", args.base, ("--data-tls",)))
    if args.plain:
        variants.append(("plain", None, ("--no-data-tls",)))
    if args.sdk:
        variants.append(("sdk", None, None))
        if args.base:
            variants.append(("sdk-base", args.base, None))
    try:
        for name, root, flags in variants:
            edge = start_edge(tmp / f"edge-{name}", root=root)
            procs.append(edge)
            agents = {}
            for test in ("up", "down"):
                if flags is None:
                    a = _SDK(edge, "tcp", f"{LOCAL}:{ports[test]}")
                else:
                    a = start_agent(
                        edge,
                        "tcp",
                        f"{LOCAL}:{ports[test]}",
                        *flags,
                        home=tmp / f"h-{name}-{test}",
                        root=root,
                    )
                procs.append(a)
                agents[test] = (a, int(a.public_url.rsplit(":", 1)[1]), None)
            agents["churn"] = agents["up"]
            if flags is None:
                a = _SDK(edge, "http", f"{LOCAL}:{ports['get']}")
            else:
                a = start_agent(
                    edge,
                    "http",
                    f"{LOCAL}:{ports['get']}",
                    *flags,
                    home=tmp / f"h-{name}-get",
                    root=root,
                )
            procs.append(a)
            agents["get"] = agents["small"] = (a, edge.http_addr[1], host_of(a.public_url))
            paths[name] = (edge, agents)
        results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        tests = args.tests.split(",")
        for rnd in range(args.rounds):
            order = list(paths)[rnd % len(paths) :] + list(paths)[: rnd % len(paths)]
            for test in tests:
                for name in order:
                    edge, agents = paths[name]
                    agent, port, host = agents[test]
                    c0 = (cpu_s(edge.pid), cpu_s(agent.pid))
                    t0 = time.perf_counter()
                    if test == "up":
                        n = upload(port, args.mib)
                    elif test == "down":
                        n = download(port, args.mib)
                    elif test == "small":
                        n = smalls(port, host, args.small)
                    elif test == "churn":
                        n = churn(port, args.small // 10)
                    else:
                        n = gets(port, host, max(4, args.mib // 2))
                    dt = time.perf_counter() - t0
                    e, g = cpu_s(edge.pid) - c0[0], cpu_s(agent.pid) - c0[1]
                    mb = n / 1e6 if test not in ("small", "churn") else n / 1000  # per 1000
                    results.setdefault((test, name), []).append(
                        (mb / dt, e * 1e3 / mb, g * 1e3 / mb)
                    )
                    print(
                        f"  round {rnd + 1} {test:4} {name:8} {mb / dt:8.0f} MB/s  edge {e * 1e3 / mb:5.2f} ms/MB  agent {g * 1e3 / mb:5.2f} ms/MB",
                        flush=True,
                    )
        print("\n| test | path | MB/s | edge CPU ms/MB | agent CPU ms/MB | sum |")
        print("|---|---|---:|---:|---:|---:|")
        for test in tests:
            for name in paths:
                rs = results[(test, name)]
                m = [statistics.median(x[i] for x in rs) for i in range(3)]
                print(
                    f"| {test} | {name} | {m[0]:,.0f} | {m[1]:.2f} | {m[2]:.2f} | {m[1] + m[2]:.2f} |"
                )
    finally:
        for p in procs:
            p.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
