"""stats(): a typed snapshot of a pool's workers, queue and counters."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import _executor_tasks as tasks
import duckpool
from conftest import wait_until

TIMEOUT = 30


def test_stats_count_results_failures_timeouts_deaths_and_restarts(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(2, ctx)  # type: ignore[arg-type]
    try:
        assert [pool.submit(tasks.add, i, 1).result(TIMEOUT) for i in range(5)] == [1, 2, 3, 4, 5]
        with pytest.raises(KeyError):
            pool.submit(tasks.raise_key_error, "k").result(TIMEOUT)
        with pytest.raises(duckpool.WorkerDiedError):
            pool.submit(tasks.exit_now, 3).result(TIMEOUT)
        with pytest.raises(duckpool.TaskTimeoutError):
            pool.options(timeout=0.2).submit(tasks.sleep_forever, os.devnull).result(TIMEOUT)
        wait_until(lambda: [w.state for w in pool.stats().workers] == ["idle"] * 2, TIMEOUT)
        stats = pool.stats()
        assert isinstance(stats, duckpool.PoolStats)
        assert (stats.completed, stats.failed, stats.timed_out) == (5, 1, 1)
        assert stats.worker_deaths == 1
        assert stats.restarts == 2  # after the death and after the timeout
        assert stats.recycles == 0
        assert (stats.pending, stats.in_flight, stats.max_workers) == (0, 0, 2)
        assert stats.latency_p50 is not None and stats.latency_p99 is not None
        assert 0 < stats.latency_p50 <= stats.latency_p99
        assert sorted(w.slot for w in stats.workers) == [0, 1]
        assert sorted(w.pid for w in stats.workers) == sorted(pool.worker_pids())
        assert all(w.state == "idle" for w in stats.workers)
        assert all(w.rss is not None and w.rss > 1_000_000 for w in stats.workers)
        assert sum(w.tasks_done for w in stats.workers) <= 6
    finally:
        pool.shutdown()


def test_stats_show_busy_workers_and_the_queue(ctx: object, tmp_path: Path, gate: Path) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        started = tmp_path / "started"
        running = pool.submit(tasks.touch_then_wait, str(started), str(gate))
        queued = [pool.submit(tasks.add, i, 0) for i in range(3)]
        wait_until(started.exists, TIMEOUT)
        stats = pool.stats()
        assert [w.state for w in stats.workers] == ["busy"]
        assert stats.pending + stats.in_flight == 4
        gate.touch()
        assert running.result(TIMEOUT) == "released"
        assert [f.result(TIMEOUT) for f in queued] == [0, 1, 2]
        assert pool.stats().completed == 4
    finally:
        pool.shutdown()


def test_stats_count_recycles_and_deaths_from_outside(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx, max_tasks_per_child=2)  # type: ignore[arg-type]
    try:
        assert [pool.submit(tasks.add, i, 0).result(TIMEOUT) for i in range(4)] == [0, 1, 2, 3]
        wait_until(lambda: pool.stats().recycles == 2, TIMEOUT)
        wait_until(lambda: pool.worker_pids(), TIMEOUT)
        victim = pool.worker_pids()[0]
        wait_until(lambda: [w.state for w in pool.stats().workers] == ["idle"], TIMEOUT)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: pool.stats().worker_deaths == 1, TIMEOUT)
    finally:
        pool.shutdown()


def test_the_manager_reports_its_pools_stats(ctx: object) -> None:
    manager = duckpool.get_or_create_process_manager("stats")
    manager.start(1, mp_context=ctx)  # type: ignore[arg-type]
    assert manager.submit_task(tasks.add, 1, 2).result(TIMEOUT) == 3
    assert manager.stats().completed == 1
    manager.stop()
    with pytest.raises(RuntimeError, match="not running"):
        manager.stats()
