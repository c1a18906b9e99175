"""Warm and elastic pools: which slots keep a worker when there is no work.

A pool given ``min_workers`` or ``idle_timeout`` is elastic.  Its first
``min_workers`` slots keep a worker from the pool's start to its end (the
launcher replaces one that dies, as in any pool).  The others are *parked*
(no process, none wanted) until work needs them: a task that finds no idle
worker has the first parked slot's worker started, and waits in that
slot's outbox for it (``unpark_for``).  With ``idle_timeout``, a worker above the minimum that
has had no work for that long is told to exit, and its slot is parked again
(``check``).

A pool given neither is not elastic: every slot is filled at the first
submit and kept (the standard library's behaviour), and nothing here runs.

Owns the slot's ``parked`` field.  Every method expects the pool's lock held.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Optional

from duckpool import _child

if TYPE_CHECKING:
    from duckpool._pool._slots import Slot
    from duckpool._pool._view import Core

__all__ = ["Elastic"]


class Elastic:
    """Parks and unparks a pool's slots above its minimum (lock held)."""

    def __init__(self, core: Core) -> None:
        self._core: Core = weakref.proxy(core)
        settings = core.settings
        #: Slots below this index always keep a worker.
        self.min_workers = settings.min_workers if settings.min_workers is not None else 0
        #: Seconds of no work after which a worker above the minimum exits.
        self.idle_timeout = settings.idle_timeout
        #: Is the pool elastic at all?
        self.enabled = settings.min_workers is not None or settings.idle_timeout is not None
        if self.enabled:
            for slot in core.slots:
                self.adopt(slot)

    def adopt(self, slot: Slot) -> None:
        """A new slot (the pool's first, or one ``resize`` added): parked if
        it is above the minimum."""
        if self.enabled and slot.index >= self.min_workers:
            slot.parked = True

    def unpark(self, slot: Slot) -> None:
        """``slot`` gets a worker again (``prestart``, or work for it)."""
        slot.parked = False

    def unpark_for(self, waiting: int) -> bool:
        """``waiting`` items find no idle worker: start up to that many parked
        slots' workers, lowest slot first.  True if one was started."""
        core = self._core
        if not core.launcher.may_start():
            return False
        scheduler = core.scheduler
        waiting -= sum(1 for slot in core.slots if scheduler.is_idle(slot))
        started = False
        for slot in core.slots:
            if waiting <= 0:
                break
            if slot.parked and slot.process is None and not slot.requested:
                if slot.index >= core.size:
                    continue  # resized away
                slot.parked = False
                # Takes work now; the dispatcher starts its worker.
                core.launcher.on_unparked(slot)
                started = True
                waiting -= 1
        if started:
            core.wake()
        return started

    def check(self, now: float) -> Optional[float]:
        """Tell the workers idle for ``idle_timeout`` to exit, parking their
        slots; seconds until the next one may be due (None: none)."""
        limit = self.idle_timeout
        if limit is None:
            return None
        core = self._core
        if core.lifecycle.shutdown_requested:
            return None
        nearest: Optional[float] = None
        for slot in core.slots:
            if slot.index < self.min_workers or slot.parked or slot.process is None:
                continue
            if (
                not slot.ready
                or slot.assigned
                or slot.outbox
                or slot.retiring
                or slot.stopping is not None
            ):
                # Busy: it may go idle with no pass of the dispatcher (a
                # caller that reads its own result), so look again by then.
                due = now + limit
                if nearest is None or due < nearest:
                    nearest = due
                continue
            due = slot.head_since + limit  # an idle slot's: since its last result
            if now < due:
                if nearest is None or due < nearest:
                    nearest = due
                continue
            slot.parked = True
            if slot.successor is not None:
                core.successors.let_go(slot.successor)
            core.scheduler.retire(slot)
            if slot.process is not None and slot.process.pid:
                _child.exits_in_the_background(slot.process.pid)
            core.transport.write(slot, b"")  # just the stop frame
        return None if nearest is None else max(0.0, nearest - now)
