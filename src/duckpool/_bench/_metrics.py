"""What ``duckpool bench`` measures: every metric, and the numbers each one reports.

A :class:`Metric` either measures one warmed pool of the library under test
(``measure``) or opens its own pools, or none, through a
:class:`~duckpool._bench._adapters._PoolOpener` (``measure_own_pools``).
Either way it returns ``{key: value}``, one :class:`Quantity`, one row of the
table, per key.  Adding a metric: write ``_measure_<name>(pool, size,
deadline)`` here and register it in :data:`METRICS`; raise ``_NotApplicable``
when it cannot apply to a library.  What the workers run lives in ``_tasks``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from duckpool._bench._adapters import (
    _BenchError,
    _NotApplicable,
    _PoolAdapter,
    _PoolOpener,
    _remaining,
    _warm_up,
)

__all__ = ["METRICS", "Metric", "Quantity"]


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
    # duckpool's goal: its ratio to the baseline (its value, for a number not
    # compared) at least this if higher is better, at most this if lower is.
    goal: Optional[float] = None
    # The goal also asks duckpool's median to be the best of every peer's.
    best_of_peers: bool = False

    def meets(self, value: float) -> bool:
        """Whether ``value`` (a ratio, or the number itself if not compared) meets the goal."""
        assert self.goal is not None
        return value >= self.goal if self.higher_is_better else value <= self.goal


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
    """From constructing a fresh pool to the first result of a tiny task, then
    from there to the end of its shutdown (every process it started has
    exited); the median of ``size`` pools each."""
    import statistics

    from duckpool._bench._tasks import increment

    _require_psutil()
    starts: list[float] = []
    shutdowns: list[float] = []
    for _ in range(size):
        before = _descendants()
        start = time.perf_counter()
        pool = opener.open()
        try:
            value = pool.wait(pool.submit(increment, (0,)), deadline)
            starts.append(time.perf_counter() - start)
        except BaseException:
            pool.close()
            raise
        # What the pool has started by now, whatever the library calls it
        # (workers, a zygote forking more, a manager process).
        started = [pid for pid in _descendants() - before if not _lasting_helper(pid)]
        start = time.perf_counter()
        pool.close()
        _wait_until_exited(started, deadline)
        shutdowns.append(time.perf_counter() - start)
        _check_results([value], 0)
    return {
        "startup_us": statistics.median(starts) * 1e6,
        "fresh_shutdown_us": statistics.median(shutdowns) * 1e6,
    }


def _descendants() -> set[int]:
    import psutil

    return {child.pid for child in psutil.Process().children(recursive=True)}


def _lasting_helper(pid: int) -> bool:
    """A helper process shared by every pool of this process and meant to
    outlive them: multiprocessing's (or loky's) fork server or resource tracker."""
    import psutil

    try:
        command = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False
    return "resource_tracker" in command or "forkserver" in command


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


#: The pool sizes the parent's CPU per task is measured at.
_MANY_WORKERS = (2, 8, 32, 64)


def _measure_many_workers(opener: _PoolOpener, size: int, deadline: float) -> dict[str, float]:
    """The parent's CPU time per tiny task, in pools of 2, 8, 32 and 64 workers.

    The CPU of the measuring process (every thread of it: the library's own
    threads included) while ``size`` tasks go through a warmed pool, divided
    by ``size``: what one dispatching process pays per task, which on a
    many-core machine caps the tasks per second it can feed its workers.
    """
    from duckpool._bench._tasks import increment

    values: dict[str, float] = {}
    for workers in _MANY_WORKERS:
        pool = opener.open(workers=workers)
        try:
            _warm_up(pool, workers, deadline)
            batch = [(i,) for i in range(size)]
            cpu = time.process_time()
            results = pool.run_batch(increment, batch, deadline)
            values[f"cpu_per_task_{workers}_us"] = (time.process_time() - cpu) / size * 1e6
        finally:
            pool.close()
        _check_results(results, 0)
    values["cpu_growth"] = values["cpu_per_task_64_us"] / values["cpu_per_task_2_us"]
    return values


#: Several pools loaded at once: this many pools of this many workers, each fed
#: by a thread of its own, against one pool of all their workers fed by as
#: many threads.
_POOLS, _WORKERS_PER_POOL = 4, 2


def _measure_pools(opener: _PoolOpener, size: int, deadline: float) -> dict[str, float]:
    """``size`` tiny tasks through 4 pools of 2 workers at once, then through 1 pool of 8.

    Each of 4 threads keeps 2 tasks per worker in flight in its pool (in the
    single pool, the 4 threads share it), timing each task from its submit to
    its result.  Several pools in one process share one interpreter: their
    dispatching threads take turns at the GIL, which one pool does not.
    """
    import threading

    from duckpool._bench._tasks import increment

    def load(pools: list[_PoolAdapter]) -> tuple[float, float]:
        share = size // _POOLS
        window = 2 * _WORKERS_PER_POOL
        times: list[list[float]] = [[] for _ in range(_POOLS)]
        errors: list[BaseException] = []

        def feed(index: int) -> None:
            pool = pools[index % len(pools)]
            try:
                in_flight: list[tuple[float, Any]] = []
                for i in range(share):
                    if len(in_flight) >= window:
                        started, handle = in_flight.pop(0)
                        pool.wait(handle, deadline)
                        times[index].append(time.perf_counter() - started)
                    in_flight.append((time.perf_counter(), pool.submit(increment, (i,))))
                for started, handle in in_flight:
                    pool.wait(handle, deadline)
                    times[index].append(time.perf_counter() - started)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=feed, args=(index,)) for index in range(_POOLS)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(_remaining(deadline))
        elapsed = time.perf_counter() - start
        if errors:
            raise errors[0]
        every = sorted(t for thread_times in times for t in thread_times)
        return share * _POOLS / elapsed, _percentile(every, 99)

    total = _POOLS * _WORKERS_PER_POOL
    several = [opener.open(workers=_WORKERS_PER_POOL) for _ in range(_POOLS)]
    try:
        for pool in several:
            _warm_up(pool, _WORKERS_PER_POOL, deadline)
        several_rate, several_p99 = load(several)
    finally:
        for pool in several:
            pool.close()
    one = opener.open(workers=total)
    try:
        _warm_up(one, total, deadline)
        one_rate, one_p99 = load([one])
    finally:
        one.close()
    return {
        "pools_tasks_per_s": several_rate,
        "pools_p99_us": several_p99 * 1e6,
        "pools_rate_share": 100 * several_rate / one_rate,
        "pools_p99_growth": several_p99 / one_p99,
    }


# --- a server's load: open-loop arrivals ------------------------------------------------

#: CPU per task of the server-load metrics.
_LOAD_TASK_S = 0.001
#: Offered loads, as shares of the baseline pool's capacity for those tasks.
_LOAD_LEVELS = (0.5, 0.8, 0.95)
#: Threads submitting the arrivals (a server's request threads).
_LOAD_THREADS = 16
#: Set by the parent for every load child of a table: "<spin iterations>,<capacity
#: in tasks/s>", both measured once on the baseline pool, so every library gets
#: the same tasks at the same rates.  Unset: the child measures them itself.
LOAD_ENVIRONMENT = "DUCKPOOL_BENCH_LOAD"
#: Set by the parent for the one child that measures them (and nothing else).
LOAD_CALIBRATE_ENVIRONMENT = "DUCKPOOL_BENCH_LOAD_CALIBRATE"


def _load_calibration(pool: _PoolAdapter, seconds: float, deadline: float) -> tuple[int, float]:
    """Spin iterations for a task of ~1 ms here, and the tasks per second
    ``pool`` completes of them when kept busy (2 in flight per worker), over
    about ``seconds`` of work (a second at most)."""
    from duckpool._bench._tasks import spin

    given = os.environ.get(LOAD_ENVIRONMENT)
    if given:
        spins, per_second = given.split(",")
        return int(spins), float(per_second)  # as the parent measured them
    iterations = _spin_iterations(_LOAD_TASK_S)
    workers = max(1, len(pool.worker_pids))
    count = max(20, int(min(1.0, seconds) / _LOAD_TASK_S) * workers)
    start = time.perf_counter()
    pool.run_windowed(spin, [(iterations,)] * count, 2 * workers, deadline)
    return iterations, count / (time.perf_counter() - start)


def _arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Poisson arrival times (seconds from the start) at ``rate`` per second.

    Seeded: every library gets the same arrivals at the same level.
    """
    import random

    generator = random.Random(seed)
    times: list[float] = []
    now = generator.expovariate(rate)
    while now < seconds:
        times.append(now)
        now += generator.expovariate(rate)
    return times


def _load_summary(
    arrivals: list[float], done: list[float], prefix: str, rate: float
) -> dict[str, float]:
    """Response times (arrival to completion) and the rate achieved, of one load level."""
    responses = sorted(end - start for start, end in zip(arrivals, done))
    span = max(done) - 0.0 if done else 0.0
    return {
        f"{prefix}_p50_us": _percentile(responses, 50) * 1e6,
        f"{prefix}_p99_us": _percentile(responses, 99) * 1e6,
        f"{prefix}_p999_us": _percentile(responses, 99.9) * 1e6,
        f"{prefix}_achieved": 100 * len(done) / span / rate if span > 0 else 0.0,
    }


def _offer(
    pool: _PoolAdapter,
    arrivals: list[float],
    function: Callable[..., Any],
    args: tuple[Any, ...],
    deadline: float,
) -> list[float]:
    """Submit one task per arrival, at its time, from 16 threads; when each was done.

    Times are seconds from the start, as the arrivals are.
    """
    import threading

    done = [0.0] * len(arrivals)
    finished = threading.Semaphore(0)
    errors: list[BaseException] = []
    start = time.perf_counter()

    def submit_share(first: int) -> None:
        try:
            for index in range(first, len(arrivals), _LOAD_THREADS):
                delay = start + arrivals[index] - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)

                def on_done(index: int = index) -> None:
                    done[index] = time.perf_counter() - start
                    finished.release()

                pool.submit_notify(function, args, on_done)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=submit_share, args=(first,)) for first in range(_LOAD_THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(_remaining(deadline))
    if errors:
        raise errors[0]
    for _ in arrivals:
        if not finished.acquire(timeout=_remaining(deadline)):
            raise TimeoutError("the measurement's deadline passed")
    return done


def _measure_load(pool: _PoolAdapter, size: int, deadline: float) -> dict[str, float]:
    """Open-loop arrivals of ~1 ms tasks for ``size`` ms at 50, 80 and 95 %
    of the baseline's capacity, submitted by 16 threads.

    Each task is submitted at its arrival time (by the thread it falls to) and
    timed from that arrival to the library's own notice that it is done, so
    a library that falls behind pays for the queue it builds, and a thread
    late to submit counts against it too (no coordinated omission).
    """
    from duckpool._bench._tasks import spin

    iterations, capacity = _load_calibration(pool, size / 1000, deadline)
    if os.environ.get(LOAD_CALIBRATE_ENVIRONMENT):
        return {"_iterations": float(iterations), "_capacity": capacity}
    values: dict[str, float] = {}
    for level in _LOAD_LEVELS:
        rate = level * capacity
        arrivals = _arrivals(rate, size / 1000, seed=int(level * 100))
        done = _offer(pool, arrivals, spin, (iterations,), deadline)
        values.update(_load_summary(arrivals, done, f"load{int(level * 100)}", rate))
    return {key: values[key] for key in _LOAD_KEYS}


def _measure_load_async(pool: _PoolAdapter, size: int, deadline: float) -> dict[str, float]:
    """Open-loop arrivals of ~1 ms tasks for ``size`` ms at 80 % of the
    baseline's capacity, from an asyncio loop through ``loop.run_in_executor``."""
    import asyncio

    from duckpool._bench._tasks import spin

    if pool.executor is None:
        raise _NotApplicable("not a concurrent.futures.Executor: no loop.run_in_executor")
    iterations, capacity = _load_calibration(pool, size / 1000, deadline)
    if os.environ.get(LOAD_CALIBRATE_ENVIRONMENT):
        return {"_iterations": float(iterations), "_capacity": capacity}
    level = _LOAD_LEVELS[1]
    rate = level * capacity
    arrivals = _arrivals(rate, size / 1000, seed=int(level * 100))
    done = [0.0] * len(arrivals)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        base = loop.time()

        async def one(index: int) -> None:
            await loop.run_in_executor(pool.executor, spin, iterations)
            done[index] = time.perf_counter() - start

        tasks = []
        for index, arrival in enumerate(arrivals):
            delay = base + arrival - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(index)))
        await asyncio.wait_for(asyncio.gather(*tasks), _remaining(deadline))

    asyncio.run(serve())
    summary = _load_summary(arrivals, done, "async80", rate)
    return {key: summary[key] for key in ("async80_p50_us", "async80_p99_us", "async80_achieved")}


def _achieved(key: str, load: str, short: str) -> Quantity:
    """The rate a load metric achieved, as a share of the rate offered (not ranked)."""
    return Quantity(key, f"{load}: rate achieved / offered", short, "%", True, False)


def _load_metric(
    name: str, summary: str, quantities: tuple[Quantity, ...], measure: _PoolMeasure
) -> Metric:
    """A load metric: sized in milliseconds per offered load, 250 (quick) or 4000."""
    return Metric(
        name=name,
        summary=summary,
        quantities=quantities,
        quick_size=250,
        full_size=4000,
        measure=measure,
        size_unit="ms per load",
        size_option=False,
    )


#: What the load metric reports (of everything _load_summary computes).
_LOAD_KEYS = (
    "load50_p99_us",
    "load80_p50_us",
    "load80_p99_us",
    "load80_p999_us",
    "load95_p99_us",
    "load80_achieved",
    "load95_achieved",
)


METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric(
            name="throughput",
            summary="submit N tiny tasks to a warmed pool, then wait for all results",
            quantities=(
                Quantity("tasks_per_s", "tiny-task throughput", "", "tasks/s", True, goal=5.0),
            ),
            quick_size=2_000,
            full_size=20_000,
            measure=_measure_throughput,
        ),
        Metric(
            name="latency",
            summary="one task at a time, submit then result(), M times",
            quantities=(
                Quantity("p50_us", "round-trip latency p50", "p50", "us", False, goal=0.35),
                Quantity("p99_us", "round-trip latency p99", "p99", "us", False, goal=0.6),
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
                Quantity(
                    "map_best_per_s", "map at best chunksize", "best", "items/s", True, goal=2.5
                ),
                Quantity("map_best_chunksize", "map: the best chunksize", "at", "", True, False),
                Quantity("map_auto_per_s", "map at automatic chunksize", "auto", "items/s", True),
                Quantity(
                    "map_auto_share", "map: automatic / best", "auto/best", "%", True, False, 80.0
                ),
            ),
            quick_size=2_000,
            full_size=100_000,
            measure=_measure_map,
            size_unit="items",
        ),
        Metric(
            name="startup",
            summary="construct a fresh pool, submit a tiny task, get its result; then shut "
            "the pool down until every process it started has exited",
            quantities=(
                Quantity("startup_us", "pool created to first result", "", "us", False, goal=0.8),
                Quantity(
                    "fresh_shutdown_us",
                    "shutdown right after the first result",
                    "shutdown",
                    "us",
                    False,
                    goal=1.0,
                ),
            ),
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
            quantities=(
                Quantity("shutdown_us", "shutdown of an idle pool", "", "us", False, goal=1.0),
            ),
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
            quantities=(
                Quantity("payload_mb_per_s", "1 MiB payload echo", "", "MB/s", True, goal=2.0),
            ),
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
                Quantity(
                    "pending_bytes", "parent memory per pending task", "", "B", False, goal=0.8
                ),
            ),
            quick_size=1_000,
            full_size=10_000,
            measure=_measure_pending,
            quick_reps=1,
        ),
        Metric(
            name="uss",
            summary="USS of the warm idle workers (median over workers; needs psutil)",
            quantities=(Quantity("worker_uss_bytes", "worker USS", "", "B", False, goal=1.2),),
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
                    goal=0.5,
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
        Metric(
            name="workers",
            summary="the parent's CPU time per tiny task, N tasks through warmed pools of "
            + ", ".join(map(str, _MANY_WORKERS))
            + " workers (--workers does not apply)",
            quantities=(
                *(
                    Quantity(
                        f"cpu_per_task_{n}_us",
                        f"parent CPU per task, {n} workers",
                        f"{n}w",
                        "us",
                        False,
                    )
                    for n in _MANY_WORKERS
                ),
                Quantity(
                    "cpu_growth",
                    f"parent CPU per task, {_MANY_WORKERS[-1]} / {_MANY_WORKERS[0]} workers",
                    "growth",
                    "x",
                    False,
                    False,
                    goal=1.5,
                ),
            ),
            quick_size=1_000,
            full_size=10_000,
            measure_own_pools=_measure_many_workers,
            quick_reps=1,
        ),
        Metric(
            name="pools",
            summary=f"N tiny tasks through {_POOLS} pools of {_WORKERS_PER_POOL} workers "
            f"loaded at once (a thread each), against 1 pool of "
            f"{_POOLS * _WORKERS_PER_POOL} fed by {_POOLS} threads (--workers does not apply)",
            quantities=(
                Quantity(
                    "pools_tasks_per_s",
                    f"{_POOLS} pools of {_WORKERS_PER_POOL}: throughput",
                    "rate",
                    "tasks/s",
                    True,
                ),
                Quantity(
                    "pools_p99_us",
                    f"{_POOLS} pools of {_WORKERS_PER_POOL}: p99 per task",
                    "p99",
                    "us",
                    False,
                ),
                Quantity(
                    "pools_rate_share",
                    f"{_POOLS} pools of {_WORKERS_PER_POOL} / 1 of "
                    f"{_POOLS * _WORKERS_PER_POOL}: throughput",
                    "share",
                    "%",
                    True,
                    False,
                    goal=80.0,
                ),
                Quantity(
                    "pools_p99_growth",
                    f"{_POOLS} pools of {_WORKERS_PER_POOL} / 1 of "
                    f"{_POOLS * _WORKERS_PER_POOL}: p99",
                    "p99 growth",
                    "x",
                    False,
                    False,
                    goal=1.2,
                ),
            ),
            quick_size=2_000,
            full_size=20_000,
            measure_own_pools=_measure_pools,
            quick_reps=1,
        ),
        _load_metric(
            "load",
            f"a server's load: Poisson arrivals of ~{_LOAD_TASK_S * 1e3:g} ms tasks for "
            f"N ms at each of {', '.join(f'{level:.0%}' for level in _LOAD_LEVELS)} of the "
            f"capacity the baseline reaches, submitted by {_LOAD_THREADS} threads; "
            "time from arrival to result",
            (
                Quantity("load50_p99_us", "load 50%: p99", "50% p99", "us", False),
                Quantity("load80_p50_us", "load 80%: p50", "80% p50", "us", False),
                Quantity(
                    "load80_p99_us",
                    "load 80%: p99",
                    "80% p99",
                    "us",
                    False,
                    goal=0.5,
                    best_of_peers=True,
                ),
                Quantity("load80_p999_us", "load 80%: p99.9", "80% p99.9", "us", False),
                Quantity("load95_p99_us", "load 95%: p99", "95% p99", "us", False),
                _achieved("load80_achieved", "load 80%", "80% rate"),
                _achieved("load95_achieved", "load 95%", "95% rate"),
            ),
            _measure_load,
        ),
        _load_metric(
            "load_async",
            f"as load, at {_LOAD_LEVELS[1]:.0%}, the arrivals made by an asyncio loop "
            "through loop.run_in_executor",
            (
                Quantity("async80_p50_us", "asyncio load 80%: p50", "p50", "us", False),
                Quantity(
                    "async80_p99_us",
                    "asyncio load 80%: p99",
                    "p99",
                    "us",
                    False,
                    goal=0.5,
                    best_of_peers=True,
                ),
                _achieved("async80_achieved", "asyncio load 80%", "rate"),
            ),
            _measure_load_async,
        ),
    )
}
