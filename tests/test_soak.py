"""Soak: many tasks while workers die, time out and get killed from outside.

The CI run is small; ``pytest -m soak`` runs the large one.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import threading
from typing import Any, Optional

import psutil
import pytest

import _executor_tasks as tasks
import duckpool
from conftest import (
    all_pool_processes,
    fork_server_pid,
    kill_quietly,
    process_gone,
    resource_tracker_pid,
    wait_until,
)
from duckpool import _child

TIMEOUT = 120


def _open_fds() -> int:
    return len(_fd_targets())


def _fd_targets() -> dict[int, str]:
    """This process's open descriptors and what each refers to."""
    targets = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            targets[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # (the listing's own descriptor, closed by now)
            pass
    return targets


def _new_children(before: set[int]) -> list[str]:
    """Processes below this one that were not there before, other than
    multiprocessing's own long-lived helpers (fork server, resource tracker)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if child.pid in before or "forkserver" in cmdline or "resource_tracker" in cmdline:
            continue
        found.append(cmdline)
    return found


def _soak(ctx: object, n_tasks: int, seed: int) -> None:
    rng = random.Random(seed)
    fds_before = _open_fds()
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    pool = duckpool.ProcessPoolExecutor(2, ctx, max_tasks_per_child=50)  # type: ignore[arg-type]
    stop_killer = threading.Event()

    def kill_workers_at_random() -> None:
        while not stop_killer.wait(rng.uniform(0.05, 0.2)):
            pids = pool.worker_pids()
            if pids:
                try:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    killer = threading.Thread(target=kill_workers_at_random)
    killer.start()
    expected: list[tuple[concurrent.futures.Future[int], str, int]] = []
    try:
        for i in range(n_tasks):
            kind = rng.choices(["ok", "raise", "die", "hang"], weights=[90, 5, 3, 2])[0]
            timeout: Optional[float] = 0.3 if kind == "hang" else None
            future = pool.options(timeout=timeout).submit(tasks.soak_task, kind, i)
            expected.append((future, kind, i))
        _, not_done = concurrent.futures.wait([f for f, _, _ in expected], TIMEOUT)
        assert not not_done, f"{len(not_done)} futures never resolved"
    finally:
        stop_killer.set()
        killer.join(TIMEOUT)
        pids = pool.worker_pids()
        pool.shutdown(wait=True)
    for future, kind, value in expected:
        error = future.exception(0)
        if kind == "ok":
            # An innocent task may only fail if the random killer hit its worker.
            if error is None:
                assert future.result(0) == value * 2
            else:
                assert isinstance(error, duckpool.WorkerDiedError), error
        elif kind == "raise":
            assert isinstance(error, (ValueError, duckpool.WorkerDiedError)), error
        elif kind == "die":
            assert isinstance(error, duckpool.WorkerDiedError), error
        else:
            assert isinstance(error, (duckpool.TaskTimeoutError, duckpool.WorkerDiedError)), error
    wait_until(lambda: all(process_gone(pid) for pid in pids), 10)
    wait_until(lambda: not _new_children(children_before), 10)
    # The pool's pipes are all closed once it has shut down (the fork server's
    # own socket and multiprocessing's resource tracker may stay, once each).
    assert _open_fds() <= fds_before + 3, (fds_before, _open_fds())


def test_soak_small(ctx: object) -> None:
    _soak(ctx, n_tasks=300, seed=1)


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_soak_large(ctx: object) -> None:
    _soak(ctx, n_tasks=20_000, seed=2)


def _soak_every_kind(
    ctx: Any, n_tasks: int, kills: int, self_kills: int, seed: int, hostiles: int = 0
) -> None:
    """Tiny tasks on 2 workers while, every 30 ms, a random process the pool
    owns or relies on (any descendant of this process, children of every
    thread included; the zygote and its standby; the fork server and the
    resource tracker) gets SIGKILL, and some tasks kill their own worker.

    Every future resolves; a task fails only if a process died under it
    (WorkerDiedError); the pool serves afterwards and shuts down clean.
    """
    rng = random.Random(seed)
    fds_before = _fd_targets()
    pool = duckpool.ProcessPoolExecutor(2, ctx)
    killed: list[int] = []
    done_killing = threading.Event()

    kinds: dict[str, int] = {}

    def kind_of(pid: int) -> str:
        roles = {helper.pid: helper.role for helper in pool.stats().helpers}
        if pid in pool.worker_pids():
            return "worker"
        if pid in roles:
            return roles[pid]
        if pid == fork_server_pid():
            return "fork server"
        if pid == resource_tracker_pid():
            return "resource tracker"
        return "other"

    def kill_at_random() -> None:
        while len(killed) < kills and not done_killing.wait(0.03):
            victims = all_pool_processes(pool)
            if victims:
                victim = rng.choice(victims)
                kind = kind_of(victim)
                kill_quietly(victim)
                killed.append(victim)
                kinds[kind] = kinds.get(kind, 0) + 1
        done_killing.set()

    suicidal = set(rng.sample(range(n_tasks), self_kills))
    # Hostile tasks among them: some ignore SIGTERM past their timeout, some
    # die leaving a grandchild that holds the worker's pipes.
    hostile = dict.fromkeys(rng.sample(sorted(set(range(n_tasks)) - suicidal), 2 * hostiles), "")
    for n, index in enumerate(hostile):
        hostile[index] = "sigterm" if n % 2 else "grandchild"
    futures: list[tuple[concurrent.futures.Future[int], int]] = []
    killer = threading.Thread(target=kill_at_random)
    pool.submit(tasks.add, 0, 0).result(TIMEOUT)  # started before the first kill
    if ctx.get_start_method() == "fork" and _child.has_pidfds():
        # Its standby too (there is none without pidfds): kills then test the handover.
        wait_until(lambda: len(pool.stats().helpers) == 2, TIMEOUT)
    killer.start()
    try:
        i = 0
        # Keep the stream going until every kill has landed.
        while i < n_tasks or not done_killing.is_set():
            kind = "die" if i in suicidal else hostile.get(i, "ok")
            timeout = 0.3 if kind == "sigterm" else None
            futures.append((pool.options(timeout=timeout).submit(tasks.soak_task, kind, i), i))
            i += 1
            if i % 500 == 0:  # let results flow (a bounded queue, as a server's)
                concurrent.futures.wait([f for f, _ in futures[-500:]], TIMEOUT)
        _, not_done = concurrent.futures.wait([f for f, _ in futures], TIMEOUT)
        assert not not_done, f"{len(not_done)} futures never resolved"
        # The pool serves the next task after all that.
        assert pool.submit(tasks.add, 2, 3).result(TIMEOUT) == 5
    finally:
        done_killing.set()
        killer.join(TIMEOUT)
        pool.shutdown(wait=True)
    innocent_failures = 0
    for future, value in futures:
        error = future.exception(0)
        if value in suicidal or hostile.get(value) == "grandchild":
            assert isinstance(error, duckpool.WorkerDiedError), error
        elif value in hostile:
            assert isinstance(error, (duckpool.TaskTimeoutError, duckpool.WorkerDiedError)), error
        elif error is not None:
            assert isinstance(error, duckpool.WorkerDiedError), error
            innocent_failures += 1
        else:
            assert future.result(0) == value * 2
    # Only a task running in a killed process may fail: one per kill at most.
    assert innocent_failures <= len(killed), (innocent_failures, len(killed))
    print(
        f"{len(futures)} tasks, {len(killed)} kills {dict(sorted(kinds.items()))}, "
        f"{len(suicidal)} self-kills, {len(hostile)} hostile tasks, "
        f"{innocent_failures} innocent tasks failed"
    )
    assert pool.stats().stopped
    # Nothing of the pool's is left open here (the fork server's socket and
    # the resource tracker's pipe may have been made anew, once each; without
    # memfds, multiprocessing's shared-memory heap keeps its first arena open,
    # two descriptors, for the life of the process).
    allowed = 3 if hasattr(os, "memfd_create") else 4
    try:
        wait_until(lambda: _open_fds() <= len(fds_before) + allowed, 10)
    except AssertionError:
        now = _fd_targets()
        raise AssertionError(
            {fd: target for fd, target in now.items() if fds_before.get(fd) != target}
        ) from None


def test_soak_killing_every_kind_of_process_small(ctx: Any) -> None:
    _soak_every_kind(ctx, n_tasks=3_000, kills=12, self_kills=5, seed=3, hostiles=1)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_killing_every_kind_of_process_large(ctx: Any) -> None:
    _soak_every_kind(ctx, n_tasks=100_000, kills=50, self_kills=20, seed=4, hostiles=4)
