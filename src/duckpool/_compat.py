"""``executor._processes``: the standard library's private view of the workers, kept
for code and tests written against it.  Compatibility, not API.

``concurrent.futures.ProcessPoolExecutor._processes`` maps each worker's pid to
its ``multiprocessing.Process``; code reads it for the pids, counts it, and
calls ``terminate()``, ``join()`` or ``is_alive()`` on its values.  duckpool's
workers are handles of its own engine, which reaps them from its dispatcher
thread: handing those out would let another thread reap a worker under the
engine's feet (and read a wrong exit code).  So each value here is a
:class:`WorkerHandle` that watches the process through a pidfd of its own
(where the system has pidfds), signals it, and waits for it, but never reaps
it; its ``exitcode`` is the one the pool recorded, once the pool has.

Killing a worker through it is what killing it from outside is: its task
fails with ``WorkerDiedError`` and the pool starts another worker.
"""

from __future__ import annotations

import os
import signal
import time
import types
import weakref
from multiprocessing import connection as mp_connection
from typing import TYPE_CHECKING, Callable, Mapping, Optional

from duckpool import _child

if TYPE_CHECKING:
    from duckpool._pool._slots import WorkerProcess

__all__ = ["WorkerHandle", "processes_view"]


class WorkerHandle:
    """A worker process, as ``executor._processes`` shows it (a ``Process`` look-alike)."""

    def __init__(
        self, process: WorkerProcess, pid: int, settled: Callable[[WorkerProcess], bool]
    ) -> None:
        self.pid = pid
        self._process = process
        self._settled = settled
        #: Readable once the process has exited; None where there are no pidfds.
        self._pidfd = _child.pidfd_of(pid)
        self._release = weakref.finalize(self, _child.close_quietly, self._pidfd)

    def __repr__(self) -> str:
        state = "alive" if self.is_alive() else f"exitcode={self.exitcode}"
        return f"<duckpool worker pid={self.pid} {state}>"

    def is_alive(self) -> bool:
        """Has the process not exited yet?"""
        if self._pidfd is not None and self._release.alive:
            return not mp_connection.wait([self._pidfd], 0)
        try:
            os.kill(self.pid, 0)  # (a zombie still answers: exited, not yet reaped)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return not self._settled(self._process)

    @property
    def exitcode(self) -> Optional[int]:
        """None while it runs, and until the pool has settled its exit; then as
        ``multiprocessing`` says it (negative for a signal), or None if no one
        could tell (a worker whose zygote died before it)."""
        if not self._settled(self._process):
            return None
        return self._process.exitcode  # (read by the pool already: no reaping here)

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait up to ``timeout`` seconds (None: no limit) for the process to exit."""
        if self._pidfd is not None and self._release.alive:
            mp_connection.wait([self._pidfd], timeout)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.001
        while self.is_alive():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            time.sleep(pause if remaining is None else min(pause, remaining))
            pause = min(2 * pause, 0.05)

    def terminate(self) -> None:
        """SIGTERM (the pool fails its task and starts another worker)."""
        self._send(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL (the pool fails its task and starts another worker)."""
        self._send(signal.SIGKILL)

    def _send(self, signum: int) -> None:
        if self.is_alive():
            _child.send_signal(self.pid, self._pidfd if self._release.alive else None, signum)


def processes_view(
    processes: list[WorkerProcess], settled: Callable[[WorkerProcess], bool]
) -> Mapping[int, WorkerHandle]:
    """A read-only ``{pid: WorkerHandle}`` of ``processes`` (the live workers,
    taken under the pool's lock); ``settled(process)`` tells whether the pool
    has handled that process's exit."""
    handles = {
        process.pid: WorkerHandle(process, process.pid, settled)
        for process in processes
        if process.pid is not None
    }
    return types.MappingProxyType(handles)
