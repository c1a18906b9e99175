"""``map`` for both executors: chunking the calls, results in order, the progress bar.

An executor's ``map`` checks its arguments, cuts the calls into chunks
(``chunk_calls``), says how one chunk is submitted, and hands both to
``map_results``, which submits the first chunks and returns a
``MapResults``: an iterator over the chunks' results, in input order or
(``ordered=False``) as the chunks finish, that keeps ``buffersize`` chunks
in flight, stops at the first failed call, and cancels what is not started
when it ends early.  The chunks run in workers
through ``_chunks.run_chunk`` / ``run_items``.
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from typing import Any, Callable, Optional, TypeVar

from duckpool import _chunks, _context, _futures
from duckpool._validate import (
    check_buffersize,
    check_chunksize,
    check_ordered,
    check_task_callable,
)

__all__ = [
    "AUTO_CHUNK_MAX",
    "MapResults",
    "auto_chunk_size",
    "chunk_calls",
    "map_results",
    "materialised",
    "pool_map",
    "progress_bar_factory",
]

_T = TypeVar("_T")

#: The largest chunk ``map`` makes by itself: a few milliseconds of the
#: tiniest calls, enough that the per-chunk cost is lost in the noise, few
#: enough that pickling, work and unpickling overlap chunk after chunk.
AUTO_CHUNK_MAX = 4096


def auto_chunk_size(calls: int, workers: int) -> int:
    """The chunk size ``map`` chooses for ``calls`` calls on ``workers`` workers.

    About four chunks per worker, none so long that the first results wait
    for most of the work.
    """
    return min(AUTO_CHUNK_MAX, max(1, -(-calls // (4 * workers))))


def progress_bar_factory(
    progress: Any, iterables: tuple[Iterable[Any], ...]
) -> Optional[Callable[[], Any]]:
    """What makes ``map``'s progress bar (None: no bar), checked at the call site."""
    if progress is None or progress is False:
        return None
    if progress is True:
        options: dict[str, Any] = {}
    elif isinstance(progress, str):
        options = {"desc": progress}
    elif isinstance(progress, dict):
        options = dict(progress)
    else:
        raise TypeError(
            "progress must be a bool, a description string or a dict of tqdm "
            f"keyword arguments, got {progress!r}"
        )
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError(
            'map(..., progress=...) needs tqdm: pip install "duckpool[progress]"'
        ) from exc
    if "total" not in options and all(hasattr(it, "__len__") for it in iterables):
        options["total"] = min((len(it) for it in iterables), default=0)  # type: ignore[arg-type]
    return functools.partial(tqdm, **options)


def chunk_calls(
    iterables: tuple[Iterable[Any], ...], size: int, read_now: bool
) -> Iterator[_chunks.Columns]:
    """The calls of ``map(fn, *iterables)``, ``size`` at a time, as columns.

    The iterables are opened here, at once, so that one which is not
    iterable fails the ``map`` call itself.  ``read_now``: every chunk is
    taken at once (no ``buffersize``), so lists of one length may be sliced.
    """
    if read_now and iterables and all(type(it) is list for it in iterables):
        lengths = {len(it) for it in iterables}  # type: ignore[arg-type]
        if len(lengths) == 1:  # sliced: a copy in C, no call per item
            return _sliced_chunks(iterables, lengths.pop(), size)  # type: ignore[arg-type]
    if len(iterables) == 1:
        return _single_column_chunks(iter(iterables[0]), size)
    return _zipped_chunks(zip(*iterables), size)


def _sliced_chunks(
    columns: tuple[list[Any], ...], length: int, size: int
) -> Iterator[_chunks.Columns]:
    for start in range(0, length, size):
        yield tuple(column[start : start + size] for column in columns)


def _single_column_chunks(items: Iterator[Any], size: int) -> Iterator[_chunks.Columns]:
    while True:
        column = list(itertools.islice(items, size))
        if not column:
            return
        yield (column,)


def _zipped_chunks(calls: Iterator[tuple[Any, ...]], size: int) -> Iterator[_chunks.Columns]:
    while True:
        rows = list(itertools.islice(calls, size))
        if not rows:
            return
        yield tuple(map(list, zip(*rows)))


def materialised(iterables: tuple[Iterable[Any], ...]) -> tuple[list[Any], ...]:
    """The calls of ``map(fn, *iterables)`` as equal-length columns, all read now.

    Several iterables are read through ``zip`` (one may be endless, as with
    the builtin ``map``).
    """
    if len(iterables) == 1:
        return (list(iterables[0]),)
    return tuple(map(list, zip(*zip(*iterables))))


class MapResults(Iterator[_T]):
    """What ``map`` returns: an iterator over its results.

    In the order of the inputs (or as chunks finish, with ``ordered=False``).
    A call that raised raises when its own result is reached; a worker's death
    or a timeout raises :class:`~duckpool.WorkerDiedError` or
    :class:`~duckpool.TaskTimeoutError` there.  :meth:`close` cancels the
    calls no worker has started, as does dropping the iterator once its
    iteration has begun (one never iterated runs to the end, as the standard
    library's does).
    """

    # The results of each chunk are handed out by C code (itertools.chain over
    # a pop per item), so a for loop or list() over it costs no Python frame
    # per item: __iter__ gives that chain itself, and next() on this object
    # reads the same chain.

    __slots__ = ("_chunks", "_first", "_items")

    def __init__(
        self, chunks: Generator[Iterator[_T], None, None], first: deque[Future[Any]]
    ) -> None:
        self._chunks = chunks
        #: The chunks submitted before the iteration starts (cancelled by a
        #: close() that comes first: the generator's own clean-up never runs).
        self._first = first
        self._items: Iterator[_T] = itertools.chain.from_iterable(chunks)

    def __iter__(self) -> Iterator[_T]:
        return self._items

    def __next__(self) -> _T:
        return next(self._items)

    def close(self) -> None:
        """Stop: cancel the chunks no worker has started, close the progress bar.

        Returns None; calling it again is harmless.  Chunks already running
        go on to the end (or to their worker's death or timeout), and their
        results are dropped.
        """
        self._items = iter(())
        self._chunks.close()
        _withdraw_all(self._first)


def map_results(
    chunks: Iterator[_chunks.Columns],
    buffersize: Optional[int],
    submit_chunk: Callable[[_chunks.Columns], Future[list[_T]]],
    deadline: Optional[float],
    make_bar: Optional[Callable[[], Any]] = None,
    item_errors: bool = False,
    ordered: bool = True,
) -> MapResults[_T]:
    """Submit the first chunks and return every chunk's results in order
    (``ordered=False``: as the chunks finish).

    Without ``buffersize`` every chunk is submitted now (as the standard
    library does); with it, that many, and one more each time a chunk's
    results are handed out.  ``submit_chunk`` raising here (shutdown,
    saturation) fails the ``map`` call itself.  ``item_errors``: a chunk's
    results may hold a failed call (``_chunks.run_items``), raised when its
    turn comes.
    """
    first = chunks if buffersize is None else itertools.islice(chunks, buffersize)
    futures: deque[Future[list[_T]]] = deque()
    try:
        for chunk in first:
            futures.append(submit_chunk(chunk))
    except BaseException:
        # The map call fails: no one will read the chunks already submitted.
        _stop(futures, None)
        raise
    more = None if buffersize is None else chunks
    results = _result_chunks if ordered else _unordered_result_chunks
    return MapResults(
        results(futures, more, submit_chunk, deadline, make_bar, item_errors), futures
    )


class _Bar:
    """A ``map``'s progress bar: it counts the calls of each chunk as the
    chunk's results arrive, and moves within a chunk still running as its
    tasks report progress (``duckpool.report_progress``): the calls of the
    chunk that had returned, plus the fraction ``done / total`` of the one
    that reported.  Progress callbacks run in the pool's thread."""

    __slots__ = ("_bar", "_credited", "_lock")

    def __init__(self, bar: Any) -> None:
        self._bar = bar
        #: What each running chunk has moved the bar by, so far.
        self._credited: dict[Future[Any], float] = {}
        self._lock = threading.Lock()

    def watch(self, future: Future[Any]) -> None:
        if isinstance(future, _futures.PoolFuture):  # (a Dask task reports none)
            future.add_progress_callback(self._on_progress)

    def _on_progress(self, future: Future[Any]) -> None:
        update = getattr(future, "progress", None)
        if update is None:
            return
        fraction = 0.0
        if update.total:
            fraction = min(1.0, max(0.0, update.done / update.total))
        value = (update.offset or 0) + fraction
        with self._lock:
            if future.done() or (future not in self._credited and future.running() is False):
                return
            old = self._credited.get(future, 0.0)
            if value > old:
                self._credited[future] = value
                self._bar.update(value - old)

    def finish(self, future: Future[Any], calls: int) -> None:
        """``future``'s chunk of ``calls`` calls is back: count what is left of it."""
        with self._lock:
            old = self._credited.pop(future, 0.0)
            bar = self._bar
            bar.update(calls - old)
            if isinstance(bar.n, float) and abs(bar.n - round(bar.n)) < 1e-6:
                bar.n = round(bar.n)  # no "10.0/10" once the fractions are all counted
                bar.refresh()

    def close(self) -> None:
        self._bar.close()


def _handed_out(results: list[_T]) -> Iterator[_T]:
    """The items of ``results`` in order, each dropped from the list as it is handed out."""
    results.reverse()
    return itertools.starmap(results.pop, itertools.repeat((), len(results)))


def _result_chunks(
    futures: deque[Future[list[_T]]],
    more_chunks: Optional[Iterator[_chunks.Columns]],
    submit_chunk: Callable[[_chunks.Columns], Future[list[_T]]],
    deadline: Optional[float],
    make_bar: Optional[Callable[[], Any]],
    item_errors: bool,
) -> Generator[Iterator[_T], None, None]:
    """An iterator over each chunk's results, in order; raises where a call failed.

    An error, a timeout or closing stops this generator, which cancels the
    chunks not started.  The progress bar, if any, is made when the
    iteration starts and closed when it ends, however it ends.
    """
    bar = None
    try:
        if make_bar is not None:
            bar = _Bar(make_bar())
            for future in futures:
                bar.watch(future)
        while futures:
            future = futures.popleft()
            if more_chunks is not None:
                for chunk_calls_ in itertools.islice(more_chunks, 1):
                    futures.append(submit_chunk(chunk_calls_))
                    if bar is not None:
                        bar.watch(futures[-1])
            # A deadline that has passed still hands out a chunk already
            # back, as the standard library's map does.
            chunk = future.result(_remaining(deadline))
            _arrived(bar, future, chunk)
            del future  # hold no reference to a result once it is handed out
            yield from _chunk_results(chunk, item_errors)
            del chunk
    finally:
        _stop(futures, bar)


def map_deadline(timeout: Any) -> Optional[float]:
    """When a map's results are due: ``timeout`` seconds from now, or None.

    Any number, as the standard library takes it: one not above 0 still
    hands out the results already back.  ``TypeError`` for anything else.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"map() timeout must be a number of seconds or None, got {timeout!r}")
    return time.monotonic() + timeout


def _remaining(deadline: Optional[float]) -> Optional[float]:
    """Seconds left until ``deadline`` (0 once it has passed), or None."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _arrived(bar: Optional[_Bar], future: Future[Any], chunk: list[Any]) -> None:
    """A chunk's results are back: the bar counts what it had not of them."""
    if bar is not None:
        bar.finish(future, len(chunk))


def _stop(futures: Iterable[Future[Any]], bar: Optional[_Bar]) -> None:
    """The iteration ended, however: cancel the chunks not started, close the bar."""
    _withdraw_all(futures)
    if bar is not None:
        bar.close()


def _withdraw_all(futures: Iterable[Future[Any]]) -> None:
    """Cancel the chunks no worker has taken up: queued, or (a local pool's)
    waiting in a worker's pipe behind another chunk.  Once the pool's lock
    was not free in time (this thread may hold it: the collector's), the
    rest are only cancelled where queued."""
    patient = True
    for future in futures:
        if isinstance(future, _futures.PoolFuture):
            patient = future.withdraw(patient) and patient
        else:
            future.cancel()


def _chunk_results(chunk: list[_T], item_errors: bool) -> Generator[Iterator[_T], None, None]:
    """Hand out one chunk's results; raise where a call of it failed."""
    if item_errors and type(chunk) is _chunks.PartlyFailed:
        failed = next(i for i, r in enumerate(chunk) if isinstance(r, _chunks.ItemError))
        error: Any = chunk[failed]
        del chunk[failed:]  # the map ends at the failed call
        yield _handed_out(chunk)
        raise _futures.exception_from_payload(memoryview(error.payload))
    yield _handed_out(chunk)


def _unordered_result_chunks(
    futures: deque[Future[list[_T]]],
    more_chunks: Optional[Iterator[_chunks.Columns]],
    submit_chunk: Callable[[_chunks.Columns], Future[list[_T]]],
    deadline: Optional[float],
    make_bar: Optional[Callable[[], Any]],
    item_errors: bool,
) -> Generator[Iterator[_T], None, None]:
    """Like ``_result_chunks``, each chunk's results as soon as it finishes.

    Each future, once resolved, puts itself in a queue (a done callback, run
    where it is resolved), so waiting costs nothing per chunk in flight.
    """
    finished: queue.SimpleQueue[Future[list[_T]]] = queue.SimpleQueue()
    outstanding: set[Future[list[_T]]] = set()

    bar: Optional[_Bar] = None

    def track(future: Future[list[_T]]) -> None:
        outstanding.add(future)
        future.add_done_callback(finished.put)
        if bar is not None:
            bar.watch(future)

    try:
        if make_bar is not None:
            bar = _Bar(make_bar())
        while futures:
            track(futures.popleft())
        while outstanding:
            try:
                future = finished.get(timeout=_remaining(deadline))
            except queue.Empty:
                raise FuturesTimeoutError() from None
            outstanding.discard(future)
            if more_chunks is not None:
                for chunk_calls_ in itertools.islice(more_chunks, 1):
                    track(submit_chunk(chunk_calls_))
            chunk = future.result()
            _arrived(bar, future, chunk)
            del future  # hold no reference to a result once it is handed out
            yield from _chunk_results(chunk, item_errors)
            del chunk
    finally:
        _stop(outstanding, bar)


def pool_map(
    submit: Callable[..., Future[Any]],
    workers: int,
    fn: Callable[..., _T],
    iterables: tuple[Iterable[Any], ...],
    limits: tuple[Optional[float], Optional[int], Optional[int]],
    options: tuple[Optional[float], Optional[str], int, int, Any, bool],
    progress: Any,
    ordered: bool,
) -> MapResults[_T]:
    """A local pool's ``map``: check the arguments, choose the chunks, submit.

    ``submit`` is the executor's ``_submit``; ``limits`` are the map's
    ``timeout``, ``chunksize`` and ``buffersize``; ``options`` each chunk's
    task timeout, task type, priority, retries, context variables (their
    values now, set around each whole chunk in its worker) and whether each
    chunk gets a span.
    """
    timeout, chunksize, buffersize = limits
    task_timeout, kind, priority, retries, context, trace = options
    check_task_callable(fn, "map()")
    automatic = check_chunksize(chunksize) is None
    check_ordered(ordered)
    check_buffersize(buffersize)
    deadline = map_deadline(timeout)
    make_bar = progress_bar_factory(progress, iterables)
    if automatic:
        size = 1
        if buffersize is None and task_timeout is None:
            # Every call is submitted now anyway (as the stdlib does):
            # with their number known, the size can fit it.
            iterables = materialised(iterables)
            count = len(iterables[0]) if iterables else 0
            size = auto_chunk_size(count, workers)
        run = functools.partial(_chunks.run_items, fn)
    else:
        assert chunksize is not None
        size = chunksize
        run = functools.partial(_chunks.run_chunk, fn)
    chunks = chunk_calls(iterables, size, read_now=buffersize is None)
    call = _context.bind(run, context) if context else run

    def submit_chunk(chunk: _chunks.Columns) -> Future[list[_T]]:
        # The task timeout is each call's: a chunk of n calls gets n times it.
        limit = task_timeout
        if limit is not None and chunk:
            limit *= max(1, len(chunk[0]))
        return submit(
            call,
            (chunk,),
            {},
            limit,
            kind,
            chunk=True,
            priority=priority,
            retries=retries,
            context=(),
            trace=trace,
        )

    return map_results(chunks, buffersize, submit_chunk, deadline, make_bar, automatic, ordered)
