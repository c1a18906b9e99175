"""A Prometheus collector for duckpool's pools (``pip install "duckpool[prometheus]"``).

Each scrape takes ``stats()`` of every running manager of this process
(labelled ``pool=<manager id>``) and of the executors given by name, and
reports them as gauges and counters.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY as DEFAULT_REGISTRY
from prometheus_client.registry import Collector, CollectorRegistry

from duckpool._registry import REGISTRY

if TYPE_CHECKING:
    from duckpool._executor import ProcessPoolExecutor
    from duckpool._stats import PoolStats

__all__ = ["PoolCollector", "register_prometheus"]

_COUNTERS = (
    ("completed", "duckpool_tasks_completed", "Tasks that returned a value."),
    ("failed", "duckpool_tasks_failed", "Tasks that raised an exception."),
    ("timed_out", "duckpool_tasks_timed_out", "Tasks stopped by their timeout."),
    ("worker_deaths", "duckpool_worker_deaths", "Workers that died unasked."),
    ("restarts", "duckpool_worker_restarts", "Replacement workers started."),
    ("recycles", "duckpool_worker_recycles", "Workers that left at a task or memory limit."),
)


class PoolCollector(Collector):
    """Reports the pools of this process to a Prometheus registry."""

    def __init__(self, executors: Optional[Mapping[str, ProcessPoolExecutor]] = None) -> None:
        self._executors = dict(executors or {})

    def _snapshots(self) -> Iterator[tuple[str, PoolStats]]:
        for manager_id, manager in list(REGISTRY.get(os.getpid(), {}).copy().items()):
            if manager.state != "running":
                continue
            try:
                yield str(manager_id), manager.stats()
            except RuntimeError:  # stopped meanwhile
                continue
        for name, executor in self._executors.items():
            yield name, executor.stats()

    def collect(self) -> Iterator[Any]:
        workers = GaugeMetricFamily(
            "duckpool_workers", "Live worker processes by state.", labels=["pool", "state"]
        )
        size = GaugeMetricFamily("duckpool_max_workers", "Worker slots.", labels=["pool"])
        pending = GaugeMetricFamily(
            "duckpool_tasks_pending", "Tasks waiting for a worker.", labels=["pool"]
        )
        in_flight = GaugeMetricFamily(
            "duckpool_tasks_in_flight", "Tasks held by workers.", labels=["pool"]
        )
        latency = GaugeMetricFamily(
            "duckpool_task_latency_seconds",
            "Seconds from submit to result, over the latest tasks.",
            labels=["pool", "quantile"],
        )
        rss = GaugeMetricFamily(
            "duckpool_worker_rss_bytes", "Resident memory of each worker.", labels=["pool", "slot"]
        )
        counters = {
            field: CounterMetricFamily(name, doc, labels=["pool"]) for field, name, doc in _COUNTERS
        }
        for pool, stats in self._snapshots():
            size.add_metric([pool], stats.max_workers)
            pending.add_metric([pool], stats.pending)
            in_flight.add_metric([pool], stats.in_flight)
            for state in ("starting", "idle", "busy", "stopping", "retiring"):
                count = sum(1 for w in stats.workers if w.state == state)
                workers.add_metric([pool, state], count)
            for quantile, value in (("0.5", stats.latency_p50), ("0.99", stats.latency_p99)):
                if value is not None:
                    latency.add_metric([pool, quantile], value)
            for worker in stats.workers:
                if worker.rss is not None:
                    rss.add_metric([pool, str(worker.slot)], worker.rss)
            for field, family in counters.items():
                family.add_metric([pool], getattr(stats, field))
        yield from (workers, size, pending, in_flight, latency, rss, *counters.values())


def register_prometheus(
    registry: Optional[CollectorRegistry] = None,
    executors: Optional[Mapping[str, ProcessPoolExecutor]] = None,
) -> PoolCollector:
    """Register a :class:`PoolCollector` (on the default registry if none is given)."""
    collector = PoolCollector(executors)
    (DEFAULT_REGISTRY if registry is None else registry).register(collector)
    return collector
