"""duckpool: named, fork-aware, self-healing process pools for Python servers.

The public API is the Duck framework's process-pool system
(``duck.utils.multiprocessing.processpool``) plus duckpool's own executor::

    from duckpool import get_or_create_process_manager

    manager = get_or_create_process_manager("render")
    manager.start(max_workers=2, task_type="render", process_name_prefix="render")
    future = manager.submit_task(pow, 2, 10, task_type="render")
    assert future.result(timeout=10) == 1024
    manager.stop()

``DaskExecutor`` runs the same interface on a Dask cluster (``pip install
"duckpool[dask]"``); ``distributed`` is imported only when one is created.
"""

from __future__ import annotations

# Not typing's TYPE_CHECKING: a spawned worker imports this package, and
# importing typing would add to every worker's start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from duckpool._dask import DaskExecutor
    from duckpool._errors import (
        InheritedManagerError,
        ManagerNotFound,
        PoolSaturatedError,
        TaskCancelledError,
        TaskQuarantinedError,
        TaskTimeoutError,
        TaskUnpicklingError,
        UnknownTaskError,
        WorkerDiedError,
    )
    from duckpool._executor import ProcessPoolExecutor
    from duckpool._manager import ProcessPoolManager, get_or_create_process_manager
    from duckpool._progress import Progress, report_progress
    from duckpool._registry import REGISTRY
    from duckpool._routing import pool_for, run_task, submit_task
    from duckpool._shutdown import drain_all, install_shutdown_handlers
    from duckpool._stats import HelperStats, PoolStats, WorkerStats

#: Where each public name lives.  They are imported on first use (PEP 562), so
#: a worker process, which needs only ``duckpool._worker``, does not import
#: the parent's machinery (what spawn and forkserver pay for at every start).
_EXPORTS = {
    "DaskExecutor": "duckpool._dask",
    "InheritedManagerError": "duckpool._errors",
    "ManagerNotFound": "duckpool._errors",
    "PoolSaturatedError": "duckpool._errors",
    "TaskCancelledError": "duckpool._errors",
    "TaskQuarantinedError": "duckpool._errors",
    "TaskTimeoutError": "duckpool._errors",
    "TaskUnpicklingError": "duckpool._errors",
    "UnknownTaskError": "duckpool._errors",
    "WorkerDiedError": "duckpool._errors",
    "ProcessPoolExecutor": "duckpool._executor",
    "ProcessPoolManager": "duckpool._manager",
    "Progress": "duckpool._progress",
    "report_progress": "duckpool._progress",
    "REGISTRY": "duckpool._registry",
    "get_or_create_process_manager": "duckpool._manager",
    "pool_for": "duckpool._routing",
    "run_task": "duckpool._routing",
    "submit_task": "duckpool._routing",
    "drain_all": "duckpool._shutdown",
    "install_shutdown_handlers": "duckpool._shutdown",
    "HelperStats": "duckpool._stats",
    "PoolStats": "duckpool._stats",
    "WorkerStats": "duckpool._stats",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'duckpool' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"
"""duckpool's version, as its package metadata gives it."""


def register_prometheus(registry: Any = None, executors: Any = None) -> Any:
    """Report this process's pools to Prometheus (needs ``duckpool[prometheus]``).

    Registers a collector on ``registry`` (``prometheus_client``'s default
    if ``None``) that reports every running manager's ``stats()``, labelled
    by its id, and those of ``executors`` (a mapping of name to executor).
    Returns the collector.  Raises ``ImportError`` without
    ``prometheus-client``; its arguments are not checked here.  It reads
    stats only, and touches no future: a manager that is not running (or
    stops meanwhile), or runs on Dask, is left out of a scrape.
    """
    try:
        from duckpool import _prometheus
    except ImportError as exc:
        raise ImportError(
            'register_prometheus() needs prometheus-client: pip install "duckpool[prometheus]"'
        ) from exc
    return _prometheus.register_prometheus(registry, executors)


__all__ = [
    "REGISTRY",
    "DaskExecutor",
    "HelperStats",
    "InheritedManagerError",
    "ManagerNotFound",
    "PoolSaturatedError",
    "PoolStats",
    "ProcessPoolExecutor",
    "ProcessPoolManager",
    "Progress",
    "TaskCancelledError",
    "TaskQuarantinedError",
    "TaskTimeoutError",
    "TaskUnpicklingError",
    "UnknownTaskError",
    "WorkerDiedError",
    "WorkerStats",
    "__version__",
    "drain_all",
    "get_or_create_process_manager",
    "install_shutdown_handlers",
    "pool_for",
    "register_prometheus",
    "report_progress",
    "run_task",
    "submit_task",
]
