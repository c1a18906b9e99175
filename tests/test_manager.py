"""ProcessPoolManager: start, submit, task types, stop, worker death, names, daemon, contexts."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest

import _tasks
import duckpool
from conftest import TESTS_DIR, proc_cmdline, proc_comm, process_gone, wait_until
from duckpool import (
    ProcessPoolManager,
    UnknownTaskError,
    WorkerDiedError,
    get_or_create_process_manager,
)

# --- helpers ----------------------------------------------------------------------


def _started(
    start_method: str, max_workers: int = 1, manager_id: str = "m", **options: Any
) -> ProcessPoolManager:
    """A registered manager, started under ``start_method``."""
    manager = get_or_create_process_manager(manager_id)
    manager.start(
        max_workers=max_workers, mp_context=multiprocessing.get_context(start_method), **options
    )
    return manager


def _reports(report_dir: Path) -> dict[int, str]:
    """What ``_tasks.report_and_wait`` wrote: ``{worker pid: process name}``."""
    return {int(p.name): p.read_text() for p in report_dir.iterdir() if p.name.isdigit()}


def _wait_for_reports(report_dir: Path, count: int) -> dict[int, str]:
    wait_until(lambda: len(_reports(report_dir)) >= count, timeout=30)
    return _reports(report_dir)


def _script_env() -> dict[str, str]:
    """The environment for a child interpreter that imports duckpool and ``_tasks``."""
    package_root = Path(duckpool.__file__).resolve().parent.parent
    # An installed duckpool is found by the interpreter itself; a source tree is not.
    paths = [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]
    if package_root.name not in ("site-packages", "dist-packages"):
        paths.insert(0, str(package_root))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def run_script(code: str, *args: str, timeout: float = 60) -> tuple[str, float]:
    """Run ``code`` with ``python -c`` in a fresh interpreter; return (stdout, seconds taken)."""
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=_script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    elapsed = time.monotonic() - began
    assert done.returncode == 0, f"script failed ({done.returncode}):\n{done.stderr}"
    return done.stdout, elapsed


def _kill_if_alive(pid: int) -> None:
    """Clean up a worker a failing test left behind (a process this test caused)."""
    if not process_gone(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def report_dir(tmp_path: Path) -> Path:
    path = tmp_path / "reports"
    path.mkdir()
    return path


# --- start --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True], ids=repr)
def test_start_rejects_invalid_max_workers(start_method: str, value: Any) -> None:
    manager = get_or_create_process_manager("m")
    with pytest.raises((ValueError, TypeError), match=re.escape(repr(value))) as info:
        manager.start(max_workers=value, mp_context=multiprocessing.get_context(start_method))
    assert "max_workers" in str(info.value)


def test_start_with_invalid_max_workers_leaves_manager_unstarted(start_method: str) -> None:
    manager = get_or_create_process_manager("m")
    ctx = multiprocessing.get_context(start_method)
    with pytest.raises((ValueError, TypeError)):
        manager.start(max_workers=0, mp_context=ctx)
    with pytest.raises(RuntimeError):
        manager.submit_task(_tasks.add, 1, 2)
    manager.start(max_workers=1, mp_context=ctx)
    assert manager.submit_task(_tasks.add, 1, 2).result(timeout=30) == 3


def test_start_twice_raises_runtime_error(start_method: str) -> None:
    manager = _started(start_method)
    with pytest.raises(RuntimeError):
        manager.start(max_workers=1, mp_context=multiprocessing.get_context(start_method))


def test_failed_second_start_keeps_the_running_pool(start_method: str) -> None:
    manager = _started(start_method, task_type="render")
    pool = manager.get_pool()
    with pytest.raises(RuntimeError):
        manager.start(max_workers=2, mp_context=multiprocessing.get_context(start_method))
    assert manager.get_pool() is pool
    assert manager.submit_task(_tasks.add, 1, 2, task_type="render").result(timeout=30) == 3


def test_start_after_stop_works(start_method: str) -> None:
    manager = _started(start_method)
    manager.stop()
    manager.start(max_workers=1, mp_context=multiprocessing.get_context(start_method))
    assert manager.submit_task(_tasks.add, 2, 3).result(timeout=30) == 5


def test_submit_before_start_raises_runtime_error() -> None:
    with pytest.raises(RuntimeError):
        get_or_create_process_manager("m").submit_task(_tasks.add, 1, 2)


def test_get_pool_before_start_raises_runtime_error() -> None:
    with pytest.raises(RuntimeError):
        get_or_create_process_manager("m").get_pool()


def test_submit_after_stop_raises_runtime_error(start_method: str) -> None:
    manager = _started(start_method)
    manager.stop()
    with pytest.raises(RuntimeError):
        manager.submit_task(_tasks.add, 1, 2)


def test_get_pool_after_stop_raises_runtime_error(start_method: str) -> None:
    manager = _started(start_method)
    manager.stop()
    with pytest.raises(RuntimeError):
        manager.get_pool()


# --- submit and task types -------------------------------------------------------------


def test_submit_passes_args_and_kwargs_but_not_task_type(start_method: str) -> None:
    manager = _started(start_method, task_type="render")
    future = manager.submit_task(_tasks.kwargs_of, 1, "two", task_type="render", x=3)
    assert future.result(timeout=30) == ((1, "two"), {"x": 3})


def test_typed_pool_accepts_its_task_type(start_method: str) -> None:
    manager = _started(start_method, task_type="render")
    assert manager.submit_task(_tasks.add, 1, 2, task_type="render").result(timeout=30) == 3


def test_typed_pool_rejects_another_task_type(start_method: str) -> None:
    manager = _started(start_method, task_type="render")
    with pytest.raises(UnknownTaskError) as info:
        manager.submit_task(_tasks.add, 1, 2, task_type="reports")
    assert info.value.task_type == "reports"
    assert info.value.pool_task_type == "render"
    assert "reports" in str(info.value) and "render" in str(info.value)


def test_typed_pool_rejects_an_untyped_task(start_method: str) -> None:
    manager = _started(start_method, task_type="render")
    with pytest.raises(UnknownTaskError) as info:
        manager.submit_task(_tasks.add, 1, 2)
    assert info.value.task_type is None
    assert info.value.pool_task_type == "render"
    assert "None" in str(info.value) and "render" in str(info.value)


def test_typed_pool_serves_after_rejecting_a_task(start_method: str) -> None:
    manager = _started(start_method, task_type="render")
    with pytest.raises(UnknownTaskError):
        manager.submit_task(_tasks.add, 1, 2, task_type="reports")
    assert manager.submit_task(_tasks.add, 1, 2, task_type="render").result(timeout=30) == 3


def test_untyped_pool_accepts_every_task_type(start_method: str) -> None:
    manager = _started(start_method)
    futures = [manager.submit_task(_tasks.echo, kind, task_type=kind) for kind in (None, "a", "b")]
    assert [f.result(timeout=30) for f in futures] == [None, "a", "b"]


def test_task_exception_is_delivered_through_the_future(start_method: str) -> None:
    manager = _started(start_method)
    future = manager.submit_task(_tasks.raise_value_error, "boom from the task")
    with pytest.raises(ValueError, match="boom from the task"):
        future.result(timeout=30)


def test_pool_goes_on_after_a_task_raises(start_method: str) -> None:
    manager = _started(start_method)
    worker_pid = manager.submit_task(_tasks.getpid).result(timeout=30)
    failing = manager.submit_task(_tasks.raise_value_error, "boom")
    assert isinstance(failing.exception(timeout=30), ValueError)
    assert manager.submit_task(_tasks.getpid).result(timeout=30) == worker_pid


# --- stop -------------------------------------------------------------------------------


def test_stop_is_idempotent(start_method: str) -> None:
    manager = _started(start_method)
    manager.stop()
    manager.stop()
    manager.stop(wait=False)


def test_stop_with_a_bad_timeout_raises_and_leaves_the_pool_running(start_method: str) -> None:
    manager = _started(start_method)
    with pytest.raises(ValueError, match="timeout must be greater than 0"):
        manager.stop(timeout=-1)
    with pytest.raises(TypeError, match="timeout must be a number"):
        manager.stop(timeout="soon")  # type: ignore[arg-type]
    assert manager.state == "running"
    assert manager.submit_task(_tasks.add, 1, 2).result(timeout=30) == 3
    manager.stop()
    assert manager.state == "stopped"


def test_submit_task_refuses_a_task_type_that_is_not_a_string(start_method: str) -> None:
    manager = _started(start_method)  # untyped: it accepts any type, but only a str is one
    with pytest.raises(TypeError, match="task_type must be a str or None, got 5"):
        manager.submit_task(_tasks.add, 1, 2, task_type=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="task_type must be a str or None, got 5"):
        manager.options(priority=1).submit_task(_tasks.add, 1, 2, task_type=5)  # type: ignore[arg-type]
    assert manager.submit_task(_tasks.add, 1, 2, task_type="any").result(timeout=30) == 3


def test_stop_before_start_does_nothing() -> None:
    manager = get_or_create_process_manager("m")
    manager.stop()
    manager.stop(wait=False)


def test_stop_stops_the_workers(start_method: str) -> None:
    manager = _started(start_method)
    worker_pid = manager.submit_task(_tasks.getpid).result(timeout=30)
    manager.stop()
    wait_until(lambda: process_gone(worker_pid), timeout=15)


def test_stop_wait_true_completes_outstanding_futures(start_method: str) -> None:
    manager = _started(start_method)
    futures = [manager.submit_task(_tasks.sleep_then, 0.05, i) for i in range(3)]
    manager.stop(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result(timeout=0) for f in futures] == [0, 1, 2]


def test_stop_wait_false_returns_promptly(start_method: str, gate: Path, report_dir: Path) -> None:
    manager = _started(start_method)
    blocked = manager.submit_task(_tasks.report_and_wait, str(report_dir), str(gate), 30)
    _wait_for_reports(report_dir, 1)
    began = time.monotonic()
    manager.stop(wait=False)
    elapsed = time.monotonic() - began
    gate.touch()
    concurrent.futures.wait([blocked], timeout=30)
    assert elapsed < 2, f"stop(wait=False) took {elapsed:.1f} s with a task running"


def test_stop_wait_false_outstanding_futures_resolve(
    start_method: str, gate: Path, report_dir: Path
) -> None:
    manager = _started(start_method)
    running = manager.submit_task(_tasks.report_and_wait, str(report_dir), str(gate), 30)
    queued = [manager.submit_task(_tasks.add, i, i) for i in range(2)]
    _wait_for_reports(report_dir, 1)
    manager.stop(wait=False)
    gate.touch()
    _, not_done = concurrent.futures.wait([running, *queued], timeout=30)
    assert not not_done, "stop(wait=False) left futures unresolved"


# --- worker death ------------------------------------------------------------------------


def test_worker_died_error_is_a_broken_process_pool() -> None:
    assert issubclass(WorkerDiedError, BrokenProcessPool)


def test_worker_exit_fails_its_task_naming_the_exit_code(start_method: str) -> None:
    manager = _started(start_method)
    worker_pid = manager.submit_task(_tasks.getpid).result(timeout=30)
    error = manager.submit_task(_tasks.exit_now, 3).exception(timeout=30)
    assert isinstance(error, WorkerDiedError), repr(error)
    assert re.search(r"\b3\b", str(error)), str(error)
    assert (error.pid, error.exitcode, error.signal_name) == (worker_pid, 3, None)


def test_worker_sigkill_fails_its_task_naming_sigkill(start_method: str) -> None:
    manager = _started(start_method)
    worker_pid = manager.submit_task(_tasks.getpid).result(timeout=30)
    error = manager.submit_task(_tasks.kill_self, signal.SIGKILL).exception(timeout=30)
    assert isinstance(error, WorkerDiedError), repr(error)
    assert "SIGKILL" in str(error)
    assert (error.pid, error.exitcode, error.signal_name) == (worker_pid, -9, "SIGKILL")


def test_worker_death_fails_only_its_task(start_method: str, gate: Path, report_dir: Path) -> None:
    manager = _started(start_method, max_workers=2)
    innocent = manager.submit_task(_tasks.report_and_wait, str(report_dir), str(gate), 30)
    _wait_for_reports(report_dir, 1)
    doomed = manager.submit_task(_tasks.exit_now, 3)
    assert isinstance(doomed.exception(timeout=30), WorkerDiedError)
    assert not innocent.done(), f"the innocent task ended early: {innocent!r}"
    gate.touch()
    assert innocent.result(timeout=30)["pid"] in _reports(report_dir)


def test_next_task_succeeds_after_worker_death(start_method: str) -> None:
    manager = _started(start_method)
    assert isinstance(manager.submit_task(_tasks.exit_now, 3).exception(timeout=30), BaseException)
    assert manager.submit_task(_tasks.add, 2, 2).result(timeout=30) == 4


def test_next_task_succeeds_after_worker_sigkill(start_method: str) -> None:
    manager = _started(start_method)
    failed = manager.submit_task(_tasks.kill_self, signal.SIGKILL)
    assert isinstance(failed.exception(timeout=30), BaseException)
    assert manager.submit_task(_tasks.add, 2, 2).result(timeout=30) == 4


# --- process names -------------------------------------------------------------------


def test_worker_process_names_are_prefix_and_slot(
    start_method: str, gate: Path, report_dir: Path
) -> None:
    manager = _started(start_method, max_workers=2, process_name_prefix="dpw")
    futures = [
        manager.submit_task(_tasks.report_and_wait, str(report_dir), str(gate), 30)
        for _ in range(2)
    ]
    names = sorted(_wait_for_reports(report_dir, 2).values())
    gate.touch()
    concurrent.futures.wait(futures, timeout=30)
    assert names == ["dpw-0", "dpw-1"]


def test_worker_os_titles_start_with_prefix_and_slot(
    start_method: str, gate: Path, report_dir: Path
) -> None:
    manager = _started(start_method, max_workers=2, process_name_prefix="dpw")
    futures = [
        manager.submit_task(_tasks.report_and_wait, str(report_dir), str(gate), 30)
        for _ in range(2)
    ]
    workers = _wait_for_reports(report_dir, 2)
    titles = {pid: proc_cmdline(pid) for pid in workers}
    gate.touch()
    concurrent.futures.wait(futures, timeout=30)
    for pid, name in workers.items():
        assert re.match(rf"{re.escape(name)}(?!\d)", titles[pid]), (name, titles[pid])
    assert sorted(workers.values()) == ["dpw-0", "dpw-1"]


def test_worker_comm_starts_with_prefix_and_slot(start_method: str) -> None:
    manager = _started(start_method, max_workers=1, process_name_prefix="dpw")
    worker_pid = manager.submit_task(_tasks.getpid).result(timeout=30)
    comm = proc_comm(worker_pid)
    assert re.match(r"dpw-0(?!\d)", comm), comm


def test_replacement_worker_keeps_the_dead_workers_slot_name(
    start_method: str, gate: Path, report_dir: Path
) -> None:
    manager = _started(start_method, max_workers=2, process_name_prefix="dpr")
    busy = manager.submit_task(_tasks.report_and_wait, str(report_dir), str(gate), 30)
    try:
        (busy_name,) = _wait_for_reports(report_dir, 1).values()
        before = manager.submit_task(_tasks.worker_facts).result(timeout=30)
        assert before["name"] != busy_name
        died = manager.submit_task(_tasks.exit_now, 3).exception(timeout=30)
        assert isinstance(died, WorkerDiedError), repr(died)
        # The other worker is still busy: only the replacement can run this.
        after = manager.submit_task(_tasks.worker_facts).result(timeout=10)
        title = proc_cmdline(after["pid"])
    finally:
        gate.touch()
    busy.result(timeout=30)
    assert after["pid"] != before["pid"]
    assert after["name"] == before["name"]
    assert re.match(rf"{re.escape(before['name'])}(?!\d)", title), title


# --- str / repr -------------------------------------------------------------------------


@pytest.mark.parametrize("render", [str, repr], ids=["str", "repr"])
def test_text_form_shows_id_state_workers_task_type_and_start_method(
    start_method: str, render: Any
) -> None:
    manager = _started(start_method, max_workers=2, manager_id="pool-xyz", task_type="render")
    text = render(manager)
    assert "pool-xyz" in text
    assert re.search(r"running|started|active", text, re.IGNORECASE), text
    assert re.search(r"workers\W{0,3}2\b", text), text
    assert "render" in text
    assert re.search(rf"\b{start_method}\b", text), text


@pytest.mark.parametrize("render", [str, repr], ids=["str", "repr"])
def test_text_form_shows_stopped_state(start_method: str, render: Any) -> None:
    manager = _started(start_method, manager_id="pool-xyz")
    running = render(manager)
    manager.stop()
    stopped = render(manager)
    assert stopped != running
    assert re.search(r"stopped|shut|closed", stopped, re.IGNORECASE), stopped


# --- daemon -------------------------------------------------------------------------


DAEMON_SCRIPT = """
    import multiprocessing, os, sys, time
    import duckpool, _tasks

    method, pid_file = sys.argv[1], sys.argv[2]
    manager = duckpool.get_or_create_process_manager("daemon")
    manager.start(max_workers=1, daemon=True, mp_context=multiprocessing.get_context(method))
    manager.submit_task(_tasks.write_pid_then_sleep, pid_file, 30.0)
    deadline = time.monotonic() + 30
    while not os.path.exists(pid_file):
        if time.monotonic() > deadline:
            sys.exit("the task never started")
        time.sleep(0.01)
    # Fall off the end: interpreter exit with the task still running.
"""


def test_daemon_exit_neither_waits_for_running_task_nor_leaves_workers(
    start_method: str, tmp_path: Path
) -> None:
    pid_file = tmp_path / "worker.pid"
    try:
        _, elapsed = run_script(DAEMON_SCRIPT, start_method, str(pid_file))
        worker_pid = int(pid_file.read_text())
        assert elapsed < 10, f"exit took {elapsed:.1f} s: it waited for the running task"
        wait_until(lambda: process_gone(worker_pid), timeout=10)
    finally:
        if pid_file.exists():
            _kill_if_alive(int(pid_file.read_text()))


NON_DAEMON_SCRIPT = """
    import multiprocessing, sys
    import duckpool, _tasks

    method, done_file = sys.argv[1], sys.argv[2]
    manager = duckpool.get_or_create_process_manager("non-daemon")
    manager.start(max_workers=1, daemon=False, mp_context=multiprocessing.get_context(method))
    # Long next to the moments between submit and exit (the test needs no more):
    # an exit that does not wait stops the task before it is done.
    manager.submit_task(_tasks.touch_after, done_file, 0.3)
    # Fall off the end: interpreter exit must wait for the submitted task.
"""


def test_non_daemon_exit_waits_for_submitted_task(start_method: str, tmp_path: Path) -> None:
    done_file = tmp_path / "done"
    run_script(NON_DAEMON_SCRIPT, start_method, str(done_file))
    assert done_file.exists(), "the interpreter exited before the submitted task finished"
    wait_until(lambda: process_gone(int(done_file.read_text())), timeout=10)


@pytest.mark.parametrize("daemon", [True, False], ids=["daemon", "non-daemon"])
def test_task_can_start_a_child_process(start_method: str, daemon: bool) -> None:
    manager = _started(start_method, daemon=daemon)
    future = manager.submit_task(_tasks.start_child_process, start_method)
    assert future.result(timeout=60) == 0


# --- contexts --------------------------------------------------------------------------


def _assert_started_with(method: str, facts: dict[str, Any], parent_pid: int) -> None:
    """Tell the start method from inside the worker: fork copies the parent's memory
    (the MARKER set there), spawn and forkserver do not; a forkserver worker's parent
    is the fork server, not the process that owns the pool."""
    if method == "fork":
        assert facts["marker"] == "set in parent", facts
    else:
        assert facts["marker"] == "module default", facts
    if method == "spawn":
        assert facts["ppid"] == parent_pid, facts
    if method == "forkserver":
        assert facts["ppid"] != parent_pid, facts


def test_mp_context_start_method_is_used(
    start_method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_tasks, "MARKER", "set in parent")
    manager = _started(start_method)
    facts = manager.submit_task(_tasks.worker_facts).result(timeout=30)
    _assert_started_with(start_method, facts, os.getpid())


DEFAULT_CONTEXT_SCRIPT = """
    import json, multiprocessing, os, sys
    import duckpool, _tasks

    multiprocessing.set_start_method(sys.argv[1])
    _tasks.MARKER = "set in parent"
    manager = duckpool.get_or_create_process_manager("default-context")
    manager.start(max_workers=1)
    facts = manager.submit_task(_tasks.worker_facts).result(timeout=30)
    total = manager.submit_task(_tasks.add, 20, 22).result(timeout=30)
    manager.stop()
    print(json.dumps({"facts": facts, "total": total, "parent": os.getpid()}))
"""


def test_default_context_from_set_start_method_is_used(start_method: str) -> None:
    out, _ = run_script(DEFAULT_CONTEXT_SCRIPT, start_method)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["total"] == 42
    _assert_started_with(start_method, report["facts"], report["parent"])


def test_run_is_submit_task_for_asyncio(start_method: str) -> None:
    import asyncio

    manager = _started(start_method, task_type="render")

    async def main() -> Any:
        with pytest.raises(UnknownTaskError):
            await manager.run(_tasks.add, 1, 2)
        return await manager.run(_tasks.add, 1, 2, task_type="render")

    assert asyncio.run(main()) == 3
