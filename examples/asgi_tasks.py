"""The CPU work the example app offloads (importable, so every start method finds it)."""

from __future__ import annotations

import logging
import os
import time
from contextvars import ContextVar

import duckpool

#: The id of the HTTP request a task serves: the app sets it per request, and
#: the pool carries its value to the worker (``context_vars=``).
request_id: ContextVar[str] = ContextVar("request_id", default="-")

log = logging.getLogger("examples.report")


def fib(n: int) -> int:
    """Naive Fibonacci: pure CPU."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def crash() -> None:
    """Kill the worker process running this task."""
    os._exit(3)


def slow(seconds: float) -> str:
    """Run past the pool's per-task timeout."""
    time.sleep(seconds)
    return "done"


def report(rows: int) -> dict[str, int]:
    """A long job that says how far it got: a row at a time, about 2 ms each."""
    log.warning("request %s: building a report of %d rows", request_id.get(), rows)
    total = 0
    for row in range(1, rows + 1):
        total += fib(18)
        duckpool.report_progress(row, rows, f"row {row} of {rows}")
    return {"rows": rows, "checksum": total}
