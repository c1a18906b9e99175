"""Processes a worker's tasks fork: what they must not hold, and must not do.

A task (or its initializer, or the pickling of its arguments, result or
error) may fork: ``os.fork``, ``multiprocessing`` under fork, a library
doing either.  The child is a copy of the worker, mid-task.  Holding the pipe
whose EOF tells a parent without pidfds that the worker exited, it would
hide that exit (``close_in_forks``).  Coming back out of the task, it would
fall back into the worker's loop, answer for the worker and read its next
task, or go on with the rest of a ``map`` chunk.

``guard`` makes Python's fork handler, in every such child: set ``forked``,
put ``/dev/null`` in place of the worker's own pipes (whatever the child
does, it can neither answer nor read a task), and empty the ``map`` chunk
being run (``chunk``), so that the child's ``map`` stops after the call it is
in.  The worker's loop asks ``forked`` where the task's code returns, and
``leave`` ends the child there, as its own exit would have.  A fork made in
C without Python's handlers (``fork()`` through ctypes) is not seen.

Imported by every spawned worker: nothing beyond ``os`` and ``sys``.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Optional

#: True in a process a task forked (set by the fork handler).
forked = False
#: The columns of the ``map`` chunk the worker is running (``_chunks.run_chunk``).
chunk: Optional[tuple[list[Any], ...]] = None
#: The worker's own pipe ends: ``/dev/null`` in their place in a forked child.
_pipes: list[int] = []
#: Descriptors closed in every process forked from this one (``close_in_forks``).
_closed_in_forks: list[int] = []
_registered = False


def guard(*pipes: int) -> None:
    """Called by a worker as it starts: from now on a process forked from it
    is marked ``forked`` and loses ``pipes`` (its task and result pipes)."""
    global forked
    forked = False  # (the worker of a pool a task made inherits True)
    _pipes[:] = pipes
    _register()


def close_in_forks(fd: int) -> None:
    """Close ``fd`` in every process forked from this one from now on.

    For the write end of the pipe whose EOF tells the parent that this
    worker exited, where the parent has no pidfd (Linux before 5.3, some
    sandboxes): a process a task forks, holding it, would hide the worker's
    death from the parent for as long as it lives.  ``os.fork`` and what
    uses it run the handler; an exec'd program never gets the descriptor
    (``close_on_exec``).
    """
    _closed_in_forks.append(fd)
    _register()


def _register() -> None:
    global _registered
    if not _registered:  # (inherited by a fork, with the handler)
        _registered = True
        os.register_at_fork(after_in_child=_in_forked_child)


def _in_forked_child() -> None:
    global forked
    forked = True
    for fd in _closed_in_forks:
        try:
            os.close(fd)
        except OSError:
            pass
    _closed_in_forks.clear()
    if chunk is not None:
        for column in chunk:
            column.clear()
    if _pipes:
        try:
            null = os.open(os.devnull, os.O_RDWR)
        except OSError:  # (no descriptor left: the task took them all) closed, then
            for fd in _pipes:
                os.close(fd)
        else:
            for fd in _pipes:
                os.dup2(null, fd, inheritable=False)
            os.close(null)
        _pipes.clear()


def leave(exc: Optional[BaseException]) -> None:
    """End a process a task forked that came back out of the task: exit as
    its ``sys.exit`` asked, else 0, or 1 after an error (shown, as an
    uncaught one would be).  Its buffered output is written first."""
    code: Any = exc.code if isinstance(exc, SystemExit) else int(exc is not None)
    try:
        if exc is not None and not isinstance(exc, SystemExit):
            sys.excepthook(type(exc), exc, exc.__traceback__)
        elif code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)  # sys.exit("message"), as the interpreter does
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(code if isinstance(code, int) else int(code is not None))
