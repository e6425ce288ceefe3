"""CPU cost of the edge's muxado sessions (backend/edge/muxado.py), per MB, both ways.

    /work/venv/bin/python tests/benchmarks/bench_muxado.py [--root DIR] [--mib 64] [--runs 5]

A stand-in for an ngrok agent runs as a separate process (plain TCP on 127.0.0.1, no
TLS, so that only muxado's own work is measured) and the session runs in this one,
under uvloop when importable:

* **in** (agent → edge, as a 1 MiB GET through an SDK): the peer opens streams and
  sends 256 KiB on each as 8 KiB DATA frames (the size ngrok's Rust SDK sends), the
  last with FIN; a task per stream reads it to the end, 64 KiB at a time.
* **out** (edge → agent, as an upload through a tcp endpoint): the edge opens streams
  and writes 1 MiB on each in 64 KiB writes with ``drain()``; the peer credits every
  DATA frame it reads (as ngrok's SDK does, per read).

Printed: this process's CPU time (user + system) per MB moved and the MB/s, median of
``--runs``.  On a shared machine the CPU time per MB is the figure to compare: the
wall-clock rate depends on what else runs.  ``--root DIR`` imports ``backend`` from
another checkout, for a before / after on the same machine::

    git worktree add --detach ../burrow-base HEAD~1
    /work/venv/bin/python tests/benchmarks/bench_muxado.py --root ../burrow-base
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

PEER = r"""
import socket, struct, sys
H = struct.Struct(">II")
mode, port, n_streams, per_stream = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def hdr(t, f, sid, n):
    return H.pack((n << 8) | (t << 4) | f, sid)
if mode == "in":
    frame = 8192
    chunk = b"x" * frame
    out = bytearray()
    for i in range(n_streams):
        sid = 3 + 2 * i
        for k in range(per_stream // frame):
            flags = (2 if k == 0 else 0) | (1 if k == per_stream // frame - 1 else 0)
            out += hdr(1, flags, sid, frame) + chunk
    s.sendall(out)
    while s.recv(65536):  # until the edge closes the session
        pass
else:
    s.sendall(hdr(1, 2, 3, 1) + b"!")  # open stream 3: the edge then opens its streams
    buf = bytearray()
    got = 0
    while True:
        data = s.recv(262144)
        if not data:
            break
        buf += data
        pos, credits = 0, []
        while len(buf) - pos >= 8:
            word, sid = H.unpack_from(buf, pos)
            n = word >> 8
            if len(buf) - pos - 8 < n:
                break
            if (word >> 4) & 0xF == 1 and n:
                credits.append(hdr(2, 0, sid, 4) + struct.pack(">I", n))
                got += n
            pos += 8 + n
        del buf[:pos]
        if credits:
            s.sendall(b"".join(credits))
        if got >= n_streams * per_stream:
            break  # everything arrived: closing ends the edge's session
    s.close()
"""


async def one_run(mux, mode: str, n_streams: int, per_stream: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of this process for one transfer."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    total = n_streams * per_stream
    moved = 0
    sessions = []
    tasks = set()

    async def drain_in(st) -> None:
        nonlocal moved
        while data := await st.reader.read(65536):
            moved += len(data)
        if moved >= total and not done.done():
            done.set_result(None)

    async def push_out(st) -> None:
        nonlocal moved
        block = b"y" * 65536
        for _ in range(per_stream // len(block)):
            st.writer.write(block)
            await st.writer.drain()
            moved += len(block)
        st.writer.write_eof()

    def on_stream(st) -> None:
        if mode == "in":
            t = asyncio.ensure_future(drain_in(st))
            tasks.add(t)
            return
        s = sessions[0]
        for _ in range(n_streams):
            t = asyncio.ensure_future(push_out(s.open_stream()))
            tasks.add(t)

    async def conn(r, w) -> None:
        s = mux.MuxSession(r, w, on_stream, max_streams=4096, max_buffered=1 << 30)
        sessions.append(s)
        await s.run()
        if mode == "out" and not done.done():  # the peer closes once it has everything
            done.set_result(None)

    server = await asyncio.start_server(conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    peer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PEER, mode, str(port), str(n_streams), str(per_stream)
    )
    t0, c0 = time.monotonic(), time.process_time()
    try:
        await asyncio.wait_for(done, 120)
        wall, cpu = time.monotonic() - t0, time.process_time() - c0
    finally:
        for s in sessions:
            s.close()
        server.close()
        try:
            await asyncio.wait_for(peer.wait(), 10)
        except TimeoutError:
            peer.kill()
            await peer.wait()
        for t in tasks:
            t.cancel()
    return cpu, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2])
    ap.add_argument("--mib", type=int, default=64, help="MiB moved per run and direction")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--modes", default="in,out")
    args = ap.parse_args()
    sys.path.insert(0, str(args.root.resolve()))
    from backend.edge import muxado as mux

    print(f"muxado from {Path(mux.__file__).resolve()}")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    for mode in args.modes.split(","):
        if mode == "in":
            n_streams, per_stream = args.mib * 4, 256 * 1024
        else:
            n_streams, per_stream = max(1, args.mib // 8), 8 * 1024 * 1024
        mb = n_streams * per_stream / 1e6
        cpu_ms, rates = [], []
        for _ in range(args.runs):
            cpu, wall = runner(one_run(mux, mode, n_streams, per_stream))
            cpu_ms.append(cpu * 1e3 / mb)
            rates.append(mb / wall)
        print(
            f"{mode:3}: {statistics.median(cpu_ms):6.2f} ms CPU per MB "
            f"(runs {' / '.join(f'{c:.2f}' for c in cpu_ms)}), "
            f"{statistics.median(rates):6.0f} MB/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
