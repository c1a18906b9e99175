"""What the benchmark's worker processes run, and nothing else.

Every library under test pickles these functions by reference, so they must be
importable by name from a spawned or forkserver worker: they cannot live in
``__main__``.  The module imports only the standard library's ``os`` and
``time`` so that a spawned worker pays as little as possible for it; the
package's ``__init__``, which Python runs first, imports nothing at all.
"""

from __future__ import annotations

import os
import time

# Not typing's TYPE_CHECKING: importing typing would cost every spawned worker.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from typing import Any, Callable, Optional

__all__ = [
    "bench_child_pid",
    "block_until_released",
    "echo",
    "increment",
    "pipe_worker_loop",
    "spin",
    "worker_identity",
]


def increment(value: int) -> int:
    """The tiny task: as little work as a task can do, so only overhead is measured."""
    return value + 1


def echo(payload: bytes) -> bytes:
    """Send the payload back: the payload metric measures moving bytes both ways."""
    return payload


def spin(iterations: int) -> int:
    """CPU-bound pure-Python work (it holds the GIL throughout), for the scaling metric."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def block_until_released(release_path: str, running_dir: str, timeout: float) -> int:
    """Occupy this worker until ``release_path`` exists; return this worker's pid.

    It first creates ``running-<pid>`` in ``running_dir``, so the parent can
    tell when every worker is occupied, then polls every millisecond (no
    multiprocessing primitive: each library would need its own way to pass
    one).  Raises ``TimeoutError`` if the release does not come in ``timeout``
    seconds, so a parent that died cannot leave a worker blocked forever.
    """
    pid = os.getpid()
    with open(os.path.join(running_dir, f"running-{pid}"), "w"):
        pass
    deadline = time.monotonic() + timeout
    while not os.path.exists(release_path):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"worker {pid} was not released within {timeout:.1f} s")
        time.sleep(0.001)
    return pid


# Set by the benchmark child in its own memory before it opens a pool: a worker
# that still sees it was forked from the child; a fresh interpreter does not.
bench_child_pid: Optional[int] = None


def worker_identity(seconds: float, child_pid: int) -> tuple[int, str]:
    """Stay busy briefly, then name this worker and how it was started.

    The warm-up uses it to reach every worker (a busy worker makes the pool use
    another) and to report the start method actually in effect: ``fork`` if the
    child's memory was inherited, otherwise ``spawn`` when the child is the
    parent (loky's own method counts as spawn) or ``forkserver`` when it is not.
    """
    time.sleep(seconds)
    if bench_child_pid == child_pid:
        origin = "fork"
    elif os.getppid() == child_pid:
        origin = "spawn"
    else:
        origin = "forkserver"
    return os.getpid(), origin


def pipe_worker_loop(connection: Connection) -> None:
    """The bare-Pipe floor's worker: receive ``(fn, args)``, send back ``fn(*args)``.

    ``None`` (or a closed pipe) ends the loop.  There is no error handling on
    purpose: the floor measures the cheapest possible round trip, and a task
    exception simply kills the worker, which the parent reports as a failure.
    """
    while True:
        try:
            message: Any = connection.recv()
        except EOFError:
            return
        if message is None:
            return
        function: Callable[..., Any] = message[0]
        connection.send(function(*message[1]))
