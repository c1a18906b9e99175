"""map() with the chunk size the pool chooses (chunksize left out)."""

from __future__ import annotations

from pathlib import Path

import pytest

import _executor_tasks as tasks
import duckpool

TIMEOUT = 30


def test_an_automatic_map_sends_chunks_and_keeps_the_order(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(2, ctx)  # type: ignore[arg-type]
    try:
        assert list(pool.map(tasks.add, range(1000), range(1000), timeout=TIMEOUT)) == [
            2 * i for i in range(1000)
        ]
        # About four chunks per worker, not one task per item.
        assert pool.stats().completed == 8
        assert list(pool.map(tasks.add, [1], [2], timeout=TIMEOUT)) == [3]
        assert list(pool.map(tasks.add, [], [], timeout=TIMEOUT)) == []
    finally:
        pool.shutdown()


def test_an_automatic_map_raises_at_the_failing_item_and_runs_the_rest(
    ctx: object, tmp_path: Path
) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        divisors = [1] * 40
        divisors[5] = 0
        results = pool.map(
            tasks.mark_then_divide, [str(tmp_path)] * 40, range(40), divisors, timeout=TIMEOUT
        )
        assert [next(results) for _ in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]
        with pytest.raises(ZeroDivisionError) as info:
            next(results)
        assert "Traceback" in str(info.value.__cause__)  # the worker's traceback
        # The calls after it in its chunk (40 / 4 = 10 per chunk) ran too, as
        # if each had been its own task; the chunks not started are cancelled
        # when the iteration stops, as the stdlib cancels the futures left.
        ran = {int(p.name) for p in tmp_path.iterdir()}
        assert set(range(10)) <= ran
        assert pool.stats().completed < 40
    finally:
        pool.shutdown()


def test_an_explicit_chunksize_is_kept(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(2, ctx)  # type: ignore[arg-type]
    try:
        assert list(pool.map(tasks.add, range(10), range(10), chunksize=1)) == [
            2 * i for i in range(10)
        ]
        assert pool.stats().completed == 10
        with pytest.raises(ValueError, match="chunksize must be >= 1 or None"):
            pool.map(tasks.add, [1], [1], chunksize=0)
    finally:
        pool.shutdown()


def test_an_automatic_map_with_a_task_timeout_sends_one_call_per_task(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(2, ctx, task_timeout=TIMEOUT)  # type: ignore[arg-type]
    try:
        assert list(pool.map(tasks.add, range(12), range(12))) == [2 * i for i in range(12)]
        assert pool.stats().completed == 12
    finally:
        pool.shutdown()
