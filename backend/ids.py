"""Identifier generation shared by the edge, the agent and the stores.

- ``new_id("ep")`` gives ngrok-style ids (``ep_2b5X...``): a prefix and a KSUID-style
  27-character base62 body, so ids sort by creation time (and, within one process,
  strictly increase, which makes ``before_id`` paging stable).
- ``capture_id()`` gives the 16-hex ids of captured HTTP exchanges, increasing within a
  process so "newest first" is a plain sort.
- ``random_name()`` gives short random endpoint names like ngrok's ``d95211d2``.
"""

from __future__ import annotations

import os
import random
import secrets
import threading
import time

__all__ = [
    "KSUID_EPOCH",
    "base62_decode",
    "base62_encode",
    "capture_id",
    "ksuid_time",
    "new_id",
    "random_name",
]

#: KSUID timestamps count seconds from this Unix time (2014-05-13T16:53:20Z).
KSUID_EPOCH = 1_400_000_000

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE62_INDEX = {c: i for i, c in enumerate(_BASE62)}
_KSUID_LEN = 27
_PAYLOAD_BITS = 128
_PAYLOAD_MAX = (1 << _PAYLOAD_BITS) - 1

_lock = threading.Lock()
_last_ksuid: tuple[int, int] = (-1, 0)  # (timestamp, payload) of the last id issued
_last_capture = 0
_last_pid = os.getpid()


def base62_encode(value: int, width: int = _KSUID_LEN) -> str:
    """Encode a non-negative integer in base62 (0-9A-Za-z), left-padded with '0'."""
    if value < 0:
        raise ValueError("base62_encode needs a non-negative integer")
    digits: list[str] = []
    while value:
        value, rem = divmod(value, 62)
        digits.append(_BASE62[rem])
    return "".join(reversed(digits)).rjust(width, "0")


def base62_decode(text: str) -> int:
    """Decode a base62 string made by :func:`base62_encode`."""
    value = 0
    for ch in text:
        try:
            value = value * 62 + _BASE62_INDEX[ch]
        except KeyError:
            raise ValueError(f"invalid base62 character {ch!r}") from None
    return value


def _reset_after_fork() -> None:
    """Forget the monotonic state in a forked child so it never repeats the parent's ids."""
    global _last_ksuid, _last_capture, _last_pid, _fast_random
    pid = os.getpid()
    if pid != _last_pid:
        _last_ksuid, _last_capture, _last_pid = (-1, 0), 0, pid
        _fast_random = random.Random(secrets.randbits(64))


# Checked at fork time rather than on every id (os.getpid per capture showed in profiles).
os.register_at_fork(after_in_child=_reset_after_fork)


def _ksuid_body(now: float | None = None) -> str:
    """Return a 27-char KSUID body: 4-byte big-endian timestamp + 16-byte payload.

    The payload is random; when several ids fall in the same second in this process the
    payload instead grows by a random positive step, so ids stay strictly increasing
    without becoming guessable.
    """
    global _last_ksuid
    ts = int(time.time() if now is None else now) - KSUID_EPOCH
    if not 0 <= ts <= 0xFFFFFFFF:
        raise ValueError("time is outside the KSUID range")
    with _lock:
        last_ts, last_payload = _last_ksuid
        if ts < last_ts:  # the clock stepped back: keep ordering by staying on last_ts
            ts = last_ts
        payload = secrets.randbits(_PAYLOAD_BITS)
        if ts == last_ts:
            stepped = last_payload + 1 + secrets.randbits(64)
            if stepped <= _PAYLOAD_MAX:
                payload = stepped
            elif ts < 0xFFFFFFFF:  # payload space exhausted this second: borrow the next
                ts += 1
        _last_ksuid = (ts, payload)
    raw = (ts << _PAYLOAD_BITS) | payload
    return base62_encode(raw)


def new_id(prefix: str) -> str:
    """Return ``prefix_<27-char KSUID body>``, e.g. ``new_id("cr")`` -> ``cr_2b5X...``."""
    if not prefix:
        raise ValueError("an id needs a prefix")
    return f"{prefix}_{_ksuid_body()}"


def ksuid_time(id_: str) -> int:
    """Return the Unix time (seconds) encoded in an id made by :func:`new_id`."""
    body = id_.rsplit("_", 1)[-1]
    if len(body) != _KSUID_LEN:
        raise ValueError(f"not a KSUID-style id: {id_!r}")
    return (base62_decode(body) >> _PAYLOAD_BITS) + KSUID_EPOCH


# Capture ids need order and uniqueness, not secrecy: a seeded PRNG avoids a syscall per id.
_fast_random = random.Random(secrets.randbits(64))


def capture_id() -> str:
    """Return a 16-lowercase-hex id for a captured exchange, increasing within a process.

    The top 44 bits are milliseconds since the Unix epoch and the low 20 bits random;
    an id that would not exceed the previous one becomes previous + 1.
    """
    global _last_capture
    ms = time.time_ns() // 1_000_000
    candidate = ((ms & ((1 << 44) - 1)) << 20) | _fast_random.getrandbits(20)
    with _lock:
        if candidate <= _last_capture:
            candidate = _last_capture + 1
        candidate &= (1 << 64) - 1
        _last_capture = candidate
    return f"{candidate:016x}"


def random_name() -> str:
    """Return 8 random lowercase hex characters, used for generated endpoint names."""
    return secrets.token_hex(4)
