"""Every public name has a docstring, and so has each of its public members.

The API reference (``docs/``, built by ``scripts/docs.sh``) is generated from
the docstrings, so a public name without one would be an empty entry there.
This checks the objects themselves, as imported, without building the site:
each name in ``duckpool.__all__`` and in the seed module, each public
method, property and class method of their classes (those a class takes from
duckpool's own bases included), and the objects the API hands out without a
public name (a local pool's future, ``options()`` and ``map()`` results).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest

import duckpool
from duckpool import _futures, _manager, _map, _options

SEED_MODULE = "duck.utils.multiprocessing.processpool"
#: Data, not callables: documented by their entries in the reference, not ``__doc__``.
DATA = {"__version__", "REGISTRY"}
#: Classes the API returns but users never construct (docs/objects.md).
RETURNED = [_futures.PoolFuture, _options.TaskOptions, _manager.ManagerOptions, _map.MapResults]
#: A PoolFuture re-implements these Future methods for speed; their meaning is the stdlib's.
STDLIB_MEANING = {"done", "result", "exception", "set_running_or_notify_cancel"}
STDLIB_MEANING |= {"set_result", "set_exception"}


def _has_doc(obj: Any) -> bool:
    return bool((inspect.getdoc(obj) or "").strip())


def _undocumented_members(cls: type) -> list[str]:
    """Public members ``cls`` defines or takes from duckpool's own classes, without a docstring."""
    missing = []
    seen: set[str] = set()
    for owner in cls.__mro__:
        if not owner.__module__.startswith("duckpool"):
            continue
        for name, member in vars(owner).items():
            if name.startswith("_") or name in seen:
                continue
            seen.add(name)
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if not (inspect.isfunction(member) or isinstance(member, property)):
                continue  # NamedTuple fields, data
            if cls is _futures.PoolFuture and name in STDLIB_MEANING:
                continue
            # Not inspect.getdoc: it would find the docstring of an inherited
            # stdlib method and hide a missing one here.
            if not (member.__doc__ or "").strip():
                missing.append(f"{cls.__name__}.{name} (defined in {owner.__qualname__})")
    return missing


@pytest.mark.parametrize("name", sorted(set(duckpool.__all__) - DATA))
def test_public_name_has_a_docstring(name: str) -> None:
    obj = getattr(duckpool, name)
    assert _has_doc(obj), f"duckpool.{name} has no docstring"
    if inspect.isclass(obj):
        assert _undocumented_members(obj) == []


def test_seed_module_names_have_docstrings() -> None:
    seed = importlib.import_module(SEED_MODULE)
    assert _has_doc(seed), f"{SEED_MODULE} has no module docstring"
    names = set(seed.__all__) - DATA
    assert names, "the seed module exports nothing: the check checks nothing"
    for name in sorted(names):
        obj = getattr(seed, name)
        assert _has_doc(obj), f"{SEED_MODULE}.{name} has no docstring"
        if inspect.isclass(obj):
            assert _undocumented_members(obj) == []


@pytest.mark.parametrize("cls", RETURNED, ids=lambda cls: cls.__name__)
def test_objects_the_api_returns_are_documented(cls: type) -> None:
    assert _has_doc(cls), f"{cls.__qualname__} has no docstring"
    assert _undocumented_members(cls) == []


def test_the_check_sees_a_missing_docstring() -> None:
    class Undocumented:
        """Has a docstring; its method has none."""

        def method(self) -> None:
            pass

    Undocumented.__module__ = "duckpool._example"
    (missing,) = _undocumented_members(Undocumented)
    assert missing.startswith("Undocumented.method (defined in "), missing
