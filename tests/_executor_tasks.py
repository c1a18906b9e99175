"""Functions the executor tests run in worker processes (importable under spawn)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any


def add(a: int, b: int) -> int:
    return a + b


def touch(path: str) -> None:
    with open(path, "w"):
        pass


def touch_count(path: str) -> int:
    """Append an "x" to ``path``; return how many it holds (the runs so far)."""
    with open(path, "a") as stream:
        stream.write("x")
    with open(path) as stream:
        return len(stream.read())


def note_pid(path: str) -> int:
    """Append this worker's pid to ``path`` (a line per run); return it."""
    with open(path, "a") as stream:
        stream.write(f"{os.getpid()}\n")
    return os.getpid()


def getpid() -> int:
    return os.getpid()


def exit_now(code: int) -> None:
    os._exit(code)


def kill_self(signum: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), signum)


def raise_key_error(key: str) -> None:
    raise KeyError(key)


def wait_for_file(path: str, timeout: float = 30.0) -> str:
    """Block until ``path`` exists (the test's signal to go on)."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)
    return "released"


class _SlowToClose:
    """A resource whose close blocks: it says so, then waits for ``gate``."""

    def __init__(self, started: str, gate: str) -> None:
        self.started = started
        self.gate = gate

    def __del__(self) -> None:
        Path(self.started).touch()
        wait_for_file(self.gate)


def fail_leaving_a_slow_finalizer(started: str, gate: str) -> None:
    """Raise, holding an object whose finalizer blocks until ``gate``: it
    runs once the worker has sent the error (the traceback held it)."""
    resource = _SlowToClose(started, gate)  # noqa: F841 (held by the frame)
    raise ValueError("failed, with a resource left to close")


def touch_then_wait(started: str, gate: str) -> str:
    """Say "running" by creating ``started``, then wait for ``gate``."""
    Path(started).touch()
    return wait_for_file(gate)


def return_lambda() -> Any:
    return lambda: None


def init_fail() -> None:
    raise ValueError("error in initializer")


def init_exit_zero() -> None:
    """An initializer that ends its worker with exit code 0, before it is ready."""
    os._exit(0)


def init_kill_self() -> None:
    """An initializer whose worker is SIGKILLed as it starts (as by the OOM killer)."""
    os.kill(os.getpid(), signal.SIGKILL)


class _FailsToUnpickle:
    """Pickles fine, raises when unpickled."""

    def __reduce__(self) -> Any:
        return (_refuse, ("refused to unpickle",))


def _refuse(message: str) -> None:
    raise RuntimeError(message)


def fails_to_unpickle() -> _FailsToUnpickle:
    return _FailsToUnpickle()


def identity(x: Any) -> Any:
    return x


def call_through(fn: Any, *args: Any) -> Any:
    """``fn(*args)``: a wrapper, as a subclass's ``submit`` may put around a call."""
    return fn(*args)


def stop_at_two(x: int) -> int:
    """``x``, or ``StopIteration`` for 2 (a ``next()`` on an empty iterator, say)."""
    if x == 2:
        raise StopIteration("empty")
    return x


def sleep_then_getpid(seconds: float) -> int:
    """This worker's pid, after ``seconds`` (long enough that a batch reaches every worker)."""
    time.sleep(seconds)
    return os.getpid()


def sleep_then(seconds: float, value: Any) -> Any:
    """Sleep ``seconds``, then return ``value``."""
    time.sleep(seconds)
    return value


def sleep_forever(started: str) -> None:
    Path(started).touch()
    while True:
        time.sleep(1)


def allocate(megabytes: int) -> int:
    """Grow this worker's resident memory and keep it (a leak)."""
    global _LEAK
    _LEAK = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(_LEAK), 4096):
        _LEAK[i] = 1
    return os.getpid()


_LEAK = bytearray()


def kwargs_echo(**kwargs: Any) -> dict[str, Any]:
    return kwargs


def sleep_forever_in(directory: str) -> None:
    """Say "running" with a file named for this worker's pid, then never return."""
    sleep_forever(str(Path(directory) / str(os.getpid())))


def soak_task(kind: str, value: int) -> int:
    """One soak-test task: answer, raise, die, or overrun its timeout."""
    if kind == "raise":
        raise ValueError(value)
    if kind == "die":
        os._exit(7)
    if kind == "hang":
        while True:
            time.sleep(1)
    if kind == "sigterm":  # a hostile overrun: only SIGKILL ends it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
    if kind == "grandchild":  # dies, leaving a child that holds its pipes for 2 s
        if os.fork() == 0:
            time.sleep(2)
            os._exit(0)
        os._exit(7)
    return value * 2


class Token:
    """A weak-referenceable result."""

    def __init__(self, value: int) -> None:
        self.value = value


def make_object(value: int) -> Token:
    return Token(value)


def mark_running_then_wait(directory: str, name: str, gate: str) -> str:
    """Create ``directory/name`` while running (removed on return), then wait for ``gate``."""
    marker = Path(directory) / name
    marker.touch()
    try:
        return wait_for_file(gate)
    finally:
        marker.unlink()


def ignore_sigterm_then_wait(started: str, gate: str) -> str:
    """Like ``touch_then_wait``, in a worker that ignores SIGTERM (only SIGKILL stops it)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return touch_then_wait(started, gate)


def mark_then_divide(directory: str, a: int, b: int) -> float:
    """Leave a file named ``a`` in ``directory``, then return ``a / b``."""
    (Path(directory) / str(a)).touch()
    return a / b


def _write(path: str, text: str) -> None:
    with open(path, "w") as stream:
        stream.write(text)


def finalize_at_exit(path: str) -> int:
    """Register a multiprocessing finalizer that writes ``path`` as the worker exits."""
    from multiprocessing import util

    util.Finalize(None, _write, args=(path, "finalized"), exitpriority=10)
    return os.getpid()


def thread_outliving_task(path: str) -> int:
    """Start a non-daemon thread that writes ``path`` once the worker's main
    thread has finished: the worker's exit has to wait for it."""
    import threading

    def write_when_main_ends() -> None:
        threading.main_thread().join(30)
        _write(path, "joined")

    threading.Thread(target=write_when_main_ends, daemon=False).start()
    return os.getpid()


def wait_then_touch(gate: str, finished: str) -> None:
    """Wait for ``gate``, then say "finished" by creating ``finished``."""
    wait_for_file(gate)
    Path(finished).touch()


def register_atexit(path: str) -> int:
    """Register an ``atexit`` handler that writes ``path`` as the worker exits."""
    import atexit

    atexit.register(_write, path, "atexit")
    return os.getpid()


#: Set by a test before its pool starts, changed after: a worker forked from
#: the pool's image (by the zygote or its standby) still reads the first value.
MARKER = "module default"


def read_marker() -> str:
    return MARKER


class FalsyError(Exception):
    """An exception that is false in a boolean context."""

    def __bool__(self) -> bool:
        return False


def raise_falsy_after_file(path: str) -> None:
    """Raise ``FalsyError`` once ``path`` exists (the caller is waiting by then)."""
    wait_for_file(path)
    raise FalsyError("falsy")


def init_wait_for_file(path: str) -> None:
    """An initializer that returns once ``path`` exists."""
    wait_for_file(path, 60.0)


def init_record_pid(directory: str) -> None:
    """An initializer that leaves a file named by this worker's pid in ``directory``."""
    with open(os.path.join(directory, str(os.getpid())), "w"):
        pass


def use_tracked_resources() -> int:
    """Make and free what multiprocessing's resource tracker tracks (shared
    memory, a semaphore); return this worker's pid."""
    import multiprocessing
    from multiprocessing import shared_memory

    block = shared_memory.SharedMemory(create=True, size=64)
    block.close()
    block.unlink()
    with multiprocessing.get_context().Lock():
        pass
    return os.getpid()
