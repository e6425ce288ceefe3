"""``addr: file:///path``: the agent serves a directory itself, as ngrok's file server does.

Read-only: GET and HEAD only.  A directory answers its ``index.html`` or a listing; a
file answers its bytes.  Nothing outside the root is reachable: ``..`` segments are
refused, and so is any path (a symlink included) whose real location is outside it.
"""

from __future__ import annotations

import asyncio
import email.utils
import html
import mimetypes
import os
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from backend.http1 import (
    NO_BODY,
    HTTPError,
    head_bytes,
    parse_request_head,
    parse_response_head,
    read_head,
    simple_response,
)
from backend.relay import close

if TYPE_CHECKING:
    from backend.agent.tunnels import Exchange, Tunnel
    from backend.protocol import StartData

CHUNK = 64 * 1024


def root_of(addr: str) -> str:
    """The real directory a ``file://`` address names (ValueError if it is not one)."""
    path = unquote(addr.strip()[7:])
    if path.startswith("localhost/"):
        path = path[len("localhost") :]
    if not path.startswith("/"):
        raise ValueError(f"file upstream {addr!r}: give an absolute path, as in file:///srv/www")
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise ValueError(f"file upstream {addr!r}: {path} is not a directory")
    return real


def _page(status: int, text: str, headers: list[tuple[str, str]] | None = None) -> bytes:
    return simple_response(status, (text + "\n").encode(), headers=headers, close=False)


def _resolve(root: str, target: bytes) -> tuple[str | None, bytes | None, str]:
    """(real path, error response, url path) for a request target."""
    path = target.split(b"?", 1)[0].split(b"#", 1)[0].decode("latin-1")
    try:
        path = unquote(path, errors="strict")
    except UnicodeDecodeError:
        return None, _page(400, "400 Bad Request: the path is not UTF-8"), ""
    if not path.startswith("/") or "\0" in path or "\\" in path:
        return None, _page(400, "400 Bad Request"), path
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None, _page(403, "403 Forbidden: the path leaves the served directory"), path
    full = os.path.join(root, *parts)
    real = os.path.realpath(full)
    if real != root and not real.startswith(root.rstrip("/") + "/"):
        return None, _page(403, "403 Forbidden: the path leaves the served directory"), path
    if not os.path.exists(real):
        return None, _page(404, "404 Not Found"), path
    return real, None, path


def _listing(real: str, path: str) -> bytes:
    rows = []
    try:
        names = sorted(os.listdir(real), key=str.lower)
    except OSError:
        return _page(403, "403 Forbidden: the directory cannot be read")
    if path != "/":
        rows.append('<li><a href="../">../</a></li>')
    for n in names:
        slash = "/" if os.path.isdir(os.path.join(real, n)) else ""
        rows.append(f'<li><a href="{quote(n)}{slash}">{html.escape(n)}{slash}</a></li>')
    title = html.escape(path)
    body = (
        f"<!doctype html>\n<meta charset=utf-8>\n<title>{title}</title>\n"
        f"<h1>{title}</h1>\n<ul>\n" + "\n".join(rows) + "\n</ul>\n"
    ).encode()
    return simple_response(200, body, "text/html; charset=utf-8", close=False)


async def serve(tunnel: Tunnel, start: StartData, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    root = tunnel.upstream.path
    try:
        while True:
            raw = await read_head(r)
            if raw is None:
                return
            req = parse_request_head(raw)
            obs = tunnel.observe(start, req)
            try:
                keep = await _answer(root, req.method, req.target, w, obs)
            finally:
                obs.finish()
            if not keep or not req.keep_alive or req.framing != NO_BODY:
                return  # a request body is never read: end the connection instead
    except HTTPError as exc:
        from backend import pages

        w.write(pages.bad_request(exc.status, exc.msg))
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        close(w)


async def _answer(root: str, method: bytes, target: bytes, w: asyncio.StreamWriter, obs: Exchange) -> bool:
    def small(resp: bytes) -> bool:
        obs.synthetic_response(resp)
        w.write(resp if method != b"HEAD" else resp[: resp.find(b"\r\n\r\n") + 4])
        return True

    if method not in (b"GET", b"HEAD"):
        small(_page(405, "405 Method Not Allowed: this is a read-only file server", [("Allow", "GET, HEAD")]))
        await w.drain()
        return False
    real, err, path = _resolve(root, target)
    if err is not None:
        small(err)
        await w.drain()
        return True
    assert real is not None
    if os.path.isdir(real):
        if not path.endswith("/"):
            small(simple_response(301, b"", headers=[("Location", quote(path) + "/")], close=False))
        elif os.path.isfile(os.path.join(real, "index.html")):
            real = os.path.join(real, "index.html")
        else:
            small(_listing(real, path))
        if not os.path.isfile(real):
            await w.drain()
            return True
    try:
        f = open(real, "rb")  # noqa: SIM115 -- closed below, streamed in chunks
    except OSError:
        small(_page(403, "403 Forbidden: the file cannot be read"))
        await w.drain()
        return True
    with f:
        st = os.fstat(f.fileno())
        ctype = mimetypes.guess_type(real)[0] or "application/octet-stream"
        head = head_bytes(
            "HTTP/1.1 200 OK",
            [
                ("Content-Type", ctype),
                ("Content-Length", str(st.st_size)),
                ("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True)),
            ],
        )
        obs.response_head(parse_response_head(head, method))
        w.write(head)
        if method == b"HEAD":
            await w.drain()
            return True
        left = st.st_size
        while left > 0:
            chunk = await asyncio.to_thread(f.read, min(CHUNK, left))
            if not chunk:
                return False  # the file shrank: the length we sent is wrong, end the connection
            left -= len(chunk)
            obs.response_body(chunk)
            w.write(chunk)
            await w.drain()
    return True
