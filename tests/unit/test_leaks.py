"""Who holds which connection: ordering, threshold reports, scopes and checkout sites."""

from __future__ import annotations

import logging
import os
import threading
import traceback
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy
import sqlalchemy.util
from opentelemetry.trace import INVALID_SPAN, NonRecordingSpan, SpanContext

import poolguard
from poolguard.leaks import Holder, LeakTracker, capture_stack, checkout_site
from tests.unit.conftest import FakeClock

THRESHOLD = 30.0
POOLGUARD_DIR = os.path.dirname(poolguard.__file__) + os.sep
SQLALCHEMY_DIR = os.path.dirname(sqlalchemy.__file__) + os.sep


def make(clock: FakeClock, reported: list[Holder] | None = None) -> LeakTracker:
    on_leak = reported.append if reported is not None else None
    return LeakTracker(pool_name="primary", threshold=THRESHOLD, clock=clock, on_leak=on_leak)


def holder(
    clock: FakeClock,
    route: str | None = "/orders/{id}",
    *,
    thread_id: int | None = None,
    scope: object | None = None,
    stack: traceback.StackSummary | None = None,
) -> Holder:
    thread_id = threading.get_ident() if thread_id is None else thread_id
    return Holder(clock(), scope, None, None, thread_id, route=route, stack=stack)


@pytest.fixture
def named_thread() -> Iterator[Callable[[str], int]]:
    """Starts a parked thread with the given name and returns its ident (leak reports name live threads)."""
    release = threading.Event()
    started: list[threading.Thread] = []

    def start(name: str) -> int:
        thread = threading.Thread(target=release.wait, name=name, daemon=True)
        thread.start()
        started.append(thread)
        assert thread.ident is not None
        return thread.ident

    yield start
    release.set()
    for thread in started:
        thread.join(timeout=10)


def leak_records(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "poolguard.leaks" and r.levelno == level]


# -- bookkeeping ------------------------------------------------------------------------------------------


def test_holders_are_returned_oldest_first(clock: FakeClock) -> None:
    tracker = make(clock)
    first = holder(clock, "/a")
    tracker.by_key["k1"] = first
    clock.advance(10)
    second = holder(clock, "/b")
    tracker.by_key["k2"] = second
    clock.advance(10)
    third = holder(clock, "/c")
    tracker.by_key["k3"] = third
    assert tracker.holders() == [first, second, third]

    clock.advance(15)  # k1 (35 s) and k2 (25 s): only k1 is suspected now
    tracker.sweep()
    fourth = holder(clock, "/d")
    tracker.by_key["k4"] = fourth
    assert tracker.by_key.pop("k2", None) is second
    assert [h.route for h in tracker.holders()] == ["/a", "/c", "/d"]


def test_a_returned_holder_is_forgotten(clock: FakeClock) -> None:
    tracker = make(clock)
    taken = holder(clock)
    tracker.by_key["k"] = taken
    assert tracker.by_key.pop("k", None) is taken
    assert tracker.holders() == []
    assert tracker.by_key.pop("k", None) is None


def test_holders_returns_a_copy(clock: FakeClock) -> None:
    tracker = make(clock)
    tracker.by_key["k"] = holder(clock)
    tracker.holders().clear()
    assert len(tracker.holders()) == 1


def test_held_by_lists_only_the_connections_of_that_scope(clock: FakeClock) -> None:
    tracker = make(clock)
    mine, other = object(), object()
    a = holder(clock, scope=mine)
    b = holder(clock, scope=other)
    tracker.by_key["a"] = a
    tracker.by_key["b"] = b
    clock.advance(THRESHOLD + 5)
    tracker.sweep()  # "a" and "b" are now suspected; held_by must still find them
    c = holder(clock, scope=mine)
    tracker.by_key["c"] = c

    assert dict(tracker.held_by(mine)) == {"a": a, "c": c}
    assert tracker.held_by(other) == [("b", b)]
    assert tracker.held_by(object()) == []
    tracker.by_key.pop("a", None)
    assert tracker.held_by(mine) == [("c", c)]


# -- threshold reports --------------------------------------------------------------------------------------


def test_sweep_reports_only_holders_past_the_threshold(
    clock: FakeClock, caplog: pytest.LogCaptureFixture, named_thread: Callable[[str], int]
) -> None:
    caplog.set_level(logging.WARNING, logger="poolguard.leaks")
    reported: list[Holder] = []
    tracker = make(clock, reported)
    old = holder(clock, "/reports/{id}", thread_id=named_thread("worker-7"))
    tracker.by_key["old"] = old
    clock.advance(20)
    young = holder(clock, "/orders/{id}", thread_id=named_thread("worker-8"))
    tracker.by_key["young"] = young

    clock.advance(THRESHOLD - 20 + 1)  # old: 31 s, young: 11 s
    tracker.sweep()

    assert reported == [old]
    assert old.reported
    assert not young.reported
    assert tracker.suspected == 1
    records = leak_records(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    assert "/reports/{id}" in message
    assert "worker-7" in message
    assert "primary" in message
    assert "/orders/{id}" not in message


def test_nothing_is_reported_under_the_threshold(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="poolguard.leaks")
    tracker = make(clock)
    tracker.by_key["k"] = holder(clock)
    clock.advance(THRESHOLD - 0.5)
    tracker.sweep()
    assert tracker.suspected == 0
    assert tracker.reported_total == 0
    assert leak_records(caplog) == []


def test_each_holder_is_reported_once(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="poolguard.leaks")
    reported: list[Holder] = []
    tracker = make(clock, reported)
    tracker.by_key["k"] = holder(clock)
    clock.advance(THRESHOLD + 1)
    for _ in range(5):
        tracker.sweep()
        clock.advance(60)
    assert tracker.suspected == 1
    assert len(reported) == 1
    assert tracker.reported_total == 1
    assert len(leak_records(caplog)) == 1


def test_suspected_counts_holders_over_the_threshold_without_an_explicit_sweep(clock: FakeClock) -> None:
    tracker = make(clock)
    tracker.by_key["a"] = holder(clock)
    tracker.by_key["b"] = holder(clock)
    clock.advance(5)
    tracker.by_key["c"] = holder(clock)
    clock.advance(THRESHOLD - 2)  # a, b: 33 s; c: 28 s
    assert tracker.suspected == 2
    clock.advance(3)
    assert tracker.suspected == 3


def test_checking_in_a_reported_holder_clears_the_suspicion(clock: FakeClock) -> None:
    tracker = make(clock)
    leaked = holder(clock)
    tracker.by_key["k"] = leaked
    clock.advance(THRESHOLD + 1)
    assert tracker.suspected == 1

    assert tracker.by_key.pop("k", None) is leaked
    assert tracker.suspected == 0
    assert tracker.holders() == []
    assert tracker.held_by(None) == []


def test_a_report_without_a_request_names_that(
    clock: FakeClock, caplog: pytest.LogCaptureFixture, named_thread: Callable[[str], int]
) -> None:
    caplog.set_level(logging.WARNING, logger="poolguard.leaks")
    tracker = make(clock)
    tracker.by_key["k"] = holder(clock, route=None, thread_id=named_thread("cron"))
    clock.advance(THRESHOLD + 1)
    tracker.sweep()
    message = leak_records(caplog)[0].getMessage()
    assert "(no request)" in message
    assert "cron" in message


def test_a_thread_that_has_ended_is_named_by_its_ident(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="poolguard.leaks")
    ended = threading.Thread(target=lambda: None, name="gone")
    ended.start()
    ended.join()
    assert ended.ident is not None
    tracker = make(clock)
    tracker.by_key["k"] = holder(clock, thread_id=ended.ident)
    clock.advance(THRESHOLD + 1)
    tracker.sweep()
    message = leak_records(caplog)[0].getMessage()
    assert f"thread {ended.ident}" in message
    assert "gone" not in message


def test_a_report_names_the_trace_the_connection_was_taken_in(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolguard.leaks")
    context = SpanContext(trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736, span_id=0x00F067AA0BA902B7, is_remote=False)
    tracker = make(clock)
    tracker.by_key["k"] = Holder(clock(), None, None, NonRecordingSpan(context), threading.get_ident())
    tracker.by_key["untraced"] = Holder(clock(), None, None, INVALID_SPAN, threading.get_ident())
    clock.advance(THRESHOLD + 1)
    tracker.sweep()
    first, second = (record.getMessage() for record in leak_records(caplog))
    assert "trace 4bf92f3577b34da6a3ce929d0e0e4736" in first
    assert "trace" not in second


# -- stacks -------------------------------------------------------------------------------------------------


def test_capture_stack_points_at_the_calling_function() -> None:
    stack = capture_stack()
    this_file = os.path.normcase(__file__)
    innermost = stack[-1]
    assert os.path.normcase(innermost.filename) == this_file
    assert innermost.name == "test_capture_stack_points_at_the_calling_function"
    site = checkout_site(stack)
    assert site.startswith(f"{innermost.filename}:{innermost.lineno} ")
    assert site.endswith(" in test_capture_stack_points_at_the_calling_function")


def test_capture_stack_leaves_out_poolguard_and_sqlalchemy_frames() -> None:
    class Connection:
        @sqlalchemy.util.memoized_property
        def stacks(self) -> tuple[traceback.StackSummary, traceback.StackSummary]:
            return traceback.extract_stack(), capture_stack()

    raw, trimmed = Connection().stacks
    # The call went through SQLAlchemy's own code, so the raw stack has a frame of it ...
    assert any(f.filename.startswith(SQLALCHEMY_DIR) for f in raw)
    # ... which the captured stack leaves out, as it leaves out poolguard's.
    assert trimmed
    for frame in trimmed:
        assert not frame.filename.startswith(SQLALCHEMY_DIR), frame
        assert not frame.filename.startswith(POOLGUARD_DIR), frame
    assert trimmed[-1].name == "stacks"
    assert trimmed[-2].name == "test_capture_stack_leaves_out_poolguard_and_sqlalchemy_frames"


def test_checkout_site_of_an_empty_stack_is_unknown() -> None:
    assert checkout_site(traceback.StackSummary.from_list([])) == "unknown"


def test_warning_names_the_checkout_site_on_one_line_and_the_stack_goes_to_debug(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="poolguard.leaks")
    tracker = make(clock)
    stack = capture_stack()
    tracker.by_key["k"] = holder(clock, stack=stack)
    clock.advance(THRESHOLD + 1)
    tracker.sweep()

    warnings = [r for r in caplog.records if r.name == "poolguard.leaks" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    warning = warnings[0].getMessage()
    assert "\n" not in warning
    assert warnings[0].exc_info is None
    assert checkout_site(stack) in warning
    assert "test_warning_names_the_checkout_site_on_one_line_and_the_stack_goes_to_debug" in warning

    debug = leak_records(caplog, logging.DEBUG)
    assert len(debug) == 1
    assert "\n" in debug[0].getMessage()
    assert "".join(stack.format()) in debug[0].getMessage()


def test_no_stack_is_formatted_when_debug_is_off(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="poolguard.leaks")
    tracker = make(clock)
    tracker.by_key["k"] = holder(clock, stack=capture_stack())
    clock.advance(THRESHOLD + 1)
    tracker.sweep()
    records = [r for r in caplog.records if r.name == "poolguard.leaks"]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert "\n" not in records[0].getMessage()


def test_oldest_is_when_the_longest_held_connection_was_taken(clock: FakeClock) -> None:
    tracker = make(clock)
    assert tracker.oldest() is None
    tracker.by_key["early"] = Holder(clock() + 1.0)  # registered as taken, so in order
    tracker.by_key["late"] = Holder(clock() + 2.0)
    assert tracker.oldest() == clock() + 1.0
    del tracker.by_key["early"]
    assert tracker.oldest() == clock() + 2.0
    tracker.by_key["early"] = Holder(clock() + 3.0)  # the same key taken again is the newest
    assert tracker.oldest() == clock() + 2.0
