"""The live pools of this process, and the process-wide hooks that reach every one.

Every pool this process runs is registered in ``LIVE_POOLS``, whatever runs
its tasks: a local pool's engine (``_core.PoolCore``, which adds itself) and a
``DaskExecutor``'s ``_dask_bridge.DaskBridge`` (which adds itself too).
Process-wide events reach the pools through this module only::

    os.fork() -> the fork hook, in the child:
                   every inherited pool forgets itself (its copy refuses work
                   with InheritedManagerError); the registry empties; the
                   stdlib's fork-server singleton is let go; then the resets
                   other modules added (on_fork_in_child: the managers' registry)
    exit      -> the exit hook, once the main thread has finished (threading's
                 exit hook: before non-daemon threads are joined and before
                 any atexit handler runs):
                   submit() raises from then on (interpreter_exiting); the
                   drains install_shutdown_handlers() added run; then every
                   pool still running stops as its kind does at exit
                   (LivePool.shutdown_at_exit)
    drain_all -> _shutdown reads LIVE_POOLS.of_this_process()

This module imports nothing from duckpool, so every other module may import it.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import weakref
from typing import Any, Callable, Optional, Protocol

__all__ = [
    "LIVE_POOLS",
    "LivePool",
    "LivePools",
    "add_exit_drain",
    "on_fork_in_child",
    "raise_if_exiting",
    "remove_exit_drain",
]


class LivePool(Protocol):
    """What the process-wide hooks need from a pool, whatever runs its tasks."""

    @property
    def owner_pid(self) -> int:
        """The process that made the pool; only it may use or stop it."""
        ...

    def request_shutdown(self, cancel_futures: bool) -> None:
        """Stop accepting work and return at once; queued and running work goes on."""
        ...

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait up to ``timeout`` s (None: no limit) for the pool to have finished."""
        ...

    def request_kill(self, signum: int, reason: Optional[str] = None) -> None:
        """Stop what is left now: every outstanding future resolves.

        A pool that has finished already ignores it.
        """
        ...

    def forget_after_fork(self) -> None:
        """In a forked child: make this inherited copy refuse to be used."""
        ...

    def shutdown_at_exit(self, interrupted: bool) -> None:
        """Interpreter exit (``interrupted``: by Ctrl-C): stop as the pool's settings say."""
        ...


class LivePools:
    """A registry of pools, held weakly: a pool that is garbage collected leaves it."""

    def __init__(self) -> None:
        # add() and discard() may come from any thread while another one
        # iterates, which a bare WeakSet does not allow.
        self._lock = threading.Lock()
        self._pools: weakref.WeakSet[LivePool] = weakref.WeakSet()

    def add(self, pool: LivePool, *, needs_thread_pools: bool = False) -> None:
        """Register ``pool``.

        ``needs_thread_pools``: stopping the pool at exit submits work to a
        ``concurrent.futures.ThreadPoolExecutor`` (a ``distributed`` Client
        does), so the exit hook must run before the stdlib stops them.
        """
        if needs_thread_pools:
            _run_exit_hook_before_thread_pools()
        with self._lock:
            self._pools.add(pool)

    def discard(self, pool: LivePool) -> None:
        """Unregister ``pool`` (nothing happens if it is not registered)."""
        with self._lock:
            self._pools.discard(pool)

    def of_this_process(self) -> list[LivePool]:
        """The registered pools this process owns (a snapshot)."""
        with self._lock:
            pools = list(self._pools)
        pid = os.getpid()
        return [pool for pool in pools if pool.owner_pid == pid]

    def take_all_after_fork(self) -> list[LivePool]:
        """In a forked child: empty the registry, returning what it held."""
        # Another thread of the parent may have held the lock at the fork.
        self._lock = threading.Lock()
        pools = list(self._pools)
        self._pools = weakref.WeakSet()
        return pools


#: Every live pool of this process.
LIVE_POOLS = LivePools()

#: Set once interpreter shutdown has begun: no pool takes new work after it.
interpreter_exiting = False

_INTERPRETER_EXITING = "cannot schedule new futures after interpreter shutdown"


def raise_if_exiting() -> None:
    """Raise ``RuntimeError`` (the stdlib's words) once interpreter shutdown has begun."""
    if interpreter_exiting:
        raise RuntimeError(_INTERPRETER_EXITING)


# -- fork ---------------------------------------------------------------------------

_fork_resets: list[Callable[[], None]] = []


def on_fork_in_child(reset: Callable[[], None]) -> None:
    """Run ``reset`` in every forked child, after the inherited pools are forgotten."""
    _fork_resets.append(reset)


def _after_fork_in_child() -> None:
    for pool in LIVE_POOLS.take_all_after_fork():
        pool.forget_after_fork()
    _forget_inherited_fork_server()
    for reset in _fork_resets:
        reset()


def _forget_inherited_fork_server() -> None:
    """Let a forked child start a fork server of its own.

    The stdlib's fork-server singleton, copied into a forked child, still
    names the parent's server; the child cannot ``waitpid`` it, so its first
    forkserver pool fails with ChildProcessError.  Holding the parent's
    "alive" pipe open would also keep that server from noticing the parent's
    exit.  The child forgets both, and starts its own server when needed.
    """
    module = sys.modules.get("multiprocessing.forkserver")
    server = getattr(module, "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", None) is None:
        return
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if alive_fd is not None:
        try:
            os.close(alive_fd)
        except OSError:
            pass
    server._forkserver_alive_fd = None
    server._forkserver_pid = None
    server._forkserver_address = None
    server._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- exit ---------------------------------------------------------------------------

_exit_drains: list[Callable[[], None]] = []
# No lock for these two: threading runs its exit hooks one after the other in
# the main thread, and a race between two first Dask pools only registers the
# hook once more, which _exit_hook_ran makes harmless.  (A lock would also
# need renewing in a forked child.)
_exit_hook_ran = False
_exit_hook_before_thread_pools = False


def add_exit_drain(drain: Callable[[], None]) -> None:
    """Have the exit hook call ``drain()`` before stopping the pools left running.

    Drains run newest first, as ``atexit`` handlers do; an exception in one
    is logged and the rest still run.
    """
    _exit_drains.append(drain)


def remove_exit_drain(drain: Callable[[], None]) -> None:
    """Undo ``add_exit_drain(drain)`` (nothing happens if it was not added)."""
    try:
        _exit_drains.remove(drain)
    except ValueError:
        pass


def _at_exit() -> None:
    """Interpreter shutdown: refuse new work, drain, then stop every pool left."""
    global interpreter_exiting, _exit_hook_ran
    # Before anything that may block, so that no thread adds work meanwhile
    # (CPython's test_submit_after_interpreter_shutdown asks as much).
    interpreter_exiting = True
    if _exit_hook_ran:  # registered twice (see _run_exit_hook_before_thread_pools)
        return
    _exit_hook_ran = True
    interrupted = isinstance(getattr(sys, "last_value", None), KeyboardInterrupt)
    for drain in reversed(list(_exit_drains)):
        _run_at_exit(drain)
    for pool in LIVE_POOLS.of_this_process():
        _run_at_exit(pool.shutdown_at_exit, interrupted)
    if "multiprocessing.forkserver" in sys.modules:
        # Looked at once more, last: stopped after its pools shut down, it
        # would outlive the program (it leaves once it reads EOF).
        from duckpool import _fork_server

        _run_at_exit(_fork_server.kill_if_stopped)


def _run_at_exit(step: Callable[..., None], *args: Any) -> None:
    """Run one step of the exit hook; an error in it must not skip the others."""
    try:
        step(*args)
    except Exception:
        # Raised out of a threading exit hook it would end threading's whole
        # exit phase: other pools, other libraries' hooks, the join of the
        # non-daemon threads.
        import logging

        logging.getLogger("duckpool").exception(
            "duckpool: stopping the pools at interpreter exit failed in %r", step
        )


def _register_exit_hook() -> None:
    """Register ``_at_exit`` with threading's exit hooks (atexit where there are none)."""
    global interpreter_exiting
    # threading._register_atexit (3.9+) is what concurrent.futures uses for
    # the same flag: its hooks run when the main thread has finished, before
    # any atexit handler, whatever the order they were registered in.
    register: Callable[[Callable[[], None]], Any] = getattr(
        threading, "_register_atexit", atexit.register
    )
    try:
        register(_at_exit)
    except RuntimeError:
        # "can't register atexit after shutdown": this module was first
        # imported by an exit handler; no pool may take work now.
        interpreter_exiting = True


def _run_exit_hook_before_thread_pools() -> None:
    """Make the exit hook run before concurrent.futures stops its thread pools.

    Threading's exit hooks run last registered first, and the one of
    ``concurrent.futures.thread`` makes every ThreadPoolExecutor refuse work:
    a ``distributed`` Client hands its results to one, so it could no longer
    close.  Registering the hook again after that module's hook puts it first;
    the second run finds the first done (``_exit_hook_ran``).
    """
    global _exit_hook_before_thread_pools
    if _exit_hook_before_thread_pools:
        return
    _exit_hook_before_thread_pools = True
    import concurrent.futures.thread  # noqa: F401 - its exit hook, registered now if not yet

    _register_exit_hook()


_register_exit_hook()
