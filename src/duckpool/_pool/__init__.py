"""The pool engine's owners, each with its own state (see ``_core`` for the facade).

``_core.PoolCore`` holds the lock, the lifecycle and the data-flow diagram;
the concerns carved out of it so far live here, one module each:

* ``_slots``: the records a pool keeps per worker slot and per spare process;
* ``_launcher``: how workers are started (directly, by the zygote or its
  standby, or spawned when neither is left), and the start-failure policy;
* ``_supervisor``: worker exits and deaths, stopping, killing and reaping;
* ``_quarantine``: death streaks per callable, and the callables refused;
* ``_waiter``: what the dispatcher sleeps on (epoll, else selectors).

Locking: an owner's methods say whether they expect the pool's lock held;
only entry points (the facade, the dispatcher, an assisting caller) take it.
"""
