"""The benchmark harness (``duckpool bench``): it completes, reports, and never hangs.

No test here asserts a speed.  The end-to-end tests run in real child
processes with tiny sizes and one rep: every metric for duckpool and the
stdlib, the metrics whose code differs per library (submit, map, recycling)
for every library installed here.  The rest replace the child with a fake
(``_run_child``, ``_child_command``) to check the parent's bookkeeping quickly,
or run a metric's function on an in-process stand-in for a pool.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from conftest import process_gone, wait_until
from duckpool import _bench
from duckpool._bench import _adapters, _bytecode, _cli, _metrics, _plan, _report, _runner

PEERS = ("loky", "pebble", "mpire", "deadpool")
ALWAYS_PRESENT = ("stdlib", "mpool", "pipe")
# --quick for the metrics whose size counts pools or interpreters (1 or 2 each).
TINY = ["--quick", "--reps", "1", "--size", "20", "--timeout", "60"]


def _duckpool_import_error() -> Optional[str]:
    """Why ``duckpool.ProcessPoolExecutor`` cannot be imported, or None."""
    try:
        from duckpool import ProcessPoolExecutor  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _installed_peers() -> list[str]:
    return [peer for peer in PEERS if importlib.util.find_spec(peer) is not None]


def _run(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any], str]:
    """``duckpool bench ARGS --json FILE``: exit code, JSON document, stdout."""
    json_path = tmp_path / "bench.json"
    code = _bench.main([*args, "--json", str(json_path)])
    out = capsys.readouterr().out
    return code, json.loads(json_path.read_text(encoding="utf-8")), out


def _rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of a one-table document."""
    assert len(document["runs"]) == 1
    rows: list[dict[str, Any]] = document["runs"][0]["rows"]
    return rows


def _assert_every_cell_is_measured(
    document: dict[str, Any], libraries: list[str], metrics: list[str]
) -> None:
    """Every cell has a value (or does not apply, as its library declares) and a ratio."""
    assert document["libraries"] == libraries
    quantities = [q.key for name in metrics for q in _metrics.METRICS[name].quantities]
    assert [row["quantity"] for row in _rows(document)] == quantities
    for row in _rows(document):
        baseline = row["cells"]["stdlib"]
        for library in libraries:
            cell = row["cells"][library]
            where = (row["quantity"], library, cell["failures"])
            assert cell["failures"] == [], where
            if row["metric"] in _adapters.LIBRARIES[library].not_applicable:
                assert cell["not_applicable"] and cell["median"] is None, where
                continue
            assert cell["not_applicable"] is None, where
            assert cell["median"] > 0, where
            if not row["compared"]:
                assert cell["ratio"] is None, where
            elif baseline["median"] is not None:
                assert cell["ratio"] > 0, where
        if row["compared"] and baseline["median"] is not None:
            assert baseline["ratio"] == 1.0


@pytest.mark.slow
def test_every_metric_reports_a_value_and_ratio_for_duckpool_and_stdlib(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    error = _duckpool_import_error()
    if error is not None:  # the core executor is being written; remove once it imports
        pytest.skip(f"duckpool.ProcessPoolExecutor does not import yet: {error}")
    # 60 tasks: enough for the recycle metric to replace each worker (after 25).
    args = ["--libs", "duckpool,stdlib", *TINY, "--size", "60"]
    code, document, out = _run(args, tmp_path, capsys)

    assert code == 0, out
    _assert_every_cell_is_measured(document, ["duckpool", "stdlib"], list(_metrics.METRICS))
    header = out.splitlines()[0]
    assert header.startswith("duckpool bench --libs duckpool,stdlib ")
    for part in ("UTC", platform.python_version(), "cores", "start method"):
        assert part in header, header


@pytest.mark.slow
def test_every_present_library_runs_the_metrics_its_adapter_implements(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requested = [name for name in _adapters.LIBRARIES if name != "duckpool"]
    # pools: several threads submit to one pool at once; every library must take that.
    metrics = ["latency", "map", "recycle", "pools"]
    # 30 tasks: with the 4 that start the workers, the recycle metric replaces one.
    args = ["--libs", ",".join(requested), "--metrics", ",".join(metrics), *TINY, "--size", "30"]
    code, document, out = _run(args, tmp_path, capsys)

    peers = _installed_peers()
    assert code == 0, out
    present = [name for name in requested if name not in PEERS or name in peers]
    _assert_every_cell_is_measured(document, present, metrics)
    for peer in set(PEERS) - set(peers):  # absent here: one clear line, no column
        assert out.count(f"skipped {peer}: not installed") == 1, out


@pytest.mark.slow
def test_start_method_reaches_every_library(
    start_method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    present = (*ALWAYS_PRESENT, *_installed_peers())
    if _duckpool_import_error() is None:  # else the duckpool test above skips
        present += ("duckpool",)
    libraries = [name for name in _adapters.LIBRARIES if name in present]
    args = ["--libs", ",".join(libraries), "--metrics", "latency", "--start-method", start_method]
    code, document, out = _run([*args, *TINY], tmp_path, capsys)

    assert code == 0, out
    (run,) = document["runs"]
    assert run["start_method"] == start_method
    # What the workers saw of their own start, not what the harness asked for.
    assert run["worker_start"] == {name: [start_method] for name in libraries}
    assert f"start method: {start_method}" in out.splitlines()[0]


def test_missing_peer_is_skipped_with_one_line_and_no_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = dataclasses.replace(_adapters.LIBRARIES["pebble"], module="_duckpool_no_such_peer")
    monkeypatch.setitem(_adapters.LIBRARIES, "pebble", absent)
    args = ["--libs", "pebble,stdlib", "--metrics", "latency", *TINY]
    code, document, out = _run(args, tmp_path, capsys)

    assert code == 0, out
    assert out.count("skipped pebble: not installed (pip install duckpool[bench])") == 1, out
    assert document["libraries"] == ["stdlib"]
    assert "pebble" in document["skipped"]
    assert all("pebble" not in row["cells"] for row in _rows(document))


def test_metric_that_does_not_apply_is_a_dash_and_starts_no_child(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(_runner, "_run_child", _fake_run_child({"stdlib": 5.0}, calls))
    code, document, out = _run(["--libs", "pipe,stdlib", "--metrics", "map"], tmp_path, capsys)

    assert code == 0, out
    assert calls and all(library == "stdlib" for library, _ in calls)
    for row in _rows(document):
        pipe = row["cells"]["pipe"]
        assert pipe["not_applicable"] == "no map()"
        assert pipe["median"] is None and pipe["ratio"] is None and pipe["failures"] == []
    best = next(line for line in out.splitlines() if line.startswith("map at best chunksize"))
    assert best.rstrip().endswith(_report._dash()), best
    assert "map pipe: does not apply (no map())" in out


def test_child_that_finds_the_metric_does_not_apply_is_a_dash_not_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def run_child(plan: _plan._Plan, library: str, metric: str) -> dict[str, Any]:
        if library == "mpool":
            return {"ok": True, "not_applicable": "lacks it on this Python"}
        keys = [quantity.key for quantity in _metrics.METRICS[metric].quantities]
        return {"ok": True, "values": dict.fromkeys(keys, 3.0)}

    monkeypatch.setattr(_runner, "_run_child", run_child)
    args = ["--libs", "mpool,stdlib", "--metrics", "startup", "--reps", "2"]
    code, document, out = _run(args, tmp_path, capsys)

    assert code == 0, out
    rows = _rows(document)  # time to the first result, then the shutdown after it
    assert [row["quantity"] for row in rows] == ["startup_us", "fresh_shutdown_us"]
    for row in rows:
        assert row["cells"]["mpool"]["not_applicable"] == "lacks it on this Python"
        assert row["cells"]["stdlib"]["samples"] == [3.0, 3.0]
    assert "startup mpool: does not apply (lacks it on this Python)" in out


_HANGING_CHILD = """
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
with open(sys.argv[1], "w") as f:
    f.write(str(grandchild.pid))
time.sleep(120)
"""


@pytest.mark.slow
def test_hung_measurement_is_killed_with_its_workers_and_reported_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "grandchild.pid"

    def hanging_command(*_: object) -> list[str]:
        return [sys.executable, "-c", _HANGING_CHILD, str(pid_file)]

    monkeypatch.setattr(_runner, "_child_command", hanging_command)
    started = time.monotonic()
    args = ["--libs", "stdlib", "--metrics", "latency", "--reps", "1", "--timeout", "2"]
    code, document, out = _run(args, tmp_path, capsys)

    assert time.monotonic() - started < 30
    assert code == 1
    assert "failed latency stdlib: timed out after 2 s (in measurement); killed" in out
    cell = _rows(document)[0]["cells"]["stdlib"]
    assert cell["median"] is None and cell["ratio"] is None
    wait_until(pid_file.exists)
    wait_until(lambda: process_gone(int(pid_file.read_text())))


def test_child_that_dies_without_a_result_is_reported_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def dying_command(*_: object) -> list[str]:
        return [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]

    monkeypatch.setattr(_runner, "_child_command", dying_command)
    args = ["--libs", "stdlib", "--metrics", "throughput", "--reps", "1"]
    code, _, out = _run(args, tmp_path, capsys)

    assert code == 1
    assert "failed throughput stdlib: child exited with code 3: boom" in out


def _fake_run_child(
    values: dict[str, float], calls: list[tuple[str, str]]
) -> Callable[[_plan._Plan, str, str], dict[str, Any]]:
    """A ``_run_child`` that starts nothing: every quantity of ``library`` is values[library]."""

    def run_child(plan: _plan._Plan, library: str, metric: str) -> dict[str, Any]:
        calls.append((library, metric))
        keys = [quantity.key for quantity in _metrics.METRICS[metric].quantities]
        return {"ok": True, "values": dict.fromkeys(keys, values[library])}

    return run_child


def test_reps_are_interleaved_across_libraries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    values = {"stdlib": 1.0, "mpool": 2.0, "pipe": 3.0}
    monkeypatch.setattr(_runner, "_run_child", _fake_run_child(values, calls))
    _run(["--libs", "stdlib,mpool,pipe", "--reps", "3"], tmp_path, capsys)

    everything = {
        (library, metric)
        for library in values
        for metric in _metrics.METRICS
        if metric not in _adapters.LIBRARIES[library].not_applicable
    }
    per_rep = len(everything)
    assert calls[0] == ("stdlib", "load")  # the load metrics' calibration, once
    reps = calls[1:]
    assert len(reps) == 3 * per_rep
    for rep in range(3):
        assert set(reps[rep * per_rep : (rep + 1) * per_rep]) == everything


def test_quick_runs_fewer_reps_only_of_the_metrics_that_ask_for_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(_runner, "_run_child", _fake_run_child({"stdlib": 1.0}, calls))
    _, document, out = _run(["--libs", "stdlib", "--quick"], tmp_path, capsys)

    for name, metric in _metrics.METRICS.items():
        expected = min(_cli._QUICK_REPS, metric.quick_reps or _cli._QUICK_REPS)
        assert document["metric_reps"][name] == expected
        if name in _adapters.LIBRARIES["stdlib"].not_applicable:  # recycle before 3.11
            expected = 0
        if name == "load":
            expected += 1  # the calibration, once per table
        assert calls.count(("stdlib", name)) == expected, name
    fewer = [name for name, metric in _metrics.METRICS.items() if metric.quick_reps]
    assert fewer, "no metric asks for fewer reps: drop this test"
    assert f"{fewer[0]} 1" in out.splitlines()[1]


def test_size_option_resizes_only_metrics_sized_in_tasks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(_runner, "_run_child", _fake_run_child({"stdlib": 1.0}, calls))
    _, document, _ = _run(["--libs", "stdlib", "--reps", "1", "--size", "7"], tmp_path, capsys)

    for row in _rows(document):
        metric = _metrics.METRICS[row["metric"]]
        assert row["size"] == (7 if metric.size_option else metric.full_size), row["metric"]


def test_ratio_is_library_median_over_stdlib_median_whichever_direction_is_better(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = iter([10.0, 30.0, 20.0, 40.0, 50.0, 90.0] * 2 * len(_metrics.METRICS))

    def run_child(plan: _plan._Plan, library: str, metric: str) -> dict[str, Any]:
        value = next(samples) if library == "stdlib" else 2 * next(samples)
        keys = [quantity.key for quantity in _metrics.METRICS[metric].quantities]
        return {"ok": True, "values": dict.fromkeys(keys, value)}

    monkeypatch.setattr(_runner, "_run_child", run_child)
    _, document, out = _run(["--libs", "mpool,stdlib", "--reps", "3"], tmp_path, capsys)

    for row in _rows(document):
        stdlib, mpool = row["cells"]["stdlib"], row["cells"]["mpool"]
        assert mpool["min"] == min(mpool["samples"]) and mpool["max"] == max(mpool["samples"])
        if not row["compared"] or stdlib["not_applicable"]:  # no ratio: nothing to rank by
            assert stdlib["ratio"] is None and mpool["ratio"] is None
            continue
        assert stdlib["ratio"] == 1.0
        assert mpool["ratio"] == pytest.approx(mpool["median"] / stdlib["median"])
    directions = {row["quantity"]: row["higher_is_better"] for row in _rows(document)}
    assert directions["tasks_per_s"] and directions["payload_mb_per_s"]
    assert not directions["p50_us"] and not directions["pending_bytes"]
    assert "higher is better" in out and "lower is better" in out


def test_a_descriptive_number_is_summarised_by_a_value_seen_not_a_mean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    chunksizes = iter([16.0, 256.0])

    def run_child(plan: _plan._Plan, library: str, metric: str) -> dict[str, Any]:
        value = next(chunksizes)
        keys = [quantity.key for quantity in _metrics.METRICS[metric].quantities]
        return {"ok": True, "values": dict.fromkeys(keys, value)}

    monkeypatch.setattr(_runner, "_run_child", run_child)
    _, document, _ = _run(["--libs", "stdlib", "--metrics", "map", "--reps", "2"], tmp_path, capsys)

    cells = {row["quantity"]: row["cells"]["stdlib"] for row in _rows(document)}
    assert cells["map_best_chunksize"]["median"] == 16.0  # the lower middle: a chunksize tried
    assert cells["map_best_per_s"]["median"] == 136.0  # a rate: the usual median


def test_markdown_flag_prints_a_markdown_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(_runner, "_run_child", _fake_run_child({"stdlib": 4e4, "pipe": 8e4}, calls))
    _, _, out = _run(["--libs", "stdlib,pipe", "--reps", "1", "--markdown"], tmp_path, capsys)

    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0] == "| metric | stdlib | pipe |"
    assert table[1] == "|---|---:|---:|"
    assert table[2].startswith("| tiny-task throughput (tasks/s), higher is better |")
    assert "| 40k/s (1.00x) | 80k/s (2.00x) |" in table[2]
    assert len(table) == 2 + sum(len(m.quantities) for m in _metrics.METRICS.values())
    dash = _report._dash()
    assert f"| map at best chunksize (items/s), higher is better | 40k/s (1.00x) | {dash} |" in (
        table
    )
    assert f"- {dash} map pipe: does not apply (no map())" in out.splitlines()


def test_json_document_holds_the_header_and_every_cell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(_runner, "_run_child", _fake_run_child({"stdlib": 2.0, "pipe": 1.0}, calls))
    _, document, _ = _run(["--libs", "stdlib,pipe", "--reps", "2"], tmp_path, capsys)

    assert document["schema"] == 3
    assert document["command"] == "duckpool bench --libs stdlib,pipe --reps 2 --json " + str(
        tmp_path / "bench.json"
    )
    for key in ("date", "python", "machine", "workers", "reps", "baseline", "skipped"):
        assert key in document, key
    assert document["baseline"] == "stdlib" and document["reps"] == 2
    (run,) = document["runs"]
    assert run["start_method"] is None
    row = run["rows"][0]
    assert set(row) >= {
        "metric",
        "quantity",
        "unit",
        "higher_is_better",
        "compared",
        "goal",
        "size",
    }
    assert row["cells"]["pipe"] == {
        "samples": [1.0, 1.0],
        "median": 1.0,
        "min": 1.0,
        "max": 1.0,
        "ratio": 0.5,
        "ratio_spread": [0.5, 0.5],
        "failures": [],
        "not_applicable": None,
    }


def test_start_method_all_prints_one_table_per_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    methods: list[Optional[str]] = []

    def run_child(plan: _plan._Plan, library: str, metric: str) -> dict[str, Any]:
        methods.append(plan.start_method)
        return {"ok": True, "values": {"p50_us": 1.0, "p99_us": 2.0}}

    monkeypatch.setattr(_runner, "_run_child", run_child)
    args = ["--libs", "stdlib", "--metrics", "latency", "--reps", "1", "--start-method", "all"]
    code, document, out = _run(args, tmp_path, capsys)

    possible = multiprocessing.get_all_start_methods()
    available = [method for method in ("fork", "spawn", "forkserver") if method in possible]
    assert code == 0
    assert methods == available
    assert [run["start_method"] for run in document["runs"]] == available
    headers = [line for line in out.splitlines() if line.startswith("duckpool bench ")]
    assert [line.rsplit("start method: ", 1)[1] for line in headers] == available


def test_plot_writes_a_png_of_the_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    values = {"stdlib": 2.0, "mpool": 3.0, "pipe": 1.0, "duckpool": 0.5}
    monkeypatch.setattr(_runner, "_run_child", _fake_run_child(values, calls))
    plot = tmp_path / "ratios.png"
    args = ["--libs", "duckpool,stdlib,mpool,pipe", "--reps", "1", "--start-method", "all"]
    code, _, _ = _run([*args, "--plot", str(plot)], tmp_path, capsys)

    assert code == 0
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_plot_without_matplotlib_exits_2_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "matplotlib" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(_runner, "_run_child", lambda *_: pytest.fail("a child was started"))
    code = _bench.main(["--libs", "stdlib", "--plot", str(tmp_path / "x.png")])

    assert code == 2
    assert "needs matplotlib, which is not installed" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_progress_goes_to_stderr_one_line_per_measurement_when_not_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(_runner, "_run_child", _fake_run_child({"stdlib": 1.0}, calls))
    _bench.main(["--libs", "stdlib", "--metrics", "throughput,latency", "--reps", "2"])
    captured = capsys.readouterr()

    progress = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in progress] == ["[1/4", "[2/4", "[3/4", "[4/4"]
    assert all("elapsed" in line and "left" in line for line in progress)
    assert "\r" not in captured.err
    assert not any(line.startswith("[") for line in captured.out.splitlines())


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--libs", "stdlib,nope"], "nope"),
        (["--metrics", "speed"], "speed"),
        (["--reps", "0"], "--reps must be >= 1, got 0"),
        (["--timeout", "0"], "--timeout must be > 0, got 0"),
        (["--start-method", "thread"], "thread"),
    ],
)
def test_bad_option_exits_2_naming_the_value(
    args: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _bench.main(args) == 2
    assert named in capsys.readouterr().err


def _corrupt(value: Any) -> Any:
    """A wrong result of the same kind: ints and bytes changed, anything else kept."""
    if isinstance(value, bool) or not isinstance(value, (int, bytes)):
        return value
    return value + 1 if isinstance(value, int) else value[:-1]


def _inline_pool(transform: Callable[[Any], Any] = lambda value: value) -> _adapters._PoolAdapter:
    """A 'pool' that runs each task at submit time, in this process, as its one worker."""

    def map_items(
        function: Callable[..., Any], items: list[Any], chunksize: Optional[int], timeout: float
    ) -> list[Any]:
        return [transform(function(item)) for item in items]

    pool = _adapters._PoolAdapter(
        submit=lambda function, args: transform(function(*args)),
        wait=lambda handle, timeout: handle,
        close=lambda: None,
        map_items=map_items,
    )
    pool.worker_pids = [os.getpid()]
    return pool


@dataclasses.dataclass(frozen=True)
class _InlineOpener(_adapters._PoolOpener):
    """Opens inline pools (always one 'worker', whatever is asked)."""

    transform: Callable[[Any], Any] = lambda value: value

    def open(
        self,
        workers: Optional[int] = None,
        start_method: Optional[str] = None,
        max_tasks_per_child: Optional[int] = None,
    ) -> _adapters._PoolAdapter:
        return _inline_pool(self.transform)


def _measure_inline(metric: str, transform: Callable[[Any], Any]) -> dict[str, float]:
    deadline = time.monotonic() + 30
    definition = _metrics.METRICS[metric]
    size = min(50, definition.quick_size)
    if definition.measure_own_pools is not None:
        options = _adapters._PoolOptions(workers=1, start_method=None)
        opener = _InlineOpener("stdlib", options, transform)
        return definition.measure_own_pools(opener, size, deadline)
    assert definition.measure is not None
    return definition.measure(_inline_pool(transform), size, deadline)


# Metrics that need real workers (to block them, to see them exit, or to warm
# up pools of several) are covered by the end-to-end tests only.
NEED_WORKERS = {"pending", "shutdown", "workers", "pools", "load", "load_async"}
CHECK_RESULTS = ["throughput", "latency", "map", "payload", "startup", "recycle", "scaling"]


@pytest.mark.parametrize("metric", [name for name in _metrics.METRICS if name not in NEED_WORKERS])
def test_metric_returns_every_quantity_it_declares(metric: str) -> None:
    values = _measure_inline(metric, lambda value: value)

    assert set(values) == {quantity.key for quantity in _metrics.METRICS[metric].quantities}
    assert all(value > 0 for value in values.values())


@pytest.mark.parametrize("metric", CHECK_RESULTS)
def test_metric_rejects_wrong_results(metric: str) -> None:
    with pytest.raises(_adapters._BenchError, match="expected"):
        _measure_inline(metric, _corrupt)


def test_metric_definitions_are_consistent() -> None:
    for name, metric in _metrics.METRICS.items():
        assert metric.name == name
        assert (metric.measure is None) != (metric.measure_own_pools is None), name
        assert len({q.key for q in metric.quantities}) == len(metric.quantities), name
    for library in _adapters.LIBRARIES.values():
        assert set(library.not_applicable) <= set(_metrics.METRICS), library.name


def _goal_row(goal: float, higher: bool, ratio: Optional[float], spread: Any) -> dict[str, Any]:
    cell = {"ratio": ratio, "ratio_spread": spread, "median": ratio, "min": None, "max": None}
    return {
        "label": "a metric",
        "unit": "us",
        "higher_is_better": higher,
        "compared": True,
        "goal": goal,
        "cells": {"duckpool": cell, "stdlib": dict(cell, ratio=1.0)},
    }


@pytest.mark.parametrize(
    "goal, higher, ratio, spread, verdict",
    [
        (5.0, True, 6.0, None, "met"),
        (5.0, True, 4.0, [3.5, 4.5], "missed"),
        (5.0, True, 4.8, [4.2, 5.3], "tie"),  # the goal lies within the reps' ratios
        (0.6, False, 0.5, None, "met"),
        (0.6, False, 0.7, [0.55, 0.9], "tie"),
        (0.6, False, 0.7, [0.65, 0.9], "missed"),
        (0.6, False, None, None, "not measured"),
    ],
)
def test_a_goal_is_met_missed_or_tied_within_the_spread_of_its_reps(
    goal: float, higher: bool, ratio: Optional[float], spread: Any, verdict: str
) -> None:
    (result,) = _report._goal_results([_goal_row(goal, higher, ratio, spread)])
    assert result["verdict"] == verdict


@pytest.mark.parametrize(
    "peer, verdict",
    [
        (0.5, "met"),  # duckpool (0.4) the lowest of all
        (0.35, "tie"),  # a peer's median lower, but not lower than duckpool's best rep
        (0.2, "missed"),  # a peer lower than duckpool ever was
    ],
)
def test_a_goal_asking_for_the_best_of_every_peer_is_missed_behind_one(
    peer: float, verdict: str
) -> None:
    row = _goal_row(0.5, False, 0.4, [0.3, 0.45])
    row["best_of_peers"] = True
    row["cells"]["duckpool"].update(median=4.0, min=3.0, max=4.5)
    row["cells"]["stdlib"].update(median=10.0)
    row["cells"]["pebble"] = {"median": peer * 10, "ratio": peer}
    row["cells"]["pipe"] = {"median": 0.1, "ratio": 0.01}  # the floor: no peer
    (result,) = _report._goal_results([row])
    assert result["verdict"] == verdict
    assert result["behind"] == ([] if verdict == "met" else ["pebble"])
    text = _report._goal_text(result)
    assert "and the best of every peer" in text
    assert ("behind pebble" in text) == (verdict != "met")


def test_goals_are_reported_under_each_table_and_summed_up_per_start_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    # duckpool's latency is a tenth of the stdlib's: p50 and p99 both meet their goals.
    monkeypatch.setattr(
        _runner, "_run_child", _fake_run_child({"stdlib": 10.0, "duckpool": 1.0}, calls)
    )
    args = ["--libs", "duckpool,stdlib", "--metrics", "latency,throughput", "--reps", "2"]
    code, document, out = _run([*args, "--start-method", "all"], tmp_path, capsys)

    assert code == 0, out
    methods = [run["start_method"] for run in document["runs"]]
    for run in document["runs"]:
        verdicts = {goal["label"]: goal["verdict"] for goal in run["goals"]}
        assert verdicts == {
            "round-trip latency p50": "met",
            "round-trip latency p99": "met",
            "tiny-task throughput": "missed",  # 0.1x, the goal is >= 5x
        }
    assert out.count("duckpool's goals: 2 of 3 met") == len(methods)
    assert "missed: tiny-task throughput: 0.10x (goal >= 5.00x; reps 0.10" in out
    summary = out.split("goals met, per start method:\n", 1)[1].splitlines()
    assert summary == [
        f"{method}: 2 of 3 goals met (missed tiny-task throughput)" for method in methods
    ]


@pytest.mark.parametrize("load", ["load", "load_async"])
def test_the_load_metrics_offer_every_library_the_rates_measured_once_on_the_baseline(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    load: str,
) -> None:
    seen: list[tuple[str, str, Optional[str], Optional[str]]] = []

    def run_child(plan: _plan._Plan, library: str, metric: str) -> dict[str, Any]:
        calibrating = os.environ.get(_metrics.LOAD_CALIBRATE_ENVIRONMENT)
        seen.append((library, metric, calibrating, os.environ.get(_metrics.LOAD_ENVIRONMENT)))
        if calibrating:
            return {"ok": True, "values": {"_iterations": 1234.0, "_capacity": 1500.0}}
        keys = [quantity.key for quantity in _metrics.METRICS[metric].quantities]
        return {"ok": True, "values": dict.fromkeys(keys, 2.0)}

    monkeypatch.setattr(_runner, "_run_child", run_child)
    monkeypatch.delenv(_metrics.LOAD_ENVIRONMENT, raising=False)
    args = ["--libs", "stdlib,mpool", "--metrics", f"{load},latency", "--reps", "2"]
    code, _, out = _run(args, tmp_path, capsys)

    assert code == 0, out
    assert seen[0] == ("stdlib", load, "1", None)  # first, once, on the baseline
    measured = [entry for entry in seen[1:] if entry[1] == load]
    assert len(measured) == 4  # 2 libraries x 2 reps
    assert all(entry[2] is None and entry[3] == "1234,1500.0" for entry in measured)
    assert _metrics.LOAD_ENVIRONMENT not in os.environ  # the next table measures its own


def test_the_measured_libraries_are_byte_compiled_first_as_pip_install_leaves_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Installed with pip --no-compile under PYTHONDONTWRITEBYTECODE, a library
    # is compiled from source by every interpreter that imports it (every
    # spawned worker, at every start), while the stdlib never is.
    package = tmp_path / "uncompiled_library"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 1\n")
    (package / "worker.py").write_text("def run():\n    return 2\n")
    (package / "broken.py").write_text("def (:\n")  # (compiles nowhere: left as it is)
    monkeypatch.syspath_prepend(str(tmp_path))

    compiled = _bytecode.compile_libraries(["uncompiled_library", "no_such_library"])

    assert sorted(Path(path).name for path in compiled) == ["__init__.py", "worker.py"]
    for path in compiled:
        assert Path(importlib.util.cache_from_source(path)).is_file()
    assert _bytecode.compile_libraries(["uncompiled_library"]) == []  # (once only)
    monkeypatch.setattr(_bytecode, "_done", set())
    (package / "worker.py").write_text("def run():\n    return 3\n")
    os.utime(package / "worker.py", (time.time() + 10, time.time() + 10))  # (newer: stale)
    assert [Path(path).name for path in _bytecode.compile_libraries(["uncompiled_library"])] == [
        "worker.py"
    ]


def test_a_checked_hash_pyc_is_cached_while_its_source_is_unchanged(tmp_path: Path) -> None:
    import py_compile

    source = tmp_path / "hashed.py"
    source.write_text("VALUE = 1\n")
    py_compile.compile(
        str(source), invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH, doraise=True
    )
    assert _bytecode._cached(str(source))
    stat = source.stat()
    source.write_text("VALUE = 2\n")  # same size and time stamps: only the hash tells
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not _bytecode._cached(str(source))
