"""The one registry of live pools: its exit hook and its fork hook (``_process_pools``).

The Dask pool's part (drained by ``drain_all``, forgotten in a forked child,
refusing work at exit) is in ``test_dask.py``, with the other Dask tests; the
exit drain's in ``test_shutdown.py``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Optional

import pytest

import _tasks
import duckpool
from conftest import exit_code_of_child, run_in_forked_child
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


@pytest.mark.parametrize("leaves", ["return", "sys.exit"])
@pytest.mark.parametrize("count", [1, 3], ids=["one pool", "pools on the hub"])
def test_a_process_forked_in_a_done_callback_leaves_when_the_callback_does(
    start_method: str, count: int, leaves: str
) -> None:
    # The child is a copy of the thread that ran the callback: the pool's
    # dispatcher, or the hub serving several pools.  Going on there, it
    # read the parent's workers' results (the parent's futures never
    # resolved), or, its SystemExit taken for the dispatcher's failure,
    # killed the parent's workers.
    context = multiprocessing.get_context(start_method)
    pools = [duckpool.ProcessPoolExecutor(2, context) for _ in range(count)]
    children: list[int] = []

    def fork_in_callback(_: Any) -> None:
        pid = os.fork()
        if pid == 0:
            if leaves == "sys.exit":
                sys.exit(5)
            return
        children.append(pid)

    try:
        assert [p.submit(_tasks.add, 1, 1).result(TIMEOUT) for p in pools] == [2] * count
        work = [p.submit(_tasks.sleep_then, 0.3, i) for i, p in enumerate(pools) for _ in range(2)]
        pools[0].submit(_tasks.add, 2, 2).add_done_callback(fork_in_callback)
        assert [f.result(TIMEOUT) for f in work] == [i for i in range(count) for _ in range(2)]
        assert all(p.stats().worker_deaths == 0 for p in pools)
        assert [p.submit(_tasks.add, 3, 3).result(TIMEOUT) for p in pools] == [6] * count
        deadline = time.monotonic() + TIMEOUT
        while not children:  # (the callback may run after the other results)
            assert time.monotonic() < deadline, "the callback never ran"
            time.sleep(0.01)
        code = exit_code_of_child(children.pop(), TIMEOUT)
        assert code == (5 if leaves == "sys.exit" else 0)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        for p in pools:
            p.shutdown()


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
