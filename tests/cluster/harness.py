"""Several real edges on one PostgreSQL, and the faults to throw at them.

- :class:`Cluster`: N ``burrow serve --store <dsn> --node-id eN --peer-addr 127.0.0.K:0``
  processes, edge *i* (0-based) listening on 127.0.0.(i+2) (127.0.0.2, .3, .4, ...), all
  started at once, sharing one CA (the cluster's, through PostgreSQL: backend/cluster/ca.py;
  an agent trusts every edge with one ``--root-cas``) and one set of test credentials.  It
  starts agents against a chosen edge, and kills (SIGKILL), freezes (SIGSTOP) and thaws
  (SIGCONT) edges.
- :class:`FaultProxy`: a TCP proxy between two loopback addresses, in its own thread,
  that can *blackhole* — stop forwarding in both directions without closing anything,
  as a network partition does: bytes wait in the kernel buffers, new connections are
  accepted but not connected onward — and *resume*, after which every held byte flows
  on in order (TCP's retransmission after a healed partition).  Put it between an edge
  and PostgreSQL (``Cluster.start(..., pg_proxy=True)``: edge *i* reaches PostgreSQL
  through ``cluster.pg_proxies[i]``) or between an agent and an edge (an agent dials
  ``proxy.addr_str`` instead of the edge's ingress address).

Everything is loopback only, every wait bounded.  Tests use them through the fixtures in
``tests/cluster/conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.procs import READY_TIMEOUT, BurrowProc, start_agent, start_edge

__all__ = ["Cluster", "FaultProxy", "edge_host", "wait_until"]


def edge_host(i: int) -> str:
    """The loopback address edge ``i`` (0-based) listens on: 127.0.0.2, .3, .4, .5, ..."""
    return f"127.0.0.{i + 2}"


# ------------------------------------------------------------------------ fault proxy
class FaultProxy:
    """A loopback TCP proxy ``listen_host:0`` -> ``target`` that can blackhole and resume.

    ``with FaultProxy("127.0.0.2", ("127.0.0.1", pg_port)) as px: ...``; ``px.addr`` is
    where to connect.  ``blackhole()`` and ``resume()`` return once the proxy applies
    them.  ``connections`` counts accepted connections, ``open`` the live ones.
    """

    CHUNK = 65536

    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.listen_host = listen_host
        self.target = target
        self.addr: tuple[str, int] = (listen_host, 0)
        self.connections = 0
        self.open = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._flowing: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # the test thread's side
    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start()).result(10)
        return self

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def addr_str(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    def blackhole(self) -> None:
        """Stop forwarding: nothing passes either way until :meth:`resume`; nothing closes."""
        self._call(self._set(False)).result(10)

    def resume(self) -> None:
        self._call(self._set(True)).result(10)

    @property
    def blackholed(self) -> bool:
        return self._flowing is not None and not self._flowing.is_set()

    def close(self) -> None:
        """Close the listener and every proxied connection; stop the thread."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._close()).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _call(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # the proxy thread's side
    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._conn, self.listen_host, 0)
        self.addr = self._server.sockets[0].getsockname()[:2]

    async def _set(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self.connections += 1
        self.open += 1
        self._writers.add(w)
        uw = None
        try:
            await self._flowing.wait()  # a blackhole answers no SYN onward
            try:
                ur, uw = await asyncio.wait_for(asyncio.open_connection(*self.target), 10)
            except (OSError, TimeoutError):
                return
            self._writers.add(uw)
            await asyncio.gather(self._pump(r, uw), self._pump(ur, w), return_exceptions=True)
        finally:
            self.open -= 1
            for x in (w, uw):
                if x is not None:
                    self._writers.discard(x)
                    x.transport.abort()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()  # blackholed: stop reading, the kernel buffers
                data = await src.read(self.CHUNK)
                await self._flowing.wait()  # read just before the blackhole: hold it
                if not data:
                    with contextlib.suppress(OSError, RuntimeError):
                        dst.write_eof()
                    return
                dst.write(data)
                await dst.drain()
        except (OSError, RuntimeError):
            dst.transport.abort()


# ---------------------------------------------------------------------------- cluster
def _with_host(dsn: str, host: str, port: int) -> str:
    """``dsn`` pointed at ``host:port`` (a fault proxy in front of PostgreSQL)."""
    parts = urlsplit(dsn)
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{auth}{host}:{port}"))


class Cluster:
    """N edges on one PostgreSQL database (see the module docstring).

    ``edges[i]`` is edge ``i``'s :class:`~tests.procs.BurrowProc` (its ``ready`` line has
    ``ingress_addr``, ``api_url``, ``http_url``, ``ca_file`` and, from the cluster
    runtime, ``node_id`` and ``peer_addr``), or None once it was killed/stopped for good.
    """

    def __init__(self, dsn: str, root: Path, n: int = 3, extra: tuple[str, ...] = (), pg_proxy: bool = False) -> None:
        self.dsn = dsn
        self.root = Path(root)
        self.n = n
        self.extra = tuple(extra)
        self.edges: list[BurrowProc | None] = [None] * n
        self.pg_proxies: list[FaultProxy | None] = [None] * n
        self.agents: list[BurrowProc] = []
        self._pg_proxy = pg_proxy
        self._frozen: set[int] = set()
        self._starting: set[int] = set()  # restarted without waiting for their ready line

    # ------------------------------------------------------------------ edges
    def data_dir(self, i: int) -> Path:
        return self.root / f"edge{i + 1}"

    def node_id(self, i: int) -> str:
        return f"e{i + 1}"

    def edge_args(self, i: int) -> tuple[str, ...]:
        dsn = self.dsn
        if self._pg_proxy:
            if self.pg_proxies[i] is None:
                pg = urlsplit(self.dsn)
                self.pg_proxies[i] = FaultProxy(edge_host(i), (pg.hostname or "127.0.0.1", pg.port or 5432)).start()
            px = self.pg_proxies[i]
            dsn = _with_host(self.dsn, *px.addr)
        return (
            "--store", dsn,
            "--node-id", self.node_id(i),
            "--peer-addr", f"{edge_host(i)}:0",
            *self.extra,
        )

    def start(self, indexes: list[int] | None = None) -> Cluster:
        """Start edges (all by default), all at once."""
        todo = list(range(self.n)) if indexes is None else list(indexes)
        for i in todo:  # every process is in self.edges before any wait: close() finds it
            self.edges[i] = self._spawn(i, wait=False)
        for i in todo:
            self.edges[i].ready = self.edges[i].wait_event("ready", READY_TIMEOUT)
        return self

    def restart(self, i: int, wait: bool = True) -> BurrowProc:
        """Start edge ``i`` again (after a kill): same data dir, node id and listening
        addresses (ports included), as a restarted server keeps its address.  With
        ``wait=False`` it returns at once: :meth:`wait_ready` before using the edge."""
        old = self.edges[i]
        if old is not None and old.proc.poll() is None:
            raise RuntimeError(f"edge {i} is still running")
        ports = {}
        if old is not None:
            ports = {
                "ingress": int(old.ready["ingress_addr"].rsplit(":", 1)[1]),
                "http": old.http_addr[1],
                "api": int(old.ready["api_url"].rsplit(":", 1)[1]),
            }
            if old.ready.get("https_url"):
                ports["https"] = int(old.ready["https_url"].rsplit(":", 1)[1])
        proc = self._spawn(i, wait=wait, **ports)
        if not wait:
            proc.ready = old.ready if old is not None else {}
            self._starting.add(i)
        self.edges[i] = proc
        return proc

    def wait_ready(self, i: int) -> BurrowProc:
        """Wait for the ready line of edge ``i`` restarted with ``wait=False``."""
        proc = self.edge(i)
        if i in self._starting:
            proc.ready = proc.wait_event("ready", READY_TIMEOUT)
            self._starting.discard(i)
        return proc

    def _spawn(self, i: int, wait: bool, **ports: int) -> BurrowProc:
        return start_edge(self.data_dir(i), host=edge_host(i), extra=self.edge_args(i), wait=wait, **ports)

    def edge(self, i: int) -> BurrowProc:
        e = self.edges[i]
        if e is None:
            raise RuntimeError(f"edge {i} is not running")
        return e

    def ingress(self, i: int) -> str:
        return self.edge(i).ready["ingress_addr"]

    def http_addr(self, i: int) -> tuple[str, int]:
        return self.edge(i).http_addr

    def api_url(self, i: int) -> str:
        return self.edge(i).ready["api_url"]

    @property
    def ca_file(self) -> str:
        return self.edge(next(i for i, e in enumerate(self.edges) if e is not None)).ready["ca_file"]

    # ------------------------------------------------------------------ faults
    def kill(self, i: int) -> None:
        """SIGKILL edge ``i`` and reap it (no goodbye to PostgreSQL or its agents)."""
        e = self.edge(i)
        self._frozen.discard(i)
        e.kill()

    def freeze(self, i: int) -> None:
        """SIGSTOP edge ``i``: its sockets stay open, nothing answers."""
        os.kill(self.edge(i).pid, signal.SIGSTOP)
        self._frozen.add(i)

    def thaw(self, i: int) -> None:
        """SIGCONT edge ``i``."""
        os.kill(self.edge(i).pid, signal.SIGCONT)
        self._frozen.discard(i)

    # ------------------------------------------------------------------ agents
    def agent(self, i: int, proto: str, addr: str, *flags: str, home: Path, server_addr: str | None = None,
              check: bool = True) -> BurrowProc:
        """An agent (``burrow http|tcp|tls ADDR --json``) whose control connection dials
        edge ``i`` (or ``server_addr``: a fault proxy in front of it, say)."""
        edge = self.edge(i)
        if server_addr is not None:
            edge = _Dial(edge, server_addr)
        proc = start_agent(edge, proto, addr, *flags, home=home, check=check)
        self.agents.append(proc)
        return proc

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        for a in self.agents:
            with contextlib.suppress(Exception):
                a.kill()
        for i, e in enumerate(self.edges):
            if e is None:
                continue
            if i in self._frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(e.pid, signal.SIGCONT)
            with contextlib.suppress(Exception):
                e.kill()
        for px in self.pg_proxies:
            if px is not None:
                px.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Dial:
    """An edge as :func:`tests.procs.start_agent` sees it, with another ingress address."""

    def __init__(self, edge: BurrowProc, ingress_addr: str) -> None:
        self.ready = {**edge.ready, "ingress_addr": ingress_addr}


def wait_until(check, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll ``check()`` until it returns a true value (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(interval)
