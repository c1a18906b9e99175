"""Starting one worker process: its two pipes and the process.

Used by the pool itself (spawn, forkserver, and the first worker under fork) and,
under fork, by the zygote for every later worker.  Under spawn the worker is
started by ``spawn_worker`` (see ``_spawned``), otherwise as a ``multiprocessing``
process.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections import deque
from multiprocessing import connection as mp_connection
from typing import Any, Optional

from duckpool import _child, _fork_server, _protocol, _spawned, _worker


def start_worker_process(
    context: Any,
    config: _worker.WorkerConfig,
    parent_sentinel: Optional[int] = None,
    also_close: tuple[int, ...] = (),
    ahead: Optional[deque[memoryview]] = None,
    started: Optional[list[Any]] = None,
) -> tuple[Any, mp_connection.Connection, mp_connection.Connection]:
    """Start a worker; return it with the parent's ends of its task and result pipes.

    ``parent_sentinel``: under fork, a pidfd of the pool's process, which
    the worker inherits; with it the worker is forked directly (``fork_worker``).
    ``also_close``: under fork, more of the parent's descriptors the worker
    closes at once.  ``ahead``: frames already meant for the worker (its
    slot's outbox), written to its task pipe before it starts, as far as
    the pipe takes them; what was written is then taken off ``ahead``.
    ``started``: the process is appended to it as soon as it exists (so that
    a caller interrupted before this returns can still stop it).  On
    failure the pipes are closed, ``ahead`` is left whole and the error
    propagates.
    """
    pipes: list[int] = []  # (filled as made: an interrupted start closes them all)
    try:
        pipes.extend(os.pipe())
        pipes.extend(os.pipe())
    except BaseException:
        for fd in pipes:
            os.close(fd)
        raise
    task_r, task_w, result_r, result_w = pipes
    # The parent's ends as connections at once: dropped by an interrupted
    # start, they close themselves.
    task_conn = result_conn = None
    written = 0
    method = context.get_start_method()
    process: Any
    try:
        task_conn = mp_connection.Connection(task_w, readable=False)
        result_conn = mp_connection.Connection(result_r, writable=False)
        for fd in (task_w, result_w):
            _enlarge(fd)
        if ahead:
            written = _write_ahead(task_w, ahead)
        if method == "spawn" and _SPAWN_DIRECTLY:
            process = spawn_worker(config, task_r, result_w)
        elif method == "fork" and parent_sentinel is not None:
            parent_ends = (task_w, result_r, *also_close)
            process = fork_worker(
                context, config, task_r, result_w, parent_ends, parent_sentinel, started
            )
        else:
            # A forked worker closes its copies of the parent's ends
            # (spawned and forkserver workers never get them).
            parent_ends = (task_w, result_r, *also_close) if method == "fork" else ()
            process = _new_process(context, config, task_r, result_w, parent_ends)
            if method == "forkserver":
                _fork_server.preload_worker_module()
                with _fork_server.watch_start():
                    process.start()
            else:
                process.start()
            if method == "forkserver":
                process = _child.served(process)
        if started is not None and process not in started:
            started.append(process)
    except BaseException:
        for conn, fd in ((task_conn, task_w), (result_conn, result_r)):
            if conn is None:
                os.close(fd)
            else:
                conn.close()
        raise
    finally:
        # The worker has its own copies now (or never will).
        os.close(task_r)
        os.close(result_w)
    if written:
        assert ahead is not None
        rest = _protocol.skip_written(list(ahead), written)
        ahead.clear()
        ahead.extend(rest)
    return process, task_conn, result_conn


def _write_ahead(task_w: int, frames: deque[memoryview]) -> int:
    """Write ``frames`` to a new worker's task pipe before the worker
    starts, as far as the pipe takes them; how many bytes it took.

    Its first task is then there when it first reads: under fork, the
    pool's process need not write it after the fork, which would copy
    pages its first worker still shares.
    """
    os.set_blocking(task_w, False)
    try:
        left = list(frames)
        total = sum(view.nbytes for view in left)
        while left:
            try:
                done = os.writev(task_w, left[: _protocol.IOV_MAX])
            except BlockingIOError:
                break
            if not done:
                break
            left = _protocol.skip_written(left, done)
        return total - sum(view.nbytes for view in left)
    finally:
        os.set_blocking(task_w, True)


def _new_process(
    context: Any,
    config: _worker.WorkerConfig,
    task_r: int,
    result_w: int,
    parent_ends: tuple[int, ...],
) -> Any:
    """The ``multiprocessing`` process object of a worker (not started)."""
    return context.Process(
        target=_worker.process_main,
        # Bare descriptors, not Connections: cheaper to rebuild in a worker.
        args=(_protocol.InheritedFd(task_r), _protocol.InheritedFd(result_w), config, parent_ends),
        name=config.name,
        daemon=False,  # tasks may start child processes
    )


def fork_worker(
    context: Any,
    config: _worker.WorkerConfig,
    task_r: int,
    result_w: int,
    parent_ends: tuple[int, ...],
    parent_sentinel: int,
    started: Optional[list[Any]] = None,
) -> _child.ChildProcess:
    """Fork a worker as ``multiprocessing``'s fork start method would, less its
    ``Popen`` and the replacement of ``sys.stdin``.

    The worker runs ``Process._bootstrap`` as any forked process does: a
    task sees its ``current_process()``, ``parent_process()`` (the pool's
    process, watched through ``parent_sentinel``) and start method as under
    ``multiprocessing``.  Its descriptor 0 reads from ``/dev/null`` rather
    than ``sys.stdin`` being closed and opened anew (``_stdin_from_devnull``).
    Right after a fork every page a process writes is a copy-on-write fault;
    what is left out here costs about a hundred of them in the worker, and
    more in the parent, on the way to the first result.

    The caller keeps ``task_r`` and ``result_w`` (and closes them); the
    worker closes its copies of ``parent_ends``, the parent's ends of both.
    It goes into ``started`` as soon as it exists (``_child.fork``).
    """
    process = _new_process(context, config, task_r, result_w, parent_ends)
    # Forked by the zygote, the worker is still the pool's: its parent, as
    # its tasks see it, is the pool's process.
    process._parent_pid = config.parent_pid  # type: ignore[attr-defined]
    return _child.fork(lambda: _bootstrap_forked(process, parent_sentinel), started)


#: From Python 3.13 a process multiprocessing forks runs its ``atexit``
#: handlers, registered after the fork, as it exits (CPython gh-83856).
FORKED_RUN_ATEXIT = sys.version_info >= (3, 13)


def _bootstrap_forked(process: Any, parent_sentinel: int) -> None:
    """In a worker ``fork_worker`` forked: run as a ``multiprocessing`` process
    (``Popen``'s part in the child included), and exit with its exit code."""
    from multiprocessing import util

    close_stdin = util._close_stdin  # type: ignore[attr-defined]
    util._close_stdin = lambda: _stdin_from_devnull(close_stdin)  # type: ignore[attr-defined]
    if FORKED_RUN_ATEXIT:
        import atexit

        atexit._clear()  # type: ignore[attr-defined]
        atexit.register(util._exit_function)  # type: ignore[attr-defined]
    code = 1
    try:
        code = process._bootstrap(parent_sentinel=parent_sentinel)
    finally:
        if FORKED_RUN_ATEXIT:
            atexit._run_exitfuncs()  # type: ignore[attr-defined]
        os._exit(code)


def _stdin_from_devnull(close_stdin: Any) -> None:
    """Point descriptor 0 at ``/dev/null`` (``sys.stdin`` then reads nothing);
    where ``sys.stdin`` is not descriptor 0, replace it as ``multiprocessing``
    does (``close_stdin``)."""
    stdin = sys.stdin
    if stdin is None:
        return
    try:
        on_zero = stdin.fileno() == 0
    except (AttributeError, OSError, ValueError):
        on_zero = False
    if not on_zero:
        close_stdin()
        return
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return
    if fd != 0:
        os.dup2(fd, 0)
        os.close(fd)


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


#: A frozen program cannot run ``python -c``: it spawns through multiprocessing.
_SPAWN_DIRECTLY = os.name == "posix" and not getattr(sys, "frozen", False)

#: What the new interpreter runs: ``duckpool`` comes from where this process
#: has it, whatever the child's own ``sys.path`` finds first.
_BOOT = (
    "import sys; sys.path.insert(0, {package_parent!r}); "
    "from duckpool._spawned import main; del sys.path[0]; main({data_fd})"
)


class _Launch:
    """Stands in for ``multiprocessing``'s spawning ``Popen`` while a worker's
    arguments are pickled: descriptors in them (``reduction.DupFd``: the
    worker's pipe ends, the marks, a ``multiprocessing.Queue`` in ``initargs``)
    go to the new process at the same numbers."""

    DupFd = _spawned.InheritedDupFd

    def __init__(self) -> None:
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        self.fds.append(fd)
        return fd


def spawn_worker(config: _worker.WorkerConfig, task_r: int, result_w: int) -> _child.ChildProcess:
    """Start a worker in a new interpreter, as the ``spawn`` start method
    would, but without ``multiprocessing.spawn`` in the worker (``_spawned``).

    The caller keeps ``task_r`` and ``result_w`` (and closes them).
    """
    from multiprocessing import context as mp_context
    from multiprocessing import process as mp_process
    from multiprocessing import reduction, resource_tracker, spawn, util

    _child.reap_closed()
    prep = spawn.get_preparation_data(config.name)
    if "authkey" in prep:  # plain bytes: its class would import multiprocessing
        prep["authkey"] = bytes(prep["authkey"])
    data_r, data_w = os.pipe()
    alive_r, alive_w = os.pipe()  # the sentinel where pidfds are missing
    # Where pidfds are missing, the worker's parent_process() watches this
    # process through a pipe whose write end stays here (EOF: this one died).
    parent_r, parent_w = (None, None) if _child.has_pidfds() else os.pipe()
    try:
        extra: dict[str, Any] = {
            "parent_pid": os.getpid(),
            "parent_name": mp_process.current_process().name,
            "tracker_fd": resource_tracker.getfd(),
            # The worker closes it in every process it forks (_spawned._prepare).
            "alive_fd": alive_w,
            "parent_fd": parent_r,
        }
        launch = _Launch()
        mp_context.set_spawning_popen(launch)  # type: ignore[arg-type]
        try:
            head = bytes(reduction.ForkingPickler.dumps((prep, extra)))
            body = reduction.ForkingPickler.dumps(
                (_protocol.InheritedFd(task_r), _protocol.InheritedFd(result_w), config, ())
            )
        finally:
            mp_context.set_spawning_popen(None)  # type: ignore[attr-defined]
        _enlarge(data_w)
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(_worker.__file__)))
        executable = spawn.get_executable()
        args = [
            os.fsdecode(executable),
            *util._args_from_interpreter_flags(),  # type: ignore[attr-defined]
            "-c",
            _BOOT.format(package_parent=package_parent, data_fd=data_r),
        ]
        passed = {data_r, alive_w, extra["tracker_fd"], *launch.fds}
        keep = sorted(passed if parent_r is None else passed | {parent_r})
        pid = util.spawnv_passfds(os.fsencode(executable), args, keep)  # type: ignore[attr-defined]
    except BaseException:
        for fd in (data_r, data_w, alive_r, alive_w, parent_r, parent_w):
            _child.close_quietly(fd)
        raise
    os.close(data_r)
    os.close(alive_w)
    _child.close_quietly(parent_r)
    process = _child.ChildProcess(pid, alive_r, parent_w)
    try:
        # Its length first: the worker reads that much, not up to EOF, which
        # never comes while a process forked meanwhile by another thread (a
        # fork pool starting) holds a copy of ``data_w``.
        size = 8 + len(head) + len(body)
        _protocol.write_all(
            data_w, [size.to_bytes(8, "little"), len(head).to_bytes(8, "little"), head, body]
        )
    except OSError:
        pass  # it died at once: its exit code tells the pool
    finally:
        os.close(data_w)
    return process
