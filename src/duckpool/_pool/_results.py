"""The result book: result frames read, matched to their items, futures resolved.

A worker answers its items in the order it was sent them, so a result frame
belongs to the head of its slot's ``assigned``.  Frames are read and booked
under the slot's ``read_lock`` (so they are taken in order whoever reads
them: the dispatcher, or a caller assisting, see ``_assist``), then booked
under the pool's lock, once per batch: the head item leaves ``assigned``,
the counters and quarantine hear of it, and the next items go out
(``Scheduler.dispatch_pending``) before any future is resolved.  Futures are
resolved with no lock held (their callbacks run here), by the dispatcher
just before it sleeps (``deferred``), or by the caller that read them.  A
log frame answers no task: its record is handed to logging in its place
among the resolutions.

Owns ``deferred`` and ``handed_over``; the slot's ``read_lock``,
``tasks_done``, ``last_service`` and ``pipe_closed_at``.  ``on_results`` and ``resolve`` take
the locks they need themselves (no lock held on entry).
"""

from __future__ import annotations

import pickle
import time
import weakref
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Optional

from duckpool import _buffers, _logs, _protocol
from duckpool._errors import TaskCancelledError, TaskUnpicklingError
from duckpool._futures import (
    DONE_STATES,
    WorkItem,
    exception_from_payload,
    set_exception,
    set_progress,
    set_result,
)

if TYPE_CHECKING:
    from multiprocessing import connection as mp_connection

    from duckpool._pool._slots import Resolution, Slot
    from duckpool._pool._view import Core

#: The item of a log frame's entry among the resolutions: a record, which
#: answers no task, handed to logging where its frame came in the stream.
LOG_RECORD_ITEM = WorkItem(Future(), 0, b"", None, None)


def _unpickles(status: int, payload: Any) -> bool:
    """Does a result frame's payload unpickle?  (Asked once it raised: the
    exception may not have been the payload's.)"""
    try:
        if status == _protocol.STATUS_OK:
            _buffers.loads(pickle.loads, payload)
        else:
            exception_from_payload(payload)
    except BaseException:
        return False
    return True


#: The statuses of a frame that answers the worker's running task.
_ANSWERS = frozenset(
    {
        _protocol.STATUS_OK,
        _protocol.STATUS_ERROR,
        _protocol.STATUS_UNPICKLE_FAILED,
        _protocol.STATUS_SKIPPED,
    }
)


def _implausible(
    slot: Slot, failed: Optional[_protocol.FrameError], partial: Optional[bytes]
) -> Optional[str]:
    """Why the frame ``slot``'s worker has begun (its first bytes, ``partial``)
    cannot be its own, or None.  Judged before it is whole: a length header
    written by its task would otherwise swallow the worker's real answers
    while the pool waited for bytes that never come."""
    if failed is not None:
        return f"it sent a frame it cannot have meant: {failed}"
    if partial is None:
        return None
    status = partial[_protocol.TASK_ID_BYTES] & ~_protocol.STATUS_BUFFERS
    if status in (_protocol.STATUS_LOG, _protocol.STATUS_PROGRESS):
        return None
    if status in (_protocol.STATUS_READY, _protocol.STATUS_INIT_FAILED) and not slot.ready:
        return None
    if status in _ANSWERS:
        item = slot.assigned[0] if slot.assigned else None
        answered = int.from_bytes(partial[: _protocol.TASK_ID_BYTES], "little")
        if item is not None and item.task_id == answered:
            return None
        running = "none" if item is None else f"task {item.task_id}"
        return f"it began an answer for task {answered} while it ran {running}"
    return f"it began a frame of no kind it sends (status {status})"


class ResultBook:
    """Reads a pool's result pipes and settles the futures they answer."""

    def __init__(self, core: Core) -> None:
        self._core: Core = weakref.proxy(core)
        #: Results read but not yet given to their futures (dispatcher only).
        self.deferred: list[Resolution] = []
        #: Results a helping thread booked but could not resolve (lock held).
        self.handed_over: list[Resolution] = []
        #: The dispatcher has taken the last of them: a helper resolves its own.
        self.closed = False

    def take_handed_over(self, last: bool = False) -> None:
        """Move what helpers handed over behind ``deferred`` (dispatcher, lock
        held); ``last``: the dispatcher ends, and takes no more after this."""
        if self.handed_over:
            self.deferred.extend(self.handed_over)
            self.handed_over.clear()
        if last:
            self.closed = True

    def on_results(
        self,
        slot: Slot,
        deferred: Optional[list[Resolution]] = None,
        helper: Optional[mp_connection.Connection] = None,
        final: bool = False,
    ) -> bool:
        """Read every result frame the slot's pipe holds now; True at EOF.

        The futures are resolved here, or, given ``deferred``, appended to it
        for the caller to resolve later.  The dispatcher calls this; so does a
        thread helping with a result (``helper`` is the pipe it watches),
        which resolves what it booked once it has given the pipe back
        (``resolve_helped``): done-callbacks may wait on that pipe.  While a
        thread helps, the pipe is its own: the dispatcher reads it only for
        the last time (``final``: the worker has exited).
        """
        core = self._core
        resolved: list[Resolution] = [] if deferred is None else deferred
        init_failure: Optional[memoryview] = None
        booked = False
        try:
            with slot.read_lock:  # frames are booked in the order they were read
                reader = slot.reader
                if reader is None or (helper is not None and slot.result_conn is not helper):
                    return True
                if slot.poisoned is not None:
                    return False  # the worker is being killed; its pipe is not to be trusted
                if helper is None and not final and slot.assist is not None:
                    # Readiness seen before the helper paused the pipe: what it
                    # holds is the helper's to read (``Assists.help_resolve``).
                    return False
                frames, eof = reader.read_available()
                partial = reader.partial_head(_protocol.RESULT_HEADER_BYTES)
                if eof and helper is None and slot.result_conn is not None:
                    # The worker is gone (its sentinel says how); stop watching the pipe.
                    try:
                        core.selector.unregister(slot.result_conn)
                    except (KeyError, ValueError):
                        pass
                    now = time.monotonic()
                    slot.pipe_closed_at = now
                    core.zygotes.expect_exit(slot.process, now)
                if frames or partial is not None or reader.failed is not None:
                    init_failure = self._book(slot, reader, frames, resolved, partial)
                    if helper is not None and (
                        core.lifecycle.shutdown_requested
                        or (slot.assigned and slot.assigned[0].timeout is not None)
                    ):
                        # What the dispatcher decides on changed behind its back:
                        # shutdown may be complete, or a new deadline runs.
                        core.wake()
                booked = True
        except BaseException as exc:
            # In a helping thread, an exception raised asynchronously (a signal
            # handler's: Ctrl-C in the main thread) may have struck between
            # reading bytes and booking them: what the pipe held may be lost.
            if helper is None:
                raise
            if not booked:
                core.assists.poison(slot, exc)
            self.hand_over(resolved)  # what was booked is sound
            raise
        if deferred is None and helper is None:
            self.resolve_all(resolved)
        if init_failure is not None:
            self.on_initializer_failure(init_failure)
        return eof

    def resolve_helped(self, resolved: list[Resolution]) -> None:
        """Resolve what a helping thread booked (if an exception raised in that
        thread, Ctrl-C, cuts this short, it hands it all over: ``hand_over``).

        If the dispatcher still holds resolutions it read before this thread
        took the pipe (a log record of the very task, say), everything goes to
        the dispatcher instead, to be resolved after them, in order.
        """
        if self.deferred:  # (emptied only once all of it is resolved)
            self.hand_over(resolved)
            return
        self.resolve_all(resolved)

    def hand_over(self, resolved: list[Resolution]) -> None:
        """Give resolutions a helping thread booked to the dispatcher (resolving
        twice is harmless: a future resolved already is left alone)."""
        core = self._core
        with core.lock:
            closed = self.closed
            if not closed:
                self.handed_over.extend(resolved)
        if closed:  # (the dispatcher has ended: no one else will)
            self.resolve_all(resolved)
            return
        resolved.clear()
        core.wake()

    def _book(
        self,
        slot: Slot,
        reader: _protocol.FrameReader,
        frames: list[bytes],
        resolved: list[Resolution],
        partial: Optional[bytes] = None,
    ) -> Optional[memoryview]:
        """Match result frames to the slot's items, then judge the head of the
        frame begun after them (``partial``); return an initializer failure."""
        core = self._core
        now = time.monotonic()
        stray: Optional[str] = None
        with core.lock:  # once for the whole batch
            if slot.reader is not reader:
                # Closed meanwhile (the pool broke): its items are settled.
                return None
            assigned = slot.assigned
            counters = core.counters
            quarantine = core.quarantine
            scheduler = core.scheduler
            since, answers = slot.head_since, 0
            for frame in frames:
                view = memoryview(frame)
                if len(view) < _protocol.RESULT_HEADER_BYTES:
                    stray = f"it sent a frame of {len(view)} bytes, too short for any answer"
                    break
                status = view[_protocol.TASK_ID_BYTES]
                payload: Any = view[_protocol.RESULT_HEADER_BYTES :]
                if status & _protocol.STATUS_BUFFERS:
                    status &= ~_protocol.STATUS_BUFFERS
                    payload = _Undecoded(payload)
                if status == _protocol.STATUS_INIT_FAILED:
                    return view[_protocol.RESULT_HEADER_BYTES :]
                if status == _protocol.STATUS_READY:
                    core.launcher.on_ready(slot, now)
                    scheduler.on_ready(slot, now)
                    since = now
                    if payload and _buffers.SHARED_AREA:
                        core.transport.on_area_offer(slot, bytes(payload))
                    core.successors.wake_for(slot)
                    continue
                if status == _protocol.STATUS_LOG:
                    # Emitted in its place among the results, with no lock held.
                    resolved.append((LOG_RECORD_ITEM, status, payload))
                    continue
                if status == _protocol.STATUS_PROGRESS:
                    # The running task's: its future takes it, in its place.
                    head = assigned[0] if assigned else None
                    if head is not None and head.task_id == int.from_bytes(
                        view[: _protocol.TASK_ID_BYTES], "little"
                    ):
                        resolved.append((head, status, payload))
                    continue
                item = assigned[0] if assigned else None
                answered = int.from_bytes(view[: _protocol.TASK_ID_BYTES], "little")
                if item is None or item.task_id != answered:
                    # Not this worker's protocol: a process its task forked
                    # writing to its pipe, say.  Nothing more it sends is trusted.
                    running = "none" if item is None else f"task {item.task_id}"
                    stray = f"it answered task {answered} while it ran {running}"
                    break
                stopping = slot.stopping
                if stopping is not None and stopping.item is item:
                    # Stopped (past its timeout, or cancelled), it answered
                    # all the same: its task caught the SIGTERM.  The stop is
                    # its outcome, settled once the worker has exited.
                    core.supervisor.answered_once_stopped(slot)
                    scheduler.complete(slot, now)
                    continue
                # Booked before it leaves `assigned`: never in neither.
                resolved.append((item, status, payload))
                scheduler.complete(slot, now)
                answers += 1
                if item.in_area:  # the worker has copied the call's buffers out
                    item.in_area = False
                    if slot.area is not None:
                        slot.area.calls.release()
                slot.tasks_done += 1
                counters.latencies.append(now - item.submitted)
                if status == _protocol.STATUS_OK:
                    counters.completed += 1
                else:
                    counters.failed += 1
                if quarantine.streaks:
                    quarantine.on_return(item.label)
            if stray is None:
                stray = _implausible(slot, reader.failed, partial)
            scheduler.booked(slot, since, now, answers)
            if (
                stray is None
                and frames
                and slot.process is not None
                and not (core.lifecycle.shutdown_requested and not scheduler.pending)
            ):
                scheduler.refill(slot)
            # After the next calls are on their way: the workers need not wait.
            copy_buffers = core.transport.copy_buffers
            for index, (item, status, payload) in enumerate(resolved):
                if type(payload) is _Undecoded:
                    resolved[index] = (item, status, copy_buffers(slot, payload.body))
        if stray is not None:
            culprit = "a process its task forked, or the task itself"
            core.assists.poison(slot, None, why=f"{stray} (written to its pipe by {culprit})")
        return None

    def resolve_all(self, resolutions: list[Resolution]) -> None:
        for item, status, payload in resolutions:
            self.resolve(item, status, payload)
        resolutions.clear()

    def resolve(self, item: WorkItem, status: int, payload: memoryview) -> None:
        """Set a future from a result frame (no lock held: callbacks run here)."""
        if status == _protocol.STATUS_LOG:
            _logs.handle_forwarded(payload, self._core.dispatcher.is_current())
            return
        if status == _protocol.STATUS_PROGRESS:
            set_progress(item.future, payload)
            return
        future = item.future
        if future._state in DONE_STATES:
            return  # cancelled while queued in the worker
        if status == _protocol.STATUS_SKIPPED:  # (cancel_task fails it too)
            skipped = TaskCancelledError(f"task {item.label} was cancelled before it started")
            set_exception(future, skipped)
            return
        try:
            if status == _protocol.STATUS_OK:
                value = _buffers.loads(pickle.loads, payload)
            else:
                error = exception_from_payload(payload)
        except BaseException as exc:
            if not self._core.dispatcher.is_current() and _unpickles(status, payload):
                # It unpickles now: what was raised came from outside, raised
                # asynchronously in a thread helping with its result (a signal
                # handler's exception).  That thread's to raise; its caller
                # hands the resolution over to the dispatcher.
                raise
            failure = TaskUnpicklingError(
                f"could not unpickle what task {item.label} sent back: {exc!r}"
            )
            failure.__cause__ = exc
            set_exception(future, failure)
            return
        if status == _protocol.STATUS_OK:
            set_result(future, value)
        elif status == _protocol.STATUS_UNPICKLE_FAILED:
            failure = TaskUnpicklingError(
                f"the worker could not unpickle the call to {item.label}: {error!r}"
            )
            failure.__cause__ = error
            set_exception(future, failure)
        else:
            set_exception(future, error)

    def on_initializer_failure(self, payload: memoryview) -> None:
        """Remember a worker's initializer error; the pool breaks when it has exited.

        Not before: the worker may still be flushing what it logged about the
        failure (a multiprocessing queue handler, say), and once the pool is
        broken its caller moves on.
        """
        core = self._core
        try:
            cause = exception_from_payload(payload)
        except BaseException as exc:
            cause = exc
        with core.lock:
            core.lifecycle.on_initializer_error(cause)


class _Undecoded:
    """A result frame's buffers body, booked but not yet copied out."""

    __slots__ = ("body",)

    def __init__(self, body: memoryview) -> None:
        self.body = body
