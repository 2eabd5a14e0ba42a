"""Sliding windows, nearest-rank quantiles and the moving average behind admission decisions."""

from __future__ import annotations

import pytest

from poolguard.errors import ConfigError
from poolguard.stats import PoolStats, SlidingWindow

NOW = 1000.0


def test_quantiles_are_nearest_rank() -> None:
    window = SlidingWindow(size=200, max_age=60.0)
    for value in range(100, 0, -1):  # insertion order must not matter
        window.append((float(value), NOW))
    assert window.quantiles(NOW, 0.5, 0.99) == (50.0, 99.0)
    assert window.quantiles(NOW, 0.0, 0.01, 0.9, 1.0) == (1.0, 1.0, 90.0, 100.0)


def test_quantiles_of_small_samples() -> None:
    window = SlidingWindow(size=8)
    window.append((0.3, NOW))
    assert window.quantiles(NOW, 0.5, 0.99) == (0.3, 0.3)
    window.append((0.1, NOW))
    window.append((0.2, NOW))
    # nearest rank: p50 of three samples is the 2nd, p99 the 3rd
    assert window.quantiles(NOW, 0.5, 0.99) == (0.2, 0.3)


def test_empty_window_has_no_quantiles() -> None:
    window = SlidingWindow(size=4)
    assert window.quantiles(NOW, 0.5) is None
    assert window.recent(NOW) == []


def test_samples_older_than_max_age_drop_out() -> None:
    window = SlidingWindow(size=16, max_age=10.0)
    window.append((5.0, NOW))
    window.append((1.0, NOW + 4))
    assert sorted(window.recent(NOW + 10)) == [1.0, 5.0]
    assert sorted(window.recent(NOW + 11)) == [1.0]
    assert window.quantiles(NOW + 11, 0.99) == (1.0,)
    assert window.quantiles(NOW + 15, 0.5) is None


def test_ring_overwrites_the_oldest_beyond_its_size() -> None:
    window = SlidingWindow(size=3)
    for value in (1.0, 2.0, 3.0, 4.0, 5.0):
        window.append((value, NOW))
    assert sorted(window.recent(NOW)) == [3.0, 4.0, 5.0]
    assert window.quantiles(NOW, 0.0, 1.0) == (3.0, 5.0)


@pytest.mark.parametrize("size", [0, -1, 2.5, "10", True, None])
def test_invalid_size_is_a_config_error(size: object) -> None:
    with pytest.raises(ConfigError) as caught:
        SlidingWindow(size=size)  # type: ignore[arg-type]
    assert caught.value.setting == "SlidingWindow.size"
    assert "SlidingWindow.size" in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("max_age", [0, -1.0, float("inf"), float("nan"), "60", False])
def test_invalid_max_age_is_a_config_error(max_age: object) -> None:
    with pytest.raises(ConfigError) as caught:
        SlidingWindow(max_age=max_age)  # type: ignore[arg-type]
    assert caught.value.setting == "SlidingWindow.max_age"
    assert "SlidingWindow.max_age" in str(caught.value)


def test_mean_of_last_is_zero_without_samples_then_follows_the_newest() -> None:
    window = SlidingWindow(size=8)
    assert window.mean_of_last(3) == 0.0
    window.append((4.0, 0.0))
    assert window.mean_of_last(3) == pytest.approx(4.0)
    for value in (1.0, 2.0, 3.0):
        window.append((value, 1.0))
    assert window.mean_of_last(3) == pytest.approx(2.0)  # 4.0 is no longer among the newest three
    assert window.mean_of_last(10) == pytest.approx(2.5)


def test_mean_of_last_counts_zero_samples_and_ignores_age() -> None:
    # A connection returned within the clock's resolution has a use time of 0.0: a real sample.
    window = SlidingWindow(size=8, max_age=1.0)
    window.append((0.0, 0.0))
    window.append((10.0, 100.0))  # the first sample is long past max_age: the estimate still uses it
    assert window.mean_of_last(2) == pytest.approx(5.0)


def test_pool_stats_to_dict_has_every_field() -> None:
    stats = PoolStats(
        name="primary",
        backend="postgresql",
        size=10,
        max_overflow=5,
        checked_out=2,
        idle=8,
        overflow=0,
        pending=0,
        utilization=0.13,
        wait_p50=0.0001,
        wait_p99=0.002,
        use_p50=0.01,
        use_p99=0.2,
        checkouts=40,
        timeouts=1,
        connections_created=10,
        create_p50=0.003,
        suspected_leaks=0,
        shed=2,
        breaker_state="closed",
        shed_by_reason={"circuit_open": 0, "pool_saturated": 2},
        leaks_reported=1,
    )
    data = stats.to_dict()
    assert data["name"] == "primary"
    assert data["wait_p99"] == 0.002
    assert data["breaker_state"] == "closed"
    assert data["shed_by_reason"] == {"circuit_open": 0, "pool_saturated": 2}
    assert data["leaks_reported"] == 1
    assert len(data) == 22
