"""One pool of one library behind one interface: what a benchmark child opens and drives.

:class:`_PoolAdapter` holds the operations the metrics use (submit, wait, map,
a batch, a window of tasks in flight).  Each library has an
``_open_<name>(options) -> _PoolAdapter`` and a :class:`_Library` entry in
:data:`LIBRARIES` (a column of the table); the bare-Pipe floor has an adapter
of its own.  :class:`_PoolOpener` opens fresh pools for the metrics that open
their own, and :func:`_warm_up` readies a pool before a warm-pool metric.

All of it runs in the benchmark child, except :data:`LIBRARIES` and
:func:`_find_missing`, which the parent reads to plan the run.  The peers are
imported only where their pool is opened.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, cast

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

__all__ = ["LIBRARIES"]

#: The library every ratio is computed against.
_BASELINE = "stdlib"
_WARM_UP_ROUND = 50


class _BenchError(Exception):
    """A measurement could not be made (wrong result, workers never started)."""


class _NotApplicable(Exception):
    """The metric does not apply to this library (it lacks the feature); not a failure."""


def _remaining(deadline: float) -> float:
    """Seconds left before ``deadline`` (monotonic); raises once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the measurement's deadline passed")
    return left


_TaskFunction = Callable[..., Any]
# map(function, items, chunksize or None for the library's automatic choice, timeout)
_MapFunction = Callable[[_TaskFunction, list[Any], Optional[int], float], list[Any]]
_NotifyFunction = Callable[[_TaskFunction, tuple[Any, ...], Callable[[], None]], None]


@dataclass(frozen=True)
class _PoolOptions:
    """How to open a pool: what every library's ``_open_<name>`` receives."""

    workers: int
    start_method: Optional[str]  # None: the library's own default
    max_tasks_per_child: Optional[int] = None  # recycle each worker after that many tasks


class _PoolAdapter:
    """One library's pool, behind the operations the metrics use.

    ``submit`` returns the library's own handle (a future, an ``AsyncResult``);
    ``wait`` blocks on it until the deadline and returns the task's value or
    raises what the library raises (its timeout error past the deadline).
    ``map`` is the library's own map, or raises :class:`_NotApplicable` for a
    library without one.  ``worker_pids`` is filled in by :func:`_warm_up`.
    """

    def __init__(
        self,
        submit: Callable[[_TaskFunction, tuple[Any, ...]], Any],
        wait: Callable[[Any, float], Any],
        close: Callable[[], None],
        map_items: Optional[_MapFunction] = None,
        *,
        submit_notify: Optional[_NotifyFunction] = None,
        executor: Any = None,
    ) -> None:
        self._submit = submit
        self._wait = wait
        self._close = close
        self._map = map_items
        self._submit_notify = submit_notify
        #: The library's ``concurrent.futures.Executor``, if it is one (for
        #: ``loop.run_in_executor``), else None.
        self.executor = executor
        self._closed = False
        self.worker_pids: list[int] = []

    def submit(self, function: _TaskFunction, args: tuple[Any, ...]) -> Any:
        return self._submit(function, args)

    def submit_notify(
        self, function: _TaskFunction, args: tuple[Any, ...], done: Callable[[], None]
    ) -> None:
        """Submit, and have ``done()`` called (in any thread) once the task is over.

        Through the library's own notification: a future's done callback, or
        ``apply_async``'s callbacks.  :class:`_NotApplicable` for a library
        with neither.
        """
        if self._submit_notify is not None:
            self._submit_notify(function, args, done)
            return
        handle = self.submit(function, args)
        if not hasattr(handle, "add_done_callback"):
            raise _NotApplicable("no way to be told a task is done but waiting on it")
        handle.add_done_callback(lambda _: done())

    def wait(self, handle: Any, deadline: float) -> Any:
        return self._wait(handle, _remaining(deadline))

    def map(
        self, function: _TaskFunction, items: list[Any], chunksize: Optional[int], deadline: float
    ) -> list[Any]:
        """``function`` over ``items`` with the library's map; None: its automatic chunksize."""
        if self._map is None:
            raise _NotApplicable("no map()")
        return self._map(function, items, chunksize, _remaining(deadline))

    def run_batch(
        self,
        function: _TaskFunction,
        batch: Sequence[tuple[Any, ...]],
        deadline: float,
        in_flight_per_worker: int = 32,
    ) -> list[Any]:
        """Submit every task first, then wait for each result in submission order.

        ``in_flight_per_worker`` only limits the bare-Pipe floor, which has no
        queue of its own; the pools queue whatever they are given.
        """
        handles = [self.submit(function, args) for args in batch]
        return [self.wait(handle, deadline) for handle in handles]

    def run_windowed(
        self,
        function: _TaskFunction,
        batch: Sequence[tuple[Any, ...]],
        window: int,
        deadline: float,
    ) -> list[Any]:
        """Keep ``window`` tasks in flight: submit the next as soon as the oldest is done."""
        from collections import deque

        in_flight: deque[Any] = deque()
        results: list[Any] = []
        for args in batch:
            if len(in_flight) >= window:
                results.append(self.wait(in_flight.popleft(), deadline))
            in_flight.append(self.submit(function, args))
        while in_flight:
            results.append(self.wait(in_flight.popleft(), deadline))
        return results

    def close(self) -> None:
        """Shut the pool down gracefully: wait for its workers to exit.  Idempotent."""
        if not self._closed:
            self._closed = True
            self._close()


class _PipeFloorAdapter(_PoolAdapter):
    """The floor: one ``multiprocessing.Pipe`` per worker and nothing else.

    No futures, no queues, no threads: the parent sends ``(fn, args)`` on a
    worker's pipe and receives the value.  Tasks go round-robin; ``run_batch``
    keeps at most ``in_flight_per_worker`` tasks in flight per worker so that
    neither side ever blocks on a full pipe while the other does too.
    """

    def __init__(self, workers: int, start_method: Optional[str]) -> None:
        import duckpool._bench._tasks as _tasks

        context = _mp_context(start_method)
        self._connections: list[Connection] = []
        self._processes: list[BaseProcess] = []
        self._next = 0
        for _ in range(workers):
            parent_end, worker_end = context.Pipe(duplex=True)
            process = context.Process(
                target=_tasks.pipe_worker_loop, args=(worker_end,), daemon=True
            )
            process.start()
            worker_end.close()
            self._connections.append(parent_end)
            self._processes.append(process)
        super().__init__(self._send, self._receive, self._stop_workers)

    def _send(self, function: _TaskFunction, args: tuple[Any, ...]) -> Connection:
        connection = self._connections[self._next]
        self._next = (self._next + 1) % len(self._connections)
        connection.send((function, args))
        return connection

    @staticmethod
    def _receive(connection: Connection, timeout: float) -> Any:
        if not connection.poll(timeout):
            raise TimeoutError(f"no result from the pipe worker within {timeout:.1f} s")
        return connection.recv()

    def run_batch(
        self,
        function: _TaskFunction,
        batch: Sequence[tuple[Any, ...]],
        deadline: float,
        in_flight_per_worker: int = 32,
    ) -> list[Any]:
        from multiprocessing.connection import wait

        results: list[Any] = [None] * len(batch)
        # Per worker: indexes of the tasks sent and not yet answered, oldest first
        # (a pipe is FIFO, so the next value received answers the oldest one).
        in_flight: dict[Connection, list[int]] = {conn: [] for conn in self._connections}
        next_task = 0
        done = 0
        while done < len(batch):
            # Deal tasks one at a time round the workers, as a pool's queue would.
            sent = True
            while sent and next_task < len(batch):
                sent = False
                for connection, pending in in_flight.items():
                    if len(pending) < in_flight_per_worker and next_task < len(batch):
                        connection.send((function, batch[next_task]))
                        pending.append(next_task)
                        next_task += 1
                        sent = True
            busy = [conn for conn, pending in in_flight.items() if pending]
            ready = wait(busy, timeout=_remaining(deadline))
            for ready_connection in ready:
                connection = cast("Connection", ready_connection)
                while connection.poll():
                    results[in_flight[connection].pop(0)] = connection.recv()
                    done += 1
                    if not in_flight[connection]:
                        break
        return results

    def _stop_workers(self) -> None:
        for connection in self._connections:
            try:
                connection.send(None)
            except OSError:
                pass  # the worker is gone already; join() below reports nothing more
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                raise _BenchError(f"pipe worker {process.pid} did not exit on request")
        for connection in self._connections:
            connection.close()


def _mp_context(start_method: Optional[str]) -> Any:
    import multiprocessing

    return multiprocessing.get_context(start_method)


def _futures_adapter(executor: Any) -> _PoolAdapter:
    """Adapter for anything with the stdlib executor API (``submit`` -> Future, ``map``)."""

    def map_items(
        function: _TaskFunction, items: list[Any], chunksize: Optional[int], timeout: float
    ) -> list[Any]:
        if chunksize is None:  # what a caller who does not choose gets (1 for these three)
            return list(executor.map(function, items, timeout=timeout))
        return list(executor.map(function, items, timeout=timeout, chunksize=chunksize))

    return _PoolAdapter(
        submit=lambda function, args: executor.submit(function, *args),
        wait=lambda future, timeout: future.result(timeout=timeout),
        close=lambda: executor.shutdown(wait=True),
        map_items=map_items,
        executor=executor,
    )


def _open_duckpool(options: _PoolOptions) -> _PoolAdapter:
    from duckpool import ProcessPoolExecutor

    keywords: dict[str, Any] = {}
    if options.start_method is not None:
        keywords["mp_context"] = _mp_context(options.start_method)
    if options.max_tasks_per_child is not None:
        keywords["max_tasks_per_child"] = options.max_tasks_per_child
    return _futures_adapter(ProcessPoolExecutor(max_workers=options.workers, **keywords))


# max_tasks_per_child came in 3.11 (and is refused with the fork start method).
_STDLIB_RECYCLES = sys.version_info >= (3, 11)


def _open_stdlib(options: _PoolOptions) -> _PoolAdapter:
    from concurrent.futures import ProcessPoolExecutor

    keywords: dict[str, Any] = {}
    if options.start_method is not None:
        keywords["mp_context"] = _mp_context(options.start_method)
    if options.max_tasks_per_child is not None:
        if not _STDLIB_RECYCLES:
            raise _NotApplicable("max_tasks_per_child needs Python 3.11")
        keywords["max_tasks_per_child"] = options.max_tasks_per_child
    return _futures_adapter(ProcessPoolExecutor(max_workers=options.workers, **keywords))


def _open_mpool(options: _PoolOptions) -> _PoolAdapter:
    pool = _mp_context(options.start_method).Pool(
        processes=options.workers, maxtasksperchild=options.max_tasks_per_child
    )

    def close() -> None:
        pool.close()
        pool.join()

    def map_items(
        function: _TaskFunction, items: list[Any], chunksize: Optional[int], timeout: float
    ) -> list[Any]:
        # chunksize=None: Pool.map's own choice, about len(items) / (4 * workers).
        return list(pool.map_async(function, items, chunksize).get(timeout))

    def submit_notify(
        function: _TaskFunction, args: tuple[Any, ...], done: Callable[[], None]
    ) -> None:
        pool.apply_async(function, args, callback=lambda _: done(), error_callback=lambda _: done())

    return _PoolAdapter(
        submit=lambda function, args: pool.apply_async(function, args),
        wait=lambda result, timeout: result.get(timeout=timeout),
        close=close,
        map_items=map_items,
        submit_notify=submit_notify,
    )


def _open_loky(options: _PoolOptions) -> _PoolAdapter:
    if options.max_tasks_per_child is not None:
        raise _NotApplicable("loky.ProcessPoolExecutor has no max_tasks_per_child")
    # The peers are an optional extra: mypy may run where they are not installed.
    import loky  # type: ignore[import-untyped,import-not-found,unused-ignore]

    context = None
    if options.start_method is not None:
        from loky.backend.context import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
            get_context,
        )

        context = get_context(options.start_method)
    return _futures_adapter(loky.ProcessPoolExecutor(max_workers=options.workers, context=context))


def _open_deadpool(options: _PoolOptions) -> _PoolAdapter:
    # The peers are an optional extra: mypy may run where they are not installed.
    import deadpool  # type: ignore[import-untyped,import-not-found,unused-ignore]

    # Its default context is forkserver: given the start method, it uses that.
    return _futures_adapter(
        deadpool.Deadpool(
            max_workers=options.workers,
            mp_context=options.start_method,
            max_tasks_per_child=options.max_tasks_per_child,
        )
    )


def _open_pebble(options: _PoolOptions) -> _PoolAdapter:
    import pebble  # type: ignore[import-not-found,unused-ignore]

    keywords: dict[str, Any] = {"max_tasks": options.max_tasks_per_child or 0}
    if options.start_method is not None:
        keywords["context"] = _mp_context(options.start_method)
    pool: Any = pebble.ProcessPool(max_workers=options.workers, **keywords)

    def close() -> None:
        pool.close()
        pool.join()

    def map_items(
        function: _TaskFunction, items: list[Any], chunksize: Optional[int], timeout: float
    ) -> list[Any]:
        # pebble's map timeout is per item, not for the whole map: the child's
        # deadline (the parent kills it) bounds the whole map instead.
        future = pool.map(function, items, chunksize=chunksize or 1)
        return list(future.result(timeout=timeout))

    return _PoolAdapter(
        submit=lambda function, args: pool.schedule(function, args=args),
        wait=lambda future, timeout: future.result(timeout=timeout),
        close=close,
        map_items=map_items,
    )


_MPIRE_RECYCLING = "mpire recycles only within one map() call (worker_lifespan), not the pool"


def _open_mpire(options: _PoolOptions) -> _PoolAdapter:
    from mpire.pool import WorkerPool  # type: ignore[import-not-found,unused-ignore]

    if options.max_tasks_per_child is not None:
        raise _NotApplicable(_MPIRE_RECYCLING)
    # keep_alive: without it every map() starts and stops the workers.
    keywords: dict[str, Any] = {"keep_alive": True}
    if options.start_method is not None:
        keywords["start_method"] = options.start_method
    pool = WorkerPool(n_jobs=options.workers, **keywords)

    def map_items(
        function: _TaskFunction, items: list[Any], chunksize: Optional[int], timeout: float
    ) -> list[Any]:
        # chunk_size=None: mpire's own choice (about 4 chunks per worker).  No
        # task_timeout: it adds a watchdog thread; the child's deadline bounds the map.
        return list(pool.map(function, items, chunk_size=chunksize))

    def submit_notify(
        function: _TaskFunction, args: tuple[Any, ...], done: Callable[[], None]
    ) -> None:
        pool.apply_async(
            function, args=args, callback=lambda _: done(), error_callback=lambda _: done()
        )

    return _PoolAdapter(
        submit=lambda function, args: pool.apply_async(function, args=args),
        wait=lambda result, timeout: result.get(timeout=timeout),
        close=pool.stop_and_join,
        map_items=map_items,
        submit_notify=submit_notify,
    )


def _open_pipe(options: _PoolOptions) -> _PoolAdapter:
    if options.max_tasks_per_child is not None:
        raise _NotApplicable("the bare Pipe floor never recycles its workers")
    return _PipeFloorAdapter(options.workers, options.start_method)


@dataclass(frozen=True)
class _Library:
    """A column of the table: how to check for it and how to open its pool in a child."""

    name: str
    description: str
    module: Optional[str]  # import name checked before running; None: always present
    open_pool: Callable[[_PoolOptions], _PoolAdapter]
    # What using it imports: the import metric times exactly these, and a child
    # imports them before a timed pool start so that no import is counted there.
    imports: tuple[str, ...]
    # Metrics known beforehand not to apply (metric name -> why): no child is started.
    not_applicable: dict[str, str] = field(default_factory=dict)


LIBRARIES: dict[str, _Library] = {
    library.name: library
    for library in (
        _Library(
            "duckpool",
            "duckpool.ProcessPoolExecutor",
            "duckpool",
            _open_duckpool,
            # The package imports its executor when first asked for it.
            ("duckpool", "duckpool._executor"),
        ),
        _Library(
            "stdlib",
            "concurrent.futures.ProcessPoolExecutor",
            None,
            _open_stdlib,
            ("concurrent.futures.process",),
            {} if _STDLIB_RECYCLES else {"recycle": "max_tasks_per_child needs Python 3.11"},
        ),
        _Library(
            "mpool",
            "multiprocessing.Pool.apply_async",
            None,
            _open_mpool,
            ("multiprocessing.pool",),
        ),
        _Library(
            "loky",
            "loky.ProcessPoolExecutor",
            "loky",
            _open_loky,
            ("loky",),
            {"recycle": "loky.ProcessPoolExecutor has no max_tasks_per_child"},
        ),
        _Library("pebble", "pebble.ProcessPool.schedule", "pebble", _open_pebble, ("pebble",)),
        _Library(
            "deadpool",
            "deadpool.Deadpool (deadpool-executor; Executor.map, one task per item)",
            "deadpool",
            _open_deadpool,
            ("deadpool",),
            {"pending": "submit() blocks once 1,000 tasks wait (its default max_backlog)"},
        ),
        _Library(
            "mpire",
            "mpire.WorkerPool.apply_async",
            "mpire",
            _open_mpire,
            ("mpire",),
            {
                "recycle": _MPIRE_RECYCLING,
                # Seen on mpire 2.10: within a minute, no result, its workers gone.
                "pools": "several WorkerPools fed at once from threads hang",
            },
        ),
        _Library(
            "pipe",
            "bare multiprocessing.Pipe per worker (the floor)",
            None,
            _open_pipe,
            ("multiprocessing.connection",),
            {
                "map": "no map()",
                "pending": "no queue: a task waits in the pipe or is not sent",
                "recycle": "never recycles its workers",
                "pools": "one caller at a time: nothing guards a pipe shared by threads",
                "load": "one caller at a time: nothing guards a pipe shared by threads",
                "load_async": "not a concurrent.futures.Executor",
            },
        ),
    )
}


@dataclass(frozen=True)
class _PoolOpener:
    """What an own-pool metric receives: opens fresh pools of the library under test."""

    library: str
    options: _PoolOptions

    @property
    def imports(self) -> tuple[str, ...]:
        return LIBRARIES[self.library].imports

    def open(
        self,
        workers: Optional[int] = None,
        start_method: Optional[str] = None,
        max_tasks_per_child: Optional[int] = None,
    ) -> _PoolAdapter:
        """A fresh, unwarmed pool.

        ``workers`` and ``start_method`` left None keep the run's options;
        ``max_tasks_per_child`` None means no recycling.  Raises
        :class:`_NotApplicable` when the library cannot recycle its workers.
        """
        options = _PoolOptions(
            workers=workers or self.options.workers,
            start_method=start_method or self.options.start_method,
            max_tasks_per_child=max_tasks_per_child,
        )
        return LIBRARIES[self.library].open_pool(options)


def _warm_up(pool: _PoolAdapter, workers: int, deadline: float) -> list[str]:
    """Reach every worker at least once, then run one round of tiny tasks.

    Pools that start workers on demand only start the second one when the first
    is busy, hence tasks that sleep briefly and report their worker.  Sets
    ``pool.worker_pids``; returns how the workers were started (see
    :func:`_tasks.worker_identity`).
    """
    import duckpool._bench._tasks as _tasks

    seen: dict[int, str] = {}
    while len(seen) < workers:
        if time.monotonic() >= deadline:
            raise _BenchError(f"warm-up reached only {len(seen)} of {workers} workers")
        batch = [(0.01, os.getpid())] * (2 * workers)
        seen.update(pool.run_batch(_tasks.worker_identity, batch, deadline))
    pool.run_batch(_tasks.increment, [(i,) for i in range(_WARM_UP_ROUND)], deadline)
    for i in range(10):
        pool.wait(pool.submit(_tasks.increment, (i,)), deadline)
    pool.worker_pids = sorted(seen)
    return sorted(set(seen.values()))


def _find_missing(library: _Library) -> Optional[str]:
    """Why ``library`` cannot run here, or None; peers are looked up, not imported."""
    if library.module is None:
        return None
    if library.name == "duckpool":
        try:
            from duckpool import ProcessPoolExecutor  # noqa: F401
        except Exception as exc:
            return f"cannot import duckpool.ProcessPoolExecutor ({type(exc).__name__}: {exc})"
        return None
    import importlib.util

    if importlib.util.find_spec(library.module) is None:
        return "not installed (pip install duckpool[bench])"
    return None
