"""ngrok agents' Bind options, applied by burrow's edge (``ngrok-agent-protocol.md``).

What maps onto burrow is honoured:

- ``BasicAuth`` (and the older ``Auth``) and ``IPRestriction`` become ``basic-auth`` /
  ``restrict-ips`` rules that run *before* the agent's own ``TrafficPolicy`` / ``Policy``
  (``on_http_request`` for http and https; IP restrictions on ``on_tcp_connect`` for tcp
  and tls), so the agent's rules cannot route around them.
- ``RequestHeaders`` / ``ResponseHeaders`` become ``remove-headers`` / ``add-headers``
  rules that run *after* the agent's own rules, the same order burrow's agent gives
  ngrok's ``request_header`` / ``response_header`` (:mod:`backend.agent.options`).
- ``ProxyProto`` 1 or 2: the edge starts each Proxy stream with a PROXY header.
- ``Policy`` in ngrok's older ``inbound`` / ``outbound`` form is read as the phases it
  names.

Everything else an agent asks for (OAuth, OIDC, webhook verification, mutual TLS, TLS
termination at the edge, ...) is refused naming the option, never ignored: a dropped
option could put a private app on the internet.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

from backend.policy.document import MAX_POLICY_BYTES, PHASES, PolicyError, parse_policy
from backend.policy.engine import compile_policy

__all__ = ["BindOptionError", "BindOptions", "translate"]

#: Options that only name the endpoint, or tell the edge what the agent does with a
#: connection: read by the bind path itself, or harmless to leave alone.
_NAMING = {"Hostname", "Domain", "Subdomain", "URL", "Addr", "LocalUrlScheme"}
_HONOURED = {"Auth", "BasicAuth", "IPRestriction", "RequestHeaders", "ResponseHeaders",
             "ProxyProto", "TrafficPolicy", "Policy"}
#: Honoured options per protocol (ngrok's Opts structs: tcp and tls have no HTTP modules).
_BY_PROTO = {
    "http": _HONOURED,
    "https": _HONOURED,
    "tcp": {"IPRestriction", "ProxyProto", "TrafficPolicy", "Policy"},
    "tls": {"IPRestriction", "ProxyProto", "TrafficPolicy", "Policy"},
}
#: Why an option is refused, where a word helps more than the bare name.
_WHY = {
    "TLSTermination": "burrow's edge passes tls endpoints through to the agent unterminated; "
    "terminate TLS in the upstream, or bind an https endpoint",
    "MutualTLSAtEdge": "burrow's edge does not verify client certificates on tls endpoints; "
    "verify them in the upstream (the TLS is passed through to it)",
    "MutualTLSCA": "burrow's edge does not verify client certificates",
}
ERR_UNSUPPORTED = "ERR_NGROK_9000"
ERR_POLICY = "ERR_NGROK_2201"
MAX_CREDENTIALS = 100
MAX_CIDRS = 1000
MAX_HEADERS = 100


class BindOptionError(ValueError):
    """An option the edge refuses; ``code`` is the ngrok error code for the reply."""

    def __init__(self, msg: str, code: str = ERR_UNSUPPORTED) -> None:
        super().__init__(msg)
        self.code = code


@dataclass(frozen=True)
class BindOptions:
    """What a Bind's ``Opts`` ask of the edge."""

    traffic_policy: str = ""  # the merged policy document (JSON), "" for none
    proxy_proto: int = 0  # PROXY protocol version written at the start of each stream


def is_set(value: Any) -> bool:
    """An option the agent really asked for: not absent, null, false, zero or ""; an
    empty object counts (``"Compression": {}`` switches compression on)."""
    if isinstance(value, dict):
        return True
    if isinstance(value, list | tuple):
        return any(is_set(v) for v in value)
    return value is not None and value is not False and value != "" and value != 0


def translate(proto: str, opts: dict) -> BindOptions:
    """Check a Bind's ``Opts`` and turn them into what the edge applies; raises
    :class:`BindOptionError` naming every option it cannot apply."""
    if not isinstance(opts, dict):
        raise BindOptionError("Opts must be a JSON object")
    opts = {_canonical(k): v for k, v in opts.items() if isinstance(k, str)}
    allowed = _NAMING | _BY_PROTO[proto]
    refused = [k for k, v in opts.items() if k not in allowed and is_set(v)]
    if proto == "tls" and opts.get("MutualTLSAtAgent") is True and "MutualTLSAtAgent" not in refused:
        refused.append("MutualTLSAtAgent")
    if refused:
        reasons = [f"{k}: {_WHY[k]}" for k in refused if k in _WHY]
        plain = [k for k in refused if k not in _WHY]
        parts = reasons + (
            [f"{', '.join(plain)}: not supported by burrow's edge for ngrok agents; "
             "use a traffic policy where one fits"] if plain else []
        )
        raise BindOptionError("; ".join(parts))

    pre: dict[str, list] = {}
    post: dict[str, list] = {}
    ip_phase = "on_http_request" if proto in ("http", "https") else "on_tcp_connect"
    ipr = opts.get("IPRestriction")
    if is_set(ipr):
        allow = _strings(_field(ipr, "allow_cidrs", "IPRestriction"), "IPRestriction.allow_cidrs", MAX_CIDRS)
        deny = _strings(_field(ipr, "deny_cidrs", "IPRestriction"), "IPRestriction.deny_cidrs", MAX_CIDRS)
        if allow or deny:
            pre.setdefault(ip_phase, []).append(_rule("IPRestriction", "restrict-ips", {"allow": allow, "deny": deny}))
    creds = _credentials(opts.get("BasicAuth"), opts.get("Auth"))
    if creds:
        pre.setdefault("on_http_request", []).append(
            _rule("BasicAuth", "basic-auth", {"credentials": creds, "realm": "ngrok"})
        )
    for opt, phase in (("RequestHeaders", "on_http_request"), ("ResponseHeaders", "on_http_response")):
        hdr = opts.get(opt)
        if not is_set(hdr):
            continue
        remove = _strings(_field(hdr, "remove", opt), f"{opt}.remove", MAX_HEADERS)
        add = _header_lines(_strings(_field(hdr, "add", opt), f"{opt}.add", MAX_HEADERS), opt)
        actions = []
        if remove:
            actions.append({"type": "remove-headers", "config": {"headers": remove}})
        if add:
            actions.append({"type": "add-headers", "config": {"headers": add}})
        if actions:
            post.setdefault(phase, []).append({"name": f"ngrok {opt}", "actions": actions})
    if pre or post:
        try:  # an option's own mistake (a CIDR that does not parse) is named as the option's
            compile_policy({**pre, **{k: pre.get(k, []) + v for k, v in post.items()}})
        except PolicyError as exc:
            names = sorted({r["name"].removeprefix("ngrok ") for rs in (*pre.values(), *post.values()) for r in rs})
            raise BindOptionError(f"{', '.join(names)}: {exc}", ERR_POLICY) from None

    own = _own_policy(opts, proto)
    if not (pre or post):
        policy = json.dumps(own) if own else ""
    else:
        merged = {}
        for phase in PHASES:
            rules = pre.get(phase, []) + own.get(phase, []) + post.get(phase, [])
            if rules:
                merged[phase] = rules
        policy = json.dumps(merged)
    return BindOptions(traffic_policy=policy, proxy_proto=_proxy_proto(opts.get("ProxyProto")))


# ------------------------------------------------------------------ helpers
def _canonical(key: str) -> str:
    """Go sends ``IPRestriction``, other SDKs may spell the case differently."""
    for known in (*_NAMING, *_HONOURED, *_WHY, "MutualTLSAtAgent"):
        if key.lower() == known.lower():
            return known
    return key


def _rule(option: str, action: str, config: dict) -> dict:
    return {"name": f"ngrok {option}", "actions": [{"type": action, "config": config}]}


def _field(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict):
        raise BindOptionError(f"{where} must be a JSON object")
    for k, v in obj.items():
        if isinstance(k, str) and k.lower() == key.lower():
            return v
    return None


def _strings(v: Any, where: str, limit: int) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise BindOptionError(f"{where} must be a list of strings")
    if len(v) > limit:
        raise BindOptionError(f"{where}: at most {limit} entries")
    return list(v)


def _credentials(basic: Any, legacy: Any) -> list[str]:
    """``user:password`` strings for the basic-auth action.  A credential the edge cannot
    check (a hashed password, a malformed entry) refuses the bind, so that an endpoint is
    never served without the authentication its agent asked for."""
    creds: list[str] = []
    if is_set(legacy):  # the older "Auth": "user:password"
        if not isinstance(legacy, str):
            raise BindOptionError("Auth must be a string user:password")
        creds.append(legacy)
    if is_set(basic):
        entries = _field(basic, "credentials", "BasicAuth")
        if not isinstance(entries, list) or not entries:
            raise BindOptionError("BasicAuth: give at least one credential")
        if len(entries) > MAX_CREDENTIALS:
            raise BindOptionError(f"BasicAuth: at most {MAX_CREDENTIALS} credentials")
        for i, c in enumerate(entries):
            if not isinstance(c, dict):
                raise BindOptionError(f"BasicAuth.credentials[{i}] must be a JSON object")
            if is_set(_field(c, "hashed_password", "BasicAuth")):
                raise BindOptionError(
                    f"BasicAuth.credentials[{i}]: hashed passwords cannot be checked by burrow's edge; "
                    "give the password in clear (it travels inside the agent's TLS session)"
                )
            user, pw = _field(c, "username", "BasicAuth"), _field(c, "cleartext_password", "BasicAuth")
            if not isinstance(user, str) or not isinstance(pw, str):
                raise BindOptionError(f"BasicAuth.credentials[{i}] needs a username and a cleartext_password")
            if ":" in user:
                raise BindOptionError(f'BasicAuth.credentials[{i}]: a user name cannot contain ":"')
            creds.append(f"{user}:{pw}")
    for c in creds:
        user, sep, pw = c.partition(":")
        if not sep or not user or not pw:
            raise BindOptionError('BasicAuth: credentials need a non-empty user name (without ":") and password')
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in c):
            raise BindOptionError("BasicAuth: credentials must not contain control characters")
    return creds


def _header_lines(lines: list[str], opt: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for ln in lines:
        name, sep, value = ln.partition(":")
        if not sep or not name.strip():
            raise BindOptionError(f'{opt}.add entries look like "name:value", not {ln!r}')
        name = name.strip()
        if name.lower() in {k.lower() for k in out}:
            raise BindOptionError(f"{opt}.add names the header {name!r} twice")
        out[name] = value.strip()
    return out


def _proxy_proto(v: Any) -> int:
    if v in (None, 0, "", False):
        return 0
    if v in (1, 2) and not isinstance(v, bool):
        return int(v)
    raise BindOptionError(f"ProxyProto must be 1 or 2, not {v!r}")


def _own_policy(opts: dict, proto: str) -> dict:
    """The agent's own TrafficPolicy (or Policy) as a phase → rules mapping."""
    if is_set(opts.get("TrafficPolicy")) and is_set(opts.get("Policy")):
        raise BindOptionError("give TrafficPolicy or Policy, not both", ERR_POLICY)
    raw = opts.get("TrafficPolicy") or opts.get("Policy")
    if not is_set(raw):
        return {}
    if not isinstance(raw, str | dict):
        raise BindOptionError("invalid traffic policy: it must be a JSON/YAML text or object", ERR_POLICY)
    try:
        if isinstance(raw, str):
            if len(raw.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
                raise PolicyError(f"traffic_policy is larger than {MAX_POLICY_BYTES} bytes")
            # JSON (what the SDKs send) may be in the older form; YAML goes to the parser
            with contextlib.suppress(ValueError, RecursionError):
                raw = json.loads(raw)
        raw = _from_inbound_outbound(raw, proto)
        doc = parse_policy(raw)
        compile_policy(doc)
    except PolicyError as exc:
        raise BindOptionError(f"invalid traffic policy: {exc}", ERR_POLICY) from None
    return doc.model_dump(exclude_none=True)



def _from_inbound_outbound(doc: Any, proto: str) -> Any:
    """ngrok's older policy form ``{inbound: [...], outbound: [...]}`` in today's phases."""
    if not isinstance(doc, dict):
        return doc
    keys = {k.lower() if isinstance(k, str) else k for k in doc}
    if not keys or not keys <= {"inbound", "outbound"}:
        return doc
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if k.lower() == "inbound":
            out["on_http_request" if proto in ("http", "https") else "on_tcp_connect"] = v
        else:
            out["on_http_response"] = v
    return out
