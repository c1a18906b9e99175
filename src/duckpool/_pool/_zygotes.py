"""The zygote and its standby: under ``fork``, the processes that fork the workers.

The pool's first worker is forked by the pool's process itself, then the
zygote (``_zygote``), before the dispatcher thread exists; every later
worker is forked by the zygote on request (``request_start``), and its
answer, the started worker, comes back on the zygote's control socket
(``on_started``).  Once start-up is over, the zygote forks a standby.

No single death stops them:

* the zygote dies: its standby takes over (same memory image, so workers
  keep the same semantics), adopts the dead zygote's workers, and forks a
  standby of its own; the workers the dead zygote forked are watched through
  their pidfds from then on (their exit codes are unknown);
* the standby dies: the zygote forks another;
* the zygote cannot fork (``FAILED_FORKS`` failures in a row: its limits
  changed under it, say, by a task through its parent's pid): it is killed,
  and its standby takes over;
* the zygote stops answering: after ``ANSWER_SECONDS`` it is killed, and
  its standby takes over; at once if it is found stopped (SIGSTOP), looked
  at once an answer is ``ANSWER_LOOK_SECONDS`` overdue;
* both die (an operator's ``kill -9`` of every process of the pool): workers
  are *spawned* from then on (``spawning``), as under the ``spawn`` start
  method: a fresh interpreter that imports the main module and the task's
  module, never a fork of this (by now multi-threaded) process.

Owns the slot's ``requested`` (asked of the zygote, answer due).  Methods
expect the pool's lock held, but the dispatcher's ``on_*`` handlers and
``await_requested_starts`` (at shutdown, where a starting worker may not
be killed; else ``forget_requests``), which take it themselves.
"""

from __future__ import annotations

import os
import time
import weakref
from multiprocessing import connection as mp_connection
from typing import TYPE_CHECKING, Any, Optional

from duckpool import _child, _orphans, _zygote, _zygote_process
from duckpool._pool._slots import WorkerExit, ZygoteTag

if TYPE_CHECKING:
    from duckpool._pool._slots import Slot
    from duckpool._pool._view import Core

#: How long after the zygote starts it is asked for its standby: a pool's
#: start-up (and a shutdown right after it) never waits on that fork.
STANDBY_DELAY_SECONDS = 0.25
#: How long after a refused standby (the zygote could not fork it) the pool
#: asks again.
STANDBY_RETRY_SECONDS = 1.0
#: How long the zygote may leave the pool's requests unanswered (no answer
#: at all meanwhile) before it is taken for hung (stuck) and killed:
#: its standby then takes over.  A fork takes milliseconds, even under load.
ANSWER_SECONDS = 10.0
#: How long the zygote's answer may be overdue before the zygote is looked
#: at (and how often again): one stopped (SIGSTOP) is killed then, not after
#: ANSWER_SECONDS.
ANSWER_LOOK_SECONDS = 1.0
#: At shutdown, how often a zygote whose answer is awaited is looked at:
#: one stopped is not waited for.
STOPPED_POLL_SECONDS = 0.05
#: Starts in a row the zygote failed (EMFILE, ENOMEM...) before its standby
#: takes over: a zygote that cannot fork is as good as dead.
FAILED_FORKS = 3


class Zygotes:
    """Keeps a pool's zygote and its standby, and asks them for workers."""

    def __init__(self, core: Core) -> None:
        self._core: Core = weakref.proxy(core)
        #: The process that forks this pool's workers, and its standby.
        self.zygote: Optional[_zygote.Zygote] = None
        self.standby: Optional[_zygote.Zygote] = None
        #: The zygote's channels, made before the first worker is forked
        #: (``prepare``): made after that fork, their pages would be
        #: copy-on-write faults on the way to the first result.
        self.zygote_channels: Optional[_zygote_process.Channels] = None
        #: Why the zygote could not be forked: workers are spawned then.
        self.zygote_error: Optional[OSError] = None
        #: No zygote nor standby left (or ever): workers are spawned from now on.
        self.spawning = False
        #: A pidfd of this process, for the zygote to watch.
        self.parent_pidfd: Optional[int] = None
        #: Zygotes that died or were replaced, to reap at the end.
        self.retired: list[_zygote.Zygote] = []
        #: When the zygote last answered, or was first asked, while requests
        #: are outstanding (None: none is); see ANSWER_SECONDS.
        self.asked_at: Optional[float] = None
        #: When the zygote may next be looked at for being stopped (monotonic).
        self.look_at = 0.0
        #: Workers the zygote reports the exits of, whose result pipes read
        #: as closed: pid -> since when (``expect_exit``).
        self.exits_due: dict[int, float] = {}
        #: The pool has shut down with no work left: the zygotes are leaving.
        self.finishing = False
        #: When to ask the zygote for a standby (monotonic; 0: not due).
        self.standby_due = 0.0
        #: Starts the zygote answered with a failure, in a row.
        self.failed_forks = 0

    def prepare(self) -> None:
        """Before the first worker is forked: what it and the zygote need."""
        if self.parent_pidfd is None:
            # With it the zygote kills the workers when this process dies,
            # and they need no watchdog thread of their own.
            self.parent_pidfd = _child.pidfd_of(os.getpid())
        if self.zygote is None and self.zygote_channels is None:
            try:
                self.zygote_channels = _zygote_process.Channels.open()
            except OSError:
                pass  # start tries again, and reports a failure

    def request_start(self, slot: Slot) -> None:
        """Ask the zygote for ``slot``'s worker; the slot is reserved until
        the answer comes (``on_started``)."""
        zygote = self.zygote
        if zygote is None or slot.requested:
            return
        try:
            zygote.request_start(slot.index)
        except OSError:
            # It is dying: its sentinel fires soon, and its standby (or a
            # spawned worker) fills the slot then.
            return
        slot.requested = True
        self._core.launcher.reserve(slot)
        if self.asked_at is None:
            self.asked_at = time.monotonic()

    def forget_requests(self) -> None:
        """Shutdown: the answers still due are not awaited (the zygote kills
        those workers at ``finish``, and one read later is killed here, see
        ``on_started``); their slots take nothing more."""
        core = self._core
        for slot in core.slots:
            if slot.requested:
                slot.requested = False
                core.launcher.unreserve(slot)
                core.scheduler.requeue_front(slot)

    def wake_in(self, now: float) -> Optional[float]:
        """Seconds until the zygote is due an action (None: none is): to be
        asked for a standby, looked at for being stopped, or taken for hung."""
        due = []
        if self.standby_due:
            due.append(self.standby_due)
        if self.asked_at is not None:
            due.append(self.asked_at + ANSWER_SECONDS)
            due.append(max(self.asked_at + ANSWER_LOOK_SECONDS, self.look_at))
        if self.exits_due:
            due.append(max(min(self.exits_due.values()) + ANSWER_LOOK_SECONDS, self.look_at))
        return max(0.0, min(due) - now) if due else None

    def expect_exit(self, process: Any, now: float) -> None:
        """``process``'s result pipe reads as closed: if the zygote reports
        its exit, that report is due (a stopped zygote never sends it: see
        ``check_answers``)."""
        zygote = self.zygote
        if zygote is not None and getattr(process, "pid", None) in zygote.children:
            self.exits_due.setdefault(process.pid, now)

    def after_pass(self, now: float) -> None:
        """The dispatcher's pass is over: a zygote without a standby asks
        for one, after a delay."""
        if self.standby is None and self.zygote is not None:
            self.want_standby(now)

    def poll(self) -> list[Slot]:
        """Without pidfds: a dead zygote handled, whatever its sentinel says;
        the slots whose workers it reported dead (dispatcher)."""
        zygote = self.zygote
        if zygote is None or not zygote.gone or zygote in self.retired:
            return []
        return self.on_exits(zygote, died=True)

    def start(self) -> None:
        """Under fork: fork the zygote, before the pool's thread exists."""
        core = self._core
        if not core.launcher.forks or self.zygote is not None or self.spawning:
            return
        # The slots waiting for a worker: the zygote forks theirs at once.
        first = [s for s in core.slots if s.reserved and s.process is None and not s.requested]
        try:
            zygote = _fork_zygote(core, first, self.zygote_channels, self.parent_pidfd)
        except OSError as exc:
            # The pool runs on with the worker it has; later workers are
            # spawned, never forked from this process once it runs threads.
            self.zygote_error = exc
            self.spawning = True
            return
        finally:
            self.zygote_channels = None  # (the zygote's, or closed)
        try:
            self.zygote = zygote
            self.watch(zygote)
            now = time.monotonic()
            self.standby_due = now + STANDBY_DELAY_SECONDS
            for slot in first:
                slot.requested = True
            if first:
                self.asked_at = now
        except BaseException:
            # Interrupted (a Ctrl-C) before the pool knew it whole: it goes.
            self.unwatch(zygote)
            self.zygote = self.asked_at = None
            for slot in first:
                slot.requested = False
            zygote.close()
            zygote.process.kill()
            raise

    def watch(self, zygote: _zygote.Zygote) -> None:
        selector = self._core.selector
        selector.register(zygote.notices_fd, ZygoteTag(zygote, "notices"))
        selector.register(zygote.sentinel, ZygoteTag(zygote, "exit"))
        selector.register(zygote.control, ZygoteTag(zygote, "started"))

    def unwatch(self, zygote: _zygote.Zygote) -> None:
        selector = self._core.selector
        for watched in (zygote.sentinel, zygote.notices_fd, zygote.control):
            selector.unregister(watched)

    def on_event(self, tag: ZygoteTag) -> list[Slot]:
        """Handle one of a zygote's descriptors being ready; return the slots
        whose workers it reported dead."""
        if tag.zygote in self.retired:
            return []  # (its death was handled earlier in the same wake-up)
        if tag.event == "started":
            self.on_started(tag.zygote)
            return []
        return self.on_exits(tag.zygote, died=tag.event == "exit")

    def await_requested_starts(self) -> None:
        """Take the zygote's answers still due, so that those workers are stopped too.

        Left unread, a worker's pipe ends would stay in the control socket,
        which the zygote and its workers hold copies of: that worker would
        never see its task pipe close, nor its zygote finish.  A zygote that
        cannot answer (stopped, hung, dead) is killed and not waited for.
        """
        core = self._core
        while self.zygote is not None and any(slot.requested for slot in core.slots):
            zygote = self.zygote
            if not _answer_comes(zygote, self.asked_at):
                # Stopped, hung or dead: what it was starting is not awaited.
                self.kill_hung(zygote)
                with core.lock:
                    self.forget_requests()
                return
            if not self.on_started(zygote):
                with core.lock:
                    for slot in core.slots:
                        slot.requested = False
                return

    def on_started(self, zygote: _zygote.Zygote) -> bool:
        """Install what ``zygote`` answered with; False if no answer can come now.

        A worker nobody wants any more (its slot was closed or dropped, the
        pool is being killed or is broken) is killed at once.  A failed start
        is retried, as a failed direct start is.
        """
        core = self._core
        try:
            started = zygote.receive_started()
        except _zygote.StandbyRefused:
            with core.lock:  # asked again later (want_standby), not at once
                self.standby_due = time.monotonic() + STANDBY_RETRY_SECONDS
            return True
        except OSError as exc:
            with core.lock:
                error = core.launcher.on_start_failure(exc, time.monotonic())
                for slot in core.slots:
                    slot.requested = False  # asked again at the retry
                core.drop_surplus_slots()  # (resized away while asked for)
                # (Counted only while a standby could take over.)
                self.failed_forks += zygote is self.zygote and self.standby is not None
                if self.failed_forks >= FAILED_FORKS and self.standby is not None:
                    self.kill_hung(zygote)  # its standby forks from now on (on_death)
            if error is not None:
                core.supervisor.starts_failed(error)
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
                    target.requested = False
                    self.failed_forks = 0
                    core.launcher.install_worker(target, process, task_w, result_r)
                    return True
                # (Resized away meanwhile, or the pool is ending.)
                target.requested = False
                core.launcher.unreserve(target)
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
                and core.lifecycle.may_start_workers()
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

    def on_exits(self, zygote: _zygote.Zygote, died: bool) -> list[Slot]:
        """Worker exits ``zygote`` reported; if it died itself, its standby takes over."""
        core = self._core
        exited_children = zygote.read_notices()
        for child in exited_children:
            self.exits_due.pop(child.pid, None)
        with core.lock:
            exited = [s for s in core.slots if s.process in exited_children]
            successors = core.successors
            successors.exits.extend(s for s in successors.spares() if s.process in exited_children)
        if died:
            exited.extend(self.on_death(zygote))
        return exited

    def on_death(self, zygote: _zygote.Zygote) -> list[Slot]:
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
            while self.on_started(zygote):
                pass
        self.unwatch(zygote)
        exited: list[Slot] = []
        with core.lock:
            orphans = zygote.orphan_children()
            for child in orphans:
                self.exits_due.pop(child.pid, None)  # (seen through pidfds from now on)
            zygote.close()
            zygote.process.is_alive()  # reaps the zygote now, if it is this process's child
            _close_dead_standbys(self.retired, reap=zygote is self.zygote)
            if zygote is not self.standby or self.zygote is None:  # (kept: _close_dead_standbys)
                zygote.process.close()  # its pidfd: one per death would pile up
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
            # Slots resized away while their starts were asked for go now,
            # their items back in the queue (their answers will never come).
            core.drop_surplus_slots()
            self.zygote = self.standby
            self.standby = None
            self.failed_forks = 0
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
        ANSWER_SECONDS (stuck), or ANSWER_LOOK_SECONDS if found stopped, or
        that is found stopped with a worker's exit report ANSWER_LOOK_SECONDS
        due: its death hands over to its standby, whose workers start instead
        (dispatcher, lock held)."""
        if self.asked_at is not None and not any(slot.requested for slot in self._core.slots):
            self.asked_at = None
        owed = list(self.exits_due.values())
        if self.asked_at is not None:
            owed.append(self.asked_at)
        zygote = self.zygote
        if zygote is None or not owed:
            return
        stuck = self.asked_at is not None and now - self.asked_at >= ANSWER_SECONDS
        if stuck or self._found_stopped(zygote, min(owed), now):
            self.asked_at = None
            self.kill_hung(zygote)  # its sentinel fires: on_zygote_death (the reports due go)

    def kill_hung(self, zygote: _zygote.Zygote) -> None:
        """Kill ``zygote``, taken for hung, and first the children it forked
        that the pool never got (their answers unread): they have no task,
        nor any way to get one, and only the zygote watched them (its
        standby and the workers the pool installed are kept)."""
        pid = zygote.process.pid
        if pid is not None:
            keep = list(zygote.children)
            if self.standby is not None and self.standby.process.pid is not None:
                keep.append(self.standby.process.pid)
            _child.kill_children(pid, keep)
        zygote.process.kill()

    def _found_stopped(self, zygote: _zygote.Zygote, owed_since: float, now: float) -> bool:
        """Is ``zygote``, owing an answer or a report since ``owed_since``
        for ``ANSWER_LOOK_SECONDS``, stopped (SIGSTOP)?  Looked at every
        ``ANSWER_LOOK_SECONDS`` at most."""
        if now - owed_since < ANSWER_LOOK_SECONDS or now < self.look_at:
            return False
        self.look_at = now + ANSWER_LOOK_SECONDS
        return _child.found_stopped(zygote.process)

    def finish(self) -> None:
        """Shutdown, no work left: the zygote exits once its workers have, the
        standby at once; neither is replaced (``on_death``)."""
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


def _close_dead_standbys(retired: list[_zygote.Zygote], reap: bool) -> None:
    """Close the pidfds ``Zygotes.on_death`` kept of standbys that died before
    their zygote; with ``reap`` (that zygote has died since), first reap those
    that became this process's children, as orphans of a subreaper (PID 1 of
    a container) do."""
    for dead in retired:
        process = dead.process
        if isinstance(process, _child.PidfdProcess) and not process.closed:
            if reap:
                _orphans.reap_if_adopted(process.sentinel)
            process.close()


def _answer_comes(zygote: _zygote.Zygote, asked_at: Optional[float]) -> bool:
    """Wait until ``zygote`` has an answer to read; False if it dies
    first, is stopped (SIGSTOP, a debugger), or answers nothing for
    ANSWER_SECONDS since it was asked (``asked_at``), as the dispatcher
    would judge it (``check_answers``)."""
    deadline = (time.monotonic() if asked_at is None else asked_at) + ANSWER_SECONDS
    while True:
        ready = mp_connection.wait([zygote.control, zygote.sentinel], STOPPED_POLL_SECONDS)
        if zygote.control in ready:
            return True
        # (Without pidfds its sentinel is a pipe its workers hold too.)
        if ready or time.monotonic() >= deadline or not zygote.process.is_alive():
            return False
        if _child.found_stopped(zygote.process):
            return False


def _fork_zygote(
    core: Core,
    first: list[Slot],
    channels: Optional[_zygote_process.Channels],
    parent_pidfd: Optional[int],
) -> _zygote.Zygote:
    """Fork ``core``'s zygote with ``channels``, the first workers of
    ``first`` its own to fork at once (``Zygote.fork``).  Its arguments are
    made first: from the call on, the channels are the zygote's, or closed."""
    inherited = core.launcher.inherited_fds()
    adopted = [s.process.pid for s in core.slots if s.process and s.process.pid]
    title = f"{core.settings.name_prefix or 'duckpool'}-zygote"
    first_slots = [slot.index for slot in first]
    return _zygote.Zygote.fork(
        core.launcher.worker_config,
        inherited_fds=inherited,
        parent_pidfd=parent_pidfd,
        adopted_pids=adopted,
        channels=channels,
        title=title,
        first_slots=first_slots,
    )
