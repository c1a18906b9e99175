"""Admission control: a bound on the tasks a pool holds, and what to do past it.

A pool with ``max_pending=N`` holds at most ``max_workers + N`` unfinished
tasks: as many running as it has workers, and ``N`` waiting.  ``submit()``
takes a place before it queues anything and the task's future gives it back
when it resolves, however it resolves (result, error, worker death, timeout,
cancellation, shutdown), so a place can never leak.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any, Optional

from duckpool._errors import PoolSaturatedError

__all__ = ["POLICIES", "Admission"]

#: ``"reject"``: fail at once; ``"block"``: wait for room, up to ``block_timeout``.
POLICIES = ("reject", "block")


class Admission:
    """Places for unfinished tasks, handed out by ``admit`` and returned by futures."""

    __slots__ = (
        "_closed",
        "_condition",
        "_in_use",
        "block_timeout",
        "capacity",
        "max_pending",
        "policy",
    )

    def __init__(
        self, max_workers: int, max_pending: int, policy: str, block_timeout: Optional[float]
    ) -> None:
        self.max_pending = max_pending
        self.capacity = max_workers + max_pending
        self.policy = policy
        self.block_timeout = block_timeout
        # Reentrant: a place comes back from a future's done-callback, which
        # a finalizer the collector runs while this thread holds it (in
        # admit) may trigger, cancelling an abandoned map's futures.
        self._condition = threading.Condition(threading.RLock())
        self._in_use = 0
        self._closed = False

    def resize(self, max_workers: int) -> None:
        """The pool now has ``max_workers`` workers: more (or fewer) places."""
        with self._condition:
            self.capacity = max_workers + self.max_pending
            self._condition.notify_all()

    def admit(self, may_wait: bool = True) -> None:
        """Take a place, or raise :class:`PoolSaturatedError` as the policy says.

        ``may_wait`` False: the calling thread is the one that gives places
        back (the pool's dispatcher, running a done-callback), so the
        ``"block"`` policy cannot wait there and raises at once too.

        Raises ``RuntimeError`` if the pool shuts down while this waits.
        """
        with self._condition:
            if self._in_use < self.capacity:
                self._in_use += 1
                return
            if self.policy == "reject":
                raise PoolSaturatedError(
                    f"the pool is saturated: {self._in_use} tasks are unfinished, "
                    f"the most it holds with max_pending={self.max_pending}",
                    max_pending=self.max_pending,
                )
            if not may_wait:
                raise PoolSaturatedError(
                    f"the pool is saturated ({self._in_use} tasks are unfinished, the "
                    f"most it holds with max_pending={self.max_pending}), and submit() "
                    "was called in the pool's own dispatcher thread (a done-callback): "
                    'on_saturated="block" cannot wait there, since that thread is what '
                    "makes room",
                    max_pending=self.max_pending,
                )
            started = time.monotonic()
            deadline = None if self.block_timeout is None else started + self.block_timeout
            while self._in_use >= self.capacity and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise PoolSaturatedError(
                        f"the pool stayed saturated for {self.block_timeout} s "
                        f"(block_timeout): {self._in_use} tasks are unfinished, the "
                        f"most it holds with max_pending={self.max_pending}",
                        max_pending=self.max_pending,
                        waited=time.monotonic() - started,
                    )
                self._condition.wait(remaining)
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._in_use += 1

    def track(self, future: Future[Any]) -> None:
        """Give the place back when ``future`` resolves."""
        future.add_done_callback(self._release)

    def release(self) -> None:
        """Give a place back that was taken for a task never queued."""
        with self._condition:
            self._in_use -= 1
            self._condition.notify()

    def _release(self, _future: Future[Any]) -> None:
        self.release()

    def close(self) -> None:
        """The pool is shutting down: wake every blocked ``admit`` to raise."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
