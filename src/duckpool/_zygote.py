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
are told to stop), when the parent closes the control socket, or dies.

No single death may break the pool, the zygote's included.  Once the pool
has started, the zygote forks a *standby*: a copy of itself, idle, with
control channels of its own (handed to the parent over the control socket).
When the zygote dies, the pool promotes the standby: it forks the next
workers (from the same memory image as the zygote's, so with the same
semantics), adopts the workers the dead zygote forked (killing them too when
the parent dies) and forks a standby of its own.  When the standby dies, the
zygote forks another.  Only when both die at once does the pool fall back to
spawning its workers (``_pool._launcher``)::

    parent                      zygote                        standby
      "standby" --control------> fork, with new channels --> waits for requests
      <-- standby pid, control end, notice end (SCM_RIGHTS)
      (zygote dies) "adopt pid", "start slot i" --standby's control socket-->

Each helper process has a title naming its pool and role (``<prefix>-zygote``,
``<prefix>-zygote-standby``), set once start-up is over.
"""

from __future__ import annotations

import errno
import gc
import os
import signal
import socket
import struct
import time
import weakref
from multiprocessing import connection as mp_connection
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

from duckpool import _child, _protocol, _spawn, _worker

_REQUEST = struct.Struct("<I")  # slot index, or one of the requests below
_EXIT = 0xFFFFFFFF
#: Exit as soon as every worker forked so far has exited.
_FINISH = 0xFFFFFFFE
#: Fork a standby; the reply carries its pid and the parent's ends of its channels.
_STANDBY = 0xFFFFFFFD
#: The next request unit is the pid of a worker to kill when the parent dies
#: (one a dead zygote forked).
_ADOPT = 0xFFFFFFFC
_REPLY = struct.Struct("<Ii")  # slot index or _STANDBY, pid (negative: errno of a failed start)
_NOTICE = struct.Struct("<ii")  # pid, exit code
_START_TIMEOUT = 60.0
_PARENT_POLL_SECONDS = 0.5


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
        self._release = weakref.finalize(self, _close_quietly, self.pidfd)

    @property
    def sentinel(self) -> Optional[int]:
        """None while its zygote reports its exit; its pidfd once the zygote is gone."""
        return self.pidfd if self._zygote is None else None

    def orphan(self) -> None:
        """Its zygote died: its exit is seen through its pidfd from now on,
        and its exit code is unknown (only its zygote could have read it)."""
        self._zygote = None

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

    def is_alive(self) -> bool:
        if self.exitcode is not None or self.exited:
            return False
        if self._zygote is None:
            if self.pidfd is not None and self._release.alive:
                self.exited = bool(mp_connection.wait([self.pidfd], 0))
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
        if self._zygote is not None:
            self._zygote.forget(self)


def _close_quietly(fd: Optional[int]) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


class _Birth(NamedTuple):
    """What the zygote (or a standby) knows from the moment it is forked."""

    parent_pid: int
    #: Descriptors it must close at once (see Zygote).
    inherited_fds: tuple[int, ...]
    #: Readable once the parent has died; None: it polls the parent's pid.
    parent_pidfd: Optional[int]
    #: Pidfds of workers it did not fork, to kill with its own when the parent dies.
    adopted: tuple[int, ...]
    #: Its title once start-up is over (None: leave it).
    title: Optional[str] = None
    #: A standby: forked by the zygote, not the parent (it cannot watch the
    #: parent through ``os.getppid``, and it forks no standby of its own
    #: until it has served a request, that is, been promoted).
    standby: bool = False


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
    ) -> Zygote:
        """Fork the zygote, with ``channels`` (new ones if None).

        It closes ``inherited_fds`` (the parent's ends of the pipes of
        workers started before it: its workers must not hold them).  Given
        ``parent_pidfd`` (this process's pidfd), it kills its workers, and
        those of ``adopted_pids`` (workers started before it), as soon as
        this process dies: they need no watchdog of their own.
        """
        if channels is None:
            channels = Channels.open()
        adopted = [fd for fd in map(_child.pidfd_of, adopted_pids) if fd is not None]
        birth = _Birth(os.getpid(), tuple(inherited_fds), parent_pidfd, tuple(adopted), title)
        try:
            process = _child.fork(
                lambda: _zygote_main(channels.zygote_end, channels.notices_w, build_config, birth)
            )
        except BaseException:
            channels.control.close()
            os.close(channels.notices_r)
            raise
        finally:
            channels.zygote_end.close()
            os.close(channels.notices_w)
            for fd in adopted:
                os.close(fd)
        return cls(process, channels.control, channels.notices_r)

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
        self._send(_REQUEST.pack(slot))

    def request_standby(self) -> None:
        """Ask the zygote to fork a standby (``receive_started`` gives it)."""
        self.standby_requested = True
        self._send(_REQUEST.pack(_STANDBY))

    def adopt(self, pids: Iterable[int]) -> None:
        """Have the zygote kill these workers (a dead zygote's) when the parent dies."""
        data = b"".join(_REQUEST.pack(_ADOPT) + _REQUEST.pack(pid) for pid in pids)
        if data:
            self._send(data)

    def _send(self, data: bytes) -> None:
        self._control.settimeout(_START_TIMEOUT)
        self._control.sendall(data)

    def receive_started(self) -> Optional[Started | Zygote]:
        """The next answer: a started worker, or a standby (a ``Zygote``).

        None if the zygote is gone (its sentinel tells how); raises OSError
        if it could not fork.
        """
        try:
            message, fds, _, _ = socket.recv_fds(self._control, _REPLY.size, 2)
        except (BlockingIOError, socket.timeout):
            return None  # (a dead zygote's socket, drained: see Launcher)
        if len(message) < _REPLY.size:
            for fd in fds:
                os.close(fd)
            return None
        slot, pid = _REPLY.unpack(message)
        if slot == _STANDBY:
            self.standby_requested = False
        if pid <= 0 or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            what = "a standby" if slot == _STANDBY else "a worker"
            raise OSError(-pid, f"the pool's zygote could not start {what}: {os.strerror(-pid)}")
        if slot == _STANDBY:
            pidfd = _child.pidfd_of(pid)
            if pidfd is None:  # gone already
                os.close(fds[0])
                os.close(fds[1])
                return None
            os.set_blocking(fds[1], False)
            return Zygote(_child.ForeignProcess(pid, pidfd), socket.socket(fileno=fds[0]), fds[1])
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
        usable = len(data) - len(data) % _NOTICE.size
        self._pending_notices = data[usable:]
        exited = []
        for pid, exitcode in _NOTICE.iter_unpack(data[:usable]):
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
            self._control.setblocking(False)
            self._control.send(_REQUEST.pack(_EXIT))
        except OSError:
            pass
        self._control.close()
        try:
            os.close(self.notices_fd)
        except OSError:
            pass

    def reap(self, timeout: float) -> None:
        """Once closed: wait for the zygote to exit (killing it after
        ``timeout``), and reap it (a standby is reaped by its zygote)."""
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self.process.close()


def _zygote_main(
    control: socket.socket,
    notices_w: int,
    build_config: Callable[[int], _worker.WorkerConfig],
    birth: _Birth,
) -> None:
    """The zygote: fork workers on request, report their exits, until told to stop.

    Its exit (tearing down a copy of the parent's memory) runs at normal
    priority: ``shutdown(wait=True)`` waits for it.
    """
    _serve(control, notices_w, build_config, birth)


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
    adopted = list(birth.adopted)
    parent_gone = birth.parent_pidfd
    watched: list[Any] = [control] if parent_gone is None else [control, parent_gone]
    buffered = b""
    finishing = False
    adopting = False
    titled = False
    standbys: set[int] = set()  # sentinels of the standbys it forked
    while not (finishing and not workers):
        # No EOF tells the zygote that the parent died: the parent's end of
        # the control socket came along with the fork (as did other pools').
        # The parent's pidfd says it, or else its parent id (the zygote is its
        # child); no watchdog thread, since the zygote must stay single-threaded.
        ready = mp_connection.wait([*watched, *workers], _PARENT_POLL_SECONDS)
        if parent_gone in ready or _parent_died(birth):
            _kill_workers(workers.values(), adopted)
            return
        if birth.parent_pidfd is None:
            # No pidfds: a worker's sentinel is a pipe, which a process its
            # task forked may hold open after the worker's exit.  Ask.
            ready += [
                key
                for key, process in workers.items()
                if key not in ready and process.exitcode is not None
            ]
        for sentinel in ready:
            if sentinel is control:
                continue
            assert isinstance(sentinel, int)
            process = workers.pop(sentinel)
            process.join()
            assert process.pid is not None and process.exitcode is not None
            try:
                _protocol.write_all(notices_w, _NOTICE.pack(process.pid, process.exitcode))
            except BrokenPipeError:
                pass  # the pool has closed its end: it no longer asks
            del process  # the last reference: its sentinel closes
        if control not in ready:
            continue
        chunk = control.recv(4096)
        if not chunk:  # every copy of the parent's end is closed: it is gone
            _kill_workers(workers.values(), adopted)
            return
        buffered += chunk
        usable = len(buffered) - len(buffered) % _REQUEST.size
        requests, buffered = buffered[:usable], buffered[usable:]
        for (slot,) in _REQUEST.iter_unpack(requests):
            if adopting:
                adopting = False
                pidfd = _child.pidfd_of(slot)
                if pidfd is not None:
                    adopted.append(pidfd)
            elif slot == _ADOPT:
                adopting = True
            elif slot == _EXIT:
                # The pool has shut down and stopped its workers.  One still
                # here was started after the pool stopped taking them (a
                # dispatcher that failed, say): it has no watchdog, so it goes.
                _kill_workers(workers.values(), ())
                return
            elif slot == _FINISH:
                finishing = True
                # A standby has nothing left to take over: it goes now.
                for sentinel in standbys:
                    if sentinel in workers:
                        workers[sentinel].kill()
            elif finishing:
                continue
            elif slot == _STANDBY:
                if not titled:
                    _set_title(birth.title)
                    titled = True
                standby = _fork_standby(control, notices_w, build_config, birth, workers, adopted)
                if standby is not None:
                    standbys.add(standby)
            else:
                own = (control.fileno(), notices_w, *workers, *adopted)
                _start_one(ctx, control, build_config(slot), workers, birth.parent_pidfd, own)


def _parent_died(birth: _Birth) -> bool:
    """Without a pidfd of the parent: has it died?  (The zygote is its child;
    a standby is not, so it asks whether the pid still exists.)"""
    if birth.parent_pidfd is not None:
        return False  # its pidfd is watched instead
    if not birth.standby:
        return os.getppid() != birth.parent_pid
    try:
        os.kill(birth.parent_pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass
    return False


def _set_title(title: Optional[str]) -> None:
    if title is None:
        return
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except Exception:  # a title is a courtesy: never a reason to fail
        pass


def _fork_standby(
    control: socket.socket,
    notices_w: int,
    build_config: Callable[[int], _worker.WorkerConfig],
    birth: _Birth,
    workers: dict[int, Any],
    adopted: list[int],
) -> Optional[int]:
    """Fork a standby zygote and hand the parent its channels (see the module doc).

    The standby is this zygote's child, reaped and reported like a worker;
    returns its sentinel (None if it could not be forked).
    """
    try:
        channels = Channels.open()
    except OSError as exc:
        control.sendall(_REPLY.pack(_STANDBY, -(exc.errno or 1)))
        return None
    own = (control.fileno(), notices_w, channels.control.fileno(), channels.notices_r)
    title = None if birth.title is None else f"{birth.title}-standby"
    standby_birth = _Birth(
        birth.parent_pid, own, birth.parent_pidfd, tuple(adopted), birth.title, standby=True
    )

    def standby_main() -> None:
        # Its zygote's workers are not its own: forget their handles (their
        # pidfds close; the zygote reaps them).
        for process in workers.values():
            try:
                process.close()
            except Exception:  # (a multiprocessing.Process still running)
                pass
        workers.clear()
        _set_title(title)
        _zygote_main(channels.zygote_end, channels.notices_w, build_config, standby_birth)

    try:
        process = _child.fork(standby_main)
    except OSError as exc:
        channels.control.close()
        os.close(channels.notices_r)
        control.sendall(_REPLY.pack(_STANDBY, -(exc.errno or 1)))
        return None
    finally:
        channels.zygote_end.close()
        os.close(channels.notices_w)
    workers[process.sentinel] = process
    try:
        reply = _REPLY.pack(_STANDBY, process.pid)
        socket.send_fds(control, [reply], [channels.control.fileno(), channels.notices_r])
    finally:
        channels.control.close()
        os.close(channels.notices_r)
    return int(process.sentinel)


def _kill_workers(workers: Iterable[Any], adopted: Iterable[int]) -> None:
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
    also_close: tuple[int, ...] = (),
) -> None:
    """Fork one worker and hand the parent its pid and pipe ends.

    The worker closes ``also_close`` at once: the zygote's channels and
    pidfds are no business of a task's (a task that wrote to the notice
    pipe could report a sibling dead).
    """
    try:
        process, task_w, result_r = _spawn.start_worker_process(
            ctx, config, parent_sentinel, also_close=also_close
        )
    except Exception as exc:  # never the zygote's death: the parent retries
        code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EAGAIN
        control.sendall(_REPLY.pack(config.slot, -code))
        return
    workers[process.sentinel] = process
    reply = _REPLY.pack(config.slot, process.pid)
    socket.send_fds(control, [reply], [task_w.fileno(), result_r.fileno()])
    task_w.close()
    result_r.close()
