"""Functions run in workers by tests/test_spawned.py (importable by name)."""

from __future__ import annotations

import atexit
import multiprocessing
import os
import sys
from typing import Any, Optional


def process_facts() -> dict[str, Any]:
    """What a task sees of its process through multiprocessing, and of stdin."""
    current = multiprocessing.current_process()
    parent = multiprocessing.parent_process()
    chosen = multiprocessing.get_start_method(allow_none=True)  # (before the next line sets it)
    return {
        "chosen_start_method": chosen,
        "name": current.name,
        "authkey": bytes(current.authkey),
        "parent_pid": None if parent is None else parent.pid,
        "parent_alive": None if parent is None else parent.is_alive(),
        "start_method": multiprocessing.get_start_method(),
        "stdin": sys.stdin.read() if sys.stdin is not None else None,
        "ppid": os.getppid(),
    }


def put_in(queue: Any, value: Any) -> None:
    """An initializer: hands ``value`` to the parent through ``queue``."""
    queue.put(value)


def write_at_exit(path: str, text: str) -> Optional[int]:
    """Have the worker write ``text`` to ``path`` as its interpreter exits."""

    def write() -> None:
        with open(path, "w") as stream:
            stream.write(text)

    atexit.register(write)
    return os.getpid()
