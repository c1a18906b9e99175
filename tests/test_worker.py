"""duckpool._worker: what a worker process needs, and how it gets it."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import _executor_tasks as tasks
import duckpool
from conftest import needs_memfd, needs_pidfds, run_in_forked_child

TIMEOUT = 30

#: Modules a spawned worker used to import only to rebuild what it was sent
#: (a Connection, a RawArray) or to read its own annotations; logging, since
#: a worker forwards its records from when something imports it; and what
#: multiprocessing.spawn and the pickle, signal and threading modules bring
#: (see _spawned and _worker).
AVOIDABLE = (
    "typing",
    "tempfile",
    "ctypes",
    "logging",
    "multiprocessing",
    "multiprocessing.connection",
    "multiprocessing.sharedctypes",
    "pickle",
    "re",
    "enum",
    "threading",
    "socket",
    "subprocess",
)

WORKER_MODULES_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, subprocess, sys
    import duckpool
    avoidable = sys.argv[1].split(",")
    code = f"sorted(m for m in __import__('sys').modules if m in {avoidable!r})"
    # What a bare interpreter has anyway (site and its .pth hooks included).
    bare = subprocess.run(
        [sys.executable, "-c", f"print({code})"], capture_output=True, text=True, check=True
    )
    baseline = set(eval(bare.stdout))
    with duckpool.ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as pool:
        print(sorted(set(pool.submit(eval, code).result(30)) - baseline))
    """
)


@needs_memfd  # (without it the marks are a RawArray: ctypes and multiprocessing come too)
def test_a_spawned_worker_imports_nothing_avoidable() -> None:
    # In a fresh interpreter with a -c main: a spawned worker re-imports a
    # main module (here pytest's), which would import anything.
    done = subprocess.run(
        [sys.executable, "-c", WORKER_MODULES_SCRIPT, ",".join(AVOIDABLE)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_marks_work_without_memfd(ctx: object, monkeypatch: pytest.MonkeyPatch) -> None:
    # Where there is no memfd, the marks are a RawArray: a task that kills its
    # worker is still known to have started, so it fails instead of being retried.
    monkeypatch.delattr(os, "memfd_create", raising=False)
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        with pytest.raises(duckpool.WorkerDiedError):
            pool.submit(tasks.kill_self).result(TIMEOUT)
        assert pool.submit(tasks.add, 1, 2).result(TIMEOUT) == 3
    finally:
        pool.shutdown()


LAZY_LOGGING_SCRIPT = textwrap.dedent(
    """
    import logging, multiprocessing, sys
    import duckpool, _log_tasks
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
    with duckpool.ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as pool:
        print(pool.submit(eval, "'logging' in __import__('sys').modules").result(30))
        # Unpickling the call imports _log_tasks, which imports logging.
        pool.submit(_log_tasks.log, logging.WARNING, "from the worker").result(30)
        print(pool.submit(eval, "'logging' in __import__('sys').modules").result(30))
    """
)


def test_a_worker_forwards_logs_from_when_logging_is_imported() -> None:
    done = subprocess.run(
        [sys.executable, "-c", LAZY_LOGGING_SCRIPT],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:3] == ["False", "WARNING from the worker", "True"]


@pytest.mark.parametrize("task", [tasks.finalize_at_exit, tasks.thread_outliving_task])
def test_a_worker_finishes_what_its_tasks_left_for_its_exit(
    ctx: object, tmp_path: Path, task: object
) -> None:
    # A worker leaves at once only when nothing waits for its exit: a
    # multiprocessing finalizer, or a non-daemon thread, still gets its turn.
    path = tmp_path / "at-exit"
    pool = duckpool.ProcessPoolExecutor(1, ctx)  # type: ignore[arg-type]
    try:
        pool.submit(task, str(path)).result(TIMEOUT)  # type: ignore[arg-type]
    finally:
        pool.shutdown()
    assert path.exists()


def test_a_workers_atexit_handlers_run_where_multiprocessing_runs_them(
    ctx: multiprocessing.context.BaseContext, tmp_path: Path
) -> None:
    # A spawned process exits through the interpreter's own exit; from
    # Python 3.13 a forked one runs them too (CPython gh-83856), not before.
    path = tmp_path / "at-exit"
    pool = duckpool.ProcessPoolExecutor(1, ctx)
    try:
        pool.submit(tasks.register_atexit, str(path)).result(TIMEOUT)
    finally:
        pool.shutdown()
    runs = ctx.get_start_method() == "spawn" or sys.version_info >= (3, 13)
    assert path.exists() is runs


FORKED_FACTS_SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing, os, sys
    sys.path.insert(0, sys.argv[1])
    import _spawned_tasks as tasks
    import duckpool

    if __name__ == "__main__":
        fork = multiprocessing.get_context("fork")
        # One worker, replaced after each task: the first is forked by this
        # process, the second by the zygote.
        with duckpool.ProcessPoolExecutor(1, fork, max_tasks_per_child=1) as pool:
            facts = [pool.submit(tasks.process_facts).result(30) for _ in range(2)]
        for each in facts:
            each["authkey"] = each["authkey"].hex()
        authkey = bytes(multiprocessing.current_process().authkey).hex()
        print(json.dumps({"facts": facts, "pid": os.getpid(), "authkey": authkey}))
    """
)


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
@needs_pidfds  # (without, a worker the zygote forked has the zygote as parent_process())
def test_forked_workers_look_to_their_tasks_like_processes_multiprocessing_forked() -> None:
    # Both the worker this process forks and those the zygote forks: the
    # pool's process is their parent, and stdin (here a pipe holding text)
    # reads as empty, not as the parent's input.
    done = subprocess.run(
        [sys.executable, "-c", FORKED_FACTS_SCRIPT, os.path.dirname(tasks.__file__)],
        input="the parent's input\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    first, second = report["facts"]
    assert first["ppid"] == report["pid"] != second["ppid"]  # the second: the zygote's child
    for facts in (first, second):
        assert facts["name"] == "duckpool-worker-0"
        assert facts["parent_pid"] == report["pid"]
        assert facts["parent_alive"] is True
        assert facts["start_method"] == "fork"
        assert facts["stdin"] == ""
        assert facts["authkey"] == report["authkey"]


def test_a_worker_whose_result_pipe_was_closed_leaves_quietly() -> None:
    # A start the parent saw fail (its fork server died midway) may still
    # have made a worker: the parent closed that worker's pipes, and the
    # worker must leave without a traceback when it finds its result pipe shut.
    import io

    from duckpool import _marks, _protocol, _worker

    def serve_with_the_read_end_closed() -> str:
        task_r, _task_w = os.pipe()
        result_r, result_w = os.pipe()
        os.close(result_r)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # (EPIPE, as in a worker)
        sys.stderr = io.StringIO()
        config = _worker.WorkerConfig(
            slot=0,
            max_workers=1,
            name="orphan",
            title=None,
            parent_pid=os.getppid(),
            initializer=None,
            initargs=(),
            marks=_marks.new_marks(multiprocessing.get_context("fork"), 2),
            max_memory=None,
            serializer="pickle",
            watched=True,
        )
        _worker.worker_main(_protocol.InheritedFd(task_r), _protocol.InheritedFd(result_w), config)
        return sys.stderr.getvalue()

    assert run_in_forked_child(serve_with_the_read_end_closed) == ""
