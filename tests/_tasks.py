"""Functions that run inside worker processes.

Kept in their own importable module (no test-framework imports) so that spawn
and forkserver workers can unpickle them by name.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any, Optional

# Mutated by tests in the parent before a pool starts: a fork worker sees the
# new value, a spawn or forkserver worker sees this one.
MARKER = "module default"


def add(a: Any, b: Any) -> Any:
    return a + b


def echo(x: Any) -> Any:
    return x


def kwargs_of(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Return exactly what the task was called with."""
    return args, kwargs


def raise_value_error(msg: str) -> None:
    raise ValueError(msg)


def exit_now(code: int) -> None:
    os._exit(code)


def kill_self(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(30)  # not reached: the signal ends the process


def getpid() -> int:
    return os.getpid()


def current_process_name() -> str:
    return multiprocessing.current_process().name


def proc_title() -> str:
    """The process title as ``ps`` shows it (``/proc/self/cmdline``, NULs as spaces)."""
    with open("/proc/self/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()


def is_daemon() -> bool:
    return bool(multiprocessing.current_process().daemon)


def worker_facts() -> dict[str, Any]:
    """Who this worker is: pid, parent pid, process name, and the MARKER it sees."""
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "name": multiprocessing.current_process().name,
        "marker": MARKER,
    }


def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def touch_then_sleep(started: str, seconds: float, value: Any) -> Any:
    """Signal that the task started (a file), then work for ``seconds``."""
    _write_atomically(started, str(os.getpid()))
    time.sleep(seconds)
    return value


def wait_for_file(path: str, timeout: float) -> bool:
    """Block until ``path`` exists (test synchronisation); TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)
    return True


def report_and_wait(report_dir: str, gate: str, timeout: float) -> dict[str, Any]:
    """Write this worker's pid and name into ``report_dir``, then wait for ``gate``."""
    name = multiprocessing.current_process().name
    _write_atomically(os.path.join(report_dir, str(os.getpid())), name)
    wait_for_file(gate, timeout)
    return {"pid": os.getpid(), "name": name}


def write_pid_then_sleep(pid_file: str, seconds: float) -> None:
    _write_atomically(pid_file, str(os.getpid()))
    time.sleep(seconds)


def touch_after(path: str, seconds: float) -> str:
    """Work for ``seconds``, then create ``path`` (proves the task ran to completion)."""
    time.sleep(seconds)
    _write_atomically(path, str(os.getpid()))
    return path


def noop() -> None:
    pass


def env_value(name: str) -> Optional[str]:
    """The worker's environment variable ``name`` (a Dask worker's role in test_dask)."""
    return os.environ.get(name)


def start_child_process(method: Optional[str] = None) -> Optional[int]:
    """Start a child process from inside the task; return its exit code."""
    ctx = multiprocessing.get_context(method)
    child = ctx.Process(target=noop)
    child.start()
    child.join(30)
    if child.exitcode is None:
        child.kill()
        child.join(5)
        return None
    return child.exitcode
