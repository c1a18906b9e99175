"""Typed work routed by its type to the pool of this process that accepts it.

A server with pools for ``render`` and ``report`` work submits with
``duckpool.submit_task(fn, *args, task_type="report")``, without passing the
pools around: the task reaches the running manager that declared that type.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable

from duckpool._errors import ManagerNotFound
from duckpool._registry import REGISTRY

if TYPE_CHECKING:
    from duckpool._manager import ProcessPoolManager

__all__ = ["pool_for", "run_task", "submit_task"]


def pool_for(task_type: str) -> ProcessPoolManager:
    """The running manager of this process that declares ``task_type``.

    If several declare it, the one with the least work waiting.  A pool
    started without a task type is the fallback when none declares it.
    Returns that manager (it submits nothing).

    Raises:
        TypeError: if ``task_type`` is not a str.
        ManagerNotFound: if no running manager of this process accepts it.
    """
    if not isinstance(task_type, str):
        raise TypeError(f"task_type must be a str, got {task_type!r}")
    # A copy taken in one step (the GIL makes it atomic): no lock needed.
    managers: list[ProcessPoolManager] = list(REGISTRY.get(os.getpid(), {}).copy().values())
    running = [m for m in managers if m.state == "running"]
    declared = [m for m in running if m._task_types is not None and task_type in m._task_types]
    if not declared:
        declared = [m for m in running if m._task_types is None]
    if not declared:
        known = sorted({t for m in running for t in (m._task_types or ())})
        raise ManagerNotFound(
            f"no running process pool manager of process {os.getpid()} accepts "
            f"task_type {task_type!r} (the running ones accept {known!r}); start one "
            f"with start(..., task_type={task_type!r})"
        )
    if len(declared) == 1:
        return declared[0]
    return min(declared, key=_backlog)


def _backlog(manager: ProcessPoolManager) -> int:
    try:
        pool = manager.get_pool()
    except RuntimeError:  # stopped meanwhile
        return 1 << 62
    core = getattr(pool, "_core", None)  # a Dask pool keeps no queue here
    return 0 if core is None else core.backlog()


def submit_task(task: Callable[..., Any], *args: Any, task_type: str, **kwargs: Any) -> Future[Any]:
    """Submit ``task(*args, **kwargs)`` to the pool that accepts ``task_type``.

    Returns the task's future, as ``ProcessPoolManager.submit_task`` does,
    and it resolves as that one's does: the task's exception,
    :class:`~duckpool.WorkerDiedError` if its worker dies,
    :class:`~duckpool.TaskTimeoutError` past the pool's ``task_timeout``,
    and a cancel or a failure if the manager is stopped with a ``timeout``
    (see :meth:`duckpool.ProcessPoolManager.stop`).

    Raises:
        TypeError: if ``task_type`` is not a str, or ``task`` is not callable.
        ManagerNotFound: if no running manager of this process accepts the type.
        PoolSaturatedError: if that pool has ``max_pending`` and no room.
        RuntimeError: if that manager is stopped meanwhile, or once
            interpreter shutdown has begun.
    """
    return pool_for(task_type).submit_task(task, *args, task_type=task_type, **kwargs)


async def run_task(task: Callable[..., Any], *args: Any, task_type: str, **kwargs: Any) -> Any:
    """``submit_task`` for asyncio: await the result; cancelling stops the task.

    Returns what the task returns.  Raises what ``submit_task`` raises
    (``TypeError``, :class:`~duckpool.ManagerNotFound`...), with nothing
    queued; then, from the ``await``, the task's own exception, or its
    future's error if its worker dies (:class:`~duckpool.WorkerDiedError`),
    it overruns its timeout (:class:`~duckpool.TaskTimeoutError`) or the
    manager's stop ends it.
    """
    return await pool_for(task_type).run(task, *args, task_type=task_type, **kwargs)
