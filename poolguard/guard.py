"""Guard: the object a user holds, the composition root of one guarded pool (composition, health, close).

One Guard watches one pool. It installs the pool's instrumentation once, through its gate (so every
checkout through the engine is accounted for, in a request or not), and hands out units of work
(:mod:`poolguard.work`): request scopes for adapters, ``session()`` / ``connection()`` blocks for
everything else. Checkouts made inside one of its units of work are the ones it gates: breaker
first, then admission within the wait budget, then the pool's own checkout.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from poolguard import _fork
from poolguard._types import Clock
from poolguard._validate import non_negative_float, optional_positive_float, positive_float
from poolguard.breaker import Breaker, BreakerState
from poolguard.config import GUARD_OPTION_NAMES, BreakerOptions, PoolGuardConfig
from poolguard.errors import ConfigError, PoolGuardError, Unavailable
from poolguard.gate import Gate
from poolguard.health import HealthReport, PingResult, PoolHealth, assess
from poolguard.pools import PoolAdapter
from poolguard.probe import Prober
from poolguard.stats import PoolStats, rounded
from poolguard.watchdog import Watchdog
from poolguard.work import ConnectionBlock, RequestScope, SessionBlock

if TYPE_CHECKING:
    # SQLAlchemy is imported where a guard over an engine needs it, not here: a Django app that guards
    # only its own connections never loads it (about 18 MB and a quarter of a second per process).
    from sqlalchemy import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
    from sqlalchemy.orm import Session

logger = logging.getLogger("poolguard")

HEALTH_MAX_AGE = 1.0
"""Seconds a probe's result answers health checks: a burst of them (or many replicas' load balancer) costs one."""


def _is_engine(engine: object) -> bool:
    """A SQLAlchemy Engine or AsyncEngine (without SQLAlchemy loaded, nothing can be one)."""
    if "sqlalchemy" not in sys.modules:
        return False
    from sqlalchemy import Engine  # noqa: PLC0415
    from sqlalchemy.ext.asyncio import AsyncEngine  # noqa: PLC0415

    return isinstance(engine, Engine | AsyncEngine)


class Guard:
    """Guards one pool: a SQLAlchemy Engine or AsyncEngine, or any :class:`~poolguard.pools.PoolAdapter`.

    Sessions and connection blocks need a SQLAlchemy engine; health, stats, the breaker and
    admission work for every pool kind (Django's connections use them through their adapter).

    Options (keyword-only): ``name`` names the pool in health, metrics and logs; ``max_wait`` is the
    most a unit of work waits for connections in total before PoolSaturated (0: never wait);
    ``breaker`` a :class:`Breaker` (default: a new one), its options, or ``False`` for none; ``leak_threshold``
    the seconds after which a held connection is reported; ``capture_stacks`` records the checkout
    stack for leak reports (costly: off by default); ``session_factory`` a sessionmaker or
    async_sessionmaker (default: one bound to the engine with ``expire_on_commit=False``, so objects
    stay readable after the block commits); ``clock`` a monotonic clock for tests;
    ``ping_timeout`` bounds every probe of the database (health, stall checks, recovery);
    ``probe_interval`` is how often an open breaker probes the database (None: no watchdog thread,
    which also notices a stalled pool; probes run only for health checks, and an open breaker
    waits out ``open_for``); ``tracer_provider`` / ``meter_provider``
    replace the global OpenTelemetry providers for this guard's spans and metrics.
    """

    def __init__(
        self,
        engine: Engine | AsyncEngine | PoolAdapter,
        *,
        name: str = "primary",
        max_wait: float = 1.0,
        breaker: Breaker | BreakerOptions | bool | None = None,
        leak_threshold: float = 30.0,
        capture_stacks: bool = False,
        session_factory: Callable[[], Session] | Callable[[], AsyncSession] | None = None,
        clock: Clock | None = None,
        ping_timeout: float = 1.0,
        probe_interval: float | None = 0.5,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        is_engine = _is_engine(engine)
        if not is_engine and not isinstance(engine, PoolAdapter):
            raise ConfigError(
                "Guard(engine)", type(engine).__name__, "a sqlalchemy Engine or AsyncEngine, or a pool adapter"
            )
        if not isinstance(name, str) or not name:
            raise ConfigError("Guard.name", name, "a non-empty string")
        if not isinstance(capture_stacks, bool):
            raise ConfigError("Guard.capture_stacks", capture_stacks, "True or False")
        if clock is not None and not callable(clock):
            raise ConfigError("Guard.clock", clock, "a callable returning monotonic seconds")
        self.name = name
        self.max_wait = non_negative_float("Guard.max_wait", max_wait)
        self.leak_threshold = positive_float("Guard.leak_threshold", leak_threshold)
        self.ping_timeout = positive_float("Guard.ping_timeout", ping_timeout)
        self.probe_interval = optional_positive_float("Guard.probe_interval", probe_interval)
        self.clock: Clock = clock or time.monotonic
        self.breaker = self._make_breaker(breaker, clock)
        self.pool: PoolAdapter
        self.session_factory: Callable[[], Session] | Callable[[], AsyncSession] | None
        """What makes the sessions of its units of work; None for a pool that is not a SQLAlchemy engine."""
        if is_engine:
            from poolguard.pools.sqlalchemy import SQLAlchemyPool  # noqa: PLC0415

            self._engine: Engine | AsyncEngine | None = cast("Engine | AsyncEngine", engine)
            self.session_factory = self._make_session_factory(self._engine, session_factory)
            self.pool = SQLAlchemyPool(self._engine)
        else:
            self._engine = None
            self.session_factory = None
            self.pool = cast("PoolAdapter", engine)
        self.is_async = self.pool.is_async
        self.gate = Gate(
            self.pool,
            name=name,
            breaker=self.breaker,
            max_wait=self.max_wait,
            leak_threshold=self.leak_threshold,
            capture_stacks=capture_stacks,
            clock=self.clock,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        """The pool's checkout path (breaker, admission, timing, holders), which the pool reports into."""
        self.pool.attach(self.gate)
        self._remove_breaker_listener = self.breaker.add_listener(self._on_transition) if self.breaker else None
        self.prober = Prober(
            self.pool, name=name, timeout=self.ping_timeout, clock=self.clock, on_result=self._on_probe
        )
        """Probes the database on fresh connections: health, stall confirmation, recovery."""
        self.watchdog = Watchdog(
            self.gate, self.prober, self.breaker, probe_interval=self.probe_interval or 0.5, clock=self.clock
        )
        if self.probe_interval is not None:
            self.watchdog.start()
            if self.breaker is not None:
                self.breaker.probed_every = self.probe_interval
        self._closed = False
        _fork.track(self)

    def unavailable_for(self, exc: BaseException) -> Unavailable | None:
        """What adapters answer 503 for: ``Unavailable``, or a connection failure this guard's breaker counted."""
        return self.gate.unavailable_for(exc)

    @property
    def engine(self) -> Engine | AsyncEngine:
        """The SQLAlchemy engine this guard watches (a TypeError for a guard over another pool kind)."""
        if self._engine is None:
            raise TypeError(f"Guard {self.name!r} watches a {type(self.pool).__name__}, not a SQLAlchemy engine")
        return self._engine

    @staticmethod
    def _make_breaker(breaker: Breaker | BreakerOptions | bool | None, clock: Clock | None) -> Breaker | None:
        if breaker is None or breaker is True:
            return Breaker(clock=clock)
        if breaker is False:
            return None
        if isinstance(breaker, BreakerOptions):
            return Breaker(clock=clock, **vars(breaker))
        if not isinstance(breaker, Breaker):
            raise ConfigError("Guard.breaker", breaker, "a poolguard.Breaker, or False for no breaker")
        if clock is not None and breaker.clock is time.monotonic:
            breaker.use_clock(clock)
        return breaker

    @staticmethod
    def _make_session_factory(
        engine: Engine | AsyncEngine,
        factory: Callable[[], Session] | Callable[[], AsyncSession] | None,
    ) -> Callable[[], Session] | Callable[[], AsyncSession]:
        if factory is None:
            from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker  # noqa: PLC0415
            from sqlalchemy.orm import sessionmaker  # noqa: PLC0415

            if isinstance(engine, AsyncEngine):
                return async_sessionmaker(engine, expire_on_commit=False)
            return sessionmaker(engine, expire_on_commit=False)
        if not callable(factory):
            raise ConfigError("Guard.session_factory", factory, "a sessionmaker or async_sessionmaker")
        return factory

    def _on_probe(self, result: PingResult) -> None:
        """Every probe's result, once: an answer lets an open breaker try again; no answer counts as a failure.

        A server that refused the probe (too many connections, a refused login) is up: that says
        nothing about the connections the pool already has, so it is not counted.
        """
        breaker = self.breaker
        if breaker is None:
            return
        if result.error is None:
            if not breaker.closed:
                breaker.probe_succeeded()
        elif result.unreachable:
            if breaker.closed:
                breaker.record_failure(self.ping_timeout)
            elif breaker.state is BreakerState.HALF_OPEN:
                breaker.trip()  # gone again before any trial call could tell

    def _on_transition(self, old: BreakerState, new: BreakerState) -> None:
        if new is BreakerState.HALF_OPEN:
            # Connections made before the outage are likely dead: the trial calls get new ones.
            self.pool.discard_stale()
        self.gate.telemetry.breaker_transition(old, new)
        if new is BreakerState.OPEN:
            if self.watchdog.running:
                logger.warning(
                    "poolguard: circuit breaker of pool %r opened (was %s); failing fast, probing every %.1fs",
                    self.name,
                    old.value,
                    self.probe_interval or 0.0,
                )
            else:
                logger.warning(
                    "poolguard: circuit breaker of pool %r opened (was %s); failing fast for %.1fs",
                    self.name,
                    old.value,
                    (self.breaker.retry_after if self.breaker else None) or 0.0,
                )
        else:
            logger.info("poolguard: circuit breaker of pool %r is now %s (was %s)", self.name, new.value, old.value)

    def __repr__(self) -> str:
        return f"<Guard {self.name!r} {self.pool.backend} breaker={self.breaker!r}>"

    # -- units of work ---------------------------------------------------------------------------

    def _refuse_closed(self) -> None:
        raise PoolGuardError(
            f"Guard {self.name!r} is closed: it no longer watches its pool, so it hands out no sessions or "
            "connections (make a new Guard, or stop calling close() while the app still serves)"
        )

    def request_scope(self, route: str | None = None, *, queued: float | None = None) -> RequestScope:
        """A unit of work for one request: nothing touches the pool until the session is used.

        ``queued``: the seconds the request already queued in front of the app (``X-Request-Start``,
        :func:`poolguard.http.queue_time`), None when unknown. They count against ``max_wait``: a
        request that queued past it gets ``PoolSaturated`` at its first checkout, before it touches
        the pool. A number, 0 included, is recorded once (``poolguard.request.queue_time``).
        """
        if self._closed:
            self._refuse_closed()
        if queued is None:
            return RequestScope(self.gate, self.session_factory, is_async=self.is_async, route=route)
        if not 0.0 <= queued < math.inf:
            raise ValueError(f"request_scope(queued=...) takes seconds, at least 0; got {queued!r}")
        self.gate.request_queued(queued)
        return RequestScope(self.gate, self.session_factory, is_async=self.is_async, route=route, queued=queued)

    def session(self) -> SessionBlock[Any]:
        """``with guard.session() as s`` (or ``async with`` for an AsyncEngine): commit, rollback, close."""
        if self._closed:
            self._refuse_closed()
        if self.session_factory is None:
            raise TypeError(f"guard.session() needs a Guard over a SQLAlchemy engine; {self.name!r} is not one")
        return SessionBlock(self.gate, self.session_factory, is_async=self.is_async)

    def connection(self) -> ConnectionBlock[Any]:
        """``with guard.connection() as c`` (``async with`` for an AsyncEngine): a guarded raw connection."""
        if self._closed:
            self._refuse_closed()
        return ConnectionBlock(self.gate, self.engine, is_async=self.is_async)

    # -- observation -----------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """A snapshot of the pool's counts, wait/use quantiles, timeouts, leaks and breaker state.

        Connections held past the leak threshold are reported first (logged, and an event on the
        span of the request that holds them), so a health check finds a leak even when no checkout
        runs the sweep.
        """
        self.gate.leaks.sweep()
        return self.gate.snapshot()

    def health(self, *, ping: bool = True, max_age: float = HEALTH_MAX_AGE) -> HealthReport:
        """The pool's health, with a probe of the database on a fresh connection.

        The probe is shared by concurrent callers, answers for a second (:data:`HEALTH_MAX_AGE`) and
        never needs a pool slot, so a full pool still gets a true answer. It blocks the
        caller for at most ``ping_timeout``; from asyncio code use :meth:`ahealth`. ``max_age``
        is how old a shared result may be (0: probe now, as a command-line check wants).
        """
        result = self.prober.result(max_age=max_age) if ping and not self._open() else None
        return HealthReport.of([self._assess(self.stats(), result)])

    async def ahealth(self, *, ping: bool = True, max_age: float = HEALTH_MAX_AGE) -> HealthReport:
        """The pool's health without blocking the event loop; works for every pool kind."""
        result = await self.prober.aresult(max_age=max_age) if ping and not self._open() else None
        return HealthReport.of([self._assess(self.stats(), result)])

    def _open(self) -> bool:
        """An open breaker already says "unavailable", and its watchdog probes for the return:
        health answers at once instead of waiting out another probe."""
        return self.breaker is not None and self.watchdog.running and self.breaker.state is BreakerState.OPEN

    def _assess(self, stats: PoolStats, ping: PingResult | None) -> PoolHealth:
        breaker = self.breaker
        return assess(
            stats,
            ping=ping,
            max_wait=self.max_wait,
            breaker_failure_rate=round(breaker.failure_rate, 4) if breaker else None,
            breaker_retry_after=rounded(breaker.retry_after, 3) if breaker else None,
            pooler=getattr(self.pool, "pooler", None),
        )

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran: the guard no longer watches its pool or reports metrics."""
        return self._closed

    def close(self) -> None:
        """Removes the instrumentation from the engine (it stays usable) and stops the watchdog."""
        self._closed = True
        self.watchdog.stop()
        self.pool.detach()
        self.gate.close()
        if self._remove_breaker_listener is not None:
            self._remove_breaker_listener()
            self._remove_breaker_listener = None

    def _reset_after_fork(self) -> list[object]:
        """In a forked child (:mod:`poolguard._fork`): the pool drops the parent's connections, the gate starts afresh.

        The watchdog and probe threads did not survive the fork: the prober forgets its probes in
        flight and the watchdog starts a thread of the child's own. A pool adapter without
        ``reset_after_fork`` keeps its connections: only the gate is reset. Returns the parent's
        objects the child must keep referenced and never close.
        """
        if self._closed:
            return []
        reset = getattr(self.pool, "reset_after_fork", None)
        orphans: list[object] = list(reset()) if callable(reset) else []
        self.gate.reset_after_fork()
        self.prober.reset_after_fork()
        self.watchdog.reset_after_fork(start=self.probe_interval is not None)
        return orphans


def check_passed_guard(
    guard: Guard, config: PoolGuardConfig, *, setting_of: Callable[[str], str] | None = None
) -> None:
    """Guard options the user set in settings must match a Guard the user built: never silently ignored.

    An adapter given its own ``Guard`` cannot apply them (the guard is built already), and a
    setting that does nothing is worse than an error at startup that says where it belongs.
    ``setting_of`` names an option as the user spelled it (default: ``config.setting``; Starlette
    names the environment variable).
    """
    actual: dict[str, object] = {
        "max_wait": guard.max_wait,
        "leak_threshold": guard.leak_threshold,
        "capture_stacks": guard.gate.capture_stacks,
        "ping_timeout": guard.ping_timeout,
        "probe_interval": guard.probe_interval,
        "breaker": guard.breaker.options if guard.breaker is not None else None,
    }
    for name in sorted(config.explicit.intersection(GUARD_OPTION_NAMES)):
        wanted = getattr(config.guard, name)
        if name in actual and actual[name] == wanted:
            continue
        example = "breaker=poolguard.Breaker(...)" if name == "breaker" else f"{name}=..."
        raise ConfigError(
            (setting_of or config.setting)(name),
            wanted if name in actual else type(wanted).__name__,
            f"unset, or set it on the Guard you pass instead: poolguard.Guard(engine, {example}) "
            f"(the adapter was given a Guard whose {name} differs)",
        )


def build_guard(config: PoolGuardConfig, pool: PoolAdapter | None = None, *, name: str = "primary") -> Guard:
    """The Guard an adapter builds from settings: over ``pool``, or over an engine made from ``config.sqlalchemy``.

    Every adapter builds its guards here, so the same settings make the same guard everywhere. An
    engine made here belongs to the guard: it is disposed again if the guard cannot be built.
    """
    if pool is not None:
        return Guard(pool, name=name, **config.guard_options())
    if config.sqlalchemy is None:
        setting = config.setting("sqlalchemy")
        raise ConfigError(setting, None, f"a poolguard.Guard given to the adapter, or {setting} = {{'URL': ...}}")
    from poolguard.engine import create_engine  # noqa: PLC0415 (SQLAlchemy only for apps that ask for it)

    options = dict(config.sqlalchemy)
    engine = create_engine(options.pop("url"), **options)
    try:
        return Guard(engine, name=name, **config.guard_options())
    except BaseException:
        engine.dispose()
        raise
