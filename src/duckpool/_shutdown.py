"""Graceful drain of every pool of this process, and its wiring to signals and exit.

A server that gets SIGTERM should stop taking work, let running tasks finish
for a while, then stop what is left, and only then exit, with every future
resolved.  ``drain_all`` does that for every pool of the process at once,
local and Dask pools alike (``_process_pools`` registers them all);
``install_shutdown_handlers`` runs it on SIGTERM/SIGINT and at exit.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any, Callable, Iterable, Optional

from duckpool import _process_pools
from duckpool._validate import check_drain_timeout

__all__ = ["drain_all", "install_shutdown_handlers"]


def drain_all(timeout: float) -> None:
    """Shut down every pool of this process, waiting at most about ``timeout`` s.

    Every pool, local or Dask, stops accepting work at once (``submit``
    raises ``RuntimeError``); queued and running tasks go on until the
    deadline.  Then, in a local pool, what is queued is cancelled and the
    workers still busy get SIGTERM, then SIGKILL a second later, their tasks
    failing with :class:`~duckpool.WorkerDiedError`; in a Dask pool, every
    future still outstanding is cancelled and the scheduler forgets its task
    (Dask cannot stop code already running on a worker), and the Client and
    cluster the executor created are closed.  Every future resolves.  Pools
    a forked child inherited are not this process's, and are left alone.
    Returns None, once every pool has stopped (after the deadline, local
    workers still busy get the SIGKILL grace too).

    Raises:
        ValueError: if ``timeout`` is not a number >= 0 (nothing is stopped).
    """
    seconds = check_drain_timeout(timeout)
    drain(_process_pools.LIVE_POOLS.of_this_process(), seconds)


def drain(pools: Sequence[_process_pools.LivePool], timeout: float) -> None:
    """Shut these pools down, stopping what is left of their work after ``timeout`` s."""
    for pool in pools:
        pool.request_shutdown(cancel_futures=False)
    deadline = time.monotonic() + timeout
    for pool in pools:
        pool.join(max(0.0, deadline - time.monotonic()))
    # Every pool is told, not only those still running: a pool has no "still
    # running?" to ask that could not race its end, and one that has finished
    # ignores the request (as terminate_workers() after shutdown() does).
    for pool in pools:
        pool.request_kill(signal.SIGTERM, f"the shutdown timeout ({timeout:g} s) expired")
    for pool in pools:
        pool.join()


def shut_down(
    core: _process_pools.LivePool, wait: bool, cancel_futures: bool, timeout: Optional[float]
) -> None:
    """A local pool's ``shutdown()``: stop accepting work now; with
    ``timeout``, drain (in a thread of its own without ``wait``)."""
    core.request_shutdown(cancel_futures)  # at once, whether or not it waits
    if timeout is None:
        if wait:
            core.join()
        return
    if wait:
        drain([core], timeout)
    else:
        threading.Thread(
            target=drain, args=([core], timeout), name="duckpool-drain", daemon=True
        ).start()


def install_shutdown_handlers(
    timeout: float = 30.0,
    signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
    at_exit: bool = True,
) -> Callable[[], None]:
    """Drain every pool (``drain_all(timeout)``) on these signals and at exit.

    On a signal, the drain runs in a background thread (the interrupted
    thread may hold a pool's lock), then the previous handler gets the
    signal: SIGINT raises ``KeyboardInterrupt`` as usual, SIGTERM's default
    ends the process.  With ``at_exit``, interpreter exit drains too: once
    the main thread has finished, before any ``atexit`` handler runs (and
    instead of the exit's usual wait for non-daemon pools).  Call it from the
    main thread, after any framework has installed its own handlers (those
    become the "previous" ones).  Returns a function that puts the previous
    handlers back and takes the exit drain away.  Outstanding futures fare
    as under ``drain_all`` (in a local pool, tasks still running at the
    deadline fail with :class:`~duckpool.WorkerDiedError` and queued ones
    are cancelled): every future resolves before the signal goes on.

    Raises:
        ValueError: if not called from the main thread, or for a bad timeout
            (nothing is installed then); ``signal.signal``'s own error for a
            signal it cannot handle (``OSError`` for ``SIGKILL``).
    """
    if threading.current_thread() is not threading.main_thread():
        raise ValueError("install_shutdown_handlers() must be called from the main thread")
    check_drain_timeout(timeout)
    previous: dict[int, Any] = {}
    draining = threading.Event()
    drained = threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        if drained.is_set():
            _call_previous(previous.get(signum), signum, frame)
        elif not draining.is_set():  # a second signal while draining: its deadline holds
            draining.set()
            threading.Thread(
                target=_drain_then_signal,
                args=(timeout, signum, drained),
                name="duckpool-shutdown",
                daemon=True,
            ).start()

    for signum in signals:
        previous[signum] = signal.signal(signum, on_signal)

    def drain_at_exit() -> None:
        drain_all(timeout)

    if at_exit:
        # Run by duckpool's exit hook before it stops the pools left running.
        _process_pools.add_exit_drain(drain_at_exit)

    def uninstall() -> None:
        for signum, handler in previous.items():
            if signal.getsignal(signum) is on_signal:
                signal.signal(signum, handler)
        if at_exit:
            _process_pools.remove_exit_drain(drain_at_exit)

    return uninstall


def _drain_then_signal(timeout: float, signum: int, drained: threading.Event) -> None:
    """Drain, then send the signal again: the main thread's handler passes it on."""
    try:
        drain_all(timeout)
    finally:
        drained.set()
        os.kill(os.getpid(), signum)


def _call_previous(handler: Any, signum: int, frame: Optional[FrameType]) -> None:
    """Do what the handler replaced by ours would have done (main thread)."""
    if callable(handler):
        handler(signum, frame)  # SIGINT's default raises KeyboardInterrupt
    elif handler != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)  # SIG_DFL (or None: not set from Python)
        os.kill(os.getpid(), signum)
