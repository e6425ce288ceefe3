"""Compare burrow with direct access, socat, ssh -R, mitmdump and an asyncio relay.

Run from the repository root (or use tests/benchmarks/run.sh):

    .venv/bin/python tests/benchmarks/bench_compare.py [--rounds 3] [--quick] ...

It installs what it lacks (nginx, wrk, iperf3, socat, openssh from Debian with apt-get;
mitmproxy from PyPI into its own venv under ~/.cache/burrow-bench), then starts on
127.0.0.1 only:

  * an nginx upstream (own config in a temp dir, ``daemon off``, access_log off):
    ``/small`` answers 13 bytes, ``/1m`` a 1 MiB file; and an iperf3 server;
  * one way to reach them per path: socat (one hop, 64 KiB buffers, TCP_NODELAY), ssh -R
    to a throwaway sshd, mitmdump as a reverse proxy, a 40-line asyncio relay, two
    chained splice(2) relays (two hops of bytes only, blocking threads: the bulk
    throughput any client -> edge -> agent -> upstream path can hope for here), and
    burrow (edge + agent: capture on, capture off, and TLS data connections), and
    ngrok's own Python SDK connected to burrow's edge (``ngrok-sdk``: one muxado
    session over TLS, compared with the burrow agent's figures, issue 15).

Then, in interleaved rounds (every metric on every path, then the next round), it
measures with wrk and iperf3 - each load bounded in time and in count:

  * small GET req/s and p99 with 32 connections (wrk -t2 -c32 -dS),
  * latency added with one connection (wrk -t1 -c1 p50 minus direct's p50),
  * 1 MiB GET MB/s (wrk -t2 -c4 on /1m),
  * TCP MB/s (iperf3 -c through the relay or tunnel, -t S),

and, for the burrow paths, the CPU time of the edge and of the agent per small request
(``/proc/PID/stat`` utime + stime over each small load ÷ its requests); it prints a
markdown table of the medians with the ratio to direct, that CPU table and issue 18's
ratios (ssh -R, burrow-base, --data-tls vs plain), which it also
writes to tests/benchmarks/results.md with the machine and the command.  Every process
it started is stopped by pid at the end, also on Ctrl+C or SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl
from benchlib import LOCAL, Registry

HERE = Path(__file__).resolve().parent

# A 40-line asyncio relay: the "one hop in Python" reference.  Each argument is
# LISTEN_PORT:TARGET_PORT; both ends are on 127.0.0.1.
RELAY_SRC = """\
import asyncio
import socket
import sys


def nodelay(writer):
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def main():
    for spec in sys.argv[1:]:
        listen, target = (int(x) for x in spec.split(":"))

        async def handle(cr, cw, target=target):
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", target)
            except OSError:
                cw.close()
                return
            nodelay(cw)
            nodelay(uw)
            await asyncio.gather(pipe(cr, uw), pipe(ur, cw))

        await asyncio.start_server(handle, "127.0.0.1", listen, backlog=1024)
    await asyncio.Event().wait()


try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""

# Two of these chained are the floor for any two-hop path (client -> edge -> agent ->
# upstream) on this machine: bytes only, no HTTP, splice(2) in blocking threads (one per
# direction), so the kernel does all the work.  Arguments as for RELAY_SRC.
SPLICE_SRC = """\
import os
import socket
import sys
import threading


def pump(a, b):
    r, w = os.pipe()
    try:
        while n := os.splice(a.fileno(), w, 1 << 20):
            while n:
                n -= os.splice(r, b.fileno(), n)
    except OSError:
        pass
    finally:
        os.close(r)
        os.close(w)
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve(listen, target):
    srv = socket.create_server(("127.0.0.1", listen), backlog=1024)
    while True:
        c, _ = srv.accept()
        try:
            u = socket.create_connection(("127.0.0.1", target))
        except OSError:
            c.close()
            continue
        for s in (c, u):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pump, args=(c, u), daemon=True).start()
        threading.Thread(target=pump, args=(u, c), daemon=True).start()


for spec in sys.argv[1:]:
    listen, target = (int(x) for x in spec.split(":"))
    threading.Thread(target=serve, args=(listen, target), daemon=True).start()
threading.Event().wait()
"""

SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {tmp}/ssh_host_ed25519_key
PidFile {tmp}/sshd.pid
AuthorizedKeysFile {tmp}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
AllowTcpForwarding yes
GatewayPorts no
UseDNS no
PrintMotd no
MaxStartups 100
LogLevel ERROR
"""


@dataclass
class Route:
    """One way for a client on 127.0.0.1 to reach the upstreams."""

    key: str
    label: str
    http_port: int
    host: str | None = None  # Host header (burrow routes on it)
    tcp_port: int | None = None  # None: no TCP figure for this path
    # burrow paths: the pids whose CPU time per small request is reported ("edge", "agent")
    pids: dict[str, int] = field(default_factory=dict)


@dataclass
class Stats:
    small_rps: list[float] = field(default_factory=list)
    small_p99_ms: list[float] = field(default_factory=list)
    small_p50_ms: list[float] = field(default_factory=list)
    c1_p50_us: list[float] = field(default_factory=list)
    # CPU µs (utime+stime from /proc/PID/stat) per request of the small load, per process
    cpu_us: dict[str, list[float]] = field(default_factory=dict)
    big_mbps: list[float] = field(default_factory=list)
    tcp_mbps: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def med(vals: list[float]) -> float | None:
    return statistics.median(vals) if vals else None


# ============================================================================ the paths
def setup_socat(reg: Registry, nginx: int, iperf: int) -> Route:
    def one(target: int, name: str) -> int:
        port = bl.free_port()
        cmd = [
            "socat",
            "-b65536",
            f"TCP4-LISTEN:{port},bind={LOCAL},reuseaddr,fork,backlog=1024,nodelay",
            f"TCP4:{LOCAL}:{target},nodelay",
        ]
        bl.wait_port(port, reg.popen(cmd, name))
        return port

    return Route(
        "socat",
        "socat, 64 KiB buffers, nodelay (one hop)",
        one(nginx, "socat-http"),
        None,
        one(iperf, "socat-tcp"),
    )


def setup_ssh(reg: Registry, nginx: int, iperf: int) -> Route:
    tmp = reg.tmp / "ssh"
    tmp.mkdir()
    for name in ("ssh_host_ed25519_key", "client_key"):
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "burrow-bench",
                "-f",
                str(tmp / name),
            ],
            check=True,
        )
    (tmp / "authorized_keys").write_text((tmp / "client_key.pub").read_text())
    sshd_port = bl.free_port()
    (tmp / "sshd_config").write_text(SSHD_CONFIG.format(port=sshd_port, tmp=tmp))
    privsep = Path("/run/sshd")  # sshd refuses to start without its privsep directory
    if os.geteuid() == 0 and not privsep.exists():
        privsep.mkdir(mode=0o755, parents=True)
    sshd = reg.popen(
        [bl.which("sshd") or "sshd", "-D", "-e", "-f", str(tmp / "sshd_config")], "sshd"
    )
    bl.wait_port(sshd_port, sshd)
    http_port, tcp_port = bl.free_port(), bl.free_port()
    cmd = ["ssh", "-F", "/dev/null", "-N", "-p", str(sshd_port), "-i", str(tmp / "client_key")]
    for opt in (
        "BatchMode=yes",
        "IdentitiesOnly=yes",
        "StrictHostKeyChecking=no",
        f"UserKnownHostsFile={tmp}/known_hosts",
        "ExitOnForwardFailure=yes",
        "LogLevel=ERROR",
    ):
        cmd += ["-o", opt]
    cmd += [
        "-R",
        f"{LOCAL}:{http_port}:{LOCAL}:{nginx}",
        "-R",
        f"{LOCAL}:{tcp_port}:{LOCAL}:{iperf}",
    ]
    cmd.append(f"{getpass.getuser()}@{LOCAL}")
    client = reg.popen(cmd, "ssh")
    bl.wait_port(http_port, client)
    bl.wait_port(tcp_port, client)
    version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.split(",")[0]
    return Route("ssh", f"ssh -R ({version.replace('_', ' ')})", http_port, None, tcp_port)


def setup_mitm(reg: Registry, nginx: int, mitmdump: Path) -> Route:
    port = bl.free_port()
    cmd = [
        str(mitmdump),
        "--mode",
        f"reverse:http://{LOCAL}:{nginx}",
        "--listen-host",
        LOCAL,
        "--listen-port",
        str(port),
        "--set",
        f"confdir={reg.tmp / 'mitm'}",
        "-q",
    ]
    bl.wait_port(port, reg.popen(cmd, "mitmdump"), timeout=60)
    return Route("mitm", "mitmdump reverse proxy (captures)", port)


def setup_relay(reg: Registry, nginx: int, iperf: int) -> Route:
    src = reg.tmp / "relay.py"
    src.write_text(RELAY_SRC)
    http_port, tcp_port = bl.free_port(), bl.free_port()
    proc = reg.popen(
        [sys.executable, str(src), f"{http_port}:{nginx}", f"{tcp_port}:{iperf}"], "relay"
    )
    bl.wait_port(http_port, proc)
    bl.wait_port(tcp_port, proc)
    return Route("relay", "a 40-line asyncio relay (one hop)", http_port, None, tcp_port)


def setup_splice2(reg: Registry, nginx: int, iperf: int) -> Route:
    src = reg.tmp / "splice_relay.py"
    src.write_text(SPLICE_SRC)
    ports = [bl.free_port() for _ in range(4)]  # http in, http middle, tcp in, tcp middle
    first = reg.popen(
        [sys.executable, str(src), f"{ports[0]}:{ports[1]}", f"{ports[2]}:{ports[3]}"], "splice-1"
    )
    second = reg.popen(
        [sys.executable, str(src), f"{ports[1]}:{nginx}", f"{ports[3]}:{iperf}"], "splice-2"
    )
    for port, proc in zip(ports, (first, second, first, second), strict=True):
        bl.wait_port(port, proc)
    return Route(
        "splice2",
        "two chained splice relays (two hops, bytes only)",
        ports[0],
        None,
        ports[2],
    )


def setup_socat2(reg: Registry, nginx: int, iperf: int, tls: bool) -> Route:
    """Two chained socat relays (C, a process per connection): client -> hop 1 ->
    hop 2 -> upstream, the shape of client -> edge -> agent -> upstream with no HTTP
    and no capture; with ``tls``, the middle leg is TLS (OpenSSL, as burrow's
    ``--data-tls``): the floors of the two data paths for a two-hop relay in C."""
    pem = _self_signed(reg) if tls else None
    key = "socat2-tls" if tls else "socat2"

    def chain(target: int, name: str) -> int:
        first, middle = bl.free_port(), bl.free_port()
        if tls:
            listen2 = f"OPENSSL-LISTEN:{middle},bind={LOCAL},cert={pem},verify=0,reuseaddr,fork,backlog=1024,nodelay"
            connect1 = f"OPENSSL:{LOCAL}:{middle},verify=0,nodelay"
        else:
            listen2 = f"TCP4-LISTEN:{middle},bind={LOCAL},reuseaddr,fork,backlog=1024,nodelay"
            connect1 = f"TCP4:{LOCAL}:{middle},nodelay"
        second = reg.popen(["socat", "-b65536", listen2, f"TCP4:{LOCAL}:{target},nodelay"], f"{key}-{name}-2")
        bl.wait_port(middle, second)
        listen1 = f"TCP4-LISTEN:{first},bind={LOCAL},reuseaddr,fork,backlog=1024,nodelay"
        bl.wait_port(first, reg.popen(["socat", "-b65536", listen1, connect1], f"{key}-{name}-1"))
        return first

    label = "two chained socat relays" + (", TLS between them" if tls else "") + " (two hops, bytes only)"
    return Route(key, label, chain(nginx, "http"), None, chain(iperf, "tcp"))


NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")  # Debian's
NGINX_STREAM_CONF = """\
load_module {module};
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
stream {{
{servers}
}}
"""


def _self_signed(reg: Registry) -> Path:
    """A self-signed certificate and key for 127.0.0.1, in one PEM file."""
    pem = reg.tmp / "relay-tls.pem"
    if not pem.exists():
        cmd = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1"
        subprocess.run([*cmd.split(), "-keyout", str(pem), "-out", str(pem)], check=True, capture_output=True)
    return pem


def setup_nginx2(reg: Registry, nginx: int, iperf: int, tls: bool) -> Route:
    """Two chained nginx ``stream`` proxies, each one process (``master_process off``,
    one worker), as burrow's edge and agent are; with ``tls``, the middle leg is TLS
    (``proxy_ssl``, sessions reused).  Event-driven C: the floor the socat chain gives
    with a process per connection, without forks."""
    module = NGINX_STREAM_MODULE
    if not module.exists():
        raise SystemExit("the nginx2 paths need nginx's stream module (apt-get install libnginx-mod-stream)")
    pem = _self_signed(reg) if tls else None
    key = "nginx2-tls" if tls else "nginx2"
    first = {"http": bl.free_port(), "tcp": bl.free_port()}
    middle = {"http": bl.free_port(), "tcp": bl.free_port()}
    target = {"http": nginx, "tcp": iperf}
    opts = "proxy_buffer_size 64k; tcp_nodelay on;"
    hop2 = "\n".join(
        f"  server {{ listen {LOCAL}:{middle[k]}{' ssl' if tls else ''} backlog=1024; {opts}"
        + (f" ssl_certificate {pem}; ssl_certificate_key {pem};" if tls else "")
        + f" proxy_pass {LOCAL}:{target[k]}; }}"
        for k in first
    )
    hop1 = "\n".join(
        f"  server {{ listen {LOCAL}:{first[k]} backlog=1024; {opts}"
        + (" proxy_ssl on; proxy_ssl_session_reuse on;" if tls else "")
        + f" proxy_pass {LOCAL}:{middle[k]}; }}"
        for k in first
    )
    for name, servers, ports in ((f"{key}-2", hop2, middle), (f"{key}-1", hop1, first)):
        conf = reg.tmp / f"{name}.conf"
        conf.write_text(NGINX_STREAM_CONF.format(module=module, tmp=reg.tmp, name=name, servers=servers))
        proc = reg.popen(["nginx", "-c", str(conf), "-p", str(reg.tmp), "-e", str(reg.tmp / f"{name}-error.log")], name)
        for port in ports.values():
            bl.wait_port(port, proc)
    label = "two chained nginx stream proxies" + (", TLS between them" if tls else "") + " (two hops, bytes only)"
    return Route(key, label, first["http"], None, first["tcp"])


def setup_burrow(
    reg: Registry, nginx: int, iperf: int, which: list[str], base: Path | None = None
) -> list[Route]:
    """burrow's routes; ``burrow-base`` is capture on with the code of the checkout
    ``base`` (its own edge and agents), to measure a change before and after in one run."""
    from tests.procs import host_of, start_agent, start_edge

    edges = {}

    def edge_of(key: str):
        root = base if key.endswith("-base") else None
        if root not in edges:
            e = start_edge(reg.tmp / ("edge-base" if root else "edge"), root=root)
            reg.add(e)
            edges[root] = e
        return edges[root]

    routes = []

    def agent(key: str, proto: str, port: int, name: str, *flags: str):
        root = base if key.endswith("-base") else None
        a = start_agent(edge_of(key), proto, f"{LOCAL}:{port}", *flags, home=reg.tmp / f"home-{name}", root=root)
        reg.add(a)
        return a

    variants = {
        "burrow": ("burrow (capture on)", (), True),
        "burrow-nocap": (
            "burrow (capture off: --inspect-db-size -1)",
            ("--inspect-db-size", "-1"),
            False,
        ),
        "burrow-tls": ("burrow --data-tls (capture on)", ("--data-tls",), True),
        "burrow-base": (f"burrow at {base.name if base else '?'} (capture on)", (), True),
        "burrow-tls-base": (f"burrow --data-tls at {base.name if base else '?'} (capture on)", ("--data-tls",), True),
    }
    for key in which:
        if key in ("ngrok-sdk", "ngrok-sdk-base"):
            base_key = "burrow-base" if key == "ngrok-sdk-base" else "burrow"
            routes.append(setup_ngrok_sdk(reg, nginx, iperf, edge_of(base_key), key))
            continue
        label, flags, with_tcp = variants[key]
        http_agent = agent(key, "http", nginx, f"{key}-http", *flags)
        tcp_port = None
        if with_tcp:
            tcp_url = agent(key, "tcp", iperf, f"{key}-tcp", *flags).public_url
            tcp_port = int(tcp_url.rsplit(":", 1)[1])
        e = edge_of(key)
        pids = {"edge": e.pid, "agent": http_agent.pid}
        routes.append(Route(key, label, e.http_addr[1], host_of(http_agent.public_url), tcp_port, pids))
    return routes


def setup_ngrok_sdk(reg: Registry, nginx: int, iperf: int, edge, key: str = "ngrok-sdk") -> Route:
    """ngrok's Python Agent SDK (``pip install ngrok``, from ``$BURROW_NGROK_SDK`` or
    ``.sdk``) connected to the same edge as the ``burrow`` path (``ngrok-sdk-base``: as
    ``burrow-base``, the edge of ``--base``): ``ngrok.forward`` to nginx (http) and to
    iperf3 (tcp), each public connection a muxado stream of the SDK's one TLS session
    (tests/e2e/ngrok_sdk_driver.py)."""
    import select

    from tests.procs import host_of

    sdk_dir = Path(os.environ.get("BURROW_NGROK_SDK", bl.ROOT / ".sdk"))
    if not (sdk_dir / "ngrok" / "__init__.py").exists():
        raise SystemExit(
            f"the ngrok-sdk path needs ngrok's Python SDK in {sdk_dir} "
            f"(pip install --target {sdk_dir} ngrok, or set BURROW_NGROK_SDK)"
        )
    driver = bl.ROOT / "tests" / "e2e" / "ngrok_sdk_driver.py"

    def forward(proto: str, port: int) -> tuple[str, int]:
        name = f"{key}-{proto}"
        proc = reg.popen(
            [
                sys.executable,
                str(driver),
                f"{LOCAL}:{port}",
                "test-authtoken",
                edge.ready["ingress_addr"],
                edge.ready["ca_file"],
                proto,
            ],
            name,
            stdin=subprocess.PIPE,  # the driver serves until its stdin closes
            stdout=subprocess.PIPE,
            env={"PYTHONPATH": str(sdk_dir), "PATH": os.environ.get("PATH", "")},
        )
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else b""
        info = json.loads(line) if line.strip() else {}
        if not info.get("url"):
            raise RuntimeError(f"the SDK did not forward {proto}: {line!r} {reg.log_tail(name)}")
        return info["url"], proc.pid

    url, sdk_pid = forward("http", nginx)
    tcp_url, _ = forward("tcp", iperf)
    label = "ngrok's Python SDK (one muxado session over TLS)"
    if key == "ngrok-sdk-base":
        label += ", to the edge of --base"
    return Route(
        key,
        label,
        edge.http_addr[1],
        host_of(url),
        int(tcp_url.rsplit(":", 1)[1]),
        {"edge": edge.pid, "agent": sdk_pid},
    )


def _sdk_dir_ok() -> bool:
    sdk_dir = Path(os.environ.get("BURROW_NGROK_SDK", bl.ROOT / ".sdk"))
    return (sdk_dir / "ngrok" / "__init__.py").exists()


ALL_PATHS = [
    "direct",
    "ssh",
    "mitm",
    "socat",
    "relay",
    "splice2",
    "socat2",  # two chained socat relays: the two-hop floor in C
    "socat2-tls",  # the same with TLS between the hops (as --data-tls)
    "nginx2",  # two chained nginx stream proxies: the two-hop floor in event-driven C
    "nginx2-tls",  # the same with TLS between them
    "burrow",
    "burrow-nocap",
    "burrow-tls",
    "burrow-base",  # needs --base DIR
    "burrow-tls-base",  # burrow-tls with the code of --base
    "ngrok-sdk",  # ngrok's Python SDK against burrow's edge (muxado)
    "ngrok-sdk-base",  # the same against the edge of --base
]


# ============================================================================ measuring
def measure(reg: Registry, routes: list[Route], args) -> dict[str, Stats]:
    stats = {r.key: Stats() for r in routes}

    def note(r: Route, what: str) -> None:
        stats[r.key].errors.append(what)
        bl.log(f"    ! {r.key}: {what}")

    def load(r: Route, what: str, path: str, threads: int, conns: int, seconds: float, cap: int):
        """One bounded wrk run on ``r``; socket errors and non-2xx answers are noted."""
        w = bl.wrk(
            reg,
            r.http_port,
            path,
            host=r.host,
            threads=threads,
            conns=conns,
            seconds=seconds,
            max_requests=cap,
        )
        if w.errors or w.status_errors:
            note(r, f"{what}: {w.errors} socket errors, {w.status_errors} non-2xx of {w.requests}")
        return w

    def small(r: Route) -> str:
        before = {name: bl.cpu_seconds(pid) for name, pid in r.pids.items()}
        w = load(r, "small", "/small", 2, 32, args.seconds, args.max_requests)
        cpu = ""
        for name, pid in r.pids.items():
            used = bl.cpu_seconds(pid) - before[name]
            per = used * 1e6 / w.requests if w.requests else 0.0
            stats[r.key].cpu_us.setdefault(name, []).append(per)
            cpu += f"  {name} {per:4.0f} µs/req"
        stats[r.key].small_rps.append(w.rps)
        stats[r.key].small_p99_ms.append(w.p99_us / 1000)
        stats[r.key].small_p50_ms.append(w.p50_us / 1000)
        return f"{w.rps:10,.0f} req/s  p50 {w.p50_us / 1000:6.2f} ms  p99 {w.p99_us / 1000:6.2f} ms{cpu}"

    def latency(r: Route) -> str:
        w = load(r, "1 conn", "/small", 1, 1, args.lat_seconds, args.max_requests)
        stats[r.key].c1_p50_us.append(w.p50_us)
        return f"p50 {w.p50_us:6.0f} µs  ({w.rps:,.0f} req/s)"

    def big(r: Route) -> str:
        w = load(r, "1 MiB", "/1m", 2, 4, args.seconds, args.max_big)
        stats[r.key].big_mbps.append(w.mbps)
        return f"{w.mbps:10,.1f} MB/s"

    def tcp(r: Route) -> str:
        if r.tcp_port is None:
            return "-"
        mbps, err = bl.iperf3(reg, r.tcp_port, args.tcp_seconds)
        if err:
            note(r, f"tcp: {err}")
        else:
            stats[r.key].tcp_mbps.append(mbps)
        return f"{mbps:10,.1f} MB/s"

    tests = [("small", small), ("1conn", latency), ("1MiB", big), ("tcp", tcp)]
    if args.tests:
        wanted = set(args.tests.split(","))
        unknown = wanted - {t[0] for t in tests}
        if unknown:
            raise SystemExit(f"--tests: unknown {', '.join(sorted(unknown))} (known: small,1conn,1MiB,tcp)")
        tests = [t for t in tests if t[0] in wanted]
    bl.log("warming up ...")
    for r in routes:
        bl.wrk(reg, r.http_port, "/small", host=r.host, seconds=1, max_requests=20000)
        bl.wrk(reg, r.http_port, "/1m", host=r.host, conns=4, seconds=1, max_requests=200)
    for rnd in range(1, args.rounds + 1):
        # rotate the order each round so no path always runs first (or right after X)
        shift = (rnd - 1) % len(routes)
        order = routes[shift:] + routes[:shift]
        for test, fn in tests:
            for r in order:
                try:
                    detail = fn(r)
                except (RuntimeError, OSError) as exc:
                    note(r, f"{test}: {exc}")
                    detail = "failed"
                if detail != "-":
                    bl.log(f"  round {rnd}  {test:6} {r.key:13} {detail}")
    return stats


# ============================================================================ reporting
def fmt_int(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def ratio(v: float | None, d: float | None) -> str:
    if v is None or not d:
        return ""
    return f" ({v / d:.2f}×)"


def table(routes: list[Route], stats: dict[str, Stats]) -> str:
    d = stats.get("direct")
    d_rps = med(d.small_rps) if d else None
    d_p99 = med(d.small_p99_ms) if d else None
    d_p50 = med(d.c1_p50_us) if d else None
    d_big = med(d.big_mbps) if d else None
    d_tcp = med(d.tcp_mbps) if d else None
    lines = [
        "| path | small req/s (-c32) | p50 ms | p99 ms | added µs (1 conn) | 1 MiB GET MB/s | TCP MB/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in routes:
        s = stats[r.key]
        rps, p99, p50 = med(s.small_rps), med(s.small_p99_ms), med(s.c1_p50_us)
        sp50 = med(s.small_p50_ms)
        sp50_cell = "n/a" if sp50 is None else f"{sp50:.2f}"
        big, tcp = med(s.big_mbps), med(s.tcp_mbps)
        label = "direct (the limit)" if r.key == "direct" else r.label
        if s.errors:
            label += " ⚠"
        if r.key == "direct":
            cells = [
                fmt_int(rps),
                sp50_cell,
                f"{p99:.1f}" if p99 is not None else "n/a",
                "0",
                fmt_int(big),
                fmt_int(tcp),
            ]
        else:
            added = "n/a" if p50 is None or d_p50 is None else f"{p50 - d_p50:,.0f}"
            cells = [
                fmt_int(rps) + ratio(rps, d_rps),
                sp50_cell,
                ("n/a" if p99 is None else f"{p99:.1f}") + ratio(p99, d_p99),
                added,
                fmt_int(big) + ratio(big, d_big),
                "–" if r.tcp_port is None else fmt_int(tcp) + ratio(tcp, d_tcp),
            ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


GOALS = [
    # (text, stats attribute, comparison, bound, unit)
    ("HTTP small response ≥ 15,000 req/s at -c32", "small_rps", ">=", 15000, "req/s"),
    ("… with p99 ≤ 5 ms", "small_p99_ms", "<=", 5.0, "ms"),
    ("added latency with one connection ≤ 150 µs", "added_us", "<=", 150, "µs"),
    ("1 MiB GET through an http tunnel ≥ 1,000 MB/s", "big_mbps", ">=", 1000, "MB/s"),
    ("TCP tunnel ≥ 2,000 MB/s (plain data connections)", "tcp_mbps", ">=", 2000, "MB/s"),
]


def cpu_table(routes: list[Route], stats: dict[str, Stats]) -> str:
    """CPU time per proxied small request of the edge and the agent (the medians of the
    rounds' /proc utime+stime deltas over each small load, divided by its requests)."""
    rows = [r for r in routes if stats[r.key].cpu_us]
    if not rows:
        return ""
    base = stats.get("burrow-base")
    base_sum = None
    if base is not None and base.cpu_us:
        base_sum = sum(med(v) or 0 for v in base.cpu_us.values())
    lines = [
        "CPU per proxied small request (`/proc/PID/stat` utime+stime over each small load ÷ its requests; medians):",
        "",
        "| path | edge µs/req | agent µs/req | sum | vs burrow-base |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = stats[r.key].cpu_us
        e, a = med(c.get("edge", [])), med(c.get("agent", []))
        total = (e or 0) + (a or 0)
        vs = f"{total / base_sum:.2f}×" if base_sum and r.key != "burrow-base" else ""
        lines.append(f"| {r.key} | {fmt_int(e)} | {fmt_int(a)} | {total:,.0f} | {vs} |")
    return "\n".join(lines)


def goals18(stats: dict[str, Stats]) -> str:
    """The ratios issue 18 asks for, from this run."""
    b, tls, ssh, d = (stats.get(k) for k in ("burrow", "burrow-tls", "ssh", "direct"))
    out: list[str] = []

    def check(text: str, v: float | None, ref: float | None, bound: float, op: str = ">=") -> None:
        if v is None or not ref:
            out.append(f"- {text}: not measured")
            return
        x = v / ref
        ok = x >= bound if op == ">=" else x <= bound
        out.append(f"- {text}: {v:,.0f} / {ref:,.0f} = **{x:.2f}×** ({'met' if ok else 'NOT met'})")

    if b is not None and ssh is not None:
        check("small req/s, plain data path ≥ 1.3× ssh -R", med(b.small_rps), med(ssh.small_rps), 1.3)
        p99 = med(b.small_p99_ms)
        if p99 is not None:
            out.append(f"- … with p99 ≤ 5 ms: **{'met' if p99 <= 5 else 'NOT met'}** ({p99:.1f} ms)")
    if b is not None and b.cpu_us:
        base = stats.get("burrow-base")
        total = sum(med(v) or 0 for v in b.cpu_us.values())
        if base is not None and base.cpu_us:
            ref = sum(med(v) or 0 for v in base.cpu_us.values())
            check("CPU µs per request, edge + agent, ≤ 2/3 of burrow-base's", total, ref, 2 / 3, "<=")
        else:
            out.append(f"- CPU µs per request, edge + agent: {total:,.0f} (no burrow-base in this run)")
    if tls is not None and ssh is not None:
        check("--data-tls TCP ≥ 1.5× ssh -R's TCP", med(tls.tcp_mbps), med(ssh.tcp_mbps), 1.5)
    if tls is not None and b is not None:
        check("--data-tls 1 MiB GET ≥ 0.8× the plain path's", med(tls.big_mbps), med(b.big_mbps), 0.8)
        check("--data-tls small req/s ≥ 0.9× the plain path's", med(tls.small_rps), med(b.small_rps), 0.9)
    if tls is not None and d is not None:
        tp, dp = med(tls.c1_p50_us), med(d.c1_p50_us)
        if tp is not None and dp is not None:
            added = tp - dp
            out.append(
                f"- --data-tls added latency at one connection ≤ 150 µs: "
                f"**{'met' if added <= 150 else 'NOT met'}** ({added:,.0f} µs)"
            )
    floors = []

    def floor(text: str, v: float | None, ref: float | None) -> None:
        if v is not None and ref:
            floors.append(f"- {text}: {v:,.0f} / {ref:,.0f} = {v / ref:.2f}×")

    for plain_key in ("socat2", "nginx2"):
        c, ct, tk = stats.get(plain_key), stats.get(f"{plain_key}-tls"), f"{plain_key}-tls"
        if c is not None and ssh is not None:
            floor(f"{plain_key} small req/s vs ssh -R (goal for burrow: 1.3×)", med(c.small_rps), med(ssh.small_rps))
        if c is not None and b is not None:
            floor(f"burrow small req/s vs {plain_key}", med(b.small_rps), med(c.small_rps))
        if ct is not None and b is not None:
            floor(f"{tk} 1 MiB GET vs burrow's plain path (goal for burrow-tls: 0.8×)", med(ct.big_mbps), med(b.big_mbps))
        if ct is not None and c is not None:
            floor(f"{tk} small req/s vs {plain_key} (goal for burrow-tls vs burrow: 0.9×)", med(ct.small_rps), med(c.small_rps))
            floor(f"{tk} 1 MiB GET vs {plain_key}", med(ct.big_mbps), med(c.big_mbps))
        if ct is not None and tls is not None:
            floor(f"burrow-tls 1 MiB GET vs {tk}", med(tls.big_mbps), med(ct.big_mbps))
            floor(f"burrow-tls TCP vs {tk}", med(tls.tcp_mbps), med(ct.tcp_mbps))
    if floors:
        out += ["", "The same shape in C (two chained relays, plain and with TLS between them; bytes only, no HTTP, no capture):", "", *floors]
    return "\n".join(["Goals of issue 18 (capture on):", "", *out]) if out else ""


def goals(stats: dict[str, Stats]) -> str:
    b = stats.get("burrow")
    d = stats.get("direct")
    out = ["Goals of issue 8 (burrow, capture ON):", ""] if b is not None else []
    for text, attr, op, bound, unit in GOALS if b is not None else ():
        if attr == "added_us":
            bp, dp = med(b.c1_p50_us), med(d.c1_p50_us) if d else None
            v = None if bp is None or dp is None else bp - dp
        else:
            v = med(getattr(b, attr))
        if v is None:
            out.append(f"- {text}: not measured")
            continue
        ok = v >= bound if op == ">=" else v <= bound
        shown = f"{v:,.1f}" if unit == "ms" else f"{v:,.0f}"
        out.append(f"- {text}: **{'met' if ok else 'NOT met'}** ({shown} {unit})")
    tls = stats.get("burrow-tls")
    if tls is not None and tls.tcp_mbps:
        out.append(f"- (TCP tunnel with --data-tls: {med(tls.tcp_mbps):,.0f} MB/s, its own figure)")
    sdk, sdk_base = stats.get("ngrok-sdk"), stats.get("ngrok-sdk-base")
    if sdk is not None and sdk_base is not None:
        out += ["", "ngrok's SDK: this edge vs the edge of --base (same run):", ""]
        for text, attr, unit in (
            ("small req/s", "small_rps", "req/s"),
            ("1 MiB GET", "big_mbps", "MB/s"),
            ("TCP", "tcp_mbps", "MB/s"),
        ):
            v, ref = med(getattr(sdk, attr)), med(getattr(sdk_base, attr))
            if v is not None and ref:
                out.append(f"- {text}: {v:,.0f} vs {ref:,.0f} {unit} = {v / ref:.2f}×")
    tests3 = (("small req/s", "small_rps", "req/s"), ("1 MiB GET", "big_mbps", "MB/s"), ("TCP", "tcp_mbps", "MB/s"))
    for key, what in (("burrow", "plain data connections"), ("burrow-tls", "TLS data connections, the like-for-like baseline")):
        ref_stats = stats.get(key)
        if sdk is None or ref_stats is None:
            continue
        out += ["", f"ngrok's SDK (one muxado session) vs a burrow agent over {what}, same edge and "
                "upstream (issue 15 goal: ≥ 0.7×):", ""]
        for text, attr, unit in tests3:
            v, ref = med(getattr(sdk, attr)), med(getattr(ref_stats, attr))
            if v is None or not ref:
                out.append(f"- {text}: not measured")
                continue
            ok = v / ref >= 0.7
            out.append(
                f"- {text}: {v:,.0f} vs {ref:,.0f} {unit} = **{v / ref:.2f}×** "
                f"({'met' if ok else 'NOT met'})"
            )
    ssh = stats.get("ssh")
    if tls is not None:
        out += ["", "Issue 18, TLS data connections (same run):", ""]
        checks = []
        if ssh is not None:
            checks.append(("TCP tunnel vs ssh -R", med(tls.tcp_mbps), med(ssh.tcp_mbps), 1.5))
        if b is not None:
            checks.append(("1 MiB GET vs plain data connections", med(tls.big_mbps), med(b.big_mbps), 0.8))
            checks.append(("small req/s vs plain data connections", med(tls.small_rps), med(b.small_rps), 0.9))
        for text, v, ref, goal in checks:
            if v is None or not ref:
                out.append(f"- {text}: not measured")
            else:
                out.append(f"- {text}: {v:,.0f} vs {ref:,.0f} = **{v / ref:.2f}×** "
                           f"(goal ≥ {goal}×: {'met' if v / ref >= goal else 'NOT met'})")
        tp, dp = med(tls.c1_p50_us), med(d.c1_p50_us) if d else None
        if tp is not None and dp is not None:
            out.append(f"- added latency at 1 connection: {tp - dp:,.0f} µs (goal ≤ 150 µs: "
                       f"{'met' if tp - dp <= 150 else 'NOT met'})")
        tls_base = stats.get("burrow-tls-base")
        if tls_base is not None:
            for text, attr, unit in tests3:
                v, ref = med(getattr(tls, attr)), med(getattr(tls_base, attr))
                if v is not None and ref:
                    out.append(f"- {text}, this tree vs --base: {v:,.0f} vs {ref:,.0f} {unit} = {v / ref:.2f}×")
    return "\n".join(out)


def raw_rounds(routes: list[Route], stats: dict[str, Stats]) -> str:
    def seq(vals: list[float], f: str) -> str:
        return " / ".join(format(v, f) for v in vals) or "–"

    lines = [
        "| path | small req/s | p99 ms | CPU µs/req edge + agent | 1-conn p50 µs | 1 MiB MB/s | TCP MB/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in routes:
        s = stats[r.key]
        cpu = " / ".join(
            f"{e:.0f}+{a:.0f}" for e, a in zip(s.cpu_us.get("edge", []), s.cpu_us.get("agent", []), strict=False)
        ) or "–"
        lines.append(
            f"| {r.key} | {seq(s.small_rps, ',.0f')} | {seq(s.small_p99_ms, '.2f')} | {cpu} | "
            f"{seq(s.c1_p50_us, '.0f')} | {seq(s.big_mbps, ',.0f')} | {seq(s.tcp_mbps, ',.0f')} |"
        )
    return "\n".join(lines)


def tool_versions(mitmdump: Path | None) -> str:
    def first(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        text = (p.stdout + p.stderr).strip().splitlines()
        return text[0].strip() if text else "?"

    items = [
        first(["nginx", "-v"]) if bl.which("nginx") else "nginx ?",
        first(["wrk", "-v"]).split(" Copyright")[0],
        first(["iperf3", "--version"]),
        _socat_version(),
        first(["ssh", "-V"]),
    ]
    if mitmdump is not None:
        items.append(first([str(mitmdump), "--version"]).replace(":", "").replace("  ", " "))
    return "; ".join(items)


def _socat_version() -> str:
    try:
        out = subprocess.run(["socat", "-V"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "socat ?"
    for line in out.splitlines():
        if line.startswith("socat version"):
            return line.split(" on ")[0]
    return "socat ?"


def write_results(path: Path, body: str, args, argv: list[str], versions: str) -> None:
    m = bl.machine_info()
    cmd = "tests/benchmarks/run.sh" + ("" if not argv else " " + shlex.join(argv))
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=bl.ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "backend"], cwd=bl.ROOT, capture_output=True, text=True
        ).stdout.strip()
        rev = (rev or "?") + (" (backend/ modified)" if dirty else "")
    except OSError:
        rev = "?"
    text = f"""# burrow benchmark: comparison with other tunnels and proxies

Written by `tests/benchmarks/bench_compare.py` on {datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}.

- machine: {m["nproc"]} CPUs ({m["cpu"]}), {m["memory"]} RAM, {m["kernel"]}, Python {m["python"]}
- command: `{cmd}` at commit {rev}
- tools: {versions}
- method: nginx upstream on 127.0.0.1 (worker_processes {args.nginx_workers}, access_log off;
  `/small` = 13 bytes, `/1m` = 1 MiB file) and an iperf3 server; every path on loopback;
  {args.rounds} interleaved rounds, medians.  small: `wrk -t2 -c32 -d{args.seconds:g}s`;
  added µs: `wrk -t1 -c1 -d{args.lat_seconds:g}s` p50 minus direct's p50; 1 MiB:
  `wrk -t2 -c4 -d{args.seconds:g}s /1m` (bytes/s, 10^6); TCP: `iperf3 -c -t {args.tcp_seconds}` (received bytes/s).
  Ratios in parentheses are to direct.  The machine is shared: compare ratios within one run.

{body}
"""
    path.write_text(text)


# ================================================================================= main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5, help="duration of each wrk load (-d)")
    ap.add_argument("--lat-seconds", type=float, default=3, help="duration of the 1-conn run")
    ap.add_argument("--tcp-seconds", type=int, default=5, help="iperf3 -t")
    ap.add_argument(
        "--max-requests", type=int, default=3_000_000, help="count cap of a small-GET run"
    )
    ap.add_argument("--max-big", type=int, default=50_000, help="count cap of a 1 MiB run")
    ap.add_argument(
        "--paths",
        default=",".join(
            p
            for p in ALL_PATHS
            if not p.endswith("-base") and (p != "ngrok-sdk" or _sdk_dir_ok())
        ),
        help=f"comma list of {ALL_PATHS}",
    )
    ap.add_argument(
        "--base",
        type=Path,
        default=None,
        help="a checkout of an older commit (git worktree add --detach DIR REV): the path "
        "burrow-base runs its code, capture on, for a before/after in one run",
    )
    ap.add_argument(
        "--tests", default="", help="comma list of small,1conn,1MiB,tcp (default: all)"
    )
    ap.add_argument("--nginx-workers", default="1", help="nginx worker_processes (1 or auto)")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get / pip install")
    ap.add_argument("--out", type=Path, default=HERE / "results.md", help="'-' to not write")
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s loads (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.lat_seconds, args.tcp_seconds = 1, 2, 1, 2
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(paths) - set(ALL_PATHS)
    if unknown:
        ap.error(f"unknown paths {sorted(unknown)}")
    if "direct" not in paths:
        paths.insert(0, "direct")
    if any(p.endswith("-base") for p in paths) and (args.base is None or not (args.base / "backend").is_dir()):
        ap.error("the *-base paths need --base DIR, a checkout of the commit to compare with")

    bl.install_signal_handlers()
    nofile = bl.raise_nofile(65536)
    bl.log(f"RLIMIT_NOFILE now {nofile}")

    mitmdump = None
    if not args.no_install:
        need = ["nginx", "wrk", "iperf3"]
        if any(p.startswith("socat") for p in paths):
            need.append("socat")
        if "ssh" in paths:
            need += ["sshd", "ssh", "ssh-keygen"]
        bl.ensure_debian(need)
        if any(p.startswith("nginx2") for p in paths) and not NGINX_STREAM_MODULE.exists():
            bl._apt_install(["libnginx-mod-stream"])
        if "mitm" in paths:
            mitmdump = bl.ensure_mitmproxy()
    elif "mitm" in paths:
        mitmdump = bl.cache_dir() / "mitm-venv" / "bin" / "mitmdump"

    reg = Registry()
    try:
        t0 = time.monotonic()
        nginx = bl.start_nginx(reg, workers=args.nginx_workers)
        iperf = bl.start_iperf(reg)
        routes = [Route("direct", "direct", nginx, None, iperf)]
        setups = {
            "socat": lambda: [setup_socat(reg, nginx, iperf)],
            "ssh": lambda: [setup_ssh(reg, nginx, iperf)],
            "mitm": lambda: [setup_mitm(reg, nginx, mitmdump)],
            "relay": lambda: [setup_relay(reg, nginx, iperf)],
            "splice2": lambda: [setup_splice2(reg, nginx, iperf)],
            "socat2": lambda: [setup_socat2(reg, nginx, iperf, tls=False)],
            "socat2-tls": lambda: [setup_socat2(reg, nginx, iperf, tls=True)],
            "nginx2": lambda: [setup_nginx2(reg, nginx, iperf, tls=False)],
            "nginx2-tls": lambda: [setup_nginx2(reg, nginx, iperf, tls=True)],
        }
        for p in paths:
            if p in setups:
                routes += setups[p]()
        burrows = [p for p in paths if p.startswith(("burrow", "ngrok-sdk"))]
        if burrows:
            routes += setup_burrow(reg, nginx, iperf, burrows, args.base)
        for r in routes:
            extra = f" Host {r.host}" if r.host else ""
            bl.log(f"  {r.key:13} http :{r.http_port}{extra}  tcp :{r.tcp_port or '-'}")

        stats = measure(reg, routes, args)
        body = table(routes, stats)
        cpu = cpu_table(routes, stats)
        if cpu:
            body += "\n\n" + cpu
        g = "\n\n".join(x for x in (goals18(stats), goals(stats)) if x)
        errors = [f"- {r.key}: {e}" for r in routes for e in stats[r.key].errors]
        report = body + ("\n\n" + g if g else "")
        report += "\n\n<details><summary>every round</summary>\n\n" + raw_rounds(routes, stats)
        report += "\n\n</details>\n"
        if errors:
            report += "\nErrors seen (⚠ in the table):\n\n" + "\n".join(errors) + "\n"
        print()
        print(report)
        bl.log(f"total {time.monotonic() - t0:.0f} s")
        if str(args.out) != "-":
            write_results(args.out, report, args, argv, tool_versions(mitmdump))
            bl.log(f"written to {args.out}")
        return 1 if errors else 0
    except KeyboardInterrupt:
        bl.log("\ninterrupted; stopping everything")
        return 130
    finally:
        reg.stop_all()


if __name__ == "__main__":
    sys.exit(main())
