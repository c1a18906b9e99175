"""Graceful drain: shutdown(timeout=...), stop(timeout=...), drain_all and the signal helper."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import CancelledError, Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest

import _executor_tasks as tasks
import duckpool
from conftest import parent_script, process_gone, wait_until

TIMEOUT = 30


def test_a_drain_lets_short_work_finish(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(2, ctx)  # type: ignore[arg-type]
    futures = [pool.submit(tasks.add, i, 1) for i in range(20)]
    pool.shutdown(timeout=TIMEOUT)
    assert [f.result(0) for f in futures] == list(range(1, 21))


def _one_running_one_queued(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path, gate: Path
) -> tuple[Future[Any], Future[Any]]:
    """A task that runs in the pool's one worker until ``gate`` exists (once
    it has begun), and one queued behind it."""
    started = tmp_path / "started"
    running = pool.submit(tasks.touch_then_wait, str(started), str(gate))
    queued = pool.submit(tasks.add, 1, 1)
    wait_until(started.exists, TIMEOUT)
    return running, queued


def test_a_drain_stops_overrunning_work_at_its_deadline(
    ctx: object, tmp_path: Path, gate: Path
) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    running, queued = _one_running_one_queued(pool, tmp_path, gate)
    pid = pool.worker_pids()[0]
    begun = time.monotonic()
    pool.shutdown(timeout=0.2)
    assert time.monotonic() - begun < TIMEOUT
    with pytest.raises(duckpool.WorkerDiedError, match="shutdown timeout") as info:
        running.result(0)
    assert info.value.pid == pid
    assert queued.done()
    with pytest.raises((CancelledError, BrokenProcessPool)):  # never left pending
        queued.result(0)
    wait_until(lambda: process_gone(pid), TIMEOUT)


def test_a_worker_that_ignores_sigterm_is_killed(
    ctx: object, tmp_path: Path, gate: Path, short_graces: None
) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    started = tmp_path / "started"
    running = pool.submit(tasks.ignore_sigterm_then_wait, str(started), str(gate))
    wait_until(started.exists, TIMEOUT)
    pid = pool.worker_pids()[0]
    pool.shutdown(timeout=0.1)
    with pytest.raises(duckpool.WorkerDiedError, match="shutdown timeout"):
        running.result(0)
    wait_until(lambda: process_gone(pid), TIMEOUT)


def test_a_drain_without_waiting_returns_at_once_and_still_resolves_everything(
    ctx: object, tmp_path: Path, gate: Path
) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    started = tmp_path / "started"
    running = pool.submit(tasks.touch_then_wait, str(started), str(gate))
    wait_until(started.exists, TIMEOUT)
    pool.shutdown(wait=False, timeout=0.2)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(tasks.add, 1, 1)
    with pytest.raises(duckpool.WorkerDiedError):
        running.result(TIMEOUT)


def test_manager_stop_drains_with_a_timeout(ctx: object, tmp_path: Path, gate: Path) -> None:
    manager = duckpool.get_or_create_process_manager("drain")
    manager.start(1, mp_context=ctx)  # type: ignore[arg-type]
    started = tmp_path / "started"
    running = manager.submit_task(tasks.touch_then_wait, str(started), str(gate))
    wait_until(started.exists, TIMEOUT)
    manager.stop(timeout=0.1)
    with pytest.raises(duckpool.WorkerDiedError, match="shutdown timeout"):
        running.result(0)
    assert manager.state == "stopped"


def test_drain_all_drains_every_pool_of_the_process(
    ctx: object, tmp_path: Path, gate: Path
) -> None:
    quick = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    slow = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    done = quick.submit(tasks.add, 2, 3)
    started = tmp_path / "started"
    stuck = slow.submit(tasks.touch_then_wait, str(started), str(gate))
    wait_until(started.exists, TIMEOUT)
    duckpool.drain_all(0.2)
    assert done.result(0) == 5
    with pytest.raises(duckpool.WorkerDiedError):
        stuck.result(0)
    for pool in (quick, slow):
        with pytest.raises(RuntimeError):
            pool.submit(tasks.add, 1, 1)


def test_bad_drain_timeouts_are_refused() -> None:
    pool = duckpool.ProcessPoolExecutor(1)
    try:
        with pytest.raises(ValueError, match="timeout must be greater than 0"):
            pool.shutdown(timeout=-1)
    finally:
        pool.shutdown()
    with pytest.raises(ValueError, match="timeout must be a number"):
        duckpool.drain_all(-1)


SIGNAL_SCRIPT = """
import multiprocessing, sys, time
import duckpool, _executor_tasks as tasks
duckpool.install_shutdown_handlers(timeout=float(sys.argv[3]))
pool = duckpool.ProcessPoolExecutor(1, multiprocessing.get_context(sys.argv[1]))
future = pool.submit(tasks.touch_then_wait, sys.argv[2] + "/started", sys.argv[2] + "/gate")
print(*pool.worker_pids(), flush=True)
try:
    while True:
        time.sleep(0.05)
finally:
    print("outcome", type(future.exception(0)).__name__, flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_signal_helper_drains_then_lets_the_signal_act(
    start_method: str, tmp_path: Path, signum: int
) -> None:
    with parent_script(SIGNAL_SCRIPT, start_method, str(tmp_path), "0.3") as (parent, pids):
        wait_until((tmp_path / "started").exists, TIMEOUT)
        os.kill(parent.pid, signum)
        stdout, stderr = parent.communicate(timeout=TIMEOUT)
    if signum == signal.SIGINT:
        # KeyboardInterrupt after the drain: the finally block saw the task's end.
        assert "outcome WorkerDiedError" in stdout, stderr
        assert "KeyboardInterrupt" in stderr
    else:
        assert parent.returncode == -signal.SIGTERM, stderr
    wait_until(lambda: all(process_gone(pid) for pid in pids), TIMEOUT)


EXIT_DRAIN_SCRIPT = """
import multiprocessing, sys
import duckpool, _executor_tasks as tasks
duckpool.install_shutdown_handlers(timeout=0.3, signals=())
pool = duckpool.ProcessPoolExecutor(1, multiprocessing.get_context(sys.argv[1]))
future = pool.submit(tasks.touch_then_wait, sys.argv[2] + "/started", sys.argv[2] + "/gate")
future.add_done_callback(lambda f: print("outcome", type(f.exception()).__name__, flush=True))
tasks.wait_for_file(sys.argv[2] + "/started")
print(*pool.worker_pids(), flush=True)
# Falls off the end with the task still waiting for its gate (30 s).
"""


def test_the_exit_drain_stops_work_still_running_at_its_deadline(
    start_method: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", EXIT_DRAIN_SCRIPT, start_method, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=2 * TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    pids, outcome = done.stdout.splitlines()
    # Without the drain, exit would wait for the task, which ends in TimeoutError.
    assert outcome == "outcome WorkerDiedError", done.stderr
    wait_until(lambda: all(process_gone(int(pid)) for pid in pids.split()), TIMEOUT)


def test_the_signal_helper_can_be_uninstalled() -> None:
    before = signal.getsignal(signal.SIGTERM)
    uninstall = duckpool.install_shutdown_handlers(timeout=1)
    assert signal.getsignal(signal.SIGTERM) is not before
    uninstall()
    assert signal.getsignal(signal.SIGTERM) is before


STARTING_AT_SHUTDOWN_MAIN = """
import multiprocessing, os, time
import duckpool

# (From the environment: spawned workers import this module too.)
method, marker, finished = os.environ["TEST_STARTING"].split(os.pathsep)
PARENT = int(os.environ.get("TEST_PARENT") or os.getpid())
os.environ["TEST_PARENT"] = str(PARENT)


def start_slowly():
    time.sleep(2)
    open(finished, "w").close()  # (a worker that finished starting)


def second_worker_starts_slowly_after_fork():
    # Under fork, the zygote's first child: the pool's second worker (the
    # first worker and the zygote are this process's).
    if os.getppid() != PARENT:
        start_slowly()


if method == "fork":
    os.register_at_fork(after_in_child=second_worker_starts_slowly_after_fork)
elif __name__ == "__mp_main__":
    # A worker importing this module as it starts (spawn; forkserver
    # before 3.14): the second one runs code of the program's meanwhile.
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        start_slowly()

if __name__ == "__main__":
    pool = duckpool.ProcessPoolExecutor(2, multiprocessing.get_context(method))
    assert pool.submit(pow, 2, 5).result(30) == 32
    deadline = time.monotonic() + 30
    while len(pool._processes) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(pool._processes) == 2
    pool.shutdown()  # (returns once every process of the pool has exited)
    print(os.path.exists(finished))
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_worker_still_starting_at_shutdown_is_killed_only_if_it_runs_no_code_of_yours(
    method: str, tmp_path: Path
) -> None:
    # Under fork a worker starting has no task and runs none of the
    # program's code (no initializer, nothing to import): it need not finish
    # starting to leave, and is killed.  One importing the main module as it
    # starts (spawn; forkserver before 3.14, whose server never imports it)
    # is asked to stop, and finishes starting first.
    if method == "forkserver" and sys.version_info >= (3, 14):
        pytest.skip("from 3.14 the fork server imports the main module: no worker does")
    script = tmp_path / "main.py"
    script.write_text(STARTING_AT_SHUTDOWN_MAIN)
    env = dict(os.environ)
    env["TEST_STARTING"] = os.pathsep.join(
        [method, str(tmp_path / "first"), str(tmp_path / "done")]
    )
    env.pop("TEST_PARENT", None)
    done = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False" if method == "fork" else "True"]


def _in_join(thread_id: int) -> bool:
    """Is that thread waiting in a ``join()`` (the pool's, or threading's)?"""
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        if frame.f_code.co_name == "join":
            return True
        frame = frame.f_back
    return False


def test_a_ctrl_c_caught_in_shutdown_leaves_the_pool_waiting_for_its_work(
    ctx: object, tmp_path: Path, gate: Path
) -> None:
    # On 3.9-3.12 a Thread.join() that Ctrl-C interrupts can mark a thread
    # that still runs as stopped (CPython's own lock handling): the second
    # shutdown(wait=True) then returned at once, the tasks still running.
    import threading

    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    running, queued = _one_running_one_queued(pool, tmp_path, gate)
    main = threading.get_ident()

    def interrupt_the_join() -> None:
        wait_until(lambda: _in_join(main), TIMEOUT, interval=0.005)
        os.kill(os.getpid(), signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_the_join)
    interrupter.start()
    with pytest.raises(KeyboardInterrupt):
        pool.shutdown(wait=True)
    interrupter.join(TIMEOUT)
    assert "shutting down" in repr(pool)
    assert not running.done() and not queued.done()
    threading.Timer(0.2, gate.touch).start()
    pool.shutdown(wait=True)  # waits for both, as the first would have
    assert running.result(0) == "released" and queued.result(0) == 2
    assert "shut down" in repr(pool) and "shutting" not in repr(pool)
