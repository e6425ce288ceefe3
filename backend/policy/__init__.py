"""Traffic policy: the document model (here) and, later, the engine that runs it."""

from __future__ import annotations

from backend.policy.document import (
    PHASES,
    Action,
    PolicyError,
    Rule,
    TrafficPolicy,
    parse_policy,
)

__all__ = ["PHASES", "Action", "PolicyError", "Rule", "TrafficPolicy", "parse_policy"]
