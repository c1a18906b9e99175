"""Caller assist: a thread blocked in ``result()`` reads its worker's result itself.

Otherwise it would sleep until the dispatcher reads the result and wakes it:
two thread wake-ups per round trip, each costing more than a tiny task.
When the pool is quiet (the future's worker holds only that task and nothing
is queued), the dispatcher's waiter stops watching that one result pipe
(``Waiter.pause``) for a short window, and the caller reads it through the
``ResultBook``, under the slot's ``read_lock`` as the dispatcher would.  The
window ends when the result is booked, when it closes, or, if an exception
raised in the caller (Ctrl-C) cuts the clean-up short, when the dispatcher
takes the pipe back after a grace (``Deadlines.check``).  A read cut short
between reading bytes and booking them may have lost a frame: the worker is
then killed (``poison``) and its items settled as after any death.

Owns the slot's ``assist`` and ``poisoned``.  ``help_resolve`` and
``poison`` take the pool's lock themselves; ``end_assist`` expects it held.
"""

from __future__ import annotations

import os
import select
import signal
import time
import weakref
from typing import TYPE_CHECKING, Any, Optional

from duckpool._errors import InheritedManagerError, WorkerDiedError
from duckpool._pool._slots import Assist
from duckpool._pool._supervisor import signal_process

if TYPE_CHECKING:
    from concurrent.futures import Future

    from duckpool._pool._slots import Resolution, Slot, WorkerProcess
    from duckpool._pool._view import Core

#: How long a thread blocked in ``result()`` reads its task's result pipe
#: itself before it leaves that to the dispatcher again (see ``help_resolve``).
#: Long enough for any short task; a long one is then waited for as usual.
ASSIST_SECONDS = 0.005
#: How long past that window the dispatcher waits before it takes the pipe
#: back from a helper that never gave it back (an exception cut it short).
ASSIST_GRACE_SECONDS = 0.5
#: A worker whose last task took less than this (as seen from here, round trip
#: included) is polled without sleeping for up to twice that long, before the
#: helper sleeps in poll(): waking a sleeping thread costs as much as such a
#: task.  One thread per pool at a time.
SPIN_SECONDS = 0.0005


def _refuse_to_wait_in_dispatcher(future: Future[Any]) -> None:
    """The pool's own dispatcher thread (running a done-callback) waits on one
    of the pool's futures: that thread is what resolves them, so the wait
    would stall the pool, forever or for its whole timeout.  Raise at once."""
    if not future.done():
        raise RuntimeError(
            "result() or exception() on a pending future of this pool was called in "
            "the pool's own dispatcher thread (a done-callback it ran): that thread "
            "is what resolves the pool's futures, so the wait would stall the whole "
            "pool and might never end; "
            "wait elsewhere, or chain the work with add_done_callback"
        )


class Assists:
    """Lends a quiet slot's result pipe to the caller waiting on its task."""

    def __init__(self, core: Core) -> None:
        self._core: Core = weakref.proxy(core)

    def poison(
        self,
        slot: Slot,
        cause: Optional[BaseException],
        writing: bool = False,
        why: Optional[str] = None,
    ) -> None:
        """The slot's result stream (or, ``writing``, its task stream) can no
        longer be trusted: kill its worker.  ``cause``: the exception that
        cut reading or writing short; else ``why`` says what happened.

        Its items that had started fail (with ``cause`` chained); the others
        are requeued, as after any worker death (``Supervisor.on_worker_exit``).
        """
        core = self._core
        if why is None and writing:
            why = f"the thread writing it a task was interrupted ({cause!r}), so the "
            why += "task may have reached it cut short"
        elif why is None:
            why = f"the thread reading its results was interrupted ({cause!r}), so "
            why += "results it had sent may be lost"
        with core.lock:
            process = self.condemn(slot, f"was stopped: {why}", cause)
        if process is not None:
            signal_process(process, signal.SIGKILL)
            core.wake()

    def condemn(
        self, slot: Slot, what: str, cause: Optional[BaseException] = None
    ) -> Optional[WorkerProcess]:
        """Make ``slot``'s worker poisoned, with the error its started items
        get ("worker N (pid P) " + ``what``), and return it for its caller to
        kill; None if it has none, or is poisoned already (lock held)."""
        process = slot.process
        if process is None or slot.poisoned is not None:
            return None
        slot.poisoned = WorkerDiedError(
            f"worker {slot.index} (pid {process.pid}) {what}", pid=process.pid, slot=slot.index
        )
        slot.poisoned.__cause__ = cause
        return process

    def help_resolve(self, future: Future[Any], timeout: Optional[float]) -> None:
        """Wait for ``future`` by reading its worker's result pipe in this thread.

        A thread blocked in ``result()`` would otherwise sleep until the
        dispatcher reads the result and wakes it: two thread wake-ups per
        round trip, each costing more than a tiny task.  When the pool is
        quiet (the future's worker holds only that task and nothing is
        queued), the dispatcher stops watching that one pipe for up to
        ``ASSIST_SECONDS`` (or ``timeout``) and this thread reads it instead,
        booking what arrives, its own result included, and resolving it once
        it has given the pipe back.  If the worker's last task took less than
        ``SPIN_SECONDS``, it polls without sleeping for up to twice that long
        first.  Deaths, deadlines and the other pipes stay the dispatcher's;
        what this thread has not read when it stops, the dispatcher reads next.

        Raises ``RuntimeError`` in the dispatcher's own thread (a done-callback
        it runs) while ``future`` is pending: that thread is what resolves it;
        ``InheritedManagerError`` in a process that inherited the pool by fork.
        """
        core = self._core
        if core.dispatcher.is_current():
            _refuse_to_wait_in_dispatcher(future)
        lifecycle = core.lifecycle
        if lifecycle.inherited and not future.done():
            raise InheritedManagerError(
                f"this future belongs to a pool of process {lifecycle.owner_pid}; process "
                f"{os.getpid()} inherited a copy of it by fork, where it can never resolve"
            )
        if lifecycle.inherited or not core.selector.can_pause:
            return
        # What this thread books, resolved once the pipe is given back: a
        # done-callback may wait on that pipe (a submit, then result()).
        booked: list[Resolution] = []
        try:
            self._read_for(future, timeout, booked)
            if booked:
                core.results.resolve_helped(booked)
        except BaseException:
            if booked:  # (resolving twice is harmless)
                core.results.hand_over(booked)
            raise

    def _read_for(
        self, future: Future[Any], timeout: Optional[float], booked: list[Resolution]
    ) -> None:
        """``help_resolve``'s reading, booking into ``booked``."""
        core = self._core
        assist: Optional[Assist] = None
        slot: Optional[Slot] = None
        try:
            with core.lock:
                slot = self._slot_running(future)
                if slot is None or slot.assist is not None or core.closed:
                    return
                conn = slot.result_conn
                if conn is None or slot.poisoned is not None:
                    return
                item = slot.assigned[0]
                now = time.monotonic()
                window = ASSIST_SECONDS if timeout is None else min(timeout, ASSIST_SECONDS)
                end = now + window
                # A result due within microseconds is polled for without
                # sleeping: waking a sleeping thread costs more than such a task.
                spin = slot.last_service < SPIN_SECONDS and not any(
                    s.assist is not None and s.assist.spin for s in core.slots
                )
                spin_until = now + min(window, 2 * slot.last_service) if spin else now
                # Recorded before the pipe is paused, in the try: an exception
                # raised in this thread from here on (Ctrl-C) gives the pipe
                # back, or wakes the dispatcher to take it back after the
                # window (Deadlines.check), never leaves it paused for good.
                assist = slot.assist = Assist(conn, end, spin)
                try:
                    core.selector.pause(conn)
                except OSError:  # no longer watched: the worker is gone
                    slot.assist = None
                    return
            # A read the dispatcher began before the pipe was ours ends first;
            # if it took our result, the dispatcher resolves the future.
            with slot.read_lock:
                pass
            poller = select.poll()
            poller.register(conn.fileno(), select.POLLIN)
            assigned = slot.assigned
            while assigned and assigned[0] is item:  # not yet booked
                now = time.monotonic()
                if now >= end:
                    break
                spinning = now < spin_until
                if not poller.poll(0 if spinning else (end - now) * 1000.0):
                    if spinning:
                        continue
                    break  # the window closed
                if core.results.on_results(slot, booked, helper=conn):
                    break
        finally:
            if assist is not None and slot is not None:
                try:
                    with core.lock:
                        self.end_assist(slot, assist)
                except BaseException:
                    # Cut short in turn: the dispatcher, which may sleep with
                    # no deadline, must see the assist to take the pipe back.
                    core.wake()
                    raise

    def end_assist(self, slot: Slot, assist: Assist) -> None:
        """Give a helped pipe back to the dispatcher (lock held)."""
        core = self._core
        if slot.assist is not assist:
            return  # already taken back
        # The assist is cleared last: if an exception cuts this short, it is
        # still there for the dispatcher to take back (and resuming twice, or
        # closing twice, is harmless).
        if assist.orphaned:
            try:
                assist.conn.close()
            except OSError:
                pass
        elif slot.result_conn is assist.conn and not core.closed:
            core.selector.resume(assist.conn)
        slot.assist = None

    def _slot_running(self, future: Future[Any]) -> Optional[Slot]:
        """The slot whose worker holds ``future``'s item and nothing else, if
        no other work waits (lock held).

        Helping pays off when the pool is quiet; a busy pool's results come in
        batches, which the dispatcher reads more cheaply.
        """
        core = self._core
        if core.scheduler.pending:
            return None
        for slot in core.slots:
            assigned = slot.assigned
            if len(assigned) == 1 and assigned[0].future is future:
                return slot
        return None
