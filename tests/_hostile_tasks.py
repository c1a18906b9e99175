"""Hostile tasks: functions test_hostile_tasks runs in workers (importable under spawn).

Each one does something a well-behaved task would not, to the process that
runs it: closes its descriptors, ignores SIGTERM, forks a process that
outlives it, leaves its session, raises ``SystemExit``, starts a pool of its
own, or runs a program that inherits what it may.  None of them must cost
more than its own future.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckpool


def add(a: int, b: int) -> int:
    return a + b


def touch_then_wait(started: str, gate: str, timeout: float = 60.0) -> str:
    """Say "running" by creating ``started``, then wait (up to ``timeout``) for ``gate``."""
    Path(started).touch()
    deadline = time.monotonic() + timeout
    while not Path(gate).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{gate} did not appear within {timeout} s")
        time.sleep(0.005)
    return "released"


def _say_pid(path: str, pid: int) -> None:
    """Write ``pid`` to ``path`` in one step: the reader never sees half of it."""
    partial = f"{path}.{pid}.part"
    Path(partial).write_text(str(pid))
    os.replace(partial, path)


def report_pid_then_sleep(pid_file: str, seconds: float = 60.0) -> None:
    """Say this worker's pid, then sleep (the test stops or kills the worker)."""
    _say_pid(pid_file, os.getpid())
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)


def close_inherited_fds_then(outcome: str) -> str:
    """Close every descriptor but 0, 1 and 2 (the pool's pipes with them), then
    return or raise."""
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    if outcome == "raise":
        raise ValueError("closed every descriptor")
    return "closed every descriptor"


def replace_written_pipes_then(outcome: str) -> str:
    """Put ``/dev/null`` in place of every pipe this process writes to but
    2 (the worker's result pipe with them), then return or raise: the worker
    runs on, answering into ``/dev/null``."""
    sink = os.open(os.devnull, os.O_WRONLY)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            with open(f"/proc/self/fdinfo/{fd}") as info:
                flags = int(info.read().split("flags:")[1].split()[0], 8)
        except OSError:  # (the listing's own descriptor, closed by now)
            continue
        written = flags & os.O_ACCMODE == os.O_WRONLY
        if fd > 2 and fd != sink and target.startswith("pipe:") and written:
            os.dup2(sink, fd)
    os.close(sink)
    if outcome == "raise":
        raise ValueError("replaced the pipes")
    return "replaced the pipes"


def overwrite_marks_then_die(runs_file: str) -> None:
    """Zero every cell of the marks the worker shares with the pool (found as
    a hostile task would: through the garbage collector), note this run in
    ``runs_file``, then die."""
    import gc

    from duckpool import _marks, _worker

    for obj in gc.get_objects():
        if isinstance(obj, _worker.WorkerConfig):
            view = _marks.marks_array(obj.marks)
            for cell in range(len(view)):
                view[cell] = 0
    with open(runs_file, "a") as runs:
        runs.write(f"{os.getpid()}\n")
    os._exit(1)


def ignore_sigterm_then_sleep(pid_file: str, seconds: float = 60.0) -> None:
    """Ignore SIGTERM (a timeout's first signal), then overrun any timeout."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    report_pid_then_sleep(pid_file, seconds)


class _Terminated(Exception):
    pass


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated("told to stop")


def catch_sigterm_then(pid_file: str, outcome: str, seconds: float = 60.0) -> str:
    """Turn SIGTERM (a timeout's or a cancel's first signal) into an
    exception, overrun any timeout, then, once told to stop, ``"return"`` a
    result or ``"raise"`` an error of the task's own."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        report_pid_then_sleep(pid_file, seconds)
    except _Terminated:
        if outcome == "raise":
            raise RuntimeError("the task's own error, once told to stop") from None
        return "the task's own result, once told to stop"
    return "slept its fill"


def fork_lingering_grandchild(grandchild_file: str, worker_file: str, then: str) -> str:
    """Fork a process that keeps every descriptor of this worker for a minute,
    then return, exit, or sleep until killed (``then``).

    The grandchild's pid goes to ``grandchild_file`` before this worker goes
    on, so the test can always clean it up; ``worker_file`` gets this worker's.
    """
    pid = os.fork()
    if pid == 0:  # the grandchild: no Python-level exit, no pool code
        try:
            time.sleep(60)
        finally:
            os._exit(0)
    _say_pid(grandchild_file, pid)
    _say_pid(worker_file, os.getpid())
    if then == "exit":
        os._exit(7)
    if then == "sleep":
        report_pid_then_sleep(worker_file)
    return "forked"


def leave_session() -> int:
    """Become a session (and process group) leader of its own; return the session id."""
    os.setsid()
    return os.getsid(0)


def raise_system_exit() -> None:
    raise SystemExit(3)


def raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def leave_thread_running(started: str) -> str:
    """Start a non-daemon thread that never ends, and return."""

    def forever() -> None:
        Path(started).touch()
        while True:
            time.sleep(0.05)

    threading.Thread(target=forever, name="left-running", daemon=False).start()
    return "left a thread running"


def run_inner_pool(start_method: str) -> int:
    """Start a duckpool pool inside this task and return what it computed."""
    context = multiprocessing.get_context(start_method)
    with duckpool.ProcessPoolExecutor(1, mp_context=context) as inner:
        return inner.submit(add, 2, 3).result(timeout=60)


def open_descriptors() -> dict[int, str]:
    """This process's descriptors and what each refers to (``readlink``)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor, closed already
            pass
    return found


#: A child process's own listing of its descriptors, one "fd target" a line.
_LIST_FDS = (
    "import os\n"
    "for name in os.listdir('/proc/self/fd'):\n"
    "    try:\n"
    "        print(name, os.readlink('/proc/self/fd/' + name))\n"
    "    except OSError:\n"
    "        pass\n"
)


def programs_see(listing_file: str) -> dict[str, object]:
    """What this worker holds, and what programs it runs without ``close_fds`` see.

    Two programs run: ``ls -l /proc/self/fd`` through ``os.system`` (a shell),
    and a Python child of ``subprocess.Popen(..., close_fds=False)``.  Each
    listing is returned as ``{fd: target}``.
    """
    held = open_descriptors()
    os.system(f"ls -l /proc/self/fd > {listing_file}")
    shell_saw = {}
    for line in Path(listing_file).read_text().splitlines():
        if " -> " not in line:
            continue
        left, target = line.split(" -> ", 1)
        shell_saw[int(left.split()[-1])] = target
    child = subprocess.Popen(
        [sys.executable, "-c", _LIST_FDS], stdout=subprocess.PIPE, text=True, close_fds=False
    )
    out, _ = child.communicate(timeout=60)
    python_saw = {}
    for line in out.splitlines():
        fd, target = line.split(" ", 1)
        python_saw[int(fd)] = target
    return {"held": held, "shell": shell_saw, "python": python_saw}


def fork_whose_child_leaves_the_task(how: str) -> tuple[int, int, int]:
    """Fork; the child comes back out of this task (``how``: "return",
    "raise", or "exit" with code 3), as if it were the worker.  The task
    waits for the child, and returns its own pid, the child's exit code and
    the code it expected: the child must end as leaving the task asked."""
    pid = os.fork()
    if pid == 0:
        if how == "raise":
            raise ValueError("raised in the child")
        if how == "exit":
            sys.exit(3)
        return (-1, -1, -1)  # an answer that must never reach the parent
    _, status = os.waitpid(pid, 0)
    return os.getpid(), os.waitstatus_to_exitcode(status), {"return": 0, "raise": 1}.get(how, 3)


class _ForksWhenPickled:
    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> tuple[object, tuple[str]]:
        if os.fork() == 0:  # the child goes on to answer: it must not
            if self.how == "exit":
                sys.exit(0)
            return (str, ("from the child",))
        os.wait()
        return (str, ("from the worker",))


def result_that_forks_when_pickled(how: str) -> object:
    """A result whose pickling forks; the child returns ("return") or exits."""
    return _ForksWhenPickled(how)


def log_pid_and_fork_on_zero(log: str, x: int) -> int:
    """A ``map`` call that notes which process ran it; the one for 0 forks a
    child that comes back out of the call (by ``sys.exit`` if ``x`` is 0 and
    the log's name ends in "exit", else by returning)."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {x}\n")
    if x == 0:
        pid = os.fork()
        if pid == 0:
            if log.endswith("exit"):
                sys.exit(0)
            return -1
        os.waitpid(pid, 0)
    return x


def init_fork_whose_child_returns() -> None:
    """An initializer that forks; the child returns from it, as the worker does."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)


def announce_a_frame_then_return(size: int) -> str:
    """Write a frame's length header alone to the worker's result pipe (the
    long form from ``2**31 - 1``), then return: the worker's own answer
    follows it, as the bytes of a frame that can never be whole."""
    from duckpool import _progress, _protocol

    assert _progress._send is not None
    _progress._send(_protocol.frame_header(size))
    return "announced"


def steal_from_the_task_pipe_then_return(index: int, count: int, started: str) -> int:
    """As a ``map`` call: the one of index 0 says it started (creating
    ``started``), then reads up to ``count`` bytes of the next frame sent to
    its worker out of the task pipe (waiting up to 30 s for it): part of it
    leaves the worker out of step with the frames it is sent, all of it
    leaves that frame never to arrive."""
    if index == 0:
        frame = sys._getframe()
        while frame.f_code.co_name != "worker_main":
            frame = frame.f_back  # type: ignore[assignment]
        task_fd = frame.f_locals["task_conn"].fileno()
        Path(started).touch()
        readable, _, _ = select.select([task_fd], [], [], 30)
        assert readable, "nothing was sent behind this call"
        assert os.read(task_fd, count)
    return index


def answer_out_of_turn(short: bool) -> str:
    """Write a result frame for a task this worker is not running (or, with
    ``short``, one too short for any answer) through the worker's own writer,
    as a process sharing its pipe could."""
    from duckpool import _progress, _protocol

    assert _progress._send is not None
    frame = _protocol.encode_result(987654321, _protocol.STATUS_OK, b"\x80\x04N.")
    _progress._send(b"\x00\x00\x00\x03abc" if short else frame)  # (a 4-byte length first)
    time.sleep(60)  # killed long before
    return "never"


class _UnshowableError(Exception):
    def __init__(self) -> None:
        super().__init__()
        self.unpicklable = lambda: None  # pickling it fails

    def __str__(self) -> str:
        raise SystemExit(9)  # and so does showing it, with what ends a process


def raise_an_unshowable_unpicklable_error() -> None:
    raise _UnshowableError()


def _fork_when_loaded() -> str:
    if os.fork() == 0:
        return "child-unpickled"  # the child goes on to run the task: it must not
    os.wait()
    return "parent-unpickled"


class ForksWhenUnpickled:
    """An argument whose unpickling, in the worker, forks."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_fork_when_loaded, ())


def note_argument(log: str, argument: str) -> str:
    with open(log, "a") as f:
        f.write(f"{argument}\n")
    return argument
