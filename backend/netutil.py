"""Small address helpers shared by the edge, the agent and the command line."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket

_HOST_RE = re.compile(r"^(?=.{1,253}$)(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


class AddressError(ValueError):
    pass


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Parse ``host:port``, ``:port``, ``port`` or ``[v6]:port`` into (host, port)."""
    text = text.strip()
    if not text:
        raise AddressError("empty address")
    if text.isdigit():
        host, port_s = default_host, text
    elif text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise AddressError(f"invalid address {text!r}")
        host, port_s = text[1:end], text[end + 2 :]
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep:
            raise AddressError(f"invalid address {text!r}: expected HOST:PORT")
        host = host or default_host
    try:
        port = int(port_s)
    except ValueError:
        raise AddressError(f"invalid port in {text!r}") from None
    if not 0 <= port <= 65535:
        raise AddressError(f"port out of range in {text!r}")
    return host, port


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def valid_hostname(host: str) -> bool:
    return bool(_HOST_RE.match(host))


def normalize_host(host_header: str) -> str:
    """Lower-case hostname from a Host header, without port or trailing dot."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    h = h.rsplit(":", 1)[0] if ":" in h else h
    return h.rstrip(".")


async def wait_readable(sock: socket.socket, timeout: float) -> None:
    """Wait until a non-blocking socket has bytes to read (or EOF); TimeoutError after ``timeout``."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await asyncio.wait_for(fut, max(timeout, 0.001))
    finally:
        loop.remove_reader(sock.fileno())


async def peek_byte(sock: socket.socket, timeout: float) -> bytes:
    """The first byte a client sends, left in the socket for whoever reads next."""
    await wait_readable(sock, timeout)
    try:
        return sock.recv(1, socket.MSG_PEEK)
    except OSError:
        return b""


def connection_handler(fn):
    """Wrap an ``asyncio.start_server`` callback so that it never ends cancelled.

    Python 3.11's StreamReaderProtocol asks a finished handler task for its exception,
    which raises for a cancelled one, and logs a CancelledError traceback per open
    connection whenever the process shuts down (3.12 checks ``cancelled()`` first).
    Nothing awaits these tasks, so ending quietly loses nothing.
    """

    @functools.wraps(fn)
    async def handler(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except asyncio.CancelledError:
            return None

    return handler

