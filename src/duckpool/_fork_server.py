"""A stopped ``multiprocessing`` fork server must not hang a pool.

A worker started through the fork server (the forkserver start method,
Python 3.14's default on Linux) is started synchronously: ``Process.start``
connects to the server and blocks until the server has forked and sent the
new pid.  A server that is stopped (SIGSTOP, a debugger, a frozen cgroup)
never answers, and the thread starting the worker (the pool's dispatcher, or
the caller submitting the first task) would wait forever, reading no result
and noticing no death.

``watch_start`` guards each such start: one thread per process (started
with a guarded start, and ended once idle for ``IDLE_SECONDS``) looks every
``CHECK_SECONDS`` at starts that have run longer than that, and if the
server is stopped, kills it.  The start then fails with ``EOFError``, a
transient error the launcher retries, and ``multiprocessing`` starts a new
server for the retry.  A server that is merely slow (importing a heavy
``__main__`` before it can fork) is never killed: only a stopped one is.
Workers the old server forked live on (the pool watches them through their
pidfds, or else their pids: ``_child.served``).
A pool's shutdown kills a stopped server too (``kill_if_stopped``): it could
serve no one, and it would outlive the program, which it leaves only once it
reads EOF.

``preload_worker_module`` has the server import duckpool's worker module
once, as it starts, for every worker it forks.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from typing import Iterator, Optional

from duckpool import _child

#: How long a start runs before the watch looks at the server, and how often
#: it looks again while the start lasts.
CHECK_SECONDS = 2.0
#: How long the watching thread waits, with no start to watch, before it ends.
IDLE_SECONDS = 2.0


#: What the fork server imports as it starts (a top-level module installed
#: beside the package, which then imports ``duckpool._worker``: see its docstring).
PRELOAD_MODULE = "_duckpool_preload"


def preload_worker_module() -> None:
    """Have ``multiprocessing``'s fork server import duckpool's worker module
    as it starts (after ``__main__`` and whatever the program asked for with
    ``set_forkserver_preload``): a worker forked from it then skips that
    import, most of its start-up.  Takes effect when a server starts (the
    first, or one started anew after a death); a server already running is
    left as it is.  The other processes the server forks have the module
    imported too, which costs them nothing (copy-on-write) and does nothing
    at import.  Not done where the program's ``sys.path`` would give the
    server another copy of duckpool than the one running here."""
    modules = _preload_list()
    if modules is not None and PRELOAD_MODULE not in modules and _path_gives_this_copy():
        from multiprocessing import forkserver

        forkserver._forkserver._preload_modules = [*modules, PRELOAD_MODULE]  # type: ignore[attr-defined]


def _preload_list() -> Optional[list[str]]:
    """What ``multiprocessing``'s fork server is to import as it starts."""
    from multiprocessing import forkserver

    modules = getattr(forkserver._forkserver, "_preload_modules", None)  # type: ignore[attr-defined]
    return modules if isinstance(modules, list) else None


@functools.cache
def _path_gives_this_copy() -> bool:
    """Does ``sys.path`` lead to this copy of duckpool, and to the module the
    server is to import (installed beside it; missing where the package was
    copied in by hand, and a module a server cannot import fails it outright
    under 3.15's ``on_error="fail"``)?  Asked once."""
    import importlib.machinery

    import duckpool

    finder = importlib.machinery.PathFinder
    spec = finder.find_spec("duckpool", sys.path)
    found = spec.submodule_search_locations if spec is not None else None
    if not found or finder.find_spec(PRELOAD_MODULE, sys.path) is None:
        return False
    return os.path.realpath(next(iter(found))) == os.path.realpath(next(iter(duckpool.__path__)))


def main_preloaded() -> bool:
    """Does the fork server import the main module as it starts (so that a
    worker forked from it runs none of the program's code while it starts)?
    Never before Python 3.14: the server asks for the main module's path
    under a name the preparation data does not use, so every worker
    imports the main module itself."""
    modules = _preload_list()
    return sys.version_info >= (3, 14) and modules is not None and "__main__" in modules


def server_pid() -> Optional[int]:
    """The pid of this process's ``multiprocessing`` fork server, if it has one."""
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)  # type: ignore[attr-defined]
    return pid if isinstance(pid, int) else None


class _StartWatch:
    """Starts through the fork server that are under way, and the thread
    that looks at them."""

    def __init__(self) -> None:
        self._lock = threading.Condition(threading.Lock())
        #: Per start under way: when the watch next looks at it (monotonic).
        self._due: dict[object, float] = {}
        self._thread: Optional[threading.Thread] = None

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        token = object()
        with self._lock:
            self._due[token] = time.monotonic() + CHECK_SECONDS
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="duckpool-fork-server-watch", daemon=True
                )
                self._thread.start()
            else:
                self._lock.notify()  # it may be asleep with nothing to watch
        try:
            yield
        finally:
            with self._lock:
                del self._due[token]

    def _run(self) -> None:
        with self._lock:
            while True:
                if not self._due:
                    # Idle: it leaves after a while (the next start makes
                    # another), so no thread outlives the pools for long.
                    if not self._lock.wait(IDLE_SECONDS) and not self._due:
                        self._thread = None
                        return
                    continue
                now = time.monotonic()
                nearest = min(self._due.values())
                if now < nearest:
                    self._lock.wait(nearest - now)
                    continue
                for token, due in self._due.items():
                    if due <= now:
                        self._due[token] = now + CHECK_SECONDS
                kill_if_stopped()


def kill_if_stopped() -> None:
    """Kill this process's fork server if it is stopped: it could serve no
    one, and it would outlive the program (it leaves when it reads EOF)."""
    pid = server_pid()
    if pid is not None and _child.is_stopped(pid):
        try:
            # (Its parent is this process: the pid cannot be reused until
            # multiprocessing reaps it, on the retry's ensure_running.)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


_watch = _StartWatch()


def watch_start() -> contextlib.AbstractContextManager[None]:
    """Guard a start through the fork server (see the module docstring)."""
    return _watch.guard()


def _after_fork_in_child() -> None:
    global _watch
    _watch = _StartWatch()  # the watching thread is the parent's


os.register_at_fork(after_in_child=_after_fork_in_child)
