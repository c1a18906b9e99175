"""duckpool.ProcessPoolExecutor: the public face of a pool.

The machinery (dispatch, supervision, where each future is resolved) lives in
``_core``, whose docstring draws it; this module validates arguments, pickles
calls, and implements the ``concurrent.futures`` interface on top.
"""

from __future__ import annotations

import os
import pickle
import signal
import weakref
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor as _StdlibProcessPoolExecutor
from multiprocessing.context import BaseContext
from typing import Any, Callable, Optional, TypeVar

from duckpool import (
    _admission,
    _context,
    _core,
    _shutdown,
    _tracing,
)
from duckpool._compat import WorkerHandle, processes_view
from duckpool._pool._settings import PoolSettings
from duckpool._stats import PoolStats
from duckpool._submitting import Submitting
from duckpool._validate import (
    check_admission,
    check_callable,
    check_initargs,
    check_min_workers,
    check_mp_context,
    check_name_prefix,
    check_one_of,
    check_picklable,
    check_positive_int,
    check_timeout,
    check_type_limits,
    default_max_workers,
)

__all__ = ["ProcessPoolExecutor"]

_T = TypeVar("_T")

_SERIALIZERS = ("pickle", "cloudpickle")


def _dumps_of(serializer: str) -> Callable[..., bytes]:
    """The pickling function of ``serializer`` (checked already)."""
    if serializer == "cloudpickle":
        import cloudpickle

        return cloudpickle.dumps  # type: ignore[no-any-return]
    return pickle.dumps


def _checked_settings(
    *,
    max_workers: Optional[int],
    mp_context: Optional[BaseContext],
    initializer: Optional[Callable[..., object]],
    initargs: tuple[Any, ...],
    max_tasks_per_child: Optional[int],
    process_name_prefix: Optional[str],
    daemon: bool,
    task_timeout: Optional[float],
    max_memory_per_child: Optional[int],
    serializer: str,
    max_pending: Optional[int],
    on_saturated: str,
    block_timeout: Optional[float],
    type_limits: Optional[Mapping[str, int]],
    quarantine_after: Optional[int],
    quarantine_seconds: float,
    forward_logs: bool,
    pool_id: Any,
    min_workers: Optional[int],
    idle_timeout: Optional[float],
) -> tuple[PoolSettings, Optional[_admission.Admission]]:
    """A pool's settings from the executor's arguments, each checked (the
    error names the argument), and its admission control if it has any."""
    workers = check_positive_int("max_workers", max_workers) or default_max_workers()
    check_callable("initializer", initializer)
    check_positive_int("max_tasks_per_child", max_tasks_per_child)
    check_positive_int("max_memory_per_child", max_memory_per_child)
    timeout = check_timeout("task_timeout", task_timeout)
    check_name_prefix(process_name_prefix)
    check_one_of("serializer", serializer, _SERIALIZERS)
    pending, block_seconds = check_admission(max_pending, on_saturated, block_timeout)
    admission = (
        None
        if pending is None
        else _admission.Admission(workers, pending, on_saturated, block_seconds)
    )
    limits = check_type_limits(type_limits)
    check_positive_int("quarantine_after", quarantine_after)
    cooldown = check_timeout("quarantine_seconds", quarantine_seconds)
    assert cooldown is not None
    if max_memory_per_child is not None:
        import psutil  # noqa: F401 - fail here, not in every worker
    check_picklable("pool_id", pool_id)
    minimum = check_min_workers(min_workers, workers)
    idle_seconds = check_timeout("idle_timeout", idle_timeout)
    context = check_mp_context(mp_context)
    if context is None:
        import multiprocessing

        context = multiprocessing.get_context()
    settings = PoolSettings(
        max_workers=workers,
        context=context,
        initializer=initializer,
        initargs=check_initargs(initargs),
        max_tasks_per_child=max_tasks_per_child,
        max_memory_per_child=max_memory_per_child,
        name_prefix=process_name_prefix,
        daemon=bool(daemon),
        serializer=serializer,
        type_limits=limits,
        quarantine_after=quarantine_after,
        quarantine_seconds=cooldown,
        forward_logs=bool(forward_logs),
        pool_id=pool_id,
        min_workers=minimum,
        idle_timeout=idle_seconds,
        task_timeout=timeout,
    )
    return settings, admission


class ProcessPoolExecutor(Submitting, _StdlibProcessPoolExecutor):  # type: ignore[misc]
    """A drop-in :class:`concurrent.futures.ProcessPoolExecutor` that heals.

    Same constructor, methods and semantics as the standard library's, plus:

    * A worker that dies (``os._exit``, a signal, a segfault, the OOM killer)
      fails only the task it was running, with :class:`~duckpool.WorkerDiedError`
      (a ``BrokenProcessPool`` subclass naming the pid, exit code and signal);
      a replacement starts in the same slot, and every other future completes.
    * Per-task timeouts (``task_timeout=``, or :meth:`options`): an overrunning
      task's worker is stopped and its future fails with
      :class:`~duckpool.TaskTimeoutError`.  :meth:`cancel_task` stops a running task.
    * ``max_tasks_per_child`` works under every start method, fork included,
      and ``max_memory_per_child`` recycles a worker whose RSS grew too large.
      With ``max_tasks_per_child``, a worker's successor starts once it has
      been sent half its quota, and takes its slot as soon as it leaves
      (so each slot may hold one process more than ``max_workers`` counts).
    * Workers exit when the parent dies, under every start method.
    * ``max_workers=None`` starts as many workers as this process may use
      CPUs: its CPU affinity, capped by its cgroup's CPU quota (a container's
      CPU limit) rounded up, at least 1; ``duckpool info`` shows the count
      and why.
    * Calls are pickled in ``submit()``: a call that cannot be pickled gives a
      future that has already failed, naming the callable.
    * Python 3.14's ``terminate_workers()``, ``kill_workers()`` and
      ``map(..., buffersize=)`` on every supported version.
    * What tasks log with :mod:`logging` reaches this process's loggers,
      under every start method (see ``forward_logs``); ``map(...,
      progress=True)`` shows a progress bar.

    Besides the standard library's arguments, it takes these, by keyword only.

    Keyword Args:
        process_name_prefix: name each worker ``<prefix>-<slot>``: its
            ``current_process().name`` and the OS process title ``ps`` shows.
        daemon: if true, interpreter exit kills running tasks instead of
            waiting for submitted work.
        task_timeout: default seconds a task may run (``None``: no limit).
        max_memory_per_child: recycle a worker after a task that leaves its
            resident memory above this many bytes (needs ``psutil``).
        serializer: ``"pickle"`` (default) or ``"cloudpickle"`` to send
            lambdas and closures (needs ``cloudpickle``: ``duckpool[cloudpickle]``).
        max_pending: admission control: at most this many tasks wait for a
            worker (besides the ``max_workers`` running); ``None``: unbounded.
        on_saturated: past ``max_pending``, ``"reject"`` makes ``submit()``
            raise :class:`~duckpool.PoolSaturatedError` at once; ``"block"``
            makes it wait for room, up to ``block_timeout`` seconds (``None``:
            as long as it takes), then raise that error (a ``submit()`` made
            in a done-callback the pool's dispatcher runs raises at once:
            that thread is what makes room).
        type_limits: per task type, the most of its tasks that run at once
            (``{"report": 1}``), so one workload cannot take every worker.
            A task's type is given with ``options(task_type=...)`` or by the
            manager's ``submit_task``.
        quarantine_after: a callable whose last this-many runs each killed
            their worker is refused for ``quarantine_seconds``: its futures
            fail with :class:`~duckpool.TaskQuarantinedError` instead of
            crashing more workers (``None``, the default: never).
        forward_logs: if true (the default), every record a worker logs goes
            to this process's logger of the same name, which emits it if it
            is enabled for its level; the worker's own handlers (under fork,
            copies of this process's) are replaced, so nothing is written
            twice.  Workers mirror this process's logger levels as they were
            when the pool started its workers.  Records carry
            ``duckpool_pool`` (``pool_id``), ``duckpool_slot`` and
            ``duckpool_task_id`` attributes; ``process`` is the worker's pid.
            They are handled in the pool's dispatcher thread (shared by the
            pools of this process while several run), or a thread waiting in
            ``result()``, and those a task logs before it returns
            are handled before its future resolves.  If false, workers keep
            the logging they have (under spawn: none configured).
        pool_id: a picklable label for this pool's forwarded log records
            (``record.duckpool_pool``); a manager passes its id.
        min_workers: with ``idle_timeout``, makes a warm, elastic pool.
            Given either, the first ``min_workers`` workers (default 0)
            start with the pool,
            are never reaped, and are replaced if they die; the others, up
            to ``max_workers``, start only when a task finds no idle
            worker (one per such task), and with ``idle_timeout`` a worker
            above the minimum that has had no work for that many seconds
            exits (its slot starts again when work comes).  Neither given:
            every worker starts at the first submit and stays, as in the
            standard library.  :meth:`prestart` starts them all now and
            waits until they are ready.  A worker only exits while idle, so
            no task fails by it (one that comes as it leaves may wait for a
            worker to start); ``stats()`` shows ``min_workers``,
            ``max_workers`` and the live ``workers``.
        idle_timeout: seconds a worker above ``min_workers`` may have no
            work before it exits (see ``min_workers``); ``None``: never.
        context_vars: a ``contextvars.ContextVar`` or several, each a
            module-level name, whose values at ``submit()`` (or ``map()``)
            every task carries to its worker: they are set there while it
            runs and reset afterwards (a variable with no value at submit
            keeps the worker's own).  A value that cannot be pickled fails
            that task's future at submit, naming the variable.  None (the
            default) sends none and costs nothing; ``options(context_vars=...)``
            chooses per call.
        trace: if true, each task gets an OpenTelemetry span, a child of
            the span active at submit, ending when its future resolves, with
            its outcome (a worker's death, a timeout, a cancel) and the
            worker's slot and pid; the worker makes it current around the
            task (needs ``duckpool[otel]``).  ``options(trace=...)`` per call.
    """

    def __init__(
        self,
        max_workers: Optional[int] = None,
        mp_context: Optional[BaseContext] = None,
        initializer: Optional[Callable[..., object]] = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: Optional[int] = None,
        process_name_prefix: Optional[str] = None,
        daemon: bool = False,
        task_timeout: Optional[float] = None,
        max_memory_per_child: Optional[int] = None,
        serializer: str = "pickle",
        max_pending: Optional[int] = None,
        on_saturated: str = "reject",
        block_timeout: Optional[float] = None,
        type_limits: Optional[Mapping[str, int]] = None,
        quarantine_after: Optional[int] = None,
        quarantine_seconds: float = 60.0,
        forward_logs: bool = True,
        pool_id: Any = None,
        min_workers: Optional[int] = None,
        idle_timeout: Optional[float] = None,
        context_vars: Any = None,
        trace: bool = False,
    ) -> None:
        # The standard library's __init__ is not called: this class has its own
        # dispatch and shares only the public interface (isinstance keeps working).
        settings, self._admission = _checked_settings(
            max_workers=max_workers,
            mp_context=mp_context,
            initializer=initializer,
            initargs=initargs,
            max_tasks_per_child=max_tasks_per_child,
            process_name_prefix=process_name_prefix,
            daemon=daemon,
            task_timeout=task_timeout,
            max_memory_per_child=max_memory_per_child,
            serializer=serializer,
            max_pending=max_pending,
            on_saturated=on_saturated,
            block_timeout=block_timeout,
            type_limits=type_limits,
            quarantine_after=quarantine_after,
            quarantine_seconds=quarantine_seconds,
            forward_logs=forward_logs,
            pool_id=pool_id,
            min_workers=min_workers,
            idle_timeout=idle_timeout,
        )
        self._dumps = _dumps_of(serializer)
        variables = _context.check_context_vars(context_vars)
        self._context = None if variables is None else _context.located(variables)
        self._trace = _tracing.check_trace(trace)
        self._max_workers = settings.max_workers
        self._task_timeout = settings.task_timeout
        self._core = core = _core.PoolCore(settings, admission=self._admission)
        weakref.finalize(self, core.abandon).atexit = False
        if settings.min_workers:
            core.prestart(every=False)  # a warm pool: its minimum starts now

    # -- introspection ------------------------------------------------------------

    @property
    def _broken(self) -> Any:  # type: ignore[override]
        """The reason the pool is broken, or False (the stdlib's attribute)."""
        return self._core.broken or False

    @property
    def max_workers(self) -> int:
        """The number of worker slots."""
        return self._max_workers

    @property
    def start_method(self) -> str:
        """The multiprocessing start method of the workers."""
        return str(self._core.settings.context.get_start_method())

    @property
    def task_timeout(self) -> Optional[float]:
        """The default per-task timeout in seconds (None: no limit)."""
        return self._task_timeout

    def stats(self) -> PoolStats:
        """A snapshot of the pool: each worker (pid, slot, state, tasks done,
        RSS), the queue, and counters of results, failures, timeouts, worker
        deaths, restarts and recycles, with latency percentiles."""
        return self._core.stats()

    def prestart(self, timeout: Optional[float] = None) -> None:
        """Start every worker now and return once they are all ready (their
        ``initializer`` ran), so the first tasks pay no start-up.

        In an elastic pool the workers above ``min_workers`` started this
        way still exit after ``idle_timeout`` without work.  Raises
        ``TypeError`` or ``ValueError`` for a ``timeout`` that is not a
        number above 0 (nothing is started then), ``TimeoutError`` if they
        are not all ready within ``timeout`` seconds (they go on starting),
        ``BrokenProcessPool`` if the pool breaks meanwhile (an initializer
        failed, or workers kept dying before they were ready; every
        outstanding future then fails with it too), ``RuntimeError`` after
        shutdown or if the pool shuts down while it waits, and
        :class:`~duckpool.InheritedManagerError` in a forked child.  It
        queues no task and cancels none: submitted futures resolve as
        usual, whether it returns or raises.
        """
        seconds = check_timeout("timeout", timeout)
        self._core.prestart(every=True)
        self._core.wait_ready(seconds)

    def resize(self, max_workers: int) -> None:
        """Run ``max_workers`` workers from now on, without failing any future.

        Returns at once, waiting for no worker to start or exit.  Growing
        starts the new workers at once (in an elastic pool, when work needs
        them).  Shrinking lets the surplus workers finish what they hold,
        then they exit (idle ones at once); nothing queued is lost.  A
        surplus worker that dies or overruns a timeout meanwhile fails only
        that task, as in any slot (:class:`~duckpool.WorkerDiedError`,
        :class:`~duckpool.TaskTimeoutError`); the rest it held goes back to
        the queue.  Raises ``TypeError`` for a count that is not an int,
        ``ValueError`` for one below 1 or beyond what the pool can grow to,
        ``RuntimeError`` after shutdown, ``BrokenProcessPool`` if the pool is
        broken, and :class:`~duckpool.InheritedManagerError` in a forked
        child; the pool is left as it was then.
        """
        workers = check_positive_int("max_workers", max_workers, allow_none=False)
        assert workers is not None
        self._core.resize(workers)
        self._max_workers = workers
        if self._admission is not None:
            self._admission.resize(workers)

    @property  # (typeshed has the stdlib's attribute: a dict of Process)
    def _processes(self) -> Optional[Mapping[int, WorkerHandle]]:  # type: ignore[override]
        """Compatibility with the stdlib's private ``_processes``, not API (see
        ``_compat``): ``{pid: handle}`` of the live workers; None after shutdown."""
        core = self._core
        if core.state() in ("shutting down", "shut down"):
            return None
        return processes_view(core.worker_processes(), lambda p: not core.holds(p))

    def worker_pids(self) -> list[int]:
        """The pids of the live worker processes, in slot order."""
        return self._core.worker_pids()

    # -- stopping -----------------------------------------------------------------

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, timeout: Optional[float] = None
    ) -> None:
        """Stop accepting work and release the workers once their work is done.

        ``wait=True`` returns when every submitted task has finished and every
        worker has exited.  ``wait=False`` returns at once; submitted tasks
        still run and their futures still resolve.  ``cancel_futures=True``
        cancels the tasks no worker has started.  Calling it again is harmless.
        A worker still starting then, with no task and no code of yours to
        run before it is ready (no ``initializer``; under ``fork``, or
        ``forkserver`` from Python 3.14), is killed rather than waited for.

        ``timeout`` makes it a graceful drain with a deadline: work goes on
        for up to that many seconds; then the tasks still queued are
        cancelled and the workers still running get SIGTERM, then SIGKILL a
        second later, their tasks failing with
        :class:`~duckpool.WorkerDiedError` (a task sent to such a worker but
        not started yet fails with ``BrokenProcessPool``).  Every future
        resolves either way.  With ``wait=False`` the drain runs in a
        background thread.  A worker that dies while the pool drains fails
        only its task, and a replacement takes over the work still queued.

        Raises ``TypeError`` or ``ValueError`` for a ``timeout`` that is not a
        number above 0 (nothing is stopped then).  In a process that inherited
        the executor by fork it does nothing.
        """
        core = self._core
        if core.owner_pid == os.getpid():
            _shutdown.shut_down(core, wait, cancel_futures, check_timeout("timeout", timeout))

    def terminate_workers(self) -> None:
        """Shut down now: cancel queued tasks and SIGTERM every worker.

        Returns once every worker has exited (SIGKILL follows after a short
        grace).  Tasks that were running fail with
        :class:`~duckpool.WorkerDiedError`, and tasks sent to a worker but not
        started yet with ``BrokenProcessPool``; every future resolves.  The
        executor cannot be used afterwards (as in Python 3.14): ``submit``
        raises ``RuntimeError``.  Calling it after shutdown is harmless.  In
        a process that inherited the executor by fork it does nothing.
        """
        if self._core.owner_pid == os.getpid():
            self._core.request_kill(signal.SIGTERM, "terminate_workers() was called")
            self._core.join()

    def kill_workers(self) -> None:
        """Like :meth:`terminate_workers`, with SIGKILL.

        Returns once every worker has exited; queued tasks are cancelled,
        running ones fail with :class:`~duckpool.WorkerDiedError`, and the
        executor cannot be used afterwards.  In a process that inherited the
        executor by fork it does nothing.
        """
        if self._core.owner_pid == os.getpid():
            self._core.request_kill(signal.SIGKILL, "kill_workers() was called")
            self._core.join()

    def __repr__(self) -> str:
        state = self._core.state()
        return (
            f"<duckpool.ProcessPoolExecutor {state} max_workers={self._max_workers} "
            f"start_method={self.start_method!r}>"
        )
