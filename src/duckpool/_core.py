"""The engine behind duckpool's executor: ``PoolCore``, the facade over its owners.

``PoolCore`` holds the pool's lock, its ``Lifecycle``, the slots and the
settings, and is the engine's whole API: the executor, shutdown, routing and
the fork and exit hooks call its methods, never an owner's.  Each concern is
an owner in ``duckpool._pool``, whose fields only its own module assigns:

    Scheduler .... the queue (``Scheduler.pending``) and who gets what
    Transport .... task, stop and release frames down the task pipes; areas
    ResultBook ... result frames read, booked, and their futures resolved
    Assists ...... a caller waiting on a quiet pool reads its result itself
    Launcher ..... worker starts and what a failed start does
    Zygotes ...... under fork, the zygote and its standby that fork workers
    Supervisor ... worker exits and deaths, cancel, stop, kill, breakage
    Successors ... with max_tasks_per_child, each slot's next worker early
    Deadlines .... task timeouts, kill graces, assist windows
    Dispatcher ... the thread that waits on all of it (``_dispatcher.run``);
                   with several pools in the process, one hub thread runs
                   every pool's passes (``_hub``)
    Quarantine, Counters, Waiter, Wakeup: state and services they share

Locking: one lock per pool, ``PoolCore.lock``.  Entry points (this class's
methods, the dispatcher's pass, an assisting caller) take it; an owner's
method expects it held unless its module says it takes it itself.  Lock
order: a slot's ``read_lock``, then ``PoolCore.lock``.

Data flow::

    submit() [any thread]                          worker slot i (a process)
      |  pickles (fn, args, kwargs) at once,          |
      |  large buffers kept beside the pickle         |
      |  lock held: Scheduler.queue                   |
      |   idle slot? --task frame--> task pipe i -->  | mark "took up task N",
      |   else -> Scheduler.pending (deque)           | run it, answer
      |     large buffers --copied--> area i, calls   |  (copies buffers out)
      |     (or inline in the frame, if no room)      v
      |                       result pipe i <-- result frame (task id, status)
      |                                     and log frames (records logged there)
      |                area i, results <--copied-- a result's large buffers
      v
    _dispatcher.run [one thread per pool; its passes on the hub's one
      thread while several pools run, back on its own if the hub stalls]
      waits on (Waiter): the wakeup pipe, every result pipe, every worker's
                sentinel (a pidfd where the kernel has them), task pipes
                with an outbox to flush, spare processes' sentinels, the
                zygote's and its standby's control socket, notice pipe and
                sentinel, and the nearest of: a task deadline, a kill grace,
                an assisting caller's window (Deadlines.check), a failed
                start's retry, a zygote's answer due, a standby due
                (Launcher.before_wait), an exit poll where no pidfds are
      result frame -> ResultBook.on_results: copy its buffers out of area i
                      (the next write to task pipe i says so: a release
                      frame), pop the slot's head item (its calls space is
                      free), refill the slot (Scheduler.dispatch_pending:
                      behind a busy worker's current task, a few short tasks
                      or one map chunk may wait in its pipe, see
                      Scheduler.can_prefetch), then resolve its future
      log frame    -> no item popped; the record goes to the parent's logger
                      of its name in its place among the resolutions, after
                      the lock (_logs.handle_forwarded)
      sentinel     -> Supervisor.on_worker_exit: read what the pipe still
                      holds; the dead worker's head item fails with
                      WorkerDiedError (pid, exit code, signal) if the worker
                      had taken it up; everything else it held goes back to
                      the front of the queue (Scheduler.requeue_front); the
                      slot's successor takes the slot, or the Launcher starts
                      a replacement in it
      zygote       -> Zygotes.on_event: a started worker (or standby)
                      to install; worker exits it reaped (notices); its own
                      death: its standby takes over (the workers it forked
                      are watched through their pidfds), or, with no standby,
                      workers are spawned from then on
      successor    -> Successors.start_due: with max_tasks_per_child, a
                      slot's next worker starts while its worker works; it
                      takes the slot when the worker leaves (a spare's exit:
                      Successors.on_exit)
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
                               for a few ms (Assists.help_resolve); a helper
                               that could not resolve hands over
                               (ResultBook.handed_over)
* unpicklable call ........... submit(), before anything is queued
* callable in quarantine ..... submit() (Scheduler.refuse_quarantined);
                               queued ones after the death that put it
                               there (Supervisor.on_worker_exit)
* worker death ............... dispatcher (Supervisor.on_worker_exit)
* worker whose result stream
  cannot be trusted .......... dispatcher, once it is killed (Assists.poison:
                               a thread reading it was interrupted)
* worker whose task stream
  cannot be trusted .......... dispatcher, once it is killed (Assists.poison:
                               a submit() was interrupted as it wrote)
* timeout / cancel_task() .... dispatcher, once the stopped worker is gone
                               (a queued item is cancelled at once, in the
                               pool or in a worker's pipe:
                               Supervisor.cancel_running)
* initializer failure, start
  failures for good, 3 deaths
  before ready ............... dispatcher: the pool is broken, every
                               outstanding future fails, submit() raises
                               (Supervisor.mark_broken)
* shutdown(cancel_futures) ... PoolCore.request_shutdown: pending futures
                               cancelled
* terminate/kill_workers ..... dispatcher (Supervisor.kill_all_workers)
* interpreter exit ........... the exit hook (_process_pools), once the
                               main thread has finished: submit() raises from
                               then on; non-daemon pools finish their work;
                               daemon pools (and Ctrl-C) kill workers and
                               fail or cancel what is left
* dispatcher bug ............. dispatcher's last resort (_dispatcher.run):
                               every outstanding future fails with
                               BrokenProcessPool

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

Area i is a memfd worker i creates and offers in its READY frame; the parent
maps it (``_buffers``), so no name in ``/dev/shm`` can outlive a killed
worker.  The parent writes only the calls region and the worker only the
results region; a space is reused only after a pipe message says its reader
is done.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import Future
from typing import Any, Optional

from duckpool import _marks, _process_pools
from duckpool._admission import Admission
from duckpool._futures import WorkItem, cancel_item
from duckpool._pool._assist import Assists
from duckpool._pool._counters import Counters
from duckpool._pool._deadlines import Deadlines
from duckpool._pool._dispatcher import Dispatcher
from duckpool._pool._elastic import Elastic
from duckpool._pool._launcher import Launcher
from duckpool._pool._lifecycle import Lifecycle
from duckpool._pool._quarantine import Quarantine
from duckpool._pool._results import ResultBook
from duckpool._pool._scheduler import Scheduler
from duckpool._pool._settings import PoolSettings
from duckpool._pool._slots import Slot, WorkerProcess
from duckpool._pool._snapshot import snapshot
from duckpool._pool._successors import Successors
from duckpool._pool._supervisor import STOP_GRACE_SECONDS, Supervisor
from duckpool._pool._transport import Transport
from duckpool._pool._waiter import Waiter
from duckpool._pool._wakeup import WAKEUP, Wakeup
from duckpool._pool._zygotes import Zygotes
from duckpool._stats import PoolStats

#: How long a map ending early waits for the pool's lock to withdraw a chunk
#: from a worker's pipe (``PoolCore.withdraw``); past it, the chunk just runs.
WITHDRAW_LOCK_SECONDS = 0.1

#: The least number of worker slots a pool can grow to with ``resize``.
_MIN_CAPACITY = 64


class PoolCore:
    """One pool: its lock, lifecycle and slots, and the owners that run it.

    Every method here is an entry point (the executor, the shutdown and
    routing modules, the fork and exit hooks call nothing else) and takes
    the lock itself, unless it says "lock held".  The owners' methods expect
    the lock held, or take it themselves where they say so.

    It holds no reference to the executor object, so an executor that is
    garbage collected can be noticed (``weakref.finalize``) and shut down.
    The owners hold it weakly; only its dispatcher thread, while it runs,
    and the executor hold it strongly.
    """

    def __init__(self, settings: PoolSettings, admission: Optional[Admission] = None) -> None:
        self.settings = settings
        self.lock = threading.Lock()
        #: Notified (lock held) each time a worker says it is ready.
        self.workers_ready = threading.Condition(self.lock)
        self.lifecycle = Lifecycle()
        #: Admission control (``max_pending``), if the pool has it.
        self.admission = admission
        #: How many workers the pool runs now (``resize`` changes it).  Slots
        #: at or past it are surplus: they take no work and go once idle.
        self.size = settings.max_workers
        #: The most ``size`` can grow to (the shared marks array is this long).
        self.capacity = max(_MIN_CAPACITY, 4 * settings.max_workers)
        #: Replaced, never changed in place, so it can be iterated without the lock.
        self.slots = [Slot(i) for i in range(settings.max_workers)]
        #: Shared with the workers: per slot, the id of the task it took up
        #: (cells 0..n-1), and an id it must skip (cells n..2n-1).
        self.marks: Any = None
        #: What holds ``marks`` and is sent to the workers (``_marks.new_marks``).
        self.shared_marks: Any = None
        self.counters = Counters()
        #: Callables whose runs keep killing their worker (quarantine_after).
        self.quarantine = Quarantine(settings.quarantine_after, settings.quarantine_seconds)
        self.wakeup = Wakeup()
        #: The executor was garbage collected (``abandon``): the dispatcher
        #: shuts the pool down.  Set without the lock.
        self.abandoned = False
        #: What the dispatcher waits on (see the diagram).  Changed only by
        #: the thread that owns the pool's workers (the dispatcher, or
        #: submit() before it exists).
        self.selector = Waiter()
        self.selector.register(self.wakeup.read_fd, WAKEUP)
        # The owners, in the order they depend on each other.
        self.transport = Transport(self)
        self.elastic = Elastic(self)
        self.scheduler = Scheduler(self)
        self.launcher = Launcher(self)
        self.zygotes = Zygotes(self)
        self.supervisor = Supervisor(self)
        self.successors = Successors(self)
        self.results = ResultBook(self)
        self.assists = Assists(self)
        self.deadlines = Deadlines(self)
        self.dispatcher = Dispatcher(self)
        # The process's one registry of live pools, which Dask executors join
        # too: its fork and exit hooks, and drain_all, reach every pool.
        _process_pools.LIVE_POOLS.add(self)

    # -- read by the owners ---------------------------------------------------------

    @property
    def thread(self) -> Optional[threading.Thread]:
        """The dispatcher thread, once started."""
        return self.dispatcher.thread

    @property
    def closed(self) -> bool:
        """The wakeup pipe is closed: the dispatcher has ended (or never will)."""
        return self.wakeup.closed

    @property
    def owner_pid(self) -> int:
        return self.lifecycle.owner_pid

    @property
    def accepting(self) -> bool:
        """May work be submitted?  (Read without the lock: a first, cheap
        test; ``refuse`` says why not.)"""
        return self.lifecycle.accepting

    @property
    def broken(self) -> Optional[str]:
        """Why the pool is broken, or None."""
        return self.lifecycle.broken

    def wake(self) -> None:
        """Interrupt the dispatcher's wait (safe from any thread)."""
        self.wakeup.wake()

    # -- work -------------------------------------------------------------------------

    def refuse(self) -> None:
        """Raise the error that says why no work may be submitted now."""
        with self.lock:
            if not self.lifecycle.inherited:
                # Whatever else the lifecycle would say: the exit hook has
                # stopped the pool by now (the zygote's exit may even have
                # marked it broken), and exit is the reason.
                _process_pools.raise_if_exiting()
            self.lifecycle.check_accepting()

    def submit(self, item: WorkItem) -> None:
        """Queue ``item``, sending it straight to an idle worker if there is one."""
        try:
            with self.lock:
                self.lifecycle.check_accepting()
                scheduler = self.scheduler
                if self.quarantine.until and scheduler.refuse_quarantined(item):
                    return
                if self.dispatcher.thread is None:
                    self.ensure_started()
                    try:
                        scheduler.queue(item)
                    finally:
                        self.start_dispatcher()
                else:
                    scheduler.queue(item)
        except BaseException as exc:
            self._abandon_send(item, exc)
            raise

    def _abandon_send(self, item: WorkItem, cause: BaseException) -> None:
        """submit() raised, maybe once ``item`` had gone to a worker but before
        its frame was all in that worker's pipe (an exception raised
        asynchronously in the submitting thread: a signal handler's): the
        worker would wait for the rest for ever, its slot taken.

        A slot with no process yet holds its frames in its outbox alone: its
        items go back to the queue.  Otherwise what reached the pipe cannot be
        told: the worker is killed, and what it never took up is requeued.
        ``item`` itself is cancelled first, never to run later (its worker may
        have run it already): the caller is told it was not submitted.
        """
        cancel_item(item, "as submit() raised")
        with self.lock:
            slot = next((s for s in self.slots if item in s.assigned), None)
            if slot is not None and slot.process is None:
                self.scheduler.requeue_front(slot)
                self.wake()
                return
        if slot is not None:
            self.assists.poison(slot, cause, writing=True)

    def cancel(self, future: Future[Any]) -> bool:
        """Cancel a queued or held item (``Supervisor.cancel``); False if unknown."""
        return bool(self.supervisor.cancel(future))

    def withdraw(self, future: Future[Any], patient: bool) -> bool:
        """Cancel an item no worker has taken up (``PoolFuture.withdraw``):
        False if the lock was not free (in ``WITHDRAW_LOCK_SECONDS`` if ``patient``)."""
        wait = WITHDRAW_LOCK_SECONDS if patient else 0
        return self.supervisor.cancel(future, running=False, wait=wait) is not None

    def help_resolve(self, future: Future[Any], timeout: Optional[float]) -> None:
        """A thread waits on ``future``: let it read the result itself (``_assist``)."""
        self.assists.help_resolve(future, timeout)

    def backlog(self) -> int:
        """How many items wait for a worker."""
        with self.lock:
            return len(self.scheduler.pending)

    def stats(self) -> PoolStats:
        """A snapshot of the pool's workers, queue and counters."""
        return snapshot(self)

    def state(self) -> str:
        """The lifecycle state's name (``Lifecycle.state``)."""
        return self.lifecycle.state(self.dispatcher.thread is not None, self.dispatcher.running())

    def worker_pids(self) -> list[int]:
        """The pids of the live worker processes, in slot order."""
        with self.lock:
            return [
                s.process.pid
                for s in self.slots
                if s.process is not None and s.process.pid is not None
            ]

    def worker_processes(self) -> list[WorkerProcess]:
        """The live worker processes, in slot order (handles of the engine's own:
        read them, never reap them; ``_compat`` wraps them for callers)."""
        with self.lock:
            return [s.process for s in self.slots if s.process is not None]

    def holds(self, process: WorkerProcess) -> bool:
        """Is ``process`` still a worker of a slot (its exit not yet settled)?"""
        with self.lock:
            return any(s.process is process for s in self.slots)

    # -- workers (lock held) ------------------------------------------------------

    def ensure_started(self) -> None:
        """Make the pool ready to take work, once: every slot takes work
        before its worker exists (it waits in the slot's outbox).

        ``start_dispatcher`` must follow, once the item being submitted has
        gone to a slot: it starts that slot's worker first, with the item
        already in its pipe, and the first task runs while the rest of the
        pool starts.
        """
        if self.shared_marks is None:  # (made once, even if interrupted before ``marks``)
            self.shared_marks = _marks.new_marks(self.settings.context, _marks.cells(self.capacity))
        if self.marks is None:
            self.marks = _marks.marks_array(self.shared_marks)
        self.launcher.prepare()
        self.dispatcher.prepare(self)
        # Each empty slot takes a task as an idle worker would (so it counts
        # as started, as the stdlib's executor sends the first tasks on at
        # once).
        for slot in self.slots:
            if slot.process is None and not slot.parked:
                self.launcher.reserve(slot)

    def prestart(self, every: bool) -> None:
        """Start workers now, with no task: every slot's (``every``), or the
        minimum of an elastic pool (at its creation)."""
        with self.lock:
            self.lifecycle.check_accepting()
            if every:
                for slot in self.slots:
                    if slot.index < self.size:
                        self.elastic.unpark(slot)
            if self.dispatcher.thread is None:
                self.ensure_started()
                self.start_dispatcher()
            else:
                self.launcher.refill_slots()
                self.wake()

    def wait_ready(self, timeout: Optional[float]) -> None:
        """Return once every slot's worker is ready (its initializer ran).

        Raises ``TimeoutError`` after ``timeout`` seconds, the pool's error
        if it breaks meanwhile, ``RuntimeError`` if it shuts down.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while True:
                if self.lifecycle.broken is not None:
                    self.lifecycle.check_accepting()  # raises BrokenProcessPool
                if self.lifecycle.shutdown_requested:
                    raise RuntimeError("the pool shut down before its workers were ready")
                wanted = [s for s in self.slots if s.index < self.size and not s.parked]
                if all(s.process is not None and s.ready for s in wanted):
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    ready = sum(1 for s in wanted if s.process is not None and s.ready)
                    raise TimeoutError(
                        f"{ready} of {len(wanted)} workers were ready after {timeout:g} s"
                    )
                # Woken by each READY (Launcher.on_ready); a breakage or a
                # shutdown is seen within the slice.
                self.workers_ready.wait(0.05 if left is None else min(left, 0.05))

    def start_dispatcher(self) -> None:
        """Start the first worker, fork the zygote (under fork), then start
        the dispatcher thread, which starts the other workers."""
        if self.dispatcher.thread is not None:
            return
        self.launcher.start_first()
        # Forked now, before this pool's thread exists; it forks the workers
        # from then on (see _zygote).
        self.zygotes.start()
        self.dispatcher.start(self)
        if any(slot.reserved for slot in self.slots):
            self.wake()

    def resize(self, size: int) -> None:
        """Run ``size`` workers from now on.

        Growing starts workers in the new slots; shrinking retires the
        surplus slots' workers once their current items are done.
        """
        with self.lock:
            self.lifecycle.check_accepting()
            if size > self.capacity:
                raise ValueError(
                    f"max_workers can grow to at most {self.capacity} for this pool, got {size}"
                )
            self.size = size
            if size > len(self.slots):
                added = [Slot(i) for i in range(len(self.slots), size)]
                for slot in added:
                    self.elastic.adopt(slot)
                self.slots = self.slots + added
            for slot in self.slots:
                if slot.index >= size and slot.successor is not None:
                    self.successors.let_go(slot.successor)
                if slot.index >= size and slot.process is not None and not slot.stop_sent:
                    # Told to exit after what it holds (at once if idle).
                    self.scheduler.retire(slot)
                    if slot.task_conn is not None:
                        self.transport.write(slot, b"")
            self.drop_surplus_slots()
            if self.dispatcher.thread is not None:
                self.launcher.refill_slots()
                self.wake()

    def drop_surplus_slots(self) -> None:
        """Forget trailing surplus slots whose process is gone (lock held).

        A slot reserved for a worker not yet asked for may hold items (in its
        outbox): they go back to the front of the queue, for the slots that stay.
        """
        slots = self.slots
        end = len(slots)
        while end > self.size and slots[end - 1].process is None and not slots[end - 1].requested:
            end -= 1
            dropped = slots[end]
            if dropped.reserved:
                self.launcher.unreserve(dropped)
            if dropped.assigned:
                self.scheduler.requeue_front(dropped)
            successor = dropped.successor
            if successor is not None:
                self.successors.let_go(successor)
        if end < len(slots):
            self.slots = slots[:end]

    # -- the end ------------------------------------------------------------------------

    def request_shutdown(self, cancel_futures: bool) -> None:
        """Stop accepting work; with ``cancel_futures``, cancel what is pending."""
        if self.admission is not None:
            self.admission.close()  # a submit() blocked for room raises
        with self.lock:
            self.lifecycle.request_shutdown()
            cancelled: list[WorkItem] = []
            if cancel_futures:
                cancelled = self.scheduler.take_all()
            started = self.dispatcher.thread is not None
            if started and not self.scheduler.pending:
                self.stop_idle_workers()
        for item in cancelled:
            cancel_item(item, "by shutdown(cancel_futures=True)")
        if started:
            self.wake()
        else:
            self.close_wakeup()

    def abandon(self) -> None:
        """The executor was garbage collected: shut down as ``shutdown(wait=False)`` would.

        A finalizer runs in whatever thread the collector interrupts, maybe
        one holding this pool's lock (``drain_all`` does): so that lock is
        never waited for here.  A running dispatcher is told and woken (the
        pipe's own lock is reentrant), and shuts the pool down itself.  A
        pool never started owns only its pipe, closed here if the lock is
        free (else its holder, a process-wide hook, shuts the pool down).
        """
        self.abandoned = True
        if self.dispatcher.thread is not None:
            self.wakeup.wake()
        elif self.lock.acquire(blocking=False):
            try:
                if self.dispatcher.thread is None:
                    self.lifecycle.request_shutdown()
                    if self.wakeup.close():
                        self.selector.close()
            finally:
                self.lock.release()

    def stop_idle_workers(self) -> None:
        """Shutdown of an idle pool: tell the workers to exit now (lock held).

        The dispatcher would do it once awake; the caller's thread does it
        first, and the workers' exits start that much sooner.  Any work in
        flight, or a start under way, leaves it all to the dispatcher.
        """
        slots = self.slots
        if self.successors.leaving or any(
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
        self.zygotes.finish()

    def request_kill(self, signum: int, reason: Optional[str] = None) -> None:
        """Cancel pending work and signal every worker; the pool is finished.

        ``reason`` says why, in the errors of the tasks that were running.
        """
        self.request_shutdown(cancel_futures=True)
        with self.lock:
            if self.dispatcher.thread is None:
                return
            self.lifecycle.request_kill(signum, reason)
        self.wake()

    def close_marks(self) -> None:
        """No worker starts or runs any more: a plain copy of the marks will
        do, and their mapping goes with its descriptor now, not when this
        object is collected (the dispatcher thread may outlive join())."""
        if isinstance(self.shared_marks, _marks.SharedMarks):
            with self.lock:
                self.marks = list(self.marks)
            self.shared_marks.close()

    def close_wakeup(self) -> None:
        """The dispatcher has ended (or will never start): nothing waits any more."""
        with self.lock:
            if self.wakeup.close():
                self.selector.close()

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait until every process the pool started has exited (its zygotes
        included) and its dispatcher thread has ended, or ``timeout`` passes."""
        self.dispatcher.join(timeout)

    def shutdown_at_exit(self, interrupted: bool) -> None:
        """Interpreter exit: daemon pools (and Ctrl-C) stop now, others finish.

        A pool that never started, one already closed and a forked child's
        copy are left alone.
        """
        if self.owner_pid != os.getpid() or self.dispatcher.thread is None or self.closed:
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
        self.lifecycle.forget_after_fork()
        self.wakeup.forget_after_fork()
        self.lock = threading.Lock()
