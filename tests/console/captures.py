"""Captured-request fixtures in the agent API's detail shape, built from raw bytes.

Shared by the export and diff tests: each builds captures exactly as the agent API
returns them (ngrok's captured request plus burrow's ``body_size``, ``truncated`` and
``replay_of``), so the code under test sees the real shape.
"""

from __future__ import annotations

import base64
from typing import Any

from console.export import parse_message


def capture(
    raw: bytes,
    response: bytes | None = None,
    *,
    cid: str = "00000000000000a1",
    tunnel: str = "web",
    truncated: bool = False,
    body_size: int | None = None,
    resp_truncated: bool = False,
    replay_of: str | None = None,
    start: str = "2026-01-02T03:04:05+00:00",
    duration: int = 12_345_678,
) -> dict[str, Any]:
    """A capture detail object in the agent API's shape, from raw request/response bytes."""
    msg = parse_message(raw)
    method, uri, proto = [*msg.start_line.split(" "), "", "", ""][:3]
    headers: dict[str, list[str]] = {}
    for k, v in msg.headers:
        headers.setdefault(k, []).append(v)
    out: dict[str, Any] = {
        "uri": f"/api/requests/http/{cid}",
        "id": cid,
        "tunnel_name": tunnel,
        "remote_addr": "203.0.113.7",
        "start": start,
        "duration": duration,
        "request": {
            "method": method,
            "proto": proto,
            "headers": headers,
            "uri": uri,
            "raw": base64.b64encode(raw).decode(),
            "body_size": len(msg.body) if body_size is None else body_size,
            "truncated": truncated,
        },
        "response": None,
        "replay_of": replay_of,
    }
    if response is not None:
        rmsg = parse_message(response)
        proto, _, status = rmsg.start_line.partition(" ")
        rheaders: dict[str, list[str]] = {}
        for k, v in rmsg.headers:
            rheaders.setdefault(k, []).append(v)
        out["response"] = {
            "status": status,
            "status_code": int(status.split(" ")[0]),
            "proto": proto,
            "headers": rheaders,
            "raw": base64.b64encode(response).decode(),
            "body_size": len(response) - rmsg.head_size,
            "truncated": resp_truncated,
        }
    return out


def head(text: str) -> bytes:
    """A request/response head from readable text (``\\n`` becomes CRLF)."""
    return text.replace("\n", "\r\n").encode("utf-8") + b"\r\n\r\n"


def chunk(data: bytes, size: int = 5) -> bytes:
    parts = [data[i : i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
