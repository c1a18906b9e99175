"""Functions the worker-log and progress tests run in worker processes."""

from __future__ import annotations

import logging
import os
import threading
import warnings
from typing import Any

#: The logger the worker-log tests use (the parent attaches its handler here).
LOGGER = "duckpool_tests.worker"


def log(level: int, message: str, *args: Any) -> int:
    """Log one record on ``LOGGER``; return this worker's pid."""
    logging.getLogger(LOGGER).log(level, message, *args)
    return os.getpid()


def log_levels_then_marker() -> int:
    """Log one record per level, then a WARNING "marker" (the test waits for it)."""
    logger = logging.getLogger(LOGGER)
    logger.debug("debug record")
    logger.info("info record")
    logger.warning("marker")
    return os.getpid()


def log_exception() -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logging.getLogger(LOGGER).exception("it failed")


def log_from_threads(threads: int, records: int, size: int) -> int:
    """Log ``records`` large records from each of ``threads`` threads at once."""
    logger = logging.getLogger(LOGGER)
    start = threading.Barrier(threads)

    def run(index: int) -> None:
        start.wait()
        for n in range(records):
            logger.warning("thread %d record %d %s", index, n, "x" * size)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return os.getpid()


def log_from_threads_while_returning(threads: int, records: int, size: int) -> bytes:
    """Return a large result while ``threads`` threads log large records."""
    logger = logging.getLogger(LOGGER)
    start = threading.Barrier(threads + 1)

    def run(index: int) -> None:
        start.wait()
        for n in range(records):
            logger.warning("thread %d record %d %s", index, n, "x" * size)

    for i in range(threads):
        threading.Thread(target=run, args=(i,), daemon=True).start()
    start.wait()
    return b"r" * (16 * size)


def log_unpicklable_extra() -> None:
    logging.getLogger(LOGGER).warning("with a lock", extra={"lock": threading.Lock()})


def _raise(kind: str) -> None:
    raise {"exit": SystemExit(3), "interrupt": KeyboardInterrupt()}[kind]


class RaisesWhenUnpickled:
    """Pickles fine; unpickling it raises ``SystemExit`` or ``KeyboardInterrupt``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __reduce__(self) -> tuple[Any, ...]:
        return (_raise, (self.kind,))


def log_extra_raising_when_unpickled(kind: str) -> int:
    logging.getLogger(LOGGER).warning("hostile", extra={"evil": RaisesWhenUnpickled(kind)})
    logging.getLogger(LOGGER).warning("after the hostile one")
    return 7


def forwarder_installed() -> bool:
    """Does this worker's root logger forward records to the parent?"""
    return any(type(h).__name__ == "LogForwarder" for h in logging.getLogger().handlers)


def log_to_own_handler_too(message: str) -> list[str]:
    """Add a handler of the task's own to ``LOGGER``, log ``message``; what it saw."""

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.NOTSET)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    try:
        logger.warning(message)
    finally:
        logger.removeHandler(handler)
    return handler.messages


def log_in_forked_child(message: str) -> int:
    """Fork a child that logs ``message`` and exits; return the child's pid."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # forking a threaded worker
        pid = os.fork()
    if pid == 0:
        try:
            logging.getLogger(LOGGER).warning(message)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return pid


def print_and_log(text: str) -> int:
    print(text, flush=True)
    logging.getLogger(LOGGER).warning("logged %s", text)
    return os.getpid()


def fail_on(value: int, bad: int) -> int:
    if value == bad:
        raise ValueError(f"bad value {value}")
    return value


def log_from_the_collector_while_the_result_is_written() -> str:
    """Arrange that the garbage collector logs once, from inside the worker's
    own write of this task's result (as a finalizer that logs would); return."""
    import gc
    import sys

    logging.getLogger(LOGGER).info("forwarding is on")  # (installed at the first record)
    thresholds = gc.get_threshold()

    def on_collection(phase: str, info: dict[str, Any]) -> None:
        frame: Any = sys._getframe()
        while frame is not None and frame.f_code.co_name != "write_all":
            frame = frame.f_back
        if frame is not None and phase == "start":  # inside a write
            gc.callbacks.remove(on_collection)
            gc.set_threshold(*thresholds)
            logging.getLogger(LOGGER).warning("logged while the result was written")

    gc.callbacks.append(on_collection)
    gc.set_threshold(1)  # a collection at nearly every allocation from here
    return "written"
