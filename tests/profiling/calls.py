"""Counts poolguard's own calls while an action runs, and compares them with the pins in call_counts.txt.

What is counted is poolguard's footprint, not its dependencies': every Python function entered whose
code lives in the poolguard package, and every call (to Python or C) made directly from a poolguard
frame. So the numbers move when poolguard's code changes, not when Flask, SQLAlchemy or Django do.
A coroutine or generator resumed after a suspension is not a new call: how often a request suspends
depends on the network, not on poolguard.
"""

from __future__ import annotations

import dis
import inspect
import os
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import pytest

import poolguard

PINS = Path(__file__).with_name("call_counts.txt")
_SHOWN_PINS = PINS.relative_to(Path(__file__).parents[2])
WRITE_VARIABLE = "POOLGUARD_WRITE_CALL_COUNTS"
UPDATE_HINT = f"{WRITE_VARIABLE}=1 python -m pytest tests/profiling"

_POOLGUARD_DIR = os.path.dirname(poolguard.__file__) + os.sep
_SUSPENDABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE | inspect.CO_ASYNC_GENERATOR


@dataclass
class Footprint:
    """poolguard's calls during one run: per poolguard function, how often it was entered and what it called."""

    entered: Counter[str] = field(default_factory=Counter)
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)

    def by_function(self) -> dict[str, tuple[int, int]]:
        """``{function: (times entered, calls it made)}``, sorted by name."""
        made: Counter[str] = Counter()
        for (caller, _callee), count in self.calls.items():
            made[caller] += count
        return {name: (self.entered[name], made[name]) for name in sorted({*self.entered, *made})}

    @property
    def total(self) -> int:
        return self.entered.total() + self.calls.total()

    def callees(self, caller: str) -> str:
        made = sorted(((callee, n) for (name, callee), n in self.calls.items() if name == caller), key=lambda c: c[0])
        return ", ".join(f"{callee} x{n}" if n > 1 else callee for callee, n in made) or "nothing"


class _Profiler:
    """The ``sys.setprofile`` function; names are looked up once per code object."""

    def __init__(self) -> None:
        self.footprint = Footprint()
        self._names: dict[CodeType, str | None] = {}
        self._starts: dict[CodeType, int] = {}

    def _poolguard_name(self, frame: FrameType) -> str | None:
        code = frame.f_code
        try:
            return self._names[code]
        except KeyError:
            name = _name(frame) if code.co_filename.startswith(_POOLGUARD_DIR) else None
            self._names[code] = name
            return name

    def _resumed(self, frame: FrameType) -> bool:
        """A generator or coroutine frame past its first instruction was suspended before: not a new call."""
        code = frame.f_code
        if not code.co_flags & _SUSPENDABLE:
            return False
        start = self._starts.get(code)
        if start is None:
            start = self._starts[code] = next(i.offset for i in dis.get_instructions(code) if i.opname == "RESUME")
        return frame.f_lasti > start

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            if self._resumed(frame):
                return
            name = self._poolguard_name(frame)
            if name is not None:
                self.footprint.entered[name] += 1
            caller = frame.f_back
            caller_name = self._poolguard_name(caller) if caller is not None else None
            if caller_name is not None:
                self.footprint.calls[caller_name, name or _name(frame)] += 1
        elif event == "c_call":
            caller_name = self._poolguard_name(frame)
            if caller_name is not None:
                self.footprint.calls[caller_name, _c_name(arg)] += 1


def _name(frame: FrameType) -> str:
    return f"{frame.f_globals.get('__name__', '?')}.{frame.f_code.co_qualname}"


def _c_name(function: Any) -> str:
    module = getattr(function, "__module__", None)
    qualname = getattr(function, "__qualname__", repr(function))
    return f"{module}.{qualname}" if module else qualname


def count_calls(action: Callable[[], object]) -> Footprint:
    """poolguard's calls while ``action()`` runs in this thread (work it hands to other threads is not seen)."""
    profiler = _Profiler()
    sys.setprofile(profiler)
    try:
        action()
    finally:
        sys.setprofile(None)
    return profiler.footprint


async def acount_calls(action: Callable[[], Awaitable[object]]) -> Footprint:
    """The same for a coroutine, awaited on this thread's event loop (other tasks it runs meanwhile count too)."""
    profiler = _Profiler()
    sys.setprofile(profiler)
    try:
        await action()
    finally:
        sys.setprofile(None)
    return profiler.footprint


# -- the pins ---------------------------------------------------------------------------------------


def _read_pins() -> dict[str, dict[str, tuple[int, int]]]:
    """``{scenario: {function: (entered, calls made)}}`` from call_counts.txt."""
    pins: dict[str, dict[str, tuple[int, int]]] = {}
    current: dict[str, tuple[int, int]] = {}
    for line in PINS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            current = pins.setdefault(line[1 : line.index("]")], {})
        else:
            function, entered, made = line.split()
            current[function] = (int(entered), int(made))
    return pins


def _write_pins(scenario: str, footprint: Footprint) -> None:
    header = [line for line in PINS.read_text().splitlines() if line.startswith("#")] if PINS.exists() else []
    pins = _read_pins() if PINS.exists() else {}
    pins[scenario] = footprint.by_function()
    lines = [*header]
    for name, functions in pins.items():
        total = sum(entered + made for entered, made in functions.values())
        lines += ["", f"[{name}] {total}"]
        width = max(len(function) for function in functions)
        lines += [f"{function:<{width}}  {entered:>3} {made:>3}" for function, (entered, made) in functions.items()]
    PINS.write_text("\n".join(lines) + "\n")


def _pair(counts: tuple[int, int]) -> str:
    return f"{counts[0]} / {counts[1]}"


def assert_pinned(scenario: str, first: Footprint, second: Footprint) -> None:
    """Fails unless two runs of the scenario agree with each other, then with the pin, function by function."""
    now, again = first.by_function(), second.by_function()
    if now != again:
        varying = [
            f"  {name}: {_pair(now.get(name, (0, 0)))}, then {_pair(again.get(name, (0, 0)))}"
            for name in sorted({*now, *again})
            if now.get(name) != again.get(name)
        ]
        pytest.fail(
            f"{scenario}: two runs made {first.total} and {second.total} poolguard calls; a count that varies pins "
            "nothing (periodic work in a run, or not warm yet?). Entered / calls made, per run:\n" + "\n".join(varying),
            pytrace=False,
        )
    if os.environ.get(WRITE_VARIABLE) == "1":
        _write_pins(scenario, first)
        return
    pinned = _read_pins().get(scenario)
    if pinned is None:
        pytest.fail(f"{scenario}: no pin in {_SHOWN_PINS}; write it with {UPDATE_HINT}", pytrace=False)
    if now == pinned:
        return
    pinned_total = sum(entered + made for entered, made in pinned.values())
    lines = [
        f"{scenario}: poolguard made {first.total} calls, pinned {pinned_total} ({_SHOWN_PINS}).",
        "Where, per poolguard function (entered / calls made):",
    ]
    for name in sorted({*now, *pinned}):
        before, after = pinned.get(name, (0, 0)), now.get(name, (0, 0))
        if before != after:
            lines.append(f"  {name}: {_pair(after)}, pinned {_pair(before)}")
            lines.append(f"      it now calls: {first.callees(name)}")
    difference = first.total - pinned_total
    if difference > 0:
        lines.append(f"{difference} call(s) more than pinned. If they are worth it, raise the pin: {UPDATE_HINT}")
    elif difference < 0:
        lines.append(f"{-difference} call(s) fewer than pinned: lower the pin, so it stays tight: {UPDATE_HINT}")
    else:
        lines.append(f"As many calls as pinned, made elsewhere: rewrite the pin: {UPDATE_HINT}")
    pytest.fail("\n".join(lines), pytrace=False)
