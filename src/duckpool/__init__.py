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

from duckpool._dask import DaskExecutor
from duckpool._errors import (
    InheritedManagerError,
    ManagerNotFound,
    TaskCancelledError,
    TaskTimeoutError,
    TaskUnpicklingError,
    UnknownTaskError,
    WorkerDiedError,
)
from duckpool._executor import ProcessPoolExecutor
from duckpool._manager import ProcessPoolManager
from duckpool._registry import REGISTRY, get_or_create_process_manager

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "DaskExecutor",
    "InheritedManagerError",
    "ManagerNotFound",
    "ProcessPoolExecutor",
    "ProcessPoolManager",
    "TaskCancelledError",
    "TaskTimeoutError",
    "TaskUnpicklingError",
    "UnknownTaskError",
    "WorkerDiedError",
    "__version__",
    "get_or_create_process_manager",
]
