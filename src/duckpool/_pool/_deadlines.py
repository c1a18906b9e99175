"""Deadlines: the times the dispatcher must wake at, and what it does then.

Three kinds, all per slot, all computed afresh from the slots on each pass
(a pool has a few slots; a heap would cost more than it saves):

* the running item's timeout: counted from when it reached the head of its
  slot's queue with the worker ready; past it the worker gets SIGTERM
  (``Supervisor.stop_worker``) and the item fails with ``TaskTimeoutError``
  once the worker is gone;
* a stopped worker's grace: past it, SIGKILL;
* an assisting caller's window plus a grace: past it the dispatcher takes
  the result pipe back (``Assists.end_assist``), or its results would never
  be read.
"""

from __future__ import annotations

import signal
import weakref
from typing import TYPE_CHECKING, Optional

from duckpool._errors import TaskTimeoutError
from duckpool._pool._assist import ASSIST_GRACE_SECONDS
from duckpool._pool._supervisor import KILL_GRACE_SECONDS, signal_process

if TYPE_CHECKING:
    from duckpool._core import PoolCore


class Deadlines:
    """Enforces a pool's task timeouts, kill graces and assist windows."""

    def __init__(self, core: PoolCore) -> None:
        self._core: PoolCore = weakref.proxy(core)

    def check(self, now: float) -> Optional[float]:
        """Act on what is due; seconds until the next deadline (lock held)."""
        core = self._core
        nearest: Optional[float] = None
        for slot in core.slots:
            assist = slot.assist
            if assist is not None:
                taken_back = assist.until + ASSIST_GRACE_SECONDS
                if now >= taken_back:
                    core.assists.end_assist(slot, assist)
                elif nearest is None or taken_back < nearest:
                    nearest = taken_back
            stopping = slot.stopping
            if stopping is not None:
                if now >= stopping.kill_at and slot.process is not None:
                    signal_process(slot.process, signal.SIGKILL)
                    continue
                deadline = stopping.kill_at
            elif slot.assigned and slot.ready and slot.assigned[0].timeout is not None:
                head = slot.assigned[0]
                assert head.timeout is not None
                deadline = slot.head_since + head.timeout
                if now >= deadline:
                    core.supervisor.stop_worker(
                        slot,
                        head,
                        TaskTimeoutError(
                            f"task {head.label} ran longer than its timeout of "
                            f"{head.timeout:g} s; its worker (pid "
                            f"{slot.process.pid if slot.process else None}) was stopped"
                        ),
                    )
                    deadline = now + KILL_GRACE_SECONDS
            else:
                continue
            if nearest is None or deadline < nearest:
                nearest = deadline
        return None if nearest is None else max(0.0, nearest - now)
