"""The engine's structure holds: imports go one way, the diagram names what exists.

Static checks (an AST scan of ``src/duckpool``), no processes started.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

import duckpool

PACKAGE = Path(duckpool.__file__).resolve().parent


def _module_name(path: Path) -> str:
    """``_pool._slots`` for ``_pool/_slots.py``, ``_bench`` for ``_bench/__init__.py``."""
    relative = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(part for part in relative.parts if part != "__init__")


#: What runs inside a worker: it may import only these and the standard library.
WORKER_SIDE = {
    "_worker",
    "_chunks",
    "_worker_logs",
    "_progress",
    "_task_forks",
    "_protocol",
    "_marks",
    "_import_hooks",
    "_buffers",
    "_spawned",
}
#: Where a worker process starts: ``_spawned.main`` under spawn,
#: ``_worker.process_main`` or ``worker_main`` under fork and forkserver;
#: and what a task's pickle names for the worker to import (``_chunks``,
#: with a ``map`` chunk).
WORKER_ENTRY_POINTS = {"_spawned", "_worker", "_chunks"}
#: Not in the standard library, imported by a worker only when a pool's
#: options ask for them (process titles, ``max_memory_per_child``,
#: ``serializer="cloudpickle"``).
WORKER_OPTIONAL = {"setproctitle", "psutil", "cloudpickle"}
#: The benchmark harness, every module of its package: only the command line reaches it.
BENCH = {_module_name(path) for path in (PACKAGE / "_bench").rglob("*.py")}
#: The command line and what only it uses.
CLI_ONLY = {"_cli", "_demo_tasks", *BENCH}


def _modules() -> dict[str, ast.Module]:
    return {
        _module_name(path): ast.parse(path.read_text(), str(path)) for path in PACKAGE.rglob("*.py")
    }


def _is_module(name: str) -> bool:
    """Whether ``name`` (``_bench._tasks``) is a module of the package, not a name in one."""
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _run_time_imports(
    tree: ast.Module, module_level_only: bool, type_checking: bool = False
) -> set[str]:
    """The modules ``tree`` imports at run time (with ``type_checking``, under
    TYPE_CHECKING too), as absolute names; ``from duckpool import _x`` counts
    as ``duckpool._x``."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and _is_type_checking(node):
                if type_checking:
                    visit(node.body)
                visit(node.orelse)
                continue
            if isinstance(node, ast.ImportFrom):
                # The checks read absolute imports only: a relative one would
                # slip past them.
                assert node.level == 0 and node.module, ast.unparse(node)
                for alias in node.names:
                    # ``from duckpool._bench import _tasks`` imports the
                    # submodule (its package runs first, as for any import of
                    # a submodule: not an edge of its own).
                    submodule = f"{node.module}.{alias.name}"
                    if submodule.startswith("duckpool.") and _is_module(
                        submodule[len("duckpool.") :]
                    ):
                        names.add(submodule)
                    else:
                        names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            if module_level_only and isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
            ):
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                child = getattr(node, field, None)
                if isinstance(child, list) and child and isinstance(child[0], ast.AST):
                    visit([c for c in child if isinstance(c, ast.stmt)] or [])
                    if field == "handlers":
                        for handler in child:
                            visit(handler.body)

    visit(tree.body)
    return names


def _imports(tree: ast.Module, module_level_only: bool, type_checking: bool = False) -> set[str]:
    """duckpool modules ``tree`` imports at run time (with ``type_checking``,
    for the type checker too), relative to the package."""
    prefix = "duckpool."
    return {
        name[len(prefix) :]
        for name in _run_time_imports(tree, module_level_only, type_checking)
        if name.startswith(prefix)
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def _graph(module_level_only: bool, type_checking: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: _imports(tree, module_level_only, type_checking) & set(modules)
        for name, tree in modules.items()
    }


def test_no_module_imports_another_that_imports_it_back() -> None:
    # Imports inside functions count too: a cycle through one still ties the
    # two modules together, whenever the function first runs.  So do those
    # made for the type checker only: the engine's owners name one another
    # through the protocols of ``_pool._view``, never through ``_core``.
    assert _cycles(_graph(module_level_only=False, type_checking=True)) == []


def test_the_engine_owners_never_import_the_layers_above_them() -> None:
    modules = _modules()
    above = {"_executor", "_manager", "_registry", "_routing", "_dask", "_shutdown"} | CLI_ONLY
    above |= {"_dask_bridge", "_map", "_options"}  # the executors' own leaves
    for name, tree in modules.items():
        if name == "_core" or name.startswith("_pool"):
            assert not _imports(tree, module_level_only=False) & above, name


#: The local engine and its executor: the Dask backend needs none of it.
LOCAL_ENGINE = {"_executor", "_core", "_pool"}


def test_the_dask_backend_and_the_shared_leaves_never_import_the_local_engine() -> None:
    # _map, _options and _validate are shared by both executors so that the
    # Dask backend need not reach them through the local executor's module.
    modules = _modules()
    for name in ("_dask", "_dask_bridge", "_map", "_options", "_validate"):
        imported = _imports(modules[name], module_level_only=False)
        reached = {i for i in imported if i.split(".")[0] in LOCAL_ENGINE}
        assert not reached, (name, reached)
    # The bridge is below the Dask executor's surface, not beside it.
    assert not _imports(modules["_dask_bridge"], module_level_only=False) & {"_dask", "_manager"}


def test_the_worker_side_imports_only_the_worker_side() -> None:
    modules = _modules()
    for name in WORKER_SIDE:
        imported = _imports(modules[name], module_level_only=False)
        assert imported <= WORKER_SIDE, (name, imported - WORKER_SIDE)


def test_the_worker_side_is_what_a_worker_can_reach() -> None:
    graph = _graph(module_level_only=False)
    reached: set[str] = set()
    todo = list(WORKER_ENTRY_POINTS)
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(graph[name])
    assert reached == WORKER_SIDE


@pytest.mark.skipif(sys.version_info < (3, 10), reason="sys.stdlib_module_names is 3.10+")
def test_the_worker_side_imports_nothing_else_but_the_standard_library() -> None:
    modules = _modules()
    stdlib = set(sys.stdlib_module_names)
    for name in WORKER_SIDE:
        tree = modules[name]
        everywhere = {m.split(".")[0] for m in _run_time_imports(tree, module_level_only=False)}
        at_import = {m.split(".")[0] for m in _run_time_imports(tree, module_level_only=True)}
        assert everywhere - {"duckpool"} <= stdlib | WORKER_OPTIONAL, (name, everywhere - stdlib)
        assert at_import - {"duckpool"} <= stdlib, (name, at_import - stdlib)


def test_no_module_imports_the_dask_backend_at_import_time() -> None:
    # Only a pool started with backend="dask" needs it (duckpool.DaskExecutor
    # is a lazy export): a local pool's process never loads it.
    for name, tree in _modules().items():
        assert "_dask" not in _imports(tree, module_level_only=True), name


def test_only_the_command_line_imports_the_benchmark() -> None:
    modules = _modules()
    assert _imports(modules["_cli"], module_level_only=False) & BENCH, "the check sees no import"
    for name, tree in modules.items():
        if name in CLI_ONLY or name == "__main__":
            continue
        assert not _imports(tree, module_level_only=False) & BENCH, name


def test_a_worker_importing_the_bench_tasks_loads_nothing_else_of_the_harness() -> None:
    # Every library's workers import _bench._tasks by name to unpickle a task, and
    # Python runs the package's __init__ first: both are on what spawn pays for.
    modules = _modules()
    assert _imports(modules["_bench"], module_level_only=True) == set()
    assert _imports(modules["_bench._tasks"], module_level_only=False) == set()


def _attributes(cls: ast.ClassDef) -> set[str]:
    """Methods, class attributes, ``__slots__`` and ``self.x = ...`` targets of ``cls``."""
    names: set[str] = set()
    for node in ast.walk(cls):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    names.add(target.id)
                    if target.id == "__slots__" and isinstance(node.value, ast.Tuple):
                        names.update(
                            e.value for e in node.value.elts if isinstance(e, ast.Constant)
                        )
    return names


@pytest.mark.parametrize("module", ["_core", "_dask"])
def test_every_name_the_data_flow_diagram_mentions_exists(module: str) -> None:
    modules = _modules()
    doc = ast.get_docstring(modules[module]) or ""
    classes: dict[str, set[str]] = {}
    for tree in modules.values():
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, set()).update(_attributes(node))
    mentioned = set(re.findall(r"\b([A-Z][A-Za-z]+)\.([a-z_][a-z_]*)\b", doc))
    assert mentioned, "the diagram names no Class.member: the check checks nothing"
    missing = [f"{c}.{m}" for c, m in sorted(mentioned) if m not in classes.get(c, set())]
    assert not missing, missing
    # The owners' table: "    Scheduler .... what it owns".
    owners = re.findall(r"^\s+([A-Z][A-Za-z]+) \.{2,}", doc, re.MULTILINE)
    assert owners, "the diagram lists no owner"
    assert not [o for o in owners if o not in classes], owners
    module_refs = set(re.findall(r"\b(_[a-z_]+)\.([a-z_]+)\b", doc))
    for mod, attr in module_refs:
        # Named by its last part (``_dispatcher`` for ``_pool._dispatcher``).
        found = [tree for name, tree in modules.items() if name.split(".")[-1] == mod]
        assert len(found) == 1, mod
        tree = found[0]
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert attr in defined, f"{mod}.{attr}"


#: Who may assign each field of a worker slot (``_pool._slots.Slot``).
SLOT_FIELD_OWNERS = {
    "_launcher": {
        "process",
        "task_conn",
        "result_conn",
        "reader",
        "used",
        "reserved",
        "ready",
        "launched_at",
        "installed_at",
        "forked_threaded",
    },
    "_scheduler": {
        "assigned",
        "tasks_sent",
        "head_since",
        "last_service",
        "queued_bytes",
        "retiring",
    },
    "_results": {"tasks_done", "read_lock", "pipe_closed_at"},
    "_transport": {"outbox", "stop_sent", "releases_sent", "results_copied", "area", "area_offer"},
    "_supervisor": {"stopping"},
    "_deadlines": {"start_missed", "start_cpu"},
    "_assist": {"assist", "poisoned"},
    "_successors": {"successor"},
    "_elastic": {"parked"},
    "_zygotes": {"requested"},
}


def _assigned_attributes(tree: ast.Module) -> list[tuple[ast.expr, str]]:
    """``(owner expression, attribute)`` of every attribute assignment in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        else:
            continue
        while targets:
            target = targets.pop()
            if isinstance(target, (ast.Tuple, ast.List)):
                targets.extend(target.elts)
            elif isinstance(target, ast.Attribute):
                found.append((target.value, target.attr))
    return found


def test_each_slot_field_is_assigned_only_by_its_owner() -> None:
    owner_of = {field: mod for mod, fields in SLOT_FIELD_OWNERS.items() for field in fields}
    modules = _modules()
    slot_class = next(
        node
        for node in modules["_pool._slots"].body
        if isinstance(node, ast.ClassDef) and node.name == "Slot"
    )
    fields = _attributes(slot_class) - {"reset", "alive", "__init__", "__slots__"}
    # Every field has an owner (a new field must be given one here).
    assert fields - {"index"} <= set(owner_of), fields - {"index"} - set(owner_of)
    wrong = []
    for name, tree in modules.items():
        if not (name == "_core" or name.startswith("_pool.")) or name == "_pool._slots":
            continue
        short = name.split(".")[-1]
        for base, attr in _assigned_attributes(tree):
            if isinstance(base, ast.Name) and base.id == "self":
                continue
            if attr in owner_of and owner_of[attr] != short:
                wrong.append(f"{name}: .{attr} (owned by {owner_of[attr]})")
    assert not wrong, wrong


def test_only_the_facade_assigns_the_pool_s_own_fields() -> None:
    # core.X = ... (or self._core.X = ...) outside _core: an owner writing
    # the facade's state, which belongs in the owner's own fields.
    wrong = []
    for name, tree in _modules().items():
        if name == "_core":
            continue
        for base, attr in _assigned_attributes(tree):
            if (isinstance(base, ast.Name) and base.id == "core") or (
                isinstance(base, ast.Attribute) and base.attr == "_core"
            ):
                wrong.append(f"{name}: core.{attr}")
    assert not wrong, wrong


#: The modules above the engine that hold a pool's core.
_ENGINE_CALLERS = ("_executor", "_shutdown", "_routing", "_manager", "_process_pools")


def test_the_engine_is_reached_through_the_facade_s_methods_only() -> None:
    # The executor, shutdown and routing call PoolCore's methods and read its
    # settings; never its lock, slots, queue or an owner.
    modules = _modules()
    facade = next(
        node
        for node in modules["_core"].body
        if isinstance(node, ast.ClassDef) and node.name == "PoolCore"
    )
    allowed = {
        node.name
        for node in facade.body
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")
    } | {"settings"}
    wrong = []
    for name in _ENGINE_CALLERS:
        for node in ast.walk(modules[name]):
            if not isinstance(node, ast.Attribute):
                continue
            base = node.value
            holds_core = (isinstance(base, ast.Name) and base.id == "core") or (
                isinstance(base, ast.Attribute) and base.attr == "_core"
            )
            if holds_core and node.attr not in allowed:
                wrong.append(f"{name}: core.{node.attr}")
    assert not wrong, wrong


def test_submodules_of_concurrent_futures_are_imported_where_they_are_used() -> None:
    # From Python 3.15 (PEP 810) concurrent.futures imports .process and
    # .thread lazily: reading concurrent.futures.process.X works only after
    # an import of that submodule, never as a side effect of the package's.
    for name, tree in _modules().items():
        imported = _run_time_imports(tree, module_level_only=False)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "concurrent"
                and node.value.attr == "futures"
                and node.attr in ("process", "thread", "interpreter")
            ):
                submodule = f"concurrent.futures.{node.attr}"
                assert submodule in imported, f"{name} reads {submodule} without importing it"
