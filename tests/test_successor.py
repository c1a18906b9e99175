"""Warm successors: with max_tasks_per_child, a slot's next worker starts ahead of time.

Under spawn and forkserver only: under fork the zygote forks a replacement in
a millisecond or two, so no successor is started there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable

import pytest

import _successor_tasks as tasks
import duckpool
from conftest import process_gone, wait_until

TIMEOUT = 30


@pytest.fixture(params=("spawn", "forkserver"))
def start_method(request: pytest.FixtureRequest) -> str:
    """The start methods with successors (overrides conftest's, for ``ctx`` too)."""
    return str(request.param)


def _started(directory: Path) -> set[int]:
    """The pids of every process of the pool whose initializer has run."""
    return {int(p.name) for p in directory.iterdir()}


@pytest.fixture
def pids(tmp_path: Path) -> Path:
    """Where each process of the pool leaves a file named for its pid."""
    directory = tmp_path / "pids"
    directory.mkdir()
    return directory


def _pool(
    ctx: object,
    directory: Path,
    workers: int = 1,
    quota: int = 2,
    initializer: Callable[[str], None] = tasks.record_pid,
) -> duckpool.ProcessPoolExecutor:
    return duckpool.ProcessPoolExecutor(
        workers,
        ctx,  # type: ignore[arg-type]
        max_tasks_per_child=quota,
        initializer=initializer,
        initargs=(str(directory),),
    )


def _one_successor(directory: Path, workers: list[int]) -> int:
    """Wait for the one process started besides ``workers``; its pid."""
    wait_until(lambda: len(_started(directory) - set(workers)) == 1, TIMEOUT)
    (successor,) = _started(directory) - set(workers)
    return successor


def test_the_successor_takes_the_slot_when_its_worker_retires(ctx: object, pids: Path) -> None:
    pool = _pool(ctx, pids)
    try:
        first = pool.submit(tasks.getpid).result(TIMEOUT)
        # Half the quota sent: the successor starts while the worker still works.
        successor = _one_successor(pids, [first])
        stats = pool.stats()
        assert [w.pid for w in stats.workers] == [first]  # not a worker yet
        assert pool.worker_pids() == [first]
        assert pool.submit(tasks.getpid).result(TIMEOUT) == first  # its last task
        assert pool.submit(tasks.getpid).result(TIMEOUT) == successor
        assert pool.stats().restarts == 1
        wait_until(lambda: process_gone(first), TIMEOUT)
    finally:
        pool.shutdown()


def test_a_successor_starts_early_when_tasks_are_short_next_to_a_start(
    ctx: object, pids: Path
) -> None:
    # A quota of 100 tiny tasks takes far less than a worker's start: the
    # successor starts after the first tasks, not at the 50th.
    pool = _pool(ctx, pids, quota=100)
    try:
        first = pool.submit(tasks.getpid).result(TIMEOUT)
        for _ in range(3):
            assert pool.submit(tasks.getpid).result(TIMEOUT) == first
        successor = _one_successor(pids, [first])
        assert successor != first
        assert pool.worker_pids() == [first]  # sent 4 of its 100: still the worker
    finally:
        pool.shutdown()


def test_shutdown_leaves_no_successor_behind(ctx: object, pids: Path) -> None:
    pool = _pool(ctx, pids)
    try:
        first = pool.submit(tasks.getpid).result(TIMEOUT)
        _one_successor(pids, [first])
    finally:
        pool.shutdown()
    started = _started(pids)
    assert len(started) == 2
    wait_until(lambda: all(process_gone(pid) for pid in started), TIMEOUT)


def test_kill_workers_kills_a_pending_successor(ctx: object, pids: Path) -> None:
    pool = _pool(ctx, pids)
    try:
        first = pool.submit(tasks.getpid).result(TIMEOUT)
        successor = _one_successor(pids, [first])
        pool.kill_workers()
        wait_until(lambda: process_gone(first) and process_gone(successor), TIMEOUT)
    finally:
        pool.shutdown()
    assert _started(pids) == {first, successor}


def test_a_successor_that_dies_before_use_is_replaced_and_no_task_is_lost(
    ctx: object, pids: Path
) -> None:
    pool = _pool(ctx, pids)
    try:
        first = pool.submit(tasks.getpid).result(TIMEOUT)
        doomed = _one_successor(pids, [first])
        os.kill(doomed, signal.SIGKILL)
        wait_until(lambda: pool.stats().worker_deaths == 1, TIMEOUT)
        replacement = _one_successor(pids, [first, doomed])
        futures = [pool.submit(tasks.getpid) for _ in range(5)]
        ran_on = [f.result(TIMEOUT) for f in futures]
        assert ran_on[:3] == [first, replacement, replacement]
        assert doomed not in ran_on
        assert pool.stats().completed == 6
    finally:
        pool.shutdown()
    wait_until(lambda: all(process_gone(pid) for pid in _started(pids)), TIMEOUT)


def test_shrinking_lets_a_surplus_slots_successor_go(ctx: object, pids: Path, gate: Path) -> None:
    pool = _pool(ctx, pids, workers=2)
    try:
        futures = [pool.submit(tasks.wait_for_gate, str(gate)) for _ in range(2)]
        wait_until(lambda: len(pool.worker_pids()) == 2, TIMEOUT)
        workers = pool.worker_pids()
        wait_until(lambda: len(_started(pids) - set(workers)) == 2, TIMEOUT)
        successors = _started(pids) - set(workers)
        pool.resize(1)
        # One successor is let go at once, while both workers are still busy.
        wait_until(lambda: sum(process_gone(pid) for pid in successors) == 1, TIMEOUT)
        assert all(not process_gone(pid) for pid in workers)
        gate.touch()
        assert sorted(f.result(TIMEOUT) for f in futures) == sorted(workers)
        # The remaining worker's last task, then its successor's first.
        assert pool.submit(tasks.getpid).result(TIMEOUT) in workers
        assert pool.submit(tasks.getpid).result(TIMEOUT) in successors
    finally:
        pool.shutdown()
    wait_until(lambda: all(process_gone(pid) for pid in _started(pids)), TIMEOUT)


def test_a_successor_whose_initializer_fails_breaks_the_pool(ctx: object, pids: Path) -> None:
    pool = _pool(ctx, pids, initializer=tasks.fail_after_first)
    try:
        first = pool.submit(tasks.getpid).result(TIMEOUT)
        wait_until(lambda: len(_started(pids)) == 2, TIMEOUT)
        wait_until(lambda: bool(pool._broken), TIMEOUT)
        with pytest.raises(BrokenProcessPool, match="initializer"):
            pool.submit(tasks.getpid)
    finally:
        pool.shutdown()
    assert first in _started(pids)
    wait_until(lambda: all(process_gone(pid) for pid in _started(pids)), TIMEOUT)


PARENT_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, sys, time
    import duckpool, _successor_tasks as tasks
    pool = duckpool.ProcessPoolExecutor(
        1,
        multiprocessing.get_context(sys.argv[1]),
        max_tasks_per_child=2,
        initializer=tasks.record_pid,
        initargs=(sys.argv[2],),
    )
    pool.submit(tasks.getpid).result(30)
    time.sleep(300)
    """
)


def test_a_successor_exits_when_the_parent_is_killed(start_method: str, pids: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT, start_method, str(pids)])
    try:
        wait_until(lambda: len(_started(pids)) == 2, TIMEOUT)  # the worker and its successor
    finally:
        parent.kill()
        parent.wait(TIMEOUT)
    wait_until(lambda: all(process_gone(pid) for pid in _started(pids)), TIMEOUT)


def test_a_successor_that_cannot_start_is_retried_with_a_growing_backoff(
    ctx: object, pids: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Successor starts fail (EAGAIN, a process limit reached): the pool goes
    # on with its worker, and each retry waits twice as long as the last.
    # (The failures in a row were forgotten at every pass, since every slot
    # had its worker: it retried every 10 ms for ever.)
    import errno

    from duckpool._pool import _launcher

    real = _launcher.Launcher.launch
    refused: list[float] = []

    def launch(launcher: object, slot_index: int, *args: object, **kwargs: object) -> object:
        if not args and not kwargs and len(refused) < 5:  # (a successor's start)
            refused.append(1.0)
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return real(launcher, slot_index, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_launcher.Launcher, "launch", launch)
    pool = _pool(ctx, pids, quota=1000)
    launcher = pool._core.launcher
    try:
        # Half its quota sent: its successor is due.
        assert list(pool.map(abs, range(-500, 0), chunksize=1)) == list(range(500, 0, -1))
        wait_until(lambda: len(refused) >= 4, TIMEOUT)
        assert launcher.failures >= 3, launcher.failures  # (not 1 each time)
        assert pool.submit(abs, -3).result(TIMEOUT) == 3
        (worker,) = pool.worker_pids()
        _one_successor(pids, [worker])  # (its start succeeds at last)
        assert launcher.failures == 0 and launcher.failing_since is None
    finally:
        pool.shutdown()
