"""The hub: one dispatcher thread shared by every pool of a process (``_hub``).

Each test runs pools under every start method and checks, from outside,
that the pools share one thread while several run, that a pass that blocks
(a done-callback waiting on another pool) stalls no other pool, that the
thread is gone with the last pool, and that a fork or a failure of the hub
loses no future.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import wait
from typing import Any, Iterator

import pytest

import duckpool
from _tasks import add, sleep_then
from conftest import run_in_forked_child, run_script, wait_until
from duckpool._pool import _hub

pytestmark = pytest.mark.skipif(
    _hub._the_hub is None, reason="no shared dispatcher here (no epoll, or turned off)"
)


def _duckpool_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("duckpool-"))


@pytest.fixture
def pools(ctx: Any) -> Iterator[list[duckpool.ProcessPoolExecutor]]:
    """Three two-worker pools, shut down within bounds afterwards."""
    made = [duckpool.ProcessPoolExecutor(2, mp_context=ctx) for _ in range(3)]
    yield made
    for pool in made:
        pool.shutdown(cancel_futures=True, timeout=30)


def test_several_pools_share_one_hub_thread_which_ends_with_the_last(
    pools: list[duckpool.ProcessPoolExecutor], monkeypatch: pytest.MonkeyPatch
) -> None:
    # (A slow worker start on a loaded host must not look like a stall here.)
    monkeypatch.setattr(_hub, "STALL_SECONDS", 30.0)
    futures = [pool.submit(add, i, 1) for i in range(300) for pool in pools]
    assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(300) for _ in pools]
    assert _duckpool_threads().count("duckpool-hub") == 1
    # Every pool's passes went to the hub: none is driven by its own thread.
    runs = [pool._core.dispatcher.run for pool in pools]  # type: ignore[attr-defined]
    wait_until(lambda: all(run is not None and run.where is _hub._Where.HUB for run in runs))
    for pool in pools:
        pool.shutdown(wait=True)
    assert "duckpool-hub" not in _duckpool_threads()
    assert not [n for n in _duckpool_threads() if n.startswith("duckpool-dispatcher")]


def test_a_lone_pool_drives_its_own_passes(ctx: Any) -> None:
    with duckpool.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        assert [f.result(timeout=30) for f in [pool.submit(add, i, 2) for i in range(50)]] == [
            i + 2 for i in range(50)
        ]
        dispatcher = pool._core.dispatcher  # type: ignore[attr-defined]
        wait_until(lambda: dispatcher.run is not None)
        assert "duckpool-hub" not in _duckpool_threads()
        assert dispatcher.run.where is _hub._Where.OWN


def _switches(thread: threading.Thread) -> int:
    """How many times ``thread`` has gone to sleep so far (Linux's count)."""
    with open(f"/proc/self/task/{thread.native_id}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches line")


def test_the_own_threads_of_idle_pools_on_the_hub_sleep(
    pools: list[duckpool.ProcessPoolExecutor],
) -> None:
    for pool in pools:  # all three on the hub, then idle
        pool.submit(add, 0, 0).result(timeout=30)
    dispatchers = [pool._core.dispatcher for pool in pools]  # type: ignore[attr-defined]
    # (A caller may read its own first result before the pool's thread runs.)
    wait_until(
        lambda: all(d.run is not None and d.run.where is _hub._Where.HUB for d in dispatchers)
    )
    own = [pool._core.dispatcher.thread for pool in pools]  # type: ignore[attr-defined]
    # (Under fork a zygote's standby comes a moment after the start: its
    # answer is work.)
    zygotes = [pool._core.zygotes for pool in pools]  # type: ignore[attr-defined]
    wait_until(
        lambda: all(
            z.zygote is None or z.standby is not None or z.parent_pidfd is None for z in zygotes
        )
    )
    before = [_switches(thread) for thread in own]
    # A measuring window, not a wait for anything: looking every STALL_SECONDS
    # the own threads would wake about five times in it.
    time.sleep(5 * _hub.STALL_SECONDS)
    woke = [_switches(thread) - count for thread, count in zip(own, before)]
    assert max(woke) <= 2, woke
    # Work wakes them again, and the pools still answer.
    assert [pool.submit(add, 1, 1).result(timeout=30) for pool in pools] == [2, 2, 2]


def test_a_callback_waiting_on_another_pool_stalls_no_pool(
    pools: list[duckpool.ProcessPoolExecutor],
) -> None:
    first, second, third = pools
    for pool in pools:  # all three on the hub
        pool.submit(add, 0, 0).result(timeout=30)
    got: list[Any] = []
    answered = threading.Event()

    def on_done(_: Any) -> None:
        # Runs in the hub's thread: a blocking wait on the second pool.
        got.append(threading.current_thread().name)
        got.append(second.submit(sleep_then, 1.0, "second").result(timeout=20))
        answered.set()

    first.submit(sleep_then, 0.2, None).add_done_callback(on_done)
    wait_until(lambda: got)  # the hub is in the callback now
    # Meanwhile the third pool answers, though the hub is stuck in the callback
    # (waited for with wait(): a caller in result() could read the answers itself).
    started = time.monotonic()
    for i in range(5):
        future = third.submit(add, i, 1)
        assert not wait([future], timeout=20).not_done
        assert future.result() == i + 1
    assert third._core.dispatcher.run.kept  # type: ignore[attr-defined]
    assert answered.wait(20), "the callback's wait on another pool never ended"
    assert got == ["duckpool-hub", "second"]
    assert time.monotonic() - started < 15
    # And the first pool goes on once its callback has returned.
    assert first.submit(add, 2, 2).result(timeout=20) == 4
    # The pools that took their passes back leave no thread behind.
    for pool in pools:
        pool.shutdown(wait=True)
    assert [n for n in _duckpool_threads() if "hub" in n or "dispatcher" in n] == []


def test_shutdown_with_wait_inside_a_callback_run_by_the_hub_raises(
    pools: list[duckpool.ProcessPoolExecutor],
) -> None:
    first = pools[0]
    for pool in pools:
        pool.submit(add, 0, 0).result(timeout=30)
    raised: list[BaseException] = []
    called = threading.Event()

    names: list[str] = []

    def on_done(_: Any) -> None:
        names.append(threading.current_thread().name)
        try:
            first.shutdown(wait=True)
        except BaseException as exc:
            raised.append(exc)
        called.set()

    first.submit(sleep_then, 0.2, None).add_done_callback(on_done)
    assert called.wait(20)
    assert names == ["duckpool-hub"]
    assert len(raised) == 1 and isinstance(raised[0], RuntimeError)
    assert "dispatcher thread" in str(raised[0])
    assert pools[1].submit(add, 3, 3).result(timeout=20) == 6


def test_a_failed_hub_hands_every_pool_back(
    pools: list[duckpool.ProcessPoolExecutor], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_loop(self: _hub.Hub) -> None:
        raise OSError("the hub's epoll failed (injected)")

    monkeypatch.setattr(_hub.Hub, "_loop", broken_loop)
    futures = [pool.submit(add, i, 1) for i in range(100) for pool in pools]
    _, not_done = wait(futures, timeout=60)
    assert not not_done
    assert [f.result() for f in futures] == [i + 1 for i in range(100) for _ in pools]
    runs = [pool._core.dispatcher.run for pool in pools]  # type: ignore[attr-defined]
    assert all(run is not None and run.where is not _hub._Where.HUB for run in runs)


def test_a_process_forked_while_the_hub_runs_gets_a_hub_of_its_own(
    pools: list[duckpool.ProcessPoolExecutor], start_method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_hub, "STALL_SECONDS", 30.0)  # (as below)
    for pool in pools:
        pool.submit(add, 0, 0).result(timeout=30)
    dispatchers = [pool._core.dispatcher for pool in pools]  # type: ignore[attr-defined]
    on_hub = _hub._Where.HUB
    wait_until(lambda: all(d.run is not None and d.run.where is on_hub for d in dispatchers))
    assert "duckpool-hub" in _duckpool_threads()

    def in_child() -> tuple[list[int], list[str]]:
        import multiprocessing

        # (A loaded host must not look like a stall here.)
        _hub.STALL_SECONDS = 30.0

        ctx = multiprocessing.get_context(start_method)
        mine = [duckpool.ProcessPoolExecutor(1, mp_context=ctx) for _ in range(2)]
        try:
            futures = [p.submit(add, 2, i) for i in range(20) for p in mine]
            results = [f.result(timeout=30) for f in futures]
            runs = [p._core.dispatcher for p in mine]  # type: ignore[attr-defined]
            wait_until(
                lambda: all(d.run is not None and d.run.where is _hub._Where.HUB for d in runs)
            )
            return results, _duckpool_threads()
        finally:
            for pool in mine:
                pool.shutdown(wait=True)

    results, threads = run_in_forked_child(in_child, timeout=60)
    assert results == [2 + i for i in range(20) for _ in range(2)]
    assert threads.count("duckpool-hub") == 1
    # The parent's pools were not disturbed.
    assert [p.submit(add, 1, 1).result(timeout=20) for p in pools] == [2, 2, 2]


def test_the_hub_can_be_turned_off(start_method: str) -> None:
    script = f"""
import os, threading, multiprocessing
os.environ["DUCKPOOL_SHARED_DISPATCHER"] = "0"
import duckpool
if __name__ == "__main__":
    ctx = multiprocessing.get_context({start_method!r})
    pools = [duckpool.ProcessPoolExecutor(1, mp_context=ctx) for _ in range(3)]
    assert [p.submit(pow, 2, 3).result(timeout=30) for p in pools] == [8, 8, 8]
    names = [t.name for t in threading.enumerate() if t.name.startswith("duckpool-")]
    print(sorted(name.split("-")[1] for name in names))
    for p in pools:
        p.shutdown()
"""
    out = run_script(script)
    assert "hub" not in out and out.count("dispatcher") == 3


def test_pools_kept_waiting_by_other_pools_short_callbacks_take_their_passes_back(
    pools: list[duckpool.ProcessPoolExecutor], ctx: Any
) -> None:
    # Each callback is shorter than a look, but they follow one another: each
    # submits its pool's next task, so no other thread reads those results,
    # and the hub runs three pools' callbacks in turn while a fourth waits.
    quiet = duckpool.ProcessPoolExecutor(2, mp_context=ctx)
    stop = threading.Event()

    def chain(pool: duckpool.ProcessPoolExecutor) -> None:
        def again(_: Any) -> None:
            time.sleep(0.08)
            if not stop.is_set():
                try:
                    pool.submit(add, 1, 1).add_done_callback(again)
                except RuntimeError:
                    pass  # (shut down meanwhile)

        pool.submit(add, 1, 1).add_done_callback(again)

    try:
        for pool in [*pools, quiet]:
            pool.submit(add, 0, 0).result(timeout=30)
        for pool in pools:
            chain(pool)
        took: list[float] = []
        for i in range(5):
            began = time.monotonic()
            future = quiet.submit(add, i, 1)
            assert not wait([future], timeout=20).not_done
            took.append(time.monotonic() - began)
        # The quiet one's answers came within a few looks, and whichever
        # pools were kept waiting (the quiet one, or a busy one by the
        # others' callbacks) take their passes back (looked at until one has:
        # the quiet tasks may all be done, their results read by the thread
        # waiting for them, before the chains have kept any pool waiting).
        assert max(took) < 2.0, took
        runs = [pool._core.dispatcher.run for pool in [*pools, quiet]]  # type: ignore[attr-defined]
        try:
            wait_until(lambda: any(run.kept for run in runs), 10)
        except AssertionError:
            raise AssertionError([(run.where, run.passes_run) for run in runs]) from None
    finally:
        stop.set()
        quiet.shutdown(cancel_futures=True, timeout=30)


@pytest.mark.parametrize("failure", ["start", "watch"])
def test_a_hub_that_cannot_start_or_watch_a_pool_leaves_it_its_own_thread(
    pools: list[duckpool.ProcessPoolExecutor], monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    if failure == "start":

        def no_start(self: _hub.Hub) -> None:
            raise OSError(24, "Too many open files (injected)")

        monkeypatch.setattr(_hub.Hub, "_start", no_start)
    else:
        watch = _hub.Hub._take

        def no_room(self: _hub.Hub, run: _hub.Run) -> None:
            monkeypatch.setattr(run.selector, "fileno", lambda: -1)  # EPOLL_CTL_ADD fails
            watch(self, run)

        monkeypatch.setattr(_hub.Hub, "_take", no_room)
    futures = [pool.submit(add, i, 1) for i in range(50) for pool in pools]
    assert not wait(futures, timeout=60).not_done
    assert [f.result() for f in futures] == [i + 1 for i in range(50) for _ in pools]
    runs = [pool._core.dispatcher.run for pool in pools]  # type: ignore[attr-defined]
    assert all(run is not None and run.where is not _hub._Where.HUB for run in runs)
    assert any(run.kept for run in runs)  # (one that came after may never have been called)
