"""The seed module's namespace: the names ``duck.utils.multiprocessing.processpool`` exports.

The seed path is served by ``_duckpool_duck_alias`` (a start-up import hook)
from this list; the objects are duckpool's own, not copies.
"""

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
