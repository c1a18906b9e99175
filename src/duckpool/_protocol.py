"""The protocol between the parent's pool engine and a worker: frames on two pipes.

Each worker has two pipes: the parent writes task frames to its task pipe,
the worker writes result frames (and log frames) to its result pipe.  A
frame is what ``multiprocessing.connection.Connection.send_bytes`` writes: a
4-byte big-endian length, or for a frame of ``_LONG_FRAME`` bytes or more,
``_LONG_FRAME_MARK`` and an 8-byte length; then the frame.  The frames:

* task frame (parent -> worker): ``task_id`` (8 bytes, little endian) followed
  by the pickle of ``(fn, args, kwargs)``; an empty frame asks the worker to exit.
  With ``TASK_BUFFERS`` set in the task id, a ``_buffers`` body (the pickle
  and its large buffers, inline or in the worker's shared area) replaces the
  pickle.  Task id 0 is a release frame: an 8-byte count of the result
  frames whose buffers the parent has copied out of the shared area so far.
* result frame (worker -> parent): ``task_id`` (8 bytes), one status byte,
  then a pickle: the return value for ``STATUS_OK``, or ``(exception,
  traceback_text)`` for ``STATUS_ERROR``, ``STATUS_UNPICKLE_FAILED`` (the
  task's call itself could not be unpickled) and ``STATUS_INIT_FAILED``;
  nothing for ``STATUS_SKIPPED`` (the task was cancelled before it started:
  its skip mark was set, see below).  A
  worker sends one ``STATUS_READY`` frame (task id 0) once its initializer
  has run, with its shared area's offer (``_buffers.create_area``) if it made
  one.  ``STATUS_OK | STATUS_BUFFERS``: a ``_buffers`` body in the pickle's
  place.
* log frame (worker -> parent, when the pool forwards logs): ``STATUS_LOG``,
  the id of the task running when the record was made (0 between tasks), and
  the pickle of a ``logging.LogRecord``'s attributes (see ``_worker_logs``).
  It answers no task: any number may come between two result frames.
* progress frame (worker -> parent): ``STATUS_PROGRESS``, the id of the
  running task, and the pickle of ``(done, total, message, offset)`` (see
  ``_progress``).  It answers no task either; the last one of a task comes
  before its result frame.

The worker answers its tasks one at a time, in the order they arrived.

The shared area only ever holds buffers the reader has not copied out yet:
the parent reuses the space a call took once that task's result frame came
back; the worker, the space a result took once a release frame said so.  A
pipe carries every such "done" (the kernel's locks order the copies on both
sides before it), never a flag in shared memory.

Besides the pipes, a worker shares the started and skip marks with the
parent (``_marks``).

The task id travels outside the pickle so that a payload that fails to
unpickle, on either side, fails only its own future.

Both sides import this module, and every spawned worker does: it imports
nothing but ``os`` and ``_thread``.
"""

from __future__ import annotations

import _thread
import os

# typing is not imported at run time: a spawned worker imports this module,
# and annotations are not evaluated (``from __future__``).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Optional, Union

    #: What goes to a pipe: bytes, or parts written with one ``os.writev``.
    Frames = Union[bytes, list[Any]]

STATUS_OK = 0
STATUS_ERROR = 1
STATUS_INIT_FAILED = 2
STATUS_READY = 3
STATUS_UNPICKLE_FAILED = 4
STATUS_LOG = 5
STATUS_PROGRESS = 6
STATUS_SKIPPED = 7
#: Or'ed into a result frame's status: a ``_buffers`` body follows.
STATUS_BUFFERS = 0x80
#: Or'ed into a task frame's id: a ``_buffers`` body follows.
TASK_BUFFERS = 1 << 63

TASK_ID_BYTES = 8
RESULT_HEADER_BYTES = TASK_ID_BYTES + 1

#: A worker's exit code when its pipe to the pool failed under it (a task
#: closed or replaced a descriptor the worker owns): its answer cannot go.
EXIT_PIPE_LOST = 93

#: Bytes asked of the kernel per read(): a pipe holds 64 KiB by default.
_READ_SIZE = 1 << 16
#: A frame at least this large is read straight into a buffer of its own.
_LARGE_FRAME = _READ_SIZE
#: A frame this large or larger has a long length header (``Connection``'s
#: 4-byte length is signed): ``_LONG_FRAME_MARK``, then 8 bytes.
_LONG_FRAME = 0x7FFFFFFF
_LONG_FRAME_MARK = b"\xff\xff\xff\xff"
#: The most parts one writev() takes (Linux's IOV_MAX).
IOV_MAX = 1024


def wire(frame: bytes) -> bytes:
    """A frame as ``multiprocessing.connection.Connection.send_bytes`` writes it."""
    return frame_header(len(frame)) + frame


def frame_header(size: int) -> bytes:
    """The length header of a frame of ``size`` bytes."""
    if size < _LONG_FRAME:
        return size.to_bytes(4, "big")
    return _LONG_FRAME_MARK + size.to_bytes(8, "big")


def buffered_frame(head: bytes, body: list[Any]) -> list[Any]:
    """A frame of ``head`` (task id, status) and a ``_buffers`` body, as parts."""
    size = len(head)
    for part in body:
        size += memoryview(part).nbytes
    return [frame_header(size) + head, *body]


def release_frame(count: int) -> bytes:
    """The frame telling a worker how many result frames' area space is free."""
    return wire(bytes(TASK_ID_BYTES) + count.to_bytes(8, "little"))


def task_frame(task_id: int, payload: bytes) -> bytes:
    """A task frame as written to the pipe: length header, task id, pickle."""
    size = TASK_ID_BYTES + len(payload)
    if size >= _LONG_FRAME:
        return wire(task_id.to_bytes(TASK_ID_BYTES, "little") + payload)
    return b"".join((size.to_bytes(4, "big"), task_id.to_bytes(TASK_ID_BYTES, "little"), payload))


def encode_result(task_id: int, status: int, payload: bytes) -> bytes:
    """A result frame as written to the pipe: length header, task id, status, pickle."""
    size = RESULT_HEADER_BYTES + len(payload)
    head = task_id.to_bytes(TASK_ID_BYTES, "little") + bytes((status,))
    if size >= _LONG_FRAME:
        return wire(head + payload)
    return b"".join((size.to_bytes(4, "big"), head, payload))


def write_all(fd: int, data: Frames) -> None:
    """Write all of ``data`` to a blocking pipe."""
    if isinstance(data, list):
        write_parts(fd, data)
        return
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def serial_writer(fd: int) -> Callable[[Frames], None]:
    """A function that writes whole frames to a blocking pipe, from any thread.

    Frames never interleave: each write takes a lock.  A finalizer the
    collector runs, or a signal handler, may send in the middle of its own
    thread's write (a task's finalizer that logs): that frame is written
    right after the one under way (waiting for the lock would wait for ever).
    """
    lock = _thread.allocate_lock()
    writer = [0]  # the thread writing now (0: none)
    deferred: list[Frames] = []

    def send(frame: Frames) -> None:
        me = _thread.get_ident()
        if writer[0] == me:
            deferred.append(frame)
            return
        with lock:
            writer[0] = me
            try:
                write_all(fd, frame)
                while deferred:
                    write_all(fd, deferred.pop(0))
            finally:
                writer[0] = 0

    return send


def write_parts(fd: int, parts: list[Any]) -> None:
    """Write all of ``parts``, in order, to a blocking pipe."""
    views = [memoryview(part).cast("B") for part in parts]
    while views:
        written = os.writev(fd, views[:IOV_MAX])
        views = skip_written(views, written)


def skip_written(views: list[memoryview], written: int) -> list[memoryview]:
    """What of ``views`` is left once ``written`` bytes of them were written."""
    index = 0
    for view in views:
        size = view.nbytes
        if written < size:
            break
        written -= size
        index += 1
    rest = views[index:]
    if rest and written:
        rest[0] = rest[0][written:]
    return rest


class FrameError(Exception):
    """A frame's header announced more than this process can take: the
    stream cannot be read any further."""


class FrameReader:
    """Reads ``Connection``-format frames from a pipe, as many as one read() brings.

    ``Connection.recv_bytes`` costs two system calls per frame; a busy pool
    has many small frames waiting, and this reads them all at once.  Small
    frames are cut from what was read with one copy each (none when a read
    brought exactly whole frames); a large frame (``_LARGE_FRAME``) is read
    straight into a ``bytearray`` of its size, which is the frame.
    """

    __slots__ = ("_buffer", "_fd", "_filled", "_head_told", "_judged", "_large", "failed")

    def __init__(self, fd: int, judged: bool = False) -> None:
        self._fd = fd
        #: Its frames' heads are judged before a large one is allocated
        #: (``partial_head``): the pipe's writer is not trusted.
        self._judged = judged
        self._buffer = bytearray()
        #: The large frame being read, and how much of it has arrived.
        self._large: Optional[bytearray] = None
        self._filled = 0
        #: ``partial_head`` returned the head of the frame begun already.
        self._head_told = False
        #: Why nothing more can be read (the frames before it were returned).
        self.failed: Optional[FrameError] = None

    def partial_head(self, count: int) -> Optional[bytes]:
        """The first ``count`` bytes of the frame begun but not yet whole, once
        per frame, as soon as that many have arrived; else None.

        The reader of a pipe that others may write to (a task writing to its
        worker's) judges a frame by its head, before a bogus length makes it
        wait for bytes that never come.
        """
        if self._head_told:
            return None
        large = self._large
        if large is not None:
            if self._filled < count:
                return None
            head = bytes(large[:count])
        else:
            buffer = self._buffer
            if len(buffer) < 4:
                return None
            size, header = _frame_size(buffer)
            if size < 0 or len(buffer) < header + count:
                return None
            head = bytes(buffer[header : header + count])
        self._head_told = True
        return head

    def read_available(self) -> tuple[list[bytes], bool]:
        """Frames complete now, from a non-blocking pipe; and whether it hit EOF."""
        eof = False
        frames: list[bytes] = []
        if self._judged and self._head_told and self._large is None:
            self._promote()
        while self.failed is None:
            large = self._large
            if large is not None:
                try:
                    count = os.readv(self._fd, [memoryview(large)[self._filled :]])
                except BlockingIOError:
                    break
                except OSError:
                    eof = True
                    break
                if not count:
                    eof = True
                    break
                if not self._fill(count, frames):
                    break  # the pipe is empty for now
                continue
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
        frames: list[bytes] = []
        while True:
            large = self._large
            if large is not None:
                count = os.readv(self._fd, [memoryview(large)[self._filled :]])
                if not count:
                    return []
                if self._fill(count, frames):
                    return frames
                continue
            chunk = os.read(self._fd, self._wanted())
            if not chunk:
                return []
            frames = self._take(chunk)
            if self.failed is not None:
                raise self.failed
            if frames:
                return frames

    def _fill(self, count: int, frames: list[Any]) -> bool:
        """``count`` more bytes of the large frame arrived; True if it is whole."""
        self._filled += count
        large = self._large
        if large is None or self._filled < len(large):
            return False
        frames.append(large)
        self._large = None
        self._head_told = False  # (of the next frame, from now on)
        return True

    def _wanted(self) -> int:
        """How much one read asks for: at least the rest of the frame begun."""
        buffer = self._buffer
        if len(buffer) < 4:
            return _READ_SIZE
        size, header = _frame_size(buffer)
        if size < 0 or size >= _LARGE_FRAME:  # (one whose head is to be judged first)
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
        if frames:
            self._head_told = False
        if position < end:
            self._keep(view[position:])
        return frames

    def _keep(self, rest: memoryview) -> None:
        """Keep the start of a frame: in the buffer, or as a large frame begun."""
        if len(rest) >= 4:
            size, header = _frame_size(rest)
            if size >= _LARGE_FRAME and self._may_allocate():
                try:
                    large = bytearray(size)
                except (MemoryError, OverflowError) as exc:
                    # (Bytes after it would be read as frames: read none.)
                    self.failed = FrameError(f"a frame of {size} bytes was announced ({exc!r})")
                    return
                got = len(rest) - header
                large[:got] = rest[header:]
                self._large, self._filled = large, got
                return
        self._buffer += rest

    def _promote(self) -> None:
        """The buffer begins a large frame whose head is judged: read the rest
        of it straight into a buffer of its own from now on."""
        buffer = self._buffer
        if len(buffer) < 4 or _frame_size(buffer)[0] < _LARGE_FRAME:
            return
        with memoryview(buffer) as view:
            self._keep(view)
        buffer.clear()

    def _may_allocate(self) -> bool:
        """May a large frame begun get its buffer (of the size it announces)?
        Not before its head is judged, where heads are (``partial_head``)."""
        return not self._judged or self._head_told

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
            if frames:
                self._head_told = False
            if position < end and end - position >= 4:
                size, header = _frame_size(view[position:])
                if size >= _LARGE_FRAME and self._may_allocate():
                    self._keep(view[position:])
                    position = end
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


class InheritedFd:
    """A pipe end handed to a worker process when it starts.

    Pickled (spawn, forkserver) it travels as multiprocessing's ``DupFd`` and
    is rebuilt around the worker's copy; under fork it is inherited as it is.
    Rebuilding a ``Connection`` instead would import ``multiprocessing.connection``
    (and ``tempfile`` with it) in every spawned worker.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import reduction

        return (_rebuild_fd, (reduction.DupFd(self.fd),))


def _rebuild_fd(dup: Any) -> InheritedFd:
    return InheritedFd(dup.detach())
