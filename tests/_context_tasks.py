"""Context variables and the tasks that read them (importable under spawn)."""

from __future__ import annotations

import threading
from contextvars import ContextVar

request_id: ContextVar[str] = ContextVar("request_id", default="none")
tenant: ContextVar[str] = ContextVar("tenant", default="nobody")
lock_holder: ContextVar[object] = ContextVar("lock_holder")


def seen() -> tuple[str, str]:
    """The values this task runs with."""
    return request_id.get(), tenant.get()


def seen_with(value: int) -> tuple[int, str]:
    return value, request_id.get()


def set_and_return() -> str:
    """Set a variable inside the task: the next task must not see it."""
    request_id.set("set-by-a-task")
    return request_id.get()


def unpicklable() -> object:
    return threading.Lock()
