"""The dispatcher's thread: started without waiting for it to run.

``threading.Thread.start`` blocks until the new thread has run its first
lines, so that ``is_alive()`` holds as soon as it returns.  A pool starts its
thread right after its forks, when the new processes keep both cores busy:
that wait then costs a millisecond or more, on the way to the first result,
for a guarantee the pool never uses.  The thread submitting the first task
goes back to its caller at once instead, and may read that task's result
itself (``PoolCore.help_resolve``) while the new thread gets going.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional


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

    def start(self) -> None:
        # Thread.start ends by waiting on this event, which the new thread
        # sets; that one wait is skipped.  Where a Python keeps no such
        # event, the thread starts as any other.
        started = getattr(self, "_started", None)
        if not isinstance(started, threading.Event):
            super().start()
            return
        started.wait = _no_wait  # type: ignore[method-assign]
        try:
            super().start()
        except BaseException:
            self._running.set()  # join() raises as for a thread never started
            raise
        finally:
            del started.wait

    def run(self) -> None:
        self._running.set()
        super().run()

    def join(self, timeout: Optional[float] = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._running.wait(timeout):
            return
        super().join(None if deadline is None else max(0.0, deadline - time.monotonic()))
