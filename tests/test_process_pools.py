"""The one registry of live pools and its fork hook (``_process_pools``).

The Dask pool's part (drained by ``drain_all``, forgotten in a forked child)
is in ``test_dask.py``, with the other Dask tests; the exit drain's in
``test_shutdown.py``.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Optional

import _tasks
import duckpool
from conftest import run_in_forked_child
from duckpool import _process_pools

TIMEOUT = 30

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
