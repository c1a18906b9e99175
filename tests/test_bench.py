"""The benchmark harness (``duckpool bench``): it completes, reports, and never hangs.

No test here asserts a speed.  The end-to-end tests run every metric with tiny
sizes and one rep, in real child processes, for every library installed here;
the rest replace the child with a fake (``_run_child``, ``_child_command``) to
check the parent's bookkeeping quickly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from conftest import process_gone, wait_until
from duckpool import _bench

PEERS = ("loky", "pebble", "mpire")
ALWAYS_PRESENT = ("stdlib", "mpool", "pipe")
TINY = ["--reps", "1", "--size", "20", "--timeout", "60"]


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


def _assert_every_cell_has_a_ratio(document: dict[str, Any], libraries: list[str]) -> None:
    assert document["libraries"] == libraries
    quantities = [q.key for metric in _bench.METRICS.values() for q in metric.quantities]
    assert [row["quantity"] for row in document["rows"]] == quantities
    for row in document["rows"]:
        for library in libraries:
            cell = row["cells"][library]
            assert cell["failures"] == [], (row["quantity"], library)
            assert cell["median"] > 0, (row["quantity"], library)
            assert cell["ratio"] > 0, (row["quantity"], library)
        assert row["cells"]["stdlib"]["ratio"] == 1.0


def test_tiny_run_of_every_metric_reports_a_ratio_for_every_present_peer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requested = [name for name in _bench.LIBRARIES if name != "duckpool"]
    code, document, out = _run(["--libs", ",".join(requested), *TINY], tmp_path, capsys)

    peers = _installed_peers()
    assert code == 0, out
    _assert_every_cell_has_a_ratio(document, [n for n in requested if n not in PEERS or n in peers])
    for peer in set(PEERS) - set(peers):  # absent here: one clear line, no column
        assert out.count(f"skipped {peer}: not installed") == 1, out
    header = out.splitlines()[0]
    assert header.startswith(f"duckpool bench --libs {','.join(requested)} ")
    for part in ("UTC", platform.python_version(), "cores", "start method"):
        assert part in header, header


def test_duckpool_column_reports_a_ratio(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    error = _duckpool_import_error()
    if error is not None:  # the core executor is being written; remove once it imports
        pytest.skip(f"duckpool.ProcessPoolExecutor does not import yet: {error}")
    code, document, out = _run(["--libs", "duckpool,stdlib", *TINY], tmp_path, capsys)

    assert code == 0, out
    _assert_every_cell_has_a_ratio(document, ["duckpool", "stdlib"])


def test_start_method_reaches_every_library(
    start_method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    present = (*ALWAYS_PRESENT, *_installed_peers())
    if _duckpool_import_error() is None:  # else test_duckpool_column_reports_a_ratio skips
        present += ("duckpool",)
    libraries = [name for name in _bench.LIBRARIES if name in present]
    args = ["--libs", ",".join(libraries), "--metrics", "latency", "--start-method", start_method]
    code, document, out = _run([*args, *TINY], tmp_path, capsys)

    assert code == 0, out
    assert document["start_method"] == start_method
    # What the workers saw of their own start, not what the harness asked for.
    assert document["worker_start"] == {name: [start_method] for name in libraries}
    assert f"start method: {start_method}" in out.splitlines()[0]


def test_missing_peer_is_skipped_with_one_line_and_no_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = dataclasses.replace(_bench.LIBRARIES["pebble"], module="_duckpool_no_such_peer")
    monkeypatch.setitem(_bench.LIBRARIES, "pebble", absent)
    args = ["--libs", "pebble,stdlib", "--metrics", "latency", *TINY]
    code, document, out = _run(args, tmp_path, capsys)

    assert code == 0, out
    assert out.count("skipped pebble: not installed (pip install duckpool[bench])") == 1, out
    assert document["libraries"] == ["stdlib"]
    assert "pebble" in document["skipped"]
    assert all("pebble" not in row["cells"] for row in document["rows"])


_HANGING_CHILD = """
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
with open(sys.argv[1], "w") as f:
    f.write(str(grandchild.pid))
time.sleep(120)
"""


def test_hung_measurement_is_killed_with_its_workers_and_reported_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "grandchild.pid"

    def hanging_command(*_: object) -> list[str]:
        return [sys.executable, "-c", _HANGING_CHILD, str(pid_file)]

    monkeypatch.setattr(_bench, "_child_command", hanging_command)
    started = time.monotonic()
    args = ["--libs", "stdlib", "--metrics", "latency", "--reps", "1", "--timeout", "2"]
    code, document, out = _run(args, tmp_path, capsys)

    assert time.monotonic() - started < 30
    assert code == 1
    assert "failed latency stdlib: timed out after 2 s (in measurement); killed" in out
    cell = document["rows"][0]["cells"]["stdlib"]
    assert cell["median"] is None and cell["ratio"] is None
    wait_until(pid_file.exists)
    wait_until(lambda: process_gone(int(pid_file.read_text())))


def test_child_that_dies_without_a_result_is_reported_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def dying_command(*_: object) -> list[str]:
        return [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]

    monkeypatch.setattr(_bench, "_child_command", dying_command)
    args = ["--libs", "stdlib", "--metrics", "throughput", "--reps", "1"]
    code, _, out = _run(args, tmp_path, capsys)

    assert code == 1
    assert "failed throughput stdlib: child exited with code 3: boom" in out


def _fake_run_child(
    values: dict[str, float], calls: list[tuple[str, str]]
) -> Callable[[_bench._Plan, str, str], dict[str, Any]]:
    """A ``_run_child`` that starts nothing: every quantity of ``library`` is values[library]."""

    def run_child(plan: _bench._Plan, library: str, metric: str) -> dict[str, Any]:
        calls.append((library, metric))
        keys = [quantity.key for quantity in _bench.METRICS[metric].quantities]
        return {"ok": True, "values": dict.fromkeys(keys, values[library])}

    return run_child


def test_reps_are_interleaved_across_libraries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    values = {"stdlib": 1.0, "mpool": 2.0, "pipe": 3.0}
    monkeypatch.setattr(_bench, "_run_child", _fake_run_child(values, calls))
    _run(["--libs", "stdlib,mpool,pipe", "--reps", "3"], tmp_path, capsys)

    per_rep = len(values) * len(_bench.METRICS)
    assert len(calls) == 3 * per_rep
    everything = {(library, metric) for library in values for metric in _bench.METRICS}
    for rep in range(3):
        assert set(calls[rep * per_rep : (rep + 1) * per_rep]) == everything


def test_ratio_is_library_median_over_stdlib_median_whichever_direction_is_better(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = iter([10.0, 30.0, 20.0, 40.0, 50.0, 90.0] * 2 * len(_bench.METRICS))

    def run_child(plan: _bench._Plan, library: str, metric: str) -> dict[str, Any]:
        value = next(samples) if library == "stdlib" else 2 * next(samples)
        keys = [quantity.key for quantity in _bench.METRICS[metric].quantities]
        return {"ok": True, "values": dict.fromkeys(keys, value)}

    monkeypatch.setattr(_bench, "_run_child", run_child)
    _, document, out = _run(["--libs", "mpool,stdlib", "--reps", "3"], tmp_path, capsys)

    for row in document["rows"]:
        stdlib, mpool = row["cells"]["stdlib"], row["cells"]["mpool"]
        assert stdlib["ratio"] == 1.0
        assert mpool["ratio"] == pytest.approx(mpool["median"] / stdlib["median"])
        assert mpool["min"] == min(mpool["samples"]) and mpool["max"] == max(mpool["samples"])
    directions = {row["quantity"]: row["higher_is_better"] for row in document["rows"]}
    assert directions == {"tasks_per_s": True, "p50_us": False, "p99_us": False}
    assert "higher is better" in out and "lower is better" in out


def test_markdown_flag_prints_a_markdown_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(_bench, "_run_child", _fake_run_child({"stdlib": 4e4, "pipe": 8e4}, calls))
    _, _, out = _run(["--libs", "stdlib,pipe", "--reps", "1", "--markdown"], tmp_path, capsys)

    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0] == "| metric | stdlib | pipe |"
    assert table[1] == "|---|---:|---:|"
    assert table[2].startswith("| tiny-task throughput (tasks/s), higher is better |")
    assert "| 40k/s (1.00x) | 80k/s (2.00x) |" in table[2]
    assert len(table) == 2 + sum(len(m.quantities) for m in _bench.METRICS.values())


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--libs", "stdlib,nope"], "nope"),
        (["--metrics", "speed"], "speed"),
        (["--reps", "0"], "--reps must be >= 1, got 0"),
        (["--timeout", "0"], "--timeout must be > 0, got 0"),
    ],
)
def test_bad_option_exits_2_naming_the_value(
    args: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _bench.main(args) == 2
    assert named in capsys.readouterr().err


def _inline_pool(transform: Callable[[Any], Any] = lambda value: value) -> _bench._PoolAdapter:
    """A 'pool' that runs each task at submit time, in this process."""
    return _bench._PoolAdapter(
        submit=lambda function, args: transform(function(*args)),
        wait=lambda handle, timeout: handle,
        close=lambda: None,
    )


@pytest.mark.parametrize("metric", list(_bench.METRICS))
def test_metric_returns_every_quantity_it_declares(metric: str) -> None:
    deadline = time.monotonic() + 30
    values = _bench.METRICS[metric].measure(_inline_pool(), 50, deadline)

    assert set(values) == {quantity.key for quantity in _bench.METRICS[metric].quantities}
    assert all(value > 0 for value in values.values())


@pytest.mark.parametrize("metric", list(_bench.METRICS))
def test_metric_rejects_wrong_results(metric: str) -> None:
    wrong = _inline_pool(lambda value: value + 1)
    with pytest.raises(_bench._BenchError, match="expected"):
        _bench.METRICS[metric].measure(wrong, 50, time.monotonic() + 30)
