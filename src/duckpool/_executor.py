"""duckpool's process-pool executor: dispatch, futures and worker supervision.

Data flow::

    submit() [any thread]                         worker slot i (a process)
      |  pickles (fn, args, kwargs) at once          |
      |  lock held:                                  |
      |   idle slot? --task frame--> task pipe i --> | recv, run, send
      |   else -> _pending (deque)                   |
      |                                              v
      |                      result pipe i <-- result frame (task id, status)
      v
    _PoolCore._dispatch_loop [one thread per pool]
      waits on: wakeup pipe, every result pipe, every process sentinel
      result frame  -> pop the slot's head item, resolve its future,
                       refill the slot from _pending
      sentinel      -> read what the pipe still holds, then the dead worker's
                       head item fails with WorkerDiedError (pid, exit code,
                       signal), the items queued behind it go back to the front
                       of _pending, and a replacement starts in the same slot
      wakeup        -> shutdown / kill requests, executor garbage-collected

Where a future is resolved, on every path:

* result or task error ....... dispatcher thread, from the result frame
* unpicklable call ........... submit(), before anything is queued
* worker death ............... dispatcher thread (_on_worker_exit)
* initializer failure ........ dispatcher thread: the pool is broken, every
                               outstanding future fails, submit() raises
* shutdown(cancel_futures) ... shutdown(): pending futures are cancelled
* interpreter exit ........... atexit hook: non-daemon pools finish their
                               work; daemon pools kill workers and fail futures
* dispatcher bug ............. dispatcher thread's last resort: every
                               outstanding future fails with BrokenProcessPool

The parent always knows which worker runs which task: each slot keeps the
items it was sent, in order, and a worker answers in that order.  Only the
dispatcher thread reads result pipes and reaps processes; writes to task pipes
happen under ``_PoolCore.lock`` from submit() or the dispatcher.
"""

from __future__ import annotations

import atexit
import itertools
import os
import pickle
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import ProcessPoolExecutor as _StdlibProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeoutError
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import connection as mp_connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any, Callable, Optional, TypeVar

from duckpool import _worker
from duckpool._errors import InheritedManagerError, WorkerDiedError, describe_exit

__all__ = ["ProcessPoolExecutor"]

_T = TypeVar("_T")

#: Items a worker may hold at once (one running, the rest queued in its pipe),
#: so it never waits on the parent between small tasks.
_PREFETCH = 2
#: Never queue more than this many unread bytes in a task pipe, so a write to a
#: busy worker cannot block (Linux pipes buffer 64 KiB).
_PREFETCH_BYTES = 32 * 1024
#: How long stop waits for a worker to exit after being asked, then terminates.
_STOP_GRACE_SECONDS = 5.0
#: How long a terminated worker gets before SIGKILL.
_KILL_GRACE_SECONDS = 1.0


def default_max_workers() -> int:
    """The CPUs this process may run on (3.13's ``os.process_cpu_count()``)."""
    process_cpu_count = getattr(os, "process_cpu_count", None)
    if process_cpu_count is not None:
        return int(process_cpu_count() or 1)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _callable_label(fn: object) -> str:
    """A short human name for a task's callable, for error messages."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:
        return repr(fn)
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module else str(name)


class _RemoteTraceback(Exception):
    """Carries a worker's formatted traceback as the cause of a task error."""

    def __init__(self, tb_text: str) -> None:
        super().__init__(tb_text)
        self.tb_text = tb_text

    def __str__(self) -> str:
        return f'\n"""\n{self.tb_text}"""'


def _exception_from_payload(payload: memoryview) -> BaseException:
    """Rebuild a worker's exception, chaining its remote traceback."""
    exc, tb_text = pickle.loads(payload)
    exc.__cause__ = _RemoteTraceback(tb_text)
    return exc  # type: ignore[no-any-return]


class _WorkItem:
    """One submitted call, from submit() until its future is resolved."""

    __slots__ = ("frame", "future", "label", "started", "task_id")

    def __init__(self, future: Future[Any], task_id: int, frame: bytes, label: str) -> None:
        self.future = future
        self.task_id = task_id
        self.frame = frame
        self.label = label
        #: set_running_or_notify_cancel() has been called on the future.
        self.started = False


class _Slot:
    """A worker slot: a stable index, and the process that currently fills it."""

    __slots__ = (
        "assigned",
        "index",
        "process",
        "queued_bytes",
        "result_conn",
        "retiring",
        "task_conn",
        "tasks_sent",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Optional[BaseProcess] = None
        self.task_conn: Optional[mp_connection.Connection] = None
        self.result_conn: Optional[mp_connection.Connection] = None
        #: Items sent to the current process whose results have not arrived, in order.
        self.assigned: deque[_WorkItem] = deque()
        self.queued_bytes = 0
        self.tasks_sent = 0
        #: Reached max_tasks_per_child: told to exit once its items are done.
        self.retiring = False

    @property
    def alive(self) -> bool:
        return self.process is not None


# Every pool core of this process, for the fork and exit hooks.
_LIVE_CORES: weakref.WeakSet[_PoolCore] = weakref.WeakSet()
_task_ids = itertools.count(1)


class _PoolCore:
    """The state of one pool, shared by the executor and its dispatcher thread.

    It holds no reference to the executor object, so an executor that is
    garbage collected can be noticed (``weakref.finalize``) and shut down.
    """

    def __init__(
        self,
        max_workers: int,
        context: BaseContext,
        initializer: Optional[Callable[..., object]],
        initargs: tuple[Any, ...],
        max_tasks_per_child: Optional[int],
        name_prefix: Optional[str],
        daemon: bool,
    ) -> None:
        self.max_workers = max_workers
        self.context = context
        self.initializer = initializer
        self.initargs = initargs
        self.max_tasks_per_child = max_tasks_per_child
        self.name_prefix = name_prefix
        self.daemon = daemon
        self.owner_pid = os.getpid()

        self.lock = threading.Lock()
        self.pending: deque[_WorkItem] = deque()
        self.slots = [_Slot(i) for i in range(max_workers)]
        self.shutdown_requested = False
        #: Why the pool is broken (submit raises BrokenProcessPool), or None.
        self.broken: Optional[str] = None
        self.broken_cause: Optional[BaseException] = None
        self.kill_requested: Optional[int] = None  # a signal number
        self.thread: Optional[threading.Thread] = None
        #: Shared with the workers: the task id each slot last took up.
        self.started_marks: Any = None
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_r, False)
        os.set_blocking(self.wakeup_w, False)
        self.closed = False
        _LIVE_CORES.add(self)

    # -- called from any thread, lock held by the caller -----------------

    def check_usable(self) -> None:
        if self.owner_pid != os.getpid():
            raise InheritedManagerError(
                f"this pool belongs to process {self.owner_pid}; "
                f"process {os.getpid()} inherited a copy by fork and cannot use it"
            )
        if self.broken is not None:
            raise BrokenProcessPool(self.broken)
        if self.shutdown_requested:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def wake(self) -> None:
        """Interrupt the dispatcher's wait (safe from any thread)."""
        try:
            os.write(self.wakeup_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is already due) or closed

    def ensure_started(self) -> None:
        """Start every worker and the dispatcher thread, once."""
        if self.thread is not None:
            return
        # Workers first, then the thread: under fork, the first workers are
        # then forked before this pool adds a thread to the process.
        if self.started_marks is None:
            self.started_marks = self.context.RawArray("Q", self.max_workers)
        for slot in self.slots:
            if slot.process is None:
                self.start_worker(slot)
        self.thread = threading.Thread(
            target=self.dispatch_loop,
            name=f"duckpool-dispatcher-{id(self):x}",
            daemon=True,
        )
        self.thread.start()

    def start_worker(self, slot: _Slot) -> None:
        """Start a process in ``slot`` (lock held)."""
        ctx: Any = self.context  # typeshed's BaseContext lacks Process
        task_r, task_w = ctx.Pipe(duplex=False)
        result_r, result_w = ctx.Pipe(duplex=False)
        name = f"{self.name_prefix or 'duckpool-worker'}-{slot.index}"
        config = _worker.WorkerConfig(
            slot=slot.index,
            title=name if self.name_prefix else None,
            parent_pid=os.getpid(),
            initializer=self.initializer,
            initargs=self.initargs,
            started_marks=self.started_marks,
        )
        # The parent-side ends go on the slot first, so that the fork hook
        # closes them in the new child (and in any other forked process).
        slot.task_conn = task_w
        slot.result_conn = result_r
        process = ctx.Process(
            target=_worker.worker_main,
            args=(task_r, result_w, config),
            name=name,
            daemon=False,
        )
        try:
            process.start()
        except BaseException:
            slot.task_conn = slot.result_conn = None
            for conn in (task_r, task_w, result_r, result_w):
                conn.close()
            raise
        task_r.close()
        result_w.close()
        slot.process = process
        slot.queued_bytes = 0
        slot.tasks_sent = 0
        slot.retiring = False

    def can_take(self, slot: _Slot, item: _WorkItem) -> bool:
        if not slot.alive or slot.retiring:
            return False
        if not slot.assigned:
            return True
        return (
            len(slot.assigned) < _PREFETCH
            and slot.queued_bytes + len(item.frame) <= _PREFETCH_BYTES
        )

    def send(self, slot: _Slot, item: _WorkItem) -> bool:
        """Give ``item`` to ``slot``'s worker (lock held).

        Returns False if the future was cancelled meanwhile (the item is dropped).
        """
        if not item.started:
            if not item.future.set_running_or_notify_cancel():
                return False
            item.started = True
        slot.assigned.append(item)
        slot.queued_bytes += len(item.frame)
        slot.tasks_sent += 1
        assert slot.task_conn is not None
        try:
            slot.task_conn.send_bytes(item.frame)
        except OSError:
            # The worker is dead or dying: the dispatcher will see its sentinel
            # and, since the worker never took this item up, requeue it.
            pass
        if self.max_tasks_per_child is not None and slot.tasks_sent >= self.max_tasks_per_child:
            self.retire(slot)
        return True

    def retire(self, slot: _Slot) -> None:
        """Ask ``slot``'s worker to exit after the items it holds (lock held)."""
        slot.retiring = True
        assert slot.task_conn is not None
        try:
            slot.task_conn.send_bytes(b"")
        except OSError:
            pass

    def dispatch_pending(self) -> None:
        """Hand pending items to slots with room, round-robin (lock held)."""
        pending = self.pending
        while pending:
            placed = False
            for slot in self.slots:
                if not pending:
                    break
                item = pending[0]
                if self.can_take(slot, item):
                    pending.popleft()
                    self.send(slot, item)
                    placed = True
            if not placed:
                return

    def submit(self, item: _WorkItem) -> None:
        """Queue ``item``, sending it straight to an idle worker if there is one."""
        with self.lock:
            self.check_usable()
            if self.thread is None:
                self.ensure_started()
            if not self.pending:
                for slot in self.slots:
                    if slot.alive and not slot.retiring and not slot.assigned:
                        self.send(slot, item)
                        return
            self.pending.append(item)
            # A busy slot may still have prefetch room.
            self.dispatch_pending()

    # -- the dispatcher thread ------------------------------------------

    def dispatch_loop(self) -> None:
        try:
            self._dispatch_until_done()
        except BaseException as exc:  # last resort: never leave a future unresolved
            self.fail_everything(
                BrokenProcessPool(f"duckpool's dispatcher failed: {exc!r}"), cause=exc
            )
            self.kill_all_workers()
        finally:
            self.close_wakeup()

    def _dispatch_until_done(self) -> None:
        while True:
            with self.lock:
                waitables: list[Any] = [self.wakeup_r]
                by_object: dict[Any, tuple[str, _Slot]] = {}
                for slot in self.slots:
                    if slot.process is not None and slot.result_conn is not None:
                        waitables.append(slot.result_conn)
                        by_object[slot.result_conn] = ("result", slot)
                        waitables.append(slot.process.sentinel)
                        by_object[slot.process.sentinel] = ("exit", slot)
            ready = mp_connection.wait(waitables)
            exited: list[_Slot] = []
            for obj in ready:
                if obj == self.wakeup_r:
                    self.drain_wakeup()
                    continue
                kind, slot = by_object[obj]
                if kind == "result":
                    self.on_results(slot)
                else:
                    exited.append(slot)
            for slot in exited:
                self.on_worker_exit(slot)
            if self.kill_requested is not None:
                self.kill_all_workers(self.kill_requested)
            start_error: Optional[BaseException] = None
            with self.lock:
                if not self.shutdown_requested or self.pending:
                    start_error = self.refill_slots()
                    self.dispatch_pending()
                done = (
                    self.shutdown_requested
                    and not self.pending
                    and not any(s.assigned for s in self.slots)
                ) or (self.broken is not None and not any(s.alive for s in self.slots))
            if start_error is not None:
                self.mark_broken(f"could not start a worker process: {start_error!r}", start_error)
            elif done:
                break
        self.stop_workers()

    def drain_wakeup(self) -> None:
        try:
            while os.read(self.wakeup_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def refill_slots(self) -> Optional[BaseException]:
        """Start a replacement in every empty slot (lock held); return a start error."""
        if self.broken is not None or self.kill_requested is not None:
            return None
        for slot in self.slots:
            if slot.process is None:
                try:
                    self.start_worker(slot)
                except Exception as exc:
                    return exc
        return None

    def on_results(self, slot: _Slot) -> None:
        """Read every result frame the slot's pipe holds now."""
        conn = slot.result_conn
        assert conn is not None
        resolved: list[tuple[_WorkItem, int, memoryview]] = []
        init_failure: Optional[memoryview] = None
        while True:
            try:
                frame = conn.recv_bytes()
            except (EOFError, OSError):
                break  # the worker is gone; its sentinel says how
            view = memoryview(frame)
            task_id = int.from_bytes(view[: _worker.TASK_ID_BYTES], "little")
            status = view[_worker.TASK_ID_BYTES]
            payload = view[_worker.RESULT_HEADER_BYTES :]
            if status == _worker.STATUS_INIT_FAILED:
                init_failure = payload
                break
            with self.lock:
                item = slot.assigned.popleft()
                slot.queued_bytes -= len(item.frame)
            assert item.task_id == task_id, (item.task_id, task_id)
            resolved.append((item, status, payload))
            if not conn.poll():
                break
        with self.lock:
            if slot.process is not None and not (self.shutdown_requested and not self.pending):
                self.dispatch_pending()
        for item, status, payload in resolved:
            self.resolve(item, status, payload)
        if init_failure is not None:
            self.on_initializer_failure(init_failure)

    def resolve(self, item: _WorkItem, status: int, payload: memoryview) -> None:
        """Set a future from a result frame (no lock held: callbacks run here)."""
        future = item.future
        try:
            if status == _worker.STATUS_OK:
                value = pickle.loads(payload)
            else:
                error = _exception_from_payload(payload)
        except BaseException as exc:
            failure = pickle.UnpicklingError(
                f"could not unpickle what task {item.label} sent back: {exc!r}"
            )
            failure.__cause__ = exc
            _set_exception(future, failure)
            return
        if status == _worker.STATUS_OK:
            _set_result(future, value)
        else:
            _set_exception(future, error)

    def on_initializer_failure(self, payload: memoryview) -> None:
        try:
            cause = _exception_from_payload(payload)
        except BaseException as exc:
            cause = exc
        self.mark_broken(
            f"a worker's initializer failed: {cause!r}; the pool is broken", cause
        )

    def mark_broken(self, reason: str, cause: Optional[BaseException]) -> None:
        """Break the pool for good: fail every outstanding future, stop workers."""
        with self.lock:
            if self.broken is not None:
                return
            self.broken = reason
            self.broken_cause = cause
        error = BrokenProcessPool(reason)
        self.fail_everything(error, cause=cause)
        self.kill_all_workers()

    def fail_everything(self, error: BaseException, cause: Optional[BaseException]) -> None:
        """Fail every pending and assigned future with ``error``."""
        with self.lock:
            items = list(self.pending)
            self.pending.clear()
            for slot in self.slots:
                items.extend(slot.assigned)
                slot.assigned.clear()
                slot.queued_bytes = 0
        if cause is not None and error.__cause__ is None:
            error.__cause__ = cause
        for item in items:
            _set_exception(item.future, error)

    def on_worker_exit(self, slot: _Slot) -> None:
        """A worker's sentinel fired: settle its items and free the slot."""
        # Results written just before the exit are still in the pipe.
        conn = slot.result_conn
        if conn is not None:
            try:
                has_data = conn.poll()
            except (EOFError, OSError):
                has_data = False
            if has_data:
                self.on_results(slot)
        process = slot.process
        if process is None:  # already handled (e.g. killed by mark_broken)
            return
        process.join(_KILL_GRACE_SECONDS)
        exitcode = process.exitcode
        failed: Optional[tuple[_WorkItem, WorkerDiedError]] = None
        with self.lock:
            assigned = slot.assigned
            if assigned:
                head = assigned[0]
                # The worker marks each task it takes up: an item it never
                # reached (killed while idle, mid-send) is requeued, not failed.
                if self.started_marks[slot.index] == head.task_id:
                    assigned.popleft()
                    error = WorkerDiedError(
                        f"worker {slot.index} (pid {process.pid}) died while running "
                        f"{head.label}: {describe_exit(exitcode)}",
                        pid=process.pid,
                        exitcode=exitcode,
                        slot=slot.index,
                    )
                    failed = (head, error)
                # The rest never started: they go back to the front of the queue.
                self.pending.extendleft(reversed(assigned))
                assigned.clear()
            self.close_slot(slot)
        if failed is not None:
            _set_exception(failed[0].future, failed[1])

    def close_slot(self, slot: _Slot) -> None:
        """Forget the slot's process and close its pipes (lock held)."""
        for conn in (slot.task_conn, slot.result_conn):
            if conn is not None:
                try:
                    conn.close()
                except OSError:
                    pass
        slot.task_conn = slot.result_conn = None
        slot.process = None
        slot.queued_bytes = 0
        slot.retiring = False

    def stop_workers(self) -> None:
        """Ask idle workers to exit, then make sure they did."""
        with self.lock:
            processes = []
            for slot in self.slots:
                if slot.process is not None and slot.task_conn is not None:
                    try:
                        slot.task_conn.send_bytes(b"")
                    except OSError:
                        pass
                    processes.append(slot.process)
        _reap(processes, _STOP_GRACE_SECONDS)
        with self.lock:
            for slot in self.slots:
                self.close_slot(slot)

    def kill_all_workers(self, signum: Optional[int] = None) -> None:
        """Signal every worker, then settle their items as worker deaths."""
        import signal

        sig = signal.SIGKILL if signum is None else signum
        with self.lock:
            live = [s for s in self.slots if s.process is not None]
        for slot in live:
            assert slot.process is not None
            pid = slot.process.pid
            if pid is not None and slot.process.exitcode is None:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        for slot in live:
            self.on_worker_exit(slot)
        # The worker-death path requeues what never started; nothing restarts now.
        if self.pending and (self.broken is not None or self.kill_requested is not None):
            self.fail_everything(
                BrokenProcessPool(self.broken or "the pool's workers were stopped"),
                cause=self.broken_cause,
            )

    def close_wakeup(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for fd in (self.wakeup_r, self.wakeup_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- shutdown -----------------------------------------------------------

    def request_shutdown(self, cancel_futures: bool) -> list[_WorkItem]:
        """Stop accepting work; return the pending items cancelled (lock taken)."""
        with self.lock:
            self.shutdown_requested = True
            cancelled: list[_WorkItem] = []
            if cancel_futures:
                cancelled = list(self.pending)
                self.pending.clear()
            started = self.thread is not None
        for item in cancelled:
            item.future.cancel()
            _notify_if_cancelled(item.future)
        if started:
            self.wake()
        else:
            self.close_wakeup()
        return cancelled

    def join(self, timeout: Optional[float] = None) -> None:
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def shutdown_at_exit(self) -> None:
        """Interpreter exit: daemon pools stop now, others finish their work."""
        if self.owner_pid != os.getpid():
            return
        if self.daemon:
            self.request_shutdown(cancel_futures=True)
            with self.lock:
                self.kill_requested = 9
            self.wake()
            self.join(_STOP_GRACE_SECONDS)
        else:
            self.request_shutdown(cancel_futures=False)
            self.join()

    def forget_after_fork(self) -> None:
        """In a forked child: close this copy's pipe ends; the copy is unusable."""
        for slot in self.slots:
            for conn in (slot.task_conn, slot.result_conn):
                if conn is not None:
                    try:
                        conn.close()
                    except OSError:
                        pass
        for fd in (self.wakeup_r, self.wakeup_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.closed = True
        self.lock = threading.Lock()


def _reap(processes: list[BaseProcess], grace: float) -> None:
    """Join processes; terminate, then kill, those that outstay ``grace``."""
    for process in processes:
        process.join(grace)
    for process in processes:
        if process.exitcode is None:
            process.terminate()
            process.join(_KILL_GRACE_SECONDS)
        if process.exitcode is None:
            process.kill()
            process.join(_KILL_GRACE_SECONDS)


def _notify_if_cancelled(future: Future[Any]) -> None:
    """Let ``concurrent.futures.wait`` see a cancelled future as done.

    A future cancelled while queued counts as done for waiters only once the
    executor acknowledges it (CANCELLED -> CANCELLED_AND_NOTIFIED).
    """
    try:
        future.set_running_or_notify_cancel()
    except RuntimeError:  # already acknowledged, or running
        pass


def _set_result(future: Future[Any], value: Any) -> None:
    try:
        future.set_result(value)
    except Exception:  # cancelled or already resolved by a racing path
        _notify_if_cancelled(future)


def _set_exception(future: Future[Any], error: BaseException) -> None:
    try:
        future.set_exception(error)
    except Exception:  # cancelled or already resolved by a racing path
        _notify_if_cancelled(future)


def _after_fork_in_child() -> None:
    for core in list(_LIVE_CORES):
        core.forget_after_fork()


def _at_exit() -> None:
    for core in list(_LIVE_CORES):
        if core.thread is not None and not core.closed:
            core.shutdown_at_exit()


os.register_at_fork(after_in_child=_after_fork_in_child)
# Registered after multiprocessing's own exit hook (imported above), so it runs
# first: workers are stopped before multiprocessing joins its children.
atexit.register(_at_exit)


def _check_max_workers(max_workers: Optional[int]) -> int:
    if max_workers is None:
        return default_max_workers()
    if isinstance(max_workers, bool) or not isinstance(max_workers, int):
        raise TypeError(f"max_workers must be an int, got {max_workers!r}")
    if max_workers <= 0:
        raise ValueError(f"max_workers must be greater than 0, got {max_workers!r}")
    return max_workers


class ProcessPoolExecutor(_StdlibProcessPoolExecutor):
    """A drop-in :class:`concurrent.futures.ProcessPoolExecutor` that heals.

    Same constructor, methods and semantics as the standard library's, with
    these differences:

    * A worker that dies (``os._exit``, a signal, a segfault) fails only the
      task it was running, with :class:`~duckpool.WorkerDiedError` (a
      ``BrokenProcessPool`` subclass naming the pid, exit code and signal); a
      replacement starts in the same slot, and every other future completes.
    * ``max_tasks_per_child`` works under every start method, fork included.
    * Workers exit when the parent dies, under every start method.
    * Arguments are pickled in ``submit()``: a call that cannot be pickled
      returns a future that has already failed, naming the problem.

    Extra keyword arguments: ``process_name_prefix`` names each worker
    ``<prefix>-<slot>`` (its ``current_process().name`` and its OS process title),
    and ``daemon=True`` makes interpreter exit kill running tasks instead of
    waiting for submitted work.
    """

    def __init__(
        self,
        max_workers: Optional[int] = None,
        mp_context: Optional[BaseContext] = None,
        initializer: Optional[Callable[..., object]] = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: Optional[int] = None,
        process_name_prefix: Optional[str] = None,
        daemon: bool = False,
    ) -> None:
        # The standard library's __init__ is not called: this class has its own
        # dispatch and only shares the public interface (isinstance keeps working).
        workers = _check_max_workers(max_workers)
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, got {initializer!r}")
        if max_tasks_per_child is not None:
            if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
                raise TypeError(
                    f"max_tasks_per_child must be an int, got {max_tasks_per_child!r}"
                )
            if max_tasks_per_child < 1:
                raise ValueError(
                    f"max_tasks_per_child must be >= 1, got {max_tasks_per_child!r}"
                )
        if process_name_prefix is not None and not isinstance(process_name_prefix, str):
            raise TypeError(
                f"process_name_prefix must be a str, got {process_name_prefix!r}"
            )
        if mp_context is None:
            import multiprocessing

            mp_context = multiprocessing.get_context()
        if mp_context.get_start_method() != "fork" and initializer is not None:
            try:
                pickle.dumps((initializer, tuple(initargs)))
            except Exception as exc:
                raise TypeError(
                    f"initializer {initializer!r} and its initargs must be picklable "
                    f"under the {mp_context.get_start_method()!r} start method: {exc}"
                ) from exc
        self._max_workers = workers
        self._mp_context = mp_context
        self._core = _PoolCore(
            workers,
            mp_context,
            initializer,
            tuple(initargs),
            max_tasks_per_child,
            process_name_prefix,
            daemon,
        )
        self._finalizer = weakref.finalize(self, _PoolCore.request_shutdown, self._core, False)
        self._finalizer.atexit = False

    @property
    def _broken(self) -> Any:  # type: ignore[override]
        """The reason the pool is broken, or False (the stdlib's attribute)."""
        return self._core.broken or False

    @property
    def max_workers(self) -> int:
        """The number of worker slots."""
        return self._max_workers

    @property
    def start_method(self) -> str:
        """The multiprocessing start method of the workers."""
        return str(self._core.context.get_start_method())

    def worker_pids(self) -> list[int]:
        """The pids of the live worker processes, by slot."""
        core = self._core
        with core.lock:
            return [
                s.process.pid
                for s in core.slots
                if s.process is not None and s.process.pid is not None
            ]

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        """Schedule ``fn(*args, **kwargs)`` and return its future.

        Raises ``RuntimeError`` after shutdown, ``BrokenProcessPool`` if the
        pool is broken (its initializer failed), and
        :class:`~duckpool.InheritedManagerError` in a forked child.  A call
        that cannot be pickled gives a future that has already failed with the
        pickling error.  If the worker running the task dies, the future fails
        with :class:`~duckpool.WorkerDiedError` and the pool goes on.
        """
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, got {fn!r}")
        core = self._core
        with core.lock:
            core.check_usable()
        future: Future[_T] = Future()
        task_id = next(_task_ids)
        try:
            frame = task_id.to_bytes(_worker.TASK_ID_BYTES, "little") + pickle.dumps(
                (fn, args, kwargs), pickle.HIGHEST_PROTOCOL
            )
        except Exception as exc:
            error = pickle.PicklingError(
                f"cannot send {_callable_label(fn)} to a worker process: "
                f"its callable or arguments cannot be pickled: {exc}"
            )
            error.__cause__ = exc
            future.set_exception(error)
            return future
        core.submit(_WorkItem(future, task_id, frame, _callable_label(fn)))
        return future

    def map(  # type: ignore[override]
        self,
        fn: Callable[..., _T],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: int = 1,
        buffersize: Optional[int] = None,
    ) -> Iterator[_T]:
        """Like :func:`map`, computed in the pool; results come in input order.

        ``chunksize`` sends that many calls per task.  ``buffersize`` (as in
        Python 3.14) bounds how many chunks are submitted ahead of the one
        being yielded, so an endless iterable can be mapped lazily.  Raises
        ``TimeoutError`` if a result is not ready ``timeout`` seconds after the
        call; a call that raised re-raises when its result is reached.
        """
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize!r}")
        if buffersize is not None and (
            isinstance(buffersize, bool) or not isinstance(buffersize, int) or buffersize < 1
        ):
            raise ValueError(f"buffersize must be None or >= 1, got {buffersize!r}")
        import functools
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        calls = zip(*iterables)
        chunks: Iterator[list[tuple[Any, ...]]] = iter(
            lambda: list(itertools.islice(calls, chunksize)), []
        )
        run = functools.partial(_worker.run_chunk, fn)
        futures: deque[Future[list[_T]]] = deque()
        if buffersize is None:
            futures.extend(self.submit(run, chunk) for chunk in chunks)
        else:
            first = itertools.islice(chunks, buffersize)
            futures.extend(self.submit(run, chunk) for chunk in first)
        return self._map_results(futures, chunks if buffersize else None, run, deadline)

    def _map_results(
        self,
        futures: deque[Future[list[_T]]],
        more_chunks: Optional[Iterator[list[tuple[Any, ...]]]],
        run: Callable[[list[tuple[Any, ...]]], list[_T]],
        deadline: Optional[float],
    ) -> Iterator[_T]:
        import time

        try:
            while futures:
                future = futures.popleft()
                if more_chunks is not None:
                    for chunk in itertools.islice(more_chunks, 1):
                        futures.append(self.submit(run, chunk))
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise FuturesTimeoutError()
                yield from future.result(remaining)
        finally:
            for future in futures:
                future.cancel()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work and release the workers once their work is done.

        ``wait=True`` returns when every submitted task has finished and every
        worker has exited.  ``wait=False`` returns at once; submitted tasks
        still run and their futures still resolve.  ``cancel_futures=True``
        cancels the tasks no worker has started.  Calling it again is harmless.
        """
        core = self._core
        if core.owner_pid != os.getpid():
            return
        core.request_shutdown(cancel_futures)
        if wait:
            core.join()

    def terminate_workers(self) -> None:
        """Shut down now: cancel queued tasks and SIGTERM every worker.

        Tasks that were running fail with :class:`~duckpool.WorkerDiedError`;
        the executor cannot be used afterwards (as in Python 3.14).
        """
        import signal

        self._force_shutdown(signal.SIGTERM)

    def kill_workers(self) -> None:
        """Like :meth:`terminate_workers`, with SIGKILL."""
        import signal

        self._force_shutdown(signal.SIGKILL)

    def _force_shutdown(self, signum: int) -> None:
        core = self._core
        core.request_shutdown(cancel_futures=True)
        with core.lock:
            if core.thread is None:
                return
            core.kill_requested = signum
        core.wake()
        core.join()

    def __repr__(self) -> str:
        core = self._core
        if core.broken is not None:
            state = "broken"
        elif core.shutdown_requested:
            state = "shut down"
        elif core.thread is None:
            state = "idle"
        else:
            state = "running"
        return (
            f"<duckpool.ProcessPoolExecutor {state} max_workers={self._max_workers} "
            f"start_method={self.start_method!r}>"
        )
