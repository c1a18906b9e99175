"""map() with the chunk size the pool chooses (chunksize left out)."""

from __future__ import annotations

import functools
import itertools
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from pathlib import Path
from typing import Any

import pytest

import _executor_tasks as tasks
import duckpool
from conftest import wait_until
from duckpool import _chunks, _futures, _map

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


@pytest.mark.parametrize("chunksize", [None, 1, 7])
def test_map_stops_at_the_shortest_iterable_even_an_endless_one(
    ctx: object, chunksize: int | None
) -> None:
    pool = duckpool.ProcessPoolExecutor(2, ctx)  # type: ignore[arg-type]
    try:
        results = pool.map(tasks.add, range(50), itertools.count(), chunksize=chunksize)
        assert list(results) == [2 * i for i in range(50)]
        assert list(pool.map(tasks.identity, "abc", chunksize=chunksize)) == ["a", "b", "c"]
        # Lists (sliced when they have one length) and lists of two lengths.
        evens = [2 * i for i in range(50)]
        assert list(pool.map(tasks.add, list(range(50)), range(50), chunksize=chunksize)) == evens
        assert list(pool.map(tasks.add, list(range(50)), list(range(50)))) == evens
        assert list(pool.map(tasks.add, list(range(50)), list(range(70)))) == evens
        assert list(pool.map(tasks.identity, list(range(50)), chunksize=chunksize)) == list(
            range(50)
        )
        with pytest.raises(TypeError):
            pool.map(tasks.identity, 5, chunksize=chunksize)  # type: ignore[arg-type]
    finally:
        pool.shutdown()


def test_an_automatic_map_caps_the_size_of_its_chunks(ctx: object) -> None:
    items = 3 * _map.AUTO_CHUNK_MAX * 4  # a quarter per chunk would be 3x the cap
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        assert list(pool.map(tasks.identity, range(items), timeout=TIMEOUT)) == list(range(items))
        assert pool.stats().completed == items // _map.AUTO_CHUNK_MAX
    finally:
        pool.shutdown()


def test_map_results_keeps_buffersize_chunks_in_flight_and_cancels_the_rest_when_closed() -> None:
    # No pool: each chunk's future is resolved by hand, so what is in flight is known.
    submitted: list[Future[list[int]]] = []

    def submit_chunk(chunk: tuple[list[int], ...]) -> Future[list[int]]:
        future: Future[list[int]] = Future()
        submitted.append(future)
        return future

    chunks = _map.chunk_calls((range(10),), 2, read_now=False)
    results = _map.map_results(chunks, 2, submit_chunk, deadline=None)
    assert len(submitted) == 2  # buffersize chunks, before any result is asked for
    submitted[0].set_result([0, 1])
    assert [next(results), next(results)] == [0, 1]
    assert len(submitted) == 3  # taking a chunk's results submitted the next one
    results.close()  # type: ignore[attr-defined]
    assert [f.cancelled() for f in submitted] == [False, True, True]
    assert len(submitted) == 3


@pytest.mark.parametrize("chunksize", [None, 2], ids=["automatic", "explicit"])
def test_a_map_s_errors_name_the_mapped_callable(chunksize: int | None) -> None:
    # Not duckpool's own function that runs each chunk in its worker.
    pool = duckpool.ProcessPoolExecutor(1)
    try:
        with pytest.raises(Exception, match=r"map\(\) chunk of _executor_tasks\.add"):
            list(pool.map(tasks.add, [1, 2], [3, lambda: None], chunksize=chunksize))
    finally:
        pool.shutdown()
    assert _futures.callable_label(functools.partial(_chunks.run_chunk, divmod)) == (
        "a map() chunk of builtins.divmod"
    )


def test_run_items_marks_a_chunk_with_failures_and_keeps_every_place() -> None:
    assert type(_chunks.run_items(divmod, ([7, 8], [2, 3]))) is list
    results = _chunks.run_items(divmod, ([7, 8, 9, 10], [2, 0, 3, 0]))
    assert type(results) is _chunks.PartlyFailed
    assert results[0] == (3, 1) and results[2] == (3, 0)
    assert all(isinstance(results[i], _chunks.ItemError) for i in (1, 3))
    error = _futures.exception_from_payload(memoryview(results[1].payload))
    assert isinstance(error, ZeroDivisionError)


def test_map_results_read_alike_through_next_and_a_loop_and_stop_when_closed(
    ctx: object,
) -> None:
    pool = duckpool.ProcessPoolExecutor(2, ctx)  # type: ignore[arg-type]
    try:
        results = pool.map(tasks.identity, range(100), chunksize=10, timeout=TIMEOUT)
        assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
        taken = []
        for value in results:
            taken.append(value)
            if value == 49:
                break
        assert taken == list(range(5, 50))
        assert next(results) == 50
        results.close()  # type: ignore[attr-defined]
        assert list(results) == []
        with pytest.raises(StopIteration):
            next(results)
    finally:
        pool.shutdown()


def test_map_checks_its_callable_and_its_timeout_before_submitting(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        with pytest.raises(TypeError, match=r"map\(\) needs a callable, got 42"):
            pool.map(42, [1, 2])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"map\(\) timeout must be a number of seconds"):
            pool.map(abs, [1], timeout="1")  # type: ignore[arg-type]
        stats = pool.stats()
        assert (stats.pending, stats.in_flight, stats.completed) == (0, 0, 0)
    finally:
        pool.shutdown()


def test_a_map_past_its_deadline_hands_out_the_results_already_back(ctx: object) -> None:
    # As the standard library's: a deadline that has passed raises only for
    # a result that is not there yet.
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        results = pool.map(abs, [-1, -2, -3], chunksize=1, timeout=0)
        wait_until(lambda: pool.stats().completed == 3, TIMEOUT)
        assert list(results) == [1, 2, 3]
        unordered = pool.map(abs, [-4, -5], chunksize=1, timeout=0, ordered=False)
        wait_until(lambda: pool.stats().completed == 5, TIMEOUT)
        assert sorted(unordered) == [4, 5]
    finally:
        pool.shutdown()


def test_a_map_past_its_deadline_raises_for_a_result_not_back(ctx: object, gate: Path) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        results = pool.map(tasks.wait_for_file, [str(gate)], timeout=0)
        with pytest.raises(FuturesTimeoutError):  # (the builtin only from 3.11)
            next(results)
    finally:
        gate.touch()
        pool.shutdown()


def test_a_map_refused_partway_cancels_the_chunks_it_had_submitted(ctx: object, gate: Path) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx, max_pending=1)  # type: ignore[arg-type]
    try:
        # Room for 2 unfinished tasks: the third chunk is refused, and the map with it.
        with pytest.raises(duckpool.PoolSaturatedError):
            pool.map(tasks.wait_for_file, [str(gate)] * 5, chunksize=1)
        # What it had queued was cancelled (the second chunk even if it had
        # gone to the worker's pipe), so its place came back: a submit fits
        # while the first chunk still blocks the only worker.
        future = pool.submit(abs, -7)
        gate.touch()
        assert future.result(TIMEOUT) == 7
    finally:
        gate.touch()
        pool.shutdown()


def test_closing_a_map_withdraws_the_chunk_waiting_in_a_workers_pipe(
    ctx: object, gate: Path, tmp_path: Path
) -> None:
    # A chunk behind another in the worker's pipe is not started: closing
    # the map fails it at once, its worker skips it, and its place is free.
    pool = duckpool.ProcessPoolExecutor(1, ctx, max_pending=1)  # type: ignore[arg-type]
    try:
        started = [str(tmp_path / str(n)) for n in range(2)]
        results = pool.map(tasks.touch_then_wait, started, [str(gate)] * 2, chunksize=1)
        running, behind = results._first  # type: ignore[attr-defined]
        wait_until(lambda: Path(started[0]).exists())
        wait_until(behind.running)  # (sent behind the first)
        results.close()  # type: ignore[attr-defined]
        with pytest.raises(duckpool.TaskCancelledError):
            behind.result(0)
        extra = pool.submit(abs, -7)  # (room: the withdrawn chunk's place)
        gate.touch()
        assert running.result(TIMEOUT) == ["released"]
        assert extra.result(TIMEOUT) == 7
        assert not Path(started[1]).exists()  # (the worker went past it)
    finally:
        gate.touch()
        pool.shutdown()


def test_the_task_timeout_bounds_each_call_of_an_explicit_chunk(ctx: object) -> None:
    # A chunk of four calls of 0.2 s runs 0.8 s: no call overran its 0.8 s,
    # though the chunk overran one call's share.  (One iterable: a chunk's
    # calls, not its columns, count.)
    pool = duckpool.ProcessPoolExecutor(1, ctx, task_timeout=0.8)  # type: ignore[arg-type]
    try:
        quick = pool.map(tasks.sleep_then_getpid, [0.2] * 4, chunksize=4, timeout=60)
        assert len(set(quick)) == 1  # (every call, in the one worker)
        # One call that hangs still fails its chunk, by the chunk's share (1.6 s).
        hung = pool.map(tasks.sleep_then, [0.01, 60], [0, 1], chunksize=2, timeout=60)
        with pytest.raises(duckpool.TaskTimeoutError):
            list(hung)
        assert list(pool.map(tasks.identity, range(3), chunksize=3, timeout=60)) == [0, 1, 2]
    finally:
        pool.shutdown()


class _CountingExecutor(duckpool.ProcessPoolExecutor):
    """A subclass that overrides ``submit`` (to count tasks), as user code does."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.submitted: list[object] = []

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        self.submitted.append(fn)
        return super().submit(fn, *args, **kwargs)


@pytest.mark.parametrize("chunksize", [None, 3], ids=["automatic", "explicit"])
def test_map_goes_through_a_subclass_s_own_submit_and_keeps_the_chunks_options(
    ctx: object, chunksize: int | None, tmp_path: Path
) -> None:
    # As the stdlib's map does, each chunk goes through submit(); the
    # chunk keeps what map gave it: a failing call in an automatic chunk
    # spares the calls after it, and the task timeout is each call's.
    pool = _CountingExecutor(1, ctx, task_timeout=None if chunksize is None else 0.8)
    try:
        if chunksize is None:
            divisors = [1] * 12
            divisors[4] = 0
            results = pool.map(
                tasks.mark_then_divide, [str(tmp_path)] * 12, range(12), divisors, timeout=TIMEOUT
            )
            assert [next(results) for _ in range(4)] == [0.0, 1.0, 2.0, 3.0]
            with pytest.raises(ZeroDivisionError):
                next(results)
            assert len(pool.submitted) == 4  # (four chunks of three for one worker)
            # The call after the failed one in its chunk (3, 4, 5) ran too.
            assert {3, 4, 5} <= {int(p.name) for p in tmp_path.iterdir()}
        else:
            # Three calls of 0.4 s: 1.2 s for the chunk, under its 2.4 s.
            got = list(pool.map(tasks.sleep_then, [0.4] * 3, [7, 8, 9], chunksize=3))
            assert got == [7, 8, 9]
            assert len(pool.submitted) == 1
            assert pool.stats().completed == 1
        assert all(isinstance(fn, _chunks.MapChunk) for fn in pool.submitted)
    finally:
        pool.shutdown()


@pytest.mark.parametrize(
    "options",
    [{}, {"chunksize": 1}, {"chunksize": 5}, {"ordered": False}],
    ids=["automatic", "chunks-of-1", "chunk-of-5", "unordered"],
)
def test_a_call_that_raises_stop_iteration_is_an_error_not_the_end_of_the_results(
    ctx: object, options: dict[str, object]
) -> None:
    # As the stdlib's map does: RuntimeError from the StopIteration, where
    # that call's result would be.  Taken for the end of the calls, it used
    # to drop that result silently, and with it the rest of its chunk.
    pool = duckpool.ProcessPoolExecutor(2, ctx)  # type: ignore[arg-type]
    try:
        results = pool.map(tasks.stop_at_two, range(5), timeout=TIMEOUT, **options)  # type: ignore[arg-type]
        got = []
        with pytest.raises(RuntimeError, match="StopIteration") as info:
            for value in results:
                got.append(value)
        assert isinstance(info.value.__cause__, StopIteration)
        if options.get("chunksize") == 5:
            assert got == []  # (an explicit chunk fails whole, as the stdlib's)
        elif options.get("ordered") is not False:
            assert got == [0, 1]
        # The calls after it in an automatic chunk still ran, each on its own.
        assert sorted(pool.map(tasks.identity, range(3), timeout=TIMEOUT)) == [0, 1, 2]
    finally:
        pool.shutdown()


def test_run_items_keeps_a_stop_iteration_in_its_place_and_runs_the_calls_after_it() -> None:
    chunk = _chunks.run_items(tasks.stop_at_two, ([1, 2, 3],))
    assert type(chunk) is _chunks.PartlyFailed
    assert chunk[0] == 1 and chunk[2] == 3
    assert isinstance(chunk[1], _chunks.ItemError)
    with pytest.raises(StopIteration):
        _chunks.run_chunk(tasks.stop_at_two, ([1, 2, 3],))


class _ElsewhereExecutor(duckpool.ProcessPoolExecutor):
    """Passes each task on from another thread, wrapped (as a timing or
    logging subclass may): a chunk keeps its options all the same."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        import threading

        box: list[Future[Any]] = []
        wrapped = functools.partial(tasks.call_through, fn)
        thread = threading.Thread(
            target=lambda: box.append(super(_ElsewhereExecutor, self).submit(wrapped, *args))
        )
        thread.start()
        thread.join(TIMEOUT)
        return box[0]


def test_a_chunk_keeps_its_options_through_a_submit_that_wraps_it_in_another_thread(
    ctx: object,
) -> None:
    # Three calls of 0.4 s: 1.2 s for the chunk, under its 2.4 s (the pool's
    # 0.8 s per call); the chunk carries its options wherever it goes.
    pool = _ElsewhereExecutor(1, ctx, task_timeout=0.8)  # type: ignore[arg-type]
    try:
        got = list(pool.map(tasks.sleep_then, [0.4] * 3, [7, 8, 9], chunksize=3))
        assert got == [7, 8, 9]
    finally:
        pool.shutdown()
