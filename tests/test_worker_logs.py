"""Worker logs: what tasks log reaches the parent's loggers, under every start method."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

import _executor_tasks
import _log_tasks as tasks
import duckpool
from conftest import wait_until

TIMEOUT = 30


class ListHandler(logging.Handler):
    """Collects the records it handles."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in list(self.records)]

    def wait_for(self, message: str) -> logging.LogRecord:
        """The first record with ``message``, waiting for it."""
        wait_until(lambda: message in self.messages(), TIMEOUT)
        return next(r for r in list(self.records) if r.getMessage() == message)


@pytest.fixture
def collected() -> Iterator[ListHandler]:
    """A handler on the tests' logger in this process, which is set to DEBUG.

    Set up before any pool starts: a pool's workers mirror the levels of the
    moment it starts them.
    """
    logger = logging.getLogger(tasks.LOGGER)
    handler = ListHandler()
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield handler
    logger.removeHandler(handler)
    logger.level, logger.propagate = saved


def test_record_reaches_the_parent_tagged_with_pool_slot_and_task(
    ctx: object, collected: ListHandler
) -> None:
    with duckpool.ProcessPoolExecutor(
        2,
        mp_context=ctx,  # type: ignore[arg-type]
        pool_id="logs-pool",
    ) as pool:
        first_pid = pool.submit(tasks.log, logging.INFO, "first %s", "record").result(TIMEOUT)
        second_pid = pool.submit(tasks.log, logging.INFO, "second").result(TIMEOUT)
        first = collected.wait_for("first record")
        second = collected.wait_for("second")
        slots = pool.worker_pids()
    assert first.name == tasks.LOGGER and first.levelno == logging.INFO
    assert first.process == first_pid != os.getpid()
    assert second.process == second_pid
    for record in (first, second):
        assert record.duckpool_pool == "logs-pool"  # type: ignore[attr-defined]
        assert slots[record.duckpool_slot] == record.process  # type: ignore[attr-defined]
        # The worker's name, whether or not the worker imported multiprocessing.
        assert record.processName == f"duckpool-worker-{record.duckpool_slot}"  # type: ignore[attr-defined]
    first_task = first.duckpool_task_id  # type: ignore[attr-defined]
    second_task = second.duckpool_task_id  # type: ignore[attr-defined]
    assert isinstance(first_task, int) and 0 < first_task < second_task


def test_bare_executor_records_carry_no_pool_id(ctx: object, collected: ListHandler) -> None:
    with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # type: ignore[arg-type]
        pool.submit(tasks.log, logging.INFO, "untagged").result(TIMEOUT)
        record = collected.wait_for("untagged")
    assert record.duckpool_pool is None  # type: ignore[attr-defined]
    assert record.duckpool_slot == 0  # type: ignore[attr-defined]


def test_manager_tags_records_with_its_id(ctx: object, collected: ListHandler) -> None:
    manager = duckpool.get_or_create_process_manager("logs-manager")
    manager.start(max_workers=1, mp_context=ctx)  # type: ignore[arg-type]
    try:
        manager.submit_task(tasks.log, logging.INFO, "from the manager").result(TIMEOUT)
        record = collected.wait_for("from the manager")
    finally:
        manager.stop(wait=True)
    assert record.duckpool_pool == "logs-manager"  # type: ignore[attr-defined]


def test_record_is_handled_before_its_task_future_resolves(
    ctx: object, collected: ListHandler
) -> None:
    seen_at_resolution: list[list[str]] = []
    with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # type: ignore[arg-type]
        for n in range(5):
            future = pool.submit(tasks.log, logging.INFO, "record %d", n)
            future.add_done_callback(lambda _: seen_at_resolution.append(collected.messages()))
            future.result(TIMEOUT)
        wait_until(lambda: len(seen_at_resolution) == 5, TIMEOUT)
    for n, seen in enumerate(seen_at_resolution):
        assert f"record {n}" in seen


def test_a_record_logged_inside_the_worker_s_own_write_is_sent_after_it(
    ctx: object, collected: ListHandler
) -> None:
    # A finalizer (here: a collector callback) may log while the worker's
    # main thread is writing a frame: the record waits for the end of that
    # write, instead of waiting for ever on the write's lock.
    with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # type: ignore[arg-type]
        task = tasks.log_from_the_collector_while_the_result_is_written
        assert pool.submit(task).result(TIMEOUT) == "written"
        collected.wait_for("logged while the result was written")
        assert pool.submit(tasks.log, logging.INFO, "after").result(TIMEOUT)
        collected.wait_for("after")


def test_exception_text_arrives(ctx: object, collected: ListHandler) -> None:
    with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # type: ignore[arg-type]
        pool.submit(tasks.log_exception).result(TIMEOUT)
        record = collected.wait_for("it failed")
    assert record.levelno == logging.ERROR
    assert record.exc_info is None
    assert record.exc_text is not None
    assert "Traceback (most recent call last)" in record.exc_text
    assert "ZeroDivisionError: division by zero" in record.exc_text
    formatted = logging.Formatter("%(levelname)s %(message)s").format(record)
    assert formatted.startswith("ERROR it failed\nTraceback")
    assert "ZeroDivisionError" in formatted


def test_records_below_the_parent_logger_level_are_not_forwarded(
    ctx: object, collected: ListHandler
) -> None:
    logging.getLogger(tasks.LOGGER).setLevel(logging.WARNING)
    with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # type: ignore[arg-type]
        pool.submit(tasks.log_levels_then_marker).result(TIMEOUT)
        collected.wait_for("marker")  # records of one thread arrive in order
    assert collected.messages() == ["marker"]


def test_parent_level_raised_after_start_still_filters(ctx: object, collected: ListHandler) -> None:
    with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # type: ignore[arg-type]
        pool.submit(tasks.log, logging.DEBUG, "started").result(TIMEOUT)
        collected.wait_for("started")
        logging.getLogger(tasks.LOGGER).setLevel(logging.WARNING)
        pool.submit(tasks.log_levels_then_marker).result(TIMEOUT)
        collected.wait_for("marker")
    assert collected.messages() == ["started", "marker"]


def test_worker_keeps_the_levels_of_pool_start(ctx: object, collected: ListHandler) -> None:
    # Records the parent would have dropped when the pool started are not
    # even sent: the worker's loggers have those levels.
    logging.getLogger(tasks.LOGGER).setLevel(logging.WARNING)
    with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # type: ignore[arg-type]
        pool.submit(tasks.log, logging.WARNING, "started").result(TIMEOUT)
        collected.wait_for("started")
        logging.getLogger(tasks.LOGGER).setLevel(logging.DEBUG)
        pool.submit(tasks.log_levels_then_marker).result(TIMEOUT)
        collected.wait_for("marker")
    assert collected.messages() == ["started", "marker"]


def test_worker_mirrors_the_parent_logger_levels(ctx: object, collected: ListHandler) -> None:
    # The parent's logger is at DEBUG: under spawn a worker's would be at the
    # root's default WARNING, and drop these, if it did not mirror the parent.
    with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # type: ignore[arg-type]
        pool.submit(tasks.log_levels_then_marker).result(TIMEOUT)
        collected.wait_for("marker")
    assert collected.messages() == ["debug record", "info record", "marker"]


def test_no_second_copy_from_inherited_handlers(
    ctx: object, collected: ListHandler, tmp_path: Path
) -> None:
    # Under fork the worker inherits this file handler: if it kept it, the
    # worker would write the record there itself, besides forwarding it.
    path = tmp_path / "worker.log"
    file_handler = logging.FileHandler(path)
    logger = logging.getLogger(tasks.LOGGER)
    logger.addHandler(file_handler)
    try:
        with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # type: ignore[arg-type]
            pool.submit(tasks.log, logging.WARNING, "written once").result(TIMEOUT)
            collected.wait_for("written once")
    finally:
        logger.removeHandler(file_handler)
        file_handler.close()
    assert path.read_text().splitlines() == ["written once"]
    assert collected.messages() == ["written once"]


def test_threads_of_a_task_log_concurrently(ctx: object, collected: ListHandler) -> None:
    threads, records, size = 4, 5, 10_000
    with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # type: ignore[arg-type]
        pool.submit(tasks.log_from_threads, threads, records, size).result(TIMEOUT)
        wait_until(lambda: len(collected.records) == threads * records, TIMEOUT)
        assert pool.submit(_executor_tasks.add, 1, 2).result(TIMEOUT) == 3
    expected = {
        f"thread {t} record {n} {'x' * size}" for t in range(threads) for n in range(records)
    }
    assert set(collected.messages()) == expected
    assert len({r.duckpool_task_id for r in collected.records}) == 1  # type: ignore[attr-defined]


def test_records_and_a_result_written_at_once_stay_whole(
    ctx: object, collected: ListHandler
) -> None:
    # Frames far larger than a pipe's atomic write, from the task's threads
    # and its main thread at once: without the worker's write lock the
    # result's bytes would interleave with the records'.
    threads, records, size = 3, 20, 100_000
    with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # type: ignore[arg-type]
        for _ in range(3):
            collected.records.clear()
            future = pool.submit(tasks.log_from_threads_while_returning, threads, records, size)
            assert future.result(TIMEOUT) == b"r" * (16 * size)
            wait_until(lambda: len(collected.records) == threads * records, TIMEOUT)
        assert pool.submit(_executor_tasks.add, 1, 2).result(TIMEOUT) == 3
    expected = {
        f"thread {t} record {n} {'x' * size}" for t in range(threads) for n in range(records)
    }
    assert set(collected.messages()) == expected


def test_unpicklable_extra_attribute_arrives_as_its_repr(
    ctx: object, collected: ListHandler
) -> None:
    with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # type: ignore[arg-type]
        pool.submit(tasks.log_unpicklable_extra).result(TIMEOUT)
        record = collected.wait_for("with a lock")
    assert isinstance(record.lock, str) and "lock" in record.lock  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["exit", "interrupt"])
def test_a_record_whose_unpickling_raises_a_base_exception_costs_nothing(
    ctx: object, collected: ListHandler, kind: str, capfd: pytest.CaptureFixture[str]
) -> None:
    # The record is reported on stderr and dropped; the task's result, the
    # next record and the pool are untouched (it used to break the pool).
    with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # type: ignore[arg-type]
        assert pool.submit(tasks.log_extra_raising_when_unpickled, kind).result(TIMEOUT) == 7
        collected.wait_for("after the hostile one")
        assert pool.submit(tasks.log, logging.WARNING, "still served").result(TIMEOUT)
    assert "hostile" not in collected.messages()
    assert "could not handle a worker's log record" in capfd.readouterr().err


def test_forwarding_off_leaves_worker_logging_alone(ctx: object, collected: ListHandler) -> None:
    with duckpool.ProcessPoolExecutor(
        1,
        mp_context=ctx,  # type: ignore[arg-type]
        forward_logs=False,
    ) as pool:
        assert pool.submit(tasks.forwarder_installed).result(TIMEOUT) is False
        # INFO: under spawn the worker's unconfigured logging prints nothing.
        pool.submit(tasks.log, logging.INFO, "stays in the worker").result(TIMEOUT)
    # A forwarded record would have been handled before its future resolved.
    assert collected.messages() == []


def test_forwarding_is_on_by_default(ctx: object, collected: ListHandler) -> None:
    with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # type: ignore[arg-type]
        pool.submit(tasks.log, logging.INFO, "forwarded").result(TIMEOUT)
        assert pool.submit(tasks.forwarder_installed).result(TIMEOUT) is True
        collected.wait_for("forwarded")


def test_forked_worker_installs_forwarding_at_its_first_record(collected: ListHandler) -> None:
    # Installed at start, the forwarder would make every idle worker touch
    # (and so copy) the logging module's pages.
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    with duckpool.ProcessPoolExecutor(1, mp_context=fork) as pool:
        assert pool.submit(tasks.forwarder_installed).result(TIMEOUT) is False
        pool.submit(tasks.log, logging.INFO, "the first record").result(TIMEOUT)
        collected.wait_for("the first record")
        assert pool.submit(tasks.forwarder_installed).result(TIMEOUT) is True


def test_handler_a_task_adds_keeps_its_records(ctx: object, collected: ListHandler) -> None:
    # Only the handlers a worker started with (the parent's, under fork) give
    # way to the forwarder, even when it is installed at the task's first record.
    with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # type: ignore[arg-type]
        seen = pool.submit(tasks.log_to_own_handler_too, "to both").result(TIMEOUT)
        collected.wait_for("to both")
    assert seen == ["to both"]


def test_manager_forwarding_off(ctx: object, collected: ListHandler) -> None:
    manager = duckpool.get_or_create_process_manager("logs-off")
    manager.start(max_workers=1, mp_context=ctx, forward_logs=False)  # type: ignore[arg-type]
    try:
        assert manager.submit_task(tasks.forwarder_installed).result(TIMEOUT) is False
    finally:
        manager.stop(wait=True)


def test_process_forked_by_a_task_does_not_write_to_the_result_pipe(
    ctx: object, collected: ListHandler
) -> None:
    with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # type: ignore[arg-type]
        pool.submit(tasks.log_in_forked_child, "from a grandchild").result(TIMEOUT)
        # Written before the task returned, it would have been handled by now.
        assert "from a grandchild" not in collected.messages()
        pool.submit(tasks.log, logging.INFO, "after").result(TIMEOUT)
        collected.wait_for("after")
    assert collected.messages() == ["after"]


def test_print_in_a_worker_reaches_stdout(start_method: str) -> None:
    script = textwrap.dedent(
        """
        import logging, multiprocessing, sys
        import duckpool, _log_tasks

        if __name__ == "__main__":
            logging.basicConfig(format="parent-format slot=%(duckpool_slot)s %(message)s")
            context = multiprocessing.get_context(sys.argv[1])
            with duckpool.ProcessPoolExecutor(1, mp_context=context) as pool:
                pool.submit(_log_tasks.print_and_log, "hello-stdout").result(30)
        """
    )
    done = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", script, start_method],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["hello-stdout"]
    # The record went through the parent's logging configuration.
    assert "parent-format slot=0 logged hello-stdout" in done.stderr.splitlines()
