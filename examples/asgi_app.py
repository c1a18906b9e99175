"""A small ASGI app that offloads CPU work to duckpool, run under uvicorn.

Run it with two server worker processes, each owning its own pools:

    pip install "duckpool[examples]"
    uvicorn examples.asgi_app:app --workers 2 --port 8000

Each uvicorn worker creates its pools in the lifespan start-up (never before
the server forks: a pool made in the master would not belong to the
workers), and drains them in the lifespan shutdown that SIGTERM triggers.

Endpoints:
    /fib?n=25          CPU work in the "compute" pool (200 with the result)
    /crash             a task that kills its worker: 502, and the pool heals
    /slow?seconds=5    a task past the 1 s per-task timeout: 504
    /report?rows=500   a long task streaming its progress (one JSON line per
                       update, then its result); the ``X-Request-ID`` header
                       (or a new id) reaches the task through a ContextVar,
                       and the line it logs carries it
    /stats             the pools' ``stats()``
A full pool answers 429 (admission control: ``max_pending``).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import duckpool
from examples import asgi_tasks as tasks

WORKERS = int(os.environ.get("DUCKPOOL_EXAMPLE_WORKERS", "2"))
MAX_PENDING = int(os.environ.get("DUCKPOOL_EXAMPLE_MAX_PENDING", "8"))
TASK_TIMEOUT = float(os.environ.get("DUCKPOOL_EXAMPLE_TASK_TIMEOUT", "1.0"))
START_METHOD = os.environ.get("DUCKPOOL_EXAMPLE_START_METHOD")  # default: the platform's
DRAIN_SECONDS = 10.0


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    compute = duckpool.get_or_create_process_manager("compute")
    compute.start(
        WORKERS,
        task_type={"fib", "crash", "slow", "report"},
        process_name_prefix="example-compute",
        max_pending=MAX_PENDING,
        task_timeout=TASK_TIMEOUT,
        mp_context=multiprocessing.get_context(START_METHOD),
        context_vars=[tasks.request_id],  # every task sees the request's id
    )
    try:
        yield
    finally:
        compute.stop(wait=True, timeout=DRAIN_SECONDS)


async def _run(task_type: str, *args: object) -> JSONResponse:
    try:
        value = await duckpool.run_task(getattr(tasks, task_type), *args, task_type=task_type)
    except duckpool.PoolSaturatedError:
        return _answer({"error": "busy, retry later"}, 429)
    except duckpool.TaskTimeoutError:
        return _answer({"error": "the work took too long"}, 504)
    except duckpool.WorkerDiedError as exc:
        died = exc.signal_name or f"exit code {exc.exitcode}"
        return _answer({"error": f"the worker died ({died})"}, 502)
    return _answer({"result": value})


def _answer(body: dict[str, object], status: int = 200) -> JSONResponse:
    """``body`` as JSON, with the pid of the server worker that answered."""
    return JSONResponse(dict(body, server_pid=os.getpid()), status_code=status)


async def fib(request: Request) -> JSONResponse:
    return await _run("fib", int(request.query_params.get("n", "20")))


async def crash(request: Request) -> JSONResponse:
    return await _run("crash")


async def slow(request: Request) -> JSONResponse:
    return await _run("slow", float(request.query_params.get("seconds", "5")))


async def report(request: Request) -> StreamingResponse:
    """Run a long report, streaming each progress update as a JSON line."""
    tasks.request_id.set(request.headers.get("x-request-id") or uuid.uuid4().hex[:8])
    rows = int(request.query_params.get("rows", "500"))
    try:
        future = duckpool.submit_task(tasks.report, rows, task_type="report")
    except duckpool.PoolSaturatedError:
        return StreamingResponse(iter([json.dumps({"error": "busy"}) + "\n"]), status_code=429)

    async def lines() -> AsyncIterator[str]:
        async for update in future.progress_updates():
            yield json.dumps({"done": update.done, "total": update.total}) + "\n"
        try:
            yield json.dumps({"result": await asyncio.wrap_future(future)}) + "\n"
        except Exception as exc:
            yield json.dumps({"error": repr(exc)}) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def stats(request: Request) -> JSONResponse:
    snapshot = duckpool.pool_for("fib").stats()
    return JSONResponse(
        dict(snapshot._asdict(), workers=[worker._asdict() for worker in snapshot.workers])
    )


app = Starlette(
    routes=[
        Route("/fib", fib),
        Route("/crash", crash),
        Route("/slow", slow),
        Route("/report", report),
        Route("/stats", stats),
    ],
    lifespan=lifespan,
)
