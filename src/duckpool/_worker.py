"""What runs inside a worker process, and nothing else.

A worker reads task frames from its task pipe, runs the tasks one at a time
in its main thread, and writes one result frame per task to its result
pipe, in the order the tasks arrived (the frames are ``_protocol``'s).  It
marks each task it takes up as started, and answers one the parent marked
to skip as cancelled (``_marks``).  Around that loop: the worker's start
(``worker_main``: the initializer, and when to begin forwarding logs, which
``_worker_logs`` does), the parent-death watchdog, keeping the worker's
descriptors from the programs and processes its tasks start, and its exit.
The chunk runners ``map`` sends are ``_chunks``'.

This module is imported by every spawned worker: it imports as little as it can.
"""

from __future__ import annotations

import _pickle
import _thread
import os
import sys

from duckpool import _buffers, _progress, _task_forks
from duckpool._marks import marks_array, skip_base
from duckpool._protocol import (
    EXIT_PIPE_LOST,
    STATUS_BUFFERS,
    STATUS_ERROR,
    STATUS_INIT_FAILED,
    STATUS_OK,
    STATUS_READY,
    STATUS_SKIPPED,
    STATUS_UNPICKLE_FAILED,
    TASK_BUFFERS,
    TASK_ID_BYTES,
    FrameReader,
    buffered_frame,
    encode_result,
    serial_writer,
)

# The C modules under pickle, signal and threading: the Python ones import
# re, enum and weakref sets, which would be a third of a spawned worker's start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
else:
    import _signal as signal

# typing is not imported at run time: this module is what a spawned worker
# imports, and annotations are not evaluated (``from __future__``).
if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from typing import Any, Callable, Optional

    from duckpool._protocol import Frames, InheritedFd

#: How often the parent-death watchdog polls where no pidfd is available.
_PARENT_POLL_SECONDS = 0.2

#: The id of the task this worker is running, 0 between tasks (log records
#: carry it: ``_worker_logs`` asks ``running_task_id``).
current_task_id = 0

#: Result types pickled as they are: the most common, and never a buffer.
_PLAIN_RESULTS = frozenset((int, float, str, bool, type(None)))


class WorkerConfig:
    """Everything a worker needs to know, sent once when it starts.

    A plain class rather than a ``typing.NamedTuple``: a spawned worker
    unpickles it first thing, and importing ``typing`` would add to every
    worker's start.
    """

    __slots__ = (
        "forked",
        "initargs",
        "initializer",
        "log_levels",
        "marks",
        "max_memory",
        "max_workers",
        "name",
        "parent_pid",
        "pool_id",
        "serializer",
        "slot",
        "title",
        "watched",
    )

    def __init__(
        self,
        slot: int,
        max_workers: int,
        name: str,
        title: Optional[str],
        parent_pid: int,
        initializer: Optional[Callable[..., object]],
        initargs: tuple[Any, ...],
        marks: Any,
        max_memory: Optional[int],
        serializer: str,
        log_levels: Optional[dict[str, int]] = None,
        pool_id: Any = None,
        forked: bool = False,
        watched: bool = False,
    ) -> None:
        self.slot = slot
        self.max_workers = max_workers
        #: multiprocessing's name for the process: ``<prefix>-<slot>``.
        self.name = name
        #: The OS process title to set, if any.
        self.title = title
        self.parent_pid = parent_pid
        self.initializer = initializer
        self.initargs = initargs
        #: The started and skip marks shared with the parent (``_marks``).
        self.marks = marks
        #: Exit after a task that leaves the worker's RSS above this many bytes.
        self.max_memory = max_memory
        #: "pickle" or "cloudpickle": how results and errors are pickled.
        self.serializer = serializer
        #: Forward the worker's log records to the parent, with the parent's
        #: logger levels to mirror (``{name: level}``, ``""`` for the root);
        #: None leaves the worker's logging alone.
        self.log_levels = log_levels
        #: The pool's id, tagged on forwarded records as ``duckpool_pool``.
        self.pool_id = pool_id
        #: Forked from the pool's parent or its zygote: the worker inherits the
        #: parent's modules and logging as they were when the pool started.
        self.forked = forked
        #: The pool's zygote kills this worker as soon as the parent dies: it
        #: needs no watchdog thread of its own (see ``watch_parent``).
        self.watched = watched


def dump_exception(exc: BaseException, dumps: Callable[..., bytes] = _pickle.dumps) -> bytes:
    """Pickle ``(exc, traceback_text)``, degrading to a picklable stand-in."""
    import traceback  # only when a task fails: it is not cheap to import

    def text(make: Callable[[], str]) -> str:  # (a hostile __str__ may raise anything)
        try:
            return make()
        except BaseException as error:
            return f"<not shown: {type(error).__qualname__} raised>"

    tb_text = text(lambda: "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    try:
        return dumps((exc, tb_text), _buffers.PROTOCOL)
    except BaseException as pickling_error:
        why = pickling_error
        stand_in = RuntimeError(
            f"the task raised {type(exc).__qualname__}: {text(lambda: str(exc))} "
            f"(the exception itself could not be pickled: {text(lambda: repr(why))})"
        )
        return _pickle.dumps((stand_in, tb_text), _buffers.PROTOCOL)


def _rss_reader() -> Callable[[], int]:
    """A function returning this process's resident set size in bytes."""
    import psutil

    memory_info = psutil.Process().memory_info
    return lambda: int(memory_info().rss)


def watch_parent(parent_pid: int) -> None:
    """Exit this worker as soon as the parent process is gone.

    A pidfd becomes readable when the process exits, whoever its parent is
    (under forkserver the worker's parent is the fork server, so getppid()
    alone would not do); where pidfds are missing, poll.
    """
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is not None:
        try:
            fd = pidfd_open(parent_pid)
        except ProcessLookupError:
            os._exit(1)
        except OSError:
            pass
        else:
            import select

            select.select([fd], [], [])
            os._exit(1)
    import time

    while True:
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:
            pass
        time.sleep(_PARENT_POLL_SECONDS)


def close_on_exec(task_fd: int, result_fd: int) -> None:
    """Keep the descriptors this worker was started with from the programs its tasks run.

    Under spawn and forkserver they arrive inheritable, as passing them
    needs; left so, every program a task runs without ``close_fds``
    (``os.system``, ``Popen(close_fds=False)``, ``os.execv``) would hold the
    pipes to the parent (writing into the result pipe, keeping it open after
    the worker's death) and the resource tracker's pipe.  A process a task
    forks still has them all: fork keeps descriptors whatever their flag.
    (Spawned workers start with every descriptor so marked, see ``_spawned``.)
    """
    fds: list[Any] = [task_fd, result_fd]
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    if tracker is not None:
        fds.append(getattr(getattr(tracker, "_resource_tracker", None), "_fd", None))
    process = sys.modules.get("multiprocessing.process")
    forkserver = sys.modules.get("multiprocessing.forkserver")
    if (
        process is not None
        and forkserver is not None
        and getattr(process.current_process(), "_start_method", None) == "forkserver"
    ):
        # What the fork server handed this process: its "alive" pipe, then the
        # descriptors pickled with the worker's arguments (its pipes, the
        # marks, any in ``initargs``).
        server = getattr(forkserver, "_forkserver", None)
        fds.append(getattr(server, "_forkserver_alive_fd", None))
        fds.extend(forkserver.get_inherited_fds() or ())
    for fd in fds:
        if fd is None:
            continue
        try:
            os.set_inheritable(fd, False)
        except OSError:  # closed already (the marks' memfd, once mapped)
            pass


def _ignore_interrupt(signum: int, frame: object) -> None:
    """SIGINT goes to the whole foreground process group on Ctrl-C; the parent
    decides what to stop, so a worker neither dies nor prints a traceback."""


def _prepare(config: WorkerConfig) -> None:
    """Name the process, ignore Ctrl-C, and start the parent-death watchdog if it needs one."""
    if config.title:
        import setproctitle

        setproctitle.setproctitle(config.title)
    signal.signal(signal.SIGINT, _ignore_interrupt)
    # The parent starts workers with SIGINT blocked (Launcher.launch, _child.fork).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if not config.watched:
        # A bare thread: threading would be imported for this one alone.
        _thread.start_new_thread(watch_parent, (config.parent_pid,))


def forward_logs_from_first_record(send: Callable[[bytes], None], config: WorkerConfig) -> None:
    """Under fork: install log forwarding when a record first reaches a handler.

    A forked worker inherits the parent's logging as it was when the pool
    started, levels included (the very levels a worker mirrors), so nothing
    needs changing before a task logs.  Installing at start would import
    ``_worker_logs`` and touch every logger: pages that every idle worker
    would then hold a private copy of.  The first record that reaches
    ``Logger.callHandlers`` installs the forwarder in place of the handlers
    the worker started with, and is then handled as any later one.

    A process a task forks before any record was handled logs as any forked
    process does, through the handlers it inherited; never to the result pipe.
    """
    import logging  # the parent imported it (concurrent.futures does): no import here

    logger_class = logging.Logger
    call_handlers = logger_class.callHandlers
    # Weak references to every handler that exists now, in creation order.
    handler_refs = getattr(logging, "_handlerList", None)
    started_with = None if handler_refs is None else list(handler_refs)
    install_lock = _thread.allocate_lock()
    installer = [0]  # the thread installing now (0: none)

    def first_call_handlers(logger: logging.Logger, record: logging.LogRecord) -> None:
        if installer[0] == _thread.get_ident():
            # A finalizer logging in the middle of this thread's install: the
            # handlers there are, as they are (waiting would wait for ever).
            call_handlers(logger, record)
            return
        with install_lock:  # the task's threads may log their first records at once
            installer[0] = _thread.get_ident()
            try:
                if logger_class.callHandlers is first_call_handlers:
                    from duckpool import _worker_logs

                    inherited = None
                    if started_with is not None:
                        inherited = {ref() for ref in started_with} - {None}
                    _worker_logs.install(send, config, running_task_id, inherited)
                    logger_class.callHandlers = call_handlers  # type: ignore[method-assign]
            finally:
                installer[0] = 0
        call_handlers(logger, record)

    def in_forked_child() -> None:
        if logger_class.callHandlers is first_call_handlers:
            logger_class.callHandlers = call_handlers  # type: ignore[method-assign]

    logger_class.callHandlers = first_call_handlers  # type: ignore[method-assign,assignment]
    os.register_at_fork(after_in_child=in_forked_child)


def _forward_logs(send: Callable[[bytes], None], config: WorkerConfig) -> None:
    """Forward what this worker logs to the parent, from when ``logging`` is loaded.

    Now if it is (inherited under fork, or imported by the main module); else
    the moment something imports it: a spawned worker whose tasks never log
    does not pay for importing it at every start.
    """

    def install() -> None:
        from duckpool import _worker_logs

        _worker_logs.install(send, config, running_task_id)

    if "logging" in sys.modules:
        install()
        return
    from duckpool import _import_hooks

    # A process a task forks must not write to this worker's pipe (see
    # _worker_logs._uninstall): it does not install forwarding either.
    _import_hooks.after_import("logging", install)


def running_task_id() -> int:
    """The id of the task this worker is running, 0 between tasks."""
    return current_task_id


def worker_main(
    task_conn: Connection | InheritedFd,
    result_conn: Connection | InheritedFd,
    config: WorkerConfig,
    parent_ends: tuple[int, ...] = (),
) -> None:
    """Entry point of a worker process: serve tasks until told to stop.

    ``parent_ends``: under fork, the parent's ends of this worker's own pipes,
    inherited with the fork and closed here, so that the task pipe reads as
    closed once the parent is gone.
    """
    for fd in parent_ends:
        os.close(fd)
    result_fd = result_conn.fileno()
    close_on_exec(task_conn.fileno(), result_fd)
    _task_forks.guard(task_conn.fileno(), result_fd)
    _prepare(config)

    send = serial_writer(result_fd)  # (the task's threads may log while a result goes)

    if config.log_levels is not None:
        if config.forked:
            forward_logs_from_first_record(send, config)
        else:
            _forward_logs(send, config)
    if config.initializer is not None:
        try:
            config.initializer(*config.initargs)
        except BaseException as exc:
            if _task_forks.forked:
                _task_forks.leave(exc)
            import logging

            # The standard library logs here too; keeping its logger name lets
            # existing log configuration (and CPython's own tests) see it.
            logging.getLogger("concurrent.futures").critical(
                "Exception in initializer:", exc_info=True
            )
            send(encode_result(0, STATUS_INIT_FAILED, dump_exception(exc)))
            return
        if _task_forks.forked:
            _task_forks.leave(None)
    area, offer = _buffers.create_area()
    pipe = os.fstat(result_fd)
    try:
        send(encode_result(0, STATUS_READY, offer))
        _serve(FrameReader(task_conn.fileno()).read_blocking, send, config, _Transfer(area))
    except BrokenPipeError:
        # The parent closed this worker's result pipe: it gave up on it (a
        # start it saw fail when the fork server died midway) or is gone.
        # Nobody reads what this worker would say: it leaves, quietly.
        return
    except OSError as exc:
        # Its result pipe failed under it (EBADF: a task closed it)?  Nothing
        # can reach the pool then: the exit code says why (``_errors``).
        _leave_if_replaced(result_fd, pipe, exc)
        raise


def _leave_if_replaced(fd: int, pipe: os.stat_result, exc: OSError) -> None:
    """Exit with ``EXIT_PIPE_LOST`` if ``fd`` is no longer ``pipe`` (closed,
    or another file in its place), saying why on stderr."""
    try:
        if os.path.samestat(os.fstat(fd), pipe):
            return
    except OSError:
        pass
    try:
        os.write(2, f"duckpool worker {os.getpid()}: its pipe to the pool failed: {exc}\n".encode())
    except BaseException:
        pass
    os._exit(EXIT_PIPE_LOST)


def process_main(
    task_conn: Connection | InheritedFd,
    result_conn: Connection | InheritedFd,
    config: WorkerConfig,
    parent_ends: tuple[int, ...] = (),
) -> None:
    """A ``multiprocessing`` process's target: ``worker_main``, then the exit."""
    worker_main(task_conn, result_conn, config, parent_ends)
    exit_if_nothing_left()


def exit_if_nothing_left() -> None:
    """End this process now if ``multiprocessing``'s exit would do nothing more.

    After its target returns, a process ``multiprocessing`` started runs its
    finalizers, stops and joins its own children, waits for its other threads
    and logs that it exits; from Python 3.13 it also runs the ``atexit``
    handlers registered since its start (one is ``multiprocessing``'s own).
    With none of those there, that path only costs time, most of it
    copy-on-write faults in a forked process: a few hundred microseconds on
    every worker's way out, at every shutdown.
    """
    util = sys.modules.get("multiprocessing.util")
    process = sys.modules.get("multiprocessing.process")
    threading = sys.modules.get("threading")
    if util is None or process is None:
        return
    started_by = getattr(process.current_process(), "_start_method", None)
    if started_by not in ("fork", "forkserver"):
        return  # spawned: the interpreter's own exit follows (atexit and all)
    if (
        getattr(util, "_finalizer_registry", True)
        or getattr(util, "_logger", True) is not None
        or getattr(process, "_children", True)
        or (threading is not None and threading.active_count() > 1)
        or (sys.version_info >= (3, 13) and _atexit_handlers() > 1)
    ):
        return  # multiprocessing has work to do on the way out
    flush_std_streams()
    os._exit(0)


def flush_std_streams() -> None:
    """Flush ``sys.stdout`` and ``sys.stderr``, whatever state they are in."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (AttributeError, ValueError, OSError):
            pass


def _atexit_handlers() -> int:
    import atexit

    return int(atexit._ncallbacks())  # type: ignore[attr-defined]


class _Transfer:
    """A worker's side of its shared area (see ``_buffers``)."""

    __slots__ = ("area", "released", "results")

    def __init__(self, area: Optional[_buffers.Area]) -> None:
        self.area = area
        #: The results region, once the parent said it mapped the area.
        self.results: Optional[_buffers.Region] = None
        #: Result frames whose area space the parent has released, so far.
        self.released = 0

    def on_release(self, body: memoryview) -> None:
        """A release frame: free the space of results the parent copied out."""
        area = self.area
        if area is None:
            return
        count = int.from_bytes(body[:8], "little")
        self.results = area.results
        while self.released < count:
            area.results.release()
            self.released += 1


def _serve(
    recv: Callable[[], list[bytes]],
    send: Callable[[Frames], None],
    config: WorkerConfig,
    transfer: _Transfer,
) -> None:
    """The task loop: one frame in, one frame out, in order."""
    loads = _pickle.loads
    if config.serializer == "cloudpickle":
        import cloudpickle

        dumps: Callable[..., bytes] = cloudpickle.dumps
    else:
        dumps = _pickle.dumps
    protocol = _buffers.PROTOCOL
    _progress.install(send, sys.modules[__name__])
    marks = marks_array(config.marks)
    slot = config.slot
    capacity = config.max_workers
    skip = (capacity + slot, skip_base(capacity, slot), skip_base(capacity, slot + 1))
    # Set while it waits for frames, and only then (see _marks: the parent
    # tells a worker starved of the bytes of a frame from a busy one).
    reading_cell = 2 * capacity + slot
    rss = _rss_reader() if config.max_memory is not None else None
    global current_task_id
    while True:
        marks[reading_cell] = 1
        try:
            frames = recv()
        except OSError:
            return  # the parent is gone or closed the pipe
        marks[reading_cell] = 0
        if not frames:
            return
        frames.reverse()
        while frames:
            if not frames[-1]:
                return  # an empty frame: stop
            # Popped, not iterated: a frame is freed as soon as it is decoded.
            if not _run_one(
                frames.pop(), send, loads, dumps, protocol, marks, slot, skip, transfer
            ):
                continue  # a release frame: no task ran
            current_task_id = 0
            if rss is not None and config.max_memory is not None and rss() > config.max_memory:
                return  # recycled: the parent requeues what was queued here


def _run_one(
    frame: bytes,
    send: Callable[[Frames], None],
    loads: Callable[..., Any],
    dumps: Callable[..., bytes],
    protocol: int,
    marks: Any,
    slot: int,
    skip: tuple[int, int, int],  # (its skip count cell; where its skip cells begin, end)
    transfer: _Transfer,
) -> bool:
    """Run one task frame and send its result frame; False for a release frame."""
    global current_task_id
    view = memoryview(frame)
    task_id = int.from_bytes(view[:TASK_ID_BYTES], "little")
    if not task_id:
        transfer.on_release(view[TASK_ID_BYTES:])
        return False
    buffered = task_id & TASK_BUFFERS
    task_id &= ~TASK_BUFFERS
    marks[slot] = task_id
    current_task_id = task_id
    if marks[skip[0]] and task_id in marks[skip[1] : skip[2]]:  # cancelled while queued here
        send(encode_result(task_id, STATUS_SKIPPED, b""))
        return True
    try:
        if buffered:
            area = transfer.area
            received, _ = _buffers.decode(
                view[TASK_ID_BYTES:], None if area is None else area.calls.view
            )
            fn, args, kwargs = _buffers.loads(loads, received)
            del received
        else:
            fn, args, kwargs = loads(view[TASK_ID_BYTES:])
    except BaseException as exc:
        if _task_forks.forked:  # (forked by unpickling the call)
            _task_forks.leave(exc)
        send(encode_result(task_id, STATUS_UNPICKLE_FAILED, dump_exception(exc)))
        return True
    if _task_forks.forked:
        _task_forks.leave(None)
    del view, frame
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        if _task_forks.forked:
            _task_forks.leave(exc)
        # SystemExit and KeyboardInterrupt raised by a task are that task's
        # outcome, not an order to this worker.
        if _progress.pending is not None:  # its last update, before its result
            _progress.flush()
        send(encode_result(task_id, STATUS_ERROR, dump_exception(exc, dumps)))
        return True
    finally:
        del fn, args, kwargs
    if _task_forks.forked:
        _task_forks.leave(None)
    if _progress.pending is not None:
        _progress.flush()
    try:
        if type(result) in _PLAIN_RESULTS:  # nothing out of band, surely
            payload, buffers = dumps(result, protocol), None
        else:
            payload, buffers = _buffers.dumps(dumps, _buffers.wrap(result), protocol)
    except BaseException as exc:
        send(encode_result(task_id, STATUS_ERROR, dump_exception(exc)))
        return True
    if _task_forks.forked:  # (forked by pickling the result)
        _task_forks.leave(None)
    if not buffers:
        del result
        send(encode_result(task_id, STATUS_OK, payload))
        return True
    body, _ = _buffers.encode(payload, _buffers.outgoing(buffers, False), transfer.results)
    del result, buffers
    head = task_id.to_bytes(TASK_ID_BYTES, "little") + bytes((STATUS_OK | STATUS_BUFFERS,))
    send(buffered_frame(head, body))
    return True


if __name__ == "__main__":  # pragma: no cover - not an entry point
    sys.exit("duckpool._worker is started by duckpool, not run directly")
