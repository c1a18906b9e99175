"""Settling futures from whichever path gets there first (result, death, cancel, shutdown)."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any


def notify_if_cancelled(future: Future[Any]) -> None:
    """Let ``concurrent.futures.wait`` see a cancelled future as done.

    A future cancelled while queued counts as done for waiters only once the
    executor acknowledges it (CANCELLED -> CANCELLED_AND_NOTIFIED).
    """
    try:
        future.set_running_or_notify_cancel()
    except RuntimeError:  # already acknowledged, or running
        pass


def set_result(future: Future[Any], value: Any) -> None:
    """Resolve ``future`` with ``value``, unless it was cancelled or resolved meanwhile."""
    try:
        future.set_result(value)
    except Exception:  # cancelled or already resolved by a racing path
        notify_if_cancelled(future)


def set_exception(future: Future[Any], error: BaseException) -> None:
    """Fail ``future`` with ``error``, unless it was cancelled or resolved meanwhile."""
    try:
        future.set_exception(error)
    except Exception:  # cancelled or already resolved by a racing path
        notify_if_cancelled(future)
