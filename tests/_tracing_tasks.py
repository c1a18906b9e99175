"""Tasks that read the trace context they run in (importable under spawn)."""

from __future__ import annotations

import os

from opentelemetry import trace


def current_ids() -> tuple[int, int, int]:
    """The trace id and span id current in this worker, and its pid."""
    context = trace.get_current_span().get_span_context()
    return context.trace_id, context.span_id, os.getpid()


def fail() -> None:
    raise KeyError("failed in a traced task")


def die() -> None:
    os._exit(7)
