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
is never held up (nor its lock held) while the zygote forks.  The pool's
first workers are asked for with the fork itself (``Zygote.fork``'s
``first_slots``): the zygote forks them before it runs anything else, so
that they and the first worker are near twins, sharing what either process
writes later.

The zygote exits when the pool has stopped its workers (told so when they
are told to stop), when the parent closes the control socket, or dies.

No single death may break the pool, the zygote's included.  Once the pool
has started, the zygote forks a *standby*: a copy of itself, idle, with
control channels of its own (handed to the parent over the control socket).
When the zygote dies, the pool promotes the standby: it forks the next
workers (from the same memory image as the zygote's, so with the same
semantics), adopts the workers the dead zygote forked (killing them too when
the parent dies) and forks a standby of its own.  When the standby dies, the
zygote forks another.  Only when both die at once does the pool fall back to
spawning its workers (``_pool._zygotes``)::

    parent                      zygote                        standby
      "standby" --control------> fork, with new channels --> waits for requests
      <-- standby pid, control end, notice end (SCM_RIGHTS)
      (zygote dies) "adopt pid", "start slot i" --standby's control socket-->

Each helper process has a title naming its pool and role (``<prefix>-zygote``,
``<prefix>-zygote-standby``), set once start-up is over.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
import weakref
from multiprocessing import connection as mp_connection
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

from duckpool import _child, _orphans, _worker
from duckpool._zygote_process import (
    ADOPT,
    EXIT,
    FINISH,
    HELLO,
    NOTICE,
    REPLY,
    REQUEST,
    STANDBY,
    START_TIMEOUT,
    Birth,
    Channels,
    zygote_main,
)


class StandbyRefused(OSError):
    """The zygote could not fork the standby it was asked for (the pool
    asks again later: a standby is a spare, never a reason to fail)."""


class ZygoteChild:
    """The parent's handle on a worker the zygote forked (a ``Process`` look-alike)."""

    def __init__(self, pid: int, zygote: Zygote) -> None:
        self.pid = pid
        self.exitcode: Optional[int] = None
        self._zygote: Optional[Zygote] = zygote
        #: Readable as soon as the worker exits, before the zygote reaps it and
        #: reports its exit code: ``join`` need not wait for that report.
        #: (Opened while the worker is the zygote's unreaped child: its pid
        #: cannot have been reused yet.)
        self.pidfd = _child.pidfd_of(pid)
        #: Its exit was seen through ``pidfd`` (its exit code may come later,
        #: or never if its zygote died first).
        self.exited = False
        self._release = weakref.finalize(self, _child.close_quietly, self.pidfd)

    @property
    def sentinel(self) -> Optional[int]:
        """None while its zygote reports its exit; its pidfd once the zygote is gone."""
        return self.pidfd if self._zygote is None else None

    def orphan(self) -> None:
        """Its zygote died: its exit is seen through its pidfd from now on,
        and its exit code is unknown (only its zygote could have read it).
        Where this process inherits orphans, it reaps it once it has exited."""
        self._zygote = None
        if self.exited:
            self._reap_if_adopted()

    def _reap_if_adopted(self) -> None:
        if self.pidfd is not None and self._release.alive:
            _orphans.reap_if_adopted(self.pidfd)

    def join(self, timeout: Optional[float] = None) -> None:
        if not self.is_alive():
            return
        if self._zygote is not None:
            self._zygote.wait_for_exit(self, timeout)
        elif (
            self.pidfd is not None
            and self._release.alive
            and mp_connection.wait([self.pidfd], timeout)
        ):
            self.exited = True
            self._reap_if_adopted()

    def is_alive(self) -> bool:
        if self.exitcode is not None or self.exited:
            return False
        if self._zygote is None:
            if self.pidfd is not None and self._release.alive:
                self.exited = bool(mp_connection.wait([self.pidfd], 0))
                if self.exited:
                    self._reap_if_adopted()
            elif self.pidfd is None:
                # No pidfds: init reaps it now, so a pid that is gone means
                # it exited (reused that soon is not a risk worth a thread).
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    self.exited = True
                except OSError:
                    pass
        return not self.exited

    def terminate(self) -> None:
        self._send(signal.SIGTERM)

    def kill(self) -> None:
        self._send(signal.SIGKILL)

    def _send(self, signum: int) -> None:
        if self.is_alive():
            _child.send_signal(self.pid, self.pidfd if self._release.alive else None, signum)

    def close(self) -> None:
        self._release()
        if self._zygote is not None:
            self._zygote.forget(self)


class Started(NamedTuple):
    """A worker a zygote started: its slot, handle and the parent's ends of its pipes."""

    slot: int
    process: ZygoteChild
    task_w: mp_connection.Connection
    result_r: mp_connection.Connection


class Zygote:
    """The parent's side of a zygote process: the pool's, or its standby."""

    def __init__(self, process: Any, control: socket.socket, notices_fd: int) -> None:
        #: A ``_child.ChildProcess`` (forked by the parent), or a
        #: ``_child.ForeignProcess`` (a standby, forked by the zygote).
        self.process = process
        self._control = control
        self.notices_fd = notices_fd
        self._pending_notices = b""
        self._closed = False
        self._finishing = False
        #: Answers read (whole ones), told to the zygote at ``finish``.
        self.answers_read = 0
        #: A standby was asked for; its answer is due.
        self.standby_requested = False
        self.children: dict[int, ZygoteChild] = {}

    @classmethod
    def fork(
        cls,
        build_config: Callable[[int], _worker.WorkerConfig],
        inherited_fds: Sequence[int] = (),
        parent_pidfd: Optional[int] = None,
        adopted_pids: Sequence[int] = (),
        channels: Optional[Channels] = None,
        title: Optional[str] = None,
        first_slots: Sequence[int] = (),
    ) -> Zygote:
        """Fork the zygote, with ``channels`` (new ones if None).

        It starts the workers of ``first_slots`` before anything else, as
        if asked by ``request_start`` (their answers come the same way): a
        worker it forks at once inherits the pages this process wrote
        since, not the zygote's copies of them, so it stays the twin of the
        worker forked here just before (whose pages both this process and
        the zygote had written would otherwise count in its memory alone).

        It closes ``inherited_fds`` (the parent's ends of the pipes of
        workers started before it: its workers must not hold them).  Given
        ``parent_pidfd`` (this process's pidfd), it kills its workers, and
        those of ``adopted_pids`` (workers started before it), as soon as
        this process dies: they need no watchdog of their own.
        """
        if channels is None:
            channels = Channels.open()
        adopted: list[int] = []
        started: list[_child.ChildProcess] = []
        # This process's copies of what only the zygote keeps, closed once it
        # has them (popped first: never closed twice).
        ends = [channels.notices_w]
        try:
            adopted.extend(fd for fd in map(_child.pidfd_of, adopted_pids) if fd is not None)
            ends.extend(adopted)
            birth = Birth(
                os.getpid(),
                tuple(inherited_fds),
                parent_pidfd,
                tuple(adopted),
                title,
                first_slots=tuple(first_slots),
            )

            def zygote() -> None:
                # The pool's ends are not the zygote's.  Kept, every worker it
                # forks would hold them too, and with them the answers queued
                # to a pool that has closed its end, and the pipe ends they
                # carry: a worker whose answer was never read would then never
                # see its task pipe close, and outlive the pool.
                channels.control.close()
                os.close(channels.notices_r)
                zygote_main(channels.zygote_end, channels.notices_w, build_config, birth)

            process = _child.fork(zygote, started)
            channels.zygote_end.close()
            while ends:
                os.close(ends.pop())
            return cls(process, channels.control, channels.notices_r)
        except BaseException:
            # (Interrupted once it existed, a Ctrl-C say: the caller never knew it.)
            for forked in started:
                forked.kill()
            channels.zygote_end.close()
            while ends:
                os.close(ends.pop())
            channels.control.close()
            os.close(channels.notices_r)
            raise

    @property
    def sentinel(self) -> int:
        """Readable once the zygote has exited."""
        return int(self.process.sentinel)

    @property
    def control(self) -> socket.socket:
        """Readable when a start the pool asked for has been answered (``receive_started``)."""
        return self._control

    @property
    def gone(self) -> bool:
        """The zygote has exited (or this side is closed)."""
        return self._closed or not self.process.is_alive()

    def request_start(self, slot: int) -> None:
        """Ask the zygote to fork a worker for ``slot``; ``receive_started`` gives it.

        The pool does not wait for the fork: its dispatcher reads the answer
        when the control socket becomes readable.  Raises OSError if the
        zygote is gone.
        """
        self._send(REQUEST.pack(slot))

    def request_standby(self) -> None:
        """Ask the zygote to fork a standby (``receive_started`` gives it)."""
        self.standby_requested = True
        self._send(REQUEST.pack(STANDBY))

    def adopt(self, pids: Iterable[int]) -> None:
        """Have the zygote kill these workers (a dead zygote's) when the parent dies."""
        data = b"".join(REQUEST.pack(ADOPT) + REQUEST.pack(pid) for pid in pids)
        if data:
            self._send(data)

    def _send(self, data: bytes) -> None:
        self._control.settimeout(START_TIMEOUT)
        self._control.sendall(data)

    def receive_started(self) -> Optional[Started | Zygote]:
        """The next answer: a started worker, or a standby (a ``Zygote``).

        None if the zygote is gone (its sentinel tells how); raises OSError
        if it could not fork.
        """
        try:
            message, fds, _, _ = socket.recv_fds(self._control, REPLY.size, 2)
        except (BlockingIOError, socket.timeout):
            return None  # (a dead zygote's socket, drained: see Launcher)
        if len(message) < REPLY.size:
            for fd in fds:
                os.close(fd)
            return None
        slot, pid = REPLY.unpack(message)
        self.answers_read += 1
        if slot == STANDBY:
            self.standby_requested = False
        if pid <= 0 or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            # (pid > 0 without two descriptors: they did not fit in this
            # process, EMFILE; that child sees its channels close and exits.)
            code = -pid if pid <= 0 else errno.EMFILE
            failure = StandbyRefused if slot == STANDBY else OSError
            what = "a standby" if slot == STANDBY else "a worker"
            raise failure(code, f"the pool's zygote could not start {what}: {os.strerror(code)}")
        if slot == STANDBY:
            pidfd = _child.pidfd_of(pid)
            if pidfd is None:  # gone already
                os.close(fds[0])
                os.close(fds[1])
                return None
            os.set_blocking(fds[1], False)
            process = _child.ForeignProcess(pid, pidfd)
            standby = Zygote(process, socket.socket(fileno=fds[0]), fds[1])
            try:
                standby._send(REQUEST.pack(HELLO))  # its channels reached the pool
            except OSError:
                pass  # it is gone: its sentinel says so
            return standby
        child = ZygoteChild(pid, self)
        self.children[pid] = child
        task_w = mp_connection.Connection(fds[0], readable=False)
        result_r = mp_connection.Connection(fds[1], writable=False)
        return Started(slot, child, task_w, result_r)

    def read_notices(self) -> list[ZygoteChild]:
        """Record the exits the zygote has reported; return those workers."""
        if self._closed:
            return []
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
        usable = len(data) - len(data) % NOTICE.size
        self._pending_notices = data[usable:]
        exited = []
        for pid, exitcode in NOTICE.iter_unpack(data[:usable]):
            child = self.children.get(pid)
            if child is not None and child.exitcode is None:
                child.exitcode = exitcode
                exited.append(child)
        return exited

    def orphan_children(self) -> list[ZygoteChild]:
        """The zygote died: its workers still running are watched through
        their pidfds from now on (``ZygoteChild.orphan``); return them."""
        orphans = []
        for child in list(self.children.values()):
            if child.exitcode is None:
                child.orphan()
                orphans.append(child)
        self.children.clear()
        return orphans

    def wait_for_exit(self, child: ZygoteChild, timeout: Optional[float]) -> None:
        """Wait until ``child`` has exited (its pidfd, or a notice says so) or
        ``timeout`` passes; read the notices meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        watched: list[Any] = [self.sentinel]
        if not self._closed:
            watched.append(self.notices_fd)
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
            if child.exitcode is None and not self.process.is_alive():
                self.read_notices()
                if child.exitcode is None:
                    # The zygote is gone (finished, or died): no notice will
                    # come; its pidfd tells, where it has one.
                    child.orphan()
                    child.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
                return

    def forget(self, child: ZygoteChild) -> None:
        self.children.pop(child.pid, None)

    def finish(self) -> None:
        """Let the zygote exit by itself once its workers have exited (the pool stops them).

        Sent with the workers' stop frames, so that the zygote's exit overlaps
        theirs; ``close`` then mostly finds it gone.  No worker may be asked
        for afterwards.  A worker whose answer is still unread is killed by
        the zygote (the pool cannot stop it: it never got its pipes).
        """
        if self._closed or self._finishing:
            return
        self._finishing = True
        try:
            self._control.sendall(REQUEST.pack(FINISH) + REQUEST.pack(self.answers_read))
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
            self._control.setblocking(False)
            self._control.send(REQUEST.pack(EXIT))
        except OSError:
            pass
        self._drop_unread_answers()
        self._control.close()
        try:
            os.close(self.notices_fd)
        except OSError:
            pass

    def _drop_unread_answers(self) -> None:
        """Close the pipe ends carried by answers never read.

        A worker forked by the zygote holds a copy of this socket: were its
        own task pipe's write end left queued here, the worker would keep it
        open itself, and never see its task pipe close.
        """
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self._control, REPLY.size, 2)
            except OSError:  # (nothing more to read: BlockingIOError)
                return
            if len(message) == REPLY.size:
                _, pid = REPLY.unpack(message)
                if pid > 0:
                    # A worker (or standby) the pool never had: once its
                    # pipes close it leaves, and where this process
                    # inherits it (its zygote dead), this one reaps it.
                    pidfd = _child.pidfd_of(pid)
                    if pidfd is not None:
                        _orphans.reap_if_adopted(pidfd, keep=True)
                        os.close(pidfd)
            for fd in fds:
                os.close(fd)
            if not message:
                return

    def reap(self, timeout: float) -> None:
        """Once closed: wait for the zygote to exit (killing it after
        ``timeout``), and reap it (a standby is reaped by its zygote).  One
        stopped (SIGSTOP) cannot exit: it is killed at once."""
        if _child.found_stopped(self.process):
            self.process.kill()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self.process.close()
