"""Shared fixtures: start methods, registry clean-up, deadline waits.

Worker-side functions live in ``_tasks.py``; this file makes that module
importable from every worker, whatever the start method:

* the tests directory goes on ``sys.path`` (fork inherits it, spawn and
  forkserver children receive the parent's ``sys.path``), and
* on ``PYTHONPATH`` (for interpreters started with ``subprocess``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import faulthandler
import multiprocessing
import multiprocessing.context
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import psutil
import pytest

import duckpool
from duckpool import _child

TESTS_DIR = Path(__file__).resolve().parent

if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

# setproctitle finds the argv area by walking back from environ[0].  Changing an
# existing variable replaces its environ slot; when that variable is the first one
# (PYTHONPATH in `PYTHONPATH=src python -m pytest`) setproctitle, first called in a
# fork worker, finds nothing and silently leaves the title alone
# (dvarrazzo/py-setproctitle#42).  Initialise it before touching the environment.
try:
    import setproctitle
except ImportError:  # pragma: no cover - a core dependency of duckpool
    pass
else:
    setproctitle.getproctitle()

_pythonpath = os.environ.get("PYTHONPATH", "")
if str(TESTS_DIR) not in _pythonpath.split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), _pythonpath) if p)

try:
    # Installed as a .pth hook by the package; with a plain PYTHONPATH=src run
    # the hook has not run yet.  install() is idempotent.
    import _duckpool_duck_alias
except ImportError:  # pragma: no cover - the seed-path tests report it
    pass
else:
    _duckpool_duck_alias.install()

START_METHODS = ("fork", "spawn", "forkserver")

# Linux's facilities the pool uses where the system has them.  The
# portable-paths run (tests/portable/sitecustomize.py) hides them, so that
# the fallbacks of macOS and the BSDs run too; a test of a facility itself
# is skipped there.
needs_pidfds = pytest.mark.skipif(
    not _child.has_pidfds(), reason="needs pidfds (Linux 5.3+), hidden or missing here"
)
needs_memfd = pytest.mark.skipif(
    not hasattr(os, "memfd_create"), reason="needs memfd_create (Linux), hidden or missing here"
)
needs_epoll = pytest.mark.skipif(
    not hasattr(select, "epoll"), reason="needs epoll (Linux), hidden or missing here"
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the Dask tests (marker ``dask``) after every other test.

    A distributed Client leaves threads behind in this process once closed
    (its offload thread lives as long as the interpreter), and every fork
    of a pool's first worker or zygote after that would be a fork of a
    process running those threads, with the risk of inheriting a lock one
    of them holds.  The sort is stable, so every other test keeps its order.
    """
    items.sort(key=lambda item: item.get_closest_marker("dask") is not None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A test that timed out waiting on a pool gets the stacks of every
    process below this one appended to its report (with gdb, where the
    machine has it): a hang that shows once in many runs must leave enough
    behind to be explained."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not (report.failed and call.when == "call" and call.excinfo is not None):
        return
    # (concurrent.futures' TimeoutError is the builtin one from 3.11 only;
    # pytest-timeout's hang is a failure whose message starts "Timeout".)
    timed_out = call.excinfo.errisinstance((TimeoutError, concurrent.futures.TimeoutError))
    if not (timed_out or str(call.excinfo.value).startswith("Timeout")):
        return
    threads = {thread.ident: thread.name for thread in threading.enumerate()}
    own = [
        f"--- thread {threads.get(ident, ident)}\n{''.join(traceback.format_stack(frame))}"
        for ident, frame in sys._current_frames().items()
    ]
    report.sections.append(("stacks of this process's threads", "\n".join(own)))
    report.sections.append(("stacks of this process's descendants", _descendant_stacks()))


def _descendant_stacks() -> str:
    gdb = shutil.which("gdb")
    lines = []
    for child in psutil.Process().children(recursive=True)[:8]:  # gdb takes a second each
        try:
            lines.append(f"--- pid {child.pid} ({child.status()}): {' '.join(child.cmdline())}")
        except psutil.Error:
            continue
        if gdb is None:
            continue
        command = [gdb, "-p", str(child.pid), "-batch", "-iex", "set auto-load safe-path /"]
        command += ["-ex", "thread apply all py-bt", "-ex", "thread apply all bt 15"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
            lines.append(done.stdout)
        except (OSError, subprocess.SubprocessError) as exc:
            lines.append(f"gdb failed: {exc!r}")
    return "\n".join(lines) or "(no descendants)"


@pytest.fixture(params=START_METHODS, ids=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    """The name of a multiprocessing start method; every pool test runs under each."""
    return str(request.param)


@pytest.fixture
def ctx(start_method: str) -> multiprocessing.context.BaseContext:
    """The multiprocessing context for ``start_method``."""
    return multiprocessing.get_context(start_method)


@pytest.fixture
def executor(ctx: multiprocessing.context.BaseContext) -> Iterator[duckpool.ProcessPoolExecutor]:
    """A two-worker pool under ``ctx``, shut down within bounds afterwards."""
    pool = duckpool.ProcessPoolExecutor(2, mp_context=ctx)
    yield pool
    pool.shutdown(cancel_futures=True, timeout=30)  # bounded, even if a test hung


@pytest.fixture(autouse=True)
def _stop_registered_managers() -> Iterator[None]:
    """After each test, stop every manager this process registered and clear REGISTRY."""
    yield
    duckpool = sys.modules.get("duckpool")
    if duckpool is None:
        return
    registry = duckpool.REGISTRY
    try:
        for manager in list(registry.get(os.getpid(), {}).values()):
            manager.stop(wait=False)
    finally:
        registry.clear()


@pytest.fixture
def short_graces(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's graces and watch periods cut short, in this process.

    A test of what happens once a grace runs out (a worker that ignores
    SIGTERM, or never leaves) need not wait the seconds a real pool gives.
    Every module that holds one of these names gets the short value.
    """
    from duckpool import _core, _fork_server
    from duckpool._pool import _deadlines, _dispatcher, _successors, _supervisor

    for module in (_supervisor, _deadlines, _dispatcher, _successors):
        monkeypatch.setattr(module, "KILL_GRACE_SECONDS", 0.5)
    for module in (_supervisor, _core):
        monkeypatch.setattr(module, "STOP_GRACE_SECONDS", 0.5)
    monkeypatch.setattr(_fork_server, "CHECK_SECONDS", 0.1)
    monkeypatch.setattr(_deadlines, "START_CHECK_SECONDS", 0.05)
    monkeypatch.setattr(_deadlines, "TAKE_UP_SECONDS", 0.05)


@pytest.fixture
def spans() -> Iterator[Any]:
    """An in-memory exporter of the spans this process finishes (skips the
    test without the OpenTelemetry SDK).  One tracer provider for the whole
    session: OpenTelemetry lets a process set it once."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    global _SPAN_EXPORTER
    if _SPAN_EXPORTER is None:
        _SPAN_EXPORTER = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_SPAN_EXPORTER))
        trace.set_tracer_provider(provider)
    _SPAN_EXPORTER.clear()
    yield _SPAN_EXPORTER
    _SPAN_EXPORTER.clear()


_SPAN_EXPORTER: Any = None


def task_spans(exporter: Any, count: int) -> list[Any]:
    """The first ``count`` task spans to end (they end as their futures resolve)."""

    def ended() -> list[Any]:
        return [s for s in exporter.get_finished_spans() if s.name.startswith("duckpool.task")]

    wait_until(lambda: len(ended()) >= count, 30)
    return ended()


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    """A file path that blocked tasks wait for; created at teardown so no worker lingers."""
    path = tmp_path / "gate"
    yield path
    path.touch()


def wait_until(
    predicate: Callable[[], object], timeout: float = 10, interval: float = 0.01
) -> None:
    """Poll ``predicate`` until it is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate!r}")
        time.sleep(interval)


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie awaiting its parent's wait counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):  # gone between open and read
        return True
    # The state letter follows the parenthesised command name, which may contain spaces.
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def proc_cmdline(pid: int) -> str:
    """``/proc/<pid>/cmdline`` read from outside, as ``ps`` shows it (NULs as spaces)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()


def proc_comm(pid: int) -> str:
    """``/proc/<pid>/comm``: the short name ``top`` shows (at most 15 characters)."""
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def run_script(script: str, *args: str, timeout: float = 60) -> str:
    """Run ``script`` in a child interpreter (duckpool as this one has it);
    its output, once it has exited 0 within ``timeout`` s (a hang or a
    failure fails the test, with its error output).

    For what could deadlock: a deadlock in this process would hang the
    suite, and pytest-timeout's error, if raised in a finalizer, would be
    swallowed there."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@contextlib.contextmanager
def parent_script(
    script: str, *args: str, timeout: float = 30
) -> Iterator[tuple[subprocess.Popen[str], list[int]]]:
    """Run ``script`` as a pool's parent process, in a session of its own.

    The script prints its workers' pids on its first line; yields the
    process and those pids.  A parent still running on exit is killed.
    """
    parent = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert parent.stdout is not None
        yield parent, [int(p) for p in parent.stdout.readline().split()]
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.communicate(timeout=timeout)


def helper_pids(pool: duckpool.ProcessPoolExecutor) -> dict[str, int]:
    """The pool's live helper processes (zygote, standby), by role."""
    return {helper.role: helper.pid for helper in pool.stats().helpers}


def fork_server_pid() -> Optional[int]:
    """The pid of multiprocessing's fork server, if it runs."""
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)  # type: ignore[attr-defined]
    return None if pid is None or process_gone(pid) else int(pid)


def resource_tracker_pid() -> Optional[int]:
    """The pid of multiprocessing's resource tracker, if it runs."""
    from multiprocessing import resource_tracker

    pid = getattr(resource_tracker._resource_tracker, "_pid", None)  # type: ignore[attr-defined]
    return None if pid is None or process_gone(pid) else int(pid)


def exit_code_of_child(pid: int, timeout: float) -> int:
    """Wait (polling) for this process's child ``pid`` to exit, reap it and
    return its exit code; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped:
            return os.waitstatus_to_exitcode(status)
        assert time.monotonic() < deadline, f"child {pid} still runs after {timeout} s"
        time.sleep(0.01)


def kill_quietly(pid: Optional[int]) -> None:
    """SIGKILL ``pid`` unless it is None or gone."""
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def all_pool_processes(pool: duckpool.ProcessPoolExecutor) -> list[int]:
    """Every process the pool owns or relies on: workers, helpers, descendants
    of this process (children of every thread), the fork server and tracker."""
    pids = set(pool.worker_pids()) | set(helper_pids(pool).values())
    pids |= {child.pid for child in psutil.Process().children(recursive=True)}
    pids |= {pid for pid in (fork_server_pid(), resource_tracker_pid()) if pid is not None}
    pids.discard(os.getpid())
    return sorted(pids)


def _reap(pid: int, timeout: float) -> None:
    """Wait for child ``pid`` to exit; SIGKILL it if it has not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def run_in_forked_child(fn: Callable[[], Any], timeout: float = 30) -> Any:
    """Run ``fn`` in a child made with ``os.fork()``; return what it returned.

    The child reports through a pipe and always ends with ``os._exit``; a child
    that does not answer within ``timeout`` is killed and the test fails.
    """
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process
        pid = os.fork()
    if pid == 0:  # the child
        exit_code = 0
        try:
            os.close(read_fd)
            # If the child hangs, its stacks land in the test's captured stderr.
            # (An alarm, not dump_traceback_later: with pytest's own
            # faulthandler_timeout armed at the fork, that call would wait
            # for ever on the lock of the parent's watchdog thread.)
            faulthandler.register(signal.SIGALRM, all_threads=True)
            signal.alarm(max(int(timeout) - 5, 1))
            try:
                payload: tuple[str, Any] = ("ok", fn())
            except BaseException as exc:
                payload = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            data = pickle.dumps(payload)
            while data:
                data = data[os.write(write_fd, data) :]
        except BaseException:
            exit_code = 1
        finally:
            os._exit(exit_code)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the forked child did not answer within {timeout} s")
            ready, _, _ = select.select([read_fd], [], [], remaining)
            if ready:
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(read_fd)
        _reap(pid, timeout=5)
    assert chunks, "the forked child died without answering"
    status, value = pickle.loads(b"".join(chunks))
    if status == "error":
        raise AssertionError(f"in the forked child: {value}")
    return value
