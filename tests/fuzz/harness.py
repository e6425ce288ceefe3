"""Shared pieces of the fuzz suite: the stack, a strict upstream, raw exchanges, log checks.

Every fuzz module starts its own real processes once (module scope): an edge, one or
two agents and a strict HTTP upstream, all on 127.0.0.1 with port 0.  Each example is
checked at once (status, error shape, new log lines) so hypothesis can shrink a failure
to a minimal input; each test also checks the whole log once more at its end.

Settings: ``BURROW_FUZZ_EXAMPLES`` (default 5000) examples per test, a fixed seed
(``BURROW_FUZZ_SEED``, default 12) and no example database, so CI runs are repeatable.
``BURROW_FUZZ_SURVEY=<file>`` records every finding as a JSON line in that file instead of
failing at the first one (to list all distinct findings of a run; the test then fails at
its end if anything was recorded).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, seed, settings

from tests.procs import BurrowProc

EXAMPLES = int(os.environ.get("BURROW_FUZZ_EXAMPLES", "5000"))
SEED = int(os.environ.get("BURROW_FUZZ_SEED", "12"))
SURVEY = os.environ.get("BURROW_FUZZ_SURVEY") or None
#: Seconds a server may take to answer (or close) one fuzz case before it counts as a hang.
CASE_TIMEOUT = float(os.environ.get("BURROW_FUZZ_CASE_TIMEOUT", "5"))
#: pytest-timeout for one fuzz test; 5,000 cases take well under this on a 2-core box.
TEST_TIMEOUT = max(120, EXAMPLES // 10)

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)


def fuzz(fn):
    """Apply the suite's settings and fixed seed to a ``@given`` test."""
    return seed(SEED)(FUZZ_SETTINGS(fn))


# ----------------------------------------------------------------------------- findings
class Finding(AssertionError):
    """A case the server got wrong; the subclass names the kind (hypothesis keeps kinds apart)."""


class ServerError(Finding):
    """A 5xx answer (or a dropped connection) caused by the input."""


class BadShape(Finding):
    """An error answer that is not the API's own JSON error format."""


class LogError(Finding):
    """A traceback / unhandled-task / ERROR line in a process log."""


class Hang(Finding):
    """No answer and no close within CASE_TIMEOUT."""


class Forwarded(Finding):
    """The edge forwarded something the strict upstream calls invalid, or a denied path."""


class Accepted(Finding):
    """A request that must be refused (foreign Host / Origin, non-JSON write) was served."""


class Recorder:
    """Raise a finding, or (survey mode) write it to the survey file and carry on.

    A log line can come a moment after the answer (a task's exception is logged when the
    task is collected), so a LogError names the previous case too.
    """

    def __init__(self, test: str) -> None:
        self.test = test
        self.count = 0
        self.previous: object = None
        self.current: object = None

    def case(self, case: object) -> None:
        self.previous, self.current = self.current, case

    def __call__(self, kind: type[Finding], msg: str, case: object) -> None:
        if kind is LogError and self.previous is not None:
            msg += f"\n(logged during this case or just after the previous one: {self.previous!r:.800})"
        if SURVEY is None:
            raise kind(f"{msg}\ncase: {case!r}")
        self.count += 1
        line = {"test": self.test, "kind": kind.__name__, "msg": msg[:1500], "case": repr(case)[:3000]}
        with open(SURVEY, "a") as f:
            f.write(json.dumps(line) + "\n")


# ------------------------------------------------------------------------------- logs
_BAD_LOG = re.compile(
    r"Traceback|Task exception was never retrieved|Exception in callback|"
    r"^ERROR|\bERROR\b:|lvl=eror|\"level\": ?\"error\"|Unhandled|Error: ",
    re.M,
)


class LogWatch:
    """Follows the logs (stderr and non-JSON stdout) of some burrow processes."""

    def __init__(self, procs: dict[str, BurrowProc]) -> None:
        self.procs = procs
        self.text: dict[str, list[str]] = {name: [] for name in procs}
        self.marks = {name: 0 for name in procs}

    def _collect(self, name: str) -> str:
        proc = self.procs[name]
        out = self.text[name]
        while True:  # stdout events the tests did not wait for: keep the non-JSON text ones
            try:
                ev = proc.events.get_nowait()
            except Exception:
                break
            proc.seen.append(ev)
            if ev.get("event") == "_text" or ev.get("level") in ("error", "eror", "crit"):
                out.append(json.dumps(ev))
        return "".join(out) + proc.stderr

    def new_errors(self) -> str:
        """Bad log lines written since the last call ("" when clean)."""
        found = []
        for name in self.procs:
            text = self._collect(name)
            fresh = text[self.marks[name] :]
            self.marks[name] = len(text)
            if _BAD_LOG.search(fresh):
                found.append(f"--- {name} log:\n{fresh[-3000:]}")
        return "\n".join(found)

    def alive(self) -> str:
        dead = [f"{n} exited {p.proc.returncode}" for n, p in self.procs.items() if p.proc.poll() is not None]
        return "; ".join(dead)


# --------------------------------------------------------------------------- raw bytes
@dataclass
class RawResult:
    data: bytes
    hung: bool
    reset: bool

    def statuses(self) -> list[int]:
        return [int(m) for m in re.findall(rb"(?:^|\n)HTTP/\d\.\d (\d{3})", self.data)]


def raw_exchange(addr: tuple[str, int], payload: bytes, timeout: float = CASE_TIMEOUT) -> RawResult:
    """Send ``payload`` on a fresh connection, half-close, read until the server closes.

    The half-close makes a truncated message unambiguous: the server sees EOF and must
    answer or close; still waiting after ``timeout`` is a hang.
    """
    s = socket.create_connection(addr, timeout=timeout)
    data = bytearray()
    hung = reset = False
    try:
        s.settimeout(timeout)
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            reset = True  # the server closed while we sent: fine, read what it said
        deadline = time.monotonic() + timeout
        while len(data) < 4 * 1024 * 1024:
            left = deadline - time.monotonic()
            if left <= 0:
                hung = True
                break
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                hung = True
                break
            except ConnectionResetError:
                reset = True
                break
            if not chunk:
                break
            data += chunk
    finally:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    return RawResult(bytes(data), hung, reset)


# ------------------------------------------------------------------- strict upstream
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQ_LINE = re.compile(rb"(" + _TOKEN + rb") (\S+) HTTP/1\.[01]")
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[^\r\n]*)?")


class _Bad(Exception):
    pass


@dataclass
class StrictUpstream:
    """An HTTP/1.1 origin in a thread of its own that accepts only valid RFC 9112 messages.

    Anything malformed the proxy forwards (bare LF, a bad chunk-size line, CL and TE
    together, obs-fold, a control character) is recorded in ``violations`` and answered
    400 + close, so the fuzz can tell "the edge refused it" from "the edge passed it on".
    Valid requests get ``200`` and a body ``METHOD TARGET``; ``targets`` keeps every
    target received.
    """

    violations: list[tuple[str, bytes]] = field(default_factory=list)
    targets: list[bytes] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> StrictUpstream:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def boot() -> None:
            server = await asyncio.start_server(self._conn, "127.0.0.1", 0, limit=256 * 1024)
            self.port = server.sockets[0].getsockname()[1]
            self._server = server

        self._loop.run_until_complete(boot())
        self._ready.set()
        self._loop.run_forever()

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, TimeoutError):
                    return
                try:
                    method, target, headers = self._head(head)
                    body_ok = await self._body(r, headers)
                except _Bad as exc:
                    self.violations.append((str(exc), head[:4000]))
                    w.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    await w.drain()
                    return
                if not body_ok:
                    return
                self.targets.append(target)
                body = method + b" " + target + b"\n"
                if method == b"HEAD":
                    body = b""
                w.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(method + b" " + target + b"\n"), body)
                )
                await w.drain()
                if headers.get(b"connection", b"").lower() == b"close":
                    return
        except ConnectionError:
            return
        finally:
            with contextlib.suppress(Exception):
                w.close()

    @staticmethod
    def _head(head: bytes) -> tuple[bytes, bytes, dict[bytes, bytes]]:
        lines = head[:-4].split(b"\r\n")
        m = _REQ_LINE.fullmatch(lines[0])
        if not m:
            raise _Bad(f"bad request line {lines[0][:200]!r}")
        headers: dict[bytes, bytes] = {}
        for ln in lines[1:]:
            fm = _FIELD.fullmatch(ln)
            if not fm or b"\n" in ln or b"\r" in ln:
                raise _Bad(f"bad header line {ln[:200]!r}")
            k = fm.group(1).lower()
            if k in headers and k in (b"content-length", b"transfer-encoding", b"host"):
                raise _Bad(f"repeated {k.decode()}")
            headers[k] = fm.group(2)
        if b"host" not in headers:
            raise _Bad("no Host")
        te, cl = headers.get(b"transfer-encoding"), headers.get(b"content-length")
        if te is not None and cl is not None:
            raise _Bad("both Transfer-Encoding and Content-Length")
        if te is not None and te.lower() != b"chunked":
            raise _Bad(f"transfer-encoding {te!r}")
        if cl is not None and not re.fullmatch(rb"[0-9]{1,15}", cl):
            raise _Bad(f"content-length {cl!r}")
        return m.group(1), m.group(2), headers

    @staticmethod
    async def _body(r: asyncio.StreamReader, headers: dict[bytes, bytes]) -> bool:
        try:
            if b"content-length" in headers:
                await r.readexactly(int(headers[b"content-length"]))
            elif b"transfer-encoding" in headers:
                while True:
                    line = await r.readuntil(b"\n")
                    if not line.endswith(b"\r\n"):
                        raise _Bad(f"chunk line without CRLF {line[:100]!r}")
                    m = _CHUNK_LINE.fullmatch(line[:-2])
                    if not m:
                        raise _Bad(f"bad chunk-size line {line[:100]!r}")
                    size = int(m.group(1), 16)
                    if size == 0:
                        while (t := await r.readuntil(b"\n")) != b"\r\n":  # trailers
                            if not t.endswith(b"\r\n") or not _FIELD.fullmatch(t[:-2]):
                                raise _Bad(f"bad trailer line {t[:100]!r}")
                        return True
                    await r.readexactly(size)
                    if await r.readexactly(2) != b"\r\n":
                        raise _Bad("chunk data not followed by CRLF")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return False
        return True


def wait_for(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def write_policy(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def http1_line(data: bytes) -> bool:
    """Whether the first request line names HTTP/1.0 or HTTP/1.1 (else 505 is a fair answer)."""
    line = re.split(rb"\r?\n|\r", data, maxsplit=1)[0]
    return line.endswith((b" HTTP/1.1", b" HTTP/1.0"))
