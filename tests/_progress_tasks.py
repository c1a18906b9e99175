"""Tasks that report their progress (importable under spawn)."""

from __future__ import annotations

import os
import time

import duckpool


def _wait_for(path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.005)


def count_to(n: int) -> int:
    """Report every step of a tight loop (most are coalesced), the last one "done"."""
    for i in range(1, n):
        duckpool.report_progress(i, n)
    duckpool.report_progress(n, n, "done")
    return n


def half_then_wait(gate: str) -> str:
    """Report half-way, then wait for ``gate``, then report the end."""
    duckpool.report_progress(1, 2, "half")
    _wait_for(gate)
    duckpool.report_progress(2, 2, "all")
    return "finished"


def three_steps() -> int:
    """Three updates, each past the coalescing interval: every one is sent."""
    for step in (1, 2, 3):
        duckpool.report_progress(step, 3)
        time.sleep(0.06)
    return 3


def item_reports_then_waits(value: int, gate: str) -> int:
    """A map item: 0 returns at once; 1 reports half-way, then waits for ``gate``."""
    if value == 1:
        duckpool.report_progress(5, 10)
        _wait_for(gate)
    return value


def bad_report() -> None:
    duckpool.report_progress("half")  # type: ignore[arg-type]


def report_then_raise() -> None:
    """Two updates in quick succession (the second coalesced), then an error."""
    duckpool.report_progress(1, 2, "first")
    duckpool.report_progress(2, 2, "last")
    raise ValueError("failed after reporting")
