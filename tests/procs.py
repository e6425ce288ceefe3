"""Start and stop real ``burrow`` processes, reading their ``--json`` event lines."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

READY_TIMEOUT = 20.0


class BurrowProc:
    """A burrow process whose stdout JSON lines are collected by a reader thread."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, root: Path | None = None) -> None:
        """``root``: the checkout whose ``backend`` runs (default: this one; the
        benchmarks run an older commit beside it to measure before and after)."""
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backend", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            cwd=root or Path(__file__).resolve().parent.parent,
        )
        self.events: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []
        self.ready: dict = {}
        self._stderr: list[bytes] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"event": "_text", "line": line.decode(errors="replace")})

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return b"".join(self._stderr).decode(errors="replace")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_event(self, name: str, timeout: float = 10.0) -> dict:
        """Wait for the next event called ``name`` (events seen earlier are kept in .seen)."""
        for ev in self.seen:
            if ev.get("event") == name and not ev.get("_taken"):
                ev["_taken"] = True
                return ev
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"no {name!r} event from burrow {' '.join(self.args[:1])} in {timeout}s; "
                    f"exit={self.proc.poll()} stderr={self.stderr[-2000:]!r}"
                )
            try:
                ev = self.events.get(timeout=min(left, 0.2))
            except queue.Empty:
                if self.proc.poll() is not None and self.events.empty():
                    raise TimeoutError(
                        f"burrow exited ({self.proc.returncode}) before {name!r}: {self.stderr[-2000:]!r}"
                    ) from None
                continue
            self.seen.append(ev)
            if ev.get("event") == name:
                ev["_taken"] = True
                return ev

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def wait_exit(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    # convenience accessors for an edge's ready line
    @property
    def http_addr(self) -> tuple[str, int]:
        host, port = self.ready["http_url"].split("://", 1)[1].rsplit(":", 1)
        return host, int(port)

    @property
    def public_url(self) -> str:
        return self.ready["tunnels"][0]["public_url"]


def edge_args(data_dir: Path, host: str = "127.0.0.1", extra: tuple[str, ...] = (), **ports: int) -> list[str]:
    """``burrow serve`` arguments: every listener on ``host`` (port 0 unless given),
    the test credentials, ``--json``, then ``extra`` (the cluster flags, say)."""

    def addr(name: str) -> str:
        return f"{host}:{ports.get(name, 0)}"

    return [
        "serve",
        "--data-dir",
        str(data_dir),
        "--api-addr",
        addr("api"),
        "--ingress-addr",
        addr("ingress"),
        "--http-addr",
        addr("http"),
        "--https-addr",
        addr("https"),
        "--tcp-ports",
        "31000-31999",
        "--authtoken",
        "test-authtoken",
        "--api-key",
        "test-api-key",
        "--json",
        *extra,
    ]


def start_edge(
    data_dir: Path,
    root: Path | None = None,
    host: str = "127.0.0.1",
    extra: tuple[str, ...] = (),
    wait: bool = True,
    **ports: int,
) -> BurrowProc:
    """Start an edge; ``wait=False`` returns at once (then ``proc.ready = proc.wait_event("ready")``)."""
    proc = BurrowProc(edge_args(data_dir, host, extra, **ports), root=root)
    if wait:
        proc.ready = proc.wait_event("ready", READY_TIMEOUT)
    return proc


def start_agent(
    edge: BurrowProc,
    proto: str,
    addr: str,
    *flags: str,
    home: Path,
    check: bool = True,
    root: Path | None = None,
) -> BurrowProc:
    home.mkdir(parents=True, exist_ok=True)
    args = [
        proto,
        addr,
        "--server-addr",
        edge.ready["ingress_addr"],
        "--root-cas",
        edge.ready["ca_file"],
        "--web-addr",
        "127.0.0.1:0",
        "--json",
        *flags,
    ]
    if "--authtoken" not in flags:
        args += ["--authtoken", "test-authtoken"]
    env = {"XDG_DATA_HOME": str(home), "BURROW_DATA_DIR": str(home / "burrow")}
    proc = BurrowProc(args, env=env, root=root)
    if check:
        proc.ready = proc.wait_event("ready", READY_TIMEOUT)
    return proc


def host_of(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
