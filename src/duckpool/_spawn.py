"""Starting one worker process: its two pipes and its ``multiprocessing`` process.

Used by the pool itself (spawn, forkserver, and the first worker under fork) and,
under fork, by the zygote for every later worker.
"""

from __future__ import annotations

import fcntl
from multiprocessing import connection as mp_connection
from typing import Any

from duckpool import _worker


def start_worker_process(
    context: Any, config: _worker.WorkerConfig
) -> tuple[Any, mp_connection.Connection, mp_connection.Connection]:
    """Start a worker; return it with the parent's ends of its task and result pipes.

    On failure the pipes are closed and the error propagates.
    """
    task_r, task_w = context.Pipe(duplex=False)
    result_r, result_w = context.Pipe(duplex=False)
    for conn in (task_w, result_w):
        _enlarge(conn)
    process = context.Process(
        target=_worker.worker_main,
        args=(task_r, result_w, config),
        name=config.name,
        daemon=False,  # tasks may start child processes
    )
    try:
        process.start()
    except BaseException:
        task_w.close()
        result_r.close()
        raise
    finally:
        # The worker has its own copies now (or never will).
        task_r.close()
        result_w.close()
    return process, task_w, result_r


#: Bytes a worker's pipes hold: a large call or result goes in a few system
#: calls instead of a write-wait-read round per 64 KiB (Linux's default).
#: 1 MiB is what /proc/sys/fs/pipe-max-size lets any process ask for.
PIPE_BYTES = 1 << 20


def _enlarge(conn: mp_connection.Connection) -> None:
    """Grow a pipe's buffer to ``PIPE_BYTES`` where the system allows it."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Python < 3.10 lacks the name
    try:
        fcntl.fcntl(conn.fileno(), set_size, PIPE_BYTES)
    except OSError:  # over the user's pipe quota, or not Linux: the default stays
        pass
