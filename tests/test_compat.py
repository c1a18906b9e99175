"""``executor._processes``: the stdlib's private view of the workers, for code
written against it (``duckpool._compat``)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

import _executor_tasks as tasks
import _hostile_tasks as hostile
import duckpool
from conftest import process_gone, wait_until

TIMEOUT = 30


def _started(pool: duckpool.ProcessPoolExecutor, workers: int) -> None:
    """Run a task, then wait until ``workers`` workers are up and ready
    (under fork the zygote starts all but the first one after the pool's
    first task; one still starting at shutdown would be killed, not told)."""
    assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
    pool.prestart(TIMEOUT)
    wait_until(lambda: len(pool.worker_pids()) == workers, TIMEOUT)


def test_processes_maps_each_live_worker_s_pid_to_a_handle(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    _started(executor, 2)
    processes = executor._processes
    assert processes is not None
    assert sorted(processes) == sorted(executor.worker_pids())
    for pid, handle in processes.items():
        assert handle.pid == pid
        assert handle.is_alive()
        assert handle.exitcode is None
        handle.join(0)  # returns at once: the worker lives on
        assert handle.is_alive()


def test_processes_is_read_only(executor: duckpool.ProcessPoolExecutor) -> None:
    _started(executor, 2)
    processes = executor._processes
    assert processes is not None
    with pytest.raises(TypeError):
        processes[1] = processes[next(iter(processes))]  # type: ignore[index]
    with pytest.raises(AttributeError):
        executor._processes = {}  # type: ignore[misc]


def test_a_worker_killed_through_its_handle_fails_only_its_task_with_its_true_exit_code(
    executor: duckpool.ProcessPoolExecutor, tmp_path: Path
) -> None:
    # The handle signals and waits, but never reaps: the pool still reads the
    # worker's exit code, even while another thread polls the handle.
    _started(executor, 2)
    pid_file = tmp_path / "pid"
    future = executor.submit(hostile.report_pid_then_sleep, str(pid_file))
    wait_until(pid_file.exists, TIMEOUT)
    victim = int(pid_file.read_text())
    processes = executor._processes
    assert processes is not None
    handle = processes[victim]
    polling = threading.Event()

    def poll() -> None:
        while not polling.is_set():
            handle.is_alive()
            _ = handle.exitcode

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        handle.kill()
        handle.join(TIMEOUT)
        assert not handle.is_alive()
        error = future.exception(TIMEOUT)
    finally:
        polling.set()
        poller.join(TIMEOUT)
    assert isinstance(error, duckpool.WorkerDiedError), repr(error)
    assert error.exitcode == -signal.SIGKILL
    wait_until(lambda: handle.exitcode is not None, TIMEOUT)  # once the pool settled it
    assert handle.exitcode == -signal.SIGKILL
    assert executor.submit(tasks.add, 2, 3).result(TIMEOUT) == 5
    processes = executor._processes
    assert processes is not None and victim not in processes


def test_processes_is_none_after_shutdown_and_old_handles_see_the_exits(
    ctx: object,
) -> None:
    pool = duckpool.ProcessPoolExecutor(2, ctx)  # type: ignore[arg-type]
    _started(pool, 2)
    processes = pool._processes
    assert processes is not None
    pool.shutdown()
    assert pool._processes is None
    for pid, handle in processes.items():
        handle.join(TIMEOUT)
        assert not handle.is_alive()
        # They left when told to.  (Under fork, the exit code of a worker the
        # zygote forked comes from the zygote, which may have gone first.)
        assert handle.exitcode in (0, None)
        assert process_gone(pid)
