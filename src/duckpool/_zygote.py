"""Fork-safe worker starts under the ``fork`` start method: the zygote.

Forking a process that runs threads is unsafe: a lock another thread holds
at that instant stays locked forever in the child (CPython gh-90622; Python
3.12+ warns).  A pool's dispatcher thread makes its parent multi-threaded,
so replacement workers must not be forked from the parent.

Under ``fork``, a pool therefore forks one *zygote* when it starts, before
its dispatcher thread exists.  The zygote stays single-threaded and forks
every worker of the pool on request but the first: each inherits the
parent's memory as it was when the pool started, and comes from a
one-thread process.  The first worker, forked by the parent itself just
before the zygote (no thread of the pool exists yet either), takes the first
task at once instead of after two forks in a row.

The zygote also watches the parent (through a pidfd): when the parent dies
it kills every worker of the pool, its own and the first one, which then
need no watchdog thread of their own (``_worker.WorkerConfig.watched``).

::

    parent (dispatcher thread)         zygote (one thread)          worker
      "start slot i" --control socket--> ctx.Process(...).start() --fork-->
      <-- i, pid, and the parent's ends of the worker's two pipes (SCM_RIGHTS)
      <-- (pid, exit code) --notice pipe-- when a worker exits

The dispatcher does not wait for an answer: it sends its requests, goes on,
and takes each answer when the control socket becomes readable, so the pool
is never held up (nor its lock held) while the zygote forks.

The zygote exits when the pool has stopped its workers (told so when they
are told to stop), when the parent closes the control socket, or dies.  If
the zygote itself dies, the pool cannot start workers any more and breaks.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import struct
import time
import weakref
from multiprocessing import connection as mp_connection
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

from duckpool import _child, _spawn, _worker

_REQUEST = struct.Struct("<I")  # slot index, _EXIT or _FINISH
_EXIT = 0xFFFFFFFF
#: Exit as soon as every worker forked so far has exited.
_FINISH = 0xFFFFFFFE
_REPLY = struct.Struct("<Ii")  # slot index, pid (negative: errno of a failed start)
_NOTICE = struct.Struct("<ii")  # pid, exit code
_START_TIMEOUT = 60.0
_PARENT_POLL_SECONDS = 0.5


class ZygoteChild:
    """The parent's handle on a worker the zygote forked (a ``Process`` look-alike)."""

    sentinel = None  # exits are reported on the zygote's notice pipe instead

    def __init__(self, pid: int, zygote: Zygote) -> None:
        self.pid = pid
        self.exitcode: Optional[int] = None
        self._zygote = zygote
        #: Readable as soon as the worker exits, before the zygote reaps it and
        #: reports its exit code: ``join`` need not wait for that report.
        #: (Opened while the worker is the zygote's unreaped child: its pid
        #: cannot have been reused yet.)
        self.pidfd = _child.pidfd_of(pid)
        #: Its exit was seen through ``pidfd`` (its exit code may come later).
        self.exited = False
        self._release = weakref.finalize(self, _close_quietly, self.pidfd)

    def join(self, timeout: Optional[float] = None) -> None:
        if self.is_alive():
            self._zygote.wait_for_exit(self, timeout)

    def is_alive(self) -> bool:
        return self.exitcode is None and not self.exited

    def terminate(self) -> None:
        self._send(signal.SIGTERM)

    def kill(self) -> None:
        self._send(signal.SIGKILL)

    def _send(self, signum: int) -> None:
        if not self.is_alive():
            return
        try:
            if self.pidfd is not None and self._release.alive:
                signal.pidfd_send_signal(self.pidfd, signum)  # type: ignore[attr-defined]
            else:
                os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        self._release()
        self._zygote.forget(self)


def _close_quietly(fd: Optional[int]) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


class _Birth(NamedTuple):
    """What the zygote knows from the moment it is forked."""

    parent_pid: int
    #: Descriptors it must close at once (see Zygote).
    inherited_fds: tuple[int, ...]
    #: Readable once the parent has died; None: it polls the parent's pid.
    parent_pidfd: Optional[int]
    #: Pidfds of workers it did not fork, to kill with its own when the parent dies.
    adopted: tuple[int, ...]


class Channels(NamedTuple):
    """A zygote's control socket and notice pipe, both ends of each.

    A pool makes them before it forks its first worker (which closes its
    copies, ``fds``): made after that fork, every page they write would be a
    copy-on-write fault on the way to the first result.
    """

    control: socket.socket
    zygote_end: socket.socket
    notices_r: int
    notices_w: int

    @classmethod
    def open(cls) -> Channels:
        control, zygote_end = socket.socketpair()
        try:
            notices_r, notices_w = os.pipe()
        except OSError:
            control.close()
            zygote_end.close()
            raise
        os.set_blocking(notices_r, False)
        return cls(control, zygote_end, notices_r, notices_w)

    def fds(self) -> tuple[int, ...]:
        return (self.control.fileno(), self.zygote_end.fileno(), self.notices_r, self.notices_w)


class Zygote:
    """The parent's side of one pool's zygote process."""

    def __init__(
        self,
        build_config: Callable[[int], _worker.WorkerConfig],
        inherited_fds: Sequence[int] = (),
        parent_pidfd: Optional[int] = None,
        adopted_pids: Sequence[int] = (),
        channels: Optional[Channels] = None,
    ) -> None:
        """Fork the zygote, with ``channels`` (new ones if None).

        It closes ``inherited_fds`` (the parent's ends of the pipes of
        workers started before it: its workers must not hold them).  Given
        ``parent_pidfd`` (this process's pidfd), it kills its workers, and
        those of ``adopted_pids`` (workers started before it), as soon as
        this process dies: they need no watchdog of their own.
        """
        if channels is None:
            channels = Channels.open()
        self._control = channels.control
        zygote_end = channels.zygote_end
        self.notices_fd = channels.notices_r
        notices_w = channels.notices_w
        self._pending_notices = b""
        self._closed = False
        self._finishing = False
        self.children: dict[int, ZygoteChild] = {}
        adopted = [fd for fd in map(_child.pidfd_of, adopted_pids) if fd is not None]
        birth = _Birth(os.getpid(), tuple(inherited_fds), parent_pidfd, tuple(adopted))
        try:
            self.process = _child.fork(
                lambda: _zygote_main(zygote_end, notices_w, build_config, birth)
            )
        except BaseException:
            self._control.close()
            os.close(self.notices_fd)
            raise
        finally:
            zygote_end.close()
            os.close(notices_w)
            for fd in adopted:
                os.close(fd)

    @property
    def sentinel(self) -> int:
        """Readable once the zygote has exited."""
        return self.process.sentinel

    @property
    def control(self) -> socket.socket:
        """Readable when a start the pool asked for has been answered (``receive_started``)."""
        return self._control

    def request_start(self, slot: int) -> None:
        """Ask the zygote to fork a worker for ``slot``; ``receive_started`` gives it.

        The pool does not wait for the fork: its dispatcher reads the answer
        when the control socket becomes readable.
        """
        self._control.settimeout(_START_TIMEOUT)
        self._control.sendall(_REQUEST.pack(slot))

    def receive_started(
        self,
    ) -> Optional[tuple[int, ZygoteChild, mp_connection.Connection, mp_connection.Connection]]:
        """The next started worker: its slot, handle, and the parent's ends of its pipes.

        None if the zygote is gone (its sentinel tells how); raises OSError
        if it could not fork.
        """
        message, fds, _, _ = socket.recv_fds(self._control, _REPLY.size, 2)
        if len(message) < _REPLY.size:
            for fd in fds:
                os.close(fd)
            return None
        slot, pid = _REPLY.unpack(message)
        if pid <= 0 or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise OSError(-pid, f"the pool's zygote could not start a worker: {os.strerror(-pid)}")
        child = ZygoteChild(pid, self)
        self.children[pid] = child
        task_w = mp_connection.Connection(fds[0], readable=False)
        result_r = mp_connection.Connection(fds[1], writable=False)
        return slot, child, task_w, result_r

    def read_notices(self) -> list[ZygoteChild]:
        """Record the exits the zygote has reported; return those workers."""
        data = self._pending_notices
        while True:
            try:
                chunk = os.read(self.notices_fd, 4096)
            except BlockingIOError:
                break
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        usable = len(data) - len(data) % _NOTICE.size
        self._pending_notices = data[usable:]
        exited = []
        for pid, exitcode in _NOTICE.iter_unpack(data[:usable]):
            child = self.children.get(pid)
            if child is not None and child.exitcode is None:
                child.exitcode = exitcode
                exited.append(child)
        return exited

    def wait_for_exit(self, child: ZygoteChild, timeout: Optional[float]) -> None:
        """Wait until ``child`` has exited (its pidfd, or a notice says so) or
        ``timeout`` passes; read the notices meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        watched: list[Any] = [self.notices_fd, self.sentinel]
        if child.pidfd is not None:
            watched.append(child.pidfd)
        while child.is_alive():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            ready = mp_connection.wait(watched, remaining)
            if not ready:
                return
            if child.pidfd is not None and child.pidfd in ready:
                child.exited = True
            self.read_notices()
            if child.exitcode is None and self.process.exitcode is not None:
                self.read_notices()
                return  # the zygote is gone: no notice will come

    def forget(self, child: ZygoteChild) -> None:
        self.children.pop(child.pid, None)

    def finish(self) -> None:
        """Let the zygote exit by itself once its workers have exited (the pool stops them).

        Sent with the workers' stop frames, so that the zygote's exit overlaps
        theirs; ``close`` then mostly finds it gone.  No worker may be asked
        for afterwards.
        """
        if self._closed or self._finishing:
            return
        self._finishing = True
        try:
            self._control.sendall(_REQUEST.pack(_FINISH))
        except OSError:
            pass  # it is gone: close() reaps it

    def close(self) -> None:
        """Tell the zygote to exit (it has no workers left to watch) and close
        this side's descriptors; ``reap`` then waits for it."""
        if self._closed:
            return
        self._closed = True
        try:
            # An explicit message, not EOF: processes forked since may hold
            # copies of this socket.
            self._control.sendall(_REQUEST.pack(_EXIT))
        except OSError:
            pass
        self._control.close()
        self.process.close()
        try:
            os.close(self.notices_fd)
        except OSError:
            pass

    def reap(self, timeout: float) -> None:
        """Once closed: wait for the zygote to exit (killing it after
        ``timeout``), and reap it."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()  # SIGKILL cannot be ignored


def _zygote_main(
    control: socket.socket,
    notices_w: int,
    build_config: Callable[[int], _worker.WorkerConfig],
    birth: _Birth,
) -> None:
    """The zygote: fork workers on request, report their exits, until told to stop."""
    try:
        _serve(control, notices_w, build_config, birth)
    finally:
        _step_aside()


def _step_aside() -> None:
    """Exit at idle priority: tearing down a copy of the parent's whole memory
    takes a millisecond or more of CPU, which the parent and the last workers,
    still stopping, need more."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        pass


def _serve(
    control: socket.socket,
    notices_w: int,
    build_config: Callable[[int], _worker.WorkerConfig],
    birth: _Birth,
) -> None:
    import multiprocessing

    for fd in birth.inherited_fds:
        os.close(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # What the workers inherit is never collected in them (see gc.freeze):
    # a full collection there would touch, and so copy, every inherited page.
    gc.freeze()
    ctx: Any = multiprocessing.get_context("fork")
    workers: dict[int, Any] = {}  # by sentinel: ChildProcess, or multiprocessing.Process
    parent_gone = birth.parent_pidfd
    watched: list[Any] = [control] if parent_gone is None else [control, parent_gone]
    buffered = b""
    finishing = False
    while not (finishing and not workers):
        # No EOF tells the zygote that the parent died: the parent's end of
        # the control socket came along with the fork (as did other pools').
        # The parent's pidfd says it, or else its parent id (the zygote is its
        # child); no watchdog thread, since the zygote must stay single-threaded.
        ready = mp_connection.wait([*watched, *workers], _PARENT_POLL_SECONDS)
        if parent_gone in ready or os.getppid() != birth.parent_pid:
            _kill_workers(workers.values(), birth.adopted)
            return
        for sentinel in ready:
            if sentinel is control:
                continue
            assert isinstance(sentinel, int)
            process = workers.pop(sentinel)
            process.join()
            assert process.pid is not None and process.exitcode is not None
            _worker.write_all(notices_w, _NOTICE.pack(process.pid, process.exitcode))
            del process  # the last reference: its sentinel closes
        if control not in ready:
            continue
        chunk = control.recv(4096)
        if not chunk:  # every copy of the parent's end is closed: it is gone
            _kill_workers(workers.values(), birth.adopted)
            return
        buffered += chunk
        usable = len(buffered) - len(buffered) % _REQUEST.size
        requests, buffered = buffered[:usable], buffered[usable:]
        for (slot,) in _REQUEST.iter_unpack(requests):
            if slot == _EXIT:
                # The pool has shut down and stopped its workers.  One still
                # here was started after the pool stopped taking them (a
                # dispatcher that failed, say): it has no watchdog, so it goes.
                _kill_workers(workers.values(), ())
                return
            if slot == _FINISH:
                finishing = True
            elif not finishing:
                _start_one(ctx, control, build_config(slot), workers, birth.parent_pidfd)


def _kill_workers(workers: Iterable[Any], adopted: tuple[int, ...]) -> None:
    """Kill ``workers`` and the ``adopted`` ones (the parent's, by pidfd).

    Used when the parent died, or the pool ended with workers left: they have
    no watchdog of their own.
    """
    for process in workers:
        process.kill()
    for pidfd in adopted:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # type: ignore[attr-defined]
        except OSError:
            pass  # it exited already


def _start_one(
    ctx: Any,
    control: socket.socket,
    config: _worker.WorkerConfig,
    workers: dict[int, Any],
    parent_sentinel: Optional[int],
) -> None:
    """Fork one worker and hand the parent its pid and pipe ends."""
    try:
        process, task_w, result_r = _spawn.start_worker_process(ctx, config, parent_sentinel)
    except OSError as exc:
        control.sendall(_REPLY.pack(config.slot, -(exc.errno or 1)))
        return
    workers[process.sentinel] = process
    reply = _REPLY.pack(config.slot, process.pid)
    socket.send_fds(control, [reply], [task_w.fileno(), result_r.fileno()])
    task_w.close()
    result_r.close()
