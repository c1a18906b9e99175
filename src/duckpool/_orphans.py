"""Processes this one did not fork but may have to reap: orphans it inherits.

An orphan goes to the nearest subreaper: PID 1 of a container, or a
process that set ``PR_SET_CHILD_SUBREAPER``.  Where that is this process,
the workers of a pool's helper that died (a zygote, the fork server)
become its children, and nothing else reaps them.  ``reap_if_adopted``
reaps such a process once it has exited, or keeps its pidfd while it may
yet become this process's child; ``reap_adopted`` reaps those kept that
have, and forgets those their parent reaped.
"""

from __future__ import annotations

import _thread
import os
import signal
import time
from multiprocessing import connection as mp_connection
from typing import Optional

__all__ = ["ADOPTED_LOOK_SECONDS", "forget_in_child", "reap_adopted", "reap_if_adopted"]

#: Duplicates of the pidfds of processes this one did not fork, seen exited
#: while still another's zombie (``reap_if_adopted``): should that parent die
#: before it reaps them (a stopped zygote or fork server, killed), they become
#: this process's children where it inherits orphans, and ``reap_adopted``
#: reaps them.  Each is dropped once reaped, by whoever reaps it.
_ADOPTABLE: list[int] = []
_ADOPTABLE_LOCK = _thread.allocate_lock()

#: How often ``reap_adopted``, told to wait, looks again at processes kept
#: that are not this process's children (their parent is to reap them).
ADOPTED_LOOK_SECONDS = 0.01


def reap_if_adopted(pidfd: int, keep: bool = False) -> None:
    """A process this one did not fork has exited (or is about to): reap it
    if it has become this process's child, else keep it for ``reap_adopted``.

    An orphan goes to the nearest subreaper: PID 1 of a container, or a
    process that set ``PR_SET_CHILD_SUBREAPER``.  Where that is this process
    (a pool's zygote died, so its workers and standby are orphans), nothing
    else reaps them: each would stay a zombie.  Elsewhere their new parent
    reaps them, and the pidfd kept meanwhile is dropped (``reap_adopted``,
    which a pool's dispatcher calls on each pass while one is kept).  Kept
    only where it may become this process's child (``_may_become_ours``),
    or with ``keep`` (its parent, a zygote, is about to be told to leave,
    and may be killed before it reaps it).
    """
    by_pidfd = getattr(os, "P_PIDFD", None)
    if by_pidfd is None or not hasattr(os, "waitid"):
        return
    try:
        reaped = os.waitid(by_pidfd, pidfd, os.WEXITED | os.WNOHANG) is not None
    except ChildProcessError:  # another's (zombie) still, or reaped already
        reaped = False
    except OSError:
        reaped = True  # (the pidfd is gone: nothing to keep)
    if not reaped and (keep or _may_become_ours(pidfd)):
        try:
            kept = os.dup(pidfd)
        except OSError:
            pass
        else:
            with _ADOPTABLE_LOCK:
                _ADOPTABLE.append(kept)
    reap_adopted()


def _may_become_ours(pidfd: int, soon: bool = False) -> bool:
    """May the unreaped process of ``pidfd`` be, or become, this process's
    child?  Not once PID 1 has it (its parent died, and no subreaper on the
    way took it), nor once it is reaped; else it may, were its parent to die
    and this process to be PID 1 or the nearest subreaper.  With ``soon``:
    only if it is this process's child already, or its parent is stopped
    (a parent that runs reaps it within moments)."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as info:
            pid = next(int(line.split()[1]) for line in info if line.startswith("Pid:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return False
    parent = _parent_of(pid)  # (a pid held by an unreaped process: not reused)
    if parent is None or parent == 1:
        return False
    if parent == os.getpid():
        return True
    return not soon or _stopped(parent)


def reap_adopted(wait: float = 0.0) -> None:
    """Reap the processes ``reap_if_adopted`` kept that have become this
    process's children since (their parent died before reaping them); forget
    those their parent reaped.  With ``wait`` (a pool's end), wait up to
    that long for the processes kept that are this process's children, or
    whose parent is stopped, to be reaped; the others are their running
    parents' to reap, and are no longer kept."""
    if not _ADOPTABLE:
        return
    deadline = time.monotonic() + wait
    while True:
        running = _reap_adopted(dup_running=wait > 0, last=wait > 0)
        left = deadline - time.monotonic()
        try:
            if not _ADOPTABLE or left <= 0:
                return
            # (Each of this process's children readable once it has exited;
            # another's, its parent stopped, looked at again after a moment.)
            step = min(left, ADOPTED_LOOK_SECONDS)
            if running:
                mp_connection.wait(running, step)
            else:
                time.sleep(step)
        finally:
            for pidfd in running:
                _close(pidfd)


def _reap_adopted(dup_running: bool = False, last: bool = False) -> list[int]:
    """One look (see ``reap_adopted``); with ``dup_running``, duplicates of
    the pidfds of this process's children among them still running (the
    caller's to close: another thread may close the kept ones meanwhile).
    ``last`` (a pool's end): another's, whose parent runs, is left to that
    parent from now on."""
    if not _ADOPTABLE:
        return []
    with _ADOPTABLE_LOCK:
        kept: list[int] = []
        ours: list[int] = []
        for pidfd in _ADOPTABLE:
            try:
                running = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG) is None  # type: ignore[attr-defined]
            except ChildProcessError:
                try:
                    signal.pidfd_send_signal(pidfd, 0)
                except OSError:
                    _close(pidfd)  # reaped by its parent
                else:
                    if last and not _may_become_ours(pidfd, soon=True):
                        _close(pidfd)  # its parent's, which runs
                    else:
                        kept.append(pidfd)  # still its parent's
                continue
            except OSError:
                running = False  # (gone: dropped)
            if running:
                kept.append(pidfd)  # this process's child now, still running
                if dup_running:
                    try:
                        ours.append(os.dup(pidfd))
                    except OSError:
                        pass
            else:
                _close(pidfd)  # reaped here
        _ADOPTABLE[:] = kept
        return ours


def forget_in_child() -> None:
    """In a child this process forked: the pidfds kept are the parent's to
    reap, not this child's (and the lock may have been held by a thread of
    the parent)."""
    global _ADOPTABLE_LOCK
    for kept in _ADOPTABLE:
        _close(kept)
    _ADOPTABLE.clear()
    _ADOPTABLE_LOCK = _thread.allocate_lock()


def _parent_of(pid: int) -> Optional[int]:
    """The parent pid of ``pid`` from ``/proc`` (None: gone, or no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _stopped(pid: int) -> bool:
    """Is ``pid`` stopped (SIGSTOP, a debugger)?"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
