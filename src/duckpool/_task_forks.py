"""Processes a worker's tasks fork: what they must not hold, and must not do.

A task may fork (``os.fork``, ``multiprocessing`` under fork, a library
doing either).  The child is a copy of the worker, mid-task: holding the
pipe whose EOF tells a parent without pidfds that the worker exited, it
would hide that exit (``close_in_forks``); returning from the task, or
raising out of it, it would fall back into the worker's task loop, answer
for the worker and read its next task.  ``watch`` marks every such child;
the loop asks ``forked`` after each task and its result's pickling, and
``leave`` ends the child there, as its own exit would have.

Imported by every spawned worker: nothing beyond ``os`` and ``sys``.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

#: True in a process a task forked (set by ``watch``'s fork handler).
forked = False
#: Descriptors closed in every process forked from this one (``close_in_forks``).
_CLOSED_IN_FORKS: list[int] = []
_registered = False


def watch() -> None:
    """From now on, a process forked from this one (a worker about to run
    tasks) is marked ``forked`` and closes the descriptors of ``close_in_forks``."""
    global _registered, forked
    forked = False  # (a worker of a pool a task made inherits True)
    if not _registered:  # (inherited by a fork, with the handler)
        _registered = True
        os.register_at_fork(after_in_child=_in_forked_child)


def close_in_forks(fd: int) -> None:
    """Close ``fd`` in every process forked from this one from now on.

    For the write end of the pipe whose EOF tells the parent that this
    worker exited, where the parent has no pidfd (Linux before 5.3, some
    sandboxes): a process a task forks, holding it, would hide the worker's
    death from the parent for as long as it lives.  ``os.fork`` and what
    uses it run the handler; an exec'd program never gets the descriptor
    (``close_on_exec``).
    """
    _CLOSED_IN_FORKS.append(fd)
    watch()


def _in_forked_child() -> None:
    global forked
    forked = True
    for fd in _CLOSED_IN_FORKS:
        try:
            os.close(fd)
        except OSError:
            pass
    _CLOSED_IN_FORKS.clear()


def leave(exc: Optional[BaseException]) -> None:
    """End a process a task forked that came back out of the task: exit as
    its ``sys.exit`` asked, else 0, or 1 after an error (shown, as an
    uncaught one would be).  Its buffered output is written first."""
    code = exc.code if isinstance(exc, SystemExit) else int(exc is not None)
    if exc is not None and not isinstance(exc, SystemExit):
        try:
            sys.excepthook(type(exc), exc, exc.__traceback__)
        except BaseException:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(code if isinstance(code, int) else int(code is not None))
