"""The edge's Prometheus metrics (``GET /metrics`` on the API port, text format).

Counters that the data path moves live here as module-level objects, pre-bound to their
labels so that counting costs one locked add; values that the edge already holds
(sessions, endpoints, open connections) are read at scrape time by
:class:`EdgeCollector`, never kept twice.  Labels are small fixed sets (status class,
listener, direction): no account, host or IP ever becomes a label, so a scrape neither
grows with traffic nor tells one tenant about another.

Other parts of the edge count through these names, e.g. the ACME client:
``metrics.ACME_FAILURES.inc()``.
"""

from __future__ import annotations

from collections import Counter as _Tally
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from backend.edge.server import Edge

__all__ = [
    "ACME_FAILURES",
    "CONTENT_TYPE",
    "HANDSHAKE_FAILURES",
    "POLICY_SECONDS",
    "REGISTRY",
    "EdgeCollector",
    "http_request",
    "relayed",
    "render",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST
disable_created_metrics()  # no *_created series: they double a scrape and say little
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, open fds, memory

# Requests and bytes are counted on every public request, so they are plain ints of the
# event loop's thread (no lock, no label lookup: prometheus_client's Counter.inc cost
# ~8% of small-request throughput in an A/B run) and become counters at scrape time.
_requests = [0] * 6  # by status class: index 1..5
_bytes = [0, 0]  # in (from public clients), out (to them)


class _DataPathCollector:
    def collect(self):
        req = CounterMetricFamily(
            "burrow_http_requests",
            "HTTP requests on the public listeners, by the status class of the answer "
            "(the upstream's, a traffic policy's or the edge's own error page)",
            labels=["code"],
        )
        for c in range(1, 6):
            req.add_metric([f"{c}xx"], _requests[c])
        yield req
        b = CounterMetricFamily(
            "burrow_public_bytes",
            "Bytes relayed for public clients: in = from the client, out = to the client",
            labels=["direction"],
        )
        b.add_metric(["in"], _bytes[0])
        b.add_metric(["out"], _bytes[1])
        yield b


REGISTRY.register(_DataPathCollector())

HANDSHAKE_FAILURES = Counter(
    "burrow_handshake_failures_total",
    "Connections dropped before their handshake completed (TLS, ClientHello, or the "
    "ingress's first message), by listener",
    ["listener"],
    registry=REGISTRY,
)
for _listener in ("https", "ingress"):
    HANDSHAKE_FAILURES.labels(listener=_listener)

ACME_FAILURES = Counter(
    "burrow_acme_failures_total",
    "ACME orders, challenges or renewals that failed",
    registry=REGISTRY,
)

POLICY_SECONDS = Histogram(
    "burrow_policy_evaluation_seconds",
    "Time spent evaluating one traffic policy phase",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)


def _hook_policy_engine() -> None:
    from backend.policy import engine

    engine.observe_eval = POLICY_SECONDS.observe


_hook_policy_engine()


def http_request(status: int, bytes_in: int = 0, bytes_out: int = 0) -> None:
    """Count one answered public HTTP request and the bytes of its exchange."""
    c = status // 100
    if 1 <= c <= 5:
        _requests[c] += 1
    _bytes[0] += bytes_in
    _bytes[1] += bytes_out


def relayed(bytes_in: int, bytes_out: int) -> None:
    _bytes[0] += bytes_in
    _bytes[1] += bytes_out


class EdgeCollector:
    """What one edge holds right now, read at scrape time."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    def collect(self):
        edge = self.edge
        sessions = GaugeMetricFamily(
            "burrow_agent_sessions", "Agent sessions online, by agent kind", labels=["agent"]
        )
        kinds = _Tally("ngrok" if hasattr(s, "mux") else "burrow" for s in edge.registry.sessions.values())
        for kind in ("burrow", "ngrok"):
            sessions.add_metric([kind], kinds.get(kind, 0))
        yield sessions

        endpoints = GaugeMetricFamily(
            "burrow_endpoints", "Endpoints being served, by type and protocol", labels=["type", "proto"]
        )
        tally = _Tally(
            ("agent" if ep.session is not None else "cloud", ep.proto) for ep in edge.registry.endpoints()
        )
        for kind in ("agent", "cloud"):
            for proto in ("http", "https", "tls", "tcp"):
                endpoints.add_metric([kind, proto], tally.get((kind, proto), 0))
        yield endpoints

        conns = edge.public_conns
        yield GaugeMetricFamily(
            "burrow_public_connections_open", "Public connections open now (http, https, tcp)", value=conns.count
        )
        yield CounterMetricFamily(
            "burrow_public_connections",
            "Public connections accepted since start",
            value=conns.accepted,
        )
        yield CounterMetricFamily(
            "burrow_public_connections_refused",
            "Public connections refused by --max-conns / --max-conns-per-ip",
            value=conns.refused,
        )
        pending = GaugeMetricFamily(
            "burrow_handshakes_in_progress",
            "Connections still in a handshake, by listener",
            labels=["listener"],
        )
        pending.add_metric(["https"], edge.tls_pending.count)
        pending.add_metric(["ingress"], edge.ingress_pending.count)
        yield pending


def render(edge: Edge) -> bytes:
    """The text exposition of the process-wide metrics and of ``edge``'s live state."""
    mine = CollectorRegistry(auto_describe=False)
    mine.register(EdgeCollector(edge))
    return generate_latest(REGISTRY) + generate_latest(mine)
