"""The Dask backend: DaskExecutor and ProcessPoolManager.start(backend="dask").

One cluster serves the module: a scheduler and two single-threaded worker
processes, one offering the Dask resource "render", the other "reports" (each
also tells its role through an environment variable, so a task can report where
it ran).  Like the LocalCluster duckpool starts, its scheduler gives up on a
task whose worker died at once (allowed-failures 0).  Only the tests of
``address=None`` start a LocalCluster of their own.

These tests run last in the session (marker ``dask``, see conftest.py): a
Client leaves a thread behind, and the fork tests must not run after one.
They skip where ``distributed`` is not installed; scripts/test.sh installs the
``dask`` extra on python3 and 3.13 and checks that it imports there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import io
import itertools
import json
import logging
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import _tasks
from conftest import process_gone, run_in_forked_child, run_script, wait_until

distributed = pytest.importorskip("distributed")

from duckpool import (  # noqa: E402 - after the skip
    DaskExecutor,
    InheritedManagerError,
    TaskTimeoutError,
    UnknownTaskError,
    WorkerDiedError,
    _process_pools,
    drain_all,
    get_or_create_process_manager,
)

pytestmark = [
    pytest.mark.dask,
    # distributed, dask and tornado still use APIs their dependencies deprecate
    # (which ones depends on the versions pip picked); the suite turns
    # DeprecationWarnings into errors, so only theirs are let through here.
    pytest.mark.filterwarnings("default::DeprecationWarning:distributed.*"),
    pytest.mark.filterwarnings("default::DeprecationWarning:dask.*"),
    pytest.mark.filterwarnings("default::DeprecationWarning:tornado.*"),
]

ROLE = "DUCKPOOL_TEST_ROLE"
RESULT_TIMEOUT = 30.0
# A task blocked on the gate waits this long; the scheduler must forget a
# cancelled one well before (FORGET_TIMEOUT), so the two cannot be confused.
GATE_WAIT = 90.0
FORGET_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def scheduler_address() -> Iterator[str]:
    """The module's cluster: a "render" worker and a "reports" worker."""
    import dask

    workers = {
        role: {
            "cls": distributed.Nanny,
            "options": {
                "nthreads": 1,
                "host": "127.0.0.1",
                "resources": {role: 1},
                "env": {ROLE: role},
                "silence_logs": logging.CRITICAL,
            },
        }
        for role in ("render", "reports")
    }
    scheduler = {
        "cls": distributed.Scheduler,
        "options": {
            "host": "127.0.0.1",
            "port": 0,
            "dashboard": False,
            "dashboard_address": "127.0.0.1:0",
        },
    }
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = distributed.SpecCluster(
            workers=workers, scheduler=scheduler, silence_logs=logging.CRITICAL
        )
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


@pytest.fixture
def executor(scheduler_address: str) -> Iterator[DaskExecutor]:
    """A DaskExecutor with a Client of its own on the module's cluster."""
    pool = DaskExecutor(address=scheduler_address)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _children() -> set[int]:
    """This process's descendants, less multiprocessing's resource tracker (shared, lasting)."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.Error:
            pass
    return found


# --- submit, results, errors -----------------------------------------------------------


def test_submit_returns_a_concurrent_future_with_the_result(executor: DaskExecutor) -> None:
    future = executor.submit(_tasks.add, 2, b=40)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=RESULT_TIMEOUT) == 42


def test_task_keywords_named_like_client_options_reach_the_task(executor: DaskExecutor) -> None:
    future = executor.submit(_tasks.kwargs_of, 1, key="k", priority=5, resources="r", pure=True)
    assert future.result(timeout=RESULT_TIMEOUT) == (
        (1,),
        {"key": "k", "priority": 5, "resources": "r", "pure": True},
    )


def test_task_exception_keeps_its_type(executor: DaskExecutor) -> None:
    future = executor.submit(_tasks.raise_value_error, "bad input")
    with pytest.raises(ValueError, match="bad input"):
        future.result(timeout=RESULT_TIMEOUT)


def test_executor_goes_on_after_a_task_raises(executor: DaskExecutor) -> None:
    failed = executor.submit(_tasks.raise_value_error, "once")
    assert isinstance(failed.exception(timeout=RESULT_TIMEOUT), ValueError)
    assert executor.submit(_tasks.add, 1, 2).result(timeout=RESULT_TIMEOUT) == 3


def test_typed_task_runs_only_on_workers_offering_its_type(executor: DaskExecutor) -> None:
    for role in ("render", "reports"):
        typed = executor.options(task_type=role)
        futures = [typed.submit(_tasks.env_value, ROLE) for _ in range(6)]
        assert {f.result(timeout=RESULT_TIMEOUT) for f in futures} == {role}


def test_untyped_tasks_may_run_on_any_worker(executor: DaskExecutor) -> None:
    futures = [executor.submit(_tasks.sleep_then, 0.2, i) for i in range(4)]
    assert [f.result(timeout=RESULT_TIMEOUT) for f in futures] == [0, 1, 2, 3]


def test_submit_rejects_a_non_callable(executor: DaskExecutor) -> None:
    with pytest.raises(TypeError, match="callable"):
        executor.submit(42)  # type: ignore[arg-type]


def test_unpicklable_argument_fails_the_future_with_pickling_error(
    executor: DaskExecutor,
) -> None:
    future = executor.submit(_tasks.echo, threading.Lock())
    with pytest.raises(pickle.PicklingError, match="echo"):
        future.result(timeout=RESULT_TIMEOUT)
    assert executor.submit(_tasks.add, 1, 2).result(timeout=RESULT_TIMEOUT) == 3


# --- timeouts, cancelling, worker death ------------------------------------------------


def test_timeout_fails_the_future_and_cancels_the_dask_task(
    executor: DaskExecutor, gate: Path
) -> None:
    future = executor.options(timeout=0.5).submit(_tasks.wait_for_file, str(gate), GATE_WAIT)
    with pytest.raises(TaskTimeoutError, match=r"0\.5 s"):
        future.result(timeout=RESULT_TIMEOUT)
    # The scheduler forgets the task: the bridge sees it reported as cancelled.
    wait_until(lambda: not executor._bridge.tasks, timeout=FORGET_TIMEOUT)


def test_task_timeout_is_the_executors_default(scheduler_address: str, gate: Path) -> None:
    with DaskExecutor(address=scheduler_address, task_timeout=0.5) as pool:
        future = pool.submit(_tasks.wait_for_file, str(gate), GATE_WAIT)
        with pytest.raises(TaskTimeoutError):
            future.result(timeout=RESULT_TIMEOUT)
        assert pool.options(timeout=None).submit(_tasks.add, 1, 1).result(RESULT_TIMEOUT) == 2
        # options() without a timeout keeps the executor's, as on a local pool.
        future = pool.options(priority=1).submit(_tasks.wait_for_file, str(gate), GATE_WAIT)
        with pytest.raises(TaskTimeoutError):
            future.result(timeout=RESULT_TIMEOUT)


def test_cancelling_a_future_cancels_the_dask_task(executor: DaskExecutor, gate: Path) -> None:
    future = executor.submit(_tasks.wait_for_file, str(gate), GATE_WAIT)
    assert executor.cancel_task(future)
    assert future.cancelled()
    wait_until(lambda: not executor._bridge.tasks, timeout=FORGET_TIMEOUT)


def test_worker_death_fails_its_task_with_worker_died_error(executor: DaskExecutor) -> None:
    doomed = executor.options(task_type="reports").submit(_tasks.kill_self, signal.SIGKILL)
    with pytest.raises(WorkerDiedError, match="died") as caught:
        doomed.result(timeout=RESULT_TIMEOUT)
    assert isinstance(caught.value.__cause__, distributed.KilledWorker)
    assert isinstance(caught.value, concurrent.futures.process.BrokenProcessPool)
    # The executor goes on; the Nanny restarts the dead worker with its resources.
    assert executor.submit(_tasks.add, 1, 2).result(timeout=RESULT_TIMEOUT) == 3
    typed = executor.options(task_type="reports").submit(_tasks.env_value, ROLE)
    assert typed.result(timeout=RESULT_TIMEOUT) == "reports"


# --- map ------------------------------------------------------------------------------


def test_map_returns_results_in_order(executor: DaskExecutor) -> None:
    results = executor.map(_tasks.add, range(8), range(8), timeout=RESULT_TIMEOUT)
    assert list(results) == [2 * i for i in range(8)]


def test_map_with_chunks_returns_results_in_order(executor: DaskExecutor) -> None:
    results = executor.map(_tasks.echo, range(10), chunksize=3, timeout=RESULT_TIMEOUT)
    assert list(results) == list(range(10))


def test_options_map_and_progress_work_as_on_the_local_pool(executor: DaskExecutor) -> None:
    typed = executor.options(task_type="reports", timeout=RESULT_TIMEOUT)
    assert list(typed.map(_tasks.env_value, [ROLE] * 3)) == ["reports"] * 3
    out = io.StringIO()
    bar = {"file": out, "mininterval": 0, "miniters": 1}
    results = executor.map(_tasks.echo, range(7), chunksize=3, progress=bar)
    assert list(results) == list(range(7))
    assert "7/7" in out.getvalue().split("\r")[-1]


def test_map_buffersize_bounds_the_calls_in_flight(executor: DaskExecutor) -> None:
    pulled = []

    def endless() -> Iterator[int]:
        for i in itertools.count():
            pulled.append(i)
            yield i

    results = executor.map(_tasks.echo, endless(), buffersize=2, timeout=RESULT_TIMEOUT)
    assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert len(pulled) <= 5 + 2
    results.close()  # type: ignore[attr-defined]
    wait_until(lambda: not executor._bridge.tasks, timeout=FORGET_TIMEOUT)


def test_priorities_and_unordered_maps_work_and_retries_are_refused(
    executor: DaskExecutor,
) -> None:
    urgent = executor.options(priority=10, timeout=RESULT_TIMEOUT)
    assert urgent.submit(_tasks.echo, 4).result(RESULT_TIMEOUT) == 4
    results = urgent.map(_tasks.echo, range(9), chunksize=2, ordered=False)
    assert sorted(results) == list(range(9))
    with pytest.raises(ValueError, match="retries are not supported on the Dask backend"):
        executor.options(retries=1)


def test_a_traced_dask_task_has_a_span_under_the_submitting_one(
    executor: DaskExecutor, spans: Any
) -> None:
    from opentelemetry import trace

    from conftest import task_spans

    with trace.get_tracer("test").start_as_current_span("request") as request:
        future = executor.options(trace=True).submit(_tasks.echo, 5)
    assert future.result(RESULT_TIMEOUT) == 5
    [task] = task_spans(spans, 1)
    assert task.parent.span_id == request.get_span_context().span_id
    assert task.context.trace_id == request.get_span_context().trace_id


def test_a_dask_future_refuses_progress_callbacks_saying_why(executor: DaskExecutor) -> None:
    future = executor.submit(_tasks.echo, 1)
    assert future.result(RESULT_TIMEOUT) == 1
    assert future.progress is None  # type: ignore[attr-defined]
    with pytest.raises(NotImplementedError, match="not carried on the Dask backend"):
        future.add_progress_callback(lambda f: None)  # type: ignore[attr-defined]


def test_context_variables_reach_a_dask_task(executor: DaskExecutor) -> None:
    import _context_tasks as ctx_tasks

    token = ctx_tasks.request_id.set("dask-req")
    try:
        carried = executor.options(context_vars=ctx_tasks.request_id, timeout=RESULT_TIMEOUT)
        assert carried.submit(ctx_tasks.seen).result(RESULT_TIMEOUT) == ("dask-req", "nobody")
        assert list(carried.map(ctx_tasks.seen_with, range(3), chunksize=2)) == [
            (i, "dask-req") for i in range(3)
        ]
    finally:
        ctx_tasks.request_id.reset(token)


def test_map_reraises_a_calls_exception(executor: DaskExecutor) -> None:
    results = executor.map(_tasks.raise_value_error, ["boom"], timeout=RESULT_TIMEOUT)
    with pytest.raises(ValueError, match="boom"):
        list(results)


# --- shutdown -------------------------------------------------------------------------


def test_submit_after_shutdown_raises_runtime_error(scheduler_address: str) -> None:
    pool = DaskExecutor(address=scheduler_address)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(_tasks.noop)


def test_shutdown_cancel_futures_resolves_every_future(scheduler_address: str, gate: Path) -> None:
    pool = DaskExecutor(address=scheduler_address)
    futures = [pool.submit(_tasks.wait_for_file, str(gate), GATE_WAIT) for _ in range(5)]
    pool.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in futures)
    assert not pool._bridge.thread.is_alive()


def test_shutdown_stops_the_executors_threads(scheduler_address: str) -> None:
    def ours() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("duckpool-dask-")]

    before = ours()
    pool = DaskExecutor(address=scheduler_address)
    assert pool.options(timeout=10).submit(_tasks.add, 1, 1).result(RESULT_TIMEOUT) == 2
    assert len(ours()) == len(before) + 2  # the bridge and the timeout timer
    pool.shutdown(wait=True)
    assert ours() == before


def test_shutdown_without_wait_returns_and_the_futures_still_resolve(
    scheduler_address: str,
) -> None:
    pool = DaskExecutor(address=scheduler_address)
    futures = [pool.submit(_tasks.sleep_then, 0.3, i) for i in range(3)]
    pool.shutdown(wait=False)
    assert [f.result(timeout=RESULT_TIMEOUT) for f in futures] == [0, 1, 2]
    assert pool._bridge.closed.wait(RESULT_TIMEOUT)


@pytest.mark.parametrize("how", ["result", "timeout", "cancel"])
def test_shutdown_in_a_done_callback_returns_and_the_executor_closes(
    scheduler_address: str, gate: Path, how: str
) -> None:
    # Done-callbacks run in the executor's own threads (the bridge's, the
    # timeouts', the close's), which the close waits for: shutdown(wait=True)
    # there must not wait, and the executor still closes, every future resolved.
    pool = DaskExecutor(address=scheduler_address)
    outcomes: list[object] = []
    called = threading.Event()

    def shut_down(_: object) -> None:
        try:
            pool.shutdown(wait=True)
            outcomes.append("returned")
        except BaseException as exc:
            outcomes.append(exc)
        called.set()

    later = pool.submit(_tasks.sleep_then, 0.3, "later")  # still out at the callback
    if how == "result":
        first = pool.submit(_tasks.add, 1, 2)
    elif how == "timeout":
        first = pool.options(timeout=0.2).submit(_tasks.wait_for_file, str(gate), GATE_WAIT)
    else:
        first = pool.submit(_tasks.wait_for_file, str(gate), GATE_WAIT)
    first.add_done_callback(shut_down)
    if how == "cancel":
        pool.shutdown(wait=False, cancel_futures=True)  # the close cancels it
    assert called.wait(RESULT_TIMEOUT), "shutdown(wait=True) hung in a done-callback"
    assert outcomes == ["returned"]
    assert pool._bridge.closed.wait(RESULT_TIMEOUT)
    assert later.done() and first.done()


REENTERED_DASK_EXECUTOR = """
import gc, json, sys, threading, time
import distributed, duckpool

cluster = distributed.LocalCluster(
    n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
)
client = distributed.Client(cluster, set_as_default=False)
report = {}

# drain_all() in a done-callback, which runs in the executor's bridge thread.
pool = duckpool.DaskExecutor(address=client)
drained = threading.Event()
first = pool.submit(abs, -1)
first.add_done_callback(lambda _: (duckpool.drain_all(0.5), drained.set()))
report["drain_all returned"] = drained.wait(30)
report["closed"] = pool._bridge.closed.wait(30)

# An abandoned map collected while a thread holds the bridge's lock, shutting down.
pool = duckpool.DaskExecutor(address=client)
results = pool.map(time.sleep, [0] + [0.2] * 20, chunksize=1)
next(results)  # its generator runs: closing it cancels the rest
cycle = [results]
cycle.append(cycle)  # only the collector frees it
del results, cycle
gc.disable()
pool.shutdown(wait=False)
collected = threading.Event()

def collect_under_the_lock():
    with pool._bridge.lock:
        gc.collect()
    collected.set()

threading.Thread(target=collect_under_the_lock, daemon=True).start()
report["collected"] = collected.wait(30)
report["closed after"] = pool._bridge.closed.wait(30)
print(json.dumps(report), flush=True)
client.close()
cluster.close()
"""


def test_a_dask_executor_reentered_from_its_own_threads_closes() -> None:
    # (An in-process cluster: a deadlock would hold the bridge's lock for the
    # rest of this module's tests.)
    report = json.loads(run_script(REENTERED_DASK_EXECUTOR, timeout=120).splitlines()[-1])
    assert report == {
        "drain_all returned": True,
        "closed": True,
        "collected": True,
        "closed after": True,
    }


def test_shutdown_does_not_wait_for_a_timed_out_task_dask_never_reports() -> None:
    # A result Dask cannot serialize stays on its worker: the task is never
    # reported, so only its timeout resolves the future, and shutdown must not
    # wait for it.  Its own LocalCluster: that worker's link may not recover.
    pool = DaskExecutor(1)
    future = pool.options(timeout=1).submit(threading.Lock)
    with pytest.raises(TaskTimeoutError):
        future.result(timeout=RESULT_TIMEOUT)
    closer = threading.Thread(target=pool.shutdown, daemon=True)
    closer.start()
    closer.join(RESULT_TIMEOUT)
    assert not closer.is_alive(), "shutdown() waited for a task nobody waits for"


EXIT_SCRIPT = """
import sys
import _tasks
from duckpool import get_or_create_process_manager

if __name__ == "__main__":
    manager = get_or_create_process_manager("exit")
    manager.start(max_workers=1, backend="dask")
    manager.submit_task(_tasks.touch_after, sys.argv[1], 1.0)
"""


def test_interpreter_exit_waits_for_submitted_tasks(tmp_path: Path) -> None:
    script, flag = tmp_path / "exit_script.py", tmp_path / "finished"
    script.write_text(EXIT_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(flag)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert flag.exists(), "exit did not wait for the submitted task"


LATE_SUBMIT_SCRIPT = """
import atexit, sys
import _tasks
from duckpool import get_or_create_process_manager

manager = get_or_create_process_manager("late")
manager.start(max_workers=1, backend="dask", address=sys.argv[1])
print("ran", manager.submit_task(_tasks.add, 1, 2).result(30), flush=True)

def submit_late():
    try:
        manager.submit_task(_tasks.add, 1, 1)
    except RuntimeError as exc:
        print("refused:", exc, flush=True)
        raise  # atexit prints it on stderr
    print("accepted", flush=True)

atexit.register(submit_late)
"""


def test_a_submit_from_an_atexit_handler_raises(scheduler_address: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", LATE_SUBMIT_SCRIPT, scheduler_address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    refusal = "cannot schedule new futures after interpreter shutdown"
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["ran 3", f"refused: {refusal}"], done.stderr
    assert f"RuntimeError: {refusal}" in done.stderr


#: Long enough for a short task to finish on a free worker, even on a loaded machine.
DRAIN_TIMEOUT = 3.0


def test_drain_all_drains_a_dask_pool(scheduler_address: str, gate: Path) -> None:
    pool = DaskExecutor(address=scheduler_address)
    # Each on a worker of its own, so the quick task never waits behind the stuck one.
    quick = pool.options(task_type="render").submit(_tasks.sleep_then, 0.1, "done")
    stuck = pool.options(task_type="reports").submit(_tasks.wait_for_file, str(gate), GATE_WAIT)
    drain_all(DRAIN_TIMEOUT)
    assert quick.result(timeout=0) == "done"  # it was let finish
    assert stuck.cancelled()  # past the deadline: cancelled, Dask told to forget it
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(_tasks.noop)
    assert pool._bridge not in _process_pools.LIVE_POOLS.of_this_process()
    assert not pool._bridge.thread.is_alive()  # closed, not only refusing work


def test_a_dask_pool_nothing_holds_stays_registered_until_drained(scheduler_address: str) -> None:
    # The exit hook and drain_all reach a pool through LIVE_POOLS, which holds
    # it weakly: what they reach must outlive an executor dropped unclosed.
    pool = DaskExecutor(address=scheduler_address)
    assert pool.submit(_tasks.add, 1, 1).result(timeout=RESULT_TIMEOUT) == 2
    bridge = weakref.ref(pool._bridge)
    del pool
    gc.collect()
    live = bridge()
    assert live is not None and live in _process_pools.LIVE_POOLS.of_this_process()
    del live
    drain_all(RESULT_TIMEOUT)
    assert bridge() not in _process_pools.LIVE_POOLS.of_this_process()


def test_a_forked_child_neither_uses_nor_drains_the_parents_dask_pool(
    executor: DaskExecutor,
) -> None:
    assert executor.submit(_tasks.add, 1, 1).result(timeout=RESULT_TIMEOUT) == 2

    def child() -> tuple[str, int]:
        try:
            executor.submit(_tasks.add, 1, 1)
            refused = "accepted"
        except InheritedManagerError:
            refused = "InheritedManagerError"
        drain_all(0)  # this process has no pool: the parent's is not touched
        return refused, len(_process_pools.LIVE_POOLS.of_this_process())

    assert run_in_forked_child(child) == ("InheritedManagerError", 0)
    assert executor.submit(_tasks.add, 2, 2).result(timeout=RESULT_TIMEOUT) == 4


def test_shutdown_leaves_a_client_passed_in_open(scheduler_address: str) -> None:
    with distributed.Client(scheduler_address, set_as_default=False) as client:
        with DaskExecutor(address=client) as pool:
            assert pool.submit(_tasks.add, 1, 1).result(timeout=RESULT_TIMEOUT) == 2
        assert client.status == "running"
        assert client.submit(_tasks.add, 2, 2, pure=False).result(RESULT_TIMEOUT) == 4


def test_local_cluster_offers_the_task_types_and_shutdown_leaves_no_process() -> None:
    before = _children()
    with DaskExecutor(1, task_types=["render"]) as pool:
        typed = pool.options(task_type="render").submit(_tasks.getpid)
        worker_pid = typed.result(timeout=RESULT_TIMEOUT)
        started = _children() - before
        assert worker_pid in started
    wait_until(lambda: all(process_gone(pid) for pid in started), timeout=RESULT_TIMEOUT)


# --- argument checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"max_workers": 0}, ValueError, "max_workers"),
        ({"task_timeout": -1}, ValueError, "task_timeout"),
        ({"task_types": "render"}, TypeError, "task_types"),
        ({"address": 8786}, TypeError, "address"),
        ({"address": "tcp://127.0.0.1:1", "task_types": ["x"]}, ValueError, "task_types"),
        ({"address": "tcp://127.0.0.1:1", "cluster_options": {"n": 1}}, ValueError, "cluster"),
    ],
)
def test_executor_rejects_bad_arguments(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        DaskExecutor(**arguments)


def test_missing_distributed_raises_import_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r'pip install "duckpool\[dask\]"'):
        DaskExecutor(1)


def test_import_duckpool_does_not_import_distributed() -> None:
    code = "import sys, duckpool; print('distributed' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"


# --- the manager ---------------------------------------------------------------------


def test_manager_submit_task_on_dask(scheduler_address: str) -> None:
    manager = get_or_create_process_manager("dask-submit")
    manager.start(max_workers=1, backend="dask", address=scheduler_address)
    assert isinstance(manager.get_pool(), DaskExecutor)
    future = manager.submit_task(_tasks.add, 2, b=40)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=RESULT_TIMEOUT) == 42
    assert "dask" in repr(manager) and "running" in repr(manager)
    manager.stop()
    assert "stopped" in repr(manager)


def test_manager_refuses_stop_with_a_timeout_and_its_pool_goes_on(scheduler_address: str) -> None:
    manager = get_or_create_process_manager("dask-stop-timeout")
    manager.start(max_workers=1, backend="dask", address=scheduler_address)
    with pytest.raises(ValueError, match="backend='local'"):
        manager.stop(timeout=1)
    assert manager.submit_task(_tasks.add, 2, b=40).result(timeout=RESULT_TIMEOUT) == 42
    manager.stop()
    assert "stopped" in repr(manager)


@pytest.mark.parametrize("role", ["render", "reports"])
def test_manager_typed_pool_runs_only_on_workers_offering_its_type(
    scheduler_address: str, role: str
) -> None:
    manager = get_or_create_process_manager(f"dask-{role}")
    manager.start(max_workers=1, task_type=role, backend="dask", address=scheduler_address)
    futures = [manager.submit_task(_tasks.env_value, ROLE, task_type=role) for _ in range(4)]
    assert {f.result(timeout=RESULT_TIMEOUT) for f in futures} == {role}


def test_manager_refuses_a_wrong_type_before_sending_anything(
    scheduler_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = get_or_create_process_manager("dask-typed")
    manager.start(max_workers=1, task_type="render", backend="dask", address=scheduler_address)
    sent: list[Any] = []
    monkeypatch.setattr(manager.get_pool().client, "submit", lambda *a, **k: sent.append(a))
    for wrong in ("reports", None):
        with pytest.raises(UnknownTaskError):
            manager.submit_task(_tasks.noop, task_type=wrong)
    assert sent == []


def test_manager_task_death_fails_with_worker_died_error(scheduler_address: str) -> None:
    manager = get_or_create_process_manager("dask-death")
    manager.start(max_workers=1, task_type="render", backend="dask", address=scheduler_address)
    doomed = manager.submit_task(_tasks.exit_now, 3, task_type="render")
    with pytest.raises(WorkerDiedError):
        doomed.result(timeout=RESULT_TIMEOUT)
    follow_up = manager.submit_task(_tasks.env_value, ROLE, task_type="render")
    assert follow_up.result(timeout=RESULT_TIMEOUT) == "render"


def test_manager_run_awaits_the_task(scheduler_address: str) -> None:
    manager = get_or_create_process_manager("dask-run")
    manager.start(max_workers=1, backend="dask", address=scheduler_address)

    async def main() -> Any:
        return await asyncio.wait_for(manager.run(_tasks.add, 20, 22), RESULT_TIMEOUT)

    assert asyncio.run(main()) == 42


def test_manager_stop_closes_its_local_cluster_leaving_no_process() -> None:
    before = _children()
    manager = get_or_create_process_manager("dask-local")
    manager.start(max_workers=1, task_type="render", backend="dask")
    pid = manager.submit_task(_tasks.getpid, task_type="render").result(timeout=RESULT_TIMEOUT)
    started = _children() - before
    assert pid in started and pid != os.getpid()
    manager.stop(wait=True)
    wait_until(lambda: all(process_gone(p) for p in started), timeout=RESULT_TIMEOUT)
    assert get_or_create_process_manager("dask-local", strictly_get=True) is manager


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"backend": "ray"}, "'ray'"),
        ({"address": "tcp://127.0.0.1:8786"}, "address"),
        ({"backend": "dask", "process_name_prefix": "p"}, "process_name_prefix"),
        ({"backend": "dask", "mp_context": multiprocessing.get_context("spawn")}, "mp_context"),
    ],
)
def test_manager_start_rejects_options_that_do_not_fit_the_backend(
    arguments: dict[str, Any], message: str
) -> None:
    manager = get_or_create_process_manager("dask-bad")
    with pytest.raises(ValueError, match=message):
        manager.start(max_workers=1, **arguments)
    assert manager.state == "new"


# --- the command line -----------------------------------------------------------------


def _duckpool(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m duckpool ARGS`` in a fresh interpreter, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "duckpool", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow  # (a run of the tool: python3 only, see scripts/test.sh)
def test_demo_on_dask_runs_every_step_and_leaves_no_worker() -> None:
    done = _duckpool("demo", "--backend", "dask")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "backend 'dask'" in done.stdout
    assert "-> WorkerDiedError" in done.stdout
    assert "none of their" in done.stdout and "left running" in done.stdout
    assert "INFO" not in done.stdout + done.stderr


def test_demo_refuses_start_method_with_dask() -> None:
    done = _duckpool("demo", "--backend", "dask", "--start-method", "spawn")
    assert done.returncode == 2
    assert "--start-method" in done.stderr


@pytest.mark.slow  # (a run of the tool: python3 only, see scripts/test.sh)
def test_bench_on_dask_reports_the_overhead_ratio() -> None:
    done = _duckpool("bench", "--backend", "dask", "--workers", "1", "--tasks", "20", "--reps", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"overhead ratio DaskExecutor / plain: \d+\.\d+", done.stdout), done.stdout
