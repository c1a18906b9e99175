"""How many CPUs this process may use: the default worker count, and why.

``os.cpu_count()`` counts the machine's CPUs.  A process may be allowed fewer:

* its **CPU affinity** (``taskset``, a Kubernetes static CPU policy) names the
  CPUs it may run on (``os.process_cpu_count()`` from Python 3.13,
  ``os.sched_getaffinity`` before);
* its **cgroup's CPU quota** (a container's ``--cpus=1.5``, a Kubernetes CPU
  limit) lets it use so many CPUs' worth of time per period, on any of them:
  ``cpu.max`` ("QUOTA PERIOD", or "max") under cgroup v2, ``cpu.cfs_quota_us``
  and ``cpu.cfs_period_us`` under v1.  The tightest quota on the way from its
  cgroup up to the root applies.

A pool with more busy workers than that gets no more done, only throttled,
and each worker costs its memory: a ``cpu_count() * 2`` default in a 2-CPU
pod of an 80-core machine starts 160 workers and is OOM-killed.  So the
default is the smaller of the two counts, a quota rounded up (1.5 CPUs: 2
workers, since a worker often waits) and at least 1.
"""

from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple, Optional

__all__ = ["CpuBudget", "cpu_budget"]


class CpuBudget(NamedTuple):
    """How many workers to start by default, and the reasoning."""

    workers: int
    reason: str


def cpu_budget(cgroup_file: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> CpuBudget:
    """The CPUs this process may use (see the module doc), with why."""
    count, reason = _affinity()
    quota = _cgroup_quota(cgroup_file, root)
    if quota is not None:
        cpus, where = quota
        limit = max(1, math.ceil(cpus))
        if limit < count:
            return CpuBudget(limit, f"{reason}; cgroup CPU quota {cpus:g} ({where}), rounded up")
        reason += f"; cgroup CPU quota {cpus:g} ({where}) allows as many"
    return CpuBudget(count, reason)


def _affinity() -> tuple[int, str]:
    process_cpu_count = getattr(os, "process_cpu_count", None)
    if process_cpu_count is not None:
        return max(1, process_cpu_count() or 1), "CPUs this process may run on"
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        return max(1, len(getaffinity(0))), "CPUs this process may run on"
    return max(1, os.cpu_count() or 1), "CPUs of the machine (no affinity here)"


def _cgroup_quota(cgroup_file: str, root: str) -> Optional[tuple[float, str]]:
    """The tightest CPU quota on this process's cgroup and its ancestors, in
    CPUs, with the file it came from; None without any (or without cgroups)."""
    try:
        with open(cgroup_file) as lines:
            entries = [line.rstrip("\n").split(":", 2) for line in lines]
    except OSError:
        return None
    found: list[tuple[float, str]] = []
    for entry in entries:
        if len(entry) != 3:
            continue
        _, controllers, path = entry
        if controllers == "":  # cgroup v2: "0::/path"
            found += _quotas(root, path, _read_v2)
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            found += _quotas(os.path.join(root, controllers), path, _read_v1)
            found += _quotas(os.path.join(root, "cpu"), path, _read_v1)
    return min(found) if found else None


_Reader = Callable[[str], Optional[tuple[float, str]]]


def _quotas(mount: str, path: str, read: _Reader) -> list[tuple[float, str]]:
    """Quotas of the cgroup at ``path`` under ``mount`` and of its ancestors.

    (Inside a container the cgroup's own directory is often the mount's
    root, whatever ``path`` says: every directory from the deepest up is read.)
    """
    found = []
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), -1, -1):
        directory = os.path.join(mount, *parts[:depth])
        quota = read(directory)
        if quota is not None:
            found.append(quota)
    return found


def _read_v2(directory: str) -> Optional[tuple[float, str]]:
    name = os.path.join(directory, "cpu.max")
    try:
        with open(name) as file:
            fields = file.read().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return (quota / period, name) if quota > 0 and period > 0 else None


def _read_v1(directory: str) -> Optional[tuple[float, str]]:
    try:
        with open(os.path.join(directory, "cpu.cfs_quota_us")) as file:
            quota = int(file.read())
        with open(os.path.join(directory, "cpu.cfs_period_us")) as file:
            period = int(file.read())
    except (OSError, ValueError):
        return None
    name = os.path.join(directory, "cpu.cfs_quota_us")
    return (quota / period, name) if quota > 0 and period > 0 else None
