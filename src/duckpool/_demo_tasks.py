"""The functions ``duckpool demo`` runs in its worker processes.

They live in their own importable module (not in ``_cli``) so that ``spawn`` and
``forkserver`` workers can unpickle them by module path while importing as
little as possible.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass

__all__ = ["Receipt", "build_report", "crash_worker", "render_thumbnail"]


@dataclass(frozen=True)
class Receipt:
    """What a demo task sends back: its result and the worker that computed it."""

    result: str
    pid: int
    worker_name: str


def _receipt(result: str) -> Receipt:
    return Receipt(result, os.getpid(), multiprocessing.current_process().name)


def _digest(seed: str, rounds: int) -> str:
    """Some real CPU work: a chain of SHA-256 hashes."""
    data = seed.encode()
    for _ in range(rounds):
        data = hashlib.sha256(data).digest()
    return data.hex()[:10]


def render_thumbnail(image_id: int, size: int) -> Receipt:
    """Pretend to render a thumbnail; takes about 0.2 s."""
    digest = _digest(f"image-{image_id}-{size}", 20_000)
    # Long enough that a burst of these keeps every worker of the pool busy.
    time.sleep(0.15)
    return _receipt(f"{size}x{size} thumbnail #{image_id} ({digest})")


def build_report(month: str) -> Receipt:
    """Pretend to build a monthly report; takes about 0.1 s."""
    digest = _digest(f"report-{month}", 20_000)
    time.sleep(0.05)
    return _receipt(f"report {month} ({digest})")


def crash_worker() -> Receipt:
    """Kill the worker process running this task, as a segfault or the OOM killer would."""
    if hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(70)
