"""The one registry of live pools: its exit hook and its fork hook (``_process_pools``).

The Dask pool's part (drained by ``drain_all``, forgotten in a forked child,
refusing work at exit) is in ``test_dask.py``, with the other Dask tests; the
exit drain's in ``test_shutdown.py``.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
from typing import Any, Optional

import pytest

import _tasks
import duckpool
from conftest import run_in_forked_child
from duckpool import _process_pools, _registry

TIMEOUT = 30

LATE_SUBMIT_SCRIPT = textwrap.dedent(
    """
    import atexit, multiprocessing, sys

    method, kind, order = sys.argv[1:]

    def submit_late():
        try:
            submit(abs, -2)
        except RuntimeError as exc:
            print("refused:", exc, flush=True)
            raise  # atexit prints it on stderr
        print("accepted", flush=True)

    if order == "before-import":
        atexit.register(submit_late)

    import duckpool, _tasks

    context = multiprocessing.get_context(method)
    if kind == "manager":
        manager = duckpool.get_or_create_process_manager("late")
        manager.start(1, mp_context=context)
        submit = manager.submit_task
    else:
        submit = duckpool.ProcessPoolExecutor(1, context).submit
    print("ran", submit(_tasks.add, 1, 2).result(30), flush=True)

    if order == "after-import":
        atexit.register(submit_late)
    """
)

REFUSAL = "cannot schedule new futures after interpreter shutdown"


@pytest.mark.parametrize("order", ["after-import", "before-import"])
@pytest.mark.parametrize("kind", ["executor", "manager"])
def test_a_submit_from_an_atexit_handler_raises_whatever_the_registration_order(
    start_method: str, kind: str, order: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", LATE_SUBMIT_SCRIPT, start_method, kind, order],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    # An exception in an atexit handler is printed, not turned into an exit code.
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["ran 3", f"refused: {REFUSAL}"], done.stderr
    assert f"RuntimeError: {REFUSAL}" in done.stderr


NON_DAEMON_THREAD_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, sys, threading
    import duckpool, _tasks

    pool = duckpool.ProcessPoolExecutor(1, multiprocessing.get_context(sys.argv[1]))
    pool.submit(_tasks.add, 1, 1).result(30)

    def submit_after_main():
        threading.main_thread().join(30)  # returns once the interpreter is exiting
        try:
            pool.submit(_tasks.add, 1, 1)
        except RuntimeError as exc:
            print("refused:", exc, flush=True)
        else:
            print("accepted", flush=True)

    threading.Thread(target=submit_after_main).start()  # not a daemon: exit joins it
    """
)


def test_a_submit_from_a_non_daemon_thread_after_the_main_thread_ended_raises(
    start_method: str,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", NON_DAEMON_THREAD_SCRIPT, start_method],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"refused: {REFUSAL}"], done.stderr


class _FakePool:
    """A pool that claims whichever process asks, and records what it was told."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @property
    def owner_pid(self) -> int:
        return os.getpid()

    def request_shutdown(self, cancel_futures: bool) -> None:
        self.calls.append("request_shutdown")

    def join(self, timeout: Optional[float] = None) -> None:
        self.calls.append("join")

    def request_kill(self, signum: int, reason: Optional[str] = None) -> None:
        self.calls.append("request_kill")

    def forget_after_fork(self) -> None:
        self.calls.append("forget_after_fork")

    def shutdown_at_exit(self, interrupted: bool) -> None:
        self.calls.append("shutdown_at_exit")


def test_the_fork_hook_forgets_every_registered_pool_and_empties_the_registry() -> None:
    fake = _FakePool()
    _process_pools.LIVE_POOLS.add(fake)
    try:

        def child() -> tuple[list[str], bool]:
            # It claims the child too: only the registry's reset keeps it out.
            return fake.calls, fake in _process_pools.LIVE_POOLS.of_this_process()

        assert run_in_forked_child(child) == (["forget_after_fork"], False)
        assert fake.calls == []
        assert fake in _process_pools.LIVE_POOLS.of_this_process()
    finally:
        _process_pools.LIVE_POOLS.discard(fake)


def test_an_inherited_local_pool_refuses_work_and_the_child_runs_its_own(
    start_method: str,
) -> None:
    context = multiprocessing.get_context(start_method)
    parent_pool = duckpool.ProcessPoolExecutor(1, context)
    try:
        assert parent_pool.submit(_tasks.add, 1, 1).result(TIMEOUT) == 2

        def child() -> tuple[str, int, bool]:
            try:
                parent_pool.submit(_tasks.add, 1, 1)
                refused = "accepted"
            except duckpool.InheritedManagerError:
                refused = "InheritedManagerError"
            own = duckpool.ProcessPoolExecutor(1, context)
            try:
                result = own.submit(_tasks.add, 20, 22).result(20)
                mine = _process_pools.LIVE_POOLS.of_this_process()
                return refused, result, mine == [own._core]
            finally:
                own.shutdown()

        assert run_in_forked_child(child) == ("InheritedManagerError", 42, True)
        assert parent_pool.submit(_tasks.add, 2, 2).result(TIMEOUT) == 4
    finally:
        parent_pool.shutdown()


def test_the_fork_hook_empties_the_managers_registry_and_renews_its_lock() -> None:
    manager = duckpool.get_or_create_process_manager("parent")
    # Another thread holds the registry's lock while the process forks: a
    # child that kept that lock would hang on its first manager.
    held, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with _registry.lock:
            held.set()
            release.wait(TIMEOUT)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert held.wait(TIMEOUT)

        def child() -> dict[str, Any]:
            before = {
                "registry": dict(duckpool.REGISTRY),
                "instances": list(_registry.INSTANCES),
            }
            own = duckpool.get_or_create_process_manager("parent")
            return {
                **before,
                "own is parent's": own is manager,
                "all_instances": len(duckpool.ProcessPoolManager.all_instances()),
            }

        seen = run_in_forked_child(child, timeout=TIMEOUT)
    finally:
        release.set()
        holder.join(TIMEOUT)
    assert seen == {
        "registry": {},
        "instances": [],
        "own is parent's": False,
        "all_instances": 1,
    }
    assert duckpool.REGISTRY[os.getpid()]["parent"] is manager
