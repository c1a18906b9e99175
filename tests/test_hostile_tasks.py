"""Hostile tasks cost their own future and nothing else.

Each test runs one task that misbehaves towards the worker running it (see
``_hostile_tasks``) on a two-worker pool, under every start method, while a
bystander task runs on the other worker.  Whatever the hostile task does:

* its future resolves, within its timeout if it has one, else at once;
* the bystander's result is untouched;
* the pool goes on serving (a plain task afterwards returns); and
* ``shutdown()`` returns within a deadline.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from pathlib import Path
from typing import Any, Iterator

import pytest

import _hostile_tasks as tasks
import duckpool
from conftest import process_gone, wait_until

#: The longest any wait in these tests may take.
TIMEOUT = 30
#: What "at once" allows on a loaded two-core machine.
PROMPTLY = 10
#: How long ``shutdown()`` may take: a worker that does not leave when told
#: gets the pool's stop grace (5 s), then SIGTERM and SIGKILL a second apart.
SHUTDOWN_DEADLINE = 20


@pytest.fixture
def pool(ctx: Any) -> Iterator[duckpool.ProcessPoolExecutor]:
    """A two-worker pool, shut down within bounds at teardown if a test left it running."""
    executor = duckpool.ProcessPoolExecutor(2, mp_context=ctx)
    yield executor
    executor.shutdown(cancel_futures=True, timeout=TIMEOUT)


@contextlib.contextmanager
def bystander(pool: duckpool.ProcessPoolExecutor, tmp_path: Path) -> Iterator[None]:
    """A task running on one worker throughout the block; its result must be intact."""
    started, gate = tmp_path / "bystander-started", tmp_path / "bystander-gate"
    future = pool.submit(tasks.touch_then_wait, str(started), str(gate))
    wait_until(started.exists, TIMEOUT)
    try:
        yield
    finally:
        gate.touch()
    assert future.result(TIMEOUT) == "released"


def serves_then_shuts_down(pool: duckpool.ProcessPoolExecutor) -> None:
    """The pool runs a plain task, then ``shutdown()`` returns within the deadline."""
    assert pool.submit(tasks.add, 1, 2).result(TIMEOUT) == 3
    pids = pool.worker_pids()
    stopper = threading.Thread(target=pool.shutdown, name="shutdown", daemon=True)
    stopper.start()
    stopper.join(SHUTDOWN_DEADLINE)
    assert not stopper.is_alive(), f"shutdown() still runs after {SHUTDOWN_DEADLINE} s"
    assert all(process_gone(pid) for pid in pids)


def resolves_within(future: Future[Any], seconds: float) -> BaseException | None:
    """The future's exception (None for a result); it must resolve within ``seconds``."""
    try:
        return future.exception(seconds)
    except FuturesTimeoutError:
        raise AssertionError(f"the future did not resolve within {seconds} s") from None


def list_within(results: Iterator[Any], seconds: float) -> list[Any]:
    """Every result of a ``map``, which must all come within ``seconds``."""
    box: list[Any] = []
    reader = threading.Thread(target=lambda: box.append(list(results)), daemon=True)
    reader.start()
    reader.join(seconds)
    assert box, f"the map's results did not all come within {seconds} s"
    return box[0]  # type: ignore[no-any-return]


def read_pid(path: Path) -> int:
    wait_until(path.exists, TIMEOUT)
    return int(path.read_text())


def is_stopped(pid: int) -> bool:
    """True while ``pid`` is stopped by a signal (state T in ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.parametrize("outcome", ["return", "raise"])
def test_closing_every_inherited_descriptor_fails_only_that_task(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path, outcome: str
) -> None:
    # With its result pipe closed the task cannot answer: its worker leaves,
    # and the future says so at once instead of waiting forever.
    with bystander(pool, tmp_path):
        future = pool.submit(tasks.close_inherited_fds_then, outcome)
        error = resolves_within(future, PROMPTLY)
    assert isinstance(error, duckpool.WorkerDiedError), repr(error)
    assert "a task closed or replaced a descriptor it does not own" in str(error)
    serves_then_shuts_down(pool)


def test_a_worker_whose_result_pipe_a_task_replaced_is_not_waited_for(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path
) -> None:
    # Its answers go to /dev/null and the worker lives on: the pool sees its
    # result pipe closed, gives it a grace to exit, then kills it.  Before,
    # the future (and any queued behind it, and shutdown) waited for ever.
    with bystander(pool, tmp_path):
        future = pool.submit(tasks.replace_written_pipes_then, "return")
        error = resolves_within(future, PROMPTLY)
    assert isinstance(error, duckpool.WorkerDiedError), repr(error)
    # (Where pidfds are missing, a spawned worker's sentinel is a pipe too:
    # replaced with the others, it reads as the worker's exit, code unknown.)
    said = str(error)
    assert "its result pipe closed but it went on running" in said or (
        "exit status unknown" in said and os.environ.get("DUCKPOOL_TEST_PORTABLE")
    ), said
    serves_then_shuts_down(pool)


def test_a_task_that_overwrites_the_marks_then_dies_is_not_sent_again_for_ever(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path
) -> None:
    # The pool reads whether a dead worker had taken up its first item from
    # the marks the worker shares with it, which a task can write.  Taken at
    # its word (not started), the task went to the next worker, and the
    # next, for ever: its future never resolved, nor did shutdown() return.
    from duckpool._pool._supervisor import MAX_UNMARKED_DEATHS

    runs = tmp_path / "runs"
    with bystander(pool, tmp_path):
        future = pool.submit(tasks.overwrite_marks_then_die, str(runs))
        error = resolves_within(future, TIMEOUT)
    assert isinstance(error, duckpool.WorkerDiedError), repr(error)
    assert len(runs.read_text().split()) == MAX_UNMARKED_DEATHS
    serves_then_shuts_down(pool)


def test_timeout_kills_a_task_that_ignores_sigterm(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path, short_graces: None
) -> None:
    pid_file = tmp_path / "pid"
    with bystander(pool, tmp_path):
        future = pool.options(timeout=1).submit(tasks.ignore_sigterm_then_sleep, str(pid_file))
        worker = read_pid(pid_file)
        # One second of timeout, half a second of grace (short_graces) before SIGKILL.
        error = resolves_within(future, 2 + PROMPTLY)
    assert isinstance(error, duckpool.TaskTimeoutError), repr(error)
    assert process_gone(worker)
    serves_then_shuts_down(pool)


@pytest.mark.parametrize("outcome", ["return", "raise"])
@pytest.mark.parametrize("stop", ["timeout", "cancel_task"])
def test_a_task_that_catches_the_stop_signal_still_gets_the_stop_as_its_outcome(
    pool: duckpool.ProcessPoolExecutor,
    tmp_path: Path,
    short_graces: None,
    outcome: str,
    stop: str,
) -> None:
    # Told to stop (SIGTERM) past its timeout, or cancelled, the task turns
    # the signal into an exception and answers: its own error, or a result.
    # Before, that answer was its future's outcome; the stop is.
    pid_file = tmp_path / "pid"
    with bystander(pool, tmp_path):
        timed = pool.options(timeout=1) if stop == "timeout" else pool
        future = timed.submit(tasks.catch_sigterm_then, str(pid_file), outcome)
        worker = read_pid(pid_file)
        if stop == "cancel_task":
            assert pool.cancel_task(future)
        error = resolves_within(future, 2 + PROMPTLY)
    expected = duckpool.TaskTimeoutError if stop == "timeout" else duckpool.TaskCancelledError
    assert isinstance(error, expected), repr(error)
    wait_until(lambda: process_gone(worker), TIMEOUT)  # (killed after the grace)
    serves_then_shuts_down(pool)


def fork_grandchild_then(pool: duckpool.ProcessPoolExecutor, tmp_path: Path, then: str) -> None:
    """Run a task that forks a grandchild holding every descriptor its worker
    had, for a minute, then returns, exits or is killed from outside (``then``);
    the grandchild is killed afterwards, however the test went."""
    grandchild_file, worker_file = tmp_path / "grandchild", tmp_path / "worker"
    try:
        with bystander(pool, tmp_path):
            future = pool.submit(
                tasks.fork_lingering_grandchild,
                str(grandchild_file),
                str(worker_file),
                "sleep" if then == "killed" else then,
            )
            worker = read_pid(worker_file)
            if then == "killed":
                os.kill(worker, signal.SIGKILL)
            error = resolves_within(future, PROMPTLY)
            if then == "return":
                assert error is None
                assert future.result() == "forked"
            else:
                assert isinstance(error, duckpool.WorkerDiedError), repr(error)
                assert error.pid == worker
                assert error.exitcode == (7 if then == "exit" else -signal.SIGKILL)
        serves_then_shuts_down(pool)
    finally:
        if grandchild_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(grandchild_file.read_text()), signal.SIGKILL)


@pytest.mark.parametrize("then", ["return", "exit", "killed"])
def test_grandchild_holding_the_pipes_hides_nothing_from_the_pool(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path, then: str
) -> None:
    # The grandchild holds the worker's pipes to the parent: the pool must not
    # take the pipes' state for the worker's.
    fork_grandchild_then(pool, tmp_path, then)


@pytest.mark.parametrize("then", ["exit", "killed"])
def test_grandchild_hides_no_worker_death_where_pidfds_are_missing(
    pool: duckpool.ProcessPoolExecutor,
    tmp_path: Path,
    then: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without pidfds (Linux before 5.3, some sandboxes) this process sees a
    # worker's exit as EOF on a pipe whose write end the worker holds: a
    # process the worker forked must not hold it too.  The pool starts its
    # workers at the first submit, after the patch.
    monkeypatch.delattr(os, "pidfd_open", raising=False)
    fork_grandchild_then(pool, tmp_path, then)


def test_task_that_leaves_its_session_costs_nothing(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path
) -> None:
    with bystander(pool, tmp_path):
        future = pool.submit(tasks.leave_session)
        assert resolves_within(future, PROMPTLY) is None
        assert future.result() in pool.worker_pids()  # the session's id: the worker's pid
    serves_then_shuts_down(pool)


@pytest.mark.parametrize(
    "task, raised",
    [(tasks.raise_system_exit, SystemExit), (tasks.raise_keyboard_interrupt, KeyboardInterrupt)],
    ids=["SystemExit", "KeyboardInterrupt"],
)
def test_system_exit_or_interrupt_raised_by_a_task_is_its_outcome(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path, task: Any, raised: type
) -> None:
    with bystander(pool, tmp_path):
        wait_until(lambda: len(pool.worker_pids()) == 2, TIMEOUT)
        before = set(pool.worker_pids())
        future = pool.submit(task)
        error = resolves_within(future, PROMPTLY)
        assert type(error) is raised
        assert set(pool.worker_pids()) == before  # no worker left for it
    serves_then_shuts_down(pool)


def test_non_daemon_thread_left_running_does_not_hold_up_shutdown(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path, short_graces: None
) -> None:
    thread_started = tmp_path / "thread-started"
    with bystander(pool, tmp_path):
        future = pool.submit(tasks.leave_thread_running, str(thread_started))
        assert resolves_within(future, PROMPTLY) is None
        wait_until(thread_started.exists, TIMEOUT)
    serves_then_shuts_down(pool)


def test_task_can_run_a_pool_of_its_own(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path, start_method: str
) -> None:
    with bystander(pool, tmp_path):
        future = pool.submit(tasks.run_inner_pool, start_method)
        assert resolves_within(future, TIMEOUT) is None
        assert future.result() == 5
    serves_then_shuts_down(pool)


def test_timeout_resolves_a_task_whose_worker_is_stopped(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path, short_graces: None
) -> None:
    # A stopped process takes SIGTERM only once continued; SIGKILL at once.
    pid_file = tmp_path / "pid"
    with bystander(pool, tmp_path):
        future = pool.options(timeout=1).submit(tasks.report_pid_then_sleep, str(pid_file))
        worker = read_pid(pid_file)
        os.kill(worker, signal.SIGSTOP)
        error = resolves_within(future, 2 + PROMPTLY)
    assert isinstance(error, duckpool.TaskTimeoutError), repr(error)
    assert process_gone(worker)
    serves_then_shuts_down(pool)


def stop_mid_task(pool: duckpool.ProcessPoolExecutor, tmp_path: Path) -> tuple[Future[Any], int]:
    """A task's future and its worker's pid, the worker stopped (SIGSTOP) in the task."""
    pid_file = tmp_path / "pid"
    future = pool.submit(tasks.report_pid_then_sleep, str(pid_file))
    worker = read_pid(pid_file)
    os.kill(worker, signal.SIGSTOP)
    wait_until(lambda: is_stopped(worker), TIMEOUT)
    return future, worker


def test_stopped_worker_killed_from_outside_fails_its_task(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path
) -> None:
    with bystander(pool, tmp_path):
        future, worker = stop_mid_task(pool, tmp_path)
        assert not future.done()  # stopped is not dead
        os.kill(worker, signal.SIGKILL)
        error = resolves_within(future, PROMPTLY)
    assert isinstance(error, duckpool.WorkerDiedError), repr(error)
    assert error.pid == worker
    serves_then_shuts_down(pool)


def test_shutdown_kills_a_worker_found_stopped_in_the_middle_of_a_task(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path, short_graces: None
) -> None:
    # While the pool runs, a stopped busy worker is left alone (above); a
    # shutdown would wait for its task for ever: found stopped at two looks
    # in a row, it is killed, its task fails saying why, the others finish.
    with bystander(pool, tmp_path):
        future, worker = stop_mid_task(pool, tmp_path)
        stopper = threading.Thread(target=pool.shutdown, name="shutdown", daemon=True)
        stopper.start()
        error = resolves_within(future, PROMPTLY)
    assert isinstance(error, duckpool.WorkerDiedError), repr(error)
    assert error.pid == worker and "found stopped" in str(error)
    stopper.join(SHUTDOWN_DEADLINE)
    assert not stopper.is_alive(), f"shutdown() still runs after {SHUTDOWN_DEADLINE} s"
    assert process_gone(worker)


@pytest.mark.parametrize("program", ["shell", "python"])
def test_programs_a_task_runs_inherit_no_pool_descriptor(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path, program: str
) -> None:
    # os.system, Popen(close_fds=False) and os.exec* pass on every inheritable
    # descriptor: a program holding the worker's result pipe would keep it
    # open after the worker died, and could write into it.  Descriptors the
    # worker holds that this process held before the pool existed are not
    # the pool's (under fork a worker inherits them all).
    before = tasks.open_descriptors()
    with bystander(pool, tmp_path):
        future = pool.submit(tasks.programs_see, str(tmp_path / "listing"))
        assert resolves_within(future, TIMEOUT) is None
    seen = future.result()
    pool_fds = {
        fd: target for fd, target in seen["held"].items() if fd > 2 and before.get(fd) != target
    }
    assert pool_fds  # the worker's pipes at least
    leaked = {fd: target for fd, target in seen[program].items() if pool_fds.get(fd) == target}
    assert leaked == {}, f"the program inherited the worker's {leaked} (it holds {pool_fds})"
    serves_then_shuts_down(pool)


@pytest.mark.parametrize("how", ["return", "raise", "exit"])
def test_a_process_the_task_forks_never_answers_for_the_worker(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path, how: str
) -> None:
    # The child of a fork made in a task is a copy of the worker, mid-task.
    # Coming back out of the task, it must end there (as leaving the task
    # asked), not answer in the worker's place or go on reading its tasks.
    with bystander(pool, tmp_path):
        future = pool.submit(tasks.fork_whose_child_leaves_the_task, how)
        assert resolves_within(future, PROMPTLY) is None
        worker, child_code, expected = future.result()
        assert worker in pool.worker_pids()
        assert child_code == expected
        # The worker goes on, alone on its pipes: no impostor runs a task.
        ran_in = {pool.submit(os.getpid).result(TIMEOUT) for _ in range(6)}
        assert ran_in <= set(pool.worker_pids()), (ran_in, pool.worker_pids())
    serves_then_shuts_down(pool)


@pytest.mark.parametrize("how", ["return", "exit"])
def test_a_process_forked_while_a_result_is_pickled_never_answers(
    pool: duckpool.ProcessPoolExecutor, how: str
) -> None:
    for _ in range(2):
        future = pool.submit(tasks.result_that_forks_when_pickled, how)
        assert future.result(TIMEOUT) == "from the worker"
    ran_in = {pool.submit(os.getpid).result(TIMEOUT) for _ in range(6)}
    assert ran_in <= set(pool.worker_pids()), (ran_in, pool.worker_pids())
    serves_then_shuts_down(pool)


@pytest.mark.parametrize("chunksize", [None, 5], ids=["automatic", "chunksize-5"])
@pytest.mark.parametrize("how", ["return", "exit"])
def test_a_process_a_map_call_forks_runs_none_of_the_chunk_s_other_calls(
    ctx: Any, tmp_path: Path, how: str, chunksize: Any
) -> None:
    # Every call of the map runs once, in the worker; the forked child stops
    # where its call ends.
    log = tmp_path / f"calls-{how}"
    with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        calls = functools.partial(tasks.log_pid_and_fork_on_zero, str(log))
        extra = {} if chunksize is None else {"chunksize": chunksize}
        assert list(pool.map(calls, range(5), timeout=TIMEOUT, **extra)) == [0, 1, 2, 3, 4]
        (worker,) = pool.worker_pids()
    ran = [line.split() for line in log.read_text().splitlines()]
    assert sorted(int(x) for _, x in ran) == [0, 1, 2, 3, 4], ran
    assert {int(pid) for pid, _ in ran} == {worker}, ran


def test_a_process_the_initializer_forks_never_serves_tasks(ctx: Any) -> None:
    with duckpool.ProcessPoolExecutor(
        1, mp_context=ctx, initializer=tasks.init_fork_whose_child_returns
    ) as pool:
        ran_in = {pool.submit(os.getpid).result(TIMEOUT) for _ in range(8)}
        assert ran_in == set(pool.worker_pids()), (ran_in, pool.worker_pids())


@pytest.mark.parametrize("short", [False, True], ids=["other-task", "short-frame"])
def test_an_answer_out_of_turn_costs_its_worker_not_the_pool(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path, short: bool
) -> None:
    # A frame for a task the worker is not running (or no answer at all)
    # breaks only the trust in that worker's pipe: it is killed, its task
    # fails, the pool goes on.
    with bystander(pool, tmp_path):
        error = resolves_within(pool.submit(tasks.answer_out_of_turn, short), PROMPTLY)
    assert isinstance(error, duckpool.WorkerDiedError), repr(error)
    expected = "a frame of 3 bytes" if short else "answered task 987654321"
    assert expected in str(error)
    serves_then_shuts_down(pool)


@pytest.mark.parametrize("size", [1 << 20, 2**31 - 2, 2**60], ids=["1MiB", "2GiB", "2**60"])
def test_a_frame_announced_by_a_task_costs_its_worker_not_the_pool(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path, size: int
) -> None:
    # The worker's real answer arrives as the start of the announced frame:
    # judged by that head, the frame is no answer of the worker's, and it is
    # killed before the pool asks for a buffer of that size.  Before, the
    # future (and shutdown) waited for ever, having zero-filled 2 GiB in the
    # pool's process; 2**60 broke the whole pool with a MemoryError.
    with bystander(pool, tmp_path):
        future = pool.submit(tasks.announce_a_frame_then_return, size)
        error = resolves_within(future, PROMPTLY)
    assert isinstance(error, duckpool.WorkerDiedError), repr(error)
    assert "it began an answer for task" in str(error)
    serves_then_shuts_down(pool)


def test_a_task_that_reads_its_worker_s_task_pipe_costs_no_other_task(
    ctx: Any, tmp_path: Path, short_graces: None
) -> None:
    # What is left in the pipe no longer parses as the frames sent (or the
    # next frame is gone whole): the worker waits for bytes that never come,
    # with the next chunk not taken up.  Found so at two looks 2 s apart
    # (here 0.05 s: short_graces), it is killed, and that chunk and those
    # behind it run on its replacement.  Before, they (and shutdown) waited
    # for ever.  One worker, and a map chunk is always sent behind the chunk
    # it runs: the second map's first chunk goes to its pipe while the first
    # map's chunk steals from it.
    # Four bytes: that frame's length header (1 byte, or the whole frame,
    # ends the same way, checked by hand: the watch is the same).
    count = 4
    started = tmp_path / "started"
    pool = duckpool.ProcessPoolExecutor(1, mp_context=ctx)
    try:
        # (Once the pool has mapped the worker's buffer area, its next write
        # says so in a frame of its own: written by now, not stolen below.)
        assert [pool.submit(tasks.add, 1, 2).result(TIMEOUT) for _ in range(3)] == [3] * 3
        steal = tasks.steal_from_the_task_pipe_then_return
        first = pool.map(steal, range(2), [count] * 2, [str(started)] * 2, chunksize=2)
        wait_until(started.exists, TIMEOUT)
        second = pool.map(steal, range(2, 8), [count] * 6, [str(started)] * 6, chunksize=2)
        assert list_within(first, TIMEOUT) == [0, 1]
        assert list_within(second, TIMEOUT) == list(range(2, 8))
        serves_then_shuts_down(pool)
    finally:
        pool.shutdown(cancel_futures=True, timeout=TIMEOUT)


def test_a_process_forked_while_the_arguments_are_unpickled_never_runs_the_task(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path
) -> None:
    log = tmp_path / "ran"
    future = pool.submit(tasks.note_argument, str(log), tasks.ForksWhenUnpickled())
    assert future.result(TIMEOUT) == "parent-unpickled"
    serves_then_shuts_down(pool)
    assert log.read_text().split() == ["parent-unpickled"]


def test_an_error_that_can_be_neither_pickled_nor_shown_fails_only_its_task(
    pool: duckpool.ProcessPoolExecutor, tmp_path: Path
) -> None:
    with bystander(pool, tmp_path):
        wait_until(lambda: len(pool.worker_pids()) == 2, TIMEOUT)
        before = set(pool.worker_pids())
        error = resolves_within(pool.submit(tasks.raise_an_unshowable_unpicklable_error), PROMPTLY)
        assert type(error) is RuntimeError, repr(error)
        assert "_UnshowableError" in str(error) and "could not be pickled" in str(error)
        assert set(pool.worker_pids()) == before  # no worker died of it
    serves_then_shuts_down(pool)
