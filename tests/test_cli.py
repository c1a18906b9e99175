"""The ``duckpool`` command line: ``demo``, ``info`` and ``bench``.

Each command runs in a fresh interpreter (``python -m duckpool ...``), as a user
runs it, so the demo's pools, workers and helper processes are its own.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import psutil
import pytest

from conftest import wait_until

DEMO_PREFIXES = ("duckpool-render", "duckpool-reports")
DEMO_TIMEOUT = 60.0
DEMO_PROMISED_SECONDS = 20.0


def run_duckpool(
    *args: str, env: Optional[dict[str, str]] = None, timeout: float = DEMO_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """``python -m duckpool ARGS`` in a fresh interpreter, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "duckpool", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def demo_leftovers(token: str, started_at: float, existing: set[int]) -> list[str]:
    """Processes the demo run left behind.

    A leftover is a process that inherited the run's environment token (every
    descendant does: workers, the forkserver, the resource tracker) or a process
    created during the run whose command line carries a demo worker title.
    Zombies are dead already and don't count.
    """
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "create_time", "status"]):
        info = proc.info
        if info["pid"] == os.getpid() or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(info["cmdline"] or ())
        titled = (
            any(prefix in cmdline for prefix in DEMO_PREFIXES)
            and info["pid"] not in existing
            and (info["create_time"] or 0) >= started_at - 1
        )
        try:
            inherited = proc.environ().get("DUCKPOOL_TEST_RUN") == token
        except (psutil.Error, OSError):
            inherited = False
        if titled or inherited:
            found.append(f"pid {info['pid']}: {cmdline}")
    return found


def titled_pids() -> set[int]:
    """Processes that already carry a demo worker title (another run's, not ours)."""
    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if any(prefix in cmdline for prefix in DEMO_PREFIXES):
            pids.add(proc.info["pid"])
    return pids


@pytest.mark.slow
def test_demo_runs_every_step_and_leaves_no_process_behind(start_method: str) -> None:
    token = uuid.uuid4().hex
    env = {**os.environ, "DUCKPOOL_TEST_RUN": token}
    existing = titled_pids()
    started_at = time.time()
    began = time.monotonic()

    done = run_duckpool("demo", "--start-method", start_method, env=env)
    elapsed = time.monotonic() - began

    output = done.stdout
    assert done.returncode == 0, f"stdout:\n{output}\nstderr:\n{done.stderr}"
    assert f"start method '{start_method}'" in output
    assert "UnknownTaskError" in output
    assert "WorkerDiedError" in output
    assert "SIGKILL" in output
    # The worker titles as ps shows them.
    assert re.search(r"^\s+\d+\s+render\s+duckpool-render-0\s+duckpool-render-0\s*$", output, re.M)
    assert re.search(
        r"^\s+\d+\s+reports\s+duckpool-reports-0\s+duckpool-reports-0\s*$", output, re.M
    )
    # The closing table: one crashed task failed, one wrong-typed task per pool refused.
    assert re.search(r"^\s+pool\s+workers\s+tasks ok\s+failed\s+rejected\s*$", output, re.M)
    assert re.search(r"^\s+render\s+2\s+11\s+1\s+1\s*$", output, re.M), output
    assert re.search(r"^\s+reports\s+1\s+7\s+0\s+1\s*$", output, re.M), output
    assert "prestart=True: all 3 workers were ready before the first task" in output
    assert "finished:  2025-01, 2025-12, 2025-02, 2025-03" in output
    assert elapsed < DEMO_PROMISED_SECONDS, f"the demo took {elapsed:.1f} s"

    try:
        wait_until(lambda: not demo_leftovers(token, started_at, existing), timeout=10)
    except AssertionError:
        left = demo_leftovers(token, started_at, existing)
        raise AssertionError(f"the demo left processes behind: {left}") from None


def test_info_reports_version_and_start_methods() -> None:
    done = run_duckpool("info")

    assert done.returncode == 0, done.stderr
    assert re.search(r"^duckpool\s+\d+\.\d+", done.stdout, re.M)
    assert re.search(r"^start methods\s+.*\bspawn\b", done.stdout, re.M)
    assert re.search(r"^default method\s+\w+", done.stdout, re.M)
    assert re.search(r"^cpu count\s+\d+", done.stdout, re.M)


def test_bench_help_is_the_harness_help() -> None:
    done = run_duckpool("bench", "--help")

    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout.lower()


def test_no_command_prints_usage_and_exits_2() -> None:
    done = run_duckpool()

    assert done.returncode == 2
    assert "demo" in done.stdout
    assert "bench" in done.stdout
    assert "info" in done.stdout


def test_console_script_is_installed() -> None:
    try:
        importlib.metadata.distribution("duckpool")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("duckpool is not installed as a distribution (running from src/)")
    script = shutil.which("duckpool", path=str(Path(sys.executable).parent))
    assert script is not None, f"no duckpool script next to {sys.executable}"

    done = subprocess.run(
        [script, "info"], capture_output=True, text=True, timeout=DEMO_TIMEOUT, check=False
    )

    assert done.returncode == 0, done.stderr
    assert "start methods" in done.stdout
