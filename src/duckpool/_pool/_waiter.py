"""What the dispatcher sleeps on: file descriptors, each with a tag.

One implementation per facility, chosen once at import (``Waiter``):
``EpollWaiter`` where there is epoll (one system call per wake-up, no
per-call set-up, and a descriptor can be *paused* while another thread
waits, which the assisting caller needs), else ``SelectorWaiter`` over the
``selectors`` module (no pause: callers then leave result pipes to the
dispatcher).

A descriptor number may be reused once its file is closed: registering a
number that is still known replaces what it was registered for.
"""

from __future__ import annotations

import select
import selectors
from typing import Any, Optional

_MISSING = object()


def _fileno(watched: Any) -> int:
    return watched if isinstance(watched, int) else int(watched.fileno())


class EpollWaiter:
    """Tagged descriptors over epoll."""

    #: Descriptors can be paused (``pause``/``resume``).
    can_pause = True

    def __init__(self) -> None:
        self._tags: dict[int, Any] = {}
        self._epoll = select.epoll()

    def register(self, watched: Any, tag: Any, write: bool = False) -> None:
        """Report ``tag`` when ``watched`` is readable (or, with ``write``, writable)."""
        fd = _fileno(watched)
        self._tags[fd] = tag
        events = select.EPOLLOUT if write else select.EPOLLIN
        try:
            self._epoll.register(fd, events)
        except FileExistsError:  # a closed descriptor's number, reused
            self._epoll.modify(fd, events)

    def unregister(self, watched: Any) -> None:
        fd = _fileno(watched)
        if self._tags.pop(fd, _MISSING) is _MISSING:
            return
        try:
            self._epoll.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass

    def fileno(self) -> int:
        """The epoll's own descriptor: readable while one of its is (``_hub``)."""
        return self._epoll.fileno()

    def pause(self, watched: Any) -> None:
        """Stop reporting ``watched`` (safe while another thread waits)."""
        self._epoll.modify(_fileno(watched), 0)

    def resume(self, watched: Any) -> None:
        """Report ``watched`` again; a paused descriptor that is ready now is reported."""
        try:
            self._epoll.modify(_fileno(watched), select.EPOLLIN)
        except OSError:  # unregistered meanwhile
            pass

    def wait(self, timeout: Optional[float]) -> list[Any]:
        """The tags of the descriptors that are ready, waiting up to ``timeout``."""
        tags = self._tags
        events = self._epoll.poll(-1 if timeout is None else timeout)
        return [tags[fd] for fd, _ in events if fd in tags]

    def close(self) -> None:
        self._epoll.close()


class SelectorWaiter:
    """Tagged descriptors over the ``selectors`` module (no epoll here)."""

    can_pause = False

    def __init__(self) -> None:
        self._tags: dict[int, Any] = {}
        self._selector = selectors.DefaultSelector()

    def register(self, watched: Any, tag: Any, write: bool = False) -> None:
        """Report ``tag`` when ``watched`` is readable (or, with ``write``, writable)."""
        fd = _fileno(watched)
        self._tags[fd] = tag
        events = selectors.EVENT_WRITE if write else selectors.EVENT_READ
        try:
            self._selector.register(fd, events)
        except KeyError:  # a closed descriptor's number, reused: start afresh
            self._selector.unregister(fd)
            self._selector.register(fd, events)

    def unregister(self, watched: Any) -> None:
        fd = _fileno(watched)
        if self._tags.pop(fd, _MISSING) is _MISSING:
            return
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass

    def pause(self, watched: Any) -> None:
        raise NotImplementedError("no pause without epoll (see can_pause)")

    def resume(self, watched: Any) -> None:
        raise NotImplementedError("no pause without epoll (see can_pause)")

    def wait(self, timeout: Optional[float]) -> list[Any]:
        """The tags of the descriptors that are ready, waiting up to ``timeout``."""
        tags = self._tags
        return [tags[key.fd] for key, _ in self._selector.select(timeout) if key.fd in tags]

    def close(self) -> None:
        self._selector.close()


#: The waiter this system has.
Waiter: type[EpollWaiter] | type[SelectorWaiter] = (
    EpollWaiter if hasattr(select, "epoll") else SelectorWaiter
)
