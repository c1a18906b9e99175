"""Starting one worker process: its two pipes and its ``multiprocessing`` process.

Used by the pool itself (spawn, forkserver) and, under fork, by the zygote.
"""

from __future__ import annotations

import fcntl
import os
from multiprocessing import connection as mp_connection
from typing import Any

from duckpool import _worker


def start_worker_process(
    context: Any, config: _worker.WorkerConfig
) -> tuple[Any, mp_connection.Connection, mp_connection.Connection]:
    """Start a worker; return it with the parent's ends of its task and result pipes.

    On failure the pipes are closed and the error propagates.
    """
    task_r, task_w = os.pipe()
    result_r, result_w = os.pipe()
    for fd in (task_w, result_w):
        _enlarge(fd)
    process = context.Process(
        target=_worker.worker_main,
        # Bare descriptors, not Connections: cheaper for a spawned worker to rebuild.
        args=(_worker.InheritedFd(task_r), _worker.InheritedFd(result_w), config),
        name=config.name,
        daemon=False,  # tasks may start child processes
    )
    try:
        process.start()
    except BaseException:
        os.close(task_w)
        os.close(result_r)
        raise
    finally:
        # The worker has its own copies now (or never will).
        os.close(task_r)
        os.close(result_w)
    return (
        process,
        mp_connection.Connection(task_w, readable=False),
        mp_connection.Connection(result_r, writable=False),
    )


#: Bytes a worker's pipes hold: a large call or result goes in a few system
#: calls instead of a write-wait-read round per 64 KiB (Linux's default).
#: 1 MiB is what /proc/sys/fs/pipe-max-size lets any process ask for.
PIPE_BYTES = 1 << 20


def _enlarge(fd: int) -> None:
    """Grow a pipe's buffer to ``PIPE_BYTES`` where the system allows it."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Python < 3.10 lacks the name
    try:
        fcntl.fcntl(fd, set_size, PIPE_BYTES)
    except OSError:  # over the user's pipe quota, or not Linux: the default stays
        pass
