"""Poison-task quarantine: a callable that keeps killing workers is refused for a while."""

from __future__ import annotations

import pytest

import _executor_tasks as tasks
import duckpool
from conftest import wait_until

TIMEOUT = 30


def test_a_callable_that_kills_workers_in_a_row_is_quarantined(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(  # type: ignore[arg-type]
        1, ctx, quarantine_after=2, quarantine_seconds=TIMEOUT
    )
    try:
        for _ in range(2):
            with pytest.raises(duckpool.WorkerDiedError):
                pool.submit(tasks.exit_now, 9).result(TIMEOUT)
        wait_until(lambda: len(pool.worker_pids()) == 1, TIMEOUT)
        pid = pool.worker_pids()
        future = pool.submit(tasks.exit_now, 9)
        with pytest.raises(duckpool.TaskQuarantinedError, match="exit_now") as info:
            future.result(TIMEOUT)
        assert info.value.deaths == 2
        assert 0 < info.value.retry_after <= TIMEOUT
        assert info.value.callable_name.endswith("exit_now")
        assert pool.stats().quarantined == (info.value.callable_name,)
        # Other work goes on, on the same worker: nothing more was crashed.
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
        assert pool.worker_pids() == pid
        assert pool.stats().worker_deaths == 2
    finally:
        pool.shutdown()


def test_a_success_in_between_resets_the_count(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx, quarantine_after=2)  # type: ignore[arg-type]
    try:
        for _ in range(3):
            with pytest.raises(duckpool.WorkerDiedError):
                pool.submit(tasks.soak_task, "die", 0).result(TIMEOUT)
            assert pool.submit(tasks.soak_task, "ok", 2).result(TIMEOUT) == 4
        assert pool.stats().quarantined == ()
    finally:
        pool.shutdown()


def test_queued_calls_of_a_quarantined_callable_fail_too(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx, quarantine_after=1)  # type: ignore[arg-type]
    try:
        futures = [pool.submit(tasks.exit_now, 9) for _ in range(4)]
        with pytest.raises(duckpool.WorkerDiedError):
            futures[0].result(TIMEOUT)
        for future in futures[1:]:
            with pytest.raises(duckpool.TaskQuarantinedError):
                future.result(TIMEOUT)
        assert pool.stats().worker_deaths == 1
    finally:
        pool.shutdown()


def test_the_quarantine_ends_after_its_cool_down(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(  # type: ignore[arg-type]
        1, ctx, quarantine_after=1, quarantine_seconds=0.05
    )
    try:
        with pytest.raises(duckpool.WorkerDiedError):
            pool.submit(tasks.soak_task, "die", 0).result(TIMEOUT)
        with pytest.raises(duckpool.TaskQuarantinedError):
            pool.submit(tasks.soak_task, "die", 0).result(TIMEOUT)
        wait_until(lambda: pool.stats().quarantined == (), TIMEOUT)
        assert pool.submit(tasks.soak_task, "ok", 1).result(TIMEOUT) == 2
    finally:
        pool.shutdown()


def test_quarantine_is_off_by_default(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        for _ in range(4):
            with pytest.raises(duckpool.WorkerDiedError):
                pool.submit(tasks.exit_now, 9).result(TIMEOUT)
    finally:
        pool.shutdown()
