"""What a pool has done so far, for ``stats()``: its counters and latency window.

Written under the pool's lock by the owners that see each event (results,
deaths, starts, recycles); read by ``_snapshot.snapshot``, which
``PoolCore.stats`` returns.
"""

from __future__ import annotations

from collections import deque

#: How many recent task latencies ``stats()`` takes its percentiles from.
LATENCY_WINDOW = 1024


class Counters:
    """What a pool has done so far, for ``stats()`` (changed under the pool's lock)."""

    __slots__ = (
        "completed",
        "failed",
        "latencies",
        "recycles",
        "restarts",
        "retried",
        "timed_out",
        "worker_deaths",
    )

    def __init__(self) -> None:
        self.completed = 0  # results returned
        self.failed = 0  # exceptions raised by tasks (or a call that did not unpickle)
        self.timed_out = 0
        self.worker_deaths = 0  # workers that died by no request of the pool's
        self.restarts = 0  # workers started in a slot that had one before
        self.recycles = 0  # workers that left by themselves (task or memory limit)
        self.retried = 0  # tasks run again (options(retries=...)) after a death or timeout
        #: Seconds from submit() to result, of the latest tasks.
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
