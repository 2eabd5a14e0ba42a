"""Names the public contract (../shared/API.md) fixes, written once for every test that checks them."""

from __future__ import annotations

HEALTH_POOL_KEYS = frozenset(
    {
        "name",
        "status",
        "backend",
        "size",
        "max_overflow",
        "checked_out",
        "idle",
        "overflow",
        "pending",
        "utilization",
        "wait_seconds",
        "timeouts",
        "suspected_leaks",
        "ping_seconds",
        "breaker",
        "pooler",
    }
)
"""The keys of each pool in the health JSON."""
