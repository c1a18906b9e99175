"""duckpool's public surface: the three lists in ``__init__`` agree, and every name resolves.

``__init__`` names each public object three times: in ``__all__``, in the
lazy table ``_EXPORTS`` (name -> module, imported on first use) and in the
``TYPE_CHECKING`` imports a type checker reads.  A name added to one and not
the others would be missing from ``import *``, fail on first use, or be
unknown to the type checker.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import duckpool
from duckpool import _seed

SEED_MODULE = "duck.utils.multiprocessing.processpool"
#: Public names ``__init__`` defines itself instead of importing lazily.
DEFINED_IN_INIT = {"__version__", "register_prometheus"}


def _type_checking_imports() -> dict[str, str]:
    """``{name: module}`` of the duckpool imports under ``if TYPE_CHECKING:`` in ``__init__``."""
    tree = ast.parse(Path(duckpool.__file__).read_text())
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for statement in node.body:
                if (
                    isinstance(statement, ast.ImportFrom)
                    and statement.module
                    and statement.module.startswith("duckpool.")
                ):
                    for alias in statement.names:
                        found[alias.asname or alias.name] = statement.module
    assert found, "no TYPE_CHECKING imports found: the check checks nothing"
    return found


def test_all_is_the_lazy_table_and_what_init_defines() -> None:
    assert len(duckpool.__all__) == len(set(duckpool.__all__)), "a name is listed twice"
    assert set(duckpool.__all__) - DEFINED_IN_INIT == set(duckpool._EXPORTS)
    assert set(duckpool.__all__) >= DEFINED_IN_INIT


def test_the_type_checker_sees_each_name_from_the_module_the_lazy_table_names() -> None:
    assert _type_checking_imports() == duckpool._EXPORTS


@pytest.mark.parametrize("name", sorted(duckpool.__all__))
def test_every_public_name_resolves(name: str) -> None:
    value = getattr(duckpool, name)
    module = duckpool._EXPORTS.get(name)
    if module is not None:
        assert value is getattr(importlib.import_module(module), name)
    assert name in dir(duckpool)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from duckpool import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(duckpool.__all__)


def test_the_seed_path_exports_its_names_as_duckpools_objects() -> None:
    seed = importlib.import_module(SEED_MODULE)
    assert list(seed.__all__) == list(_seed.__all__)
    assert set(seed.__all__) <= set(duckpool.__all__)
    public = {name for name in vars(seed) if not name.startswith("_")}
    assert public == set(seed.__all__)
    for name in seed.__all__:
        assert getattr(seed, name) is getattr(duckpool, name), name
