"""Imported by ``multiprocessing``'s fork server as it starts, where duckpool
asked for it (``duckpool._fork_server.preload_worker_module``): imports
duckpool's worker module there, so that every worker forked from the server
has it already.

The server looks this module up on its own ``sys.path``, and up to Python
3.13 imports its preload list with that path, not the program's (3.14
applies the program's first): a ``duckpool`` found there could be another
copy than the program's, whose workers would then fail to start.  So this
module, a top-level one that imports nothing of duckpool's before it knows
where from, first takes the program's path from the server's own arguments,
then imports the worker module from it.  Where it cannot tell the program's
path, it imports nothing: the workers import the module themselves, as
without preloading.
"""

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import types


def _program_path() -> "list[str] | None":
    """The ``sys_path`` the program handed the fork server (None if unknown)."""
    forkserver = sys.modules.get("multiprocessing.forkserver")
    main = getattr(forkserver, "main", None)
    code = getattr(main, "__code__", None)
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            path = frame.f_locals.get("sys_path")
            return list(path) if isinstance(path, list) else None
        frame = frame.f_back
    return None


def _preload() -> None:
    path = _program_path()
    if path is not None:
        sys.path[:] = path
    elif sys.version_info < (3, 14):
        return  # (from 3.14 the server has applied the program's path itself)
    try:
        import duckpool._worker  # noqa: F401
    except ImportError:
        pass


_preload()
