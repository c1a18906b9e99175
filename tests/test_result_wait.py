"""A thread blocked in ``result()`` reads its worker's answer itself.

On a quiet pool the waiting thread takes over the result pipe of the worker
running its task (``PoolCore.help_resolve``).  These tests pin down what that
must never change: every future resolves, with its own result or a clear
error, whatever happens to the worker or to the waiting thread meanwhile.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

import _executor_tasks as tasks
import duckpool
from conftest import needs_epoll, process_gone, run_in_forked_child, run_script, wait_until
from duckpool import _buffers, _futures
from duckpool._pool import _assist, _results, _transport
from duckpool._pool._waiter import Waiter

TIMEOUT = 30


@needs_epoll  # (only the epoll waiter can lend a pipe to the caller)
def test_a_waiting_thread_resolves_a_quiet_pools_future_itself(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    executor.submit(tasks.add, 0, 0).result(TIMEOUT)  # workers up
    caller = threading.current_thread()
    resolved_here = 0
    for i in range(200):
        future = executor.submit(tasks.add, i, 1)
        if future.done():
            continue  # the dispatcher was first: this round tells nothing
        threads: list[threading.Thread] = []
        future.add_done_callback(lambda _, t=threads: t.append(threading.current_thread()))
        assert future.result(TIMEOUT) == i + 1
        wait_until(lambda t=threads: bool(t), TIMEOUT)
        resolved_here += threads[0] is caller
        if resolved_here >= 3:
            break
    assert resolved_here >= 3


def test_a_worker_death_under_a_waiting_thread_fails_only_its_task(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    executor.submit(tasks.add, 0, 0).result(TIMEOUT)
    for _ in range(3):
        with pytest.raises(duckpool.WorkerDiedError, match="exited with code 5"):
            executor.submit(tasks.exit_now, 5).result(TIMEOUT)
        assert executor.submit(tasks.add, 2, 3).result(TIMEOUT) == 5


def test_a_short_result_timeout_expires_and_the_task_still_resolves(
    executor: duckpool.ProcessPoolExecutor, tmp_path: Path
) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    future = executor.submit(tasks.touch_then_wait, str(started), str(gate))
    wait_until(started.exists, TIMEOUT)
    with pytest.raises(concurrent.futures.TimeoutError):
        future.result(timeout=0.001)
    with pytest.raises(concurrent.futures.TimeoutError):
        future.exception(timeout=0.02)
    gate.touch()
    assert future.result(TIMEOUT) == "released"
    assert future.exception(TIMEOUT) is None


def test_many_waiting_threads_each_get_their_own_results(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    errors: list[str] = []

    def client(offset: int) -> None:
        for i in range(150):
            value = executor.submit(tasks.add, offset, i).result(TIMEOUT)
            if value != offset + i:
                errors.append(f"client {offset}: {value} != {offset + i}")

    threads = [threading.Thread(target=client, args=(1000 * n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert errors == []


class _Interrupt(Exception):
    """Raised asynchronously in a waiting thread, as a signal handler would."""


def _raise_in(thread: threading.Thread) -> None:
    assert thread.ident is not None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(_Interrupt)
    )


# An injected exception that lands in a finalizer is reported by Python as
# "Exception ignored": expected here, not a failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "interruptions", [15, pytest.param(300, marks=pytest.mark.soak)], ids=["15", "300"]
)
def test_an_interrupted_waiting_thread_loses_no_future_and_gets_no_wrong_result(
    executor: duckpool.ProcessPoolExecutor, interruptions: int
) -> None:
    """Asynchronous exceptions (Ctrl-C) may strike while the waiting thread
    reads the pipe: each future still ends with its own value or a clear error."""
    futures: list[tuple[int, concurrent.futures.Future[int]]] = []
    interrupted = threading.Event()
    stop = threading.Event()
    rounds = {"n": 0}

    def client() -> None:
        i = 0
        while not stop.is_set():
            try:
                while not stop.is_set():
                    future = executor.submit(tasks.add, i, 1)
                    futures.append((i, future))
                    future.result(TIMEOUT)
                    i += 1
                    rounds["n"] += 1
            except _Interrupt:
                interrupted.set()
            except duckpool.WorkerDiedError:
                pass

    thread = threading.Thread(target=client)
    thread.start()
    try:
        for _ in range(interruptions):
            interrupted.clear()
            before = rounds["n"]
            wait_until(lambda b=before: rounds["n"] > b + 20, TIMEOUT)
            _raise_in(thread)
            # (An exception that strikes inside a garbage-collection callback
            # is printed and dropped by Python: then the client just goes on.)
            after = rounds["n"]
            wait_until(lambda a=after: interrupted.is_set() or rounds["n"] > a + 20, TIMEOUT)
    finally:
        stop.set()
        thread.join(TIMEOUT)
    assert not thread.is_alive()
    for i, future in futures:
        try:
            assert future.result(TIMEOUT) == i + 1
        except duckpool.WorkerDiedError as exc:
            assert "interrupted" in str(exc)
            assert isinstance(exc.__cause__, _Interrupt)
    assert executor.submit(tasks.add, 1, 1).result(TIMEOUT) == 2


@contextlib.contextmanager
def _raised_at(code: types.CodeType, event: str) -> Iterator[list[str]]:
    """Raise ``_Interrupt`` in this thread once, on entry to ``code`` (event
    ``"call"``) or as it returns (``"return"``): where an asynchronous
    exception is raised, at a function's first instruction or after a call.
    Yields a list that says whether it was raised."""
    fired: list[str] = []

    def tracer(frame: types.FrameType, what: str, arg: Any) -> Optional[Any]:
        if frame.f_code is not code or fired:
            return None
        if what == event:
            fired.append(what)
            raise _Interrupt
        return tracer  # (to see the frame return)

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield fired
    finally:
        sys.settrace(previous)


#: Where, in a thread reading its own result (help_resolve), an exception
#: raised asynchronously once lost a future or a worker's results for good.
_HELPING_STEPS = {
    "pausing-the-pipe": (Waiter.pause.__code__, "return"),
    "unpickling-the-result": (_buffers.loads.__code__, "call"),
    "setting-the-future": (_futures.PoolFuture.set_result.__code__, "call"),
    "resolving-what-it-read": (_results.ResultBook.resolve_helped.__code__, "call"),
    "giving-the-pipe-back": (_assist.Assists.end_assist.__code__, "call"),
}


@needs_epoll
@pytest.mark.parametrize("step", list(_HELPING_STEPS))
def test_an_exception_raised_in_a_helping_thread_at_any_step_loses_nothing(
    executor: duckpool.ProcessPoolExecutor, step: str
) -> None:
    code, event = _HELPING_STEPS[step]
    executor.submit(tasks.add, 0, 0).result(TIMEOUT)  # workers up
    interrupted = 0
    for i in range(300):
        future = executor.submit(tasks.add, i, 1)
        with _raised_at(code, event) as fired:
            try:
                future.result(TIMEOUT)
            except _Interrupt:
                pass
        if not fired:
            continue  # the dispatcher read the result: this round tells nothing
        interrupted += 1
        # The future still gets its own result, from the dispatcher if need be.
        assert future.result(TIMEOUT) == i + 1
        # Both workers' results are read again: by a thread waiting for its
        # own (reading the pipe itself, or not)...
        for k in range(3):
            assert executor.submit(tasks.add, k, 1).result(TIMEOUT) == k + 1
        # ...and by the dispatcher alone.
        more = [executor.submit(tasks.add, k, 2) for k in range(4)]
        done, _ = concurrent.futures.wait(more, TIMEOUT)
        assert [f.result(0) for f in more] == [2, 3, 4, 5] and len(done) == 4
        if interrupted >= 2:
            break
    assert interrupted >= 2


def test_an_exception_raised_in_submit_as_it_pickles_the_call_is_raised_there(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    # Not taken for the call's pickling error, which the future would carry.
    executor.submit(tasks.add, 0, 0).result(TIMEOUT)
    with _raised_at(_buffers.dumps.__code__, "call") as fired, pytest.raises(_Interrupt):
        executor.submit(tasks.add, 1, 1)
    assert fired
    assert executor.submit(tasks.add, 1, 1).result(TIMEOUT) == 2


def test_an_exception_raised_in_submit_as_it_sends_the_task_leaves_no_worker_waiting(
    executor: duckpool.ProcessPoolExecutor, tmp_path: Path, gate: Path
) -> None:
    """The task went to an idle worker, maybe not all of its frame: that
    worker must not wait for the rest for ever, its slot lost to the pool."""
    executor.submit(tasks.add, 0, 0).result(TIMEOUT)
    with (
        _raised_at(_transport.Transport.write.__code__, "call") as fired,
        pytest.raises(_Interrupt),
    ):
        executor.submit(tasks.add, 1, 1)
    assert fired
    # Both workers take tasks: two that block both start.
    started = [tmp_path / f"started-{n}" for n in range(2)]
    running = [executor.submit(tasks.touch_then_wait, str(path), str(gate)) for path in started]
    wait_until(lambda: all(path.exists() for path in started), TIMEOUT)
    gate.touch()
    assert [f.result(TIMEOUT) for f in running] == ["released", "released"]


def test_poisoned_slot_fails_the_started_task_and_requeues_the_rest(
    ctx: object, tmp_path: Path
) -> None:
    """The recovery an interrupted read triggers, driven directly."""
    pool = duckpool.ProcessPoolExecutor(1, mp_context=ctx)  # type: ignore[arg-type]
    try:
        gate, started = tmp_path / "gate", tmp_path / "started"
        running = pool.submit(tasks.touch_then_wait, str(started), str(gate))
        wait_until(started.exists, TIMEOUT)
        queued = [pool.submit(tasks.add, i, 1) for i in range(3)]
        core = pool._core
        cause = KeyboardInterrupt()
        core.assists.poison(core.slots[0], cause)
        with pytest.raises(duckpool.WorkerDiedError, match="interrupted") as info:
            running.result(TIMEOUT)
        assert info.value.__cause__ is cause
        assert [f.result(TIMEOUT) for f in queued] == [1, 2, 3]
    finally:
        pool.shutdown(cancel_futures=True, timeout=TIMEOUT)  # bounded, even if a test hung


def test_a_pool_future_has_every_field_of_a_standard_future() -> None:
    from concurrent.futures import Future

    from duckpool import _futures

    pool = duckpool.ProcessPoolExecutor(1)
    try:
        future = _futures.PoolFuture(pool._core)
        standard = Future()  # type: ignore[var-annotated]
        assert set(vars(standard)) - {"_condition"} <= set(vars(future))
        assert {k: v for k, v in vars(standard).items() if k != "_condition"} == {
            k: vars(future)[k] for k in vars(standard) if k != "_condition"
        }
        assert isinstance(future._condition, type(standard._condition))
        assert future._condition is future._condition
    finally:
        pool.shutdown()


def test_a_queued_future_makes_no_condition_until_used(
    ctx: object, tmp_path: Path, gate: Path
) -> None:
    pool = duckpool.ProcessPoolExecutor(1, mp_context=ctx)  # type: ignore[arg-type]
    try:
        started = tmp_path / "started"
        running = pool.submit(tasks.touch_then_wait, str(started), str(gate))
        wait_until(started.exists, TIMEOUT)
        queued = [pool.submit(tasks.add, i, 1) for i in range(5)]
        assert all("_lazy_condition" not in vars(f) for f in queued)
        waiters = [threading.Thread(target=queued[0].result, args=(TIMEOUT,)) for _ in range(4)]
        for waiter in waiters:
            waiter.start()
        gate.touch()
        for waiter in waiters:
            waiter.join(TIMEOUT)
            assert not waiter.is_alive()
        assert running.result(TIMEOUT) == "released"
        assert [f.result(TIMEOUT) for f in queued] == [1, 2, 3, 4, 5]
        done, _ = concurrent.futures.wait(queued, TIMEOUT)
        assert done == set(queued)
    finally:
        pool.shutdown(cancel_futures=True, timeout=TIMEOUT)


@needs_epoll  # (the caller reads the pipe itself: without, it sleeps on a condition)
def test_a_future_nobody_waits_on_makes_no_condition(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    # Sent, run and resolved, and its result read by a caller that never had
    # to sleep on it (it read the pipe itself, or came once it was there).
    executor.submit(tasks.add, 0, 0).result(TIMEOUT)
    without = 0
    for i in range(50):
        future = executor.submit(tasks.add, i, 1)
        assert future.result(TIMEOUT) == i + 1
        assert future.exception(0) is None and future.done()
        without += "_lazy_condition" not in vars(future)
        assert not future.running() and not future.cancelled()
    assert without > 0
    # A future that failed raises its error from result(), as any future does.
    failing = executor.submit(tasks.raise_key_error, "k")
    with pytest.raises(KeyError):
        failing.result(TIMEOUT)
    assert isinstance(failing.exception(0), KeyError)


MAP_COLLECTED_WHILE_A_CONDITION_IS_MADE = """
import gc, multiprocessing, sys, time, duckpool
from duckpool import _futures

pool = duckpool.ProcessPoolExecutor(1, multiprocessing.get_context(sys.argv[1]))
results = pool.map(time.sleep, [0] + [0.2] * 10, chunksize=1)
next(results)  # its generator runs: closing it cancels what is left
cycle = [results, pool]
cycle.append(cycle)  # only the collector frees it
del results, cycle
gc.disable()
with _futures._LAZY_CONDITION_LOCK:  # as while a future's condition is made
    gc.collect()
pool.shutdown(cancel_futures=True)
print("resolved")
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_an_abandoned_map_collected_while_a_condition_is_made_loses_nothing(
    method: str,
) -> None:
    # The collector runs finalizers in whatever thread allocates: here the
    # map's, which cancels its futures, in a thread making a condition under
    # the lock that orders the two.
    assert run_script(MAP_COLLECTED_WHILE_A_CONDITION_IS_MADE, method).split() == ["resolved"]


def test_a_forked_child_may_resolve_futures_whatever_the_parent_held() -> None:
    # The lock ordering a future's condition with the pool's moves is
    # module-wide, and taken by every dispatcher: a fork while another
    # thread holds it must not leave the child's copy locked.
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _futures._LAZY_CONDITION_LOCK:
            held.set()
            release.wait(TIMEOUT)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(TIMEOUT)

        def in_child() -> int:
            future: _futures.PoolFuture[int] = _futures.PoolFuture(None)  # type: ignore[arg-type]
            future.set_result(3)
            return future.result(0)

        assert run_in_forked_child(in_child, timeout=15) == 3
    finally:
        release.set()
        holder.join(TIMEOUT)


@needs_epoll  # (only the epoll waiter can lend a pipe to the caller)
def test_a_done_callback_run_by_a_waiting_thread_may_wait_on_the_same_worker(
    ctx: object,
) -> None:
    # The thread blocked in result() reads the pipe itself, and resolves what
    # it read: the future's done-callbacks run in it.  One that submits to
    # the same worker and waits for that result needs the pipe read again:
    # the waiting thread gives it back before it resolves anything.  (If the
    # dispatcher read the result first, the callback runs there, and waiting
    # there raises at once: the next test.)
    pool = duckpool.ProcessPoolExecutor(1, mp_context=ctx)  # type: ignore[arg-type]
    try:
        pool.submit(tasks.add, 0, 0).result(TIMEOUT)  # the worker is up
        chained: list[tuple[bool, object]] = []
        waiter = threading.current_thread()

        def submit_and_wait(_: object) -> None:
            here = threading.current_thread() is waiter
            try:
                chained.append((here, pool.submit(tasks.add, 1, 1).result(TIMEOUT)))
            except BaseException as exc:
                chained.append((here, exc))

        deadline = time.monotonic() + TIMEOUT
        while not any(here for here, _ in chained) and time.monotonic() < deadline:
            count = len(chained)
            future = pool.submit(tasks.sleep_then, 0.002, "first")
            future.add_done_callback(submit_and_wait)
            assert future.result(TIMEOUT) == "first"
            wait_until(lambda n=count + 1: len(chained) == n, TIMEOUT)
        in_waiter = [value for here, value in chained if here]
        assert in_waiter, f"no callback ran in the waiting thread: {chained}"
        assert in_waiter == [2] * len(in_waiter)
        for here, value in chained:
            if not here:
                assert isinstance(value, RuntimeError) and "dispatcher" in str(value)
    finally:
        pool.shutdown()


def test_waiting_on_the_pool_in_its_dispatcher_thread_raises_at_once(
    ctx: object, tmp_path: Path
) -> None:
    # A done-callback the dispatcher runs (it read the result: nobody waited)
    # that waits on a new future of the same pool would stall every future of
    # it: the stdlib's pool deadlocks there.  It raises instead, and the pool
    # goes on.  A future already done, or of another pool, is fine there.
    pool = duckpool.ProcessPoolExecutor(1, mp_context=ctx)  # type: ignore[arg-type]
    other = duckpool.ProcessPoolExecutor(1, mp_context=ctx)  # type: ignore[arg-type]
    try:
        done_before = pool.submit(tasks.add, 0, 0)
        done_before.result(TIMEOUT)
        seen: list[object] = []
        ran = threading.Event()

        def wait_in_callback(_: object) -> None:
            try:
                seen.append(threading.current_thread().name)
                seen.append(done_before.result(0))
                seen.append(other.submit(tasks.add, 2, 2).result(TIMEOUT))
                started = time.monotonic()
                try:
                    pool.submit(tasks.add, 1, 1).result()  # no timeout: forever
                except RuntimeError as exc:
                    seen.append((str(exc), time.monotonic() - started))
            finally:
                ran.set()

        gate = tmp_path / "gate"
        future = pool.submit(tasks.wait_for_file, str(gate))
        future.add_done_callback(wait_in_callback)  # (pending: the task waits for the gate)
        gate.touch()
        assert ran.wait(TIMEOUT)
        assert future.result(TIMEOUT) == "released"
        thread, already, elsewhere, (message, waited) = seen  # type: ignore[misc]
        assert thread != threading.current_thread().name
        assert (already, elsewhere) == (0, 4)
        assert "dispatcher thread" in message and waited < 5
        assert pool.submit(tasks.add, 5, 5).result(TIMEOUT) == 10  # the pool goes on
    finally:
        pool.shutdown()
        other.shutdown()


def test_shutdown_waiting_in_the_dispatcher_thread_raises_and_the_pool_still_shuts_down(
    ctx: object, tmp_path: Path
) -> None:
    # A done-callback the dispatcher runs cannot wait for the shutdown that
    # thread carries out: shutdown(wait=True) there used to return at once,
    # with the workers still running.  It raises, as the stdlib's does, once
    # the shutdown is requested; the shutdown then completes.
    pool = duckpool.ProcessPoolExecutor(1, mp_context=ctx)  # type: ignore[arg-type]
    try:
        seen: list[str] = []
        ran = threading.Event()

        def shut_down_in_callback(_: object) -> None:
            try:
                pool.shutdown(wait=True)
            except RuntimeError as exc:
                seen.append(str(exc))
            finally:
                ran.set()

        assert pool.submit(tasks.add, 0, 0).result(TIMEOUT) == 0
        pids = pool.worker_pids()
        assert pids
        gate = tmp_path / "gate"
        future = pool.submit(tasks.wait_for_file, str(gate))
        future.add_done_callback(shut_down_in_callback)  # (pending: the task waits for the gate)
        gate.touch()
        assert ran.wait(TIMEOUT)
        assert seen and "own dispatcher thread" in seen[0], seen
        with pytest.raises(RuntimeError):
            pool.submit(tasks.add, 1, 1)  # the shutdown was requested
        pool.shutdown(wait=True)
        assert all(process_gone(pid) for pid in pids)
    finally:
        pool.shutdown()


def test_a_future_whose_lock_a_thread_left_held_does_not_stall_the_pool(
    ctx: object, tmp_path: Path
) -> None:
    # Ctrl-C may strike a thread just as it took a future's lock (``with``,
    # Condition.wait) and leave it held for good.  The dispatcher, resolving
    # that future, used to block on it for ever, and every future of the pool
    # with it; it now leaves that one to a thread of its own and goes on.
    pool = duckpool.ProcessPoolExecutor(1, mp_context=ctx)  # type: ignore[arg-type]
    held, release = threading.Event(), threading.Event()
    try:
        gate = tmp_path / "gate"
        stuck = pool.submit(tasks.wait_for_file, str(gate))

        def hold_its_lock() -> None:
            with stuck._condition:  # (as an interrupted waiter leaves it)
                held.set()
                release.wait(TIMEOUT)

        holder = threading.Thread(target=hold_its_lock, daemon=True)
        holder.start()
        assert held.wait(TIMEOUT)
        gate.touch()
        assert pool.submit(tasks.add, 2, 3).result(TIMEOUT) == 5  # the pool goes on
        assert not stuck.done()
        release.set()
        assert stuck.result(TIMEOUT) == "released"
    finally:
        release.set()
        pool.shutdown()


def test_results_a_helper_hands_over_once_the_dispatcher_has_ended_still_resolve(
    ctx: object,
) -> None:
    # A thread helping with a result books it (the item leaves its worker),
    # then hands the resolution to the dispatcher, which may just have seen
    # no work left and ended: the helper resolves it itself then.  (Found as
    # a future left running for ever, about one run in a hundred, when a
    # collected executor shut down as its caller helped with a result.)
    import pickle

    from duckpool import _protocol

    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
    core = pool._core
    pool.shutdown(wait=True)
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    future.set_running_or_notify_cancel()
    item = _futures.WorkItem(future, 1 << 40, b"", tasks.add, None)
    payload = memoryview(pickle.dumps(3))
    core.results.hand_over([(item, _protocol.STATUS_OK, payload)])
    assert future.result(0) == 3
