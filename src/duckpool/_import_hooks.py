"""Run an action once a given module has been imported, without importing it.

A worker that forwards logs must hook ``logging`` the moment something
imports it (``_worker``), and a spawned worker must finish becoming a
``multiprocessing`` child the moment something imports ``multiprocessing``
(``_spawned``).  Importing either up front would add to every worker's
start whether its tasks need it or not; a finder at the front of
``sys.meta_path`` waits for the first import instead.

Imported by spawned workers before their main module runs: it imports only
``os`` and ``sys`` (and ``importlib.util`` once the awaited import happens).
"""

from __future__ import annotations

import os
import sys

# typing is not imported at run time (annotations are not evaluated).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable


def after_import(name: str, action: Callable[[], None]) -> None:
    """Run ``action`` right after the next import of module ``name`` has
    executed it, before whatever imported it goes on.

    Only an import still to come: if ``name`` is in ``sys.modules`` already,
    nothing imports it again and ``action`` never runs.  A process forked
    before that import does not run it either: the action sets up this
    process (a worker), not a child one of its tasks forks.
    """
    watch = _AfterImport(name, action)
    sys.meta_path.insert(0, watch)
    os.register_at_fork(after_in_child=watch.cancel)


class _AfterImport:
    """A meta path finder: runs ``action`` once module ``name`` has been executed,
    before whatever imported it goes on (once; then it leaves ``sys.meta_path``)."""

    def __init__(self, name: str, action: Callable[[], None]) -> None:
        self._name = name
        self._action = action

    def cancel(self) -> bool:
        """Leave ``sys.meta_path``; False if already gone."""
        try:
            sys.meta_path.remove(self)
        except ValueError:
            return False
        return True

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self._name or not self.cancel():  # (another thread got here first)
            return None
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            wrapper: Any = _ActAfterLoad(spec.loader, self._action)  # a loader by protocol
            spec.loader = wrapper
        return spec


class _ActAfterLoad:
    """Wraps a module's loader: runs ``action`` after the module is executed."""

    def __init__(self, loader: Any, action: Callable[[], None]) -> None:
        self._loader = loader
        self._action = action

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        # The module keeps its own loader, not this wrapper.
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._action()
