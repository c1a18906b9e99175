"""Tasks for the tests of priorities, retries and unordered maps (importable
under spawn): each leaves a line in a file per run, so a test can tell how
often and in which order they ran."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _runs(path: str) -> int:
    """Append a line to ``path``; how many runs it had before this one."""
    file = Path(path)
    before = len(file.read_text().splitlines()) if file.exists() else 0
    with file.open("a") as out:
        out.write(f"{os.getpid()}\n")
    return before


def record(path: str, label: str) -> str:
    """Append ``label`` to ``path`` (the order tasks ran in)."""
    with open(path, "a") as out:
        out.write(label + "\n")
    return label


def die_until(path: str, deaths: int) -> int:
    """Kill this worker on each of the first ``deaths`` runs; then return the run's number."""
    before = _runs(path)
    if before < deaths:
        os.kill(os.getpid(), signal.SIGKILL)
    return before + 1


def always_die(path: str) -> None:
    """Kill this worker, every run."""
    _runs(path)
    os._exit(3)


def raise_every_run(path: str) -> None:
    _runs(path)
    raise KeyError("raised by the task")


def stall_first_run(path: str) -> int:
    """Run long the first time (to overrun a timeout); then return the run's number."""
    before = _runs(path)
    if before == 0:
        time.sleep(60)
    return before + 1


def wait_or_echo(value: int, gate: str) -> int:
    """``value``, at once, except 0, which waits for ``gate`` first."""
    if value == 0:
        deadline = time.monotonic() + 30
        while not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{gate} did not appear")
            time.sleep(0.005)
    return value


def fail_on(value: int, bad: int) -> int:
    if value == bad:
        raise ValueError(f"bad value {value}")
    return value


def exit_on_second_start(path: str) -> None:
    """An initializer: the second worker to start exits at once (before it is ready)."""
    if _runs(path) == 1:
        os._exit(1)
