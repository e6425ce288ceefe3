"""The agent's config file as ngrok keeps it: where it lives, and ``burrow config ...``.

ngrok v3 keeps ``~/.config/ngrok/ngrok.yml``; burrow keeps its own file in the same
shape at ``$XDG_CONFIG_HOME/burrow/burrow.yml`` (``~/.config/burrow/burrow.yml``) so
that it never rewrites a real ngrok agent's config, and honours ``--config PATH`` as
ngrok does (pyngrok always passes it).  Files are written whole (a temporary file
renamed over the old one) with mode 0600: they hold an authtoken and an API key.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml


class ConfigFileError(Exception):
    """A config file that cannot be read, parsed or written (one line for the user)."""


def default_path() -> Path:
    env = os.environ.get("BURROW_CONFIG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "burrow" / "burrow.yml"


def read(path: Path, missing_ok: bool = False) -> dict:
    """The file's top-level mapping ({} for an empty file, or a missing one if allowed)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise ConfigFileError(f"open {path}: no such file or directory") from None
    except OSError as exc:
        raise ConfigFileError(f"open {path}: {(exc.strerror or str(exc)).lower()}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: the top level must be a mapping")
    return data


def write(path: Path, data: dict) -> None:
    """Replace ``path`` with ``data`` as YAML, mode 0600 (its directory 0700 if made)."""
    write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True))


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigFileError(f"write {path}: {(exc.strerror or str(exc)).lower()}") from None


def version_of(data: dict) -> str:
    """"2" or "3": an explicit ``version``, else v3 when there is an ``agent:`` block."""
    v = data.get("version")
    if v is not None:
        return str(v).strip().strip("\"'")
    return "3" if isinstance(data.get("agent"), dict) else "2"


def agent_section(data: dict) -> dict:
    """Where agent options live: under ``agent:`` (v3) or at the top (v2)."""
    return data["agent"] if isinstance(data.get("agent"), dict) else data


def set_agent_option(path: Path, key: str, value: str) -> None:
    """``config add-authtoken`` / ``add-api-key``: set one agent option, keep the rest.

    A missing or empty file becomes ``version: "3"`` with an ``agent:`` block; a v2 file
    keeps its shape (the option at the top level), as ngrok does with an old file.
    """
    data = read(path, missing_ok=True)
    if not data:
        data = {"version": "3", "agent": {}}
    if version_of(data) == "3":
        data["version"] = "3"
        if not isinstance(data.get("agent"), dict):
            data["agent"] = {}
    agent_section(data)[key] = value
    write(path, data)


# ------------------------------------------------------------------ v2 -> v3 upgrade
# agent options renamed by v3 (ngrok's "Migrating from v2")
_RENAMED = {"server_addr": "connect_url", "root_cas": "connect_cas"}
# top-level v2 keys that are not agent options
_NOT_AGENT = {"version", "tunnels", "endpoints", "agent"}
# tunnel keys an endpoint entry expresses the same way
_ENDPOINT_KEYS = {
    "proto", "addr", "hostname", "subdomain", "domain", "url", "metadata", "description",
    "pooling_enabled", "traffic_policy", "schemes", "bind_tls",
}


def _endpoint_of(name: str, t: dict) -> dict | None:
    """The v3 ``endpoints:`` entry for a v2 tunnel, or None when it needs options an
    endpoint spells differently (basic_auth, host_header, ...): those stay tunnels."""
    if not isinstance(t, dict) or set(t) - _ENDPOINT_KEYS or "addr" not in t:
        return None
    proto = str(t.get("proto", "http"))
    if proto not in ("http", "tcp", "tls"):
        return None
    url = str(t.get("url") or "")
    host = t.get("hostname") or t.get("domain")
    schemes = t.get("schemes")
    if isinstance(schemes, list) and len(schemes) != 1:
        return None  # two endpoints in v2, one per scheme: keep the tunnel
    scheme = proto
    if proto == "http":
        scheme = schemes[0] if isinstance(schemes, list) else "http" if t.get("bind_tls") is False else "https"
    if not url and host:
        url = f"{scheme}://{host}"
    elif not url and t.get("subdomain"):
        return None  # the subdomain's domain is the edge's: keep the tunnel as it is
    elif not url and proto != "http":
        url = f"{proto}://"
    elif not url and scheme != "https":
        return None  # v3 makes https unless the url says otherwise: keep the tunnel
    ep: dict = {"name": name}
    if url:
        ep["url"] = url
    for k in ("description", "metadata", "pooling_enabled", "traffic_policy"):
        if k in t:
            ep[k] = t[k]
    ep["upstream"] = {"url": t["addr"]}
    return ep


def upgrade(data: dict) -> tuple[dict, list[str]]:
    """A v2 config as v3: agent options under ``agent:`` (renamed where v3 renamed them),
    ``tunnels:`` as ``endpoints:``.  Returns the new mapping and notes for the user."""
    notes: list[str] = []
    if version_of(data) == "3":
        return data, notes
    out: dict = {"version": "3", "agent": {}}
    for k, v in data.items():
        if k in _NOT_AGENT:
            continue
        out["agent"][_RENAMED.get(k, k)] = v
    endpoints = list(data.get("endpoints") or [])
    kept: dict = {}
    for name, t in (data.get("tunnels") or {}).items():
        ep = _endpoint_of(str(name), t)
        if ep is None:
            kept[name] = t
            notes.append(f"tunnel {name!r} kept under tunnels: (its options have no endpoint equivalent)")
        else:
            endpoints.append(ep)
    if endpoints:
        out["endpoints"] = endpoints
    if kept:
        out["tunnels"] = kept
    return out, notes
