"""The per-process registry of managers: data only, and its fork reset.

``REGISTRY`` maps a process id to that process's managers by id:
``{pid: {id: ProcessPoolManager}}``.  ``INSTANCES`` holds weak references to
every manager made in this process (``ProcessPoolManager.all_instances``).  A
process only ever sees and uses its own entries; a child made by ``fork``
starts with both empty (the copies of the parent's managers it inherited
refuse to be used).

The factory, ``get_or_create_process_manager``, lives in ``_manager``: it
builds managers, and this module must not import the class that imports it.
The pools the managers run are registered in ``_process_pools``, whose one
fork hook also runs this module's reset.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Dict, List

from duckpool import _process_pools

__all__ = ["INSTANCES", "REGISTRY", "lock"]

# Typed loosely: this module sits below the class it holds (``_manager``
# imports it), and names no type of the layer above.  Its readers declare
# what they take out (``manager: ProcessPoolManager = ...``).
REGISTRY: Dict[int, Dict[Any, Any]] = {}
"""Every process's managers, by process id then manager id."""

INSTANCES: List[weakref.ReferenceType[Any]] = []
"""Weak references to the managers made in this process (``ProcessPoolManager.__instances``)."""

#: Guards both.  Read it as ``_registry.lock`` each time: a forked child gets
#: a new one (another thread may have held this one at the fork).
lock = threading.RLock()


def _reset_after_fork() -> None:
    """In a forked child: start from an empty registry with a fresh lock."""
    global lock
    lock = threading.RLock()
    REGISTRY.clear()
    INSTANCES.clear()


_process_pools.on_fork_in_child(_reset_after_fork)
