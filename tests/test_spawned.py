"""duckpool._spawned: workers under spawn start without multiprocessing.spawn,
and still look to their tasks like processes multiprocessing spawned."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import _spawned_tasks as tasks
import duckpool
from conftest import wait_until

TIMEOUT = 30
SPAWN = multiprocessing.get_context("spawn")

MAIN_MODULE = textwrap.dedent(
    """
    import multiprocessing
    import duckpool

    def square(x):
        return x * x

    class Box:
        def __init__(self, value):
            self.value = value

    if __name__ == "__main__":
        with duckpool.ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as pool:
            print(pool.submit(square, 7).result(30), pool.submit(Box, 3).result(30).value)
    """
)


def _run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_functions_and_classes_of_a_main_script_run_in_spawned_workers(tmp_path: Path) -> None:
    script = tmp_path / "main_script.py"
    script.write_text(MAIN_MODULE)
    # Its __main__ block does not run again in the worker: that would start
    # a pool there, and print twice.
    assert _run([str(script)], tmp_path) == "49 3"


def test_functions_of_a_main_module_run_with_dash_m_run_in_spawned_workers(
    tmp_path: Path,
) -> None:
    (tmp_path / "main_module.py").write_text(MAIN_MODULE)
    assert _run(["-m", "main_module"], tmp_path) == "49 3"


def test_a_task_sees_its_process_as_multiprocessing_would_show_it() -> None:
    with duckpool.ProcessPoolExecutor(1, SPAWN) as pool:
        facts = pool.submit(tasks.process_facts).result(TIMEOUT)
    assert facts["name"] == "duckpool-worker-0"
    assert facts["authkey"] == bytes(multiprocessing.current_process().authkey)
    # (Watched through a pidfd, or where there are none through a pipe.)
    assert facts["parent_pid"] == facts["ppid"] == os.getpid()
    assert facts["parent_alive"] is True
    assert facts["start_method"] == multiprocessing.get_start_method()
    assert facts["stdin"] == ""  # not the terminal, not the parent's stdin


def test_preparation_data_without_a_start_method_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Python 3.15's spawn.get_preparation_data may give start_method=None (no
    # method chosen yet): the worker leaves its own unset, as spawn.prepare does.
    from multiprocessing import spawn

    real = spawn.get_preparation_data

    def without_start_method(name: str) -> dict[str, Any]:
        prep = real(name)
        prep["start_method"] = None
        return prep  # type: ignore[no-any-return]

    monkeypatch.setattr(spawn, "get_preparation_data", without_start_method)
    with duckpool.ProcessPoolExecutor(1, SPAWN) as pool:
        facts = pool.submit(tasks.process_facts).result(TIMEOUT)
    assert facts["name"] == "duckpool-worker-0"
    assert facts["chosen_start_method"] is None


def test_a_multiprocessing_queue_can_be_an_initializer_argument() -> None:
    queue = SPAWN.Queue()
    try:
        with duckpool.ProcessPoolExecutor(
            1, SPAWN, initializer=tasks.put_in, initargs=(queue, "from the worker")
        ) as pool:
            pool.submit(tasks.process_facts).result(TIMEOUT)
            assert queue.get(timeout=TIMEOUT) == "from the worker"
    finally:
        queue.close()
        queue.join_thread()


def test_a_worker_starts_while_another_process_holds_its_arguments_pipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A fork pool starting in another thread forks copies of every
    # descriptor this process has, the write end of a spawned worker's
    # arguments pipe among them: read up to EOF, that worker never started.
    from duckpool import _spawn

    held: list[int] = []
    enlarge = _spawn._enlarge

    def enlarge_and_hold(fd: int) -> None:
        held.append(os.dup(fd))  # (as that forked process would)
        enlarge(fd)

    monkeypatch.setattr(_spawn, "_enlarge", enlarge_and_hold)
    pool = duckpool.ProcessPoolExecutor(1, SPAWN)
    try:
        assert pool.submit(tasks.process_facts).result(TIMEOUT)["name"]
        assert held
    finally:
        pool.shutdown()
        for fd in held:
            os.close(fd)


def test_a_retiring_worker_runs_its_exit_handlers(tmp_path: Path) -> None:
    # (Coverage, logging and tasks' own clean-up rely on them.)
    marker = tmp_path / "exited"
    with duckpool.ProcessPoolExecutor(1, SPAWN, max_tasks_per_child=1) as pool:
        first = pool.submit(tasks.write_at_exit, str(marker), "bye").result(TIMEOUT)
        # The next task runs in the replacement, once the first worker left.
        assert pool.submit(os.getpid).result(TIMEOUT) != first
        wait_until(lambda: marker.exists() and marker.read_text() == "bye", TIMEOUT)


UNGUARDED_MAIN = textwrap.dedent(
    """
    import multiprocessing, os
    import duckpool

    # No __name__ == "__main__" guard: a worker running this again must not
    # start a pool of its own (and so on without end).
    pool = duckpool.ProcessPoolExecutor(1, multiprocessing.get_context("spawn"))
    print(pool.submit(os.getpid).result(30))
    """
)


def test_a_main_module_without_the_main_guard_is_refused_not_run_without_end(
    tmp_path: Path,
) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_MAIN)
    process = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = process.communicate(timeout=TIMEOUT)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever it left behind
        except ProcessLookupError:
            pass
        if process.poll() is None:
            process.communicate(timeout=TIMEOUT)
    assert process.returncode != 0
    assert "bootstrapping phase" in err
    assert "BrokenProcessPool" in err


FORK_SERVER_MAIN = textwrap.dedent(
    """
    import multiprocessing
    import sys
    import duckpool
    from multiprocessing import forkserver

    def imported(name):
        return name in sys.modules

    def report(queue):
        queue.put(("duckpool._worker" in sys.modules, "json" in sys.modules))

    if __name__ == "__main__":
        ctx = multiprocessing.get_context("forkserver")
        asked = ["json"]
        ctx.set_forkserver_preload(asked)
        with duckpool.ProcessPoolExecutor(1, ctx) as pool:
            assert pool.submit(imported, "json").result(30)
        assert asked == ["json"], asked  # the program's own list is left alone
        print(forkserver._forkserver._preload_modules)
        # A process of the program's own, forked by the same server: the
        # server imported duckpool's worker module (and the program's) as it started.
        queue = ctx.SimpleQueue()
        process = ctx.Process(target=report, args=(queue,))
        process.start()
        print(queue.get())
        process.join(30)
    """
)


def test_the_fork_server_duckpool_starts_has_the_worker_module_imported(tmp_path: Path) -> None:
    # A worker forked from it skips importing it: most of its start-up.
    (tmp_path / "main.py").write_text(FORK_SERVER_MAIN)
    lines = _run(["main.py"], tmp_path).splitlines()
    assert lines == ["['json', '_duckpool_preload']", "(True, True)"]


ANOTHER_COPY_MAIN = textwrap.dedent(
    """
    import sys

    sys.path.insert(0, sys.argv[1])  # the program's own duckpool, chosen at run time
    import multiprocessing
    import duckpool

    assert duckpool.__file__.startswith(sys.argv[1]), duckpool.__file__

    if __name__ == "__main__":
        with duckpool.ProcessPoolExecutor(1, multiprocessing.get_context("forkserver")) as pool:
            print(pool.submit(pow, 2, 5).result(30))
    """
)


def test_the_fork_server_never_preloads_another_copy_of_duckpool(tmp_path: Path) -> None:
    # A fork server up to 3.13 imports its preload list with its own
    # sys.path, not the program's: a duckpool found there first (here one
    # whose worker module fails) must not be the one the workers get.
    other = tmp_path / "other"
    (other / "duckpool").mkdir(parents=True)
    (other / "duckpool" / "__init__.py").write_text("")
    (other / "duckpool" / "_worker.py").write_text("raise ImportError('another copy')\n")
    (tmp_path / "main.py").write_text(ANOTHER_COPY_MAIN)
    this_copy = str(Path(duckpool.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(other), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    )
    done = subprocess.run(
        [sys.executable, "main.py", this_copy],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["32"]


def test_the_fork_server_is_asked_to_preload_only_what_it_can_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (Under 3.15's on_error="fail", a module the server cannot import
    # would fail the server itself, and every process started through it.)
    from duckpool import _fork_server

    check = _fork_server._path_gives_this_copy.__wrapped__  # (uncached)
    assert check()
    monkeypatch.setattr(_fork_server, "PRELOAD_MODULE", "_duckpool_no_such_module")
    assert not check()
