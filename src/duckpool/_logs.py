"""Log forwarding, the parent's side (the worker's is ``_worker_logs``).

A pool that forwards logs snapshots the parent's logger levels when it starts
its workers (:func:`level_snapshot`), for the workers to mirror, and hands
each record a worker sends to the parent's logger of the same name
(:func:`handle_forwarded`), from the thread that read it, with no lock held.
"""

from __future__ import annotations

import logging
import pickle
import sys
import traceback


def level_snapshot() -> dict[str, int]:
    """The levels workers mirror: the root's (key ``""``), and every logger's own."""
    levels = {"": logging.getLogger().getEffectiveLevel()}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def handle_forwarded(payload: memoryview) -> None:
    """Emit a record a worker sent, if the parent's logger of its name is enabled for it.

    Never raises: a failing handler is reported on stderr as logging itself
    does, so the thread that read the record (the dispatcher, or one waiting
    in ``result()``) goes on.
    """
    try:
        record = logging.makeLogRecord(pickle.loads(payload))
        logger = logging.getLogger(record.name)  # "root" is the root logger
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
    except Exception:
        if logging.raiseExceptions:
            try:
                sys.stderr.write("--- duckpool: could not handle a worker's log record ---\n")
                traceback.print_exc(file=sys.stderr)
            except Exception:
                pass
