"""The Duck framework's process-pool system: named, typed process pools.

Each process keeps its own managers (:data:`REGISTRY`), one per id, made and
found with :func:`get_or_create_process_manager`.  A
:class:`ProcessPoolManager` runs one pool of worker processes that accepts
the task types it was started with; a worker that dies fails only the task it
was running, and the pool goes on.  The objects here are duckpool's own
(:mod:`duckpool` exports them too).
"""

# Served under duck.utils.multiprocessing.processpool by _duckpool_duck_alias
# (a start-up import hook) from this list.

from duckpool._errors import ManagerNotFound, UnknownTaskError
from duckpool._manager import ProcessPoolManager, get_or_create_process_manager
from duckpool._registry import REGISTRY

__all__ = [
    "REGISTRY",
    "ManagerNotFound",
    "ProcessPoolManager",
    "UnknownTaskError",
    "get_or_create_process_manager",
]
