"""``snapshot``: a pool's ``stats()``, read from its owners and counters under its lock."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional

from duckpool._stats import HelperStats, PoolStats, WorkerStats

if TYPE_CHECKING:
    from duckpool._pool._slots import Slot
    from duckpool._pool._view import Core


def percentile(ordered: list[float], fraction: float) -> Optional[float]:
    """The value at ``fraction`` (0 to 1) of the sorted ``ordered``; None if empty."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def rss_of(pids: list[int]) -> dict[int, int]:
    """Resident memory of each process, in bytes (empty without psutil)."""
    try:
        import psutil
    except ImportError:
        return {}
    sizes = {}
    for pid in pids:
        try:
            sizes[pid] = int(psutil.Process(pid).memory_info().rss)
        except (psutil.Error, OSError):
            pass
    return sizes


def snapshot(core: Core) -> PoolStats:
    """A pool's workers, queue and counters now (takes the pool's lock; the
    workers' memory is read after it is released)."""
    with core.lock:
        counters = core.counters
        workers = [
            (slot.index, slot.process.pid, _worker_state(core, slot), slot.tasks_done)
            for slot in core.slots
            if slot.process is not None and slot.process.pid is not None
        ]
        latencies = sorted(counters.latencies)
        pending = len(core.scheduler.pending)
        in_flight = sum(len(slot.assigned) for slot in core.slots)
        counts = (
            counters.completed,
            counters.failed,
            counters.timed_out,
            counters.worker_deaths,
            counters.restarts,
            counters.recycles,
            counters.retried,
        )
        quarantined = core.quarantine.active(time.monotonic())
        elastic = core.elastic
        minimum = min(elastic.min_workers, core.size) if elastic.enabled else core.size
        helpers = tuple(HelperStats(role, pid) for role, pid in core.zygotes.helpers())
        stopped = (
            core.lifecycle.shutdown_requested
            and not core.dispatcher.running()
            and not workers
            and not helpers
        )
    rss = rss_of([pid for _, pid, _, _ in workers])
    completed, failed, timed_out, deaths, restarts, recycles, retried = counts
    return PoolStats(
        max_workers=core.size,
        workers=tuple(
            WorkerStats(slot=index, pid=pid, state=state, tasks_done=done, rss=rss.get(pid))
            for index, pid, state, done in workers
        ),
        pending=pending,
        in_flight=in_flight,
        completed=completed,
        failed=failed,
        timed_out=timed_out,
        worker_deaths=deaths,
        restarts=restarts,
        recycles=recycles,
        quarantined=quarantined,
        latency_p50=percentile(latencies, 0.50),
        latency_p99=percentile(latencies, 0.99),
        helpers=helpers,
        stopped=stopped,
        retried=retried,
        min_workers=minimum,
    )


def _worker_state(core: Core, slot: Slot) -> str:
    if slot.stopping is not None:
        return "stopping"
    if slot.index >= core.size or (slot.retiring and not slot.assigned):
        return "retiring"
    if slot.assigned and core.marks[slot.index] == slot.assigned[0].task_id:
        return "busy"  # it took its task up (its "ready" may not be read yet)
    if not slot.ready:
        return "starting"
    return "busy" if slot.assigned else "idle"
