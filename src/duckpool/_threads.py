"""The dispatcher's thread: started without waiting for it to run.

``threading.Thread.start`` blocks until the new thread has run its first
lines, so that ``is_alive()`` holds as soon as it returns.  A pool starts its
thread right after its forks, when the new processes keep both cores busy:
that wait then costs a millisecond or more, on the way to the first result,
for a guarantee the pool never uses.  The thread submitting the first task
goes back to its caller at once instead, and may read that task's result
itself (``PoolCore.help_resolve``) while the new thread gets going.

Until the new thread first runs, Python 3.9 to 3.11 give its thread state
the id of the thread that started it: ``PyThreadState_SetAsyncExc`` aimed at
the starting thread meanwhile raises in the new thread instead, which dies on
its first line (3.12 leaves the id unset until the thread runs).  Not waiting
for the new thread makes that window as long as the scheduler likes, and the
pool's dispatcher would be the thread that dies.  On those versions the
thread is started by a thread of its own that runs no Python code: an
exception meant for the caller that lands in that one is dropped with it,
and the new thread's state carries that thread's id, which nothing aims at.
(That go-between cannot report its own failure to start the thread: under
a limit on threads, the caller sees no error and the thread never runs.)

Whether the thread has ended is its own event too (``finished``), set as
its ``run`` returns: on Python 3.9 to 3.12, a ``Thread.join()`` interrupted
by a signal handler's exception (Ctrl-C in ``shutdown(wait=True)``) can mark
a thread that still runs as stopped, for good (CPython gh-90882's fix
releases its lock).  ``is_alive()`` and ``join()`` here go by that event:
a pool whose shutdown was interrupted still waits for its work.
"""

from __future__ import annotations

import _thread
import functools
import sys
import threading
import time
from typing import Callable, Optional

#: A new thread's state has its starter's id until it runs (see above).
_BORN_WITH_STARTERS_ID = sys.version_info < (3, 12)


def _no_wait(timeout: Optional[float] = None) -> bool:
    return True


class QuickStartThread(threading.Thread):
    """A daemon thread whose ``start()`` returns once the thread exists.

    Until it runs, ``is_alive()`` is false and ``ident`` None; ``join()``
    waits for it to run first.
    """

    def __init__(self, target: Callable[[], None], name: str) -> None:
        super().__init__(target=target, name=name, daemon=True)
        #: Set once the thread runs (or failed to start): join() waits for it.
        self._running = threading.Event()
        #: Set once the thread runs, and only then.
        self.began = threading.Event()
        #: Set once ``run`` has returned (or the thread failed to start).
        self.finished = threading.Event()

    def start(self) -> None:
        # Thread.start ends by waiting on this event, which the new thread
        # sets; that one wait is skipped.  Where a Python keeps no such
        # event, the thread starts as any other.
        started = getattr(self, "_started", None)
        if not isinstance(started, threading.Event):
            super().start()
            return
        started.wait = _no_wait  # type: ignore[method-assign]
        if _BORN_WITH_STARTERS_ID:
            # Thread.start runs self._bootstrap in the new thread: this one
            # starts it from a thread that runs C code only (see above).
            self.__dict__["_bootstrap"] = functools.partial(
                _thread.start_new_thread,
                self._bootstrap,  # type: ignore[attr-defined]
                (),
            )
        try:
            super().start()
        except BaseException:
            self._running.set()  # join() raises as for a thread never started
            self.finished.set()
            raise
        finally:
            del started.wait
            self.__dict__.pop("_bootstrap", None)

    def run(self) -> None:
        self.began.set()
        self._running.set()
        try:
            super().run()
        finally:
            self.finished.set()

    def is_alive(self) -> bool:
        """Running: begun, and ``run`` has not returned (whatever an
        interrupted ``join()`` made ``threading`` believe)."""
        return self.began.is_set() and (not self.finished.is_set() or super().is_alive())

    def join(self, timeout: Optional[float] = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._running.wait(timeout):
            return
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self.began.is_set():
            super().join(left)  # (raises as for a thread never started)
            return
        # Interrupted, an Event's wait leaves nothing wrong behind.
        if self.finished.wait(left):
            super().join(None if deadline is None else max(0.0, deadline - time.monotonic()))
