"""``context_vars=``: context variables whose values at submit reach the task,
under fork, forkserver and spawn, and are reset after it."""

from __future__ import annotations

import contextvars
import pickle
import threading

import pytest

import _context_tasks as ctx_tasks
import duckpool

TIMEOUT = 30


def test_values_at_submit_are_set_in_the_worker_for_the_task_alone(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        # (Started first: a worker forked later would inherit what is set below.)
        pool.prestart(TIMEOUT)
        carried = pool.options(context_vars=[ctx_tasks.request_id, ctx_tasks.tenant])
        token = ctx_tasks.request_id.set("req-42")
        try:
            future = carried.submit(ctx_tasks.seen)
            # Only the variables chosen, and only for that task.
            plain = pool.submit(ctx_tasks.seen)
            # A variable the caller never set keeps the worker's default.
            assert future.result(TIMEOUT) == ("req-42", "nobody")
            assert plain.result(TIMEOUT) == ("none", "nobody")
            # What a task sets itself is gone for the next one on that worker.
            assert carried.submit(ctx_tasks.set_and_return).result(TIMEOUT) == "set-by-a-task"
            assert pool.submit(ctx_tasks.seen).result(TIMEOUT) == ("none", "nobody")
            # map carries the values as they were when it was called, to every item.
            results = carried.map(ctx_tasks.seen_with, range(5), chunksize=2)
            ctx_tasks.request_id.set("later")
            assert list(results) == [(i, "req-42") for i in range(5)]
        finally:
            ctx_tasks.request_id.reset(token)
    finally:
        pool.shutdown()


def test_a_pool_wide_choice_carries_the_values_of_each_submitting_context(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(  # type: ignore[misc]
        2,
        ctx,  # type: ignore[arg-type]
        context_vars=ctx_tasks.request_id,
    )
    try:
        pool.prestart(TIMEOUT)

        def submit_as(request: str) -> object:
            ctx_tasks.request_id.set(request)
            return pool.submit(ctx_tasks.seen)

        futures = [contextvars.copy_context().run(submit_as, f"r{i}") for i in range(6)]
        assert [f.result(TIMEOUT)[0] for f in futures] == [f"r{i}" for i in range(6)]  # type: ignore[attr-defined]
        assert pool.submit(ctx_tasks.seen).result(TIMEOUT) == ("none", "nobody")
    finally:
        pool.shutdown()


def test_a_value_that_does_not_pickle_fails_its_future_naming_the_variable(ctx: object) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        token = ctx_tasks.lock_holder.set(threading.Lock())
        try:
            future = pool.options(context_vars=ctx_tasks.lock_holder).submit(ctx_tasks.seen)
        finally:
            ctx_tasks.lock_holder.reset(token)
        with pytest.raises(
            pickle.PicklingError, match=r"context variable _context_tasks\.lock_holder"
        ):
            future.result(TIMEOUT)
        assert pool.submit(ctx_tasks.seen).result(TIMEOUT) == ("none", "nobody")
    finally:
        pool.shutdown()


def test_the_manager_carries_context_variables(ctx: object) -> None:
    manager = duckpool.get_or_create_process_manager("context-test")
    manager.start(1, mp_context=ctx, context_vars=[ctx_tasks.tenant], prestart=True)  # type: ignore[arg-type]
    tokens = [ctx_tasks.tenant.set("acme"), ctx_tasks.request_id.set("r-7")]
    try:
        assert manager.submit_task(ctx_tasks.seen).result(TIMEOUT) == ("none", "acme")
        both = manager.options(context_vars=[ctx_tasks.request_id, ctx_tasks.tenant])
        assert both.submit_task(ctx_tasks.seen).result(TIMEOUT) == ("r-7", "acme")
    finally:
        ctx_tasks.tenant.reset(tokens[0])
        ctx_tasks.request_id.reset(tokens[1])
        manager.stop()


def test_bad_context_vars_are_refused_by_name() -> None:
    local = contextvars.ContextVar("local")
    with pytest.raises(TypeError, match="'local' is not a module-level name"):
        duckpool.ProcessPoolExecutor(1, context_vars=[local])
    with pytest.raises(TypeError, match="context_vars must be a ContextVar"):
        duckpool.ProcessPoolExecutor(1, context_vars=["request_id"])
    pool = duckpool.ProcessPoolExecutor(1)
    with pytest.raises(TypeError, match="context_vars must be a ContextVar"):
        pool.options(context_vars=[])
    pool.shutdown()
