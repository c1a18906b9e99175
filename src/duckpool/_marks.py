"""The started, skip and reading marks: cells a worker and its parent share.

One array of 8-byte cells serves a pool of up to ``capacity`` slots (the
``max_workers`` a ``WorkerConfig`` carries is that stride). In cell ``slot``
the worker of that slot writes the id of each task it takes up, so that after
a death the parent knows whether the task had started (it fails then, else it
is sent again). In cell ``capacity + slot`` the parent may write how many of
that slot's ``SKIPS_PER_SLOT`` skip cells, from cell ``skip_base(capacity,
slot)`` on, hold the id of a task queued in that worker's pipe that the worker
must skip (it answers it as cancelled instead of running it): 0, the worker's
one look per task, until a task is cancelled there. In cell ``2 * capacity +
slot`` the worker writes 1 while it waits in its task pipe for frames, and 0
once it has them: a worker found there, at two looks, with every byte sent to
it read and its next task not taken up, is starved of bytes a task took from
its pipe (a worker busy, say in a finalizer after its task, is not). The
parent makes the array (``new_marks``) before its first worker starts and
sends it in each worker's ``WorkerConfig``.

Every worker imports this module: it imports nothing but ``os``.
"""

from __future__ import annotations

import os

# typing is not imported at run time: a spawned worker imports this module,
# and annotations are not evaluated (``from __future__``).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Optional


#: Skip cells per slot: as many as the tasks a worker's pipe may hold
#: (``_pool._scheduler.PREFETCH``), so each of them may be cancelled there.
SKIPS_PER_SLOT = 16


def cells(capacity: int) -> int:
    """The cells of the marks of a pool of up to ``capacity`` slots."""
    return (3 + SKIPS_PER_SLOT) * capacity


def skip_base(capacity: int, slot: int) -> int:
    """The first of ``slot``'s skip cells."""
    return 3 * capacity + SKIPS_PER_SLOT * slot


def keep_skips(marks: Any, capacity: int, slot: int, held: Any) -> int:
    """Clear ``slot``'s skip cells but those of the task ids in ``held`` (what
    the slot holds: its worker is past the others); how many are left (parent)."""
    first = skip_base(capacity, slot)
    left = 0
    for cell in range(first, first + SKIPS_PER_SLOT):
        value = marks[cell]
        if value and value not in held:
            marks[cell] = 0
        elif value:
            left += 1
    marks[capacity + slot] = left
    return left


def set_skip(marks: Any, capacity: int, slot: int, task_id: int, held: Any) -> bool:
    """Tell ``slot``'s worker to skip ``task_id`` (parent; ``held`` as for
    ``keep_skips``).  False if every skip cell holds a task still held."""
    left = keep_skips(marks, capacity, slot, held)
    first = skip_base(capacity, slot)
    for cell in range(first, first + SKIPS_PER_SLOT):
        if not marks[cell]:
            marks[cell] = task_id
            marks[capacity + slot] = left + 1  # (after the id: the worker looks here first)
            return True
    return False


class SharedMarks:
    """The started, skip and reading marks (see the module): 8-byte cells in a memfd mapping.

    ``view`` is the array itself.  Pickled, it travels as the memfd (``DupFd``)
    and is mapped again in the worker; a ``RawArray`` would import ``ctypes``,
    ``multiprocessing.heap`` and ``tempfile`` in every spawned worker.
    """

    __slots__ = ("_map", "cells", "fd", "view")

    def __init__(self, cells: int, fd: Optional[int] = None) -> None:
        import mmap

        if fd is None:
            fd = os.memfd_create("duckpool-marks", os.MFD_CLOEXEC)
            os.ftruncate(fd, 8 * cells)
        self.fd = fd
        self.cells = cells
        self._map = mmap.mmap(fd, 8 * cells)
        self.view = memoryview(self._map).cast("Q")

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import reduction

        return (_map_marks, (reduction.DupFd(self.fd), self.cells))

    def close_fd(self) -> None:
        """Close the memfd, once no process is to be started with these marks:
        the mapping stays."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Unmap the marks and close the memfd (the mapping holds a copy of
        it before Python 3.13): ``view`` must not be used any more."""
        self.close_fd()
        self.view.release()
        self._map.close()


def _map_marks(dup: Any, cells: int) -> SharedMarks:
    marks = SharedMarks(cells, dup.detach())
    marks.close_fd()
    return marks


def new_marks(context: Any, cells: int) -> Any:
    """A ``SharedMarks`` where memfds exist, else a ``RawArray('Q')``: either
    is what ``WorkerConfig.marks`` carries."""
    if hasattr(os, "memfd_create"):
        try:
            return SharedMarks(cells)
        except OSError:  # no memfd after all (an old kernel, a sandbox)
            pass
    return context.RawArray("Q", cells)


def marks_array(marks: Any) -> Any:
    """The indexable array of what ``new_marks`` made."""
    return marks.view if isinstance(marks, SharedMarks) else marks
