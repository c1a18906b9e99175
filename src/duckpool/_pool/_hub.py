"""The hub: one thread that runs the dispatch passes of every pool of a process.

A pool's dispatcher is a generator of passes (``_dispatcher._passes``): it
yields how long it may sleep and is sent the tags its ``Waiter`` reported.
Alone in its process, a pool's own thread drives it (``drive``: wait, send,
repeat), as if there were no hub.  Once a second pool runs, each hands its
passes to the hub at its next wait: the hub's one thread sleeps on an epoll
over every pool's own epoll and runs the pass of whichever pool is ready or
due.  Several dispatcher threads would take turns at one GIL, each wake-up a
context switch; one thread reads more answers per wake-up and switches less.

What a pass runs may block: a done-callback of one pool may wait on another
pool's future, shut it down, or simply be slow.  So a pool's own thread
stays behind, waiting for its passes to end; while its pool has something
to do (a descriptor ready, a deadline past) it looks every
``STALL_SECONDS``: if its pool had something to do at the last look and
still has, the hub having run none of its passes since, busy in other
pools' passes, it takes its passes back (at their wait, which is where the
hub left them) and drives them itself until the pool is done.  While its
pool is idle it sleeps until there is work.  A pool's passes are
never run by two threads at once: the hub marks the pool it runs under its
lock, and a pool is taken back only while the hub is not running it.

The hub thread starts with the first pool it takes and ends (its epoll and
pipe closed) when the last one is done; the own thread of that last pool
joins it, so no thread of the pool outlives its shutdown.  If the hub itself
fails, cannot start, or cannot watch a pool, the pools go on in their own
threads.  A forked child starts with no hub (the parent's pools are not its
own).  Where there is no epoll,
or ``DUCKPOOL_SHARED_DISPATCHER=0`` is set, every pool drives its own passes.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import select
import threading
import time
from typing import Any, Callable, Generator, Optional

from duckpool._pool._wakeup import Wakeup

#: A pool's passes: yield how long to sleep, are sent the tags that woke them.
Passes = Generator[Optional[float], list[Any], None]

#: How often a pool's own thread looks whether the hub keeps its passes
#: waiting: kept waiting from one look to the next, it takes them back.
STALL_SECONDS = 0.1


class _Where(enum.Enum):
    OWN = "driven by its own thread"
    HUB = "driven by the hub"
    DONE = "finished on the hub"
    RETURNED = "handed back by the hub"


class Run:
    """One pool's passes, and who drives them."""

    def __init__(self, passes: Passes, selector: Any, wake: Callable[[], None]) -> None:
        self.passes = passes
        self.selector = selector
        #: Wakes the pool's own thread from its wait (the pool's wakeup pipe).
        self.wake = wake
        #: The thread running one of its passes right now, if not its own.
        self.stepper: Optional[threading.Thread] = None
        #: Passes run on the hub so far.
        self.passes_run = 0
        self.where = _Where.OWN
        #: Set: the hub wants these passes (at their next wait).
        self.called = False
        #: Taken back once: never handed to the hub again.
        self.kept = False
        self.deadline: Optional[float] = None
        self.fd = -1
        #: What a pass run on the hub raised (the own thread raises it again).
        self.error: Optional[BaseException] = None
        self.settled = threading.Event()
        #: The hub thread, ended with this pool's last pass: joined by the own thread.
        self.hub_thread: Optional[threading.Thread] = None

    def step(self, tags: list[Any]) -> bool:
        """One pass, on the hub; False once the passes have ended."""
        self.stepper = threading.current_thread()
        self.passes_run += 1
        try:
            timeout = self.passes.send(tags)
        except StopIteration:
            return False
        except BaseException as exc:
            self.error = exc
            return False
        finally:
            self.stepper = None
        self.deadline = None if timeout is None else time.monotonic() + timeout
        return True


class Hub:
    """The shared dispatcher thread of this process and the pools it drives."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: Pools driven by their own thread that may move to the hub.
        self._own: set[Run] = set()
        #: Pools on the hub, by their epoll's descriptor (the hub thread's).
        self._runs: dict[int, Run] = {}
        self._arrivals: list[Run] = []
        #: The pool whose pass the hub runs now, and since when.
        self._stepping: Optional[Run] = None
        self._step_began = 0.0
        self.thread: Optional[threading.Thread] = None
        self._epoll: Optional[Any] = None
        #: Wakes the hub thread when a pool arrives.
        self._wakeup: Optional[Wakeup] = None

    # -- the pools' own threads ------------------------------------------

    def enter(self, run: Run) -> None:
        """A pool's passes begin: with another pool running, call them all in."""
        with self.lock:
            crowd = bool(self._own or self._runs or self._arrivals)
            self._own.add(run)
            if not crowd:
                return
            woken = [other for other in self._own if not other.called]
            for other in woken:
                other.called = True
        for other in woken:
            if other is not run:
                other.wake()

    def leave(self, run: Run) -> None:
        """A pool's own thread is done driving its passes."""
        with self.lock:
            self._own.discard(run)

    def hand_over(self, run: Run, timeout: Optional[float]) -> bool:
        """Give the hub the passes, waiting at most ``timeout``; False: keep them."""
        with self.lock:
            self._own.discard(run)
            run.called = False
            if run.kept:
                return False
            if self.thread is None:
                try:
                    self._start()
                except Exception:  # (out of descriptors, of threads): go on alone
                    self._close()
                    run.kept = True
                    return False
            run.deadline = None if timeout is None else time.monotonic() + timeout
            run.where = _Where.HUB
            self._arrivals.append(run)
            assert self._wakeup is not None
            self._wakeup.wake()
        return True

    def wait_for(self, run: Run) -> bool:
        """Wait while the hub drives the passes: True once they ended there,
        False when they are back with the own thread (taken back or returned).

        While the pool has something to do (a descriptor ready, its deadline
        past, or a pass of it running), look every ``STALL_SECONDS``: passes
        that had something to do at the last look and still have, the hub
        not having run one of them since, are taken back.  With nothing to
        do, sleep until there is: the pool's epoll is readable whenever the
        hub has a pass of it to run, and the deadline is the hub's own for it
        (an idle pool's own thread wakes for nothing).  The hub pokes the
        pool's pipe when it is done with the passes."""
        ready = select.poll()
        ready.register(run.selector.fileno(), select.POLLIN)
        starved_at: Optional[int] = None  # the pass count when seen waiting
        while not run.settled.is_set():
            waiting = bool(ready.poll(0))
            with self.lock:
                if run.where is not _Where.HUB:
                    break
                stepping = self._stepping is run
                # (Read under the lock: a pass of its own sets it, and none runs.)
                deadline = run.deadline
                now = time.monotonic()
                waiting = waiting or (deadline is not None and deadline <= now)
                if not waiting or stepping:
                    starved_at = None
                elif starved_at != run.passes_run:
                    starved_at = run.passes_run
                else:
                    # Kept waiting a whole look by other pools' passes: take these back.
                    self._drop(run)
                    run.where = _Where.OWN
                    run.kept = True
                    return False
            if waiting or stepping:
                run.settled.wait(STALL_SECONDS)
            elif deadline is None:
                ready.poll()
            else:
                ready.poll(math.ceil((deadline - now) * 1000))
        hub_thread = run.hub_thread
        if hub_thread is not None:
            hub_thread.join()
        return run.where is _Where.DONE

    # -- the hub thread ---------------------------------------------------

    def _start(self) -> None:
        """Under the lock: the epoll, the pipe that wakes it, and the thread."""
        self._epoll = select.epoll()
        self._wakeup = Wakeup()
        self._epoll.register(self._wakeup.read_fd, select.EPOLLIN)
        thread = threading.Thread(target=self._run, name="duckpool-hub", daemon=True)
        thread.start()
        self.thread = thread

    def _close(self) -> None:
        """Under the lock, the thread gone: close the epoll and the pipe."""
        epoll, self._epoll = self._epoll, None
        wakeup, self._wakeup = self._wakeup, None
        if epoll is not None:
            epoll.close()
        if wakeup is not None:
            wakeup.close()

    def _drop(self, run: Run) -> None:
        """Under the lock: the hub no longer watches ``run``."""
        if self._runs.pop(run.fd, None) is run and self._epoll is not None:
            try:
                self._epoll.unregister(run.fd)
            except OSError:
                pass
        if run in self._arrivals:
            self._arrivals.remove(run)

    def _take(self, run: Run) -> None:
        """Under the lock: watch an arrival, or hand it back if it cannot be."""
        assert self._epoll is not None
        try:
            fd = run.selector.fileno()
            self._epoll.register(fd, select.EPOLLIN)
        except (OSError, ValueError):  # (no room in the epoll; its epoll closed)
            self._arrivals.remove(run)
            self._hand_back(run)
            return
        run.fd = fd
        self._runs[fd] = run
        self._arrivals.remove(run)

    def _hand_back(self, run: Run) -> None:
        """Under the lock: ``run``'s own thread drives it from now on."""
        run.where = _Where.RETURNED
        run.kept = True
        _settle(run)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            logging.getLogger("duckpool").exception(
                "duckpool's shared dispatcher failed; each pool goes on in its own thread"
            )
            with self.lock:
                # Every pool goes back to its own thread; none is lost.
                for run in [*self._runs.values(), *self._arrivals]:
                    self._drop(run)
                    self._hand_back(run)
                self.thread = None
                self._close()

    def _loop(self) -> None:
        runs = self._runs
        epoll = self._epoll
        assert epoll is not None
        wakeup = self._wakeup
        assert wakeup is not None
        while True:
            with self.lock:
                if not runs and not self._arrivals:  # every pool taken back
                    self.thread = None
                    self._close()
                    return
            timeout = -1.0
            now = time.monotonic()
            for run in runs.values():
                if run.deadline is not None:
                    left = max(0.0, run.deadline - now)
                    if timeout < 0 or left < timeout:
                        timeout = left
            ready = {fd for fd, _ in epoll.poll(timeout)}
            if wakeup.read_fd in ready:
                wakeup.drain()
                with self.lock:
                    for run in list(self._arrivals):
                        self._take(run)
            now = time.monotonic()
            for fd, run in list(runs.items()):
                if fd not in ready and (run.deadline is None or run.deadline > now):
                    continue
                with self.lock:
                    if run.where is not _Where.HUB:
                        continue  # taken back meanwhile
                    self._stepping = run
                    self._step_began = time.monotonic()
                try:
                    alive = run.step(run.selector.wait(0))
                finally:
                    with self.lock:
                        self._stepping = None
                if not alive:
                    with self.lock:
                        self._drop(run)
                        run.where = _Where.DONE
                        if not runs and not self._arrivals:
                            run.hub_thread = self.thread
                            self.thread = None
                            self._close()
                            _settle(run)
                            return
                    _settle(run)


def _settle(run: Run) -> None:
    """The hub is done with ``run``: wake its own thread (``Hub.wait_for``),
    which may be asleep on the pool's epoll."""
    run.settled.set()
    try:
        run.wake()
    except OSError:
        pass  # (its pipe is gone: nothing sleeps on it)


def drive(run: Run, timeout: Optional[float]) -> None:
    """The pool's own thread: run the passes (from their first wait) until
    they end, here or on the hub; raises what a pass raised."""
    hub = _the_hub if _the_hub is not None and hasattr(run.selector, "fileno") else None
    if hub is None:
        _drive_here(run, timeout)
        return
    hub.enter(run)
    try:
        while True:
            if run.called and hub.hand_over(run, timeout):
                if hub.wait_for(run):
                    break
                deadline = run.deadline
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                continue
            try:
                timeout = run.passes.send(run.selector.wait(timeout))
            except StopIteration:
                return
    finally:
        hub.leave(run)
    error, run.error = run.error, None
    if error is not None:
        raise error


def _drive_here(run: Run, timeout: Optional[float]) -> None:
    passes = run.passes
    wait = run.selector.wait
    try:
        while True:
            timeout = passes.send(wait(timeout))
    except StopIteration:
        pass


def _shared_wanted() -> bool:
    return hasattr(select, "epoll") and os.environ.get("DUCKPOOL_SHARED_DISPATCHER", "1") != "0"


_the_hub: Optional[Hub] = Hub() if _shared_wanted() else None


def _after_fork_in_child() -> None:
    """The parent's hub is not this process's: forget it.  Its epoll and pipe
    are not closed: another thread may have closed them just before the fork
    and their numbers been reused (as ``PoolCore.forget_after_fork``)."""
    global _the_hub
    _the_hub = Hub() if _shared_wanted() else None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
