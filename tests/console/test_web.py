"""``burrow console --web`` serves the console in a browser tab, on loopback only."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_web_console_page_is_served(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "console.cli", "console", "--web", "--web-addr", f"127.0.0.1:{port}",
         "--agent-url", "http://127.0.0.1:9"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "the web console did not come up"
                time.sleep(0.2)
        assert r.status_code == 200
        assert "burrow" in r.text and "<html" in r.text.lower()
    finally:
        proc.terminate()
        proc.wait(10)


def test_web_refuses_a_non_loopback_address():
    r = subprocess.run(
        [sys.executable, "-m", "console.cli", "--web", "--web-addr", "0.0.0.0:8000"],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 1
    assert "loopback" in r.stderr and "Traceback" not in r.stderr


def test_web_on_a_taken_port_says_so_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "console.cli", "console", "--web", "--web-addr", f"127.0.0.1:{port}",
             "--agent-url", "http://127.0.0.1:9"],
            capture_output=True, text=True, timeout=30,
        )
    assert r.returncode == 1
    assert r.stderr == f"burrow: error: cannot listen on --web-addr 127.0.0.1:{port}: Address already in use\n"
