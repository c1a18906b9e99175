"""duckpool.DaskExecutor: duckpool's executor interface on a Dask cluster.

``distributed`` is imported only when an executor is created, so ``import
duckpool`` stays light and works without the ``dask`` extra.  This module is
the public surface; the machinery is in ``_dask_bridge``.  Who owns what:

    DaskExecutor ... its settings; checks arguments, hands each call over
    DaskBridge ..... the Client and the LocalCluster it made, the tasks Dask
                     has not reported (DaskBridge.tasks, by key), the bridge
                     and closer threads; the pool the exit hook and drain_all
                     reach (a _process_pools LivePool)
    TimeoutTimer ... the deadlines of the tasks given a timeout

Where each future is resolved::

    caller thread                 client loop thread ("IO loop",    scheduler, workers
                                  owned by distributed.Client)
    ---------------------------   ------------------------------    -----------------------
    submit(fn, *args) -> DaskBridge.submit:
      client.submit(pure=False, ---------------------------------->  runs fn on a worker; a
        resources={type: 1})                                          typed task only where
      tasks[key] = Task                                               the type is offered
      as_completed.add() ------> _track_future: waits for the key,
                                 gathers its result or error  <----  result / error /
                                 -> as_completed's queue             KilledWorker (worker died)

    bridge thread "duckpool-dask-bridge" (DaskBridge.run): next(as_completed) ->
    DaskBridge.resolve, which pops tasks[key] and settles the caller's future:
        finished   -> set_result(value)
        error      -> set_exception(the task's own exception type, remote traceback
                      attached); KilledWorker -> WorkerDiedError (cause: KilledWorker)
        cancelled  -> cancel()
    timer thread "duckpool-dask-timeouts" (a TimeoutTimer, started by the first task
        with a timeout): deadline passed -> set_exception(TaskTimeoutError); the Dask
        task is cancelled
    cancel() of a caller's future, or cancel_task(), in any thread -> the Dask task is
        cancelled (DaskBridge._on_caller_done)
    shutdown() -> DaskBridge.shutdown: refuse new work; cancel_futures -> cancel every
        unresolved future; wait until the bridge has settled every future a caller
        still waits for; forget the tasks Dask never reported (cancelled or timed out
        already); stop both threads; close the Client and the LocalCluster if the
        bridge created them; any future still unresolved is cancelled.  wait=False
        does the same in a "duckpool-dask-closer" thread.
    submit() of a call Dask cannot serialize -> a future failed with PicklingError.
    interpreter exit (duckpool's exit hook, _process_pools, before concurrent.futures
        stops the thread pools a Client needs) -> submit() raises; then
        DaskBridge.shutdown_at_exit: shutdown(wait=True), or for a daemon executor
        shutdown(cancel_futures=True).
    drain_all(timeout) -> DaskBridge.request_shutdown (shutdown(wait=False)); past the
        timeout, DaskBridge.request_kill (shutdown(cancel_futures=True)).

A settled future is never settled again: whichever path comes first wins (the
``InvalidStateError`` of the losers is swallowed), and the bridge still pops the
task when Dask reports it, so ``tasks`` holds only what Dask has not reported.
Cancelling is best-effort: the scheduler forgets the task, but Dask cannot stop
code already running on a worker.  The bridge's threads keep it alive until it
is closed, so the exit hook reaches it even once nothing holds the executor.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future
from typing import Any, Callable, Optional, TypeVar

from duckpool import _chunks, _context, _process_pools, _tracing
from duckpool._dask_bridge import DaskBridge
from duckpool._errors import InheritedManagerError
from duckpool._futures import UNSET
from duckpool._map import chunk_calls, map_deadline, map_results, progress_bar_factory
from duckpool._options import TaskOptions, await_cancelling
from duckpool._validate import (
    check_buffersize,
    check_chunksize,
    check_cluster_arguments,
    check_offered_task_types,
    check_ordered,
    check_positive_int,
    check_priority,
    check_retries,
    check_task_callable,
    check_task_type,
    check_timeout,
    default_max_workers,
)

__all__ = ["DaskExecutor"]

_T = TypeVar("_T")


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
        self._max_workers = (workers or default_max_workers()) if address is None else None
        self._task_types = types
        self._bridge = DaskBridge(
            address, self._max_workers, types, dict(cluster_options or {}), bool(daemon)
        )

    # -- properties -----------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` the tasks go through."""
        return self._bridge.client

    @property
    def cluster(self) -> Any:
        """The LocalCluster this executor started, or None for an existing cluster."""
        return self._bridge.cluster

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
        return getattr(self._bridge.client.scheduler, "address", None)

    # -- submitting ----------------------------------------------------------------

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        """Schedule ``fn(*args, **kwargs)`` on the cluster and return its future.

        Any worker may run it (no resource constraint); the executor's
        ``task_timeout`` applies; :meth:`options` sets a task type or another
        timeout.  Raises ``RuntimeError`` after shutdown and once interpreter
        shutdown has begun (the main thread has finished), ``TypeError``
        if ``fn`` is not callable, and :class:`~duckpool.InheritedManagerError`
        in a forked child.  A call Dask cannot serialize gives a future that
        has already failed with a ``PicklingError``.  The future fails with
        the task's own exception, :class:`~duckpool.WorkerDiedError` if its
        worker died, :class:`~duckpool.TaskTimeoutError` past its timeout, and
        is cancelled if shutdown(cancel_futures=True) comes first; a shutdown
        without ``cancel_futures`` lets it finish.
        """
        return self._submit(fn, args, kwargs, self._task_timeout, None)

    def options(
        self,
        *,
        task_type: Optional[str] = None,
        timeout: Any = UNSET,
        priority: int = 0,
        retries: int = 0,
        context_vars: Any = None,
        trace: Optional[bool] = None,
    ) -> TaskOptions:
        """Submit with per-task options, leaving the task's own keywords alone.

        Returns a ``TaskOptions`` whose ``submit``, ``run`` and ``map`` take
        the arguments of the executor's own and raise what they raise.
        ``executor.options(task_type="render", timeout=5).submit(fn, x)`` runs
        ``fn(x)`` only on a worker offering the Dask resource ``render`` and
        fails it with :class:`~duckpool.TaskTimeoutError` after 5 seconds.
        ``timeout=None`` means no limit, whatever the executor's default;
        left out, the executor's ``task_timeout`` applies (as on a local
        pool).
        ``priority`` is Dask's own: a higher one is scheduled first.
        ``context_vars`` carries context variables, and ``trace=True`` gives
        each task a span, as on the local pool (the Dask workers need
        duckpool installed, as the LocalCluster's have).

        Raises ``ValueError`` for ``retries`` above 0: Dask's own retries
        also re-run a task that raised, which duckpool's never do, so
        they are not offered here (Dask reschedules a task whose worker died
        by itself, up to the scheduler's ``allowed-failures``).  Raises
        ``TypeError`` for an argument of the wrong type, ``ValueError`` for a
        timeout not above 0 or a negative ``retries``, and ``ImportError``
        for ``trace=True`` without OpenTelemetry.  The futures of its tasks
        resolve as :meth:`submit`'s do (a worker's death, a timeout, a
        shutdown).
        """
        kind = check_task_type(task_type)
        if check_retries(retries):
            raise ValueError(
                "retries are not supported on the Dask backend: Dask would re-run a "
                "task that raised, not only one whose worker died (see its "
                "allowed-failures setting)"
            )
        variables = _context.check_context_vars(context_vars)
        located = None if variables is None else _context.located(variables)
        return TaskOptions(
            self,
            self._task_timeout if timeout is UNSET else check_timeout("timeout", timeout),
            kind,
            check_priority(priority),
            0,
            located,
            None if trace is None else _tracing.check_trace(trace),
        )

    async def run(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """Run ``fn(*args, **kwargs)`` on the cluster and await its result (asyncio).

        Returns what ``fn`` returns; the exception it raises is raised here.
        Raises what :meth:`submit` raises, with nothing submitted, and from the
        ``await`` its future's error if its worker dies
        (:class:`~duckpool.WorkerDiedError`), it overruns its timeout
        (:class:`~duckpool.TaskTimeoutError`) or a shutdown cancels it
        (``CancelledError``).  Cancelling the awaiting task cancels the Dask
        task (best-effort: code already running on a worker is not stopped).
        """
        return await await_cancelling(self, self.submit(fn, *args, **kwargs))

    def cancel_task(self, future: Future[Any]) -> bool:
        """Cancel a task whose result has not arrived, running or not.

        The future is cancelled (``CancelledError``) and the scheduler forgets
        the task; Dask cannot stop code already running on a worker.  Returns
        what ``future.cancel()`` returns: False if the future already has its
        result or error (a worker's death or a timeout came first), else
        True.  Nothing is checked: it cancels whatever future it is given.
        """
        return future.cancel()

    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: Optional[float],
        task_type: Optional[str],
        *,
        as_list: bool = False,
        priority: int = 0,
        retries: int = 0,
        context: Any = None,
        trace: Optional[bool] = None,
    ) -> Future[Any]:
        check_task_callable(fn)
        self._check_owner()
        _process_pools.raise_if_exiting()
        assert not retries  # refused by options()
        if context:
            fn = _context.bind(fn, context)
        bridge = self._bridge
        if trace:  # the task's span, from here to its future's resolution
            return _tracing.submit_traced(
                fn,
                None,
                lambda call, _: bridge.submit(
                    call, args, kwargs, task_type, timeout, as_list, priority
                ),
            )
        return bridge.submit(fn, args, kwargs, task_type, timeout, as_list, priority)

    # -- map -----------------------------------------------------------------------

    def map(  # type: ignore[override]
        self,
        fn: Callable[..., _T],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: int = 1,
        buffersize: Optional[int] = None,
        progress: Any = None,
        ordered: bool = True,
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
        ``tqdm`` bar, as :meth:`ProcessPoolExecutor.map` does; ``ordered=False``
        yields results as their tasks finish, as it does too.

        Returns an iterator over the results (a ``MapResults``, which has
        ``close()``).  Raises ``ValueError`` for a ``chunksize`` other than
        None or an int >= 1, ``TypeError`` or ``ValueError`` for a bad
        ``buffersize``, ``TypeError`` for an ``ordered`` that is not a bool,
        a bad ``progress`` or an input that is not iterable, ``ImportError``
        for ``progress`` without ``tqdm``, and what :meth:`submit` raises
        (after shutdown, say) as it submits.  A task whose worker died, that
        overran its timeout or that a shutdown cancelled raises
        :class:`~duckpool.WorkerDiedError`, :class:`~duckpool.TaskTimeoutError`
        or ``CancelledError`` where its results would come.
        """
        return self._map(
            fn,
            iterables,
            timeout,
            chunksize,
            buffersize,
            self._task_timeout,
            None,
            progress,
            ordered=ordered,
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
        *,
        ordered: bool = True,
        priority: int = 0,
        retries: int = 0,
        context: Any = None,
        trace: Optional[bool] = None,
    ) -> Iterator[_T]:
        # None (as options().map passes it): one call per Dask task.
        check_task_callable(fn, "map()")
        size = check_chunksize(chunksize) or 1
        check_buffersize(buffersize)
        check_ordered(ordered)
        deadline = map_deadline(timeout)
        make_bar = progress_bar_factory(progress, iterables)
        chunks = chunk_calls(iterables, size, read_now=buffersize is None)
        run_chunk = functools.partial(_chunks.run_chunk, fn)

        def submit_chunk(chunk: _chunks.Columns) -> Future[list[_T]]:
            if len(chunk[0]) == 1:  # fn itself: the workers need nothing from duckpool
                args = tuple(column[0] for column in chunk)
                return self._submit(
                    fn,
                    args,
                    {},
                    task_timeout,
                    task_type,
                    as_list=True,
                    priority=priority,
                    context=context,
                    trace=trace,
                )
            return self._submit(
                run_chunk,
                (chunk,),
                {},
                task_timeout,
                task_type,
                priority=priority,
                context=context,
                trace=trace,
            )

        return map_results(chunks, buffersize, submit_chunk, deadline, make_bar, ordered=ordered)

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
        worker) keeps ``wait=True`` waiting: use ``cancel_futures=True``, or a
        task timeout (``task_timeout``, ``options(timeout=...)``), or
        ``duckpool.drain_all(timeout)``.  Called in a done-callback, which runs
        in a thread of the executor's own that the close waits for, it does
        not wait (as ``wait=False``).  Calling it again is harmless, and in a
        process that inherited the executor by fork it does nothing.
        """
        self._bridge.shutdown(wait, cancel_futures)

    def _check_owner(self) -> None:
        owner = self._bridge.owner_pid
        if owner != os.getpid():
            raise InheritedManagerError(
                f"this DaskExecutor belongs to process {owner}; process "
                f"{os.getpid()} inherited a copy by fork and cannot use it"
            )

    def __repr__(self) -> str:
        where = "LocalCluster" if self._bridge.cluster is not None else "cluster"
        return (
            f"<duckpool.DaskExecutor {self._bridge.state()} {where} {self.scheduler_address} "
            f"max_workers={self._max_workers} task_types={list(self._task_types)!r}>"
        )
