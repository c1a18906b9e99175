r"""A pool's lifecycle: whether it takes work, may start workers, and why not.

States, and what moves a pool between them (every change under the pool's
lock, through the methods below)::

    new ---first submit---> running ---shutdown()---> shutting down
                              |  \                       |
                              |   `--terminate/kill----> killing
                              |                          |
                              `--starts fail for good,   |  the dispatcher
                                 an initializer raises,  |  has ended:
                                 the dispatcher fails--> broken ... shut down

    any state --this process is a forked child's copy--> inherited

Shutdown and breakage are independent (a broken pool is shut down too once
its owner says so), so they are kept apart: ``shutdown_requested``,
``broken`` (with its cause), ``kill_requested`` (with its reason);
``state()`` names the combination.  A worker's initializer error is kept
here until the worker that raised it has exited, then breaks the pool.
"""

from __future__ import annotations

import os
from concurrent.futures.process import BrokenProcessPool
from typing import Optional

from duckpool._errors import InheritedManagerError


class Lifecycle:
    """What a pool may still do; changed under the pool's lock only."""

    __slots__ = (
        "broken",
        "broken_cause",
        "inherited",
        "initializer_error",
        "kill_reason",
        "kill_requested",
        "owner_pid",
        "shutdown_requested",
    )

    def __init__(self) -> None:
        self.owner_pid = os.getpid()
        #: Set in a forked child's copy (cheaper to test than os.getpid()).
        self.inherited = False
        self.shutdown_requested = False
        #: Why the pool is broken (submit raises BrokenProcessPool), or None.
        self.broken: Optional[str] = None
        self.broken_cause: Optional[BaseException] = None
        #: The signal ``terminate_workers``/``kill_workers`` asked for, and why.
        self.kill_requested: Optional[int] = None
        self.kill_reason: Optional[str] = None
        #: A worker's initializer raised: the pool breaks once that worker is gone.
        self.initializer_error: Optional[BaseException] = None

    # -- predicates ---------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """May work be submitted? (read without the lock: a first, cheap test)"""
        return not (self.shutdown_requested or self.inherited or self.broken is not None)

    def check_accepting(self) -> None:
        """Raise the error that says why no work may be submitted, if so."""
        if self.inherited:
            raise InheritedManagerError(
                f"this pool belongs to process {self.owner_pid}; "
                f"process {os.getpid()} inherited a copy by fork and cannot use it"
            )
        if self.broken is not None:
            raise BrokenProcessPool(self.broken)
        if self.shutdown_requested:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def may_start_workers(self) -> bool:
        """May workers be started (neither broken, nor being killed, nor about to break)?"""
        return (
            self.broken is None and self.kill_requested is None and self.initializer_error is None
        )

    def state(self, started: bool, running: bool) -> str:
        """The state's name, given whether the dispatcher was ever ``started``
        and is still ``running``."""
        if self.inherited:
            return "inherited"
        if self.broken is not None:
            return "broken"
        if self.shutdown_requested:
            return "shutting down" if running else "shut down"
        return "running" if started else "idle"

    # -- transitions --------------------------------------------------------------

    def request_shutdown(self) -> None:
        self.shutdown_requested = True

    def request_kill(self, signum: int, reason: Optional[str]) -> None:
        """Kill with ``signum``; the first reason given stays."""
        if self.kill_requested is None:
            self.kill_reason = reason
        self.kill_requested = signum

    def break_(self, reason: str, cause: Optional[BaseException]) -> bool:
        """Break the pool; False if it already was (the first reason stays)."""
        if self.broken is not None:
            return False
        self.broken = reason
        self.broken_cause = cause
        return True

    def dispatcher_failed(self, reason: str, cause: BaseException) -> None:
        """The dispatcher itself failed: the pool is broken for that reason,
        whatever broke it before (every future then fails with it too)."""
        self.broken = reason
        self.broken_cause = cause

    def on_initializer_error(self, cause: BaseException) -> None:
        if self.initializer_error is None:
            self.initializer_error = cause

    def forget_after_fork(self) -> None:
        self.inherited = True
