"""Read the server name (SNI) from a TLS ClientHello without consuming it.

The edge's HTTPS port serves two kinds of endpoint: ``https`` endpoints, whose TLS the
edge terminates, and ``tls`` endpoints, whose TLS passes through untouched to the
agent.  Which one a connection is for is known only from the ClientHello's SNI, so the
edge peeks at the first record (``MSG_PEEK``) before deciding.
"""

from __future__ import annotations

import asyncio
import socket

from backend.netutil import wait_readable


class Incomplete(Exception):
    """More bytes are needed to see the whole ClientHello."""


class NotTLS(Exception):
    pass


def parse_sni(data: bytes) -> str | None:
    """Return the SNI host name (lower case) of a ClientHello, or None if it has none.

    Raises Incomplete if ``data`` ends before the ClientHello does, NotTLS if it is not
    a TLS handshake.
    """
    if len(data) < 5:
        raise Incomplete
    if data[0] != 0x16 or data[1] != 0x03:
        raise NotTLS("not a TLS handshake record")
    rec_len = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + rec_len:
        raise Incomplete
    hs = data[5 : 5 + rec_len]
    if len(hs) < 4 or hs[0] != 0x01:
        raise NotTLS("not a ClientHello")
    hs_len = int.from_bytes(hs[1:4], "big")
    body = hs[4 : 4 + hs_len]
    if len(body) < hs_len:
        raise Incomplete  # a ClientHello spanning several records: rare; ask for more
    try:
        pos = 2 + 32  # client_version, random
        pos += 1 + body[pos]  # session_id
        pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher_suites
        pos += 1 + body[pos]  # compression_methods
        if pos + 2 > len(body):
            return None  # no extensions
        end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            etype = int.from_bytes(body[pos : pos + 2], "big")
            elen = int.from_bytes(body[pos + 2 : pos + 4], "big")
            ext = body[pos + 4 : pos + 4 + elen]
            pos += 4 + elen
            if etype != 0:
                continue
            # server_name_list: u16 length, then (u8 type, u16 len, name)*
            p = 2
            while p + 3 <= len(ext):
                ntype = ext[p]
                nlen = int.from_bytes(ext[p + 1 : p + 3], "big")
                name = ext[p + 3 : p + 3 + nlen]
                p += 3 + nlen
                if ntype == 0:
                    return name.decode("ascii", "replace").lower().rstrip(".")
            return None
    except IndexError:
        raise NotTLS("malformed ClientHello") from None
    return None


async def peek_sni(sock: socket.socket, timeout: float = 10.0) -> str | None:
    """Wait for a ClientHello on a non-blocking socket and return its SNI (not consumed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    size = 0
    while True:
        await wait_readable(sock, deadline - loop.time())
        data = sock.recv(16389, socket.MSG_PEEK)
        if not data:
            raise NotTLS("connection closed before the ClientHello")
        try:
            return parse_sni(data)
        except Incomplete:
            if len(data) >= 16389:
                raise NotTLS("ClientHello too large") from None
            if len(data) == size:  # nothing new yet: don't spin on a level-triggered fd
                await asyncio.sleep(0.002)
            size = len(data)
            if loop.time() > deadline:
                raise TimeoutError from None
