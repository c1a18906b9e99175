"""Log forwarding, the worker's side: records logged in a worker go to the parent.

Imported by a worker when its pool forwards logs: under fork at the first
record a task logs (``_worker.forward_logs_from_first_record``), under spawn
and forkserver once ``logging`` itself is imported (at start if it already
is, else when a task or the initializer first imports it: a worker that never
logs never pays for it; ``_worker._forward_logs``).
The worker's loggers get one handler, :class:`LogForwarder`, in place of the
handlers they had (under ``fork`` those are the parent's, inherited: left in
place they would write a second copy of every record, and under ``spawn``
there are none).  It sends each record, made picklable as
``logging.handlers.QueueHandler.prepare`` does, as a ``STATUS_LOG`` frame on
the result pipe; the parent hands it to its own logger of the same name
(``_logs.handle_forwarded``), whose level and handlers decide what happens.
The worker's logger levels mirror the parent's as they were when the pool
started, so records the parent would drop are mostly not sent at all.

A process forked from a worker (a task that forks) must not write to the
worker's result pipe: there the forwarder is removed again, leaving logging
unconfigured (warnings and worse go to stderr).  One forked before the
forwarder was installed keeps the handlers it inherited.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys

from duckpool._protocol import STATUS_LOG, encode_result

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not imported in a worker at run time
    from typing import Any, Callable, Collection, Optional, Protocol

    class WorkerConfig(Protocol):
        """What this module reads of the worker's ``_worker.WorkerConfig``
        (named here, not imported: the worker loop imports this module)."""

        pool_id: Any
        slot: int
        name: str
        log_levels: Optional[dict[str, int]]


#: Attribute values sent as they are when a record's attributes fail to pickle
#: as a whole; others are sent as their repr().
_PLAIN = (str, int, float, bool, type(None))

_formatter = logging.Formatter()


class LogForwarder(logging.Handler):
    """Sends every record it handles to the parent as a ``STATUS_LOG`` frame.

    Tags each record with ``duckpool_pool``, ``duckpool_slot`` and
    ``duckpool_task_id`` (``record.process`` is the worker's pid already);
    ``task_id`` says which task is running (0 between tasks).
    """

    def __init__(
        self,
        send: Callable[[bytes], None],
        task_id: Callable[[], int],
        pool_id: Any,
        slot: int,
        name: str = "",
    ) -> None:
        super().__init__(logging.NOTSET)
        self._send = send
        self._task_id = task_id
        self._pool_id = pool_id
        self._slot = slot
        self._name = name

    def emit(self, record: logging.LogRecord) -> None:
        attributes = record.__dict__
        if "duckpool_slot" in attributes:
            # Sent already: the same handler sits on several loggers of the
            # record's chain (the parent then propagates it as usual).
            return
        task_id = self._task_id()
        attributes["duckpool_pool"] = self._pool_id
        attributes["duckpool_slot"] = self._slot
        attributes["duckpool_task_id"] = task_id
        if (
            self._name
            and attributes.get("processName") == "MainProcess"
            and "multiprocessing" not in sys.modules
        ):
            # A spawned worker that has not imported multiprocessing (see
            # _spawned): logging names every process MainProcess then.
            attributes["processName"] = self._name
        try:
            frame = encode_result(task_id, STATUS_LOG, dump_record(record))
            self._send(frame)
        except OSError:
            pass  # the parent is gone, or closed the pipe: nobody to tell
        except Exception:
            self.handleError(record)


def dump_record(record: logging.LogRecord) -> bytes:
    """Pickle a record's attributes, as ``QueueHandler.prepare`` makes it picklable.

    The message is merged with its arguments, the exception becomes its
    traceback text (``exc_text``, which the parent's formatters print), and
    an attribute that does not pickle is replaced by its repr().
    """
    state = dict(record.__dict__)
    state["msg"] = record.getMessage()
    state["args"] = None
    state.pop("message", None)  # a formatter's copy of msg
    if record.exc_info:
        state["exc_text"] = record.exc_text or _formatter.formatException(record.exc_info)
    state["exc_info"] = None
    try:
        return pickle.dumps(state, pickle.HIGHEST_PROTOCOL)
    except Exception:
        plain = {k: v if isinstance(v, _PLAIN) else repr(v) for k, v in state.items()}
        return pickle.dumps(plain, pickle.HIGHEST_PROTOCOL)


#: The installed forwarder and the loggers it sits on (for a forked child).
_installed: Optional[tuple[LogForwarder, list[logging.Logger]]] = None


def install(
    send: Callable[[bytes], None],
    config: WorkerConfig,
    task_id: Callable[[], int],
    inherited: Optional[Collection[logging.Handler]] = None,
) -> None:
    """Route this worker's logging to the parent through ``send``; ``task_id``
    gives the id of the task running (``_worker.running_task_id``).

    The root logger, and every logger that has handlers of its own, get the
    forwarder instead of their handlers; logger levels are set as
    ``config.log_levels`` says.  Inherited handlers are dropped, not closed:
    closing would flush what the parent had buffered a second time.

    ``inherited`` is given when a forked worker installs forwarding only once
    a task logs (``_worker.forward_logs_from_first_record``): then only those
    handlers, the ones the worker started with, are replaced (a handler the
    task added itself stays), and the levels, inherited too, are left as the
    task may have set them.
    """
    global _installed
    forwarder = LogForwarder(send, task_id, config.pool_id, config.slot, config.name)
    root = logging.getLogger()
    loggers: list[logging.Logger] = [root]
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and _replaces_some(logger.handlers, inherited):
            loggers.append(logger)
    for logger in loggers:
        for handler in list(logger.handlers):
            if inherited is None or handler in inherited:
                logger.removeHandler(handler)
        logger.addHandler(forwarder)
    if inherited is None:
        for name, level in (config.log_levels or {}).items():
            (logging.getLogger(name) if name else root).setLevel(level)
    _installed = (forwarder, loggers)
    os.register_at_fork(after_in_child=_uninstall)


def _replaces_some(
    handlers: list[logging.Handler], inherited: Optional[Collection[logging.Handler]]
) -> bool:
    if inherited is None:
        return bool(handlers)
    return any(handler in inherited for handler in handlers)


def _uninstall() -> None:
    """In a process forked from a worker: stop writing to the worker's pipe."""
    global _installed
    if _installed is None:
        return
    forwarder, loggers = _installed
    _installed = None
    for logger in loggers:
        logger.removeHandler(forwarder)
