"""Per-task scheduling options: priorities, retries, and ``map(ordered=False)``.

Each behaviour runs under fork, forkserver and spawn (the ``ctx`` fixture),
on as few pools as it can: a pool's start is most of a test's time.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FuturesTimeoutError
from pathlib import Path

import pytest

import _executor_tasks as tasks
import _option_tasks as option_tasks
import duckpool
from conftest import wait_until

TIMEOUT = 30


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- priorities -----------------------------------------------------------------


def test_higher_priority_goes_first_fifo_within_one_and_admission_still_holds(
    ctx: object, tmp_path: Path
) -> None:
    order = tmp_path / "order"
    started, gate = tmp_path / "started", tmp_path / "gate"
    pool = duckpool.ProcessPoolExecutor(1, ctx, max_pending=6)  # type: ignore[arg-type]
    try:
        blocker = pool.submit(tasks.touch_then_wait, str(started), str(gate))
        wait_until(started.exists, TIMEOUT)
        # Queued behind the blocker, in this order:
        futures = [
            pool.options(priority=-1).submit(option_tasks.record, str(order), "low"),
            pool.submit(option_tasks.record, str(order), "default-1"),
        ]
        chunks = pool.options(priority=5).map(
            option_tasks.record, [str(order)] * 2, ["map-0", "map-1"], chunksize=1
        )
        futures.append(pool.submit(option_tasks.record, str(order), "default-2"))
        futures.append(pool.options(priority=10).submit(option_tasks.record, str(order), "top"))
        assert pool.stats().pending == 6
        # A priority does not jump admission control: the queue is full.
        with pytest.raises(duckpool.PoolSaturatedError):
            pool.options(priority=100).submit(option_tasks.record, str(order), "refused")
        gate.touch()
        assert blocker.result(TIMEOUT) == "released"
        assert list(chunks) == ["map-0", "map-1"]
        assert [f.result(TIMEOUT) for f in futures] == ["low", "default-1", "default-2", "top"]
        assert _lines(order) == ["top", "map-0", "map-1", "default-1", "default-2", "low"]
    finally:
        gate.touch()
        pool.shutdown(cancel_futures=True, timeout=TIMEOUT)


def test_the_manager_takes_priority_and_retries_through_its_options(
    ctx: object, tmp_path: Path
) -> None:
    manager = duckpool.get_or_create_process_manager("options-test")
    manager.start(1, mp_context=ctx)  # type: ignore[arg-type]
    try:
        # submit_task's other keywords are the task's, as on the seed's page.
        seen = manager.submit_task(tasks.kwargs_echo, priority=3, retries=1)
        assert seen.result(TIMEOUT) == {"priority": 3, "retries": 1}
        runs = tmp_path / "runs"
        chosen = manager.options(priority=2, retries=1)
        assert chosen.submit_task(option_tasks.die_until, str(runs), 1).result(TIMEOUT) == 2
        assert asyncio.run(chosen.run(tasks.add, 1, 2)) == 3
        assert manager.stats().retried == 1
        with pytest.raises(TypeError, match="priority must be an int"):
            manager.options(priority="high")
        with pytest.raises(ValueError, match="retries must be 0 or more"):
            manager.options(retries=-1)
    finally:
        manager.stop()


# -- retries --------------------------------------------------------------------


def test_retries_rerun_a_task_whose_worker_died_or_that_timed_out_never_one_that_raised(
    ctx: object, tmp_path: Path, short_graces: None
) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx, quarantine_after=3)  # type: ignore[arg-type]
    try:
        # Dies twice, succeeds on its third run.
        runs = tmp_path / "twice"
        future = pool.options(retries=2).submit(option_tasks.die_until, str(runs), 2)
        assert future.result(TIMEOUT) == 3
        assert len(_lines(runs)) == 3 and pool.stats().retried == 2

        # Dies on every run: one retry, then the death is the future's, saying so.
        runs = tmp_path / "always"
        future = pool.options(retries=1).submit(option_tasks.die_until, str(runs), 99)
        error = future.exception(TIMEOUT)
        assert isinstance(error, duckpool.WorkerDiedError)
        assert error.attempts == 2 and "(after 2 attempts)" in str(error)
        assert len(_lines(runs)) == 2

        # An exception the task raised is its answer: never retried.
        runs = tmp_path / "raised"
        future = pool.options(retries=3).submit(option_tasks.raise_every_run, str(runs))
        with pytest.raises(KeyError):
            future.result(TIMEOUT)
        assert len(_lines(runs)) == 1

        # A timeout is retried like a death.
        runs = tmp_path / "stalled"
        future = pool.options(retries=1, timeout=0.2).submit(
            option_tasks.stall_first_run, str(runs)
        )
        assert future.result(TIMEOUT) == 2
        timed_out = pool.options(retries=1, timeout=0.2).submit(time.sleep, 60)
        error = timed_out.exception(TIMEOUT)
        assert isinstance(error, duckpool.TaskTimeoutError) and error.attempts == 2

        # Each death counts toward quarantine (after 3 here): the third cuts the
        # retries short, and the future says why.
        runs = tmp_path / "poison"
        future = pool.options(retries=10).submit(option_tasks.always_die, str(runs))
        error = future.exception(TIMEOUT)
        assert isinstance(error, duckpool.TaskQuarantinedError)
        assert isinstance(error.__cause__, duckpool.WorkerDiedError)
        assert len(_lines(runs)) == 3

        # The pool goes on.
        assert pool.submit(tasks.add, 1, 2).result(TIMEOUT) == 3
    finally:
        pool.shutdown(cancel_futures=True, timeout=TIMEOUT)


def test_a_retried_task_is_not_charged_for_a_worker_that_died_before_taking_it_up(
    ctx: object, tmp_path: Path
) -> None:
    # The first worker runs X, which kills it; X waits for the next worker of
    # that slot, which dies in its initializer before reading X.  That death
    # is not X's: X runs a second time on the third worker, and returns.
    starts, runs = tmp_path / "starts", tmp_path / "runs"
    pool = duckpool.ProcessPoolExecutor(  # type: ignore[misc]
        1,
        ctx,  # type: ignore[arg-type]
        initializer=option_tasks.exit_on_second_start,
        initargs=(str(starts),),
    )
    try:
        future = pool.options(retries=1).submit(option_tasks.die_until, str(runs), 1)
        assert future.result(TIMEOUT) == 2
        assert len(_lines(runs)) == 2 and len(_lines(starts)) == 3
        assert pool.stats().retried == 1
    finally:
        pool.shutdown(cancel_futures=True, timeout=TIMEOUT)


def test_a_cancelled_task_is_not_retried(ctx: object, tmp_path: Path, short_graces: None) -> None:
    started, gate = tmp_path / "started", tmp_path / "gate"
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        future = pool.options(retries=3).submit(tasks.touch_then_wait, str(started), str(gate))
        wait_until(started.exists, TIMEOUT)
        started.unlink()
        assert pool.cancel_task(future)
        with pytest.raises(duckpool.TaskCancelledError):
            future.result(TIMEOUT)
        assert pool.submit(tasks.add, 2, 2).result(TIMEOUT) == 4
        assert not started.exists() and pool.stats().retried == 0
    finally:
        gate.touch()
        pool.shutdown(cancel_futures=True, timeout=TIMEOUT)


# -- map(ordered=False) ---------------------------------------------------------


def test_an_unordered_map_yields_results_as_they_finish(ctx: object, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    pool = duckpool.ProcessPoolExecutor(2, ctx)  # type: ignore[arg-type]
    try:
        # Item 0 holds one worker until the gate opens: the others come first.
        results = pool.map(
            option_tasks.wait_or_echo,
            range(20),
            [str(gate)] * 20,
            chunksize=1,
            ordered=False,
            timeout=TIMEOUT,
        )
        first = [next(results) for _ in range(3)]
        assert 0 not in first
        gate.touch()
        rest = list(results)
        assert sorted(first + rest) == list(range(20))

        # Past its timeout, the iteration raises (and cancels what is left).
        late = tmp_path / "late"
        stuck = pool.map(option_tasks.wait_or_echo, [0], [str(late)], ordered=False, timeout=0.2)
        with pytest.raises(FuturesTimeoutError):
            next(stuck)
        late.touch()

        # Chosen chunks, a bounded buffer: every result once.
        assert sorted(
            pool.map(tasks.add, range(50), range(50), chunksize=4, buffersize=2, ordered=False)
        ) == [2 * i for i in range(50)]

        # The first failed call raises; ending early cancels what has not started.
        results = pool.map(option_tasks.fail_on, range(40), [0] * 40, chunksize=1, ordered=False)
        with pytest.raises(ValueError, match="bad value 0"):
            list(results)
        automatic = pool.map(option_tasks.fail_on, range(400), [7] * 400, ordered=False)
        with pytest.raises(ValueError, match="bad value 7"):
            list(automatic)
    finally:
        gate.touch()
        pool.shutdown(cancel_futures=True, timeout=TIMEOUT)


def test_closing_a_map_before_iterating_cancels_its_chunks(ctx: object, tmp_path: Path) -> None:
    started, gate = tmp_path / "started", tmp_path / "gate"
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        blocker = pool.submit(tasks.touch_then_wait, str(started), str(gate))
        wait_until(started.exists, TIMEOUT)
        order = tmp_path / "order"
        for ordered in (False, True):  # closed before the iteration starts
            results = pool.map(
                option_tasks.record, [str(order)] * 10, [str(i) for i in range(10)], ordered=ordered
            )
            results.close()  # type: ignore[attr-defined]
        gate.touch()
        blocker.result(TIMEOUT)
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
        assert _lines(order) == []
    finally:
        gate.touch()
        pool.shutdown(cancel_futures=True, timeout=TIMEOUT)


# -- bad input ------------------------------------------------------------------


def test_bad_options_are_refused_by_name() -> None:
    pool = duckpool.ProcessPoolExecutor(1)
    try:
        with pytest.raises(TypeError, match="priority must be an int, got 'high'"):
            pool.options(priority="high")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="priority must be an int"):
            pool.options(priority=True)
        with pytest.raises(ValueError, match="retries must be 0 or more, got -1"):
            pool.options(retries=-1)
        with pytest.raises(TypeError, match="retries must be an int"):
            pool.options(retries=1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="ordered must be True or False"):
            pool.map(tasks.add, [1], [2], ordered="yes")  # type: ignore[arg-type]
        assert pool.stats().workers == ()  # nothing was started for any of it
    finally:
        pool.shutdown()


def test_a_cancelled_chunk_of_an_unordered_map_raises_cancelled() -> None:
    # (No pool: the iterator over futures a caller cancelled.)
    from concurrent.futures import Future

    from duckpool import _map

    cancelled: Future[list[int]] = Future()
    done: Future[list[int]] = Future()
    done.set_result([1, 2])
    futures = iter([done, cancelled])
    results = _map.map_results(
        iter([([1],), ([2],)]), None, lambda chunk: next(futures), None, ordered=False
    )
    assert cancelled.cancel()
    items = iter(results)
    with pytest.raises(CancelledError):
        list(items)
