"""``burrow serve``, ``burrow agent`` and ``burrow http|tcp|tls``: the engine's commands.

Every long-running command prints, with ``--json``, one JSON object per line, the
first being ``{"event": "ready", ...}`` with every address it listens on.  Errors a
user can cause give one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from backend import __version__
from backend.netutil import AddressError, is_loopback, parse_hostport


class CLIError(Exception):
    """A one-line error for the user.

    ``log`` is how an agent started with ``--log`` reports it, in ngrok's words:
    ``(msg, obj, err)`` for a ``lvl=eror`` logfmt line written before the exit.
    """

    #: the exit status (2: a setting that cannot be used, as argparse exits for a bad flag)
    status = 1

    def __init__(self, text: str, log: tuple[str, str, str] | None = None) -> None:
        super().__init__(text)
        self.log = log


class SettingsError(CLIError):
    status = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + line
        self.exit(2, f"{self.prog}: error: {message}\n")


def default_data_dir() -> Path:
    env = os.environ.get("BURROW_DATA_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "burrow"


def _emit(ev: dict) -> None:
    sys.stdout.write(json.dumps(ev, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _write_ready(path: Path, ev: dict) -> None:
    """The ready line, for a parent that started us detached (backend.local)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(ev, f)
    os.replace(tmp, path)


def _check_addr(flag: str, value: str, allow_remote: bool) -> str:
    try:
        host, _ = parse_hostport(value)
    except AddressError as exc:
        raise CLIError(f"{flag}: {exc}") from None
    if not allow_remote and not is_loopback(host):
        raise CLIError(f"{flag} {value} is not a loopback address; pass --allow-remote to bind it anyway")
    return value


def _port_range(text: str) -> tuple[int, int]:
    lo_s, sep, hi_s = text.partition("-")
    try:
        lo = int(lo_s)
        hi = int(hi_s) if sep else lo
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port range {text!r} (expected LOW-HIGH)") from None
    if not 1 <= lo <= hi <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port range {text!r}")
    return lo, hi


def _agent_failure(exc) -> CLIError:
    """One line for an error from the edge, with ngrok's code when it has one; logged
    as ngrok logs a session that ends for good (its err ends with the code)."""
    code = getattr(exc, "code", "")
    err = f"{exc}\n\n{code}" if code else str(exc)
    return CLIError(f"{exc} ({code})" if code else str(exc), ("session closing", "tunnels.session", err))


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not 0 <= v <= 86400 or v != v:
        raise argparse.ArgumentTypeError(f"seconds out of range: {text!r} (0-86400)")
    return v


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"count must not be negative: {text!r}")
    return v


# --------------------------------------------------------------------------- parsers
def build_parser(prog: str = "burrow") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Self-hosted tunnels that speak ngrok's wire formats.")
    parser.add_argument("--version", action="version", version=f"burrow version {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    _add_ngrok_commands(sub)
    from backend import admincli

    admincli.add_parser(sub, _Parser)

    s = sub.add_parser("serve", help="run the edge: ingress, public listeners and cloud API")
    s.add_argument("--data-dir", type=Path, default=None)
    s.add_argument("--api-addr", default="127.0.0.1:4041")
    s.add_argument("--ingress-addr", default="127.0.0.1:4042")
    s.add_argument("--http-addr", default="127.0.0.1:4080")
    s.add_argument("--https-addr", default="127.0.0.1:4443", help="'off' disables the https listener")
    s.add_argument("--tcp-ports", type=_port_range, default=(20000, 29999))
    s.add_argument("--tcp-host", default=None, help="host name used in tcp:// URLs")
    s.add_argument("--domain", default="burrow.localhost")
    s.add_argument("--api-key", action="append", default=None)
    s.add_argument("--authtoken", action="append", default=None)
    s.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --api-addr")
    s.add_argument(
        "--api-rate-limit",
        type=int,
        default=600,
        metavar="N",
        help="cloud API requests per account per minute, over all its API keys (0 = unlimited)",
    )
    s.add_argument(
        "--api-auth-fail-limit",
        type=int,
        default=30,
        metavar="N",
        help="failed cloud API key checks allowed per client IP per minute (0 = unlimited)",
    )
    s.add_argument(
        "--api-public-url",
        default=None,
        metavar="URL",
        help="the cloud API's URL as clients reach it, used in uri/next_page_uri "
        "(default: http://<--api-addr>)",
    )
    s.add_argument(
        "--api-read-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="deadline for a cloud API request head, and for its body (plus 1 s per 64 KiB)",
    )
    caps = (
        ("--max-sessions-per-authtoken", 10, "agent sessions online at once per authtoken (ERR_NGROK_108)"),
        ("--max-endpoints-per-account", 1000, "agent + cloud endpoints per account (ERR_NGROK_18021)"),
        ("--max-tcp-ports-per-account", 100, "public tcp ports per account (ERR_NGROK_508)"),
        ("--max-data-conns-per-session", 10000, "data connections (pooled + active) per agent session"),
    )
    for flag, default, what in caps:
        s.add_argument(flag, type=_count, default=default, metavar="N", help=f"{what}; 0 = no limit")
    s.add_argument(
        "--policy-eval-budget",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="traffic policy evaluation time per request; past it the request alone gets a 500",
    )
    lim = s.add_argument_group("public data path limits (0 = none)")
    lim.add_argument("--body-timeout", type=_seconds, default=60.0, metavar="SECS",
                     help="close a request whose body sends no byte for this long (408)")
    lim.add_argument("--send-timeout", type=_seconds, default=60.0, metavar="SECS",
                     help="close a client that reads nothing of a response for this long")
    lim.add_argument("--max-conns", type=_count, default=10_000, metavar="N",
                     help="concurrent public connections (http, https, tcp)")
    lim.add_argument("--max-conns-per-ip", type=_count, default=256, metavar="N",
                     help="concurrent public connections from one client address")
    lim.add_argument("--max-handshakes", type=_count, default=1024, metavar="N",
                     help="connections still in a handshake (ingress before auth; https before TLS), per listener")
    lim.add_argument("--max-handshakes-per-ip", type=_count, default=128, metavar="N",
                     help="the same, from one client address")
    lim.add_argument("--first-byte-timeout", type=_seconds, default=5.0, metavar="SECS",
                     help="close an ingress connection that sends nothing for this long")
    lim.add_argument("--handshake-timeout", type=_seconds, default=10.0, metavar="SECS",
                     help="TLS handshake plus first message on the ingress and https ports")
    acme = s.add_argument_group("certificates from an ACME CA (RFC 8555; needs burrow[acme])")
    acme.add_argument("--acme-directory", default=None, metavar="URL",
                      help="the CA's directory, e.g. https://acme-v02.api.letsencrypt.org/directory")
    acme.add_argument("--acme-email", default=None, metavar="ADDR", help="contact address for the ACME account")
    acme.add_argument("--acme-ca-root", type=Path, default=None, metavar="FILE",
                      help="PEM roots to trust for the directory's HTTPS (default: the system's)")
    acme.add_argument("--acme-rate-limit", type=_count, default=20, metavar="N",
                      help="new on-demand certificates per account per hour (0 = no limit)")
    acme.add_argument("--acme-challenges", default="tls-alpn-01,http-01", metavar="LIST",
                      help="challenge types to answer, in order of preference (tls-alpn-01 on the "
                      "https port, http-01 on the http port)")
    s.add_argument("--admin-key", default=None, metavar="KEY",
                   help="enables the admin API (/admin/accounts ...) and /metrics with this key "
                   "(16+ characters; prefer BURROW_ADMIN_KEY, a flag shows in ps)")
    s.add_argument("--metrics-public", action="store_true",
                   help="serve /metrics without the admin key (for a Prometheus on a private network)")
    s.add_argument("--log-format", choices=["text", "json", "logfmt"], default="text")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    s.add_argument("--store", default=None, metavar="URL",
                   help="cloud state: postgresql://... shares it between several edges (cluster "
                   "mode, pip install 'burrow[cluster]'); default SQLite in the data dir")
    cl = s.add_argument_group("cluster: several edges on one PostgreSQL (needs burrow[cluster])")
    cl.add_argument("--node-id", default=None, metavar="NAME", help="this edge's name in the cluster (default: new per start)")
    cl.add_argument("--peer-addr", default=None, metavar="HOST:PORT",
                    help="listener for connections other edges forward here (default 127.0.0.1:0)")
    cl.add_argument("--advertise-addr", default=None, metavar="HOST:PORT",
                    help="the ingress address agents dial for data connections (default: the bound one)")
    cl.add_argument("--peer-tls", choices=["auto", "on", "off"], default="auto",
                    help="mutual TLS with the cluster CA between edges (auto: unless the peer listener is on loopback)")
    # a setting not given on the command line comes from the environment, then the file
    for action in s._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    s.add_argument(
        "--config", type=Path, default=None, metavar="FILE",
        help="a YAML file of these settings (keys as the flags, with '_': api_addr); "
        "precedence: flag > environment (BURROW_API_ADDR) > file > default",
    )
    s.add_argument("--json", action="store_true")
    s.add_argument("--ready-file", type=Path, default=None, help=argparse.SUPPRESS)

    def conn_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server-addr", default=None, help="edge ingress HOST:PORT")
        p.add_argument("--authtoken", default=None)
        p.add_argument("--root-cas", default=None, help="CA file to verify the edge with")
        p.add_argument("--web-addr", default=None, help="agent API address (default 127.0.0.1:4040)")
        p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --web-addr")
        p.add_argument(
            "--web-allow-host", action="append", default=None, metavar="HOST[:PORT]",
            help="another Host header the agent API accepts (repeatable; ngrok's web_allow_hosts)",
        )
        p.add_argument(
            "--web-read-timeout", type=float, default=None, metavar="SECONDS",
            help="deadline for an agent API request head, and for its body (default 10)",
        )
        tls = p.add_mutually_exclusive_group()
        tls.add_argument(
            "--data-tls", dest="data_tls", action="store_const", const=True, default=None,
            help="TLS on data connections (default: only when the edge is not on loopback)",
        )
        tls.add_argument("--no-data-tls", dest="data_tls", action="store_const", const=False, help="plain TCP data connections")
        p.add_argument("--pool-size", type=int, default=None)
        p.add_argument(
            "--ha-connections", type=int, default=None, metavar="N",
            help="hold N sessions, each on a different edge of a cluster, serving the same URLs "
            "(default: 2 when the edge lists 2 or more live edges, else 1; 1 = one session)",
        )
        p.add_argument("--inspect-db-size", type=int, default=None, help="bytes; 0 = 50 MB, -1 = off")
        p.add_argument("--inspect-db", default=None, help="SQLite file keeping captures across restarts")
        p.add_argument(
            "--inspect-db-flush-ms", type=int, default=None,
            help="write finished captures to --inspect-db in batches this often (default 100); "
            "a kill -9 loses at most the last batch",
        )
        p.add_argument("--inspect-body-cap", type=int, default=None, help="bytes of each body to capture")
        p.add_argument("--log", default=None, help="'stdout' or a file: logfmt log lines like ngrok's")
        p.add_argument("--log-format", default="logfmt", choices=["logfmt", "json", "term"])
        p.add_argument("--log-level", default="info")
        p.add_argument("--region", default=None, help="accepted for ngrok compatibility")
        p.add_argument("--json", action="store_true")
        p.add_argument("--ready-file", type=Path, default=None, help=argparse.SUPPRESS)

    for proto in ("http", "tcp", "tls"):
        t = sub.add_parser(proto, help=f"start one {proto} tunnel to ADDR")
        t.add_argument("addr", metavar="ADDR", help="upstream: PORT, HOST:PORT or URL")
        t.add_argument("--url", default="")
        t.add_argument("--name", default="")
        t.add_argument("--binding", choices=["public", "internal", "kubernetes"], default=None)
        t.add_argument("--pooling-enabled", action="store_true")
        t.add_argument("--metadata", default="")
        t.add_argument("--description", default="")
        t.add_argument("--inspect", choices=["true", "false"], default="true")
        t.add_argument("--traffic-policy-file", type=Path, default=None)
        t.add_argument(
            "--standalone", action="store_true",
            help="run a private agent in this process (ngrok's way) instead of adding the "
            "tunnel to the local agent that the console watches",
        )
        conn_flags(t)

    a = sub.add_parser("agent", help="run an agent with the tunnels of a config file")
    a.add_argument("--config", type=Path, default=None)
    conn_flags(a)

    # ngrok's own spelling, so tools that launch "ngrok start --none" (pyngrok) can run burrow
    st = sub.add_parser("start", help="ngrok-compatible: start tunnels from the config (--none: none)")
    st.add_argument("names", nargs="*")
    st.add_argument("--none", action="store_true")
    st.add_argument("--all", action="store_true")
    st.add_argument("--config", type=Path, action="append", default=None)
    conn_flags(st)
    sub.add_parser("status", help="show the local backend (edge + agent) the console and `burrow http` share")
    sub.add_parser("stop", help="stop the local backend (edge + agent) and the tunnels on it")
    return parser


# ---------------------------------------------------------------------------- running
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command in ("status", "stop"):
            try:
                return _local_command(args.command)
            except BrokenPipeError:  # `burrow status | head`
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 0
        if args.command in ("version", "config"):
            return _ngrok_command(args)
        if args.command == "admin":
            from backend import admincli

            return admincli.run(args)
        runner = {"serve": _serve, "agent": _agent, "start": _agent, "http": _agent, "tcp": _agent, "tls": _agent}
        return _run(runner[args.command](args))
    except CLIError as exc:
        print(f"burrow {args.command}: error: {exc}", file=sys.stderr)
        return exc.status


def _local_command(command: str) -> int:
    import httpx

    from backend import local

    rec = local.read_record()
    if rec is None:
        print("burrow: no local backend is running")
        return 1 if command == "status" else 0
    tunnels, captures, legs = [], None, []
    with (
        contextlib.suppress(httpx.HTTPError, ValueError, KeyError),
        httpx.Client(base_url=rec["agent_url"], timeout=2) as c,
    ):
        tunnels = c.get("/api/tunnels").json()["tunnels"]
        captures = c.get("/api/requests/http", params={"limit": 0}).json().get("total")
        legs = c.get("/api/status").json()["session"]["legs"]
    counts = f"{len(tunnels)} tunnel{'s' * (len(tunnels) != 1)}"
    if captures is not None:
        counts += f", {captures} capture{'s' * (captures != 1)}"
    others = _other_sessions(rec)
    if others:  # ngrok SDKs or other `burrow agent`s on the local edge: cut off by a stop
        counts += f", {others} other agent session{'s' * (others != 1)} on the edge"
    if command == "stop":
        local.stop(rec)
        print(f"burrow: stopped the local {'edge and agent' if rec.get('edge_pid') else 'agent'} ({counts})")
        return 0
    print(f"local backend: running, {local.describe(rec)}" + (f", edge pid {rec['edge_pid']}" if rec.get("edge_pid") else ""))
    print(f"  agent API   {rec['agent_url']}   {counts}")
    print(f"  cloud API   {rec.get('api_url')}")
    if rec.get("ingress_addr"):  # what ngrok's SDKs and other agents need to connect
        print(f"  ingress     {rec['ingress_addr']}   CA {rec.get('ca_file')}, authtoken in bootstrap.json")
    print(f"  data        {rec.get('data_dir')}  (logs in {local.run_dir()})")
    for leg in legs:  # the agent's sessions: one, or one per edge of a cluster (HA)
        if leg.get("edge"):
            print(f"  session     {leg.get('session_id')} on edge {leg['edge']}  latency {leg.get('latency') or '-'}")
    for t in tunnels:
        print(f"  {t['name']:<20} {t.get('public_url')} -> {t.get('config', {}).get('addr')}")
    print("stop it with: burrow stop")
    return 0


def _other_sessions(rec: dict) -> int:
    """Agent sessions on the local edge besides the local agent's own (0 when unknown):
    counted through the cloud API with the key in the edge's 0600 bootstrap.json."""
    import httpx

    if not rec.get("edge_pid") or not rec.get("api_url") or not rec.get("data_dir"):
        return 0
    try:
        key = json.loads((Path(rec["data_dir"]) / "bootstrap.json").read_text())["api_key"]
        with httpx.Client(base_url=rec["api_url"], timeout=2) as c:
            r = c.get("/tunnel_sessions", headers={"Authorization": f"Bearer {key}", "Ngrok-Version": "2"})
            sessions = r.json()["tunnel_sessions"]
    except (OSError, ValueError, KeyError, TypeError, httpx.HTTPError):
        return 0
    return max(0, len(sessions) - 1)


# ------------------------------------------------ ngrok's own commands: version, config
# ``burrow version`` and ``burrow config add-authtoken|add-api-key|check|upgrade`` answer
# as ngrok's do, so tools that drive ngrok (pyngrok's set_auth_token, get_version) and
# people used to it can use burrow in its place.
def _add_ngrok_commands(sub) -> None:
    sub.add_parser("version", help="print the version (ngrok's shape: burrow version X.Y.Z)")
    c = sub.add_parser("config", help="ngrok-compatible: edit and check the agent's config file")
    csub = c.add_subparsers(dest="config_command", parser_class=_Parser, required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", type=Path, action="append", default=None, metavar="PATH",
            help="the config file (default: ~/.config/burrow/burrow.yml or $BURROW_CONFIG)",
        )
        # accepted as ngrok accepts them (pyngrok passes --log stdout); these commands
        # print their one result line whatever the log settings
        p.add_argument("--log", default=None, help=argparse.SUPPRESS)
        p.add_argument("--log-format", default=None, help=argparse.SUPPRESS)
        p.add_argument("--log-level", default=None, help=argparse.SUPPRESS)

    for name, what in (("add-authtoken", "authtoken"), ("add-api-key", "API key")):
        p = csub.add_parser(name, help=f"save the {what} in the config file")
        p.add_argument("value", metavar="TOKEN" if name == "add-authtoken" else "KEY")
        common(p)
    common(csub.add_parser("check", help="validate the config file and print its path"))
    p = csub.add_parser("upgrade", help="rewrite a v2 config file in the v3 format")
    p.add_argument("--dry-run", action="store_true", help="print the upgraded file; change nothing")
    common(p)


def _config_paths(args) -> tuple[list[Path], bool]:
    """The ``--config`` files (ngrok also takes a comma-separated list), or the default
    path; the flag tells whether the default was used."""
    from backend import agentconfig

    given = getattr(args, "config", None)
    if isinstance(given, Path):
        given = [given]
    paths = [Path(part) for g in (given or []) for part in str(g).split(",") if part]
    return (paths, False) if paths else ([agentconfig.default_path()], True)


def _validate_config(conf: dict, where: Path) -> None:
    """What ``config check`` and the agent both refuse: a bad version, a non-mapping
    ``agent:``, unusable addresses, an invalid tunnel or endpoint."""
    from backend import agentconfig

    version = agentconfig.version_of(conf)
    if version not in ("2", "3"):
        raise CLIError(f"{where}: unsupported config version {conf.get('version')!r} (expected 2 or 3)")
    if "agent" in conf and not isinstance(conf["agent"], dict):
        raise CLIError(f"{where}: 'agent' must be a mapping")
    aconf = agentconfig.agent_section(conf)
    for key in ("server_addr", "connect_url"):
        if aconf.get(key) is not None:
            try:
                parse_hostport(str(aconf[key]))
            except AddressError as exc:
                raise CLIError(f"{where}: {key}: {exc}") from None
    web = aconf.get("web_addr")
    if web is not None and web is not False and str(web).lower() != "false":
        try:
            parse_hostport(str(web))
        except AddressError as exc:
            raise CLIError(f"{where}: web_addr: {exc}") from None
    if "tunnels" in conf and not isinstance(conf["tunnels"], dict | None):
        raise CLIError(f"{where}: 'tunnels' must be a mapping of names to tunnels")
    if "endpoints" in conf and not isinstance(conf["endpoints"], list | None):
        raise CLIError(f"{where}: 'endpoints' must be a list")
    _tunnels_from_config(conf)


def _ngrok_command(args) -> int:
    from backend import agentconfig

    if args.command == "version":
        print(f"burrow version {__version__}")
        return 0
    paths, _ = _config_paths(args)
    path = paths[0]
    try:
        if args.config_command in ("add-authtoken", "add-api-key"):
            key = "authtoken" if args.config_command == "add-authtoken" else "api_key"
            if not args.value.strip():
                raise CLIError(f"an empty {key} cannot be saved")
            agentconfig.set_agent_option(path, key, args.value.strip())
            what = "Authtoken" if key == "authtoken" else "API key"
            print(f"{what} saved to configuration file: {path}")
            return 0
        if args.config_command == "check":
            for p in paths:
                _validate_config(agentconfig.read(p), p)
                print(f"Valid configuration file at {p}")
            return 0
        # upgrade
        data = agentconfig.read(path)
        _validate_config(data, path)
        if agentconfig.version_of(data) == "3":
            print(f"Configuration file at {path} is already version 3; nothing to upgrade")
            return 0
        new, notes = agentconfig.upgrade(data)
        _validate_config(new, path)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        if args.dry_run:
            sys.stdout.write(yaml.safe_dump(new, sort_keys=False, default_flow_style=False))
            print(f"# dry run: {path} was not changed", file=sys.stderr)
            return 0
        backup = path.with_name(path.name + ".v2.bak")
        try:
            agentconfig.write_text(backup, path.read_text())  # as it was, comments and all
        except OSError as exc:
            raise CLIError(f"read {path}: {exc.strerror}") from None
        agentconfig.write(path, new)
        print(f"Upgraded configuration file at {path} to version 3 (the old one is in {backup})")
        return 0
    except agentconfig.ConfigFileError as exc:
        raise CLIError(str(exc)) from None


def _run(coro) -> int:
    from backend import memtune

    memtune.tune()
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


async def _until_signal(*stoppers) -> asyncio.Event:
    ev = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP too (a closed terminal, ``systemctl kill -s HUP``): stop cleanly, writing the
    # pending capture batch, instead of dying on the default action.
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, ev.set)
    return ev


async def _serve(args) -> int:
    from backend import serveconfig
    from backend.edge.server import Edge, EdgeConfig
    from backend.store import hash_token

    try:
        conf = serveconfig.load(vars(args), args.config)
    except serveconfig.ServeConfigError as exc:
        raise SettingsError(str(exc)) from None
    warning = serveconfig.exposed_secrets(args.config)
    if warning:
        print(f"burrow serve: warning: {warning}", file=sys.stderr, flush=True)
    if not conf.allow_remote and not is_loopback(parse_hostport(conf.api_addr)[0]):
        raise SettingsError(
            f"api_addr {conf.api_addr} is not a loopback address; "
            "pass --allow-remote (allow_remote: true) to bind it anyway"
        )
    from backend import logsetup
    from backend.policy import engine as policy_engine

    try:
        acme_options = _acme_options(conf)
    except CLIError as exc:  # a setting like any other: exit status 2
        raise SettingsError(str(exc)) from None
    logsetup.configure(conf.log_format, conf.log_level)
    policy_engine.configure(eval_budget=conf.policy_eval_budget)
    cfg = EdgeConfig(
        data_dir=(conf.data_dir or default_data_dir()).expanduser(),
        store=conf.store,
        api_addr=conf.api_addr,
        ingress_addr=conf.ingress_addr,
        http_addr=conf.http_addr,
        https_addr=conf.https_addr,
        tcp_ports=conf.tcp_ports,
        tcp_host=conf.tcp_host,
        domain=conf.domain,
        api_keys=conf.api_key,
        authtokens=conf.authtoken,
        api_rate_limit=conf.api_rate_limit,
        max_sessions_per_authtoken=conf.max_sessions_per_authtoken,
        max_endpoints_per_account=conf.max_endpoints_per_account,
        max_tcp_ports_per_account=conf.max_tcp_ports_per_account,
        max_data_conns_per_session=conf.max_data_conns_per_session,
        api_auth_fail_limit=conf.api_auth_fail_limit,
        api_public_url=conf.api_public_url,
        api_read_timeout=conf.api_read_timeout,
        body_timeout=conf.body_timeout,
        send_timeout=conf.send_timeout,
        max_conns=conf.max_conns,
        max_conns_per_ip=conf.max_conns_per_ip,
        max_handshakes=conf.max_handshakes,
        max_handshakes_per_ip=conf.max_handshakes_per_ip,
        first_byte_timeout=conf.first_byte_timeout or 5.0,
        handshake_timeout=conf.handshake_timeout or 10.0,
        admin_key_hash=hash_token(conf.admin_key) if conf.admin_key else None,
        metrics_public=conf.metrics_public,
        node_id=conf.node_id,
        peer_addr=conf.peer_addr or "127.0.0.1:0",
        advertise_addr=conf.advertise_addr,
        peer_tls=conf.peer_tls,
        **acme_options,
    )
    edge = Edge(cfg, on_event=_emit if args.json else None)
    stop = await _until_signal()
    try:
        await edge.start()
    except OSError as exc:
        await edge.stop()
        raise CLIError(f"cannot listen: {exc.strerror or exc}") from None
    except Exception as exc:  # a broken data dir, an unreadable CA ...
        await edge.stop()
        raise CLIError(str(exc)) from None
    info = edge.ready_info()
    if args.ready_file is not None:
        _write_ready(args.ready_file, {"event": "ready", "version": __version__, **info})
    if args.json:
        _emit({"event": "ready", "version": __version__, **info})
    elif args.ready_file is not None:
        print(f"burrow edge {__version__} ready: {json.dumps(info)}", flush=True)  # no credentials
    else:
        print(f"burrow edge {__version__}")
        rows = [
            ("cloud API", info["api_url"]),
            ("agent ingress", info["ingress_addr"]),
            ("public http", info["http_url"]),
            ("public https", info["https_url"] or "off"),
            ("domain", info["domain"]),
            ("CA certificate", info["ca_file"]),
            ("data dir", info["data_dir"]),
        ]
        if edge.created_credentials:
            rows.append(("authtoken", edge.bootstrap["authtoken"] + "  (shown once; also in data dir)"))
            rows.append(("API key", edge.bootstrap["api_key"]))
        for k, v in rows:
            print(f"  {k:<15} {v}")
        sys.stdout.flush()
    await stop.wait()
    await edge.stop()
    if args.json:
        _emit({"event": "stopped"})
    return 0


def _acme_options(args) -> dict:
    """Check the --acme-* settings; the ACME libraries must be installed to use them."""
    from urllib.parse import urlsplit

    if not args.acme_directory:
        for flag in ("acme_email", "acme_ca_root"):
            if getattr(args, flag):
                raise CLIError(f"--{flag.replace('_', '-')} needs --acme-directory")
        return {}
    url = urlsplit(args.acme_directory.strip())
    if url.scheme not in ("http", "https") or not url.netloc:
        raise CLIError(f"--acme-directory {args.acme_directory!r}: expected an https:// URL")
    email = args.acme_email.strip() if args.acme_email else None
    if email is not None and ("@" not in email or any(c.isspace() for c in email)):
        raise CLIError(f"--acme-email {args.acme_email!r}: expected an address like ops@example.com")
    root = args.acme_ca_root
    if root is not None and not root.expanduser().is_file():
        raise CLIError(f"--acme-ca-root {str(root)!r}: no such file")
    try:
        import acme  # noqa: F401
        import josepy  # noqa: F401
    except ImportError:
        raise CLIError("--acme-directory needs the ACME libraries: pip install 'burrow[acme]'") from None
    kinds = tuple(k.strip().lower() for k in args.acme_challenges.split(",") if k.strip())
    bad = [k for k in kinds if k not in ("tls-alpn-01", "http-01")]
    if bad or not kinds:
        raise CLIError(f"--acme-challenges {args.acme_challenges!r}: expected tls-alpn-01 and/or http-01")
    return {
        "acme_challenges": kinds,
        "acme_directory": args.acme_directory.strip(),
        "acme_email": email,
        "acme_ca_root": str(root.expanduser()) if root is not None else None,
        "acme_rate_limit": args.acme_rate_limit,
    }


def _timeout(flag: str, value) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise CLIError(f"{flag}: expected seconds, got {value!r}") from None
    if not 0 < t <= 3600:
        raise CLIError(f"{flag}: expected seconds between 0 and 3600, got {value!r}")
    return t


def _int_opt(flag: int | None, conf_value, default: int) -> int:
    if flag is not None:
        return flag
    if conf_value is None:
        return default
    try:
        return int(conf_value)
    except (TypeError, ValueError):
        raise CLIError(f"expected an integer in the config, got {conf_value!r}") from None


def _load_config(path: Path | None) -> dict:
    from backend import agentconfig

    if path is None:
        return {}
    try:
        return agentconfig.read(path)
    except agentconfig.ConfigFileError as exc:
        raise CLIError(str(exc)) from None


# ngrok's agent settings (v2 at the top level, v3 under ``agent:``) and burrow's own; a
# key outside these fails the start, as it does for ngrok
_AGENT_KEYS = {
    "authtoken", "api_key", "server_addr", "root_cas", "web_addr", "web_allow_hosts", "region",
    "log", "log_level", "log_format", "inspect_db_size", "console_ui", "console_ui_color",
    "metadata", "update", "update_channel", "update_check", "heartbeat_interval",
    "heartbeat_tolerance", "connect_timeout", "dns_resolver_ips", "proxy_url",
    "remote_management", "crl_noverify", "web_addr_tls", "connect_interface", "connect_url", "connect_cas",
    "ca_file", "api_url",
    # burrow's
    "pool_size", "inspect_body_cap", "inspect_db", "inspect_db_flush_ms", "web_read_timeout",
    "ha_connections",
}
_TOP_KEYS = {"version", "agent", "tunnels", "endpoints"}


def _check_config_keys(conf: dict) -> None:
    """Refuse what ngrok would refuse in a config file: unknown keys, misplaced sections."""
    agent = conf.get("agent")
    if agent is not None and not isinstance(agent, dict):
        raise CLIError("invalid config: agent must be a mapping")
    for key in conf:
        if key not in _TOP_KEYS and (agent is not None or key not in _AGENT_KEYS):
            raise CLIError(f"invalid config: unknown key {key!r} at the top level")
    for key in agent or {}:
        if key not in _AGENT_KEYS:
            raise CLIError(f"invalid config: unknown key {key!r} in agent")
    if conf.get("tunnels") is not None and not isinstance(conf["tunnels"], dict):
        raise CLIError("invalid config: tunnels must be a mapping of names to tunnel definitions")
    if conf.get("endpoints") is not None and not isinstance(conf["endpoints"], list):
        raise CLIError("invalid config: endpoints must be a list of endpoint definitions")


def _tunnels_from_config(conf: dict) -> list:
    """Read ngrok-style ``tunnels:`` (a mapping) and ``endpoints:`` (a list)."""
    from backend.agent import options

    _check_config_keys(conf)
    out = []
    try:
        for name, t in (conf.get("tunnels") or {}).items():
            out += options.tunnel_configs(t or {}, str(name))
        for i, e in enumerate(conf.get("endpoints") or []):
            name = e.get("name") if isinstance(e, dict) else None
            if not name:
                raise options.OptionError(f"endpoint #{i + 1} has no name")
            out += options.tunnel_configs(options.from_endpoint(e, str(name)), str(name))
    except options.OptionError as exc:
        raise CLIError(f"invalid tunnel configuration: {exc}") from None
    return out


def _cli_tunnel(args):
    from backend.agent.tunnels import TunnelConfig

    policy = ""
    if args.traffic_policy_file is not None:
        try:
            policy = args.traffic_policy_file.read_text()
        except OSError as exc:
            raise CLIError(f"cannot read {args.traffic_policy_file}: {exc.strerror}") from None
    try:
        return TunnelConfig(
            name=args.name,
            proto=args.command,
            addr=args.addr,
            url=args.url,
            binding=args.binding,
            pooling_enabled=args.pooling_enabled,
            metadata=args.metadata,
            description=args.description,
            inspect=args.inspect == "true",
            traffic_policy=policy,
        )
    except ValidationError as exc:
        raise CLIError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


# flags that pick an edge or configure an agent: with any of them, `burrow http` runs its
# own agent (as ngrok does) instead of adding its tunnel to the local one
_AGENT_FLAGS = (
    "server_addr", "authtoken", "root_cas", "web_addr", "allow_remote", "web_allow_host",
    "web_read_timeout", "data_tls", "pool_size", "ha_connections", "inspect_db_size", "inspect_db",
    "inspect_db_flush_ms", "inspect_body_cap", "log", "region", "json", "ready_file",
)


def _standalone(args) -> bool:
    if args.standalone or any(os.environ.get(v) for v in ("BURROW_SERVER_ADDR", "BURROW_AUTHTOKEN")):
        return True
    return any(getattr(args, f, None) not in (None, False, []) for f in _AGENT_FLAGS)


async def _attach(args) -> int:
    """Add this tunnel to the local agent (starting the local backend if none runs)."""
    from backend import local
    from backend.agent import attach

    tc = _cli_tunnel(args)
    if "/" in tc.name or not tc.name.isprintable():
        raise CLIError(f"--name {tc.name!r}: a tunnel name is one path segment of the agent API (no '/')")

    def progress(msg: str) -> None:
        print(f"burrow: {msg}", file=sys.stderr, flush=True)

    stop = await _until_signal()  # Ctrl+C while the backend starts: it starts, we add nothing
    try:
        rec, started = await asyncio.to_thread(local.find_or_start, args.command, progress)
    except (local.LocalError, OSError) as exc:
        raise CLIError(str(exc)) from None
    if stop.is_set():
        return 0
    try:
        return await attach.run(tc, rec, started, stop)
    except attach.AttachError as exc:
        raise CLIError(str(exc)) from None


async def _agent(args) -> int:
    if args.command in ("http", "tcp", "tls") and not _standalone(args):
        return await _attach(args)
    logger = None
    if args.log and args.log.lower() not in ("false", "none"):
        from backend.logfmt import LogfmtWriter

        try:
            logger = LogfmtWriter(args.log)
        except OSError as exc:
            raise CLIError(f"--log {args.log}: {exc.strerror}") from None
    try:
        return await _agent_run(args, logger)
    except CLIError as exc:
        # ngrok reports a start-up failure on its log before it exits (pyngrok reads it)
        if logger is not None:
            msg, obj, err = exc.log or ("failed to start agent", "app", str(exc))
            logger("eror", msg, obj=obj, err=err)
        raise


def _read_agent_config(args, logger) -> dict:
    """The config files (``--config``, later files win; else the default path if it
    exists), with ngrok's start-up log lines about them."""
    paths, default = _config_paths(args)
    if default and logger is not None:
        logger("info", "no configuration paths supplied")
    conf: dict = {}
    for path in paths:
        if default and not path.exists():
            break
        if default and logger is not None:
            logger("info", "using configuration at default config path", path=str(path))
        try:
            conf.update(_load_config(path))
        except CLIError as exc:
            raise CLIError(str(exc), ("failed to open config file", "app", str(exc))) from None
        if logger is not None:
            logger("info", "open config file", path=str(path), err="nil")
    return conf


def _listen_err(addr: str, exc: OSError) -> str:
    """A failed listen in Go's words, as ngrok logs it:
    ``listen tcp 127.0.0.1:4040: bind: address already in use``."""
    import errno

    words = {
        errno.EADDRINUSE: "address already in use",
        errno.EADDRNOTAVAIL: "cannot assign requested address",
        errno.EACCES: "permission denied",
    }.get(exc.errno, (exc.strerror or str(exc)).lower())
    return f"listen tcp {addr}: bind: {words}"


async def _agent_run(args, logger) -> int:
    from backend.agent.agent import MAX_HA_CONNECTIONS, Agent, AgentConfig, AgentError
    from backend.agent.api import parse_allow_hosts, start_agent_api
    from backend.httpserver import ServerLimits

    conf = _read_agent_config(args, logger)
    try:
        config_tunnels = _tunnels_from_config(conf) if args.command in ("agent", "start") else []
    except CLIError as exc:
        # pyngrok reads this line: ``lvl=eror msg="failed to read the configuration" ...``
        raise CLIError(str(exc), exc.log or ("failed to read the configuration", "config", str(exc))) from None
    aconf = conf.get("agent") if isinstance(conf.get("agent"), dict) else conf
    data_dir = default_data_dir()
    boot = {}
    with contextlib.suppress(OSError, ValueError):
        boot = json.loads((data_dir / "bootstrap.json").read_text())
    authtoken = (
        args.authtoken or os.environ.get("BURROW_AUTHTOKEN") or aconf.get("authtoken") or boot.get("authtoken")
    )
    if not authtoken:
        raise CLIError("no authtoken: pass --authtoken or set BURROW_AUTHTOKEN")
    server_addr = (
        args.server_addr or os.environ.get("BURROW_SERVER_ADDR") or aconf.get("server_addr")
        or aconf.get("connect_url") or "127.0.0.1:4042"
    )
    try:
        parse_hostport(server_addr)
    except AddressError as exc:
        raise CLIError(f"--server-addr: {exc}") from None
    root_cas = args.root_cas or aconf.get("root_cas") or aconf.get("connect_cas")
    if root_cas is None and (data_dir / "ca.pem").exists():
        root_cas = str(data_dir / "ca.pem")
    if root_cas is not None and not Path(root_cas).is_file():
        raise CLIError(f"--root-cas: no such file {root_cas}")
    web_explicit = args.web_addr or aconf.get("web_addr")
    web_addr = web_explicit or "127.0.0.1:4040"
    if str(web_addr).lower() != "false":
        _check_addr("--web-addr", web_addr, args.allow_remote)
    web_allow_hosts = args.web_allow_host or aconf.get("web_allow_hosts") or []
    if isinstance(web_allow_hosts, str) or not all(isinstance(h, str) for h in web_allow_hosts):
        raise CLIError("web_allow_hosts must be a list of host names")
    try:
        parse_allow_hosts(web_allow_hosts)
    except ValueError as exc:
        raise CLIError(f"--web-allow-host: {exc}") from None
    web_read = args.web_read_timeout if args.web_read_timeout is not None else aconf.get("web_read_timeout", 10.0)
    web_limits = ServerLimits(
        head_timeout=_timeout("--web-read-timeout", web_read),
        body_timeout=_timeout("--web-read-timeout", web_read),
    )

    if args.command == "agent":
        tunnels = config_tunnels
    elif args.command == "start":
        every = config_tunnels
        if args.none:
            tunnels = []
        elif args.all or not args.names:
            tunnels = every
        else:
            tunnels = [t for t in every if t.name in args.names or t.name.removesuffix(" (http)") in args.names]
            missing = set(args.names) - {t.name for t in tunnels}
            if missing:
                raise CLIError(f"no tunnel named {sorted(missing)[0]!r} in the config")
    else:
        tunnels = [_cli_tunnel(args)]

    ha = args.ha_connections
    if ha is None and aconf.get("ha_connections") is not None:
        ha = _int_opt(None, aconf.get("ha_connections"), 0)
    if ha is not None and not 1 <= ha <= MAX_HA_CONNECTIONS:
        raise SettingsError(f"--ha-connections: {ha} is not between 1 and {MAX_HA_CONNECTIONS}")

    display = None
    ready_sent = False

    def events(ev: dict) -> None:  # the ready line comes first; earlier events are in it
        if logger is not None:
            logger.event(ev)
        if args.json and ready_sent:
            _emit(ev)
    try:
        agent = Agent(
            AgentConfig(
                server_addr=server_addr,
                authtoken=authtoken,
                root_cas=root_cas,
                data_tls=args.data_tls,
                pool_size=args.pool_size or int(aconf.get("pool_size", 4)),
                ha_connections=ha,
                metadata=str(aconf.get("metadata", "")),
                tunnels=tunnels,
                inspect_db_size=_int_opt(args.inspect_db_size, aconf.get("inspect_db_size"), 0),
                inspect_body_cap=_int_opt(args.inspect_body_cap, aconf.get("inspect_body_cap"), 1024 * 1024),
                inspect_db=args.inspect_db or aconf.get("inspect_db"),
                inspect_db_flush_ms=_int_opt(args.inspect_db_flush_ms, aconf.get("inspect_db_flush_ms"), 100),
            ),
            on_event=events,
        )
    except AgentError as exc:
        raise _agent_failure(exc) from None
    except (OSError, sqlite3.Error) as exc:  # the --inspect-db file cannot be opened
        raise CLIError(f"--inspect-db: {exc}") from None

    api = None
    web = ""
    if str(web_addr).lower() != "false":
        try:
            api = await start_agent_api(agent, web_addr, allow_hosts=web_allow_hosts, limits=web_limits)
        except OSError as exc:
            if web_explicit:
                await agent.stop()
                err = _listen_err(str(web_addr), exc)
                raise CLIError(f"--web-addr: {err}", ("failed to start web service", "web", err)) from None
            host = parse_hostport(web_addr)[0]
            api = await start_agent_api(agent, f"{host}:0", allow_hosts=web_allow_hosts, limits=web_limits)
        web = "{}:{}".format(*api.addr)
        if logger is not None:
            logger(
                "info", "starting web service", obj="web", addr=web,
                allow_hosts="[" + " ".join(web_allow_hosts) + "]",
            )

    stop = await _until_signal()
    runner = asyncio.ensure_future(agent.run())
    waiter = asyncio.ensure_future(agent.wait_connected(3600 * 24 * 365))
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({runner, waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    try:
        if runner.done():
            exc = runner.exception()
            if isinstance(exc, AgentError):
                raise _agent_failure(exc) from None
            if exc is not None:
                raise exc
            return 0
        if waiter.done():
            ready = {
                "event": "ready",
                "version": __version__,
                "web_addr": web,
                "session_id": agent.session_id,
                "sessions": agent.sessions_info(),
                "tunnels": [agent.tunnel_info(t) for t in agent.tunnels.values()],
            }
            ready_sent = True
            if args.ready_file is not None:
                _write_ready(args.ready_file, ready)
            if args.json:
                _emit(ready)
            elif logger is not None and args.log == "stdout":
                pass  # the log is the display
            elif args.ready_file is not None:
                print(f"burrow agent {__version__} ready: web {web}", flush=True)  # detached: a log
            else:
                from backend.agent.status import StatusDisplay

                display = StatusDisplay(agent, web)
                display.start()
            await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if runner.done() and isinstance(runner.exception(), AgentError):
                raise _agent_failure(runner.exception()) from None
        return 0
    finally:
        if display is not None:
            display.stop()
        waiter.cancel()
        stopper.cancel()
        await agent.stop()
        runner.cancel()
        with contextlib.suppress(BaseException):
            await runner
        if api is not None:
            await api.stop()
