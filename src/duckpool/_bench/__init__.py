"""``duckpool bench``: duckpool's executor side by side with its peers.

Every number is reported as a ratio to the standard library's
``concurrent.futures.ProcessPoolExecutor`` measured in the same run::

    parent: main()                               child: python -c <_CHILD_CODE> --child
    ---------------------------------------      -------------------------------------------
    for start method in --start-method:          warm-pool metric (most of them):
      for rep in 1..K:                             open ONE fresh pool of ONE library
        for metric in --metrics:                   warm it: every worker seen, one round done
          for lib in --libs (rotated by rep): -->  run ONE metric, write its values (JSON file)
            start child in its own session         shut the pool down, write the file again
            wait up to --timeout; then kill the  own-pool metric (startup, import, recycle,
            whole process group -> cell failed   scaling): the metric opens (or never opens)
    per cell: median, min-max of the reps;         its pools itself, through a _PoolOpener
    ratio = lib median / stdlib median
    -> one table per start method (or --markdown) on stdout, --json FILE, --plot FILE.png;
       progress on stderr (one updating line on a terminal)

Reps are interleaved (rep 1 of every library, then rep 2, ...) and the order of
the libraries rotates each rep, so a slow minute of the machine or the position
in the sequence does not land on one library only.

Adding a metric: write ``_measure_<name>(pool, size, deadline) -> {key: value}``
and register a :class:`Metric` for it in :data:`METRICS`; each of its
:class:`Quantity` entries becomes one row of the table.  ``pool`` is a warmed
pool of the library under test; a metric that must open its own pools (or
none: start-up time, import time) registers its function as
``measure_own_pools=`` instead, and receives a :class:`_PoolOpener`.  A metric
that cannot apply to a library raises :class:`_NotApplicable` (the cell shows
``-``, not a failure); when that is known beforehand, the library's
``not_applicable`` says so and no child is started.  Adding a library: write
``_open_<name>(options) -> _PoolAdapter`` and register a :class:`_Library` in
:data:`LIBRARIES`.

A child runs this module through ``python -c``, not ``-m``: a spawned or
forkserver worker re-imports its parent's ``__main__`` when that is a module
or a file, and every library's workers would then carry this harness in their
start-up time and memory (the task module, ``_bench._tasks``, they import
anyway).  The top-level imports stay minimal all the same; everything else is
imported where it is used.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, cast

if TYPE_CHECKING:
    import argparse
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

__all__ = ["LIBRARIES", "METRICS", "Metric", "Quantity", "main"]

_BASELINE = "stdlib"
_WARM_UP_ROUND = 50
_DEFAULT_TIMEOUT_S = 60.0
_QUICK_REPS = 2
_DEFAULT_REPS = 5
_START_METHODS = ("fork", "spawn", "forkserver")


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


# --------------------------------------------------------------------------------------
# Child side: one pool of one library behind a common interface.
# --------------------------------------------------------------------------------------

_TaskFunction = Callable[..., Any]
# map(function, items, chunksize or None for the library's automatic choice, timeout)
_MapFunction = Callable[[_TaskFunction, list[Any], Optional[int], float], list[Any]]


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
    ) -> None:
        self._submit = submit
        self._wait = wait
        self._close = close
        self._map = map_items
        self._closed = False
        self.worker_pids: list[int] = []

    def submit(self, function: _TaskFunction, args: tuple[Any, ...]) -> Any:
        return self._submit(function, args)

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
        from duckpool._bench import _tasks

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

    return _PoolAdapter(
        submit=lambda function, args: pool.apply_async(function, args),
        wait=lambda result, timeout: result.get(timeout=timeout),
        close=close,
        map_items=map_items,
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

    return _PoolAdapter(
        submit=lambda function, args: pool.apply_async(function, args=args),
        wait=lambda result, timeout: result.get(timeout=timeout),
        close=pool.stop_and_join,
        map_items=map_items,
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
            "mpire",
            "mpire.WorkerPool.apply_async",
            "mpire",
            _open_mpire,
            ("mpire",),
            {"recycle": _MPIRE_RECYCLING},
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
    from duckpool._bench import _tasks

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


# --------------------------------------------------------------------------------------
# Metrics: each measures one warmed pool (or opens its own) and returns {key: value}.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantity:
    """One number a metric reports: one row of the table."""

    key: str
    label: str
    short: str  # how the progress line names it; "" when the metric has one quantity
    unit: str  # one of the units _format_range knows ("tasks/s", "us", "B", ...)
    higher_is_better: bool
    # False for a number that describes the library rather than ranks it (the
    # chunksize map found best): no ratio to the baseline is computed.
    compared: bool = True


_PoolMeasure = Callable[[_PoolAdapter, int, float], dict[str, float]]
_OwnPoolsMeasure = Callable[[_PoolOpener, int, float], dict[str, float]]


@dataclass(frozen=True)
class Metric:
    """A registered measurement: what it reports, how big it is, how it is made.

    Exactly one of ``measure`` (runs on a pool the child opened and warmed) and
    ``measure_own_pools`` (opens its own pools, timing their start if it wants)
    is set.  ``size`` counts ``size_unit``; ``--size`` overrides it only when
    ``size_option`` is true (not for metrics whose size counts pools or
    interpreters, where a task count makes no sense).  ``--reps`` overrides
    ``quick_reps``.
    """

    name: str
    summary: str
    quantities: tuple[Quantity, ...]
    quick_size: int
    full_size: int
    measure: Optional[_PoolMeasure] = None
    measure_own_pools: Optional[_OwnPoolsMeasure] = None
    size_unit: str = "tasks"
    size_option: bool = True
    # Reps under --quick when fewer than the others do: for a number that
    # barely moves between reps (memory), one that takes its own median within
    # the rep (import), or one that opens two pools and mostly measures how
    # busy the machine is (scaling): a second rep buys little for its time.
    quick_reps: Optional[int] = None

    def __post_init__(self) -> None:
        if (self.measure is None) == (self.measure_own_pools is None):
            raise ValueError(f"metric {self.name!r}: set exactly one of measure, measure_own_pools")


def _check_results(results: Sequence[Any], first_argument: int) -> None:
    expected = list(range(first_argument + 1, first_argument + 1 + len(results)))
    if list(results) != expected:
        wrong = next(i for i, (a, b) in enumerate(zip(results, expected)) if a != b)
        raise _BenchError(f"task {wrong} returned {results[wrong]!r}, expected {expected[wrong]!r}")


def _measure_throughput(pool: _PoolAdapter, size: int, deadline: float) -> dict[str, float]:
    from duckpool._bench._tasks import increment

    batch = [(i,) for i in range(size)]
    start = time.perf_counter()
    results = pool.run_batch(increment, batch, deadline)
    elapsed = time.perf_counter() - start
    _check_results(results, 0)
    return {"tasks_per_s": size / elapsed}


def _percentile(ordered: Sequence[float], percent: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    import math

    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


def _measure_latency(pool: _PoolAdapter, size: int, deadline: float) -> dict[str, float]:
    from duckpool._bench._tasks import increment

    samples: list[float] = []
    for i in range(size):
        start = time.perf_counter()
        value = pool.wait(pool.submit(increment, (i,)), deadline)
        samples.append(time.perf_counter() - start)
        if value != i + 1:
            raise _BenchError(f"round trip {i} returned {value!r}, expected {i + 1}")
    samples.sort()
    return {"p50_us": _percentile(samples, 50) * 1e6, "p99_us": _percentile(samples, 99) * 1e6}


# Tried in this order on the same warm pool; the best one is reported with its rate.
# Each maps at most _MAP_ITEMS_PER_CHUNKSIZE * chunksize items, so that the
# small chunksizes (a task per item or so) do not take most of the time, and
# only while N items still make two chunks per worker: one chunk per worker is
# no longer a parallel map but a single call each.
_MAP_CHUNKSIZES = (1, 16, 256, 4096)
_MAP_ITEMS_PER_CHUNKSIZE = 500


def _timed_map(
    pool: _PoolAdapter, items: list[int], chunksize: Optional[int], deadline: float
) -> float:
    """Items per second of one map of ``increment`` over ``items``, results checked."""
    from duckpool._bench._tasks import increment

    start = time.perf_counter()
    results = pool.map(increment, items, chunksize, deadline)
    elapsed = time.perf_counter() - start
    _check_results(results, items[0])
    return len(items) / elapsed


def _measure_map(pool: _PoolAdapter, size: int, deadline: float) -> dict[str, float]:
    items = list(range(size))
    workers = max(1, len(pool.worker_pids))
    candidates = [c for c in _MAP_CHUNKSIZES if c == 1 or c * 2 * workers <= size]
    rates = {
        chunksize: _timed_map(
            pool, items[: _MAP_ITEMS_PER_CHUNKSIZE * chunksize], chunksize, deadline
        )
        for chunksize in candidates
    }
    best = max(rates, key=lambda chunksize: rates[chunksize])
    automatic = _timed_map(pool, items, None, deadline)
    return {
        "map_best_per_s": rates[best],
        "map_best_chunksize": float(best),
        "map_auto_per_s": automatic,
        "map_auto_share": 100 * automatic / rates[best],
    }


def _wait_until_exited(pids: Sequence[int], deadline: float) -> None:
    """Poll until every process in ``pids`` has exited (a zombie counts: it has exited).

    Never reaps: the processes are the library's children (or grandchildren),
    and reaping them here would break the library's own bookkeeping.
    """
    import psutil

    for pid in pids:
        while True:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            _remaining(deadline)
            time.sleep(0.0005)


def _require_psutil() -> None:
    import importlib.util

    if importlib.util.find_spec("psutil") is None:
        raise _NotApplicable("needs psutil (pip install duckpool[bench])")


def _measure_shutdown(pool: _PoolAdapter, size: int, deadline: float) -> dict[str, float]:
    _require_psutil()
    import psutil  # noqa: F401 (imported now: _wait_until_exited would import it in the timing)

    pids = list(pool.worker_pids)
    start = time.perf_counter()
    pool.close()
    _wait_until_exited(pids, deadline)  # a pool that returns before its workers exit pays here
    return {"shutdown_us": (time.perf_counter() - start) * 1e6}


_PAYLOAD_BYTES = 1 << 20  # 1 MiB each way


def _measure_payload(pool: _PoolAdapter, size: int, deadline: float) -> dict[str, float]:
    from duckpool._bench._tasks import echo

    payload = bytes(range(256)) * (_PAYLOAD_BYTES // 256)  # not all zeros: nothing compresses it
    start = time.perf_counter()
    # One payload in flight per worker: the bare-Pipe floor would deadlock with
    # more (both ends blocked writing into full pipes); the pools queue freely.
    results = pool.run_batch(echo, [(payload,)] * size, deadline, in_flight_per_worker=1)
    elapsed = time.perf_counter() - start
    for index, result in enumerate(results):
        if result != payload:
            raise _BenchError(
                f"payload {index} came back as {type(result).__name__} of "
                f"{len(result) if isinstance(result, bytes) else '?'} bytes, expected the "
                f"{len(payload)} bytes sent"
            )
    return {"payload_mb_per_s": 2 * size * len(payload) / elapsed / 1e6}


def _block_every_worker(
    pool: _PoolAdapter, running_dir: str, release_path: str, deadline: float
) -> list[Any]:
    """Occupy every worker with a task that waits for ``release_path``; their handles.

    Blockers go one at a time until each worker has reported running one: a
    library that deals tasks to per-worker queues may put a second blocker
    behind the first (mpire deals each task to the worker that last returned a
    result), and a later one then reaches the idle worker.  Surplus blockers
    return at once on release.
    """
    from duckpool._bench._tasks import block_until_released

    workers = len(pool.worker_pids)
    handles: list[Any] = []
    while len(os.listdir(running_dir)) < workers:
        seen = len(os.listdir(running_dir))
        timeout = _remaining(deadline)
        handles.append(pool.submit(block_until_released, (release_path, running_dir, timeout)))
        patience = time.monotonic() + 0.05
        while len(os.listdir(running_dir)) == seen and time.monotonic() < patience:
            _remaining(deadline)
            time.sleep(0.001)
    return handles


# Time for the pools' own threads to move the queued tasks where they stay.
_PENDING_SETTLE_S = 0.1


def _measure_pending(pool: _PoolAdapter, size: int, deadline: float) -> dict[str, float]:
    """Parent memory per queued task, by tracemalloc, while every worker is blocked.

    tracemalloc counts every Python allocation of every thread of this process
    (the futures, the pickled calls, the pools' own queues and threads), and
    nothing else: unlike RSS it is not blurred by the allocator keeping freed
    pages or by the interpreter's own arenas.  What it cannot see is what sits
    in a kernel pipe buffer (up to 64 KiB per pipe), so ``size`` tasks are
    queued first, untraced, to fill whatever pipes a library fills; the
    reported cost is that of the next ``size`` tasks: the marginal cost of one
    more pending task, wherever the library keeps it.
    """
    import gc
    import tempfile
    import tracemalloc

    from duckpool._bench._tasks import increment

    with tempfile.TemporaryDirectory(prefix="duckpool-bench-block-") as scratch:
        running_dir = os.path.join(scratch, "running")
        os.mkdir(running_dir)
        release_path = os.path.join(scratch, "release")
        blockers: list[Any] = []
        handles: list[Any] = []
        try:
            blockers = _block_every_worker(pool, running_dir, release_path, deadline)
            handles = [pool.submit(increment, (i,)) for i in range(size)]  # fill the pipes
            time.sleep(_PENDING_SETTLE_S)
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                handles += [pool.submit(increment, (i,)) for i in range(size, 2 * size)]
                time.sleep(_PENDING_SETTLE_S)
                gc.collect()
                after = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
        finally:
            with open(release_path, "w"):
                pass
        results = [pool.wait(handle, deadline) for handle in handles]
        for blocker in blockers:
            pool.wait(blocker, deadline)
    _check_results(results, 0)
    return {"pending_bytes": (after - before) / size}


def _measure_worker_uss(pool: _PoolAdapter, size: int, deadline: float) -> dict[str, float]:
    """Median USS (memory only that process holds) of the warm, idle workers."""
    import statistics

    _require_psutil()
    import psutil

    if not pool.worker_pids:
        raise _BenchError("the warm-up saw no worker")
    uss = [psutil.Process(pid).memory_full_info().uss for pid in pool.worker_pids]
    return {"worker_uss_bytes": float(statistics.median(uss))}


def _measure_startup(opener: _PoolOpener, size: int, deadline: float) -> dict[str, float]:
    """From constructing a fresh pool to the first result of a tiny task; ``size`` pools."""
    import statistics

    from duckpool._bench._tasks import increment

    samples: list[float] = []
    for _ in range(size):
        start = time.perf_counter()
        pool = opener.open()
        try:
            value = pool.wait(pool.submit(increment, (0,)), deadline)
            samples.append(time.perf_counter() - start)
        finally:
            pool.close()
        _check_results([value], 0)
    return {"startup_us": statistics.median(samples) * 1e6}


def _measure_import(opener: _PoolOpener, size: int, deadline: float) -> dict[str, float]:
    """``import <the library>`` in a fresh interpreter; median of ``size`` interpreters.

    Timed inside the new interpreter around the import statement alone, so its
    own start-up does not count.  The child imported the library before (as for
    every own-pool metric), so the files are in the page cache: this is the
    import's own work, not the disk's.
    """
    import statistics
    import subprocess

    statement = "import " + ", ".join(opener.imports)
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    samples: list[float] = []
    for _ in range(size):
        completed = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=_remaining(deadline),
            check=False,
        )
        if completed.returncode != 0:
            raise _BenchError(f"{statement!r} failed: {completed.stderr.strip()[-500:]}")
        samples.append(float(completed.stdout))
    return {"import_us": statistics.median(samples) * 1e6}


_RECYCLE_EVERY = 25


def _measure_recycle(opener: _PoolOpener, size: int, deadline: float) -> dict[str, float]:
    """Tiny tasks, one in flight per worker, every worker replaced after 25 tasks, under spawn.

    Under spawn because that is where a replacement worker is expensive (and the
    stdlib refuses to recycle under fork).  One task in flight per worker (the
    next submitted as the oldest finishes) is how a server feeds a pool, and it
    keeps clear of the stdlib's hang when a backlog meets a recycled worker
    (gh-115634, in 3.11 to 3.13 before the fix; seen here on 3.11.7).
    """
    from duckpool._bench._tasks import increment

    workers = opener.options.workers
    pool = opener.open(start_method="spawn", max_tasks_per_child=_RECYCLE_EVERY)
    try:
        pool.run_windowed(increment, [(i,) for i in range(2 * workers)], workers, deadline)
        start = time.perf_counter()
        results = pool.run_windowed(increment, [(i,) for i in range(size)], workers, deadline)
        elapsed = time.perf_counter() - start
    finally:
        pool.close()
    _check_results(results, 0)
    return {"recycle_us_per_task": elapsed / size * 1e6}


_SPIN_TARGET_S = 0.010


def _spin_iterations(target_s: float) -> int:
    """How many :func:`_tasks.spin` iterations take about ``target_s`` here."""
    from duckpool._bench._tasks import spin

    iterations = 10_000
    while True:
        start = time.perf_counter()
        spin(iterations)
        elapsed = time.perf_counter() - start
        if elapsed >= target_s / 4:
            return max(1, int(iterations * target_s / elapsed))
        iterations *= 4


def _measure_scaling(opener: _PoolOpener, size: int, deadline: float) -> dict[str, float]:
    """``size`` CPU-bound tasks of ~10 ms: time on 1 worker / time on all the workers."""
    from duckpool._bench._tasks import spin

    iterations = _spin_iterations(_SPIN_TARGET_S)
    expected = spin(iterations)
    seconds: dict[int, float] = {}
    for workers in (1, opener.options.workers):
        pool = opener.open(workers=workers)
        try:
            _warm_up(pool, workers, deadline)
            start = time.perf_counter()
            results = pool.run_batch(spin, [(iterations,)] * size, deadline)
            seconds[workers] = time.perf_counter() - start
        finally:
            pool.close()
        wrong = [result for result in results if result != expected]
        if wrong:
            raise _BenchError(f"spin({iterations}) returned {wrong[0]!r}, expected {expected!r}")
    return {"speedup": seconds[1] / seconds[opener.options.workers]}


METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric(
            name="throughput",
            summary="submit N tiny tasks to a warmed pool, then wait for all results",
            quantities=(Quantity("tasks_per_s", "tiny-task throughput", "", "tasks/s", True),),
            quick_size=2_000,
            full_size=20_000,
            measure=_measure_throughput,
        ),
        Metric(
            name="latency",
            summary="one task at a time, submit then result(), M times",
            quantities=(
                Quantity("p50_us", "round-trip latency p50", "p50", "us", False),
                Quantity("p99_us", "round-trip latency p99", "p99", "us", False),
            ),
            quick_size=300,
            full_size=5_000,
            measure=_measure_latency,
        ),
        Metric(
            name="map",
            summary=f"map() of N tiny tasks at chunksize {'/'.join(map(str, _MAP_CHUNKSIZES))} "
            "(those giving 2+ chunks per worker; best reported) and at the library's "
            "automatic chunksize",
            quantities=(
                Quantity("map_best_per_s", "map at best chunksize", "best", "items/s", True),
                Quantity("map_best_chunksize", "map: the best chunksize", "at", "", True, False),
                Quantity("map_auto_per_s", "map at automatic chunksize", "auto", "items/s", True),
                Quantity("map_auto_share", "map: automatic / best", "auto/best", "%", True, False),
            ),
            quick_size=2_000,
            full_size=100_000,
            measure=_measure_map,
            size_unit="items",
        ),
        Metric(
            name="startup",
            summary="construct a fresh pool, submit a tiny task, get its result",
            quantities=(Quantity("startup_us", "pool created to first result", "", "us", False),),
            # Each pool is one sample of a figure that moves by half between
            # pools: three per rep, as in a full run, cost under a second more.
            quick_size=3,
            full_size=3,
            measure_own_pools=_measure_startup,
            size_unit="pools",
            size_option=False,
        ),
        Metric(
            name="shutdown",
            summary="graceful shutdown of a warm idle pool, until every worker has exited",
            quantities=(Quantity("shutdown_us", "shutdown of an idle pool", "", "us", False),),
            quick_size=1,
            full_size=1,
            measure=_measure_shutdown,
            size_unit="pools",
            size_option=False,
        ),
        Metric(
            name="payload",
            summary=f"echo {_PAYLOAD_BYTES >> 20} MiB to a worker and back, N times "
            "(MB counted both ways)",
            quantities=(Quantity("payload_mb_per_s", "1 MiB payload echo", "", "MB/s", True),),
            quick_size=10,
            full_size=200,
            measure=_measure_payload,
            size_unit="payloads",
        ),
        Metric(
            name="pending",
            summary="parent memory (tracemalloc) per queued task while every worker is blocked "
            "(N tasks queued first, the next N measured)",
            quantities=(
                Quantity("pending_bytes", "parent memory per pending task", "", "B", False),
            ),
            quick_size=1_000,
            full_size=10_000,
            measure=_measure_pending,
            quick_reps=1,
        ),
        Metric(
            name="uss",
            summary="USS of the warm idle workers (median over workers; needs psutil)",
            quantities=(Quantity("worker_uss_bytes", "worker USS", "", "B", False),),
            quick_size=1,
            full_size=1,
            measure=_measure_worker_uss,
            quick_reps=1,
            size_unit="pools",
            size_option=False,
        ),
        Metric(
            name="import",
            summary="import the library in a fresh interpreter (median of N interpreters)",
            quantities=(Quantity("import_us", "cold import", "", "us", False),),
            quick_size=3,
            full_size=10,
            measure_own_pools=_measure_import,
            quick_reps=1,
            size_unit="interpreters",
            size_option=False,
        ),
        Metric(
            name="recycle",
            summary=f"N tiny tasks, one in flight per worker, under spawn, every worker "
            f"replaced after {_RECYCLE_EVERY} tasks",
            quantities=(
                Quantity(
                    "recycle_us_per_task",
                    f"recycle every {_RECYCLE_EVERY} tasks (spawn), per task",
                    "",
                    "us",
                    False,
                ),
            ),
            quick_size=100,
            full_size=1_000,
            measure_own_pools=_measure_recycle,
        ),
        Metric(
            name="scaling",
            summary=f"N CPU-bound tasks of ~{_SPIN_TARGET_S * 1e3:g} ms: "
            "time on 1 worker / time on all the workers",
            quantities=(Quantity("speedup", "CPU speedup, 1 worker to all", "", "x", True),),
            quick_size=8,
            full_size=80,
            measure_own_pools=_measure_scaling,
            quick_reps=1,
        ),
    )
}


def _child_main(options: argparse.Namespace) -> int:
    """Measure one metric of one library once and write the outcome to the result file.

    For a warm-pool metric the file is written after the measurement and again
    after the pool has shut down, so a parent that had to kill a child can tell
    a hung shutdown from a hung measurement.  A metric that does not apply to
    the library is written as ``ok`` with the reason in ``not_applicable``.
    """
    import json
    import traceback

    # Keep a fifth of the parent's timeout for shutdown and for writing the file.
    deadline = time.monotonic() + options.timeout * 0.8
    record: dict[str, Any] = {"lib": options.lib, "metric": options.metric, "ok": False}

    def write() -> None:
        # Write then rename: a child killed mid-write leaves the previous version whole.
        partial = options.result_file + ".partial"
        with open(partial, "w", encoding="utf-8") as stream:
            json.dump(record, stream)
        os.replace(partial, options.result_file)

    library = LIBRARIES[options.lib]
    metric = METRICS[options.metric]
    pool_options = _PoolOptions(workers=options.workers, start_method=options.start_method)
    try:
        from duckpool._bench import _tasks

        # Before any pool exists: forked workers must inherit it (see worker_identity).
        _tasks.bench_child_pid = os.getpid()
        if metric.measure_own_pools is not None:
            import importlib

            for module in library.imports:  # so that no timed pool start imports anything
                importlib.import_module(module)
            opener = _PoolOpener(options.lib, pool_options)
            record["values"] = metric.measure_own_pools(opener, options.size, deadline)
            record["measured"] = True
        else:
            measure = cast("_PoolMeasure", metric.measure)
            pool = library.open_pool(pool_options)
            try:
                record["worker_start"] = _warm_up(pool, options.workers, deadline)
                record["values"] = measure(pool, options.size, deadline)
                record["measured"] = True
                write()
            finally:
                started = time.perf_counter()
                pool.close()  # a no-op when the metric closed it (shutdown)
                record["shutdown_s"] = time.perf_counter() - started
        record["ok"] = True
    except _NotApplicable as exc:
        record["ok"] = True
        record["not_applicable"] = str(exc)
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}".strip()
        record["traceback"] = traceback.format_exc()
    write()
    return 0 if record["ok"] else 1


# --------------------------------------------------------------------------------------
# Parent side: run the children, summarise, print.
# --------------------------------------------------------------------------------------


@dataclass
class _Cell:
    """One library's reps for one metric."""

    samples: list[dict[str, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    worker_start: set[str] = field(default_factory=set)  # as the warm-up observed it
    not_applicable: Optional[str] = None  # why the metric does not apply to the library


@dataclass(frozen=True)
class _Plan:
    """What one table measures, decided from the options before anything starts."""

    command: str
    libraries: tuple[str, ...]
    skipped: dict[str, str]
    metrics: tuple[str, ...]
    sizes: dict[str, int]
    reps: int
    metric_reps: dict[str, int]  # each metric's reps; none more than ``reps``
    workers: int
    start_method: Optional[str]
    timeout: float


def _child_environment() -> dict[str, str]:
    """The parent's environment, plus the path to this copy of duckpool if needed.

    A checkout run (``benchmarks/run.py``, ``PYTHONPATH=src``, pytest) must
    measure the same duckpool in the child as in the parent; an installed one
    is found anyway, and putting site-packages on ``PYTHONPATH`` would move it
    ahead of the standard library.
    """
    import site

    import duckpool

    # From the package, not this file: the harness's depth inside it may change.
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(duckpool.__file__)))
    environment = dict(os.environ)
    installed = [*site.getsitepackages(), site.getusersitepackages()]
    if any(os.path.abspath(path) == package_parent for path in installed):
        return environment
    existing = environment.get("PYTHONPATH")
    environment["PYTHONPATH"] = (
        package_parent if not existing else os.pathsep.join([package_parent, existing])
    )
    return environment


def _wait_without_reaping(pid: int, timeout: float) -> bool:
    """Wait for ``pid`` to exit but leave it a zombie, so its group id stays unique."""
    deadline = time.monotonic() + timeout
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


# No __main__ module for spawned workers to re-import (see the module docstring).
_CHILD_CODE = "import sys; from duckpool._bench import main; sys.exit(main(sys.argv[1:]))"


def _child_command(plan: _Plan, library: str, metric: str, result_path: str) -> list[str]:
    command = [
        sys.executable, "-c", _CHILD_CODE, "--child",
        "--lib", library, "--metric", metric,
        "--size", str(plan.sizes[metric]), "--workers", str(plan.workers),
        "--timeout", str(plan.timeout), "--result-file", result_path,
    ]  # fmt: skip
    if plan.start_method is not None:
        command += ["--start-method", plan.start_method]
    return command


def _run_child(plan: _Plan, library: str, metric: str) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter in its own session; never hang.

    Whatever the outcome, the child's whole process group is killed afterwards:
    on timeout that is the hung measurement, otherwise any process a library
    left behind, so no rep competes with leftovers of the one before.
    """
    import json
    import signal
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="duckpool-bench-") as scratch:
        result_path = os.path.join(scratch, "result.json")
        log_path = os.path.join(scratch, "child.log")
        command = _child_command(plan, library, metric, result_path)
        with open(log_path, "wb") as log:
            child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_environment(),
                start_new_session=True,
            )
            exited = False
            try:
                if hasattr(os, "waitid"):
                    exited = _wait_without_reaping(child.pid, plan.timeout)
                else:  # no waitid (macOS): reaping first risks a reused group id, rarely
                    try:
                        child.wait(plan.timeout)
                        exited = True
                    except subprocess.TimeoutExpired:
                        pass
            finally:
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                child.wait()
        record: dict[str, Any] = {"ok": False}
        try:
            with open(result_path, encoding="utf-8") as stream:
                record = json.load(stream)
        except (OSError, ValueError):
            pass  # no result: reported below from the exit code and the child's output
        if not exited:
            stage = "pool shutdown" if record.get("measured") else "measurement"
            record["ok"] = False
            record["error"] = f"timed out after {plan.timeout:g} s (in {stage}); killed"
        elif "error" not in record and not record.get("ok"):
            with open(log_path, encoding="utf-8", errors="replace") as stream:
                tail = stream.read().strip().splitlines()[-1:] or ["(no output)"]
            record["error"] = f"child exited with code {child.returncode}: {tail[0]}"
        return record


def _summarise(plan: _Plan, cells: dict[tuple[str, str], _Cell]) -> list[dict[str, Any]]:
    """One row per quantity: every library's median, spread, ratio and failures."""
    import statistics

    rows: list[dict[str, Any]] = []
    for metric_name in plan.metrics:
        metric = METRICS[metric_name]
        for quantity in metric.quantities:
            row_cells: dict[str, dict[str, Any]] = {}
            for library in plan.libraries:
                cell = cells[(metric_name, library)]
                values = [sample[quantity.key] for sample in cell.samples]
                # A descriptive number (a chunksize) must be one that was seen:
                # the median of 16 and 256 is no chunksize anyone tried.
                middle = statistics.median if quantity.compared else statistics.median_low
                summary: dict[str, Any] = {
                    "samples": values,
                    "median": middle(values) if values else None,
                    "min": min(values) if values else None,
                    "max": max(values) if values else None,
                    "ratio": None,
                    "failures": list(cell.failures),
                    "not_applicable": cell.not_applicable,
                }
                row_cells[library] = summary
            baseline = row_cells.get(_BASELINE, {}).get("median")
            for summary in row_cells.values():
                if quantity.compared and baseline and summary["median"] is not None:
                    summary["ratio"] = summary["median"] / baseline
            rows.append(
                {
                    "metric": metric_name,
                    "quantity": quantity.key,
                    "label": quantity.label,
                    "unit": quantity.unit,
                    "higher_is_better": quantity.higher_is_better,
                    "compared": quantity.compared,
                    "size": plan.sizes[metric_name],
                    "cells": row_cells,
                }
            )
    return rows


def _printable(text: str, fallback: str) -> str:
    """``text`` if stdout can encode it (a C-locale terminal may not), else ``fallback``."""
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return fallback
    return text


def _dash() -> str:
    return _printable("\N{EN DASH}", "-")


def _microseconds() -> str:
    return _printable("\N{MICRO SIGN}s", "us")


def _format_number(value: float) -> str:
    """Three significant digits with a k/M suffix: 41.2k, 987, 1.23M."""
    for divisor, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= divisor:
            return f"{value / divisor:.3g}{suffix}"
    return f"{value:.3g}"


def _format_value(value: float, unit: str) -> str:
    return _format_range([value], unit)


def _format_spread(summary: dict[str, Any], unit: str) -> str:
    """``low-high`` of the reps; empty with fewer than two reps or when they all agree."""
    if len(summary["samples"]) < 2 or summary["min"] == summary["max"]:
        return ""
    return _format_range([summary["min"], summary["max"]], unit)


def _scaled(values: list[float], scales: Sequence[tuple[float, str]], last: str) -> str:
    """``values`` in the largest scale their maximum reaches, the unit once at the end."""
    dash = _dash()
    for divisor, suffix in scales:
        if max(abs(v) for v in values) >= divisor:
            return dash.join(f"{v / divisor:.3g}" for v in values) + f" {suffix}"
    return dash.join(f"{v:.3g}" for v in values) + f" {last}"


def _format_range(values: list[float], unit: str) -> str:
    """One value, or ``low-high``, with the unit once at the end."""
    dash = _dash()
    if unit in ("tasks/s", "items/s"):
        return dash.join(_format_number(v) for v in values) + "/s"
    if unit == "us":
        return _scaled(values, ((1e6, "s"), (1e3, "ms")), _microseconds())
    if unit == "B":
        return _scaled(values, ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")), "B")
    if unit == "x":
        return dash.join(f"{v:.2f}" for v in values) + "x"
    if unit == "%":
        return dash.join(f"{v:.0f}" for v in values) + "%"
    if unit == "":
        return dash.join(f"{v:g}" for v in values)
    return dash.join(_format_number(v) for v in values) + f" {unit}"


def _format_cell(summary: dict[str, Any], unit: str) -> str:
    if summary.get("not_applicable"):
        return _dash()
    if summary["median"] is None:
        return "failed" if summary["failures"] else "n/a"
    text = _format_value(summary["median"], unit)
    if summary["ratio"] is not None:
        text += f" ({summary['ratio']:.2f}x)"
    if summary["failures"]:
        text += f" [{len(summary['failures'])} failed]"
    return text


def _row_title(row: dict[str, Any]) -> tuple[str, str]:
    unit = _microseconds() if row["unit"] == "us" else row["unit"]
    title = f"{row['label']} ({unit})" if unit else row["label"]
    if not row.get("compared", True):
        return title, "not ranked, no ratio"
    better = "higher is better" if row["higher_is_better"] else "lower is better"
    return title, better


def _method_text(start_method: Optional[str]) -> str:
    import multiprocessing

    if start_method is None:
        return f"library defaults (multiprocessing: {multiprocessing.get_start_method()})"
    return start_method


def _reps_text(plan: _Plan) -> str:
    fewer = {name: reps for name, reps in plan.metric_reps.items() if reps != plan.reps}
    text = f"{plan.reps} reps"
    if fewer:
        text += " (" + ", ".join(f"{name} {reps}" for name, reps in fewer.items()) + ")"
    return text


def _header_lines(plan: _Plan, date: str, machine: dict[str, Any], python: str) -> list[str]:
    cores = f"{machine['cores']} cores"
    if machine["usable_cores"] != machine["cores"]:
        cores += f" ({machine['usable_cores']} usable)"
    described = ", ".join(part for part in (machine["system"], cores, machine["cpu"]) if part)
    sizes = ", ".join(
        f"{name} {plan.sizes[name]} {METRICS[name].size_unit}" for name in plan.metrics
    )
    return [
        f"{plan.command} | {date} | {python} | {described} | "
        f"start method: {_method_text(plan.start_method)}",
        f"{plan.workers} workers, {_reps_text(plan)} per cell (median, min{_dash()}"
        f"max), {sizes}; ratio = library median / {_BASELINE} median",
    ]


def _terminal_table(rows: list[dict[str, Any]], libraries: Sequence[str]) -> list[str]:
    table: list[list[str]] = [["", *libraries]]
    for row in rows:
        title, better = _row_title(row)
        cells = [row["cells"][library] for library in libraries]
        table.append([title, *(_format_cell(cell, row["unit"]) for cell in cells)])
        table.append([f"  {better}", *(_format_spread(cell, row["unit"]) for cell in cells)])
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    lines = []
    for index, line in enumerate(table):
        first = line[0].ljust(widths[0])
        rest = [text.rjust(width) for text, width in zip(line[1:], widths[1:])]
        lines.append("  ".join([first, *rest]).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return lines


def _markdown_table(rows: list[dict[str, Any]], libraries: Sequence[str]) -> list[str]:
    lines = [
        "| metric | " + " | ".join(libraries) + " |",
        "|---|" + "---:|" * len(libraries),
    ]
    for row in rows:
        title, better = _row_title(row)
        cells = []
        for library in libraries:
            summary = row["cells"][library]
            spread = _format_spread(summary, row["unit"])
            text = _format_cell(summary, row["unit"])
            cells.append(f"{text} [{spread}]" if spread else text)
        lines.append(f"| {title}, {better} | " + " | ".join(cells) + " |")
    return lines


def _write_plot(path: str, document: dict[str, Any]) -> None:
    """A bar chart of every ranked row's ratios, one panel per start method, as a PNG.

    Drawn on matplotlib's Agg canvas directly: no pyplot, no global backend
    switch, nothing that needs a display.  DeprecationWarnings are silenced
    while drawing: they come from inside matplotlib and its dependencies
    (matplotlib 3.9 on Python 3.9 calls pyparsing names that pyparsing 3.3
    deprecates) and are nothing a benchmark user could act on.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _draw_plot(path, document)


def _draw_plot(path: str, document: dict[str, Any]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    baseline = document["baseline"]
    libraries = [name for name in document["libraries"] if name != baseline]
    runs = document["runs"]
    row_count = max((len(run["rows"]) for run in runs), default=1)
    figure = Figure(figsize=(max(8.0, 0.9 * row_count + 3), 5.5 * len(runs)))
    FigureCanvasAgg(figure)
    width = 0.8 / max(1, len(libraries))
    for index, run in enumerate(runs):
        axis = figure.add_subplot(len(runs), 1, index + 1)
        rows = [row for row in run["rows"] if row.get("compared", True)]
        for offset, library in enumerate(libraries):
            positions, ratios = [], []
            for position, row in enumerate(rows):
                ratio = row["cells"][library]["ratio"]
                if ratio:  # no bar for a failed or not-applicable cell
                    positions.append(position + (offset - (len(libraries) - 1) / 2) * width)
                    ratios.append(ratio)
            # From the 1.0 line, up or down: on a log scale a bar from the
            # axis bottom would make every ratio look large.
            heights = [ratio - 1.0 for ratio in ratios]
            axis.bar(positions, heights, width, bottom=1.0, label=library)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_xticks(range(len(rows)))
        axis.set_xticklabels(
            [f"{row['label']} {'↑' if row['higher_is_better'] else '↓'}" for row in rows],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        axis.set_ylabel(f"ratio to {baseline} (log scale)")
        axis.set_title(
            f"start method: {_method_text(run['start_method'])} "
            f"(↑ higher is better, ↓ lower is better)",
            fontsize=9,
        )
        axis.legend(fontsize=8, ncol=max(1, len(libraries)))
    figure.suptitle(f"{document['command']} | {document['date']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _machine() -> dict[str, Any]:
    import platform

    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as stream:
            for line in stream:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        cpu = platform.processor()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "system": f"{platform.system()} {platform.machine()}",
        "cores": os.cpu_count(),
        "usable_cores": usable or os.cpu_count(),
        "cpu": cpu,
    }


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


def _parse_names(
    parser: argparse.ArgumentParser, text: str, known: Sequence[str], option: str
) -> tuple[str, ...]:
    """The comma-separated names in ``text``, deduplicated; exits (2) naming any unknown one."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        parser.error(
            f"{option} got {text!r}: unknown {','.join(unknown) or '(empty)'}; "
            f"choose from {','.join(known)} (comma-separated)"
        )
    return tuple(dict.fromkeys(names))


def _build_parser() -> argparse.ArgumentParser:
    import argparse

    epilog = "metrics:\n" + "".join(
        f"  {name:<12} {metric.summary}\n" for name, metric in METRICS.items()
    )
    epilog += "libraries:\n" + "".join(
        f"  {name:<12} {library.description}\n" for name, library in LIBRARIES.items()
    )
    parser = argparse.ArgumentParser(
        prog="duckpool bench",
        description="Measure duckpool's executor against its peers, as ratios to the "
        "standard library's ProcessPoolExecutor.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small sizes and {_QUICK_REPS} reps (< 2 minutes on 2 cores)",
    )
    parser.add_argument(
        "--reps", type=int, help=f"reps per cell (default {_DEFAULT_REPS}, --quick {_QUICK_REPS})"
    )
    parser.add_argument(
        "--libs", default=",".join(LIBRARIES), help="comma-separated libraries (default: all)"
    )
    parser.add_argument(
        "--metrics", default=",".join(METRICS), help="comma-separated metrics (default: all)"
    )
    parser.add_argument(
        "--start-method",
        choices=(*_START_METHODS, "all"),
        help="start method for every library; 'all': one table per available method "
        "(default: each library's own default)",
    )
    parser.add_argument(
        "--size",
        type=int,
        help="tasks (items, payloads) per measurement for every metric sized in tasks "
        "(overrides --quick)",
    )
    parser.add_argument("--workers", type=int, default=2, help="workers per pool (default 2)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=_DEFAULT_TIMEOUT_S,
        help=f"seconds before a measurement is killed and reported failed "
        f"(default {_DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw the ratios as a bar chart into FILE.png (needs matplotlib)",
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print a Markdown table instead of plain text"
    )
    # The child mode, used by the harness itself.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lib", help=argparse.SUPPRESS)
    parser.add_argument("--metric", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    return parser


def _make_plans(
    parser: argparse.ArgumentParser, options: argparse.Namespace, argv: Sequence[str]
) -> list[_Plan]:
    """Check the options (bad ones exit 2 through ``parser.error``); one plan per table."""
    import importlib.util
    import multiprocessing
    import shlex

    for option, value in (("--reps", options.reps), ("--size", options.size)):
        if value is not None and value < 1:
            parser.error(f"{option} must be >= 1, got {value}")
    if options.workers < 1:
        parser.error(f"--workers must be >= 1, got {options.workers}")
    if options.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {options.timeout:g}")
    available = multiprocessing.get_all_start_methods()
    if options.start_method == "all":
        methods: list[Optional[str]] = [m for m in _START_METHODS if m in available]
    else:
        methods = [options.start_method]
        if options.start_method is not None and options.start_method not in available:
            parser.error(
                f"--start-method {options.start_method} is not available on this platform "
                f"(available: {', '.join(available)})"
            )
    if options.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error(
            f"--plot {options.plot} needs matplotlib, which is not installed "
            "(pip install duckpool[bench])"
        )
    requested = _parse_names(parser, options.libs, list(LIBRARIES), "--libs")
    metrics = _parse_names(parser, options.metrics, list(METRICS), "--metrics")
    if _BASELINE not in requested:
        print(f"adding {_BASELINE}: it is the baseline of every ratio", file=sys.stderr)
        requested = (*requested, _BASELINE)
    skipped: dict[str, str] = {}
    for name in requested:
        reason = _find_missing(LIBRARIES[name])
        if reason is not None:
            skipped[name] = reason
    libraries = tuple(name for name in LIBRARIES if name in requested and name not in skipped)

    def size_of(metric: Metric) -> int:
        if options.size and metric.size_option:
            return int(options.size)
        return metric.quick_size if options.quick else metric.full_size

    sizes = {name: size_of(METRICS[name]) for name in metrics}
    reps = options.reps or (_QUICK_REPS if options.quick else _DEFAULT_REPS)
    metric_reps = {
        name: min(reps, METRICS[name].quick_reps or reps)
        if options.quick and not options.reps
        else reps
        for name in metrics
    }
    return [
        _Plan(
            command=shlex.join(["duckpool", "bench", *argv]),
            libraries=libraries,
            skipped=skipped,
            metrics=metrics,
            sizes=sizes,
            reps=reps,
            metric_reps=metric_reps,
            workers=options.workers,
            start_method=method,
            timeout=options.timeout,
        )
        for method in methods
    ]


def _clock(seconds: float) -> str:
    minutes, rest = divmod(int(seconds + 0.5), 60)
    return f"{minutes}:{rest:02d}"


class _Progress:
    """Progress on stderr: one line rewritten in place on a terminal, else a line per step.

    The live line names the measurement running now, then what it gave, with
    the time spent and an estimate of the time left; :meth:`note` prints a
    line that stays (a child's traceback) without mangling the live one.
    """

    def __init__(self, total: int) -> None:
        self._total = total
        self._done = 0
        self._started = time.monotonic()
        self._live = sys.stderr.isatty()
        self._shown = False

    def _timing(self) -> str:
        elapsed = time.monotonic() - self._started
        text = f"{_clock(elapsed)} elapsed"
        if self._done:
            text += f", ~{_clock(elapsed / self._done * (self._total - self._done))} left"
        return text

    def _show(self, text: str) -> None:
        import shutil

        columns = shutil.get_terminal_size().columns
        sys.stderr.write("\r" + text[: max(20, columns - 1)] + "\x1b[K")
        sys.stderr.flush()
        self._shown = True

    def _counter(self) -> str:
        return f"[{self._done:>{len(str(self._total))}}/{self._total}]"

    def running(self, what: str) -> None:
        if self._live:
            self._show(f"{self._counter()} {self._timing()} | running {what}")

    def finished(self, what: str, outcome: str, seconds: float) -> None:
        self._done += 1
        # Timing first: a narrow terminal cuts the end of the line, not the estimate.
        text = f"{self._counter()} {self._timing()} | {what} {outcome} ({seconds:.1f} s)"
        if self._live:
            self._show(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self._live and self._shown:
            sys.stderr.write("\r\x1b[K")
            self._shown = False
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._live and self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._shown = False


def _children_needed(plan: _Plan) -> int:
    return sum(
        plan.metric_reps[metric]
        for metric in plan.metrics
        for library in plan.libraries
        if metric not in LIBRARIES[library].not_applicable
    )


def _run_plan(plan: _Plan, progress: _Progress) -> dict[tuple[str, str], _Cell]:
    """Every rep of every metric of every library, interleaved; progress on stderr."""
    cells = {(metric, library): _Cell() for metric in plan.metrics for library in plan.libraries}
    for (metric_name, library), cell in cells.items():
        cell.not_applicable = LIBRARIES[library].not_applicable.get(metric_name)
    method = plan.start_method or "default"
    for rep in range(plan.reps):
        shift = rep % max(1, len(plan.libraries))
        order = plan.libraries[shift:] + plan.libraries[:shift]
        for metric_name in plan.metrics:
            if rep >= plan.metric_reps[metric_name]:
                continue
            metric = METRICS[metric_name]
            for library in order:
                cell = cells[(metric_name, library)]
                if cell.not_applicable is not None:
                    continue
                what = f"{method} rep {rep + 1}/{plan.reps} {metric_name:<10} {library:<8}"
                progress.running(what)
                started = time.monotonic()
                record = _run_child(plan, library, metric_name)
                if record.get("ok") and record.get("not_applicable"):
                    cell.not_applicable = record["not_applicable"]
                    outcome = f"does not apply: {record['not_applicable']}"
                elif record.get("ok"):
                    cell.samples.append(record["values"])
                    cell.worker_start.update(record.get("worker_start", ()))
                    outcome = ", ".join(
                        f"{q.short} {_format_value(record['values'][q.key], q.unit)}".strip()
                        for q in metric.quantities
                    )
                else:
                    cell.failures.append(record["error"])
                    outcome = f"FAILED: {record['error']}"
                    if record.get("traceback"):  # the child's, for whoever debugs the library
                        progress.note(record["traceback"].rstrip())
                progress.finished(what, outcome, time.monotonic() - started)
    return cells


def _report_lines(
    plan: _Plan,
    rows: list[dict[str, Any]],
    header: list[str],
    worker_start: dict[str, list[str]],
    markdown: bool,
) -> list[str]:
    """One table's report: header, skipped libraries, table, legend, n/a cells, failures."""
    lines = [
        *header,
        "workers started by: "
        + ", ".join(f"{name} {'/'.join(found) or '?'}" for name, found in worker_start.items()),
        *(f"skipped {name}: {reason}" for name, reason in plan.skipped.items()),
    ]
    if markdown:  # one paragraph per line, the legend as a list
        lines = [line for text in lines for line in (text, "")]
        lines += _markdown_table(rows, plan.libraries)
        lines.append("")
        lines += [f"- {name}: {LIBRARIES[name].description}" for name in plan.libraries]
    else:
        lines.append("")
        lines += _terminal_table(rows, plan.libraries)
        lines.append("")
        lines += [f"{name} = {LIBRARIES[name].description}" for name in plan.libraries]
    first_rows = [  # once per metric
        row for row in rows if row["quantity"] == METRICS[row["metric"]].quantities[0].key
    ]
    not_applicable = [
        f"{_dash()} {row['metric']} {library}: does not apply ({summary['not_applicable']})"
        for row in first_rows
        for library, summary in row["cells"].items()
        if summary["not_applicable"]
    ]
    failures = [
        f"failed {row['metric']} {library}: {message}"
        for row in first_rows
        for library, summary in row["cells"].items()
        for message in summary["failures"]
    ]
    for extra in (not_applicable, failures):
        if extra:
            lines.append("")
            lines += [f"- {line}" if markdown else line for line in extra]
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``duckpool bench`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Returns 0 when every measurement completed (a metric that does not apply
    to a library is not a failure), 1 when any failed or timed out (the table
    still shows the others; each failure is listed under it), 2 on bad options
    (the message names the option and the value), 130 when interrupted (the
    running child is killed first).  Libraries that are not installed are
    skipped with one printed line and do not fail the run.
    """
    import datetime
    import json
    import platform

    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    try:
        options = parser.parse_args(arguments)
        if options.child:
            if options.lib not in LIBRARIES or options.metric not in METRICS:
                parser.error("--child needs --lib and --metric with known names")
            return _child_main(options)
        plans = _make_plans(parser, options, arguments)
    except SystemExit as exc:  # argparse's way out: --help (0) and bad options (2)
        return exc.code if isinstance(exc.code, int) else 2

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = _machine()
    python = f"{platform.python_implementation()} {platform.python_version()}"
    first = plans[0]
    print(
        f"running {_reps_text(first)} x {len(first.metrics)} metrics x {len(first.libraries)} "
        f"libraries ({', '.join(first.libraries)}) x {len(plans)} start method(s), "
        "one child process each",
        file=sys.stderr,
        flush=True,
    )
    progress = _Progress(sum(_children_needed(plan) for plan in plans))
    runs: list[dict[str, Any]] = []
    reports: list[str] = []
    try:
        for plan in plans:
            cells = _run_plan(plan, progress)
            rows = _summarise(plan, cells)
            worker_start = {
                library: sorted(
                    set().union(*(cells[(metric, library)].worker_start for metric in plan.metrics))
                )
                for library in plan.libraries
            }
            header = _header_lines(plan, date, machine, python)
            reports.append(
                "\n".join(_report_lines(plan, rows, header, worker_start, options.markdown))
            )
            runs.append(
                {"start_method": plan.start_method, "worker_start": worker_start, "rows": rows}
            )
    except KeyboardInterrupt:
        progress.close()
        print("interrupted", file=sys.stderr)
        return 130
    progress.close()
    print("\n\n".join(reports))

    document = {
        "schema": 2,
        "command": first.command,
        "date": date,
        "python": python,
        "machine": machine,
        "workers": first.workers,
        "reps": first.reps,
        "metric_reps": first.metric_reps,
        "baseline": _BASELINE,
        "libraries": list(first.libraries),
        "skipped": first.skipped,
        "runs": runs,
    }
    if options.json:
        with open(options.json, "w", encoding="utf-8") as stream:
            json.dump(document, stream, indent=2)
            stream.write("\n")
    if options.plot:
        _write_plot(options.plot, document)
        print(f"plot written to {options.plot}", file=sys.stderr)
    failed = any(
        summary["failures"]
        for run in runs
        for row in run["rows"]
        for summary in row["cells"].values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
