"""Successors: with ``max_tasks_per_child``, a slot's next worker starts early.

Once a slot's ready worker has been sent half its quota (or sooner, if at
its pace it would reach the quota before a new worker could start), the
dispatcher starts the slot's next worker ahead of time (``Slot.successor``,
a ``Spare``): it starts up while the worker works, and is nothing but a
watched sentinel (its pipes unread) until the slot is free; the launcher
then installs it in the slot.  Not under fork: there the zygote forks a
replacement in a millisecond or two, and a successor would only hold memory.
A successor that dies first is replaced later (its initializer failing
breaks the pool); one no longer wanted (shutdown, kill, resize) is let go:
told to exit and kept in ``leaving`` until reaped.

Owns ``leaving``, ``exits`` and the slot's ``successor``.  Methods expect
the pool's lock held, but ``on_exit``, which the dispatcher calls without it.
"""

from __future__ import annotations

import signal
import time
import weakref
from typing import TYPE_CHECKING, NamedTuple, Optional

from duckpool import _child, _protocol, _zygote
from duckpool._errors import describe_exit
from duckpool._pool import _transport
from duckpool._pool._results import LOG_RECORD_ITEM
from duckpool._pool._slots import Spare
from duckpool._pool._supervisor import (
    KILL_GRACE_SECONDS,
    self_inflicted,
    sentinel_retired,
    signal_process,
)

if TYPE_CHECKING:
    from duckpool._pool._slots import Resolution, Slot
    from duckpool._pool._view import Core


class SpareExit(NamedTuple):
    """The tag of a spare process's sentinel."""

    spare: Spare


class Successors:
    """Starts each slot's next worker before the current one must leave."""

    def __init__(self, core: Core) -> None:
        self._core: Core = weakref.proxy(core)
        #: Spare processes let go unused (a successor no longer wanted), until
        #: they have exited and been reaped.
        self.leaving: list[Spare] = []
        #: Spare processes whose exit the dispatcher has seen, to settle.
        self.exits: list[Spare] = []

    def on_exits(self) -> None:
        """Settle the spare processes whose exit the dispatcher saw (no lock held)."""
        while self.exits:
            self.on_exit(self.exits.pop())

    def wanted(self, slot: Slot) -> bool:
        """Should a successor start for ``slot`` now? (lock held)

        With ``max_tasks_per_child``, once a ready worker has been sent half
        its quota, or sooner if at the pace of its last task it would reach
        its quota in less than twice the time a worker takes to start: its
        replacement then starts while it works, instead of after it has
        exited, and takes the slot as soon as it leaves.  Not under fork:
        there the zygote forks a replacement in a millisecond or two, and a
        successor would only hold memory.
        """
        core = self._core
        limit = core.settings.max_tasks_per_child
        if (
            limit is None
            or core.launcher.forks
            or slot.successor is not None
            or slot.process is None
            or not slot.ready
            or slot.stopping is not None
            or slot.poisoned is not None
            or slot.index >= core.size
            or slot.parked  # leaving idle: no worker is wanted there
        ):
            return False
        left = limit - slot.tasks_sent
        start_seconds = core.launcher.start_seconds
        return 2 * slot.tasks_sent >= limit or left * slot.last_service < 2 * start_seconds

    def start_due(self) -> Optional[BaseException]:
        """Start the successors that are due (lock held); return a start error."""
        core = self._core
        launcher = core.launcher
        if core.settings.max_tasks_per_child is None or launcher.forks:
            return None  # (no slot wants one: see wanted; not worth a pass over them)
        now = time.monotonic()
        if core.lifecycle.shutdown_requested or not launcher.may_start_now(now):
            return None
        for slot in core.slots:
            if self.wanted(slot):
                try:
                    process, task_w, result_r = launcher.launch(slot.index)
                except Exception as exc:
                    return launcher.on_start_failure(exc, now)
                launcher.start_succeeded()
                spare = slot.successor = Spare(slot, process, task_w, result_r)
                if process.sentinel is not None:
                    core.selector.register(process.sentinel, SpareExit(spare))
        return None

    def unwatch(self, spare: Spare) -> None:
        core = self._core
        sentinel = spare.process.sentinel
        if sentinel is not None:
            core.selector.unregister(sentinel)

    def take(self, slot: Slot) -> Optional[Spare]:
        """``slot``'s successor, now to fill the slot (unwatched), if it has one."""
        spare = slot.successor
        if spare is not None:
            slot.successor = None
            self.unwatch(spare)
        return spare

    def let_go(self, spare: Spare) -> None:
        """Stop a successor that will not be used (lock held); reaped on its exit."""
        if spare.slot.successor is spare:
            spare.slot.successor = None
        if spare in self.leaving:
            return
        # Read once the successor is ready (EAGAIN: the pipe is empty by then).
        _transport.stop(spare.task_conn, spare.process.pid)
        self.leaving.append(spare)

    def spares(self) -> list[Spare]:
        """Every spare process: successors and those leaving (lock held)."""
        core = self._core
        successors = [slot.successor for slot in core.slots if slot.successor is not None]
        return successors + self.leaving

    def wake_for(self, slot: Slot) -> None:
        """Have the dispatcher start ``slot``'s successor if one is due now
        (lock held): it may be asleep while callers read results themselves."""
        core = self._core
        if self.wanted(slot) and not core.dispatcher.is_current():
            core.wake()

    def on_exit(self, spare: Spare) -> None:
        """A spare process exited: reap it; a successor that died unused is
        replaced later (``start_due``), unless it died of its initializer."""
        core = self._core
        # Its fork server died, not it: a spare runs no task, and the pool
        # could no longer watch it as it does its workers, so it goes (not a
        # death: a successor is started again when one is wanted).
        orphaned = sentinel_retired(spare.process)
        if orphaned:
            signal_process(spare.process, signal.SIGKILL)
        spare.process.join(KILL_GRACE_SECONDS)
        exitcode = spare.process.exitcode
        init_failure: Optional[memoryview] = None
        records: list[Resolution] = []
        give_up = False
        with core.lock:
            if spare in self.leaving:
                self.leaving.remove(spare)
            elif spare.slot.successor is spare:
                spare.slot.successor = None
                # What it said before it died: an initializer failure breaks
                # the pool, as in a worker; its log records are forwarded.
                frames, _ = _protocol.FrameReader(spare.result_conn.fileno()).read_available()
                for frame in frames:
                    view = memoryview(frame)
                    status = view[_protocol.TASK_ID_BYTES]
                    payload = view[_protocol.RESULT_HEADER_BYTES :]
                    if status == _protocol.STATUS_INIT_FAILED:
                        init_failure = payload
                    elif status == _protocol.STATUS_LOG:
                        records.append((LOG_RECORD_ITEM, status, payload))
                if not core.lifecycle.shutdown_requested and core.lifecycle.kill_requested is None:
                    if exitcode != 0 and not orphaned:
                        core.counters.worker_deaths += 1
                    if self_inflicted(exitcode) and init_failure is None:
                        give_up = core.launcher.count_startup_death()
            else:
                return  # already closed (the pool stopped it)
            self.close_spare(spare)
        core.results.resolve_all(records)
        if init_failure is not None:
            core.results.on_initializer_failure(init_failure)
        core.supervisor.break_if_starts_fail(give_up, describe_exit(exitcode))

    def close_spare(self, spare: Spare) -> None:
        """Stop watching a spare process and close its pipes (lock held)."""
        self.unwatch(spare)
        for conn in (spare.task_conn, spare.result_conn):
            try:
                conn.close()
            except OSError:
                pass
        if isinstance(spare.process, (_zygote.ZygoteChild, _child.ServedProcess)):
            spare.process.close()

    def close_reaped(self, spares: list[Spare]) -> None:
        """Close spare processes that were reaped (lock held)."""
        for spare in spares:
            if spare in self.leaving:
                self.leaving.remove(spare)
                self.close_spare(spare)
