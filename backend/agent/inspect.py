"""The inspection store: every HTTP exchange the agent forwards, captured as it streams.

Bodies are teed while they flow, up to ``body_cap`` bytes per message; the rest still
reaches the client and the capture records that it was truncated and the full size.
Captures are kept newest-first and evicted oldest-first once the bytes they hold pass
``max_bytes`` (ngrok's ``inspect_db_size``).  Each capture is charged a fixed overhead
on top of its bytes so that many tiny exchanges also stay within the bound.

With a ``db_path`` captures are also written to SQLite (in batches, off the data path's
critical section) and loaded back at start, so they survive an agent restart.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from backend.fsperm import private_dir, private_sqlite, sqlite_side_files
from backend.http1 import Head, parse_response_head
from backend.ids import capture_id

log = logging.getLogger("burrow.inspect")

DEFAULT_DB_SIZE = 50 * 1024 * 1024
DEFAULT_BODY_CAP = 1024 * 1024
# Bytes charged per capture for its Python objects (parsed heads, header tuples, the
# capture itself, their share of allocator overhead), measured: 200,000 small captured
# requests left 93.7 MB of RSS above the agent's start for 13,052 stored captures (7.2 KB each).
OVERHEAD = 7000


def resolve_db_size(value: int) -> int:
    """ngrok's rule: 0 means 50 MB, -1 means inspection is off (returned as -1)."""
    if value == 0:
        return DEFAULT_DB_SIZE
    return value


def _headers_json(headers: list[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in headers:
        out.setdefault(k.decode("latin-1"), []).append(v.decode("latin-1"))
    return out


class _Half:
    """One captured message (request or response): head bytes plus capped body.

    The body is kept as the chunks the relay read (references, not copies) and joined
    only when someone asks for it: teeing a 1 MiB body by appending to a bytearray cost
    the agent 15% of its time in a profile of 1 MiB GETs.
    """

    __slots__ = ("_parts", "body_size", "cap", "head", "stored")

    def __init__(self, head: bytes, cap: int, body: bytes = b"") -> None:
        self.head = head
        self._parts: list[bytes] = [body] if body else []
        self.stored = len(body)
        self.body_size = len(body)
        self.cap = cap

    def add(self, chunk: bytes | int) -> int:
        """Tee a chunk (an int: that many bytes went past unseen); returns how many bytes
        were stored."""
        if chunk.__class__ is int:
            self.body_size += chunk
            return 0
        n = len(chunk)
        self.body_size += n
        room = self.cap - self.stored
        if room <= 0:
            return 0
        if n > room:
            chunk = chunk[:room]
            n = room
        self._parts.append(chunk if chunk.__class__ is bytes else bytes(chunk))  # views are copied
        self.stored += n
        return n

    @property
    def body(self) -> bytes:
        if len(self._parts) > 1:
            self._parts = [b"".join(self._parts)]
        return self._parts[0] if self._parts else b""

    @property
    def truncated(self) -> bool:
        return self.body_size > self.stored

    @property
    def raw(self) -> bytes:
        return self.head + self.body


class Capture:
    """One exchange, in the shape of ngrok's captured request."""

    __slots__ = (
        "_req_head",
        "_resp_head",
        "duration",
        "id",
        "remote_addr",
        "replay_of",
        "req",
        "resp",
        "size",
        "start",
        "tunnel_name",
    )

    def __init__(
        self,
        tunnel_name: str,
        remote_addr: str,
        req_head: Head,
        cap: int,
        replay_of: str | None = None,
    ) -> None:
        self.id = capture_id()
        self.tunnel_name = tunnel_name
        self.remote_addr = remote_addr
        self.start = time.time()
        self.duration = 0
        self.req = _Half(req_head.raw, cap)
        self._req_head = req_head
        self.resp: _Half | None = None
        self._resp_head: Head | None = None
        self.replay_of = replay_of
        self.size = OVERHEAD + len(req_head.raw)

    # ------------------------------------------------------------ accessors
    @property
    def method(self) -> str:
        return self._req_head.method.decode("latin-1")

    @property
    def path(self) -> str:
        return self._req_head.target.decode("latin-1")

    @property
    def host(self) -> str:
        return self._req_head.host

    @property
    def status_code(self) -> int | None:
        return self._resp_head.status if self._resp_head is not None else None

    # ------------------------------------------------------------ json shapes
    def summary(self) -> dict:
        """A list entry without raw bytes (used by the event stream)."""
        rh = self._req_head
        d = {
            "id": self.id,
            "uri": f"/api/requests/http/{self.id}",
            "tunnel_name": self.tunnel_name,
            "remote_addr": self.remote_addr,
            "start": _rfc3339(self.start),
            "duration": self.duration,
            "method": rh.method.decode("latin-1"),
            "path": rh.target.decode("latin-1"),
            "host": rh.host,
            "status_code": self._resp_head.status if self._resp_head else None,
            "request_size": self.req.body_size,
            "response_size": self.resp.body_size if self.resp else 0,
            "replay_of": self.replay_of,
        }
        return d

    def to_api(self) -> dict:
        rh = self._req_head
        req = {
            "method": rh.method.decode("latin-1"),
            "proto": f"HTTP/{rh.version}",
            "headers": _headers_json(rh.headers),
            "uri": rh.target.decode("latin-1"),
            "raw": base64.b64encode(self.req.raw).decode(),
            "body_size": self.req.body_size,
            "truncated": self.req.truncated,
        }
        resp = None
        if self.resp is not None and self._resp_head is not None:
            h = self._resp_head
            reason = h.reason.decode("latin-1")
            resp = {
                "status": f"{h.status} {reason}".strip(),
                "status_code": h.status,
                "proto": f"HTTP/{h.version}",
                "headers": _headers_json(h.headers),
                "raw": base64.b64encode(self.resp.raw).decode(),
                "body_size": self.resp.body_size,
                "truncated": self.resp.truncated,
            }
        return {
            "uri": f"/api/requests/http/{self.id}",
            "id": self.id,
            "tunnel_name": self.tunnel_name,
            "remote_addr": self.remote_addr,
            "start": _rfc3339(self.start),
            "duration": self.duration,
            "request": req,
            "response": resp,
            "replay_of": self.replay_of,
        }


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


class CaptureObserver:
    """Tees one exchange into its Capture (an :class:`backend.http1.Observer`)."""

    __slots__ = ("_store", "cap")

    def __init__(self, store: InspectionStore, cap: Capture) -> None:
        self._store = store
        self.cap = cap

    def request_body(self, chunk: bytes | int) -> int:
        half = self.cap.req
        self._store._grow(self.cap, half.add(chunk))
        return half.cap - half.stored

    def response_head(self, head: Head) -> None:
        c = self.cap
        c._resp_head = head
        store = self._store
        c.resp = _Half(head.raw, store.body_cap)
        store._grow(c, len(head.raw))

    def response_body(self, chunk: bytes | int) -> int:
        half = self.cap.resp
        if half is None:
            return 0
        n = half.add(chunk)
        if n:
            self._store._grow(self.cap, n)
        return half.cap - half.stored

    def synthetic_response(self, raw: bytes) -> None:
        end = raw.find(b"\r\n\r\n") + 4
        self.response_head(parse_response_head(raw[:end], self.cap._req_head.method))
        self.response_body(raw[end:])

    def finish(self, duration_ns: int) -> None:
        self.cap.duration = duration_ns
        self._store._finished(self.cap)


class InspectionStore:
    def __init__(
        self,
        max_bytes: int = DEFAULT_DB_SIZE,
        body_cap: int = DEFAULT_BODY_CAP,
        db_path: str | Path | None = None,
        db_flush: float = 0.1,
    ) -> None:
        self.max_bytes = resolve_db_size(max_bytes)
        self.body_cap = body_cap
        self.total = 0
        self._caps: collections.OrderedDict[str, Capture] = collections.OrderedDict()
        self._listeners: list[Callable[[str, dict], None]] = []
        # Whether anyone will read events; building them costs, so ask before doing it.
        self.listening: Callable[[], bool] = lambda: bool(self._listeners)
        self._db: _CaptureDB | None = None
        if db_path:
            self._db = _CaptureDB(Path(db_path), self._db_changed)
            self._db.batch_delay = db_flush
        if self._db is not None:
            for c in self._db.load(self.max_bytes):
                self._caps[c.id] = c
                self.total += c.size

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def db_status(self) -> dict | None:
        """The ``--inspect-db`` file's health: ``{"ok", "error", "pending"}``; None without one."""
        return self._db.status() if self._db is not None else None

    def _db_changed(self, status: dict) -> None:
        if self.listening():
            self._emit("inspect_db", status)

    # ------------------------------------------------------------- capturing
    def begin(self, tunnel, start, req: Head, replay_of: str | None = None) -> CaptureObserver | None:
        if self.max_bytes <= 0:  # not self.enabled, without the property call
            return None
        addr = start.client_addr if start is not None else "127.0.0.1"
        cap = Capture(tunnel.name, addr, req, self.body_cap, replay_of)
        self._caps[cap.id] = cap
        self.total += cap.size
        if self.total > self.max_bytes:
            self._evict()
        if self.listening():
            self._emit("request_started", cap.summary())
        return CaptureObserver(self, cap)

    def _grow(self, cap: Capture, n: int) -> None:
        if n:
            cap.size += n
            if cap.id in self._caps:
                self.total += n
                if self.total > self.max_bytes:
                    self._evict()

    def _finished(self, cap: Capture) -> None:
        if self._db is not None and cap.id in self._caps:
            self._db.put(cap)
        if self.listening():
            self._emit("request_completed", cap.summary())

    def _evict(self) -> None:
        while self.total > self.max_bytes and len(self._caps) > 1:
            _, old = self._caps.popitem(last=False)
            self.total -= old.size
            if self._db is not None:
                self._db.delete(old.id)

    # --------------------------------------------------------------- queries
    def list(self, limit: int | None = None, tunnel_name: str | None = None) -> list[Capture]:
        return self.query(limit=limit, tunnel_name=tunnel_name, count=False)[0]

    def query(
        self,
        offset: int = 0,
        limit: int | None = None,
        tunnel_name: str | None = None,
        pred=None,
        count: bool = True,
    ) -> tuple[list[Capture], int]:
        """Newest-first window of the captures that match; also how many match in all."""
        out: list[Capture] = []
        total = 0
        if pred is None and tunnel_name is None and count:
            caps = list(reversed(self._caps.values()))  # fast path: plain paging
            return caps[offset : None if limit is None else offset + limit], len(caps)
        for cap in reversed(self._caps.values()):
            if tunnel_name is not None and cap.tunnel_name != tunnel_name:
                continue
            if pred is not None and not pred(cap):
                continue
            if total >= offset and (limit is None or len(out) < limit):
                out.append(cap)
            total += 1
            if not count and limit is not None and len(out) >= limit:
                break
        return out, total

    def newest_id(self) -> str | None:
        return next(reversed(self._caps), None) if self._caps else None

    def get(self, cid: str) -> Capture | None:
        return self._caps.get(cid)

    def delete(self, cid: str) -> bool:
        cap = self._caps.pop(cid, None)
        if cap is None:
            return False
        self.total -= cap.size
        if self._db is not None:
            self._db.delete(cid)
        if self.listening():
            self._emit("request_deleted", {"id": cid})
        return True

    def clear(self) -> None:
        self._caps.clear()
        self.total = 0
        if self._db is not None:
            self._db.clear()
        if self.listening():
            self._emit("requests_cleared", {})

    def __len__(self) -> int:
        return len(self._caps)

    # ----------------------------------------------------------------- events
    def subscribe(self, fn: Callable[[str, dict], None]) -> Callable[[], None]:
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def _emit(self, name: str, data: dict) -> None:
        for fn in list(self._listeners):
            fn(name, data)

    async def flush(self) -> None:
        if self._db is not None:
            await self._db.flush()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


class _CaptureDB:
    """SQLite persistence for captures; writes are batched and done in a thread.

    A batch goes out :attr:`batch_delay` after the first capture that finishes in it, so
    a ``kill -9`` loses the captures of at most the last ``batch_delay`` (plus the batch
    being written); :meth:`close` (a clean stop, SIGTERM/SIGINT/SIGHUP) writes them all.
    A batch that fails (disk full, read-only, I/O error) is kept and retried with
    backoff; the failure is logged (rate-limited) and reported by :meth:`status`, and
    ``on_change`` is called when it starts, on each failed retry and when it clears.
    What waits is bounded: a capture evicted from memory is dropped from the queue too.
    """

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS captures (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT UNIQUE NOT NULL,
        meta TEXT NOT NULL,
        req_head BLOB NOT NULL, req_body BLOB NOT NULL,
        resp_head BLOB, resp_body BLOB
    );
    """

    batch_delay = 0.1  # seconds from a finished capture to its batch write
    retry_min = 0.5  # first retry after a failed write, doubling ...
    retry_max = 5.0  # ... up to this
    log_every = 60.0  # while failing, at most one log line per this many seconds

    def __init__(self, path: Path, on_change: Callable[[dict], None] | None = None) -> None:
        self.path = path
        # Captures hold clients' Authorization headers and cookies: a 0600 file (and a
        # 0700 directory if we make it; one the user chose is left as it is).
        private_dir(path.parent, tighten=False)
        private_sqlite(path)
        self.conn = sqlite3.connect(path, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        sqlite_side_files(path)
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(self.SCHEMA)
        # Waiting to be written, in order. Only the event loop's thread touches these.
        self._puts: dict[str, Capture] = {}
        self._deletes: dict[str, None] = {}
        self._clear = False
        # The batch a worker thread is writing; the worker clears it once it is stored.
        self._inflight: tuple[dict[str, Capture], dict[str, None], bool] | None = None
        self._wlock = threading.Lock()  # one writer on the connection at a time
        self._flush_lock: asyncio.Lock | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self.on_change = on_change or (lambda status: None)
        self.ok = True
        self.error: str | None = None
        self.failures = 0  # failed writes since the last good one
        self._backoff = 0.0
        self._logged_at = float("-inf")

    @property
    def pending(self) -> int:
        """Captures finished but not yet in the file."""
        n = len(self._puts)
        if self._inflight is not None:
            n += len(self._inflight[0])
        return n

    def status(self) -> dict:
        return {"ok": self.ok, "error": self.error, "pending": self.pending}

    def load(self, max_bytes: int) -> list[Capture]:
        from backend.http1 import parse_request_head

        rows = self.conn.execute(
            "SELECT id, meta, req_head, req_body, resp_head, resp_body FROM captures ORDER BY seq DESC"
        ).fetchall()
        out: list[Capture] = []
        total = 0
        for cid, meta_s, rqh, rqb, rsh, rsb in rows:
            try:
                meta = json.loads(meta_s)
                req = parse_request_head(bytes(rqh))
                cap = Capture(meta["tunnel_name"], meta["remote_addr"], req, meta["cap"], meta.get("replay_of"))
            except Exception as exc:  # a damaged row must not stop the agent
                log.warning("skipping unreadable capture %s: %s", cid, exc)
                continue
            cap.id = cid
            cap.start = meta["start"]
            cap.duration = meta["duration"]
            cap.req = _Half(cap.req.head, meta["cap"], bytes(rqb))
            cap.req.body_size = meta["req_size"]
            cap.size += len(rqb)
            if rsh is not None:
                with contextlib.suppress(Exception):
                    cap._resp_head = parse_response_head(bytes(rsh), req.method)
                    cap.resp = _Half(bytes(rsh), meta["cap"], bytes(rsb or b""))
                    cap.resp.body_size = meta["resp_size"]
                    cap.size += len(rsh) + len(rsb or b"")
            if total + cap.size > max_bytes:
                break
            total += cap.size
            out.append(cap)
        out.reverse()
        return out

    def put(self, cap: Capture) -> None:
        self._puts[cap.id] = cap
        self._schedule()

    def delete(self, cid: str) -> None:
        if self._puts.pop(cid, None) is None:  # not written yet: nothing to delete
            self._deletes[cid] = None
        self._schedule()

    def clear(self) -> None:
        self._puts.clear()
        self._deletes.clear()
        self._clear = True
        self._schedule()

    def _schedule(self) -> None:
        if self._closed:
            return
        if self._task is None or self._task.done():
            with contextlib.suppress(RuntimeError):
                self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        delay = self.batch_delay
        while True:
            await asyncio.sleep(delay)
            ok = await self.flush()
            if ok and not (self._puts or self._deletes or self._clear):
                return
            delay = self.batch_delay if ok else self._backoff

    async def flush(self) -> bool:
        """Write what is waiting; False if that failed (it stays queued for a retry)."""
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
        async with self._flush_lock:
            if self._closed or not (self._puts or self._deletes or self._clear):
                return True
            batch = self._inflight = (self._puts, self._deletes, self._clear)
            self._puts, self._deletes, self._clear = {}, {}, False
            rows = self._rows(batch[0].values())  # on the loop: captures are not thread-safe
            try:
                await asyncio.to_thread(self._write_batch, rows, list(batch[1]), batch[2])
            except asyncio.CancelledError:
                raise  # close() takes the batch over
            except Exception as exc:
                self._requeue()
                if not self._closed:  # close() wrote (or reported) the batch itself
                    self._failed(exc)
                return False
            if not self.ok:
                self._recovered()
            return True

    def _write_batch(self, rows: list[tuple], deletes: list[str], clear: bool) -> None:
        """In a worker thread: write one batch and mark it stored."""
        with self._wlock:
            if self._closed:
                raise sqlite3.ProgrammingError("capture db is closed")
            self._write(rows, deletes, clear)
            self._inflight = None

    def _requeue(self) -> None:
        """Put the batch that did not get written back in front of what came since."""
        batch, self._inflight = self._inflight, None
        if batch is None:
            return
        puts, deletes, clear = batch
        if self._clear:  # cleared meanwhile: the old batch no longer matters
            return
        merged = {cid: c for cid, c in puts.items() if cid not in self._deletes}
        merged.update(self._puts)
        self._puts = merged
        dels = dict(deletes)
        dels.update(self._deletes)
        self._deletes = dels
        self._clear = clear

    def _failed(self, exc: Exception) -> None:
        first = self.ok
        self.ok = False
        self.error = f"{exc}" or type(exc).__name__
        self.failures += 1
        self._backoff = min(self.retry_max, max(self.retry_min, self._backoff * 2))
        now = time.monotonic()
        if first or now - self._logged_at >= self.log_every:
            self._logged_at = now
            log.warning(
                "capture db %s: write failed (%s); %d captures kept in memory, retrying%s",
                self.path,
                self.error,
                self.pending,
                "" if first else f" ({self.failures} failures so far)",
            )
        self.on_change(self.status())

    def _recovered(self) -> None:
        log.warning("capture db %s: writing again after %d failed attempts", self.path, self.failures)
        self.ok, self.error, self.failures, self._backoff = True, None, 0, 0.0
        self._logged_at = float("-inf")
        self.on_change(self.status())

    @staticmethod
    def _rows(puts) -> list[tuple]:
        return [
            (
                c.id,
                json.dumps(
                    {
                        "tunnel_name": c.tunnel_name,
                        "remote_addr": c.remote_addr,
                        "start": c.start,
                        "duration": c.duration,
                        "replay_of": c.replay_of,
                        "cap": c.req.cap,
                        "req_size": c.req.body_size,
                        "resp_size": c.resp.body_size if c.resp else 0,
                    }
                ),
                c.req.head,
                c.req.body,
                c.resp.head if c.resp else None,
                c.resp.body if c.resp else None,
            )
            for c in puts
        ]

    def _write(self, rows: list[tuple], deletes: list[str], clear: bool) -> None:
        with self.conn:
            if clear:
                self.conn.execute("DELETE FROM captures")
            if rows:
                self.conn.executemany(
                    "INSERT OR REPLACE INTO captures (id, meta, req_head, req_body, resp_head, resp_body)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
            if deletes:
                self.conn.executemany("DELETE FROM captures WHERE id = ?", [(d,) for d in deletes])

    def close(self) -> None:
        """Write everything still waiting, synchronously, and close the file.

        Called on a clean stop (SIGTERM, SIGINT, SIGHUP). A batch a worker thread is
        writing is waited for; if that or this last write fails, the loss is logged.
        """
        if self._closed:
            return
        if self._task is not None:
            self._task.cancel()
        with self._wlock:
            self._closed = True
            self._requeue()  # a batch whose writer was cancelled or failed
            puts, deletes, clear = self._puts, self._deletes, self._clear
            self._puts, self._deletes, self._clear = {}, {}, False
            try:
                if puts or deletes or clear:
                    self._write(self._rows(puts.values()), list(deletes), clear)
            except Exception as exc:
                log.error("capture db %s: %d captures could not be saved at stop: %s", self.path, len(puts), exc)
            finally:
                self.conn.close()
