"""duckpool's executor and futures against the standard library of Pythons this
machine does not have (3.14, 3.15).

No 3.14 or 3.15 interpreter can be installed here, but their exact standard
libraries ship in the npm packages of Pyodide (``python_stdlib.zip``).  This
module fetches them from the npm registry (once; kept under
``~/.cache/duckpool-tests``), reads ``concurrent/futures/process.py`` and
``_base.py`` with ``ast`` (nothing of them runs), and checks that every public
method and parameter of their ``ProcessPoolExecutor`` exists on duckpool's
with a compatible signature, and that each ``Future`` method duckpool's
futures override keeps the signature it has there.  Offline, the tests skip,
saying so.
"""

from __future__ import annotations

import ast
import concurrent.futures
import functools
import inspect
import io
import os
import tarfile
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pytest

import _executor_tasks as tasks
import duckpool
from duckpool._futures import PoolFuture

TIMEOUT = 30

#: Python version -> the Pyodide release whose npm package carries its stdlib.
RELEASES = {"3.14": "314.0.7", "3.15": "315.0.0-alpha.2"}
_URL = "https://registry.npmjs.org/pyodide/-/pyodide-{}.tgz"
_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "duckpool-tests"


class Param(NamedTuple):
    name: str
    kind: inspect._ParameterKind
    has_default: bool


@functools.cache
def _stdlib_zip(version: str) -> zipfile.ZipFile:
    """The ``python_stdlib.zip`` of ``version``, fetched once."""
    release = RELEASES[version]
    cached = _CACHE / f"python_stdlib-{release}.zip"
    if not cached.exists():
        url = _URL.format(release)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                package = response.read()
        except (urllib.error.URLError, OSError) as exc:
            pytest.skip(f"could not fetch Python {version}'s stdlib from {url}: {exc!r}")
        with tarfile.open(fileobj=io.BytesIO(package)) as tar:
            member = tar.extractfile("package/python_stdlib.zip")
            assert member is not None, f"no python_stdlib.zip in {url}"
            data = member.read()
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.part")
        partial.write_bytes(data)
        os.replace(partial, cached)  # another run may fetch it at the same time
    return zipfile.ZipFile(cached)


def _class(version: str, module: str, name: str) -> ast.ClassDef:
    tree = ast.parse(_stdlib_zip(version).read(module).decode())
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def _methods(node: ast.ClassDef, public_only: bool) -> dict[str, ast.FunctionDef]:
    return {
        f.name: f
        for f in node.body
        if isinstance(f, ast.FunctionDef)
        and not any(isinstance(d, ast.Name) and d.id == "property" for d in f.decorator_list)
        and (not public_only or not f.name.startswith("_") or f.name == "__init__")
    }


def _ast_params(function: ast.FunctionDef) -> list[Param]:
    """The parameters of ``function`` (without ``self``), as ``inspect`` kinds."""
    args = function.args
    positional = [*args.posonlyargs, *args.args]
    first_default = len(positional) - len(args.defaults)
    params = [
        Param(
            a.arg,
            inspect.Parameter.POSITIONAL_ONLY
            if i < len(args.posonlyargs)
            else inspect.Parameter.POSITIONAL_OR_KEYWORD,
            i >= first_default,
        )
        for i, a in enumerate(positional)
    ]
    if args.vararg is not None:
        params.append(Param(args.vararg.arg, inspect.Parameter.VAR_POSITIONAL, True))
    params += [
        Param(a.arg, inspect.Parameter.KEYWORD_ONLY, d is not None)
        for a, d in zip(args.kwonlyargs, args.kw_defaults)
    ]
    if args.kwarg is not None:
        params.append(Param(args.kwarg.arg, inspect.Parameter.VAR_KEYWORD, True))
    return params[1:]  # self


def _our_params(function: Callable[..., Any]) -> list[Param]:
    return [
        Param(
            p.name,
            p.kind,
            p.default is not inspect.Parameter.empty
            or p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD),
        )
        for p in inspect.signature(function).parameters.values()
    ][1:]  # self


def _incompatibilities(theirs: list[Param], ours: list[Param]) -> list[str]:
    """How a call valid against ``theirs`` could fail against ``ours``."""
    problems = []
    ours_by_name = {p.name: p for p in ours}
    their_positional = [p for p in theirs if p.kind <= inspect.Parameter.POSITIONAL_OR_KEYWORD]
    our_positional = [p for p in ours if p.kind <= inspect.Parameter.POSITIONAL_OR_KEYWORD]
    for index, param in enumerate(their_positional):
        if index >= len(our_positional):
            problems.append(f"positional parameter {param.name!r} is missing")
        elif param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and (
            our_positional[index].name != param.name
        ):
            problems.append(
                f"positional parameter {index} is {our_positional[index].name!r}, "
                f"not {param.name!r}"
            )
        elif param.kind is inspect.Parameter.POSITIONAL_ONLY and (
            our_positional[index].kind is not inspect.Parameter.POSITIONAL_ONLY
        ):
            # (the name would collide with a keyword the call passes on)
            problems.append(f"{param.name!r} is not positional-only")
    for param in theirs:
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            mine = ours_by_name.get(param.name)
            if mine is None or mine.kind not in (
                inspect.Parameter.KEYWORD_ONLY,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
            ):
                problems.append(f"keyword {param.name!r} is missing")
                continue
        elif param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            if not any(p.kind is param.kind for p in ours):
                problems.append(f"*{param.name} ({param.kind.description}) is missing")
            continue
        mine = ours_by_name.get(param.name)
        if param.has_default and mine is not None and not mine.has_default:
            problems.append(f"{param.name!r} has a default there, not here")
    their_names = {p.name for p in theirs}
    for index, param in enumerate(ours):
        matched = index < len(their_positional) and param.kind <= (
            inspect.Parameter.POSITIONAL_OR_KEYWORD
        )
        if not matched and param.name not in their_names and not param.has_default:
            problems.append(f"{param.name!r} is required here and unknown there")
    return problems


@pytest.fixture(params=sorted(RELEASES), ids=lambda v: f"python{v}")
def version(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_every_public_method_of_the_stdlib_executor_exists_with_a_compatible_signature(
    version: str,
) -> None:
    stdlib = _class(version, "concurrent/futures/process.py", "ProcessPoolExecutor")
    base = _class(version, "concurrent/futures/_base.py", "Executor")
    methods = {**_methods(base, public_only=True), **_methods(stdlib, public_only=True)}
    assert {"__init__", "submit", "map", "shutdown"} <= set(methods)  # read what was meant
    problems = []
    for name, function in sorted(methods.items()):
        ours = getattr(duckpool.ProcessPoolExecutor, name, None)
        if ours is None:
            problems.append(f"{name}: missing")
            continue
        for problem in _incompatibilities(_ast_params(function), _our_params(ours)):
            problems.append(f"{name}: {problem}")
    assert problems == [], f"against Python {version}'s ProcessPoolExecutor"


def test_each_future_method_duckpool_overrides_keeps_the_stdlib_signature(version: str) -> None:
    stdlib = _methods(_class(version, "concurrent/futures/_base.py", "Future"), False)
    # (Not __init__: the pool makes its futures, a caller never does.)
    overridden = [
        name
        for name in vars(PoolFuture)
        if name in vars(Future) and name in stdlib and name != "__init__"
    ]
    assert "result" in overridden and "exception" in overridden  # read what was meant
    problems = []
    for name in overridden:
        member = vars(PoolFuture)[name]
        if not callable(member):
            continue
        for problem in _incompatibilities(_ast_params(stdlib[name]), _our_params(member)):
            problems.append(f"{name}: {problem}")
    assert problems == [], f"against Python {version}'s Future"


def test_the_check_tells_an_incompatible_signature() -> None:
    # The comparison itself: each kind of break is caught.
    def theirs(self: Any, fn: Any, /, *args: Any, timeout: Any = None, **kwargs: Any) -> None: ...

    def same(self: Any, fn: Any, /, *args: Any, timeout: Any = None, **kwargs: Any) -> None: ...

    def renamed(self: Any, func: Any, /, *args: Any, limit: Any = None, **kwargs: Any) -> None: ...

    def keyword_fn(self: Any, fn: Any, *args: Any, timeout: Any = None, **kw: Any) -> None: ...

    def required_extra(self: Any, fn: Any, /, extra: Any, *args: Any, **kwargs: Any) -> None: ...

    def no_default(self: Any, fn: Any, /, *args: Any, timeout: Any, **kwargs: Any) -> None: ...

    reference = _our_params(theirs)
    assert _incompatibilities(reference, _our_params(same)) == []
    assert _incompatibilities(reference, _our_params(renamed)) == ["keyword 'timeout' is missing"]
    assert _incompatibilities(reference, _our_params(keyword_fn)) == ["'fn' is not positional-only"]
    assert "'extra' is required here and unknown there" in _incompatibilities(
        reference, _our_params(required_extra)
    )
    assert _incompatibilities(reference, _our_params(no_default)) == [
        "'timeout' has a default there, not here"
    ]


def test_python_3_15_s_future_snapshot_reads_duckpool_s_futures_right(
    executor: duckpool.ProcessPoolExecutor, tmp_path: Path
) -> None:
    # From 3.15, asyncio reads a concurrent future through the inherited
    # Future._get_snapshot() (wrap_future, run_in_executor): run that very
    # method, from 3.15's source, on duckpool's futures in every state,
    # whose condition is made only when something waits.
    import concurrent.futures._base as base

    stdlib = _methods(_class("3.15", "concurrent/futures/_base.py", "Future"), False)
    function = stdlib["_get_snapshot"]
    namespace = {name: getattr(base, name) for name in ("FINISHED", "CANCELLED")}
    namespace["CANCELLED_AND_NOTIFIED"] = base.CANCELLED_AND_NOTIFIED
    exec(compile(ast.Module(body=[function], type_ignores=[]), "<3.15 _base>", "exec"), namespace)
    snapshot = namespace["_get_snapshot"]

    gate = tmp_path / "gate"
    running = executor.submit(tasks.wait_for_file, str(gate))
    assert snapshot(running) == (False, False, None, None)
    cancelled: PoolFuture[int] = PoolFuture(executor._core)  # (as the pool makes them)
    assert snapshot(cancelled) == (False, False, None, None)
    assert cancelled.cancel()
    assert snapshot(cancelled) == (True, True, None, None)
    gate.touch()
    assert running.result(TIMEOUT) == "released"
    assert snapshot(running) == (True, False, "released", None)
    failing = executor.submit(tasks.raise_key_error, "k")
    concurrent.futures.wait([failing], TIMEOUT)
    done, was_cancelled, result, error = snapshot(failing)
    assert (done, was_cancelled, result) == (True, False, None)
    assert isinstance(error, KeyError)
    fresh = executor.submit(tasks.add, 2, 3)
    assert fresh.result(TIMEOUT) == 5 and snapshot(fresh) == (True, False, 5, None)
