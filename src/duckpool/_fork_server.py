"""A stopped ``multiprocessing`` fork server must not hang a pool.

A worker started through the fork server (the forkserver start method,
Python 3.14's default on Linux) is started synchronously: ``Process.start``
connects to the server and blocks until the server has forked and sent the
new pid.  A server that is stopped (SIGSTOP, a debugger, a frozen cgroup)
never answers, and the thread starting the worker (the pool's dispatcher, or
the caller submitting the first task) would wait forever, reading no result
and noticing no death.

``watch_start`` guards each such start: one thread per process (started
with the first guarded start) looks every ``CHECK_SECONDS`` at starts that
have run longer than that, and if the server is stopped, kills it.  The
start then fails with ``EOFError``, a transient error the launcher retries,
and ``multiprocessing`` starts a new server for the retry.  A server that is
merely slow (importing a heavy ``__main__`` before it can fork) is never
killed: only a stopped one is.  Workers the old server forked live on (the
pool watches them through their pidfds, ``_child.ServedProcess``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Iterator, Optional

from duckpool import _child

#: How long a start runs before the watch looks at the server, and how often
#: it looks again while the start lasts.
CHECK_SECONDS = 2.0


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
                    self._lock.wait()
                    continue
                now = time.monotonic()
                nearest = min(self._due.values())
                if now < nearest:
                    self._lock.wait(nearest - now)
                    continue
                for token, due in self._due.items():
                    if due <= now:
                        self._due[token] = now + CHECK_SECONDS
                _kill_if_stopped()


def _kill_if_stopped() -> None:
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
