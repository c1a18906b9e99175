"""A worker's start under the ``spawn`` start method, in the new interpreter.

``_spawn.spawn_worker`` runs ``python -c "... main(fd)"`` and writes two
pickles into descriptor ``fd``: what ``multiprocessing.spawn`` would prepare
the process with (its name, ``sys.path``, ``sys.argv``, working directory,
main module), then the worker's own arguments.  This does what
``multiprocessing.spawn.spawn_main`` does with them, without importing
``multiprocessing`` (about 20 ms of a worker's start, which a worker
replaced every few tasks pays each time): the main module is run as
``__mp_main__``, and once a task imports ``multiprocessing``, the process
takes its name, authentication key, parent, start method and resource
tracker there, as a process ``multiprocessing`` spawned would have them.

Only ``os`` and ``sys`` (which every interpreter has loaded) are imported
before the parent's ``sys.path`` is in place.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class InheritedDupFd:
    """A descriptor passed to the new process at the same number (see
    ``_spawn.spawn_worker``): what ``multiprocessing.reduction.DupFd`` gives
    while a worker's arguments are pickled."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def detach(self) -> int:
        return self.fd


def main(data_fd: int) -> None:
    """Prepare the process, run the worker, and exit as a spawned process does."""
    _close_on_exec_all()
    # As many bytes as the length in front says (see _spawn.spawn_worker).
    received = bytearray()
    size = None
    while size is None or len(received) < 8 + size:
        chunk = os.read(data_fd, 1 << 20)
        if not chunk:
            raise EOFError(f"the pool sent {len(received)} bytes of this worker's arguments")
        received += chunk
        if size is None and len(received) >= 8:
            size = int.from_bytes(received[:8], "little")
    os.close(data_fd)
    data = memoryview(received)[8:]
    import _pickle

    head = int.from_bytes(data[:8], "little")
    prep, extra = _pickle.loads(data[8 : 8 + head])
    global _inheriting
    _inheriting = True
    try:
        _prepare(prep, extra)
        task, result, config, parent_ends = _pickle.loads(data[8 + head :])
    finally:
        _inheriting = False
        _mark_inheriting(False)
    data.release()
    del data, received
    from duckpool import _worker

    code = 1
    try:
        _worker.worker_main(task, result, config, parent_ends)
        code = 0
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            sys.stderr.write(f"{exc.code}\n")
    except BaseException:
        import traceback

        sys.stderr.write(f"Process {prep.get('name')}:\n")
        traceback.print_exc()
    finally:
        _worker.flush_std_streams()
    sys.exit(code)


def _close_on_exec_all() -> None:
    """Mark every descriptor but 0, 1 and 2 close-on-exec.

    At this point they are exactly those ``spawn_worker`` passed, inheritable
    as exec needs: the data pipe, the "alive" pipe, the resource tracker's
    pipe, the worker's task and result pipes, the marks, and any descriptor
    pickled with ``initargs``.  Left inheritable, every program a task runs
    without ``close_fds`` (``os.system``, ``os.execv``) would hold them: the
    pipes to the parent among them.  Whatever the main module or the
    initializer opens later is left as they make it.
    """
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        try:
            names = os.listdir("/dev/fd")
        except OSError:
            return
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:  # the listing's own descriptor, closed by now
                pass


#: True while the main module runs again and the worker's arguments are
#: unpickled: a process started then (a main module without the
#: ``if __name__ == "__main__"`` guard) is refused, as multiprocessing does,
#: instead of spawning workers without end.
_inheriting = False


def _mark_inheriting(value: bool) -> None:
    """Tell multiprocessing (if imported) whether the process is still starting:
    its ``spawn.get_preparation_data`` refuses to start a process then."""
    process = sys.modules.get("multiprocessing.process")
    if process is None:
        return
    current: Any = process.current_process()  # type: ignore[attr-defined]
    if value:
        current._inheriting = True
    elif hasattr(current, "_inheriting"):
        del current._inheriting


def _prepare(prep: dict[str, Any], extra: dict[str, Any]) -> None:
    """What ``multiprocessing.spawn.prepare`` does, with ``multiprocessing`` left for later."""
    if "sys_path" in prep:
        sys.path = prep["sys_path"]
    if "sys_argv" in prep:
        sys.argv = prep["sys_argv"]
    if "dir" in prep:
        os.chdir(prep["dir"])
    _quiet_stdin()
    from duckpool import _import_hooks, _task_forks

    alive_fd = extra.get("alive_fd")
    if alive_fd is not None:
        # Where the parent has no pidfd, EOF on this pipe is how it sees the
        # worker exit: a process a task forks must not hold it open.
        _task_forks.close_in_forks(alive_fd)
    # Before the main module runs: it may import multiprocessing itself.
    _import_hooks.after_import("multiprocessing", lambda: _adopt(prep, extra))
    if "init_main_from_name" in prep:
        _main_from_name(prep["init_main_from_name"])
    elif "init_main_from_path" in prep:
        _main_from_path(prep["init_main_from_path"])


def _quiet_stdin() -> None:
    """A task reading stdin reads nothing, as in a ``multiprocessing`` child."""
    try:
        null = os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return
    try:
        os.dup2(null, 0)
    except OSError:
        pass
    finally:
        os.close(null)


def _adopt(prep: dict[str, Any], extra: dict[str, Any]) -> None:
    """Once ``multiprocessing`` is imported: this process as it sees a spawned child."""
    import multiprocessing
    from multiprocessing import process, util

    current = process.current_process()
    _mark_inheriting(_inheriting)
    if "name" in prep:
        current.name = prep["name"]
    if "authkey" in prep:
        current.authkey = prep["authkey"]
    if "orig_dir" in prep:
        process.ORIGINAL_DIR = prep["orig_dir"]  # type: ignore[attr-defined]
    if prep.get("log_to_stderr"):
        util.log_to_stderr()
    if "log_level" in prep:
        util.get_logger().setLevel(prep["log_level"])
    if "start_method" in prep:
        multiprocessing.set_start_method(prep["start_method"], force=True)
    pidfd_open = getattr(os, "pidfd_open", None)
    parent_pid = extra["parent_pid"]
    sentinel = extra.get("parent_fd")  # (given where the parent has no pidfds)
    if sentinel is None and pidfd_open is not None and os.getppid() == parent_pid:
        try:
            sentinel = pidfd_open(parent_pid)
        except OSError:
            pass
    if sentinel is not None:
        process._parent_process = process._ParentProcess(  # type: ignore[attr-defined]
            extra["parent_name"], parent_pid, sentinel
        )
    tracker_fd = extra.get("tracker_fd")
    if tracker_fd is not None:
        from multiprocessing import resource_tracker

        resource_tracker._resource_tracker._fd = tracker_fd  # type: ignore[attr-defined]


def _main_from_name(name: str) -> None:
    """Run the parent's main module (started with ``-m name``) as ``__mp_main__``."""
    if name == "__main__" or name.endswith(".__main__"):
        return  # a package's __main__ runs the program: never again in a worker
    current = sys.modules["__main__"]
    if getattr(getattr(current, "__spec__", None), "name", None) == name:
        return
    import runpy
    import types

    module = types.ModuleType("__mp_main__")
    module.__dict__.update(runpy.run_module(name, run_name="__mp_main__", alter_sys=True))
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module


def _main_from_path(path: str) -> None:
    """Run the parent's main script as ``__mp_main__``, its ``__main__`` block left out."""
    current = sys.modules["__main__"]
    base = os.path.splitext(os.path.basename(path))[0]
    if base == "ipython" or getattr(current, "__file__", None) == path:
        return
    import runpy
    import types

    module = types.ModuleType("__mp_main__")
    module.__dict__.update(runpy.run_path(path, run_name="__mp_main__"))
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module
