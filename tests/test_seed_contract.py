"""The seed API page, checked against duckpool: every name, parameter and default.

The page (``tests/data/seed_api.txt``, a copy of ``shared/seed/000_9f83b40891b24175.txt``)
is the Duck framework's ``duck.utils.multiprocessing.processpool`` API as rendered by
sphinx-autodoc2.  It is parsed here, not transcribed, so a name or default that drifts
from the page fails a test.  Also the basic behaviours the page's names promise, under
every start method.  Runs on the oldest and newest supported Python (marker ``contract``).
"""

from __future__ import annotations

import ast
import builtins
import concurrent.futures
import importlib
import inspect
import multiprocessing
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

import _tasks

pytestmark = pytest.mark.contract

SEED_MODULE = "duck.utils.multiprocessing.processpool"
MODULES = ("duckpool", SEED_MODULE)
TESTS_DIR = Path(__file__).resolve().parent
SEED_COPY = TESTS_DIR / "data" / "seed_api.txt"
SEED_ORIGINAL = TESTS_DIR.parent.parent / "shared" / "seed" / "000_9f83b40891b24175.txt"

_EMPTY = inspect.Parameter.empty


@dataclass(frozen=True)
class SeedParam:
    """One parameter as the page shows it."""

    name: str
    kind: inspect._ParameterKind
    default: Any = _EMPTY


@dataclass(frozen=True)
class SeedEntry:
    """One ``{py:...}`` directive of the page."""

    directive: str  # class, exception, method, function, attribute, data
    qualname: str  # relative to the module: "ProcessPoolManager.start"
    params: Optional[tuple[SeedParam, ...]]  # None for data and attributes
    options: dict[str, str] = field(default_factory=dict)
    bases: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]


_HEADER = re.compile(r"^`{3,}\{py:(\w+)\}\s+(.*?)\s*$")
_OPTION = re.compile(r"^:([\w-]+):\s*(.*?)\s*$")
_BASES = re.compile(r"^Bases:\s*(.*)$")


def _parse_params(signature: str) -> tuple[SeedParam, ...]:
    """Parse ``name(a: int, *args, b=None, **kw) -> T`` as Python; return its parameters."""
    tree = ast.parse(f"def {signature}:\n    pass\n")
    fn = tree.body[0]
    assert isinstance(fn, ast.FunctionDef)
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    defaults: list[Any] = [_EMPTY] * (len(positional) - len(a.defaults)) + [
        ast.literal_eval(d) for d in a.defaults
    ]
    params = [
        SeedParam(arg.arg, inspect.Parameter.POSITIONAL_ONLY, d)
        for arg, d in zip(a.posonlyargs, defaults)
    ]
    params += [
        SeedParam(arg.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, d)
        for arg, d in zip(a.args, defaults[len(a.posonlyargs) :])
    ]
    if a.vararg is not None:
        params.append(SeedParam(a.vararg.arg, inspect.Parameter.VAR_POSITIONAL))
    for arg, kw_default in zip(a.kwonlyargs, a.kw_defaults):
        d = _EMPTY if kw_default is None else ast.literal_eval(kw_default)
        params.append(SeedParam(arg.arg, inspect.Parameter.KEYWORD_ONLY, d))
    if a.kwarg is not None:
        params.append(SeedParam(a.kwarg.arg, inspect.Parameter.VAR_KEYWORD))
    return tuple(params)


def parse_seed_page(text: str, module: str = SEED_MODULE) -> list[SeedEntry]:
    """Every API directive of the page, with its signature, options and bases."""
    entries: list[SeedEntry] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        header = _HEADER.match(lines[i])
        i += 1
        if header is None or header.group(1) == "module":
            continue
        directive, signature = header.groups()
        options: dict[str, str] = {}
        bases: tuple[str, ...] = ()
        while i < len(lines) and not _HEADER.match(lines[i]):
            line = lines[i]
            option = _OPTION.match(line)
            if option is not None:
                key, value = option.groups()
                if value == ">" and i + 1 < len(lines):  # folded value on the next line
                    i += 1
                    value = lines[i].strip()
                options[key] = value
            based = _BASES.match(line)
            if based is not None:
                bases = tuple(re.findall(r"`([^`]+)`", based.group(1)))
            i += 1
        canonical = options.get("canonical", "")
        assert canonical.startswith(module + "."), f"unexpected canonical {canonical!r}"
        qualname = canonical[len(module) + 1 :]
        params = _parse_params(signature) if "(" in signature else None
        entries.append(SeedEntry(directive, qualname, params, options, bases))
    return entries


SEED_ENTRIES = parse_seed_page(SEED_COPY.read_text())
CALLABLE_ENTRIES = [e for e in SEED_ENTRIES if e.params is not None]
TOP_LEVEL_NAMES = sorted(e.qualname for e in SEED_ENTRIES if "." not in e.qualname)


def _resolve(module: Any, qualname: str) -> Any:
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _mangled(class_name: str, attr: str) -> str:
    """``__instances`` on ``ProcessPoolManager`` is stored as ``_ProcessPoolManager__instances``."""
    if attr.startswith("__") and not attr.endswith("__"):
        return f"_{class_name.lstrip('_')}{attr}"
    return attr


def _same_value(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _actual_params(entry: SeedEntry, module: Any) -> Optional[list[inspect.Parameter]]:
    """The implementation's parameters for ``entry``, without ``self``/``cls``.

    None when Python cannot give a signature (an exception class that keeps the
    builtin ``Exception.__init__``, which the page renders as ``()``).
    """
    if entry.directive == "method":
        class_name, method_name = entry.qualname.rsplit(".", 1)
        cls = _resolve(module, class_name)
        raw = inspect.getattr_static(cls, method_name)
        func = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
        params = list(inspect.signature(func).parameters.values())
        return params if isinstance(raw, staticmethod) else params[1:]
    try:
        return list(inspect.signature(_resolve(module, entry.qualname)).parameters.values())
    except ValueError:
        return None


# --- the page and its parse -------------------------------------------------------


def test_seed_copy_matches_shared_original() -> None:
    if not SEED_ORIGINAL.exists():
        pytest.skip(f"{SEED_ORIGINAL} is not beside this clone")
    assert SEED_COPY.read_text() == SEED_ORIGINAL.read_text()


def test_seed_page_parse_finds_every_directive() -> None:
    found = {(e.directive, e.qualname) for e in SEED_ENTRIES}
    assert found == {
        ("exception", "ManagerNotFound"),
        ("exception", "UnknownTaskError"),
        ("class", "ProcessPoolManager"),
        ("attribute", "ProcessPoolManager.__instances"),
        ("method", "ProcessPoolManager.__repr__"),
        ("method", "ProcessPoolManager.__str__"),
        ("method", "ProcessPoolManager._worker_init"),
        ("method", "ProcessPoolManager.all_instances"),
        ("method", "ProcessPoolManager.get_pool"),
        ("method", "ProcessPoolManager.registry"),
        ("method", "ProcessPoolManager.start"),
        ("method", "ProcessPoolManager.stop"),
        ("method", "ProcessPoolManager.submit_task"),
        ("data", "REGISTRY"),
        ("function", "get_or_create_process_manager"),
    }


def test_seed_page_parse_reads_parameters_and_defaults() -> None:
    by_name = {e.qualname: e for e in SEED_ENTRIES}
    p = inspect.Parameter
    assert by_name["ProcessPoolManager.submit_task"].params == (
        SeedParam("task", p.POSITIONAL_OR_KEYWORD),
        SeedParam("args", p.VAR_POSITIONAL),
        SeedParam("task_type", p.KEYWORD_ONLY, None),
        SeedParam("kwargs", p.VAR_KEYWORD),
    )
    assert by_name["get_or_create_process_manager"].params == (
        SeedParam("id", p.POSITIONAL_OR_KEYWORD, None),
        SeedParam("force_create", p.POSITIONAL_OR_KEYWORD, False),
        SeedParam("strictly_get", p.POSITIONAL_OR_KEYWORD, False),
    )
    assert "classmethod" in by_name["ProcessPoolManager.registry"].options


# --- names and signatures ------------------------------------------------------------


@pytest.mark.parametrize("module_name", MODULES)
@pytest.mark.parametrize("name", TOP_LEVEL_NAMES)
def test_seed_name_is_importable(module_name: str, name: str) -> None:
    module = importlib.import_module(module_name)
    assert hasattr(module, name), f"{module_name} has no {name}"


@pytest.mark.parametrize("name", TOP_LEVEL_NAMES)
def test_seed_path_exports_the_same_objects_as_duckpool(name: str) -> None:
    duckpool = importlib.import_module("duckpool")
    seed = importlib.import_module(SEED_MODULE)
    assert getattr(seed, name) is getattr(duckpool, name)


@pytest.mark.parametrize("module_name", MODULES)
def test_star_import_gives_every_seed_name(module_name: str) -> None:
    namespace: dict[str, Any] = {}
    exec(f"from {module_name} import *", namespace)
    missing = [name for name in TOP_LEVEL_NAMES if name not in namespace]
    assert not missing, f"'from {module_name} import *' lacks {missing}"


@pytest.mark.parametrize("entry", CALLABLE_ENTRIES, ids=lambda e: e.qualname)
def test_seed_signature_matches_page(entry: SeedEntry) -> None:
    module = importlib.import_module("duckpool")
    actual = _actual_params(entry, module)
    assert entry.params is not None
    if actual is None:
        # The builtin Exception.__init__: the page shows it as "()".
        assert entry.directive == "exception" and entry.params == ()
        return
    if entry.directive == "exception" and entry.params == ():
        kinds = [p.kind for p in actual]
        assert kinds in ([], [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD])
        return
    # duckpool may add parameters after the page's, each keyword-only with a
    # default (start(..., *, max_pending=None), stop(wait, *, timeout=None)):
    # every call the page allows still means the same.
    extensions = actual[len(entry.params) :]
    for param in extensions:
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, f"{param.name} must be keyword-only"
        assert param.default is not _EMPTY, f"{param.name} must have a default"
    actual = actual[: len(entry.params)]
    assert [p.name for p in actual] == [p.name for p in entry.params], "parameter names"
    assert [p.kind for p in actual] == [p.kind for p in entry.params], "parameter kinds"
    for seed_param, param in zip(entry.params, actual):
        if seed_param.default is _EMPTY:
            assert param.default is _EMPTY, f"{param.name} must have no default"
        else:
            assert _same_value(param.default, seed_param.default), (
                f"{param.name}: default {param.default!r}, page says {seed_param.default!r}"
            )


@pytest.mark.parametrize(
    "entry", [e for e in SEED_ENTRIES if e.directive == "method"], ids=lambda e: e.qualname
)
def test_seed_method_kind_matches_page(entry: SeedEntry) -> None:
    duckpool = importlib.import_module("duckpool")
    class_name, method_name = entry.qualname.rsplit(".", 1)
    cls = _resolve(duckpool, class_name)
    raw = inspect.getattr_static(cls, method_name)
    if "classmethod" in entry.options:
        assert isinstance(raw, classmethod), f"{entry.qualname} must be a classmethod"
    else:
        assert inspect.isfunction(raw), f"{entry.qualname} must be a plain method"
        assert raw is not getattr(object, method_name, None), f"{entry.qualname} not defined"


@pytest.mark.parametrize(
    "entry", [e for e in SEED_ENTRIES if e.directive == "exception"], ids=lambda e: e.qualname
)
def test_seed_exception_bases_match_page(entry: SeedEntry) -> None:
    duckpool = importlib.import_module("duckpool")
    exc = _resolve(duckpool, entry.qualname)
    assert isinstance(exc, type) and issubclass(exc, BaseException)
    for base in entry.bases:
        assert issubclass(exc, getattr(builtins, base))


def test_manager_not_found_takes_a_message() -> None:
    from duckpool import ManagerNotFound

    assert "no such manager" in str(ManagerNotFound("no such manager"))


def test_unknown_task_error_keeps_both_types() -> None:
    from duckpool import UnknownTaskError

    err = UnknownTaskError("reports", "render")
    assert (err.task_type, err.pool_task_type) == ("reports", "render")
    assert "reports" in str(err) and "render" in str(err)


def test_seed_class_attribute_instances_is_a_list() -> None:
    from duckpool import ProcessPoolManager

    (entry,) = [e for e in SEED_ENTRIES if e.directive == "attribute"]
    class_name, attr = entry.qualname.rsplit(".", 1)
    assert entry.options.get("value") == "[]"
    value = inspect.getattr_static(ProcessPoolManager, _mangled(class_name, attr))
    assert isinstance(value, list)


def test_registry_is_a_dict() -> None:
    from duckpool import REGISTRY

    # The page renders REGISTRY's value as "None" (an autodoc artifact; Duck's source
    # has "= {}"); its :type: is Dict[int, Dict[Any, ProcessPoolManager]].
    (entry,) = [e for e in SEED_ENTRIES if e.qualname == "REGISTRY"]
    assert entry.options["type"].startswith("typing.Dict[int, typing.Dict[typing.Any,")
    assert isinstance(REGISTRY, dict)


def test_registry_classmethod_returns_registry() -> None:
    from duckpool import REGISTRY, ProcessPoolManager

    assert ProcessPoolManager.registry() is REGISTRY


def test_all_instances_returns_a_list_of_managers() -> None:
    from duckpool import ProcessPoolManager, get_or_create_process_manager

    manager = get_or_create_process_manager("contract-all-instances")
    instances = ProcessPoolManager.all_instances()
    assert isinstance(instances, list)
    assert manager in instances
    assert all(isinstance(m, ProcessPoolManager) for m in instances)


def test_manager_constructor_accepts_creator_process() -> None:
    from duckpool import ProcessPoolManager

    ProcessPoolManager()
    ProcessPoolManager(multiprocessing.current_process())
    ProcessPoolManager(creator_process=None)


# --- behaviours the page's names promise -----------------------------------------------


def test_registry_shape_is_pid_then_id() -> None:
    from duckpool import REGISTRY, ProcessPoolManager, get_or_create_process_manager

    manager = get_or_create_process_manager("contract-shape")
    assert REGISTRY[os.getpid()]["contract-shape"] is manager
    assert all(isinstance(pid, int) for pid in REGISTRY)
    assert all(isinstance(m, ProcessPoolManager) for ids in REGISTRY.values() for m in ids.values())


def test_submit_task_returns_future_with_result(start_method: str) -> None:
    from duckpool import get_or_create_process_manager

    manager = get_or_create_process_manager("contract-submit")
    manager.start(max_workers=1, mp_context=multiprocessing.get_context(start_method))
    future = manager.submit_task(_tasks.add, 2, b=40)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=30) == 42


def test_get_pool_returns_a_process_pool_executor(start_method: str) -> None:
    from duckpool import get_or_create_process_manager

    manager = get_or_create_process_manager("contract-pool")
    manager.start(max_workers=1, mp_context=multiprocessing.get_context(start_method))
    pool = manager.get_pool()
    assert isinstance(pool, concurrent.futures.ProcessPoolExecutor)
    assert manager.get_pool() is pool


def test_typed_pool_raises_unknown_task_error(start_method: str) -> None:
    from duckpool import UnknownTaskError, get_or_create_process_manager

    manager = get_or_create_process_manager("contract-typed")
    manager.start(
        max_workers=1, task_type="render", mp_context=multiprocessing.get_context(start_method)
    )
    with pytest.raises(UnknownTaskError):
        manager.submit_task(_tasks.add, 1, 2, task_type="reports")
    assert manager.submit_task(_tasks.add, 1, 2, task_type="render").result(timeout=30) == 3


def test_strictly_get_missing_raises_manager_not_found() -> None:
    from duckpool import ManagerNotFound, get_or_create_process_manager

    with pytest.raises(ManagerNotFound):
        get_or_create_process_manager("contract-missing", strictly_get=True)


def test_submit_before_start_raises_runtime_error() -> None:
    from duckpool import get_or_create_process_manager

    with pytest.raises(RuntimeError):
        get_or_create_process_manager("contract-unstarted").submit_task(_tasks.add, 1, 2)


def test_get_pool_before_start_raises_runtime_error() -> None:
    from duckpool import get_or_create_process_manager

    with pytest.raises(RuntimeError):
        get_or_create_process_manager("contract-unstarted").get_pool()


def test_start_twice_raises_runtime_error(start_method: str) -> None:
    from duckpool import get_or_create_process_manager

    manager = get_or_create_process_manager("contract-twice")
    ctx = multiprocessing.get_context(start_method)
    manager.start(max_workers=1, mp_context=ctx)
    with pytest.raises(RuntimeError):
        manager.start(max_workers=1, mp_context=ctx)


def test_the_seed_module_is_a_real_module_whose_source_can_be_read() -> None:
    # Tools that read a module's source (inspect, coverage, documentation
    # builders) find it: duckpool/_seed.py, run under the seed's name.
    seed = importlib.import_module(SEED_MODULE)
    package = importlib.import_module("duckpool")
    assert seed.__name__ == SEED_MODULE
    assert seed.__file__ is not None and Path(seed.__file__).name == "_seed.py"
    assert Path(seed.__file__).parent == Path(str(package.__file__)).parent
    assert seed.__spec__ is not None and seed.__spec__.origin == seed.__file__
    source = inspect.getsource(seed)
    assert all(name in source for name in seed.__all__)
