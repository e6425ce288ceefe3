"""HTTPS handshakes with ACME certificates vs the local CA (issue 16).

    .venv/bin/python tests/benchmarks/bench_acme.py [--names 5] [--seconds 3]

Starts pebble and pebble-challtestsrv (Debian's ``pebble`` package) and an edge with
``--acme-directory``, exactly as tests/e2e/test_acme.py does, creates ``--names`` https
cloud endpoints and measures, from one client on 127.0.0.1:

- the first handshake for a new name that an endpoint holds: the order with pebble
  (TLS-ALPN-01 against the edge's own listener, PEBBLE_VA_NOSLEEP=1) happens inside it;
- the first handshake for a new name served by the local CA (a name nobody holds: the
  edge issues a leaf from ``ca.pem`` in the handshake);
- handshakes per second for a cached name, ACME and local CA, sequential full
  handshakes (no session resumption) for ``--seconds`` each.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.e2e.test_acme import _HELLO, _start_env  # noqa: E402


def handshake(port: int, name: str) -> float:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as raw, ctx.wrap_socket(raw, server_hostname=name):
        pass
    return time.perf_counter() - t


def rate(port: int, name: str, seconds: float) -> tuple[float, float]:
    """(handshakes per second, p50 ms) over ``seconds``."""
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end and len(times) < 100_000:
        times.append(handshake(port, name))
    return len(times) / sum(times), statistics.median(times) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-acme-") as tmp:
        env = _start_env(Path(tmp), "--acme-rate-limit", "0")
        try:
            port = env.https_port
            names = [f"bench{i}.example.localhost" for i in range(args.names)]
            for n in names:
                r = env.api.post("/endpoints", json={"url": f"https://{n}", "type": "cloud", "traffic_policy": json.dumps(_HELLO)})
                assert r.status_code == 201, r.text
            acme_first = [handshake(port, n) * 1000 for n in names]
            local_first = [handshake(port, f"local{i}.burrow.localhost") * 1000 for i in range(max(args.names, 20))]
            acme_rate, acme_p50 = rate(port, names[0], args.seconds)
            local_rate, local_p50 = rate(port, "local0.burrow.localhost", args.seconds)
        finally:
            env.close()
    print("| handshake | ACME (pebble) | local CA |")
    print("|---|---|---|")
    print(f"| first for a new name, median ms | {statistics.median(acme_first):.1f} (order inside) | {statistics.median(local_first):.2f} |")
    print(f"| cached name, p50 ms | {acme_p50:.2f} | {local_p50:.2f} |")
    print(f"| cached name, handshakes/s (one client) | {acme_rate:,.0f} | {local_rate:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
