"""``duckpool bench``'s command line: its options, and the main of both its ends.

In the parent, :func:`main` checks the options into one :class:`_Plan` per
start method (bad ones exit 2 before anything starts), runs them and prints the
report.  In a child, started by the runner with the hidden ``--child``
options, it makes that one measurement.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

from duckpool._bench._adapters import _BASELINE, LIBRARIES, _find_missing
from duckpool._bench._metrics import METRICS, Metric
from duckpool._bench._plan import _Plan
from duckpool._bench._report import (
    _document,
    _goal_results,
    _goal_summary,
    _header_lines,
    _machine,
    _report_lines,
    _reps_text,
    _write_json,
    _write_plot,
)
from duckpool._bench._runner import (
    _child_main,
    _children_needed,
    _Progress,
    _run_plan,
    _summarise,
)

__all__ = ["main"]

_DEFAULT_TIMEOUT_S = 60.0
_QUICK_REPS = 2
_DEFAULT_REPS = 5
_START_METHODS = ("fork", "spawn", "forkserver")


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
    from duckpool._bench._bytecode import compile_libraries  # (the parent's alone)

    compiled = compile_libraries(
        module for library in first.libraries for module in LIBRARIES[library].imports
    )
    if compiled:
        print(
            f"byte-compiled {len(compiled)} modules of the measured libraries first, as "
            "pip install does (this environment had not: pip --no-compile, "
            "PYTHONDONTWRITEBYTECODE, or a source checkout)",
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
                {
                    "start_method": plan.start_method,
                    "worker_start": worker_start,
                    "rows": rows,
                    "goals": _goal_results(rows),
                }
            )
    except KeyboardInterrupt:
        progress.close()
        print("interrupted", file=sys.stderr)
        return 130
    progress.close()
    print("\n\n".join(reports))
    if len(runs) > 1:
        print("\n" + "\n".join(["goals met, per start method:", *_goal_summary(runs)]))

    document = _document(plans, date, python, machine, runs)
    if options.json:
        _write_json(options.json, document)
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
