"""CPU per round trip of small messages over one connection in one process: plain TCP,
backend/tlshalf.py's TLS, and uvloop's own TLS transport (uvloop, 127.0.0.1).

    python tests/benchmarks/bench_tlspingpong.py [ROOT] [N] [KINDS]

ROOT is the checkout whose ``backend`` is imported (default: this one), N the round
trips (20,000), KINDS a comma list of plain, half, uvtls.  On a shared machine the CPU
time is noisy; instruction counts are not.  Per round trip, by difference of two runs:

    for n in 300 1300; do valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python tests/benchmarks/bench_tlspingpong.py . $n half 2>&1 | grep Collected; done

(instructions per round trip = (second - first) / 1000).
"""

import asyncio
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2]).resolve()
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from backend import tlshalf  # noqa: E402
from backend.tls import LocalCA, client_context  # noqa: E402

HOST = "abc.burrow.localhost"
MSG = b"x" * 200


async def pair(kind: str, ca: LocalCA):
    loop = asyncio.get_running_loop()
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)
    port = lsock.getsockname()[1]
    accepted = asyncio.ensure_future(loop.sock_accept(lsock))
    if kind == "half":
        ctx = tlshalf.data_context(client_context(ca.ca_file))
        client = asyncio.ensure_future(tlshalf.open_connection("127.0.0.1", port, ctx, HOST, 2**16))
        sock, _ = await accepted
        server = await tlshalf.accept(sock, ca.server_context([HOST]), 2**16, 5)
    elif kind == "uvtls":
        ctx = client_context(ca.ca_file)
        client = asyncio.ensure_future(asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=HOST))
        sock, _ = await accepted
        r = asyncio.StreamReader()
        p = asyncio.StreamReaderProtocol(r)
        tr, _ = await loop.connect_accepted_socket(lambda: p, sock, ssl=ca.server_context([HOST]))
        server = (r, asyncio.StreamWriter(tr, p, r, loop))
    else:
        client = asyncio.ensure_future(asyncio.open_connection("127.0.0.1", port))
        sock, _ = await accepted
        server = await asyncio.open_connection(sock=sock)
    lsock.close()
    return await client, server


async def main() -> None:
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    kinds = sys.argv[3].split(",") if len(sys.argv) > 3 else ["plain", "half", "uvtls"]
    ca = LocalCA.load_or_create(Path(tempfile.mkdtemp(prefix="burrow-pp-")) / "ca")
    for kind in kinds:
        (cr, cw), (sr, sw) = await pair(kind, ca)
        t0 = time.process_time()
        for _ in range(n):
            cw.write(MSG)
            await sr.readexactly(len(MSG))
            sw.write(MSG)
            await cr.readexactly(len(MSG))
        t = time.process_time() - t0
        print(f"{kind:6} {t / n * 1e6:6.1f} µs CPU per round trip (both ends, one process)")
        cw.close()
        sw.close()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main())
