"""duckpool.ProcessPoolExecutor: results, failures that stay local, shutdown paths."""

from __future__ import annotations

import concurrent.futures
import gc
import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from pathlib import Path
from typing import Any, Iterator

import pytest

import _executor_tasks as tasks
import duckpool
from conftest import parent_script, process_gone, run_in_forked_child, run_script, wait_until

TIMEOUT = 30


def test_is_a_stdlib_process_pool_executor() -> None:
    pool = duckpool.ProcessPoolExecutor(1)
    assert isinstance(pool, concurrent.futures.ProcessPoolExecutor)
    pool.shutdown()


def test_submit_and_map_return_results(executor: duckpool.ProcessPoolExecutor) -> None:
    futures = [executor.submit(tasks.add, i, 1) for i in range(20)]
    assert [f.result(TIMEOUT) for f in futures] == list(range(1, 21))
    assert list(executor.map(tasks.add, range(7), range(7), chunksize=3)) == [
        2 * i for i in range(7)
    ]
    assert list(executor.map(tasks.identity, range(9), buffersize=2)) == list(range(9))


def test_map_holds_no_reference_to_results_it_has_handed_out(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    import weakref

    results = executor.map(tasks.make_object, range(3), chunksize=2)
    first = next(results)
    ref = weakref.ref(first)
    del first
    assert ref() is None
    assert [type(r).__name__ for r in results] == ["Token", "Token"]


def test_task_exception_keeps_its_type_with_remote_traceback(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    future = executor.submit(tasks.raise_key_error, "missing")
    with pytest.raises(KeyError, match="missing") as info:
        future.result(TIMEOUT)
    cause = info.value.__cause__
    assert isinstance(cause, concurrent.futures.process._RemoteTraceback)
    assert "raise_key_error" in cause.tb
    assert executor.submit(tasks.add, 1, 1).result(TIMEOUT) == 2


def test_worker_exit_fails_only_its_task(
    executor: duckpool.ProcessPoolExecutor, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    started = tmp_path / "started"
    innocent = executor.submit(tasks.touch_then_wait, str(started), str(gate))
    wait_until(started.exists, TIMEOUT)
    doomed = executor.submit(tasks.exit_now, 3)
    queued = [executor.submit(tasks.add, i, i) for i in range(5)]
    with pytest.raises(duckpool.WorkerDiedError, match="exited with code 3") as info:
        doomed.result(TIMEOUT)
    assert isinstance(info.value, BrokenProcessPool)
    assert info.value.exitcode == 3
    assert info.value.signal_name is None
    assert info.value.pid not in executor.worker_pids()
    gate.touch()
    assert innocent.result(TIMEOUT) == "released"
    assert [f.result(TIMEOUT) for f in queued] == [0, 2, 4, 6, 8]


def test_worker_killed_by_signal_names_the_signal(executor: duckpool.ProcessPoolExecutor) -> None:
    with pytest.raises(duckpool.WorkerDiedError, match="SIGKILL") as info:
        executor.submit(tasks.kill_self, signal.SIGKILL).result(TIMEOUT)
    assert info.value.signal_name == "SIGKILL"
    assert info.value.exitcode == -signal.SIGKILL
    assert executor.submit(tasks.add, 2, 2).result(TIMEOUT) == 4


def test_idle_worker_killed_from_outside_fails_no_future(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    assert executor.submit(tasks.add, 0, 0).result(TIMEOUT) == 0
    victim = executor.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    # Submitted at once, before the pool can have noticed the death.
    futures = [executor.submit(tasks.add, i, 0) for i in range(10)]
    assert [f.result(TIMEOUT) for f in futures] == list(range(10))
    wait_until(lambda: len(executor.worker_pids()) == 2 and victim not in executor.worker_pids())


def test_unpicklable_argument_fails_only_its_future(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    future = executor.submit(tasks.add, 1, lambda: None)
    assert future.done()  # failed at submit(), before anything was queued
    with pytest.raises(pickle.PicklingError, match=r"add .* argument 1 \(<function"):
        future.result(0)
    assert executor.submit(tasks.add, 1, 2).result(TIMEOUT) == 3


@pytest.mark.parametrize(
    "argument, kind",
    [(threading.Lock(), TypeError), (lambda: None, (AttributeError, pickle.PicklingError))],
    ids=["lock", "lambda"],
)
def test_an_argument_that_does_not_pickle_fails_as_the_standard_library_s_does(
    executor: duckpool.ProcessPoolExecutor, argument: object, kind: Any
) -> None:
    # The standard library's future fails with what pickle raised (a
    # TypeError for a lock): duckpool's error is that too, as well as a
    # PicklingError naming the callable and the argument.
    error = executor.submit(tasks.add, 1, argument).exception(0)
    assert isinstance(error, pickle.PicklingError), repr(error)
    assert isinstance(error, kind), repr(error)
    assert isinstance(error.__cause__, kind), repr(error.__cause__)
    assert "argument 1" in str(error)


def test_unpicklable_result_fails_only_its_future(executor: duckpool.ProcessPoolExecutor) -> None:
    with pytest.raises(Exception, match="lambda"):
        executor.submit(tasks.return_lambda).result(TIMEOUT)
    assert executor.submit(tasks.add, 1, 2).result(TIMEOUT) == 3


def test_argument_that_fails_to_unpickle_in_worker_fails_only_its_future(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    with pytest.raises(duckpool.TaskUnpicklingError, match="could not unpickle") as info:
        executor.submit(tasks.identity, tasks._FailsToUnpickle()).result(TIMEOUT)
    assert isinstance(info.value, BrokenProcessPool)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "refused to unpickle" in str(info.value.__cause__)
    assert executor.submit(tasks.add, 1, 2).result(TIMEOUT) == 3


def test_result_that_fails_to_unpickle_in_parent_fails_only_its_future(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    with pytest.raises(duckpool.TaskUnpicklingError, match="fails_to_unpickle") as info:
        executor.submit(tasks.fails_to_unpickle).result(TIMEOUT)
    assert "refused to unpickle" in str(info.value.__cause__)
    assert executor.submit(tasks.add, 1, 2).result(TIMEOUT) == 3


def test_max_tasks_per_child_recycles_without_hanging(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx, max_tasks_per_child=2)  # type: ignore[arg-type]
    try:
        pids = [f.result(TIMEOUT) for f in [pool.submit(tasks.getpid) for _ in range(10)]]
    finally:
        pool.shutdown()
    assert len(set(pids)) == 5
    assert all(pids.count(pid) == 2 for pid in set(pids))


def test_initializer_failure_breaks_the_pool_once(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(2, ctx, initializer=tasks.init_fail)  # type: ignore[arg-type]
    try:
        future, *others = [pool.submit(tasks.add, i, 1) for i in range(3)]
        with pytest.raises(BrokenProcessPool, match="error in initializer") as info:
            future.result(TIMEOUT)
        assert isinstance(info.value.__cause__, ValueError)
        # Each future its own exception (as from Python 3.15), with the same cause.
        errors = [info.value, *(f.exception(TIMEOUT) for f in others)]
        assert len({id(error) for error in errors}) == 3
        assert all(isinstance(e, BrokenProcessPool) and str(e) == str(info.value) for e in errors)
        assert all(e.__cause__ is info.value.__cause__ for e in errors)
        wait_until(lambda: bool(pool._broken))
        with pytest.raises(BrokenProcessPool):
            pool.submit(tasks.add, 1, 1)
        wait_until(lambda: pool.worker_pids() == [])
    finally:
        pool.shutdown()


def test_an_initializer_that_ends_its_worker_with_code_0_breaks_the_pool_once(
    ctx: object,
) -> None:
    # Exit code 0 before READY is no recycle: it used to restart workers
    # for ever, the future never resolving and shutdown() hanging.
    pool = duckpool.ProcessPoolExecutor(2, ctx, initializer=tasks.init_exit_zero)  # type: ignore[arg-type]
    try:
        future = pool.submit(tasks.add, 1, 1)
        with pytest.raises(BrokenProcessPool, match=r"before they were ready.*code 0"):
            future.result(TIMEOUT)
        assert pool.stats().restarts < 5
    finally:
        pool.shutdown()


def test_workers_killed_as_they_start_break_the_pool_only_once_that_has_lasted(
    ctx: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SIGKILL before READY (the OOM killer during a big initializer) is not
    # the worker's own failure: starts are backed off, and the pool gives up
    # once such deaths have gone on long enough (30 s; 0.5 s here).
    from duckpool._pool import _launcher

    monkeypatch.setattr(_launcher, "MAX_KILLED_STARTS", 4)
    monkeypatch.setattr(_launcher, "START_GIVE_UP_SECONDS", 0.5)
    pool = duckpool.ProcessPoolExecutor(1, ctx, initializer=tasks.init_kill_self)  # type: ignore[arg-type]
    try:
        future = pool.submit(tasks.add, 1, 1)
        with pytest.raises(BrokenProcessPool, match=r"before they were ready.*SIGKILL"):
            future.result(TIMEOUT)
        assert pool.stats().restarts < 20  # (backed off: no fork storm)
    finally:
        pool.shutdown()


def test_a_storm_of_kills_on_starting_workers_is_ridden_out(
    ctx: object, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # More kills in a row than MAX_KILLED_STARTS, within the give-up time:
    # the pool starts another each time, and serves once one gets ready.
    from duckpool._pool import _launcher

    monkeypatch.setattr(_launcher, "MAX_KILLED_STARTS", 3)
    gate = tmp_path / "gate"
    pool = duckpool.ProcessPoolExecutor(  # type: ignore[arg-type]
        1, ctx, initializer=tasks.init_wait_for_file, initargs=(str(gate),)
    )
    try:
        future = pool.submit(tasks.add, 1, 1)
        killed: set[int] = set()
        for _ in range(5):
            wait_until(lambda: bool(set(pool.worker_pids()) - killed), TIMEOUT)
            pid = next(iter(set(pool.worker_pids()) - killed))
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        gate.touch()
        assert future.result(TIMEOUT) == 2
        assert pool.submit(tasks.add, 2, 2).result(TIMEOUT) == 4
    finally:
        gate.touch()
        pool.shutdown()


def test_shutdown_without_wait_still_resolves_futures(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    futures = [executor.submit(tasks.add, i, 1) for i in range(10)]
    executor.shutdown(wait=False)
    assert [f.result(TIMEOUT) for f in futures] == list(range(1, 11))
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(tasks.add, 1, 1)


def test_shutdown_cancel_futures_cancels_what_has_not_started(
    executor: duckpool.ProcessPoolExecutor, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    running = [executor.submit(tasks.wait_for_file, str(gate)) for _ in range(2)]
    queued = [executor.submit(tasks.add, i, 1) for i in range(20)]
    executor.shutdown(wait=False, cancel_futures=True)
    gate.touch()
    assert [f.result(TIMEOUT) for f in running] == ["released", "released"]
    concurrent.futures.wait(queued, TIMEOUT)
    assert all(f.done() for f in queued)
    assert any(f.cancelled() for f in queued)


def test_garbage_collected_executor_finishes_its_work_and_its_workers_exit(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(2, ctx)  # type: ignore[arg-type]
    futures = [pool.submit(tasks.add, i, 1) for i in range(10)]
    pids = pool.worker_pids()
    del pool
    gc.collect()
    assert [f.result(TIMEOUT) for f in futures] == list(range(1, 11))
    wait_until(lambda: all(process_gone(pid) for pid in pids), TIMEOUT)


COLLECTED_UNDER_ITS_LOCK = """
import gc, json, multiprocessing, os, sys, duckpool

ctx = multiprocessing.get_context(sys.argv[1])
ran = duckpool.ProcessPoolExecutor(1, ctx)
assert ran.submit(pow, 2, 5).result(30) == 32
pids = ran.worker_pids()
idle = duckpool.ProcessPoolExecutor(1, ctx)
ran_core, idle_core = ran._core, idle._core
ran.itself, idle.itself = ran, idle  # cycles: only the collector frees them
del ran, idle
gc.disable()
# As drain_all holds a pool's lock, asking each pool to shut down; and as a
# wake-up holds its pipe's lock for one write.
with ran_core.lock, ran_core.wakeup.lock:
    gc.collect()
ran_core.join(30)
print(json.dumps([ran_core.thread.is_alive(), pids, idle_core.closed]))
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_an_executor_collected_while_its_pool_s_lock_is_held_shuts_its_pool_down(
    method: str,
) -> None:
    # The collector runs finalizers in whatever thread allocates, which may
    # hold that very pool's lock (drain_all() does, shutting every pool
    # down): the executor's finalizer must not wait for it.
    output = run_script(COLLECTED_UNDER_ITS_LOCK, method)
    dispatcher_alive, pids, idle_closed = json.loads(output)
    assert not dispatcher_alive  # the pool shut down, its workers reaped
    assert pids and all(process_gone(pid) for pid in pids)
    assert idle_closed  # a pool that never ran: its pipe is closed


def test_kill_workers_fails_running_tasks_and_cancels_queued(
    executor: duckpool.ProcessPoolExecutor, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    running = executor.submit(tasks.touch_then_wait, str(started), str(tmp_path / "never"))
    wait_until(started.exists, TIMEOUT)
    pids = executor.worker_pids()
    executor.kill_workers()
    with pytest.raises(duckpool.WorkerDiedError, match="SIGKILL") as info:
        running.result(TIMEOUT)
    # The cause Python 3.15's BrokenProcessPool carries.
    pid = info.value.pid
    assert isinstance(info.value.__cause__, _RemoteTraceback)
    assert str(info.value.__cause__) == f"Process {pid} terminated abruptly with exit code -9"
    wait_until(lambda: all(process_gone(pid) for pid in pids), TIMEOUT)
    with pytest.raises(RuntimeError):
        executor.submit(tasks.add, 1, 1)


def test_inherited_executor_refuses_use_in_forked_child(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    assert executor.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            executor.submit(tasks.add, 1, 1)
            os.write(write_end, b"submitted")
        except duckpool.InheritedManagerError:
            os.write(write_end, b"refused")
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        assert reader.read() == b"refused"
    os.waitpid(pid, 0)
    assert executor.submit(tasks.add, 2, 2).result(TIMEOUT) == 4


def test_a_forked_child_can_neither_cancel_nor_wait_on_the_parent_s_tasks(
    executor: duckpool.ProcessPoolExecutor, tmp_path: Path
) -> None:
    # The child's copies of the futures can never resolve there, and the
    # workers are the parent's: it gets a clear error at once, and the
    # parent's tasks are untouched (cancel_task used to stop its worker).
    started, gate = tmp_path / "started", tmp_path / "gate"
    running = executor.submit(tasks.touch_then_wait, str(started), str(gate))
    wait_until(started.exists, TIMEOUT)
    queued = [executor.submit(tasks.wait_for_file, str(gate)) for _ in range(2)]

    def child() -> list[str]:
        outcomes = []
        for attempt in (
            lambda: executor.cancel_task(running),
            lambda: executor.cancel_task(queued[1]),
            lambda: running.result(),
            lambda: queued[0].exception(TIMEOUT),
        ):
            try:
                attempt()
                outcomes.append("returned")
            except duckpool.InheritedManagerError as exc:
                outcomes.append(f"refused: {exc}")
        return outcomes

    outcomes = run_in_forked_child(child)
    assert all(outcome.startswith("refused") for outcome in outcomes), outcomes
    assert "can never resolve" in outcomes[2]
    gate.touch()
    assert [f.result(TIMEOUT) for f in [running, *queued]] == ["released"] * 3


def test_stopping_an_inherited_executor_in_a_forked_child_does_nothing(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    # The child's copy of the pool has no thread: kill_workers() and
    # terminate_workers() there used to wait for it for ever.
    assert executor.submit(tasks.add, 1, 1).result(TIMEOUT) == 2

    def child() -> str:
        executor.kill_workers()
        executor.terminate_workers()
        executor.shutdown()
        return "returned"

    assert run_in_forked_child(child) == "returned"
    assert executor.submit(tasks.add, 2, 2).result(TIMEOUT) == 4  # (the parent's goes on)


@pytest.mark.parametrize("bad", [0, -1])
def test_max_workers_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match=str(bad)):
        duckpool.ProcessPoolExecutor(bad)


PARENT_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, os, sys, time
    import duckpool, _executor_tasks as tasks
    pool = duckpool.ProcessPoolExecutor(2, multiprocessing.get_context(sys.argv[1]))
    [f.result(30) for f in [pool.submit(tasks.add, i, 1) for i in range(4)]]
    pool.submit(tasks.wait_for_file, sys.argv[2], 300)   # one busy worker, one idle
    deadline = time.monotonic() + 30
    while len(pool.worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # the second worker is still being started
    with open(sys.argv[3] + ".tmp", "w") as out:
        out.write(" ".join(map(str, pool.worker_pids())))
    os.rename(sys.argv[3] + ".tmp", sys.argv[3])
    time.sleep(300)
    """
)


def test_workers_exit_when_the_parent_is_killed(start_method: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT_SCRIPT, start_method, str(tmp_path / "never"), str(pid_file)]
    )
    try:
        wait_until(pid_file.exists, TIMEOUT)
        pids = [int(p) for p in pid_file.read_text().split()]
        assert len(pids) == 2
    finally:
        parent.kill()
        parent.wait(TIMEOUT)
    wait_until(lambda: all(process_gone(pid) for pid in pids), timeout=2)


def test_task_timeout_stops_the_worker_and_fails_only_that_task(
    executor: duckpool.ProcessPoolExecutor, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    runaway = executor.options(timeout=0.5).submit(tasks.sleep_forever, str(started))
    wait_until(started.exists, TIMEOUT)
    others = [executor.submit(tasks.add, i, 1) for i in range(5)]
    with pytest.raises(duckpool.TaskTimeoutError, match=r"timeout of 0\.5 s") as info:
        runaway.result(TIMEOUT)
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, concurrent.futures.TimeoutError)
    assert [f.result(TIMEOUT) for f in others] == [1, 2, 3, 4, 5]
    wait_until(lambda: len(executor.worker_pids()) == 2, TIMEOUT)


def test_pool_wide_task_timeout_and_task_keywords_do_not_collide(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx, task_timeout=0.5)  # type: ignore[arg-type]
    try:
        assert pool.submit(tasks.kwargs_echo, timeout=7).result(TIMEOUT) == {"timeout": 7}
        with pytest.raises(duckpool.TaskTimeoutError):
            pool.submit(tasks.sleep_forever, os.devnull).result(TIMEOUT)
        # options(timeout=None) lifts the pool's default for one task.
        assert pool.options(timeout=None).submit(tasks.add, 1, 1).result(TIMEOUT) == 2
    finally:
        pool.shutdown()


def test_cancel_task_stops_a_running_task(
    executor: duckpool.ProcessPoolExecutor, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    running = executor.submit(tasks.sleep_forever, str(started))
    wait_until(started.exists, TIMEOUT)
    pid = next(p for p in executor.worker_pids())
    assert executor.cancel_task(running)
    with pytest.raises(duckpool.TaskCancelledError):
        running.result(TIMEOUT)
    assert isinstance(running.exception(), concurrent.futures.CancelledError)
    assert executor.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
    wait_until(lambda: process_gone(pid) or pid not in executor.worker_pids(), TIMEOUT)


def test_cancel_task_on_a_queued_task_cancels_it(ctx: object, tmp_path: Path) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        gate = tmp_path / "gate"
        blocker = pool.submit(tasks.wait_for_file, str(gate))
        queued = [pool.submit(tasks.add, i, 0) for i in range(3)]
        assert all(pool.cancel_task(f) for f in queued)
        gate.touch()
        assert blocker.result(TIMEOUT) == "released"
        for future in queued:
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(TIMEOUT)
        assert pool.submit(tasks.add, 2, 2).result(TIMEOUT) == 4
        assert not pool.cancel_task(blocker)  # already done
    finally:
        pool.shutdown()


@pytest.fixture
def held_in_initializer(
    ctx: object, tmp_path: Path
) -> Iterator[tuple[duckpool.ProcessPoolExecutor, Path]]:
    """A one-worker pool whose worker stays in its initializer until the
    gate file exists (what is sent to it waits in its pipe), and the gate."""
    gate = tmp_path / "gate"
    pool = duckpool.ProcessPoolExecutor(
        1,
        ctx,  # type: ignore[arg-type]
        initializer=tasks.init_wait_for_file,
        initargs=(str(gate),),
    )
    yield pool, gate
    gate.touch()
    pool.shutdown()


def test_a_cancelled_task_s_done_callback_may_call_back_into_the_pool(
    held_in_initializer: tuple[duckpool.ProcessPoolExecutor, Path],
) -> None:
    # A task sent to a worker that has not taken it up fails at once when
    # cancelled, and its done-callbacks run then, in the cancelling thread:
    # one that submits must find the pool's lock free.
    pool, gate = held_in_initializer
    future = pool.submit(tasks.add, 1, 1)
    chained: list[concurrent.futures.Future[int]] = []
    future.add_done_callback(lambda _: chained.append(pool.submit(tasks.add, 2, 2)))
    answers: list[bool] = []
    canceller = threading.Thread(target=lambda: answers.append(pool.cancel_task(future)))
    canceller.daemon = True  # (a deadlocked one must not hold up the exit)
    canceller.start()
    canceller.join(TIMEOUT)
    assert not canceller.is_alive(), "cancel_task() hung in the done-callback"
    assert answers == [True]
    with pytest.raises(duckpool.TaskCancelledError):
        future.result(0)
    gate.touch()
    assert chained[0].result(TIMEOUT) == 4


def test_a_task_cancelled_in_a_worker_s_pipe_fails_with_task_cancelled_error_either_way(
    held_in_initializer: tuple[duckpool.ProcessPoolExecutor, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # cancel_task() marks the task to be skipped, then fails its future once
    # the pool's lock is released: the worker's own answer ("skipped") may
    # resolve it first.  Either way the error is a TaskCancelledError.
    from duckpool._pool import _supervisor

    pool, gate = held_in_initializer
    fail = _supervisor.set_exception

    def after_the_worker_s_answer(future: concurrent.futures.Future[Any], error: Any) -> None:
        gate.touch()  # the worker leaves its initializer and meets the mark
        wait_until(future.done, TIMEOUT)
        fail(future, error)

    future = pool.submit(tasks.add, 1, 1)
    monkeypatch.setattr(_supervisor, "set_exception", after_the_worker_s_answer)
    assert pool.cancel_task(future)
    error = future.exception(TIMEOUT)
    assert isinstance(error, duckpool.TaskCancelledError), repr(error)
    assert "before it started" in str(error)
    assert pool.submit(tasks.add, 2, 2).result(TIMEOUT) == 4


def test_cloudpickle_serializer_sends_lambdas_and_closures(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx, serializer="cloudpickle")  # type: ignore[arg-type]
    offset = 10
    try:
        assert pool.submit(lambda x: x + offset, 5).result(TIMEOUT) == 15
        assert list(pool.map(lambda x: x * offset, range(3))) == [0, 10, 20]
    finally:
        pool.shutdown()


def test_max_memory_per_child_recycles_the_worker_that_crossed_it(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(  # type: ignore[arg-type]
        1, ctx, max_memory_per_child=200 * 1024 * 1024
    )
    try:
        small = pool.submit(tasks.allocate, 1).result(TIMEOUT)
        assert pool.submit(tasks.getpid).result(TIMEOUT) == small
        big = pool.submit(tasks.allocate, 300).result(TIMEOUT)
        assert big == small
        after = pool.submit(tasks.getpid).result(TIMEOUT)
        assert after != big
        wait_until(lambda: process_gone(big), TIMEOUT)
    finally:
        pool.shutdown()


IDLE_EXIT_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, sys
    import duckpool, _executor_tasks as tasks
    pool = duckpool.ProcessPoolExecutor(2, multiprocessing.get_context(sys.argv[1]))
    print(pool.submit(tasks.add, 1, 1).result(30), *pool.worker_pids(), flush=True)
    """
)


def test_interpreter_exit_does_not_hang_on_an_idle_pool(start_method: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", IDLE_EXIT_SCRIPT, start_method],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    result, *pids = done.stdout.split()
    assert result == "2"
    wait_until(lambda: all(process_gone(int(pid)) for pid in pids), TIMEOUT)


CTRL_C_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, sys
    import duckpool, _executor_tasks as tasks
    pool = duckpool.ProcessPoolExecutor(2, multiprocessing.get_context(sys.argv[1]))
    futures = [pool.submit(tasks.sleep_forever_in, sys.argv[2]) for _ in range(4)]
    print(*pool.worker_pids(), flush=True)
    futures[0].result()
    """
)


def test_ctrl_c_stops_the_pool_without_worker_tracebacks(start_method: str, tmp_path: Path) -> None:
    started = tmp_path / "started"
    started.mkdir()
    with parent_script(CTRL_C_SCRIPT, start_method, str(started)) as (parent, pids):
        wait_until(lambda: len(list(started.iterdir())) == 2, TIMEOUT)
        # Ctrl-C reaches the whole foreground process group.
        os.killpg(parent.pid, signal.SIGINT)
        _, stderr = parent.communicate(timeout=TIMEOUT)
    assert "KeyboardInterrupt" in stderr
    assert stderr.count("Traceback") == 1, stderr
    wait_until(lambda: all(process_gone(pid) for pid in pids), TIMEOUT)


def test_workers_that_keep_failing_at_start_up_break_the_pool_instead_of_looping(
    ctx: object,
) -> None:
    pool = duckpool.ProcessPoolExecutor(  # type: ignore[arg-type]
        1, ctx, initializer=tasks.exit_now, initargs=(3,)
    )
    try:
        future = pool.submit(tasks.add, 1, 1)
        with pytest.raises(BrokenProcessPool, match="before they were ready"):
            future.result(TIMEOUT)
        with pytest.raises(BrokenProcessPool):
            pool.submit(tasks.add, 1, 1)
    finally:
        pool.shutdown()


def test_fork_workers_come_from_a_single_threaded_zygote(tmp_path: Path) -> None:
    import multiprocessing
    import threading

    import psutil

    pool = duckpool.ProcessPoolExecutor(2, multiprocessing.get_context("fork"))
    stop = threading.Event()
    busy_thread = threading.Thread(target=stop.wait, args=(TIMEOUT,))
    try:
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
        # From now on the parent is multi-threaded, as a server would be: on
        # 3.12+ a fork from here would warn, and the suite makes that an error.
        busy_thread.start()
        victim = pool.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in pool.worker_pids() and len(pool.worker_pids()) == 2)
        assert [pool.submit(tasks.add, i, 0).result(TIMEOUT) for i in range(4)] == [0, 1, 2, 3]
        for pid in pool.worker_pids():
            zygote = psutil.Process(pid).parent()
            assert zygote is not None and zygote.pid != os.getpid()
            assert zygote.ppid() == os.getpid()
            assert zygote.num_threads() == 1
    finally:
        stop.set()
        if busy_thread.is_alive():
            busy_thread.join(TIMEOUT)
        pool.shutdown()


def test_workers_from_the_zygote_never_collect_what_they_inherited() -> None:
    # A full collection in a worker would touch every object it inherited,
    # copying those pages into the worker.
    import gc
    import multiprocessing

    pool = duckpool.ProcessPoolExecutor(1, multiprocessing.get_context("fork"))
    try:
        first = pool.submit(tasks.getpid).result(TIMEOUT)
        os.kill(first, signal.SIGKILL)  # its replacement comes from the zygote
        wait_until(lambda: pool.worker_pids() not in ([], [first]), TIMEOUT)
        assert pool.submit(gc.get_freeze_count).result(TIMEOUT) > 0
    finally:
        pool.shutdown()


def test_an_error_in_the_dispatcher_resolves_every_future(
    executor: duckpool.ProcessPoolExecutor,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from duckpool._pool import _results

    def broken_on_results(self: object, slot: object, *args: object, **kwargs: object) -> None:
        raise RuntimeError("injected dispatcher fault")

    gate = tmp_path / "gate"
    running = executor.submit(tasks.wait_for_file, str(gate), 5)
    queued = [executor.submit(tasks.add, i, 0) for i in range(10)]
    monkeypatch.setattr(_results.ResultBook, "on_results", broken_on_results)
    gate.touch()  # the running task's result now reaches the broken handler
    _, not_done = concurrent.futures.wait([running, *queued], TIMEOUT)
    assert not not_done
    errors = [f.exception(0) for f in [running, *queued]]
    assert any(isinstance(e, BrokenProcessPool) and "dispatcher" in str(e) for e in errors)
    assert all(e is None or isinstance(e, BrokenProcessPool) for e in errors)


def test_run_awaits_the_result_from_asyncio(executor: duckpool.ProcessPoolExecutor) -> None:
    import asyncio

    async def main() -> list[int]:
        return list(await asyncio.gather(*(executor.run(tasks.add, i, 1) for i in range(5))))

    assert asyncio.run(main()) == [1, 2, 3, 4, 5]


def test_cancelling_an_awaited_run_stops_the_running_task(
    executor: duckpool.ProcessPoolExecutor, tmp_path: Path
) -> None:
    import asyncio

    started = tmp_path / "started"

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(executor.run(tasks.sleep_forever, str(started)), 0.5)

    assert executor.submit(tasks.add, 0, 0).result(TIMEOUT) == 0
    before = set(executor.worker_pids())
    asyncio.run(main())
    assert started.exists()
    # The worker that ran it was stopped and replaced.
    wait_until(lambda: len(set(executor.worker_pids()) - before) == 1, TIMEOUT)
    assert executor.submit(tasks.add, 2, 2).result(TIMEOUT) == 4


def _holds_write_end(pid: int, pipe_inode: int) -> bool:
    """Does process ``pid`` hold a writable descriptor of the pipe ``pipe_inode``?"""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            inode = os.stat(f"/proc/{pid}/fd/{fd}").st_ino
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags"))
        except (FileNotFoundError, StopIteration):
            continue
        if inode == pipe_inode and flags & os.O_WRONLY:
            return True
    return False


def test_forked_workers_hold_no_write_end_of_their_own_task_pipe() -> None:
    # Else a worker would never see its task pipe close when the parent dies.
    pool = duckpool.ProcessPoolExecutor(2, multiprocessing.get_context("fork"))
    try:
        assert [f.result(TIMEOUT) for f in [pool.submit(tasks.add, i, 1) for i in range(4)]]
        wait_until(lambda: len(pool.worker_pids()) == 2, TIMEOUT)
        for slot in pool._core.slots:
            assert slot.process is not None and slot.task_conn is not None
            inode = os.fstat(slot.task_conn.fileno()).st_ino
            assert slot.process.pid is not None
            assert not _holds_write_end(slot.process.pid, inode)
    finally:
        pool.shutdown()


def test_a_pool_that_has_shut_down_leaves_no_descriptor_open(ctx: object) -> None:
    import gc

    def run_a_pool() -> None:
        pool = duckpool.ProcessPoolExecutor(2, ctx)  # type: ignore[arg-type]
        assert [f.result(TIMEOUT) for f in [pool.submit(tasks.add, i, 1) for i in range(6)]]
        pool.shutdown()

    run_a_pool()  # the first may start what multiprocessing keeps (fork server, tracker)
    gc.collect()
    before = set(os.listdir("/proc/self/fd"))
    run_a_pool()
    gc.collect()
    assert set(os.listdir("/proc/self/fd")) - before == set()


def test_an_exception_that_is_false_is_raised_not_taken_for_none(
    executor: duckpool.ProcessPoolExecutor, tmp_path: Path
) -> None:
    # Waited for, not read at once: result() must not read "no exception"
    # from a false one, as 3.13.0's Future.result did (gh-132063).
    gate = tmp_path / "gate"
    future = executor.submit(tasks.raise_falsy_after_file, str(gate))
    waiter = threading.Timer(0.2, gate.touch)  # opens the gate while result() waits
    waiter.start()
    try:
        with pytest.raises(tasks.FalsyError):
            future.result(TIMEOUT)
    finally:
        waiter.cancel()
        gate.touch()
    assert isinstance(future.exception(0), tasks.FalsyError)


_DEFAULT_CONTEXT_SCRIPT = """
import multiprocessing, sys
import duckpool

if __name__ == "__main__":
    # As Python 3.14 does on Linux: forkserver by default.
    multiprocessing.set_start_method(sys.argv[1])
    with duckpool.ProcessPoolExecutor(1) as pool:
        assert pool.submit(abs, -3).result(30) == 3
        executor_method = pool.start_method
    manager = duckpool.get_or_create_process_manager("default-context")
    manager.start(1)
    try:
        assert manager.submit_task(abs, -4).result(30) == 4
        manager_method = manager.get_pool().start_method
    finally:
        manager.stop()
    print(executor_method, manager_method)
"""


@pytest.mark.parametrize("default", ["forkserver", "spawn"])
def test_without_a_context_a_pool_follows_the_interpreter_s_default(
    default: str, tmp_path: Path
) -> None:
    # Python 3.14 made forkserver Linux's default: a pool given no context
    # takes whatever the interpreter's default is, never a fixed method.
    script = tmp_path / "default_context.py"
    script.write_text(_DEFAULT_CONTEXT_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), default],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [default, default]
