"""Tunnel metrics in the shape of ngrok's agent API (``conns`` and ``http``).

Rates are exponentially weighted moving averages over 1, 5 and 15 minutes, ticked
every 5 seconds like the go-metrics meters ngrok uses; percentiles come from a
bounded reservoir of recent durations (uniform sampling, Vitter's algorithm R).
"""

from __future__ import annotations

import math
import random
import time

_random = random.random

TICK = 5.0
_ALPHAS = tuple(1 - math.exp(-TICK / 60.0 / m) for m in (1, 5, 15))


class Meter:
    __slots__ = ("_last", "_pending", "count", "rates")

    def __init__(self) -> None:
        self.count = 0
        self._pending = 0
        self.rates: list[float | None] = [None, None, None]
        self._last = time.monotonic()

    def mark(self, n: int = 1) -> None:
        self.count += n
        self._pending += n

    def _catch_up(self) -> None:
        now = time.monotonic()
        while now - self._last >= TICK:
            self._last += TICK
            inst = self._pending / TICK
            self._pending = 0
            for i, a in enumerate(_ALPHAS):
                r = self.rates[i]
                self.rates[i] = inst if r is None else r + a * (inst - r)

    def snapshot(self) -> tuple[float, float, float]:
        self._catch_up()
        r = self.rates
        return (r[0] or 0.0, r[1] or 0.0, r[2] or 0.0)


class Reservoir:
    __slots__ = ("_n", "_size", "_values")

    def __init__(self, size: int = 1028) -> None:
        self._size = size
        self._values: list[int] = []
        self._n = 0

    def update(self, value: int) -> None:
        self._n += 1
        if len(self._values) < self._size:
            self._values.append(value)
        else:
            i = int(_random() * self._n)  # randrange's uniform pick at a fifth of its cost
            if i < self._size:
                self._values[i] = value

    def percentiles(self, qs: tuple[float, ...]) -> list[float]:
        if not self._values:
            return [0.0] * len(qs)
        vals = sorted(self._values)
        out = []
        for q in qs:
            pos = q * (len(vals) + 1)
            if pos < 1:
                out.append(float(vals[0]))
            elif pos >= len(vals):
                out.append(float(vals[-1]))
            else:
                lo = vals[int(pos) - 1]
                hi = vals[int(pos)]
                out.append(lo + (pos - int(pos)) * (hi - lo))
        return out


class TunnelMetrics:
    """Connection and HTTP metrics of one tunnel.  Durations are in nanoseconds."""

    def __init__(self) -> None:
        self.conns = Meter()
        self.conns_gauge = 0
        self.conn_durations = Reservoir()
        self.http = Meter()
        self.http_durations = Reservoir()

    def conn_opened(self) -> None:
        self.conns.mark()
        self.conns_gauge += 1

    def conn_closed(self, duration_ns: int) -> None:
        self.conns_gauge -= 1
        self.conn_durations.update(duration_ns)

    def request_done(self, duration_ns: int) -> None:
        http = self.http  # http.mark(), inlined: once per proxied request
        http.count += 1
        http._pending += 1
        self.http_durations.update(duration_ns)

    def to_api(self) -> dict:
        """ngrok's metrics block: counts and the gauge are integers, and rates and
        percentiles are numbers written as Go writes a float64 (``0``, not ``0.0``)."""
        qs = (0.5, 0.9, 0.95, 0.99)
        c1, c5, c15 = self.conns.snapshot()
        cp = self.conn_durations.percentiles(qs)
        h1, h5, h15 = self.http.snapshot()
        hp = self.http_durations.percentiles(qs)
        n = _go_number
        return {
            "conns": {
                "count": int(self.conns.count),
                "gauge": int(self.conns_gauge),
                "rate1": n(c1),
                "rate5": n(c5),
                "rate15": n(c15),
                "p50": n(cp[0]),
                "p90": n(cp[1]),
                "p95": n(cp[2]),
                "p99": n(cp[3]),
            },
            "http": {
                "count": int(self.http.count),
                "rate1": n(h1),
                "rate5": n(h5),
                "rate15": n(h15),
                "p50": n(hp[0]),
                "p90": n(hp[1]),
                "p95": n(hp[2]),
                "p99": n(hp[3]),
            },
        }


def _go_number(x: float) -> int | float:
    """A float as Go's encoding/json writes it: whole numbers without a fraction."""
    return int(x) if float(x).is_integer() else x
