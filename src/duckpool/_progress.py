"""Progress reported from inside a task: ``duckpool.report_progress``.

In a worker, ``report_progress(done, total, message)`` keeps the latest
update and sends it to the parent as a ``STATUS_PROGRESS`` frame on the
result pipe, at most once every ``INTERVAL`` seconds: a task that reports
in a tight loop costs a clock read and a tuple per call.  The latest update
not sent yet goes out just before the task's result (``flush``), so the
parent sees the last one before the future resolves, and none after.

The frame carries ``(done, total, message, offset)``: ``offset`` is how
many calls of a ``map`` chunk had returned when the update was made (None
outside a chunk), so a ``map`` progress bar can advance within its items.

In the parent, ``Progress`` is what ``PoolFuture.progress`` holds.  Outside a
worker (in the parent, or a task run by another pool), ``report_progress``
does nothing.  This module is imported by every worker: no typing at run time.
"""

from __future__ import annotations

import _pickle
from time import monotonic

from duckpool._protocol import STATUS_PROGRESS, encode_result

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not imported in a worker at run time
    from types import ModuleType
    from typing import Any, Callable, NamedTuple, Optional

    class Progress(NamedTuple):
        done: float
        total: Optional[float]
        message: Optional[str]
        offset: Optional[int]

else:
    from collections import namedtuple

    Progress = namedtuple("Progress", ["done", "total", "message", "offset"])
    Progress.__doc__ = """A task's latest progress report.

    Attributes:
        done: how far it got, in its own unit (items, bytes, percent...).
        total: what ``done`` counts up to, if it said (else None).
        message: what it said it is doing, if anything.
        offset: in a ``map`` chunk, how many of the chunk's calls had
            returned when it reported (None outside a chunk).
    """

__all__ = ["INTERVAL", "Progress", "flush", "install", "report_progress"]

#: The least time between two updates a worker sends for one task.
INTERVAL = 0.05

_send: Optional[Callable[[bytes], None]] = None
_worker: Optional[ModuleType] = None
_next_at = 0.0
#: The latest update not sent yet: ``(task_id, done, total, message, offset)``.
pending: Optional[tuple[int, Any, Any, Any, Any]] = None
#: The results so far of the ``map`` chunk running now (``_chunks.run_items``).
chunk: Optional[list[Any]] = None


def install(send: Callable[[bytes], None], worker: ModuleType) -> None:
    """In a worker: send updates with ``send``; ``worker`` knows the task running."""
    global _send, _worker
    _send = send
    _worker = worker
    import os

    # A process a task forks must not write to this worker's result pipe.
    os.register_at_fork(after_in_child=_forget)


def _forget() -> None:
    global _send, _worker, pending, chunk
    _send = _worker = pending = chunk = None


def report_progress(
    done: float, total: Optional[float] = None, message: Optional[str] = None
) -> None:
    """Tell the caller of the running task how far it got.

    ``done`` counts up to ``total`` (None if unknown) in any unit; ``message``
    says what it is doing.  The parent keeps the latest update on the task's
    future (``future.progress``) and calls its progress callbacks; updates
    that come faster than every 50 ms are coalesced (the latest wins), and
    the last one always arrives before the result.  Does nothing outside a
    pool's worker.  Returns None.  Raises ``TypeError`` for a ``done`` or
    ``total`` that is not a number, or a ``message`` that is not a string.
    If the task's worker dies or the task is stopped (a timeout, a cancel,
    a shutdown), its future keeps the last update that reached the parent,
    and no progress callback is called once it has resolved.
    """
    global _countdown, pending
    if (
        done.__class__ not in _NUMBERS
        or total.__class__ not in _TOTALS
        or (message is not None and message.__class__ is not str)
    ):
        done, total = _checked(done, total, message)
    if _worker is None:
        return
    task_id = _worker.current_task_id
    if task_id:  # (0: between tasks, an initializer, a thread left running)
        pending = (task_id, done, total, message, None if chunk is None else len(chunk))
        if _countdown and task_id == _counted_task:
            _countdown -= 1  # reporting fast: the clock is read every few calls only
        else:
            _tick(task_id)


def _tick(task_id: int) -> None:
    """Read the clock: send the pending update if the interval has passed,
    and choose how many calls go by before the next read (about eight reads
    per interval at the rate the calls come, at most ``_MAX_COUNTDOWN``, so
    a task that slows down is read again soon; none carried to another task)."""
    global _counted_task, _countdown, _last_countdown, _next_at, _read_at
    now = monotonic()
    if task_id == _counted_task:
        elapsed = now - _read_at
        rate = (_last_countdown + 1) / elapsed if elapsed > 0 else 0.0
        _countdown = _last_countdown = min(_MAX_COUNTDOWN, int(rate * INTERVAL / 8))
    else:
        _counted_task = task_id
        _countdown = _last_countdown = 0
    _read_at = now
    if now >= _next_at:
        _next_at = now + INTERVAL
        flush()


def _checked(done: Any, total: Any, message: Any) -> tuple[float, Optional[float]]:
    """``done`` and ``total`` as plain numbers (a NumPy or Decimal number
    becomes a float); ``TypeError`` naming what is wrong."""
    if message is not None and not isinstance(message, str):
        raise TypeError(f"report_progress takes a str message or None, got {message!r}")
    try:
        # float() would take a string too ("3"): only what defines __float__
        # (NumPy numbers, Decimal, Fraction) is a number here.
        if done.__class__ not in _NUMBERS:
            done = float(type(done).__float__(done))
        if total is not None and total.__class__ not in _NUMBERS:
            total = float(type(total).__float__(total))
    except (AttributeError, TypeError, ValueError):
        raise TypeError(
            f"report_progress takes numbers for done and total, got {done!r} and {total!r}"
        ) from None
    return done, total


#: Calls to let go by before the clock is read again, and how many that was.
_countdown = 0
_last_countdown = 0
_counted_task = 0
_read_at = 0.0
_MAX_COUNTDOWN = 64


_NUMBERS = frozenset((int, float))
_TOTALS = frozenset((int, float, type(None)))


def flush() -> None:
    """Send the update not sent yet, if any (before the task's result)."""
    global pending
    update = pending
    if update is None or _send is None:
        return
    pending = None
    if _worker is None or update[0] != _worker.current_task_id:
        return  # its task is over: the parent has its result
    _send(encode_result(update[0], STATUS_PROGRESS, _pickle.dumps(update[1:], 5)))
