"""The supervisor: worker exits and deaths, stopping, killing and reaping.

A worker's exit is seen through its own sentinel (a pidfd where the kernel
has them: never a helper's connection, whose end says nothing of the
worker), or, for a worker the zygote forked, through the zygote's notice of
its exit code (through its pidfd once that zygote is gone, see
``_launcher``).  What a dead worker held is settled here: the task it had
taken up fails with ``WorkerDiedError`` naming the worker, its pid and how it
ended (or the timeout or cancel that stopped it); what it had not taken up
goes back to the front of the queue; the slot is freed for the launcher to
refill.

Every method takes the pool's lock itself where it needs it, as the
dispatcher calls them (``close_slot``: lock held).
"""

from __future__ import annotations

import copy
import os
import signal
import time
import weakref
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from typing import TYPE_CHECKING, Any, Optional, Sequence

from duckpool import _child, _fork_server, _marks, _zygote
from duckpool._errors import TaskCancelledError, TaskTimeoutError, WorkerDiedError, describe_exit
from duckpool._futures import cancel_item, set_exception
from duckpool._pool._launcher import MAX_STARTUP_DEATHS
from duckpool._pool._slots import Stopping

if TYPE_CHECKING:
    from concurrent.futures import Future

    from duckpool._futures import WorkItem
    from duckpool._pool._slots import Slot, WorkerProcess
    from duckpool._pool._view import Core

#: How long shutdown waits for an idle worker to exit before terminating it.
STOP_GRACE_SECONDS = 5.0
#: How long a worker stopped with SIGTERM (timeout, cancel) gets before SIGKILL.
KILL_GRACE_SECONDS = 1.0
#: Deaths of ready workers, each with the same item first and not marked as
#: taken up, after which that item counts as taken up (``_supervisor.took_up``).
MAX_UNMARKED_DEATHS = 3
#: Signals a process sends itself by failing (a crash loop), as opposed to
#: signals sent from outside (SIGKILL, SIGTERM, ...), which are not its fault.
_CRASH_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}
)


class Supervisor:
    """Watches a pool's workers end, and ends them."""

    def __init__(self, core: Core) -> None:
        # Weakly: a pool that has ended is freed at once, by reference
        # counting, and what it holds (its initargs, say) with it.
        self._core: Core = weakref.proxy(core)

    def stop_worker(self, slot: Slot, item: WorkItem, error: BaseException) -> None:
        """Stop the worker running ``item``: SIGTERM now, SIGKILL after the grace."""
        if slot.stopping is not None or slot.process is None:
            return
        slot.stopping = Stopping(item, error, time.monotonic() + KILL_GRACE_SECONDS)
        signal_process(slot.process, signal.SIGTERM)

    def answered_once_stopped(self, slot: Slot) -> None:
        """The item ``slot``'s worker is being stopped for answered all the
        same (its task caught the SIGTERM): not its outcome.  It leaves
        ``assigned`` as answered, and is settled as the stop's once the
        worker has exited (lock held)."""
        assert slot.stopping is not None
        slot.stopping = slot.stopping._replace(answered=True)

    def on_worker_exit(self, slot: Slot) -> None:
        """A worker's sentinel fired: settle its items and free the slot."""
        core = self._core
        process = slot.process
        if process is not None and sentinel_retired(process):
            # Its fork server died, not it: the exit poll watches it from now on.
            core.selector.unregister(process.sentinel)
            core.launcher.poll_exits_from_now()
            return
        if slot.reader is not None:
            core.results.on_results(slot, final=True)  # results written just before the exit
        if process is None:  # already handled (e.g. killed by mark_broken)
            return
        process.join(KILL_GRACE_SECONDS)
        exitcode = process.exitcode
        failed: list[tuple[WorkItem, BaseException]] = []
        with core.lock:
            counters = core.counters
            assigned = slot.assigned
            poisoned = slot.poisoned
            stopping = slot.stopping
            # It died before it was ready, though wanted and not told to go.
            unready = not slot.ready and _unbidden(core, slot)
            if stopping is not None:
                if isinstance(stopping.error, TaskTimeoutError):
                    counters.timed_out += 1
                if stopping.answered:  # (its answer was dropped: see Stopping)
                    assigned.appendleft(stopping.item)
            elif (exitcode == 0 and not unready) or (
                # Its exit code unknown (its fork server is gone), but it was
                # to leave, and left with nothing of its own unfinished.
                exitcode is None and (slot.retiring or slot.stop_sent) and not assigned
            ):  # it left by itself: recycled, resized away, shut down
                if (
                    slot.index < core.size
                    and not core.lifecycle.shutdown_requested
                    and not slot.parked  # (idle past an elastic pool's idle_timeout)
                ):
                    counters.recycles += 1
            elif core.lifecycle.kill_requested is None:
                counters.worker_deaths += 1
            if poisoned is not None:
                # Results of tasks up to the one it last took up may be lost:
                # those fail; the rest never started.
                ids = [item.task_id for item in assigned]
                mark = core.marks[slot.index]
                started = ids.index(mark) + 1 if mark in ids else 0
                if not started and assigned and took_up(core, slot, assigned[0]):
                    started = 1
                for _ in range(started):
                    failed.append((assigned.popleft(), poisoned))
                core.scheduler.requeue_front(slot)
            elif assigned:
                head = assigned[0]
                # The worker marks each task it takes up: an item it never
                # reached (killed while idle, mid-send) is requeued, not failed.
                if (stopping is not None and stopping.item is head) or took_up(core, slot, head):
                    assigned.popleft()
                    error: BaseException
                    if stopping is not None and stopping.item is head:
                        error = stopping.error
                    else:
                        error = self._death_error(slot, process, head, exitcode)
                        if core.lifecycle.kill_requested is None:
                            for refused in core.scheduler.count_death(head):
                                failed.append(
                                    (
                                        refused,
                                        core.quarantine.error(
                                            refused.label, core.settings.quarantine_seconds
                                        ),
                                    )
                                )
                    if head.retries and self._retry(head, error):
                        assigned.appendleft(head)  # first back in the queue
                    else:
                        failed.append((head, final_error(core, head, error)))
                # The rest never started: back to the front of the queue.
                core.scheduler.requeue_front(slot)
            missed = slot.start_missed
            deaths = 0
            if unready:
                deaths = core.launcher.on_unready_death(
                    self_inflicted(exitcode) or exitcode == 0, missed, time.monotonic()
                )
            give_up = deaths > 0
            starts_failing: Optional[BaseException] = None
            if missed is not None and not give_up:
                # Killed by the start-up watch: retried later, as after any
                # transient failure to start (backoff, and a time limit).
                starts_failing = core.launcher.on_start_failure(
                    TimeoutError(f"worker {slot.index} (pid {process.pid}) {missed}"),
                    time.monotonic(),
                )
            self.close_slot(slot)
            core.drop_surplus_slots()
        for item, error in failed:
            set_exception(item.future, error)
        if starts_failing is not None:
            self.starts_failed(starts_failing)
        self.break_if_starts_fail(give_up, missed or describe_exit(exitcode), deaths)

    def break_if_starts_fail(
        self, give_up: bool, last: str, deaths: int = MAX_STARTUP_DEATHS
    ) -> None:
        """After a process died: break the pool if an initializer failed, or if
        ``give_up`` (``deaths`` processes in a row died before they were ready;
        ``last`` says how the last one did)."""
        core = self._core
        if core.lifecycle.initializer_error is not None:
            cause = core.lifecycle.initializer_error
            self.mark_broken(f"a worker's initializer failed: {cause!r}; the pool is broken", cause)
        elif give_up:
            self.mark_broken(
                f"{deaths} worker processes in a row died before they were "
                f"ready (the last {last}); the pool is broken",
                None,
            )

    def _retry(self, item: WorkItem, error: BaseException) -> bool:
        """Run ``item`` again after ``error`` ended its attempt? (lock held)

        Only after its worker died or it timed out (never after a cancel,
        a requested kill or a poisoned stream), and not once its callable
        is in quarantine.  Counts the attempt.
        """
        core = self._core
        if not isinstance(error, (WorkerDiedError, TaskTimeoutError)):
            return False
        if core.lifecycle.kill_requested is not None or core.lifecycle.broken is not None:
            return False
        if core.quarantine.refusal(item.label, time.monotonic()) is not None:
            return False
        item.retries -= 1
        item.attempts += 1
        core.counters.retried += 1
        return True

    def _death_error(
        self, slot: Slot, process: WorkerProcess, item: WorkItem, exitcode: Optional[int]
    ) -> WorkerDiedError:
        """The error of the task ``process`` was running when it died."""
        core = self._core
        why = "" if core.lifecycle.kill_reason is None else f" ({core.lifecycle.kill_reason})"
        error = WorkerDiedError(
            f"worker {slot.index} (pid {process.pid}) died while running "
            f"{item.label}: {describe_exit(exitcode)}{why}",
            pid=process.pid,
            exitcode=exitcode,
            slot=slot.index,
        )
        # The cause Python 3.15's BrokenProcessPool carries, for code that reads it.
        # (typeshed says its argument is a traceback; the stdlib passes text)
        text = f"Process {process.pid} terminated abruptly with exit code {exitcode}"
        error.__cause__ = _RemoteTraceback(text)  # type: ignore[arg-type]
        return error

    def cancel(self, future: Future[Any], running: bool = True, wait: float = -1) -> Optional[bool]:
        """Cancel a queued item, or stop the worker running it; False if
        unknown, None if the pool's lock was not free within ``wait`` seconds
        (-1: however long it takes).

        ``running`` False (a map ending early, see ``PoolFuture.withdraw``)
        leaves a running item be.  The collector may run that in a thread
        holding the pool's lock (an abandoned map's clean-up): so the lock is
        waited for only briefly then.
        """
        core = self._core
        if core.lifecycle.inherited:
            return False  # (the workers, and their marks, are the parent's)
        lock = core.lock
        if not lock.acquire(timeout=wait):
            return None
        try:
            item = core.scheduler.cancel_queued(future)
            if item is None:
                found, error = self.cancel_running(future, running)
        finally:
            lock.release()
        # Resolved without the lock: done-callbacks may call back into the pool.
        if item is not None:
            cancel_item(item, "while queued")
            return True
        if error is not None:
            set_exception(future, error)
        return found

    def cancel_running(
        self, future: Future[Any], running: bool = True
    ) -> tuple[bool, Optional[BaseException]]:
        """Cancel an item a worker holds (lock held): whether one does, and
        the error to fail the future with now, once the lock is released
        (its done-callbacks may call back into the pool).

        The running one: its worker is stopped, and the item fails with
        ``TaskCancelledError`` once it is gone (no error now); ``running``
        False leaves it be (False returned).  One its worker has run, whose
        answer is on its way: False.  One still in the worker's pipe: the
        worker skips it when it gets there (a skip cell of ``marks`` says
        so), its answer is ignored, and it fails now.
        """
        core = self._core
        marks = core.marks
        for slot in core.slots:
            assigned = slot.assigned
            position = next((i for i, item in enumerate(assigned) if item.future is future), None)
            if position is None:
                continue
            item = assigned[position]
            # The worker takes its items up in order: those up to the one it
            # runs (its started mark) are taken up, the rest are in its pipe.
            taken = self._taken_up(slot)
            if position < taken or (position == taken and marks[2 * core.capacity + slot.index]):
                return False, None  # (run: its answer is on its way; the worker reads for more)
            if position == taken:
                if not running:
                    return False, None
                error = TaskCancelledError(f"task {item.label} was cancelled while running")
                self.stop_worker(slot, item, error)
                core.wake()
                return True, None
            held = {queued.task_id for queued in assigned}
            if not _marks.set_skip(marks, core.capacity, slot.index, item.task_id, held):
                return False, None  # (no skip cell free: more queued there than a pipe holds)
            if marks[slot.index] == item.task_id:
                # Taken up meanwhile: skipped or run, its answer says which.
                return self.cancel_running(future, running) if running else (False, None)
            item.withdrawn = True  # (never sent again, should its worker die first)
            # The worker's answer may resolve it first, once the lock is
            # released: with the same error type.
            return True, TaskCancelledError(f"task {item.label} was cancelled before it started")
        return False, None

    def _taken_up(self, slot: Slot) -> int:
        """The position in ``slot.assigned`` of the item its worker runs or
        ran last (its started mark), or -1 if it has taken none of them up."""
        started = self._core.marks[slot.index]
        if started:
            for position, item in enumerate(slot.assigned):
                if item.task_id == started:
                    return position
        return -1

    def starts_failed(self, error: BaseException) -> None:
        """Break the pool: starting workers failed for good with ``error``
        (``Launcher.on_start_failure`` said so)."""
        self.mark_broken(f"could not start a worker process: {error!r}", error)

    def mark_broken(self, reason: str, cause: Optional[BaseException]) -> None:
        """Break the pool for good: fail every outstanding future, stop workers."""
        core = self._core
        with core.lock:
            if not core.lifecycle.break_(reason, cause):
                return
        self.fail_everything(BrokenProcessPool(reason), cause=cause)
        # Not SIGKILL at once: a worker whose initializer failed is exiting by
        # itself, and may still be flushing what it logged about the failure.
        self.stop_workers(KILL_GRACE_SECONDS)

    def fail_everything(
        self,
        error: BaseException,
        cause: Optional[BaseException],
        also: Sequence[WorkItem] = (),
    ) -> None:
        """Fail every pending and assigned future (and those of ``also``) with ``error``."""
        core = self._core
        with core.lock:
            items = [*also, *core.scheduler.take_all()]
            for slot in core.slots:
                stopping = slot.stopping
                if stopping is not None and stopping.answered:  # (out of assigned)
                    items.append(stopping.item)
                    slot.stopping = stopping._replace(answered=False)
                items.extend(core.scheduler.take_assigned(slot))
        if cause is not None and error.__cause__ is None:
            error.__cause__ = cause
        for item in items:
            # Each future its own instance (as from Python 3.15): one shared
            # exception would gather every raiser's traceback.
            set_exception(item.future, _own_copy(error))

    def close_slot(self, slot: Slot) -> None:
        """Forget the slot's process and close its pipes (lock held)."""
        core = self._core
        process = slot.process
        if slot.task_conn is not None:
            core.selector.unregister(slot.task_conn)  # if it had an outbox
        if process is not None:
            for watched in (slot.result_conn, process.sentinel):
                if watched is not None:
                    try:
                        core.selector.unregister(watched)
                    except (KeyError, ValueError):
                        pass
        assist = slot.assist
        for conn in (slot.task_conn, slot.result_conn):
            if conn is None:
                continue
            if assist is not None and assist.conn is conn:
                assist.orphaned = True  # the helper closes it
                continue
            try:
                conn.close()
            except OSError:
                pass
        # No Process.close(): on 3.9 it races with Process.start() in another
        # thread (a closed process is briefly still in multiprocessing's list
        # of children). join() has taken it off that list; dropping the last
        # reference closes its sentinel.
        if isinstance(process, (_zygote.ZygoteChild, _child.ServedProcess)):
            process.close()  # (their pidfds)
        slot.reset()

    def stop_workers(self, grace: Optional[float] = None) -> None:
        """Ask workers to exit; terminate, then kill, those still there after
        ``grace`` (None: ``STOP_GRACE_SECONDS``)."""
        if grace is None:
            grace = STOP_GRACE_SECONDS
        core = self._core
        processes: list[WorkerProcess] = []
        # A worker still starting, with nothing to do and no code of the
        # program's to run before it is ready (no initializer; forked, or
        # forked by a fork server that has the main module imported already),
        # has nothing to finish: killed, it need not finish starting to leave.
        method = core.settings.context.get_start_method()
        may_kill_starting = core.settings.initializer is None and (
            (method == "fork" and not core.zygotes.spawning)
            or (method == "forkserver" and _fork_server.main_preloaded())
        )

        def stop_installed() -> None:
            with core.lock:
                for slot in core.slots:
                    process = slot.process
                    if (
                        process is not None
                        and slot.task_conn is not None
                        and process not in processes
                    ):
                        if may_kill_starting and not slot.ready and not slot.assigned:
                            signal_process(process, signal.SIGKILL)
                        else:
                            core.transport.send_stop(slot)  # (with an outbox: reap stops it)
                        processes.append(process)
                    if slot.successor is not None:
                        core.successors.let_go(slot.successor)

        # The workers there leave while the zygote's answers still due come
        # in (those workers are stopped next): their exits overlap the wait.
        # Unless they may be killed: the zygote kills those at ``finish``
        # (told how many answers were read), and nothing waits for them.
        stop_installed()
        if may_kill_starting:
            with core.lock:
                core.zygotes.forget_requests()
        else:
            core.zygotes.await_requested_starts()
            stop_installed()
        with core.lock:
            spares = list(core.successors.leaving)
        core.zygotes.finish()
        if method == "forkserver":
            _fork_server.kill_if_stopped()
        reap(processes + [spare.process for spare in spares], grace)
        with core.lock:
            for slot in core.slots:
                self.close_slot(slot)
            core.successors.close_reaped(spares)

    def kill_all_workers(self, signum: int = signal.SIGKILL) -> None:
        """Signal every worker, then settle their items as worker deaths.

        Workers a gentler signal leaves running after a grace get SIGKILL.
        The errors of the tasks that were running give the ``kill_reason``.
        """
        core = self._core
        with core.lock:
            live = [s for s in core.slots if s.process is not None]
            spares = core.successors.spares()
            for spare in spares:
                core.successors.let_go(spare)
        processes = [slot.process for slot in live if slot.process is not None]
        processes += [spare.process for spare in spares]
        for process in processes:
            signal_process(process, signum)
        if signum != signal.SIGKILL:
            deadline = time.monotonic() + KILL_GRACE_SECONDS
            for process in processes:
                process.join(max(0.0, deadline - time.monotonic()))
            for process in processes:
                signal_process(process, signal.SIGKILL)
        for slot in live:
            self.on_worker_exit(slot)
        for spare in spares:
            spare.process.join(KILL_GRACE_SECONDS)
        with core.lock:
            core.successors.close_reaped(spares)
            for slot in core.slots:
                if slot.reserved:  # never started: what it took goes back
                    core.launcher.unreserve(slot)
                    core.scheduler.requeue_front(slot)
        # The worker-death path requeues what never started; nothing restarts now.
        lifecycle = core.lifecycle
        if core.scheduler.pending and (
            lifecycle.broken is not None or lifecycle.kill_requested is not None
        ):
            self.fail_everything(
                BrokenProcessPool(lifecycle.broken or "the pool's workers were stopped"),
                cause=lifecycle.broken_cause,
            )

    def kill_without_bookkeeping(self) -> None:
        """SIGKILL and reap every worker, relying on nothing that may have failed."""
        core = self._core
        processes = [s.process for s in core.slots if s.process is not None]
        processes += [spare.process for spare in core.successors.spares()]
        for process in processes:
            try:
                signal_process(process, signal.SIGKILL)
            except Exception:
                pass
        for process in processes:
            try:
                process.join(KILL_GRACE_SECONDS)
            except Exception:
                pass


def _unbidden(core: Core, slot: Slot) -> bool:
    """Did ``slot``'s process end though the pool neither told it to (a stop,
    a retirement, a kill, a stop of its task) nor could do without it (lock held)?"""
    lifecycle = core.lifecycle
    return (
        slot.stopping is None
        and slot.poisoned is None
        and not slot.stop_sent
        and not slot.retiring
        and not slot.parked
        and slot.index < core.size
        and lifecycle.kill_requested is None
        and lifecycle.broken is None
        and (not lifecycle.shutdown_requested or bool(slot.assigned or core.scheduler.pending))
    )


def self_inflicted(exitcode: Optional[int]) -> bool:
    """Did a worker that died during start-up fail by itself?  Not if its
    exit code is unknown (a process the fork server started, once that
    server is gone)."""
    if exitcode is None:
        return False
    if exitcode < 0:
        return -exitcode in _CRASH_SIGNALS
    return exitcode != 0


def sentinel_retired(process: WorkerProcess) -> bool:
    """Has ``process``'s sentinel stopped speaking for it while it runs on
    (a worker the fork server started, where pidfds are missing, after the
    server's death: ``_child.OrphanableProcess``)?"""
    return bool(getattr(process, "sentinel_retired", False))


def _own_copy(error: BaseException) -> BaseException:
    """A copy of ``error`` with the same cause (``error`` itself if it cannot be copied)."""
    try:
        copied = copy.copy(error)
    except Exception:
        return error
    copied.__cause__ = error.__cause__
    copied.__suppress_context__ = error.__suppress_context__
    return copied


def signal_process(process: WorkerProcess, signum: int) -> None:
    """Send ``signum`` to a worker that has not exited (through its own handle,
    which uses its pidfd where it has one: a pid may be reused once reaped)."""
    if not process.is_alive():
        return
    if signum == signal.SIGKILL:
        process.kill()
    elif signum == signal.SIGTERM:
        process.terminate()
    elif process.pid is not None:
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:
            pass


#: How long shutdown waits for its workers before it looks for one stopped
#: (SIGSTOP, a debugger): such a worker cannot leave, and is killed at once.
STOPPED_LOOK_SECONDS = 0.05


def reap(processes: list[WorkerProcess], grace: float) -> None:
    """Join processes; terminate, then kill, those that outstay ``grace``
    (kill at once those found stopped after ``STOPPED_LOOK_SECONDS``)."""
    deadline = time.monotonic() + grace
    look = time.monotonic() + min(grace, STOPPED_LOOK_SECONDS)
    for process in processes:
        process.join(max(0.0, look - time.monotonic()))
    for process in processes:
        if _child.found_stopped(process):
            signal_process(process, signal.SIGKILL)
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(KILL_GRACE_SECONDS)
        if process.is_alive():
            process.kill()
            process.join(KILL_GRACE_SECONDS)


def took_up(core: Core, slot: Slot, head: WorkItem) -> bool:
    """Had ``slot``'s worker, which has exited, taken up ``head``, its
    first item?  (lock held)

    Its mark says so.  But the marks are memory every worker can write,
    and a task that wrote over its mark and then killed its worker
    would, taken at its word, be sent again to the next worker, and the
    next, for ever (nor would its timeout end it: each run starts its
    clock anew).  So ``head`` counts as taken up, unmarked, once
    ``MAX_UNMARKED_DEATHS`` ready workers have died with it first in
    line: a worker dies before it reads its next item only in a moment
    too short to hit that often.
    """
    if core.marks[slot.index] == head.task_id:
        return True
    if (
        not slot.ready
        or slot.retiring
        or slot.stop_sent
        or slot.stopping is not None
        or core.lifecycle.kill_requested is not None
    ):
        return False  # it was not started, or it was told to leave
    head.unmarked_deaths += 1
    return head.unmarked_deaths >= MAX_UNMARKED_DEATHS


def final_error(core: Core, item: WorkItem, error: BaseException) -> BaseException:
    """The error ``item``'s future fails with: ``error``, saying how many
    attempts were made if it was run more than once; the quarantine's
    error if its retries were cut short by it."""
    lifecycle = core.lifecycle
    if (
        item.retries
        and isinstance(error, (WorkerDiedError, TaskTimeoutError))
        and lifecycle.kill_requested is None
        and lifecycle.broken is None
    ):  # its retries were cut short by the quarantine alone
        refusal = core.quarantine.refusal(item.label, time.monotonic())
        if refusal is not None:
            refusal.__cause__ = error
            return refusal
    if isinstance(error, (WorkerDiedError, TaskTimeoutError)):
        error.attempts = item.attempts
        if item.attempts > 1:
            error.args = (f"{error.args[0]} (after {item.attempts} attempts)",)
    return error
