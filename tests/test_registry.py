"""REGISTRY and get_or_create_process_manager: identity, replacement, threads, fork."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import _tasks
import duckpool
from conftest import process_gone, run_in_forked_child, wait_until
from duckpool import (
    REGISTRY,
    InheritedManagerError,
    ManagerNotFound,
    ProcessPoolManager,
    get_or_create_process_manager,
)

# --- helpers ----------------------------------------------------------------------


def _call_and_classify(call: Callable[[], Any]) -> tuple[str, str]:
    """Run ``call`` in the child; say which error it raised, if any (picklable)."""
    try:
        result = call()
    except InheritedManagerError as exc:
        return ("InheritedManagerError", str(exc))
    except BaseException as exc:
        return (type(exc).__name__, str(exc))
    if isinstance(result, concurrent.futures.Future):
        try:
            value = result.result(timeout=5)
        except BaseException as exc:
            return (f"future failed: {type(exc).__name__}", str(exc))
        return ("no error", f"the task ran and returned {value!r}")
    return ("no error", repr(result))


@pytest.fixture
def parent_manager(start_method: str) -> Iterator[ProcessPoolManager]:
    """A started, registered manager in the test process, with a worker already running."""
    manager = get_or_create_process_manager("parent-pool")
    manager.start(max_workers=1, mp_context=multiprocessing.get_context(start_method))
    assert manager.submit_task(_tasks.add, 1, 1).result(timeout=30) == 2
    yield manager


# --- identity -----------------------------------------------------------------------


def test_same_id_gives_same_manager() -> None:
    assert get_or_create_process_manager("a") is get_or_create_process_manager("a")


def test_default_id_is_none() -> None:
    manager = get_or_create_process_manager()
    assert get_or_create_process_manager(None) is manager
    assert REGISTRY[os.getpid()][None] is manager


def test_different_ids_give_different_managers() -> None:
    a = get_or_create_process_manager("a")
    b = get_or_create_process_manager("b")
    assert a is not b
    assert REGISTRY[os.getpid()] == {"a": a, "b": b}


def test_registry_is_keyed_by_pid_then_id() -> None:
    manager = get_or_create_process_manager("render")
    assert list(REGISTRY) == [os.getpid()]
    assert REGISTRY[os.getpid()]["render"] is manager


def test_manager_knows_its_id() -> None:
    manager = get_or_create_process_manager("render")
    assert manager.id == "render"
    assert "render" in repr(manager)
    assert "render" in str(manager)


# --- force_create ------------------------------------------------------------------------


def test_force_create_replaces_the_manager_of_that_id() -> None:
    old = get_or_create_process_manager("a")
    new = get_or_create_process_manager("a", force_create=True)
    assert new is not old
    assert get_or_create_process_manager("a") is new
    assert REGISTRY[os.getpid()]["a"] is new
    assert new.id == "a"


def test_force_create_leaves_other_ids_untouched() -> None:
    a = get_or_create_process_manager("a")
    b = get_or_create_process_manager("b")
    get_or_create_process_manager("a", force_create=True)
    assert REGISTRY[os.getpid()]["b"] is b
    assert get_or_create_process_manager("b") is b
    assert get_or_create_process_manager("a") is not a


def test_force_create_of_a_new_id_creates_it() -> None:
    manager = get_or_create_process_manager("fresh", force_create=True)
    assert get_or_create_process_manager("fresh") is manager


def test_force_create_stops_the_replaced_manager(start_method: str) -> None:
    old = get_or_create_process_manager("a")
    old.start(max_workers=1, mp_context=multiprocessing.get_context(start_method))
    worker_pid = old.submit_task(_tasks.getpid).result(timeout=30)
    get_or_create_process_manager("a", force_create=True)
    with pytest.raises(RuntimeError):
        old.submit_task(_tasks.add, 1, 2)
    wait_until(lambda: process_gone(worker_pid), timeout=15)


def test_force_create_keeps_other_ids_pools_running(start_method: str) -> None:
    ctx = multiprocessing.get_context(start_method)
    get_or_create_process_manager("a").start(max_workers=1, mp_context=ctx)
    b = get_or_create_process_manager("b")
    b.start(max_workers=1, mp_context=ctx)
    b_worker = b.submit_task(_tasks.getpid).result(timeout=30)
    get_or_create_process_manager("a", force_create=True)
    assert b.submit_task(_tasks.getpid).result(timeout=30) == b_worker


def test_force_create_outstanding_futures_of_replaced_manager_resolve(
    start_method: str, tmp_path: Path
) -> None:
    old = get_or_create_process_manager("a")
    old.start(max_workers=1, mp_context=multiprocessing.get_context(start_method))
    started = tmp_path / "started"
    running = old.submit_task(_tasks.touch_then_sleep, str(started), 0.5, "done")
    queued = old.submit_task(_tasks.add, 1, 2)
    wait_until(started.exists, timeout=30)
    get_or_create_process_manager("a", force_create=True)
    _, not_done = concurrent.futures.wait([running, queued], timeout=30)
    assert not not_done, "futures of the replaced manager never resolved"


# --- strictly_get and flag checks ------------------------------------------------------------


def test_strictly_get_missing_id_raises_manager_not_found() -> None:
    with pytest.raises(ManagerNotFound):
        get_or_create_process_manager("missing", strictly_get=True)


def test_strictly_get_missing_id_creates_nothing() -> None:
    get_or_create_process_manager("present")
    with pytest.raises(ManagerNotFound):
        get_or_create_process_manager("missing", strictly_get=True)
    assert "missing" not in REGISTRY.get(os.getpid(), {})


def test_strictly_get_on_empty_registry_raises_manager_not_found() -> None:
    assert os.getpid() not in REGISTRY or not REGISTRY[os.getpid()]
    with pytest.raises(ManagerNotFound):
        get_or_create_process_manager(strictly_get=True)


def test_strictly_get_existing_id_returns_it() -> None:
    manager = get_or_create_process_manager("present")
    assert get_or_create_process_manager("present", strictly_get=True) is manager


def test_force_create_and_strictly_get_together_is_an_error() -> None:
    existing = get_or_create_process_manager("a")
    with pytest.raises((TypeError, ValueError)):
        get_or_create_process_manager("a", force_create=True, strictly_get=True)
    assert get_or_create_process_manager("a") is existing


# --- all_instances ------------------------------------------------------------------------


def test_all_instances_lists_live_managers() -> None:
    a = get_or_create_process_manager("a")
    b = get_or_create_process_manager("b")
    instances = ProcessPoolManager.all_instances()
    assert a in instances and b in instances


def test_all_instances_drops_a_force_replaced_manager(start_method: str) -> None:
    old = get_or_create_process_manager("a")
    old.start(max_workers=1, mp_context=multiprocessing.get_context(start_method))
    new = get_or_create_process_manager("a", force_create=True)
    instances = ProcessPoolManager.all_instances()
    assert new in instances
    assert not any(m is old for m in instances)


# --- threads ------------------------------------------------------------------------------


def _race(barrier: threading.Barrier, results: list[Any], index: int, manager_id: str) -> None:
    barrier.wait(timeout=10)
    results[index] = get_or_create_process_manager(manager_id)


@pytest.fixture
def slow_manager_creation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make creating a manager take a few milliseconds, so that any window between
    "is this id registered?" and "register it" is wide enough for other threads."""
    original_init = ProcessPoolManager.__init__

    def slow_init(self: ProcessPoolManager, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.002)  # widens a race window; synchronises nothing
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(ProcessPoolManager, "__init__", slow_init)


def _run_threads(target: Callable[..., None], arg_lists: list[tuple[Any, ...]]) -> None:
    threads = [threading.Thread(target=target, args=args) for args in arg_lists]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a thread is stuck in the registry"


@pytest.mark.usefixtures("slow_manager_creation")
def test_concurrent_get_or_create_of_one_id_returns_one_manager() -> None:
    n_threads = 16
    for round_number in range(3):  # round 0 also races on the process's first entry
        manager_id = f"race-{round_number}"
        barrier = threading.Barrier(n_threads)
        results: list[Any] = [None] * n_threads
        _run_threads(_race, [(barrier, results, i, manager_id) for i in range(n_threads)])
        assert results[0] is not None
        assert all(r is results[0] for r in results), f"round {round_number}"
        assert REGISTRY[os.getpid()][manager_id] is results[0]


@pytest.mark.usefixtures("slow_manager_creation")
def test_concurrent_get_or_create_of_many_ids_registers_them_all() -> None:
    n_threads = 16
    barrier = threading.Barrier(n_threads)
    results: list[Any] = [None] * n_threads
    _run_threads(_race, [(barrier, results, i, f"id-{i}") for i in range(n_threads)])
    assert REGISTRY[os.getpid()] == {f"id-{i}": results[i] for i in range(n_threads)}


# --- fork ---------------------------------------------------------------------------------


def test_inherited_manager_error_is_a_runtime_error() -> None:
    assert issubclass(InheritedManagerError, RuntimeError)


def test_forked_child_sees_no_managers(parent_manager: ProcessPoolManager) -> None:
    def child() -> dict[str, Any]:
        try:
            get_or_create_process_manager("parent-pool", strictly_get=True)
            strict = "found the parent's manager"
        except ManagerNotFound:
            strict = "ManagerNotFound"
        return {
            "own": dict(REGISTRY.get(os.getpid(), {})),
            "any": [repr(k) for k, ids in REGISTRY.items() if ids],
            "strict": strict,
        }

    seen = run_in_forked_child(child)
    assert seen == {"own": {}, "any": [], "strict": "ManagerNotFound"}


def test_forked_child_gets_a_new_manager_for_an_existing_id(
    parent_manager: ProcessPoolManager,
) -> None:
    def child() -> tuple[bool, Any]:
        manager = get_or_create_process_manager("parent-pool")
        return manager is parent_manager, REGISTRY[os.getpid()]["parent-pool"] is manager

    assert run_in_forked_child(child) == (False, True)


def test_forked_child_can_run_tasks_on_its_own_manager(
    parent_manager: ProcessPoolManager, start_method: str
) -> None:
    def child() -> Any:
        manager = get_or_create_process_manager("parent-pool")
        manager.start(max_workers=1, mp_context=multiprocessing.get_context(start_method))
        try:
            return manager.submit_task(_tasks.add, 20, 22).result(timeout=20)
        finally:
            manager.stop()

    assert run_in_forked_child(child) == 42


def test_inherited_manager_submit_raises_inherited_manager_error(
    parent_manager: ProcessPoolManager,
) -> None:
    def child() -> tuple[str, str]:
        return _call_and_classify(lambda: parent_manager.submit_task(_tasks.add, 1, 2))

    kind, message = run_in_forked_child(child)
    assert kind == "InheritedManagerError", message


def test_inherited_manager_stop_raises_inherited_manager_error(
    parent_manager: ProcessPoolManager,
) -> None:
    def child() -> tuple[str, str]:
        return _call_and_classify(parent_manager.stop)

    kind, message = run_in_forked_child(child)
    assert kind == "InheritedManagerError", message


def test_parent_pool_keeps_working_after_child_used_inherited_manager(
    parent_manager: ProcessPoolManager,
) -> None:
    worker_pid = parent_manager.submit_task(_tasks.getpid).result(timeout=30)

    def child() -> list[tuple[str, str]]:
        return [
            _call_and_classify(lambda: parent_manager.submit_task(_tasks.add, 1, 2)),
            _call_and_classify(parent_manager.stop),
        ]

    run_in_forked_child(child)
    assert parent_manager.submit_task(_tasks.getpid).result(timeout=30) == worker_pid
    assert REGISTRY[os.getpid()]["parent-pool"] is parent_manager
    assert duckpool.get_or_create_process_manager("parent-pool") is parent_manager
