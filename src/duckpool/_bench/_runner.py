"""Runs the measurements: one fresh child process each, and none may hang the run.

Parent side: :func:`_run_plan` goes through a :class:`_Plan` rep by rep (reps
interleaved, the libraries rotated each rep), runs each measurement in a child
with :func:`_run_child` and reports progress on stderr (:class:`_Progress`);
:func:`_summarise` turns each library's :class:`_Cell` of reps into the rows of
a table.  Child side: :func:`_child_main` opens, warms and measures one pool of
one library (or lets an own-pool metric open its own) and writes the outcome
to a JSON file for the parent.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, cast

from duckpool._bench._adapters import (
    _BASELINE,
    LIBRARIES,
    _NotApplicable,
    _PoolOpener,
    _PoolOptions,
    _warm_up,
)
from duckpool._bench._metrics import METRICS
from duckpool._bench._plan import _Plan
from duckpool._bench._report import _format_value

if TYPE_CHECKING:
    import argparse

    from duckpool._bench._metrics import _PoolMeasure


# --------------------------------------------------------------------------------------
# Child side: one measurement, its outcome written for the parent.
# --------------------------------------------------------------------------------------


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
# Parent side: run the children, one at a time, and summarise their reps.
# --------------------------------------------------------------------------------------


@dataclass
class _Cell:
    """One library's reps for one metric."""

    samples: list[dict[str, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    worker_start: set[str] = field(default_factory=set)  # as the warm-up observed it
    not_applicable: Optional[str] = None  # why the metric does not apply to the library


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


# No __main__ module for spawned workers to re-import (see the package docstring).
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
                    "ratio_spread": None,
                    "failures": list(cell.failures),
                    "not_applicable": cell.not_applicable,
                }
                row_cells[library] = summary
            baseline_cell = row_cells.get(_BASELINE, {})
            baseline = baseline_cell.get("median")
            for summary in row_cells.values():
                if quantity.compared and baseline and summary["median"] is not None:
                    summary["ratio"] = summary["median"] / baseline
                    summary["ratio_spread"] = _ratio_spread(
                        summary["samples"], baseline_cell["samples"]
                    )
            rows.append(
                {
                    "metric": metric_name,
                    "quantity": quantity.key,
                    "label": quantity.label,
                    "unit": quantity.unit,
                    "higher_is_better": quantity.higher_is_better,
                    "compared": quantity.compared,
                    "goal": quantity.goal,
                    "best_of_peers": quantity.best_of_peers,
                    "size": plan.sizes[metric_name],
                    "cells": row_cells,
                }
            )
    return rows


def _ratio_spread(samples: list[float], baseline: list[float]) -> Optional[list[float]]:
    """The lowest and highest ratio of one rep to the baseline's same rep.

    Reps are interleaved across libraries, so rep ``i`` of each ran at about
    the same time, under the same load: its ratio carries the run-to-run
    spread a ratio of medians hides.  None with fewer than two paired reps.
    """
    ratios = [value / base for value, base in zip(samples, baseline) if base]
    if len(ratios) < 2:
        return None
    return [min(ratios), max(ratios)]


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


_LOAD_METRICS = frozenset({"load", "load_async"})


def _children_needed(plan: _Plan) -> int:
    calibration = 1 if _LOAD_METRICS & set(plan.metrics) else 0
    return calibration + sum(
        plan.metric_reps[metric]
        for metric in plan.metrics
        for library in plan.libraries
        if metric not in LIBRARIES[library].not_applicable
    )


def _calibrate_load(plan: _Plan, progress: _Progress) -> None:
    """Measure, once for the table, the load metrics' task and the baseline's
    capacity for it, and hand both to every load child (through the environment).

    If that fails, each load child measures them itself: the rates then
    differ a little between libraries, which the progress line says.
    """
    from duckpool._bench._metrics import LOAD_CALIBRATE_ENVIRONMENT, LOAD_ENVIRONMENT

    os.environ.pop(LOAD_ENVIRONMENT, None)
    what = f"{plan.start_method or 'default'} load: the {_BASELINE} pool's capacity"
    progress.running(what)
    started = time.monotonic()
    os.environ[LOAD_CALIBRATE_ENVIRONMENT] = "1"
    try:
        # (Either load metric measures them; the one in the plan has a size.)
        metric = next(name for name in sorted(_LOAD_METRICS) if name in plan.metrics)
        record = _run_child(plan, _BASELINE, metric)
    finally:
        del os.environ[LOAD_CALIBRATE_ENVIRONMENT]
    values = record.get("values") or {}
    if record.get("ok") and "_capacity" in values:
        iterations, capacity = int(values["_iterations"]), values["_capacity"]
        os.environ[LOAD_ENVIRONMENT] = f"{iterations},{capacity!r}"
        outcome = f"{capacity:.0f} tasks/s of {iterations} spins each"
    else:
        outcome = f"FAILED ({record.get('error', 'no result')}): each load child measures its own"
    progress.finished(what, outcome, time.monotonic() - started)


def _run_plan(plan: _Plan, progress: _Progress) -> dict[tuple[str, str], _Cell]:
    """Every rep of every metric of every library, interleaved; progress on stderr."""
    cells = {(metric, library): _Cell() for metric in plan.metrics for library in plan.libraries}
    for (metric_name, library), cell in cells.items():
        cell.not_applicable = LIBRARIES[library].not_applicable.get(metric_name)
    method = plan.start_method or "default"
    if _LOAD_METRICS & set(plan.metrics):
        _calibrate_load(plan, progress)
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
    if _LOAD_METRICS & set(plan.metrics):
        from duckpool._bench._metrics import LOAD_ENVIRONMENT

        os.environ.pop(LOAD_ENVIRONMENT, None)  # the next table measures its own
    return cells
