"""``duckpool.report_progress``: a task's progress reaches its future, its
callbacks, asyncio and ``map``'s bar, under fork, forkserver and spawn."""

from __future__ import annotations

import asyncio
import io
import os
import threading
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

import _progress_tasks as progress_tasks
import duckpool
from conftest import exit_code_of_child, wait_until

TIMEOUT = 30


def test_updates_reach_the_future_and_the_last_comes_before_the_result(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    calls: list[tuple[Any, bool]] = []
    lock = threading.Lock()
    try:
        future = pool.submit(progress_tasks.count_to, 100_000)

        def seen(done: Any) -> None:
            with lock:
                calls.append((done.progress, done.done()))

        future.add_progress_callback(seen)  # type: ignore[attr-defined]
        assert future.result(TIMEOUT) == 100_000
        # The tight loop's updates were coalesced; the last one came, and
        # no callback ran once the future had resolved.
        assert future.progress == duckpool.Progress(100_000, 100_000, "done", None)  # type: ignore[attr-defined]
        assert 1 <= len(calls) < 1000
        assert calls[-1][0].message == "done"
        assert not any(resolved for _, resolved in calls)
        # A plain task reports nothing.
        plain = pool.submit(pow, 2, 3)
        assert plain.result(TIMEOUT) == 8 and plain.progress is None  # type: ignore[attr-defined]
    finally:
        pool.shutdown()


def test_a_process_forked_in_a_progress_callback_leaves_when_the_callback_does(
    ctx: object,
) -> None:
    # (As for a done-callback: the child, a copy of the pool's thread, must
    # not run on as the parent's dispatcher.)
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    children: list[int] = []

    def fork_once(_: Any) -> None:
        if not children:
            pid = os.fork()
            if pid == 0:
                return
            children.append(pid)

    try:
        future = pool.submit(progress_tasks.count_to, 100_000)
        future.add_progress_callback(fork_once)  # type: ignore[attr-defined]
        assert future.result(TIMEOUT) == 100_000
        assert pool.submit(pow, 2, 3).result(TIMEOUT) == 8
        wait_until(lambda: bool(children), TIMEOUT)
        assert exit_code_of_child(children[0], TIMEOUT) == 0
    finally:
        pool.shutdown()


def test_a_failing_tasks_last_update_comes_before_its_error(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        future = pool.submit(progress_tasks.report_then_raise)
        with pytest.raises(ValueError, match="failed after reporting"):
            future.result(TIMEOUT)
        assert future.progress == duckpool.Progress(2, 2, "last", None)  # type: ignore[attr-defined]
    finally:
        pool.shutdown()


def test_a_callback_added_late_gets_the_latest_update_at_once(ctx: object, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        future = pool.submit(progress_tasks.half_then_wait, str(gate))
        wait_until(lambda: future.progress is not None, TIMEOUT)  # type: ignore[attr-defined]
        seen: list[Any] = []
        future.add_progress_callback(lambda f: seen.append(f.progress))  # type: ignore[attr-defined]
        assert seen == [duckpool.Progress(1, 2, "half", None)]
        gate.touch()
        assert future.result(TIMEOUT) == "finished"
        assert seen[-1] == duckpool.Progress(2, 2, "all", None)
    finally:
        gate.touch()
        pool.shutdown()


def test_asyncio_iterates_the_updates_until_the_task_ends(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]

    async def main() -> tuple[list[float], int]:
        future = pool.submit(progress_tasks.three_steps)
        done = [update.done async for update in future.progress_updates()]  # type: ignore[attr-defined]
        return done, await asyncio.wrap_future(future)

    try:
        done, result = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
        assert result == 3 and done == [1, 2, 3]
    finally:
        pool.shutdown()


def test_a_map_bar_moves_within_a_chunk_still_running(ctx: object, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    out = io.StringIO()
    bar = {"file": out, "mininterval": 0, "miniters": 1}
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        results = pool.map(
            progress_tasks.item_reports_then_waits,
            [0, 1],
            [str(gate)] * 2,
            chunksize=2,
            progress=bar,
        )
        iterator = iter(results)

        def last() -> str:
            return out.getvalue().rstrip("\n").split("\r")[-1]

        # The bar is made when the iteration starts: start it in a thread.
        taken: list[int] = []
        reader = threading.Thread(target=lambda: taken.extend(iterator))
        reader.start()
        # Item 0 returned and item 1 is half-way: 1.5 of 2.
        wait_until(lambda: "1.5/2" in last(), TIMEOUT)
        gate.touch()
        reader.join(TIMEOUT)
        assert taken == [0, 1] and "2/2" in last()
    finally:
        gate.touch()
        pool.shutdown()


def test_report_progress_checks_its_arguments_and_is_a_no_op_outside_a_worker(
    ctx: object,
) -> None:
    duckpool.report_progress(1, 2, "nothing happens here")
    with pytest.raises(TypeError, match="report_progress takes numbers"):
        duckpool.report_progress("half")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="report_progress takes numbers"):
        duckpool.report_progress("3")  # type: ignore[arg-type]  (float() would take it)
    with pytest.raises(TypeError, match="report_progress takes numbers"):
        duckpool.report_progress(1, "10")  # type: ignore[arg-type]
    duckpool.report_progress(Fraction(1, 2), Decimal(1))  # numbers of other kinds are fine
    with pytest.raises(TypeError, match="a str message"):
        duckpool.report_progress(1, 2, 3)  # type: ignore[arg-type]
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        with pytest.raises(TypeError, match="report_progress takes numbers"):
            pool.submit(progress_tasks.bad_report).result(TIMEOUT)
    finally:
        pool.shutdown()
