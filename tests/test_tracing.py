"""``trace=True``: an OpenTelemetry span per task, a child of the submitting
span, whose context the worker makes current, under fork, forkserver and spawn."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import _executor_tasks as tasks
import duckpool
from conftest import task_spans, wait_until

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.trace import StatusCode

import _tracing_tasks as tracing_tasks

TIMEOUT = 30


def test_a_tasks_span_is_a_child_of_the_submitting_span_and_current_in_the_worker(
    ctx: object, spans: Any
) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx, trace=True, pool_id="traced")  # type: ignore[arg-type]
    try:
        with trace.get_tracer("test").start_as_current_span("request") as request:
            future = pool.submit(tracing_tasks.current_ids)
        trace_id, span_id, pid = future.result(TIMEOUT)
        [task] = task_spans(spans, 1)
        parent = request.get_span_context()
        # One trace, across the process boundary: the worker ran the task
        # inside the task's span.
        assert task.context.trace_id == parent.trace_id == trace_id
        assert task.parent.span_id == parent.span_id
        assert task.context.span_id == span_id
        assert task.name == "duckpool.task _tracing_tasks.current_ids"
        attributes = dict(task.attributes)
        assert attributes["duckpool.pool"] == "traced"
        assert attributes["duckpool.slot"] == 0 and attributes["duckpool.attempt"] == 1
        assert attributes["duckpool.worker.pid"] == pid
        assert task.status.status_code is StatusCode.OK
    finally:
        pool.shutdown()


def test_a_spans_status_and_events_say_how_its_task_ended(
    ctx: object, spans: Any, short_graces: None, tmp_path: Path
) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        traced = pool.options(trace=True)
        with pytest.raises(KeyError):
            traced.submit(tracing_tasks.fail).result(TIMEOUT)
        with pytest.raises(duckpool.WorkerDiedError):
            pool.options(trace=True, retries=1).submit(tracing_tasks.die).result(TIMEOUT)
        with pytest.raises(duckpool.TaskTimeoutError):
            pool.options(trace=True, timeout=0.2).submit(time.sleep, 30).result(TIMEOUT)
        started, gate = tmp_path / "started", tmp_path / "gate"
        running = traced.submit(tasks.touch_then_wait, str(started), str(gate))
        wait_until(started.exists, TIMEOUT)
        assert pool.cancel_task(running)
        with pytest.raises(duckpool.TaskCancelledError):
            running.result(TIMEOUT)
        assert pool.submit(pow, 2, 2).result(TIMEOUT) == 4  # untraced: no span
        failed, died, timed_out, cancelled = task_spans(spans, 4)
        assert failed.status.status_code is StatusCode.ERROR
        assert [e.name for e in failed.events] == ["exception"]
        assert died.status.status_code is StatusCode.ERROR
        names = [e.name for e in died.events]
        assert "duckpool.retry" in names and "duckpool.worker_died" in names
        assert dict(died.attributes)["duckpool.attempt"] == 2
        assert "duckpool.timeout" in [e.name for e in timed_out.events]
        assert "duckpool.cancelled" in [e.name for e in cancelled.events]
        assert cancelled.status.status_code is StatusCode.ERROR
        assert len(task_spans(spans, 4)) == 4
    finally:
        pool.shutdown()


def test_trace_is_checked() -> None:
    with pytest.raises(TypeError, match="trace must be True or False"):
        duckpool.ProcessPoolExecutor(1, trace="yes")  # type: ignore[arg-type]


def test_the_managers_options_trace_a_task(ctx: object, spans: Any) -> None:
    manager = duckpool.get_or_create_process_manager("tracing-test")
    manager.start(1, mp_context=ctx)  # type: ignore[arg-type]
    try:
        with trace.get_tracer("test").start_as_current_span("request") as request:
            future = manager.options(trace=True).submit_task(tracing_tasks.current_ids)
        trace_id, span_id, _ = future.result(TIMEOUT)
        [task] = task_spans(spans, 1)
        assert task.parent.span_id == request.get_span_context().span_id
        assert (task.context.trace_id, task.context.span_id) == (trace_id, span_id)
        with pytest.raises(TypeError, match="trace must be True or False"):
            manager.options(trace="yes")  # type: ignore[arg-type]
    finally:
        manager.stop()
