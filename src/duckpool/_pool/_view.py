"""The engine as its owners see one another: protocols, and nothing else.

An owner is handed the pool (``_core.PoolCore``) and reaches its siblings
through it (``core.scheduler.requeue_front(slot)``).  It names their types
from here, never from their modules or from ``_core``: so imports go one
way, ``_core`` -> owners -> this module -> the leaves (slots, lifecycle,
waiter, ...), even for the type checker.  Each protocol lists what the other
owners use of one owner, no more; mypy checks that the owner and the facade
match them where ``PoolCore`` builds its owners.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Optional, Protocol

if TYPE_CHECKING:
    from concurrent.futures import Future
    from multiprocessing import connection as mp_connection
    from typing import Sequence

    from duckpool import _protocol, _worker, _zygote, _zygote_process
    from duckpool._futures import WorkItem
    from duckpool._pool._counters import Counters
    from duckpool._pool._lifecycle import Lifecycle
    from duckpool._pool._pending import Pending
    from duckpool._pool._quarantine import Quarantine
    from duckpool._pool._settings import PoolSettings
    from duckpool._pool._slots import (
        Assist,
        Resolution,
        Slot,
        Spare,
        WorkerProcess,
        ZygoteTag,
    )
    from duckpool._pool._waiter import EpollWaiter, SelectorWaiter
    from duckpool._pool._wakeup import Wakeup


class SchedulerView(Protocol):
    """``_scheduler.Scheduler``, as the other owners use it."""

    def complete(self, slot: Slot, now: float) -> None: ...

    def booked(self, slot: Slot, since: float, now: float, answers: int) -> None: ...

    def count_death(self, item: WorkItem) -> list[WorkItem]: ...

    def cancel_queued(self, future: Future[Any]) -> Optional[WorkItem]: ...

    def dispatch_pending(self) -> None: ...

    def refill(self, slot: Slot) -> None: ...

    def is_idle(self, slot: Slot) -> bool: ...

    def startable(self, limit: int) -> int: ...

    def on_ready(self, slot: Slot, now: float) -> None: ...

    pending: Pending

    def retire(self, slot: Slot) -> None: ...

    def requeue_front(self, slot: Slot) -> None: ...

    def take_all(self) -> list[WorkItem]: ...

    def take_assigned(self, slot: Slot) -> list[WorkItem]: ...

    def take_back(self, slot: Slot) -> None: ...


class ElasticView(Protocol):
    """``_elastic.Elastic``, as the other owners use it."""

    enabled: bool
    min_workers: int

    def adopt(self, slot: Slot) -> None: ...

    def check(self, now: float) -> Optional[float]: ...

    def unpark(self, slot: Slot) -> None: ...

    def unpark_for(self, waiting: int) -> bool: ...


class TransportView(Protocol):
    """``_transport.Transport``, as the other owners use it."""

    def before_wait(self) -> None: ...

    def copy_buffers(self, slot: Slot, body: memoryview) -> Any: ...

    def flush(self, slot: Slot) -> None: ...

    def frames_of(self, slot: Slot, items: list[WorkItem]) -> _protocol.Frames: ...

    def on_area_offer(self, slot: Slot, offer: bytes) -> None: ...

    def send_stop(self, slot: Slot) -> None: ...

    def write(self, slot: Slot, data: _protocol.Frames) -> None: ...


class ResultsView(Protocol):
    """``_results.ResultBook``, as the other owners use it."""

    deferred: list[Resolution]

    def on_initializer_failure(self, payload: memoryview) -> None: ...

    def on_results(
        self,
        slot: Slot,
        deferred: Optional[list[Resolution]] = None,
        helper: Optional[mp_connection.Connection] = None,
        final: bool = False,
    ) -> bool: ...

    def resolve_all(self, resolutions: list[Resolution]) -> None: ...

    def resolve_helped(self, resolved: list[Resolution]) -> None: ...

    def hand_over(self, resolved: list[Resolution]) -> None: ...

    def take_handed_over(self, last: bool = False) -> None: ...


class AssistsView(Protocol):
    """``_assist.Assists``, as the other owners use it."""

    def condemn(
        self, slot: Slot, what: str, cause: Optional[BaseException] = None
    ) -> Optional[WorkerProcess]: ...

    def end_assist(self, slot: Slot, assist: Assist) -> None: ...

    def poison(
        self,
        slot: Slot,
        cause: Optional[BaseException],
        writing: bool = False,
        why: Optional[str] = None,
    ) -> None: ...


class LauncherView(Protocol):
    """``_launcher.Launcher``, as the other owners use it."""

    def before_wait(self, now: float) -> Optional[float]: ...

    def count_startup_death(self) -> bool: ...

    def on_unready_death(self, by_itself: bool, missed: Optional[str], now: float) -> int: ...

    forks: bool

    def inherited_fds(self) -> list[int]: ...

    def install_worker(
        self,
        slot: Slot,
        process: WorkerProcess,
        task_w: Any,
        result_r: Any,
    ) -> None: ...

    def launch(self, slot_index: int) -> tuple[WorkerProcess, Any, Any]: ...

    def may_start(self) -> bool: ...

    def may_start_now(self, now: float) -> bool: ...

    def on_ready(self, slot: Slot, now: float) -> None: ...

    def on_start_failure(self, error: BaseException, now: float) -> Optional[BaseException]: ...

    def poll_exits(self) -> list[Slot]: ...

    def poll_exits_from_now(self) -> None: ...

    polls_exits: bool

    def refill_slots(self) -> Optional[BaseException]: ...

    def reserve(self, slot: Slot) -> None: ...

    def on_unparked(self, slot: Slot) -> None: ...

    start_seconds: float

    def start_succeeded(self) -> None: ...

    def unreserve(self, slot: Slot) -> None: ...

    def worker_config(
        self, slot_index: int, forked: Optional[bool] = None
    ) -> _worker.WorkerConfig: ...


class ZygotesView(Protocol):
    """``_zygotes.Zygotes``, as the other owners use it."""

    def after_pass(self, now: float) -> None: ...

    asked_at: Optional[float]

    def await_requested_starts(self) -> None: ...

    def check_answers(self, now: float) -> None: ...

    def close(self) -> None: ...

    exits_due: dict[int, float]

    def expect_exit(self, process: Any, now: float) -> None: ...

    def finish(self) -> None: ...

    def forget_requests(self) -> None: ...

    def helpers(self) -> list[tuple[str, int]]: ...

    def on_event(self, tag: ZygoteTag) -> list[Slot]: ...

    parent_pidfd: Optional[int]

    def poll(self) -> list[Slot]: ...

    def prepare(self) -> None: ...

    def reap(self, timeout: float) -> None: ...

    def request_start(self, slot: Slot) -> None: ...

    spawning: bool

    standby_due: float

    def wake_in(self, now: float) -> Optional[float]: ...

    zygote: Optional[_zygote.Zygote]

    zygote_channels: Optional[_zygote_process.Channels]


class SupervisorView(Protocol):
    """``_supervisor.Supervisor``, as the other owners use it."""

    def answered_once_stopped(self, slot: Slot) -> None: ...

    def break_if_starts_fail(self, give_up: bool, last: str, deaths: int = ...) -> None: ...

    def fail_everything(
        self,
        error: BaseException,
        cause: Optional[BaseException],
        also: Sequence[WorkItem] = (),
    ) -> None: ...

    def close_slot(self, slot: Slot) -> None: ...

    def kill_all_workers(self, signum: int = ...) -> None: ...

    def kill_without_bookkeeping(self) -> None: ...

    def starts_failed(self, error: BaseException) -> None: ...

    def on_worker_exit(self, slot: Slot) -> None: ...

    def stop_worker(self, slot: Slot, item: WorkItem, error: BaseException) -> None: ...

    def stop_workers(self, grace: Optional[float] = None) -> None: ...


class SuccessorsView(Protocol):
    """``_successors.Successors``, as the other owners use it."""

    def close_reaped(self, spares: list[Spare]) -> None: ...

    exits: list[Spare]

    leaving: list[Spare]

    def let_go(self, spare: Spare) -> None: ...

    def on_exits(self) -> None: ...

    def spares(self) -> list[Spare]: ...

    def start_due(self) -> Optional[BaseException]: ...

    def take(self, slot: Slot) -> Optional[Spare]: ...

    def wake_for(self, slot: Slot) -> None: ...

    def wanted(self, slot: Slot) -> bool: ...


class DeadlinesView(Protocol):
    """``_deadlines.Deadlines``, as the other owners use it."""

    def check(self, now: float) -> Optional[float]: ...


class DispatcherView(Protocol):
    """``_dispatcher.Dispatcher``, as the other owners use it."""

    def is_current(self) -> bool: ...

    def running(self) -> bool: ...


class Core(Protocol):
    """``_core.PoolCore``, as its owners use it."""

    settings: PoolSettings
    lock: threading.Lock
    workers_ready: threading.Condition
    lifecycle: Lifecycle
    size: int
    capacity: int
    slots: list[Slot]
    marks: Any
    shared_marks: Any
    counters: Counters
    quarantine: Quarantine
    wakeup: Wakeup
    selector: EpollWaiter | SelectorWaiter
    abandoned: bool

    @property
    def transport(self) -> TransportView: ...

    @property
    def scheduler(self) -> SchedulerView: ...

    @property
    def elastic(self) -> ElasticView: ...

    @property
    def launcher(self) -> LauncherView: ...

    @property
    def zygotes(self) -> ZygotesView: ...

    @property
    def supervisor(self) -> SupervisorView: ...

    @property
    def successors(self) -> SuccessorsView: ...

    @property
    def results(self) -> ResultsView: ...

    @property
    def assists(self) -> AssistsView: ...

    @property
    def deadlines(self) -> DeadlinesView: ...

    @property
    def dispatcher(self) -> DispatcherView: ...

    @property
    def thread(self) -> Optional[threading.Thread]: ...

    @property
    def closed(self) -> bool: ...

    @property
    def owner_pid(self) -> int: ...

    def wake(self) -> None: ...

    def request_shutdown(self, cancel_futures: bool) -> None: ...

    def drop_surplus_slots(self) -> None: ...

    def close_marks(self) -> None: ...

    def close_wakeup(self) -> None: ...
