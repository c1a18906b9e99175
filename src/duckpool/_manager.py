"""ProcessPoolManager: a named, typed process pool that belongs to one process,
and ``get_or_create_process_manager``, which names managers in ``_registry``."""

from __future__ import annotations

import multiprocessing
import os
import threading
import weakref
from collections.abc import Collection, Mapping
from concurrent.futures import Future
from multiprocessing.context import BaseContext
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, List, Optional, Union

from duckpool import _registry
from duckpool._context import check_context_vars
from duckpool._errors import InheritedManagerError, ManagerNotFound, UnknownTaskError
from duckpool._executor import ProcessPoolExecutor
from duckpool._futures import UNSET
from duckpool._options import await_cancelling
from duckpool._registry import REGISTRY
from duckpool._stats import PoolStats
from duckpool._tracing import check_trace
from duckpool._validate import (
    check_accepted_task_types,
    check_backend,
    check_mp_context,
    check_name_prefix,
    check_positive_int,
    check_priority,
    check_retries,
    check_task_type,
    check_timeout,
)

if TYPE_CHECKING:
    from duckpool._dask import DaskExecutor

__all__ = ["ManagerOptions", "ProcessPoolManager", "get_or_create_process_manager"]


class ManagerOptions:
    """A manager's ``submit_task`` and ``run`` with per-task options; see
    :meth:`duckpool.ProcessPoolManager.options`."""

    __slots__ = ("_manager", "_options")

    def __init__(
        self,
        manager: ProcessPoolManager,
        timeout: Any,
        priority: int,
        retries: int,
        context_vars: Any,
        trace: Optional[bool],
    ) -> None:
        self._manager = manager
        check_context_vars(context_vars)
        #: Keywords for the running pool's ``options()``, checked now (and
        #: again by that pool, at submit).
        self._options: dict[str, Any] = {
            "priority": check_priority(priority),
            "retries": check_retries(retries),
            "context_vars": context_vars,
            "trace": None if trace is None else check_trace(trace),
        }
        if timeout is not UNSET:
            self._options["timeout"] = check_timeout("timeout", timeout)

    def submit_task(
        self,
        task: Callable[..., Any],
        *args: Any,
        task_type: Optional[str] = None,
        **kwargs: Any,
    ) -> Future[Any]:
        """``manager.submit_task`` with these options.

        Returns the task's future and raises what ``submit_task`` raises;
        on the Dask backend, ``retries`` above 0 raise ``ValueError`` here.
        The future resolves as :meth:`duckpool.ProcessPoolManager.submit_task`'s
        does when the task's worker dies, it overruns its timeout or the
        pool is stopped; with ``retries``, a task whose worker died or that
        timed out runs again first (see
        :meth:`duckpool.ProcessPoolExecutor.options`).
        """
        pool = self._manager._pool_for(task_type)
        return pool.options(task_type=task_type, **self._options).submit(task, *args, **kwargs)

    async def run(
        self,
        task: Callable[..., Any],
        *args: Any,
        task_type: Optional[str] = None,
        **kwargs: Any,
    ) -> Any:
        """``manager.run`` with these options.

        Returns what the task returns; raises what :meth:`submit_task`
        raises, with nothing queued, and from the ``await`` the future's
        error if the task's worker dies, it overruns its timeout or a stop
        ends it.  Cancelling the awaiting task cancels the pool task.
        """
        future = self.submit_task(task, *args, task_type=task_type, **kwargs)
        return await await_cancelling(self._manager.get_pool(), future)


class ProcessPoolManager:
    """A process pool with task-type protection, owned by the process that made it.

    ``start()`` creates the pool (a :class:`duckpool.ProcessPoolExecutor`, or
    with ``backend="dask"`` a :class:`duckpool.DaskExecutor`);
    ``submit_task()`` runs work on it, refusing tasks of the wrong type;
    ``stop()`` shuts it down.  A worker that dies fails only the task it was
    running; the pool replaces it and goes on.  Usually obtained through
    :func:`get_or_create_process_manager`, which names it.

    A copy of a manager inherited by a forked child raises
    :class:`~duckpool.InheritedManagerError` from every method that would use
    its pool (``start``, ``submit_task``, ``run``, ``options``, ``get_pool``,
    ``stop``, ``stats``, ``resize``), instead of hanging.
    """

    __instances: List[Any] = _registry.INSTANCES
    """Weak references to the managers created in this process (see ``all_instances``)."""

    def __init__(
        self, creator_process: Optional[multiprocessing.process.BaseProcess] = None
    ) -> None:
        """Create a stopped manager.

        Args:
            creator_process: the process responsible for this manager
                (informational; defaults to none recorded).
        """
        self._creator_process = creator_process
        self._id: Any = None
        self._owner_pid = os.getpid()
        self._lock = threading.RLock()
        self._pool: Optional[Union[ProcessPoolExecutor, DaskExecutor]] = None
        self._max_workers: Optional[int] = None
        self._daemon: Optional[bool] = None
        self._task_type: Union[str, Collection[str], None] = None
        #: Every type the pool accepts (``None``: any task).
        self._task_types: Optional[FrozenSet[str]] = None
        self._process_name_prefix: Optional[str] = None
        self._mp_context: Optional[BaseContext] = None
        self._backend = "local"
        self._stopped = False
        with _registry.lock:
            ProcessPoolManager.__instances.append(weakref.ref(self))

    # -- identity -------------------------------------------------------

    @property
    def id(self) -> Any:
        """The id this manager is registered under (``None`` for the default id)."""
        return self._id

    @classmethod
    def all_instances(cls) -> List[ProcessPoolManager]:
        """The managers of this process that are still in use.

        A manager replaced through ``force_create`` drops out, and so does one
        that was garbage collected; copies inherited from a parent are not listed.
        """
        pid = os.getpid()
        with _registry.lock:
            live = [ref() for ref in ProcessPoolManager.__instances]
            ProcessPoolManager.__instances[:] = [weakref.ref(m) for m in live if m is not None]
        return [m for m in live if m is not None and m._owner_pid == pid]

    @classmethod
    def registry(cls) -> Dict[int, Dict[Any, ProcessPoolManager]]:
        """The module's ``REGISTRY`` itself: ``{pid: {id: manager}}``."""
        return REGISTRY

    def _forget(self) -> None:
        """Drop out of ``all_instances`` (this manager was replaced)."""
        with _registry.lock:
            ProcessPoolManager.__instances[:] = [
                ref for ref in ProcessPoolManager.__instances if ref() is not self
            ]

    def _check_owner(self) -> None:
        if self._owner_pid != os.getpid():
            raise InheritedManagerError(
                f"process pool manager {self._id!r} belongs to process {self._owner_pid}; "
                f"process {os.getpid()} inherited a copy by fork and cannot use it. "
                "Call get_or_create_process_manager() in this process for a manager of its own."
            )

    # -- lifecycle --------------------------------------------------------

    def start(
        self,
        max_workers: int,
        task_type: Union[str, Collection[str], None] = None,
        daemon: bool = False,
        process_name_prefix: Optional[str] = None,
        mp_context: Optional[BaseContext] = None,
        *,
        max_pending: Optional[int] = None,
        on_saturated: str = "reject",
        block_timeout: Optional[float] = None,
        type_limits: Optional[Mapping[str, int]] = None,
        task_timeout: Optional[float] = None,
        quarantine_after: Optional[int] = None,
        quarantine_seconds: float = 60.0,
        forward_logs: bool = True,
        backend: str = "local",
        address: Any = None,
        min_workers: Optional[int] = None,
        idle_timeout: Optional[float] = None,
        prestart: bool = False,
        context_vars: Any = None,
        trace: bool = False,
    ) -> None:
        """Start the pool, ready to accept tasks.

        Returns once the pool is made (with ``prestart``, once its workers
        are ready).  With the default ``backend="local"``, workers start on
        the first submitted task.  With ``backend="dask"`` the pool is a
        :class:`duckpool.DaskExecutor`: the tasks run on a Dask cluster, a
        typed pool's only on workers offering its type as a Dask resource
        (``{task_type: 1}``); ``submit_task``, ``run``, ``stop`` and the
        registry work as for a local pool.

        Args:
            max_workers: the number of worker processes (a positive int).
            task_type: if given, the pool accepts only tasks submitted with
                this type; a collection of types (``{"render", "thumbnail"}``)
                accepts each of them.
            daemon: if true, interpreter exit kills running tasks instead of
                waiting for submitted work; either way workers never outlive
                this process, and tasks may start child processes.
            process_name_prefix: names each worker ``<prefix>-<slot>``, both
                its ``multiprocessing.current_process().name`` and the process
                title ``ps`` and ``top`` show; a replacement keeps its slot.
            mp_context: a multiprocessing context (fork, spawn or forkserver);
                the default context if ``None``.
            prestart: start every worker now and return once they are all
                ready, raising what ``prestart()`` raises (the pool runs on).
            backend: ``"local"`` (worker processes of this machine) or
                ``"dask"`` (needs ``pip install "duckpool[dask]"``).
            address: Dask only, as for :class:`duckpool.DaskExecutor`: None
                starts a LocalCluster of ``max_workers`` processes offering
                ``task_type``; a scheduler address or a Client uses that
                cluster, whose workers must offer it.

        The other keywords are the local pool's, as for
        :class:`duckpool.ProcessPoolExecutor`: admission control
        (``max_pending``, ``on_saturated``, ``block_timeout``), ``type_limits``,
        ``task_timeout``, quarantine (``quarantine_after``,
        ``quarantine_seconds``), ``forward_logs`` (records tagged with this
        manager's id), a warm, elastic pool (``min_workers``,
        ``idle_timeout``), ``context_vars`` and ``trace``.  On the Dask backend
        ``task_timeout`` applies, ``context_vars`` and ``trace`` go per call
        through :meth:`options`, and the others are refused if given (those
        with a default, such as ``on_saturated``, do not apply).

        A bad argument raises before any pool is made, leaving the manager
        as it was.  On a running manager it raises ``RuntimeError``
        and leaves that pool and its futures alone; a stopped manager may be
        started again (the old pool's futures resolve as :meth:`stop` said).

        Raises:
            ValueError: for a ``max_workers`` that is not a positive int, an
                unknown ``backend``, an ``address`` without Dask, a local-only
                option with Dask (named), or a value out of range.
            TypeError: for an argument of the wrong type.
            ImportError: for Dask without ``distributed``, or ``trace`` without
                OpenTelemetry.
            RuntimeError: if the pool is already running.
        """
        self._check_owner()
        check_positive_int("max_workers", max_workers, allow_none=False, wrong_type=ValueError)
        task_types = check_accepted_task_types(task_type)
        check_name_prefix(process_name_prefix)
        check_mp_context(mp_context)
        # The local pool's own keywords, refused on the Dask backend unless left out.
        local: dict[str, Any] = {
            "process_name_prefix": process_name_prefix,
            "max_pending": max_pending,
            "type_limits": type_limits,
            "quarantine_after": quarantine_after,
            "min_workers": min_workers,
            "idle_timeout": idle_timeout,
            "context_vars": context_vars,
        }
        flags = {"mp_context": mp_context, "prestart": prestart or None, "trace": trace or None}
        check_backend(backend, address, {**local, **flags})
        with self._lock:
            if self._pool is not None:
                raise RuntimeError(
                    f"process pool manager {self._id!r} is already running; stop() it first"
                )
            self._pool = _new_pool(
                self._id,
                backend,
                max_workers,
                address,
                task_types,
                dask_keywords={"task_timeout": task_timeout, "daemon": bool(daemon)},
                local_keywords={
                    **local,
                    "mp_context": mp_context,
                    "daemon": bool(daemon),
                    "on_saturated": on_saturated,
                    "block_timeout": block_timeout,
                    "task_timeout": task_timeout,
                    "quarantine_seconds": quarantine_seconds,
                    "forward_logs": bool(forward_logs),
                    "trace": trace,
                },
            )
            self._backend = backend
            self._max_workers = max_workers
            self._task_type = task_type
            self._task_types = task_types
            self._daemon = bool(daemon)
            self._process_name_prefix = process_name_prefix
            self._mp_context = mp_context
            self._stopped = False
            pool = self._pool
        if prestart and isinstance(pool, ProcessPoolExecutor):
            pool.prestart()

    def get_pool(self) -> Any:
        """Return the running pool: a :class:`duckpool.ProcessPoolExecutor`, or
        with ``backend="dask"`` a :class:`duckpool.DaskExecutor`.

        Raises:
            RuntimeError: if the manager has not been started or was stopped.
        """
        self._check_owner()
        pool = self._pool
        if pool is None:
            raise RuntimeError(
                f"process pool manager {self._id!r} is not running; call start() first"
            )
        return pool

    def submit_task(
        self,
        task: Callable[..., Any],
        *args: Any,
        task_type: Optional[str] = None,
        **kwargs: Any,
    ) -> Future[Any]:
        """Run ``task(*args, **kwargs)`` in the pool and return its future.

        A task that raises delivers its exception through the future; one
        whose worker dies fails with :class:`~duckpool.WorkerDiedError`, one
        past ``task_timeout`` with :class:`~duckpool.TaskTimeoutError`; the
        pool goes on.  A :meth:`stop` lets it finish unless its ``timeout``
        stops it.  A call that cannot be pickled gives a future that has
        already failed.  On Dask, a typed task runs only on workers offering
        its type.

        Raises:
            UnknownTaskError: if the pool was started with a ``task_type`` and
                this task's type is not among its types (an untyped task included).
            PoolSaturatedError: if the pool has ``max_pending`` and no room.
            TypeError: if ``task`` is not callable.
            RuntimeError: if the manager is not running, or once interpreter
                shutdown has begun.
            concurrent.futures.process.BrokenProcessPool: if the local pool
                is broken (its workers could not be started).
        """
        pool = self._pool_for(task_type)
        return pool._submit(task, args, kwargs, pool.task_timeout, task_type)

    def options(
        self,
        *,
        timeout: Any = UNSET,
        priority: int = 0,
        retries: int = 0,
        context_vars: Any = None,
        trace: Optional[bool] = None,
    ) -> ManagerOptions:
        """``submit_task`` and ``run`` with per-task options, as
        :meth:`duckpool.ProcessPoolExecutor.options` takes them (``timeout``
        left out: the pool's; ``context_vars`` and ``trace`` left out: as the
        pool says): ``manager.options(priority=5, retries=2).submit_task(fn,
        x, task_type="render")``.  Not keywords of ``submit_task`` itself,
        whose other keywords all go to the task.  Returns a
        ``ManagerOptions``; the manager need not be running yet.
        ``TypeError``/``ValueError`` for a bad value (``ImportError`` for
        ``trace=True`` without OpenTelemetry); ``retries`` is refused at
        submit on the Dask backend.  The futures of its tasks resolve as
        :meth:`submit_task`'s do, except that a task whose worker died or
        that timed out runs again while it has ``retries`` left.
        """
        return ManagerOptions(self, timeout, priority, retries, context_vars, trace)

    def _pool_for(self, task_type: Optional[str]) -> Union[ProcessPoolExecutor, DaskExecutor]:
        """The running pool, if it accepts ``task_type`` (else ``UnknownTaskError``)."""
        pool: Union[ProcessPoolExecutor, DaskExecutor] = self.get_pool()
        check_task_type(task_type)
        if not self.accepts(task_type):
            raise UnknownTaskError(task_type, self._task_type)
        return pool

    def accepts(self, task_type: Optional[str]) -> bool:
        """Would ``submit_task`` take a task of this type?  True for any type
        if the pool was started without a ``task_type`` (or never started),
        else whether it is among those types; the manager may be stopped."""
        types = self._task_types
        return types is None or task_type in types

    async def run(
        self,
        task: Callable[..., Any],
        *args: Any,
        task_type: Optional[str] = None,
        **kwargs: Any,
    ) -> Any:
        """``submit_task`` for asyncio: await the task's result.

        Raises what ``submit_task`` raises, with nothing queued; then, from
        the ``await``, the task's exception, or :class:`~duckpool.WorkerDiedError`,
        :class:`~duckpool.TaskTimeoutError` or a stop's error.  Cancelling the
        awaiting task cancels the pool task, stopping its worker if it runs.
        """
        future = self.submit_task(task, *args, task_type=task_type, **kwargs)
        return await await_cancelling(self.get_pool(), future)

    def stop(self, wait: bool = True, *, timeout: Optional[float] = None) -> None:
        """Shut the pool down; calling it again is harmless.  Returns None.

        ``wait=True`` waits for submitted tasks to finish and workers to exit;
        ``wait=False`` returns at once, and submitted tasks still run and
        their futures still resolve.  ``timeout`` drains with a deadline: then
        tasks still queued are cancelled and running ones stopped (their
        futures fail with :class:`~duckpool.WorkerDiedError`); not on the Dask
        backend, which cannot stop running code.  A worker that dies or a task
        that overruns its timeout while the pool drains fails only that task.

        Raises:
            ValueError: for a ``timeout`` on the Dask backend, or one not
                above 0.
            TypeError: for a ``timeout`` that is not a number.
        """
        self._check_owner()
        # Checked first: a bad timeout must leave the manager as it was, its
        # pool running, not forgotten before its shutdown could refuse it.
        timeout = check_timeout("timeout", timeout)
        with self._lock:
            pool = self._pool
            if pool is not None and self._backend == "dask" and timeout is not None:
                raise ValueError("stop(timeout=...) applies to backend='local' pools only")
            self._pool = None
            if pool is not None:
                self._stopped = True
        if isinstance(pool, ProcessPoolExecutor):
            pool.shutdown(wait=wait, timeout=timeout)
        elif pool is not None:
            pool.shutdown(wait=wait)

    def _local_pool(self, what: str) -> ProcessPoolExecutor:
        """The running local pool; the error that applies otherwise."""
        pool = self.get_pool()
        if not isinstance(pool, ProcessPoolExecutor):
            raise NotImplementedError(f"{what} applies to backend='local' pools only")
        return pool

    def stats(self) -> PoolStats:
        """A snapshot of the running pool (see ``ProcessPoolExecutor.stats``);
        ``RuntimeError`` if the manager is not running, ``NotImplementedError``
        for a Dask pool."""
        return self._local_pool("stats()").stats()

    def resize(self, max_workers: int) -> None:
        """Change the number of workers of the running pool; no future fails.

        Returns at once, as :meth:`duckpool.ProcessPoolExecutor.resize` does
        (surplus workers finish what they hold, then exit), and raises what it
        raises for a bad ``max_workers``; ``RuntimeError`` if the manager is
        not running, ``NotImplementedError`` for a Dask pool.
        """
        with self._lock:
            self._local_pool("resize()").resize(max_workers)
            self._max_workers = max_workers

    def _worker_init(self) -> None:
        """Apply this manager's worker naming in the current (worker) process.

        Kept from the Duck original.  duckpool names workers itself, so the
        pool never uses this as an initializer; it is harmless under every
        start method, since a manager pickles as its plain settings.
        """
        if not self._process_name_prefix:
            return
        current = multiprocessing.current_process()
        suffix = current.name.rsplit("-", 1)[-1]
        title = f"{self._process_name_prefix}-{suffix}"
        current.name = title
        import setproctitle

        setproctitle.setproctitle(title)

    def __getstate__(self) -> Dict[str, Any]:
        # Only plain settings cross a process boundary: never the pool, its
        # locks, or the creator process (the Duck original's spawn failure).
        return {
            "_id": self._id,
            "_owner_pid": self._owner_pid,
            "_max_workers": self._max_workers,
            "_daemon": self._daemon,
            "_task_type": self._task_type,
            "_process_name_prefix": self._process_name_prefix,
            "_backend": self._backend,
        }

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_backend", "local")
        self._creator_process = None
        self._lock = threading.RLock()
        self._pool = None
        self._mp_context = None
        self._stopped = False

    # -- display ------------------------------------------------------------

    @property
    def state(self) -> str:
        """``"new"``, ``"running"``, ``"stopped"`` or ``"inherited"``."""
        if self._owner_pid != os.getpid():
            return "inherited"
        if self._pool is not None:
            return "running"
        return "stopped" if self._stopped else "new"

    def _start_method(self) -> Optional[str]:
        if self._backend == "dask":
            return None
        if isinstance(self._pool, ProcessPoolExecutor):
            return self._pool.start_method
        if self._mp_context is not None:
            return str(self._mp_context.get_start_method())
        return None

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} id={self._id!r} state={self.state} "
            f"max_workers={self._max_workers} task_type={self._task_type!r} "
            f"start_method={self._start_method()!r} daemon={self._daemon} "
            f"owner_pid={self._owner_pid} backend={self._backend!r}>"
        )

    def __str__(self) -> str:
        return self.__repr__()


def _new_pool(
    manager_id: Any,
    backend: str,
    max_workers: int,
    address: Any,
    task_types: Optional[frozenset[str]],
    *,
    dask_keywords: dict[str, Any],
    local_keywords: dict[str, Any],
) -> Union[ProcessPoolExecutor, DaskExecutor]:
    """A manager's pool, made with the keywords its backend takes (checked)."""
    if backend == "dask":
        # Imported for this backend only: a local pool's process never loads
        # the Dask bridge.
        from duckpool._dask import DaskExecutor

        offered = None if task_types is None or address is not None else task_types
        return DaskExecutor(max_workers, address, task_types=offered, **dask_keywords)
    return ProcessPoolExecutor(max_workers, pool_id=_picklable_id(manager_id), **local_keywords)


def get_or_create_process_manager(
    id: Optional[Any] = None,
    force_create: bool = False,
    strictly_get: bool = False,
) -> ProcessPoolManager:
    """Return this process's manager named ``id``, creating it if needed.

    The same ``id`` gives the same manager within a process, whichever thread
    asks; ids are per process, so a forked child gets managers of its own.

    Args:
        id: the manager's name in this process (any hashable; ``None`` is a valid id).
        force_create: replace the manager registered under ``id`` with a new one.
            The replaced manager is stopped without waiting: its outstanding
            futures still resolve.  Other ids are untouched.
        strictly_get: only look up; raise :class:`ManagerNotFound` if ``id``
            has no manager in this process.

    Raises:
        TypeError: if both ``force_create`` and ``strictly_get`` are true, or
            ``id`` is not hashable.
        ManagerNotFound: with ``strictly_get=True`` when ``id`` is missing.
    """
    if force_create and strictly_get:
        raise TypeError("force_create and strictly_get cannot both be true")
    try:
        hash(id)
    except TypeError:
        raise TypeError(f"a manager id must be hashable, got {id!r}") from None
    pid = os.getpid()
    with _registry.lock:
        managers = REGISTRY.get(pid)
        replaced = None
        if not force_create:
            existing: Optional[ProcessPoolManager] = (
                managers.get(id) if managers is not None else None
            )
            if existing is not None:
                return existing
            if strictly_get:
                raise ManagerNotFound(f"process {pid} has no process pool manager with id {id!r}")
        elif managers is not None:
            replaced = managers.get(id)
        manager = ProcessPoolManager(multiprocessing.current_process())
        manager._id = id
        if managers is None:
            managers = REGISTRY[pid] = {}
        managers[id] = manager
    if replaced is not None:
        replaced._forget()
        replaced.stop(wait=False)
    return manager


def _picklable_id(manager_id: Any) -> Any:
    """A manager's id as its workers' log records carry it: itself, or its repr."""
    import pickle

    try:
        pickle.dumps(manager_id)
    except Exception:
        return repr(manager_id)
    return manager_id
