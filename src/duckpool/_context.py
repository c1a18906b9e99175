"""Context variables carried with a task to its worker (``context_vars=``).

A ``ContextVar`` cannot be pickled, and a worker started by spawn or
forkserver has its own copy of every module.  So a variable is named by
where it lives, its module and its name there (``locate``, once per
variable), and its value at ``submit()`` travels with the call: the call
becomes a ``ContextCall``, which in the worker sets each variable found by
that name, runs the task, and resets them, so the next task on that worker
sees what it saw before.  A variable with no value in the submitting
context is not sent: the worker's own value (its default) stays.

A pool with no ``context_vars`` never builds one: nothing here runs.
"""

from __future__ import annotations

import functools
import importlib
import sys
from contextvars import ContextVar

TYPE_CHECKING = False
if TYPE_CHECKING:  # a worker unpickles ContextCall: no typing at run time
    from typing import Any, Callable, Iterable, Optional

    #: Context variables with their module and name, as tasks carry them.
    Located = tuple[tuple[str, str, ContextVar[Any]], ...]

__all__ = ["ContextCall", "bind", "check_context_vars", "located"]

#: Each variable's module and name, by ``id`` (module-level variables live
#: as long as their module: the id is never reused while it matters).
_LOCATED: dict[int, tuple[str, str]] = {}
_UNSET = object()


def locate(var: ContextVar[Any]) -> tuple[str, str]:
    """The module and name under which ``var`` is a module-level global.

    Raises ``TypeError`` if it is none (a worker could not find it).
    """
    found = _LOCATED.get(id(var))
    if found is not None:
        return found
    for module_name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if not namespace or module_name == "__mp_main__":
            continue
        for name, value in list(namespace.items()):
            if value is var:
                where = ("__main__" if module_name == "__main__" else module_name, name)
                _LOCATED[id(var)] = where
                return where
    raise TypeError(
        f"context variable {var.name!r} is not a module-level name of an imported "
        "module: a worker finds each variable by its module and name, so define it "
        "at the top level of a module"
    )


def check_context_vars(value: Any) -> Optional[tuple[ContextVar[Any], ...]]:
    """``context_vars=``: None, or ContextVars each at a module's top level."""
    if value is None:
        return None
    if isinstance(value, ContextVar):
        value = (value,)
    try:
        variables = tuple(value)
    except TypeError:
        variables = ()
        value = [value]
    if not variables or not all(isinstance(var, ContextVar) for var in variables):
        raise TypeError(
            f"context_vars must be a ContextVar or a non-empty sequence of them, got {value!r}"
        )
    for var in variables:
        locate(var)
    return variables


def located(variables: Iterable[ContextVar[Any]]) -> Located:
    """Each variable with its module and name (checked by ``check_context_vars``)."""
    return tuple((*locate(var), var) for var in variables)


class ContextCall(functools.partial):  # type: ignore[type-arg]
    """A task's callable with the values of context variables to set around it.

    A ``functools.partial`` of the task (so the pool names it after the
    task), pickled with ``values``: ``(module, name, value)`` of each variable.
    """

    values: tuple[tuple[str, str, Any], ...]

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        tokens = []
        try:
            for module, name, value in self.values:
                var: ContextVar[Any] = getattr(importlib.import_module(module), name)
                tokens.append((var, var.set(value)))
            return super().__call__(*args, **kwargs)
        finally:
            for var, token in reversed(tokens):
                var.reset(token)


def bind(fn: Callable[..., Any], variables: Located) -> Callable[..., Any]:
    """``fn`` with the current values of ``variables`` (those that have one)."""
    values = []
    for module, name, var in variables:
        value = var.get(_UNSET)
        if value is not _UNSET:
            values.append((module, name, value))
    if not values:
        return fn
    call = ContextCall(fn)
    call.values = tuple(values)
    return call
