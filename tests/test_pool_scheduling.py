"""The scheduler, deadlines and lifecycle on their own: no pool, no process.

Each owner gets a stand-in for the pool (the few fields and services it
reads) and real ``Slot`` records, so its policy is tested apart from pipes,
workers and timing.
"""

from __future__ import annotations

import signal
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Optional

import pytest

from duckpool._cpus import CpuBudget
from duckpool._errors import (
    InheritedManagerError,
    TaskCancelledError,
    TaskQuarantinedError,
    TaskTimeoutError,
)
from duckpool._futures import WorkItem
from duckpool._pool import _scheduler as scheduler_module
from duckpool._pool._deadlines import TAKE_UP_SECONDS, Deadlines
from duckpool._pool._lifecycle import Lifecycle
from duckpool._pool._pending import Pending
from duckpool._pool._quarantine import Quarantine
from duckpool._pool._scheduler import PREFETCH, PREFETCH_BEHIND_SECONDS, Scheduler
from duckpool._pool._slots import Assist, Slot, Stopping
from duckpool._pool._supervisor import KILL_GRACE_SECONDS


class _Settings:
    def __init__(self, type_limits: Optional[dict[str, int]] = None) -> None:
        self.type_limits = type_limits
        self.max_tasks_per_child: Optional[int] = None
        self.initializer: Any = None


class _Transport:
    """Records what would be written to each slot's worker."""

    def __init__(self) -> None:
        self.sent: dict[int, list[int]] = {}
        self.writes: dict[int, int] = {}

    def frames_of(self, slot: Slot, items: list[WorkItem]) -> list[WorkItem]:
        return items

    def write(self, slot: Slot, data: Any) -> None:
        # One item's frame (its task id, see _item), or several items.
        self.writes[slot.index] = self.writes.get(slot.index, 0) + 1
        items = data if isinstance(data, list) else [data]
        self.sent.setdefault(slot.index, []).extend(
            item.task_id if isinstance(item, WorkItem) else int(item) for item in items
        )


class _Process:
    pid = None  # (no process: never "stopped")
    sentinel = None

    def __init__(self) -> None:
        self.signals: list[int] = []

    def is_alive(self) -> bool:
        return True

    def kill(self) -> None:
        self.signals.append(signal.SIGKILL)

    def terminate(self) -> None:
        self.signals.append(signal.SIGTERM)


class _Successors:
    def wake_for(self, slot: Slot) -> None:
        pass


class _Pool:
    """What the scheduler and the deadlines read of a pool."""

    def __init__(self, workers: int, type_limits: Optional[dict[str, int]] = None) -> None:
        self.settings = _Settings(type_limits)
        self.transport = _Transport()
        self.quarantine = Quarantine(after=2, seconds=60.0)
        self.slots = [Slot(i) for i in range(workers)]
        for slot in self.slots:
            slot.process = _Process()  # type: ignore[assignment]
            slot.ready = True
        self.size = workers
        self.marks = [0] * (2 * workers)  # the task id each worker last took up
        self.successors = _Successors()
        self.wakes = 0
        self.ended_assists: list[Slot] = []
        self.stopped: list[tuple[Slot, WorkItem, BaseException]] = []
        self.assists = self
        self.supervisor = self
        self.elastic = _NotElastic()
        self.lifecycle = _Lifecycle()
        self.condemned: list[tuple[Slot, str]] = []

    def wake(self) -> None:
        self.wakes += 1

    def end_assist(self, slot: Slot, assist: Assist) -> None:
        self.ended_assists.append(slot)

    def condemn(self, slot: Slot, what: str, cause: Optional[BaseException] = None) -> Any:
        self.condemned.append((slot, what))
        return slot.process

    def stop_worker(self, slot: Slot, item: WorkItem, error: BaseException) -> None:
        self.stopped.append((slot, item, error))


class _NotElastic:
    enabled = False


class _Lifecycle:
    shutdown_requested = False


_ids = iter(range(1, 1_000_000))


def _item(kind: Optional[str] = None, timeout: Optional[float] = None, fn: Any = len) -> WorkItem:
    task_id = next(_ids)
    return WorkItem(Future(), task_id, str(task_id).encode(), fn, timeout, kind)


def _scheduler(pool: _Pool) -> Scheduler:
    return Scheduler(pool)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def cpus(monkeypatch: pytest.MonkeyPatch) -> _Cpus:
    """The CPUs the scheduler believes this process has (64 unless a test says)."""
    budget = _Cpus(64)
    monkeypatch.setattr(scheduler_module, "cpu_budget", budget)
    return budget


class _Cpus:
    def __init__(self, count: int) -> None:
        self.count = count

    def __call__(self) -> CpuBudget:
        return CpuBudget(self.count, "set by the test")


def test_an_item_goes_to_an_idle_worker_at_once_else_waits_in_order() -> None:
    pool = _Pool(2)
    scheduler = _scheduler(pool)
    first, second, third, fourth = (_item() for _ in range(4))
    for item in (first, second, third, fourth):
        scheduler.queue(item)
    assert pool.transport.sent == {0: [first.task_id], 1: [second.task_id]}
    assert list(scheduler.pending) == [third, fourth]
    assert first.future.running()
    # Worker 0 answers its item after a long task: the next goes to it, one at a time.
    pool.slots[0].head_since = 0.0
    scheduler.complete(pool.slots[0], now=1.0)
    assert pool.slots[0].last_service == 1.0
    scheduler.dispatch_pending()
    assert pool.transport.sent[0] == [first.task_id, third.task_id]
    assert list(scheduler.pending) == [fourth]


class _Clock:
    """The scheduler's ``time`` module, stopped at ``now`` (its only read)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    stopped = _Clock(100.0)
    monkeypatch.setattr(scheduler_module, "time", stopped)
    return stopped


def test_short_tasks_queue_behind_a_busy_worker_up_to_the_prefetch_limit(clock: _Clock) -> None:
    pool = _Pool(1)
    scheduler = _scheduler(pool)
    slot = pool.slots[0]
    scheduler.queue(_item())
    slot.last_service = 0.0  # its tasks are tiny
    items = [_item() for _ in range(2 * PREFETCH)]
    for item in items:
        scheduler.queue(item)
    scheduler.dispatch_pending()
    assert len(slot.assigned) == PREFETCH
    assert list(scheduler.pending) == items[PREFETCH - 1 :]


@pytest.mark.parametrize(
    ("last_service", "ran", "behind"),
    [
        (0.9 * PREFETCH_BEHIND_SECONDS, 0.0, 1),  # ~1 ms tasks: one, never a queue of them
        (0.9 * PREFETCH_BEHIND_SECONDS, 0.5 * PREFETCH_BEHIND_SECONDS, 1),
        (0.9 * PREFETCH_BEHIND_SECONDS, 0.9 * PREFETCH_BEHIND_SECONDS, 2),  # (near its end)
        (0.3 * PREFETCH_BEHIND_SECONDS, 0.0, 3),
        (5 * PREFETCH_BEHIND_SECONDS, 0.0, 0),  # long tasks: none
        (5 * PREFETCH_BEHIND_SECONDS, 4.5 * PREFETCH_BEHIND_SECONDS, 1),  # (but its end is near)
        (0.4 * PREFETCH_BEHIND_SECONDS, 1.5 * PREFETCH_BEHIND_SECONDS, 0),  # one overran
        (
            0.9 * PREFETCH_BEHIND_SECONDS,
            1.8 * PREFETCH_BEHIND_SECONDS,
            2,
        ),  # (an overrun banks none)
        (5 * PREFETCH_BEHIND_SECONDS, 5.5 * PREFETCH_BEHIND_SECONDS, 1),
        (5 * PREFETCH_BEHIND_SECONDS, 6.5 * PREFETCH_BEHIND_SECONDS, 0),
    ],
)
def test_as_many_queue_behind_a_busy_worker_as_would_start_within_the_bound(
    clock: _Clock, last_service: float, ran: float, behind: int
) -> None:
    pool = _Pool(2)  # (the other worker idle: no queue to share out)
    scheduler = _scheduler(pool)
    slot = pool.slots[0]
    scheduler.queue(_item())
    slot.last_service = last_service
    slot.head_since = clock.now - ran
    queued = 0
    while queued < 8 and scheduler.can_prefetch(slot, _item(), clock.now):
        assert scheduler.assign(slot, _item())
        queued += 1
    assert queued == behind


@pytest.mark.parametrize(
    ("last_service", "held"),
    [(0.9 * PREFETCH_BEHIND_SECONDS, [5, 4]), (1.1 * PREFETCH_BEHIND_SECONDS, [1, 1])],
)
def test_behind_short_tasks_workers_hold_more_while_the_queue_is_long(
    clock: _Clock, last_service: float, held: list[int]
) -> None:
    # Many workers sharing few cores make each one's tasks look slow to the
    # parent: under a long queue, their pipes must not run dry between passes.
    # Not behind tasks of a millisecond or more: nothing to gain.
    pool = _Pool(2)
    scheduler = _scheduler(pool)
    for _ in range(2):
        scheduler.queue(_item())
    for slot in pool.slots:
        slot.last_service = last_service
        slot.head_since = clock.now
    items = [_item() for _ in range(2 * PREFETCH + 6)]
    for item in items:
        scheduler.queue(item)
    scheduler.dispatch_pending()
    assert [len(slot.assigned) for slot in pool.slots] == held
    assert list(scheduler.pending) == items[sum(held) - 2 :]


@pytest.mark.parametrize(
    ("cpus_count", "last", "ran", "held"),
    [
        (2, 5, 8, PREFETCH),
        (64, 5, 8, 1),
        (2, 20, 0, 1),  # (the slow tasks of an I/O-bound pool: as they are)
        (2, 5, 30, 1),  # (an overrun of more than 10 ms: as it is)
    ],
)
def test_with_more_workers_than_cpus_a_task_is_judged_by_its_share_of_one(
    clock: _Clock, cpus: _Cpus, cpus_count: int, last: float, ran: float, held: int
) -> None:
    # 64 workers on 2 CPUs: each waits for a CPU between its tasks, so from
    # here tiny tasks look like 5 ms ones, and one still running after 8 ms
    # looks overrun.  Judged by a 32nd of that, under a long queue its pipe
    # fills as behind tiny tasks (one write per task otherwise); with a CPU
    # for every worker, 5 ms tasks are 5 ms tasks.  Times past 10 ms are
    # taken as they are, whatever the share: nothing queues deep behind them.
    cpus.count = cpus_count
    pool = _Pool(64)
    scheduler = _scheduler(pool)
    slot = pool.slots[0]
    scheduler.queue(_item())
    slot.last_service = last * PREFETCH_BEHIND_SECONDS
    slot.head_since = clock.now - ran * PREFETCH_BEHIND_SECONDS
    for _ in range(PREFETCH * 65):  # a full pipe's worth for every worker, and more
        scheduler.pending.append(_item())
    while len(slot.assigned) < 2 * PREFETCH and scheduler.can_prefetch(
        slot, scheduler.pending.first(), clock.now
    ):
        assert scheduler.assign(slot, scheduler.pending.popleft())
    assert len(slot.assigned) == held


def test_answers_read_in_one_batch_share_its_time(clock: _Clock) -> None:
    # Four answers read at once, 4 ms after the first was sent: 1 ms each,
    # not 4 ms for the first and nothing for the others (which would queue
    # 16 more behind what are in fact 1 ms tasks).
    pool = _Pool(1)
    scheduler = _scheduler(pool)
    slot = pool.slots[0]
    slot.last_service = 0.0
    for _ in range(5):
        scheduler.queue(_item())
    scheduler.dispatch_pending()
    slot.head_since = clock.now - 4 * PREFETCH_BEHIND_SECONDS
    since = slot.head_since
    for _ in range(4):
        scheduler.complete(slot, clock.now)
    scheduler.booked(slot, since, clock.now, 4)
    assert slot.last_service == pytest.approx(PREFETCH_BEHIND_SECONDS)
    scheduler.complete(slot, clock.now + 0.5 * PREFETCH_BEHIND_SECONDS)  # one alone: its own
    assert slot.last_service == pytest.approx(0.5 * PREFETCH_BEHIND_SECONDS)


def test_nothing_queues_behind_a_long_task() -> None:
    pool = _Pool(1)
    scheduler = _scheduler(pool)
    scheduler.queue(_item())
    pool.slots[0].last_service = 5.0
    waiting = _item()
    scheduler.queue(waiting)
    scheduler.dispatch_pending()
    assert list(scheduler.pending) == [waiting]
    assert len(pool.slots[0].assigned) == 1


def test_a_type_at_its_cap_waits_while_other_types_pass_it() -> None:
    pool = _Pool(3, type_limits={"gpu": 1})
    scheduler = _scheduler(pool)
    gpu_a, gpu_b, cpu = _item("gpu"), _item("gpu"), _item("cpu")
    for item in (gpu_a, gpu_b, cpu):
        scheduler.queue(item)
    running = {item.task_id for slot in pool.slots for item in slot.assigned}
    assert running == {gpu_a.task_id, cpu.task_id}
    assert list(scheduler.pending) == [gpu_b]
    # gpu_a is answered: gpu_b may go now.
    holder = next(slot for slot in pool.slots if gpu_a in slot.assigned)
    scheduler.complete(holder, now=1.0)
    scheduler.dispatch_pending()
    assert not scheduler.pending
    assert any(gpu_b in slot.assigned for slot in pool.slots)


def test_a_cancelled_item_is_never_sent_and_a_queued_one_can_be_withdrawn() -> None:
    pool = _Pool(1)
    scheduler = _scheduler(pool)
    cancelled = _item()
    assert cancelled.future.cancel()
    scheduler.queue(cancelled)
    assert not pool.slots[0].assigned
    busy, queued = _item(), _item()
    scheduler.queue(busy)
    pool.slots[0].last_service = 1.0
    scheduler.queue(queued)
    assert scheduler.cancel_queued(queued.future) is queued
    assert scheduler.cancel_queued(queued.future) is None
    assert not scheduler.pending


def test_what_a_dead_worker_never_took_up_goes_back_to_the_front_in_order() -> None:
    pool = _Pool(1)
    scheduler = _scheduler(pool)
    slot = pool.slots[0]
    slot.last_service = 0.0
    slot.head_since = float("inf")
    held = [_item() for _ in range(3)]
    for item in held:
        scheduler.queue(item)
    later = _item()
    scheduler.pending.append(later)
    slot.process = None  # (it died: nothing is dispatched to it)
    scheduler.requeue_front(slot)
    assert list(scheduler.pending) == [*held, later]
    assert not slot.assigned and slot.queued_bytes == 0


def test_a_quarantined_callable_is_refused_and_its_queued_items_returned() -> None:
    pool = _Pool(1)
    scheduler = _scheduler(pool)
    scheduler.queue(_item(fn=len))
    pool.slots[0].last_service = 1.0
    doomed = [_item(fn=len) for _ in range(2)]
    other = _item(fn=abs)
    for item in (*doomed, other):
        scheduler.queue(item)
    assert scheduler.count_death(_item(fn=len)) == []
    assert scheduler.count_death(_item(fn=len)) == doomed
    assert list(scheduler.pending) == [other]
    refused = _item(fn=len)
    assert scheduler.refuse_quarantined(refused)
    assert isinstance(refused.future.exception(0), TaskQuarantinedError)
    assert not scheduler.refuse_quarantined(_item(fn=abs))


def test_max_tasks_per_child_retires_a_worker_with_its_last_item(clock: _Clock) -> None:
    pool = _Pool(1)
    pool.settings.max_tasks_per_child = 2
    scheduler = _scheduler(pool)
    scheduler.queue(_item())
    assert not pool.slots[0].retiring
    pool.slots[0].last_service = 0.0
    scheduler.queue(_item())
    scheduler.dispatch_pending()
    assert pool.slots[0].retiring and pool.slots[0].tasks_sent == 2
    scheduler.queue(_item())  # a retiring worker takes nothing more
    scheduler.dispatch_pending()
    assert len(pool.slots[0].assigned) == 2 and len(scheduler.pending) == 1


def _deadlines(pool: _Pool) -> Deadlines:
    return Deadlines(pool)  # type: ignore[arg-type]


def test_a_running_item_past_its_timeout_stops_its_worker() -> None:
    pool = _Pool(2)
    slot = pool.slots[0]
    slow = _item(timeout=2.0)
    slot.assigned.append(slow)
    slot.head_since = 10.0
    deadlines = _deadlines(pool)
    assert deadlines.check(now=11.5) == pytest.approx(0.5)
    assert not pool.stopped
    assert deadlines.check(now=12.0) == pytest.approx(KILL_GRACE_SECONDS)
    [(stopped_slot, item, error)] = pool.stopped
    assert (stopped_slot, item) == (slot, slow)
    assert isinstance(error, TaskTimeoutError) and "timeout of 2 s" in str(error)


def test_no_timeout_runs_before_the_worker_is_ready() -> None:
    pool = _Pool(1)
    slot = pool.slots[0]
    slot.ready = False
    slot.assigned.append(_item(timeout=1.0))
    slot.head_since = 0.0
    assert _deadlines(pool).check(now=100.0) == TAKE_UP_SECONDS  # (nothing sooner)
    assert not pool.stopped


def _one_stopped_worker(
    monkeypatch: pytest.MonkeyPatch, stopped: set[int], timeout: Optional[float] = None
) -> tuple[_Pool, _Process, WorkItem]:
    """A one-worker pool whose worker (pid 4242) holds one item since time 0,
    and is stopped while its pid is in ``stopped``."""
    from duckpool import _child

    pool = _Pool(1)
    slot = pool.slots[0]
    process = slot.process
    assert isinstance(process, _Process)
    process.pid = 4242  # type: ignore[assignment]
    monkeypatch.setattr(_child, "is_stopped", lambda pid: pid in stopped)
    item = _item(timeout=timeout)
    slot.assigned.append(item)
    slot.head_since = 0.0
    return pool, process, item


@pytest.mark.parametrize("taken_up", [False, True])
def test_a_stopped_worker_is_killed_if_it_never_took_up_its_first_item(
    monkeypatch: pytest.MonkeyPatch, taken_up: bool
) -> None:
    # Looked at TAKE_UP_SECONDS after the item became its head, before the
    # item's own (far) timeout; stopped mid-task, a worker is left alone.
    pool, process, item = _one_stopped_worker(monkeypatch, {4242}, timeout=60.0)
    if taken_up:
        pool.marks[0] = item.task_id
    deadlines = _deadlines(pool)
    assert deadlines.check(now=1.0) == pytest.approx(TAKE_UP_SECONDS - 1.0)
    assert process.signals == []
    deadlines.check(now=TAKE_UP_SECONDS)
    assert process.signals == ([] if taken_up else [signal.SIGKILL])


def test_once_the_pool_shuts_down_a_worker_stopped_mid_task_is_killed_at_the_second_look(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found stopped once, it may be about to resume (a process group given
    # SIGCONT); found stopped again TAKE_UP_SECONDS later, it is killed.
    stopped = {4242}
    pool, process, item = _one_stopped_worker(monkeypatch, stopped)
    slot = pool.slots[0]
    pool.marks[0] = item.task_id  # running
    deadlines = _deadlines(pool)
    deadlines.check(now=10.0)
    assert process.signals == []  # the pool runs: left alone
    pool.lifecycle.shutdown_requested = True
    deadlines.check(now=20.0)
    stopped.clear()  # resumed between two looks: the count starts again
    deadlines.check(now=20.0 + TAKE_UP_SECONDS)
    stopped.add(4242)
    deadlines.check(now=20.0 + 2 * TAKE_UP_SECONDS)
    assert process.signals == [] and not pool.condemned
    deadlines.check(now=20.0 + 3 * TAKE_UP_SECONDS)
    assert process.signals == [signal.SIGKILL]
    assert [(s, "found stopped" in what) for s, what in pool.condemned] == [(slot, True)]


def test_a_stopped_worker_gets_sigkill_after_its_grace() -> None:
    pool = _Pool(1)
    slot = pool.slots[0]
    item = _item(timeout=1.0)
    slot.assigned.append(item)
    slot.stopping = Stopping(item, TaskTimeoutError("late"), kill_at=5.0)
    deadlines = _deadlines(pool)
    assert deadlines.check(now=4.0) == pytest.approx(1.0)
    process = slot.process
    assert isinstance(process, _Process) and process.signals == []
    deadlines.check(now=5.0)
    assert process.signals == [signal.SIGKILL]


def test_an_assist_that_overstays_is_taken_back() -> None:
    pool = _Pool(1)
    slot = pool.slots[0]
    assist = slot.assist = Assist(None, until=1.0, spin=False)  # type: ignore[arg-type]
    deadlines = _deadlines(pool)
    remaining = deadlines.check(now=1.0)
    assert remaining is not None and remaining > 0 and not pool.ended_assists
    deadlines.check(now=1.0 + remaining)
    assert pool.ended_assists == [slot] and assist is slot.assist  # (the owner clears it)


def test_the_lifecycle_refuses_work_with_the_error_that_applies() -> None:
    lifecycle = Lifecycle()
    assert lifecycle.accepting and lifecycle.may_start_workers()
    assert lifecycle.state(started=False, running=False) == "idle"
    assert lifecycle.state(started=True, running=True) == "running"
    lifecycle.check_accepting()
    lifecycle.request_shutdown()
    assert not lifecycle.accepting
    assert lifecycle.state(started=True, running=True) == "shutting down"
    assert lifecycle.state(started=True, running=False) == "shut down"
    with pytest.raises(RuntimeError, match="after shutdown"):
        lifecycle.check_accepting()
    assert lifecycle.break_("starts keep failing", cause=None)
    assert not lifecycle.break_("a later reason", cause=None)
    assert lifecycle.broken == "starts keep failing"
    assert lifecycle.state(started=True, running=True) == "broken"
    assert not lifecycle.may_start_workers()
    with pytest.raises(BrokenProcessPool, match="starts keep failing"):
        lifecycle.check_accepting()
    crash = RuntimeError("bug")  # a failed dispatcher's reason replaces any earlier one
    lifecycle.dispatcher_failed("duckpool's dispatcher failed", crash)
    assert (lifecycle.broken, lifecycle.broken_cause) == ("duckpool's dispatcher failed", crash)
    lifecycle.forget_after_fork()
    assert lifecycle.state(started=True, running=True) == "inherited"
    with pytest.raises(InheritedManagerError):
        lifecycle.check_accepting()


def test_a_kill_keeps_its_first_reason_and_stops_worker_starts() -> None:
    lifecycle = Lifecycle()
    lifecycle.request_kill(signal.SIGTERM, "terminate_workers() was called")
    lifecycle.request_kill(signal.SIGKILL, "later")
    assert lifecycle.kill_requested == signal.SIGKILL
    assert lifecycle.kill_reason == "terminate_workers() was called"
    assert not lifecycle.may_start_workers()
    other = Lifecycle()
    other.on_initializer_error(ValueError("first"))
    other.on_initializer_error(ValueError("second"))
    assert str(other.initializer_error) == "first" and not other.may_start_workers()


def _ranked(priority: int, kind: Optional[str] = None) -> WorkItem:
    item = _item(kind)
    item.priority = priority
    return item


def test_the_queue_goes_by_priority_then_in_order() -> None:
    pending = Pending()
    assert not pending and len(pending) == 0 and list(pending) == []
    low, mid1, high, mid2, top = _ranked(-3), _ranked(0), _ranked(4), _ranked(0), _ranked(9)
    for item in (low, mid1, high, mid2, top):
        pending.append(item)
    assert len(pending) == 5 and list(pending) == [top, high, mid1, mid2, low]
    assert pending.first() is top and pending.popleft() is top
    back = _ranked(4)
    pending.appendleft(back)  # put back: first among its own priority
    assert list(pending) == [back, high, mid1, mid2, low]
    assert pending.pop_first(lambda item: item.priority == 0) is mid1
    assert pending.remove_where(lambda item: item.priority != 0) == [back, high, low]
    assert list(pending) == [mid2] and pending._ranks == [0]  # emptied levels dropped
    assert pending.take_all() == [mid2] and not pending
    with pytest.raises(IndexError):
        pending.popleft()
    assert pending.pop_first(lambda item: True) is None


def test_only_items_a_worker_could_start_count_as_startable() -> None:
    pool = _Pool(2, type_limits={"x": 1})
    scheduler = _scheduler(pool)
    scheduler.queue(_ranked(0, "x"))  # runs: "x" is at its cap
    scheduler.queue(_ranked(0, "y"))  # runs on the other worker
    capped, cancelled, free, also_free = _ranked(0, "x"), _item(), _item(), _item()
    for item in (capped, cancelled, free, also_free):
        scheduler.queue(item)
    assert cancelled.future.cancel()
    assert scheduler.startable(10) == 2 and scheduler.startable(1) == 1


def test_many_priorities_do_not_pile_up_in_the_queue() -> None:
    pending = Pending()
    for priority in range(1, 200):
        pending.append(_ranked(priority))
        pending.popleft()
    assert len(pending._ranks) <= 1


def test_a_busy_pool_hands_out_the_highest_priority_first() -> None:
    pool = _Pool(1)
    scheduler = _scheduler(pool)
    running, low, high = _ranked(0), _ranked(-1), _ranked(7)
    for item in (running, low, high):
        scheduler.queue(item)
    assert pool.transport.sent == {0: [running.task_id]}
    pool.slots[0].head_since = 0.0
    scheduler.complete(pool.slots[0], 1.0)
    scheduler.dispatch_pending()
    assert pool.transport.sent[0][-1] == high.task_id and list(scheduler.pending) == [low]


def test_type_limits_pass_over_a_capped_type_in_priority_order() -> None:
    pool = _Pool(2, type_limits={"x": 1})
    scheduler = _scheduler(pool)
    scheduler.queue(_ranked(0, "x"))  # runs on worker 0; "x" is now at its cap
    scheduler.queue(_ranked(0, "y"))  # runs on worker 1
    capped, other_low, other_high = _ranked(9, "x"), _ranked(-1, "y"), _ranked(3, "y")
    for item in (capped, other_low, other_high):
        scheduler.queue(item)
    assert list(scheduler.pending) == [capped, other_high, other_low]
    scheduler.complete(pool.slots[1], 1.0)
    scheduler.dispatch_pending()
    # Worker 1 takes the highest-priority item whose type has room.
    assert pool.transport.sent[1][-1] == other_high.task_id
    assert list(scheduler.pending) == [capped, other_low]


def test_an_idle_worker_gets_the_first_item_not_cancelled() -> None:
    # Cancelled items at the head of the queue: the idle worker must get the
    # live one behind them now, for nothing may wake the dispatcher again.
    pool = _Pool(1)
    scheduler = _scheduler(pool)
    cancelled = [_item() for _ in range(3)]
    live = _item()
    for item in cancelled:
        assert item.future.cancel()
    for item in [*cancelled, live]:
        scheduler.pending.append(item)
    scheduler.dispatch_pending()
    assert pool.transport.sent == {0: [live.task_id]}
    assert not scheduler.pending


def test_a_dropped_surplus_slot_gives_back_what_it_was_reserved_with() -> None:
    import multiprocessing

    from duckpool._core import PoolCore
    from duckpool._pool._settings import PoolSettings

    core = PoolCore(
        PoolSettings(
            max_workers=2,
            context=multiprocessing.get_context("spawn"),
            initializer=None,
            initargs=(),
            max_tasks_per_child=None,
            max_memory_per_child=None,
            name_prefix=None,
            daemon=True,
            serializer="pickle",
        )
    )
    try:
        # As right after the first submit: slot 1 reserved for a worker the
        # dispatcher has not asked for yet, its first item in its outbox.
        held = _item()
        with core.lock:
            core.launcher.reserve(core.slots[1])
            core.scheduler.send(core.slots[1], held)
            assert core.slots[1].outbox
            core.size = 1
            core.drop_surplus_slots()
            assert len(core.slots) == 1
            assert list(core.scheduler.pending) == [held]
    finally:
        core.request_shutdown(cancel_futures=True)
    # Its future already ran (it was sent): cancelled by shutdown, it fails
    # with TaskCancelledError rather than stay RUNNING for ever.
    assert isinstance(held.future.exception(0), TaskCancelledError)


def test_settling_a_settled_future_again_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    # Two paths may settle one future (a cancel_task() that failed it, then
    # kill_workers() failing what the worker held): the second is a no-op,
    # not the stdlib's CRITICAL "in unexpected state".
    from duckpool._futures import PoolFuture, set_exception, set_result

    future: PoolFuture[Any] = PoolFuture(_Pool(1))  # type: ignore[arg-type]
    set_exception(future, TaskCancelledError("first"))
    with caplog.at_level("DEBUG", logger="concurrent.futures"):
        set_exception(future, RuntimeError("second"))
        set_result(future, 3)
    assert not caplog.records
    assert str(future.exception(0)) == "first"


def test_a_worker_not_ready_in_time_is_killed_unless_it_runs_an_initializer() -> None:
    from duckpool._pool._deadlines import READY_SECONDS, START_CHECK_SECONDS

    pool = _Pool(1)
    slot = pool.slots[0]
    slot.ready = False
    slot.installed_at = 100.0
    process = slot.process
    assert isinstance(process, _Process)
    deadlines = _deadlines(pool)
    assert deadlines.check(now=100.5) == pytest.approx(START_CHECK_SECONDS - 0.5)
    assert deadlines.check(now=110.0) == pytest.approx(START_CHECK_SECONDS)  # looked again
    assert process.signals == []
    pool.settings.initializer = print  # a slow initializer is never cut short
    deadlines.check(now=100.0 + READY_SECONDS)
    assert process.signals == []
    assert slot.start_missed is None
    pool.settings.initializer = None
    deadlines.check(now=100.0 + READY_SECONDS)
    assert process.signals == [signal.SIGKILL]
    # Its death will count as a failed start, and say why.
    assert slot.start_missed == f"was not ready {READY_SECONDS:g} s after it started"


def test_only_a_known_exit_code_or_a_crash_signal_is_a_failed_start() -> None:
    from duckpool._pool._supervisor import self_inflicted

    assert self_inflicted(255) and self_inflicted(1)
    assert self_inflicted(-signal.SIGSEGV) and not self_inflicted(-signal.SIGKILL)
    # (None: unknown, as for a process the fork server started once it is gone.)
    assert not self_inflicted(0) and not self_inflicted(None)


def test_outside_kills_before_ready_break_the_pool_only_as_one_long_run() -> None:
    from duckpool._pool import _launcher

    def fresh() -> _launcher.Launcher:
        launcher = _launcher.Launcher.__new__(_launcher.Launcher)
        launcher.startup_deaths = launcher.unready_deaths = 0
        launcher.unready_since = None
        launcher.unready_last = 0.0
        launcher.retry_at = None
        return launcher

    limit, give_up = _launcher.MAX_KILLED_STARTS, _launcher.START_GIVE_UP_SECONDS
    # A run of kills lasting the give-up time breaks it once the count is reached...
    launcher = fresh()
    spread = give_up / (limit - 1)
    assert [launcher.on_unready_death(False, None, i * spread) for i in range(limit)] == [0] * (
        limit - 1
    ) + [limit]
    # ...each start after one backed off (doubling, at most a second)...
    assert launcher.retry_at is not None
    # ...but one old death does not make a later burst a long run (a start
    # no longer wanted after it, say, so no worker became ready since).
    launcher = fresh()
    assert launcher.on_unready_death(False, None, 0.0) == 0
    later = give_up + 1
    burst = [launcher.on_unready_death(False, None, later + i * 0.05) for i in range(limit + 5)]
    assert burst == [0] * (limit + 5)
    # Deaths of their own break it at the third, however quick.
    launcher = fresh()
    assert [launcher.on_unready_death(True, None, 0.0) for _ in range(3)] == [0, 0, 3]
