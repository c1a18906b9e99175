"""Worker-side helpers of test_successor.py (importable, so spawn can find them)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def record_pid(directory: str) -> None:
    """Initializer: leave a file named for this process's pid in ``directory``."""
    (Path(directory) / str(os.getpid())).touch()


def fail_after_first(directory: str) -> None:
    """Initializer: record the pid; raise in every process but the first."""
    first = not any(Path(directory).iterdir())
    record_pid(directory)
    if not first:
        raise ValueError("only the first worker may start")


def getpid() -> int:
    return os.getpid()


def wait_for_gate(gate: str, timeout: float = 30.0) -> int:
    """Return this worker's pid once the file ``gate`` exists."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(gate)
        time.sleep(0.01)
    return os.getpid()
