"""Caps on concurrent connections (overall and per client IP), and a throttled log.

A listener asks :meth:`ConnLimit.acquire` for each accepted connection and refuses it
cheaply (close, or a 503 for HTTP) when a cap is reached, so one client holding many
connections open cannot take the descriptors everyone else needs.  Counting is a dict
update per connection; nothing is kept for an address once its count is back to zero.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class ConnLimit:
    """At most ``total`` connections at once, and ``per_ip`` from one address (0 = no cap)."""

    __slots__ = ("accepted", "by_ip", "count", "per_ip", "refused", "total")

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self.count = 0
        self.by_ip: dict[str, int] = {}
        self.refused = 0
        self.accepted = 0  # since start (the metrics' counter)

    def acquire(self, ip: str, exempt: Callable[[str], bool] | None = None) -> bool:
        """Take a slot for ``ip``; ``exempt(ip)`` (asked only when the per-address cap is
        what stands in the way) lets a known-good address past that cap, not the total."""
        n = self.by_ip.get(ip, 0)
        if (self.total and self.count >= self.total) or (
            self.per_ip and n >= self.per_ip and (exempt is None or not exempt(ip))
        ):
            self.refused += 1
            return False
        self.count += 1
        self.accepted += 1
        self.by_ip[ip] = n + 1
        return True

    def release(self, ip: str) -> None:
        self.count -= 1
        n = self.by_ip.get(ip, 0) - 1
        if n > 0:
            self.by_ip[ip] = n
        else:
            self.by_ip.pop(ip, None)


class ThrottledLog:
    """Log a recurring message at most once per ``interval`` seconds, with a count of
    the occurrences folded into it."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self.log = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        if n:
            self.log.warning(msg + " (and %d more in the last %.0fs)", *args, n, now - last)
        else:
            self.log.warning(msg, *args)
