"""Traffic policy cost: a cloud endpoint with a three-rule policy vs a plain agent endpoint.

    .venv/bin/python tests/benchmarks/bench_policy.py [--rounds 3] [--seconds 5]

Both paths end at the same upstream.  The plain path is client → edge → agent; the
policy path is client → edge (restrict-ips, add-headers with a CEL interpolation, and
forward-internal to the agent's ``.internal`` endpoint) → agent.  Load comes from wrk
(``apt-get install -y wrk``), 32 connections, bounded by time; loopback only.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.procs import host_of, start_agent, start_edge  # noqa: E402

UPSTREAM = r"""
import asyncio, uvloop
resp = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\nhello, world\n"
class P(asyncio.Protocol):
    def connection_made(self, t): self.t, self.buf = t, b""
    def data_received(self, d):
        self.buf += d
        while b"\r\n\r\n" in self.buf:
            _, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.t.write(resp)
async def main():
    s = await asyncio.get_running_loop().create_server(P, "127.0.0.1", 0)
    print(s.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)
uvloop.run(main())
"""

POLICY = """
on_http_request:
  - name: only-loopback
    actions:
      - type: restrict-ips
        config: {allow: [127.0.0.0/8]}
  - name: tag
    expressions: ["req.method == 'GET'"]
    actions:
      - type: add-headers
        config: {headers: {x-client: "${conn.client_ip}"}}
  - name: to-the-app
    actions:
      - type: forward-internal
        config: {url: "https://bench.internal"}
"""


def wrk(url: str, host: str, seconds: int) -> tuple[float, float]:
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", "--latency", "-H", f"Host: {host}", url],
        capture_output=True, text=True, timeout=seconds + 30, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"{errors.group(1)} failed responses through {host}")
    return rps, float(p99.group(1)) * scale


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install -y wrk")
    import ngrok

    tmp = Path(tempfile.mkdtemp(prefix="burrow-bench-policy-"))
    procs = []
    up = subprocess.Popen([sys.executable, "-c", UPSTREAM], stdout=subprocess.PIPE, text=True)
    try:
        port = up.stdout.readline().strip()
        edge = start_edge(tmp / "edge")
        procs.append(edge)
        plain = start_agent(edge, "http", port, home=tmp / "h1")
        procs.append(plain)
        internal = start_agent(edge, "http", port, "--url", "https://bench.internal", home=tmp / "h2")
        procs.append(internal)
        client = ngrok.Client("test-api-key", base_url=edge.ready["api_url"])
        client.endpoints.create(url="http://policy.burrow.localhost", type="cloud", traffic_policy=POLICY)
        base = edge.ready["http_url"]
        results: dict[str, list[tuple[float, float]]] = {"agent endpoint, no policy": [], "cloud endpoint, 3 rules": []}
        for r in range(args.rounds):
            for name, host in (
                ("agent endpoint, no policy", host_of(plain.public_url)),
                ("cloud endpoint, 3 rules", "policy.burrow.localhost"),
            ):
                rps, p99 = wrk(base + "/", host, args.seconds)
                results[name].append((rps, p99))
                print(f"round {r + 1}  {name:<28} {rps:>9,.0f} req/s  p99 {p99:.2f} ms", flush=True)
        base_rps = statistics.median(x for x, _ in results["agent endpoint, no policy"])
        print(f"\n| path (median of {args.rounds}, -c32) | req/s | p99 ms | vs no policy |")
        print("|---|---:|---:|---:|")
        for name, rows in results.items():
            rps = statistics.median(x for x, _ in rows)
            p99 = statistics.median(y for _, y in rows)
            print(f"| {name} | {rps:,.0f} | {p99:.2f} | {rps / base_rps:.2f}x |")
    finally:
        for p in reversed(procs):
            p.stop()
        up.terminate()
        up.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
