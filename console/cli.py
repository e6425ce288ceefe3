"""The ``burrow`` command: the console by default; engine commands go to :mod:`backend.cli`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
from pathlib import Path

ENGINE_COMMANDS = {"serve", "agent", "start", "http", "tcp", "tls", "status", "stop", "version", "config", "admin"}


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ENGINE_COMMANDS:
        from backend.cli import main as engine_main

        return engine_main(argv)
    args = _parser().parse_args(argv)
    if args.version:
        from backend import __version__

        print(f"burrow version {__version__}")  # ngrok's shape: tools split on "version "
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
    app = make_app(settings, demo)
    # Everything made so far (modules, classes, settings) lives as long as the process:
    # keep it out of the cyclic garbage collector, whose full passes over it took ~30 ms
    # (a dropped frame) every second or so under live traffic.
    gc.freeze()
    gc.enable()
    app.run()
    if app.owned_backend is not None and app.backend_choice == "leave":
        from backend import local

        local.leave(app.owned_backend)
        print(
            f"burrow: the local edge and agent keep running (agent API {app.owned_backend['agent_url']}); "
            "`burrow` attaches to them again, `burrow stop` stops them"
        )
    return app.return_code or 0


def make_app(settings, demo: bool = False):
    """The console against the given URLs, else the local backend (started if none).

    The local backend (:mod:`backend.local`) is shared with ``burrow http``: whichever
    starts first starts it, the others attach.  A console that started it asks on quit
    whether to stop it; one killed with its terminal leaves it running, and the next
    console finds it, says so and takes it over.
    """
    from console.app import BurrowApp

    state: dict = {}
    app: BurrowApp

    async def starter(progress):
        agent_url, api_url, api_key = settings.agent_url, settings.api_url, settings.api_key
        if not demo and (agent_url or api_url):
            return agent_url, api_url, api_key
        # Only needed without a URL to talk to: not imported before the first frame.
        from backend import local

        def progress_from_thread(msg: str) -> None:
            app.call_from_thread(progress, msg)

        if demo:
            import functools

            from console.client import AgentClient
            from console.demo import Demo

            # the demo's backend is private (fresh data, any ports); it becomes the
            # machine's local backend, for `burrow http` to join, unless one runs already
            register = await asyncio.to_thread(local.read_record) is None
            rec = await asyncio.to_thread(functools.partial(
                local.start, "demo", state_dir=Path(tempfile.mkdtemp(prefix="burrow-demo-")),
                ephemeral=True, register=register, progress=progress_from_thread,
            ))
            app.owned_backend = rec
            app.edge_info = rec
            progress("starting the demo app…")
            d = Demo(AgentClient(rec["agent_url"]), rec["http_url"])
            state["demo"] = d
            await d.start()
            return rec["agent_url"], rec["api_url"], _bootstrap_key(Path(rec["data_dir"]))
        # Only this user's own local backend: not whatever answers at 127.0.0.1:4040,
        # which may be another user's agent (or a real ngrok: --agent-url says so)
        rec = await asyncio.to_thread(local.read_record)
        if local.reaped:
            app.notify("Stopped the edge and agent that an earlier `burrow demo` left running "
                       "when its terminal went away.", timeout=10)
        if rec is not None:
            what = local.describe(rec)
            if local.orphaned(rec):
                left = rec.get("left")
                await asyncio.to_thread(local.adopt, rec)
                app.owned_backend = rec
                app.notify(
                    (f"Attached to the local edge and agent left running ({what})."
                     if left else
                     f"Found the local edge and agent still running after their console went away "
                     f"({what}): attached.") + " Quitting asks whether to stop them; `burrow stop` stops them.",
                    timeout=15,
                )
            else:
                app.notify(f"Attached to the local edge and agent ({what}).", timeout=8)
        else:
            rec, started = await asyncio.to_thread(local.find_or_start, "console", progress_from_thread)
            if started:
                app.owned_backend = rec
        app.edge_info = rec
        key = api_key or _bootstrap_key(Path(rec["data_dir"]))
        return rec["agent_url"], rec.get("api_url"), key

    async def on_exit():
        if "demo" in state:
            await state["demo"].stop()
        rec = app.owned_backend
        if rec is None:
            return
        # the demo's backend is stopped unless the user chose to leave it; a console's is
        # stopped only when the user said so (a crash or a closed terminal leaves it)
        if app.backend_choice == "stop" or (demo and app.backend_choice != "leave"):
            from backend import local

            await asyncio.to_thread(local.stop, rec)

    app = BurrowApp(settings, starter, on_exit=on_exit)
    return app


def _bootstrap_key(data_dir: Path) -> str | None:
    import json

    try:
        return json.loads((data_dir / "bootstrap.json").read_text()).get("api_key")
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
