"""The default worker count: CPU affinity capped by the cgroup's CPU quota (``_cpus``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import duckpool
from duckpool import _cpus
from duckpool._validate import default_max_workers


@pytest.fixture
def four_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process may run on 4 CPUs, whatever the machine has."""
    monkeypatch.setattr(_cpus, "_affinity", lambda: (4, "CPUs this process may run on"))


def _cgroup(tmp_path: Path, lines: str, files: dict[str, str]) -> tuple[str, str]:
    """A /proc/self/cgroup and a cgroup mount with ``files`` (path -> content)."""
    proc = tmp_path / "cgroup"
    proc.write_text(lines)
    root = tmp_path / "sys-fs-cgroup"
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return str(proc), str(root)


@pytest.mark.usefixtures("four_cpus")
def test_a_cgroup_v2_quota_caps_the_count_rounded_up(tmp_path: Path) -> None:
    proc, root = _cgroup(
        tmp_path,
        "0::/pods/web\n",
        {
            "cpu.max": "max 100000\n",
            "pods/cpu.max": "max 100000\n",
            "pods/web/cpu.max": "150000 100000\n",
        },
    )
    budget = _cpus.cpu_budget(proc, root)
    assert budget.workers == 2  # 1.5 CPUs: 2 workers
    assert "1.5" in budget.reason and "pods/web/cpu.max" in budget.reason


@pytest.mark.usefixtures("four_cpus")
def test_the_tightest_quota_on_the_way_to_the_root_applies(tmp_path: Path) -> None:
    proc, root = _cgroup(
        tmp_path,
        "0::/pods/web\n",
        {"pods/cpu.max": "50000 100000\n", "pods/web/cpu.max": "300000 100000\n"},
    )
    assert _cpus.cpu_budget(proc, root).workers == 1  # half a CPU: at least one worker


@pytest.mark.usefixtures("four_cpus")
def test_a_quota_above_the_affinity_changes_nothing(tmp_path: Path) -> None:
    proc, root = _cgroup(tmp_path, "0::/\n", {"cpu.max": "800000 100000\n"})
    budget = _cpus.cpu_budget(proc, root)
    assert budget.workers == 4
    assert "allows as many" in budget.reason


@pytest.mark.usefixtures("four_cpus")
def test_a_cgroup_v1_quota_caps_the_count(tmp_path: Path) -> None:
    proc, root = _cgroup(
        tmp_path,
        "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n",
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        },
    )
    assert _cpus.cpu_budget(proc, root).workers == 2


@pytest.mark.usefixtures("four_cpus")
@pytest.mark.parametrize(
    "lines, files",
    [
        ("0::/\n", {"cpu.max": "max 100000\n"}),  # no quota
        ("0::/\n", {}),  # no cpu controller
        ("0::/\n", {"cpu.max": "garbage\n"}),
        ("4:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n"}),  # v1: none
    ],
)
def test_no_quota_leaves_the_affinity(tmp_path: Path, lines: str, files: dict[str, str]) -> None:
    proc, root = _cgroup(tmp_path, lines, files)
    assert _cpus.cpu_budget(proc, root) == (4, "CPUs this process may run on")


@pytest.mark.usefixtures("four_cpus")
def test_without_cgroups_the_affinity_is_the_count(tmp_path: Path) -> None:
    assert _cpus.cpu_budget(str(tmp_path / "missing"), str(tmp_path)).workers == 4


def test_pools_without_max_workers_use_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cpus, "cpu_budget", lambda: _cpus.CpuBudget(3, "a test's budget"))
    assert default_max_workers() == 3
    pool = duckpool.ProcessPoolExecutor()
    try:
        assert pool.max_workers == 3
    finally:
        pool.shutdown()


def test_on_this_machine_the_budget_is_within_the_affinity() -> None:
    budget = _cpus.cpu_budget()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    assert budget.workers >= 1
    assert affinity is None or budget.workers <= affinity
