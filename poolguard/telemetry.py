"""OpenTelemetry spans and semantic-convention metrics for a guarded pool.

Only the OpenTelemetry API is imported: without an SDK every call here is a no-op, and the
per-checkout path stays cheap. Costs are kept where they belong:

- counts (connections by state, limits, pending requests, timeouts, shed requests, leaks) are
  *observable* instruments read at collection time from the gate's snapshot, so they cost nothing
  per checkout (the metrics themselves are defined in :mod:`poolguard.metrics`);
- wait, use and create times (and a request's queue time) are histograms, one sample per event, with
  attribute dicts built once.
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
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.context import Context, create_key, set_value
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode

from poolguard._version import __version__
from poolguard.metrics import (
    CREATE_TIME,
    DB_SYSTEM,
    DURATION_BUCKETS,
    HTTP_ROUTE,
    METRICS,
    OUTCOME,
    POOL_NAME,
    QUEUE_TIME,
    REASON,
    USE_TIME,
    WAIT_TIME,
    Metric,
    observations,
)

if TYPE_CHECKING:
    from poolguard.breaker import BreakerState
    from poolguard.leaks import Holder
    from poolguard.stats import PoolStats

INSTRUMENTATION_NAME = "poolguard"
SCHEMA_URL = "https://opentelemetry.io/schemas/1.26.0"

FLUSH_AT = 32
"""Samples an unsampled checkout queues before they are recorded in one loop (16 checkouts' worth)."""

QUEUED_SAMPLE_CONTEXT = set_value(create_key("poolguard-queued-sample"), True, Context())
"""The context queued samples are recorded in: it holds no span, so a sample never takes an exemplar
from whichever request or thread happens to flush the queue, and the SDK's default (trace-based)
exemplar filter rejects it at once. Not empty: the SDK looks up the current context in place of an
empty (falsy) one."""

_POOLS_ATTRIBUTE = "_poolguard_pools"


class PoolTelemetry:
    """The spans and metrics of one pool; owned by its gate, whose ``snapshot`` the counts are read from."""

    def __init__(
        self,
        *,
        pool_name: str,
        db_system: str,
        snapshot: Callable[[], PoolStats],
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        version = __version__
        self.pool_name = pool_name
        self.snapshot = snapshot
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
        self._queued: deque[tuple[metrics.Histogram, float, dict[str, str]]] = deque()
        self._wait_time = _histogram(meter, WAIT_TIME)
        self._use_time = _histogram(meter, USE_TIME)
        self._create_time = _histogram(meter, CREATE_TIME)
        self._queue_time = _histogram(meter, QUEUE_TIME)
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
        attributes = self._pool_attributes if route is None else {POOL_NAME: self.pool_name, HTTP_ROUTE: route}
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

    def record_queue(self, seconds: float) -> None:
        """A request's time queued in front of the app: at once, with its exemplar, when the request's
        span is sampled; queued with the checkouts' samples otherwise."""
        if self.tracing and trace.get_current_span().get_span_context().trace_flags.sampled:
            self._queue_time.record(seconds, self._pool_attributes)
        else:
            queued = self._queued
            queued.append((self._queue_time, seconds, self._pool_attributes))
            if len(queued) >= FLUSH_AT:
                self.flush()

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
            route = holder.route
            if route is not None:
                attributes[HTTP_ROUTE] = route
            span.add_event("poolguard.leak_suspected", attributes)

    def close(self) -> None:
        """Stops reporting (a closed guard's pool), its queued samples recorded first."""
        self.flush()
        if self._registry is not None:
            self._registry.discard(self)
            self._registry = None


def _histogram(meter: metrics.Meter, metric: Metric) -> metrics.Histogram:
    return meter.create_histogram(
        metric.name,
        unit=metric.unit,
        description=metric.description,
        explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
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
                for name, value, attributes in observations(pool.snapshot())
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
        create = {
            "updown": meter.create_observable_up_down_counter,
            "counter": meter.create_observable_counter,
            "gauge": meter.create_observable_gauge,
        }
        for metric in METRICS:
            if metric.kind != "histogram":
                create[metric.kind](
                    metric.name, [registry.callback(metric.name)], unit=metric.unit, description=metric.description
                )
    registry.add(pool)
    pool._registry = registry
