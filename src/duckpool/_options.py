"""``TaskOptions``: per-task options bound to an executor, local or Dask.

``executor.options(timeout=..., task_type=...)`` checks its arguments and
returns one of these; its ``submit``, ``run`` and ``map`` call back into the
executor's private entry points with the options filled in.  It lives apart
from both executors so that neither imports the other for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from typing import Any, Callable, Optional, Protocol, TypeVar

__all__ = ["OptionsTarget", "TaskOptions", "await_cancelling"]

_T = TypeVar("_T")


class OptionsTarget(Protocol):
    """What :class:`TaskOptions` needs of an executor (local or Dask)."""

    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: Optional[float],
        kind: Optional[str],
        *,
        priority: int = 0,
        retries: int = 0,
        context: Any = None,
        trace: Optional[bool] = None,
    ) -> Future[Any]: ...

    def _map(
        self,
        fn: Callable[..., Any],
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
        context: Any = None,
        trace: Optional[bool] = None,
    ) -> Iterator[Any]: ...

    def cancel_task(self, future: Future[Any]) -> bool: ...


class _Cancels(Protocol):
    def cancel_task(self, future: Future[Any]) -> bool: ...


async def await_cancelling(executor: _Cancels, future: Future[_T]) -> _T:
    """Await ``future`` in asyncio; cancelling the awaiting task cancels the
    pool task too (``executor.cancel_task``), not only the wait."""
    import asyncio

    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        executor.cancel_task(future)
        raise


class TaskOptions:
    """Per-task options bound to an executor; see :meth:`duckpool.ProcessPoolExecutor.options`."""

    __slots__ = ("_context", "_executor", "_kind", "_priority", "_retries", "_timeout", "_trace")

    def __init__(
        self,
        executor: OptionsTarget,
        timeout: Optional[float],
        kind: Optional[str],
        priority: int = 0,
        retries: int = 0,
        context: Any = None,
        trace: Optional[bool] = None,
    ) -> None:
        self._executor = executor
        #: Each task gets a span (None: as the pool says).
        self._trace = trace
        #: Context variables to carry (located, see ``_context``); None: the pool's.
        self._context = context
        self._timeout = timeout
        self._kind = kind
        self._priority = priority
        self._retries = retries

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        """``executor.submit`` with these options.

        Returns the task's future and raises what ``submit`` raises
        (``TypeError`` for a ``fn`` that is not callable, ``RuntimeError``
        after shutdown...).  The future resolves as ``submit``'s does when
        the task's worker dies, it overruns its timeout (these options') or
        the pool shuts down: see :meth:`duckpool.ProcessPoolExecutor.submit`
        and :meth:`duckpool.DaskExecutor.submit`.
        """
        return self._executor._submit(
            fn,
            args,
            kwargs,
            self._timeout,
            self._kind,
            priority=self._priority,
            retries=self._retries,
            context=self._context,
            trace=self._trace,
        )

    async def run(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """``executor.run`` with these options.

        Returns what ``fn`` returns; raises what :meth:`submit` raises, with
        nothing queued, and from the ``await`` the future's error if the
        task's worker dies, it overruns its timeout or a shutdown stops it.
        Cancelling the awaiting task cancels the pool task.
        """
        return await await_cancelling(self._executor, self.submit(fn, *args, **kwargs))

    def map(
        self,
        fn: Callable[..., _T],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: Optional[int] = None,
        buffersize: Optional[int] = None,
        progress: Any = None,
        ordered: bool = True,
    ) -> Iterator[_T]:
        """``executor.map`` with these options (the task timeout and retries
        apply per chunk; every chunk has the priority).

        ``chunksize=None`` is the executor's own default: chunks the pool
        chooses locally, one call per task on Dask.  Returns the results'
        iterator, raises for a bad argument, and raises a chunk's
        :class:`~duckpool.WorkerDiedError`, :class:`~duckpool.TaskTimeoutError`
        or ``CancelledError`` (a shutdown) where its results would come, as
        ``executor.map`` does: see :meth:`duckpool.ProcessPoolExecutor.map`.
        """
        return self._executor._map(
            fn,
            iterables,
            timeout,
            chunksize,
            buffersize,
            self._timeout,
            self._kind,
            progress,
            ordered=ordered,
            priority=self._priority,
            retries=self._retries,
            context=self._context,
            trace=self._trace,
        )
