"""Warm and elastic pools: ``min_workers``, ``idle_timeout``, ``prestart()``.

Each behaviour runs under fork, forkserver and spawn (the ``ctx`` fixture).
"""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

import _executor_tasks as tasks
import duckpool
from conftest import wait_until

TIMEOUT = 30


def _slots(pool: duckpool.ProcessPoolExecutor) -> list[int]:
    return [worker.slot for worker in pool.stats().workers]


def test_a_warm_pool_starts_its_minimum_at_once_and_prestart_starts_the_rest(
    ctx: object,
) -> None:
    pool = duckpool.ProcessPoolExecutor(3, ctx, min_workers=1)  # type: ignore[arg-type]
    try:
        # Started with the pool, before any task.
        assert _slots(pool) == [0]
        stats = pool.stats()
        assert (stats.min_workers, stats.max_workers) == (1, 3)
        pool.prestart(timeout=TIMEOUT)
        assert [(w.slot, w.state) for w in pool.stats().workers] == [
            (0, "idle"),
            (1, "idle"),
            (2, "idle"),
        ]
        assert pool.submit(tasks.add, 1, 2).result(TIMEOUT) == 3
        pool.prestart(timeout=TIMEOUT)  # again: nothing to do
    finally:
        pool.shutdown()
    assert pool.stats().stopped
    with pytest.raises(RuntimeError):
        pool.prestart()


def test_idle_workers_above_the_minimum_exit_and_start_again_when_work_comes(
    ctx: object, tmp_path: Path
) -> None:
    pool = duckpool.ProcessPoolExecutor(  # type: ignore[misc]
        3,
        ctx,  # type: ignore[arg-type]
        min_workers=1,
        idle_timeout=0.2,
    )
    gate = tmp_path / "gate"
    try:
        pool.prestart(timeout=TIMEOUT)
        kept = pool.stats().workers[0].pid
        wait_until(lambda: _slots(pool) == [0], TIMEOUT)
        # Work for three: the pool grows back to three workers at once.
        started = [tmp_path / f"started-{i}" for i in range(3)]
        futures = [pool.submit(tasks.touch_then_wait, str(s), str(gate)) for s in started]
        wait_until(lambda: all(s.exists() for s in started), TIMEOUT)
        assert len(pool.stats().workers) == 3
        gate.touch()
        assert [f.result(TIMEOUT) for f in futures] == ["released"] * 3
        wait_until(lambda: _slots(pool) == [0], TIMEOUT)
        stats = pool.stats()
        # The minimum's worker never left; leaving idle is neither a death nor a recycle.
        assert stats.workers[0].pid == kept
        assert (stats.worker_deaths, stats.recycles, stats.failed) == (0, 0, 0)
    finally:
        gate.touch()
        pool.shutdown(cancel_futures=True, timeout=TIMEOUT)


def test_an_elastic_pool_with_no_minimum_starts_workers_only_for_work(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(4, ctx, min_workers=0)  # type: ignore[arg-type]
    try:
        assert pool.stats().workers == ()
        assert pool.submit(tasks.add, 2, 3).result(TIMEOUT) == 5
        # One task, one worker: not four.
        assert len(pool.stats().workers) == 1
        assert list(pool.map(tasks.add, range(10), range(10), chunksize=1)) == [
            2 * i for i in range(10)
        ]
        assert 1 <= len(pool.stats().workers) <= 4
    finally:
        pool.shutdown()


def test_prestart_waits_for_the_initializers_and_says_when_it_gave_up(
    ctx: object, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    pool = duckpool.ProcessPoolExecutor(  # type: ignore[misc]
        2,
        ctx,  # type: ignore[arg-type]
        initializer=tasks.init_wait_for_file,
        initargs=(str(ready),),
    )
    try:
        with pytest.raises(TimeoutError, match=r"0 of 2 workers were ready after 0\.2 s"):
            pool.prestart(timeout=0.2)
        ready.touch()
        pool.prestart(timeout=TIMEOUT)
        assert {w.state for w in pool.stats().workers} == {"idle"}
    finally:
        ready.touch()
        pool.shutdown()


def test_prestart_raises_the_breakage_of_a_failing_initializer(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(2, ctx, initializer=tasks.init_fail)  # type: ignore[arg-type]
    try:
        with pytest.raises(BrokenProcessPool, match="initializer"):
            pool.prestart(timeout=TIMEOUT)
    finally:
        pool.shutdown()


def test_the_manager_prestarts_and_runs_an_elastic_pool(ctx: object) -> None:
    manager = duckpool.get_or_create_process_manager("elastic-test")
    manager.start(2, mp_context=ctx, min_workers=1, idle_timeout=60, prestart=True)  # type: ignore[arg-type]
    try:
        stats = manager.stats()
        assert len(stats.workers) == 2 and {w.state for w in stats.workers} == {"idle"}
        assert (stats.min_workers, stats.max_workers) == (1, 2)
        assert manager.submit_task(tasks.add, 1, 1).result(TIMEOUT) == 2
    finally:
        manager.stop()


def test_bad_elastic_settings_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"min_workers must be from 0 to max_workers \(2\), got 3"):
        duckpool.ProcessPoolExecutor(2, min_workers=3)
    with pytest.raises(ValueError, match="min_workers must be from 0"):
        duckpool.ProcessPoolExecutor(2, min_workers=-1)
    with pytest.raises(TypeError, match="min_workers must be an int or None"):
        duckpool.ProcessPoolExecutor(2, min_workers="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="idle_timeout must be greater than 0"):
        duckpool.ProcessPoolExecutor(2, idle_timeout=0)
    pool = duckpool.ProcessPoolExecutor(1)
    with pytest.raises(ValueError, match="timeout must be greater than 0"):
        pool.prestart(timeout=-1)
    pool.shutdown()
    manager = duckpool.get_or_create_process_manager("elastic-refusals")
    for option in ({"min_workers": 1}, {"idle_timeout": 5}, {"prestart": True}):
        with pytest.raises(ValueError, match="to backend='local' only"):
            manager.start(2, backend="dask", **option)  # type: ignore[arg-type]
