"""The task-facing half of duckpool's executor: ``submit``, ``run``,
``options``, ``map`` and ``cancel_task`` (``Submitting``), and turning a
call into a work item (``queue_call``).

``ProcessPoolExecutor`` mixes ``Submitting`` in; the executor owns the
pool's life (its settings, ``stats``, ``resize``, ``shutdown``).  A call is
pickled in the submitting thread, and one that does not pickle gives a
future that has already failed, naming the part that does not
(``_unpicklable_part``).
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

from duckpool import _buffers, _context, _futures, _process_pools, _protocol, _tracing
from duckpool._chunks import MapChunk
from duckpool._errors import call_pickling_error
from duckpool._map import pool_map
from duckpool._options import TaskOptions, await_cancelling
from duckpool._validate import (
    check_priority,
    check_retries,
    check_task_callable,
    check_task_type,
    check_timeout,
)

if TYPE_CHECKING:
    from duckpool._admission import Admission
    from duckpool._context import Located
    from duckpool._core import PoolCore

__all__ = ["Submitting", "queue_call"]

_T = TypeVar("_T")


#: What a map chunk reaches ``submit`` as, through a subclass's own ``submit``.
_CHUNK_CARRIERS = frozenset({MapChunk, functools.partial})


def _chunk_in(fn: Any) -> Optional[MapChunk]:
    """The ``map`` chunk ``fn`` is, or that a subclass's ``submit`` wrapped
    in it (a ``functools.partial``), with its options; else None."""
    kind = type(fn)
    if kind is MapChunk:
        return fn if fn.options is not None else None  # type: ignore[no-any-return]
    if kind is functools.partial:
        for part in (fn.func, *fn.args):
            if type(part) is MapChunk and part.options is not None:
                return part
    return None


class Submitting:
    """``submit``, ``run``, ``options``, ``map`` and ``cancel_task`` of a local
    pool (mixed into ``ProcessPoolExecutor``, which sets these fields)."""

    _core: PoolCore
    _admission: Optional[Admission]
    _dumps: Callable[..., bytes]
    _task_timeout: Optional[float]
    _max_workers: int
    #: The context variables every task carries (``context_vars=``), if any.
    _context: Optional[Located]
    #: Every task gets a span of its own (``trace=True``, see ``_tracing``).
    _trace: bool

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        """Schedule ``fn(*args, **kwargs)`` and return its future.

        The pool's ``task_timeout`` applies; :meth:`options` sets another.
        Raises ``TypeError`` if ``fn`` is not callable, ``RuntimeError`` after
        shutdown and once interpreter shutdown has begun (the main thread has
        finished: ``atexit`` handlers and non-daemon threads can no longer
        submit), ``BrokenProcessPool`` if the pool is broken (its initializer
        failed), :class:`~duckpool.InheritedManagerError` in a forked child,
        and :class:`~duckpool.PoolSaturatedError` if the pool has
        ``max_pending`` and no room (at once under ``"reject"``, after
        ``block_timeout`` under ``"block"``); nothing is queued then.  A call
        that cannot be pickled gives a future that has already failed with the
        pickling error, and a callable in quarantine one failed with
        :class:`~duckpool.TaskQuarantinedError`.

        If the worker running the task dies, the future fails with
        :class:`~duckpool.WorkerDiedError` and the pool goes on; past its
        timeout, its worker is stopped and it fails with
        :class:`~duckpool.TaskTimeoutError`.  A shutdown lets it finish,
        unless ``cancel_futures=True`` cancels it while it is queued, or the
        shutdown's ``timeout`` (or ``terminate_workers()``, ``kill_workers()``)
        stops it first: see :meth:`shutdown`.  If the pool breaks meanwhile,
        it fails with ``BrokenProcessPool``.
        """
        if type(fn) in _CHUNK_CARRIERS and type(self).submit is not Submitting.submit:
            chunk = _chunk_in(fn)
            if chunk is not None:
                # A map chunk, passed on by a subclass's submit(): its own options.
                timeout, kind, options = chunk.options
                call = chunk.call if fn is chunk else fn
                return self._submit(call, args, kwargs, timeout, kind, **options)
        return self._submit(fn, args, kwargs, self._task_timeout, None)

    def _submit_chunk(
        self,
        fn: Callable[..., _T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: Optional[float],
        kind: Optional[str],
        **options: Any,
    ) -> Future[_T]:
        """Submit a ``map`` chunk through ``self.submit``, as the standard
        library's ``map`` does: a subclass that overrides ``submit`` (to log
        or count tasks, say) sees every chunk, as a ``MapChunk``.  Passed on
        to this class's ``submit`` (from any thread, or wrapped in a
        ``functools.partial``), the chunk keeps its own options (the task
        timeout of all its calls, its task type...), which it carries."""
        return self.submit(MapChunk(fn, (timeout, kind, options)), *args, **kwargs)

    async def run(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """Run ``fn(*args, **kwargs)`` in the pool and await its result (asyncio).

        Returns what ``fn`` returns; the exception it raises is raised here.
        Raises what :meth:`submit` raises (``TypeError`` for a ``fn`` that is
        not callable, ``RuntimeError`` after shutdown...), with nothing queued.
        If the task's worker dies, it overruns its timeout or a shutdown stops
        it, the ``await`` raises its future's error
        (:class:`~duckpool.WorkerDiedError`, :class:`~duckpool.TaskTimeoutError`,
        or ``CancelledError`` for a task ``shutdown(cancel_futures=True)``
        cancelled).

        Cancelling the awaiting task cancels the pool task: a queued one never
        runs, and a running one's worker is stopped and replaced (see
        :meth:`cancel_task`).  So ``asyncio.wait_for(executor.run(...), 5)`` and
        ``asyncio.timeout`` bound the work itself, not only the wait.
        """
        return await await_cancelling(self, self.submit(fn, *args, **kwargs))

    def _submit(
        self,
        fn: Callable[..., _T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: Optional[float],
        kind: Optional[str],
        *,
        chunk: bool = False,
        priority: int = 0,
        retries: int = 0,
        context: Optional[Located] = None,
        trace: Optional[bool] = None,
        span: Optional[_tracing.TaskSpan] = None,
    ) -> Future[_T]:
        check_task_callable(fn)
        if context is None:
            context = self._context  # (None: the pool sends no context variable)
        if context:
            fn = _context.bind(fn, context)
        if trace or (trace is None and self._trace):
            return self._submit_traced(fn, args, kwargs, timeout, kind, chunk, priority, retries)
        core = self._core
        if not core.accepting or _process_pools.interpreter_exiting:
            core.refuse()
        admission = self._admission
        if admission is None:
            return queue_call(
                core, self._dumps, fn, args, kwargs, timeout, kind, chunk, priority, retries, span
            )
        admission.admit(may_wait=not core.dispatcher.is_current())
        try:
            future: Future[_T] = queue_call(
                core, self._dumps, fn, args, kwargs, timeout, kind, chunk, priority, retries, span
            )
        except BaseException:
            admission.release()
            raise
        admission.track(future)  # the place is given back when it resolves
        return future

    def _submit_traced(
        self,
        fn: Callable[..., _T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: Optional[float],
        kind: Optional[str],
        chunk: bool,
        priority: int,
        retries: int,
    ) -> Future[_T]:
        """``_submit``, in a span of the task's own (``_tracing``)."""

        def submit(call: Callable[..., Any], span: _tracing.TaskSpan) -> Future[Any]:
            return self._submit(
                call,
                args,
                kwargs,
                timeout,
                kind,
                chunk=chunk,
                priority=priority,
                retries=retries,
                context=(),
                trace=False,
                span=span,
            )

        return _tracing.submit_traced(fn, self._core.settings.pool_id, submit)

    def options(
        self,
        *,
        timeout: Any = _futures.UNSET,
        task_type: Optional[str] = None,
        priority: int = 0,
        retries: int = 0,
        context_vars: Any = None,
        trace: Optional[bool] = None,
    ) -> TaskOptions:
        """Submit with per-task options, leaving the task's own keywords alone.

        Returns a ``TaskOptions`` whose ``submit``, ``run`` and ``map`` take
        the arguments of the executor's own and raise what they raise.
        ``executor.options(timeout=2).submit(fn, *args, **kwargs)`` runs
        ``fn`` with a 2-second limit; ``.map(...)`` applies it to each chunk.
        ``timeout=None`` means no limit, whatever the pool's default; left
        out, the pool's ``task_timeout`` applies.  ``task_type`` names the
        task's type for the pool's ``type_limits``.

        ``priority`` (an int, default 0): among the tasks waiting for a
        worker, a higher priority goes first; tasks of one priority go in
        the order they were submitted.  That is all it promises: a running
        task is never interrupted for another, and lower priorities wait as
        long as higher ones keep coming (no ageing).  It does not bypass
        ``max_pending`` (a saturated pool refuses a task whatever its
        priority) or ``type_limits``; with ``map``, every chunk has it.

        ``retries`` (default 0, off: tasks may not be safe to run twice):
        if the task's worker dies while running it (a signal, ``os._exit``,
        the OOM killer) or it overruns its timeout, it runs again, first in
        the queue of its priority, up to this many more times; never for an
        exception the task raises, nor after ``cancel_task()``,
        ``terminate_workers()`` or ``kill_workers()``.  The final
        :class:`~duckpool.WorkerDiedError` or :class:`~duckpool.TaskTimeoutError`
        says how many attempts were made (its ``attempts``).  Each death
        counts toward ``quarantine_after``: a callable put in quarantine is
        not retried, and fails with :class:`~duckpool.TaskQuarantinedError`.

        Raises ``TypeError`` for an argument of the wrong type (a
        ``context_vars`` that is not a module-level ``ContextVar`` included),
        ``ValueError`` for a value out of range (a negative ``retries``, a
        timeout not above 0), and ``ImportError`` for ``trace=True`` without
        OpenTelemetry.  The futures of its tasks resolve as :meth:`submit`'s
        do (a worker's death, a timeout, a shutdown), with these options'
        timeout and retries.
        """
        if timeout is _futures.UNSET:
            timeout = self._task_timeout
        else:
            timeout = check_timeout("timeout", timeout)
        variables = _context.check_context_vars(context_vars)
        return TaskOptions(
            self,
            timeout,
            check_task_type(task_type),
            check_priority(priority),
            check_retries(retries),
            None if variables is None else _context.located(variables),
            None if trace is None else _tracing.check_trace(trace),
        )

    def cancel_task(self, future: Future[Any]) -> bool:
        """Cancel a task, even a running one.

        A queued task is cancelled as by ``Future.cancel()``.  A running task's
        worker is stopped (SIGTERM, then SIGKILL after a short grace) and a
        replacement starts; the future fails with
        :class:`~duckpool.TaskCancelledError`, a ``CancelledError``, once the
        worker is gone.  A task waiting behind another in a worker's pipe
        fails with it at once, and the worker skips it.  Returns True if it cancelled the
        task or is stopping it; False if the future is already done (its
        result, a worker's death, a timeout or a shutdown came first) or is
        not one of this executor's.  Raises
        :class:`~duckpool.InheritedManagerError` in a process that inherited
        the executor by fork (its workers are the parent's).
        """
        lifecycle = self._core.lifecycle
        if lifecycle.inherited:  # (its workers are the parent's)
            lifecycle.check_accepting()
        if future.done():
            return False
        return self._core.cancel(future)

    def map(  # type: ignore[override]
        self,
        fn: Callable[..., _T],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: Optional[int] = None,
        buffersize: Optional[int] = None,
        progress: Any = None,
        ordered: bool = True,
    ) -> Iterator[_T]:
        """Like :func:`map`, computed in the pool; results come in input order.

        Returns an iterator over the results (a ``MapResults``, which has
        ``close()``); the chunks are submitted by this call (with
        ``buffersize``, the first ones).  Raises ``ValueError`` for a
        ``chunksize`` other than None or an int >= 1, ``TypeError`` or
        ``ValueError`` for a bad ``buffersize``, ``TypeError`` for an
        ``ordered`` that is not a bool or an input that is not iterable, and
        what :meth:`submit` raises (after shutdown, say) as it submits.

        Each chunk is a task submitted through :meth:`submit` (a subclass
        that overrides it sees every chunk, as the standard library's does).
        ``chunksize`` sends that many calls per task.  Left out (``None``),
        the pool chooses: about four chunks per worker, of at most
        4096 calls each (so results start coming back early), each call still
        answering for itself (an error is raised when its own result is
        reached, and the calls after it run, as with ``chunksize=1``); with
        ``buffersize`` or a task timeout, one call per task.  ``buffersize`` (as in
        Python 3.14) bounds how many chunks are submitted ahead of the one
        being yielded, so an endless iterable can be mapped lazily.  Raises
        ``TimeoutError`` if a result is not ready ``timeout`` seconds after the
        call; a call that raised re-raises when its result is reached.

        ``progress=True`` shows a ``tqdm`` progress bar while the results are
        iterated, counting items (not chunks) as their chunk's results
        arrive, with the inputs' length as total when they all have one;
        a string is the bar's description, a dict goes to ``tqdm`` as keyword
        arguments (``{"desc": "rows", "file": sys.stdout}``).  The bar closes
        when the iteration ends: at the last result, at an error or timeout,
        or when the iterator is closed.  Raises ``ImportError`` if ``tqdm``
        is missing (``pip install "duckpool[progress]"``) and ``TypeError``
        for another kind of ``progress``.

        ``ordered=False`` yields each result as soon as its chunk is back,
        in whatever order the chunks finish (a chunk's own results in input
        order), with the same chunking, ``buffersize`` (a new chunk is
        submitted as each one's results are handed out), ``timeout`` and
        ``progress``.  The first failed call raises when its chunk comes
        back, after the results of its chunk before it.  Either way, ending
        the iteration early (an error, a timeout, the iterator's ``close()``)
        cancels the chunks no worker has started.

        A worker's death or a task timeout fails the whole chunk it was
        running: :class:`~duckpool.WorkerDiedError` or
        :class:`~duckpool.TaskTimeoutError` is raised where that chunk's
        results would come.  The task timeout is each call's: a chunk of
        ``n`` calls may run for ``n`` times it (so it fails only if its
        calls overran it on average, or one hangs).  A chunk that a shutdown cancelled
        (``cancel_futures=True``) raises ``CancelledError`` there; one it
        stopped raises what :meth:`submit`'s future would.
        """
        return self._map(
            fn,
            iterables,
            timeout,
            chunksize,
            buffersize,
            self._task_timeout,
            None,
            progress,
            ordered=ordered,
        )

    def _map(
        self,
        fn: Callable[..., _T],
        iterables: tuple[Iterable[Any], ...],
        timeout: Optional[float],
        chunksize: Optional[int],
        buffersize: Optional[int],
        task_timeout: Optional[float],
        kind: Optional[str],
        progress: Any = None,
        *,
        ordered: bool = True,
        priority: int = 0,
        retries: int = 0,
        context: Optional[Located] = None,
        trace: Optional[bool] = None,
    ) -> Iterator[_T]:
        options = (
            task_timeout,
            kind,
            priority,
            retries,
            self._context if context is None else context,
            self._trace if trace is None else trace,
        )
        limits = (timeout, chunksize, buffersize)
        submit: Callable[..., Future[Any]] = self._submit
        if type(self).submit is not Submitting.submit:
            submit = self._submit_chunk  # (a subclass's submit sees each chunk)
        return pool_map(
            submit, self._max_workers, fn, iterables, limits, options, progress, ordered
        )


def queue_call(
    core: PoolCore,
    dumps: Callable[..., bytes],
    fn: Callable[..., _T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: Optional[float],
    kind: Optional[str],
    chunk: bool,
    priority: int,
    retries: int,
    span: Optional[_tracing.TaskSpan] = None,
) -> Future[_T]:
    """Pickle a call and hand it to the pool's core (``chunk``: a ``map`` chunk;
    ``span``: its span, if it is traced)."""
    future: Future[_T] = _futures.PoolFuture(core)
    task_id = _futures.next_task_id()
    try:
        call = (fn, *_buffers.wrap_call(args, kwargs))
        payload, buffers = _buffers.dumps(dumps, call)
    except Exception as exc:
        # Failed at once, not raised: code written for the stdlib's
        # executor (and CPython's tests) expects the error from the future.
        future.set_exception(_pickling_error(dumps, fn, args, kwargs, exc))
        return future
    if buffers:
        # Large buffers go beside the pickle, framed when a worker is
        # chosen (into its shared area if there is room).
        sent = _buffers.outgoing(buffers, snapshot=True)
        item = _futures.WorkItem(
            future, task_id, payload, fn, timeout, kind, chunk, sent, priority, retries
        )
    else:
        frame = _protocol.task_frame(task_id, payload)
        item = _futures.WorkItem(
            future, task_id, frame, fn, timeout, kind, chunk, None, priority, retries
        )
    if span is not None:
        item.trace = span
    core.submit(item)
    return future


def _pickling_error(
    dumps: Callable[..., bytes],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    exc: Exception,
) -> pickle.PicklingError:
    """The error of a call whose pickling raised ``exc``, naming the part that
    does not pickle.  Re-raises ``exc`` if the call pickles now: it came from
    outside, raised asynchronously in this thread (a signal handler's
    exception), and is the caller's, as anywhere else in ``submit()``."""
    if _pickles(dumps, fn, args, kwargs):
        raise exc
    return call_pickling_error(
        f"cannot send {_futures.callable_label(fn)} to a worker process: "
        f"{_unpicklable_part(dumps, fn, args, kwargs)} cannot be pickled: {exc}",
        exc,
    )


def _pickles(
    dumps: Callable[..., bytes],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> bool:
    """Does the call pickle?  (Asked once pickling it raised: the exception
    may not have been the call's.)"""
    try:
        _buffers.dumps(dumps, (fn, *_buffers.wrap_call(args, kwargs)))
    except Exception:
        return False
    return True


def _unpicklable_part(
    dumps: Callable[..., bytes],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> str:
    """Name the first part of a call that does not pickle (for the error)."""
    parts: list[tuple[str, Any]] = []
    if isinstance(fn, _context.ContextCall):  # the values of its context variables first
        parts += [
            (f"context variable {module}.{name} ({_short_repr(value)})", value)
            for module, name, value in fn.values
        ]
        fn = fn.func
    parts.append(("the callable", fn))
    parts += [(f"argument {i} ({_short_repr(a)})", a) for i, a in enumerate(args)]
    parts += [(f"keyword argument {k}={_short_repr(v)}", v) for k, v in kwargs.items()]
    for name, part in parts:
        try:
            dumps(_buffers.wrap(part, 2), pickle.HIGHEST_PROTOCOL)
        except Exception:
            return name
    return "the call"


def _short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
