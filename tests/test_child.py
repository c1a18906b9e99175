"""duckpool._child: processes started without multiprocessing, and the handle on them."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import needs_pidfds, wait_until
from duckpool import _child

TIMEOUT = 30


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return False


def test_a_forked_child_runs_main_and_exits_without_the_parents_exit_handlers(
    tmp_path: Path,
) -> None:
    ran = tmp_path / "ran"
    child = _child.fork(lambda: ran.write_text(str(os.getpid())))
    child.join(TIMEOUT)
    assert child.exitcode == 0 and not child.is_alive()
    assert ran.read_text() == str(child.pid)
    child.close()


def test_a_failing_main_exits_with_1_and_says_why(capfd: pytest.CaptureFixture[str]) -> None:
    def fail() -> None:
        raise ValueError("no luck")

    child = _child.fork(fail)
    child.join(TIMEOUT)
    assert child.exitcode == 1
    assert "ValueError: no luck" in capfd.readouterr().err
    child.close()


def test_exit_codes_of_signals_are_negative_as_in_multiprocessing(tmp_path: Path) -> None:
    ready = tmp_path / "ready"

    def wait_forever() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        ready.write_text("")
        while True:
            signal.pause()

    child = _child.fork(wait_forever)
    wait_until(ready.exists, TIMEOUT)
    child.join(0.01)  # a deadline that passes: still running
    assert child.exitcode is None
    child.terminate()
    child.join(TIMEOUT)
    assert child.exitcode == -signal.SIGTERM
    child.kill()  # reaped: nothing is sent to a pid that may be another's now
    child.close()


def test_a_child_let_go_before_it_exits_is_reaped_at_the_next_start(tmp_path: Path) -> None:
    go = tmp_path / "go"

    def wait_for_go() -> None:
        wait_until(go.exists, TIMEOUT)

    child = _child.fork(wait_for_go)
    pid = child.pid
    sentinel = child.sentinel
    del child  # collected: its sentinel is closed, its pid kept for reaping
    with pytest.raises(OSError):
        os.fstat(sentinel)
    go.write_text("")
    wait_until(lambda: _zombie(pid), TIMEOUT)
    _child.fork(lambda: None).join(TIMEOUT)  # reaps what was let go
    assert not _zombie(pid)
    assert pid not in _child._UNREAPED


@pytest.mark.skipif(sys.platform != "linux", reason="pidfds are Linux's")
def test_the_sentinel_becomes_readable_when_the_child_exits(tmp_path: Path) -> None:
    from multiprocessing import connection

    go = tmp_path / "go"
    child = _child.fork(lambda: wait_until(go.exists, TIMEOUT))
    assert connection.wait([child.sentinel], 0) == []
    go.write_text("")
    assert connection.wait([child.sentinel], TIMEOUT) == [child.sentinel]
    child.join(TIMEOUT)
    assert child.exitcode == 0
    child.close()


def test_a_stopped_process_is_told_from_a_running_one() -> None:

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not _child.is_stopped(child.pid)
        os.kill(child.pid, signal.SIGSTOP)
        wait_until(lambda: _child.is_stopped(child.pid), 10)  # (stopped asynchronously)
    finally:
        child.kill()
        child.wait(10)
    assert not _child.is_stopped(child.pid)  # gone: unknown, so not stopped


_FORK_INTENT_SCRIPT = """
import multiprocessing, os, threading
import multiprocessing.resource_tracker as tracker
import duckpool

# Python 3.15 (gh-146313): a raw fork's child keeps the resource tracker's
# pipe only if this thread-local flag was set around the fork.  Emulated
# here: every fork reports the flag as the child sees it.
tracker._fork_intent = threading.local()
read_end, write_end = os.pipe()
os.set_blocking(read_end, False)

def report():
    os.write(write_end, b"1" if getattr(tracker._fork_intent, "preserve_fd", False) else b"0")

os.register_at_fork(after_in_child=report)
if __name__ == "__main__":
    with duckpool.ProcessPoolExecutor(2, multiprocessing.get_context("fork")) as pool:
        assert sorted(pool.map(abs, [-1, -2, -3, -4], chunksize=1)) == [1, 2, 3, 4]
        while len(pool.worker_pids()) < 2:
            pool.submit(abs, 0).result()
    print(os.read(read_end, 1024).decode(), getattr(tracker._fork_intent, "preserve_fd", None))
"""


@needs_pidfds  # (without, multiprocessing forks the first worker, and sets the flag itself)
def test_every_raw_fork_keeps_the_resource_tracker_s_pipe_for_its_child(tmp_path: Path) -> None:
    # The worker, the zygote, its standby and the workers it forks: each
    # child must reuse the parent's tracker, not start one of its own; and
    # the flag is off again in the parent after each fork.
    script = tmp_path / "fork_intent.py"
    script.write_text(_FORK_INTENT_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen, after = done.stdout.split()
    assert len(seen) >= 3 and set(seen) == {"1"}, seen  # first worker, zygote, second worker
    assert after == "False"


def test_workers_that_use_tracked_resources_share_this_process_s_tracker(
    ctx: multiprocessing.context.BaseContext,
) -> None:
    # One resource tracker, whatever the workers do: each worker reuses
    # this process's (through its inherited pipe, or the descriptor spawn
    # passes), never starts its own.
    from multiprocessing import resource_tracker

    import _executor_tasks as tasks
    import duckpool

    resource_tracker.ensure_running()

    def trackers() -> list[int]:
        found = []
        for process in psutil.Process().children(recursive=True):
            try:
                if any("resource_tracker" in part for part in process.cmdline()):
                    found.append(process.pid)
            except psutil.Error:
                pass
        return found

    before = trackers()
    assert len(before) == 1
    with duckpool.ProcessPoolExecutor(2, ctx) as pool:
        pids = {pool.submit(tasks.use_tracked_resources).result(30) for _ in range(6)}
        assert pids
        assert trackers() == before


def test_kill_children_kills_a_parent_s_children_but_those_kept() -> None:
    # A stopped zygote cannot reap: the children it forked and the pool never
    # got are killed through their parent's list, the others left alone.
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    script = (
        "import os, signal, subprocess, sys\n"
        f"kids = [subprocess.Popen({sleeper!r}) for _ in range(2)]\n"
        "print(*(kid.pid for kid in kids), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGSTOP)\n"
        "for kid in kids:\n"
        "    kid.wait()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    doomed, kept = (int(word) for word in parent.stdout.readline().split())
    try:
        wait_until(lambda: _child.is_stopped(parent.pid), 60)
        _child.kill_children(parent.pid, [kept])
        wait_until(lambda: _child._state(doomed) in (None, b"Z"), 60)
        assert _child._state(kept) not in (None, b"Z")
    finally:
        for pid in (doomed, kept):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.kill(parent.pid, signal.SIGCONT)
        parent.wait(60)


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="no SCHED_BATCH on this system")
def test_a_worker_told_to_exit_reads_its_stop_frame_as_a_batch_process() -> None:
    # Woken by the stop frame, a batch process does not take the core of the
    # thread that has the next worker to tell; it tells its policy here.
    from multiprocessing.connection import Connection

    from duckpool._pool import _transport

    read_end, write_end = os.pipe()
    reader = (
        "import os, sys; frame = os.read(0, 64); "
        "print(len(frame), os.sched_getscheduler(0) == os.SCHED_BATCH)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", reader], stdin=read_end, stdout=subprocess.PIPE, text=True
    )
    os.close(read_end)
    conn = Connection(write_end)
    try:
        _transport.stop(conn, child.pid)
        out, _ = child.communicate(timeout=TIMEOUT)
    finally:
        conn.close()
        child.kill()
        child.wait(TIMEOUT)
    assert out.split() == [str(len(_transport.STOP_FRAME)), "True"], out
    # A process already gone: nothing to change, and nothing raised.
    _child.exits_in_the_background(child.pid)
