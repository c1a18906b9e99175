"""The engine's owners on their own, without a pool or a process."""

from __future__ import annotations

import os
import threading

import pytest

from conftest import needs_epoll
from duckpool._errors import TaskQuarantinedError
from duckpool._pool._quarantine import Quarantine


def test_a_callable_is_quarantined_after_n_deaths_in_a_row() -> None:
    quarantine = Quarantine(after=3, seconds=60.0)
    assert not quarantine.on_death("m.f", now=0.0)
    assert not quarantine.on_death("m.f", now=1.0)
    assert quarantine.on_death("m.f", now=2.0)
    error = quarantine.refusal("m.f", now=12.0)
    assert isinstance(error, TaskQuarantinedError)
    assert (error.callable_name, error.deaths, error.retry_after) == ("m.f", 3, 50.0)
    assert quarantine.active(now=12.0) == ("m.f",)
    assert quarantine.refusal("m.g", now=12.0) is None


def test_a_run_that_returns_ends_the_streak() -> None:
    quarantine = Quarantine(after=2, seconds=60.0)
    quarantine.on_death("m.f", now=0.0)
    quarantine.on_return("m.f")
    assert not quarantine.on_death("m.f", now=1.0)
    assert quarantine.refusal("m.f", now=1.0) is None


def test_quarantine_ends_with_a_clean_slate() -> None:
    quarantine = Quarantine(after=1, seconds=10.0)
    assert quarantine.on_death("m.f", now=0.0)
    assert quarantine.refusal("m.f", now=9.9) is not None
    assert quarantine.refusal("m.f", now=10.0) is None
    assert quarantine.active(now=10.0) == ()
    assert quarantine.on_death("m.f", now=11.0)  # one death again puts it back (after=1)


def test_without_a_limit_nothing_is_ever_quarantined() -> None:
    quarantine = Quarantine(after=None, seconds=10.0)
    assert not any(quarantine.on_death("m.f", now=float(i)) for i in range(100))
    assert quarantine.refusal("m.f", now=100.0) is None


@pytest.fixture(params=[pytest.param("EpollWaiter", marks=needs_epoll), "SelectorWaiter"])
def waiter_class(request: pytest.FixtureRequest) -> type:
    from duckpool._pool import _waiter

    return getattr(_waiter, str(request.param))  # type: ignore[no-any-return]


def test_a_waiter_reports_the_tags_of_ready_descriptors(waiter_class: type) -> None:
    waiter = waiter_class()
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        waiter.register(r1, "one")
        waiter.register(r2, "two")
        assert waiter.wait(0) == []
        os.write(w2, b"x")
        assert waiter.wait(1) == ["two"]
        waiter.unregister(r2)
        waiter.unregister(r2)  # twice is harmless
        assert waiter.wait(0) == []
        # A number reused after a close: registering it again replaces the tag.
        os.close(r1)
        r3, w3 = os.pipe()
        os.dup2(r3, r1)
        os.write(w3, b"y")
        waiter.register(r1, "three")
        assert waiter.wait(1) == ["three"]
        os.close(r3)
        os.close(w3)
    finally:
        waiter.close()
        for fd in (r1, w1, r2, w2):
            try:
                os.close(fd)
            except OSError:
                pass


@needs_epoll
def test_only_the_epoll_waiter_pauses_a_descriptor_while_another_thread_waits() -> None:
    from duckpool._pool._waiter import EpollWaiter, SelectorWaiter

    assert not SelectorWaiter.can_pause
    waiter = EpollWaiter()
    r, w = os.pipe()
    try:
        waiter.register(r, "pipe")
        waiter.pause(r)
        seen: list[object] = []
        waiting = threading.Thread(target=lambda: seen.extend(waiter.wait(0.2)))
        waiting.start()
        os.write(w, b"x")
        waiting.join(5)
        assert seen == []  # paused: not reported
        waiter.resume(r)
        assert waiter.wait(1) == ["pipe"]  # ready while paused: reported on resume
    finally:
        waiter.close()
        os.close(r)
        os.close(w)


def test_counters_keep_the_latest_latencies_and_their_percentiles() -> None:
    from duckpool._pool._counters import LATENCY_WINDOW, Counters
    from duckpool._pool._snapshot import percentile

    counters = Counters()
    counters.latencies.extend(float(i) for i in range(LATENCY_WINDOW + 100))
    assert len(counters.latencies) == LATENCY_WINDOW and counters.latencies[0] == 100.0
    ordered = sorted(counters.latencies)
    assert percentile(ordered, 0.5) == 100.0 + LATENCY_WINDOW // 2
    assert percentile(ordered, 0.99) == ordered[int(0.99 * LATENCY_WINDOW)]
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.99) == 7.0
