"""OpenTelemetry traces across the process boundary (``trace=True``).

When a pool or a call asks for it, each task gets a span of its own,
``duckpool.task <callable>``, a child of the span active at ``submit()``.
The span lives in the parent, from submit to the future's resolution, so it
records every outcome, even a worker's death: a task's exception, a worker
death, a timeout or a cancel set its status (and add an event); the worker
slot, its pid and the attempt are attributes.

Its context travels with the task as a W3C ``traceparent`` (the call
becomes a ``TracedCall``), and the worker makes it current around the task:
spans the task starts with the worker's own tracer provider are children
of the task's span, in the same trace.

Needs ``opentelemetry-api`` (``pip install "duckpool[otel]"``), imported only
by pools that trace; a worker imports it only to run a traced task, and runs
it untraced if it is missing there.
"""

from __future__ import annotations

import functools

TYPE_CHECKING = False
if TYPE_CHECKING:  # a worker unpickles TracedCall: no typing at run time
    from concurrent.futures import Future
    from typing import Any, Callable, Optional

__all__ = ["TaskSpan", "TracedCall", "check_trace", "start", "submit_traced"]

#: The name of the tracer duckpool's spans come from.
TRACER_NAME = "duckpool"


def check_trace(value: Any) -> bool:
    """``trace=``: a bool; True needs ``opentelemetry-api``."""
    if not isinstance(value, bool):
        raise TypeError(f"trace must be True or False, got {value!r}")
    if value:
        try:
            import opentelemetry.trace  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                'trace=True needs OpenTelemetry: pip install "duckpool[otel]"'
            ) from exc
    return value


class TracedCall(functools.partial):  # type: ignore[type-arg]
    """A task's callable with the ``traceparent`` of its span, made current
    in the worker around the call (a ``functools.partial`` of the task, so the
    pool names it after the task)."""

    traceparent: str

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        try:
            from opentelemetry import context
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError:  # not installed where the task runs: untraced
            return super().__call__(*args, **kwargs)
        carried = TraceContextTextMapPropagator().extract({"traceparent": self.traceparent})
        token = context.attach(carried)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            context.detach(token)


class TaskSpan:
    """A task's span, from submit to its future's resolution (parent side)."""

    __slots__ = ("span",)

    def __init__(self, span: Any) -> None:
        self.span = span

    def on_assign(self, slot: int, pid: Optional[int], attempt: int) -> None:
        """A worker was given the task (lock held: only attributes set)."""
        span = self.span
        span.set_attribute("duckpool.slot", slot)
        if pid is not None:
            span.set_attribute("duckpool.worker.pid", pid)
        span.set_attribute("duckpool.attempt", attempt)
        if attempt > 1:
            span.add_event("duckpool.retry", {"duckpool.attempt": attempt})

    def on_worker(self, pid: int) -> None:
        """The worker of the slot the task went to before it had one is
        known now (lock held)."""
        self.span.set_attribute("duckpool.worker.pid", pid)

    def finish(self, future: Future[Any]) -> None:
        """The future resolved (a done callback): the outcome, then the end."""
        from opentelemetry.trace import Status, StatusCode

        from duckpool._errors import TaskCancelledError, TaskTimeoutError, WorkerDiedError

        span = self.span
        try:
            if future.cancelled():
                span.add_event("duckpool.cancelled")
                span.set_status(Status(StatusCode.ERROR, "cancelled"))
                return
            error = future.exception()
            if error is None:
                span.set_status(Status(StatusCode.OK))
                return
            if isinstance(error, WorkerDiedError):
                span.add_event(
                    "duckpool.worker_died",
                    {
                        "duckpool.worker.pid": error.pid or 0,
                        "duckpool.exitcode": error.exitcode if error.exitcode is not None else 0,
                        "duckpool.signal": error.signal_name or "",
                    },
                )
            elif isinstance(error, TaskTimeoutError):
                span.add_event("duckpool.timeout")
            elif isinstance(error, TaskCancelledError):
                span.add_event("duckpool.cancelled")
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        finally:
            span.end()


def submit_traced(
    fn: Callable[..., Any],
    pool_id: Any,
    submit: Callable[[Callable[..., Any], TaskSpan], Future[Any]],
) -> Future[Any]:
    """``submit(call, span)`` in a span of the task's own: ``call`` is ``fn``
    carrying the span's context; the span ends when the future resolves (at
    once if ``submit`` raises)."""
    from duckpool._futures import callable_label

    span, call = start(fn, callable_label(fn), pool_id)
    try:
        future = submit(call, span)
    except BaseException:
        span.span.end()
        raise
    future.add_done_callback(span.finish)
    return future


def start(fn: Callable[..., Any], label: str, pool_id: Any) -> tuple[TaskSpan, Callable[..., Any]]:
    """Start the span of a task about to be submitted (a child of the span
    active now); the task's callable carrying its context."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    span = trace.get_tracer(TRACER_NAME).start_span(
        f"duckpool.task {label}", kind=trace.SpanKind.PRODUCER
    )
    span.set_attribute("duckpool.task", label)
    if pool_id is not None:
        span.set_attribute("duckpool.pool", str(pool_id))
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
    call = TracedCall(fn)
    call.traceparent = carrier["traceparent"]
    return TaskSpan(span), call
