"""``burrow serve``'s settings: one model for the flags, the environment and a YAML file.

Every setting has one name, used three ways::

    flag   --max-conns-per-ip 64
    env    BURROW_MAX_CONNS_PER_IP=64
    file   max_conns_per_ip: 64        (burrow serve --config serve.yml)

Precedence: **flag > environment > file > default**.  The file is read and the whole
result validated before anything starts; a mistake (an unknown key, a wrong type, a bad
address) is one line naming where it came from — the flag, the variable, or the file and
its key — and ``burrow serve`` exits with status 2.

``--config``, ``--json`` and ``--ready-file`` are about how this one process reports to
whoever started it, not about the edge, so they are flags only.

List settings (``authtoken``, ``api_key``) take a YAML list or a single string in the
file, and a comma-separated string in the environment.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    SettingsConfigDict,
    SettingsError,
)

from backend.netutil import AddressError, parse_hostport

__all__ = [
    "ENV_PREFIX",
    "PROCESS_FLAGS",
    "SECRET_KEYS",
    "ServeConfigError",
    "ServeSettings",
    "env_name",
    "exposed_secrets",
    "load",
]

ENV_PREFIX = "BURROW_"
#: serve flags that are not settings (see the module docstring)
PROCESS_FLAGS = frozenset({"config", "json", "ready_file", "command"})
_MAX_SECONDS = 86400.0

Count = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(ge=0, le=_MAX_SECONDS, allow_inf_nan=False)]
Tokens = Annotated[list[str], NoDecode]


class ServeConfigError(Exception):
    """A setting that cannot be used: one line for the user (exit status 2)."""


class ServeSettings(BaseSettings):
    """Everything ``burrow serve`` can be told; the defaults are the command's defaults."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", case_sensitive=False, validate_default=True
    )

    data_dir: Path | None = None
    #: ``postgresql://...``: cloud state shared by several edges (cluster mode); a path or
    #: ``sqlite:///path``: that SQLite file; None: ``burrow.db`` in the data dir
    store: str | None = Field(default=None, repr=False)
    api_addr: str = "127.0.0.1:4041"
    ingress_addr: str = "127.0.0.1:4042"
    http_addr: str = "127.0.0.1:4080"
    #: ``off`` (or ``none``, empty) disables the https listener
    https_addr: str | None = "127.0.0.1:4443"
    tcp_ports: Annotated[tuple[int, int], NoDecode] = (20000, 29999)
    tcp_host: str | None = None
    domain: str = "burrow.localhost"
    api_key: Tokens = Field(default_factory=list)
    authtoken: Tokens = Field(default_factory=list)
    allow_remote: bool = False
    api_rate_limit: Count = 600
    api_auth_fail_limit: Count = 30
    api_public_url: str | None = None
    api_read_timeout: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = 10.0
    max_sessions_per_authtoken: Count = 10
    max_endpoints_per_account: Count = 1000
    max_tcp_ports_per_account: Count = 100
    max_data_conns_per_session: Count = 10000
    policy_eval_budget: Annotated[float, Field(gt=0, le=60, allow_inf_nan=False)] = 0.1
    body_timeout: Seconds = 60.0
    send_timeout: Seconds = 60.0
    max_conns: Count = 10_000
    max_conns_per_ip: Count = 256
    max_handshakes: Count = 1024
    max_handshakes_per_ip: Count = 128
    first_byte_timeout: Seconds = 5.0
    handshake_timeout: Seconds = 10.0
    #: the key of the admin API (``/admin/...``); the edge keeps only its hash
    admin_key: str | None = Field(default=None, repr=False)
    #: serve ``/metrics`` without the admin key (for a Prometheus on a private network)
    metrics_public: bool = False
    log_format: Literal["text", "json", "logfmt"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: ACME (checked in detail by ``backend.cli._acme_options``)
    acme_directory: str | None = None
    acme_email: str | None = None
    acme_ca_root: Path | None = None
    acme_rate_limit: Count = 20
    acme_challenges: str = "tls-alpn-01,http-01"
    #: cluster mode (backend/cluster): this edge's name, its peer listener, the ingress
    #: address agents dial for data connections, TLS on the peer link
    node_id: str | None = None
    peer_addr: str | None = None
    advertise_addr: str | None = None
    peer_tls: Literal["auto", "on", "off"] = "auto"

    # ------------------------------------------------------------------ validators
    @field_validator("api_addr", "ingress_addr", "http_addr")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            parse_hostport(v)
        except AddressError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("peer_addr", "advertise_addr")
    @classmethod
    def _optional_address(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        return cls._address(v.strip())

    @field_validator("store")
    @classmethod
    def _store(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = v.strip()
        if "://" in v and not v.startswith(("postgresql://", "postgres://", "sqlite:///")):
            raise ValueError("use postgresql://user@host/db (cluster mode), sqlite:///path or a path")
        return v

    @field_validator("https_addr")
    @classmethod
    def _https(cls, v: str | None) -> str | None:
        if v is None or v.strip().lower() in ("", "off", "none", "false"):
            return None
        return cls._address(v)

    @field_validator("tcp_ports", mode="before")
    @classmethod
    def _ports(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            v = (v, v)
        elif isinstance(v, str) and v.strip().startswith("["):  # JSON from the environment
            try:
                v = json.loads(v)
            except ValueError:
                raise ValueError(f"invalid port range {v!r} (expected LOW-HIGH)") from None
        elif isinstance(v, str):
            lo, sep, hi = v.partition("-")
            try:
                v = (int(lo), int(hi) if sep else int(lo))
            except ValueError:
                raise ValueError(f"invalid port range {v!r} (expected LOW-HIGH)") from None
        if isinstance(v, list | tuple) and len(v) == 2 and all(type(x) is int for x in v):
            if not 1 <= v[0] <= v[1] <= 65535:
                raise ValueError(f"invalid port range {v[0]}-{v[1]}")
            return tuple(v)
        raise ValueError("expected a port range LOW-HIGH (or [LOW, HIGH])")

    @field_validator("api_key", "authtoken", mode="before")
    @classmethod
    def _tokens(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str):
            return [t.strip() for t in v.split(",") if t.strip()]
        return v

    @field_validator("api_key", "authtoken")
    @classmethod
    def _no_empty(cls, v: list[str]) -> list[str]:
        if any(not t.strip() for t in v):
            raise ValueError("an empty token")
        return [t.strip() for t in v]

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        v = v.strip().strip(".").lower()
        if not v or any(c.isspace() or c in "/:@" for c in v):
            raise ValueError(f"invalid domain {v!r}")
        return v

    @field_validator("api_public_url")
    @classmethod
    def _public_url(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if not v:
            return None
        parts = urlsplit(v.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"{v!r}: expected http(s)://HOST[:PORT][/PATH]")
        return v.strip().rstrip("/")

    @field_validator("admin_key")
    @classmethod
    def _admin_key(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        if len(v.strip()) < 16:
            raise ValueError("too short: use at least 16 characters (e.g. `openssl rand -hex 32`)")
        return v.strip()

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def read_file(path: Path) -> dict:
    """The YAML mapping in ``path`` (an empty file is an empty mapping)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ServeConfigError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ServeConfigError(f"{path}: not a text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ServeConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ServeConfigError(f"{path}: expected a mapping of settings, got a {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise ServeConfigError(f"{path}: keys must be strings, got {key!r}")
    return data


SECRET_KEYS = ("admin_key", "api_key", "authtoken", "store")  # a DSN may hold a password


def _dsn_password(dsn: str) -> bool:
    """Whether a store URL carries a password (``postgresql://user:pw@host/db``)."""
    userinfo = dsn.partition("://")[2].partition("@")
    return bool(userinfo[1]) and ":" in userinfo[0]


def exposed_secrets(path: Path | None) -> str | None:
    """A warning when ``path`` holds secrets and others may read it (else None)."""
    if path is None:
        return None
    try:
        data = read_file(path)
        mode = path.stat().st_mode
    except (ServeConfigError, OSError):
        return None
    held = [k for k in SECRET_KEYS if data.get(k) and (k != "store" or _dsn_password(str(data[k])))]
    if held and mode & 0o077:
        return (
            f"{path} holds {', '.join(held)} and is readable by others (mode {mode & 0o777:o}); "
            f"chmod 600 it, or set them in the environment (BURROW_ADMIN_KEY, ...)"
        )
    return None


def load(flags: dict[str, Any], path: Path | None = None) -> ServeSettings:
    """Merge ``flags`` (only those given on the command line), the environment and the
    file at ``path``; raise :class:`ServeConfigError` naming the first bad setting."""
    file_data = read_file(path) if path is not None else {}
    fields = ServeSettings.model_fields
    for key in file_data:
        if key not in fields:
            near = difflib.get_close_matches(key.replace("-", "_"), list(fields), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ServeConfigError(f"{path}: unknown key {key!r}{hint}")
    given = {k: v for k, v in flags.items() if k not in PROCESS_FLAGS}

    class _Settings(ServeSettings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
            return (init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=file_data))

    try:
        return _Settings(**given)
    except SettingsError as exc:  # a value the environment source could not even decode
        raise ServeConfigError(str(exc).replace('"', "'")) from None
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        if key in given:
            where = flag_name(key)
        elif key in fields and env_name(key) in {k.upper() for k in os.environ}:
            where = env_name(key)
        elif key in file_data:
            where = f"{path}: {key}"
        else:
            where = key or "settings"
        got = err.get("input")
        secret = key in SECRET_KEYS
        shown = "" if secret or isinstance(got, dict | list) or str(got) in msg else f" (got {got!r})"
        raise ServeConfigError(f"{where}: {msg}{shown}") from None
