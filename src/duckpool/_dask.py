"""duckpool.DaskExecutor: duckpool's executor interface on a Dask cluster.

``distributed`` is imported only when an executor is created, so ``import
duckpool`` stays light and works without the ``dask`` extra.  Who owns what,
and where each future is resolved::

    caller thread                 client loop thread ("IO loop",    scheduler, workers
                                  owned by distributed.Client)
    ---------------------------   ------------------------------    -----------------------
    submit(fn, *args)
      client.submit(pure=False, ---------------------------------->  runs fn on a worker; a
        resources={type: 1})                                          typed task only where
      _tasks[key] = _Task                                             the type is offered
      as_completed.add() ------> _track_future: waits for the key,
                                 gathers its result or error  <----  result / error /
                                 -> as_completed's queue             KilledWorker (worker died)

    bridge thread "duckpool-dask-bridge": next(as_completed) -> _resolve(), which pops
    _tasks[key] and settles the caller's future:
        finished   -> set_result(value)
        error      -> set_exception(the task's own exception type, remote traceback
                      attached); KilledWorker -> WorkerDiedError (cause: KilledWorker)
        cancelled  -> cancel()
    timer thread "duckpool-dask-timeouts" (started by the first task with a timeout):
        deadline passed -> set_exception(TaskTimeoutError); the Dask task is cancelled
    Future.cancel() / cancel_task() in any thread -> the Dask task is cancelled
    shutdown(): refuse new work; cancel_futures -> cancel every unresolved future;
        wait until the bridge has settled every future a caller still waits for;
        forget the tasks Dask never reported (cancelled or timed out already); stop
        both threads; close the Client and the LocalCluster if this executor created
        them; any future still unresolved is cancelled.  wait=False does the same in
        a "duckpool-dask-closer" thread.
    submit() of a call Dask cannot serialize -> a future failed with PicklingError.
    interpreter exit (duckpool's exit hook, _process_pools, before concurrent.futures
        stops the thread pools a Client needs) -> submit() raises; then
        shutdown(wait=True), or for a daemon executor shutdown(cancel_futures=True).
    drain_all(timeout) -> shutdown(wait=False); past the timeout, shutdown(cancel_futures=True).

A settled future is never settled again: whichever path comes first wins (the
``InvalidStateError`` of the losers is swallowed), and the bridge still pops the
task when Dask reports it, so ``_tasks`` holds only what Dask has not reported.
Cancelling is best-effort: the scheduler forgets the task, but Dask cannot stop
code already running on a worker.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import os
import pickle
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

from duckpool import _process_pools, _worker
from duckpool._errors import InheritedManagerError, TaskTimeoutError, WorkerDiedError
from duckpool._map import chunk_calls, map_results, progress_bar_factory
from duckpool._options import TaskOptions
from duckpool._validate import (
    check_chunksize,
    check_cluster_arguments,
    check_offered_task_types,
    check_positive_int,
    check_task_callable,
    check_task_type,
    check_timeout,
    default_max_workers,
)

__all__ = ["DaskExecutor"]

_T = TypeVar("_T")

_INSTALL_HINT = 'the Dask backend needs the "distributed" package: pip install "duckpool[dask]"'

# Applied to the scheduler of every LocalCluster this module starts.  No retry
# of a task whose worker died (Dask's default is 3, each costing a worker), and
# no task queued on a worker beyond its one thread, so a dying worker takes only
# the task it was running with it.
_CLUSTER_CONFIG = {
    "distributed.scheduler.allowed-failures": 0,
    "distributed.scheduler.worker-saturation": 1.0,
}

# How long the bridge waits for a failed task's exception when Dask's report
# lacked it (the client is going away).
_REPORT_TIMEOUT_S = 5.0

logger = logging.getLogger("duckpool")


def _import_distributed() -> Any:
    """``distributed``, or an ImportError saying how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return distributed


def _callable_label(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return f"{name}()" if name else repr(fn)


@dataclass
class _Task:
    """One submitted call: the caller's future and the Dask future behind it."""

    future: Future[Any]
    dask_future: Any
    label: str
    timeout: Optional[float]
    as_list: bool = False  # a map() call of chunksize 1: deliver [value]


class DaskExecutor(Executor):
    """A :class:`concurrent.futures.Executor` whose tasks run on a Dask cluster.

    The same interface and failure semantics as :class:`duckpool.ProcessPoolExecutor`
    where Dask can give them: ``submit`` returns a ``concurrent.futures.Future``;
    a task's exception arrives as its own type; a task whose worker dies fails
    with :class:`~duckpool.WorkerDiedError` and the executor goes on; a task
    past its timeout fails with :class:`~duckpool.TaskTimeoutError`; on
    ``shutdown`` every outstanding future resolves.

    Args:
        max_workers: worker processes of the LocalCluster started when
            ``address`` is None (default: the CPUs this process may use);
            ignored for an existing cluster, whose size is its own.
        address: None to start a ``distributed.LocalCluster`` of worker
            processes (one thread each, on 127.0.0.1, no dashboard); a
            scheduler address (``"tcp://host:8786"``); or a connected,
            synchronous ``distributed.Client``.
        task_types: the task types the started LocalCluster's workers offer
            (each worker gets the Dask resource ``{type: 1}``); only with
            ``address=None``.  Workers of an existing cluster offer what they
            were started with (``dask worker --resources "render=1"``).
        task_timeout: default seconds a task may take, counted from ``submit``
            (so waiting for a free worker counts); ``None``: no limit.
        cluster_options: extra keyword arguments for the LocalCluster (they
            override duckpool's defaults); only with ``address=None``.
        daemon: if true, interpreter exit cancels the submitted tasks
            (best-effort) instead of waiting for them; by default it waits for
            them and closes what the executor created, as ``shutdown(wait=True)``
            does, whether or not ``shutdown`` was called.

    ``shutdown`` closes only what the executor created: the LocalCluster and
    the Client it started, or the Client it opened to ``address``; a Client
    passed in is left open.

    Best-effort, because Dask cannot do better: a timeout or a cancel makes the
    scheduler forget the task, but code already running on a worker runs on
    until it returns (on the LocalCluster, shutdown ends it).  A worker's
    death fails its task only once the scheduler gives up on it: at once on
    the LocalCluster (``allowed-failures`` 0), after the scheduler's retries
    on an existing cluster.  A typed task waits until a worker offering its
    type exists.  A result Dask cannot serialize stays on its worker (Dask
    logs it), so only a timeout or a cancel resolves that task's future.
    """

    def __init__(
        self,
        max_workers: Optional[int] = None,
        address: Any = None,
        *,
        task_types: Optional[Iterable[str]] = None,
        task_timeout: Optional[float] = None,
        cluster_options: Optional[Mapping[str, Any]] = None,
        daemon: bool = False,
    ) -> None:
        workers = check_positive_int("max_workers", max_workers)
        self._task_timeout = check_timeout("task_timeout", task_timeout)
        types = check_offered_task_types(task_types)
        check_cluster_arguments(address, types, cluster_options)
        distributed = _import_distributed()
        self._owner_pid = os.getpid()
        self._cluster: Any = None
        self._owns_client = True
        if address is None:
            self._max_workers: Optional[int] = workers or default_max_workers()
            self._cluster = _start_local_cluster(
                distributed, self._max_workers, types, dict(cluster_options or {})
            )
            try:
                self._client = distributed.Client(self._cluster, set_as_default=False)
            except BaseException:
                self._cluster.close()
                raise
        elif isinstance(address, str):
            self._max_workers = None
            self._client = distributed.Client(address, set_as_default=False)
        elif isinstance(address, distributed.Client):
            if address.asynchronous:
                raise ValueError(
                    "an asynchronous distributed.Client cannot back a DaskExecutor; "
                    "pass a synchronous Client or its scheduler address"
                )
            self._max_workers = None
            self._client = address
            self._owns_client = False
        else:
            raise TypeError(
                "address must be None, a scheduler address string or a distributed.Client, "
                f"got {address!r}"
            )
        self._killed_worker: type[BaseException] = distributed.KilledWorker
        self._task_types = types
        self._daemon = bool(daemon)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # _tasks or the state changed
        self._tasks: dict[Any, _Task] = {}
        self._shutdown = False
        self._closing = False  # the bridge may stop once _tasks is empty
        self._client_closed = False  # the bridge stops now
        self._closed = threading.Event()
        self._closer: Optional[threading.Thread] = None
        self._timer: Optional[_TimeoutTimer] = None
        self._bulk = threading.local()  # .cancelling: shutdown cancels Dask tasks in one call
        self._completed = distributed.as_completed(
            loop=self._client.loop, with_results=True, raise_errors=False
        )
        self._bridge = threading.Thread(
            target=self._bridge_loop, name="duckpool-dask-bridge", daemon=True
        )
        self._bridge.start()
        self._live = _LivePool(self)
        _process_pools.LIVE_POOLS.add(self._live, needs_thread_pools=True)

    # -- properties -----------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` the tasks go through."""
        return self._client

    @property
    def cluster(self) -> Any:
        """The LocalCluster this executor started, or None for an existing cluster."""
        return self._cluster

    @property
    def max_workers(self) -> Optional[int]:
        """The started LocalCluster's worker count; None for an existing cluster."""
        return self._max_workers

    @property
    def task_timeout(self) -> Optional[float]:
        """The default per-task timeout in seconds (None: no limit)."""
        return self._task_timeout

    @property
    def scheduler_address(self) -> Optional[str]:
        """The scheduler's address, e.g. ``"tcp://127.0.0.1:40193"``."""
        return getattr(self._client.scheduler, "address", None)

    # -- submitting ----------------------------------------------------------------

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        """Schedule ``fn(*args, **kwargs)`` on the cluster and return its future.

        Any worker may run it (no resource constraint); the executor's
        ``task_timeout`` applies; :meth:`options` sets a task type or another
        timeout.  Raises ``RuntimeError`` after shutdown and once interpreter
        shutdown has begun (the main thread has finished), and ``TypeError``
        if ``fn`` is not callable.  The future fails with the task's own
        exception, :class:`~duckpool.WorkerDiedError` if its worker died,
        :class:`~duckpool.TaskTimeoutError` past its timeout, and is cancelled
        if shutdown(cancel_futures=True) comes first.
        """
        return self._submit(fn, args, kwargs, self._task_timeout, None)

    def options(
        self, *, task_type: Optional[str] = None, timeout: Optional[float] = None
    ) -> TaskOptions:
        """Submit with per-task options, leaving the task's own keywords alone.

        ``executor.options(task_type="render", timeout=5).submit(fn, x)`` runs
        ``fn(x)`` only on a worker offering the Dask resource ``render`` and
        fails it with :class:`~duckpool.TaskTimeoutError` after 5 seconds.
        ``timeout=None`` means no limit, whatever the executor's default.
        """
        kind = check_task_type(task_type)
        return TaskOptions(self, check_timeout("timeout", timeout), kind)

    async def run(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """Run ``fn(*args, **kwargs)`` on the cluster and await its result (asyncio).

        Cancelling the awaiting task cancels the Dask task (best-effort: code
        already running on a worker is not stopped).
        """
        return await self._await(self.submit(fn, *args, **kwargs))

    async def _await(self, future: Future[_T]) -> _T:
        import asyncio

        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.cancel_task(future)
            raise

    def cancel_task(self, future: Future[Any]) -> bool:
        """Cancel a task whose result has not arrived, running or not.

        The future is cancelled (``CancelledError``) and the scheduler forgets
        the task; Dask cannot stop code already running on a worker.  Returns
        False if the future is already done.
        """
        return future.cancel()

    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: Optional[float],
        task_type: Optional[str],
        as_list: bool = False,
    ) -> Future[Any]:
        check_task_callable(fn)
        self._check_owner()
        _process_pools.raise_if_exiting()
        # The task's keywords go in a partial, so that one named like a
        # client.submit option (key, priority, resources...) reaches the task.
        call = functools.partial(fn, **kwargs) if kwargs else fn
        resources = None if task_type is None else {task_type: 1}
        future: Future[Any] = Future()
        label = _callable_label(fn)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            try:
                dask_future = self._client.submit(call, *args, pure=False, resources=resources)
            except (TypeError, pickle.PicklingError) as exc:
                # Dask serializes the call in submit(); as on the local backend,
                # a call that cannot be sent gives a future that has failed.
                error = pickle.PicklingError(f"cannot send {label} to a Dask worker: {exc}")
                error.__cause__ = exc
                future.set_exception(error)
                return future
            task = _Task(future, dask_future, label, timeout, as_list)
            self._tasks[dask_future.key] = task
            self._completed.add(dask_future)
            self._changed.notify_all()
        future.add_done_callback(functools.partial(self._on_caller_done, task))
        if timeout is not None:
            self._timeouts().add(time.monotonic() + timeout, task)
        return future

    def _on_caller_done(self, task: _Task, future: Future[Any]) -> None:
        """A future was cancelled by its caller: have Dask forget the task too."""
        if future.cancelled() and not getattr(self._bulk, "cancelling", False):
            self._cancel_dask([task])
        if self._shutdown:  # a close may be waiting for this future
            with self._lock:
                self._changed.notify_all()

    def _cancel_dask(self, tasks: list[_Task]) -> None:
        pending = [t.dask_future for t in tasks if not t.dask_future.done()]
        if not pending or self._client_closed:
            return
        try:
            self._client.cancel(pending)
        except Exception:  # the client is closing or lost: its tasks go with it
            pass

    def _timeouts(self) -> _TimeoutTimer:
        with self._lock:
            if self._timer is None:
                self._timer = _TimeoutTimer(self._expire)
            return self._timer

    def _expire(self, task: _Task) -> None:
        """The timer thread: ``task`` is past its deadline."""
        error = TaskTimeoutError(
            f"{task.label} did not finish within {task.timeout:g} s; its Dask task was "
            "cancelled (code already running on a worker is not stopped)"
        )
        if _settle(task.future, error=error):
            self._cancel_dask([task])

    # -- map -----------------------------------------------------------------------

    def map(  # type: ignore[override]
        self,
        fn: Callable[..., _T],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: int = 1,
        buffersize: Optional[int] = None,
        progress: Any = None,
    ) -> Iterator[_T]:
        """Like :func:`map`, computed on the cluster; results come in input order.

        ``chunksize`` sends that many calls per Dask task (above 1, the workers
        need duckpool installed, as the LocalCluster's have).  ``buffersize``
        bounds how many tasks are in flight ahead of the result being yielded,
        so an endless iterable is mapped lazily; ``None`` submits every call
        at once, as the standard library does.  Raises ``TimeoutError`` if a
        result is not ready ``timeout`` seconds after the call; a call that
        raised re-raises when its result is reached; closing the iterator
        early cancels the calls still in flight.  ``progress`` shows a
        ``tqdm`` bar, as :meth:`ProcessPoolExecutor.map` does.
        """
        return self._map(
            fn, iterables, timeout, chunksize, buffersize, self._task_timeout, None, progress
        )

    def _map(
        self,
        fn: Callable[..., _T],
        iterables: tuple[Iterable[Any], ...],
        timeout: Optional[float],
        chunksize: Optional[int],
        buffersize: Optional[int],
        task_timeout: Optional[float],
        task_type: Optional[str],
        progress: Any = None,
    ) -> Iterator[_T]:
        # None (as options().map passes it): one call per Dask task.
        size = check_chunksize(chunksize) or 1
        check_positive_int("buffersize", buffersize)
        make_bar = progress_bar_factory(progress, iterables)
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks = chunk_calls(iterables, size, read_now=buffersize is None)
        run_chunk = functools.partial(_worker.run_chunk, fn)

        def submit_chunk(chunk: _worker.Columns) -> Future[list[_T]]:
            if len(chunk[0]) == 1:  # fn itself: the workers need nothing from duckpool
                args = tuple(column[0] for column in chunk)
                return self._submit(fn, args, {}, task_timeout, task_type, as_list=True)
            return self._submit(run_chunk, (chunk,), {}, task_timeout, task_type)

        return map_results(chunks, buffersize, submit_chunk, deadline, make_bar)

    # -- the bridge ----------------------------------------------------------------

    def _bridge_loop(self) -> None:
        """Settle each caller's future as Dask reports its task (see the module diagram)."""
        completed = self._completed
        while True:
            with self._lock:
                while not self._tasks and not self._closing and not self._client_closed:
                    self._changed.wait()
                if self._client_closed or (
                    self._closing and (not self._tasks or completed.is_empty())
                ):
                    return
            try:
                dask_future, value = next(completed)
            except StopIteration:  # everything reported, or cleared at close
                continue
            try:
                self._resolve(dask_future, value)
            except Exception:  # never let one report stop the bridge (close waits on it)
                logger.exception(
                    "duckpool: settling the future of Dask task %s failed", dask_future.key
                )

    def _resolve(self, dask_future: Any, value: Any) -> None:
        with self._lock:
            task = self._tasks.pop(dask_future.key, None)
            self._changed.notify_all()
        if task is None:
            return
        status = dask_future.status
        if status == "finished":
            _settle(task.future, result=[value] if task.as_list else value)
        elif status == "error":
            _settle(task.future, error=self._task_error(task, dask_future, value))
        else:  # cancelled (by us, the scheduler, or a closing client) or lost
            task.future.cancel()

    def _task_error(self, task: _Task, dask_future: Any, value: Any) -> BaseException:
        """The exception a failed task's future gets."""
        # as_completed(raise_errors=False) gives (type, exception, traceback).
        if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], BaseException):
            error: BaseException = value[1].with_traceback(value[2])
        elif isinstance(value, BaseException):
            error = value
        else:
            try:
                error = dask_future.exception(timeout=_REPORT_TIMEOUT_S)
            except Exception as exc:  # the client went away meanwhile
                error = exc
        if isinstance(error, self._killed_worker):
            # KilledWorker's own text is a paragraph; keep the worker's address.
            worker = getattr(getattr(error, "last_worker", None), "address", None)
            where = f" ({worker})" if worker else ""
            died = WorkerDiedError(
                f"the Dask worker{where} running {task.label} died before returning its "
                "result; the scheduler gave up on the task (distributed.KilledWorker)"
            )
            died.__cause__ = error
            return died
        return error

    # -- stopping ------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work, then close the Client and cluster this executor created.

        ``wait=True`` returns once every submitted task has been reported and
        the Client (and the LocalCluster, whose worker processes exit with it)
        is closed.  ``wait=False`` returns at once; submitted tasks still run
        and their futures still resolve, and the closing happens in a
        background thread once they have.  ``cancel_futures=True`` cancels
        every future whose result has not arrived (Dask forgets those tasks;
        code already running is not stopped, but a LocalCluster's workers end
        with the cluster).  Either way no future is left pending once the
        Client is closed.  A task no worker can run (its type offered by no
        worker) keeps ``wait=True`` waiting: use ``cancel_futures`` or a
        timeout.  Calling it again is harmless.
        """
        if self._owner_pid != os.getpid():
            return
        with self._lock:
            first = not self._shutdown
            self._shutdown = True
            to_cancel = list(self._tasks.values()) if cancel_futures else []
        if to_cancel:
            self._bulk.cancelling = True
            try:
                cancelled = [t for t in to_cancel if t.future.cancel()]
            finally:
                self._bulk.cancelling = False
            self._cancel_dask(cancelled)
        if first:
            if wait:
                self._close()
                return
            self._closer = threading.Thread(
                target=self._close, name="duckpool-dask-closer", daemon=self._daemon
            )
            self._closer.start()
        if wait:
            self._closed.wait()

    def _close(self) -> None:
        try:
            with self._lock:
                # Only the futures a caller still waits for hold the close up: a
                # cancelled or timed-out task may never be reported (its result
                # stuck on a worker), and nobody waits for it.
                while any(not task.future.done() for task in self._tasks.values()):
                    self._changed.wait()
                self._closing = True
                self._changed.notify_all()
                timer = self._timer
            # Forget the unreported rest, so that the bridge's next() returns.
            self._completed.clear()
            self._bridge.join()
            if timer is not None:
                timer.stop()
            self._close_client()
        finally:
            self._closed.set()
            _process_pools.LIVE_POOLS.discard(self._live)

    def _close_client(self) -> None:
        try:
            if self._owns_client:
                self._client.close()
            if self._cluster is not None:
                self._cluster.close()
        finally:
            with self._lock:
                self._client_closed = True
                leftovers = list(self._tasks.values())
                self._tasks.clear()
                self._changed.notify_all()
            self._completed.clear()
            for task in leftovers:
                task.future.cancel()

    def _check_owner(self) -> None:
        if self._owner_pid != os.getpid():
            raise InheritedManagerError(
                f"this DaskExecutor belongs to process {self._owner_pid}; process "
                f"{os.getpid()} inherited a copy by fork and cannot use it"
            )

    def __repr__(self) -> str:
        if self._closed.is_set():
            state = "closed"
        elif self._shutdown:
            state = "shutting down"
        else:
            state = "running"
        where = "LocalCluster" if self._cluster is not None else "cluster"
        return (
            f"<duckpool.DaskExecutor {state} {where} {self.scheduler_address} "
            f"max_workers={self._max_workers} task_types={list(self._task_types)!r}>"
        )


class _LivePool:
    """A DaskExecutor as the process-wide hooks see it (``_process_pools.LivePool``).

    A separate object, so that the executor's own surface stays the
    ``concurrent.futures`` one.  Every call returns at once unless it says
    it waits; ``shutdown`` does nothing in a process that does not own the
    executor.
    """

    __slots__ = ("__weakref__", "_executor")  # held weakly by the registry

    def __init__(self, executor: DaskExecutor) -> None:
        self._executor = executor

    @property
    def owner_pid(self) -> int:
        return self._executor._owner_pid

    def request_shutdown(self, cancel_futures: bool) -> None:
        """Refuse new work; the close waits for the futures in a thread of its own."""
        self._executor.shutdown(wait=False, cancel_futures=cancel_futures)

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait until every future has resolved and what the executor created is closed."""
        self._executor._closed.wait(timeout)

    def request_kill(self, signum: int, reason: Optional[str] = None) -> None:
        """Cancel every future still outstanding (the scheduler forgets its task).

        Dask cannot signal code running on a worker, so ``signum`` goes
        unused, and a cancelled future carries no ``reason``.
        """
        self._executor.shutdown(wait=False, cancel_futures=True)

    def forget_after_fork(self) -> None:
        """Nothing to forget: each entry point checks the owner's pid before any lock."""

    def shutdown_at_exit(self, interrupted: bool) -> None:
        """Wait for the submitted tasks, or cancel a daemon executor's (best-effort).

        Only ``daemon`` decides, as the executor's docstring says; ``interrupted``
        is not consulted.
        """
        if self._executor._daemon:
            self._executor.shutdown(wait=False, cancel_futures=True)
        else:
            self._executor.shutdown(wait=True)


class _TimeoutTimer:
    """One thread that fails tasks past their deadline, earliest first."""

    def __init__(self, expire: Callable[[_Task], None]) -> None:
        self._expire = expire
        self._heap: list[tuple[float, int, _Task]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(
            target=self._run, name="duckpool-dask-timeouts", daemon=True
        )
        self._thread.start()

    def add(self, deadline: float, task: _Task) -> None:
        with self._changed:
            heapq.heappush(self._heap, (deadline, next(self._order), task))
            if self._heap[0][2] is task:
                self._changed.notify()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._stopped:
                    # Settled tasks leave the heap here, not when they settle.
                    while self._heap and self._heap[0][2].future.done():
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._changed.wait()
                        continue
                    left = self._heap[0][0] - time.monotonic()
                    if left <= 0:
                        break
                    self._changed.wait(left)
                if self._stopped:
                    return
                _, _, task = heapq.heappop(self._heap)
            self._expire(task)


def _settle(
    future: Future[Any], *, result: Any = None, error: Optional[BaseException] = None
) -> bool:
    """Resolve ``future`` unless it already is; True if this call resolved it."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled, timed out or resolved first
        return False
    return True


def _start_local_cluster(
    distributed: Any, workers: int, task_types: tuple[str, ...], options: dict[str, Any]
) -> Any:
    """A LocalCluster of ``workers`` single-threaded worker processes on 127.0.0.1."""
    import dask

    settings: dict[str, Any] = {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        # No dashboard, and the scheduler's HTTP endpoint (it always has one) on
        # a free loopback port: with None it would try 8787 first and warn if taken.
        "dashboard_address": "127.0.0.1:0",
        "scheduler_kwargs": {"dashboard": False},
        "silence_logs": logging.CRITICAL,  # a killed worker is reported through its future
    }
    if task_types:
        settings["resources"] = {task_type: 1 for task_type in task_types}
    settings.update(options)
    with dask.config.set(_CLUSTER_CONFIG):
        return distributed.LocalCluster(**settings)
