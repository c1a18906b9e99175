"""duckpool._threads: the dispatcher's thread, started without waiting for it."""

from __future__ import annotations

import ctypes
import threading

import pytest

from duckpool import _threads

TIMEOUT = 30


def test_start_returns_at_once_and_join_waits_for_the_thread_to_run_and_end() -> None:
    release = threading.Event()
    seen: list[threading.Thread] = []

    def run() -> None:
        seen.append(threading.current_thread())
        assert release.wait(TIMEOUT)

    thread = _threads.QuickStartThread(run, name="duckpool-test-quick")
    assert thread.daemon
    thread.start()
    # Still blocked on the release: a join with a deadline returns with it alive.
    thread.join(0.05)
    assert not release.is_set()
    release.set()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert seen == [thread]
    assert seen[0].name == "duckpool-test-quick"


def test_join_before_the_thread_ran_waits_for_it() -> None:
    done = threading.Event()
    thread = _threads.QuickStartThread(done.set, name="duckpool-test-quick")
    thread.start()
    thread.join(TIMEOUT)  # no "cannot join thread before it is started"
    assert done.is_set() and not thread.is_alive()


def test_a_thread_that_could_not_start_fails_join_as_threading_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    thread = _threads.QuickStartThread(lambda: None, name="duckpool-test-quick")

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("can't start new thread")

    for name in ("_start_new_thread", "_start_joinable_thread"):
        if hasattr(threading, name):
            monkeypatch.setattr(threading, name, refuse)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        thread.start()
    with pytest.raises(RuntimeError, match="before it is started"):
        thread.join(TIMEOUT)
    # The event Thread.start waits on is the class's own again.
    assert "wait" not in vars(thread._started)  # type: ignore[attr-defined]


class _Interrupt(Exception):
    """Raised asynchronously in the starting thread, as a timeout library would."""


def test_an_exception_raised_in_the_starting_thread_never_kills_the_new_one() -> None:
    # Python 3.9 to 3.11 raise an exception aimed at a thread in the thread it
    # has just started instead, if that one has not run yet (see _threads): it
    # would die before its first line.  Each round aims one at this thread at
    # once; it lands here, or is dropped, but the new thread always runs.
    me = ctypes.c_ulong(threading.get_ident())
    for _ in range(20):
        ran = threading.Event()
        thread = _threads.QuickStartThread(ran.set, name="duckpool-test-quick")
        try:
            thread.start()
            ctypes.pythonapi.PyThreadState_SetAsyncExc(me, ctypes.py_object(_Interrupt))
            for _ in range(100):  # (a loop: where a pending exception is raised)
                pass
        except _Interrupt:
            pass
        assert ran.wait(TIMEOUT)
        thread.join(TIMEOUT)
        assert not thread.is_alive()
