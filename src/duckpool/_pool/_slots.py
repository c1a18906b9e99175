"""What a pool keeps per worker slot and per spare process.

A slot is a stable index (``marks`` cells, worker names) and the process that
fills it now.  Its fields are grouped by the owner that writes them (and
only that owner's module assigns them: ``tests/test_layers.py``): process
fields (``_launcher``), work fields (``_scheduler``), result fields
(``_results``), transport fields (``_transport``), ``stopping``
(``_supervisor``), ``assist`` and ``poisoned`` (``_assist``),
``start_missed`` (``_deadlines``) and ``successor`` (``_successors``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Protocol, Tuple

if TYPE_CHECKING:
    from multiprocessing import connection as mp_connection

    from duckpool import _buffers, _protocol, _zygote
    from duckpool._errors import WorkerDiedError
    from duckpool._futures import WorkItem


class WorkerProcess(Protocol):
    """A worker process as the pool handles it: a ``multiprocessing`` process,
    or a handle on one the zygote forked (``_zygote.ZygoteChild``)."""

    @property
    def pid(self) -> Optional[int]: ...
    @property
    def exitcode(self) -> Optional[int]: ...
    @property
    def sentinel(self) -> Optional[int]: ...
    def join(self, timeout: Optional[float] = None) -> None: ...
    def is_alive(self) -> bool: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...
    def close(self) -> None: ...


class ResultReady(NamedTuple):
    """The dispatcher's tag of a worker's result pipe."""

    slot: Slot


class WorkerExit(NamedTuple):
    """The dispatcher's tag of a worker's sentinel."""

    slot: Slot


class ZygoteTag(NamedTuple):
    """The tag of a zygote's descriptor in the dispatcher's waiter."""

    zygote: _zygote.Zygote
    #: "started" (its control socket: an answer), "notices" (worker exits),
    #: or "exit" (its own sentinel).
    event: str


#: A future to resolve from a result frame: the item, the status, the payload
#: (a pickle, or ``_buffers.Received``, or what decoding its buffers raised).
Resolution = Tuple["WorkItem", int, Any]


class Stopping(NamedTuple):
    """A worker being stopped because its running item overran or was cancelled."""

    item: WorkItem
    error: BaseException
    kill_at: float
    #: ``item`` answered all the same (its task caught the SIGTERM): that
    #: answer was dropped, and the item, out of ``assigned``, is settled as
    #: the stop's when the worker has exited.
    answered: bool = False


class Assist:
    """A caller thread watching a slot's result pipe in the dispatcher's stead."""

    __slots__ = ("conn", "orphaned", "spin", "until")

    def __init__(self, conn: mp_connection.Connection, until: float, spin: bool) -> None:
        self.conn = conn
        #: When the helper gives the pipe back (monotonic).  Past it and a
        #: grace, the dispatcher takes it back itself: an exception raised
        #: asynchronously in the helper (Ctrl-C) may have cut its clean-up.
        self.until = until
        #: The helper polls without sleeping at first (one per pool at a time).
        self.spin = spin
        #: The slot was closed meanwhile: the helper closes ``conn`` when done
        #: (not before, or its number could be reused under the helper's poll).
        self.orphaned = False


class Slot:
    """A worker slot: a stable index, and the process that currently fills it."""

    __slots__ = (
        "area",
        "area_offer",
        "assigned",
        "assist",
        "forked_threaded",
        "head_since",
        "index",
        "installed_at",
        "last_service",
        "launched_at",
        "outbox",
        "parked",
        "pipe_closed_at",
        "poisoned",
        "process",
        "queued_bytes",
        "read_lock",
        "reader",
        "ready",
        "releases_sent",
        "requested",
        "reserved",
        "result_conn",
        "results_copied",
        "retiring",
        "start_cpu",
        "start_missed",
        "stop_sent",
        "stopping",
        "successor",
        "task_conn",
        "tasks_done",
        "tasks_sent",
        "used",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Optional[WorkerProcess] = None
        self.task_conn: Optional[mp_connection.Connection] = None
        self.result_conn: Optional[mp_connection.Connection] = None
        self.reader: Optional[_protocol.FrameReader] = None
        #: The worker's shared area for large buffers, once mapped (see _buffers).
        self.area: Optional[_buffers.Area] = None
        #: The area the worker offered, for the dispatcher to map (see _book_results).
        self.area_offer: Optional[bytes] = None
        #: Result frames whose buffers were copied out of the area, and the
        #: count the worker was last told in a release frame (-1: none yet;
        #: the first one tells it the area is mapped).
        self.results_copied = 0
        self.releases_sent = 0
        #: Items sent to the current process whose results have not arrived, in order.
        self.assigned: deque[WorkItem] = deque()
        self.queued_bytes = 0
        #: What a write to the task pipe left unwritten (the pipe was full), in
        #: order; the dispatcher writes it as the worker reads.
        self.outbox: deque[memoryview] = deque()
        self.tasks_sent = 0
        #: Results the current process has sent back.
        self.tasks_done = 0
        #: A process has filled this slot before (the next one is a restart).
        self.used = False
        #: Its first process is being started by the dispatcher: it takes an
        #: item already, which waits in the outbox until the process is up.
        self.reserved = False
        #: The zygote was asked for its next process; the answer is due.
        self.requested = False
        #: An elastic pool wants no worker here until work comes (``_elastic``);
        #: kept when the slot's process is gone.
        self.parked = False
        #: Reached max_tasks_per_child: to exit once its items are done.
        self.retiring = False
        #: The empty frame that tells the worker to exit has been written.
        self.stop_sent = False
        #: The worker said it is ready (its initializer ran).
        self.ready = False
        #: When the head of ``assigned`` became the worker's current task.
        self.head_since = 0.0
        #: How long the worker's last task took, as seen from here.
        self.last_service = float("inf")
        #: When its worker was started (``time.monotonic()``), until it is ready.
        self.launched_at: Optional[float] = None
        #: When its worker was installed here (``time.monotonic()``), until it
        #: is ready: the start-up watch counts from it (``Deadlines``).
        self.installed_at: Optional[float] = None
        self.stopping: Optional[Stopping] = None
        #: Held while frames are read from the result pipe and booked, so the
        #: dispatcher and a helping caller take them in order.
        self.read_lock = threading.Lock()
        #: A caller thread reading the result pipe itself (``Assists.help_resolve``).
        self.assist: Optional[Assist] = None
        #: Why the worker is being killed because its result stream is not to
        #: be trusted (``Assists.poison``).
        self.poisoned: Optional[WorkerDiedError] = None
        #: When its result pipe read as closed while the process had not yet
        #: exited (``Results``): it should be on its way out (``Deadlines``).
        self.pipe_closed_at: Optional[float] = None
        #: Why the start-up watch killed the worker before it was ready
        #: (``Deadlines``): its death counts as a failed start.
        self.start_missed: Optional[str] = None
        #: Its process was forked while other threads of this process ran
        #: (``Launcher.launch``): it may have inherited a lock one of them held.
        self.forked_threaded = False
        #: The CPU time its process had used when the start-up watch last
        #: looked at it, not yet ready (``Deadlines``; clock ticks).
        self.start_cpu: Optional[int] = None
        #: A process started ahead of time to take this slot when its worker
        #: leaves (``Successors.start_due``); not a worker until then.
        self.successor: Optional[Spare] = None

    @property
    def alive(self) -> bool:
        return self.process is not None

    def reset(self) -> None:
        self.process = None
        self.task_conn = self.result_conn = None
        self.reader = None
        self.area = None
        self.area_offer = None
        self.results_copied = self.releases_sent = 0
        self.queued_bytes = 0
        self.outbox.clear()
        self.tasks_sent = 0
        self.tasks_done = 0
        self.retiring = False
        self.stop_sent = False
        self.ready = False
        self.last_service = float("inf")
        self.launched_at = None
        self.installed_at = None
        self.stopping = None
        self.poisoned = None
        self.pipe_closed_at = None
        self.start_missed = None
        self.forked_threaded = False
        self.start_cpu = None
        self.requested = False  # an answer still due is unwanted now


class Spare:
    """A worker process that fills no slot: a successor started ahead of time
    for ``slot``, or one being let go (its successor role ended unused).

    Nothing reads its result pipe and nothing is written to its task pipe
    but the stop frame: it takes no task, so it never writes the shared marks.
    Its frames (ready, initializer failure, log records) wait in its pipe for
    the slot's reader once it takes the slot.
    """

    __slots__ = ("launched_at", "process", "result_conn", "slot", "task_conn")

    def __init__(
        self,
        slot: Slot,
        process: WorkerProcess,
        task_conn: mp_connection.Connection,
        result_conn: mp_connection.Connection,
    ) -> None:
        self.slot = slot
        self.process = process
        self.launched_at = time.monotonic()
        self.task_conn = task_conn
        self.result_conn = result_conn
