"""Every exception duckpool raises, in one hierarchy.

The seed's two errors (:class:`ManagerNotFound`, :class:`UnknownTaskError`)
subclass :class:`Exception` directly, as on the Duck API page.  Errors about a
broken or dead worker subclass the standard library's
:class:`~concurrent.futures.process.BrokenProcessPool`, so existing
``except BrokenProcessPool`` clauses keep working.
"""

from __future__ import annotations

import concurrent.futures
import pickle
import signal
import sys
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Optional

from duckpool._protocol import EXIT_PIPE_LOST

__all__ = [
    "InheritedManagerError",
    "ManagerNotFound",
    "PoolSaturatedError",
    "TaskCancelledError",
    "TaskQuarantinedError",
    "TaskTimeoutError",
    "TaskUnpicklingError",
    "UnknownTaskError",
    "WorkerDiedError",
]


class ManagerNotFound(Exception):
    """No manager is registered under the requested id in this process.

    Raised by ``get_or_create_process_manager(id, strictly_get=True)`` when
    the current process has no manager with that id.
    """


class UnknownTaskError(Exception):
    """A task's type is not accepted by the pool it was submitted to.

    A pool started with ``task_type="render"`` accepts only tasks submitted
    with ``task_type="render"``; any other type, or no type, raises this error
    before anything is queued.

    Attributes:
        task_type: the type the task was submitted with (``None`` if untyped).
        pool_task_type: the type the pool accepts.
    """

    def __init__(self, task_type: Any, pool_task_type: Any) -> None:
        """Name the type submitted and the type (or types) the pool accepts."""
        self.task_type = task_type
        self.pool_task_type = pool_task_type
        if task_type is None:
            what = "an untyped task (task_type None)"
            elsewhere = "a pool started without a task_type"
        else:
            what = f"task_type {task_type!r}"
            elsewhere = f"a pool started with task_type={task_type!r}"
        if isinstance(pool_task_type, str):
            accepted = (
                f"task_type {pool_task_type!r} only; submit it with task_type={pool_task_type!r}"
            )
        else:
            accepted = f"the task types {sorted(pool_task_type)!r} only; submit it with one of them"
        super().__init__(
            f"{what} is not accepted by this pool, which accepts {accepted}, or to {elsewhere}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.task_type, self.pool_task_type))


class InheritedManagerError(RuntimeError):
    """A manager or executor was used in a process that did not create it.

    A process forked from one that owns pools inherits copies of those
    objects, but not their worker processes or dispatch thread: using such a
    copy would hang, so it raises this error instead.  Create a new manager in
    the child (``get_or_create_process_manager`` does so, since a forked child
    starts with an empty registry).
    """


def describe_exit(exitcode: Optional[int]) -> str:
    """Say in words how a process ended, from its ``Process.exitcode``."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        return f"killed by signal {signal_name(-exitcode)}"
    if exitcode == EXIT_PIPE_LOST:
        return (
            f"exited with code {exitcode}, as a worker does when its pipe to the"
            " pool fails under it (a task closed or replaced a descriptor it does not own)"
        )
    return f"exited with code {exitcode}"


def signal_name(signum: int) -> str:
    """Return ``"SIGKILL"`` for 9, or ``"signal 99"`` for an unknown number."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class WorkerDiedError(BrokenProcessPool):
    """The worker process running a task died before returning its result.

    Only the task that was running fails with this error; the pool starts a
    replacement worker in the same slot and goes on serving.

    Attributes:
        pid: the dead worker's process id.
        exitcode: its ``Process.exitcode`` (negative: killed by that signal).
        signal_name: e.g. ``"SIGKILL"`` when killed by a signal, else ``None``.
        slot: the worker slot the process occupied.
        attempts: how many times the task was run (above 1 with
            ``options(retries=...)``; the message then says so).
    """

    def __init__(
        self,
        message: str,
        *,
        pid: Optional[int] = None,
        exitcode: Optional[int] = None,
        slot: Optional[int] = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.slot = slot
        self.attempts = attempts
        self.signal_name = signal_name(-exitcode) if exitcode is not None and exitcode < 0 else None

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_worker_died,
            (str(self), self.pid, self.exitcode, self.slot, self.attempts),
        )


def _rebuild_worker_died(
    message: str,
    pid: Optional[int],
    exitcode: Optional[int],
    slot: Optional[int],
    attempts: int = 1,
) -> WorkerDiedError:
    return WorkerDiedError(message, pid=pid, exitcode=exitcode, slot=slot, attempts=attempts)


# Before 3.11, concurrent.futures.TimeoutError is its own class; since 3.11 it
# is the builtin.  A task timeout is both, whatever the version.  (TimeoutError
# is named as a base, not only starred in: the docs, read statically, then
# see an exception.)
_OLD_TIMEOUT_BASES: tuple[type[BaseException], ...] = (
    () if sys.version_info >= (3, 11) else (concurrent.futures.TimeoutError,)
)


class TaskTimeoutError(TimeoutError, *_OLD_TIMEOUT_BASES):  # type: ignore[misc]
    """A task ran longer than its timeout and its worker was stopped.

    The worker gets SIGTERM, then SIGKILL after a short grace; a replacement
    starts in its slot.  Subclasses :class:`TimeoutError` (and, before Python
    3.11, ``concurrent.futures.TimeoutError``).

    Attributes:
        attempts: how many times the task was run (above 1 with
            ``options(retries=...)``; the message then says so).
    """

    attempts: int = 1


class TaskCancelledError(concurrent.futures.CancelledError):
    """A task was stopped by ``cancel_task()`` (its worker was killed if it had started).

    A subclass of :class:`concurrent.futures.CancelledError`; unlike a future
    cancelled with ``Future.cancel()``, the future reports it as its
    exception (``future.cancelled()`` is false).
    """


class TaskUnpicklingError(BrokenProcessPool, pickle.UnpicklingError):
    """A task's call could not be unpickled in its worker, or its result in the parent.

    Only that task's future fails; the pool goes on.  The original error is
    the ``__cause__``.  It is a ``BrokenProcessPool`` (what the standard
    library's executor raises here, so existing handlers keep working) and a
    :class:`pickle.UnpicklingError`.
    """


class _CallPicklingTypeError(pickle.PicklingError, TypeError):
    """A call that does not pickle, where ``pickle`` raised a ``TypeError``."""


class _CallPicklingAttributeError(pickle.PicklingError, AttributeError):
    """A call that does not pickle, where ``pickle`` raised an ``AttributeError``."""


def call_pickling_error(message: str, cause: BaseException) -> pickle.PicklingError:
    """The ``PicklingError`` of a call that does not pickle, ``cause`` its
    ``__cause__``: of ``cause``'s kind too where that is a ``TypeError`` or an
    ``AttributeError`` (a lock, a local function), which is what the standard
    library's future fails with there, so ``except TypeError`` goes on working."""
    kind: type[pickle.PicklingError] = pickle.PicklingError
    if isinstance(cause, TypeError):
        kind = _CallPicklingTypeError
    elif isinstance(cause, AttributeError):
        kind = _CallPicklingAttributeError
    error = kind(message)
    error.__cause__ = cause
    return error


class PoolSaturatedError(RuntimeError):
    """A pool with ``max_pending`` had no room for another task.

    Raised by ``submit()`` (nothing is queued) when ``max_workers`` tasks run
    and ``max_pending`` more wait: at once under the ``"reject"`` policy, or
    once ``block_timeout`` has passed without room under ``"block"`` (at
    once there too when ``submit()`` runs in the pool's own dispatcher
    thread, a done-callback, which is what makes room).  A server maps it
    to "429 Too Many Requests".

    Attributes:
        max_pending: the pool's limit on waiting tasks.
        waited: seconds ``submit()`` blocked before giving up (0 for reject).
    """

    def __init__(self, message: str, *, max_pending: int, waited: float = 0.0) -> None:
        super().__init__(message)
        self.max_pending = max_pending
        self.waited = waited

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_saturated, (str(self), self.max_pending, self.waited))


def _rebuild_saturated(message: str, max_pending: int, waited: float) -> PoolSaturatedError:
    return PoolSaturatedError(message, max_pending=max_pending, waited=waited)


class TaskQuarantinedError(RuntimeError):
    """A task's callable killed several workers in a row and is refused for a while.

    A pool with ``quarantine_after=N`` stops running a callable whose last N
    runs each killed their worker: for ``quarantine_seconds`` its new
    submissions, and its calls still queued, fail with this error instead of
    crashing more workers.  One run that returns clears the count.

    Attributes:
        callable_name: the callable's qualified name.
        deaths: the worker deaths in a row that put it in quarantine.
        retry_after: seconds until it is accepted again (when raised).
    """

    def __init__(
        self, message: str, *, callable_name: str, deaths: int, retry_after: float
    ) -> None:
        super().__init__(message)
        self.callable_name = callable_name
        self.deaths = deaths
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_quarantined,
            (str(self), self.callable_name, self.deaths, self.retry_after),
        )


def _rebuild_quarantined(
    message: str, callable_name: str, deaths: int, retry_after: float
) -> TaskQuarantinedError:
    return TaskQuarantinedError(
        message, callable_name=callable_name, deaths=deaths, retry_after=retry_after
    )
