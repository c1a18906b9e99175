"""What runs inside a worker process, and nothing else.

A worker reads task frames from its task pipe, runs them one at a time in its
main thread, and writes one result frame per task to its result pipe, in the
order the tasks arrived.  The frame layouts are the whole protocol between
the parent (``_executor``) and a worker:

* task frame (parent -> worker): ``task_id`` (8 bytes, little endian) followed
  by the pickle of ``(fn, args, kwargs)``; an empty frame asks the worker to exit.
* result frame (worker -> parent): ``task_id`` (8 bytes), one status byte,
  then a pickle: the return value for ``STATUS_OK``, or ``(exception,
  traceback_text)`` for ``STATUS_ERROR``, ``STATUS_UNPICKLE_FAILED`` (the
  task's call itself could not be unpickled) and ``STATUS_INIT_FAILED``.  A
  worker sends one ``STATUS_READY`` frame (task id 0, no payload) once its
  initializer has run.
* log frame (worker -> parent, when the pool forwards logs): ``STATUS_LOG``,
  the id of the task running when the record was made (0 between tasks), and
  the pickle of a ``logging.LogRecord``'s attributes (see ``_worker_logs``).
  It answers no task: any number may come between two result frames.

Besides the pipes, a worker shares one array with the parent: in cell
``slot`` it writes the id of each task it takes up (so that after a death the
parent knows whether the task had started), and in cell ``max_workers + slot``
the parent may write the id of a queued task the worker must skip.

The task id travels outside the pickle so that a payload that fails to
unpickle, on either side, fails only its own future.

This module is imported by every spawned worker: it imports as little as it can.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

STATUS_OK = 0
STATUS_ERROR = 1
STATUS_INIT_FAILED = 2
STATUS_READY = 3
STATUS_UNPICKLE_FAILED = 4
STATUS_LOG = 5

TASK_ID_BYTES = 8
RESULT_HEADER_BYTES = TASK_ID_BYTES + 1

#: How often the parent-death watchdog polls where no pidfd is available.
_PARENT_POLL_SECONDS = 0.2
#: Bytes asked of the kernel per read(): a pipe holds 64 KiB by default.
_READ_SIZE = 1 << 16
_LONG_FRAME = b"\xff\xff\xff\xff"

#: The id of the task this worker is running, 0 between tasks (log records
#: carry it).
current_task_id = 0


def wire(frame: bytes) -> bytes:
    """A frame as ``multiprocessing.connection.Connection.send_bytes`` writes it."""
    size = len(frame)
    if size < 0x7FFFFFFF:
        return size.to_bytes(4, "big") + frame
    return _LONG_FRAME + size.to_bytes(8, "big") + frame


def task_frame(task_id: int, payload: bytes) -> bytes:
    """A task frame as written to the pipe: length header, task id, pickle."""
    size = TASK_ID_BYTES + len(payload)
    if size >= 0x7FFFFFFF:
        return wire(task_id.to_bytes(TASK_ID_BYTES, "little") + payload)
    return b"".join((size.to_bytes(4, "big"), task_id.to_bytes(TASK_ID_BYTES, "little"), payload))


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to a blocking pipe."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class FrameReader:
    """Reads ``Connection``-format frames from a pipe, as many as one read() brings.

    ``Connection.recv_bytes`` costs two system calls per frame; a busy pool
    has many small frames waiting, and this reads them all at once.  A large
    frame is asked for whole, in one read of its remaining size, and frames
    are cut from what was read with one copy each (none when a read brought
    exactly whole frames).
    """

    __slots__ = ("_buffer", "_fd")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()

    def read_available(self) -> tuple[list[bytes], bool]:
        """Frames complete now, from a non-blocking pipe; and whether it hit EOF."""
        eof = False
        frames: list[bytes] = []
        while True:
            wanted = self._wanted()
            try:
                chunk = os.read(self._fd, wanted)
            except BlockingIOError:
                break
            except OSError:
                eof = True
                break
            if not chunk:
                eof = True
                break
            frames += self._take(chunk)
            if len(chunk) < wanted:
                break
        return frames, eof

    def read_blocking(self) -> list[bytes]:
        """At least one frame, waiting for it; an empty list at EOF."""
        while True:
            chunk = os.read(self._fd, self._wanted())
            if not chunk:
                return []
            frames = self._take(chunk)
            if frames:
                return frames

    def _wanted(self) -> int:
        """How much one read asks for: at least the rest of the frame begun."""
        buffer = self._buffer
        if len(buffer) < 4:
            return _READ_SIZE
        size, header = _frame_size(buffer)
        if size < 0:
            return _READ_SIZE
        return max(_READ_SIZE, header + size - len(buffer))

    def _take(self, chunk: bytes) -> list[bytes]:
        """Add what was read; return the frames now complete."""
        if self._buffer:
            self._buffer += chunk
            return self._split()
        # Nothing buffered: cut frames out of the chunk itself.
        frames: list[Any] = []
        view = memoryview(chunk)
        position, end = 0, len(chunk)
        while end - position >= 4:
            size, header = _frame_size(view[position:])
            start = position + header
            if size < 0 or end - start < size:
                break
            frames.append(view[start : start + size])
            position = start + size
        if position < end:
            self._buffer += view[position:]
        return frames

    def _split(self) -> list[bytes]:
        buffer = self._buffer
        end = len(buffer)
        position = 0
        frames: list[bytes] = []
        with memoryview(buffer) as view:
            while end - position >= 4:
                size, header = _frame_size(view[position:])
                start = position + header
                if size < 0 or end - start < size:
                    break
                frames.append(bytes(view[start : start + size]))
                position = start + size
        if position:
            del buffer[:position]
        return frames


def _frame_size(data: Any) -> tuple[int, int]:
    """The size of the frame ``data`` begins with, and its header's; -1 if unknown yet."""
    size = int.from_bytes(data[:4], "big")
    if size != 0xFFFFFFFF:
        return size, 4
    if len(data) < 12:
        return -1, 12
    return int.from_bytes(data[4:12], "big"), 12


class WorkerConfig(NamedTuple):
    """Everything a worker needs to know, sent once when it starts."""

    slot: int
    max_workers: int
    #: multiprocessing's name for the process: ``<prefix>-<slot>``.
    name: str
    #: The OS process title to set, if any.
    title: Optional[str]
    parent_pid: int
    initializer: Optional[Callable[..., object]]
    initargs: tuple[Any, ...]
    #: The shared ``RawArray('Q')`` of started and skip marks (see above).
    marks: Any
    #: Exit after a task that leaves the worker's RSS above this many bytes.
    max_memory: Optional[int]
    #: "pickle" or "cloudpickle": how results and errors are pickled.
    serializer: str
    #: Forward the worker's log records to the parent, with the parent's
    #: logger levels to mirror (``{name: level}``, ``""`` for the root); None
    #: leaves the worker's logging alone.
    log_levels: Optional[dict[str, int]] = None
    #: The pool's id, tagged on forwarded records as ``duckpool_pool``.
    pool_id: Any = None
    #: Forked from the pool's parent or its zygote: the worker inherits the
    #: parent's modules and logging as they were when the pool started.
    forked: bool = False
    #: The pool's zygote kills this worker as soon as the parent dies: it
    #: needs no watchdog thread of its own (see ``watch_parent``).
    watched: bool = False


def encode_result(task_id: int, status: int, payload: bytes) -> bytes:
    """A result frame as written to the pipe: length header, task id, status, pickle."""
    size = RESULT_HEADER_BYTES + len(payload)
    head = task_id.to_bytes(TASK_ID_BYTES, "little") + bytes((status,))
    if size >= 0x7FFFFFFF:
        return wire(head + payload)
    return b"".join((size.to_bytes(4, "big"), head, payload))


def dump_exception(exc: BaseException, dumps: Callable[..., bytes] = pickle.dumps) -> bytes:
    """Pickle ``(exc, traceback_text)``, degrading to a picklable stand-in."""
    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        return dumps((exc, tb_text), pickle.HIGHEST_PROTOCOL)
    except BaseException as pickling_error:
        stand_in = RuntimeError(
            f"the task raised {type(exc).__qualname__}: {exc!s} "
            f"(the exception itself could not be pickled: {pickling_error!r})"
        )
        return pickle.dumps((stand_in, tb_text), pickle.HIGHEST_PROTOCOL)


def _rss_reader() -> Callable[[], int]:
    """A function returning this process's resident set size in bytes."""
    import psutil

    memory_info = psutil.Process().memory_info
    return lambda: int(memory_info().rss)


def run_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    """Apply ``fn`` to each argument tuple of a ``map`` chunk."""
    return [fn(*args) for args in chunk]


class ItemError:
    """What ``run_items`` gives for an item that raised: its pickled error."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        #: ``(exception, traceback text)``, as ``dump_exception`` pickles it.
        self.payload = payload

    def __reduce__(self) -> tuple[Any, ...]:
        return (ItemError, (self.payload,))


def run_items(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    """Like ``run_chunk``, but an item that raises does not stop the others.

    Its place holds an :class:`ItemError`, so a chunk chosen by ``map``
    itself behaves as if every item had been its own task.
    """
    results: list[Any] = []
    for args in chunk:
        try:
            results.append(fn(*args))
        except BaseException as exc:  # a task's outcome, as in _run_one
            results.append(ItemError(dump_exception(exc)))
    return results


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


def _ignore_interrupt(signum: int, frame: object) -> None:
    """SIGINT goes to the whole foreground process group on Ctrl-C; the parent
    decides what to stop, so a worker neither dies nor prints a traceback."""


def _prepare(config: WorkerConfig) -> None:
    """Name the process, ignore Ctrl-C, and start the parent-death watchdog if it needs one."""
    if config.title:
        import setproctitle

        setproctitle.setproctitle(config.title)
    signal.signal(signal.SIGINT, _ignore_interrupt)
    # The parent starts workers with SIGINT blocked (see _core.start_worker).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if not config.watched:
        threading.Thread(
            target=watch_parent,
            args=(config.parent_pid,),
            name="duckpool-parent-watchdog",
            daemon=True,
        ).start()


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
    install_lock = threading.Lock()

    def first_call_handlers(logger: logging.Logger, record: logging.LogRecord) -> None:
        with install_lock:  # the task's threads may log their first records at once
            if logger_class.callHandlers is first_call_handlers:
                from duckpool import _worker_logs

                inherited = None
                if started_with is not None:
                    inherited = {ref() for ref in started_with} - {None}
                _worker_logs.install(send, config, inherited)  # type: ignore[arg-type]
                logger_class.callHandlers = call_handlers  # type: ignore[method-assign]
        call_handlers(logger, record)

    def in_forked_child() -> None:
        if logger_class.callHandlers is first_call_handlers:
            logger_class.callHandlers = call_handlers  # type: ignore[method-assign]

    logger_class.callHandlers = first_call_handlers  # type: ignore[method-assign,assignment]
    os.register_at_fork(after_in_child=in_forked_child)


def worker_main(task_conn: Connection, result_conn: Connection, config: WorkerConfig) -> None:
    """Entry point of a worker process: serve tasks until told to stop."""
    _prepare(config)
    result_fd = result_conn.fileno()

    def send(frame: bytes) -> None:
        write_all(result_fd, frame)

    if config.log_levels is not None:
        # Threads of a task may log while the main thread writes a result:
        # frames must not interleave, so every write takes the lock.
        write_lock = threading.Lock()

        def send(frame: bytes) -> None:
            with write_lock:
                write_all(result_fd, frame)

        if config.forked:
            forward_logs_from_first_record(send, config)
        else:
            from duckpool import _worker_logs

            _worker_logs.install(send, config)
    if config.initializer is not None:
        try:
            config.initializer(*config.initargs)
        except BaseException as exc:
            import logging

            # The standard library logs here too; keeping its logger name lets
            # existing log configuration (and CPython's own tests) see it.
            logging.getLogger("concurrent.futures").critical(
                "Exception in initializer:", exc_info=True
            )
            send(encode_result(0, STATUS_INIT_FAILED, dump_exception(exc)))
            return
    send(encode_result(0, STATUS_READY, b""))
    _serve(FrameReader(task_conn.fileno()).read_blocking, send, config)


def _serve(
    recv: Callable[[], list[bytes]], send: Callable[[bytes], None], config: WorkerConfig
) -> None:
    """The task loop: one frame in, one frame out, in order."""
    loads = pickle.loads
    if config.serializer == "cloudpickle":
        import cloudpickle

        dumps: Callable[..., bytes] = cloudpickle.dumps
    else:
        dumps = pickle.dumps
    protocol = pickle.HIGHEST_PROTOCOL
    marks = config.marks
    slot = config.slot
    skip_cell = config.max_workers + slot
    rss = _rss_reader() if config.max_memory is not None else None
    global current_task_id
    while True:
        try:
            frames = recv()
        except OSError:
            return  # the parent is gone or closed the pipe
        if not frames:
            return
        frames.reverse()
        while frames:
            if not frames[-1]:
                return  # an empty frame: stop
            # Popped, not iterated: a frame is freed as soon as it is decoded.
            _run_one(frames.pop(), send, loads, dumps, protocol, marks, slot, skip_cell)
            current_task_id = 0
            if rss is not None and config.max_memory is not None and rss() > config.max_memory:
                return  # recycled: the parent requeues what was queued here


def _run_one(
    frame: bytes,
    send: Callable[[bytes], None],
    loads: Callable[..., Any],
    dumps: Callable[..., bytes],
    protocol: int,
    marks: Any,
    slot: int,
    skip_cell: int,
) -> None:
    """Run one task frame and send its result frame."""
    global current_task_id
    view = memoryview(frame)
    task_id = int.from_bytes(view[:TASK_ID_BYTES], "little")
    marks[slot] = task_id
    current_task_id = task_id
    if marks[skip_cell] == task_id:  # cancelled while queued here
        send(encode_result(task_id, STATUS_ERROR, dump_exception(_skipped(task_id))))
        return
    try:
        fn, args, kwargs = loads(view[TASK_ID_BYTES:])
    except BaseException as exc:
        send(encode_result(task_id, STATUS_UNPICKLE_FAILED, dump_exception(exc)))
        return
    del view, frame
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        # SystemExit and KeyboardInterrupt raised by a task are that task's
        # outcome, not an order to this worker.
        send(encode_result(task_id, STATUS_ERROR, dump_exception(exc, dumps)))
        return
    finally:
        del fn, args, kwargs
    try:
        payload = dumps(result, protocol)
    except BaseException as exc:
        send(encode_result(task_id, STATUS_ERROR, dump_exception(exc)))
        return
    del result
    send(encode_result(task_id, STATUS_OK, payload))


def _skipped(task_id: int) -> BaseException:
    from concurrent.futures import CancelledError

    return CancelledError(f"task {task_id} was cancelled before it started")


if __name__ == "__main__":  # pragma: no cover - not an entry point
    sys.exit("duckpool._worker is started by duckpool, not run directly")
