"""The connection budget's arithmetic: verdicts, headroom, rollout surge, and suggestions that really fit."""

from __future__ import annotations

import pytest
import sqlalchemy

import poolguard
from poolguard.diagnose.budget import (
    Fleet,
    PgBouncerSettings,
    Quantity,
    ServerLimits,
    Service,
    assess,
    engine_pool,
    limits_from_row,
)
from poolguard.errors import ConfigError
from tests.support.databases import PG_URL

NO_SURGE = Quantity(0)


def the_issue_fleet(**fleet: object) -> Fleet:
    """The seed's picture: 10 + 5 + 8 pods x 20 connections."""
    services = tuple(
        Service(name=name, replicas=replicas, pool_size=20) for name, replicas in (("a", 10), ("b", 5), ("c", 8))
    )
    return Fleet(services=services, **fleet)  # type: ignore[arg-type]


def test_the_issue_fleet_is_over_and_the_numbers_say_by_how_much() -> None:
    budget = assess(the_issue_fleet(max_surge=NO_SURGE), ServerLimits(max_connections=200, reserved=3))
    assert (budget.demand, budget.peak, budget.limits.usable, budget.margin) == (460, 460, 197, 20)
    assert budget.headroom == 197 - 460
    assert budget.verdict == "over"
    assert budget.exit_code == 1
    assert budget.reasons == ("the fleet may open 460 connections; the server allows 197",)


def test_a_fleet_well_inside_fits_and_suggests_nothing() -> None:
    fleet = Fleet(services=(Service(name="orders", replicas=4, processes=2, pool_size=5, max_overflow=2),))
    budget = assess(fleet, ServerLimits(max_connections=100, reserved=3))
    # 4 x 2 x 7 = 56, rollout +1 pod (25 % of 4) = +14: 70 of 97, 27 free, margin 10
    assert (budget.demand, budget.peak, budget.headroom, budget.margin) == (56, 70, 27, 10)
    assert budget.verdict == "fits"
    assert budget.exit_code == 0
    assert budget.pool_suggestion is None
    assert budget.pgbouncer_suggestion is None


def test_inside_the_server_but_inside_the_margin_is_tight() -> None:
    fleet = Fleet(services=(Service(name="orders", replicas=9, pool_size=10),), max_surge=NO_SURGE)
    budget = assess(fleet, ServerLimits(max_connections=100, reserved=3))
    assert (budget.peak, budget.headroom, budget.margin) == (90, 7, 10)
    assert budget.verdict == "tight"
    assert budget.exit_code == 0
    assert "leaves 7 connections free; the margin wants 10" in budget.reasons[0]


def test_a_rollout_surge_alone_can_put_a_fleet_over() -> None:
    fleet = Fleet(
        services=(Service(name="orders", replicas=8, pool_size=10), Service(name="jobs", replicas=1, pool_size=5))
    )
    limits = ServerLimits(max_connections=100, reserved=3)
    steady = assess(Fleet(services=fleet.services, max_surge=NO_SURGE), limits)
    rolling = assess(fleet, limits)
    assert steady.verdict == "fits"  # 85 of 97: 12 free, margin 10
    # maxSurge 25 % of 8 pods = 2 more orders pods while it rolls (the largest surge; jobs adds 1 x 5)
    assert (rolling.peak, rolling.surging) == (105, "orders")
    assert rolling.verdict == "over"
    assert "during a rollout" in rolling.reasons[0]


def test_max_surge_is_rounded_up_like_kubernetes() -> None:
    service = Service(name="s", replicas=5, pool_size=1)
    assert service.surge_pods(Quantity(25, percent=True)) == 2  # ceil(1.25)
    assert service.surge_pods(Quantity(20, percent=True)) == 1
    assert service.surge_pods(Quantity(3)) == 3
    assert Service(name="s", replicas=5, pool_size=1, max_surge=Quantity(0)).surge_pods(Quantity(1)) == 0


def test_the_margin_is_an_option() -> None:
    fleet = Fleet(services=(Service(name="orders", replicas=9, pool_size=10),), max_surge=NO_SURGE, margin=Quantity(5))
    assert assess(fleet, ServerLimits(max_connections=100, reserved=3)).verdict == "fits"


@pytest.mark.parametrize("max_surge", [NO_SURGE, Quantity(25, percent=True), Quantity(3)])
@pytest.mark.parametrize("max_connections", [60, 200, 500])
def test_suggested_pool_sizes_fit_when_run_again(max_surge: Quantity, max_connections: int) -> None:
    services = (
        Service(name="a", replicas=10, pool_size=20),
        Service(name="b", replicas=5, processes=2, pool_size=8, max_overflow=4),
        Service(name="c", replicas=8, pool_size=20, other=1),
    )
    fleet = Fleet(services=services, max_surge=max_surge)
    limits = ServerLimits(max_connections=max_connections, reserved=3)
    budget = assess(fleet, limits)
    assert budget.verdict != "fits"
    assert budget.pool_suggestion is not None
    sized = {s.name: s for s in budget.pool_suggestion}
    rerun = Fleet(
        services=tuple(
            Service(
                name=service.name,
                replicas=service.replicas,
                processes=service.processes,
                pool_size=sized[service.name].pool_size,
                max_overflow=sized[service.name].max_overflow,
                other=service.other,
            )
            for service in services
        ),
        max_surge=max_surge,
    )
    again = assess(rerun, limits)
    assert again.verdict == "fits", again.to_dict()
    # The room is used, not wasted by rounding: one more connection anywhere would not fit.
    assert again.headroom - again.margin < max(s.processes * (s.replicas + s.surge_pods(max_surge)) for s in services)
    # Shared in proportion to demand: equal pools stay (about) equal, the overflow ratio is kept.
    assert abs(sized["a"].pool_size - sized["c"].pool_size) <= 1
    assert sized["b"].pool_size >= sized["b"].max_overflow


def test_when_one_connection_per_process_is_too_many_only_pgbouncer_is_suggested() -> None:
    fleet = Fleet(services=(Service(name="web", replicas=100, processes=4, pool_size=5),))
    budget = assess(fleet, ServerLimits(max_connections=100, reserved=3))
    assert budget.pool_suggestion is None
    assert budget.no_pool_fit
    bouncer = budget.pgbouncer_suggestion
    assert bouncer is not None
    assert (bouncer.max_db_connections, bouncer.default_pool_size, bouncer.max_client_conn) == (87, 20, 2500)


def test_the_pgbouncer_suggestion_fits_when_run_again() -> None:
    fleet = the_issue_fleet()
    limits = ServerLimits(max_connections=200, reserved=3)
    suggestion = assess(fleet, limits).pgbouncer_suggestion
    assert suggestion is not None
    assert suggestion.server_connections <= 177
    assert suggestion.max_client_conn >= fleet.peak
    again = assess(Fleet(services=fleet.services, pgbouncer=suggestion), limits)
    assert again.verdict == "fits", again.reasons


def test_behind_pgbouncer_the_server_sees_pgbouncer_and_pgbouncer_sees_the_fleet() -> None:
    bouncer = PgBouncerSettings(instances=2, default_pool_size=30, max_db_connections=50, max_client_conn=300)
    fleet = Fleet(services=the_issue_fleet().services, pgbouncer=bouncer)
    budget = assess(fleet, ServerLimits(max_connections=200, reserved=3))
    assert budget.server_peak == 2 * 30  # default_pool_size under the cap
    assert budget.headroom == 197 - 60
    # 520 clients at the peak (460 + the rollout of a's 3 extra pods): over one instance's 300, within two
    assert budget.verdict == "tight"
    assert "one PgBouncer instance lost" in budget.reasons[0]
    small = Fleet(services=fleet.services, pgbouncer=PgBouncerSettings(instances=2, max_client_conn=200))
    over = assess(small, ServerLimits(max_connections=200, reserved=3))
    assert over.verdict == "over"
    assert over.reasons == ("the fleet may open 520 client connections; PgBouncer accepts 400",)
    assert over.pgbouncer_suggestion is not None
    assert over.pgbouncer_suggestion.max_client_conn == 520


def test_pgbouncer_over_the_server_gets_a_cap_per_instance() -> None:
    bouncer = PgBouncerSettings(instances=3, default_pool_size=50, max_client_conn=1000)
    budget = assess(Fleet(services=the_issue_fleet().services, pgbouncer=bouncer), ServerLimits(max_connections=100))
    assert budget.verdict == "over"
    suggestion = budget.pgbouncer_suggestion
    assert suggestion is not None
    assert (suggestion.instances, suggestion.max_db_connections, suggestion.default_pool_size) == (3, 30, 30)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, (5, 2)),
        ({"workers": 8}, (8, 4)),
        ({"workers": 1}, (1, 0)),
        ({"workers": 8, "pgbouncer": True}, (2, 6)),
        ({"workers": 1, "pgbouncer": True}, (1, 0)),
        ({"workers": 8, "pool_size": 3}, (3, 4)),
        ({"workers": 8, "max_overflow": 0}, (8, 0)),
        ({"workers": 6, "pgbouncer": True, "pool_size": 4}, (4, 2)),
    ],
)
def test_engine_pool_is_what_create_engine_builds(kwargs: dict[str, object], expected: tuple[int, int]) -> None:
    assert engine_pool(**kwargs) == expected  # type: ignore[arg-type]
    engine = poolguard.create_engine(PG_URL, **kwargs)  # type: ignore[arg-type]
    try:
        pool = engine.pool
        assert isinstance(pool, sqlalchemy.pool.QueuePool)
        assert (pool.size(), pool._max_overflow) == expected
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("build", "setting"),
    [
        (lambda: Service(name="s", replicas=-1, pool_size=1), "service 's': replicas"),
        (lambda: Service(name="s", replicas=1, pool_size=-2), "service 's': pool_size"),
        (lambda: Service(name="s", replicas=1, pool_size=0), "service 's': pool_size"),
        (lambda: Service(name="s", replicas=1, processes=0, pool_size=1), "service 's': processes"),
        (lambda: ServerLimits(max_connections=10, reserved=10), "reserved"),
        (lambda: PgBouncerSettings(instances=0), "pgbouncer: instances"),
        (lambda: Fleet(services=()), "services"),
    ],
)
def test_bad_values_name_the_setting(build: object, setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build()  # type: ignore[operator]
    assert caught.value.setting == setting


def test_a_client_side_fix_keeps_the_server_side_settings_that_fit() -> None:
    bouncer = PgBouncerSettings(instances=2, default_pool_size=10, max_db_connections=15, max_client_conn=100)
    budget = assess(Fleet(services=the_issue_fleet().services, pgbouncer=bouncer), ServerLimits(max_connections=200))
    assert budget.verdict == "over"  # 520 clients, 200 accepted
    suggestion = budget.pgbouncer_suggestion
    assert suggestion is not None
    assert (suggestion.default_pool_size, suggestion.max_db_connections, suggestion.max_client_conn) == (10, 15, 520)


def test_limits_from_a_postgresql_16_row_subtract_both_reserved_settings() -> None:
    limits = limits_from_row("postgresql", (200, 3, 5), "postgresql at db:5432")
    assert (limits.max_connections, limits.reserved, limits.usable) == (200, 8, 192)
    assert limits.settings == {"superuser_reserved_connections": 3, "reserved_connections": 5}
    before_16 = limits_from_row("postgresql", (200, 3, None), "postgresql at db:5432")
    assert (before_16.reserved, before_16.settings) == (3, {"superuser_reserved_connections": 3})
    assert limits_from_row("mysql", (151,), "mysql at db:3306").usable == 151
