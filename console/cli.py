"""The ``burrow`` command: the console by default; engine commands go to :mod:`backend.cli`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
from pathlib import Path

ENGINE_COMMANDS = {"serve", "agent", "start", "http", "tcp", "tls"}
AGENT_DEFAULT = "http://127.0.0.1:4040"
API_DEFAULT = "http://127.0.0.1:4041"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="burrow",
        description="Self-hosted tunnels with a terminal console. Engine commands: "
        "serve, agent, http, tcp, tls (see `burrow serve --help`).",
    )
    p.add_argument("mode", nargs="?", choices=["console", "demo"], default="console")
    p.add_argument("--api-url", default=None, help="cloud API (default: local, or BURROW_API_URL)")
    p.add_argument("--api-key", default=None, help="cloud API key (or BURROW_API_KEY)")
    p.add_argument("--agent-url", default=None, help="agent API (default: local, or BURROW_AGENT_URL)")
    p.add_argument("--theme", default=None)
    p.add_argument("--read-only", action="store_true", default=None)
    p.add_argument("--web", action="store_true", help="serve the console in a browser tab (textual-serve)")
    p.add_argument("--web-addr", default="127.0.0.1:8000", help="where --web listens (loopback)")
    p.add_argument("--version", action="store_true")
    return p


async def _answers(url: str, path: str) -> bool:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=0.5) as c:
            r = await c.get(url + path)
        return r.status_code < 500
    except httpx.HTTPError:
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ENGINE_COMMANDS:
        from backend.cli import main as engine_main

        return engine_main(argv)
    args = _parser().parse_args(argv)
    if args.version:
        from backend import __version__

        print(f"burrow {__version__}")
        return 0

    # Until the console runs, the cyclic garbage collector is off: with textual and
    # pydantic loading, its full passes (15-30 ms each) came one to three times before the
    # first frame.  run_console freezes what start-up made and turns it back on.
    if not args.web:
        gc.disable()
    try:
        from console.config import ConfigError, load_settings

        try:
            settings = load_settings(
                api_url=args.api_url,
                api_key=args.api_key,
                agent_url=args.agent_url,
                theme=args.theme,
                read_only=args.read_only,
            )
        except ConfigError as exc:
            print(f"burrow: error: {exc}", file=sys.stderr)
            return 1
        if args.web:
            return serve_web(args, argv)
        return run_console(settings, demo=args.mode == "demo")
    finally:
        gc.enable()


def serve_web(args, argv: list[str]) -> int:
    """Serve the same console in a browser tab: each tab runs ``burrow`` without --web."""
    import shlex

    from backend.netutil import AddressError, is_loopback, parse_hostport

    try:
        host, port = parse_hostport(args.web_addr)
    except AddressError as exc:
        print(f"burrow: error: --web-addr: {exc}", file=sys.stderr)
        return 1
    if not is_loopback(host):
        print("burrow: error: --web-addr must be a loopback address (the console has no login)", file=sys.stderr)
        return 1
    try:
        from textual_serve.server import Server
    except ImportError:
        print("burrow: error: --web needs textual-serve (pip install textual-serve)", file=sys.stderr)
        return 1
    rest, skip = [], False
    for a in argv:  # the same flags, minus the web ones
        if skip:
            skip = False
        elif a == "--web":
            continue
        elif a == "--web-addr":
            skip = True
        elif not a.startswith("--web-addr="):
            rest.append(a)
    command = shlex.join([sys.executable, "-m", "console.cli", *rest])
    # A taken port: one line, not aiohttp's traceback.  Checked first (the usual case),
    # and caught from the server too (taken between the check and the bind).
    problem = _cannot_listen(host, port)
    if problem is None:
        try:
            Server(command, host=host, port=port, title="burrow").serve()
        except OSError as exc:
            problem = os.strerror(exc.errno) if exc.errno else str(exc)
    if problem is not None:
        print(f"burrow: error: cannot listen on --web-addr {args.web_addr}: {problem}", file=sys.stderr)
        return 1
    return 0


def _cannot_listen(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (e.g. "Address already in use"), or None."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            s.bind(addr)
    except OSError as exc:
        return os.strerror(exc.errno) if exc.errno else str(exc)
    return None


def run_console(settings, demo: bool = False) -> int:
    from console.app import BurrowApp

    state: dict = {}

    async def starter(progress):
        agent_url, api_url, api_key = settings.agent_url, settings.api_url, settings.api_key
        if not demo and (agent_url or api_url):
            return agent_url, api_url, api_key
        # Only needed without a URL to talk to: not imported before the first frame.
        from backend.cli import default_data_dir
        from console.bundled import BundledBackend
        from console.client import AgentClient
        from console.demo import Demo

        if not demo and (await _answers(AGENT_DEFAULT, "/api/tunnels") or await _answers(API_DEFAULT, "/")):
            if api_key is None:
                api_key = _bootstrap_key(default_data_dir())
            agent = AGENT_DEFAULT if await _answers(AGENT_DEFAULT, "/api/tunnels") else None
            return agent, API_DEFAULT, api_key
        data_dir = Path(tempfile.mkdtemp(prefix="burrow-demo-")) if demo else default_data_dir()
        backend = BundledBackend(data_dir, ephemeral_ports=demo)
        state["backend"] = backend
        await backend.start(progress)
        if demo:
            progress("starting the demo app…")
            d = Demo(AgentClient(backend.agent_url), backend.edge["http_url"])
            state["demo"] = d
            await d.start()
        return backend.agent_url, backend.api_url, backend.api_key

    async def on_exit():
        if "demo" in state:
            await state["demo"].stop()
        if "backend" in state:
            await state["backend"].stop()

    app = BurrowApp(settings, starter, on_exit=on_exit)
    # Everything made so far (modules, classes, settings) lives as long as the process:
    # keep it out of the cyclic garbage collector, whose full passes over it took ~30 ms
    # (a dropped frame) every second or so under live traffic.
    gc.freeze()
    gc.enable()
    app.run()
    # belt and braces: never leave children running if the app died early
    if "backend" in state and state["backend"].children:
        asyncio.run(state["backend"].stop())
    return app.return_code or 0


def _bootstrap_key(data_dir: Path) -> str | None:
    import json

    try:
        return json.loads((data_dir / "bootstrap.json").read_text()).get("api_key")
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
