"""Large buffers travel beside a pickle, not inside it (pickle protocol 5).

Pickling a 1 MiB ``bytes`` copies it into the pickle, and writing the pickle
to a pipe, reading it back and unpickling it copy it three times more.  Here
a large buffer is kept out of the pickle stream instead, and goes:

* into the receiver's **shared area** when there is room: a memfd the worker
  creates and the parent maps (``Area``), one region per direction.  The
  sender copies the buffer in, the receiver copies it out into a fresh
  ``bytes`` (or ``bytearray``): one copy each side, no system call;
* otherwise **inline**: written to the pipe after the pickle, in the same
  frame, straight from the object (``os.writev``), and read on the other
  side into one buffer the size of the frame.

What goes out of band: ``bytes``, ``bytearray`` and ``memoryview`` of at least
``OUT_OF_BAND_BYTES``, found among a call's arguments or a result and its
items (``wrap``; the pickler's ``reducer_override`` never sees these types),
and anything that pickles to a ``PickleBuffer`` by itself, at any depth
(numpy arrays; a frame whose buffers are small sends them inline).  A
``memoryview`` of any size is sent (the pickle module refuses one); it comes
back as a view of a ``bytes`` (read-only) or ``bytearray`` of the same
format and shape.

A frame body with buffers (``encode``, ``decode``)::

    u32 count | u64 pickle size | count x (u8 flags, u64 offset, u64 size)
    | pickle | the inline buffers' bytes, in order

Nothing is ever named in ``/dev/shm``: the memfd has no name to leak, and
its memory goes when the worker and the parent's mapping are gone, whatever
killed the worker (a process forked from the parent meanwhile shares the
mapping, and before Python 3.13 a descriptor of it, until it exits).  Where
memfds or ``/proc`` are missing, every buffer goes inline.

The worker imports this module: it imports as little as it can.
"""

from __future__ import annotations

import _pickle
import mmap
import os
import struct
import sys
from collections import deque

# typing is not imported at run time: a spawned worker imports this module,
# and annotations are not evaluated (``from __future__``).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Optional

#: The parent maps the shared areas workers offer (tests turn it off to
#: send every buffer inline).
SHARED_AREA = True
#: Buffers smaller than this stay inside the pickle: a smaller one costs
#: less to copy than to describe.
OUT_OF_BAND_BYTES = 64 * 1024
#: A region of a worker's shared area (there are two: calls, results).  The
#: memfd is sparse: memory is used only where buffers were written.
REGION_BYTES = 64 << 20
#: A region that held more than this gives the rest of its memory back
#: once it is empty again.
_KEEP_BYTES = 4 << 20
#: Where buffers start in a region (cache-line aligned copies run faster).
_ALIGN = 64
#: Containers ``wrap`` looks into; a long one is left alone, since scanning
#: it would cost the many small items more than any buffer among them saves.
_SCAN_ITEMS = 32

WRITABLE = 1
IN_AREA = 2

#: pickle.HIGHEST_PROTOCOL from Python 3.8 on (the pickle module itself is
#: not imported in a worker: see _worker).
PROTOCOL = 5
_HEAD = struct.Struct("<IQ")
_DESCRIPTOR = struct.Struct("<BQQ")
#: The READY frame's payload when the worker offers a shared area.
_AREA_OFFER = struct.Struct("<iQQ")  # fd, inode, size

_PickleBuffer = _pickle.PickleBuffer
_BUFFER_TYPES = frozenset((bytes, bytearray, memoryview))
_CONTAINER_TYPES = frozenset((tuple, list, dict))
_SCANNED_TYPES = _BUFFER_TYPES | _CONTAINER_TYPES


# --- what goes out of band --------------------------------------------------


def _rebuild_bytes(buffer: Any) -> bytes:
    return buffer if type(buffer) is bytes else bytes(buffer)


def _rebuild_bytearray(buffer: Any) -> bytearray:
    return buffer if type(buffer) is bytearray else bytearray(buffer)


def _rebuild_memoryview(buffer: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    view = memoryview(buffer)
    if fmt == "B" and len(shape) == 1:
        return view
    return view.cast("B").cast(fmt, shape)  # type: ignore[call-overload,no-any-return]


class _OutOfBand:
    """Pickles a ``bytes`` or ``bytearray`` as a ``PickleBuffer`` (so out of
    band; read-only for ``bytes``), rebuilt as the same type."""

    __slots__ = ("obj", "rebuild")

    def __init__(self, obj: bytes | bytearray, rebuild: Callable[[Any], Any]) -> None:
        self.obj = obj
        self.rebuild = rebuild

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (self.rebuild, (_PickleBuffer(self.obj),))


class _MemoryView:
    """Pickles a ``memoryview`` as a copy of its bytes, its format and shape.

    Never as a ``PickleBuffer`` of the view itself: a view with a buffer
    exported from it, caught in a reference cycle (a traceback's frames),
    crashes the garbage collector before Python 3.13.
    """

    __slots__ = ("obj",)

    def __init__(self, obj: memoryview) -> None:
        self.obj = obj

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        view = self.obj
        data = bytes(view) if view.readonly else bytearray(view)  # in C order
        return (_rebuild_memoryview, (_PickleBuffer(data), view.format, view.shape))


#: Formats ``memoryview.cast`` can rebuild a view in (native single items).
_CASTABLE = frozenset("bBhHiIlLqQnNfd?ceP")


def _wrapped(obj: Any) -> Any:
    kind = type(obj)
    if kind is memoryview:
        # Any other format stays as it was: unpicklable.
        return _MemoryView(obj) if obj.format in _CASTABLE else obj
    if len(obj) < OUT_OF_BAND_BYTES:
        return obj
    return _OutOfBand(obj, _rebuild_bytes if kind is bytes else _rebuild_bytearray)


def wrap(obj: Any, depth: int = 1) -> Any:
    """``obj``, with large buffers in it (and in its items, ``depth`` levels
    of tuples, lists and dict values down) wrapped to pickle out of band.

    Returns ``obj`` itself when there is nothing to wrap.
    """
    kind = type(obj)
    if kind in _BUFFER_TYPES:
        return _wrapped(obj)
    if depth <= 0 or kind not in _CONTAINER_TYPES or len(obj) > _SCAN_ITEMS:
        return obj
    if kind is dict:
        values = obj.values()
        found = [wrap(value, depth - 1) for value in values]
        if all(new is old for new, old in zip(found, values)):
            return obj
        return dict(zip(obj, found))
    found = [wrap(item, depth - 1) for item in obj]
    if all(new is old for new, old in zip(found, obj)):
        return obj
    return kind(found)


def wrap_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """``args`` and ``kwargs`` with large buffers wrapped (see ``wrap``): an
    argument, its items and theirs (so ``map``'s chunks of argument tuples
    too); the same objects, cheaply, when none can be there."""
    scanned = _SCANNED_TYPES
    for arg in args:
        if type(arg) in scanned:
            return wrap(args, 3), wrap(kwargs, 3)
    for arg in kwargs.values():
        if type(arg) in scanned:
            return args, wrap(kwargs, 3)
    return args, kwargs


def dumps(
    dump: Callable[..., bytes], obj: Any, protocol: int = PROTOCOL
) -> tuple[bytes, list[_pickle.PickleBuffer]]:
    """Pickle ``obj`` with ``dump``; return the pickle and its out-of-band buffers.

    Every ``PickleBuffer`` goes out of band, small ones too (a size test
    per buffer would cost every call more than the rare small one saves);
    ``encode`` sends small ones inline.
    """
    buffers: list[_pickle.PickleBuffer] = []
    try:
        return dump(obj, protocol, buffer_callback=buffers.append), buffers
    except BaseException:
        # Not kept alive by the traceback's frames (see _MemoryView).
        buffers.clear()
        raise


def outgoing(buffers: list[_pickle.PickleBuffer], snapshot: bool) -> list[tuple[int, memoryview]]:
    """Flags and bytes of each buffer, to be sent.

    With ``snapshot``, a buffer whose owner may change it (anything but a
    ``bytes``) is copied now: the call is sent as it was when submitted.
    """
    sent: list[tuple[int, memoryview]] = []
    for buffer in buffers:
        view = buffer.raw()
        flags = 0 if view.readonly else WRITABLE
        if snapshot and type(view.obj) is not bytes:
            view = memoryview(bytes(view))
        sent.append((flags, view))
    return sent


def loads(load: Callable[..., Any], payload: Any) -> Any:
    """Unpickle what ``decode`` gave, or a plain pickle; raise what decoding raised."""
    if isinstance(payload, BaseException):
        raise payload
    if type(payload) is Received:
        return load(payload.pickle, buffers=payload.buffers)
    return load(payload)


class Received:
    """A pickle and its out-of-band buffers, copied out of the frame or area."""

    __slots__ = ("buffers", "pickle")

    def __init__(self, pickle_data: memoryview, buffers: list[Any]) -> None:
        self.pickle = pickle_data
        self.buffers = buffers


# --- frames -----------------------------------------------------------------


def encode(
    pickle_data: bytes,
    buffers: list[tuple[int, memoryview]],
    region: Optional[Region],
) -> tuple[list[Any], int]:
    """The body of a frame carrying ``buffers``: a list of parts to write.

    The buffers go into ``region`` (the receiver's) if it has room for them
    all and they are large enough to be worth it, else inline.  Returns the
    parts and the bytes taken in the region (0: none; the region must be told
    ``release`` once the receiver is done).
    """
    offset = -1
    taken = 0
    if region is not None:
        for _, view in buffers:
            taken += -(-view.nbytes // _ALIGN) * _ALIGN
        if taken >= OUT_OF_BAND_BYTES:
            offset = region.take(taken)
    head = bytearray(_HEAD.pack(len(buffers), len(pickle_data)))
    parts: list[Any] = [head, pickle_data]
    if offset >= 0:
        target = region.view  # type: ignore[union-attr]
        for flags, view in buffers:
            size = view.nbytes
            head += _DESCRIPTOR.pack(flags | IN_AREA, offset, size)
            target[offset : offset + size] = view
            offset += -(-size // _ALIGN) * _ALIGN
        return parts, taken
    for flags, view in buffers:
        head += _DESCRIPTOR.pack(flags, 0, view.nbytes)
        parts.append(view)
    return parts, 0


def decode(body: memoryview, region: Optional[memoryview]) -> tuple[Received, bool]:
    """Copy a frame body's buffers out (of the frame, or of ``region``).

    Returns the pickle with its buffers, and whether the region was read (it
    may be reused once the sender learns so).  Raises ``ValueError`` for a
    body that refers to a region there is none of.
    """
    count, pickle_size = _HEAD.unpack_from(body)
    position = _HEAD.size + count * _DESCRIPTOR.size
    pickle_data = body[position : position + pickle_size]
    position += pickle_size
    buffers: list[Any] = []
    used_region = False
    for index in range(count):
        flags, offset, size = _DESCRIPTOR.unpack_from(body, _HEAD.size + index * _DESCRIPTOR.size)
        if flags & IN_AREA:
            if region is None:
                raise ValueError("a buffer refers to a shared area this side has not mapped")
            source = region[offset : offset + size]
            used_region = True
        else:
            source = body[position : position + size]
            position += size
        buffers.append(bytearray(source) if flags & WRITABLE else bytes(source))
    return Received(pickle_data, buffers), used_region


# --- the shared area --------------------------------------------------------


class Region:
    """One direction of a shared area, as its writer sees it: a FIFO allocator.

    Space is taken per frame and released in the order taken, when the
    reader has copied the frame's buffers out (results answer calls in order).
    """

    __slots__ = ("_high", "_map", "_spans", "_start", "view")

    def __init__(self, shared: mmap.mmap, view: memoryview, start: int) -> None:
        self._map = shared
        self._start = start
        self.view = view
        self._spans: deque[tuple[int, int]] = deque()
        self._high = 0

    def take(self, size: int) -> int:
        """An offset with ``size`` free bytes from it, or -1 if there is no room."""
        capacity = len(self.view)
        spans = self._spans
        if size > capacity:
            return -1
        if not spans:
            offset = 0
        else:
            first = spans[0][0]
            last_start, last_end = spans[-1]
            if last_start >= first:  # not wrapped round
                if size <= first:
                    offset = 0  # round to the start early: fewer pages touched
                elif last_end + size <= capacity:
                    offset = last_end
                else:
                    return -1
            elif last_end + size <= first:
                offset = last_end
            else:
                return -1
        spans.append((offset, offset + size))
        if offset + size > self._high:
            self._high = offset + size
        return offset

    def release(self) -> None:
        """The reader is done with the oldest frame's buffers."""
        spans = self._spans
        spans.popleft()
        if not spans and self._high > _KEEP_BYTES:
            # A one-off large buffer: give its memory back.
            try:
                self._map.madvise(
                    mmap.MADV_REMOVE, self._start + _KEEP_BYTES, self._high - _KEEP_BYTES
                )
            except (AttributeError, OSError, ValueError):
                pass
            self._high = 0


class Area:
    """A worker's shared area: calls in its first region, results in its second."""

    __slots__ = ("calls", "results")

    def __init__(self, shared: mmap.mmap) -> None:
        view = memoryview(shared)
        self.calls = Region(shared, view[:REGION_BYTES], 0)
        self.results = Region(shared, view[REGION_BYTES:], REGION_BYTES)


def create_area() -> tuple[Optional[Area], bytes]:
    """In a worker: make its shared area; return it and the offer for the parent.

    ``(None, b"")`` where memfds are missing or memory is short.
    """
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None:
        return None, b""
    try:
        fd = memfd_create("duckpool-buffers")  # close-on-exec: task children never see it
        size = 2 * REGION_BYTES
        os.ftruncate(fd, size)
        shared = mmap.mmap(fd, size)
        inode = os.fstat(fd).st_ino
    except (OSError, ValueError):
        return None, b""
    # The fd stays open for the parent to find it in /proc.
    return Area(shared), _AREA_OFFER.pack(fd, inode, size)


def attach_area(pid: int, offer: memoryview) -> Optional[Area]:
    """In the parent: map the area a worker offered in its READY frame.

    None if the offer is empty, or the worker's memfd cannot be opened through
    ``/proc`` (no ``/proc``, no permission, or the worker is already gone):
    buffers then travel inline.
    """
    if len(offer) != _AREA_OFFER.size:
        return None
    fd_number, inode, size = _AREA_OFFER.unpack(offer)
    try:
        fd = os.open(f"/proc/{pid}/fd/{fd_number}", os.O_RDWR)
    except OSError:
        return None
    try:
        status = os.fstat(fd)
        if status.st_ino != inode or status.st_size != size or size != 2 * REGION_BYTES:
            return None  # not that worker's area (it died and the pid was reused)
        if sys.version_info >= (3, 13):
            # No duplicate of the fd kept: a process forked from this one
            # later would hold the area (and its memory) until it exits.
            return Area(mmap.mmap(fd, size, trackfd=False))
        return Area(mmap.mmap(fd, size))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
