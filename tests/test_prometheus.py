"""The Prometheus collector reports every running pool's stats()."""

from __future__ import annotations

import pytest

import _executor_tasks as tasks
import duckpool

prometheus_client = pytest.importorskip("prometheus_client")

TIMEOUT = 30


def _sample(registry: object, name: str, **labels: str) -> float | None:
    value = registry.get_sample_value(name, labels)  # type: ignore[attr-defined]
    return None if value is None else float(value)


def test_the_collector_reports_managers_and_named_executors(ctx: object) -> None:
    registry = prometheus_client.CollectorRegistry()
    manager = duckpool.get_or_create_process_manager("render")
    manager.start(2, mp_context=ctx)  # type: ignore[arg-type]
    extra = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        assert manager.submit_task(tasks.add, 1, 2).result(TIMEOUT) == 3
        with pytest.raises(KeyError):
            manager.submit_task(tasks.raise_key_error, "k").result(TIMEOUT)
        assert extra.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
        duckpool.register_prometheus(registry, executors={"extra": extra})
        assert _sample(registry, "duckpool_tasks_completed_total", pool="render") == 1
        assert _sample(registry, "duckpool_tasks_failed_total", pool="render") == 1
        assert _sample(registry, "duckpool_tasks_completed_total", pool="extra") == 1
        assert _sample(registry, "duckpool_max_workers", pool="render") == 2
        assert _sample(registry, "duckpool_tasks_pending", pool="render") == 0
        assert _sample(registry, "duckpool_task_latency_seconds", pool="render", quantile="0.5")
        text = prometheus_client.generate_latest(registry).decode()
        assert 'duckpool_workers{pool="render",state="idle"}' in text
        assert "duckpool_worker_rss_bytes" in text
        manager.stop()
        # A stopped manager drops out of the next scrape.
        assert _sample(registry, "duckpool_tasks_completed_total", pool="render") is None
    finally:
        extra.shutdown()
