"""ngrok's tunnel options, read the way the ngrok agent reads them.

One translator for every door a tunnel definition comes in by: the agent API's
``POST /api/tunnels`` (a v2 tunnel) and ``POST /api/endpoints`` (a v3 endpoint), and the
``tunnels:`` / ``endpoints:`` sections of ngrok v2 and v3 config files.

What maps onto burrow is honoured: names (``domain``, ``hostname``, ``subdomain``,
``url``, ``remote_addr``), schemes (``schemes``, ``bind_tls``; https by default when the
edge has an https listener), ``inspect``, ``host_header``, ``proxy_proto`` and
``file://`` upstreams in the agent; ``basic_auth``, ``ip_restriction`` and
``request_header`` / ``response_header`` become traffic policy rules that run on the
edge before and after the tunnel's own ``traffic_policy``.  What burrow cannot do
(OAuth, OIDC, circuit breakers, compression, mutual TLS, webhook verification, ...)
is refused with an error naming the option, never silently ignored, and so is an
option ngrok does not know.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from backend.agent.tunnels import TunnelConfig
from backend.policy.document import PolicyError, parse_policy
from backend.policy.engine import compile_policy

PROTOS = ("http", "https", "tcp", "tls")

#: Options burrow refuses, with the reason given to the user.
REFUSED = {
    "oauth": "burrow's edge has no OAuth provider",
    "oidc": "burrow's edge has no OpenID Connect provider",
    "circuit_breaker": "burrow's edge has no circuit breaker",
    "compression": "burrow's edge does not compress responses",
    "webhook_verification": "burrow's edge does not verify webhooks",
    "verify_webhook": "burrow's edge does not verify webhooks",
    "mutual_tls_cas": "burrow's edge does not do mutual TLS",
    "client_cas": "burrow's edge does not do mutual TLS",
    "crt": "burrow's edge terminates TLS with its own certificates",
    "key": "burrow's edge terminates TLS with its own certificates",
    "terminate_at": "burrow's edge terminates TLS with its own certificates",
    "agent_tls_termination": "burrow's agent does not terminate TLS",
    "user_agent_filter": "burrow's edge has no user agent filter (use a traffic policy expression)",
    "websocket_tcp_converter": "burrow's edge has no websocket-to-TCP converter",
    "labels": "burrow has no labeled tunnels (edges); use url or domain",
}

_NAMES = ("url", "domain", "hostname", "subdomain", "remote_addr")
_COMMON = {
    "name", "proto", "addr", "metadata", "description", "inspect", "traffic_policy",
    "pooling_enabled", "binding", "bindings", "proxy_proto", "ip_restriction",
    "allow_cidrs", "deny_cidrs", "url", "upstream", *REFUSED,
}
_BY_PROTO = {
    "http": _COMMON | {
        "domain", "hostname", "subdomain", "schemes", "bind_tls", "auth", "basic_auth",
        "host_header", "request_header", "response_header", "verify_upstream_tls", "app_protocol",
    },
    "tcp": _COMMON | {"remote_addr"},
    "tls": _COMMON | {"domain", "hostname", "subdomain"},
}
_BY_PROTO["https"] = _BY_PROTO["http"]
_ENDPOINT_KEYS = _BY_PROTO["http"] | _BY_PROTO["tcp"] | _BY_PROTO["tls"]


class OptionError(ValueError):
    """A tunnel definition burrow cannot run; the message names the option."""


def _truthy(v: Any) -> bool:
    """Is an option that burrow refuses actually asked for (``false``, ``{}``, ``0`` are not)?"""
    if isinstance(v, str):
        return v.strip().lower() not in ("", "false", "0", "no", "off")
    return bool(v)


def _strings(v: Any, opt: str, where: str) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise OptionError(f"{where}: {opt} must be a list of strings")
    return v


def _mapping(v: Any, opt: str, where: str, keys: tuple[str, ...]) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise OptionError(f"{where}: {opt} must be a mapping with {' / '.join(keys)}")
    for k in v:
        if k not in keys:
            raise OptionError(f"{where}: unknown key {k!r} in {opt} (expected {' / '.join(keys)})")
    return v


def _header_lines(v: list[str], opt: str, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in v:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise OptionError(f'{where}: {opt}.add entries look like "Name: value", not {line!r}')
        out[name.strip()] = value.strip()
    return out


def _bool(v: Any, opt: str, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise OptionError(f"{where}: {opt} must be true or false, not {v!r}")


def _policy_dict(v: Any, where: str) -> dict:
    """The policy as a mapping, compiled here so that a bad one is a 400, not a failed bind."""
    if isinstance(v, str) and not v.strip():
        return {}
    try:
        compile_policy(v)
        return parse_policy(v).model_dump(exclude_none=True)
    except PolicyError as exc:
        raise OptionError(f"{where}: invalid traffic_policy: {exc}") from None


def _schemes(raw: dict, where: str) -> list[str] | None:
    """The schemes an http tunnel asks for; None = ngrok's default (https if possible)."""
    if "schemes" in raw and "bind_tls" in raw:
        raise OptionError(f"{where}: give schemes or bind_tls, not both")
    if "schemes" in raw:
        schemes = [s.lower() for s in _strings(raw["schemes"], "schemes", where)]
        if not schemes or any(s not in ("http", "https") for s in schemes):
            raise OptionError(f"{where}: schemes must be a list of http and https, not {raw['schemes']!r}")
        return sorted(set(schemes), key=("https", "http").index)
    if "bind_tls" in raw:
        v = raw["bind_tls"]
        text = str(v).lower() if not isinstance(v, bool) else ("true" if v else "false")
        if text not in ("true", "false", "both"):
            raise OptionError(f'{where}: bind_tls must be true, false or "both", not {v!r}')
        return {"true": ["https"], "false": ["http"], "both": ["https", "http"]}[text]
    return None


def _proxy_proto(v: Any, where: str) -> int:
    if v in (None, "", 0, "0", False):
        return 0
    if v in (1, 2, "1", "2", "v1", "v2"):
        return int(str(v).removeprefix("v"))
    raise OptionError(f"{where}: proxy_proto must be 1 or 2, not {v!r}")


def from_endpoint(raw: dict, name: str = "") -> dict:
    """A v3 endpoint definition (``url``, ``upstream``, ``bindings``) as a tunnel definition."""
    if not isinstance(raw, dict):
        raise OptionError("an endpoint definition must be a mapping")
    where = f"endpoint {name or raw.get('name') or ''!r}"
    for k in raw:
        if k not in _ENDPOINT_KEYS:
            raise OptionError(f"{where}: unknown option {k!r}")
    out = {k: v for k, v in raw.items() if k != "upstream"}
    up = _mapping(raw.get("upstream"), "upstream", where, ("url", "protocol", "proxy_protocol"))
    url = up.get("url")
    if url is None or url == "":
        raise OptionError(f"{where}: upstream.url is required")
    if isinstance(url, bool) or not isinstance(url, str | int):
        raise OptionError(f"{where}: upstream.url must be a string such as 8080 or http://localhost:8080")
    if up.get("protocol") not in (None, "", "http1"):
        raise OptionError(f"{where}: upstream.protocol {up['protocol']!r} is not supported (burrow speaks http1)")
    if "proxy_protocol" in up:
        out["proxy_proto"] = up["proxy_protocol"]
    out["addr"] = str(url)
    ep_url = str(raw.get("url") or "")
    if "://" in ep_url:
        proto = ep_url.split("://", 1)[0].lower()
    else:
        scheme = str(url).split("://", 1)[0].lower() if "://" in str(url) else ""
        proto = scheme if scheme in ("tcp", "tls") else "http"
    out["proto"] = proto
    if name:
        out["name"] = name
    return out


def tunnel_configs(raw: dict, name: str = "") -> list[TunnelConfig]:
    """Translate one v2/v3 tunnel definition into burrow tunnels (two for http + https).

    ``name`` overrides ``raw["name"]`` (a config file's key).  Raises OptionError.
    """
    if not isinstance(raw, dict):
        raise OptionError("a tunnel definition must be a mapping")
    name = name or str(raw.get("name") or "")
    where = f"tunnel {name!r}" if name else "tunnel"
    if "upstream" in raw:
        raw = from_endpoint(raw, name)
    proto = raw.get("proto", "http")
    if not isinstance(proto, str) or proto.lower() not in PROTOS:
        raise OptionError(f"{where} specifies an invalid protocol name {proto!r}; valid: http, tcp, tls")
    proto = proto.lower()
    for k in raw:
        if k not in _BY_PROTO[proto]:
            if k in _ENDPOINT_KEYS:
                raise OptionError(f"{where}: {k} is not an option of {proto} tunnels")
            raise OptionError(f"{where}: unknown option {k!r}")
    for k, why in REFUSED.items():
        if k in raw and _truthy(raw[k]):
            raise OptionError(f"{where}: {k} is not supported: {why}")
    if "verify_upstream_tls" in raw and _bool(raw["verify_upstream_tls"], "verify_upstream_tls", where):
        raise OptionError(f"{where}: verify_upstream_tls is not supported: burrow's agent does not verify upstream certificates")
    if raw.get("app_protocol") not in (None, "", "http1"):
        raise OptionError(f"{where}: app_protocol {raw['app_protocol']!r} is not supported (burrow speaks http1)")
    if "addr" not in raw or raw["addr"] in (None, ""):
        raise OptionError(f"{where}: addr (or upstream.url) is required: a port, host:port or URL")

    # --- names
    # a scheme-only url ("tcp://", as pyngrok sends) picks the scheme, not a name
    scheme_only = raw.get("url") if isinstance(raw.get("url"), str) and raw["url"].endswith("://") else ""
    given = [k for k in _NAMES if raw.get(k) and not (k == "url" and scheme_only)]
    if len(given) > 1:
        raise OptionError(f"{where}: give only one of {', '.join(given)}")
    host = ""
    url = ""
    if given:
        value = raw[given[0]]
        if not isinstance(value, str):
            raise OptionError(f"{where}: {given[0]} must be a string")
        if given[0] == "url" and "://" in value:
            url = value
        elif given[0] == "remote_addr":
            url = f"tcp://{value}"
        else:
            host = value.split("://", 1)[-1]
    if scheme_only and not url:
        url = f"{scheme_only}{host}"
    binding = raw.get("binding")
    if "bindings" in raw:
        bindings = _strings(raw["bindings"], "bindings", where)
        if len(bindings) > 1:
            raise OptionError(f"{where}: burrow binds an endpoint to one binding, not {bindings}")
        binding = bindings[0] if bindings else binding

    # --- policy: options become rules around the tunnel's own traffic policy
    pre: dict[str, list] = {}
    post: dict[str, list] = {}
    ipr = _mapping(raw.get("ip_restriction"), "ip_restriction", where, ("allow_cidrs", "deny_cidrs"))
    allow = _strings(ipr.get("allow_cidrs", raw.get("allow_cidrs", [])), "allow_cidrs", where)
    deny = _strings(ipr.get("deny_cidrs", raw.get("deny_cidrs", [])), "deny_cidrs", where)
    phase = "on_http_request" if proto in ("http", "https") else "on_tcp_connect"
    if allow or deny:
        pre.setdefault(phase, []).append(
            {"name": "ip_restriction", "actions": [{"type": "restrict-ips", "config": {"allow": allow, "deny": deny}}]}
        )
    creds: list[str] = []
    if raw.get("auth"):
        creds += _strings(raw["auth"], "auth", where)
    if raw.get("basic_auth"):
        creds += _strings(raw["basic_auth"], "basic_auth", where)
    for c in creds:
        user, sep, pw = c.partition(":")
        if not sep or not user or not pw:
            raise OptionError(f'{where}: basic_auth entries look like "user:password"')
    if creds:
        pre.setdefault("on_http_request", []).append(
            {"name": "basic_auth", "actions": [{"type": "basic-auth", "config": {"credentials": creds}}]}
        )
    for opt, ph in (("request_header", "on_http_request"), ("response_header", "on_http_response")):
        hdr = _mapping(raw.get(opt), opt, where, ("add", "remove"))
        actions = []
        if hdr.get("remove"):
            actions.append({"type": "remove-headers", "config": {"headers": _strings(hdr["remove"], f"{opt}.remove", where)}})
        if hdr.get("add"):
            added = _header_lines(_strings(hdr["add"], f"{opt}.add", where), opt, where)
            actions.append({"type": "add-headers", "config": {"headers": added}})
        if actions:
            post.setdefault(ph, []).append({"name": opt, "actions": actions})
    policy_in = raw.get("traffic_policy") or ""
    if not isinstance(policy_in, str | dict):
        raise OptionError(f"{where}: traffic_policy must be a mapping or a YAML/JSON string")
    if pre or post:
        user = _policy_dict(policy_in, where) if policy_in else {}
        merged = {}
        for ph in ("on_tcp_connect", "on_http_request", "on_http_response"):
            rules = pre.get(ph, []) + user.get(ph, []) + post.get(ph, [])
            if rules:
                merged[ph] = rules
        policy = json.dumps(merged)
        _policy_dict(policy, where)  # e.g. a CIDR that does not parse is found here, not at bind
    else:
        _policy_dict(policy_in, where)
        policy = json.dumps(policy_in) if isinstance(policy_in, dict) else policy_in

    host_header = raw.get("host_header") or ""
    if not isinstance(host_header, str):
        raise OptionError(f"{where}: host_header must be a string (rewrite or a host name)")
    inspect = _bool(raw["inspect"], "inspect", where) if "inspect" in raw else True
    common = dict(
        addr=raw["addr"],
        binding=binding,
        pooling_enabled=_bool(raw.get("pooling_enabled", False), "pooling_enabled", where),
        metadata=str(raw.get("metadata") or ""),
        description=str(raw.get("description") or ""),
        inspect=inspect,
        traffic_policy=policy,
        host_header=host_header,
        proxy_proto=_proxy_proto(raw.get("proxy_proto"), where),
    )

    # --- schemes: one tunnel per scheme, https first, the http one "NAME (http)"
    if proto in ("tcp", "tls"):
        defs = [(name, proto, url or (f"{proto}://{host}" if host else ""), False)]
    else:
        schemes = _schemes(raw, where)
        if url:
            scheme = url.split("://", 1)[0].lower()
            if schemes is not None and schemes != [scheme]:
                raise OptionError(f"{where}: url {url!r} does not match schemes {schemes}")
            defs = [(name, "http", url, False)]
        elif proto == "https" or schemes is not None:
            schemes = ["https"] if schemes is None else schemes
            defs = [
                (f"{name} (http)" if s == "http" and len(schemes) > 1 else name, "http", f"{s}://{host}", False)
                for s in schemes
            ]
        else:
            defs = [(name, "http", host, True)]  # https when the edge has it, as ngrok v3
    out = []
    for i, (n, pr, u, auto) in enumerate(defs):
        twin = name if i and not host else ""  # one random name for both schemes
        try:
            out.append(TunnelConfig(name=n, proto=pr, url=u, auto_https=auto, same_host_as=twin, **common))
        except ValidationError as exc:
            e = exc.errors()[0]
            loc = ".".join(str(x) for x in e.get("loc", ()))
            msg = str(e.get("msg", "")).removeprefix("Value error, ")
            raise OptionError(f"{where}: {loc}: {msg}" if loc else f"{where}: {msg}") from None
    return out
