"""``duckpool bench``: duckpool's executor side by side with its peers.

Every number is reported as a ratio to the standard library's
``concurrent.futures.ProcessPoolExecutor`` measured in the same run::

    parent: _cli.main -> _runner._run_plan       child: python -c _CHILD_CODE --child
    ---------------------------------------      -------------------------------------------
    for start method in --start-method:          _cli.main -> _runner._child_main
      for rep in 1..K:                           warm-pool metric (most of them):
        for metric in --metrics:                   open ONE fresh pool of ONE library
          for lib in --libs (rotated by rep): -->  warm it: every worker seen, one round done
            start child in its own session         run ONE metric, write its values (JSON file)
            wait up to --timeout; then kill the    shut the pool down, write the file again
            whole process group -> cell failed   own-pool metric (startup, import, recycle,
    per cell: median, min-max of the reps;       scaling): the metric opens (or never opens)
    ratio = lib median / stdlib median             its pools itself, through a _PoolOpener
    -> one table per start method (or --markdown) on stdout, --json FILE, --plot FILE.png;
       progress on stderr (one updating line on a terminal)

Reps are interleaved (rep 1 of every library, then rep 2, ...) and the order of
the libraries rotates each rep, so a slow minute of the machine or the position
in the sequence does not land on one library only.

One concern per module; at import time they import each other one way only,
``_cli`` -> ``_runner`` -> ``_report`` -> ``_plan``, ``_metrics`` -> ``_adapters``::

    _cli       the options, one _Plan per table; main() of the parent and of a child
    _runner    the children (command, environment, deadline kill), progress, summary
    _report    number formats, tables, header, the JSON document, the plot
    _plan      _Plan: what one table measures, decided before anything starts
    _metrics   Quantity, Metric, the _measure_* functions, METRICS
    _adapters  one pool of one library behind one interface, LIBRARIES, warm-up
    _tasks     what the workers run, imported by name in every library's workers
    _dask      ``duckpool bench --backend dask``: DaskExecutor against plain Dask

Adding a metric: write ``_measure_<name>(pool, size, deadline) -> {key: value}``
in ``_metrics`` and register a ``Metric`` for it in ``METRICS``; each of its
``Quantity`` entries becomes one row of the table.  ``pool`` is a warmed pool of
the library under test; a metric that must open its own pools (or none:
start-up time, import time) registers its function as ``measure_own_pools=``
instead, and receives a ``_PoolOpener``.  A metric that cannot apply to a
library raises ``_NotApplicable`` (the cell shows ``-``, not a failure); when
that is known beforehand, the library's ``not_applicable`` says so and no child
is started.  Adding a library: write ``_open_<name>(options) -> _PoolAdapter``
in ``_adapters`` and register a ``_Library`` in ``LIBRARIES``.

A child runs the harness through ``python -c``, not ``-m``: a spawned or
forkserver worker re-imports its parent's ``__main__`` when that is a module
or a file, and every library's workers would then carry the harness in their
start-up time and memory.  They import the task module, ``_bench._tasks``,
anyway, and with it this package: hence this file imports nothing and
:func:`main` imports the harness only when called.  Inside the harness the
top-level imports stay minimal all the same; everything else is imported where
it is used.
"""

from __future__ import annotations

# Not typing's TYPE_CHECKING: every worker that imports _tasks runs this file.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

__all__ = ["main"]


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``duckpool bench`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    0 when every measurement completed, 1 when any failed or timed out, 2 on
    bad options, 130 when interrupted: see :func:`duckpool._bench._cli.main`.
    """
    from duckpool._bench._cli import main as run_bench

    return run_bench(argv)
