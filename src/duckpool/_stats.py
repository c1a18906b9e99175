"""What ``stats()`` returns: a typed snapshot of a pool, taken at one moment.

Named tuples (immutable, typed, ``_asdict()`` for JSON), not dataclasses:
``dataclasses`` imports ``inspect``, which would add milliseconds to the
import of every pool.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

__all__ = ["HelperStats", "PoolStats", "WorkerStats"]


class WorkerStats(NamedTuple):
    """One live worker process.

    Attributes:
        slot: its stable slot number (a replacement keeps it).
        pid: its process id.
        state: ``"starting"`` (its initializer has not finished), ``"idle"``,
            ``"busy"``, ``"stopping"`` (timed out or cancelled: being killed)
            or ``"retiring"`` (leaving after its work: task limit or resize).
        tasks_done: results this process has sent back.
        rss: its resident memory in bytes (``None`` without ``psutil``).
    """

    slot: int
    pid: int
    state: str
    tasks_done: int
    rss: Optional[int]


class HelperStats(NamedTuple):
    """A live process the pool runs besides its workers.

    Attributes:
        role: ``"zygote"`` (under fork: it forks the workers) or
            ``"zygote-standby"`` (takes over if the zygote dies).
        pid: its process id.
    """

    role: str
    pid: int


class PoolStats(NamedTuple):
    """A pool's workers, queue and counters since it started.

    Attributes:
        max_workers: the workers the pool runs now.
        workers: each live worker, in slot order (a successor started
            ahead of time is not one until it takes its slot).
        pending: tasks waiting for a worker.
        in_flight: tasks held by workers (running, or queued in their pipe).
        completed: tasks that returned a value.
        failed: tasks that raised (their exception is the future's).
        timed_out: tasks stopped by their timeout.
        worker_deaths: workers that died without the pool asking them to
            (a crash, a signal from outside, the OOM killer), successors
            that died before taking their slot included.
        restarts: replacement workers started (a successor counts when it
            takes its slot).
        recycles: workers that left by themselves at ``max_tasks_per_child``
            or ``max_memory_per_child``.
        quarantined: names of the callables refused for now
            (``quarantine_after``).
        latency_p50: the median of the seconds from ``submit()`` to the
            result arriving, over the latest 1024 tasks (``None`` before any).
        latency_p99: their 99th percentile (``None`` before any task).
        helpers: the pool's live processes other than workers.
        stopped: the pool has shut down, every process it started has
            exited and its dispatcher thread has ended.
        retried: runs of tasks begun again after their worker died or they
            timed out (``options(retries=...)``).
        min_workers: the workers the pool keeps however idle it is: its
            ``min_workers`` if it is elastic, else ``max_workers``.  The
            workers it runs now are ``len(workers)``.
    """

    max_workers: int
    workers: tuple[WorkerStats, ...]
    pending: int
    in_flight: int
    completed: int
    failed: int
    timed_out: int
    worker_deaths: int
    restarts: int
    recycles: int
    quarantined: tuple[str, ...]
    latency_p50: Optional[float]
    latency_p99: Optional[float]
    helpers: tuple[HelperStats, ...] = ()
    stopped: bool = False
    retried: int = 0
    min_workers: int = 0
