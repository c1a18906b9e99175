"""The CPU work the example app offloads (importable, so every start method finds it)."""

from __future__ import annotations

import os
import time


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
