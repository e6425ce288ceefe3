"""Shared pieces of bench_compare.py and bench_scale.py (not a test module).

* ``ensure_tools``: installs the Debian packages (nginx, wrk, iperf3, socat, openssh)
  with apt-get and mitmproxy from PyPI into its own venv under a cache directory.
* ``Registry``: every child process the benchmark starts, stopped by pid (and the pids
  of its descendants, found in /proc) at the end, on Ctrl+C, SIGTERM or exit.
* ``start_nginx`` / ``start_iperf``: the upstreams, on 127.0.0.1 only.
* ``raise_nofile``: the file-descriptor limit of this process (inherited by children).
* ``wrk``: one bounded wrk run (time with -d, count with a Lua hook), parsed.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LOCAL = "127.0.0.1"  # every server and every load generator stays on loopback
MB = 1_000_000
SMALL_BODY = "Hello, world!"  # 13 bytes
BIG_SIZE = 1024 * 1024
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"

# binary -> Debian package
DEBIAN_TOOLS = {
    "nginx": "nginx",
    "wrk": "wrk",
    "iperf3": "iperf3",
    "socat": "socat",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ============================================================================ installs
def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "burrow-bench"


def _apt_install(packages: list[str]) -> None:
    prefix: list[str] = []
    if os.geteuid() != 0:
        if not shutil.which("sudo"):
            raise SystemExit(f"missing {packages}; not root and no sudo: install them by hand")
        prefix = ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = [*prefix, "apt-get", "install", "-y", "--no-install-recommends", *packages]
    log(f"installing: {' '.join(packages)}")
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode == 0:
        return
    log("apt-get install failed; running apt-get update once and retrying")
    subprocess.run([*prefix, "apt-get", "update"], env=env, stdout=subprocess.DEVNULL, check=True)
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)


def ensure_debian(binaries: list[str]) -> None:
    missing = sorted({DEBIAN_TOOLS[b] for b in binaries if which(b) is None})
    if missing:
        _apt_install(missing)
    still = [b for b in binaries if which(b) is None]
    if still:
        raise SystemExit(f"still missing after apt-get: {still}")


def ensure_mitmproxy() -> Path:
    """mitmdump from PyPI in its own venv (never the project's)."""
    venv = cache_dir() / "mitm-venv"
    exe = venv / "bin" / "mitmdump"
    if exe.exists():
        return exe
    log(f"installing mitmproxy into {venv}")
    venv.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "mitmproxy"], check=True
    )
    if not exe.exists():
        raise SystemExit("mitmproxy installed but no mitmdump in its venv")
    return exe


# ======================================================================= rlimit etc.
def raise_nofile(target: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE for this process (and so for every child it starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < target:
        # only possible with CAP_SYS_RESOURCE (root outside a restricted container)
        with contextlib.suppress(ValueError, OSError):
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, min(target, nr_open)))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new_soft = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if new_soft > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited ({proc.returncode}) before :{port}")
        with contextlib.suppress(OSError), socket.create_connection((LOCAL, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {LOCAL}:{port} after {timeout}s")


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(val.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (``/proc/PID/stat``), seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def machine_info() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
    }


# ============================================================ processes, by their pid
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(pid: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Registry:
    """Every process the benchmark started; ``stop_all`` stops them by pid, newest first.

    A process's descendants (nginx workers, socat's forks, sshd's per-connection
    children) are looked up in /proc before it is stopped, and any still alive after it
    exited are signalled by their own pids.
    """

    def __init__(self, prefix: str = "burrow-bench-") -> None:
        self.procs: list = []  # subprocess.Popen or tests.procs.BurrowProc
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self._stopped = False
        atexit.register(self.stop_all)

    def popen(self, cmd: list[str], name: str, **kw) -> subprocess.Popen:
        logf = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        kw.setdefault("stdout", logf)
        kw.setdefault("stderr", logf)
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(cmd, **kw)
        proc._bench_log = logf  # type: ignore[attr-defined]
        proc._bench_name = name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def add(self, proc) -> None:
        self.procs.append(proc)

    def log_tail(self, name: str, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return (self.tmp / f"{name}.log").read_text(errors="replace")[-n:]
        return ""

    def stop(self, proc) -> None:
        popen = getattr(proc, "proc", proc)  # BurrowProc wraps a Popen
        kids = descendants(popen.pid) if popen.poll() is None else []
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(10)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(10)
        leftover = [k for k in kids if _alive(k)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for k in leftover:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(k, sig)
            deadline = time.monotonic() + 3
            while leftover and time.monotonic() < deadline:
                leftover = [k for k in leftover if _alive(k)]
                time.sleep(0.05)
            if not leftover:
                break
        logf = getattr(proc, "_bench_log", None)
        if logf is not None:
            logf.close()

    def remove(self, proc) -> None:
        self.stop(proc)
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    def stop_all(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc)
        self.procs.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def install_signal_handlers() -> None:
    """Ctrl+C and SIGTERM both raise KeyboardInterrupt, so ``finally`` cleans up (also
    when started as a background job with SIGINT ignored)."""

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, on_term)


# ============================================================================ upstreams
NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {nofile};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections {conns}; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    server {{
        listen {host}:{port} backlog=4096;
        location = /small {{ default_type text/plain; return 200 "{small}"; }}
        location = /1m {{ root {www}; default_type application/octet-stream; }}
    }}
}}
"""


def _nofile_for_children(want: int) -> int:
    """A per-process fd limit a child may set for itself: at most our hard limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return max(1024, want if hard == resource.RLIM_INFINITY else min(want, hard))


def start_nginx(reg: Registry, workers: str = "1", conns: int = 4096) -> int:
    """nginx on 127.0.0.1: ``/small`` answers 13 bytes, ``/1m`` a 1 MiB file."""
    nginx = which("nginx")
    assert nginx is not None
    www = reg.tmp / "www"
    www.mkdir(exist_ok=True)
    (www / "1m").write_bytes(bytes(range(256)) * (BIG_SIZE // 256))
    # nginx workers drop to "nobody" when the master is root: let them read the file
    for p in (reg.tmp, www):
        p.chmod(0o755)
    (www / "1m").chmod(0o644)
    port = free_port()
    conf = reg.tmp / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            workers=workers,
            nofile=_nofile_for_children(conns * 2 + 64),
            conns=conns,
            tmp=reg.tmp,
            host=LOCAL,
            port=port,
            small=SMALL_BODY,
            www=www,
        )
    )
    proc = reg.popen(
        [nginx, "-c", str(conf), "-p", str(reg.tmp), "-e", str(reg.tmp / "nginx-error.log")],
        "nginx",
    )
    wait_port(port, proc)
    return port


def start_iperf(reg: Registry) -> int:
    port = free_port()
    proc = reg.popen(["iperf3", "-s", "-B", LOCAL, "-p", str(port)], "iperf3-server")
    wait_port(port, proc)
    return port


# ================================================================================= wrk
WRK_LUA = r"""
-- Bounded in count as well as by -d: each thread stops at its share of the total, and
-- SIGINTs wrk itself so the main thread reports at once instead of sleeping out -d.
-- A request() hook (not response(), which would copy every body into Lua) counts.
local ffi = require("ffi")
ffi.cdef[[ int kill(int pid, int sig); int getpid(void); ]]
local limit = tonumber(os.getenv("BENCH_PER_THREAD") or "0")
local count = 0
local req
function init(args)
  req = wrk.format()
end
function request()
  count = count + 1
  if limit > 0 and count == limit then
    ffi.C.kill(ffi.C.getpid(), 2)
  end
  return req
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d bytes=%d duration_us=%d p50_us=%d p99_us=%d errors=%d status=%d\n",
    summary.requests, summary.bytes, summary.duration, latency:percentile(50),
    latency:percentile(99), e.connect + e.read + e.write + e.timeout, e.status))
end
"""


@dataclass
class WrkResult:
    requests: int
    bytes: int
    seconds: float
    p50_us: float
    p99_us: float
    errors: int
    status_errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mbps(self) -> float:
        return self.bytes / MB / self.seconds if self.seconds else 0.0


def wrk(
    reg: Registry,
    port: int,
    path: str,
    *,
    host: str | None = None,
    threads: int = 2,
    conns: int = 32,
    seconds: float = 5,
    max_requests: int = 2_000_000,
) -> WrkResult:
    script = reg.tmp / "bench.lua"
    if not script.exists():
        script.write_text(WRK_LUA)
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "5s"]
    cmd += ["-s", str(script)]
    if host:
        cmd += ["-H", f"Host: {host}"]
    cmd.append(f"http://{LOCAL}:{port}{path}")
    env = {**os.environ, "BENCH_PER_THREAD": str(max(1, max_requests // threads))}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    reg.add(proc)
    try:
        out, err = proc.communicate(timeout=seconds + 20)
    except subprocess.TimeoutExpired:
        out, err = "", "timed out"
    finally:
        reg.remove(proc)
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: {out[-400:]} {err[-400:]}")
    kv = {k: int(v) for k, v in (item.split("=") for item in line.split()[1:])}
    return WrkResult(
        requests=kv["requests"],
        bytes=kv["bytes"],
        seconds=kv["duration_us"] / 1e6,
        p50_us=kv["p50_us"],
        p99_us=kv["p99_us"],
        errors=kv["errors"],
        status_errors=kv["status"],
    )


def iperf3(reg: Registry, port: int, seconds: int = 5) -> tuple[float, str | None]:
    """MB/s received by the iperf3 server (client sends), and an error if any."""
    cmd = ["iperf3", "-c", LOCAL, "-p", str(port), "-t", str(seconds), "-J"]
    cmd += ["--connect-timeout", "5000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reg.add(proc)
    try:
        out, err = proc.communicate(timeout=seconds + 25)
    except subprocess.TimeoutExpired:
        out, err = "", "timed out"
    finally:
        reg.remove(proc)
    try:
        data = json.loads(out)
    except ValueError:
        return 0.0, f"iperf3: {err.strip()[-300:] or out[-300:]}"
    if data.get("error"):
        return 0.0, f"iperf3: {data['error']}"
    recv = data["end"]["sum_received"]
    return recv["bytes"] / MB / recv["seconds"], None
