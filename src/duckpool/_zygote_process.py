"""What runs inside a zygote (or its standby): fork workers on request, report their exits.

The parent's side (``_zygote.Zygote``, its handle on a zygote) and this
side speak the protocol below over the zygote's control socket and notice
pipe (``Channels``); ``_zygote`` draws the whole exchange.
"""

from __future__ import annotations

import errno
import gc
import os
import signal
import socket
import struct
import time
from multiprocessing import connection as mp_connection
from typing import Any, Callable, Iterable, NamedTuple, Optional

from duckpool import _child, _protocol, _spawn, _worker

REQUEST = struct.Struct("<I")  # slot index, or one of the requests below
EXIT = 0xFFFFFFFF
#: Exit as soon as every worker forked so far has exited.  The next request
#: unit is how many answers the parent has read: a worker whose answer it
#: has not read (it never got the worker's pipes, so cannot stop it) is killed.
FINISH = 0xFFFFFFFE
#: Fork a standby; the reply carries its pid and the parent's ends of its channels.
STANDBY = 0xFFFFFFFD
#: The next request unit is the pid of a worker to kill when the parent dies
#: (one a dead zygote forked).
ADOPT = 0xFFFFFFFC
#: The parent holds this standby's channels (its first request: a standby
#: whose channels close before it, its zygote dying as it handed them over,
#: was never the pool's).
HELLO = 0xFFFFFFFB
REPLY = struct.Struct("<Ii")  # slot index or STANDBY, pid (negative: errno of a failed start)
NOTICE = struct.Struct("<ii")  # pid, exit code
START_TIMEOUT = 60.0
PARENT_POLL_SECONDS = 0.5


class Birth(NamedTuple):
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
    #: Slots whose workers it starts at once, as if asked (see Zygote.fork).
    first_slots: tuple[int, ...] = ()


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


def zygote_main(
    control: socket.socket,
    notices_w: int,
    build_config: Callable[[int], _worker.WorkerConfig],
    birth: Birth,
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
    birth: Birth,
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
    # The first workers' requests came with the fork: served before anything
    # else runs here (see Zygote.fork).
    buffered = b"".join(REQUEST.pack(slot) for slot in birth.first_slots)
    asked = bool(buffered)
    delivered = not birth.standby  # (a standby: once told HELLO)
    finishing = False
    adopting = False
    counting = False  # the next unit is FINISH's count of answers read
    answers = 0  # answers sent: one per start or standby request
    answer_of: dict[int, int] = {}  # a worker's sentinel: the number of its answer
    titled = False
    standbys: set[int] = set()  # sentinels of the standbys it forked
    while not (finishing and not workers):
        # No EOF tells the zygote that the parent died: the parent's end of
        # the control socket came along with the fork (as did other pools').
        # The parent's pidfd says it, or else its parent id (the zygote is its
        # child); no watchdog thread, since the zygote must stay single-threaded.
        ready = [] if asked else mp_connection.wait([*watched, *workers], PARENT_POLL_SECONDS)
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
            answer_of.pop(sentinel, None)
            process.join()
            assert process.pid is not None and process.exitcode is not None
            try:
                _protocol.write_all(notices_w, NOTICE.pack(process.pid, process.exitcode))
            except BrokenPipeError:
                pass  # the pool has closed its end: it no longer asks
            del process  # the last reference: its sentinel closes
        if asked:
            asked = False
        elif control not in ready:
            continue
        else:
            chunk = control.recv(4096)
            if not chunk:
                # Every copy of the parent's end is closed: the parent is gone
                # (or exec'd), or that end never reached it (a standby whose
                # zygote died handing it over).  Its own workers go either
                # way; the adopted ones, running the parent's tasks, only in
                # the first case.
                _kill_workers(workers.values(), adopted if delivered else ())
                return
            buffered += chunk
        usable = len(buffered) - len(buffered) % REQUEST.size
        requests, buffered = buffered[:usable], buffered[usable:]
        for (slot,) in REQUEST.iter_unpack(requests):
            if adopting:
                adopting = False
                _drop_exited(adopted)
                pidfd = _child.pidfd_of(slot)
                if pidfd is not None:
                    adopted.append(pidfd)
            elif counting:
                counting = False
                for sentinel, answer in answer_of.items():  # (all still in workers)
                    if answer > slot:
                        workers[sentinel].kill()  # (it has no task, and no way to get one)
            elif slot == HELLO:
                delivered = True
            elif slot == ADOPT:
                adopting = True
            elif slot == EXIT:
                # The pool has shut down and stopped its workers.  One still
                # here was started after the pool stopped taking them (a
                # dispatcher that failed, say): it has no watchdog, so it goes.
                _kill_workers(workers.values(), ())
                return
            elif slot == FINISH:
                finishing = True
                counting = True
                # A standby has nothing left to take over: it goes now.
                for sentinel in standbys:
                    if sentinel in workers:
                        workers[sentinel].kill()
            elif finishing:
                continue
            elif slot == STANDBY:
                if not titled:
                    _set_title(birth.title)
                    titled = True
                answers += 1
                standby = _fork_standby(control, notices_w, build_config, birth, workers, adopted)
                if standby is not None:
                    standbys.add(standby)
            else:
                answers += 1
                _drop_exited(adopted)
                own = (control.fileno(), notices_w, *workers, *adopted)
                started = _start_one(
                    ctx, control, build_config(slot), workers, birth.parent_pidfd, own
                )
                if started is not None:
                    answer_of[started] = answers


def _drop_exited(adopted: list[int]) -> None:
    """Close the pidfds of adopted workers that have exited: each death of
    a zygote adds its workers' (and a standby promoted after many deaths
    would otherwise hold them all, and pass them to every worker it forks)."""
    if not adopted:
        return
    ready = mp_connection.wait(adopted, 0)
    exited = {fd for fd in adopted if fd in ready}
    if exited:
        adopted[:] = [fd for fd in adopted if fd not in exited]
        for fd in exited:
            _child.close_quietly(fd)


def _parent_died(birth: Birth) -> bool:
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
    birth: Birth,
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
        control.sendall(REPLY.pack(STANDBY, -(exc.errno or 1)))
        return None
    own = (control.fileno(), notices_w, channels.control.fileno(), channels.notices_r)
    title = None if birth.title is None else f"{birth.title}-standby"
    standby_birth = Birth(
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
        zygote_main(channels.zygote_end, channels.notices_w, build_config, standby_birth)

    try:
        process = _child.fork(standby_main)
    except OSError as exc:
        channels.control.close()
        os.close(channels.notices_r)
        control.sendall(REPLY.pack(STANDBY, -(exc.errno or 1)))
        return None
    finally:
        channels.zygote_end.close()
        os.close(channels.notices_w)
    workers[process.sentinel] = process
    try:
        reply = REPLY.pack(STANDBY, process.pid)
        socket.send_fds(control, [reply], [channels.control.fileno(), channels.notices_r])
    except (BrokenPipeError, ConnectionResetError):  # (as in _start_one)
        process.kill()
    finally:
        channels.control.close()
        os.close(channels.notices_r)
    return int(process.sentinel)


#: How long a zygote that kills its workers on its way out waits, in all,
#: for them to exit, so that it reaps them itself.
KILLED_REAP_SECONDS = 1.0


def _kill_workers(workers: Iterable[Any], adopted: Iterable[int]) -> None:
    """Kill ``workers`` and the ``adopted`` ones (the parent's, by pidfd).

    Used when the parent died, or the pool ended with workers left: they have
    no watchdog of their own.  Its own are reaped before the zygote goes:
    left to exit after it, they would be orphans, and where the pool's
    process inherits orphans (PID 1 of a container) nothing would reap them.
    """
    killed = list(workers)
    for process in killed:
        process.kill()
    for pidfd in adopted:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # type: ignore[attr-defined]
        except OSError:
            pass  # it exited already
    deadline = time.monotonic() + KILLED_REAP_SECONDS
    for process in killed:
        process.join(max(0.0, deadline - time.monotonic()))


def _start_one(
    ctx: Any,
    control: socket.socket,
    config: _worker.WorkerConfig,
    workers: dict[int, Any],
    parent_sentinel: Optional[int],
    also_close: tuple[int, ...] = (),
) -> Optional[int]:
    """Fork one worker and hand the parent its pid and pipe ends (or the
    error); returns its sentinel (None if it could not be forked).

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
        control.sendall(REPLY.pack(config.slot, -code))
        return None
    workers[process.sentinel] = process
    reply = REPLY.pack(config.slot, process.pid)
    try:
        socket.send_fds(control, [reply], [task_w.fileno(), result_r.fileno()])
    except (BrokenPipeError, ConnectionResetError):
        # The parent closed its end (it shut down, or gave up on this
        # zygote): the worker can have no task.  The next read sees EOF.
        process.kill()
    finally:
        task_w.close()
        result_r.close()
    return int(process.sentinel)
