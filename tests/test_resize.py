"""Live resize: more or fewer workers without failing a future."""

from __future__ import annotations

from pathlib import Path

import pytest

import _executor_tasks as tasks
import duckpool
from conftest import process_gone, wait_until

TIMEOUT = 30


def test_growing_starts_workers_that_take_work(ctx: object, tmp_path: Path, gate: Path) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        running = tmp_path / "running"
        running.mkdir()
        futures = [
            pool.submit(tasks.mark_running_then_wait, str(running), str(i), str(gate))
            for i in range(3)
        ]
        wait_until(lambda: len(list(running.iterdir())) == 1, TIMEOUT)
        pool.resize(3)
        assert pool.max_workers == 3
        wait_until(lambda: len(list(running.iterdir())) == 3, TIMEOUT)
        gate.touch()
        assert [f.result(TIMEOUT) for f in futures] == ["released"] * 3
        assert len(pool.worker_pids()) == 3
    finally:
        gate.touch()
        pool.shutdown()


def test_shrinking_lets_busy_workers_finish_and_loses_nothing(
    ctx: object, tmp_path: Path, gate: Path
) -> None:
    pool = duckpool.ProcessPoolExecutor(3, ctx)  # type: ignore[arg-type]
    try:
        running = tmp_path / "running"
        running.mkdir()
        busy = [
            pool.submit(tasks.mark_running_then_wait, str(running), str(i), str(gate))
            for i in range(3)
        ]
        queued = [pool.submit(tasks.add, i, 1) for i in range(5)]
        wait_until(lambda: len(list(running.iterdir())) == 3, TIMEOUT)
        pids = pool.worker_pids()
        pool.resize(1)
        assert pool.stats().max_workers == 1
        gate.touch()
        assert [f.result(TIMEOUT) for f in busy] == ["released"] * 3
        assert [f.result(TIMEOUT) for f in queued] == [1, 2, 3, 4, 5]
        wait_until(lambda: len(pool.worker_pids()) == 1, TIMEOUT)
        gone = [pid for pid in pids if pid not in pool.worker_pids()]
        wait_until(lambda: all(process_gone(pid) for pid in gone), TIMEOUT)
        assert pool.stats().worker_deaths == 0
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
    finally:
        pool.shutdown()


def test_shrinking_an_idle_pool_then_growing_it_again(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(2, ctx)  # type: ignore[arg-type]
    try:
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
        wait_until(lambda: len(pool.worker_pids()) == 2, TIMEOUT)
        pool.resize(1)
        wait_until(lambda: len(pool.worker_pids()) == 1, TIMEOUT)
        pool.resize(4)
        wait_until(lambda: len(pool.worker_pids()) == 4, TIMEOUT)
        futures = [pool.submit(tasks.add, i, i) for i in range(20)]
        assert [f.result(TIMEOUT) for f in futures] == [2 * i for i in range(20)]
        assert sorted(w.slot for w in pool.stats().workers) == [0, 1, 2, 3]
    finally:
        pool.shutdown()


def test_the_manager_resizes_its_pool(ctx: object) -> None:
    manager = duckpool.get_or_create_process_manager("resize")
    manager.start(1, mp_context=ctx)  # type: ignore[arg-type]
    manager.resize(2)
    assert manager.submit_task(tasks.add, 1, 1).result(TIMEOUT) == 2
    wait_until(lambda: len(manager.get_pool().worker_pids()) == 2, TIMEOUT)
    assert "max_workers=2" in repr(manager)


@pytest.mark.parametrize(
    ("size", "error"), [(0, ValueError), ("2", TypeError), (10_000, ValueError)]
)
def test_bad_sizes_are_refused(size: object, error: type) -> None:
    pool = duckpool.ProcessPoolExecutor(1)
    try:
        with pytest.raises(error, match="max_workers"):
            pool.resize(size)  # type: ignore[arg-type]
    finally:
        pool.shutdown()


@pytest.mark.parametrize("how", ["SIGSTOP", "SIGKILL"])
def test_slots_resized_away_while_a_dead_zygote_owed_their_workers_give_back_their_items(
    how: str,
) -> None:
    # Grown, fed, then shrunk while the (stopped or killed) zygote was still
    # asked for the new slots' workers: once its requests were dropped, those
    # slots stayed reserved with an item each, never started nor dropped,
    # their futures unresolved and shutdown() waiting for them for ever.
    import concurrent.futures
    import multiprocessing
    import os
    import signal

    from conftest import helper_pids

    pool = duckpool.ProcessPoolExecutor(2, multiprocessing.get_context("fork"))
    zygote = None
    futures: list[concurrent.futures.Future[int]] = []
    try:
        pool.prestart(TIMEOUT)
        # (With a standby where pidfds are, which takes over; else workers
        # are spawned from then on: the slots must give their items back either way.)
        wait_until(lambda: "zygote" in helper_pids(pool), TIMEOUT)
        zygote = helper_pids(pool)["zygote"]
        os.kill(zygote, getattr(signal, how))
        pool.resize(4)
        futures = [pool.submit(tasks.add, i, 1) for i in range(20)]
        pool.resize(2)
        _, waiting = concurrent.futures.wait(futures, 10)
        assert not waiting
        assert [f.result(0) for f in futures] == [i + 1 for i in range(20)]
    finally:
        if not all(f.done() for f in futures):
            pool.kill_workers()  # (else the shutdown would wait for them)
        pool.shutdown()
        if zygote is not None:
            assert process_gone(zygote)
