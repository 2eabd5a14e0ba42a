"""Checks that need a fresh interpreter (global providers, process-wide settings, what gets imported)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def run_python(*arguments: str, timeout: float = 120) -> Any:
    """Runs ``python -W error *arguments`` from the project root; the JSON its last output line holds.

    Warnings are errors in the child as in the suite; a non-zero exit fails with the child's stderr.
    """
    completed = subprocess.run(
        [sys.executable, "-W", "error", *arguments],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=timeout,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])
