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


def handle_forwarded(payload: memoryview, in_dispatcher: bool = True) -> None:
    """Emit a record a worker sent, if the parent's logger of its name is enabled for it.

    Never raises in the dispatcher thread (``in_dispatcher``): a record that
    cannot be rebuilt (a hostile ``extra`` whose unpickling raises anything,
    ``SystemExit`` included) or a failing handler is reported on stderr, as
    logging itself does, and the thread goes on.  In a thread waiting in
    ``result()``, an exception that is not the record's (Ctrl-C arriving
    meanwhile, or a handler's ``BaseException``) is that thread's to raise.
    """
    try:
        record = logging.makeLogRecord(pickle.loads(payload))
        logger = logging.getLogger(record.name)  # "root" is the root logger
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
    except BaseException as exc:
        if not in_dispatcher and not isinstance(exc, Exception) and _unpickles(payload):
            raise
        if logging.raiseExceptions:
            try:
                sys.stderr.write("--- duckpool: could not handle a worker's log record ---\n")
                traceback.print_exc(file=sys.stderr)
            except Exception:
                pass


def _unpickles(payload: memoryview) -> bool:
    """Does a record's payload unpickle?  (Asked once handling it raised.)"""
    try:
        pickle.loads(payload)
    except BaseException:
        return False
    return True
