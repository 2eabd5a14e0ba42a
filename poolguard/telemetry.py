"""OpenTelemetry spans and semantic-convention metrics for a guarded pool.

Only the OpenTelemetry API is imported: without an SDK every call here is a no-op, and the
per-checkout path stays cheap. Costs are kept where they belong:

- counts (connections by state, limits, pending requests, timeouts, shed requests, leaks) are
  *observable* instruments read at collection time from numbers the monitor keeps anyway, so
  they cost nothing per checkout;
- wait, use and create times are histograms, one sample per event, with attribute dicts built once.
  The SDK's ``Histogram.record`` is the dearest call on the path (about 30 Python calls; 15-20 µs
  each when a whole request runs between two of them and its code has gone cold, against 6 µs in a
  tight loop). So a checkout of an unsampled request queues its samples (a C ``deque.append``) and
  every ``FLUSH_AT`` samples, and at each collection, they are recorded in one loop: every sample
  still reaches the SDK before the collection that should see it, at about half the CPU. A sampled
  request's samples are recorded at once, in its context, so they keep their exemplars;
- a ``checkout <pool>`` span is started only when the current span is sampled (a span costs tens
  of microseconds; an unsampled request pays one context lookup).

Several guards share one meter: the observable instruments are registered once per meter and
report every pool registered with it (OpenTelemetry keeps only the first callback per name).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.context import Context, create_key, set_value
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode

from poolguard._version import __version__

if TYPE_CHECKING:
    from poolguard.breaker import BreakerState
    from poolguard.leaks import Holder
    from poolguard.monitor import PoolMonitor
    from poolguard.pools import PoolCounts

INSTRUMENTATION_NAME = "poolguard"
SCHEMA_URL = "https://opentelemetry.io/schemas/1.26.0"

POOL_NAME = "db.client.connection.pool.name"
CONNECTION_STATE = "db.client.connection.state"
DB_SYSTEM = "db.system.name"
HTTP_ROUTE = "http.route"
OUTCOME = "poolguard.outcome"
REASON = "poolguard.reason"

DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
"""Seconds: from a warm checkout (~100 µs) to SQLAlchemy's default 30 s pool timeout."""

FLUSH_AT = 32
"""Samples an unsampled checkout queues before they are recorded in one loop (16 checkouts' worth)."""

QUEUED_SAMPLE_CONTEXT = set_value(create_key("poolguard-queued-sample"), True, Context())
"""The context queued samples are recorded in: it holds no span, so a sample never takes an exemplar
from whichever request or thread happens to flush the queue, and the SDK's default (trace-based)
exemplar filter rejects it at once. Not empty: the SDK looks up the current context in place of an
empty (falsy) one."""

_ROUTE_CACHE_LIMIT = 1024
_POOLS_ATTRIBUTE = "_poolguard_pools"


class PoolTelemetry:
    """The spans and metrics of one pool; owned by its PoolMonitor."""

    def __init__(
        self,
        *,
        pool_name: str,
        db_system: str,
        counts: Callable[[], PoolCounts],
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        version = __version__
        self.pool_name = pool_name
        self.counts = counts
        self.monitor: PoolMonitor | None = None
        self._registry: _PoolRegistry | None = None
        self._tracer = trace.get_tracer(INSTRUMENTATION_NAME, version, tracer_provider, schema_url=SCHEMA_URL)
        # An injected provider is taken as given for good; only the global ones are looked at again.
        self._follows_global_tracing = tracer_provider is None
        self._follows_global_metering = meter_provider is None
        self.tracing = _global_tracing() if tracer_provider is None else _records_spans(tracer_provider)
        """False while no SDK tracer provider is behind this pool: checkouts then skip the span lookup."""
        self.metering = _global_metering() if meter_provider is None else _records_metrics(meter_provider)
        """False while no SDK meter provider is behind this pool: the API would drop the records anyway."""
        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        meter = provider.get_meter(INSTRUMENTATION_NAME, version, schema_url=SCHEMA_URL)
        self._span_name = f"checkout {pool_name}"
        self._span_attributes = {POOL_NAME: pool_name, DB_SYSTEM: db_system}
        self._pool_attributes = {POOL_NAME: pool_name}
        self._route_attributes: dict[str, dict[str, str]] = {}
        self._queued: deque[tuple[metrics.Histogram, float, dict[str, str]]] = deque()
        self._wait_time = meter.create_histogram(
            "db.client.connection.wait_time",
            unit="s",
            description="The time it took to obtain an open connection from the pool.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._use_time = meter.create_histogram(
            "db.client.connection.use_time",
            unit="s",
            description="The time between borrowing a connection and returning it to the pool.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._create_time = meter.create_histogram(
            "db.client.connection.create_time",
            unit="s",
            description="The time it took to create a new connection.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        _register_pool(meter, provider, self)

    def notice_providers(self) -> None:
        """Called about once a second: spans and records start once an SDK sets the global providers.

        The API lets a global provider be set once, for good, so a True flag never needs checking again.
        """
        if not self.tracing and self._follows_global_tracing:
            self.tracing = _global_tracing()
        if not self.metering and self._follows_global_metering:
            self.metering = _global_metering()

    # -- per checkout ---------------------------------------------------------------------------

    def start_checkout(self) -> trace.Span:
        """A ``checkout <pool>`` span under the current span; the caller has seen that one is sampled."""
        return self._tracer.start_span(self._span_name, kind=SpanKind.INTERNAL, attributes=self._span_attributes)

    @staticmethod
    def end_checkout(span: trace.Span, outcome: str) -> None:
        span.set_attribute(OUTCOME, outcome)
        if outcome != "acquired":
            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()

    # record_wait and record_use queue inline rather than through a shared helper: a call less per sample.

    def record_wait(self, seconds: float, sampled: bool, context: Context | None = None) -> None:
        """``sampled``: the checkout made a span of its own (its request is sampled)."""
        if sampled:
            self._wait_time.record(seconds, self._pool_attributes, context)
        else:
            queued = self._queued
            queued.append((self._wait_time, seconds, self._pool_attributes))
            if len(queued) >= FLUSH_AT:
                self.flush()

    def record_use(self, seconds: float, route: str | None, sampled: bool) -> None:
        """``sampled``: as for :meth:`record_wait`, at the checkout this use began with."""
        if route is None:
            attributes = self._pool_attributes
        else:
            attributes = self._route_attributes.get(route) or self._with_route(route)
        if sampled:
            self._use_time.record(seconds, attributes)
        else:
            queued = self._queued
            queued.append((self._use_time, seconds, attributes))
            if len(queued) >= FLUSH_AT:
                self.flush()

    def flush(self) -> None:
        """Records the queued samples. Safe from any thread: each sample is taken off the queue once."""
        queued = self._queued
        while queued:
            try:
                histogram, seconds, attributes = queued.popleft()
            except IndexError:  # another thread took the last one
                return
            histogram.record(seconds, attributes, QUEUED_SAMPLE_CONTEXT)

    def record_create(self, seconds: float) -> None:
        self._create_time.record(seconds, self._pool_attributes)

    def _with_route(self, route: str) -> dict[str, str]:
        attributes = self._route_attributes.get(route)
        if attributes is None:
            attributes = {POOL_NAME: self.pool_name, HTTP_ROUTE: route}
            if len(self._route_attributes) < _ROUTE_CACHE_LIMIT:
                self._route_attributes[route] = attributes
        return attributes

    # -- events on the request span ---------------------------------------------------------------

    def request_shed(self, reason: str) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event("poolguard.request_shed", {POOL_NAME: self.pool_name, REASON: reason})

    def breaker_transition(self, old: BreakerState, new: BreakerState) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(
                "poolguard.breaker_transition",
                {POOL_NAME: self.pool_name, "poolguard.breaker.from": old.value, "poolguard.breaker.to": new.value},
            )

    def leak_suspected(self, holder: Holder, held_for: float) -> None:
        """On the span of the request that holds the connection, if it is still running; else the current one."""
        span = holder.span if holder.span is not None and holder.span.is_recording() else trace.get_current_span()
        if span.is_recording():
            attributes: dict[str, Any] = {POOL_NAME: self.pool_name, "poolguard.held_seconds": round(held_for, 3)}
            route = holder.current_route
            if route is not None:
                attributes[HTTP_ROUTE] = route
            span.add_event("poolguard.leak_suspected", attributes)

    # -- observable instruments -----------------------------------------------------------------

    def observe(self) -> Iterator[tuple[str, float, dict[str, str]]]:
        """(instrument, value, attributes) for every observable instrument of this pool."""
        monitor = self.monitor
        if monitor is None:
            return
        counts = self.counts()
        pool = self._pool_attributes
        yield "db.client.connection.count", counts.idle, {**pool, CONNECTION_STATE: "idle"}
        yield "db.client.connection.count", counts.checked_out, {**pool, CONNECTION_STATE: "used"}
        if counts.capacity is not None:
            yield "db.client.connection.max", counts.capacity, pool
        if counts.size is not None:
            yield "db.client.connection.idle.max", counts.size, pool
            yield "db.client.connection.idle.min", 0, pool
        yield "db.client.connection.pending_requests", monitor.pending + monitor.admission.waiting, pool
        yield "db.client.connection.timeouts", monitor.timeouts, pool
        for reason, count in monitor.shed.items():
            yield "poolguard.requests.shed", count, {**pool, REASON: reason}
        yield "poolguard.connection.leaks", monitor.leaks.reported_total, pool
        if monitor.breaker is not None:
            yield "poolguard.breaker.state", monitor.breaker.state.metric_value, pool


_OBSERVABLES: tuple[tuple[str, str, str, str], ...] = (
    (
        "db.client.connection.count",
        "updown",
        "{connection}",
        "The number of connections in the state given by `state`.",
    ),
    ("db.client.connection.max", "updown", "{connection}", "The maximum number of open connections allowed."),
    ("db.client.connection.idle.max", "updown", "{connection}", "The maximum number of idle open connections allowed."),
    ("db.client.connection.idle.min", "updown", "{connection}", "The minimum number of idle open connections allowed."),
    ("db.client.connection.pending_requests", "updown", "{request}", "Pending requests for an open connection."),
    ("db.client.connection.timeouts", "counter", "{timeout}", "Timeouts trying to obtain a connection from the pool."),
    ("poolguard.requests.shed", "counter", "{request}", "Requests refused with 503 instead of waiting or failing."),
    ("poolguard.connection.leaks", "counter", "{connection}", "Connections held past the leak threshold."),
    ("poolguard.breaker.state", "gauge", "{state}", "Circuit breaker state: 0 closed, 1 half-open, 2 open."),
)


class _PoolRegistry:
    """The pools reporting through one meter; the observable instruments' callbacks read it."""

    def __init__(self) -> None:
        self._pools: weakref.WeakSet[PoolTelemetry] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, pool: PoolTelemetry) -> None:
        with self._lock:
            self._pools.add(pool)

    def discard(self, pool: PoolTelemetry) -> None:
        with self._lock:
            self._pools.discard(pool)

    def callback(self, instrument: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                pools = list(self._pools)
            # The SDK runs every observable callback before it reads the histograms: queued samples
            # recorded here are in this very collection.
            for pool in pools:
                if pool._queued:
                    pool.flush()
            return [
                Observation(value, attributes)
                for pool in pools
                for name, value, attributes in pool.observe()
                if name == instrument
            ]

        return observe


def _records_spans(provider: trace.TracerProvider) -> bool:
    """False for the API's proxy (until an SDK is set) and no-op providers: their spans go nowhere."""
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def _records_metrics(provider: metrics.MeterProvider) -> bool:
    """False for the API's proxy (until an SDK is set) and no-op providers: they drop every record."""
    return not isinstance(provider, metrics.NoOpMeterProvider) and type(provider).__name__ != "_ProxyMeterProvider"


def _global_tracing() -> bool:
    """Whether the global tracer provider is a real one (the API's default is a proxy until an SDK sets one)."""
    return _records_spans(trace.get_tracer_provider())


def _global_metering() -> bool:
    """Whether the global meter provider is a real one (the API's default proxy drops every record)."""
    return _records_metrics(metrics.get_meter_provider())


def _register_pool(meter: metrics.Meter, provider: object, pool: PoolTelemetry) -> None:
    """Adds the pool to its provider's registry, creating the observable instruments the first time.

    The registry lives on the provider (the application's object), not on the meter: the API's
    global provider hands out a new proxy meter per call, and a second set of instruments would be
    dropped by the SDK once it is installed.
    """
    registry: _PoolRegistry | None = getattr(provider, _POOLS_ATTRIBUTE, None)
    if registry is None:
        registry = _PoolRegistry()
        setattr(provider, _POOLS_ATTRIBUTE, registry)
        for name, kind, unit, description in _OBSERVABLES:
            callbacks = [registry.callback(name)]
            if kind == "updown":
                meter.create_observable_up_down_counter(name, callbacks, unit=unit, description=description)
            elif kind == "counter":
                meter.create_observable_counter(name, callbacks, unit=unit, description=description)
            else:
                meter.create_observable_gauge(name, callbacks, unit=unit, description=description)
    registry.add(pool)
    pool._registry = registry


def unregister(pool: PoolTelemetry) -> None:
    """Stops reporting a closed guard's pool (its queued samples recorded first)."""
    pool.flush()
    if pool._registry is not None:
        pool._registry.discard(pool)
        pool._registry = None
