"""Processes duckpool starts without ``multiprocessing``, and its handle on them.

The zygote (forked with ``os.fork``, see ``_zygote``) and workers under the
``spawn`` start method (``_spawn.spawn_worker``) are started directly: each
leaves out start-up work of ``multiprocessing``'s own that it does not need.
``ChildProcess`` is what the pool holds for them, with what it uses of a
``multiprocessing.Process``: ``pid``, ``sentinel``, ``exitcode``, ``join``,
``terminate``, ``kill`` and ``close``.  The same for processes others
start: ``ForeignProcess`` (a zygote's standby), and ``served`` for a
``multiprocessing`` forkserver process (``ServedProcess`` through a pidfd,
``OrphanableProcess`` where there are none).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from multiprocessing import connection as mp_connection
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Union

from duckpool import _orphans, _worker

if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal

#: Pids of children let go (closed, or collected) before they were reaped:
#: reaped when the next one starts, so none stays a zombie for the life of
#: the parent.
_UNREAPED: set[int] = set()

#: In a child ``fork`` started: the write end of its own sentinel pipe.
_sentinel_w: Optional[int] = None


def block_sigint() -> Iterable[int]:
    """Block SIGINT in this thread; return the signal mask to restore.

    ``_signal``'s own functions: ``signal.pthread_sigmask`` turns every
    number into an enum member, Python code whose copy-on-write faults cost
    more than the call itself right after a fork.
    """
    return _signal.pthread_sigmask(_signal.SIG_BLOCK, (_signal.SIGINT,))


def restore_mask(mask: Iterable[int]) -> None:
    """Restore the signal mask ``block_sigint`` returned."""
    _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)


def pidfd_of(pid: int) -> Optional[int]:
    """A pidfd of process ``pid``; None where the system has none."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None or getattr(signal, "pidfd_send_signal", None) is None:
        return None
    try:
        return int(pidfd_open(pid))
    except OSError:
        return None


def send_signal(pid: int, pidfd: Optional[int], signum: int) -> None:
    """Send ``signum`` to process ``pid``, through ``pidfd`` if given (a pid
    may be reused once its process is reaped; a pidfd cannot); nothing if the
    process is gone."""
    try:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signum)  # type: ignore[attr-defined]
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        pass


def exits_in_the_background(pid: int) -> None:
    """Let process ``pid``, about to be told to exit, run from now on as a
    batch process (``SCHED_BATCH``, at its weight): woken, it does not
    preempt the thread that woke it.

    A pipe write wakes its reader on the writer's own core, where it takes
    over at once: told to exit, a worker forked from a large process spends
    a millisecond or more there tearing down its copy of the page tables,
    while the thread that has the next worker to tell waits, and the other
    core idles.  Told all at once, they exit side by side.  Nothing where
    the system has no such policy, or the process is gone.  (A worker another
    process forked, whose pid was reaped and reused in between, would be
    the one changed: the window is the few microseconds from the caller's
    last look at it.)
    """
    policy = getattr(os, "SCHED_BATCH", None)
    setscheduler = getattr(os, "sched_setscheduler", None)
    if policy is None or setscheduler is None:
        return
    try:
        setscheduler(pid, policy, os.sched_param(0))
    except OSError:
        pass  # gone, or not ours to change


def close_quietly(fd: Optional[int]) -> None:
    """Close ``fd`` (if not None), whatever state it is in."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def has_pidfds() -> bool:
    """Does this system give pidfds (Linux 5.3 and later, where not sandboxed away)?"""
    pidfd = pidfd_of(os.getpid())
    if pidfd is None:
        return False
    os.close(pidfd)
    return True


def _stat(pid: Union[int, str]) -> list[bytes]:
    """The fields of ``/proc/<pid>/stat`` after the command name, from the
    state on (empty: no ``/proc``, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _state(pid: int) -> Optional[bytes]:
    """Process ``pid``'s state letter from ``/proc`` (None: no ``/proc``, or gone)."""
    fields = _stat(pid)
    return fields[0] if fields else None


def cpu_sample(pid: int) -> Optional[tuple[bytes, int]]:
    """Process ``pid``'s state letter and the CPU time it has used (clock
    ticks, user and system), from ``/proc``; None where that is missing."""
    fields = _stat(pid)
    if len(fields) < 13:
        return None
    return fields[0], int(fields[11]) + int(fields[12])


def threads_here() -> int:
    """How many threads this process runs, those not started by ``threading``
    included where ``/proc`` tells."""
    fields = _stat("self")
    if len(fields) > 17:
        return int(fields[17])
    import threading

    return threading.active_count()


def kill_children(parent: int, keep: Iterable[int]) -> None:
    """SIGKILL the children of process ``parent`` (single-threaded) but those
    in ``keep``, where ``/proc`` lists them.  Each is signalled only once
    seen to be ``parent``'s child through a pidfd of its own (its pid may
    have been reused since it was listed), or at once where pidfds are
    missing."""
    kept = set(keep)
    try:
        with open(f"/proc/{parent}/task/{parent}/children", "rb") as listing:
            pids = [int(word) for word in listing.read().split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        if pid in kept:
            continue
        pidfd = pidfd_of(pid)
        try:
            fields = _stat(pid)
            if len(fields) > 1 and int(fields[1]) == parent:
                send_signal(pid, pidfd, signal.SIGKILL)
        finally:
            close_quietly(pidfd)


def is_stopped(pid: int) -> bool:
    """Is process ``pid`` stopped (by a signal, or traced)?  False if unknown."""
    return _state(pid) in (b"T", b"t")


def found_stopped(process: Any) -> bool:
    """Is ``process`` (a handle with ``pid`` and ``is_alive()``) alive and
    stopped?  One stopped can neither answer nor exit: its owner kills it."""
    pid = process.pid
    return pid is not None and process.is_alive() and is_stopped(pid)


def runs(pid: int) -> bool:
    """Does process ``pid`` exist and has it not exited (a zombie has, where
    ``/proc`` tells)?  For a process this one cannot reap or watch through a
    pidfd: its pid may have been reused once it was reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: the pid was reused
        return False
    return _state(pid) not in (b"Z", b"X")


class ChildProcess:
    """The parent's handle on a child it started with ``fork`` or ``spawn_worker``.

    Its sentinel is closed, and the child reaped later if it has not been,
    when the handle is closed or else collected (as a ``multiprocessing``
    process's would be).  A plain ``__del__``, not ``weakref.finalize``: a
    pool makes this handle right after a fork, when every page the parent
    writes costs a copy-on-write fault, and finalize's registry writes more.
    """

    def __init__(self, pid: int, pipe_r: int, parent_w: Optional[int] = None) -> None:
        """``pipe_r``: the read end of a pipe whose write end only the child
        holds, the sentinel where pidfds are missing (it fires once the
        child's own children that inherited that end have exited too).
        ``parent_w``: where pidfds are missing, the write end of the pipe the
        child watches this process through (its ``parent_process()``), kept
        open as long as the handle."""
        self.pid = pid
        self._exitcode: Optional[int] = None
        self._parent_w = parent_w
        self._closed = True  # until it has a sentinel
        pidfd = pidfd_of(pid)
        if pidfd is None:
            self._pidfd: Optional[int] = None
            sentinel = pipe_r
        else:
            os.close(pipe_r)
            self._pidfd = sentinel = pidfd
        self.sentinel = sentinel
        self._closed = False

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # (at interpreter exit, module globals may be gone)
            pass

    @property
    def exitcode(self) -> Optional[int]:
        """As ``multiprocessing``'s: negative for a signal; None while it runs."""
        if self._exitcode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else (os.wait() in the program)
                self._exitcode = 255
            else:
                if pid:
                    self._exitcode = os.waitstatus_to_exitcode(status)
            if self._exitcode is not None:
                _UNREAPED.discard(self.pid)  # reaped here, after a close
        return self._exitcode

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait (up to ``timeout``) for the child to exit, and reap it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.001
        while self.exitcode is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            if self._pidfd is not None and not self._closed:
                mp_connection.wait([self._pidfd], remaining)
            else:  # the pipe may stay silent after the exit: poll
                time.sleep(pause if remaining is None else min(pause, remaining))
                pause = min(2 * pause, 0.05)

    def is_alive(self) -> bool:
        return self.exitcode is None

    def terminate(self) -> None:
        self._send(signal.SIGTERM)

    def kill(self) -> None:
        self._send(signal.SIGKILL)

    def _send(self, signum: int) -> None:
        if self.exitcode is None:  # not reaped: the pid is still the child's
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Close the sentinel; a child still unreaped is reaped later."""
        if self._closed:
            return
        self._closed = True
        try:
            os.close(self.sentinel)
        except OSError:
            pass
        close_quietly(self._parent_w)
        if self.exitcode is None:
            _UNREAPED.add(self.pid)


class PidfdProcess:
    """A handle on a process watched through a pidfd, its sentinel.

    For processes this one did not fork itself (so it cannot reap them)
    or whose own sentinel says nothing reliable of their death.
    """

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid: Optional[int] = pid
        #: Readable once the process has exited.
        self.sentinel = pidfd
        self._exited = False
        self._closed = False

    @property
    def exitcode(self) -> Optional[int]:
        """None: only the process's parent can tell (see subclasses)."""
        return None

    @property
    def closed(self) -> bool:
        return self._closed

    def _has_exited(self) -> bool:
        PidfdProcess.join(self, 0)  # (not a subclass's: no more than a look)
        return self._exited

    def is_alive(self) -> bool:
        return not self._closed and not self._has_exited()

    def join(self, timeout: Optional[float] = None) -> None:
        if not self._closed and not self._exited:
            self._exited = bool(mp_connection.wait([self.sentinel], timeout))
            if self._exited:
                _orphans.reap_if_adopted(self.sentinel)

    def terminate(self) -> None:
        self._send(signal.SIGTERM)

    def kill(self) -> None:
        self._send(signal.SIGKILL)

    def _send(self, signum: int) -> None:
        if self._closed or self._has_exited():
            return
        try:
            signal.pidfd_send_signal(self.sentinel, signum)  # type: ignore[attr-defined]
        except OSError:
            pass  # it has exited

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._exited:
            # Let go still running (or its exit not seen): where this process
            # inherits it once its parent is gone, it is reaped later.
            _orphans.reap_if_adopted(self.sentinel)
        try:
            os.close(self.sentinel)
        except OSError:
            pass


class ForeignProcess(PidfdProcess):
    """A process this one did not start (it is not our child): a zygote's
    standby, forked by the zygote.

    Its exit code cannot be read here (only its parent can reap it):
    ``exitcode`` stays None, and ``is_alive`` says whether it has exited.
    """


class ServedProcess(PidfdProcess):
    """A ``multiprocessing`` process started by a helper (the fork server),
    whose death is judged from the process itself, through a pidfd.

    A forkserver process's own sentinel is its connection to the fork
    server: when the fork server dies, it reads as the process's exit (with
    exit code 255) while the process runs on.  Here the sentinel is a pidfd
    of the process, and its exit code is read from the fork server once the
    process has exited (None, unknown, if the fork server is gone).
    """

    def __init__(self, process: Any, pidfd: int) -> None:
        super().__init__(process.pid, pidfd)
        self._process = process
        #: Its exit code has been asked of the fork server (``_settle``).
        self._settled = False
        self._exitcode: Optional[int] = None

    @property
    def exitcode(self) -> Optional[int]:
        if not self._settled and self._has_exited():
            self._settle(0)
        return self._exitcode

    def _settle(self, timeout: float) -> None:
        """Once it has exited: read its exit code from the fork server (it
        sends it right after its waitpid; unknown if the server is gone),
        and take it off ``multiprocessing``'s list of children."""
        self._settled = True
        popen = getattr(self._process, "_popen", None)
        if popen is None:
            return
        _, self._exitcode = server_word(popen, timeout)
        _forget(self._process, self._exitcode)

    def join(self, timeout: Optional[float] = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        super().join(timeout)
        if self._exited and not self._settled:
            remaining = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            self._settle(remaining)


class OrphanableProcess:
    """A ``multiprocessing`` process the fork server started, where pidfds
    are missing: the pool's handle on it (``pid``, ``sentinel``,
    ``exitcode``, ``is_alive``, ``join``, ``terminate``, ``kill``, ``close``).

    While the fork server lives, the process's sentinel is its connection to
    the server, which sends its exit code once it has reaped it.  An end of
    that connection without a code means the server died: the process is
    then an orphan, most likely alive, and is judged by its pid from then on
    (``runs``: it exists and is no zombie), its exit code unknown.  The pool
    stops waiting on the sentinel then (``sentinel_retired``) and finds the
    orphan's exit by asking ``is_alive`` (its exit poll, which runs wherever
    pidfds are missing).  A dead process whose server is stopped (and so
    neither reaps it nor says so) is seen the same way, by its pid.

    The orphan's pid may be reused once its new parent has reaped it; a
    pidfd would rule that out, which is why one is used wherever it exists
    (``ServedProcess``).
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
        """Does its sentinel no longer say anything of it, while it runs on
        (its server died)?"""
        self._check(0.0)
        return self.orphaned and not self._settled

    def _check(self, timeout: float) -> None:
        """Learn whether the process has exited, and its exit code (waiting
        up to ``timeout`` for the server's word)."""
        if self._settled:
            return
        pid = self.pid or 0
        if not self.orphaned:
            said, code = server_word(self._process._popen, timeout)
            if not said:
                # No word (yet); a stopped server neither reaps nor tells.
                self._exited = self._exited or not runs(pid)
                return
            if code is not None:
                self._settle(code)
                return
            self.orphaned = True
        if not runs(pid):
            self._settle(None)

    def _settle(self, code: Optional[int]) -> None:
        self._exited = self._settled = True
        self._exitcode = code
        _forget(self._process, code)

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


def served(process: Any) -> Any:
    """The pool's handle on a started ``multiprocessing`` forkserver process:
    watched through a pidfd where the system has them, else through its
    connection to the fork server, then its pid."""
    pidfd = pidfd_of(process.pid)
    return OrphanableProcess(process) if pidfd is None else ServedProcess(process, pidfd)


def server_word(popen: Any, timeout: float) -> tuple[bool, Optional[int]]:
    """What the fork server has said of a process it started, waiting up to
    ``timeout``: ``(False, None)``, nothing yet; ``(True, code)``, its exit
    code; ``(True, None)``, the server went without saying.  (A 255 that
    ``multiprocessing``'s own poll read first, which starting any process
    runs, is its word for the server's death: unknown too.)"""
    code = popen.returncode
    if code is not None:
        return True, None if code == 255 else code
    if not mp_connection.wait([popen.sentinel], timeout):
        return False, None
    from multiprocessing import forkserver

    try:
        code = forkserver.read_signed(popen.sentinel)  # type: ignore[attr-defined]
    except (OSError, EOFError):
        code = None  # the server died
    popen.returncode = 255 if code is None else code
    return True, code


def _forget(process: Any, exitcode: Optional[int]) -> None:
    """A forkserver process has exited: ``multiprocessing`` may forget it and
    close its end of the server's pipes (with 255, its own code for
    "unknown", where the code is not known)."""
    popen = getattr(process, "_popen", None)
    if popen is not None and popen.returncode is None:
        popen.returncode = 255 if exitcode is None else exitcode
    try:
        process.join(0)  # (off multiprocessing's list of children)
    except Exception:  # (only bookkeeping: it is off the list or will be)
        pass


def reap_closed() -> None:
    """Reap the children let go before they exited, those that have since."""
    for pid in list(_UNREAPED):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _UNREAPED.discard(pid)


def fork(main: Callable[[], None], started: Optional[list[Any]] = None) -> ChildProcess:
    """Fork a child that runs ``main`` and exits with ``os._exit``: the
    parent's ``atexit`` handlers and finalizers never run in it.

    SIGINT stays blocked in the child until ``main`` unblocks it.  The
    child goes into ``started`` before a Ctrl-C held back meanwhile may
    strike here (so that the caller can stop it).
    """
    reap_closed()
    _worker.flush_std_streams()  # no buffered output is written twice
    pid = 0
    child: Optional[ChildProcess] = None
    old_mask: Optional[Iterable[int]] = None
    restored = handed = False
    pipe_r, pipe_w = os.pipe()
    try:
        old_mask = block_sigint()
        # From Python 3.15 (gh-146313), a raw fork's child closes its copy of
        # the resource tracker's pipe unless this flag is set around the
        # fork, as multiprocessing's own fork does: then every worker that
        # uses a lock or shared memory would start a tracker of its own.
        intent = getattr(sys.modules.get("multiprocessing.resource_tracker"), "_fork_intent", None)
        if intent is not None:
            intent.preserve_fd = True
        try:
            pid = os.fork()
        finally:
            if intent is not None:
                intent.preserve_fd = False  # (in both processes: the next fork may be raw)
        if pid == 0:
            code = 1
            try:
                os.close(pipe_r)
                # Only its own: a copy of its forker's would keep that one's
                # sentinel open, and a zygote's standby, promoted, forks on (so
                # each generation would hold one more, as would its workers).
                global _sentinel_w
                close_quietly(_sentinel_w)
                _sentinel_w = pipe_w
                _orphans.forget_in_child()
                # Processes it forks through multiprocessing must not be
                # mistaken for the parent's children, nor the parent's for its own.
                import multiprocessing.process

                multiprocessing.process._children = set()  # type: ignore[attr-defined]
                main()
                code = 0
            except BaseException:
                try:
                    import traceback

                    sys.stderr.write(f"duckpool: a child process (pid {os.getpid()}) failed:\n")
                    traceback.print_exc()
                    sys.stderr.flush()
                except BaseException:
                    pass
            finally:
                os._exit(code)
        parents_w, pipe_w = pipe_w, -1  # (never closed twice)
        os.close(parents_w)
        handed = True  # (pipe_r is the handle's, even one half made)
        child = ChildProcess(pid, pipe_r)
        if started is not None:
            started.append(child)
        restored = True
        restore_mask(old_mask)  # (a Ctrl-C held back meanwhile strikes here)
    except BaseException:
        if not restored and old_mask is not None:
            restore_mask(old_mask)
        for fd in (pipe_w, -1 if handed else pipe_r):
            if fd >= 0:
                os.close(fd)
        if pid and (started is None or child is None or child not in started):
            # Interrupted before the caller could know it: it goes.
            try:
                os.kill(pid, signal.SIGKILL)
                if child is None:
                    os.waitpid(pid, 0)  # (else its handle reaps it)
            except OSError:
                pass
        raise
    return child
