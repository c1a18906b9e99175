"""Starting one worker process: its two pipes and its ``multiprocessing`` process.

Used by the pool itself (spawn, forkserver) and, under fork, by the zygote.
"""

from __future__ import annotations

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
