"""Export captured requests: curl and HTTPie commands, raw bytes, HAR 1.2, OSC 52.

Everything here is a pure function over the agent API's capture detail shape (ngrok's
captured request plus burrow's ``body_size``, ``truncated`` and ``replay_of``), so the
console can copy or write an export without touching the network.

The commands aim to *reproduce* the request, not just resemble it: headers keep their
order and duplicates, the body is sent byte for byte (binary bodies through a POSIX
``printf`` pipe, since a shell argument cannot hold a NUL byte), and the defaults curl
and HTTPie would add on their own are switched off when the original did not send them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.parser import BytesParser
from email.policy import HTTP
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from console.render import (
    _dechunk,
    _decode_text,
    _is_binary_type,
    _parse_head,
    _split_head,
    decode_body,
    plural,
)

__all__ = [
    "HAR_CREATOR",
    "HOP_BY_HOP",
    "INLINE_BODY_LIMIT",
    "WireMessage",
    "clipboard_sequence",
    "export_har",
    "osc52",
    "parse_message",
    "raw_request",
    "raw_response",
    "request_url",
    "tmux_passthrough",
    "to_curl",
    "to_har",
    "to_httpie",
    "write_har",
]

HAR_CREATOR = "burrow"
"""``log.creator.name`` in exported HAR files."""

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
"""Headers that describe one connection, never the request (RFC 9110 §7.6.1)."""

# Headers the command's client sets itself: from the URL (Host) or the body (length).
_CLIENT_SET = frozenset({"host", "content-length"})

# Bytes a URL cannot carry literally: controls, space, non-ASCII and the fragment mark.
_URL_UNSAFE = frozenset(range(0x21)) | frozenset(range(0x7F, 0x100)) | {ord("#")}
_CURL_GLOB = frozenset("[]{}")

_ASCII_PRINTABLE = frozenset(map(chr, range(0x20, 0x7F)))

INLINE_BODY_LIMIT = 32 * 1024
"""Largest body put inline as an argument; Linux refuses to exec a program with one
argument over 128 KiB, so larger bodies are piped in by the shell's builtin printf."""


def _q(text: str) -> str:
    """Shell-quote for POSIX sh, always with quotes (``'*/*'``, ``'Accept:'``) for a
    uniform look; :func:`shlex.quote` leaves "safe" words bare."""
    quoted = shlex.quote(text)
    return f"'{quoted}'" if quoted == text else quoted


# --- reading a capture -----------------------------------------------------------------


@dataclass
class WireMessage:
    """One captured message as it was on the wire, with only chunked framing undone.

    Unlike :func:`console.render.decode_body` the body keeps its ``Content-Encoding``:
    a command that re-sends the request must send the same (compressed) bytes.
    """

    start_line: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    head_size: int = 0
    """Bytes of the start line and headers, including the blank line (HAR headersSize)."""
    has_body: bool = False
    """Whether the message declared a body (Content-Length or chunked), even an empty one."""

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order."""
        wanted = name.lower()
        return [v for k, v in self.headers if k.lower() == wanted]


def _b64(value: Any) -> bytes:
    """Decode a capture's base64 ``raw`` field; empty on absence or bad input."""
    if not isinstance(value, str) or not value:
        return b""
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError):
        return b""


def _json_headers(half: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Headers from the API's ``{name: [values]}`` shape (used when raw bytes are absent)."""
    out: list[tuple[str, str]] = []
    for name, values in (half.get("headers") or {}).items():
        for value in values if isinstance(values, list) else [values]:
            out.append((str(name), str(value)))
    return out


def parse_message(raw: bytes, half: Mapping[str, Any] | None = None) -> WireMessage:
    """Split captured bytes into start line, ordered headers and de-chunked body.

    ``half`` (the capture's ``request`` or ``response`` object) supplies the headers
    when the raw bytes are missing, e.g. from an agent that does not send them.
    """
    head, body, complete = _split_head(raw)
    start_line, headers = _parse_head(head) if raw else ("", [])
    if not headers and half:
        headers = _json_headers(half)
    msg = WireMessage(start_line=start_line, headers=headers)
    msg.head_size = len(raw) - len(body) if complete else len(raw)
    lower = {k.lower() for k, _ in headers}
    transfer = [
        t.strip().lower()
        for k, v in headers
        if k.lower() == "transfer-encoding"
        for t in v.split(",")
    ]
    if transfer and transfer[-1] == "chunked":
        body = _dechunk(body, [])
    msg.body = body
    msg.has_body = bool(body) or "content-length" in lower or bool(transfer)
    return msg


def raw_request(capture: Mapping[str, Any]) -> bytes:
    """The captured request bytes (head and body as received, up to the capture limit)."""
    return _b64((capture.get("request") or {}).get("raw"))


def raw_response(capture: Mapping[str, Any]) -> bytes:
    """The captured response bytes; empty when the upstream has not answered (yet)."""
    return _b64((capture.get("response") or {}).get("raw"))


def _request(capture: Mapping[str, Any]) -> tuple[str, str, WireMessage]:
    """``(method, target, message)`` of a capture's request."""
    req = capture.get("request") or {}
    msg = parse_message(raw_request(capture), req)
    parts = msg.start_line.split(" ")
    method = str(req.get("method") or (parts[0] if parts else "") or "GET")
    target = str(req.get("uri") or (parts[1] if len(parts) > 1 else "") or "/")
    return method, target, msg


def _encode_target(target: str) -> str:
    """Percent-encode the bytes a URL cannot hold literally; leave everything else as sent."""
    raw = target.encode("latin-1", errors="replace")
    return "".join(f"%{b:02X}" if b in _URL_UNSAFE else chr(b) for b in raw)


def request_url(
    capture: Mapping[str, Any], base_url: str | None = None, public_url: str | None = None
) -> str:
    """The full URL of a captured request.

    Scheme, host and port come from the tunnel's ``public_url``: that is where the
    request can be sent again, whatever ``Host`` the client wrote (``curl -H 'Host:
    web.burrow.localhost' http://127.0.0.1:4080/`` names no port).  Without a public
    URL (an unknown tunnel) they come from the ``Host`` header, over ``http``.
    ``base_url`` replaces scheme and host (and may add a path prefix), e.g. to aim at
    another tunnel.
    """
    _, target, msg = _request(capture)
    if target.lower().startswith(("http://", "https://")):  # absolute-form (proxy style)
        parts = urlsplit(target)
        target = target[len(f"{parts.scheme}://{parts.netloc}") :] or "/"
        host = parts.netloc
        scheme = parts.scheme.lower()
    else:
        host = msg.header("host") or ""
        scheme = ""
    if target == "*" or not target.startswith("/"):
        target = "/"
    target = _encode_target(target)
    if base_url:
        return base_url.rstrip("/") + target
    public = urlsplit(public_url or "")
    if public.scheme.lower() in ("http", "https") and public.netloc and "*" not in public.netloc:
        return f"{public.scheme.lower()}://{public.netloc}{target}"
    return f"{scheme or 'http'}://{host or 'localhost'}{target}"


def _sent_headers(msg: WireMessage) -> list[tuple[str, str]]:
    """Request headers a client should re-send: no hop-by-hop, Host or Content-Length."""
    named = {
        t.strip().lower()
        for v in msg.header_values("connection")
        for t in v.split(",")
        if t.strip()
    }
    drop = HOP_BY_HOP | _CLIENT_SET | named
    return [(k, v) for k, v in msg.headers if k.lower() not in drop]


def _header_text(value: str) -> tuple[str, bool]:
    """A header value as text to paste: the wire bytes as UTF-8 when they are UTF-8.

    Header bytes are parsed as latin-1; a pasted command is UTF-8, so the value is
    re-read as UTF-8 to send the same bytes.  Returns ``(text, exact)``.
    """
    raw = value.encode("latin-1", errors="replace")
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="backslashreplace"), False


def _pastable(text: str) -> bool:
    """Whether text survives a terminal paste inside single quotes unchanged.

    Tabs (completion), carriage returns (turned into newlines by the tty) and other
    non-printing characters do not, so bodies holding them go through ``printf``.
    """
    return all(c == "\n" or c.isprintable() for c in text)


def _printf_format(data: bytes) -> str:
    """A POSIX ``printf`` format string that prints exactly ``data``.

    Printable text stays readable (non-ASCII characters only when the whole body is
    UTF-8); ``%`` and ``\\`` are escaped and every other byte becomes a three-digit
    octal escape, which dash, bash, zsh and busybox all accept.
    """
    encoding = "utf-8"
    readable: frozenset[str] | None = None
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:  # binary: pure ASCII, so no line editor or locale can mangle it
        encoding = "latin-1"
        text = data.decode(encoding)
        readable = _ASCII_PRINTABLE
    out: list[str] = []
    for char in text:
        if char == "%":
            out.append("%%")
        elif char == "\\":
            out.append("\\\\")
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif char in readable if readable is not None else char.isprintable():
            out.append(char)
        else:
            out.extend(f"\\{b:03o}" for b in char.encode(encoding))
    return "".join(out)


def _body_arg(body: bytes) -> tuple[str | None, str | None]:
    """``(inline_text, printf_format)``: exactly one is set for a body to send."""
    if len(body) > INLINE_BODY_LIMIT:
        return None, _printf_format(body)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None, _printf_format(body)
    if _pastable(text):
        return text, None
    return None, _printf_format(body)


def _notes(capture: Mapping[str, Any], msg: WireMessage, inexact: list[str]) -> list[str]:
    """Comment lines warning where the command cannot reproduce the capture exactly."""
    req = capture.get("request") or {}
    notes: list[str] = []
    if req.get("truncated"):
        size = req.get("body_size")
        of = f" of {size:,}" if isinstance(size, int) else ""
        notes.append(
            f"# the captured body was truncated ({len(msg.body):,}{of} bytes);"
            " this sends only the captured part"
        )
    if inexact:
        notes.append(
            "# header(s) "
            + ", ".join(inexact)
            + " held bytes that are not UTF-8; they are sent with \\x escapes"
        )
    return notes


def _join(lines: list[str], notes: list[str], prefix: str = "") -> str:
    """One command over several lines (`` \\`` continuations), notes as comments above."""
    command = prefix + " \\\n  ".join(lines)
    return "\n".join([*notes, command])


def to_curl(
    capture: Mapping[str, Any], base_url: str | None = None, *, public_url: str | None = None
) -> str:
    """A copy-pastable curl command that re-sends the captured request.

    POSIX shell quoting throughout.  A text body goes inline with ``--data-binary``;
    a binary body (or one with tabs, CRs or control characters, which a terminal paste
    would mangle) is piped in by ``printf`` with octal escapes.  Host and Content-Length
    come from the URL and the body; hop-by-hop headers are left out; curl's default
    ``User-Agent``, ``Accept``, ``Content-Type`` and ``Expect`` are suppressed when the
    original did not send them.  ``public_url`` is the tunnel's public URL (scheme,
    host and port, see :func:`request_url`); ``base_url`` sends the request somewhere
    else instead.
    """
    method, target, msg = _request(capture)
    url = request_url(capture, base_url, public_url)
    headers = _sent_headers(msg)
    present = {k.lower() for k, _ in headers}
    body = msg.body if msg.has_body else None
    inline, fmt = _body_arg(body) if body is not None else (None, None)

    args = ["curl"]
    if msg.start_line.endswith("HTTP/1.0"):
        args.append("--http1.0")
    if method == "HEAD" and body is None:
        args.append("--head")
    elif not (method == "GET" and body is None) and not (method == "POST" and body is not None):
        args += ["-X", shlex.quote(method)]
    if any(c in _CURL_GLOB for c in url):
        args.append("--globoff")
    if "/./" in url or "/../" in url or url.endswith(("/.", "/..")):
        args.append("--path-as-is")
    if target == "*":
        args += ["--request-target", _q("*")]
    args.append(_q(url))

    inexact: list[str] = []
    for name, value in headers:
        text, exact = _header_text(value)
        if not exact:
            inexact.append(name)
        # curl drops a header given as "Name:"; "Name;" sends it with an empty value.
        args += ["-H", _q(f"{name}: {text}" if text else f"{name};")]
    suppress = ["User-Agent", "Accept"]
    if body is not None:
        suppress += ["Content-Type", "Expect"]
    for h in suppress:
        if h.lower() not in present:
            args += ["-H", _q(f"{h}:")]

    prefix = ""
    if body is not None:
        if fmt is not None:
            prefix = f"printf {_q(fmt)} | "
            args += ["--data-binary", "@-"]
        else:
            args += ["--data-binary", _q(inline or "")]
    return _join(_pair_flags(args), _notes(capture, msg, inexact), prefix)


def _pair_flags(args: list[str]) -> list[str]:
    """Group ``['-H', 'x']`` style pairs so each option sits on its own line."""
    lines: list[str] = []
    head: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-H", "--data-binary", "--raw") and i + 1 < len(args):
            lines.append(f"{arg} {args[i + 1]}")
            i += 2
            continue
        head.append(arg)
        i += 1
    return [" ".join(head), *lines]


def _httpie_item(name: str, value: str) -> str:
    """An HTTPie header item; ``Name;`` sends an empty value, and a leading ``=``/``@``
    is escaped so HTTPie does not read ``:=`` (JSON field) or ``:@`` (header from file)."""
    if not value:
        return f"{name};"
    if value[0] in "=@":
        value = "\\" + value
    return f"{name}:{value}"


def to_httpie(
    capture: Mapping[str, Any], base_url: str | None = None, *, public_url: str | None = None
) -> str:
    """An HTTPie (``http``) command that re-sends the captured request.

    Same rules as :func:`to_curl`: text bodies go inline with ``--raw`` (HTTPie 3),
    binary ones are piped in with ``printf``; HTTPie's default ``User-Agent``,
    ``Accept``, ``Accept-Encoding`` and (with a body) ``Content-Type`` are unset when
    the original did not send them.
    """
    method, _, msg = _request(capture)
    url = request_url(capture, base_url, public_url)
    headers = _sent_headers(msg)
    present = {k.lower() for k, _ in headers}
    body = msg.body if msg.has_body else None
    inline, fmt = _body_arg(body) if body is not None else (None, None)

    args = ["http"]
    if fmt is None:
        args.append("--ignore-stdin")
    if "/./" in url or "/../" in url or url.endswith(("/.", "/..")):
        args.append("--path-as-is")
    args += [shlex.quote(method), _q(url)]
    lines = [" ".join(args)]
    inexact: list[str] = []
    for name, value in headers:
        text, exact = _header_text(value)
        if not exact:
            inexact.append(name)
        lines.append(_q(_httpie_item(name, text)))
    suppress = ["User-Agent", "Accept", "Accept-Encoding"]
    if body is not None:
        suppress.append("Content-Type")
    lines += [_q(f"{h}:") for h in suppress if h.lower() not in present]
    prefix = ""
    if fmt is not None:
        prefix = f"printf {_q(fmt)} | "
    elif body is not None:
        lines.append(f"--raw {_q(inline or '')}")
    return _join(lines, _notes(capture, msg, inexact), prefix)


# --- HAR 1.2 ---------------------------------------------------------------------------


def _har_time(start: Any) -> str:
    """An ISO 8601 timestamp with milliseconds, as HAR's ``startedDateTime`` wants."""
    try:
        when = datetime.fromisoformat(str(start))
    except ValueError:
        when = datetime.fromtimestamp(0, UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.isoformat(timespec="milliseconds")


def _nv(pairs: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in pairs]


def _request_cookies(msg: WireMessage) -> list[dict[str, Any]]:
    """Cookies from the ``Cookie`` header(s): ``a=1; b=2``."""
    cookies: list[dict[str, Any]] = []
    for header in msg.header_values("cookie"):
        for part in header.split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name.strip():
                cookies.append({"name": name.strip(), "value": value.strip()})
    return cookies


def _set_cookie(header: str, started: str) -> dict[str, Any] | None:
    """One ``Set-Cookie`` header as a HAR cookie (attributes that parse; others ignored)."""
    pair, *attrs = header.split(";")
    name, sep, value = pair.partition("=")
    if not sep or not name.strip():
        return None
    cookie: dict[str, Any] = {"name": name.strip(), "value": value.strip()}
    for attr in attrs:
        key, _, val = attr.strip().partition("=")
        key, val = key.strip().lower(), val.strip()
        if key == "path" and val:
            cookie["path"] = val
        elif key == "domain" and val:
            cookie["domain"] = val
        elif key == "expires" and "expires" not in cookie:
            with contextlib.suppress(TypeError, ValueError, IndexError):
                cookie["expires"] = parsedate_to_datetime(val).isoformat(timespec="milliseconds")
        elif key == "max-age":
            with contextlib.suppress(ValueError, OverflowError):
                when = datetime.fromisoformat(started) + timedelta(seconds=int(val))
                cookie["expires"] = when.isoformat(timespec="milliseconds")
        elif key == "httponly":
            cookie["httpOnly"] = True
        elif key == "secure":
            cookie["secure"] = True
        elif key == "samesite" and val:
            cookie["_sameSite"] = val  # not in HAR 1.2, so a custom field
    return cookie


def _multipart_params(body: bytes, content_type: str) -> list[dict[str, str]]:
    """``multipart/form-data`` fields as HAR params (file parts get fileName/contentType)."""
    parser = BytesParser(policy=HTTP)
    message = parser.parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
    if not message.is_multipart():
        return []
    params: list[dict[str, str]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        param: dict[str, str] = {"name": name}
        payload = part.get_payload(decode=True)
        payload = payload if isinstance(payload, bytes) else b""
        filename = part.get_filename()
        if filename is not None:
            param["fileName"] = filename
            param["contentType"] = part.get_content_type()
        else:
            param["value"] = payload.decode(part.get_content_charset() or "utf-8", "replace")
        params.append(param)
    return params


def _text_or_base64(body: bytes, content_type: str, charset: str | None) -> tuple[str, bool]:
    """``(text, is_base64)``: text when the body decodes as text, else base64."""
    if not _is_binary_type(content_type):
        text = _decode_text(body, charset, [])
        # Only when lossless: a cut multi-byte character or an unknown charset goes base64.
        try:
            if text is not None and text.encode(charset or "utf-8") == body:
                return text, False
        except (LookupError, UnicodeEncodeError):
            pass
    return base64.b64encode(body).decode("ascii"), True


def _har_request(capture: Mapping[str, Any], public_url: str | None) -> dict[str, Any]:
    method, _, msg = _request(capture)
    req = capture.get("request") or {}
    url = request_url(capture, public_url=public_url)
    query = urlsplit(url).query
    body_size = req.get("body_size")
    out: dict[str, Any] = {
        "method": method,
        "url": url,
        "httpVersion": str(req.get("proto") or "HTTP/1.1"),
        "cookies": _request_cookies(msg),
        "headers": _nv(msg.headers),
        "queryString": _nv(parse_qsl(query, keep_blank_values=True)),
        "headersSize": msg.head_size or -1,
        "bodySize": body_size if isinstance(body_size, int) else len(msg.body),
    }
    if msg.has_body:
        info = decode_body(raw_request(capture))
        mime = info.header("content-type") or ""
        text, is_b64 = _text_or_base64(info.body, info.content_type, info.charset)
        post: dict[str, Any] = {"mimeType": mime, "text": text}
        if is_b64:
            post["_encoding"] = "base64"  # HAR has no encoding field for postData
        if info.content_type == "application/x-www-form-urlencoded" and not is_b64:
            post["params"] = _nv(parse_qsl(text, keep_blank_values=True))
        elif info.content_type == "multipart/form-data":
            post["params"] = _multipart_params(info.body, mime)
        else:
            post["params"] = []
        out["postData"] = post
    return out


def _har_response(capture: Mapping[str, Any], started: str) -> dict[str, Any]:
    resp = capture.get("response")
    if not resp:
        # No answer (yet): the shape browsers use for a failed request.
        return {
            "status": 0,
            "statusText": "",
            "httpVersion": "",
            "cookies": [],
            "headers": [],
            "content": {"size": 0, "mimeType": "x-unknown"},
            "redirectURL": "",
            "headersSize": -1,
            "bodySize": -1,
        }
    raw = raw_response(capture)
    info = decode_body(raw)
    msg = parse_message(raw, resp)
    headers = info.headers or msg.headers
    status = resp.get("status_code")
    if not isinstance(status, int):
        parts = info.start_line.split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    status_text = str(resp.get("status") or "")
    if status_text.startswith(str(status)):
        status_text = status_text[len(str(status)) :].strip()
    mime = info.header("content-type") or "x-unknown"
    content: dict[str, Any] = {"size": len(info.body), "mimeType": mime}
    if info.body:
        text, is_b64 = _text_or_base64(info.body, info.content_type, info.charset)
        content["text"] = text
        if is_b64:
            content["encoding"] = "base64"
    saved = len(info.body) - info.wire_size
    if info.header("content-encoding") and saved > 0:
        content["compression"] = saved
    body_size = resp.get("body_size")
    cookies = [
        c for c in (_set_cookie(v, started) for k, v in headers if k.lower() == "set-cookie") if c
    ]
    return {
        "status": status,
        "statusText": status_text,
        "httpVersion": str(resp.get("proto") or "HTTP/1.1"),
        "cookies": cookies,
        "headers": _nv(headers),
        "content": content,
        "redirectURL": info.header("location") or "",
        "headersSize": len(raw) - info.wire_size if raw else -1,
        "bodySize": body_size if isinstance(body_size, int) else info.wire_size,
    }


def _har_entry(capture: Mapping[str, Any], public_url: str | None) -> dict[str, Any]:
    started = _har_time(capture.get("start"))
    duration = capture.get("duration")
    ms = round(duration / 1e6, 3) if isinstance(duration, int | float) and duration > 0 else 0
    req = capture.get("request") or {}
    resp = capture.get("response") or {}
    entry: dict[str, Any] = {
        "startedDateTime": started,
        "time": ms,
        "request": _har_request(capture, public_url),
        "response": _har_response(capture, started),
        "cache": {},
        "timings": {
            "blocked": -1,
            "dns": -1,
            "connect": -1,
            "ssl": -1,
            "send": 0,
            "wait": ms,
            "receive": 0,
        },
        "_burrow": {
            "id": capture.get("id", ""),
            "tunnel_name": capture.get("tunnel_name", ""),
            "remote_addr": capture.get("remote_addr", ""),
            "replay_of": capture.get("replay_of"),
            "truncated": {
                "request": bool(req.get("truncated")),
                "response": bool(resp.get("truncated")),
            },
        },
    }
    truncated = [side for side, flag in entry["_burrow"]["truncated"].items() if flag]
    if truncated:
        entry["comment"] = f"{' and '.join(truncated)} body truncated by the capture limit"
    return entry


def to_har(
    captures: Iterable[Mapping[str, Any]],
    creator_version: str,
    *,
    public_urls: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A HAR 1.2 log of captured requests (import it in a browser's network panel).

    ``public_urls`` maps tunnel names to their public URLs so each entry's URL has
    the scheme, host and port it can be sent to again.  Each entry carries a ``_burrow`` object (custom fields are
    allowed with a leading underscore) with the capture id, tunnel, ``replay_of`` and
    which sides were truncated.  Binary response bodies are base64 with
    ``encoding: "base64"``; binary request bodies likewise, marked ``_encoding``.
    """
    urls = public_urls or {}
    return {
        "log": {
            "version": "1.2",
            "creator": {"name": HAR_CREATOR, "version": creator_version},
            "entries": [_har_entry(c, urls.get(str(c.get("tunnel_name", "")))) for c in captures],
        }
    }


def write_har(
    path: str | os.PathLike[str],
    captures: Iterable[Mapping[str, Any]],
    creator_version: str,
    *,
    public_urls: Mapping[str, str] | None = None,
) -> Path:
    """Write :func:`to_har` as UTF-8 JSON to a new file ``path`` and return the path.

    An existing file is never replaced (``FileExistsError``): the file is created with
    ``O_EXCL``, so two exports cannot overwrite each other or anything else.
    """
    target = Path(path).expanduser()
    data = json.dumps(to_har(captures, creator_version, public_urls=public_urls), indent=2, ensure_ascii=False) + "\n"
    # The requests' Authorization headers and cookies are in it: 0600, whatever the umask.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    if hasattr(os, "fchmod"):
        os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(data)
    return target


def export_har(
    directory: str | os.PathLike[str],
    captures: list[Mapping[str, Any]],
    creator_version: str,
    *,
    public_urls: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> Path:
    """Write a HAR of ``captures`` into ``directory`` (made if missing) under a new,
    timestamped name (``burrow-20260102-030405-3-requests.har``, then ``-2``, ``-3``…
    when taken) and return its absolute path."""
    folder = Path(directory).expanduser().absolute()
    folder.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = f"burrow-{stamp}-{plural(len(captures), 'request').replace(' ', '-')}"
    for n in range(1, 1000):
        path = folder / (f"{base}.har" if n == 1 else f"{base}-{n}.har")
        try:
            return write_har(path, captures, creator_version, public_urls=public_urls)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free file name for {base}.har in {folder}")


# --- clipboard -------------------------------------------------------------------------


def osc52(text: str) -> str:
    """The OSC 52 "set clipboard" sequence for ``text`` (terminals decode the base64)."""
    payload = base64.b64encode(text.encode("utf-8")).decode("ascii")
    return f"\x1b]52;c;{payload}\x07"


def tmux_passthrough(sequence: str) -> str:
    """Wrap an escape sequence in tmux's DCS passthrough (inner ESCs doubled)."""
    return "\x1bPtmux;" + sequence.replace("\x1b", "\x1b\x1b") + "\x1b\\"


def clipboard_sequence(text: str, env: Mapping[str, str] = os.environ) -> str:
    """What to write to the terminal to put ``text`` on the clipboard.

    Outside tmux: plain OSC 52.  Inside tmux (``$TMUX`` set) the plain sequence is
    followed by a passthrough-wrapped copy: tmux takes the plain one itself when
    ``set-clipboard on``, and forwards the wrapped one to the outer terminal when
    ``allow-passthrough on`` (off by default since tmux 3.3).  Either way the text
    arrives; both arriving sets the same clipboard twice.
    """
    sequence = osc52(text)
    if env.get("TMUX"):
        return sequence + tmux_passthrough(sequence)
    return sequence
