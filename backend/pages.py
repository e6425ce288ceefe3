"""ngrok-style error responses served on the data path (by the edge or the agent)."""

from __future__ import annotations

import html

from backend.http1 import simple_response

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;padding:0 1rem;color:#222}}
code{{background:#eee;padding:.1rem .3rem}}.code{{color:#777;font-size:.9rem}}</style></head>
<body><h1>{title}</h1><p>{message}</p><p class="code">{code}</p></body></html>
"""


def error_body(code: str, title: str, message: str) -> bytes:
    """The HTML body of an error page."""
    return _TEMPLATE.format(
        title=html.escape(title), message=html.escape(message), code=html.escape(code)
    ).encode()


def error_page(status: int, code: str, title: str, message: str, close: bool = True) -> bytes:
    """A complete HTTP response carrying ``code`` in the body and the ngrok header."""
    body = error_body(code, title, message)
    return simple_response(
        status,
        body,
        "text/html; charset=utf-8",
        headers=[("ngrok-error-code", code), ("Cache-Control", "no-store")],
        close=close,
    )


def endpoint_offline(host: str) -> bytes:
    return error_page(
        404,
        "ERR_NGROK_3200",
        "Endpoint offline",
        f"The endpoint {host} is offline.",
    )


def no_agent(host: str) -> bytes:
    return error_page(
        502,
        "ERR_NGROK_3004",
        "Bad gateway",
        f"The agent serving {host} did not accept the connection.",
    )


def upstream_refused(addr: str, err: str) -> bytes:
    return error_page(
        502,
        "ERR_NGROK_8012",
        "Bad gateway",
        "Traffic was successfully tunneled to the burrow agent, but the agent failed to "
        f"establish a connection to the upstream web service at {addr}. ({err})",
    )


def no_termination(host: str) -> bytes:
    return error_page(
        502,
        "ERR_NGROK_3210",
        "No response",
        f"The traffic policy of the cloud endpoint {host} did not answer this request.",
    )


def bad_request(status: int, msg: str) -> bytes:
    return simple_response(status, (msg + "\n").encode(), headers=[("Cache-Control", "no-store")])
