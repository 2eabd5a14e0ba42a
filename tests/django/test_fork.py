"""After os.fork() the forking thread's Django connections and the psycopg pool are the parent's: dropped, unclosed."""

from __future__ import annotations

from typing import Any

from django.db import connections
from django.test import override_settings

from tests.django.helpers import state
from tests.faults.test_fork import in_child


def backend_pid(alias: str) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


@override_settings(POOLGUARD={"DATABASES": ["persistent", "pooled"]})
def test_the_child_opens_its_own_connections_and_pool() -> None:
    guards = state().guards
    parent = {alias: backend_pid(alias) for alias in ("persistent", "pooled")}
    parent_wrapper = connections["persistent"]
    pooled_wrapper = connections["pooled"]
    parent_pool = pooled_wrapper.pool

    def child() -> dict[str, Any]:
        pids = {alias: backend_pid(alias) for alias in ("persistent", "pooled")}
        with guards["pooled"].request_scope(route="/child"):
            pids["pooled_in_request"] = backend_pid("pooled")
        return {
            **pids,
            "new_wrapper": connections["persistent"] is not parent_wrapper,
            "new_pool": connections["pooled"].pool is not parent_pool,
            "in_use": guards["pooled"].gate.admission.in_use,
        }

    seen = in_child(child)
    assert seen["persistent"] != parent["persistent"]
    assert seen["pooled"] != parent["pooled"]
    assert seen["new_wrapper"]
    assert seen["new_pool"]
    assert seen["in_use"] == 0
    assert connections["persistent"] is parent_wrapper  # the parent keeps its wrappers, pool and backends
    assert backend_pid("persistent") == parent["persistent"]
    assert connections["pooled"].pool is parent_pool
    assert backend_pid("pooled") == parent["pooled"]
