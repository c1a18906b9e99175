"""The machinery behind a ``DaskExecutor``: ``DaskBridge``, and what it runs.

``_dask`` holds the public surface and draws who owns what; this module is
the rest.  ``DaskBridge`` connects (a LocalCluster it starts, a scheduler
address, or a Client passed in), submits each call to the Client, and runs
the threads that settle the callers' futures: the bridge thread, which maps
what Dask reports (a result, the task's own exception, ``KilledWorker`` as
:class:`~duckpool.WorkerDiedError`), the ``TimeoutTimer`` and the closer.
It is also the pool ``_process_pools``' hooks see at exit and in
``drain_all``.

``distributed`` is imported only when a bridge is made (``_import_distributed``).
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
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Callable, Optional

from duckpool import _process_pools
from duckpool._errors import TaskTimeoutError, WorkerDiedError

__all__ = ["DaskBridge", "Task", "TimeoutTimer"]

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


class DaskFuture(Future[Any]):
    """The future of a task on a Dask cluster: a plain ``concurrent.futures``
    future, which says plainly that it carries no progress."""

    @property
    def progress(self) -> None:
        """Always None: Dask has no channel for ``duckpool.report_progress``,
        which does nothing in a Dask task."""
        return None

    def add_progress_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        """Refused: no progress update ever comes from a Dask task."""
        raise NotImplementedError(
            "progress updates are not carried on the Dask backend: report_progress "
            "does nothing in a Dask task; use a local pool (backend='local') for them"
        )

    def progress_updates(self) -> Any:
        """Refused, as ``add_progress_callback`` is."""
        self.add_progress_callback(lambda future: None)


def _callable_label(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return f"{name}()" if name else repr(fn)


@dataclass
class Task:
    """One submitted call: the caller's future and the Dask future behind it."""

    future: Future[Any]
    dask_future: Any
    label: str
    timeout: Optional[float]
    as_list: bool = False  # a map() call of chunksize 1: deliver [value]


class DaskBridge:
    """A ``DaskExecutor``'s cluster connection and the tasks Dask has not reported.

    Owns the Client and the LocalCluster it made (and closes only those),
    ``tasks`` (by Dask key, under ``lock``), the bridge thread, the
    ``TimeoutTimer`` and the closer thread.  It is the pool the process-wide
    hooks see (a ``_process_pools.LivePool``): its bridge thread keeps it
    alive until it is closed, so the exit hook reaches it even once nothing
    holds the executor.
    """

    def __init__(
        self,
        address: Any,
        max_workers: Optional[int],
        task_types: tuple[str, ...],
        cluster_options: dict[str, Any],
        daemon: bool,
    ) -> None:
        """Connect: ``address`` None starts a LocalCluster of ``max_workers``."""
        distributed = _import_distributed()
        self.owner_pid = os.getpid()
        self.cluster: Any = None
        self._owns_client = True
        if address is None:
            assert max_workers is not None
            self.cluster = _start_local_cluster(
                distributed, max_workers, task_types, cluster_options
            )
            try:
                self.client = distributed.Client(self.cluster, set_as_default=False)
            except BaseException:
                self.cluster.close()
                raise
        elif isinstance(address, str):
            self.client = distributed.Client(address, set_as_default=False)
        elif isinstance(address, distributed.Client):
            if address.asynchronous:
                raise ValueError(
                    "an asynchronous distributed.Client cannot back a DaskExecutor; "
                    "pass a synchronous Client or its scheduler address"
                )
            self.client = address
            self._owns_client = False
        else:
            raise TypeError(
                "address must be None, a scheduler address string or a distributed.Client, "
                f"got {address!r}"
            )
        self._killed_worker: type[BaseException] = distributed.KilledWorker
        self._daemon = daemon
        # Reentrant: a finalizer the collector runs while this thread holds it
        # (an abandoned map's, cancelling its futures) notifies under it.
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)  # tasks or the state changed
        self.tasks: dict[Any, Task] = {}
        self.shutting_down = False
        self._closing = False  # the bridge may stop once tasks is empty
        self._client_closed = False  # the bridge stops now
        self.closed = threading.Event()
        self._closer: Optional[threading.Thread] = None
        #: The thread running ``_close`` (0: none yet).
        self._closing_thread = 0
        self._timer: Optional[TimeoutTimer] = None
        self._bulk = threading.local()  # .cancelling: shutdown cancels Dask tasks in one call
        self._completed = distributed.as_completed(
            loop=self.client.loop, with_results=True, raise_errors=False
        )
        self.thread = threading.Thread(target=self.run, name="duckpool-dask-bridge", daemon=True)
        self.thread.start()
        _process_pools.LIVE_POOLS.add(self, needs_thread_pools=True)

    # -- submitting (caller threads) ------------------------------------------------

    def submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        task_type: Optional[str],
        timeout: Optional[float],
        as_list: bool,
        priority: int = 0,
    ) -> Future[Any]:
        """Send ``fn(*args, **kwargs)`` to the cluster; the caller's future for it.

        Raises ``RuntimeError`` once shutdown has begun.  A call Dask cannot
        serialize gives a future that has already failed.
        """
        # The task's keywords go in a partial, so that one named like a
        # client.submit option (key, priority, resources...) reaches the task.
        call = functools.partial(fn, **kwargs) if kwargs else fn
        resources = None if task_type is None else {task_type: 1}
        future: Future[Any] = DaskFuture()
        label = _callable_label(fn)
        with self.lock:
            if self.shutting_down:
                raise RuntimeError("cannot schedule new futures after shutdown")
            try:
                dask_future = self.client.submit(
                    call, *args, pure=False, resources=resources, priority=priority
                )
            except (TypeError, pickle.PicklingError) as exc:
                # Dask serializes the call in submit(); as on the local backend,
                # a call that cannot be sent gives a future that has failed.
                error = pickle.PicklingError(f"cannot send {label} to a Dask worker: {exc}")
                error.__cause__ = exc
                future.set_exception(error)
                return future
            task = Task(future, dask_future, label, timeout, as_list)
            self.tasks[dask_future.key] = task
            self._completed.add(dask_future)
            self._changed.notify_all()
        future.add_done_callback(functools.partial(self._on_caller_done, task))
        if timeout is not None:
            self._timeouts().add(time.monotonic() + timeout, task)
        return future

    def _on_caller_done(self, task: Task, future: Future[Any]) -> None:
        """A future was cancelled by its caller: have Dask forget the task too."""
        if future.cancelled() and not getattr(self._bulk, "cancelling", False):
            self._cancel_dask([task])
        if self.shutting_down:  # a close may be waiting for this future
            with self.lock:
                self._changed.notify_all()

    def _cancel_dask(self, tasks: list[Task]) -> None:
        pending = [t.dask_future for t in tasks if not t.dask_future.done()]
        if not pending or self._client_closed:
            return
        try:
            self.client.cancel(pending)
        except Exception:  # the client is closing or lost: its tasks go with it
            pass

    def _timeouts(self) -> TimeoutTimer:
        with self.lock:
            if self._timer is None:
                self._timer = TimeoutTimer(self._expire)
            return self._timer

    def _expire(self, task: Task) -> None:
        """The timer thread: ``task`` is past its deadline."""
        error = TaskTimeoutError(
            f"{task.label} did not finish within {task.timeout:g} s; its Dask task was "
            "cancelled (code already running on a worker is not stopped)"
        )
        if _settle(task.future, error=error):
            self._cancel_dask([task])

    # -- the bridge thread ------------------------------------------------------------

    def run(self) -> None:
        """Settle each caller's future as Dask reports its task (see ``_dask``'s diagram)."""
        completed = self._completed
        while True:
            with self.lock:
                while not self.tasks and not self._closing and not self._client_closed:
                    self._changed.wait()
                if self._client_closed or (
                    self._closing and (not self.tasks or completed.is_empty())
                ):
                    return
            try:
                dask_future, value = next(completed)
            except StopIteration:  # everything reported, or cleared at close
                continue
            try:
                self.resolve(dask_future, value)
            except Exception:  # never let one report stop the bridge (close waits on it)
                logger.exception(
                    "duckpool: settling the future of Dask task %s failed", dask_future.key
                )

    def resolve(self, dask_future: Any, value: Any) -> None:
        """Pop the reported task and settle its caller's future, unless settled already."""
        with self.lock:
            task = self.tasks.pop(dask_future.key, None)
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

    def _task_error(self, task: Task, dask_future: Any, value: Any) -> BaseException:
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

    # -- stopping ---------------------------------------------------------------------

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        """``DaskExecutor.shutdown``: refuse new work, then close (see its docstring).

        Does nothing in a process that does not own the bridge.
        """
        if self.owner_pid != os.getpid():
            return
        if wait and self._resolves_futures():
            # A done-callback in a thread the close waits for (or runs in):
            # waiting there would wait for ever.  It closes in the background.
            wait = False
        with self.lock:
            first = not self.shutting_down
            self.shutting_down = True
            to_cancel = list(self.tasks.values()) if cancel_futures else []
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
            self.closed.wait()

    def _resolves_futures(self) -> bool:
        """Is this thread resolving this executor's futures (and so running
        their done-callbacks) for something the close waits for: the
        bridge's thread, the timeouts', the close's, or a ``shutdown`` that
        cancels them before it starts the close?"""
        current = threading.current_thread()
        timer = self._timer
        return (
            current is self.thread
            or (timer is not None and timer.runs_in(current))
            or self._closing_thread == threading.get_ident()
            or getattr(self._bulk, "cancelling", False)
        )

    def _close(self) -> None:
        self._closing_thread = threading.get_ident()
        try:
            with self.lock:
                # Only the futures a caller still waits for hold the close up: a
                # cancelled or timed-out task may never be reported (its result
                # stuck on a worker), and nobody waits for it.
                while any(not task.future.done() for task in self.tasks.values()):
                    self._changed.wait()
                self._closing = True
                self._changed.notify_all()
                timer = self._timer
            # Forget the unreported rest, so that the bridge's next() returns.
            self._completed.clear()
            self.thread.join()
            if timer is not None:
                timer.stop()
            self._close_client()
        finally:
            self.closed.set()
            _process_pools.LIVE_POOLS.discard(self)

    def _close_client(self) -> None:
        try:
            if self._owns_client:
                self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        finally:
            with self.lock:
                self._client_closed = True
                leftovers = list(self.tasks.values())
                self.tasks.clear()
                self._changed.notify_all()
            self._completed.clear()
            for task in leftovers:
                task.future.cancel()

    def state(self) -> str:
        """``"running"``, ``"shutting down"`` or ``"closed"``."""
        if self.closed.is_set():
            return "closed"
        return "shutting down" if self.shutting_down else "running"

    # -- as the process-wide hooks see it (_process_pools.LivePool) ------------------
    # Every call returns at once unless it says it waits.

    def request_shutdown(self, cancel_futures: bool) -> None:
        """Refuse new work; the close waits for the futures in a thread of its own."""
        self.shutdown(wait=False, cancel_futures=cancel_futures)

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait until every future has resolved and what the bridge made is
        closed; at once in a thread the close waits for (a done-callback)."""
        if not self._resolves_futures():
            self.closed.wait(timeout)

    def request_kill(self, signum: int, reason: Optional[str] = None) -> None:
        """Cancel every future still outstanding (the scheduler forgets its task).

        Dask cannot signal code running on a worker, so ``signum`` goes
        unused, and a cancelled future carries no ``reason``.
        """
        self.shutdown(wait=False, cancel_futures=True)

    def forget_after_fork(self) -> None:
        """Nothing to forget: each entry point checks the owner's pid before any lock."""

    def shutdown_at_exit(self, interrupted: bool) -> None:
        """Wait for the submitted tasks, or cancel a daemon executor's (best-effort).

        Only ``daemon`` decides, as the executor's docstring says; ``interrupted``
        is not consulted.
        """
        if self._daemon:
            self.shutdown(wait=False, cancel_futures=True)
        else:
            self.shutdown(wait=True, cancel_futures=False)


class TimeoutTimer:
    """One thread that fails tasks past their deadline, earliest first."""

    def __init__(self, expire: Callable[[Task], None]) -> None:
        self._expire = expire
        self._heap: list[tuple[float, int, Task]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(
            target=self._run, name="duckpool-dask-timeouts", daemon=True
        )
        self._thread.start()

    def add(self, deadline: float, task: Task) -> None:
        with self._changed:
            heapq.heappush(self._heap, (deadline, next(self._order), task))
            if self._heap[0][2] is task:
                self._changed.notify()

    def runs_in(self, thread: threading.Thread) -> bool:
        return thread is self._thread

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
