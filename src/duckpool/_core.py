"""The engine behind duckpool's executor: ``PoolCore``, the facade over its owners.

``PoolCore`` holds the pool's lock, its lifecycle flags, the work queue and
the slots, and runs the dispatcher loop; the owners carved out of it so far
live in ``duckpool._pool``: the ``Launcher`` (starting workers, the zygote
and its standby, the start-failure policy), the ``Supervisor`` (worker
exits and deaths, stopping, killing, reaping), the ``Quarantine`` and the
``Waiter`` the dispatcher sleeps on.

Data flow::

    submit() [any thread]                          worker slot i (a process)
      |  pickles (fn, args, kwargs) at once,          |
      |  large buffers kept beside the pickle         |
      |  lock held:                                   |
      |   idle slot? --task frame--> task pipe i -->  | mark "took up task N",
      |   else -> PoolCore.pending (deque)            | run it, answer
      |     large buffers --copied--> area i, calls   |  (copies buffers out)
      |     (or inline in the frame, if no room)      v
      |                       result pipe i <-- result frame (task id, status)
      |                                     and log frames (records logged there)
      |                area i, results <--copied-- a result's large buffers
      v
    PoolCore.dispatch_loop [one thread per pool]
      waits on: wakeup pipe, every result pipe, every worker's sentinel (a
                pidfd where the kernel has them), task pipes with an
                outbox to flush, spare processes' sentinels, the zygote's
                and its standby's control socket, notice pipe and sentinel,
                and the nearest of: a task deadline, an assisting caller's
                window, a failed start's retry
      result frame -> copy its buffers out of area i (the next write to
                      task pipe i says so: a release frame), pop the slot's
                      head item (its calls space is free), resolve its
                      future, refill the slot from pending (behind a busy
                      worker's current task, a few short tasks or one map
                      chunk may wait in its pipe: see can_prefetch)
      log frame    -> no item popped; the record goes to the parent's logger
                      of its name in its place among the resolutions, after
                      the lock (_logs.handle_forwarded)
      sentinel     -> Supervisor.on_worker_exit: read what the pipe still
                      holds; the dead worker's head item fails with
                      WorkerDiedError (pid, exit code, signal) if the worker
                      had taken it up; everything else it held goes back to
                      the front of pending; the slot's successor takes the
                      slot, or the Launcher starts a replacement in it
      zygote       -> Launcher: a started worker (or standby) to install;
                      worker exits it reaped (notices); its own death: its
                      standby takes over (the workers it forked are watched
                      through their pidfds), or, with no standby, workers
                      are spawned from then on
      successor    -> with max_tasks_per_child, once a slot's ready worker
                      has been sent half its quota, the dispatcher starts the
                      slot's next worker ahead of time (Slot.successor): it
                      starts up while the worker works and is nothing but a
                      watched sentinel (its pipes unread) until the slot is
                      free; if it dies first, another starts (its initializer
                      failing breaks the pool); shutdown, kill and resize
                      stop it (PoolCore.leaving until reaped)
      deadline     -> the head item overran its timeout: SIGTERM its worker,
                      SIGKILL after a short grace; the item fails with
                      TaskTimeoutError when the worker is gone
      retry        -> a start that failed for a transient reason is tried
                      again (Launcher.refill_slots)
      wakeup       -> new work, shutdown, kill or cancel requests

Where a future is resolved, on every path:

* result or task error ....... dispatcher, from the result frame; or, on a
                               quiet pool, the thread waiting in result(),
                               which reads its worker's result pipe itself
                               for a few ms (PoolCore.help_resolve); a
                               helper that could not resolve hands over
* unpicklable call ........... submit(), before anything is queued
* callable in quarantine ..... submit(); queued ones after the death that
                               put it there (Supervisor.on_worker_exit)
* worker death ............... dispatcher (Supervisor.on_worker_exit)
* worker whose result stream
  cannot be trusted .......... dispatcher, once it is killed (_poison)
* timeout / cancel_task() .... dispatcher, once the stopped worker is gone
                               (a queued item is cancelled at once, in the
                               pool or in a worker's pipe)
* initializer failure, start
  failures for good, 3 deaths
  before ready ............... dispatcher: the pool is broken, every
                               outstanding future fails, submit() raises
* shutdown(cancel_futures) ... request_shutdown(): pending futures cancelled
* terminate/kill_workers ..... dispatcher (Supervisor.kill_all_workers)
* interpreter exit ........... the exit hook (_process_pools), once the
                               main thread has finished: submit() raises from
                               then on; non-daemon pools finish their work;
                               daemon pools (and Ctrl-C) kill workers and
                               fail or cancel what is left
* dispatcher bug ............. dispatcher's last resort: every outstanding
                               future fails with BrokenProcessPool

The parent always knows which worker runs which task: each slot keeps the
items it was sent, in order, and a worker answers in that order.  A shared
array holds, per slot, the id of the task the worker last took up, so after a
death the parent can tell a task that started from one still in the pipe.
The dispatcher reaps workers and helpers (a shutdown or kill, run on the
dispatcher, included); a caller thread never waits on a process.  It reads
every result pipe except one a helping caller has paused in its waiter
(``Slot.assist``); frames are read and booked under the slot's
``read_lock``, so they are taken in order whoever reads them.  Writes to
task pipes happen under ``PoolCore.lock``, from submit() or the dispatcher.
Lock order: a slot's ``read_lock``, then ``PoolCore.lock``.

Area i is a memfd worker i creates and offers in its READY frame; the parent
maps it (``_buffers``), so no name in ``/dev/shm`` can outlive a killed
worker.  The parent writes only the calls region and the worker only the
results region; a space is reused only after a pipe message says its reader
is done.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import threading
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import connection as mp_connection
from multiprocessing.context import BaseContext
from typing import Any, Callable, NamedTuple, Optional, Sequence

from duckpool import _buffers, _child, _logs, _process_pools, _threads, _worker, _zygote
from duckpool._admission import Admission
from duckpool._errors import (
    InheritedManagerError,
    TaskCancelledError,
    TaskTimeoutError,
    TaskUnpicklingError,
    WorkerDiedError,
)
from duckpool._futures import DONE_STATES, WorkItem, exception_from_payload
from duckpool._futures import notify_if_cancelled as _notify_if_cancelled
from duckpool._futures import set_exception as _set_exception
from duckpool._futures import set_result as _set_result
from duckpool._pool import _transport
from duckpool._pool._counters import Counters, percentile, rss_of
from duckpool._pool._launcher import EXIT_POLL_SECONDS, Launcher, ZygoteTag
from duckpool._pool._quarantine import Quarantine
from duckpool._pool._scheduler import Scheduler
from duckpool._pool._slots import Assist, Slot, Spare
from duckpool._pool._supervisor import (
    KILL_GRACE_SECONDS,
    MAX_STARTUP_DEATHS,
    STOP_GRACE_SECONDS,
    Supervisor,
    self_inflicted,
    signal_process,
)
from duckpool._pool._transport import Transport, Writable
from duckpool._pool._waiter import Waiter
from duckpool._stats import HelperStats, PoolStats, WorkerStats

#: Items a worker may hold at once (one running, the rest queued in its pipe),
#: so it never waits on the parent between small tasks.
_PREFETCH = 16
#: Work is queued behind a worker's current task only if its last task took
#: less than this and the current one has not run longer: a task queued behind
#: a long one would wait for it while another worker may be free.
_PREFETCH_BEHIND_SECONDS = 0.001
#: Never queue more than this many unread bytes in a task pipe, so a write to a
#: busy worker cannot block (Linux pipes buffer 64 KiB).
_PREFETCH_BYTES = 32 * 1024
#: How long a thread blocked in ``result()`` reads its task's result pipe
#: itself before it leaves that to the dispatcher again (see ``help_resolve``).
#: Long enough for any short task; a long one is then waited for as usual.
_ASSIST_SECONDS = 0.005
#: How long past that window the dispatcher waits before it takes the pipe
#: back from a helper that never gave it back (an exception cut it short).
_ASSIST_GRACE_SECONDS = 0.5
#: A worker whose last task took less than this (as seen from here, round trip
#: included) is polled without sleeping for up to twice that long, before the
#: helper sleeps in poll(): waking a sleeping thread costs as much as such a
#: task.  One thread per pool at a time.
_SPIN_SECONDS = 0.0005
#: The least number of worker slots a pool can grow to with ``resize``.
_MIN_CAPACITY = 64

#: A future to resolve from a result frame: the item, the status, the payload
#: (a pickle, or ``_buffers.Received``, or what decoding its buffers raised).
_Resolution = tuple[WorkItem, int, Any]

#: The item of a log frame's entry among the resolutions: a record, which
#: answers no task, handed to logging where its frame came in the stream.
_LOG_RECORD_ITEM = WorkItem(Future(), 0, b"", None, None)


class _SpareExit(NamedTuple):
    """The tag of a spare process's sentinel."""

    spare: Spare


_WAKEUP = object()


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


class PoolCore:
    """The state of one pool, shared by the executor and its dispatcher thread.

    It holds no reference to the executor object, so an executor that is
    garbage collected can be noticed (``weakref.finalize``) and shut down.
    """

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.owner_pid = os.getpid()
        #: Set in a forked child's copy (cheaper to test than os.getpid()).
        self.inherited = False
        self.lock = threading.Lock()
        #: How many workers the pool runs now (``resize`` changes it).  Slots
        #: at or past it are surplus: they take no work and go once idle.
        self.size = settings.max_workers
        #: The most ``size`` can grow to (the shared marks array is this long).
        self.capacity = max(_MIN_CAPACITY, 4 * settings.max_workers)
        #: Replaced, never changed in place, so it can be iterated without the lock.
        self.slots = [Slot(i) for i in range(settings.max_workers)]
        self.counters = Counters()
        #: Callables whose runs keep killing their worker (quarantine_after).
        self.quarantine = Quarantine(settings.quarantine_after, settings.quarantine_seconds)
        self.shutdown_requested = False
        #: Why the pool is broken (submit raises BrokenProcessPool), or None.
        self.broken: Optional[str] = None
        self.broken_cause: Optional[BaseException] = None
        self.kill_requested: Optional[int] = None  # a signal number
        self.kill_reason: Optional[str] = None
        #: Admission control (``max_pending``), if the pool has it.
        self.admission: Optional[Admission] = None
        self.thread: Optional[threading.Thread] = None
        #: The dispatcher's thread object, made before the first fork (see
        #: ensure_started); ``thread`` once started.
        self.unstarted_thread: Optional[_threads.QuickStartThread] = None
        #: Shared with the workers: per slot, the id of the task it took up
        #: (cells 0..n-1), and an id it must skip (cells n..2n-1).
        self.marks: Any = None
        #: What holds ``marks`` and is sent to the workers (``_worker.new_marks``).
        self.shared_marks: Any = None
        self.startup_deaths = 0
        #: How long a worker takes from its start to ready, lately (seconds).
        self.start_seconds = 0.0
        #: Spare processes let go unused (a successor no longer wanted), until
        #: they have exited and been reaped.
        self.leaving: list[Spare] = []
        #: Spare processes whose exit the dispatcher has seen, to settle.
        self.spare_exits: list[Spare] = []
        #: Results read but not yet given to their futures (dispatcher only).
        self.deferred: list[_Resolution] = []
        #: Results a helping thread booked but could not resolve (lock held).
        self.handed_over: list[_Resolution] = []
        #: A worker's initializer raised: the pool breaks once that worker is gone.
        self.initializer_error: Optional[BaseException] = None
        self.wakeup_lock = threading.Lock()
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_r, False)
        os.set_blocking(self.wakeup_w, False)
        #: What the dispatcher waits on: the wakeup pipe, and per live worker
        #: its result pipe and its sentinel.  Changed only by the thread that
        #: owns the pool's workers (the dispatcher, or submit() before it exists).
        self.selector = Waiter()
        self.selector.register(self.wakeup_r, _WAKEUP)
        self.closed = False
        #: Starts workers (and under fork keeps the zygote and its standby).
        self.launcher = Launcher(self)
        #: Sees workers end, and ends them.
        self.supervisor = Supervisor(self)
        #: Writes to the workers' task pipes.
        self.transport = Transport(self)
        #: The queue, and which worker gets which item.
        self.scheduler = Scheduler(self)
        # The process's one registry of live pools, which Dask executors join
        # too: its fork and exit hooks, and drain_all, reach every pool.
        _process_pools.LIVE_POOLS.add(self)

    # -- called from any thread ------------------------------------------------

    def check_usable(self) -> None:
        """Raise if no new work may be submitted (lock held)."""
        if self.inherited:
            raise InheritedManagerError(
                f"this pool belongs to process {self.owner_pid}; "
                f"process {os.getpid()} inherited a copy by fork and cannot use it"
            )
        if self.broken is not None:
            raise BrokenProcessPool(self.broken)
        if self.shutdown_requested:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def wake(self) -> None:
        """Interrupt the dispatcher's wait (safe from any thread)."""
        # Under its own lock: once the pipe is closed its number may belong
        # to another file, which a stray write would corrupt.
        with self.wakeup_lock:
            if self.closed:
                return
            try:
                os.write(self.wakeup_w, b"\0")
            except OSError:
                pass  # the pipe is full: a wake-up is already due

    def submit(self, item: WorkItem) -> None:
        """Queue ``item``, sending it straight to an idle worker if there is one."""
        with self.lock:
            self.check_usable()
            if self.quarantine.until and self.scheduler.refuse_quarantined(item):
                return
            if self.thread is None:
                self.ensure_started()
                try:
                    self.scheduler.queue(item)
                finally:
                    self.start_dispatcher()
            else:
                self.scheduler.queue(item)

    def cancel(self, future: Future[Any]) -> bool:
        """Cancel a queued item, or stop the worker running it; False if unknown."""
        with self.lock:
            if not self.scheduler.cancel_queued(future):
                return self._stop_assigned(future)
        future.cancel()
        _notify_if_cancelled(future)
        return True

    def _stop_assigned(self, future: Future[Any]) -> bool:
        """Stop an item a worker holds (lock held)."""
        for slot in self.slots:
            for position, item in enumerate(slot.assigned):
                if item.future is not future:
                    continue
                error = TaskCancelledError(f"task {item.label} was cancelled while running")
                if position == 0 and self.marks[slot.index] == item.task_id:
                    self.supervisor.stop_worker(slot, item, error)
                    self.wake()
                else:
                    # Still in the worker's pipe: the worker skips it when it
                    # gets there, and its answer is ignored.
                    self.marks[self.capacity + slot.index] = item.task_id
                    _set_exception(future, error)
                return True
        return False

    # -- workers (lock held) ---------------------------------------------------

    def ensure_started(self) -> None:
        """Start the first worker, once; the others wait for the dispatcher.

        ``start_dispatcher`` must follow, once the item being submitted has
        gone to that worker: the first task then runs while the rest of the
        pool starts.
        """
        settings = self.settings
        if self.marks is None:
            self.shared_marks = _worker.new_marks(settings.context, 2 * self.capacity)
            self.marks = _worker.marks_array(self.shared_marks)
        self.launcher.prepare()
        if self.unstarted_thread is None:
            # Made now: after a fork, every page this process writes (and a
            # Thread writes many) is a copy-on-write fault.
            self.unstarted_thread = _threads.QuickStartThread(
                self.dispatch_loop, name=f"duckpool-dispatcher-{id(self):x}"
            )
        # The first worker now, for the task being submitted (under fork,
        # straight from this process: no thread of this pool exists yet, as
        # when the zygote is forked).  The dispatcher starts the others at
        # once, while that task already runs.  Until then they are reserved:
        # each takes a task as an idle worker would (so it counts as started,
        # as the stdlib's executor sends the first tasks on at once), which
        # waits in its outbox.
        empty = [slot for slot in self.slots if slot.process is None]
        if empty:
            self.launcher.start_worker(empty[0])
        for slot in empty[1:]:
            slot.reserved = True

    def start_dispatcher(self) -> None:
        """Fork the zygote (under fork), then start the dispatcher thread."""
        if self.thread is not None:
            return
        # Forked now, before this pool's thread exists; it forks the workers
        # from then on (see _zygote).
        self.launcher.start_zygote()
        # Not waited for: the caller may read the first result itself meanwhile.
        thread = self.unstarted_thread
        if thread is None:
            thread = _threads.QuickStartThread(
                self.dispatch_loop, name=f"duckpool-dispatcher-{id(self):x}"
            )
        self.thread = thread
        self.unstarted_thread = None
        try:
            thread.start()
        except BaseException:
            self.thread = None  # nothing to join
            raise
        if any(slot.reserved for slot in self.slots):
            self.wake()

    def wants_successor(self, slot: Slot) -> bool:
        """Should a successor start for ``slot`` now? (lock held)

        With ``max_tasks_per_child``, once a ready worker has been sent half
        its quota, or sooner if at the pace of its last task it would reach
        its quota in less than twice the time a worker takes to start: its
        replacement then starts while it works, instead of after it has
        exited, and takes the slot as soon as it leaves.  Not under fork:
        there the zygote forks a replacement in a millisecond or two, and a
        successor would only hold memory.
        """
        limit = self.settings.max_tasks_per_child
        if (
            limit is None
            or self.launcher.forks
            or slot.successor is not None
            or slot.process is None
            or not slot.ready
            or slot.stopping is not None
            or slot.poisoned is not None
            or slot.index >= self.size
        ):
            return False
        left = limit - slot.tasks_sent
        return 2 * slot.tasks_sent >= limit or left * slot.last_service < 2 * self.start_seconds

    def start_successors(self) -> Optional[BaseException]:
        """Start the successors that are due (lock held); return a start error."""
        launcher = self.launcher
        now = time.monotonic()
        if self.shutdown_requested or not launcher.may_start_now(now):
            return None
        for slot in self.slots:
            if self.wants_successor(slot):
                try:
                    process, task_w, result_r = launcher.launch(slot.index)
                except Exception as exc:
                    return launcher.on_start_failure(exc, now)
                spare = slot.successor = Spare(slot, process, task_w, result_r)
                if process.sentinel is not None:
                    self.selector.register(process.sentinel, _SpareExit(spare))
        return None

    def unwatch_spare(self, spare: Spare) -> None:
        sentinel = spare.process.sentinel
        if sentinel is not None:
            self.selector.unregister(sentinel)

    def let_go(self, spare: Spare) -> None:
        """Stop a successor that will not be used (lock held); reaped on its exit."""
        if spare.slot.successor is spare:
            spare.slot.successor = None
        if spare in self.leaving:
            return
        # Read once the successor is ready (EAGAIN: the pipe is empty by then).
        _transport.stop(spare.task_conn)
        self.leaving.append(spare)

    def spares(self) -> list[Spare]:
        """Every spare process: successors and those leaving (lock held)."""
        successors = [slot.successor for slot in self.slots if slot.successor is not None]
        return successors + self.leaving

    def wake_for_successor(self, slot: Slot) -> None:
        """Have the dispatcher start ``slot``'s successor if one is due now
        (lock held): it may be asleep while callers read results themselves."""
        if self.wants_successor(slot) and threading.current_thread() is not self.thread:
            self.wake()

    def resize(self, size: int) -> None:
        """Run ``size`` workers from now on (lock held).

        Growing starts workers in the new slots; shrinking retires the
        surplus slots' workers once their current items are done.
        """
        if size > self.capacity:
            raise ValueError(
                f"max_workers can grow to at most {self.capacity} for this pool, got {size}"
            )
        self.size = size
        if size > len(self.slots):
            self.slots = self.slots + [Slot(i) for i in range(len(self.slots), size)]
        for slot in self.slots:
            if slot.index >= size and slot.successor is not None:
                self.let_go(slot.successor)
            if slot.index >= size and slot.process is not None and not slot.stop_sent:
                # Told to exit after what it holds (at once if idle).
                slot.retiring = True
                if slot.task_conn is not None:
                    self.transport.write(slot, b"")
        self.drop_surplus_slots()
        if self.thread is not None:
            self.wake()

    def drop_surplus_slots(self) -> None:
        """Forget trailing surplus slots whose process is gone (lock held)."""
        slots = self.slots
        end = len(slots)
        while end > self.size and slots[end - 1].process is None and not slots[end - 1].requested:
            end -= 1
            successor = slots[end].successor
            if successor is not None:
                self.let_go(successor)
        if end < len(slots):
            self.slots = slots[:end]

    # -- the dispatcher thread ---------------------------------------------------

    def dispatch_loop(self) -> None:
        try:
            self._dispatch_until_done()
        except BaseException as exc:  # last resort: never leave a future unresolved
            with self.lock:
                self.broken = f"duckpool's dispatcher failed: {exc!r}"
                self.broken_cause = exc
                # Results read but not handed out: their items left `assigned`.
                stranded = [item for item, _, _ in self.deferred if item is not _LOG_RECORD_ITEM]
                self.deferred.clear()
            self.fail_everything(BrokenProcessPool(self.broken), cause=exc, also=stranded)
            self.supervisor.kill_without_bookkeeping()
        finally:
            self.launcher.close()
            if isinstance(self.shared_marks, _worker.SharedMarks):
                # No worker starts or runs any more: a plain copy will do, and
                # the mapping goes with its descriptor now, not when this
                # object is collected (this thread may outlive join()).
                with self.lock:
                    self.marks = list(self.marks)
                self.shared_marks.close()
            self.close_wakeup()
            # Told to exit, the zygotes tear down whole address spaces; join()
            # waits for that too (every process of the pool has exited then).
            self.launcher.reap(KILL_GRACE_SECONDS)

    def _dispatch_until_done(self) -> None:
        # Futures are resolved last, just before the thread sleeps: the caller
        # waiting on one then gets the GIL at once, not after our bookkeeping.
        deferred = self.deferred
        launcher = self.launcher
        supervisor = self.supervisor
        transport = self.transport
        scheduler = self.scheduler
        while True:
            with self.lock:
                timeout = self.check_deadlines()
                if launcher.asked_at is not None:
                    launcher.check_answers(time.monotonic())
                if (
                    launcher.failing_since is not None
                    or launcher.standby_due
                    or launcher.asked_at is not None
                ):
                    wait = launcher.wake_in(time.monotonic())
                    if wait is not None and (timeout is None or wait < timeout):
                        timeout = wait
                if launcher.polls_exits and (timeout is None or timeout > EXIT_POLL_SECONDS):
                    timeout = EXIT_POLL_SECONDS
                transport.before_wait()
                if self.handed_over:
                    deferred.extend(self.handed_over)
                    self.handed_over.clear()
            if deferred:
                self.resolve_all(deferred)
            exited: list[Slot] = []
            for tag in self.selector.wait(timeout):
                if tag is _WAKEUP:
                    self.drain_wakeup()
                    continue
                if type(tag) is ZygoteTag:
                    exited.extend(launcher.on_zygote_event(tag))
                    continue
                if type(tag) is Writable:
                    with self.lock:
                        transport.flush(tag.slot)
                    continue
                if type(tag) is _SpareExit:
                    self.spare_exits.append(tag.spare)
                    continue
                is_result, slot = tag
                if is_result:
                    self.on_results(slot, deferred)
                else:
                    exited.append(slot)
            if launcher.polls_exits:
                exited.extend(s for s in launcher.poll_exits() if s not in exited)
            if exited or self.kill_requested is not None:
                self.resolve_all(deferred)  # results come before the deaths
            for slot in exited:
                supervisor.on_worker_exit(slot)
            while self.spare_exits:
                self.on_spare_exit(self.spare_exits.pop())
            if self.kill_requested is not None:
                supervisor.kill_all_workers(self.kill_requested)
            start_error: Optional[BaseException] = None
            with self.lock:
                if (
                    not self.shutdown_requested
                    or scheduler.pending
                    or any(slot.reserved for slot in self.slots)
                ):
                    start_error = launcher.refill_slots()
                    scheduler.dispatch_pending()
                    if start_error is None:
                        start_error = self.start_successors()
                if launcher.standby is None and launcher.zygote is not None:
                    launcher.want_standby(time.monotonic())
                done = (
                    self.shutdown_requested
                    and not scheduler.pending
                    and not any(s.assigned for s in self.slots)
                ) or (self.broken is not None and not any(s.alive for s in self.slots))
            if start_error is not None:
                self.mark_broken(f"could not start a worker process: {start_error!r}", start_error)
            elif done:
                break
        self.resolve_all(deferred)
        supervisor.stop_workers()

    def check_deadlines(self) -> Optional[float]:
        """Stop overrunning tasks; return seconds until the next deadline (lock held)."""
        now = time.monotonic()
        nearest: Optional[float] = None
        for slot in self.slots:
            assist = slot.assist
            if assist is not None:
                # A helper that overstays its window was cut short: its pipe
                # comes back here, or its results would never be read.
                taken_back = assist.until + _ASSIST_GRACE_SECONDS
                if now >= taken_back:
                    self.end_assist(slot, assist)
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
                    self.supervisor.stop_worker(
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

    def drain_wakeup(self) -> None:
        try:
            while os.read(self.wakeup_r, 4096):
                pass
        except OSError:
            pass

    def on_results(
        self,
        slot: Slot,
        deferred: Optional[list[_Resolution]] = None,
        helper: Optional[mp_connection.Connection] = None,
        final: bool = False,
    ) -> bool:
        """Read every result frame the slot's pipe holds now; True at EOF.

        The futures are resolved here, or, given ``deferred``, appended to it
        for the caller to resolve later.  The dispatcher calls this; so does a
        thread helping with a result (``helper`` is the pipe it watches).
        While a thread helps, the pipe is its own: the dispatcher reads it
        only for the last time (``final``: the worker has exited).
        """
        resolved: list[_Resolution] = [] if deferred is None else deferred
        init_failure: Optional[memoryview] = None
        try:
            with slot.read_lock:  # frames are booked in the order they were read
                reader = slot.reader
                if reader is None or (helper is not None and slot.result_conn is not helper):
                    return True
                if slot.poisoned is not None:
                    return False  # the worker is being killed; its pipe is not to be trusted
                if helper is None and not final and slot.assist is not None:
                    # Readiness seen before the helper paused the pipe: what it
                    # holds is the helper's to read (see help_resolve).
                    return False
                frames, eof = reader.read_available()
                if eof and helper is None and slot.result_conn is not None:
                    # The worker is gone (its sentinel says how); stop watching the pipe.
                    try:
                        self.selector.unregister(slot.result_conn)
                    except (KeyError, ValueError):
                        pass
                if frames:
                    init_failure = self._book_results(slot, reader, frames, resolved)
                    if helper is not None and (
                        self.shutdown_requested
                        or (slot.assigned and slot.assigned[0].timeout is not None)
                    ):
                        # What the dispatcher decides on changed behind its back:
                        # shutdown may be complete, or a new deadline runs.
                        self.wake()
        except BaseException as exc:
            # In a helping thread, an exception a signal handler raised (Ctrl-C
            # in the main thread) may have struck between reading bytes and
            # booking them: what the pipe held may be lost.
            if helper is None:
                raise
            self._poison(slot, exc)
            self.resolve_all(resolved)  # what was booked is sound
            raise
        if deferred is None:
            if helper is None:
                self.resolve_all(resolved)
            else:
                self._resolve_in_helper(resolved)
        if init_failure is not None:
            self.on_initializer_failure(init_failure)
        return eof

    def _resolve_in_helper(self, resolved: list[_Resolution]) -> None:
        """Resolve what a helping thread booked; if an exception raised in that
        thread (Ctrl-C) cuts this short, the dispatcher resolves the rest.

        If the dispatcher still holds resolutions it read before this thread
        took the pipe (a log record of the very task, say), everything goes to
        the dispatcher instead, to be resolved after them, in order.
        """
        if self.deferred:  # (emptied only once all of it is resolved)
            with self.lock:
                self.handed_over.extend(resolved)
            resolved.clear()
            self.wake()
            return
        try:
            self.resolve_all(resolved)
        except BaseException:
            with self.lock:
                self.handed_over.extend(resolved)  # resolving twice is harmless
            self.wake()
            raise

    def _book_results(
        self,
        slot: Slot,
        reader: _worker.FrameReader,
        frames: list[bytes],
        resolved: list[_Resolution],
    ) -> Optional[memoryview]:
        """Match result frames to the slot's items; return an initializer failure."""
        now = time.monotonic()
        with self.lock:  # once for the whole batch
            if slot.reader is not reader:
                # Closed meanwhile (the pool broke): its items are settled.
                return None
            assigned = slot.assigned
            counters = self.counters
            quarantine = self.quarantine
            for frame in frames:
                view = memoryview(frame)
                status = view[_worker.TASK_ID_BYTES]
                payload: Any = view[_worker.RESULT_HEADER_BYTES :]
                if status & _worker.STATUS_BUFFERS:
                    status &= ~_worker.STATUS_BUFFERS
                    payload = _Undecoded(payload)
                if status == _worker.STATUS_INIT_FAILED:
                    return view[_worker.RESULT_HEADER_BYTES :]
                if status == _worker.STATUS_READY:
                    slot.ready = True
                    slot.head_since = now
                    self.startup_deaths = 0
                    if slot.launched_at is not None:
                        took = now - slot.launched_at
                        self.start_seconds = (
                            took if not self.start_seconds else (self.start_seconds + took) / 2
                        )
                        slot.launched_at = None
                    if payload and _buffers.SHARED_AREA:
                        self.transport.on_area_offer(slot, bytes(payload))
                    self.wake_for_successor(slot)
                    continue
                if status == _worker.STATUS_LOG:
                    # Emitted in its place among the results, with no lock held.
                    resolved.append((_LOG_RECORD_ITEM, status, payload))
                    continue
                item = assigned[0] if assigned else None
                if item is None or item.task_id != int.from_bytes(
                    view[: _worker.TASK_ID_BYTES], "little"
                ):
                    raise RuntimeError(
                        f"worker {slot.index} answered out of order "
                        f"(expected task {item.task_id if item else None})"
                    )
                # Booked before it leaves `assigned`: never in neither.
                resolved.append((item, status, payload))
                assigned.popleft()
                if item.in_area:  # the worker has copied the call's buffers out
                    item.in_area = False
                    if slot.area is not None:
                        slot.area.calls.release()
                slot.tasks_done += 1
                counters.latencies.append(now - item.submitted)
                if status == _worker.STATUS_OK:
                    counters.completed += 1
                else:
                    counters.failed += 1
                if quarantine.streaks:
                    quarantine.on_return(item.label)
                slot.queued_bytes -= item.size
                slot.last_service = now - slot.head_since
                slot.head_since = now
            scheduler = self.scheduler
            if slot.process is not None and not (
                self.shutdown_requested and not scheduler.pending
            ):
                scheduler.dispatch_pending()
            # After the next calls are on their way: the workers need not wait.
            copy_buffers = self.transport.copy_buffers
            for index, (item, status, payload) in enumerate(resolved):
                if type(payload) is _Undecoded:
                    resolved[index] = (item, status, copy_buffers(slot, payload.body))
        return None

    def _poison(self, slot: Slot, cause: BaseException) -> None:
        """The slot's result stream can no longer be trusted: kill its worker.

        Its items that had started fail (with ``cause`` chained); the others
        are requeued, as after any worker death (see ``on_worker_exit``).
        """
        with self.lock:
            process = slot.process
            if process is None or slot.poisoned is not None:
                return
            slot.poisoned = WorkerDiedError(
                f"worker {slot.index} (pid {process.pid}) was stopped: the thread "
                f"reading its results was interrupted ({cause!r}), so results it "
                f"had sent may be lost",
                pid=process.pid,
                slot=slot.index,
            )
            slot.poisoned.__cause__ = cause
        signal_process(process, signal.SIGKILL)
        self.wake()

    def help_resolve(self, future: Future[Any], timeout: Optional[float]) -> None:
        """Wait for ``future`` by reading its worker's result pipe in this thread.

        A thread blocked in ``result()`` would otherwise sleep until the
        dispatcher reads the result and wakes it: two thread wake-ups per
        round trip, each costing more than a tiny task.  When the pool is
        quiet (the future's worker holds only that task and nothing is
        queued), the dispatcher stops watching that one pipe for up to
        ``_ASSIST_SECONDS`` (or ``timeout``) and this thread reads it instead,
        booking and resolving what arrives, its own result included.  If the
        worker's last task took less than ``_SPIN_SECONDS``, it polls without
        sleeping for up to twice that long first.  Deaths, deadlines and the other pipes
        stay the dispatcher's; what this thread has not read when it stops,
        the dispatcher reads next.
        """
        if (
            self.inherited
            or not self.selector.can_pause
            or threading.current_thread() is self.thread
        ):
            return
        with self.lock:
            slot = self._slot_running(future)
            if slot is None or slot.assist is not None or self.closed:
                return
            conn = slot.result_conn
            if conn is None or slot.poisoned is not None:
                return
            item = slot.assigned[0]
            now = time.monotonic()
            window = _ASSIST_SECONDS if timeout is None else min(timeout, _ASSIST_SECONDS)
            end = now + window
            # A result due within microseconds is polled for without sleeping:
            # waking a sleeping thread costs more than such a task itself.
            spin = slot.last_service < _SPIN_SECONDS and not any(
                s.assist is not None and s.assist.spin for s in self.slots
            )
            spin_until = now + min(window, 2 * slot.last_service) if spin else now
            # Recorded before the pipe is paused: an exception raised in this
            # thread from here on (Ctrl-C) leaves an assist the dispatcher
            # takes back after its window (check_deadlines), never a pipe
            # paused for good.
            assist = slot.assist = Assist(conn, end, spin)
            try:
                self.selector.pause(conn)
            except OSError:  # no longer watched: the worker is gone
                slot.assist = None
                return
        try:
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
                if self.on_results(slot, helper=conn):
                    break
        finally:
            with self.lock:
                self.end_assist(slot, assist)

    def end_assist(self, slot: Slot, assist: Assist) -> None:
        """Give a helped pipe back to the dispatcher (lock held)."""
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
        elif slot.result_conn is assist.conn and not self.closed:
            self.selector.resume(assist.conn)
        slot.assist = None

    def _slot_running(self, future: Future[Any]) -> Optional[Slot]:
        """The slot whose worker holds ``future``'s item and nothing else, if
        no other work waits (lock held).

        Helping pays off when the pool is quiet; a busy pool's results come in
        batches, which the dispatcher reads more cheaply.
        """
        if self.scheduler.pending:
            return None
        for slot in self.slots:
            assigned = slot.assigned
            if len(assigned) == 1 and assigned[0].future is future:
                return slot
        return None

    def resolve_all(self, resolutions: list[_Resolution]) -> None:
        for item, status, payload in resolutions:
            self.resolve(item, status, payload)
        resolutions.clear()

    def resolve(self, item: WorkItem, status: int, payload: memoryview) -> None:
        """Set a future from a result frame (no lock held: callbacks run here)."""
        if status == _worker.STATUS_LOG:
            _logs.handle_forwarded(payload)
            return
        future = item.future
        if future._state in DONE_STATES:
            return  # cancelled while queued in the worker
        try:
            if status == _worker.STATUS_OK:
                value = _buffers.loads(pickle.loads, payload)
            else:
                error = exception_from_payload(payload)
        except BaseException as exc:
            failure = TaskUnpicklingError(
                f"could not unpickle what task {item.label} sent back: {exc!r}"
            )
            failure.__cause__ = exc
            _set_exception(future, failure)
            return
        if status == _worker.STATUS_OK:
            _set_result(future, value)
        elif status == _worker.STATUS_UNPICKLE_FAILED:
            failure = TaskUnpicklingError(
                f"the worker could not unpickle the call to {item.label}: {error!r}"
            )
            failure.__cause__ = error
            _set_exception(future, failure)
        else:
            _set_exception(future, error)

    def on_initializer_failure(self, payload: memoryview) -> None:
        """Remember a worker's initializer error; the pool breaks when it has exited.

        Not before: the worker may still be flushing what it logged about the
        failure (a multiprocessing queue handler, say), and once the pool is
        broken its caller moves on.
        """
        try:
            cause = exception_from_payload(payload)
        except BaseException as exc:
            cause = exc
        with self.lock:
            if self.initializer_error is None:
                self.initializer_error = cause

    def mark_broken(self, reason: str, cause: Optional[BaseException]) -> None:
        """Break the pool for good: fail every outstanding future, stop workers."""
        with self.lock:
            if self.broken is not None:
                return
            self.broken = reason
            self.broken_cause = cause
        self.fail_everything(BrokenProcessPool(reason), cause=cause)
        # Not SIGKILL at once: a worker whose initializer failed is exiting by
        # itself, and may still be flushing what it logged about the failure.
        self.supervisor.stop_workers(KILL_GRACE_SECONDS)

    def fail_everything(
        self,
        error: BaseException,
        cause: Optional[BaseException],
        also: Sequence[WorkItem] = (),
    ) -> None:
        """Fail every pending and assigned future (and those of ``also``) with ``error``."""
        with self.lock:
            items = [*also, *self.scheduler.take_all()]
            for slot in self.slots:
                items.extend(slot.assigned)
                slot.assigned.clear()
                slot.queued_bytes = 0
        if cause is not None and error.__cause__ is None:
            error.__cause__ = cause
        for item in items:
            _set_exception(item.future, error)

    def on_spare_exit(self, spare: Spare) -> None:
        """A spare process exited: reap it; a successor that died unused is
        replaced later (``start_successors``), unless it died of its initializer."""
        spare.process.join(KILL_GRACE_SECONDS)
        exitcode = spare.process.exitcode
        init_failure: Optional[memoryview] = None
        records: list[_Resolution] = []
        with self.lock:
            if spare in self.leaving:
                self.leaving.remove(spare)
            elif spare.slot.successor is spare:
                spare.slot.successor = None
                # What it said before it died: an initializer failure breaks
                # the pool, as in a worker; its log records are forwarded.
                frames, _ = _worker.FrameReader(spare.result_conn.fileno()).read_available()
                for frame in frames:
                    view = memoryview(frame)
                    status = view[_worker.TASK_ID_BYTES]
                    payload = view[_worker.RESULT_HEADER_BYTES :]
                    if status == _worker.STATUS_INIT_FAILED:
                        init_failure = payload
                    elif status == _worker.STATUS_LOG:
                        records.append((_LOG_RECORD_ITEM, status, payload))
                if not self.shutdown_requested and self.kill_requested is None:
                    if exitcode != 0:
                        self.counters.worker_deaths += 1
                    if self_inflicted(exitcode) and init_failure is None:
                        self.startup_deaths += 1
            else:
                return  # already closed (the pool stopped it)
            self.close_spare(spare)
            give_up = self.startup_deaths >= MAX_STARTUP_DEATHS
        self.resolve_all(records)
        if init_failure is not None:
            self.on_initializer_failure(init_failure)
        self.supervisor.break_if_starts_fail(give_up, exitcode)

    def close_spare(self, spare: Spare) -> None:
        """Stop watching a spare process and close its pipes (lock held)."""
        self.unwatch_spare(spare)
        for conn in (spare.task_conn, spare.result_conn):
            try:
                conn.close()
            except OSError:
                pass
        if isinstance(spare.process, (_zygote.ZygoteChild, _child.ServedProcess)):
            spare.process.close()

    def close_spares(self, spares: list[Spare]) -> None:
        """Close spare processes that were reaped (lock held)."""
        for spare in spares:
            if spare in self.leaving:
                self.leaving.remove(spare)
                self.close_spare(spare)

    def close_wakeup(self) -> None:
        with self.lock, self.wakeup_lock:
            if self.closed:
                return
            self.closed = True
            self.selector.close()
            for fd in (self.wakeup_r, self.wakeup_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    # -- shutdown -----------------------------------------------------------------

    def request_shutdown(self, cancel_futures: bool) -> None:
        """Stop accepting work; with ``cancel_futures``, cancel what is pending."""
        if self.admission is not None:
            self.admission.close()  # a submit() blocked for room raises
        with self.lock:
            self.shutdown_requested = True
            cancelled: list[WorkItem] = []
            if cancel_futures:
                cancelled = self.scheduler.take_all()
            started = self.thread is not None
            if started and not self.scheduler.pending:
                self.stop_idle_workers()
        for item in cancelled:
            item.future.cancel()
            _notify_if_cancelled(item.future)
        if started:
            self.wake()
        else:
            self.close_wakeup()

    def stop_idle_workers(self) -> None:
        """Shutdown of an idle pool: tell the workers to exit now (lock held).

        The dispatcher would do it once awake; the caller's thread does it
        first, and the workers' exits start that much sooner.  Any work in
        flight, or a start under way, leaves it all to the dispatcher.
        """
        slots = self.slots
        if self.leaving or any(
            slot.assigned
            or slot.outbox
            or slot.reserved
            or slot.requested
            or slot.successor is not None
            for slot in slots
        ):
            return
        for slot in slots:
            self.transport.send_stop(slot)  # (gone already: its sentinel says so)
        self.launcher.finish()

    def request_kill(self, signum: int, reason: Optional[str] = None) -> None:
        """Cancel pending work and signal every worker; the pool is finished.

        ``reason`` says why, in the errors of the tasks that were running.
        """
        self.request_shutdown(cancel_futures=True)
        with self.lock:
            if self.thread is None:
                return
            if self.kill_requested is None:
                self.kill_reason = reason
            self.kill_requested = signum
        self.wake()

    def stats(self) -> PoolStats:
        """A snapshot of the pool's workers, queue and counters."""
        with self.lock:
            counters = self.counters
            workers = [
                (slot.index, slot.process.pid, self._worker_state(slot), slot.tasks_done)
                for slot in self.slots
                if slot.process is not None and slot.process.pid is not None
            ]
            latencies = sorted(counters.latencies)
            pending = len(self.scheduler.pending)
            in_flight = sum(len(slot.assigned) for slot in self.slots)
            counts = (
                counters.completed,
                counters.failed,
                counters.timed_out,
                counters.worker_deaths,
                counters.restarts,
                counters.recycles,
            )
            now = time.monotonic()
            quarantined = self.quarantine.active(now)
            helpers = tuple(HelperStats(role, pid) for role, pid in self.launcher.helpers())
            thread = self.thread
            stopped = (
                self.shutdown_requested
                and (thread is None or not thread.is_alive())
                and not workers
                and not helpers
            )
        rss = rss_of([pid for _, pid, _, _ in workers])
        completed, failed, timed_out, deaths, restarts, recycles = counts
        return PoolStats(
            max_workers=self.size,
            workers=tuple(
                WorkerStats(slot=index, pid=pid, state=state, tasks_done=done, rss=rss.get(pid))
                for index, pid, state, done in workers
            ),
            pending=pending,
            in_flight=in_flight,
            completed=completed,
            failed=failed,
            timed_out=timed_out,
            worker_deaths=deaths,
            restarts=restarts,
            recycles=recycles,
            quarantined=quarantined,
            latency_p50=percentile(latencies, 0.50),
            latency_p99=percentile(latencies, 0.99),
            helpers=helpers,
            stopped=stopped,
        )

    def _worker_state(self, slot: Slot) -> str:
        if slot.stopping is not None:
            return "stopping"
        if slot.index >= self.size or (slot.retiring and not slot.assigned):
            return "retiring"
        if slot.assigned and self.marks[slot.index] == slot.assigned[0].task_id:
            return "busy"  # it took its task up (its "ready" may not be read yet)
        if not slot.ready:
            return "starting"
        return "busy" if slot.assigned else "idle"

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait until every process the pool started has exited (its zygotes
        included) and its dispatcher thread has ended, or ``timeout`` passes."""
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def shutdown_at_exit(self, interrupted: bool) -> None:
        """Interpreter exit: daemon pools (and Ctrl-C) stop now, others finish.

        A pool that never started, one already closed and a forked child's
        copy are left alone.
        """
        if self.owner_pid != os.getpid() or self.thread is None or self.closed:
            return
        if self.settings.daemon or interrupted:
            self.request_kill(signal.SIGKILL)
            self.join(STOP_GRACE_SECONDS)
        else:
            self.request_shutdown(cancel_futures=False)
            self.join()

    def forget_after_fork(self) -> None:
        """In a forked child: the copy of this pool becomes unusable.

        Nothing is closed by number here: another thread of the parent may
        have closed one of these descriptors just before the fork and the
        number been reused, so closing it could break the child.  Nothing
        relies on the child closing them: workers and the zygote learn of
        the parent's death from its pid, and of shutdown from a message.
        """
        self.inherited = True
        self.closed = True
        self.lock = threading.Lock()
        self.wakeup_lock = threading.Lock()


#: signals sent from outside (SIGKILL, SIGTERM, ...), which are not its fault.
_CRASH_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}
)


class _Undecoded:
    """A result frame's buffers body, booked but not yet copied out."""

    __slots__ = ("body",)

    def __init__(self, body: memoryview) -> None:
        self.body = body

