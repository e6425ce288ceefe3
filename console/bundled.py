"""The bundled backend: an edge and a local agent as child processes.

``burrow`` starts them when nothing answers at the local defaults, ``burrow demo``
always does (plus a demo upstream and some traffic).  They are ordinary
``burrow serve`` / ``burrow agent`` processes speaking ``--json``, stopped by pid
when the console exits.  The console still reaches them only over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path


class BackendError(Exception):
    pass


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    ready: dict = field(default_factory=dict)
    drain: asyncio.Task | None = None


class BundledBackend:
    def __init__(self, data_dir: Path, *, ephemeral_ports: bool = False) -> None:
        self.data_dir = data_dir
        self.ephemeral = ephemeral_ports
        self.children: list[Child] = []
        self.edge: dict = {}
        self.agent: dict = {}

    async def _spawn(self, name: str, args: list[str], timeout: float = 30.0) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "backend",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "BURROW_DATA_DIR": str(self.data_dir)},
            start_new_session=True,  # ctrl+c in the console must not kill them mid-frame
        )
        child = Child(name, proc)
        self.children.append(child)
        try:
            while True:
                line = await asyncio.wait_for(proc.stdout.readline(), timeout)
                if not line:
                    err = (await proc.stderr.read()).decode(errors="replace").strip()
                    raise BackendError(f"{name} exited: {err.splitlines()[-1] if err else 'no output'}")
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("event") == "ready":
                    child.ready = ev
                    break
        except TimeoutError:
            raise BackendError(f"{name} did not start within {timeout:.0f}s") from None
        child.drain = asyncio.ensure_future(_drain(proc))
        return child

    async def start(self, progress=lambda msg: None) -> None:
        port = (lambda n: "0") if self.ephemeral else (lambda n: str(n))
        progress("starting the edge…")
        edge = await self._spawn(
            "edge",
            [
                "serve",
                "--json",
                "--data-dir",
                str(self.data_dir),
                "--api-addr",
                f"127.0.0.1:{port(4041)}",
                "--ingress-addr",
                f"127.0.0.1:{port(4042)}",
                "--http-addr",
                f"127.0.0.1:{port(4080)}",
                "--https-addr",
                f"127.0.0.1:{port(4443)}",
            ],
        )
        self.edge = edge.ready
        progress("starting the local agent…")
        agent = await self._spawn(
            "agent",
            [
                "agent",
                "--json",
                "--server-addr",
                self.edge["ingress_addr"],
                "--root-cas",
                self.edge["ca_file"],
                "--web-addr",
                f"127.0.0.1:{port(4040)}",
            ],
        )
        self.agent = agent.ready
        progress("connected")

    @property
    def agent_url(self) -> str:
        return f"http://{self.agent['web_addr']}"

    @property
    def api_url(self) -> str:
        return self.edge["api_url"]

    @property
    def api_key(self) -> str | None:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.data_dir / "bootstrap.json").read_text()).get("api_key")
        return None

    async def stop(self) -> None:
        for child in reversed(self.children):
            if child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                await asyncio.wait_for(child.proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                await child.proc.wait()
        self.children.clear()


async def _drain(proc: asyncio.subprocess.Process) -> None:
    """Keep reading a child's output so that its pipes never fill up."""
    async def eat(stream):
        with contextlib.suppress(Exception):
            while await stream.read(65536):
                pass

    await asyncio.gather(eat(proc.stdout), eat(proc.stderr))
