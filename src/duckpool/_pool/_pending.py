"""The queue of items no worker holds yet, by priority, FIFO within one.

``Pending`` keeps one FIFO per priority in use.  A higher priority goes
first; items of one priority go in the order they came (an item put back
by ``appendleft``, whose worker died before taking it up, goes first among
its own priority).  Nothing more is promised: a steady stream of
higher-priority work keeps lower-priority work waiting for as long as it
lasts (no ageing).

A pool whose tasks all have the default priority, 0, has a single FIFO, and
every operation is a deque's plus a branch.  Only the ``Scheduler`` holds
one (``Scheduler.pending``); others ask it through the scheduler.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from duckpool._futures import WorkItem

__all__ = ["Pending"]


class Pending:
    """Items waiting for a worker, highest priority first."""

    __slots__ = ("_levels", "_ranks", "default")

    def __init__(self) -> None:
        #: Priority 0's FIFO, always there (the only one most pools use).
        self.default: deque[WorkItem] = deque()
        #: Every priority's FIFO, 0's included, once another is used; else None.
        self._levels: Optional[dict[int, deque[WorkItem]]] = None
        #: The priorities in ``_levels``, lowest first (they go in ``reversed``
        #: order).  An emptied level other than 0's is dropped.
        self._ranks: list[int] = []

    def __len__(self) -> int:
        levels = self._levels
        if levels is None:
            return len(self.default)
        return sum(map(len, levels.values()))

    def __bool__(self) -> bool:
        if self.default:
            return True
        levels = self._levels
        return levels is not None and any(levels.values())

    def __iter__(self) -> Iterator[WorkItem]:
        """Every item, in the order they would go."""
        levels = self._levels
        if levels is None:
            return iter(self.default)
        return (item for rank in reversed(self._ranks) for item in levels[rank])

    def _level(self, priority: int) -> deque[WorkItem]:
        if priority == 0:
            return self.default
        levels = self._levels
        if levels is None:
            levels = self._levels = {0: self.default}
            self._ranks = [0]
        level = levels.get(priority)
        if level is None:
            level = levels[priority] = deque()
            bisect.insort(self._ranks, priority)
        return level

    def append(self, item: WorkItem) -> None:
        """Queue ``item`` last among its priority."""
        if item.priority == 0:
            self.default.append(item)
        else:
            self._level(item.priority).append(item)

    def appendleft(self, item: WorkItem) -> None:
        """Queue ``item`` first among its priority (it was put back)."""
        self._level(item.priority).appendleft(item)

    def _first_level(self) -> deque[WorkItem]:
        levels = self._levels
        if levels is None:
            return self.default
        for rank in reversed(self._ranks):
            level = levels[rank]
            if level:
                return level
        return self.default

    def _prune(self) -> None:
        """Drop the emptied levels but 0's (a pool may use many priorities)."""
        levels = self._levels
        if levels is not None:
            for rank in [rank for rank in self._ranks if rank and not levels[rank]]:
                del levels[rank]
                self._ranks.remove(rank)

    def first(self) -> WorkItem:
        """The item that would go next (IndexError if none)."""
        return self._first_level()[0]

    def popleft(self) -> WorkItem:
        """Take the item that goes next (IndexError if none)."""
        if self._levels is None:
            return self.default.popleft()
        level = self._first_level()
        item = level.popleft()
        if not level and item.priority:
            self._prune()
        return item

    def pop_first(self, accept: Callable[[WorkItem], bool]) -> Optional[WorkItem]:
        """Take the first item, in the order they would go, that ``accept``
        takes; None if none does.  The others keep their places."""
        for level in self._in_order():
            for position, item in enumerate(level):
                if accept(item):
                    del level[position]
                    if not level and item.priority:
                        self._prune()
                    return item
        return None

    def remove_where(self, reject: Callable[[WorkItem], bool]) -> list[WorkItem]:
        """Take out every item ``reject`` takes; what was taken, in order."""
        taken: list[WorkItem] = []
        for level in self._in_order():
            kept: list[WorkItem] = []
            for item in level:
                (taken if reject(item) else kept).append(item)
            if len(kept) != len(level):
                level.clear()
                level.extend(kept)
        self._prune()
        return taken

    def take_all(self) -> list[WorkItem]:
        """Empty the queue; what it held, in the order it would have gone."""
        items = list(self)
        for level in self._in_order():
            level.clear()
        self._prune()
        return items

    def _in_order(self) -> list[deque[WorkItem]]:
        levels = self._levels
        if levels is None:
            return [self.default]
        return [levels[rank] for rank in reversed(self._ranks)]
