"""The launcher: how a pool's worker processes are started, and what a failed start does.

Under ``fork``, the pool's first worker is forked by the pool's process
itself, then the zygote (``_zygote``), before the dispatcher thread exists;
every later worker is forked by the zygote on request.  Once start-up is
over, the zygote forks a standby.  Under ``spawn`` and ``forkserver`` every
worker is started directly (``_spawn``).

No single death stops the launcher:

* the zygote dies: its standby takes over (same memory image, so workers
  keep the same semantics), adopts the dead zygote's workers, and forks a
  standby of its own; the workers the dead zygote forked are watched through
  their pidfds from then on (their exit codes are unknown);
* the standby dies: the zygote forks another;
* both die (an operator's ``kill -9`` of every process of the pool): workers
  are *spawned* from then on, as under the ``spawn`` start method: a fresh
  interpreter that imports the main module and the task's module, never a
  fork of this (by now multi-threaded) process;
* a start fails for a transient reason (the fork server died mid-start, EOF
  or a broken pipe, ``EAGAIN``/``ENOMEM`` from fork, a timeout): it is
  retried with backoff; the pool breaks only if starts keep failing for
  ``START_GIVE_UP_SECONDS``, or on an error that will recur (pickling the
  initializer fails, say), with that error as the cause.

Every method expects the pool's lock held unless its docstring says
otherwise; the dispatcher calls the ``on_*`` ones, which take it themselves.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import socket
import time
import weakref
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

from duckpool import _child, _logs, _protocol, _spawn, _worker, _zygote
from duckpool._pool._slots import ResultReady, WorkerExit

if TYPE_CHECKING:
    from duckpool._core import PoolCore
    from duckpool._pool._slots import Slot, WorkerProcess

#: Workers that fail by themselves before they are ready (an exit code, or a
#: crash signal), in a row, before the pool gives up instead of respawning.
MAX_STARTUP_DEATHS = 3
#: How long starts may keep failing (transiently) before the pool breaks.
START_GIVE_UP_SECONDS = 30.0
#: The first wait before a failed start is tried again; it doubles per
#: failure in a row, up to ``_RETRY_MAX_SECONDS``.
_RETRY_FIRST_SECONDS = 0.01
_RETRY_MAX_SECONDS = 1.0
#: How long after the zygote starts it is asked for its standby: a pool's
#: start-up (and a shutdown right after it) never waits on that fork.
STANDBY_DELAY_SECONDS = 0.25
#: How long the zygote may leave the pool's requests unanswered (no answer
#: at all meanwhile) before it is taken for hung (SIGSTOP, say) and killed:
#: its standby then takes over.  A fork takes milliseconds, even under load.
ANSWER_SECONDS = 10.0
#: Without pidfds, how often the dispatcher asks whether its processes live.
EXIT_POLL_SECONDS = 0.2
#: errno values of a start that may well succeed if tried again.
_TRANSIENT_ERRNOS = frozenset(
    {errno.EAGAIN, errno.ENOMEM, errno.EINTR, errno.EPIPE, errno.ECONNRESET, errno.ETIMEDOUT}
)


class ZygoteTag(NamedTuple):
    """The tag of a zygote's descriptor in the dispatcher's waiter."""

    zygote: _zygote.Zygote
    #: "started" (its control socket: an answer), "notices" (worker exits),
    #: or "exit" (its own sentinel).
    event: str


def is_transient(error: BaseException) -> bool:
    """Might a start that failed with ``error`` succeed if tried again?"""
    if isinstance(error, (EOFError, ConnectionError, TimeoutError, socket.timeout)):
        return True
    if isinstance(error, OSError):
        return error.errno is None or error.errno in _TRANSIENT_ERRNOS
    return False


class Launcher:
    """Starts a pool's workers and keeps its zygote and standby (lock held)."""

    def __init__(self, core: PoolCore) -> None:
        # Weakly: a pool that has ended is freed at once, by reference
        # counting, and what it holds (its initargs, say) with it.
        self._core: PoolCore = weakref.proxy(core)
        settings = core.settings
        #: Workers are forked (from this process first, then by the zygote).
        self.forks = settings.context.get_start_method() == "fork"
        #: Under fork, the process that forks this pool's workers, and its standby.
        self.zygote: Optional[_zygote.Zygote] = None
        self.standby: Optional[_zygote.Zygote] = None
        #: The zygote's channels, made before the first worker is forked
        #: (``prepare``): made after that fork, their pages would be
        #: copy-on-write faults on the way to the first result.
        self.zygote_channels: Optional[_zygote.Channels] = None
        #: Why the zygote could not be forked: workers are spawned then.
        self.zygote_error: Optional[OSError] = None
        #: Under fork: the zygote and its standby are gone (or never were),
        #: so workers are spawned from now on (see the module doc).
        self.spawning = False
        #: Under fork, a pidfd of this process, for the zygote to watch.
        self.parent_pidfd: Optional[int] = None
        #: The parent's logger levels when the workers started, for them to
        #: mirror; None unless the pool forwards logs.
        self.log_levels: Optional[dict[str, int]] = None
        #: Processes in a row that failed by themselves before they were
        #: ready (see ``count_startup_death``).
        self.startup_deaths = 0
        #: How long a worker takes from its start to ready, lately (seconds).
        self.start_seconds = 0.0
        #: Transient start failures in a row: since when, and when to retry.
        self.failing_since: Optional[float] = None
        self.failures = 0
        self.retry_at = 0.0
        #: Zygotes that died or were replaced, to reap at the end.
        self.retired: list[_zygote.Zygote] = []
        #: No pidfds here: sentinels are pipes, which a process a task forked
        #: may hold open after its worker's exit, so the dispatcher also asks
        #: every EXIT_POLL_SECONDS whether its processes are alive (``poll_exits``).
        self.polls_exits = False
        #: When the zygote last answered, or was first asked, while requests
        #: are outstanding (None: none is); see ANSWER_SECONDS.
        self.asked_at: Optional[float] = None
        #: The pool has shut down with no work left: the zygotes are leaving.
        self.finishing = False
        #: When the zygote is to be asked for a standby (monotonic; 0: not
        #: due, it has one or it was asked).
        self.standby_due = 0.0

    # -- start-up ---------------------------------------------------------------

    def prepare(self) -> None:
        """Before the first worker: what it and the zygote must be forked with."""
        self.polls_exits = not _child.has_pidfds()
        if self._core.settings.forward_logs and self.log_levels is None:
            self.log_levels = _logs.level_snapshot()
        if self.forks and self.parent_pidfd is None:
            # With it the zygote kills the workers when this process dies,
            # and they need no watchdog thread of their own.
            self.parent_pidfd = _child.pidfd_of(os.getpid())
        if self.forks and self.zygote is None and self.zygote_channels is None:
            try:
                self.zygote_channels = _zygote.Channels.open()
            except OSError:
                pass  # start_zygote tries again, and reports a failure

    def start_zygote(self) -> None:
        """Under fork: fork the zygote, before the pool's thread exists."""
        if not self.forks or self.zygote is not None or self.spawning:
            return
        core = self._core
        try:
            channels, self.zygote_channels = self.zygote_channels, None
            prefix = core.settings.name_prefix or "duckpool"
            self.zygote = _zygote.Zygote.fork(
                self.worker_config,
                inherited_fds=self.inherited_fds(),
                parent_pidfd=self.parent_pidfd,
                adopted_pids=[s.process.pid for s in core.slots if s.process and s.process.pid],
                channels=channels,
                title=f"{prefix}-zygote",
            )
        except OSError as exc:
            # The pool runs on with the worker it has; later workers are
            # spawned, never forked from this process once it runs threads.
            self.zygote_error = exc
            self.spawning = True
        else:
            self.watch(self.zygote)
            self.standby_due = time.monotonic() + STANDBY_DELAY_SECONDS

    def watch(self, zygote: _zygote.Zygote) -> None:
        selector = self._core.selector
        selector.register(zygote.notices_fd, ZygoteTag(zygote, "notices"))
        selector.register(zygote.sentinel, ZygoteTag(zygote, "exit"))
        selector.register(zygote.control, ZygoteTag(zygote, "started"))

    def unwatch(self, zygote: _zygote.Zygote) -> None:
        selector = self._core.selector
        for watched in (zygote.sentinel, zygote.notices_fd, zygote.control):
            selector.unregister(watched)

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
        if forked is None:
            forked = self.forks and not self.spawning
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
            watched=forked and self.parent_pidfd is not None,
        )

    # -- starting workers ---------------------------------------------------------

    def start_worker(self, slot: Slot) -> None:
        """Fill ``slot``: with its successor if it has one, else a new process,
        started directly or asked of the zygote.

        The zygote's answer comes later (``on_zygote_started``); meanwhile the
        slot is reserved: it takes work, which waits in its outbox.
        """
        spare = self._core.successors.take(slot)
        if spare is not None:
            self.install_worker(slot, spare.process, spare.task_conn, spare.result_conn)
            slot.launched_at = spare.launched_at
            return
        zygote = self.zygote
        if zygote is not None:
            if not slot.requested:
                try:
                    zygote.request_start(slot.index)
                except OSError:
                    # It is dying: its sentinel fires soon, and its standby
                    # (or a spawned worker) fills the slot then.
                    return
                slot.requested = slot.reserved = True
                if self.asked_at is None:
                    self.asked_at = time.monotonic()
            return
        launched_at = time.monotonic()
        self.install_worker(slot, *self.launch(slot.index))
        slot.launched_at = launched_at

    def launch(self, slot_index: int) -> tuple[WorkerProcess, Any, Any]:
        """Start a worker process for ``slot_index`` from this process, not
        through the zygote.  Returns it with the parent's (non-blocking) ends
        of its task and result pipes."""
        core = self._core
        context: Any = core.settings.context
        if self.forks and self.spawning:
            # Never a fork of this process once it runs threads (gh-90622).
            context = multiprocessing.get_context("spawn")
            config = self.worker_config(slot_index, forked=False)
            parent_pidfd = None
        else:
            config = self.worker_config(slot_index)
            parent_pidfd = self.parent_pidfd
        # SIGINT stays blocked in the new process until the worker has set its
        # own handler: a Ctrl-C during start-up must not print a traceback.
        old_mask = _child.block_sigint()
        try:
            channels = self.zygote_channels
            process, task_w, result_r = _spawn.start_worker_process(
                context,
                config,
                parent_pidfd,
                also_close=() if channels is None else channels.fds(),
            )
        finally:
            _child.restore_mask(old_mask)
        # Writes never block the thread (submit, the dispatcher): what a full
        # pipe does not take waits in the slot's outbox.
        os.set_blocking(task_w.fileno(), False)
        os.set_blocking(result_r.fileno(), False)
        return process, task_w, result_r

    def install_worker(
        self,
        slot: Slot,
        process: WorkerProcess,
        task_w: Any,
        result_r: Any,
    ) -> None:
        """Make a started process ``slot``'s worker, and send it what it took meanwhile."""
        core = self._core
        os.set_blocking(task_w.fileno(), False)
        os.set_blocking(result_r.fileno(), False)
        slot.task_conn = task_w
        slot.result_conn = result_r
        slot.reader = _protocol.FrameReader(result_r.fileno())
        core.selector.register(result_r, ResultReady(slot))
        if process.sentinel is not None:
            core.selector.register(process.sentinel, WorkerExit(slot))
        slot.process = process  # the other fields were reset when the slot closed
        if slot.used:
            core.counters.restarts += 1
        slot.used = True
        slot.reserved = slot.requested = False
        if slot.outbox:  # what it took while reserved
            core.transport.flush(slot)

    def reserve(self, slot: Slot) -> None:
        """``slot`` takes work before its worker exists (it waits in the
        slot's outbox): its worker is on its way."""
        slot.reserved = True

    def unreserve(self, slot: Slot) -> None:
        """``slot``'s worker will not come (the pool is being killed)."""
        slot.reserved = False

    def on_ready(self, slot: Slot, now: float) -> None:
        """``slot``'s worker sent READY (lock held): its start is over."""
        slot.ready = True
        self.startup_deaths = 0
        if slot.launched_at is not None:
            took = now - slot.launched_at
            self.start_seconds = took if not self.start_seconds else (self.start_seconds + took) / 2
            slot.launched_at = None

    def count_startup_death(self) -> bool:
        """A process died by itself before it was ready (lock held); True if
        that is ``MAX_STARTUP_DEATHS`` in a row: the pool gives up."""
        self.startup_deaths += 1
        return self.startup_deaths >= MAX_STARTUP_DEATHS

    def may_start(self) -> bool:
        """May workers be started (the pool is neither broken nor being killed)?"""
        return self._core.lifecycle.may_start_workers()

    def may_start_now(self, now: float) -> bool:
        """``may_start``, and no failed start is being backed off from."""
        return self.may_start() and (self.failing_since is None or now >= self.retry_at)

    def refill_slots(self) -> Optional[BaseException]:
        """Start a replacement in every empty slot; return an error that breaks the pool.

        A transient failure is retried later (``wake_in``), unless starts
        have kept failing for ``START_GIVE_UP_SECONDS``.
        """
        now = time.monotonic()
        if not self.may_start_now(now):
            return None
        core = self._core
        for slot in core.slots:
            if slot.process is None and slot.index < core.size:
                try:
                    self.start_worker(slot)
                except Exception as exc:
                    return self.on_start_failure(exc, now)
        if self.failing_since is not None and all(
            slot.process is not None or slot.requested
            for slot in core.slots
            if slot.index < core.size
        ):
            self.failing_since = None
            self.failures = 0
        return None

    def on_start_failure(self, error: BaseException, now: float) -> Optional[BaseException]:
        """A start failed: schedule a retry, or return the error that breaks the pool."""
        if not is_transient(error):
            return error
        if self.failing_since is None:
            self.failing_since = now
        elif now - self.failing_since >= START_GIVE_UP_SECONDS:
            return error
        self.retry_at = now + min(_RETRY_MAX_SECONDS, _RETRY_FIRST_SECONDS * 2**self.failures)
        self.failures += 1
        return None

    def before_wait(self, now: float) -> Optional[float]:
        """The dispatcher is about to sleep (lock held): take a zygote that
        stopped answering as dead; seconds until the launcher must act
        (None: nothing is due)."""
        if self.asked_at is not None:
            self.check_answers(now)
        wait = None
        if self.failing_since is not None or self.standby_due or self.asked_at is not None:
            wait = self.wake_in(now)
        if self.polls_exits and (wait is None or wait > EXIT_POLL_SECONDS):
            wait = EXIT_POLL_SECONDS
        return wait

    def after_pass(self, now: float) -> None:
        """The dispatcher's pass is over (lock held): a zygote without a
        standby asks for one, after a delay."""
        if self.standby is None and self.zygote is not None:
            self.want_standby(now)

    def wake_in(self, now: float) -> Optional[float]:
        """Seconds until the dispatcher has launcher work to do: a failed
        start to try again, or the zygote to ask for a standby (None: none)."""
        due = [self.retry_at] if self.failing_since is not None else []
        if self.standby_due:
            due.append(self.standby_due)
        if self.asked_at is not None:
            due.append(self.asked_at + ANSWER_SECONDS)
        return max(0.0, min(due) - now) if due else None

    # -- the zygote's answers and exits (dispatcher; they take the lock) ---------

    def on_zygote_event(self, tag: ZygoteTag) -> list[Slot]:
        """Handle one of a zygote's descriptors being ready; return the slots
        whose workers it reported dead."""
        if tag.zygote in self.retired:
            return []  # (its death was handled earlier in the same wake-up)
        if tag.event == "started":
            self.on_zygote_started(tag.zygote)
            return []
        return self.on_zygote_exits(tag.zygote, died=tag.event == "exit")

    def await_requested_starts(self) -> None:
        """Take the zygote's answers still due, so that those workers are stopped too.

        Left unread, a worker's pipe ends would stay in the control socket,
        which the zygote and its workers hold copies of: that worker would
        never see its task pipe close, nor its zygote finish.
        """
        core = self._core
        while self.zygote is not None and any(slot.requested for slot in core.slots):
            if not self.on_zygote_started(self.zygote):
                with core.lock:
                    for slot in core.slots:
                        slot.requested = False
                return

    def on_zygote_started(self, zygote: _zygote.Zygote) -> bool:
        """Install what ``zygote`` answered with; False if no answer can come now.

        A worker nobody wants any more (its slot was closed or dropped, the
        pool is being killed or is broken) is killed at once.  A failed start
        is retried, as a failed direct start is.
        """
        core = self._core
        try:
            started = zygote.receive_started()
        except OSError as exc:
            with core.lock:
                error = self.on_start_failure(exc, time.monotonic())
                for slot in core.slots:
                    slot.requested = False  # asked again at the retry
            if error is not None:
                core.supervisor.mark_broken(f"could not start a worker process: {error!r}", error)
            return False
        if started is None:  # its sentinel says how it died
            core.selector.unregister(zygote.control)
            return False
        if isinstance(started, _zygote.Zygote):
            self.on_standby(zygote, started)
            return True
        index, process, task_w, result_r = started
        with core.lock:
            self.asked_at = time.monotonic()  # it answers: not hung
            target = core.slots[index] if index < len(core.slots) else None
            if target is not None and target.requested:
                lifecycle = core.lifecycle
                if (
                    index < core.size
                    and lifecycle.broken is None
                    and lifecycle.kill_requested is None
                ):
                    self.install_worker(target, process, task_w, result_r)
                    return True
                # (Resized away meanwhile, or the pool is ending.)
                target.requested = target.reserved = False
                core.scheduler.requeue_front(target)
                core.drop_surplus_slots()
        process.kill()
        process.close()  # its exit notice is ignored
        task_w.close()
        result_r.close()
        return True

    def on_standby(self, zygote: _zygote.Zygote, standby: _zygote.Zygote) -> None:
        """``zygote`` forked a standby: keep it, unless it is not wanted now."""
        core = self._core
        with core.lock:
            wanted = (
                zygote is self.zygote
                and self.standby is None
                and not core.lifecycle.shutdown_requested
                and self.may_start()
            )
            if wanted:
                self.standby = standby
                self.watch(standby)
                return
        standby.close()
        self.retired.append(standby)

    def want_standby(self, now: float) -> None:
        """Ask the zygote for a standby if it has none, once ``standby_due``
        has passed and no start is due (a standby's fork never delays a
        worker's, nor the pool's start-up)."""
        zygote = self.zygote
        core = self._core
        if (
            zygote is None
            or self.standby is not None
            or zygote.standby_requested
            or self.parent_pidfd is None  # a standby is watched through pidfds
            or core.lifecycle.shutdown_requested
            or self.finishing
        ):
            self.standby_due = 0.0
            return
        if not self.standby_due:
            self.standby_due = now  # (a standby died, or was refused)
        if now < self.standby_due:
            return  # the dispatcher wakes for it (wake_in)
        self.standby_due = 0.0
        if any(slot.requested for slot in core.slots):
            return  # asked on the loop after the answers come in
        try:
            zygote.request_standby()
        except OSError:
            pass  # dying: its exit is handled when its sentinel fires

    def on_zygote_exits(self, zygote: _zygote.Zygote, died: bool) -> list[Slot]:
        """Worker exits ``zygote`` reported; if it died itself, its standby takes over."""
        core = self._core
        exited_children = zygote.read_notices()
        with core.lock:
            exited = [s for s in core.slots if s.process in exited_children]
            successors = core.successors
            successors.exits.extend(
                s for s in successors.spares() if s.process in exited_children
            )
        if died:
            exited.extend(self.on_zygote_death(zygote))
        return exited

    def on_zygote_death(self, zygote: _zygote.Zygote) -> list[Slot]:
        """``zygote`` died: promote its standby (or spawn workers from now on);
        return the slots whose workers were found dead meanwhile."""
        core = self._core
        if zygote in self.retired:
            return []  # (seen twice: polled, then its sentinel)
        # Answers it sent before it died are still in the socket (its
        # workers hold copies of the other end: no EOF comes, only EAGAIN).
        try:
            zygote.control.setblocking(False)
        except OSError:
            pass
        else:
            while self.on_zygote_started(zygote):
                pass
        self.unwatch(zygote)
        exited: list[Slot] = []
        with core.lock:
            orphans = zygote.orphan_children()
            zygote.close()
            zygote.process.is_alive()  # reaps the zygote now, if it is this process's child
            self.retired.append(zygote)
            if zygote is self.standby:
                self.standby = None  # the zygote forks another (want_standby)
                return []
            if zygote is not self.zygote:
                return []
            if self.finishing:
                # It left as told: nothing to take over (a start after this,
                # which the pool never asks for, would be spawned).
                self.zygote = None
                self.spawning = True
                return []
            for slot in core.slots:
                slot.requested = False  # those answers will never come
                process = slot.process
                if process in orphans:
                    if not process.is_alive():
                        exited.append(slot)
                    elif process.sentinel is not None:  # else polled (poll_exits)
                        core.selector.register(process.sentinel, WorkerExit(slot))
            for spare in core.successors.spares():
                if spare.process in orphans:
                    core.successors.exits.append(spare)
            self.zygote = self.standby
            self.standby = None
            if self.zygote is None:
                self.spawning = True
            else:
                try:
                    self.zygote.adopt(orphan.pid for orphan in orphans if orphan.is_alive())
                except OSError:
                    pass  # it died too: its own sentinel says so
        core.wake()
        return exited

    def helpers(self) -> list[tuple[str, int]]:
        """The live helper processes: ``(role, pid)``."""
        found = []
        for role, zygote in (("zygote", self.zygote), ("zygote-standby", self.standby)):
            if zygote is not None and zygote.process.pid is not None and not zygote.gone:
                found.append((role, int(zygote.process.pid)))
        return found

    def check_answers(self, now: float) -> None:
        """Kill a zygote that has left the pool's requests unanswered for
        ANSWER_SECONDS (stopped, or stuck): its death hands over to its
        standby, whose workers start instead (dispatcher, lock held)."""
        if self.asked_at is None:
            return
        if not any(slot.requested for slot in self._core.slots):
            self.asked_at = None
        elif now - self.asked_at >= ANSWER_SECONDS and self.zygote is not None:
            self.asked_at = None
            self.zygote.process.kill()  # its sentinel fires: on_zygote_death

    def poll_exits(self) -> list[Slot]:
        """Without pidfds: the slots whose workers have exited, and a dead
        zygote handled, whatever their sentinels say (dispatcher)."""
        core = self._core
        # (A worker its live zygote forked reads as alive until the zygote's
        # notice: its exit comes from there.)
        exited = [
            slot for slot in core.slots if slot.process is not None and not slot.process.is_alive()
        ]
        zygote = self.zygote
        if zygote is not None and not zygote.gone:
            return exited
        if zygote is not None and zygote not in self.retired:
            exited.extend(self.on_zygote_exits(zygote, died=True))
        return exited

    # -- the end ----------------------------------------------------------------

    def finish(self) -> None:
        """Shutdown, no work left: the zygote exits once its workers have, the
        standby at once; neither is replaced (``on_zygote_death``)."""
        self.finishing = True
        for zygote in (self.standby, self.zygote):
            if zygote is not None:
                zygote.finish()

    def close(self) -> None:
        """Close the zygotes' channels and this process's pidfd (dispatcher, at its end)."""
        for zygote in (self.zygote, self.standby):
            if zygote is not None:
                zygote.close()
        if self.parent_pidfd is not None:
            os.close(self.parent_pidfd)
            self.parent_pidfd = None

    def reap(self, timeout: float) -> None:
        """Wait for every zygote to exit (killing those that outstay ``timeout``)."""
        for zygote in (self.standby, self.zygote, *self.retired):
            if zygote is not None:
                zygote.reap(timeout)
        self.retired.clear()
