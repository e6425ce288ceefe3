"""The local backend: one edge and one agent per user, in the background, shared.

``burrow`` (the console), ``burrow demo``, ``burrow http|tcp|tls`` all meet here.  The
first of them that needs a backend starts it (an edge unless one already listens at the
default ingress, and an agent) as detached processes in their own session, and writes
``run/local.json`` in the data dir: pids, the agent API, the cloud API, who started it
(no secrets: the console reads the API key from the edge's 0600 ``bootstrap.json``).
Everyone after that attaches to it: the console watches that one agent, ``burrow http``
adds its tunnel to it over the agent API and removes it on exit.  So every tunnel and
every capture on this machine is in one place, in whatever order things were started.

Like a tmux server, the backend outlives the terminal that started it: a dropped SSH
session or a killed tmux leaves it running (nothing is lost), the next ``burrow`` finds
it and says so, ``burrow status`` shows it and ``burrow stop`` stops it.  A console that
started it asks before stopping it on quit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from backend.fsperm import FILE_MODE, private_dir

RECORD = "local.json"
DEFAULT_PORTS = {"agent": 4040, "api": 4041, "ingress": 4042, "http": 4080, "https": 4443}

# children started by this process, so that stop() can reap them (a zombie still answers
# kill(pid, 0)) and pid_alive() can tell an exited child from a live one
_children: dict[int, subprocess.Popen] = {}
# backends read_record() stopped because nobody could use them any more (an orphaned demo)
reaped: list[dict] = []


class LocalError(Exception):
    """The local backend could not be started, found or stopped (one line for the user)."""


def data_dir() -> Path:
    from backend.cli import default_data_dir

    return default_data_dir()


def run_dir() -> Path:
    return private_dir(private_dir(data_dir()) / "run")


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    proc = _children.get(pid)
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def locked():
    """One find-or-start at a time: two ``burrow http`` typed at once start one backend."""
    fd = os.open(run_dir() / "lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_record() -> dict | None:
    """The live local backend, or None (a record whose agent is gone is removed)."""
    path = run_dir() / RECORD
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(rec, dict)
        or not pid_alive(rec.get("agent_pid"))
        # a pid reused after a crash: the agent must also still be listening
        or not _listening(str(rec.get("agent_url", "")).removeprefix("http://"))
    ):
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    if rec.get("by") == "demo" and orphaned(rec):
        # `burrow demo` died with its terminal: its demo app (in the console's process) is
        # gone and its data was a throwaway, so its backend is nobody's work: stop it
        stop(rec)
        reaped.append(rec)
        return None
    return rec


def write_record(rec: dict) -> None:
    path = run_dir() / RECORD
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "w") as f:
        json.dump(rec, f, indent=2)
    os.replace(tmp, path)


def forget(rec: dict) -> None:
    """Remove the record if it still describes ``rec``'s backend."""
    path = run_dir() / RECORD
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("agent_pid") == rec.get("agent_pid"):
            path.unlink()


def _port(name: str) -> int:
    """The default port when it is free, else 0 (any): ngrok may hold 4040, say."""
    if os.environ.get("BURROW_LOCAL_PORTS") == "0":
        return 0
    port = DEFAULT_PORTS[name]
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


def _listening(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.3):
            return True
    except (OSError, ValueError):
        return False


def _spawn(name: str, args: list[str], env: dict, timeout: float) -> tuple[subprocess.Popen, dict]:
    rd = run_dir()
    ready = rd / f"{name}.ready"
    with contextlib.suppress(OSError):
        ready.unlink()
    log_path = rd / f"{name}.log"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    with os.fdopen(fd, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} burrow {' '.join(args)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "backend", *args, "--ready-file", str(ready)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,  # not the terminal's: a closed terminal leaves it running
            close_fds=True,
        )
    _children[proc.pid] = proc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LocalError(f"the {name} exited: {_last_line(log_path)} (log: {log_path})")
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(ready.read_text())
            ready.unlink()
            return proc, info
        time.sleep(0.02)
    _kill(proc.pid)
    raise LocalError(f"the {name} did not start within {timeout:.0f}s (log: {log_path})")


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return lines[-1].removeprefix("burrow: error: ")
    return "no output"


def start(by: str, *, state_dir: Path | None = None, ephemeral: bool = False,
          register: bool = True, progress=lambda msg: None, timeout: float = 30.0) -> dict:
    """Start an edge (unless one listens at the default ingress) and an agent; record them."""
    state = state_dir or data_dir()
    private_dir(state)
    env = {**os.environ, "BURROW_DATA_DIR": str(state)}
    port = (lambda n: 0) if ephemeral else _port
    rec: dict = {"by": by, "started": time.time(), "owner_pid": os.getpid(), "data_dir": str(state)}
    default_ingress = f"127.0.0.1:{DEFAULT_PORTS['ingress']}"
    edge = None
    try:
        if (
            not ephemeral
            and state_dir is None
            and os.environ.get("BURROW_LOCAL_PORTS") != "0"
            and (state / "bootstrap.json").is_file()
            and _listening(default_ingress)
        ):
            # this user runs `burrow serve` with the defaults (its credentials are in our
            # data dir): use that edge; someone else's edge there is none of our business
            rec.update(edge_pid=None, api_url=f"http://127.0.0.1:{DEFAULT_PORTS['api']}",
                       ingress_addr=default_ingress, ca_file=str(state / "ca.pem"))
        else:
            progress("starting the edge…")
            edge, info = _spawn("edge", [
                "serve",
                "--api-addr", f"127.0.0.1:{port('api')}",
                "--ingress-addr", f"127.0.0.1:{port('ingress')}",
                "--http-addr", f"127.0.0.1:{port('http')}",
                "--https-addr", f"127.0.0.1:{port('https')}",
            ], env, timeout)
            rec.update(edge_pid=edge.pid, api_url=info["api_url"], ingress_addr=info["ingress_addr"],
                       http_url=info.get("http_url"), https_url=info.get("https_url"),
                       domain=info.get("domain"), ca_file=info["ca_file"])
        progress("starting the local agent…")
        # --config: not the user's agent config file (its authtoken is for another edge)
        args = ["agent", "--server-addr", rec["ingress_addr"], "--web-addr", f"127.0.0.1:{port('agent')}",
                "--inspect-db", str(state / "captures.db"), "--config", os.devnull]
        if Path(rec["ca_file"]).is_file():
            args += ["--root-cas", rec["ca_file"]]
        agent, info = _spawn("agent", args, env, timeout)
    except BaseException:
        if edge is not None:
            _kill(edge.pid)
        raise
    rec.update(agent_pid=agent.pid, agent_url=f"http://{info['web_addr']}")
    if register:
        write_record(rec)
    return rec


def find_or_start(by: str, progress=lambda msg: None) -> tuple[dict, bool]:
    """The live local backend, starting it if there is none; and whether we started it."""
    with locked():
        rec = read_record()
        if rec is not None:
            return rec, False
        return start(by, progress=progress), True


def leave(rec: dict) -> None:
    """The console that owns the backend quits and leaves it running on purpose."""
    rec["left"] = True
    rec["owner_pid"] = None
    _update(rec)


def adopt(rec: dict) -> None:
    """A console takes over a backend whose console went away (its terminal closed)."""
    rec["owner_pid"] = os.getpid()
    rec.pop("left", None)
    _update(rec)


def _update(rec: dict) -> None:
    with locked():
        cur = read_record()
        if cur is not None and cur.get("agent_pid") == rec.get("agent_pid"):
            write_record(rec)


def orphaned(rec: dict) -> bool:
    """Started by a console that is no longer running."""
    return rec.get("by") in ("console", "demo") and not pid_alive(rec.get("owner_pid"))


def _kill(pid: int | None, timeout: float = 5.0) -> None:
    if not pid:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    proc = _children.pop(pid, None)
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return
        elif not pid_alive(pid):
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait()


def stop(rec: dict) -> None:
    """Stop the agent, then the edge if this backend started one; drop the record."""
    _kill(rec.get("agent_pid"))
    _kill(rec.get("edge_pid"))
    forget(rec)


def describe(rec: dict) -> str:
    when = time.strftime("%H:%M", time.localtime(rec.get("started", 0)))
    by = {"console": "a console", "demo": "burrow demo"}.get(rec.get("by", ""), f"`burrow {rec.get('by')}`")
    return f"started {when} by {by}; agent pid {rec.get('agent_pid')}"
