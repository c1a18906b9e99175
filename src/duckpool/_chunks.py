"""What runs a ``map`` chunk inside a worker: ``run_chunk`` (an explicit
``chunksize``: the first error ends the chunk) and ``run_items`` (a chunk
``map`` chose: each call answers for itself), and ``MapChunk``, a chunk's
call as a subclass's overridden ``submit`` sees it.

Imported by workers with the first chunk they run (its pickle names it): it
imports as little as ``_worker`` does.
"""

from __future__ import annotations

from duckpool import _progress, _task_forks
from duckpool._worker import dump_exception

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable


#: A chunk of ``map`` calls, column-wise: one list per iterable given to
#: ``map``, so a call is ``fn(columns[0][i], columns[1][i], ...)``.  Columns
#: pickle without a tuple per call (tuples are memoised, items mostly not),
#: and the worker runs them through the builtin ``map``.  (For annotations
#: only: this module does not import typing at run time.)
if TYPE_CHECKING:
    Columns = tuple[list[Any], ...]


def run_chunk(fn: Callable[..., Any], columns: Columns) -> list[Any]:
    """Apply ``fn`` to each call of a ``map`` chunk; the first error ends it."""
    results: list[Any] = []
    _progress.chunk = results  # (its length: the calls done, for progress reports)
    _task_forks.chunk = columns  # (emptied in a process a call forks)
    try:
        results.extend(map(fn, *columns))
        if _stopped_short(results, columns):
            raise _stop_iteration(len(results))
    finally:
        _progress.chunk = _task_forks.chunk = None
    return results


def _stopped_short(results: list[Any], columns: Columns) -> bool:
    """Did ``list.extend`` end before the chunk's last call?  Only if a call
    raised ``StopIteration``, which ``extend`` takes for the end of the
    calls (in a process a call forked, the columns were emptied on purpose)."""
    return not _task_forks.forked and bool(columns) and len(results) < len(columns[0])


def _stop_iteration(index: int) -> StopIteration:
    """The error of a call that raised ``StopIteration`` in a chunk: raised
    where its result would be (a ``map`` raises ``RuntimeError`` from it, as
    the standard library's does), never taken for the end of the results."""
    return StopIteration(
        f"raised by the mapped callable at call {index} of its chunk "
        "(its own value and traceback are lost: StopIteration ends a C-level loop)"
    )


class MapChunk:
    """A ``map`` chunk's call as a subclass's overridden ``submit`` sees it,
    with the options ``map`` gave the chunk (task timeout, task type...),
    for the executor's own ``submit`` to take back (``_submitting``).  In a
    worker it is the call itself; the options stay in the pool's process."""

    __slots__ = ("call", "options")

    def __init__(self, call: Callable[..., Any], options: Any = None) -> None:
        self.call = call
        self.options = options

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (MapChunk, (self.call,))

    def __repr__(self) -> str:
        return f"MapChunk({self.call!r})"


class ItemError:
    """What ``run_items`` gives for an item that raised: its pickled error."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        #: ``(exception, traceback text)``, as ``dump_exception`` pickles it.
        self.payload = payload

    def __reduce__(self) -> tuple[Any, ...]:
        return (ItemError, (self.payload,))


class PartlyFailed(list):  # type: ignore[type-arg]
    """The results of a ``run_items`` chunk in which some call raised.

    A plain list means every call returned, so the parent checks items only
    in chunks of this type.
    """

    __slots__ = ()


def run_items(fn: Callable[..., Any], columns: Columns) -> list[Any]:
    """Like ``run_chunk``, but a call that raises does not stop the others.

    Its place holds an :class:`ItemError`, so a chunk chosen by ``map``
    itself behaves as if every call had been its own task.
    """
    results: list[Any] = []
    _progress.chunk = results  # (its length: the calls done, for progress reports)
    _task_forks.chunk = columns  # (emptied in a process a call forks)
    calls = map(fn, *columns)
    try:
        while True:
            try:
                # CPython's list.extend keeps what it appended before an error,
                # and a map object goes on with the next call after one: the
                # loop runs in C until a call raises.
                results.extend(calls)
                if not _stopped_short(results, columns):
                    return results
                raise _stop_iteration(len(results))  # (its place holds it; the rest go on)
            except BaseException as exc:  # a task's outcome, as in _run_one
                if _task_forks.forked:
                    raise  # (out of a process the call forked: _run_one ends it)
                if type(results) is list:
                    results = PartlyFailed(results)
                    _progress.chunk = results
                results.append(ItemError(dump_exception(exc)))
    finally:
        _progress.chunk = _task_forks.chunk = None
