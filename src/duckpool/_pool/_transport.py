"""The transport: what goes down a worker's task pipe, and its shared area.

Task frames are written without blocking: what a pipe does not take now
waits in the slot's outbox, which the dispatcher writes out as the worker
reads (it watches the pipe for room: ``Writable``).  Calls with large
buffers are framed only once their worker is known, so the buffers can go
into that worker's shared area (``_buffers``) when there is room.  The stop
frame (an empty frame: "exit once done") and the release frames (how many
result frames' buffers the parent has copied out of the area) travel the
same pipe, in order with the tasks.

Owns the slot's transport fields: ``outbox``, ``stop_sent``,
``releases_sent``, ``results_copied``, ``area`` and ``area_offer``.  Every
method runs with the pool's lock held.
"""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

from duckpool import _buffers, _child, _protocol

if TYPE_CHECKING:
    from multiprocessing import connection as mp_connection

    from duckpool._futures import WorkItem
    from duckpool._pool._slots import Slot
    from duckpool._pool._view import Core

#: The stop frame, as written to a pipe.
STOP_FRAME = _protocol.wire(b"")


class Writable(NamedTuple):
    """The tag of a task pipe the dispatcher waits to write the rest of an outbox to."""

    slot: Slot


class Transport:
    """Writes task, stop and release frames to a pool's workers."""

    def __init__(self, core: Core) -> None:
        self._core: Core = weakref.proxy(core)

    def write(self, slot: Slot, data: _protocol.Frames) -> None:
        """Write task frames to ``slot``'s worker (and the stop frame, if due).

        ``data`` is bytes, or parts written with one ``writev`` (see
        ``frames_of``).  A release frame goes first if the worker has not
        heard of the latest results copied out of its area.  What the pipe
        does not take now waits in the slot's outbox, which the dispatcher
        writes out as the worker reads (see ``flush``).
        """
        if slot.releases_sent != slot.results_copied:
            slot.releases_sent = slot.results_copied
            data = [_protocol.release_frame(slot.results_copied), *_as_parts(data)]
        if slot.retiring and not slot.stop_sent:
            if isinstance(data, list):
                data.append(STOP_FRAME)
            else:
                data += STOP_FRAME
            slot.stop_sent = True
        if slot.outbox or slot.task_conn is None:  # (None: reserved, not started yet)
            slot.outbox.extend(memoryview(part) for part in _as_parts(data))
            return
        fd = slot.task_conn.fileno()
        rest: list[memoryview]
        try:
            if isinstance(data, list):
                rest = _write_parts(fd, [memoryview(part) for part in data])
            else:
                written = os.write(fd, data)
                rest = [memoryview(data)[written:]] if written < len(data) else []
        except BlockingIOError:
            rest = [memoryview(part) for part in _as_parts(data)]
        except OSError:
            # The worker is dead or dying: the dispatcher will see its sentinel
            # and, since the worker never took these items up, requeue them.
            return
        if rest:
            slot.outbox.extend(rest)
            core = self._core
            if core.dispatcher.is_current():
                core.selector.register(slot.task_conn, Writable(slot), write=True)
            else:
                core.wake()  # the dispatcher watches the pipe (see watch_outboxes)

    def frames_of(self, slot: Slot, items: list[WorkItem]) -> _protocol.Frames:
        """The frames of ``items``, in order, for ``slot``'s worker.

        Items with buffers are framed here, now that the worker is known:
        their buffers go into its shared area if there is room (and the
        space is released when the item's result comes back).
        """
        if len(items) == 1 and items[0].buffers is None:
            return items[0].frame
        parts: list[Any] = []
        buffered = False
        for item in items:
            if item.buffers is None:
                parts.append(item.frame)
                continue
            buffered = True
            area = slot.area
            body, taken = _buffers.encode(
                item.frame, item.buffers, None if area is None else area.calls
            )
            item.in_area = taken > 0
            head = (item.task_id | _protocol.TASK_BUFFERS).to_bytes(
                _protocol.TASK_ID_BYTES, "little"
            )
            parts += _protocol.buffered_frame(head, body)
        return parts if buffered else b"".join(parts)

    def send_stop(self, slot: Slot) -> None:
        """Ask ``slot``'s worker to exit once it has read what it was sent.

        Not with an outbox: a frame is half written, and whoever reaps the
        worker stops it instead.
        """
        if slot.outbox or slot.stop_sent or slot.task_conn is None:
            return
        process = slot.process
        stop(slot.task_conn, None if process is None else process.pid)
        slot.stop_sent = True

    def on_area_offer(self, slot: Slot, offer: bytes) -> None:
        """The slot's worker offered its shared area (its READY frame): map it
        now on the dispatcher, else have the dispatcher map it (not on the way
        to the result a caller reads itself, the first often)."""
        slot.area_offer = offer
        core = self._core
        if core.dispatcher.is_current():
            self.attach_offered_area(slot)
        else:
            core.wake()

    def attach_offered_area(self, slot: Slot) -> None:
        """Map the shared area the slot's worker offered.

        Until then large buffers travel inline: the worker puts no result in
        its area before the parent says it has mapped it (``releases_sent``).
        """
        offer = slot.area_offer
        slot.area_offer = None
        process = slot.process
        if offer is None or process is None or process.pid is None:
            return
        slot.area = _buffers.attach_area(process.pid, memoryview(offer))
        if slot.area is not None:
            slot.releases_sent = -1  # the next write says it is mapped

    def before_wait(self) -> None:
        """On the dispatcher, before it sleeps: map offered areas, and wait for
        room in the pipes of slots with an outbox."""
        selector = self._core.selector
        for slot in self._core.slots:
            if slot.area_offer is not None:
                self.attach_offered_area(slot)
            if slot.outbox and slot.task_conn is not None:
                selector.register(slot.task_conn, Writable(slot), write=True)

    def flush(self, slot: Slot) -> None:
        """Write what the slot's outbox holds, as far as the pipe takes it."""
        outbox = slot.outbox
        conn = slot.task_conn
        if conn is None:
            return
        fd = conn.fileno()
        while outbox:
            try:
                if len(outbox) == 1:
                    head = outbox[0]
                    written = os.write(fd, head)
                    rest = [head[written:]] if written < len(head) else []
                else:
                    rest = _write_parts(fd, list(outbox))
            except BlockingIOError:
                return  # still full: wait for room again
            except OSError:
                outbox.clear()  # the worker is gone: its sentinel says how
                break
            outbox.clear()
            if rest:
                outbox.extend(rest)
                return
        self._core.selector.unregister(conn)

    def copy_buffers(self, slot: Slot, body: memoryview) -> Any:
        """Copy a result frame's buffers out; the worker may reuse the area
        space once told so (see ``write``)."""
        area = slot.area
        try:
            received, used_area = _buffers.decode(body, None if area is None else area.results.view)
        except Exception as exc:
            return exc  # the future fails with it (see ResultBook.resolve)
        if used_area:
            slot.results_copied += 1
        return received


def stop(conn: mp_connection.Connection, pid: Optional[int]) -> None:
    """Write the stop frame to worker ``pid``'s task pipe, if it takes it (a
    full pipe, or a worker gone: its exit is seen through its sentinel).

    The worker leaves as a batch process (``_child.exits_in_the_background``):
    the caller may have more workers to tell.
    """
    if pid:
        _child.exits_in_the_background(pid)
    try:
        os.write(conn.fileno(), STOP_FRAME)
    except OSError:
        pass


def _as_parts(data: _protocol.Frames) -> list[Any]:
    return data if isinstance(data, list) else [data]


def _write_parts(fd: int, views: list[memoryview]) -> list[memoryview]:
    """Write ``views`` to a non-blocking pipe as far as it takes them; what is left."""
    while views:
        try:
            written = os.writev(fd, views[: _protocol.IOV_MAX])
        except BlockingIOError:
            return views
        views = _protocol.skip_written(views, written)
        if views and not written:
            return views
    return views
