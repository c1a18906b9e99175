"""``duckpool bench``: duckpool's executor side by side with its peers.

Every number is reported as a ratio to the standard library's
``concurrent.futures.ProcessPoolExecutor`` measured in the same run::

    parent: main()                               child: python -m duckpool._bench --child
    ---------------------------------------      -------------------------------------------
    for rep in 1..K:                             open ONE fresh pool of ONE library
      for metric in --metrics:                   warm it: every worker seen, one round done
        for lib in --libs (rotated by rep): ---> run ONE metric, write its values (JSON file)
          start child in its own session         shut the pool down, write the file again
          wait up to --timeout; then kill the
          whole process group -> cell failed
    per cell: median, min-max of the reps; ratio = lib median / stdlib median
    -> terminal table (or --markdown) on stdout, --json FILE, progress on stderr

Reps are interleaved (rep 1 of every library, then rep 2, ...) and the order of
the libraries rotates each rep, so a slow minute of the machine or the position
in the sequence does not land on one library only.

Adding a metric: write ``_measure_<name>(pool, size, deadline) -> {key: value}``
and register a :class:`Metric` for it in :data:`METRICS`; each of its
:class:`Quantity` entries becomes one row of the table.  Adding a library: write
``_open_<name>(workers, start_method) -> _PoolAdapter`` and register a
:class:`_Library` in :data:`LIBRARIES`.

The module is imported by every spawned worker of a child (it is the child's
``__main__``), so its top-level imports stay minimal; everything else is
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
_QUICK_REPS = 3
_DEFAULT_REPS = 5


class _BenchError(Exception):
    """A measurement could not be made (wrong result, workers never started)."""


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


class _PoolAdapter:
    """One library's pool, behind the operations the metrics use.

    ``submit`` returns the library's own handle (a future, an ``AsyncResult``);
    ``wait`` blocks on it until the deadline and returns the task's value or
    raises what the library raises (its timeout error past the deadline).
    """

    def __init__(
        self,
        submit: Callable[[_TaskFunction, tuple[Any, ...]], Any],
        wait: Callable[[Any, float], Any],
        close: Callable[[], None],
    ) -> None:
        self._submit = submit
        self._wait = wait
        self._close = close

    def submit(self, function: _TaskFunction, args: tuple[Any, ...]) -> Any:
        return self._submit(function, args)

    def wait(self, handle: Any, deadline: float) -> Any:
        return self._wait(handle, _remaining(deadline))

    def run_batch(
        self, function: _TaskFunction, batch: Sequence[tuple[Any, ...]], deadline: float
    ) -> list[Any]:
        """Submit every task first, then wait for each result in submission order."""
        handles = [self.submit(function, args) for args in batch]
        return [self.wait(handle, deadline) for handle in handles]

    def close(self) -> None:
        """Shut the pool down gracefully: wait for its workers to exit."""
        self._close()


class _PipeFloorAdapter(_PoolAdapter):
    """The floor: one ``multiprocessing.Pipe`` per worker and nothing else.

    No futures, no queues, no threads: the parent sends ``(fn, args)`` on a
    worker's pipe and receives the value.  Tasks go round-robin; ``run_batch``
    keeps at most ``_WINDOW`` tasks in flight per worker so that neither side
    ever blocks on a full pipe while the other does too.
    """

    _WINDOW = 32

    def __init__(self, workers: int, start_method: Optional[str]) -> None:
        from duckpool import _bench_tasks

        context = _mp_context(start_method)
        self._connections: list[Connection] = []
        self._processes: list[BaseProcess] = []
        self._next = 0
        for _ in range(workers):
            parent_end, worker_end = context.Pipe(duplex=True)
            process = context.Process(
                target=_bench_tasks.pipe_worker_loop, args=(worker_end,), daemon=True
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
        self, function: _TaskFunction, batch: Sequence[tuple[Any, ...]], deadline: float
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
                    if len(pending) < self._WINDOW and next_task < len(batch):
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


def _futures_adapter(executor: Any, close: Optional[Callable[[], None]] = None) -> _PoolAdapter:
    """Adapter for anything with the stdlib executor API (``submit`` -> Future)."""
    return _PoolAdapter(
        submit=lambda function, args: executor.submit(function, *args),
        wait=lambda future, timeout: future.result(timeout=timeout),
        close=close or (lambda: executor.shutdown(wait=True)),
    )


def _open_duckpool(workers: int, start_method: Optional[str]) -> _PoolAdapter:
    from duckpool import ProcessPoolExecutor

    if start_method is None:
        return _futures_adapter(ProcessPoolExecutor(max_workers=workers))
    context = _mp_context(start_method)
    return _futures_adapter(ProcessPoolExecutor(max_workers=workers, mp_context=context))


def _open_stdlib(workers: int, start_method: Optional[str]) -> _PoolAdapter:
    from concurrent.futures import ProcessPoolExecutor

    context = None if start_method is None else _mp_context(start_method)
    return _futures_adapter(ProcessPoolExecutor(max_workers=workers, mp_context=context))


def _open_mpool(workers: int, start_method: Optional[str]) -> _PoolAdapter:
    pool = _mp_context(start_method).Pool(processes=workers)

    def close() -> None:
        pool.close()
        pool.join()

    return _PoolAdapter(
        submit=lambda function, args: pool.apply_async(function, args),
        wait=lambda result, timeout: result.get(timeout=timeout),
        close=close,
    )


def _open_loky(workers: int, start_method: Optional[str]) -> _PoolAdapter:
    # The peers are an optional extra: mypy may run where they are not installed.
    import loky  # type: ignore[import-untyped,import-not-found,unused-ignore]

    context = None
    if start_method is not None:
        from loky.backend.context import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
            get_context,
        )

        context = get_context(start_method)
    return _futures_adapter(loky.ProcessPoolExecutor(max_workers=workers, context=context))


def _open_pebble(workers: int, start_method: Optional[str]) -> _PoolAdapter:
    import pebble  # type: ignore[import-not-found,unused-ignore]

    pool: Any  # pebble's close() and join() carry no annotations
    if start_method is None:
        pool = pebble.ProcessPool(max_workers=workers)
    else:
        pool = pebble.ProcessPool(max_workers=workers, context=_mp_context(start_method))

    def close() -> None:
        pool.close()
        pool.join()

    return _PoolAdapter(
        submit=lambda function, args: pool.schedule(function, args=args),
        wait=lambda future, timeout: future.result(timeout=timeout),
        close=close,
    )


def _open_mpire(workers: int, start_method: Optional[str]) -> _PoolAdapter:
    from mpire.pool import WorkerPool  # type: ignore[import-not-found,unused-ignore]

    if start_method is None:
        pool = WorkerPool(n_jobs=workers)
    else:
        pool = WorkerPool(n_jobs=workers, start_method=start_method)
    return _PoolAdapter(
        submit=lambda function, args: pool.apply_async(function, args=args),
        wait=lambda result, timeout: result.get(timeout=timeout),
        close=pool.stop_and_join,
    )


def _open_pipe(workers: int, start_method: Optional[str]) -> _PoolAdapter:
    return _PipeFloorAdapter(workers, start_method)


@dataclass(frozen=True)
class _Library:
    """A column of the table: how to check for it and how to open its pool in a child."""

    name: str
    description: str
    module: Optional[str]  # import name checked before running; None: always present
    open_pool: Callable[[int, Optional[str]], _PoolAdapter]


LIBRARIES: dict[str, _Library] = {
    library.name: library
    for library in (
        _Library("duckpool", "duckpool.ProcessPoolExecutor", "duckpool", _open_duckpool),
        _Library("stdlib", "concurrent.futures.ProcessPoolExecutor", None, _open_stdlib),
        _Library("mpool", "multiprocessing.Pool.apply_async", None, _open_mpool),
        _Library("loky", "loky.ProcessPoolExecutor", "loky", _open_loky),
        _Library("pebble", "pebble.ProcessPool.schedule", "pebble", _open_pebble),
        _Library("mpire", "mpire.WorkerPool.apply_async", "mpire", _open_mpire),
        _Library("pipe", "bare multiprocessing.Pipe per worker (the floor)", None, _open_pipe),
    )
}


def _warm_up(pool: _PoolAdapter, workers: int, deadline: float) -> list[str]:
    """Reach every worker at least once, then run one round of tiny tasks.

    Pools that start workers on demand only start the second one when the first
    is busy, hence tasks that sleep briefly and report their worker.  Returns
    how the workers were started (see :func:`_bench_tasks.worker_identity`).
    """
    from duckpool import _bench_tasks

    seen: dict[int, str] = {}
    while len(seen) < workers:
        if time.monotonic() >= deadline:
            raise _BenchError(f"warm-up reached only {len(seen)} of {workers} workers")
        batch = [(0.02, os.getpid())] * (2 * workers)
        seen.update(pool.run_batch(_bench_tasks.worker_identity, batch, deadline))
    pool.run_batch(_bench_tasks.increment, [(i,) for i in range(_WARM_UP_ROUND)], deadline)
    for i in range(10):
        pool.wait(pool.submit(_bench_tasks.increment, (i,)), deadline)
    return sorted(set(seen.values()))


# --------------------------------------------------------------------------------------
# Metrics: each measures one warmed pool and returns {quantity key: value}.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantity:
    """One number a metric reports: one row of the table."""

    key: str
    label: str
    short: str  # how the progress line names it; "" when the metric has one quantity
    unit: str  # "tasks/s" or "us"; _format_value knows how to print each
    higher_is_better: bool


@dataclass(frozen=True)
class Metric:
    """A registered measurement: what it reports, how big it is, how it is made."""

    name: str
    summary: str
    quantities: tuple[Quantity, ...]
    quick_size: int
    full_size: int
    measure: Callable[[_PoolAdapter, int, float], dict[str, float]]


def _check_results(results: Sequence[Any], first_argument: int) -> None:
    expected = list(range(first_argument + 1, first_argument + 1 + len(results)))
    if list(results) != expected:
        wrong = next(i for i, (a, b) in enumerate(zip(results, expected)) if a != b)
        raise _BenchError(f"task {wrong} returned {results[wrong]!r}, expected {expected[wrong]!r}")


def _measure_throughput(pool: _PoolAdapter, size: int, deadline: float) -> dict[str, float]:
    from duckpool._bench_tasks import increment

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
    from duckpool._bench_tasks import increment

    samples: list[float] = []
    for i in range(size):
        start = time.perf_counter()
        value = pool.wait(pool.submit(increment, (i,)), deadline)
        samples.append(time.perf_counter() - start)
        if value != i + 1:
            raise _BenchError(f"round trip {i} returned {value!r}, expected {i + 1}")
    samples.sort()
    return {"p50_us": _percentile(samples, 50) * 1e6, "p99_us": _percentile(samples, 99) * 1e6}


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
            quick_size=1_000,
            full_size=5_000,
            measure=_measure_latency,
        ),
    )
}


def _child_main(options: argparse.Namespace) -> int:
    """Measure one metric of one library once and write the outcome to the result file.

    The file is written after the measurement and again after the pool has shut
    down, so a parent that had to kill a child can tell a hung shutdown from a
    hung measurement.
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

    try:
        from duckpool import _bench_tasks

        # Before the pool exists: forked workers must inherit it (see worker_identity).
        _bench_tasks.bench_child_pid = os.getpid()
        pool = LIBRARIES[options.lib].open_pool(options.workers, options.start_method)
        try:
            record["worker_start"] = _warm_up(pool, options.workers, deadline)
            values = METRICS[options.metric].measure(pool, options.size, deadline)
            record["values"] = values
            record["measured"] = True
            write()
        finally:
            started = time.perf_counter()
            pool.close()
            record["shutdown_s"] = time.perf_counter() - started
        record["ok"] = True
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


@dataclass(frozen=True)
class _Plan:
    """What this run measures, decided from the options before anything starts."""

    command: str
    libraries: tuple[str, ...]
    skipped: dict[str, str]
    metrics: tuple[str, ...]
    sizes: dict[str, int]
    reps: int
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

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def _child_command(plan: _Plan, library: str, metric: str, result_path: str) -> list[str]:
    command = [
        sys.executable, "-m", "duckpool._bench", "--child",
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
                summary: dict[str, Any] = {
                    "samples": values,
                    "median": statistics.median(values) if values else None,
                    "min": min(values) if values else None,
                    "max": max(values) if values else None,
                    "ratio": None,
                    "failures": list(cell.failures),
                }
                row_cells[library] = summary
            baseline = row_cells.get(_BASELINE, {}).get("median")
            for summary in row_cells.values():
                if baseline and summary["median"] is not None:
                    summary["ratio"] = summary["median"] / baseline
            rows.append(
                {
                    "metric": metric_name,
                    "quantity": quantity.key,
                    "label": quantity.label,
                    "unit": quantity.unit,
                    "higher_is_better": quantity.higher_is_better,
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
    """``low-high`` of the reps; empty with fewer than two reps."""
    if len(summary["samples"]) < 2:
        return ""
    return _format_range([summary["min"], summary["max"]], unit)


def _format_range(values: list[float], unit: str) -> str:
    """One value, or ``low-high``, with the unit once at the end."""
    dash = _dash()
    if unit == "tasks/s":
        return dash.join(_format_number(v) for v in values) + "/s"
    if unit == "us":
        if max(values) >= 1000:
            return dash.join(f"{v / 1000:.3g}" for v in values) + " ms"
        return dash.join(f"{v:.3g}" for v in values) + f" {_microseconds()}"
    return dash.join(_format_number(v) for v in values) + f" {unit}"


def _format_cell(summary: dict[str, Any], unit: str) -> str:
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
    better = "higher is better" if row["higher_is_better"] else "lower is better"
    return f"{row['label']} ({unit})", better


def _header_lines(plan: _Plan, date: str, machine: dict[str, Any], python: str) -> list[str]:
    import multiprocessing

    if plan.start_method is None:
        method = f"library defaults (multiprocessing: {multiprocessing.get_start_method()})"
    else:
        method = plan.start_method
    cores = f"{machine['cores']} cores"
    if machine["usable_cores"] != machine["cores"]:
        cores += f" ({machine['usable_cores']} usable)"
    described = ", ".join(part for part in (machine["system"], cores, machine["cpu"]) if part)
    sizes = ", ".join(f"{name} {plan.sizes[name]} tasks" for name in plan.metrics)
    return [
        f"{plan.command} | {date} | {python} | {described} | start method: {method}",
        f"{plan.workers} workers, {plan.reps} reps per cell (median, min{_dash()}"
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
        "--quick", action="store_true", help=f"small sizes and {_QUICK_REPS} reps (< 1 minute)"
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
        choices=("fork", "spawn", "forkserver"),
        help="start method for every library (default: each library's own default)",
    )
    parser.add_argument(
        "--size", type=int, help="tasks per measurement for every metric (overrides --quick)"
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
        "--markdown", action="store_true", help="print a Markdown table instead of plain text"
    )
    # The child mode, used by the harness itself.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lib", help=argparse.SUPPRESS)
    parser.add_argument("--metric", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    return parser


def _make_plan(
    parser: argparse.ArgumentParser, options: argparse.Namespace, argv: Sequence[str]
) -> _Plan:
    """Check the options (bad ones exit 2 through ``parser.error``) and decide the run."""
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
    if options.start_method is not None and options.start_method not in available:
        parser.error(
            f"--start-method {options.start_method} is not available on this platform "
            f"(available: {', '.join(available)})"
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
        return options.size or (metric.quick_size if options.quick else metric.full_size)

    sizes = {name: size_of(METRICS[name]) for name in metrics}
    reps = options.reps or (_QUICK_REPS if options.quick else _DEFAULT_REPS)
    return _Plan(
        command=shlex.join(["duckpool", "bench", *argv]),
        libraries=libraries,
        skipped=skipped,
        metrics=metrics,
        sizes=sizes,
        reps=reps,
        workers=options.workers,
        start_method=options.start_method,
        timeout=options.timeout,
    )


def _run_plan(plan: _Plan) -> dict[tuple[str, str], _Cell]:
    """Every rep of every metric of every library, interleaved; progress on stderr."""
    cells = {(metric, library): _Cell() for metric in plan.metrics for library in plan.libraries}
    total = plan.reps * len(plan.metrics) * len(plan.libraries)
    done = 0
    for rep in range(plan.reps):
        shift = rep % max(1, len(plan.libraries))
        order = plan.libraries[shift:] + plan.libraries[:shift]
        for metric_name in plan.metrics:
            metric = METRICS[metric_name]
            for library in order:
                started = time.monotonic()
                record = _run_child(plan, library, metric_name)
                done += 1
                cell = cells[(metric_name, library)]
                if record.get("ok"):
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
                        print(record["traceback"].rstrip(), file=sys.stderr)
                print(
                    f"[{done:>{len(str(total))}}/{total}] rep {rep + 1}/{plan.reps} "
                    f"{metric_name:<10} {library:<8} {outcome} "
                    f"({time.monotonic() - started:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    return cells


def _report_lines(
    plan: _Plan,
    rows: list[dict[str, Any]],
    header: list[str],
    worker_start: dict[str, list[str]],
    markdown: bool,
) -> list[str]:
    """The whole report: header, skipped libraries, table, legend, failures."""
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
    failures = [
        f"failed {row['metric']} {library}: {message}"
        for row in rows
        if row["quantity"] == METRICS[row["metric"]].quantities[0].key  # once per metric
        for library, summary in row["cells"].items()
        for message in summary["failures"]
    ]
    if failures:
        lines.append("")
        lines += failures
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``duckpool bench`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Returns 0 when every measurement completed, 1 when any failed or timed out
    (the table still shows the others; each failure is listed under it), 2 on
    bad options (the message names the option and the value), 130 when
    interrupted (the running child is killed first).  Libraries that are not
    installed are skipped with one printed line and do not fail the run.
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
        plan = _make_plan(parser, options, arguments)
    except SystemExit as exc:  # argparse's way out: --help (0) and bad options (2)
        return exc.code if isinstance(exc.code, int) else 2

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = _machine()
    python = f"{platform.python_implementation()} {platform.python_version()}"
    print(
        f"running {plan.reps} reps x {len(plan.metrics)} metrics x {len(plan.libraries)} "
        f"libraries ({', '.join(plan.libraries)}), one child process each",
        file=sys.stderr,
        flush=True,
    )
    try:
        cells = _run_plan(plan)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    rows = _summarise(plan, cells)
    worker_start = {
        library: sorted(
            set().union(*(cells[(metric, library)].worker_start for metric in plan.metrics))
        )
        for library in plan.libraries
    }
    header = _header_lines(plan, date, machine, python)
    print("\n".join(_report_lines(plan, rows, header, worker_start, options.markdown)))

    if options.json:
        document = {
            "schema": 1,
            "command": plan.command,
            "date": date,
            "python": python,
            "machine": machine,
            "start_method": plan.start_method,
            "worker_start": worker_start,
            "workers": plan.workers,
            "reps": plan.reps,
            "baseline": _BASELINE,
            "libraries": list(plan.libraries),
            "skipped": plan.skipped,
            "rows": rows,
        }
        with open(options.json, "w", encoding="utf-8") as stream:
            json.dump(document, stream, indent=2)
            stream.write("\n")
    failed = any(summary["failures"] for row in rows for summary in row["cells"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
