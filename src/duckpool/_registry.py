"""The per-process registry of named managers, and its fork reset.

``REGISTRY`` maps a process id to that process's managers by id:
``{pid: {id: ProcessPoolManager}}``.  A process only ever sees and uses its
own entry; a child made by ``fork`` starts with an empty registry (the copies
of the parent's managers it inherited refuse to be used).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from typing import TYPE_CHECKING, Any, Dict, Optional

from duckpool import _process_pools
from duckpool._errors import ManagerNotFound

if TYPE_CHECKING:
    from duckpool._manager import ProcessPoolManager

__all__ = ["REGISTRY", "get_or_create_process_manager"]

REGISTRY: Dict[int, Dict[Any, ProcessPoolManager]] = {}
"""Every process's managers, by process id then manager id."""

_registry_lock = threading.RLock()


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
    from duckpool._manager import ProcessPoolManager

    if force_create and strictly_get:
        raise TypeError("force_create and strictly_get cannot both be true")
    try:
        hash(id)
    except TypeError:
        raise TypeError(f"a manager id must be hashable, got {id!r}") from None
    pid = os.getpid()
    with _registry_lock:
        managers = REGISTRY.get(pid)
        replaced = None
        if not force_create:
            existing = managers.get(id) if managers is not None else None
            if existing is not None:
                return existing
            if strictly_get:
                raise ManagerNotFound(
                    f"process {pid} has no process pool manager with id {id!r}"
                )
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


def _reset_after_fork() -> None:
    """In a forked child: start from an empty registry with a fresh lock."""
    global _registry_lock
    _registry_lock = threading.RLock()
    REGISTRY.clear()


_process_pools.on_fork_in_child(_reset_after_fork)
