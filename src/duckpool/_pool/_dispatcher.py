"""The dispatcher: the pool's thread, whose passes wait on everything and act.

Each pass: under the lock, act on deadlines and the launcher's timers, map
offered areas and watch pipes with an outbox; resolve what was read last
pass (just before sleeping: a caller waiting on one of them then gets the
GIL at once, not after this bookkeeping); sleep in the ``Waiter`` until one
of its sources is ready or the nearest deadline; then read results, settle
exits, and refill and dispatch.  The pool's data-flow diagram (``_core``)
lists every source it waits on.

Each source is registered with a tag of its own type, so a pass tells them
apart by ``type(tag)``: ``WAKEUP``, ``ResultReady``, ``WorkerExit``,
``Writable`` (``_transport``), ``SpareExit`` (``_successors``) and
``ZygoteTag`` (``_slots``, for ``_zygotes``).

The passes are a generator (``_passes``) that yields at its one wait: the
pool's own thread drives it, or the hub's thread while several pools run
(``_hub``); the own thread then waits, and does the clean-up at the end.
The thread holds the pool strongly while it runs (its owners hold it
weakly); it ends once shutdown finds no work left, or the pool is broken
and its workers are gone, after reaping every process the pool started.
"""

from __future__ import annotations

import threading
import time
import weakref
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Optional

from duckpool import _orphans, _threads
from duckpool._pool import _hub
from duckpool._pool._results import LOG_RECORD_ITEM
from duckpool._pool._slots import ResultReady, WorkerExit, ZygoteTag
from duckpool._pool._successors import SpareExit
from duckpool._pool._supervisor import KILL_GRACE_SECONDS
from duckpool._pool._transport import Writable
from duckpool._pool._wakeup import WAKEUP

if TYPE_CHECKING:
    from duckpool._pool._slots import Slot
    from duckpool._pool._view import Core


class Dispatcher:
    """Owns a pool's dispatcher thread."""

    def __init__(self, core: Core) -> None:
        self._core: Core = weakref.proxy(core)
        #: The running thread, once started (never unset: ``join`` waits on it).
        self.thread: Optional[threading.Thread] = None
        #: The thread object, made before the first fork (``prepare``).
        self._unstarted: Optional[_threads.QuickStartThread] = None
        #: The passes it drives, once it runs (maybe on the hub).
        self.run: Optional[_hub.Run] = None

    def prepare(self, core: Core) -> None:
        """Make the thread object now: after a fork, every page this process
        writes (and a Thread writes many) is a copy-on-write fault."""
        if self._unstarted is None and self.thread is None:
            self._unstarted = self._make(core)

    def _make(self, core: Core) -> _threads.QuickStartThread:
        # The pool itself, not the proxy: the thread keeps it alive while it runs.
        return _threads.QuickStartThread(
            lambda: run(core, self), name=f"duckpool-dispatcher-{id(core):x}"
        )

    def start(self, core: Core) -> None:
        """Start the thread; not waited for (the caller may read the first
        result itself meanwhile)."""
        thread = self._unstarted or self._make(core)
        self.thread = thread
        self._unstarted = None
        try:
            thread.start()
        except BaseException as exc:
            # Interrupted (a Ctrl-C) once the thread existed, it runs all the
            # same, and must stay the pool's only one: it runs within moments.
            if isinstance(exc, Exception) or not thread.began.wait(THREAD_BEGIN_SECONDS):
                self.thread = None  # nothing to join
            raise

    def is_current(self) -> bool:
        """Whether this thread runs the pool's passes: its own thread, or
        the hub's while it runs one of them."""
        current = threading.current_thread()
        if current is self.thread:
            return True
        run = self.run
        return run is not None and run.stepper is current

    def running(self) -> bool:
        thread = self.thread
        return thread is not None and thread.is_alive()

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for the thread to end; ``RuntimeError`` in the thread itself (a
        done-callback it runs): it is what ends the pool."""
        thread = self.thread
        if self.is_current():
            raise RuntimeError(
                "cannot wait for the pool to shut down in its own dispatcher thread "
                "(a done-callback it ran): that thread is what shuts it down; the "
                "shutdown goes on once the callback returns (call shutdown(wait=False) "
                "there, or wait elsewhere)"
            )
        if thread is not None:
            thread.join(timeout)


#: How long a dispatcher whose start was interrupted is given to show it runs.
THREAD_BEGIN_SECONDS = 2.0


def run(core: Core, dispatcher: Dispatcher) -> None:
    """The dispatcher thread's body: never leaves a future unresolved."""
    try:
        _dispatch_until_done(core, dispatcher)
    except BaseException as exc:  # last resort
        with core.lock:
            reason = f"duckpool's dispatcher failed: {exc!r}"
            core.lifecycle.dispatcher_failed(reason, exc)
            # Results read but not handed out: their items left `assigned`.
            core.results.take_handed_over(last=True)
            deferred = core.results.deferred
            stranded = [item for item, _, _ in deferred if item is not LOG_RECORD_ITEM]
            deferred.clear()
        core.supervisor.fail_everything(BrokenProcessPool(reason), cause=exc, also=stranded)
        core.supervisor.kill_without_bookkeeping()
    finally:
        core.zygotes.close()
        core.close_marks()
        core.close_wakeup()
        # Told to exit, the zygotes tear down whole address spaces; join()
        # waits for that too (every process of the pool has exited then).
        core.zygotes.reap(KILL_GRACE_SECONDS)
        # Workers of a helper that died before it reaped them (a stopped
        # zygote or fork server, killed), if this process inherited them.
        _orphans.reap_adopted(KILL_GRACE_SECONDS)


def _dispatch_until_done(core: Core, dispatcher: Dispatcher) -> None:
    passes = _passes(core)
    dispatcher.run = _hub.Run(passes, core.selector, core.wakeup.wake)
    _hub.drive(dispatcher.run, next(passes))
    results = core.results
    with core.lock:  # (a helper may have booked the last results meanwhile)
        results.take_handed_over(last=True)
    results.resolve_all(results.deferred)
    core.supervisor.stop_workers()


def _passes(core: Core) -> _hub.Passes:
    """The dispatcher's passes: each yields how long it may sleep and is sent
    what woke it (``_hub`` drives them, in this thread or the hub's)."""
    results = core.results
    deferred = results.deferred
    launcher = core.launcher
    supervisor = core.supervisor
    transport = core.transport
    scheduler = core.scheduler
    successors = core.successors
    lifecycle = core.lifecycle
    lock = core.lock
    elastic = core.elastic if core.elastic.enabled else None
    while True:
        if core.abandoned and not lifecycle.shutdown_requested:
            core.request_shutdown(False)  # (its executor's finalizer cannot)
        with lock:
            now = time.monotonic()
            timeout = core.deadlines.check(now)
            wait = launcher.before_wait(now)
            if wait is not None and (timeout is None or wait < timeout):
                timeout = wait
            if elastic is not None:
                wait = elastic.check(now)
                if wait is not None and (timeout is None or wait < timeout):
                    timeout = wait
            transport.before_wait()
            results.take_handed_over()
        _orphans.reap_adopted()  # (nothing to do unless a process is kept: see there)
        if deferred:
            results.resolve_all(deferred)
        exited: list[Slot] = []
        for tag in (yield timeout):
            kind = type(tag)
            if kind is ResultReady:
                results.on_results(tag.slot, deferred)
            elif kind is WorkerExit:
                exited.append(tag.slot)
            elif tag is WAKEUP:
                core.wakeup.drain()
            elif kind is ZygoteTag:
                exited.extend(core.zygotes.on_event(tag))
            elif kind is Writable:
                with lock:
                    transport.flush(tag.slot)
            elif kind is SpareExit:
                successors.exits.append(tag.spare)
        if launcher.polls_exits:
            exited.extend(s for s in launcher.poll_exits() if s not in exited)
        if exited or lifecycle.kill_requested is not None:
            results.resolve_all(deferred)  # results come before the deaths
        for slot in exited:
            supervisor.on_worker_exit(slot)
        successors.on_exits()
        if lifecycle.kill_requested is not None:
            supervisor.kill_all_workers(lifecycle.kill_requested)
        start_error: Optional[BaseException] = None
        with lock:
            slots = core.slots
            if (
                not lifecycle.shutdown_requested
                or scheduler.pending
                or any(slot.reserved for slot in slots)
            ):
                if elastic is not None and scheduler.pending:
                    elastic.unpark_for(scheduler.startable(len(slots)))
                start_error = launcher.refill_slots()
                scheduler.dispatch_pending()
                if start_error is None:
                    start_error = successors.start_due()
            core.zygotes.after_pass(time.monotonic())
            done = (
                lifecycle.shutdown_requested
                and not scheduler.pending
                and not any(s.assigned for s in slots)
            ) or (lifecycle.broken is not None and not any(s.alive for s in slots))
        if start_error is not None:
            supervisor.starts_failed(start_error)
        elif done:
            return
