"""``PoolSettings``: what a pool is configured with, fixed for its lifetime."""

from __future__ import annotations

from multiprocessing.context import BaseContext
from typing import Any, Callable, NamedTuple, Optional


class PoolSettings(NamedTuple):
    """What a pool is configured with; fixed for its lifetime."""

    max_workers: int
    context: BaseContext
    initializer: Optional[Callable[..., object]]
    initargs: tuple[Any, ...]
    max_tasks_per_child: Optional[int]
    max_memory_per_child: Optional[int]
    name_prefix: Optional[str]
    daemon: bool
    serializer: str
    #: Per task type, how many of its tasks may run (or wait in a worker's pipe) at once.
    type_limits: Optional[dict[str, int]] = None
    #: Worker deaths in a row that put a callable in quarantine (None: never).
    quarantine_after: Optional[int] = None
    quarantine_seconds: float = 60.0
    #: Send what workers log to the parent's loggers (see _worker_logs).
    forward_logs: bool = True
    #: Tagged on forwarded log records (``record.duckpool_pool``).
    pool_id: Any = None
    #: Workers kept from the pool's start to its end (None, with no
    #: ``idle_timeout``: every slot, filled at the first submit).
    min_workers: Optional[int] = None
    #: Seconds of no work after which a worker above ``min_workers`` exits.
    idle_timeout: Optional[float] = None
    #: The default seconds a task may run (None: no limit).
    task_timeout: Optional[float] = None
