"""The first submit: it starts the pool while its own task already runs.

The first ``submit()`` starts the worker that takes its task, then the rest
of the pool (under fork: the zygote, which forks the other workers; then the
dispatcher thread), and the caller may read that first result itself.
Whatever the way the caller waits for it, and whatever happens next (the
worker dies, the pool is shut down or left to the interpreter's exit), the
first future resolves and the pool goes on or stops cleanly, under every
start method.  (Cancelling a running first task: test_executor.)
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest

import _executor_tasks as tasks
import duckpool
from conftest import wait_until

TIMEOUT = 30


def _wait_with_concurrent_futures(future: concurrent.futures.Future[Any]) -> Any:
    done, _ = concurrent.futures.wait([future], timeout=TIMEOUT)
    assert done == {future}
    return future.result(0)


def _wait_with_as_completed(future: concurrent.futures.Future[Any]) -> Any:
    return next(concurrent.futures.as_completed([future], timeout=TIMEOUT)).result(0)


def _wait_by_polling_done(future: concurrent.futures.Future[Any]) -> Any:
    wait_until(future.done, TIMEOUT)
    return future.result(0)


def _wait_for_a_callback(future: concurrent.futures.Future[Any]) -> Any:
    called: list[concurrent.futures.Future[Any]] = []
    future.add_done_callback(called.append)
    wait_until(lambda: bool(called), TIMEOUT)
    return called[0].result(0)


@pytest.mark.parametrize(
    "wait",
    [
        _wait_with_concurrent_futures,
        _wait_with_as_completed,
        _wait_by_polling_done,
        _wait_for_a_callback,
    ],
)
def test_the_first_future_resolves_however_it_is_waited_for(
    executor: duckpool.ProcessPoolExecutor,
    wait: Callable[[concurrent.futures.Future[Any]], Any],
) -> None:
    assert wait(executor.submit(tasks.add, 2, 3)) == 5
    # The whole pool is up afterwards.
    futures = [executor.submit(tasks.add, i, 1) for i in range(20)]
    assert [f.result(TIMEOUT) for f in futures] == list(range(1, 21))
    wait_until(lambda: len(executor.worker_pids()) == 2, TIMEOUT)


def test_a_first_result_read_by_its_caller_leaves_the_pool_whole(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    assert executor.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
    futures = [executor.submit(tasks.getpid) for _ in range(50)]
    assert all(isinstance(f.result(TIMEOUT), int) for f in futures)
    wait_until(lambda: len(executor.worker_pids()) == 2, TIMEOUT)


def test_the_first_workers_death_fails_only_its_task(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    with pytest.raises(duckpool.WorkerDiedError, match="exited with code 7"):
        executor.submit(tasks.exit_now, 7).result(TIMEOUT)
    assert executor.submit(tasks.add, 2, 2).result(TIMEOUT) == 4


def test_shutdown_right_after_the_first_submit_finishes_its_task(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(2, mp_context=ctx)  # type: ignore[arg-type]
    future = pool.submit(tasks.add, 20, 22)
    pool.shutdown(wait=True)
    assert future.result(0) == 42
    assert pool.worker_pids() == []


EXIT_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, sys
    sys.path.insert(0, sys.argv[1])
    import _executor_tasks as tasks
    import duckpool

    if __name__ == "__main__":
        pool = duckpool.ProcessPoolExecutor(
            2, multiprocessing.get_context(sys.argv[3]), daemon=sys.argv[4] == "daemon"
        )
        gate = sys.argv[2]
        pool.submit(tasks.wait_then_touch, gate, gate + ".finished")
        open(gate, "w").close()  # the task may end now
        # The interpreter exits without shutdown(): the pool stops at exit,
        # a daemon pool at once, another once its task is done.
    """
)


@pytest.mark.parametrize("kind", ["daemon", "non-daemon"])
def test_a_pool_left_running_stops_at_interpreter_exit(
    start_method: str, tmp_path: Path, kind: str
) -> None:
    gate = tmp_path / "gate"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            EXIT_SCRIPT,
            os.path.dirname(tasks.__file__),
            str(gate),
            start_method,
            kind,
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    if kind == "non-daemon":
        assert (tmp_path / "gate.finished").exists()
