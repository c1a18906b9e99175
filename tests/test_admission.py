"""Admission control: ``max_pending`` with the reject and block policies."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path
from typing import Any

import pytest

import _executor_tasks as tasks
import duckpool
from conftest import run_script, wait_until

TIMEOUT = 30


def _fill(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path, gate: Path, running: int
) -> list[Any]:
    """Occupy every worker with a task blocked on ``gate``; return their futures."""
    started = tmp_path / "running"
    started.mkdir()
    futures = [
        pool.submit(tasks.mark_running_then_wait, str(started), str(i), str(gate))
        for i in range(running)
    ]
    wait_until(lambda: len(list(started.iterdir())) == running, TIMEOUT)
    return futures


def test_reject_policy_refuses_at_once_past_max_pending(
    ctx: object, tmp_path: Path, gate: Path
) -> None:
    pool = duckpool.ProcessPoolExecutor(2, ctx, max_pending=2)  # type: ignore[arg-type]
    try:
        running = _fill(pool, tmp_path, gate, 2)
        queued = [pool.submit(tasks.add, i, 1) for i in range(2)]
        with pytest.raises(duckpool.PoolSaturatedError, match="max_pending=2") as info:
            pool.submit(tasks.add, 0, 0)
        assert info.value.max_pending == 2 and info.value.waited == 0
        gate.touch()
        assert [f.result(TIMEOUT) for f in running] == ["released"] * 2
        assert [f.result(TIMEOUT) for f in queued] == [1, 2]
        # Places come back as futures resolve, whatever the outcome.
        assert pool.submit(tasks.add, 2, 2).result(TIMEOUT) == 4
        with pytest.raises(KeyError):
            pool.submit(tasks.raise_key_error, "k").result(TIMEOUT)
        assert [f.result(TIMEOUT) for f in [pool.submit(tasks.add, i, 0) for i in range(4)]] == [
            0,
            1,
            2,
            3,
        ]
    finally:
        pool.shutdown(cancel_futures=True)


def test_block_policy_waits_for_room_then_submits(ctx: object, tmp_path: Path, gate: Path) -> None:
    pool = duckpool.ProcessPoolExecutor(  # type: ignore[arg-type]
        1, ctx, max_pending=0, on_saturated="block", block_timeout=TIMEOUT
    )
    try:
        (running,) = _fill(pool, tmp_path, gate, 1)
        submitted: list[Any] = []
        blocked = threading.Thread(target=lambda: submitted.append(pool.submit(tasks.add, 1, 2)))
        blocked.start()
        blocked.join(0.2)
        assert blocked.is_alive() and not submitted  # no room: submit() waits
        gate.touch()
        blocked.join(TIMEOUT)
        assert not blocked.is_alive()
        assert running.result(TIMEOUT) == "released"
        assert submitted[0].result(TIMEOUT) == 3
    finally:
        pool.shutdown(cancel_futures=True)


def test_block_policy_gives_up_at_its_deadline(ctx: object, tmp_path: Path, gate: Path) -> None:
    pool = duckpool.ProcessPoolExecutor(  # type: ignore[arg-type]
        1, ctx, max_pending=0, on_saturated="block", block_timeout=0.1
    )
    try:
        _fill(pool, tmp_path, gate, 1)
        with pytest.raises(duckpool.PoolSaturatedError, match="block_timeout") as info:
            pool.submit(tasks.add, 1, 2)
        assert info.value.waited >= 0.1
    finally:
        gate.touch()
        pool.shutdown(cancel_futures=True)


def test_a_submit_blocked_for_room_fails_when_the_pool_shuts_down(
    ctx: object, tmp_path: Path, gate: Path
) -> None:
    pool = duckpool.ProcessPoolExecutor(  # type: ignore[arg-type]
        1, ctx, max_pending=0, on_saturated="block"
    )
    errors: list[BaseException] = []

    def submit() -> None:
        try:
            pool.submit(tasks.add, 1, 2)
        except BaseException as exc:
            errors.append(exc)

    try:
        _fill(pool, tmp_path, gate, 1)
        blocked = threading.Thread(target=submit)
        blocked.start()
        blocked.join(0.2)
        assert blocked.is_alive()
        pool.shutdown(wait=False)
        blocked.join(TIMEOUT)
        assert not blocked.is_alive()
        assert isinstance(errors[0], RuntimeError) and "shutdown" in str(errors[0])
    finally:
        gate.touch()
        pool.shutdown()


def test_a_call_that_does_not_pickle_gives_its_place_back(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx, max_pending=0)  # type: ignore[arg-type]
    try:
        for _ in range(3):
            future = pool.submit(tasks.identity, threading.Lock())
            with pytest.raises(pickle.PicklingError):
                future.result(TIMEOUT)
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
    finally:
        pool.shutdown()


def test_the_manager_takes_admission_settings(ctx: object, tmp_path: Path, gate: Path) -> None:
    manager = duckpool.get_or_create_process_manager("admission")
    manager.start(1, mp_context=ctx, max_pending=0)  # type: ignore[arg-type]
    (running,) = [manager.submit_task(tasks.touch_then_wait, str(tmp_path / "started"), str(gate))]
    wait_until((tmp_path / "started").exists, TIMEOUT)
    with pytest.raises(duckpool.PoolSaturatedError):
        manager.submit_task(tasks.add, 1, 1)
    gate.touch()
    assert running.result(TIMEOUT) == "released"
    manager.stop()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_pending": -1}, ValueError, "max_pending must be >= 0, got -1"),
        ({"max_pending": "3"}, TypeError, "max_pending must be an int"),
        ({"max_pending": 1, "on_saturated": "drop"}, ValueError, "on_saturated must be one of"),
        ({"max_pending": 1, "block_timeout": 0}, ValueError, "block_timeout must be greater"),
    ],
)
def test_bad_admission_arguments_are_refused(
    kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        duckpool.ProcessPoolExecutor(1, **kwargs)


def test_a_submit_in_a_done_callback_the_dispatcher_runs_never_waits_for_room(
    ctx: object, tmp_path: Path, gate: Path
) -> None:
    # The dispatcher runs done-callbacks, and is what makes room: a blocking
    # submit() there would wait for ever (and the pool with it).  It raises.
    pool = duckpool.ProcessPoolExecutor(  # type: ignore[arg-type]
        1, ctx, max_pending=1, on_saturated="block"
    )
    outcomes: list[Any] = []
    called = threading.Event()

    def submit_two(_: Any) -> None:
        for _ in range(2):  # the first takes the place just given back
            try:
                outcomes.append(pool.submit(tasks.add, 1, 2))
            except BaseException as exc:
                outcomes.append(exc)
        called.set()

    try:
        (running,) = _fill(pool, tmp_path, gate, 1)
        queued = pool.submit(tasks.add, 0, 0)  # the pool is full
        running.add_done_callback(submit_two)
        gate.touch()  # (nobody waits on `running`: the dispatcher resolves it)
        assert called.wait(TIMEOUT), "submit() in the done-callback hung"
        assert outcomes[0].result(TIMEOUT) == 3
        assert isinstance(outcomes[1], duckpool.PoolSaturatedError)
        assert "dispatcher thread" in str(outcomes[1])
        assert queued.result(TIMEOUT) == 0
    finally:
        gate.touch()
        pool.shutdown(cancel_futures=True)


MAP_COLLECTED_WHILE_A_PLACE_IS_TAKEN = """
import gc, multiprocessing, sys, time, duckpool

pool = duckpool.ProcessPoolExecutor(1, multiprocessing.get_context(sys.argv[1]), max_pending=400)
results = pool.map(time.sleep, [0] + [0.05] * 300, chunksize=1)
next(results)  # its generator runs: closing it cancels what is still queued
cycle = [results]
cycle.append(cycle)  # only the collector frees it
del results, cycle
gc.disable()
with pool._admission._condition:  # as in submit(), taking a place
    gc.collect()  # the map's futures give theirs back
print(pool.submit(abs, -3).result(30))
pool.shutdown(cancel_futures=True)
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_an_abandoned_map_collected_while_a_place_is_taken_gives_its_places_back(
    method: str,
) -> None:
    assert run_script(MAP_COLLECTED_WHILE_A_PLACE_IS_TAKEN, method).split() == ["3"]
