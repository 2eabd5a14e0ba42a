"""Retrying transient database errors without making an outage worse.

A retry helps when one connection dropped or one transaction lost a deadlock; it hurts when the
database is down or overloaded, because every client multiplies its load by its attempt count. So
``retry`` backs off exponentially with full jitter (spreading clients out instead of making them
retry in step), and stops retrying when retrying cannot help:

- the error is not transient (bad SQL, a failed constraint): running it again fails again;
- the error is ``Unavailable`` (circuit open, pool saturated): that is load shedding, retrying adds load;
- the breaker is open: the database is failing;
- a transaction is open around the call: re-running part of a unit of work is wrong, so the call runs
  once and the outermost unit of work is the one to decorate;
- the retry budget is spent: retries are capped at a fraction of first attempts over a sliding window.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from random import uniform as _uniform
from typing import Any, ParamSpec, TypeVar, cast, overload

from poolguard import _validate
from poolguard._classify import is_transient
from poolguard._context import in_transaction
from poolguard._types import AsyncSleep, Clock, Sleep
from poolguard.breaker import Breaker, BreakerState
from poolguard.errors import ConfigError, Unavailable

__all__ = ["RetryBudget", "retry"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

logger = logging.getLogger("poolguard.retry")

_MAX_BUCKETS = 600


class RetryBudget:
    """At most ``ratio`` extra attempts per first attempt over a sliding ``window`` of seconds, plus
    ``min_retries`` per window so low-traffic callers can still retry.

    Without a budget, ``attempts=3`` triples the load on a struggling database; with the default
    budget retries add at most about 10 %. Share one budget per service (pass it to every ``retry``)
    so the cap holds for the service as a whole; ``retry`` otherwise gives each decorated function
    its own.

    Counts live in per-second buckets of a fixed ring (at most 600 buckets, wider for longer
    windows): recording allocates nothing and holds a lock only for a few additions.
    """

    __slots__ = (
        "_calls",
        "_clock",
        "_head",
        "_lock",
        "_min_retries",
        "_ratio",
        "_retries",
        "_total_calls",
        "_total_retries",
        "_width",
    )

    def __init__(
        self,
        *,
        ratio: float = 0.1,
        window: float = 10.0,
        min_retries: int = 3,
        clock: Clock | None = None,
    ) -> None:
        self._ratio = _validate.non_negative_float("RetryBudget.ratio", ratio)
        window = _validate.positive_float("RetryBudget.window", window)
        self._min_retries = _validate.non_negative_int("RetryBudget.min_retries", min_retries)
        if clock is not None and not callable(clock):
            raise ConfigError("RetryBudget.clock", clock, "a callable returning monotonic seconds")
        self._clock: Clock = clock if clock is not None else time.monotonic
        buckets = min(max(1, math.ceil(window)), _MAX_BUCKETS)
        self._width = window / buckets
        self._calls = [0] * buckets
        self._retries = [0] * buckets
        self._total_calls = 0
        self._total_retries = 0
        self._head = math.floor(self._clock() / self._width)
        self._lock = threading.Lock()

    def _advance(self) -> int:
        """Drops the buckets that left the window; returns the slot of the current bucket."""
        now = math.floor(self._clock() / self._width)
        size = len(self._calls)
        if now > self._head:
            if now - self._head >= size:
                self._calls[:] = [0] * size
                self._retries[:] = [0] * size
                self._total_calls = self._total_retries = 0
            else:
                for index in range(self._head + 1, now + 1):
                    slot = index % size
                    self._total_calls -= self._calls[slot]
                    self._total_retries -= self._retries[slot]
                    self._calls[slot] = self._retries[slot] = 0
            self._head = now
        return self._head % size

    def record_call(self) -> None:
        """Counts a first attempt, which earns ``ratio`` retries for the window."""
        with self._lock:
            slot = self._advance()
            self._calls[slot] += 1
            self._total_calls += 1

    def try_spend(self) -> bool:
        """Counts a retry and returns True if the window's budget allows one more; else False."""
        with self._lock:
            slot = self._advance()
            # The tolerance keeps float error (0.29 * 100 == 28.999...) from denying a retry the ratio allows.
            if self._total_retries + 1 > self._ratio * self._total_calls + self._min_retries + 1e-9:
                return False
            self._retries[slot] += 1
            self._total_retries += 1
            return True


class _Policy:
    """The validated options of one decorated function; decides whether and how long to wait."""

    __slots__ = ("attempts", "base_delay", "breaker", "budget", "max_delay", "random", "retry_on")

    def __init__(
        self,
        *,
        attempts: int,
        base_delay: float,
        max_delay: float,
        breaker: Breaker | None,
        budget: RetryBudget,
        retry_on: Callable[[BaseException], bool],
        random: Callable[[float, float], float],
    ) -> None:
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.breaker = breaker
        self.budget = budget
        self.retry_on = retry_on
        self.random = random

    def delay_before_retry(self, func: Callable[..., object], exc: Exception, retries: int) -> float | None:
        """The seconds to wait before retry number ``retries + 1``, or None to give up."""
        if retries + 1 >= self.attempts or isinstance(exc, Unavailable) or not self.retry_on(exc):
            return None
        if self.breaker is not None and self.breaker.state is BreakerState.OPEN:
            return None
        if not self.budget.try_spend():
            logger.debug("not retrying %s after %s: retry budget spent", _name(func), type(exc).__name__)
            return None
        try:
            cap = min(self.max_delay, math.ldexp(self.base_delay, retries))
        except OverflowError:
            cap = self.max_delay
        delay = self.random(0.0, cap)
        logger.debug(
            "retrying %s after %s (retry %d of %d, in %.3f s)",
            _name(func),
            type(exc).__name__,
            retries + 1,
            self.attempts - 1,
            delay,
        )
        return delay


def _name(func: Callable[..., object]) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


def _wrap_sync(func: Callable[P, R], policy: _Policy, sleep: Sleep) -> Callable[P, R]:
    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if in_transaction():
            return func(*args, **kwargs)
        policy.budget.record_call()
        retries = 0
        while True:
            try:
                return func(*args, **kwargs)
            except Exception as exc:
                delay = policy.delay_before_retry(func, exc, retries)
                if delay is None:
                    raise
            retries += 1
            sleep(delay)

    return wrapper


def _wrap_async(
    func: Callable[P, Awaitable[T]], policy: _Policy, async_sleep: AsyncSleep
) -> Callable[P, Coroutine[Any, Any, T]]:
    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        if in_transaction():
            return await func(*args, **kwargs)
        policy.budget.record_call()
        retries = 0
        while True:
            try:
                return await func(*args, **kwargs)
            except Exception as exc:
                delay = policy.delay_before_retry(func, exc, retries)
                if delay is None:
                    raise
            retries += 1
            await async_sleep(delay)

    return wrapper


def _optional_callable(setting: str, value: object, accepted: str) -> None:
    if value is not None and not callable(value):
        raise ConfigError(setting, value, accepted)


@overload
def retry(func: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def retry(
    *,
    attempts: int = 3,
    base_delay: float = 0.05,
    max_delay: float = 2.0,
    breaker: Breaker | None = None,
    budget: RetryBudget | None = None,
    retry_on: Callable[[BaseException], bool] = is_transient,
    sleep: Sleep | None = None,
    async_sleep: AsyncSleep | None = None,
    random: Callable[[float, float], float] | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def retry(
    func: Callable[..., Any] | None = None,
    /,
    *,
    attempts: int = 3,
    base_delay: float = 0.05,
    max_delay: float = 2.0,
    breaker: Breaker | None = None,
    budget: RetryBudget | None = None,
    retry_on: Callable[[BaseException], bool] = is_transient,
    sleep: Sleep | None = None,
    async_sleep: AsyncSleep | None = None,
    random: Callable[[float, float], float] | None = None,
) -> Any:
    """Retries a sync or ``async def`` callable on transient database errors.

    Use bare (``@poolguard.retry``) or with options (``@poolguard.retry(attempts=5, breaker=guard.breaker)``).
    ``attempts`` counts the first call. The wait before retry *n* (from 0) is
    ``random(0, min(max_delay, base_delay * 2**n))``: full jitter. ``retry_on`` decides which errors
    are worth another attempt (default: lost connections, deadlocks, serialization failures).
    When it gives up, the last exception propagates unchanged.

    ``budget``: without one, each decorated function gets its own ``RetryBudget()``; passing one shared
    budget per service is recommended, so retries stay bounded across all the functions that retry.
    ``sleep``, ``async_sleep`` and ``random`` default to ``time.sleep``, ``asyncio.sleep`` and
    ``random.uniform``; tests inject them so they never sleep.

    Decorate the outermost unit of work: inside an open transaction (``guard.session()``, a request's
    session) the call runs once, because re-running part of a transaction is wrong.
    """
    if func is not None and not callable(func):
        raise ConfigError("retry", func, "a function to decorate (@retry) or keyword options (@retry(attempts=5))")
    attempts = _validate.positive_int("retry.attempts", attempts)
    base_delay = _validate.positive_float("retry.base_delay", base_delay)
    max_delay = _validate.positive_float("retry.max_delay", max_delay)
    if max_delay < base_delay:
        raise ConfigError("retry.max_delay", max_delay, f"a number of at least retry.base_delay ({base_delay})")
    if breaker is not None and not isinstance(breaker, Breaker):
        raise ConfigError("retry.breaker", breaker, "a poolguard.Breaker or None")
    if budget is not None and not isinstance(budget, RetryBudget):
        raise ConfigError("retry.budget", budget, "a poolguard.retry.RetryBudget or None")
    if not callable(retry_on):
        raise ConfigError("retry.retry_on", retry_on, "a callable taking an exception and returning a bool")
    _optional_callable("retry.sleep", sleep, "a callable taking seconds, or None for time.sleep")
    _optional_callable("retry.async_sleep", async_sleep, "a callable taking seconds returning an awaitable, or None")
    _optional_callable("retry.random", random, "a callable (low, high) -> float, or None for random.uniform")

    def decorate(target: Callable[P, R]) -> Callable[P, R]:
        if not callable(target):
            raise ConfigError("retry", target, "a function or coroutine function to decorate")
        policy = _Policy(
            attempts=attempts,
            base_delay=base_delay,
            max_delay=max_delay,
            breaker=breaker,
            budget=budget if budget is not None else RetryBudget(),
            retry_on=retry_on,
            random=random if random is not None else _uniform,
        )
        if inspect.iscoroutinefunction(target):
            async_target = cast(Callable[P, Awaitable[Any]], target)
            wrapped = _wrap_async(async_target, policy, async_sleep or asyncio.sleep)
            return cast(Callable[P, R], wrapped)
        return _wrap_sync(target, policy, sleep or time.sleep)

    if func is not None:
        return decorate(func)
    return decorate
