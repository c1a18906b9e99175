"""Deadlines: the times the dispatcher must wake at, and what it does then.

Six kinds, all per slot, all computed afresh from the slots on each pass
(a pool has a few slots; a heap would cost more than it saves):

* the running item's timeout: counted from when it reached the head of its
  slot's queue with the worker ready; past it the worker gets SIGTERM
  (``Supervisor.stop_worker``) and the item fails with ``TaskTimeoutError``
  once the worker is gone;
* a stopped worker's grace: past it, SIGKILL;
* an assisting caller's window plus a grace: past it the dispatcher takes
  the result pipe back (``Assists.end_assist``), or its results would never
  be read;
* a ready worker's first item not taken up: looked at ``TAKE_UP_SECONDS``
  after it became the head, and every ``TAKE_UP_SECONDS`` again while it is
  not taken up; the worker is killed if it is stopped (SIGSTOP while idle:
  what it holds would never run, nor would a shutdown that waits for it
  end).  Its items go to the next workers: none had started.  A worker
  stopped in the middle of a task is left alone while the pool runs, as a
  long task is; once the pool shuts down, one found stopped at two looks in
  a row is killed, and its task fails (a shutdown, or the interpreter's
  exit, would wait for it for ever).  The dispatcher never sleeps longer
  than ``TAKE_UP_SECONDS``: a caller may hand an item straight to an idle
  worker while it sleeps;
* a worker whose result pipe reads as closed but which is still running
  ``PIPE_EXIT_SECONDS`` later is killed: a task closed or replaced the
  worker's end of the pipe, and what it answers from then on (the running
  item's result included) can never arrive;
* a worker's start-up: one that is not ready ``START_CHECK_SECONDS`` after it
  was installed is looked at every ``START_CHECK_SECONDS``, and killed if it
  is stopped (SIGSTOP, a debugger: it would hold the task sent to it for
  ever), or if it is still not ready after ``READY_SECONDS`` while the pool
  has no initializer (it is stuck: importing the main module takes seconds,
  not minutes).  A slow initializer is never cut short.  A worker forked
  from this process while other threads ran (the first one under ``fork``;
  the zygote forks the others from a single thread) is also killed if, at
  two looks in a row, it sleeps and has used no CPU in between: it waits on
  a lock that a thread of the parent held at the fork, which nothing in the
  child will ever release (CPython gh-90622).  A killed worker's
  task had not started: it goes to the next worker, and the slot gets a new
  one.  The kill counts as a failed start (``slot.start_missed``): the next
  start is backed off as after any transient failure, and
  ``MAX_STARTUP_DEATHS`` of them in a row (with deaths of workers that
  failed by themselves before they were ready) break the pool, saying why.

Owns the slot's ``start_missed`` and ``start_cpu`` fields.
"""

from __future__ import annotations

import fcntl
import math
import signal
import sys
import termios
import weakref
from typing import TYPE_CHECKING, Optional

from duckpool import _child
from duckpool._errors import TaskTimeoutError
from duckpool._pool._assist import ASSIST_GRACE_SECONDS
from duckpool._pool._supervisor import KILL_GRACE_SECONDS, signal_process

if TYPE_CHECKING:
    from duckpool._futures import WorkItem
    from duckpool._pool._slots import Slot
    from duckpool._pool._view import Core

#: How long after its start a worker not yet ready is first looked at, and
#: how often again while it is not.
START_CHECK_SECONDS = 2.0
#: How long a worker of a pool without an initializer may take to be ready.
READY_SECONDS = 120.0
#: How long a worker may go on running once its result pipe reads as closed
#: (a worker closes it as it exits): past it, the worker is killed.
PIPE_EXIT_SECONDS = 2.0
#: How long a ready worker may leave the first item it holds not taken up
#: before it is looked at (and how often again): one stopped is killed.
TAKE_UP_SECONDS = 2.0


class Deadlines:
    """Enforces a pool's task timeouts, kill graces, assist windows, and
    the start-up and take-up watches."""

    def __init__(self, core: Core) -> None:
        self._core: Core = weakref.proxy(core)
        #: When each slot's worker may next be looked at for being stopped
        #: (``_check_taken_up``), by slot index.
        self._looks: dict[int, float] = {}
        #: Slots whose worker was found stopped mid-task at the last look
        #: since the pool shut down (``_check_running``).
        self._stopped_running: set[int] = set()
        #: Slots whose worker had read everything sent to it but not taken
        #: its first item up at the last look: its pid, that item's task id
        #: and the CPU time it had used then (``_starved``).
        self._starving: dict[int, tuple[int, int, int]] = {}

    def check(self, now: float) -> Optional[float]:
        """Act on what is due; seconds until the next deadline, at most
        ``TAKE_UP_SECONDS`` (lock held)."""
        core = self._core
        nearest: Optional[float] = None
        for slot in core.slots:
            assist = slot.assist
            if assist is not None:
                taken_back = assist.until + ASSIST_GRACE_SECONDS
                if now >= taken_back:
                    core.assists.end_assist(slot, assist)
                elif nearest is None or taken_back < nearest:
                    nearest = taken_back
            stopping = slot.stopping
            if slot.pipe_closed_at is not None and stopping is None:
                due = self._check_pipe_closed(slot, now)
                if due is None:
                    continue
                if nearest is None or due < nearest:
                    nearest = due
            if stopping is not None:
                if now >= stopping.kill_at and slot.process is not None:
                    signal_process(slot.process, signal.SIGKILL)
                    continue
                deadline = stopping.kill_at
            elif not slot.ready and slot.installed_at is not None and slot.process is not None:
                due = self._check_start(slot, now)
                if due is None:
                    continue
                deadline = due
            elif slot.assigned and slot.ready:
                deadline = slot.head_since + TAKE_UP_SECONDS
                if now >= deadline or slot.assigned[0].timeout is not None:
                    due = self._check_head(slot, now)
                    if due is None:
                        continue
                    deadline = due
            else:
                continue
            if nearest is None or deadline < nearest:
                nearest = deadline
        # Never asleep for longer: an item a caller hands straight to an idle
        # worker meanwhile (no wake-up) gets its take-up look in time.
        if nearest is None or nearest > now + TAKE_UP_SECONDS:
            nearest = now + TAKE_UP_SECONDS
        return max(0.0, nearest - now)

    def _check_pipe_closed(self, slot: Slot, now: float) -> Optional[float]:
        """Kill ``slot``'s worker if it is still there ``PIPE_EXIT_SECONDS``
        after its result pipe closed; when to look (None: not again)."""
        due = slot.pipe_closed_at + PIPE_EXIT_SECONDS  # type: ignore[operator]
        if now < due:
            return due
        process = slot.process
        if process is None or process.pid is None or slot.poisoned is not None:
            return None
        if process.is_alive() and _child.runs(process.pid):
            condemned = self._core.assists.condemn(
                slot,
                f"was killed: its result pipe closed but it went on running for "
                f"{PIPE_EXIT_SECONDS:g} s, so nothing it answered could reach the pool "
                "(a task closed or replaced a descriptor the worker owns)",
            )
            if condemned is not None:
                signal_process(condemned, signal.SIGKILL)
        return None

    def _check_head(self, slot: Slot, now: float) -> Optional[float]:
        """The head item's timeout, and whether it was taken up; when to
        look at ``slot`` next (None: not now, or its worker was killed)."""
        core = self._core
        head = slot.assigned[0]
        due = self._check_taken_up(slot, head, now)
        if due is None:
            return None
        if head.timeout is not None:
            deadline = slot.head_since + head.timeout
            if now >= deadline:
                core.supervisor.stop_worker(
                    slot,
                    head,
                    TaskTimeoutError(
                        f"task {head.label} ran longer than its timeout of "
                        f"{head.timeout:g} s; its worker (pid "
                        f"{slot.process.pid if slot.process else None}) was stopped"
                    ),
                )
                deadline = now + KILL_GRACE_SECONDS
            due = min(due, deadline)
        return None if due == math.inf else due

    def _check_taken_up(self, slot: Slot, head: WorkItem, now: float) -> Optional[float]:
        """Kill ``slot``'s ready worker if it is stopped with ``head``, its
        first item, not taken up; when to look next (inf: not while ``head``
        runs; None: the worker was killed)."""
        first_look = max(slot.head_since + TAKE_UP_SECONDS, self._looks.get(slot.index, 0.0))
        if now < first_look:
            return first_look
        marks = self._core.marks
        if marks[slot.index] == head.task_id:
            if self._core.lifecycle.shutdown_requested:
                return self._check_running(slot, head, now)
            return math.inf  # running: what happens to it is the task's business
        process = slot.process
        if process is None or process.pid is None:
            return math.inf
        self._looks[slot.index] = now + TAKE_UP_SECONDS
        # (Read again once found stopped: it may have taken the item up
        # just before it was stopped, and then it is mid-task.)
        if _child.is_stopped(process.pid) and marks[slot.index] != head.task_id:
            # Its items go back to the queue when it has exited (none started).
            signal_process(process, signal.SIGKILL)
            return None
        if self._starved(slot, process.pid, head):
            signal_process(process, signal.SIGKILL)  # (as above: none started)
            return None
        return now + TAKE_UP_SECONDS

    def _starved(self, slot: Slot, pid: int, head: WorkItem) -> bool:
        """Has ``slot``'s worker read all that was sent to it, yet left
        ``head`` not taken up, used no CPU and waited in its task pipe, at
        two looks in a row?  It then waits for bytes that will never come: a
        task read some of its task pipe, and what is left there no longer
        parses as the frames sent.  (A worker blocked anywhere else, say in
        a finalizer of the task before, is busy: see ``_marks``.)"""
        sample = _child.cpu_sample(pid)
        conn = slot.task_conn
        marks = self._core.marks
        mark = marks[slot.index]
        if (
            sample is None
            or sample[0] != b"S"
            or marks[2 * self._core.capacity + slot.index] != 1
            or slot.outbox
            or conn is None
            or _unread_bytes(conn.fileno()) != 0
            # (One that took up a later item ran this one: it is not starved.)
            or any(item.task_id == mark for item in slot.assigned)
        ):
            self._starving.pop(slot.index, None)
            return False
        seen = (pid, head.task_id, sample[1])
        if self._starving.get(slot.index) == seen:
            del self._starving[slot.index]
            return True
        self._starving[slot.index] = seen
        return False

    def _check_running(self, slot: Slot, head: WorkItem, now: float) -> Optional[float]:
        """The pool shuts down: kill ``slot``'s worker if it is found stopped
        in the middle of ``head`` at two looks in a row (one is not enough: a
        whole process group resumed by SIGCONT is not all awake at once)."""
        process = slot.process
        if process is None or process.pid is None:
            return math.inf
        self._looks[slot.index] = now + TAKE_UP_SECONDS
        if not _child.is_stopped(process.pid):
            self._stopped_running.discard(slot.index)
        elif slot.index not in self._stopped_running:
            self._stopped_running.add(slot.index)
        else:
            self._stopped_running.discard(slot.index)
            condemned = self._core.assists.condemn(
                slot,
                "was killed: it was found stopped (SIGSTOP, a debugger) in the middle of "
                f"task {head.label} while the pool shut down, and nothing would resume it",
            )
            if condemned is not None:
                signal_process(condemned, signal.SIGKILL)
            return None
        return now + TAKE_UP_SECONDS

    def _check_start(self, slot: Slot, now: float) -> Optional[float]:
        """Kill ``slot``'s starting worker if it is stopped or stuck; when
        to look at it next (None: it was killed, its exit follows)."""
        assert slot.installed_at is not None and slot.process is not None
        first_look = slot.installed_at + START_CHECK_SECONDS
        if now < first_look:
            return first_look
        pid = slot.process.pid
        if pid is not None and _child.is_stopped(pid):
            slot.start_missed = "was stopped (SIGSTOP, a debugger) before it was ready"
        elif self._core.settings.initializer is None and now - slot.installed_at >= READY_SECONDS:
            slot.start_missed = f"was not ready {READY_SECONDS:g} s after it started"
        elif slot.forked_threaded and pid is not None and self._core.settings.initializer is None:
            sample = _child.cpu_sample(pid)
            if sample is not None:
                state, used = sample
                if state == b"S" and used == slot.start_cpu:
                    slot.start_missed = (
                        "was blocked before it was ready (forked while other threads "
                        "ran here, it waits on a lock one of them held)"
                    )
                slot.start_cpu = used
        if slot.start_missed is not None:
            signal_process(slot.process, signal.SIGKILL)  # its exit resets the slot
            return None
        return now + START_CHECK_SECONDS


def _unread_bytes(fd: int) -> Optional[int]:
    """How many bytes written to pipe ``fd`` are not yet read (None: unknown)."""
    try:
        answer = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return None
    return int.from_bytes(answer, sys.byteorder)
