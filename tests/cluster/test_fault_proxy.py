"""The in-test fault proxy: forwards, blackholes without closing, resumes in order."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from tests.upstreams import TCPEcho


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


async def test_forwards_blackholes_and_resumes(fault_proxy):
    async with TCPEcho() as echo:
        px = fault_proxy("127.0.0.2", ("127.0.0.1", echo.port))
        assert px.addr[0] == "127.0.0.2"

        def talk() -> None:
            with socket.create_connection(px.addr, timeout=5) as s:
                s.sendall(b"hello")
                assert _recv_exactly(s, 5) == b"hello"
                px.blackhole()
                s.sendall(b"held back")
                s.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    s.recv(100)  # nothing passes, and nothing closes
                # a new connection is accepted but goes nowhere
                with socket.create_connection(px.addr, timeout=5) as s2:
                    s2.sendall(b"late")
                    s2.settimeout(0.3)
                    with pytest.raises(TimeoutError):
                        s2.recv(100)
                    px.resume()
                    s2.settimeout(5)
                    assert _recv_exactly(s2, 4) == b"late"
                s.settimeout(5)
                assert _recv_exactly(s, 9) == b"held back"  # in order, none lost
                s.sendall(b"again")
                assert _recv_exactly(s, 5) == b"again"

        await asyncio.to_thread(talk)
        assert px.connections == 2


async def test_close_ends_proxied_connections(fault_proxy):
    async with TCPEcho() as echo:
        px = fault_proxy("127.0.0.3", ("127.0.0.1", echo.port))

        def talk() -> None:
            with socket.create_connection(px.addr, timeout=5) as s:
                s.sendall(b"x")
                assert _recv_exactly(s, 1) == b"x"
                px.close()
                s.settimeout(5)
                with contextlib.suppress(ConnectionResetError):  # an abort: as good as an end
                    assert s.recv(10) == b""

        await asyncio.to_thread(talk)
