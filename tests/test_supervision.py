"""No single death breaks a pool: every process the pool owns or relies on may die.

The invariant, under each start method: whatever process of the pool dies
(a worker, the zygote, its standby, multiprocessing's fork server or
resource tracker, or all of them at once), only the task running in a
process that died may fail, queued work goes on, and the next task runs.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import CancelledError, Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Iterator, Optional

import psutil
import pytest

import _executor_tasks as tasks
import duckpool
from conftest import (
    all_pool_processes,
    fork_server_pid,
    helper_pids,
    kill_quietly,
    needs_pidfds,
    proc_cmdline,
    process_gone,
    run_script,
    wait_until,
)
from duckpool import _child

TIMEOUT = 60


@needs_pidfds  # (a standby is watched through pidfds: without, there is none)
def test_a_killed_zygote_hands_over_to_its_standby(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    tasks.MARKER = "as the pool started"
    pool = duckpool.ProcessPoolExecutor(2, ctx)
    gate = tmp_path / "gate"
    try:
        assert pool.submit(tasks.read_marker).result(TIMEOUT) == "as the pool started"
        tasks.MARKER = "changed after the pool started"
        wait_until(lambda: set(helper_pids(pool)) == {"zygote", "zygote-standby"}, TIMEOUT)
        helpers = helper_pids(pool)
        zygote, standby = helpers["zygote"], helpers["zygote-standby"]
        # Both single-threaded; the standby is the zygote's child.
        assert psutil.Process(zygote).ppid() == os.getpid()
        assert psutil.Process(standby).ppid() == zygote
        assert psutil.Process(zygote).num_threads() == psutil.Process(standby).num_threads() == 1
        # A task that runs through the zygote's death is untouched by it.
        started = tmp_path / "started"
        running = pool.submit(tasks.touch_then_wait, str(started), str(gate))
        wait_until(started.exists, TIMEOUT)
        os.kill(zygote, signal.SIGKILL)
        wait_until(lambda: helper_pids(pool).get("zygote") == standby, TIMEOUT)
        wait_until(lambda: helper_pids(pool).get("zygote-standby") not in (None, standby), TIMEOUT)
        # Promoted, it says so in ps.
        wait_until(lambda: proc_cmdline(standby) == "duckpool-zygote", TIMEOUT)
        gate.touch()
        assert running.result(TIMEOUT) == "released"
        assert [f.result(TIMEOUT) for f in [pool.submit(tasks.add, i, 1) for i in range(100)]] == [
            i + 1 for i in range(100)
        ]
        # Workers the new zygote forks come from the same image as before.
        for pid in pool.worker_pids():
            os.kill(pid, signal.SIGKILL)
        answers = {pool.submit(tasks.read_marker).result(TIMEOUT) for _ in range(20)}
        assert answers == {"as the pool started"}
        assert pool.stats().worker_deaths >= 2
    finally:
        gate.touch()
        pool.shutdown()
        tasks.MARKER = "module default"
    assert process_gone(zygote) and process_gone(standby)


@needs_pidfds  # (a standby is watched through pidfds: without, there is none)
def test_a_killed_standby_is_replaced() -> None:
    pool = duckpool.ProcessPoolExecutor(2, multiprocessing.get_context("fork"))
    try:
        pool.submit(tasks.add, 1, 1).result(TIMEOUT)
        wait_until(lambda: "zygote-standby" in helper_pids(pool), TIMEOUT)
        zygote, standby = helper_pids(pool)["zygote"], helper_pids(pool)["zygote-standby"]
        os.kill(standby, signal.SIGKILL)
        wait_until(lambda: helper_pids(pool).get("zygote-standby") not in (None, standby), TIMEOUT)
        assert helper_pids(pool)["zygote"] == zygote
        assert pool.submit(tasks.add, 2, 2).result(TIMEOUT) == 4
    finally:
        pool.shutdown()


@needs_pidfds  # (a standby is watched through pidfds: without, there is none)
def test_a_zygote_that_cannot_fork_hands_over_to_its_standby() -> None:
    # Alive but unable to fork (its descriptor limit lowered under it, as a
    # task can through its parent's pid): it used to be asked again for 30 s,
    # its standby unused, and then the pool broke.
    import resource

    pool = duckpool.ProcessPoolExecutor(  # (each worker replaced after a task)
        2, multiprocessing.get_context("fork"), max_tasks_per_child=1
    )
    try:
        pool.submit(tasks.add, 1, 1).result(TIMEOUT)
        wait_until(lambda: "zygote-standby" in helper_pids(pool), TIMEOUT)
        zygote, standby = helper_pids(pool)["zygote"], helper_pids(pool)["zygote-standby"]
        resource.prlimit(zygote, resource.RLIMIT_NOFILE, (4, 4))
        futures = [pool.submit(tasks.add, i, 1) for i in range(6)]
        assert [f.result(10) for f in futures] == [i + 1 for i in range(6)]
        assert helper_pids(pool)["zygote"] == standby
        wait_until(lambda: process_gone(zygote), TIMEOUT)
    finally:
        pool.shutdown()


@needs_pidfds  # (a standby is watched through pidfds: without, there is none)
def test_zygote_deaths_leak_no_descriptor_anywhere() -> None:
    # Each death hands the zygote's role to its standby, which forks the next
    # workers and a standby of its own: the pool's process, the zygote and a
    # worker it forks must hold no more descriptors after many deaths than
    # after one (a leak would let a later single death break the pool once
    # the descriptor limit is reached).
    pool = duckpool.ProcessPoolExecutor(2, multiprocessing.get_context("fork"))

    def descriptors(pid: int) -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    def kill_zygote_and_workers() -> None:
        zygote = helper_pids(pool)["zygote"]
        workers = pool.worker_pids()
        os.kill(zygote, signal.SIGKILL)
        wait_until(
            lambda: (
                helper_pids(pool).get("zygote") not in (None, zygote)
                and "zygote-standby" in helper_pids(pool)
            ),
            TIMEOUT,
        )
        for pid in workers:  # the next ones are the new zygote's
            kill_quietly(pid)
        wait_until(lambda: not set(workers) & set(pool.worker_pids()), TIMEOUT)
        assert sorted(pool.map(tasks.add, [1, 2], [1, 2])) == [2, 4]

    def counts() -> tuple[int, int, int]:
        worker = pool.submit(tasks.getpid).result(TIMEOUT)
        return (
            descriptors(os.getpid()),
            descriptors(helper_pids(pool)["zygote"]),
            descriptors(worker),
        )

    try:
        pool.submit(tasks.add, 1, 1).result(TIMEOUT)
        wait_until(lambda: "zygote-standby" in helper_pids(pool), TIMEOUT)
        kill_zygote_and_workers()
        after_one = counts()
        for _ in range(4):
            kill_zygote_and_workers()
        # (Looked at until it holds: a process may be opening or closing a
        # standby's channels at one look; a leak grows by one or more per death.)
        wait_until(lambda: all(now <= then for now, then in zip(counts(), after_one)), 10)
    finally:
        pool.shutdown()


@needs_pidfds
@pytest.mark.parametrize("delivered", [False, True], ids=["never delivered", "delivered"])
def test_a_standby_kills_the_workers_it_adopted_only_once_it_was_the_pool_s(
    delivered: bool, tmp_path: Path
) -> None:
    # A standby whose zygote died as it handed its channels over sees them
    # close while the parent lives: the workers it adopted (the parent's, and
    # a dead zygote's) run the parent's tasks and must live on.  (It used to
    # kill them, failing every running task after the zygote and its newly
    # promoted standby died one after the other.)  Once the pool has its
    # channels (HELLO), their closing means the parent is gone or exec'd:
    # the adopted workers go.
    from duckpool import _zygote_process

    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    middle = tmp_path / "middle"

    def parent_side() -> None:
        # The standby's parent, for the test (its channels opened here: no
        # other process holds them); it lives on until the standby exits.
        channels = _zygote_process.Channels.open()
        adopted = _child.pidfd_of(worker.pid)
        assert adopted is not None
        own = (channels.control.fileno(), channels.notices_r)
        birth = _zygote_process.Birth(
            os.getpid(), own, _child.pidfd_of(os.getpid()), (adopted,), None, standby=True
        )
        standby = _child.fork(
            lambda: _zygote_process.zygote_main(
                channels.zygote_end,
                channels.notices_w,
                lambda slot: None,
                birth,  # type: ignore[arg-type,return-value]
            )
        )
        channels.zygote_end.close()
        os.close(channels.notices_w)
        middle.write_text(str(standby.pid))
        if delivered:
            channels.control.sendall(_zygote_process.REQUEST.pack(_zygote_process.HELLO))
        channels.control.close()  # its channel closes: nothing more
        standby.join(TIMEOUT)
        assert standby.exitcode == 0

    try:
        _child.fork(parent_side).join(TIMEOUT)
        wait_until(middle.exists, TIMEOUT)
        wait_until(lambda: process_gone(int(middle.read_text())), TIMEOUT)
        if delivered:
            assert worker.wait(TIMEOUT) == -signal.SIGKILL
        else:
            assert worker.poll() is None, "an adopted worker was killed"
    finally:
        worker.kill()
        worker.wait(TIMEOUT)


@needs_pidfds  # (a standby is watched through pidfds: without, there is none)
def test_a_standby_the_zygote_cannot_fork_is_asked_for_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A standby is a spare: the zygote failing to fork one, for whatever
    # reason, must never break the pool, which asks again a little later.
    from duckpool import _zygote_process
    from duckpool._pool import _zygotes

    real = _zygote_process._fork_standby
    refusals = [2]  # (counted in the zygote, which inherits this list)

    def refusing(control: Any, *args: Any) -> Optional[int]:
        if refusals[0]:
            refusals[0] -= 1
            # (EPERM, say from a sandbox: not an error a worker start retries.)
            control.sendall(_zygote_process.REPLY.pack(_zygote_process.STANDBY, -errno.EPERM))
            return None
        return real(control, *args)

    monkeypatch.setattr(_zygote_process, "_fork_standby", refusing)
    monkeypatch.setattr(_zygotes, "STANDBY_RETRY_SECONDS", 0.1)
    pool = duckpool.ProcessPoolExecutor(2, multiprocessing.get_context("fork"))
    try:
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
        wait_until(lambda: "zygote-standby" in helper_pids(pool), TIMEOUT)
        assert refusals == [2]  # (this process's copy: the zygote counted its own)
        assert pool.submit(tasks.add, 2, 2).result(TIMEOUT) == 4
    finally:
        pool.shutdown()


@needs_pidfds  # (it names the standby, which needs pidfds)
def test_helper_processes_carry_titles_naming_pool_and_role() -> None:
    ctx = multiprocessing.get_context("fork")
    pool = duckpool.ProcessPoolExecutor(2, ctx, process_name_prefix="titled-pool")
    try:
        pool.submit(tasks.add, 1, 1).result(TIMEOUT)
        wait_until(lambda: "zygote-standby" in helper_pids(pool), TIMEOUT)
        helpers = helper_pids(pool)
        wait_until(lambda: proc_cmdline(helpers["zygote"]) == "titled-pool-zygote", TIMEOUT)
        # (The standby names itself right after its fork, maybe after the
        # zygote has told the pool about it.)
        standby = helpers["zygote-standby"]
        wait_until(lambda: proc_cmdline(standby) == "titled-pool-zygote-standby", TIMEOUT)
    finally:
        pool.shutdown()


def test_every_process_killed_at_once_the_pool_serves_the_next_task(
    ctx: multiprocessing.context.BaseContext,
) -> None:
    pool = duckpool.ProcessPoolExecutor(2, ctx)
    try:
        pool.submit(tasks.add, 1, 1).result(TIMEOUT)
        if ctx.get_start_method() == "fork" and _child.has_pidfds():  # (no standby without)
            wait_until(lambda: "zygote-standby" in helper_pids(pool), TIMEOUT)
        victims = all_pool_processes(pool)
        assert victims
        for pid in victims:  # an operator's kill -9 of all of them
            kill_quietly(pid)
        wait_until(lambda: all(process_gone(pid) for pid in victims), TIMEOUT)
        futures = [pool.submit(tasks.add, i, 1) for i in range(50)]
        assert [f.result(TIMEOUT) for f in futures] == [i + 1 for i in range(50)]
        assert not set(pool.worker_pids()) & set(victims)
    finally:
        pool.shutdown()
    stats = pool.stats()
    assert stats.stopped and not stats.helpers, stats


_SUBREAPER_SCRIPT = """
import ctypes, multiprocessing, os, signal, sys, time
from multiprocessing import forkserver
import psutil
import duckpool

# This process inherits the orphans of its descendants, as PID 1 of a
# container does (PR_SET_CHILD_SUBREAPER).
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")

def one_pool(method, kill):
    pool = duckpool.ProcessPoolExecutor(2, multiprocessing.get_context(method))
    assert pool.submit(pow, 2, 3).result(60) == 8
    deadline = time.monotonic() + 60
    helpers = {}
    if method == "fork":
        while "zygote-standby" not in helpers:
            assert time.monotonic() < deadline, helpers
            time.sleep(0.01)
            helpers = {h.role: h.pid for h in pool.stats().helpers}
        victims = [helpers[role] for role in kill]
    elif method == "forkserver":
        victims = [forkserver._forkserver._forkserver_pid]
    else:
        victims = []  # (no helper process under spawn)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    assert [pool.submit(pow, 2, i).result(60) for i in range(20)] == [2**i for i in range(20)]
    pool.shutdown()
    return victims


def stopped_helper(method):
    # A worker dies while the helper that started it is stopped, so cannot
    # reap it; the helper is killed later: the dead worker is then an orphan.
    pool = duckpool.ProcessPoolExecutor(2, multiprocessing.get_context(method))
    assert [pool.submit(pow, 2, i).result(60) for i in range(4)] == [1, 2, 4, 8]
    deadline = time.monotonic() + 60
    if method == "fork":
        helpers = {}
        while "zygote-standby" not in helpers:
            assert time.monotonic() < deadline, helpers
            time.sleep(0.01)
            helpers = {h.role: h.pid for h in pool.stats().helpers}
        helper = helpers["zygote"]
    else:
        helper = forkserver._forkserver._forkserver_pid
    workers = set(pool.worker_pids())
    worker = next(p.pid for p in psutil.Process(helper).children() if p.pid in workers)
    os.kill(helper, signal.SIGSTOP)
    os.kill(worker, signal.SIGKILL)
    while worker in pool.worker_pids():  # (its death seen by the pool)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        os.kill(helper, signal.SIGKILL)
    except ProcessLookupError:
        pass  # (the pool found it stopped, and killed it first)
    assert [pool.submit(pow, 2, i).result(60) for i in range(20)] == [2**i for i in range(20)]
    pool.shutdown()
    return [helper]


if __name__ == "__main__":
    method = sys.argv[1]
    # The zygote dies (its standby takes over); then both at once (the
    # standby may die first, still the zygote's to reap).
    victims = one_pool(method, ["zygote"]) + one_pool(method, ["zygote", "zygote-standby"])
    if method != "spawn":
        victims += stopped_helper(method)
    zombies = [
        child.pid
        for child in psutil.Process().children()
        # (A dead fork server is multiprocessing's: its next start reaps it.)
        if child.status() == psutil.STATUS_ZOMBIE
        and not (method == "forkserver" and child.pid in victims)
    ]
    print("zombies:", zombies)
"""


@needs_pidfds
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a subreaper is Linux's")
def test_in_a_process_that_inherits_orphans_a_dead_helper_s_workers_are_reaped(
    start_method: str,
) -> None:
    # When a zygote or the fork server dies, the workers it started are
    # orphans: they go to the nearest subreaper, here the pool's process
    # (PID 1 of a container is one), which must reap them once they exit.
    out = run_script(_SUBREAPER_SCRIPT, start_method)
    assert out.strip() == "zombies: []", out


_SLOW_ZYGOTE_SCRIPT = """
import multiprocessing, time
import duckpool
from duckpool import _zygote_process
from duckpool._pool import _dispatcher

# The zygote forks each worker slowly (inherited with the fork: it is patched
# before), and the pool gives it little time to leave at shutdown: it is
# killed while it still forks the pool's first workers.
start_one = _zygote_process._start_one

def slow_start_one(*args, **kwargs):
    time.sleep(0.05)
    return start_one(*args, **kwargs)

_zygote_process._start_one = slow_start_one
_dispatcher.KILL_GRACE_SECONDS = 0.1
pool = duckpool.ProcessPoolExecutor(8, multiprocessing.get_context("fork"))
assert pool.submit(pow, 2, 3).result(60) == 8
pool.shutdown()
"""


def _marked_processes(marker: str) -> list[int]:
    """The processes whose environment holds ``marker``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as env:
                    if marker.encode() in env.read().split(b"\0"):
                        found.append(int(name))
            except OSError:
                pass
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_a_zygote_killed_at_shutdown_had_forked_leave_with_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Their answers unread, those workers were known to no one but the
    # zygote, which held (and gave each) a copy of the pool's end of its
    # control socket: the answers queued there kept each one's task pipe
    # open, and they waited on it for ever, orphans.
    marker = f"DUCKPOOL_TEST_MARK=slow-zygote-{os.getpid()}"
    monkeypatch.setenv(*marker.split("=", 1))
    try:
        run_script(_SLOW_ZYGOTE_SCRIPT)
        wait_until(lambda: not _marked_processes(marker), TIMEOUT)
    finally:
        for pid in _marked_processes(marker):
            kill_quietly(pid)


@pytest.fixture(params=["pidfds", "no pidfds"])
def watched(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How the pool watches processes it did not fork: through pidfds, or
    (macOS, the BSDs, Linux before 5.3) without."""
    if request.param == "pidfds":
        if not _child.has_pidfds():
            pytest.skip("needs pidfds (Linux 5.3+), hidden or missing here")
    else:
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    return str(request.param)


def test_the_fork_server_dying_fails_no_running_task(tmp_path: Path, watched: str) -> None:
    # Without pidfds a worker's own sentinel is its connection to the fork
    # server, which reads as its exit once the server is gone: told apart.
    ctx = multiprocessing.get_context("forkserver")
    pool = duckpool.ProcessPoolExecutor(2, ctx)
    gate = tmp_path / "gate"
    try:
        started = tmp_path / "started"
        running = pool.submit(tasks.touch_then_wait, str(started), str(gate))
        wait_until(started.exists, TIMEOUT)
        server = fork_server_pid()
        assert server is not None
        kill_quietly(server)
        wait_until(lambda: process_gone(server), TIMEOUT)
        # Its workers live on: the pool must not take them for dead.
        ok = [pool.submit(tasks.add, i, 1) for i in range(20)]
        assert [f.result(TIMEOUT) for f in ok] == [i + 1 for i in range(20)]
        gate.touch()
        assert running.result(TIMEOUT) == "released"
        assert pool.stats().worker_deaths == 0
        # A replacement is started through a new fork server.
        for pid in pool.worker_pids():
            kill_quietly(pid)
        assert pool.submit(tasks.add, 2, 3).result(TIMEOUT) == 5
    finally:
        gate.touch()
        pool.shutdown()


def test_the_fork_server_dying_costs_a_successor_no_death(watched: str) -> None:
    # With max_tasks_per_child a successor starts ahead of its worker's exit,
    # through the fork server; the server's death is not the successor's.
    ctx = multiprocessing.get_context("forkserver")
    pool = duckpool.ProcessPoolExecutor(1, ctx, max_tasks_per_child=10)
    try:
        assert [pool.submit(tasks.add, i, 1).result(TIMEOUT) for i in range(6)] == list(range(1, 7))
        server = fork_server_pid()
        assert server is not None
        # The worker and its successor, both the server's children.
        wait_until(lambda: len(psutil.Process(server).children()) == 2, TIMEOUT)
        kill_quietly(server)
        wait_until(lambda: process_gone(server), TIMEOUT)
        futures = [pool.submit(tasks.add, i, 1) for i in range(30)]
        assert [f.result(TIMEOUT) for f in futures] == [i + 1 for i in range(30)]
        assert pool.stats().worker_deaths == 0
    finally:
        pool.shutdown()
    assert pool.stats().stopped


def test_a_stopped_fork_server_does_not_hang_the_pool(short_graces: None, watched: str) -> None:
    # A start through a stopped server would block its thread (here the
    # dispatcher) forever: the server is killed, the start retried through
    # a new one, and the pool serves on.
    ctx = multiprocessing.get_context("forkserver")
    pool = duckpool.ProcessPoolExecutor(2, ctx)
    server: Optional[int] = None
    try:
        assert [f.result(TIMEOUT) for f in [pool.submit(tasks.add, i, 1) for i in range(4)]]
        server = fork_server_pid()
        assert server is not None
        os.kill(server, signal.SIGSTOP)
        victim = pool.worker_pids()[0]
        kill_quietly(victim)  # its replacement is started through the stopped server
        futures = [pool.submit(tasks.add, i, 1) for i in range(20)]
        assert [f.result(TIMEOUT) for f in futures] == [i + 1 for i in range(20)]
        wait_until(lambda: process_gone(server), TIMEOUT)
        wait_until(lambda: len(set(pool.worker_pids()) - {victim}) == 2, TIMEOUT)
        assert pool.submit(tasks.add, 2, 3).result(TIMEOUT) == 5
        assert pool.stats().worker_deaths == 1
    finally:
        if server is not None and not process_gone(server):
            os.kill(server, signal.SIGCONT)
        pool.shutdown()


def test_a_fork_server_stopped_at_the_first_start_costs_the_first_submit_nothing(
    short_graces: None, watched: str
) -> None:
    # The first worker is started in the caller's thread, inside submit():
    # the stopped server is killed, and the start retried through a new one
    # (as any start is), not raised to the caller as the server's EOF.
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    forkserver.ensure_running()
    server = fork_server_pid()
    assert server is not None
    os.kill(server, signal.SIGSTOP)
    pool = duckpool.ProcessPoolExecutor(2, ctx)
    try:
        first = pool.submit(tasks.add, 20, 22)
        assert first.result(TIMEOUT) == 42
        assert [pool.submit(tasks.add, i, 1).result(TIMEOUT) for i in range(4)] == [1, 2, 3, 4]
        wait_until(lambda: process_gone(server), TIMEOUT)
        assert pool.stats().worker_deaths == 0
    finally:
        if not process_gone(server):
            os.kill(server, signal.SIGCONT)
        pool.shutdown()


def test_the_fork_server_watch_leaves_no_thread_behind_once_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The thread that watches starts through the fork server ends once it
    # has had nothing to watch for a while; the next start makes another.
    from duckpool import _fork_server

    monkeypatch.setattr(_fork_server, "IDLE_SECONDS", 0.2)
    name = "duckpool-fork-server-watch"

    def watching() -> bool:
        return name in [t.name for t in threading.enumerate()]

    ctx = multiprocessing.get_context("forkserver")
    for _ in range(2):
        with duckpool.ProcessPoolExecutor(2, ctx) as pool:
            assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
        wait_until(lambda: not watching(), TIMEOUT)


def test_shutdown_kills_a_fork_server_found_stopped(watched: str) -> None:
    # Stopped while the pool is idle, the server is looked at by no start;
    # it would outlive the program (it leaves once it reads EOF).
    pool = duckpool.ProcessPoolExecutor(2, multiprocessing.get_context("forkserver"))
    server: Optional[int] = None
    try:
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
        server = fork_server_pid()
        assert server is not None
        os.kill(server, signal.SIGSTOP)
        wait_until(lambda: _child.is_stopped(server), TIMEOUT)
    finally:
        pool.shutdown()
    wait_until(lambda: process_gone(server), TIMEOUT)  # (SIGKILL takes a moment)
    # The next pool starts a new server.
    with duckpool.ProcessPoolExecutor(1, multiprocessing.get_context("forkserver")) as again:
        assert again.submit(tasks.add, 2, 2).result(TIMEOUT) == 4
    assert fork_server_pid() != server


def test_a_worker_stopped_before_it_is_ready_is_replaced(
    ctx: multiprocessing.context.BaseContext, tmp_path: Path, short_graces: None
) -> None:
    # Stopped in its initializer, a worker would hold the task sent to it for
    # ever: the start-up watch kills it, and a new worker runs the task.
    gate = tmp_path / "gate"
    pool = duckpool.ProcessPoolExecutor(
        1, ctx, initializer=tasks.init_wait_for_file, initargs=(str(gate),)
    )
    stopped: Optional[int] = None
    try:
        future = pool.submit(tasks.add, 2, 3)
        wait_until(lambda: bool(pool.worker_pids()), TIMEOUT)
        stopped = pool.worker_pids()[0]
        os.kill(stopped, signal.SIGSTOP)
        gate.touch()  # (a new worker's initializer returns at once)
        assert future.result(TIMEOUT) == 5
        assert process_gone(stopped)
        assert stopped not in pool.worker_pids()
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
    finally:
        gate.touch()
        if stopped is not None and not process_gone(stopped):
            kill_quietly(stopped)
        pool.shutdown()


@pytest.mark.parametrize("workers", [2, 1])
def test_a_worker_stopped_while_idle_is_replaced_and_what_it_held_runs_elsewhere(
    ctx: multiprocessing.context.BaseContext, short_graces: None, workers: int
) -> None:
    # Stopped (SIGSTOP) while idle, a ready worker is still handed work: what
    # it holds would never start, and a shutdown waiting for it never end.
    # Seen not taking up its first item, and stopped, it is killed; its items
    # (none started) go to the other worker and to its replacement.  Alone
    # in an idle pool, nothing else would wake the dispatcher: the caller
    # hands the item straight to it, and no result ever comes.
    pool = duckpool.ProcessPoolExecutor(workers, ctx)
    stopped: Optional[int] = None
    try:
        ready = set(pool.map(tasks.sleep_then_getpid, [0.05] * 2 * workers))
        assert len(ready) == workers
        stopped = pool.worker_pids()[0]
        os.kill(stopped, signal.SIGSTOP)
        futures = [pool.submit(tasks.add, i, 1) for i in range(20)]
        assert [f.result(TIMEOUT) for f in futures] == [i + 1 for i in range(20)]
        wait_until(lambda: process_gone(stopped), TIMEOUT)
        assert stopped not in pool.worker_pids()
        assert pool.stats().worker_deaths == 1
    finally:
        closing = threading.Thread(target=pool.shutdown, daemon=True)
        closing.start()
        closing.join(TIMEOUT)
        if stopped is not None and not process_gone(stopped):
            kill_quietly(stopped)
    assert not closing.is_alive(), "shutdown waited for the stopped worker"


def test_shutdown_kills_workers_found_stopped_without_waiting_out_its_grace(
    ctx: multiprocessing.context.BaseContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stopped worker cannot leave when told to: shutdown would wait out
    # its whole grace (here, an hour) before terminating it.
    from duckpool import _core
    from duckpool._pool import _supervisor

    for module in (_supervisor, _core):
        monkeypatch.setattr(module, "STOP_GRACE_SECONDS", 3600.0)
    pool = duckpool.ProcessPoolExecutor(2, ctx)
    assert len(set(pool.map(tasks.sleep_then_getpid, [0.05] * 4))) == 2
    workers = pool.worker_pids()
    try:
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
    finally:
        closing = threading.Thread(target=pool.shutdown, daemon=True)
        closing.start()
        closing.join(TIMEOUT)
    stuck = [pid for pid in workers if not process_gone(pid)]
    for pid in stuck:
        kill_quietly(pid)
    assert not closing.is_alive(), "shutdown waited out the grace of stopped workers"
    assert not stuck


INHERITED_LOCK_MAIN = """
import multiprocessing, os, sys, threading
import duckpool
from duckpool._pool import _deadlines

_deadlines.START_CHECK_SECONDS = 0.2
held = threading.Lock()
holding = threading.Event()
release = threading.Event()
marker = sys.argv[1]


forks = 0  # (made here so far: a child sees how many came before it)


def count_fork():
    global forks
    forks += 1


def block_the_first_child():
    # Only the first process forked from here: the pool's first worker (not
    # the zygote, forked next, which may run first on a loaded machine).
    if forks:
        return
    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    held.acquire()  # a thread of the parent held it at the fork: for ever


def hold():
    with held:
        holding.set()
        release.wait(60)


if __name__ == "__main__":
    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(60)  # (held at the fork, not merely about to be)
    os.register_at_fork(after_in_parent=count_fork, after_in_child=block_the_first_child)
    pool = duckpool.ProcessPoolExecutor(1, multiprocessing.get_context("fork"))
    try:
        print(pool.submit(pow, 2, 5).result(30), pool.stats().worker_deaths)
    finally:
        release.set()
        pool.shutdown()
        holder.join()
"""


def test_a_first_worker_blocked_on_a_lock_it_inherited_is_replaced(tmp_path: Path) -> None:
    # Under fork, the first worker is forked from this process, whose other
    # threads may hold a lock at that instant: the child waits on it for
    # ever.  The start-up watch sees it asleep without using CPU, kills it,
    # and the zygote (one thread) forks its replacement, which runs the task.
    script = tmp_path / "main.py"
    script.write_text(INHERITED_LOCK_MAIN)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "blocked")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["32", "1"]
    assert (tmp_path / "blocked").exists()  # (the hook did block a child)


def test_workers_stopped_before_ready_three_times_in_a_row_break_the_pool(
    ctx: multiprocessing.context.BaseContext, tmp_path: Path, short_graces: None
) -> None:
    # Each kill by the start-up watch is a failed start: retried, but not for
    # ever.  MAX_STARTUP_DEATHS in a row break the pool, with the reason.
    from duckpool._pool import _launcher

    gate = tmp_path / "gate"  # never opened: no worker gets ready
    pool = duckpool.ProcessPoolExecutor(
        1, ctx, initializer=tasks.init_wait_for_file, initargs=(str(gate),)
    )
    stopped: list[int] = []
    try:
        future = pool.submit(tasks.add, 2, 3)

        def stop_each_new_worker() -> bool:
            for pid in pool.worker_pids():
                if pid not in stopped:
                    stopped.append(pid)
                    os.kill(pid, signal.SIGSTOP)
            return future.done()

        wait_until(stop_each_new_worker, TIMEOUT)
        error = future.exception(0)
        assert isinstance(error, BrokenProcessPool), error
        assert f"{_launcher.MAX_STARTUP_DEATHS} worker processes in a row" in str(error)
        assert "was stopped" in str(error)
        assert len(stopped) == _launcher.MAX_STARTUP_DEATHS
        wait_until(lambda: all(process_gone(pid) for pid in stopped), TIMEOUT)
        with pytest.raises(BrokenProcessPool):
            pool.submit(tasks.add, 1, 1)
    finally:
        for pid in stopped:
            if not process_gone(pid):
                kill_quietly(pid)
        pool.shutdown()


def _failing_starts(
    monkeypatch: pytest.MonkeyPatch, failures: Optional[int], error: BaseException
) -> list[int]:
    """Make the next ``failures`` direct worker starts (all, with None) raise ``error``."""
    from duckpool import _spawn

    real = _spawn.start_worker_process
    calls: list[int] = []

    def start(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if failures is None or len(calls) <= failures:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(_spawn, "start_worker_process", start)
    return calls


@pytest.mark.parametrize(
    "error",
    [
        EOFError("unexpected EOF"),
        # (A burst of descriptors used elsewhere in the program: it passes.)
        OSError(errno.EMFILE, "Too many open files"),
    ],
    ids=["fork server EOF", "EMFILE"],
)
@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_a_start_that_fails_for_a_transient_reason_is_retried(
    ctx: multiprocessing.context.BaseContext, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    # (Under fork, starts are the zygote's; its death is tested above.)
    pool = duckpool.ProcessPoolExecutor(1, ctx)
    try:
        first = pool.submit(tasks.getpid).result(TIMEOUT)
        calls = _failing_starts(monkeypatch, 3, error)
        kill_quietly(first)
        assert pool.submit(tasks.add, 1, 2).result(TIMEOUT) == 3
        assert len(calls) == 4
        assert pool.stats().worker_deaths == 1
    finally:
        pool.shutdown()


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_starts_that_keep_failing_break_the_pool_with_their_cause(
    ctx: multiprocessing.context.BaseContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    from duckpool._pool import _launcher

    monkeypatch.setattr(_launcher, "START_GIVE_UP_SECONDS", 0.3)
    pool = duckpool.ProcessPoolExecutor(1, ctx)
    try:
        first = pool.submit(tasks.getpid).result(TIMEOUT)
        fds_before = len(os.listdir("/proc/self/fd"))
        _failing_starts(monkeypatch, None, BrokenPipeError(32, "Broken pipe"))
        kill_quietly(first)
        queued = pool.submit(tasks.add, 1, 2)
        with pytest.raises(BrokenProcessPool) as failure:
            queued.result(TIMEOUT)
        assert isinstance(failure.value.__cause__, BrokenPipeError), failure.value.__cause__
        wait_until(lambda: bool(pool._broken), TIMEOUT)
        with pytest.raises(BrokenProcessPool, match="could not start a worker"):
            pool.submit(tasks.add, 1, 1)
    finally:
        pool.shutdown()
    assert len(os.listdir("/proc/self/fd")) <= fds_before


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_a_start_failing_for_good_breaks_the_pool_at_once(
    ctx: multiprocessing.context.BaseContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = duckpool.ProcessPoolExecutor(1, ctx)
    try:
        first = pool.submit(tasks.getpid).result(TIMEOUT)
        _failing_starts(monkeypatch, None, TypeError("cannot pickle the initializer"))
        kill_quietly(first)
        with pytest.raises(BrokenProcessPool) as failure:
            pool.submit(tasks.add, 1, 2).result(TIMEOUT)
        assert isinstance(failure.value.__cause__, TypeError)
    finally:
        pool.shutdown()


def test_a_worker_held_up_by_a_finalizer_after_its_task_is_not_killed(
    ctx: multiprocessing.context.BaseContext,
    monkeypatch: pytest.MonkeyPatch,
    short_graces: None,
    tmp_path: Path,
) -> None:
    # A task raises holding a resource whose close blocks: the worker runs the
    # finalizer after sending the error, with the next task already read from
    # its pipe (tasks stream in).  It is busy, not starved of bytes a task took
    # from its pipe: the watch for those looks on and leaves it be.  (It used
    # to kill it at the second look, cutting the close short.)
    from duckpool._pool import _deadlines

    looks: list[bool] = []
    real = _deadlines.Deadlines._starved

    def starved(self: Any, *args: Any) -> bool:
        looks.append(real(self, *args))
        return looks[-1]

    monkeypatch.setattr(_deadlines.Deadlines, "_starved", starved)
    started, gate = tmp_path / "closing", tmp_path / "gate"
    pool = duckpool.ProcessPoolExecutor(1, ctx)
    try:
        worker = pool.submit(tasks.getpid).result(TIMEOUT)
        stream = [pool.submit(tasks.add, i, 1) for i in range(100)]
        failing = pool.submit(tasks.fail_leaving_a_slow_finalizer, str(started), str(gate))
        after = pool.submit(tasks.getpid)
        wait_until(started.exists, TIMEOUT)
        wait_until(lambda: len(looks) >= 5 or any(looks), TIMEOUT)  # (it killed at the second)
        gate.touch()
        assert [f.result(TIMEOUT) for f in stream] == list(range(1, 101))
        with pytest.raises(ValueError, match="resource left to close"):
            failing.result(TIMEOUT)
        assert after.result(TIMEOUT) == worker
        assert pool.stats().worker_deaths == 0
        assert not any(looks)
    finally:
        gate.touch()
        pool.shutdown()


def test_a_first_task_taken_up_before_its_worker_is_installed_reads_as_started(
    ctx: multiprocessing.context.BaseContext, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The first worker starts with its first task in its pipe, and may take it
    # up before the pool has installed it: installing must not clear the
    # mark that task is running (it would then fail as never started).
    from duckpool._pool import _launcher

    started, gate = tmp_path / "started", tmp_path / "gate"
    real = _launcher.Launcher.install_worker
    installs: list[int] = []

    def late_install(self: Any, *args: Any, **kwargs: Any) -> None:
        if not installs:
            wait_until(started.exists, TIMEOUT)
        installs.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(_launcher.Launcher, "install_worker", late_install)
    pool = duckpool.ProcessPoolExecutor(1, ctx)
    try:
        future = pool.submit(tasks.touch_then_wait, str(started), str(gate))
        wait_until(started.exists, TIMEOUT)
        pool.kill_workers()
        error = future.exception(TIMEOUT)
        assert isinstance(error, duckpool.WorkerDiedError), repr(error)
    finally:
        gate.touch()
        pool.shutdown()


def test_starts_the_zygote_keeps_failing_break_the_pool_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A failure the zygote answers with is retried as any other, and breaks
    # the pool once starts have failed for START_GIVE_UP_SECONDS: a request
    # sent again is no start (it used to reset that clock, and the pool
    # retried for ever, its queued futures unresolved).
    from duckpool import _spawn
    from duckpool._pool import _launcher

    here = os.getpid()
    real = _spawn.start_worker_process

    def in_the_zygote_too_many_files(*args: Any, **kwargs: Any) -> Any:
        if os.getpid() != here:  # (the zygote inherits this)
            raise OSError(errno.EMFILE, "Too many open files")
        return real(*args, **kwargs)

    monkeypatch.setattr(_spawn, "start_worker_process", in_the_zygote_too_many_files)
    monkeypatch.setattr(_launcher, "START_GIVE_UP_SECONDS", 0.5)
    pool = duckpool.ProcessPoolExecutor(1, multiprocessing.get_context("fork"))
    try:
        kill_quietly(pool.submit(tasks.getpid).result(TIMEOUT))  # its successor: the zygote's
        with pytest.raises(BrokenProcessPool, match="Too many open files"):
            pool.submit(tasks.add, 1, 2).result(TIMEOUT)
    finally:
        pool.shutdown()


@pytest.mark.parametrize("where", ["before-start", "start", "before-install", "after-install"])
def test_ctrl_c_as_the_first_worker_starts_leaves_no_worker_and_runs_nothing(
    ctx: multiprocessing.context.BaseContext,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    where: str,
) -> None:
    # submit() raises KeyboardInterrupt: the task it was given must not run
    # later (it may have run in the new worker, whose pipe it was in), and
    # that worker, which the pool then does not keep, must not live on.  The Ctrl-C
    # strikes before the start (the task must not be queued again for the
    # next worker: it was), as it ends, before the worker is installed, or after.
    # (Raised there rather than signalled: a signal another thread of this
    # process takes would strike the main thread wherever it is by then.)
    from duckpool import _spawn
    from duckpool._pool import _launcher

    real_start = _spawn.start_worker_process
    real_install = _launcher.Launcher.install_worker
    interrupted: list[int] = []

    def interrupted_start(*args: Any, **kwargs: Any) -> Any:
        started = real_start(*args, **kwargs)
        if where == "start" and not interrupted:
            interrupted.append(started[0].pid)
            raise KeyboardInterrupt
        return started

    def interrupted_install(launcher: Any, slot: Any, process: Any, *rest: Any, **kw: Any) -> None:
        if where == "after-install" or interrupted:
            real_install(launcher, slot, process, *rest, **kw)
        if not interrupted:
            interrupted.append(process.pid)
            raise KeyboardInterrupt

    real_first = _launcher.Launcher.start_first

    def interrupted_first(launcher: Any) -> None:
        if not interrupted:
            interrupted.append(0)  # (no process: the task waits in its slot)
            raise KeyboardInterrupt
        real_first(launcher)

    monkeypatch.setattr(_spawn, "start_worker_process", interrupted_start)
    if where == "before-start":
        monkeypatch.setattr(_launcher.Launcher, "start_first", interrupted_first)
    elif where != "start":
        monkeypatch.setattr(_launcher.Launcher, "install_worker", interrupted_install)
    runs = tmp_path / "runs"
    pool = duckpool.ProcessPoolExecutor(2, ctx)
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            pool.submit(tasks.note_pid, str(runs))
        assert pool.worker_pids() == []  # (not kept, whatever it holds)
        worker = pool.submit(tasks.note_pid, str(runs)).result(TIMEOUT)
        # (Its traceback kept, as an interactive session keeps the last one.)
        if interrupted[0]:
            wait_until(lambda: process_gone(interrupted[0]), TIMEOUT)
        assert caught.value is not None
        assert pool.stats().restarts == 0
    finally:
        pool.shutdown()
    # Never run by the next worker; the one killed had it in its pipe, and
    # may have run it first (failures.md says so).
    ran = runs.read_text().split()
    assert ran in ([str(worker)], [str(interrupted[0]), str(worker)]), (ran, interrupted)


def test_ctrl_c_as_the_dispatcher_thread_starts_leaves_one_dispatcher(
    ctx: multiprocessing.context.BaseContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The interrupt strikes once the thread exists: it runs all the same, and
    # the next submit() must not start a second one (it used to).
    from duckpool import _threads

    real = _threads.QuickStartThread.start
    interrupted: list[bool] = []

    def interrupted_start(thread: Any) -> None:
        real(thread)
        if not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt

    monkeypatch.setattr(_threads.QuickStartThread, "start", interrupted_start)
    pool = duckpool.ProcessPoolExecutor(2, ctx)
    name = f"duckpool-dispatcher-{id(pool._core):x}"
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.submit(abs, -1)
        assert pool.submit(abs, -2).result(TIMEOUT) == 2
        assert [t.name for t in threading.enumerate()].count(name) == 1
    finally:
        pool.shutdown()
    wait_until(lambda: name not in [t.name for t in threading.enumerate()], TIMEOUT)


@pytest.fixture
def held_worker(
    ctx: multiprocessing.context.BaseContext, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[tuple[duckpool.ProcessPoolExecutor, Future[Any], Path]]:
    """A pool of one worker, running a first task until the file ``gate``
    exists; every task submitted next waits in that worker's pipe behind it,
    whatever the scheduler would judge.  Yields the pool, the first task's
    future and ``gate``; the gate is opened and the pool shut down after."""
    pool = duckpool.ProcessPoolExecutor(1, ctx)
    started, gate = tmp_path / "started", tmp_path / "gate"
    try:
        first = pool.submit(tasks.touch_then_wait, str(started), str(gate))
        wait_until(started.exists, TIMEOUT)
        monkeypatch.setattr(pool._core.scheduler, "can_prefetch", lambda slot, item, now: True)
        yield pool, first, gate
    finally:
        gate.touch()
        pool.shutdown()


def test_every_task_cancelled_in_one_worker_s_pipe_is_skipped(
    held_worker: tuple[duckpool.ProcessPoolExecutor, Future[Any], Path], tmp_path: Path
) -> None:
    # Several tasks wait in one worker's pipe and each is cancelled: each
    # fails at once and none runs (a single skip cell per worker used to
    # keep only the last one: the others ran, their futures saying cancelled).
    pool, first, gate = held_worker
    queued = [pool.submit(tasks.touch, str(tmp_path / f"ran-{n}")) for n in range(6)]
    wait_until(lambda: all(future.running() for future in queued), TIMEOUT)
    assert all(pool.cancel_task(future) for future in queued)
    after = pool.submit(tasks.add, 1, 1)  # (behind them in the same pipe)
    for future in queued:
        assert isinstance(future.exception(0), duckpool.TaskCancelledError)
    gate.touch()
    assert first.result(TIMEOUT) == "released"
    assert after.result(TIMEOUT) == 2
    assert sorted(tmp_path.glob("ran-*")) == []


def test_a_task_cancelled_in_a_pipe_as_its_worker_dies_never_runs_on_the_next(
    held_worker: tuple[duckpool.ProcessPoolExecutor, Future[Any], Path],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # cancel_task() marks the task under the pool's lock and fails its future
    # just after.  Should the worker die in between, the task comes back from
    # it, and must not go to the next worker (it did: its future not failed yet).
    from duckpool._pool import _supervisor

    pool, first, _ = held_worker
    ran = tmp_path / "ran"
    fail = _supervisor.set_exception
    victims: list[Any] = []

    def worker_dies_first(future: Any, error: Any) -> None:
        if future not in victims:  # (the supervisor's other failures)
            fail(future, error)
            return
        victims.clear()
        (pid,) = pool.worker_pids()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: pool.worker_pids() not in ([], [pid]), TIMEOUT)
        # (Once this one's result is back, the replacement has been sent
        # whatever the pool would send it.)
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
        fail(future, error)

    victim = pool.submit(tasks.touch, str(ran))
    wait_until(victim.running, TIMEOUT)  # (in the pipe, behind the first)
    victims.append(victim)
    monkeypatch.setattr(_supervisor, "set_exception", worker_dies_first)
    assert pool.cancel_task(victim)
    assert isinstance(victim.exception(TIMEOUT), duckpool.TaskCancelledError)
    assert isinstance(first.exception(TIMEOUT), duckpool.WorkerDiedError)
    assert not ran.exists()


def test_a_task_run_whose_answer_is_unread_is_not_cancelled_as_never_started(
    held_worker: tuple[duckpool.ProcessPoolExecutor, Future[Any], Path], tmp_path: Path
) -> None:
    # The worker ran the task behind its first one, and the pool has read
    # neither answer yet: that task was taken up, so it cannot be cancelled
    # as one still waiting in the pipe (it used to fail with "cancelled
    # before it started", having run to the end).
    pool, first, gate = held_worker
    core = pool._core
    ran = tmp_path / "ran"
    behind = pool.submit(tasks.touch, str(ran))
    wait_until(behind.running, TIMEOUT)
    with core.lock:  # (no answer is booked meanwhile)
        gate.touch()
        wait_until(ran.exists, TIMEOUT)
        slot = next(s for s in core.slots if s.assigned)
        reading = 2 * core.capacity + slot.index  # (done, it waits for more)
        wait_until(
            lambda: (
                core.marks[slot.index] == slot.assigned[-1].task_id and core.marks[reading] == 1
            ),
            TIMEOUT,
        )
        assert core.supervisor.cancel_running(behind, running=False) == (False, None)
        assert core.supervisor.cancel_running(behind) == (False, None)
    assert first.result(TIMEOUT) == "released"
    assert behind.result(TIMEOUT) is None


def test_a_task_cancelled_in_a_worker_s_pipe_never_runs_after_that_worker_dies(
    ctx: multiprocessing.context.BaseContext, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # cancel_task() on a task queued behind a running one fails its future at
    # once; if that worker then dies, the task comes back (it never started)
    # and must not run on another worker (it used to).
    pool = duckpool.ProcessPoolExecutor(2, ctx)
    core = pool._core
    paths = {name: tmp_path / name for name in ("a", "a-gate", "b", "b-gate", "ran")}
    try:
        first = pool.submit(tasks.touch_then_wait, str(paths["a"]), str(paths["a-gate"]))
        wait_until(paths["a"].exists, TIMEOUT)
        second = pool.submit(tasks.touch_then_wait, str(paths["b"]), str(paths["b-gate"]))
        wait_until(paths["b"].exists, TIMEOUT)
        holder = next(s for s in core.slots if s.assigned and s.assigned[0].future is second)
        # (Placed behind the second task, whatever the scheduler would judge.)
        monkeypatch.setattr(core.scheduler, "can_prefetch", lambda slot, item, now: slot is holder)
        victim = pool.submit(tasks.touch, str(paths["ran"]))
        with core.lock:  # (as the dispatcher would at the next result)
            core.scheduler.dispatch_pending()
        assert any(item.future is victim for item in holder.assigned)
        paths["a-gate"].touch()
        assert first.result(TIMEOUT) == "released"  # (its worker is idle now)
        assert pool.cancel_task(victim)
        assert isinstance(victim.exception(TIMEOUT), CancelledError)
        assert holder.process is not None and holder.process.pid is not None
        kill_quietly(holder.process.pid)
        assert isinstance(second.exception(TIMEOUT), duckpool.WorkerDiedError)
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
    finally:
        for gate in ("a-gate", "b-gate"):
            paths[gate].touch()
        pool.shutdown()
    assert not paths["ran"].exists(), "the cancelled task ran"


def test_an_interrupted_start_leaves_the_slot_s_frames_for_its_next_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A start interrupted (Ctrl-C in the thread starting it: resize(),
    # prestart()) once the frames were written ahead to the new worker, which
    # is then discarded: the slot keeps them for its next worker (they were
    # lost, and only the starved-worker watch, killing a healthy worker
    # seconds later, brought them back).
    from duckpool._pool import _launcher

    def interrupted(self: Any, slot_index: int, ahead: Any = None, started: Any = None) -> Any:
        ahead.popleft()  # (written to the worker, which is then discarded)
        raise KeyboardInterrupt

    pool = duckpool.ProcessPoolExecutor(
        2, multiprocessing.get_context("spawn"), min_workers=1, idle_timeout=60
    )
    core = pool._core
    try:
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
        slot = core.slots[1]  # (parked: no worker, and none is started)
        monkeypatch.setattr(_launcher.Launcher, "launch", interrupted)
        with core.lock:
            assert slot.process is None and slot.parked
            slot.outbox.append(memoryview(b"frames"))
            try:
                with pytest.raises(KeyboardInterrupt):
                    core.launcher.start_worker(slot)
                assert [bytes(view) for view in slot.outbox] == [b"frames"]
            finally:
                slot.outbox.clear()
    finally:
        pool.shutdown()


def test_a_task_cancelled_while_its_slot_awaits_its_worker_never_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Under fork the second worker comes from the zygote: a task given to its
    # slot meanwhile, then cancelled, is marked to be skipped; installing the
    # worker must keep that mark (it used to clear it, and the task ran).
    from duckpool import _zygote

    release = threading.Event()
    real = _zygote.Zygote.receive_started

    def held(self: Any) -> Any:
        release.wait(TIMEOUT)  # (the dispatcher, without the pool's lock)
        return real(self)

    monkeypatch.setattr(_zygote.Zygote, "receive_started", held)
    started, gate, ran = tmp_path / "started", tmp_path / "gate", tmp_path / "ran"
    pool = duckpool.ProcessPoolExecutor(2, multiprocessing.get_context("fork"))
    try:
        blocker = pool.submit(tasks.touch_then_wait, str(started), str(gate))
        wait_until(started.exists, TIMEOUT)
        victim = pool.submit(tasks.touch, str(ran))
        assert pool.cancel_task(victim)
        release.set()
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2  # (on the second worker)
        gate.touch()
        assert blocker.result(TIMEOUT) == "released"
        assert victim.cancelled() or isinstance(victim.exception(TIMEOUT), CancelledError)
        assert not ran.exists(), "the cancelled task ran"
    finally:
        release.set()
        gate.touch()
        pool.shutdown()


@pytest.mark.parametrize("recycled", [None, 1], ids=["", "max_tasks_per_child"])
def test_a_first_start_that_fails_for_good_raises_from_submit_and_queues_nothing(
    ctx: multiprocessing.context.BaseContext,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    recycled: Optional[int],
) -> None:
    # The first task waits in its slot until the first worker is started
    # with it in its pipe: when that start fails for a reason a retry would
    # meet again, submit() raises, and the task must neither run later nor
    # hold the slot (nor count as sent to it: with max_tasks_per_child=1, the
    # slot would wait for a worker to retire).
    calls = _failing_starts(monkeypatch, 1, OSError(errno.EPERM, "fork forbidden"))
    pool = duckpool.ProcessPoolExecutor(1, ctx, max_tasks_per_child=recycled)
    marker = tmp_path / "ran"
    try:
        with pytest.raises(OSError, match="fork forbidden"):
            pool.submit(tasks.touch, str(marker))
        assert pool.submit(tasks.add, 1, 2).result(TIMEOUT) == 3
        assert pool.submit(tasks.add, 2, 2).result(TIMEOUT) == 4
        assert calls, "the first start never went through start_worker_process"
    finally:
        pool.shutdown()
    assert not marker.exists(), "the call whose submit() raised ran anyway"


@pytest.mark.parametrize(
    "error",
    [OSError(errno.EAGAIN, "fork refused"), EOFError("unexpected EOF")],
    ids=["EAGAIN", "fork-server-died"],
)
@pytest.mark.parametrize("recycled", [None, 1], ids=["", "max_tasks_per_child"])
def test_a_first_start_that_fails_for_a_passing_reason_is_retried_and_submit_returns(
    ctx: multiprocessing.context.BaseContext,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    recycled: Optional[int],
    error: BaseException,
) -> None:
    # The fork server dying while it starts the first worker, or a fork
    # refused for a moment, is no reason to refuse the task: the start is
    # retried (by the dispatcher, with backoff) and the task runs, once.
    calls = _failing_starts(monkeypatch, 2, error)
    pool = duckpool.ProcessPoolExecutor(1, ctx, max_tasks_per_child=recycled)
    marker = tmp_path / "ran"
    try:
        first = pool.submit(tasks.touch_count, str(marker))
        assert first.result(TIMEOUT) == 1
        assert pool.submit(tasks.add, 1, 2).result(TIMEOUT) == 3
        # (Under fork the zygote starts it instead, once it is forked.)
        assert len(calls) >= (1 if ctx.get_start_method() == "fork" else 3), calls
    finally:
        pool.shutdown()
    assert marker.read_text() == "x", "the first task did not run exactly once"


def test_a_new_worker_s_first_frames_are_in_its_pipe_before_it_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from collections import deque

    from duckpool import _spawn

    frames = deque([memoryview(b"a" * 10), memoryview(b"b" * 20)])
    seen: list[bytes] = []

    def spawned(config: Any, task_r: int, result_w: int) -> object:
        seen.append(os.read(task_r, 100))
        return object()

    monkeypatch.setattr(_spawn, "spawn_worker", spawned)
    monkeypatch.setattr(_spawn, "_SPAWN_DIRECTLY", True)
    spawn = multiprocessing.get_context("spawn")
    _, task_w, result_r = _spawn.start_worker_process(spawn, None, ahead=frames)  # type: ignore[arg-type]
    task_w.close()
    result_r.close()
    assert seen == [b"a" * 10 + b"b" * 20]
    assert not frames, "what the pipe took is still waiting to be sent"

    # A start that fails leaves the frames whole, for the next start.
    def refused(config: Any, task_r: int, result_w: int) -> object:
        raise OSError(errno.EAGAIN, "fork refused")

    monkeypatch.setattr(_spawn, "spawn_worker", refused)
    frames.extend([memoryview(b"c" * 10)])
    with pytest.raises(OSError):
        _spawn.start_worker_process(spawn, None, ahead=frames)  # type: ignore[arg-type]
    assert [bytes(view) for view in frames] == [b"c" * 10]


def test_a_pipe_too_small_for_the_first_frames_takes_what_it_can() -> None:
    import fcntl
    from collections import deque

    from duckpool import _spawn

    task_r, task_w = os.pipe()
    try:
        if fcntl.fcntl(task_w, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096) != 4096:
            pytest.skip("the pipe's size cannot be set to one page here")
        frames = deque([memoryview(b"x" * 3000), memoryview(b"y" * 3000)])
        assert _spawn._write_ahead(task_w, frames) == 4096
        assert os.read(task_r, 10000) == b"x" * 3000 + b"y" * 1096
        assert os.get_blocking(task_w)
    finally:
        os.close(task_r)
        os.close(task_w)


@needs_pidfds
def test_the_zygote_forks_the_first_workers_unasked() -> None:
    # The workers the pool wants when the zygote is forked come with the fork,
    # before the zygote runs anything else (see Zygote.fork): none is asked for.
    from duckpool import _zygote

    asked: list[int] = []
    real = _zygote.Zygote.request_start

    def request_start(self: Any, slot: int) -> None:
        asked.append(slot)
        real(self, slot)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_zygote.Zygote, "request_start", request_start)
        pool = duckpool.ProcessPoolExecutor(3, multiprocessing.get_context("fork"))
        try:
            assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
            wait_until(lambda: len(pool.worker_pids()) == 3, TIMEOUT)
            parents = {psutil.Process(pid).ppid() for pid in pool.worker_pids()}
            assert len(pool.worker_pids()) == 3
            assert os.getpid() in parents and len(parents) == 2  # the first, the zygote's
            assert asked == []
        finally:
            pool.shutdown()


def test_shutdown_returns_once_every_process_and_thread_is_gone(
    ctx: multiprocessing.context.BaseContext,
) -> None:
    for _ in range(5):
        pool = duckpool.ProcessPoolExecutor(2, ctx)
        pool.submit(tasks.add, 1, 1).result(TIMEOUT)
        pids = pool.worker_pids() + list(helper_pids(pool).values())
        thread = pool._core.thread
        pool.shutdown(wait=True)
        # At once, not eventually: wait=True promises it.
        assert all(process_gone(pid) for pid in pids), [p for p in pids if not process_gone(p)]
        assert thread is not None and not thread.is_alive()
        assert pool.stats().stopped
        assert "shut down" in repr(pool)


def test_no_dispatcher_thread_outlives_shutdown(ctx: multiprocessing.context.BaseContext) -> None:
    before = set(threading.enumerate())
    with duckpool.ProcessPoolExecutor(2, ctx) as pool:
        assert pool.submit(tasks.add, 2, 2).result(TIMEOUT) == 4
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]


def test_a_manager_s_pool_survives_every_process_killed_at_once(
    ctx: multiprocessing.context.BaseContext,
) -> None:
    manager = duckpool.get_or_create_process_manager("supervised")
    manager.start(max_workers=2, mp_context=ctx, process_name_prefix="supervised")
    try:
        assert manager.submit_task(tasks.add, 1, 1).result(TIMEOUT) == 2
        pool = manager.get_pool()
        if ctx.get_start_method() == "fork" and _child.has_pidfds():  # (no standby without)
            wait_until(lambda: "zygote-standby" in helper_pids(pool), TIMEOUT)
        victims = all_pool_processes(pool)
        for pid in victims:
            kill_quietly(pid)
        wait_until(lambda: all(process_gone(pid) for pid in victims), TIMEOUT)
        futures = [manager.submit_task(tasks.add, i, 2) for i in range(20)]
        assert [f.result(TIMEOUT) for f in futures] == [i + 2 for i in range(20)]
    finally:
        manager.stop()


def test_a_pool_that_has_shut_down_is_freed_by_reference_counting(
    ctx: multiprocessing.context.BaseContext,
) -> None:
    import gc
    import weakref

    gc.disable()  # what a pool holds (its initargs) must go without a collection
    try:
        marker = tasks.Token(1)
        pool = duckpool.ProcessPoolExecutor(2, ctx, initializer=tasks.identity, initargs=(marker,))
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
        pool.shutdown()
        gone = weakref.ref(marker)
        del pool, marker
        assert gone() is None
    finally:
        gc.enable()


def test_without_pidfds_a_dead_zygote_is_noticed_and_the_pool_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (Linux before 5.3, some sandboxes.)  The zygote's sentinel is then a
    # pipe its workers inherit: its death must be seen all the same.
    monkeypatch.delattr(os, "pidfd_open", raising=False)
    pool = duckpool.ProcessPoolExecutor(2, multiprocessing.get_context("fork"))
    try:
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
        zygote = helper_pids(pool)["zygote"]
        kill_quietly(zygote)
        wait_until(lambda: "zygote" not in helper_pids(pool), TIMEOUT)
        for pid in pool.worker_pids():
            kill_quietly(pid)
        futures = [pool.submit(tasks.add, i, 1) for i in range(20)]
        assert [f.result(TIMEOUT) for f in futures] == [i + 1 for i in range(20)]
    finally:
        pool.shutdown()
    assert pool.stats().stopped


@needs_pidfds  # (a standby is watched through pidfds: without, there is none)
@pytest.mark.parametrize(
    ("answer_seconds", "look_seconds"),
    [(0.5, 3600.0), (3600.0, 0.1)],
    ids=["silent-for-the-hung-bound", "found-stopped-before-it"],
)
def test_a_stopped_zygote_is_taken_for_hung_and_its_standby_takes_over(
    monkeypatch: pytest.MonkeyPatch, answer_seconds: float, look_seconds: float
) -> None:
    # Killed once it has answered nothing for the hung bound, or before
    # that, once found stopped when its answer is overdue.
    from duckpool._pool import _zygotes

    monkeypatch.setattr(_zygotes, "ANSWER_SECONDS", answer_seconds)
    monkeypatch.setattr(_zygotes, "ANSWER_LOOK_SECONDS", look_seconds)
    pool = duckpool.ProcessPoolExecutor(2, multiprocessing.get_context("fork"))
    try:
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
        wait_until(lambda: "zygote-standby" in helper_pids(pool), TIMEOUT)
        zygote, standby = helper_pids(pool)["zygote"], helper_pids(pool)["zygote-standby"]
        os.kill(zygote, signal.SIGSTOP)  # it will never answer
        for pid in pool.worker_pids():
            kill_quietly(pid)
        futures = [pool.submit(tasks.add, i, 1) for i in range(20)]
        assert [f.result(TIMEOUT) for f in futures] == [i + 1 for i in range(20)]
        assert helper_pids(pool)["zygote"] == standby
        wait_until(lambda: process_gone(zygote), TIMEOUT)
    finally:
        pool.shutdown()


def test_a_zygote_stopped_while_it_owes_a_worker_s_exit_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A recycled worker's exit reaches the pool only through its zygote's
    # report, and its replacement is asked for once that report is in: a
    # zygote stopped then owes nothing but the report.  Found stopped with it
    # overdue, the zygote is killed and its standby (or, without pidfds,
    # spawned workers) takes over.
    from duckpool._pool import _zygotes

    monkeypatch.setattr(_zygotes, "ANSWER_LOOK_SECONDS", 0.1)
    pool = duckpool.ProcessPoolExecutor(
        1, multiprocessing.get_context("fork"), max_tasks_per_child=1
    )
    try:
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2  # forked by the parent
        assert pool.submit(tasks.add, 2, 1).result(TIMEOUT) == 3  # by the zygote
        zygote = helper_pids(pool)["zygote"]
        os.kill(zygote, signal.SIGSTOP)
        futures = [pool.submit(tasks.add, i, 1) for i in range(4)]
        assert [f.result(TIMEOUT) for f in futures] == [1, 2, 3, 4]
        wait_until(lambda: process_gone(zygote), TIMEOUT)
    finally:
        pool.shutdown()


def test_without_epoll_the_pool_serves_and_heals(
    ctx: multiprocessing.context.BaseContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where select.epoll is missing, the dispatcher waits through selectors
    # and callers never read result pipes themselves.
    from duckpool import _core
    from duckpool._pool._waiter import SelectorWaiter

    monkeypatch.setattr(_core, "Waiter", SelectorWaiter)
    pool = duckpool.ProcessPoolExecutor(2, ctx)
    try:
        assert isinstance(pool._core.selector, SelectorWaiter)
        assert [f.result(TIMEOUT) for f in [pool.submit(tasks.add, i, 1) for i in range(50)]] == [
            i + 1 for i in range(50)
        ]
        assert pool.submit(tasks.add, 2, 2).result(TIMEOUT) == 4  # one at a time too
        for pid in pool.worker_pids():
            kill_quietly(pid)
        assert pool.submit(tasks.add, 3, 3).result(TIMEOUT) == 6
    finally:
        pool.shutdown()


def test_shutdown_does_not_wait_for_a_worker_the_zygote_has_yet_to_hand_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The zygote stops (SIGSTOP) as it is asked for the second worker: that
    # answer never comes.  A shutdown leaves that worker to the zygote (told
    # how many answers were read, it kills the ones the pool never got),
    # reaps the zygote, killing it after a grace, and returns.  It used to
    # wait for the answer until the zygote's start timeout (60 s).
    from duckpool import _spawn
    from duckpool._pool import _zygotes

    here = os.getpid()
    start_worker_process = _spawn.start_worker_process

    def stopping_in_the_zygote(*args: Any, **kwargs: Any) -> Any:
        if os.getpid() != here:
            os.kill(os.getpid(), signal.SIGSTOP)
        return start_worker_process(*args, **kwargs)

    monkeypatch.setattr(_spawn, "start_worker_process", stopping_in_the_zygote)
    # (The running pool would find the zygote stopped first, and replace it.)
    monkeypatch.setattr(_zygotes, "ANSWER_LOOK_SECONDS", 3600.0)
    pool = duckpool.ProcessPoolExecutor(2, multiprocessing.get_context("fork"))
    try:
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
        zygote = helper_pids(pool)["zygote"]
        wait_until(lambda: psutil.Process(zygote).status() == psutil.STATUS_STOPPED, TIMEOUT)
        [worker] = pool.worker_pids()
    finally:
        closing = threading.Thread(target=pool.shutdown, daemon=True)
        closing.start()
        closing.join(20)
    assert not closing.is_alive(), "shutdown waited for the stopped zygote's answer"
    assert process_gone(zygote) and process_gone(worker)


def test_with_an_initializer_shutdown_does_not_wait_for_a_stopped_zygote(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The zygote forks the second worker, then stops (SIGSTOP) before it
    # answers.  With an initializer a starting worker is not killed at
    # shutdown (it may be running the program's code), so its answer is
    # awaited: not from a zygote that cannot give it.  That zygote is
    # killed at once, not after the 10 s that mark a zygote as hung, and so
    # is the worker it forked, which the pool never got (no task, no way to
    # get one, and nothing else watching it).  The wait used to last the
    # start timeout (60 s).
    from duckpool import _spawn
    from duckpool._pool import _zygotes
    from duckpool._pool._zygotes import ANSWER_SECONDS

    here = os.getpid()
    start_worker_process = _spawn.start_worker_process

    def stopping_in_the_zygote(*args: Any, **kwargs: Any) -> Any:
        started = start_worker_process(*args, **kwargs)
        if os.getpid() != here:
            os.kill(os.getpid(), signal.SIGSTOP)
        return started

    monkeypatch.setattr(_spawn, "start_worker_process", stopping_in_the_zygote)
    # (The running pool would find the zygote stopped first, and replace it.)
    monkeypatch.setattr(_zygotes, "ANSWER_LOOK_SECONDS", 3600.0)
    pool = duckpool.ProcessPoolExecutor(
        2,
        multiprocessing.get_context("fork"),
        initializer=tasks.init_record_pid,
        initargs=(str(tmp_path),),
    )
    try:
        assert pool.submit(tasks.add, 1, 1).result(TIMEOUT) == 2
        zygote = helper_pids(pool)["zygote"]
        wait_until(lambda: psutil.Process(zygote).status() == psutil.STATUS_STOPPED, TIMEOUT)
        wait_until(lambda: len(os.listdir(tmp_path)) == 2, TIMEOUT)  # both initializers ran
        workers = [int(name) for name in os.listdir(tmp_path)]
        assert len(pool.worker_pids()) == 1  # the second was never handed over
    finally:
        closing = threading.Thread(target=pool.shutdown, daemon=True)
        closing.start()
        closing.join(ANSWER_SECONDS / 2)
    assert not closing.is_alive(), "shutdown waited for the stopped zygote's answer"
    assert process_gone(zygote)
    wait_until(lambda: all(process_gone(worker) for worker in workers), TIMEOUT)


def test_a_closed_zygote_handle_closes_the_pipes_of_answers_never_read() -> None:
    # A worker the zygote forked holds a copy of the control socket: were the
    # write end of its task pipe left queued there (an answer the pool never
    # read: the zygote stopped, say), the worker would keep it open itself.
    import socket

    from duckpool import _zygote
    from duckpool._zygote_process import REPLY, Channels

    channels = Channels.open()
    task_r, task_w = os.pipe()
    os.set_blocking(task_r, False)
    socket.send_fds(channels.zygote_end, [REPLY.pack(1, os.getpid())], [task_w, task_w])
    os.close(task_w)
    workers_copy = os.dup(channels.control.fileno())  # (of the pool's end)
    handle = _zygote.Zygote(object(), channels.control, channels.notices_r)
    try:
        handle.close()
        assert os.read(task_r, 1) == b"", "the write end queued in the socket is still open"
    finally:
        os.close(workers_copy)
        channels.zygote_end.close()
        os.close(channels.notices_w)
        os.close(task_r)
