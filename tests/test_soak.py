"""Soak: many tasks while workers die, time out and get killed from outside.

The CI run is small; ``pytest -m soak`` runs the large one.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import threading
from typing import Optional

import psutil
import pytest

import _executor_tasks as tasks
import duckpool
from conftest import process_gone, wait_until

TIMEOUT = 120


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _new_children(before: set[int]) -> list[str]:
    """Processes below this one that were not there before, other than
    multiprocessing's own long-lived helpers (fork server, resource tracker)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if child.pid in before or "forkserver" in cmdline or "resource_tracker" in cmdline:
            continue
        found.append(cmdline)
    return found


def _soak(ctx: object, n_tasks: int, seed: int) -> None:
    rng = random.Random(seed)
    fds_before = _open_fds()
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    pool = duckpool.ProcessPoolExecutor(2, ctx, max_tasks_per_child=50)  # type: ignore[arg-type]
    stop_killer = threading.Event()

    def kill_workers_at_random() -> None:
        while not stop_killer.wait(rng.uniform(0.05, 0.2)):
            pids = pool.worker_pids()
            if pids:
                try:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    killer = threading.Thread(target=kill_workers_at_random)
    killer.start()
    expected: list[tuple[concurrent.futures.Future[int], str, int]] = []
    try:
        for i in range(n_tasks):
            kind = rng.choices(["ok", "raise", "die", "hang"], weights=[90, 5, 3, 2])[0]
            timeout: Optional[float] = 0.3 if kind == "hang" else None
            future = pool.options(timeout=timeout).submit(tasks.soak_task, kind, i)
            expected.append((future, kind, i))
        _, not_done = concurrent.futures.wait([f for f, _, _ in expected], TIMEOUT)
        assert not not_done, f"{len(not_done)} futures never resolved"
    finally:
        stop_killer.set()
        killer.join(TIMEOUT)
        pids = pool.worker_pids()
        pool.shutdown(wait=True)
    for future, kind, value in expected:
        error = future.exception(0)
        if kind == "ok":
            # An innocent task may only fail if the random killer hit its worker.
            if error is None:
                assert future.result(0) == value * 2
            else:
                assert isinstance(error, duckpool.WorkerDiedError), error
        elif kind == "raise":
            assert isinstance(error, (ValueError, duckpool.WorkerDiedError)), error
        elif kind == "die":
            assert isinstance(error, duckpool.WorkerDiedError), error
        else:
            assert isinstance(error, (duckpool.TaskTimeoutError, duckpool.WorkerDiedError)), error
    wait_until(lambda: all(process_gone(pid) for pid in pids), 10)
    wait_until(lambda: not _new_children(children_before), 10)
    # The pool's pipes are all closed once it has shut down (the fork server's
    # own socket and multiprocessing's resource tracker may stay, once each).
    assert _open_fds() <= fds_before + 3, (fds_before, _open_fds())


def test_soak_small(ctx: object) -> None:
    _soak(ctx, n_tasks=300, seed=1)


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_soak_large(ctx: object) -> None:
    _soak(ctx, n_tasks=20_000, seed=2)
