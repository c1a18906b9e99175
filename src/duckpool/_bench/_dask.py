"""``duckpool bench --backend dask``: what DaskExecutor adds to a plain Dask round trip.

One LocalCluster, one Client; the same tiny task run N times one after the
other, each submitted and waited for before the next::

    plain:    client.submit(increment, i, pure=False).result()
    duckpool: DaskExecutor.submit(increment, i).result()   (same client, same cluster)

Reps alternate the order of the two (plain first, then duckpool first, ...), so
a slow moment of the machine does not land on one side only.  The report is the
median time per task of each side over the reps, their min-max, and the ratio
duckpool / plain (the goal is <= 1.1: the executor's bridge adds little to what
Dask itself costs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable, Optional

from duckpool._bench import _tasks

__all__ = ["main"]

_GOAL = 1.1


def _time_per_task(run_one: Callable[[int], Any], tasks: int) -> float:
    """Seconds per task of ``tasks`` sequential round trips."""
    began = time.perf_counter()
    for i in range(tasks):
        if run_one(i) != i + 1:
            raise RuntimeError(f"increment({i}) came back wrong")
    return (time.perf_counter() - began) / tasks


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duckpool bench --backend dask",
        description="Per-task overhead of duckpool.DaskExecutor over plain client.submit, "
        "on one LocalCluster (needs duckpool[dask]).",
    )
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster workers (default 2)")
    parser.add_argument("--tasks", type=int, default=400, help="tasks per rep and side (400)")
    parser.add_argument("--reps", type=int, default=7, help="reps per side (default 7)")
    parser.add_argument("--quick", action="store_true", help="100 tasks, 3 reps")
    return parser


def _format_time(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs" if seconds < 0.01 else f"{seconds * 1e3:.2f} ms"


def main(argv: Optional[list[str]] = None) -> int:
    """Run the comparison and print it; 0 on success, 2 on a usage error."""
    parser = _build_parser()
    try:
        options = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and bad options (2)
        return int(exc.code or 0)
    tasks, reps = (100, 3) if options.quick else (options.tasks, options.reps)
    if min(options.workers, tasks, reps) < 1:
        parser.print_usage(sys.stderr)
        print("--workers, --tasks and --reps must be >= 1", file=sys.stderr)
        return 2
    from duckpool._dask import DaskExecutor

    task = _tasks.increment
    print(f"starting a LocalCluster of {options.workers} workers...", file=sys.stderr)
    with DaskExecutor(options.workers) as executor:
        client = executor.client

        def plain(i: int) -> Any:
            return client.submit(task, i, pure=False).result()

        def duckpool(i: int) -> Any:
            return executor.submit(task, i).result()

        sides = {"plain client.submit": plain, "DaskExecutor.submit": duckpool}
        for run_one in sides.values():  # warm up: workers have imported the task
            _time_per_task(run_one, min(tasks, 50))
        samples: dict[str, list[float]] = {name: [] for name in sides}
        for rep in range(reps):
            order = list(sides) if rep % 2 == 0 else list(reversed(sides))
            for name in order:
                samples[name].append(_time_per_task(sides[name], tasks))
            print(f"rep {rep + 1}/{reps} done", file=sys.stderr)

    plain_median = statistics.median(samples["plain client.submit"])
    ours_median = statistics.median(samples["DaskExecutor.submit"])
    ratio = ours_median / plain_median
    print(
        f"duckpool bench --backend dask: {options.workers} workers, "
        f"{tasks} sequential tiny tasks x {reps} reps, submit+result per task"
    )
    width = max(len(name) for name in samples)
    for name, values in samples.items():
        print(
            f"  {name.ljust(width)}  median {_format_time(statistics.median(values))}"
            f"  (min-max {_format_time(min(values))}-{_format_time(max(values))})"
        )
    verdict = "within" if ratio <= _GOAL else "above"
    print(f"  overhead ratio DaskExecutor / plain: {ratio:.3f} ({verdict} the goal <= {_GOAL})")
    return 0
