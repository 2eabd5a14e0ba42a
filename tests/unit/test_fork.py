"""The fork handler: registered once per process, holding guards weakly, resetting each in the child."""

from __future__ import annotations

import gc
import weakref

import pytest

from poolguard import _fork


class _Guard:
    name = "fake"

    def __init__(self, orphans: list[object] | None = None, fails: bool = False) -> None:
        self.orphans = orphans or []
        self.fails = fails
        self.resets = 0

    def _reset_after_fork(self) -> list[object]:
        self.resets += 1
        if self.fails:
            raise RuntimeError("boom")
        return self.orphans


def test_registered_once_and_guards_held_weakly(monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[object] = []
    monkeypatch.setattr(_fork, "_registered", False)
    monkeypatch.setattr(_fork, "_live", weakref.WeakSet())
    monkeypatch.setattr(_fork.os, "register_at_fork", lambda **hooks: registered.append(hooks))
    kept, dropped = _Guard(), _Guard()
    _fork.track(kept)
    _fork.track(dropped)
    assert len(registered) == 1
    del dropped
    gc.collect()
    assert list(_fork._live) == [kept]


def test_the_child_handler_resets_each_guard_and_keeps_what_they_dropped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    orphans: list[object] = []
    monkeypatch.setattr(_fork, "_orphans", orphans)
    monkeypatch.setattr(_fork, "_live", weakref.WeakSet())
    monkeypatch.setattr(_fork, "_registered", True)
    pool = object()
    good, bad = _Guard([pool]), _Guard(fails=True)
    _fork.track(good)
    _fork.track(bad)
    _fork._after_fork_in_child()
    assert (good.resets, bad.resets) == (1, 1)
    assert orphans == [pool]
    assert "RuntimeError" in caplog.text
    assert "Traceback" not in "".join(r.getMessage() for r in caplog.records if r.levelname != "DEBUG")
