"""The pool metrics under Prometheus names, for apps scraped by Prometheus without an OpenTelemetry SDK.

Install the extra (``pip install poolguard[prometheus]``) and register each guard once::

    import poolguard.prometheus
    poolguard.prometheus.register(guard)                  # prometheus_client's default REGISTRY
    poolguard.prometheus.register(guard, registry=mine)   # or a CollectorRegistry of your own

then serve ``prometheus_client.make_wsgi_app()`` / ``make_asgi_app()`` at ``/metrics``.

The names follow the OpenTelemetry-to-Prometheus translation of the semantic-convention names
(dots become underscores, the unit ``s`` becomes ``_seconds``, counters end in ``_total``), and
attributes become labels ``pool_name``, ``state``, ``reason`` and ``route``. So the alert rules and
the dashboard in ``integrations/`` work whether the numbers come from here or from an
OpenTelemetry Collector's Prometheus exporter.

The metrics are those of :mod:`poolguard.metrics`, the list OpenTelemetry exports too. Counts,
limits, timeouts, sheds, leaks and the breaker state are read at scrape time from the gate's snapshot:
nothing is paid per checkout. The histograms need every event: they observe the guard's gate
(``add_observer``), a bisect and an increment per event. Events before :func:`register` are not in
the histograms: register right after creating the guard.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import REGISTRY, CollectorRegistry
from prometheus_client.utils import floatToGoString

from poolguard.errors import ConfigError
from poolguard.metrics import (
    BY_NAME,
    CONNECTION_STATE,
    CREATE_TIME,
    DURATION_BUCKETS,
    HTTP_ROUTE,
    METRICS,
    POOL_NAME,
    QUEUE_TIME,
    REASON,
    USE_TIME,
    WAIT_TIME,
    observations,
)

if TYPE_CHECKING:
    from poolguard.guard import Guard

__all__ = ["PoolGuardCollector", "register", "unregister"]

LABELS = {POOL_NAME: "pool_name", CONNECTION_STATE: "state", REASON: "reason", HTTP_ROUTE: "route"}
"""OpenTelemetry attribute -> Prometheus label."""

ROUTE_LIMIT = 1024
"""Distinct ``route`` label values per pool; later routes are folded into ``route="other"``."""

_TAP_ATTRIBUTE = "_poolguard_prometheus_tap"
_COLLECTOR_ATTRIBUTE = "_poolguard_collector"


class _Series:
    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.total = 0.0


class _Histogram:
    """Per-route bucket counts: O(log buckets) per event under a short lock; cumulated only at scrape."""

    __slots__ = ("_bounds", "_lock", "_series")

    def __init__(self, bounds: Sequence[float] = DURATION_BUCKETS) -> None:
        self._bounds = tuple(bounds)
        self._lock = threading.Lock()
        self._series: dict[str, _Series] = {}

    def observe(self, seconds: float, route: str | None = None) -> None:
        key = route or ""
        index = bisect_left(self._bounds, seconds)  # first bound >= seconds: Prometheus' "le"
        with self._lock:
            series = self._series.get(key)
            if series is None:
                if len(self._series) >= ROUTE_LIMIT:
                    key = "other"
                series = self._series.setdefault(key, _Series(len(self._bounds) + 1))
            series.counts[index] += 1
            series.total += seconds

    def snapshot(self) -> list[tuple[str, list[tuple[str, float]], float]]:
        """(route, cumulative buckets ending with +Inf, sum) for every route seen."""
        with self._lock:
            copies = [(route, list(s.counts), s.total) for route, s in self._series.items()]
        result = []
        for route, counts, total in copies:
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*map(floatToGoString, self._bounds), "+Inf"), counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            result.append((route, buckets, total))
        return result


class _Tap:
    """One per guard: its histograms, fed as an observer of the guard's gate."""

    def __init__(self) -> None:
        self.wait = _Histogram()
        self.use = _Histogram()
        self.create = _Histogram()
        self.queue = _Histogram()
        self.by_metric = {
            WAIT_TIME.name: self.wait,
            USE_TIME.name: self.use,
            CREATE_TIME.name: self.create,
            QUEUE_TIME.name: self.queue,
        }

    def record_wait(self, seconds: float) -> None:
        self.wait.observe(seconds)

    def record_use(self, seconds: float, route: str | None) -> None:
        self.use.observe(seconds, route)

    def record_create(self, seconds: float) -> None:
        self.create.observe(seconds)

    def record_queue(self, seconds: float) -> None:
        self.queue.observe(seconds)

    @classmethod
    def of(cls, guard: Guard) -> _Tap:
        tap: _Tap | None = getattr(guard.gate, _TAP_ATTRIBUTE, None)
        if tap is None:
            tap = cls()
            setattr(guard.gate, _TAP_ATTRIBUTE, tap)
            guard.gate.add_observer(tap)
        return tap


class PoolGuardCollector:
    """A prometheus_client collector for one or more guards, read at scrape time.

    ``PoolGuardCollector(*guards)`` then ``registry.register(collector)``; or let :func:`register`
    keep one collector per registry. Guards must have distinct names (the ``pool_name`` label).
    A closed guard stops reporting.
    """

    def __init__(self, *guards: Guard) -> None:
        self._guards: dict[str, tuple[Guard, _Tap]] = {}
        self._lock = threading.Lock()
        for guard in guards:
            self.add(guard)

    def add(self, guard: Guard) -> None:
        with self._lock:
            known = self._guards.get(guard.name)
            if known is not None:
                if known[0] is guard:
                    return
                raise ConfigError(
                    "poolguard.prometheus guard name",
                    guard.name,
                    "a name no other registered guard uses (Guard(..., name=...)); it is the pool_name label",
                )
            self._guards[guard.name] = (guard, _Tap.of(guard))

    def remove(self, guard: Guard) -> None:
        with self._lock:
            known = self._guards.get(guard.name)
            if known is not None and known[0] is guard:
                del self._guards[guard.name]

    @property
    def guards(self) -> list[Guard]:
        with self._lock:
            return [guard for guard, _ in self._guards.values()]

    def describe(self) -> list[Metric]:
        """The family names, so a registry can refuse a second collector exporting the same ones."""
        return list(_families().values())

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            watched = [(guard, tap) for guard, tap in self._guards.values() if not guard.closed]
        families = _families()
        for guard, tap in watched:
            for name, value, attributes in observations(guard.gate.snapshot()):
                family = families[name]
                assert isinstance(family, GaugeMetricFamily | CounterMetricFamily)
                family.add_metric([str(attributes[key]) for key in BY_NAME[name].attributes], value)
            for metric in METRICS:
                if metric.kind == "histogram":
                    family = families[metric.name]
                    assert isinstance(family, HistogramMetricFamily)
                    for route, buckets, total in tap.by_metric[metric.name].snapshot():
                        labels = [guard.name, route] if HTTP_ROUTE in metric.attributes else [guard.name]
                        family.add_metric(labels, buckets, total)
        yield from families.values()


def _families() -> dict[str, Metric]:
    """A fresh, empty family per metric, keyed by its OpenTelemetry name."""
    kinds: dict[str, Callable[..., Metric]] = {
        "updown": GaugeMetricFamily,
        "gauge": GaugeMetricFamily,
        "counter": CounterMetricFamily,
        "histogram": HistogramMetricFamily,
    }
    return {
        metric.name: kinds[metric.kind](
            metric.prometheus_name,
            metric.description,
            labels=[LABELS[key] for key in metric.attributes],
            unit="seconds" if metric.unit == "s" else "",
        )
        for metric in METRICS
    }


def register(guard: Guard, registry: CollectorRegistry = REGISTRY) -> PoolGuardCollector:
    """Exposes ``guard``'s pool metrics in ``registry``; one collector per registry serves every guard."""
    collector: PoolGuardCollector | None = getattr(registry, _COLLECTOR_ATTRIBUTE, None)
    if collector is None:
        collector = PoolGuardCollector(guard)
        registry.register(collector)
        setattr(registry, _COLLECTOR_ATTRIBUTE, collector)
    else:
        collector.add(guard)
    return collector


def unregister(guard: Guard, registry: CollectorRegistry = REGISTRY) -> None:
    """Stops exposing ``guard`` in ``registry`` (closing the guard does that too)."""
    collector: PoolGuardCollector | None = getattr(registry, _COLLECTOR_ATTRIBUTE, None)
    if collector is not None:
        collector.remove(guard)
