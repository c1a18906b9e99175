"""The ``duckpool`` command: ``demo``, ``bench`` and ``info``.

``duckpool demo`` is a short, readable show of what duckpool is for; the
functions it runs in workers live in :mod:`duckpool._demo_tasks`.
``duckpool bench`` forwards its arguments to :func:`duckpool._bench.main`,
imported only when asked for (it pulls in the peers it measures).
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import duckpool
from duckpool import _demo_tasks
from duckpool._cpus import cpu_budget
from duckpool._demo_tasks import Receipt
from duckpool._errors import UnknownTaskError, WorkerDiedError
from duckpool._manager import ProcessPoolManager, get_or_create_process_manager

__all__ = ["main"]

# Every wait in the demo has this deadline: a hang is reported, never waited out.
_RESULT_TIMEOUT = 30.0


def main(argv: Optional[list[str]] = None) -> int:
    """Run the ``duckpool`` command line; return its exit status.

    ``argv`` defaults to ``sys.argv[1:]``.  Returns 0 on success, 1 when the
    demo saw something other than the promised behaviour, 2 on a usage error,
    and whatever ``duckpool._bench.main`` returns for ``bench``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    # "bench" takes its options from the harness, --help included, so its
    # arguments bypass this parser entirely.
    if args and args[0] == "bench":
        return _run_bench(args[1:])
    parser = _build_parser()
    options = parser.parse_args(args)
    if options.command == "demo":
        if options.backend == "dask" and options.start_method is not None:
            parser.error("--start-method applies to --backend local only")
        return run_demo(options.start_method, backend=options.backend)
    if options.command == "info":
        return _run_info()
    parser.print_help()
    return 2


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duckpool",
        description="Named, typed, fork-aware, self-healing process pools.",
    )
    parser.add_argument("--version", action="version", version=f"duckpool {duckpool.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="a short show of two typed pools, a crashed worker and the pool healing",
        description="Run two named, typed pools side by side and show what duckpool does.",
    )
    demo.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        default=None,
        help="how workers are started (default: the platform default, "
        f"here {_default_start_method()!r})",
    )
    demo.add_argument(
        "--backend",
        choices=("local", "dask"),
        default="local",
        help="local worker processes (default), or a Dask LocalCluster per pool "
        '(needs pip install "duckpool[dask]")',
    )
    commands.add_parser(
        "bench",
        add_help=False,
        help="compare duckpool with its peers (see 'duckpool bench --help'); "
        "'duckpool bench --backend dask' measures the Dask backend's overhead",
    )
    commands.add_parser(
        "info",
        help="version, Python, start methods and CPU count",
    )
    return parser


def _default_start_method() -> str:
    """The start method a context-less pool would use on this platform and Python."""
    return multiprocessing.get_context().get_start_method()


def _run_bench(args: list[str]) -> int:
    backend, args = _take_backend(args)
    if backend == "dask":
        from duckpool._bench import _dask  # lazy: needs the dask extra

        return _dask.main(args)
    if backend != "local":
        print(
            f"duckpool bench: --backend must be 'local' or 'dask', got {backend!r}", file=sys.stderr
        )
        return 2
    from duckpool import _bench  # lazy: the harness imports the peers it measures

    return _bench.main(args)


def _take_backend(args: list[str]) -> tuple[str, list[str]]:
    """Split ``--backend NAME`` (or ``--backend=NAME``) off the bench arguments."""
    rest = list(args)
    for i, arg in enumerate(rest):
        if arg == "--backend" and i + 1 < len(rest):
            return rest[i + 1], rest[:i] + rest[i + 2 :]
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1], rest[:i] + rest[i + 1 :]
    return "local", rest


def _run_info() -> int:
    try:
        usable = str(len(os.sched_getaffinity(0)))
    except AttributeError:  # not on this platform
        usable = "unknown"
    rows = [
        ("duckpool", f"{duckpool.__version__} ({os.path.dirname(duckpool.__file__ or '')})"),
        (
            "python",
            f"{platform.python_version()} ({platform.python_implementation()}) {sys.executable}",
        ),
        ("platform", platform.platform()),
        ("start methods", ", ".join(multiprocessing.get_all_start_methods())),
        ("default method", _default_start_method()),
        ("cpu count", f"{os.cpu_count()} (usable by this process: {usable})"),
        ("default workers", "{} ({})".format(*cpu_budget())),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    return 0


# --------------------------------------------------------------------- demo --


@dataclass
class _PoolTally:
    """What happened to one pool's submissions, for the closing table."""

    name: str
    workers: int
    ok: int = 0
    failed: int = 0
    rejected: int = 0
    pids: dict[int, str] = field(default_factory=dict)  # worker pid -> worker name


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "    ") -> str:
    """Plain-text columns, each as wide as its widest cell."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(indent + line for line in lines)


def _say(text: str = "") -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # The reader went away (``duckpool demo | head``): go on silently, so the
        # pools are still stopped, and let the final flush at exit hit /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _process_title(pid: int) -> Optional[str]:
    """A process's command line as ``ps`` shows it, or None once it has exited."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            raw = cmdline.read()
    except FileNotFoundError:
        return None
    except OSError:
        raw = b""
    if raw:
        return raw.replace(b"\0", b" ").decode(errors="replace").strip()
    ps = shutil.which("ps")
    if ps is None:
        return "(unavailable: no /proc and no ps)"
    found = subprocess.run(
        [ps, "-o", "args=", "-p", str(pid)], capture_output=True, text=True, check=False
    )
    return found.stdout.strip() or None


def _is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # The state follows the parenthesised command name, which may hold spaces.
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker_label(receipt: Receipt) -> str:
    return f"{receipt.worker_name} (pid {receipt.pid})"


def _submit(
    manager: ProcessPoolManager,
    tally: _PoolTally,
    task: Callable[..., Receipt],
    *args: Any,
    task_type: Optional[str],
) -> Future[Any]:
    """Submit a task, counting it as rejected when the pool refuses it."""
    try:
        return manager.submit_task(task, *args, task_type=task_type)
    except UnknownTaskError:
        tally.rejected += 1
        raise


def _collect(future: Future[Any], tally: _PoolTally) -> Receipt:
    """Wait (with a deadline) for a task that must succeed, and count it."""
    try:
        receipt = future.result(timeout=_RESULT_TIMEOUT)
    except BaseException:
        tally.failed += 1
        raise
    if not isinstance(receipt, Receipt):
        raise TypeError(f"a demo task returned {receipt!r}, not a Receipt")
    tally.ok += 1
    tally.pids[receipt.pid] = receipt.worker_name
    return receipt


class _DemoFailure(Exception):
    """duckpool did not behave as the demo promises."""


def run_demo(start_method: Optional[str] = None, backend: str = "local") -> int:
    """Run ``duckpool demo``; return 0 when every step behaved as shown.

    With ``backend="dask"`` each pool is a Dask LocalCluster of worker
    processes (``start(backend="dask")``); returns 1 if ``distributed`` is missing.
    """
    began = time.monotonic()
    method = start_method or _default_start_method()
    context = multiprocessing.get_context(method)
    if backend == "dask":
        try:
            import distributed  # noqa: F401
        except ImportError:
            _say('duckpool demo --backend dask needs distributed: pip install "duckpool[dask]"')
            return 1
        _quiet_dask_logging()
        _say(
            f"duckpool {duckpool.__version__} demo: backend 'dask' "
            "(each pool a LocalCluster of worker processes)"
        )
    else:
        how = "the platform default" if start_method is None else "--start-method"
        _say(f"duckpool {duckpool.__version__} demo: start method {method!r} ({how})")
    _say()

    render = get_or_create_process_manager("render")
    reports = get_or_create_process_manager("reports")
    tallies = {"render": _PoolTally("render", 2), "reports": _PoolTally("reports", 1)}
    dead_workers: dict[int, str] = {}  # pid -> how it ended
    exit_status = 0
    try:
        _demo_steps(render, reports, context, tallies, dead_workers, backend)
    except _DemoFailure as exc:
        _say(f"\nDEMO FAILED: {exc}")
        exit_status = 1
    except Exception as exc:
        _say(f"\nDEMO FAILED: unexpected {type(exc).__name__}: {exc}")
        traceback.print_exc()
        exit_status = 1
    except KeyboardInterrupt:
        _say("\ninterrupted: stopping both pools")
        exit_status = 130
    finally:
        render.stop(wait=True)
        reports.stop(wait=True)

    _say()
    _say(f"Summary ({time.monotonic() - began:.1f} s)")
    _say(
        _table(
            ("pool", "workers", "tasks ok", "failed", "rejected"),
            [(t.name, t.workers, t.ok, t.failed, t.rejected) for t in tallies.values()],
        )
    )

    # Both pools are stopped: none of their workers may still be running.
    workers = [pid for tally in tallies.values() for pid in tally.pids]
    deadline = time.monotonic() + 10.0
    while any(_is_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in workers if _is_running(pid)]
    if left:
        _say(f"\nDEMO FAILED: workers still running after stop(): {left}")
        return 1
    if exit_status == 0:
        _say(f"\nBoth pools stopped; none of their {len(workers)} workers is left running.")
    return exit_status


def _quiet_dask_logging() -> None:
    """Keep distributed's log lines out of the demo's output.

    Each LocalCluster silences distributed's handlers while it runs, but on
    close restores the level it found, so stopping the first of two clusters
    lets the second one's shutdown chatter through.  What the demo shows goes
    through futures, not logs.
    """
    import logging

    for handler in logging.getLogger("distributed").handlers:
        handler.addFilter(lambda record: record.levelno >= logging.CRITICAL)


def _call_text(task: Callable[..., Receipt], args: tuple[Any, ...]) -> str:
    return f"{task.__name__}({', '.join(repr(a) for a in args)})"


def _run_batch(
    manager: ProcessPoolManager,
    tally: _PoolTally,
    task: Callable[..., Receipt],
    calls: Sequence[tuple[Any, ...]],
    why_it_must_succeed: str,
) -> list[tuple[str, str, str]]:
    """Submit every call at once, then wait for each; rows of (call, result, worker)."""
    task_type = tally.name
    submitted = [
        (_call_text(task, args), _submit(manager, tally, task, *args, task_type=task_type))
        for args in calls
    ]
    return _collect_rows(submitted, tally, why_it_must_succeed)


def _collect_rows(
    submitted: Sequence[tuple[str, Future[Any]]], tally: _PoolTally, why_it_must_succeed: str
) -> list[tuple[str, str, str]]:
    """Wait for each submitted call; rows of (call, result, worker)."""
    rows = []
    for call, future in submitted:
        try:
            receipt = _collect(future, tally)
        except Exception as exc:
            raise _DemoFailure(f"{call} failed {why_it_must_succeed}: {exc!r}") from exc
        rows.append((call, receipt.result, _worker_label(receipt)))
    return rows


def _note_done(finished: list[str], month: str, _future: Future[Any]) -> None:
    finished.append(month)


def _demo_priorities(reports: ProcessPoolManager, tally: _PoolTally, on_dask: bool) -> None:
    """Four reports on the one-worker pool: the first runs at once, the urgent
    one (priority 10, submitted last) runs next, then the other two in order."""
    finished: list[str] = []
    futures = {}
    for month in ("2025-01", "2025-02", "2025-03", "2025-12"):
        submit = (
            reports.options(priority=10).submit_task if month == "2025-12" else reports.submit_task
        )
        futures[month] = future = submit(_demo_tasks.build_report, month, task_type="reports")
        future.add_done_callback(functools.partial(_note_done, finished, month))
    for future in futures.values():
        _collect(future, tally)
    _say("    submitted: 2025-01, 2025-02, 2025-03, then 2025-12 with priority=10")
    _say(f"    finished:  {', '.join(finished)}")
    if on_dask:
        _say("    (Dask's own priority: it orders tasks of one priority as it sees fit)")
    elif finished != ["2025-01", "2025-12", "2025-02", "2025-03"]:
        raise _DemoFailure(f"the urgent report did not run next: {finished}")


def _demo_steps(
    render: ProcessPoolManager,
    reports: ProcessPoolManager,
    context: multiprocessing.context.BaseContext,
    tallies: dict[str, _PoolTally],
    dead_workers: dict[int, str],
    backend: str = "local",
) -> None:
    render_tally, reports_tally = tallies["render"], tallies["reports"]
    on_dask = backend == "dask"

    _say("1. Two named, typed pools in one process")
    for manager, tally in ((render, render_tally), (reports, reports_tally)):
        if on_dask:
            # A LocalCluster per pool, whose workers offer the pool's type as a resource.
            manager.start(max_workers=tally.workers, task_type=tally.name, backend="dask")
        else:
            manager.start(
                max_workers=tally.workers,
                task_type=tally.name,
                process_name_prefix=f"duckpool-{tally.name}",
                mp_context=context,
                prestart=True,  # every worker ready before the first task
            )
    if on_dask:
        _say(
            _table(
                ("pool id", "task_type", "workers", "scheduler"),
                [
                    (t.name, t.name, t.workers, m.get_pool().scheduler_address)
                    for t, m in ((render_tally, render), (reports_tally, reports))
                ],
            )
        )
    else:
        _say(
            _table(
                ("pool id", "task_type", "workers", "process_name_prefix"),
                [(t.name, t.name, t.workers, f"duckpool-{t.name}") for t in tallies.values()],
            )
        )
    _say(f"    {render!r}")
    _say(f"    {reports!r}")
    if not on_dask:
        ready = sum(len(m.stats().workers) for m in (render, reports))
        _say(f"    prestart=True: all {ready} workers were ready before the first task")

    _say("\n2. Work routed to each pool by its task type")
    routed = [
        ("render", *row)
        for row in _run_batch(
            render,
            render_tally,
            _demo_tasks.render_thumbnail,
            [(i, 128) for i in range(1, 5)],
            "in a healthy pool",
        )
    ]
    routed += [
        ("reports", *row)
        for row in _run_batch(
            reports,
            reports_tally,
            _demo_tasks.build_report,
            [("2024-01",), ("2024-02",), ("2024-03",)],
            "in a healthy pool",
        )
    ]
    _say(_table(("pool", "task", "result", "worker"), routed))

    _say("\n3. Submissions of the wrong type are rejected at the call site")
    for manager, tally, task_type in (
        (reports, reports_tally, "render"),
        (render, render_tally, None),
    ):
        call = f"{tally.name}.submit_task(render_thumbnail, 7, 64, task_type={task_type!r})"
        try:
            future = _submit(
                manager, tally, _demo_tasks.render_thumbnail, 7, 64, task_type=task_type
            )
        except UnknownTaskError as exc:
            _say(f"    {call}\n      -> UnknownTaskError: {exc}")
            continue
        # Not refused by submit_task: then the future must carry the refusal.
        try:
            future.result(timeout=_RESULT_TIMEOUT)
        except UnknownTaskError as exc:
            tally.rejected += 1
            _say(f"    {call}\n      -> its future raised UnknownTaskError: {exc}")
            continue
        raise _DemoFailure(f"{call} was accepted by the pool typed {tally.name!r}")

    _say("\n4. A task kills its worker (SIGKILL): it fails alone, the other tasks finish")
    crash = _submit(render, render_tally, _demo_tasks.crash_worker, task_type="render")

    def submit_bystanders() -> list[tuple[str, Any]]:
        return [
            (
                _call_text(_demo_tasks.render_thumbnail, (i, 256)),
                _submit(
                    render, render_tally, _demo_tasks.render_thumbnail, i, 256, task_type="render"
                ),
            )
            for i in range(5, 8)
        ]

    # (On Dask, a task the scheduler has just placed on the dying worker dies
    # with it: the others go once the crash is reported.  See docs/dask.md.)
    bystanders = [] if on_dask else submit_bystanders()
    try:
        crash.result(timeout=_RESULT_TIMEOUT)
    except WorkerDiedError as exc:
        render_tally.failed += 1
        ended = exc.signal_name or f"exit code {exc.exitcode}"
        if exc.pid is not None:
            dead_workers[exc.pid] = f"(gone: {ended})"
            render_tally.pids.setdefault(exc.pid, f"duckpool-render-{exc.slot}")
        _say(f"    crash_worker() -> WorkerDiedError: {exc}")
        if on_dask:
            _say(
                "        (Dask reports the lost worker, not its pid or exit code; "
                "its Nanny starts a new worker process)"
            )
        else:
            _say(
                f"        .pid={exc.pid} .exitcode={exc.exitcode} "
                f".signal_name={exc.signal_name!r} .slot={exc.slot}"
            )
    else:
        render_tally.ok += 1
        raise _DemoFailure("crash_worker() returned instead of killing its worker")
    if on_dask:
        bystanders = submit_bystanders()
    rows = _collect_rows(bystanders, render_tally, "along with the crashed task")
    _say(_table(("task", "result", "worker"), rows))

    _say("\n5. The pool healed itself: the next tasks run with no restart")
    rows = _run_batch(
        render,
        render_tally,
        _demo_tasks.render_thumbnail,
        [(i, 64) for i in range(8, 12)],
        "after the crash",
    )
    _say(_table(("task", "result", "worker"), rows))
    _say(f"    {render!r}")

    _say("\n6. Priorities: an urgent task overtakes those queued before it")
    _demo_priorities(reports, reports_tally, on_dask)

    _say("\n7. Worker titles, as ps shows them (/proc/<pid>/cmdline)")
    title_rows = []
    for tally in tallies.values():
        for pid, name in sorted(tally.pids.items(), key=lambda item: (item[1], item[0])):
            title = dead_workers.get(pid) or _process_title(pid) or "(exited)"
            title_rows.append((pid, tally.name, name, title))
    _say(_table(("PID", "pool", "current_process().name", "title"), title_rows))
