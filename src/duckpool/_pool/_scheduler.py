"""The scheduler: the pool's queue, and which worker gets which item when.

``pending`` is the queue of items no worker holds yet; only the scheduler
writes it (others call ``requeue_front``, ``cancel_queued``, ``take_all``).
An item goes to an idle worker at once; when every worker is busy, it waits
here until a result frees one (``dispatch_pending``, run by whoever booked
the result).  Behind a busy worker's current task, a few short tasks or one
``map`` chunk may wait in its pipe (``can_prefetch``): the worker then never
waits on the parent between them.  Per-type caps (``type_limits``) let
items of other types pass one at its cap.  A callable in quarantine is
refused here (``_quarantine``).

Owns the slot's work fields: ``assigned`` (the ``ResultBook`` pops its head
through ``complete``), ``tasks_sent``, ``head_since``, ``last_service``,
``queued_bytes`` and ``retiring``.
Every method runs with the pool's lock held.
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING, Any, Optional

from duckpool._cpus import cpu_budget
from duckpool._futures import set_exception
from duckpool._pool._pending import Pending

if TYPE_CHECKING:
    from concurrent.futures import Future

    from duckpool._futures import WorkItem
    from duckpool._pool._slots import Slot
    from duckpool._pool._view import Core

#: Items a worker may hold at once (one running, the rest queued in its pipe),
#: so it never waits on the parent between small tasks.
PREFETCH = 16
#: With more workers than CPUs, times up to this long are judged by each
#: worker's share of a CPU (``_judged``); longer ones as they are, so that
#: nothing queues deep behind slow tasks (an oversubscribed pool is often
#: one of I/O-bound tasks, which wait for no CPU).
SHARED_SECONDS_MAX = 0.01
#: Work is queued behind a worker's current tasks only if, judged by its last
#: task's time, it would start within this: a task queued behind a long one
#: would wait for it while another worker may be free.
PREFETCH_BEHIND_SECONDS = 0.001
#: Never queue more than this many unread bytes in a task pipe, so a write to a
#: busy worker cannot block (Linux pipes buffer 64 KiB).
PREFETCH_BYTES = 32 * 1024


class Scheduler:
    """Owns a pool's queue and hands its items to workers."""

    def __init__(self, core: Core) -> None:
        self._core: Core = weakref.proxy(core)
        # Fixed for the pool's life: held directly (the hot path reads them).
        self._type_limits = core.settings.type_limits
        self._max_tasks_per_child = core.settings.max_tasks_per_child
        self._transport = core.transport
        self._quarantine = core.quarantine
        self._elastic = core.elastic
        #: Items no worker holds yet, by priority, in order within one.
        self.pending = Pending()
        #: Every slot had a worker (or was parked) at the last full pass: only
        #: then may items queue behind busy workers, not while a replacement
        #: is coming.  Read by ``refill`` as of that pass (a hint: stale, it
        #: only moves an item behind a busy worker or keeps it queued).
        self._manned = False
        #: The CPUs this process may use (``_judged``), read when first needed.
        self._cpus: Optional[int] = None

    def queue(self, item: WorkItem) -> None:
        """Send ``item`` to an idle worker, else queue it (lock held)."""
        core = self._core
        if not self.pending and (item.kind is None or self.has_room(item.kind)):
            for slot in core.slots:
                if self.is_idle(slot):
                    self.send(slot, item)
                    return
            if self._elastic.enabled and self._elastic.unpark_for(1):
                for slot in core.slots:  # the slot just unparked takes it
                    if self.is_idle(slot):
                        self.send(slot, item)
                        return
        # Every worker is busy: the dispatcher hands this on as results come
        # back, several items per write.
        self.pending.append(item)
        if self._type_limits is not None:
            # Or a worker is idle while the items before this one wait for
            # their type's cap: this one may go now.
            self.dispatch_pending()

    def requeue_front(self, slot: Slot) -> None:
        """Put what ``slot`` holds and its worker never took up back at the
        front of the queue, in order (lock held)."""
        pending = self.pending
        for item in reversed(slot.assigned):
            pending.appendleft(item)
        slot.assigned.clear()
        slot.outbox.clear()
        slot.queued_bytes = 0

    def take_back(self, slot: Slot) -> None:
        """Forget what ``slot`` took: the first worker's start failed, and
        ``submit`` raises, so it was never queued (lock held).  What sending
        it counted goes too (``tasks_sent``, and with ``max_tasks_per_child``
        the stop frame counted as sent)."""
        slot.assigned.clear()
        slot.reset()

    def is_idle(self, slot: Slot) -> bool:
        core = self._core
        return (
            (slot.process is not None or slot.reserved)
            and not slot.assigned
            and not slot.retiring
            and slot.stopping is None
            and slot.index < core.size
        )

    def can_prefetch(self, slot: Slot, item: WorkItem, now: float) -> bool:
        """May ``item`` queue in the pipe of ``slot``'s busy worker?

        As many as would start within ``PREFETCH_BEHIND_SECONDS`` if each
        took as long as the worker's last task (so behind ~1 ms tasks, one:
        the worker never waits for the parent between them, and no task waits
        behind a queue of them while another worker frees); behind short
        tasks, more while the queue holds a full pipe's worth for every
        worker; none behind a task that has overrun its predecessor's time by
        more than the bound.  A ``map`` chunk, behind one other chunk whatever
        its length (the worker then never waits for the next one, and a map's
        chunks are alike, so none waits long behind another).
        """
        core = self._core
        if (
            slot.process is None
            or slot.index >= core.size
            or self._type_limits is not None
            or slot.retiring
            or slot.stopping is not None
        ):
            return False
        assigned = slot.assigned
        if item.chunk and len(assigned) == 1 and assigned[0].chunk:
            return True
        if len(assigned) >= PREFETCH or slot.queued_bytes + item.size > PREFETCH_BYTES:
            return False
        ran = now - slot.head_since
        last = slot.last_service
        if (
            ran > last + PREFETCH_BEHIND_SECONDS
            and self._judged(ran - last) > PREFETCH_BEHIND_SECONDS
        ):
            return False  # the current task overran: it may run longer still
        # (An overrun within the bound counts as a task about to end, not as
        # time banked for more.)
        if max(last - ran, 0.0) + (len(assigned) - 1) * last <= PREFETCH_BEHIND_SECONDS:
            return True
        # Short tasks and a backlog of a full pipe's worth per worker: its
        # order hardly changes whichever worker takes which task.
        return (
            len(self.pending) >= PREFETCH * core.size
            and self._judged(last) < PREFETCH_BEHIND_SECONDS
        )

    def _judged(self, seconds: float) -> float:
        """A task time seen from here, as judged against the prefetch bound.

        With more workers than this process has CPUs, each busy worker waits
        for a CPU between its tasks, so that from here its tasks look longer
        than they run, by about the workers per CPU (64 on 2: 32 times).  A
        time up to ``SHARED_SECONDS_MAX`` is scaled by each worker's share of
        a CPU; a longer one is taken as it is.
        """
        if seconds > SHARED_SECONDS_MAX:
            return seconds
        cpus = self._cpus
        if cpus is None:
            cpus = self._cpus = cpu_budget().workers
        size = self._core.size
        return seconds if cpus >= size else seconds * cpus / size

    def assign(self, slot: Slot, item: WorkItem) -> bool:
        """Record ``item`` as ``slot``'s; False if it was cancelled meanwhile.

        The caller writes the item's frame to the worker (``Transport.write``).
        """
        core = self._core
        if not item.started:
            if not item.future.set_running_or_notify_cancel():
                return False
            item.started = True
        elif item.withdrawn or item.future.done():
            # Cancelled while it waited in a worker's pipe (its future failed
            # then, or is about to), and back from that worker's death: it
            # must not run.
            return False
        if not slot.assigned:
            slot.head_since = time.monotonic()
            if item.timeout is not None:
                core.wake()  # the dispatcher must now watch this deadline
        slot.assigned.append(item)
        slot.queued_bytes += item.size
        slot.tasks_sent += 1
        if item.trace is not None:
            process = slot.process
            item.trace.on_assign(
                slot.index, None if process is None else process.pid, item.attempts
            )
        limit = self._max_tasks_per_child
        if limit is not None:
            if slot.tasks_sent >= limit:
                slot.retiring = True  # the worker is told to exit after this item
            core.successors.wake_for(slot)
        return True

    def send(self, slot: Slot, item: WorkItem) -> None:
        """Give one item to ``slot``'s worker."""
        if self.assign(slot, item):
            transport = self._transport
            transport.write(
                slot, item.frame if item.buffers is None else transport.frames_of(slot, [item])
            )

    def dispatch_pending(self) -> None:
        """Hand pending items to idle workers, then queue some behind busy ones.

        What one worker gets here goes out in a single write.
        """
        core = self._core
        pending = self.pending
        if not pending:
            return
        batches: dict[int, list[WorkItem]] = {}
        if self._type_limits is not None:
            self.dispatch_within_limits(batches)
        for slot in core.slots:
            if not pending:
                break
            if self.is_idle(slot) and self._type_limits is None:
                # The first item not cancelled meanwhile: an idle worker
                # never waits behind cancelled ones (nothing may wake the
                # dispatcher again before a result, and none is coming).
                while pending:
                    item = pending.popleft()
                    if self.assign(slot, item):
                        batches[slot.index] = [item]
                        break
        self._manned = all(slot.process is not None or slot.parked for slot in core.slots)
        if pending and self._manned:
            # (While a replacement worker is coming, it takes what is left.)
            now = time.monotonic()
            while pending:
                placed = False
                for slot in core.slots:
                    if pending and self.can_prefetch(slot, pending.first(), now):
                        item = pending.popleft()
                        if self.assign(slot, item):
                            batches.setdefault(slot.index, []).append(item)
                        placed = True
                if not placed:
                    break
        for index, items in batches.items():
            slot = core.slots[index]
            self._transport.write(slot, self._transport.frames_of(slot, items))

    def refill(self, slot: Slot) -> None:
        """After ``slot``'s worker answered: hand pending items to it alone.

        What a result frees is room in its own slot: every other slot was
        offered the queue when it last had room (its own answers, or the
        dispatcher's passes, which run :meth:`dispatch_pending` over every
        slot after any other change: a worker started, a slot unparked, a
        resize).  So this looks at one slot, not all of them, which keeps a
        pool of 64 workers as cheap per task as one of 2.  Under
        ``type_limits`` an answer frees room for its type in any idle slot:
        that takes the full pass.
        """
        pending = self.pending
        if not pending:
            return
        if self._type_limits is not None:
            self.dispatch_pending()
            return
        items: list[WorkItem] = []
        if self.is_idle(slot):
            while pending:  # the first item not cancelled meanwhile
                item = pending.popleft()
                if self.assign(slot, item):
                    items.append(item)
                    break
        if (items or slot.assigned) and self._manned:
            # Queued behind its current task, as dispatch_pending would.
            now = time.monotonic()
            while pending and self.can_prefetch(slot, pending.first(), now):
                item = pending.popleft()
                if self.assign(slot, item):
                    items.append(item)
        if items:
            self._transport.write(slot, self._transport.frames_of(slot, items))

    def dispatch_within_limits(self, batches: dict[int, list[WorkItem]]) -> None:
        """Hand pending items to idle workers, skipping types at their cap.

        Skipped items keep their place; items behind them may go first.
        """
        core = self._core
        idle = [slot for slot in core.slots if self.is_idle(slot)]
        pending = self.pending
        while pending and idle:
            item = pending.pop_first(self._may_start)
            if item is None:
                return
            slot = idle[0]
            if self.assign(slot, item):
                batches[slot.index] = [item]
                del idle[0]

    def _may_start(self, item: WorkItem) -> bool:
        return item.kind is None or self.has_room(item.kind)

    def startable(self, limit: int) -> int:
        """How many queued items a worker could start now (at most ``limit``):
        none cancelled meanwhile, none whose type is at its cap."""
        count = 0
        for item in self.pending:
            if count >= limit:
                break
            if item.future.cancelled() or not self._may_start(item):
                continue
            count += 1
        return count

    def has_room(self, kind: str) -> bool:
        """May another task of type ``kind`` go to a worker now? (lock held)"""
        core = self._core
        limits = self._type_limits
        if limits is None or kind not in limits:
            return True
        running = sum(1 for s in core.slots for item in s.assigned if item.kind == kind)
        return running < limits[kind]

    def refuse_quarantined(self, item: WorkItem) -> bool:
        """Fail ``item`` if its callable is in quarantine (lock held); True if so."""
        error = self._quarantine.refusal(item.label, time.monotonic())
        if error is None:
            return False
        set_exception(item.future, error)
        return True

    def count_death(self, item: WorkItem) -> list[WorkItem]:
        """A worker died running ``item``; quarantine its callable if that is
        one death too many.  Returns the queued items that then fail (lock held)."""
        label = item.label
        if not self._quarantine.on_death(label, time.monotonic()):
            return []
        return self.pending.remove_where(lambda queued: queued.label == label)

    def on_ready(self, slot: Slot, now: float) -> None:
        """``slot``'s worker is ready: its head item's time runs from now."""
        slot.head_since = now

    def complete(self, slot: Slot, now: float) -> None:
        """``slot``'s head item was answered (its result is booked): it leaves
        the slot, and the next one's time runs from now."""
        item = slot.assigned.popleft()
        slot.queued_bytes -= item.size
        slot.last_service = now - slot.head_since  # (one of a batch: see booked)
        slot.head_since = now

    def booked(self, slot: Slot, since: float, now: float, answers: int) -> None:
        """``answers`` of ``slot``'s items were answered in one batch, booked
        at ``now``, the first of them running from ``since``: each is taken
        to have taken their mean time (not the first all of it, and the others
        none, which would queue a worker's pipe deep behind long tasks)."""
        if answers > 1:
            slot.last_service = (now - since) / answers

    def retire(self, slot: Slot) -> None:
        """``slot``'s worker takes no more work and exits once done (told so
        with the next write, ``Transport.write``)."""
        slot.retiring = True

    def take_assigned(self, slot: Slot) -> list[WorkItem]:
        """Empty ``slot``'s items (to fail them); what it held, in order."""
        items = list(slot.assigned)
        slot.assigned.clear()
        slot.queued_bytes = 0
        return items

    def cancel_queued(self, future: Future[Any]) -> Optional[WorkItem]:
        """Take ``future``'s item out of the queue; None if it is not there."""
        return self.pending.pop_first(lambda item: item.future is future)

    def take_all(self) -> list[WorkItem]:
        """Empty the queue; what it held, in order (to fail or cancel)."""
        return self.pending.take_all()
