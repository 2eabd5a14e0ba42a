from __future__ import annotations

import inspect
import logging

import pytest
import sqlalchemy.exc

from poolguard._context import transaction_open
from poolguard.breaker import Breaker, BreakerState
from poolguard.errors import CircuitOpen, ConfigError, PoolSaturated
from poolguard.retry import RetryBudget, retry


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Stands in for time.sleep and asyncio.sleep: records the delays, never sleeps."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)

    async def async_sleep(self, seconds: float) -> None:
        self.delays.append(seconds)


class _DriverError(Exception):
    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def refused() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("refused"))


def duplicate_key() -> sqlalchemy.exc.IntegrityError:
    orig = _DriverError("duplicate key value violates unique constraint", "23505")
    return sqlalchemy.exc.IntegrityError("INSERT INTO t VALUES (%(id)s)", {"id": 1}, orig)


def deadlock() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("UPDATE t SET x = 1", {}, _DriverError("deadlock detected", "40P01"))


def upper(low: float, high: float) -> float:
    return high


def lower(low: float, high: float) -> float:
    return low


class Flaky:
    """Raises the queued exceptions one per call, then returns "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self, *args: object, **kwargs: object) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def state_of(breaker: Breaker) -> BreakerState:
    return breaker.state


def big_budget() -> RetryBudget:
    return RetryBudget(min_retries=1000, clock=FakeClock())


# ---- retrying and giving up ----


def test_retries_transient_errors_then_returns_the_result() -> None:
    sleep = Recorder()
    flaky = Flaky(refused(), deadlock())
    wrapped = retry(attempts=3, sleep=sleep, random=upper, budget=big_budget())(flaky)

    assert wrapped() == "ok"
    assert flaky.calls == 3
    assert sleep.delays == [0.05, 0.1]


def test_passes_arguments_through() -> None:
    seen: list[tuple[object, ...]] = []

    @retry(sleep=Recorder())
    def add(a: int, b: int = 0) -> int:
        seen.append((a, b))
        if len(seen) == 1:
            raise refused()
        return a + b

    assert add(2, b=3) == 5
    assert seen == [(2, 3), (2, 3)]


def test_gives_up_after_attempts_and_reraises_the_last_exception_unchanged() -> None:
    first, second, last = refused(), refused(), deadlock()
    flaky = Flaky(first, second, last, refused())
    sleep = Recorder()
    wrapped = retry(attempts=3, sleep=sleep, budget=big_budget())(flaky)

    with pytest.raises(sqlalchemy.exc.OperationalError) as info:
        wrapped()

    assert info.value is last
    assert flaky.calls == 3
    assert len(sleep.delays) == 2


def test_attempts_one_never_retries() -> None:
    flaky = Flaky(refused())
    sleep = Recorder()
    with pytest.raises(sqlalchemy.exc.OperationalError):
        retry(attempts=1, sleep=sleep)(flaky)()
    assert flaky.calls == 1
    assert sleep.delays == []


def test_non_transient_errors_are_not_retried() -> None:
    error = duplicate_key()
    flaky = Flaky(error)
    sleep = Recorder()

    with pytest.raises(sqlalchemy.exc.IntegrityError) as info:
        retry(attempts=5, sleep=sleep)(flaky)()

    assert info.value is error
    assert flaky.calls == 1
    assert sleep.delays == []


def test_application_errors_are_not_retried() -> None:
    flaky = Flaky(KeyError("order"))
    with pytest.raises(KeyError):
        retry(attempts=5, sleep=Recorder())(flaky)()
    assert flaky.calls == 1


def test_retry_on_decides_what_is_retried() -> None:
    flaky = Flaky(KeyError("order"))
    wrapped = retry(attempts=2, sleep=Recorder(), retry_on=lambda exc: isinstance(exc, KeyError))(flaky)
    assert wrapped() == "ok"
    assert flaky.calls == 2


def test_base_exceptions_pass_through_without_retry() -> None:
    flaky = Flaky(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        retry(attempts=5, sleep=Recorder(), retry_on=lambda exc: True)(flaky)()
    assert flaky.calls == 1


# ---- delays ----


def test_delay_cap_grows_exponentially_then_stops_at_max_delay() -> None:
    sleep = Recorder()
    bounds: list[tuple[float, float]] = []

    def record_upper(low: float, high: float) -> float:
        bounds.append((low, high))
        return high

    flaky = Flaky(*(refused() for _ in range(6)))
    wrapped = retry(attempts=7, base_delay=0.1, max_delay=0.5, sleep=sleep, random=record_upper, budget=big_budget())(
        flaky
    )

    assert wrapped() == "ok"
    assert sleep.delays == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5, 0.5])
    assert all(low == 0.0 for low, _ in bounds)


def test_full_jitter_may_wait_zero() -> None:
    sleep = Recorder()
    flaky = Flaky(refused(), refused(), refused())
    wrapped = retry(attempts=4, sleep=sleep, random=lower, budget=big_budget())(flaky)

    assert wrapped() == "ok"
    assert sleep.delays == [0.0, 0.0, 0.0]


def test_default_random_stays_within_zero_and_the_cap() -> None:
    sleep = Recorder()
    flaky = Flaky(*(refused() for _ in range(8)))
    wrapped = retry(attempts=9, base_delay=0.01, max_delay=0.3, sleep=sleep, budget=big_budget())(flaky)

    assert wrapped() == "ok"
    caps = [min(0.3, 0.01 * 2**n) for n in range(8)]
    assert all(0.0 <= delay <= cap for delay, cap in zip(sleep.delays, caps, strict=True))


def test_many_attempts_do_not_overflow_the_cap() -> None:
    sleep = Recorder()
    budget = RetryBudget(min_retries=2000, clock=FakeClock())
    flaky = Flaky(*(refused() for _ in range(1100)))
    wrapped = retry(attempts=1101, max_delay=1.0, sleep=sleep, random=upper, budget=budget)(flaky)

    assert wrapped() == "ok"
    assert len(sleep.delays) == 1100
    assert sleep.delays[-1] == 1.0


# ---- async ----


async def test_async_function_is_retried_with_the_async_sleep() -> None:
    sleeper = Recorder()
    flaky = Flaky(refused(), deadlock())

    @retry(attempts=3, async_sleep=sleeper.async_sleep, random=upper, budget=big_budget())
    async def fetch(order_id: int) -> str:
        return f"{flaky()}-{order_id}"

    assert inspect.iscoroutinefunction(fetch)
    assert await fetch(7) == "ok-7"
    assert flaky.calls == 3
    assert sleeper.delays == [0.05, 0.1]


async def test_async_gives_up_and_reraises_the_last_exception() -> None:
    last = refused()
    flaky = Flaky(refused(), last)
    sleeper = Recorder()

    @retry(attempts=2, async_sleep=sleeper.async_sleep)
    async def fetch() -> str:
        return flaky()

    with pytest.raises(sqlalchemy.exc.OperationalError) as info:
        await fetch()
    assert info.value is last
    assert len(sleeper.delays) == 1


async def test_async_non_transient_and_transaction_are_not_retried() -> None:
    sleeper = Recorder()
    flaky = Flaky(duplicate_key(), refused())

    @retry(attempts=5, async_sleep=sleeper.async_sleep)
    async def fetch() -> str:
        return flaky()

    with pytest.raises(sqlalchemy.exc.IntegrityError):
        await fetch()
    with transaction_open(), pytest.raises(sqlalchemy.exc.OperationalError):
        await fetch()
    assert flaky.calls == 2
    assert sleeper.delays == []


async def test_bare_decorator_on_async_function() -> None:
    @retry
    async def answer() -> int:
        return 42

    assert inspect.iscoroutinefunction(answer)
    assert await answer() == 42


# ---- breaker, transaction, load shedding ----


def test_no_retry_while_the_breaker_is_open() -> None:
    clock = FakeClock()
    breaker = Breaker(consecutive_failures=1, open_for=30.0, clock=clock)
    sleep = Recorder()
    flaky = Flaky(refused(), refused())
    wrapped = retry(attempts=5, breaker=breaker, sleep=sleep, budget=big_budget())(flaky)

    breaker.record_failure(0.0)
    assert state_of(breaker) is BreakerState.OPEN
    with pytest.raises(sqlalchemy.exc.OperationalError):
        wrapped()
    assert flaky.calls == 1
    assert sleep.delays == []

    clock.now += 31.0
    assert state_of(breaker) is BreakerState.HALF_OPEN
    assert wrapped() == "ok"
    assert flaky.calls == 3


def test_breaker_opening_between_attempts_stops_the_retries() -> None:
    breaker = Breaker(consecutive_failures=1, clock=FakeClock())
    sleep = Recorder()
    calls = 0

    @retry(attempts=5, breaker=breaker, sleep=sleep, budget=big_budget())
    def query() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            breaker.record_failure(0.0)
        raise refused()

    with pytest.raises(sqlalchemy.exc.OperationalError):
        query()
    assert calls == 2
    assert len(sleep.delays) == 1


def test_no_retry_inside_an_open_transaction() -> None:
    sleep = Recorder()
    budget = RetryBudget(ratio=0.0, min_retries=1, clock=FakeClock())
    flaky = Flaky(refused(), refused())
    wrapped = retry(attempts=5, sleep=sleep, budget=budget)(flaky)

    with transaction_open(), pytest.raises(sqlalchemy.exc.OperationalError):
        wrapped()
    assert flaky.calls == 1
    assert sleep.delays == []
    # The budget was left untouched: outside the transaction the retry is still allowed.
    assert wrapped() == "ok"
    assert flaky.calls == 3


@pytest.mark.parametrize(
    "error",
    [CircuitOpen("breaker open", retry_after=5.0), PoolSaturated("no slot", retry_after=1.0)],
    ids=["circuit_open", "pool_saturated"],
)
def test_load_shedding_errors_are_never_retried(error: Exception) -> None:
    sleep = Recorder()
    flaky = Flaky(error)
    wrapped = retry(attempts=5, sleep=sleep, retry_on=lambda exc: True)(flaky)

    with pytest.raises(type(error)) as info:
        wrapped()
    assert info.value is error
    assert flaky.calls == 1
    assert sleep.delays == []


# ---- budget ----


def test_budget_allows_min_retries_then_about_ten_percent_of_calls() -> None:
    budget = RetryBudget(ratio=0.1, window=10.0, min_retries=3, clock=FakeClock())
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]

    for _ in range(100):
        budget.record_call()
    granted = sum(budget.try_spend() for _ in range(50))
    assert granted == 10  # 3 min_retries already spent + 10 % of 100 calls


def test_budget_with_a_fractional_ratio_does_not_round_up() -> None:
    budget = RetryBudget(ratio=0.1, min_retries=3, clock=FakeClock())
    budget.record_call()
    assert sum(budget.try_spend() for _ in range(10)) == 3


def test_budget_refills_when_the_window_passes() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(ratio=0.1, window=10.0, min_retries=3, clock=clock)
    for _ in range(100):
        budget.record_call()
    assert sum(budget.try_spend() for _ in range(50)) == 13

    clock.now = 9.5
    assert not budget.try_spend()
    clock.now = 10.0
    assert sum(budget.try_spend() for _ in range(50)) == 3  # calls aged out too: only min_retries
    clock.now = 1000.0
    assert sum(budget.try_spend() for _ in range(50)) == 3


def test_budget_window_slides_bucket_by_bucket() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(ratio=1.0, window=4.0, min_retries=0, clock=clock)
    budget.record_call()
    clock.now = 2.0
    budget.record_call()
    assert budget.try_spend()
    assert budget.try_spend()
    assert not budget.try_spend()
    clock.now = 4.0  # the call at t=0 left the window; the retries at t=2 still count
    assert not budget.try_spend()
    clock.now = 6.0  # everything from t=2 left too
    assert not budget.try_spend()
    budget.record_call()
    assert budget.try_spend()


def test_budget_caps_retries_through_the_decorator() -> None:
    budget = RetryBudget(ratio=0.0, window=10.0, min_retries=2, clock=FakeClock())
    sleep = Recorder()
    first = Flaky(*(refused() for _ in range(10)))
    second = Flaky(*(refused() for _ in range(10)))

    with pytest.raises(sqlalchemy.exc.OperationalError):
        retry(attempts=5, sleep=sleep, budget=budget)(first)()
    with pytest.raises(sqlalchemy.exc.OperationalError):
        retry(attempts=5, sleep=sleep, budget=budget)(second)()

    assert first.calls == 3  # two retries, then the shared budget is spent
    assert second.calls == 1
    assert len(sleep.delays) == 2


def test_each_decorated_function_gets_its_own_budget_by_default() -> None:
    first = Flaky(*(refused() for _ in range(20)))
    second = Flaky(*(refused() for _ in range(20)))
    for flaky in (first, second):
        with pytest.raises(sqlalchemy.exc.OperationalError):
            retry(attempts=10, sleep=Recorder())(flaky)()
    assert first.calls == 4  # 1 call + the default min_retries of 3
    assert second.calls == 4


# ---- logging ----


def test_each_retry_is_logged_with_the_class_name_only(caplog: pytest.LogCaptureFixture) -> None:
    error = sqlalchemy.exc.OperationalError(
        "SELECT * FROM users WHERE email = %(email)s",
        {"email": "secret@example.com"},
        ConnectionRefusedError("refused by 10.0.0.5"),
    )
    flaky = Flaky(error)
    with caplog.at_level(logging.DEBUG, logger="poolguard.retry"):
        assert retry(sleep=Recorder(), random=upper)(flaky)() == "ok"

    records = [r for r in caplog.records if r.name == "poolguard.retry"]
    assert len(records) == 1
    assert records[0].levelno == logging.DEBUG
    assert "OperationalError" in records[0].getMessage()
    assert "secret@example.com" not in caplog.text
    assert "10.0.0.5" not in caplog.text
    assert "SELECT" not in caplog.text


# ---- decorator forms and validation ----


def test_bare_decorator_form_keeps_name_and_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    sleep = Recorder()
    monkeypatch.setattr("time.sleep", sleep)
    flaky = Flaky(refused())

    @retry
    def load_orders() -> str:
        """Loads the orders."""
        return flaky()

    assert load_orders.__name__ == "load_orders"
    assert load_orders.__doc__ == "Loads the orders."
    assert not inspect.iscoroutinefunction(load_orders)
    assert load_orders() == "ok"
    assert flaky.calls == 2
    assert len(sleep.delays) == 1
    assert 0.0 <= sleep.delays[0] <= 0.05  # default random and base_delay


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"attempts": 0}, "retry.attempts"),
        ({"attempts": 2.5}, "retry.attempts"),
        ({"attempts": True}, "retry.attempts"),
        ({"base_delay": 0}, "retry.base_delay"),
        ({"base_delay": -1.0}, "retry.base_delay"),
        ({"base_delay": "0.1"}, "retry.base_delay"),
        ({"max_delay": float("nan")}, "retry.max_delay"),
        ({"max_delay": float("inf")}, "retry.max_delay"),
        ({"base_delay": 1.0, "max_delay": 0.5}, "retry.max_delay"),
        ({"breaker": "primary"}, "retry.breaker"),
        ({"budget": 0.1}, "retry.budget"),
        ({"retry_on": None}, "retry.retry_on"),
        ({"sleep": 1}, "retry.sleep"),
        ({"async_sleep": "asyncio.sleep"}, "retry.async_sleep"),
        ({"random": 4}, "retry.random"),
    ],
)
def test_invalid_options_name_the_setting(options: dict[str, object], setting: str) -> None:
    with pytest.raises(ConfigError, match=rf"^invalid value for {setting}: ") as info:
        retry(**options)  # type: ignore[call-overload]
    assert info.value.setting == setting
    assert isinstance(info.value, ValueError)


def test_positional_non_callable_says_how_to_pass_options() -> None:
    with pytest.raises(ConfigError, match=r"keyword options") as info:
        retry(5)  # type: ignore[call-overload]
    assert info.value.setting == "retry"


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"ratio": -0.1}, "RetryBudget.ratio"),
        ({"window": 0}, "RetryBudget.window"),
        ({"window": float("inf")}, "RetryBudget.window"),
        ({"min_retries": -1}, "RetryBudget.min_retries"),
        ({"min_retries": 1.5}, "RetryBudget.min_retries"),
        ({"clock": 12.0}, "RetryBudget.clock"),
    ],
)
def test_invalid_budget_options_name_the_setting(options: dict[str, object], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        RetryBudget(**options)  # type: ignore[arg-type]
    assert info.value.setting == setting


def test_valid_breaker_is_accepted() -> None:
    breaker = Breaker(clock=FakeClock())
    assert retry(breaker=breaker)(lambda: 1)() == 1
