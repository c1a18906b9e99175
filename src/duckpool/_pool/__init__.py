"""The pool engine's owners, each with its own state (``_core.PoolCore`` is the facade).

``_core.PoolCore`` holds the lock, the lifecycle, the slots and the data-flow
diagram; every concern of running a pool lives here, one module each, and
only that module assigns its fields (``tests/test_layers.py`` checks it):

* ``_scheduler``: the queue, and which worker gets which item when;
* ``_transport``: frames down the task pipes, outboxes, shared areas;
* ``_results``: result frames read and booked, futures resolved;
* ``_assist``: a caller waiting on a quiet pool reads its result itself;
* ``_launcher``: worker starts (directly, by the zygote or its standby, or
  spawned when neither is left), and the start-failure policy;
* ``_supervisor``: worker exits and deaths, cancel, stop, kill, breakage;
* ``_successors``: with ``max_tasks_per_child``, each slot's next worker early;
* ``_deadlines``: task timeouts, kill graces, assist windows;
* ``_dispatcher``: the thread that waits on all of it, and its wakeup pipe;
* ``_lifecycle``: whether the pool takes work, may start workers, and why not;
* ``_slots``, ``_quarantine``, ``_counters``, ``_waiter``, ``_wakeup``,
  ``_settings``: the per-slot records (and the dispatcher's tags), death
  streaks per callable, what ``stats()`` counts, what the dispatcher sleeps
  on (epoll, else selectors) and the pipe that wakes it, the pool's settings;
* ``_snapshot``: ``stats()``, read from all of the above.

Imports go one way, for the type checker too: ``_core`` imports the owners;
an owner names the pool and its siblings only through the protocols of
``_view`` (``Core``, ``SchedulerView``, ...), which import only the leaves.

Locking: one lock per pool.  Entry points (the facade, the dispatcher's pass,
an assisting caller) take it; an owner's method expects it held unless its
module says it takes it itself.
"""
