"""The launcher: how a pool's worker processes are started, and what a failed start does.

Under ``spawn`` and ``forkserver`` every worker is started directly
(``_spawn``); under ``fork`` the first one is, and later ones are asked of
the zygote (``_zygotes``), or spawned once no zygote is left.  A slot whose
worker is on its way is *reserved*: it takes work, which waits in its
outbox until the worker is installed.

A start that fails for a transient reason (the fork server died mid-start,
EOF or a broken pipe, ``EAGAIN``/``ENOMEM`` from fork, a timeout) is retried
with backoff; the pool breaks only if starts keep failing for
``START_GIVE_UP_SECONDS``, on an error that will recur (pickling the
initializer fails, say), with that error as the cause, or when
``MAX_STARTUP_DEATHS`` processes in a row die by themselves before they are
ready.

Owns the slot's process fields (``process``, its pipes and reader, ``used``,
``reserved``, ``ready``, ``launched_at``, ``installed_at``,
``forked_threaded``).  Every method expects the pool's lock held.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import socket
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

from duckpool import _child, _logs, _marks, _protocol, _spawn, _worker
from duckpool._pool._slots import ResultReady, WorkerExit

if TYPE_CHECKING:
    from duckpool._pool._slots import Slot, WorkerProcess
    from duckpool._pool._view import Core

#: Workers that fail by themselves before they are ready (an exit code, or a
#: crash signal), in a row, before the pool gives up instead of respawning.
MAX_STARTUP_DEATHS = 3
#: Processes in a row that died before they were ready, killed from outside
#: or not, after which the pool gives up (see ``Launcher.on_unready_death``).
MAX_KILLED_STARTS = 10
#: A death before READY this long after the last one starts a new run of them.
UNREADY_GAP_SECONDS = 10.0
#: How long starts may keep failing (transiently) before the pool breaks.
START_GIVE_UP_SECONDS = 30.0
#: The first wait before a failed start is tried again; it doubles per
#: failure in a row, up to ``_RETRY_MAX_SECONDS``.
_RETRY_FIRST_SECONDS = 0.01
_RETRY_MAX_SECONDS = 1.0
#: A failed start this long after the last one begins a new streak.
_STREAK_GAP_SECONDS = 3 * _RETRY_MAX_SECONDS
#: Without pidfds, how often the dispatcher asks whether its processes live.
EXIT_POLL_SECONDS = 0.2
#: errno values of a start that may well succeed if tried again (EMFILE and
#: ENFILE too: a burst of descriptors used elsewhere in the program passes).
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.ENOMEM,
        errno.EINTR,
        errno.EPIPE,
        errno.ECONNRESET,
        errno.ETIMEDOUT,
        errno.EMFILE,
        errno.ENFILE,
    }
)


def is_transient(error: BaseException) -> bool:
    """Might a start that failed with ``error`` succeed if tried again?"""
    if isinstance(error, (EOFError, ConnectionError, TimeoutError, socket.timeout)):
        return True
    if isinstance(error, OSError):
        return error.errno is None or error.errno in _TRANSIENT_ERRNOS
    return False


def _discard(process: Any, *ends: Any) -> None:
    """Kill a worker just started that the pool will not install, and close
    the pool's ``ends`` of its pipes."""
    _kill(process)
    for thing in (process, *ends):
        try:
            thing.close()  # (a process is reaped later if it has not exited yet)
        except Exception:  # (a multiprocessing.Process refuses close until it has exited)
            pass


def _kill(process: Any) -> None:
    try:
        process.kill()
    except Exception:  # (gone, or closed already)
        pass


class Launcher:
    """Starts a pool's workers (lock held)."""

    def __init__(self, core: Core) -> None:
        # Weakly: a pool that has ended is freed at once, by reference
        # counting, and what it holds (its initargs, say) with it.
        self._core: Core = weakref.proxy(core)
        settings = core.settings
        #: Workers are forked (from this process first, then by the zygote).
        self.forks = settings.context.get_start_method() == "fork"
        #: The parent's logger levels when the workers started, for them to
        #: mirror; None unless the pool forwards logs.
        self.log_levels: Optional[dict[str, int]] = None
        #: Processes in a row that failed by themselves before they were
        #: ready (see ``count_startup_death``).
        self.startup_deaths = 0
        #: Processes in a row that died before they were ready, unbidden,
        #: whatever killed them (see ``on_unready_death``).
        self.unready_deaths = 0
        #: When the first of them died, and the last.
        self.unready_since: Optional[float] = None
        self.unready_last = 0.0
        #: How long a worker takes from its start to ready, lately (seconds).
        self.start_seconds = 0.0
        #: Transient start failures in a row: since when, how many, the last.
        self.failing_since: Optional[float] = None
        self.failures = 0
        self.last_failure = 0.0
        #: When starts may be tried again after a failed one (None: now).
        self.retry_at: Optional[float] = None
        #: No pidfds here: sentinels are pipes, which a process a task forked
        #: may hold open after its worker's exit, so the dispatcher also asks
        #: every EXIT_POLL_SECONDS whether its processes are alive (``poll_exits``).
        self.polls_exits = False

    # -- start-up ---------------------------------------------------------------

    def prepare(self) -> None:
        """Before the first worker: what it and the zygote must be forked with."""
        self.polls_exits = not _child.has_pidfds()
        if self._core.settings.forward_logs and self.log_levels is None:
            self.log_levels = _logs.level_snapshot()
        if self.forks:
            self._core.zygotes.prepare()

    def inherited_fds(self) -> list[int]:
        """This pool's ends of its workers' pipes: a zygote forked now closes its copies."""
        fds = []
        for slot in self._core.slots:
            for conn in (slot.task_conn, slot.result_conn):
                if conn is not None:
                    fds.append(conn.fileno())
        return fds

    def worker_config(self, slot_index: int, forked: Optional[bool] = None) -> _worker.WorkerConfig:
        """What the worker in ``slot_index`` is started with."""
        core = self._core
        settings = core.settings
        name = f"{settings.name_prefix or 'duckpool-worker'}-{slot_index}"
        zygotes = core.zygotes
        if forked is None:
            forked = self.forks and not zygotes.spawning
        return _worker.WorkerConfig(
            slot=slot_index,
            max_workers=core.capacity,  # the stride of the marks array
            name=name,
            title=name if settings.name_prefix else None,
            parent_pid=core.owner_pid,
            initializer=settings.initializer,
            initargs=settings.initargs,
            marks=core.shared_marks,
            max_memory=settings.max_memory_per_child,
            serializer=settings.serializer,
            log_levels=self.log_levels,
            pool_id=settings.pool_id,
            forked=forked,
            # Workers a zygote forks are killed by it when this process dies.
            watched=forked and zygotes.parent_pidfd is not None,
        )

    # -- starting workers ---------------------------------------------------------

    def start_worker(self, slot: Slot) -> None:
        """Fill ``slot``: with its successor if it has one, else a new process,
        started directly or asked of the zygote.

        The zygote's answer comes later (``Zygotes.on_started``); meanwhile
        the slot is reserved: it takes work, which waits in its outbox.
        """
        core = self._core
        spare = core.successors.take(slot)
        if spare is not None:
            self.install_worker(slot, spare.process, spare.task_conn, spare.result_conn)
            slot.launched_at = spare.launched_at
            return
        if core.zygotes.zygote is not None:
            core.zygotes.request_start(slot)
            return
        launched_at = time.monotonic()
        # (A fork of this process while other threads run may inherit a lock
        # one of them holds, and block on it for ever: the start-up watch
        # looks for that, see ``Deadlines``.)
        threaded = self.forks and not core.zygotes.spawning and _child.threads_here() > 1
        # What the slot took while reserved goes into the new pipe before
        # the start (see _spawn._write_ahead), so the worker may take it up
        # before install_worker runs (which sends the rest): its marks are
        # cleared first.
        self.clear_marks(slot)
        sent = list(slot.outbox)
        started: list[Any] = []  # (the process, as soon as it exists)
        launched: tuple[Any, ...] = ()
        try:
            launched = self.launch(slot.index, ahead=slot.outbox, started=started)
            self.install_worker(slot, *launched, marks_cleared=True)
        except BaseException:
            if slot.process is None:
                # Interrupted (a Ctrl-C) before the worker was the slot's: it
                # goes, and what was written ahead to it goes to the next.
                for process in started:
                    self._forget(process, *launched[1:])
                slot.outbox.clear()
                slot.outbox.extend(sent)
            raise
        slot.launched_at = launched_at
        slot.forked_threaded = threaded

    def start_first(self) -> None:
        """Start the pool's first worker: the one the first task went to,
        forked from this process with that task in its pipe (see
        ``_spawn._write_ahead``) and, under fork, straight before the zygote:
        no thread of the pool exists yet, and the two share what this
        process writes next.

        A start that fails for a transient reason (the fork server died
        mid-start, say) is retried by the dispatcher, as any other: the
        slots stay reserved, with what the caller queued.  Any other failure
        (or an interruption) leaves nothing queued: ``submit`` raises."""
        core = self._core
        waiting = [s for s in core.slots if s.reserved and s.process is None]
        first = next((s for s in waiting if s.assigned), waiting[0] if waiting else None)
        if first is None:
            return
        try:
            self.start_worker(first)
        except Exception as exc:
            if first.process is None and self.on_start_failure(exc, time.monotonic()) is None:
                return  # (retried at ``retry_at``: the dispatcher starts next)
            self._give_back(waiting)
            raise
        except BaseException:
            self._give_back(waiting)
            raise

    def _give_back(self, waiting: list[Slot]) -> None:
        """The first start failed for good: what the slots took goes back, to
        be withdrawn by ``submit``, and they take no more work."""
        core = self._core
        for slot in waiting:
            process = slot.process
            if process is not None:
                # Interrupted once it was installed: it holds the task the
                # caller is told was not queued, so it goes too.
                _kill(process)
                core.supervisor.close_slot(slot)
                slot.used = False  # (its next worker is no restart)
            core.scheduler.take_back(slot)
            self.unreserve(slot)

    def launch(
        self,
        slot_index: int,
        ahead: Optional[deque[memoryview]] = None,
        started: Optional[list[Any]] = None,
    ) -> tuple[WorkerProcess, Any, Any]:
        """Start a worker process for ``slot_index`` from this process, not
        through the zygote.  Returns it with the parent's (non-blocking) ends
        of its task and result pipes; what of ``ahead`` (frames for it) its
        task pipe took before the start is taken off ``ahead``.  The process
        goes into ``started`` as soon as it exists."""
        core = self._core
        zygotes = core.zygotes
        context: Any = core.settings.context
        if self.forks and zygotes.spawning:
            # Never a fork of this process once it runs threads (gh-90622).
            context = multiprocessing.get_context("spawn")
            config = self.worker_config(slot_index, forked=False)
            parent_pidfd = None
        else:
            config = self.worker_config(slot_index)
            parent_pidfd = zygotes.parent_pidfd
        # SIGINT stays blocked in the new process until the worker has set its
        # own handler: a Ctrl-C during start-up must not print a traceback.
        old_mask: Any = _child.block_sigint()
        if started is None:
            started = []
        ends: tuple[Any, ...] = ()
        try:
            channels = zygotes.zygote_channels
            process, task_w, result_r = _spawn.start_worker_process(
                context,
                config,
                parent_pidfd,
                also_close=() if channels is None else channels.fds(),
                ahead=ahead,
                started=started,
            )
            ends = (task_w, result_r)
            # (A Ctrl-C held back during the start strikes here.)
            _child.restore_mask(old_mask)
            old_mask = None
            # Writes never block the thread (submit, the dispatcher): what a
            # full pipe does not take waits in the slot's outbox.
            os.set_blocking(task_w.fileno(), False)
            os.set_blocking(result_r.fileno(), False)
        except BaseException:
            if old_mask is not None:
                _child.restore_mask(old_mask)
            # A worker started all the same is not this pool's: it goes, with
            # what was written ahead to it (the caller sees the error, as if
            # it never started).
            for orphan in started:
                _discard(orphan, *ends)
            raise
        return process, task_w, result_r

    def install_worker(
        self,
        slot: Slot,
        process: WorkerProcess,
        task_w: Any,
        result_r: Any,
        marks_cleared: bool = False,
    ) -> None:
        """Make a started process ``slot``'s worker, and send it what it took
        meanwhile (``marks_cleared``: its marks were cleared before it started)."""
        core = self._core
        os.set_blocking(task_w.fileno(), False)
        os.set_blocking(result_r.fileno(), False)
        reader = _protocol.FrameReader(result_r.fileno(), judged=True)
        core.selector.register(result_r, ResultReady(slot))
        if process.sentinel is not None:
            core.selector.register(process.sentinel, WorkerExit(slot))
        # Installed at once (no call between): until then, an interrupted
        # start forgets what it registered (``_forget``).
        slot.task_conn = task_w
        slot.result_conn = result_r
        slot.reader = reader
        slot.process = process  # the other fields were reset when the slot closed
        slot.installed_at = time.monotonic()
        if not marks_cleared:
            self.clear_marks(slot)
        self.start_succeeded()
        if slot.used:
            core.counters.restarts += 1
        slot.used = True
        slot.reserved = False
        if process.pid is not None:
            for item in slot.assigned:  # (taken while reserved: their worker is known now)
                if item.trace is not None:
                    item.trace.on_worker(process.pid)
        if slot.outbox:  # what it took while reserved
            core.transport.flush(slot)

    def _forget(self, process: Any, *ends: Any) -> None:
        """A started worker no slot will have: unwatch it and ``_discard`` it."""
        selector = self._core.selector
        for watched in (*ends[1:], getattr(process, "sentinel", None)):
            if watched is not None:
                selector.unregister(watched)
        _discard(process, *ends)

    def clear_marks(self, slot: Slot) -> None:
        """The last worker's marks are not the next one's: a task it had
        taken up may come back (a retry), and must not read as taken up
        already.  Cleared before the next worker can take anything up; a
        skip mark set for an item the slot holds (cancelled while it waited
        for this worker) stays."""
        marks = self._core.marks
        capacity = self._core.capacity
        marks[slot.index] = marks[2 * capacity + slot.index] = 0
        _marks.keep_skips(marks, capacity, slot.index, {item.task_id for item in slot.assigned})

    def reserve(self, slot: Slot) -> None:
        """``slot`` takes work before its worker exists (it waits in the
        slot's outbox): its worker is on its way."""
        slot.reserved = True

    def on_unparked(self, slot: Slot) -> None:
        """``slot`` was parked (an elastic pool's idle worker left): the
        worker it gets now is no restart, and it takes work meanwhile."""
        slot.used = False
        self.reserve(slot)

    def unreserve(self, slot: Slot) -> None:
        """``slot``'s worker will not come (the pool is being killed)."""
        slot.reserved = False

    def on_ready(self, slot: Slot, now: float) -> None:
        """``slot``'s worker sent READY (lock held): its start is over."""
        slot.ready = True
        slot.installed_at = None
        self.startup_deaths = self.unready_deaths = 0
        self.unready_since = None
        self._core.workers_ready.notify_all()
        if slot.launched_at is not None:
            took = now - slot.launched_at
            self.start_seconds = took if not self.start_seconds else (self.start_seconds + took) / 2
            slot.launched_at = None

    def count_startup_death(self) -> bool:
        """A process died by itself before it was ready (lock held); True if
        that is ``MAX_STARTUP_DEATHS`` in a row: the pool gives up."""
        self.startup_deaths += 1
        return self.startup_deaths >= MAX_STARTUP_DEATHS

    def on_unready_death(self, by_itself: bool, missed: Optional[str], now: float) -> int:
        """A worker the pool wanted died before it was ready, unbidden (lock
        held): ``by_itself`` (an exit, an initializer that ended it, a
        crash), or missing its start-up deadline (``missed``), or killed
        from outside (SIGKILL, SIGTERM: the OOM killer, an operator).

        Returns how many died in a row once the pool gives up, else 0: after
        ``MAX_STARTUP_DEATHS`` failures of their own, or once at least
        ``MAX_KILLED_STARTS`` of any kind have gone on for
        ``START_GIVE_UP_SECONDS`` with no worker ready meanwhile (so a storm
        of kills is ridden out, and an initializer that the OOM killer ends
        each time breaks the pool rather than make it start processes for
        ever).  Each start after an outside kill is backed off.
        """
        if self.unready_since is None or now - self.unready_last > UNREADY_GAP_SECONDS:
            # A new run of deaths (no start wanted since the last, say).
            self.unready_since = now
            self.unready_deaths = 0
        self.unready_deaths += 1
        self.unready_last = now
        if (by_itself or missed is not None) and self.count_startup_death():
            return MAX_STARTUP_DEATHS
        if (
            self.unready_deaths >= MAX_KILLED_STARTS
            and now - self.unready_since >= START_GIVE_UP_SECONDS
        ):
            return self.unready_deaths
        if not by_itself and missed is None:
            backoff = min(_RETRY_MAX_SECONDS, _RETRY_FIRST_SECONDS * 2**self.unready_deaths)
            self.retry_at = max(self.retry_at or now, now + backoff)
        return 0

    def may_start(self) -> bool:
        """May workers be started (the pool is neither broken nor being killed)?"""
        return self._core.lifecycle.may_start_workers()

    def may_start_now(self, now: float) -> bool:
        """``may_start``, and no failed start is being backed off from."""
        return self.may_start() and (self.retry_at is None or now >= self.retry_at)

    def refill_slots(self) -> Optional[BaseException]:
        """Start a replacement in every empty slot; return an error that breaks the pool.

        A transient failure is retried later (``before_wait``), unless starts
        have kept failing for ``START_GIVE_UP_SECONDS``.
        """
        now = time.monotonic()
        if not self.may_start_now(now):
            return None
        core = self._core
        for slot in core.slots:
            if slot.process is None and slot.index < core.size and not slot.parked:
                try:
                    self.start_worker(slot)
                except Exception as exc:
                    return self.on_start_failure(exc, now)
        return None

    def start_succeeded(self) -> None:
        """A start succeeded: failed ones in a row are over (the backoff too)."""
        self.failing_since = None
        self.failures = 0

    def on_start_failure(self, error: BaseException, now: float) -> Optional[BaseException]:
        """A start failed: schedule a retry, or return the error that breaks the pool.

        Failures in a row, each within ``_STREAK_GAP_SECONDS`` of the last
        (a retry backs off at most ``_RETRY_MAX_SECONDS``), make one streak,
        whatever wanted each start (an empty slot, a successor that a slot
        wants now and then): the backoff doubles along it, and it breaks the
        pool once it has lasted ``START_GIVE_UP_SECONDS``.
        """
        if not is_transient(error):
            return error
        if self.failing_since is None or now - self.last_failure > _STREAK_GAP_SECONDS:
            self.failing_since = now
            self.failures = 0
        elif now - self.failing_since >= START_GIVE_UP_SECONDS:
            return error
        self.last_failure = now
        self.retry_at = now + min(_RETRY_MAX_SECONDS, _RETRY_FIRST_SECONDS * 2**self.failures)
        self.failures += 1
        return None

    def before_wait(self, now: float) -> Optional[float]:
        """The dispatcher is about to sleep (lock held): take a zygote that
        stopped answering as dead; seconds until a start, the zygotes or an
        exit poll need the dispatcher (None: nothing is due)."""
        zygotes = self._core.zygotes
        if zygotes.asked_at is not None or zygotes.exits_due:
            zygotes.check_answers(now)
        wait = None
        if self.retry_at is not None:
            wait = self.retry_at - now
            if wait <= 0:  # due: this pass retries, if a start is still wanted
                self.retry_at = None
                wait = 0.0
        if zygotes.standby_due or zygotes.asked_at is not None or zygotes.exits_due:
            due = zygotes.wake_in(now)
            if due is not None and (wait is None or due < wait):
                wait = due
        if self.polls_exits and (wait is None or wait > EXIT_POLL_SECONDS):
            wait = EXIT_POLL_SECONDS
        return wait

    def poll_exits_from_now(self) -> None:
        """A worker's sentinel stopped speaking for it (its fork server
        died): ask whether the processes live on every pass from now on."""
        self.polls_exits = True

    # -- the zygote's answers and exits (dispatcher; they take the lock) ---------

    def poll_exits(self) -> list[Slot]:
        """Without pidfds: the slots whose workers have exited, and a dead
        zygote handled, whatever their sentinels say (dispatcher)."""
        core = self._core
        # (A worker its live zygote forked reads as alive until the zygote's
        # notice: its exit comes from there.)
        exited = [
            slot for slot in core.slots if slot.process is not None and not slot.process.is_alive()
        ]
        return exited + core.zygotes.poll()

    # -- the end ----------------------------------------------------------------
