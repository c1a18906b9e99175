"""A pool's tasks and their futures: ``WorkItem``, ``PoolFuture``, and
settling a future from whichever path gets there first (result, death,
cancel, shutdown)."""

from __future__ import annotations

import itertools
import os
import pickle
import threading
import time
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import _base as _futures_base
from concurrent.futures.process import _RemoteTraceback
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Callable,
    NoReturn,
    Optional,
    Protocol,
    TypeVar,
)

from duckpool._errors import TaskCancelledError

if TYPE_CHECKING:
    from duckpool._progress import Progress

#: A future's states once it is resolved (or cancelled).
DONE_STATES = frozenset(
    {_futures_base.CANCELLED, _futures_base.CANCELLED_AND_NOTIFIED, _futures_base.FINISHED}
)


class _Helper(Protocol):
    """What a ``PoolFuture`` asks to read its result in the waiting thread."""

    def help_resolve(self, future: Future[Any], timeout: Optional[float]) -> None: ...

    def withdraw(self, future: Future[Any], patient: bool) -> bool: ...


def notify_if_cancelled(future: Future[Any]) -> None:
    """Let ``concurrent.futures.wait`` see a cancelled future as done.

    A future cancelled while queued counts as done for waiters only once the
    executor acknowledges it (CANCELLED -> CANCELLED_AND_NOTIFIED).
    """
    try:
        future.set_running_or_notify_cancel()
    except RuntimeError:  # already acknowledged, or running
        pass


def cancel_item(item: WorkItem, why: str) -> None:
    """Cancel an item taken out of the queue.

    One a worker held before (sent, then put back in the queue when that
    worker died) already runs as far as its future knows, and cannot be
    cancelled: it fails with ``TaskCancelledError`` instead, so that it
    still resolves.
    """
    future = item.future
    if future.cancel():
        notify_if_cancelled(future)
    elif not future.done():
        set_exception(future, TaskCancelledError(f"task {item.label} was cancelled {why}"))


#: Forks this process descends from (counted in each child as it starts):
#: a change across a call of callbacks means one of them forked, and this
#: is the child (``_leave_forked_child``).
_forks = 0


def set_result(future: Future[Any], value: Any) -> None:
    """Resolve ``future`` with ``value``, unless it was cancelled or resolved meanwhile.

    Anything else raised here propagates: in a thread that resolves futures
    as it waits for its own (``Assists.help_resolve``), an exception raised
    asynchronously (a signal handler's, say) must reach the code that hands
    the resolution over to the dispatcher, not pass for "already resolved".
    """
    try:
        _running_callbacks(future.set_result, value)
    except InvalidStateError:  # cancelled or already resolved by a racing path
        _acknowledge_cancel(future)


def set_exception(future: Future[Any], error: BaseException) -> None:
    """Fail ``future`` with ``error``, unless it was cancelled or resolved
    meanwhile (anything else raised here propagates, as in ``set_result``)."""
    try:
        _running_callbacks(future.set_exception, error)
    except InvalidStateError:  # cancelled or already resolved by a racing path
        _acknowledge_cancel(future)


def _running_callbacks(call: Callable[..., object], *args: Any) -> None:
    """``call(*args)``, which runs callbacks of the program's: if one of them
    forked, and this is the child, it leaves here (``_leave_forked_child``)."""
    forks = _forks
    try:
        call(*args)
    except BaseException as exc:
        if _forks != forks:
            _leave_forked_child(exc)
        raise
    if _forks != forks:
        _leave_forked_child(None)


def _leave_forked_child(exc: Optional[BaseException]) -> NoReturn:
    """A done-callback the pool ran forked this process, and in this child
    it returned (``exc`` None) or raised ``exc``: the child leaves now.

    It is a copy of the thread that ran the callback (the pool's dispatcher,
    or a thread waiting for a result), in the middle of the pool's work:
    going on, it would read the parent's workers' results, or kill them.
    Its exit code is that of a ``SystemExit`` it raised, 1 for another
    exception (its traceback printed), else 0; its output is flushed first.
    """
    import sys

    code = 0
    if isinstance(exc, SystemExit):
        if isinstance(exc.code, int):
            code = exc.code
        elif exc.code is not None:
            code = 1
            print(exc.code, file=sys.stderr)
    elif exc is not None:
        import traceback

        code = 1
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def set_progress(future: Future[Any], payload: memoryview) -> None:
    """A progress frame for ``future``'s task: keep it as the latest update
    and call the future's progress callbacks (no lock held), unless the
    future is resolved already (never a callback after that)."""
    if future._state in DONE_STATES or not isinstance(future, PoolFuture):
        return
    from duckpool._progress import Progress

    future.__dict__["_progress"] = Progress(*pickle.loads(payload))
    for callback in tuple(future.__dict__.get("_progress_callbacks", ())):
        if future._state in DONE_STATES:
            return  # resolved meanwhile, by another thread (a kill, a breakage)
        _call_progress_callback(callback, future)


def _call_progress_callback(callback: Callable[[Future[Any]], object], future: Future[Any]) -> None:
    _running_callbacks(_logging_errors, callback, future)


def _logging_errors(callback: Callable[[Future[Any]], object], future: Future[Any]) -> None:
    try:
        callback(future)
    except Exception:
        _futures_base.LOGGER.exception("exception calling progress callback for %r", future)


def _acknowledge_cancel(future: Future[Any]) -> None:
    # Only a cancelled future: asked of a resolved one, the stdlib logs a
    # CRITICAL "unexpected state".
    if future._state == _futures_base.CANCELLED:
        notify_if_cancelled(future)


_T = TypeVar("_T")

_task_ids = itertools.count(1)

#: An argument left out (where ``None`` has a meaning of its own).
UNSET: Any = object()


def next_task_id() -> int:
    return next(_task_ids)


#: What runs a ``map`` chunk in a worker (``_chunks``): a chunk is named
#: after the mapped callable, not after them.
_MAP_RUNNERS = frozenset({"run_items", "run_chunk"})


def callable_label(fn: object) -> str:
    """A short human name for a task's callable, for error messages."""
    import functools

    if isinstance(fn, functools.partial):
        inner = fn.func
        if (
            getattr(inner, "__module__", None) == "duckpool._chunks"
            and getattr(inner, "__name__", None) in _MAP_RUNNERS
            and fn.args
        ):
            return f"a map() chunk of {callable_label(fn.args[0])}"
        return callable_label(inner)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:
        return repr(fn)
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module else str(name)


def exception_from_payload(payload: memoryview) -> BaseException:
    """Rebuild a worker's exception, chaining its remote traceback.

    The cause is the standard library's own ``_RemoteTraceback`` (its text in
    ``.tb``), so code written against the stdlib's executor reads it unchanged.
    """
    exc, tb_text = pickle.loads(payload)
    exc.__cause__ = _RemoteTraceback(tb_text)
    return exc  # type: ignore[no-any-return]


class WorkItem:
    """One submitted call, from submit() until its future is resolved."""

    __slots__ = (
        "attempts",
        "buffers",
        "chunk",
        "fn",
        "frame",
        "future",
        "in_area",
        "kind",
        "priority",
        "retries",
        "size",
        "started",
        "submitted",
        "task_id",
        "timeout",
        "trace",
        "unmarked_deaths",
        "withdrawn",
    )

    def __init__(
        self,
        future: Future[Any],
        task_id: int,
        frame: bytes,
        fn: object,
        timeout: Optional[float],
        kind: Optional[str] = None,
        chunk: bool = False,
        buffers: Optional[list[tuple[int, memoryview]]] = None,
        priority: int = 0,
        retries: int = 0,
    ) -> None:
        self.future = future
        self.task_id = task_id
        #: The task as written to the worker's pipe (length header included);
        #: with ``buffers``, only the pickle (see ``PoolCore.frames_of``).
        self.frame = frame
        #: The call's out-of-band buffers (``_buffers.outgoing``), if any.
        self.buffers = buffers
        #: Bytes this task puts in a worker's pipe or area.
        self.size = len(frame)
        if buffers:
            self.size += sum(view.nbytes for _, view in buffers)
        #: Its buffers went into the shared area of the worker it was sent to.
        self.in_area = False
        #: The callable, kept only to name the task in error messages.
        self.fn = fn
        self.timeout = timeout
        #: set_running_or_notify_cancel() has been called on the future.
        self.started = False
        #: Cancelled in a worker's pipe (lock held), its future failed just
        #: after: it must not be sent again meanwhile (``Scheduler.assign``).
        self.withdrawn = False
        #: The task type, for per-type concurrency caps (``type_limits``).
        self.kind = kind
        #: A chunk of a ``map``: one may wait in a worker's pipe behind another.
        self.chunk = chunk
        #: Among queued items, a higher priority goes first (``_pool._pending``).
        self.priority = priority
        #: Times it may still be run again after its worker died or it timed out.
        self.retries = retries
        #: Runs begun or to begin: 1, plus one per retry.
        self.attempts = 1
        #: Deaths of a ready worker it was the first item of, not marked as
        #: taken up (``_supervisor.took_up``).
        self.unmarked_deaths = 0
        #: Its span (``_tracing.TaskSpan``) if its pool or call traces.
        self.trace: Any = None
        self.submitted = time.monotonic()

    @property
    def label(self) -> str:
        return callable_label(self.fn)


#: Orders the making of a future's condition with the pool's moves of a
#: future that has none (see ``PoolFuture``).  Reentrant: the garbage
#: collector may run a finalizer that cancels futures (an abandoned map's)
#: while this thread makes a condition under it; renewed in a forked child,
#: where another thread of the parent may have held it.
_LAZY_CONDITION_LOCK = threading.RLock()


def _after_fork_in_child() -> None:
    global _LAZY_CONDITION_LOCK, _forks
    _LAZY_CONDITION_LOCK = threading.RLock()
    _forks += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


#: How long a future's condition may stay held by another thread before the
#: thread resolving the future leaves that to a thread of its own.
LOCK_LEFT_HELD_SECONDS = 1.0


def _resolve_aside(method: Callable[..., None], future: Future[Any], value: Any) -> None:
    """Resolve ``future`` in a thread of its own, which waits for its lock
    (for ever, if it was left held): the caller goes on meanwhile."""

    def resolve() -> None:
        try:
            method(future, value)
        except InvalidStateError:  # (resolved meanwhile)
            pass

    threading.Thread(target=resolve, name="duckpool-resolve-aside", daemon=True).start()


class PoolFuture(Future[_T]):
    """The future a local pool's ``submit()`` returns.

    A :class:`concurrent.futures.Future` in every respect (``result()``,
    ``exception()``, ``cancel()``, callbacks, ``concurrent.futures.wait``,
    ``asyncio.wrap_future``), plus the progress its task reports with
    :func:`duckpool.report_progress`: :attr:`progress`,
    :meth:`add_progress_callback` and :meth:`progress_updates`.  It resolves
    however the task ends: a result, the task's exception, or a
    :class:`~duckpool.WorkerDiedError`, :class:`~duckpool.TaskTimeoutError` or
    cancellation when its worker dies, it overruns or the pool shuts down.
    """

    # A thread that blocks on result() or exception() reads the task's result
    # from its worker itself, when it can (_pool._assist.Assists.help_resolve),
    # instead of sleeping until the dispatcher thread wakes it.
    #
    # Its threading.Condition (two thirds of a future's memory: a deque, an
    # RLock, five bound methods) is made when first used, which for a task
    # still queued is never: a long queue costs a third as much.  Nor is it
    # made for a future nobody waits on by it: its caller read the result
    # itself, or asked once it was there.  A waiter, a callback and
    # concurrent.futures.wait all take the condition first; until one has, the
    # pool moves the future on under _LAZY_CONDITION_LOCK alone, with no one
    # to notify.

    def __init__(self, core: _Helper) -> None:
        # Future.__init__'s fields (the same on 3.9 to 3.13), but the condition.
        self._state = _futures_base.PENDING
        self._result = None
        self._exception = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []
        self._duckpool_core = core

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        condition = self.__dict__.get("_lazy_condition")
        if condition is None:
            with _LAZY_CONDITION_LOCK:  # one condition per future, whoever asks first
                condition = self.__dict__.get("_lazy_condition")
                if condition is None:
                    # (setdefault: a finalizer run while it was made may have made one)
                    condition = self.__dict__.setdefault("_lazy_condition", threading.Condition())
        return condition  # type: ignore[no-any-return]

    def done(self) -> bool:
        return self._state in DONE_STATES

    def result(self, timeout: Optional[float] = None) -> _T:
        if self._state not in DONE_STATES:
            timeout = self._help(timeout)
        if self._state != _futures_base.FINISHED:
            # Waits (or raises CancelledError or TimeoutError).  Not
            # Future.result: 3.13.0's took an exception whose __bool__ is
            # False for no exception (gh-132063).
            super().exception(timeout)
        error = self._exception
        if error is None:
            return self._result  # type: ignore[return-value]
        try:
            raise error
        finally:
            del error, self  # no cycle: error -> traceback -> this frame -> self

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        if self._state not in DONE_STATES:
            timeout = self._help(timeout)
        if self._state == _futures_base.FINISHED:
            return self._exception
        return super().exception(timeout)

    def set_running_or_notify_cancel(self) -> bool:
        with _LAZY_CONDITION_LOCK:
            if "_lazy_condition" not in self.__dict__:  # nobody waits: nobody to notify
                if self._state == _futures_base.PENDING:
                    self._state = _futures_base.RUNNING
                    return True
                if self._state == _futures_base.CANCELLED:
                    self._state = _futures_base.CANCELLED_AND_NOTIFIED
                    return False
        if self._lock_left_held():
            return self._state == _futures_base.PENDING  # (it runs, seen as pending)
        return super().set_running_or_notify_cancel()

    def set_result(self, result: _T) -> None:
        with _LAZY_CONDITION_LOCK:
            if "_lazy_condition" not in self.__dict__ and self._state not in DONE_STATES:
                self._result = result
                self._state = _futures_base.FINISHED
                return
        if self._lock_left_held():
            _resolve_aside(Future.set_result, self, result)
            return
        super().set_result(result)

    def set_exception(self, exception: Optional[BaseException]) -> None:
        with _LAZY_CONDITION_LOCK:
            if "_lazy_condition" not in self.__dict__ and self._state not in DONE_STATES:
                self._exception = exception
                self._state = _futures_base.FINISHED
                return
        if self._lock_left_held():
            _resolve_aside(Future.set_exception, self, exception)
            return
        super().set_exception(exception)

    def _lock_left_held(self) -> bool:
        """Does another thread hold this future's condition for longer than
        anyone legitimately does?  A thread interrupted (Ctrl-C) just as it
        took the lock, in ``with`` or ``Condition.wait``, may leave it held
        for good (a CPython weakness, bpo-29988): whoever resolves the future
        would then block for ever, and in the dispatcher thread that is
        every future of the pool."""
        condition = self.__dict__.get("_lazy_condition")
        if condition is None:
            return False
        if not condition.acquire(timeout=LOCK_LEFT_HELD_SECONDS):
            return True
        condition.release()
        return False

    @property
    def progress(self) -> Optional[Progress]:
        """The task's latest :func:`duckpool.report_progress` update (a
        :class:`duckpool.Progress`), or None before its first.

        It stays once the future has resolved, however it resolved (a
        result, a worker's death, a timeout, a cancel, a shutdown): the last
        update that arrived before.
        """
        return self.__dict__.get("_progress")  # type: ignore[no-any-return]

    def add_progress_callback(self, fn: Callable[[Future[_T]], object]) -> None:
        """Call ``fn(future)`` after each progress update of the task (read
        ``future.progress``), in the thread that reads the task's results,
        never once the future has resolved.  If an update came already,
        ``fn`` is called now with it.  Updates a task sends faster than
        every 50 ms are coalesced (the latest wins).  Returns None.  ``fn``
        is not checked here: an exception it raises (a ``TypeError`` if it
        is not callable, say) is logged, as ``add_done_callback``'s are.
        Once the future resolves, however it resolves (a result, a worker's
        death, a timeout, a cancel, a shutdown), ``fn`` is not called again,
        nor at all if it is added after: use ``add_done_callback`` for that.
        """
        self.__dict__.setdefault("_progress_callbacks", []).append(fn)
        if "_progress" in self.__dict__ and self._state not in DONE_STATES:
            _call_progress_callback(fn, self)

    async def progress_updates(self) -> AsyncIterator[Progress]:
        """In asyncio: each progress update as it comes, until the task ends.

        ``async for update in future.progress_updates(): ...`` then ``await
        asyncio.wrap_future(future)`` for the result; the iteration ends when
        the future resolves, however it resolves.  It starts with the latest
        update if one came already (the task's last, if it is over).  It
        raises none of the task's errors: a worker's death, a timeout, a
        cancel or a shutdown end it as a result does, and the future holds
        the error.
        """
        import asyncio

        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Optional[Progress]] = asyncio.Queue()

        def put(update: Optional[Progress]) -> None:
            try:
                loop.call_soon_threadsafe(updates.put_nowait, update)
            except RuntimeError:  # the loop has closed meanwhile
                pass

        latest = self.progress
        if latest is not None and self._state in DONE_STATES:
            put(latest)  # over already: its last update, once
        # (called at once with the latest update if the task still runs)
        self.add_progress_callback(lambda future: put(future.progress))  # type: ignore[attr-defined]
        self.add_done_callback(lambda _: put(None))
        while True:
            update = await updates.get()
            if update is None:
                return
            yield update

    def withdraw(self, patient: bool = True) -> bool:
        """Cancel the task unless a worker has taken it up: as ``cancel()``,
        and also while it waits in a worker's pipe, where ``cancel()`` sees
        it running (it then fails with ``TaskCancelledError`` and the worker
        skips it).  What a ``map`` that ends early does to its chunks.

        False if the pool's lock was not free (briefly waited for if
        ``patient``, else not at all): a finalizer may run this in a thread
        that holds it, and the map's other chunks then need not wait for it.
        """
        if self.cancel() or self.done():
            return True
        return self._duckpool_core.withdraw(self, patient)

    def _help(self, timeout: Optional[float]) -> Optional[float]:
        """Help resolve this future; return what is left of ``timeout``."""
        if timeout is None:
            self._duckpool_core.help_resolve(self, None)
            return None
        if timeout <= 0:
            return timeout
        started = time.monotonic()
        self._duckpool_core.help_resolve(self, timeout)
        return max(0.0, timeout - (time.monotonic() - started))
