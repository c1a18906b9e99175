"""Typed routing: pools of several task types, module-level submit, per-type caps."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import _executor_tasks as tasks
import duckpool
from conftest import wait_until

TIMEOUT = 30


def test_a_pool_may_accept_several_task_types(ctx: object) -> None:
    manager = duckpool.get_or_create_process_manager("media")
    manager.start(1, task_type={"render", "thumbnail"}, mp_context=ctx)  # type: ignore[arg-type]
    assert manager.submit_task(tasks.add, 1, 1, task_type="render").result(TIMEOUT) == 2
    assert manager.submit_task(tasks.add, 2, 2, task_type="thumbnail").result(TIMEOUT) == 4
    with pytest.raises(duckpool.UnknownTaskError, match=r"\['render', 'thumbnail'\]") as info:
        manager.submit_task(tasks.add, 1, 1, task_type="report")
    assert info.value.task_type == "report"
    with pytest.raises(duckpool.UnknownTaskError):
        manager.submit_task(tasks.add, 1, 1)


@pytest.mark.parametrize("bad", [3, [], ["ok", 4], {"a": 1}, b"bytes"])
def test_bad_task_types_are_refused(bad: object) -> None:
    manager = duckpool.get_or_create_process_manager("bad-types")
    with pytest.raises(TypeError, match="task_type must be"):
        manager.start(1, task_type=bad)  # type: ignore[arg-type]
    assert manager.state == "new"


def test_module_level_submit_reaches_the_pool_of_that_type(ctx: object) -> None:
    render = duckpool.get_or_create_process_manager("render")
    render.start(1, task_type="render", mp_context=ctx)  # type: ignore[arg-type]
    report = duckpool.get_or_create_process_manager("report")
    report.start(1, task_type="report", mp_context=ctx)  # type: ignore[arg-type]
    render_pid = render.submit_task(tasks.getpid, task_type="render").result(TIMEOUT)
    report_pid = report.submit_task(tasks.getpid, task_type="report").result(TIMEOUT)
    assert duckpool.submit_task(tasks.getpid, task_type="render").result(TIMEOUT) == render_pid
    assert duckpool.submit_task(tasks.getpid, task_type="report").result(TIMEOUT) == report_pid
    assert duckpool.pool_for("report") is report
    assert asyncio.run(duckpool.run_task(tasks.add, 2, 3, task_type="render")) == 5
    with pytest.raises(duckpool.ManagerNotFound, match=r"'export'.*\['render', 'report'\]"):
        duckpool.submit_task(tasks.getpid, task_type="export")


def test_an_untyped_pool_is_the_fallback(ctx: object) -> None:
    anything = duckpool.get_or_create_process_manager("anything")
    anything.start(1, mp_context=ctx)  # type: ignore[arg-type]
    assert duckpool.submit_task(tasks.add, 1, 2, task_type="misc").result(TIMEOUT) == 3
    anything.stop()
    with pytest.raises(duckpool.ManagerNotFound):
        duckpool.submit_task(tasks.add, 1, 2, task_type="misc")


def test_a_type_limit_keeps_one_workload_from_taking_every_worker(
    ctx: object, tmp_path: Path, gate: Path
) -> None:
    pool = duckpool.ProcessPoolExecutor(3, ctx, type_limits={"report": 1})  # type: ignore[arg-type]
    try:
        running = tmp_path / "running"
        running.mkdir()
        reports = [
            pool.options(task_type="report").submit(
                tasks.mark_running_then_wait, str(running), f"report-{i}", str(gate)
            )
            for i in range(3)
        ]
        wait_until(lambda: len(list(running.iterdir())) == 1, TIMEOUT)
        # Two workers stay free for other work while reports queue.
        renders = [pool.options(task_type="render").submit(tasks.add, i, 1) for i in range(10)]
        assert [f.result(TIMEOUT) for f in renders] == list(range(1, 11))
        assert len(list(running.iterdir())) == 1
        assert pool.stats().pending == 2
        gate.touch()
        assert [f.result(TIMEOUT) for f in reports] == ["released"] * 3
    finally:
        gate.touch()
        pool.shutdown()


def test_the_manager_applies_type_limits(ctx: object, tmp_path: Path, gate: Path) -> None:
    manager = duckpool.get_or_create_process_manager("limited")
    manager.start(  # type: ignore[arg-type]
        2, task_type={"a", "b"}, mp_context=ctx, type_limits={"a": 1}
    )
    running = tmp_path / "running"
    running.mkdir()
    first = [
        manager.submit_task(
            tasks.mark_running_then_wait, str(running), f"a{i}", str(gate), task_type="a"
        )
        for i in range(2)
    ]
    wait_until(lambda: len(list(running.iterdir())) == 1, TIMEOUT)
    assert manager.submit_task(tasks.add, 1, 1, task_type="b").result(TIMEOUT) == 2
    gate.touch()
    assert [f.result(TIMEOUT) for f in first] == ["released"] * 2


@pytest.mark.parametrize(
    ("limits", "error"),
    [({"a": 0}, ValueError), ({"a": "1"}, TypeError), ({1: 1}, TypeError), ([("a", 1)], TypeError)],
)
def test_bad_type_limits_are_refused(limits: object, error: type) -> None:
    with pytest.raises(error, match="type_limits"):
        duckpool.ProcessPoolExecutor(1, type_limits=limits)  # type: ignore[arg-type]
