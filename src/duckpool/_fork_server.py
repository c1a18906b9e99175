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

Where pidfds are missing (macOS, the BSDs, Linux before 5.3), a worker the
fork server started is known only through its connection to the server,
which reads as the worker's exit once the server dies, while the worker
runs on, reparented.  ``OrphanableProcess`` tells the two apart, and from
then on judges the worker by its pid (see its docstring).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from multiprocessing import connection as mp_connection
from typing import Any, Iterator, Optional

from duckpool import _child

#: How long a start runs before the watch looks at the server, and how often
#: it looks again while the start lasts.
CHECK_SECONDS = 2.0


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
    from multiprocessing import forkserver

    server = forkserver._forkserver  # type: ignore[attr-defined]
    modules = getattr(server, "_preload_modules", None)
    if isinstance(modules, list) and PRELOAD_MODULE not in modules and _path_gives_this_copy():
        server._preload_modules = [*modules, PRELOAD_MODULE]  # type: ignore[attr-defined]


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
    worker forked from it runs none of the program's code while it starts)?"""
    from multiprocessing import forkserver

    modules = getattr(forkserver._forkserver, "_preload_modules", None)  # type: ignore[attr-defined]
    return isinstance(modules, list) and "__main__" in modules


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


class OrphanableProcess:
    """A ``multiprocessing`` process the fork server started, where pidfds
    are missing: the pool's handle on it (``pid``, ``sentinel``,
    ``exitcode``, ``is_alive``, ``join``, ``terminate``, ``kill``, ``close``).

    While the fork server lives, the process's sentinel is its connection to
    the server, which sends its exit code once it has reaped it.  An end of
    that connection without a code means the server died: the process is
    then an orphan, most likely alive, and is judged by its pid from then on
    (``_child.runs``: it exists and is no zombie), its exit code unknown.
    The pool stops waiting on the sentinel then (``sentinel_retired``) and
    finds the orphan's exit by asking ``is_alive`` (its exit poll, which runs
    wherever pidfds are missing).  A dead process whose server is stopped
    (and so neither reaps it nor says so) is seen the same way, by its pid.

    The orphan's pid may be reused once its new parent has reaped it; a
    pidfd would rule that out, which is why it is used wherever it exists
    (``_child.ServedProcess``).
    """

    def __init__(self, process: Any) -> None:
        self._process = process
        self.pid: Optional[int] = process.pid
        self.sentinel: int = process.sentinel
        #: It has exited (its exit code may still be on its way from the server).
        self._exited = False
        #: Its exit code is known, or will never be.
        self._settled = False
        self._exitcode: Optional[int] = None
        #: The fork server died while it ran: judged by its pid from then on.
        self.orphaned = False

    @property
    def exitcode(self) -> Optional[int]:
        self._check(0.0)
        return self._exitcode

    @property
    def sentinel_retired(self) -> bool:
        """Does its sentinel no longer say anything of it (its server died)?"""
        self._check(0.0)
        return self.orphaned

    def _check(self, timeout: float) -> None:
        """Learn whether the process has exited, and its exit code (waiting
        up to ``timeout`` for the server's word)."""
        if self._settled:
            return
        pid = self.pid or 0
        if not self.orphaned:
            popen = self._process._popen
            code = popen.returncode  # (multiprocessing's own poll may have read it)
            if code is None:
                if not mp_connection.wait([popen.sentinel], timeout):
                    # No word (yet); a stopped server neither reaps nor tells.
                    self._exited = self._exited or not _child.runs(pid)
                    return
                from multiprocessing import forkserver

                try:
                    code = forkserver.read_signed(popen.sentinel)  # type: ignore[attr-defined]
                except (OSError, EOFError):
                    code = None  # the server died
                popen.returncode = 255 if code is None else code  # (255: its "unknown")
                if code is not None:
                    self._settle(code)
                    return
            elif code != 255 or not _child.runs(pid):  # (255: maybe the server's death)
                self._settle(code)
                return
            self.orphaned = True
        if not _child.runs(pid):
            self._settle(None)

    def _settle(self, code: Optional[int]) -> None:
        self._exited = self._settled = True
        self._exitcode = code
        try:
            self._process.join(0)  # (off multiprocessing's list of children)
        except Exception:
            pass

    def is_alive(self) -> bool:
        self._check(0.0)
        return not self._exited and not self._settled

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait up to ``timeout`` for the process to exit and the server's
        word of its exit code."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.001
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            step = 0.05 if remaining is None else min(0.05, remaining)
            if self.orphaned:
                self._check(0.0)
                if self._settled or remaining == 0.0:
                    return
                time.sleep(min(pause, step))
                pause = min(2 * pause, 0.05)
            else:
                self._check(step)  # (waits on the server's connection)
                if self._settled or remaining == 0.0:
                    return

    def terminate(self) -> None:
        self._send(signal.SIGTERM)

    def kill(self) -> None:
        self._send(signal.SIGKILL)

    def _send(self, signum: int) -> None:
        if self.is_alive() and self.pid is not None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Nothing to close: ``multiprocessing`` closes the connection."""


def _after_fork_in_child() -> None:
    global _watch
    _watch = _StartWatch()  # the watching thread is the parent's


os.register_at_fork(after_in_child=_after_fork_in_child)
