"""CPython's process-pool test cases, rebound to duckpool's executor.

Importing this module imports the installed ``test.test_concurrent_futures``
package (CPython's own test suite, shipped with some interpreters) and, for
every ``unittest.TestCase`` there that runs a process pool (the classes that
``util.create_executor_tests`` builds from a ``ProcessPool{Fork,Forkserver,
Spawn}Mixin``), defines a subclass here whose ``executor_type`` is
:class:`duckpool.ProcessPoolExecutor`.  No CPython test code is copied: the
subclasses only change which executor the inherited tests construct.

The subclasses live in this module, under the names CPython gives them, so a
worker started by spawn or forkserver can unpickle a reference to one (a test
may submit a bound classmethod); the ``tests`` directory is on the workers'
``sys.path`` (see ``conftest.py``).

Two adaptations beyond ``executor_type``:

* A few shutdown tests run a script with ``assert_python_ok`` that does
  ``from concurrent.futures import <executor_type.__name__>``.  While a
  duckpool test runs, the module's ``assert_python_ok`` is wrapped so the script
  starts with a prelude that makes ``concurrent.futures.ProcessPoolExecutor``
  duckpool's class (and puts duckpool's directory on ``sys.path``).  A prelude
  in the script, not a ``sitecustomize`` or ``.pth`` hook reached through
  ``PYTHONPATH`` and an environment variable: ``assert_python_ok`` starts the
  child with ``-I`` (or ``-E``), which ignores ``PYTHONPATH``.  The prelude
  leaves a mark file when it hands duckpool's class out, and the wrapper fails
  the test if a script that names ``ProcessPoolExecutor`` left none, so such
  a test cannot pass on the stdlib's executor unnoticed.  The prelude also
  imports ``multiprocessing``: the gh-83386 script calls
  ``multiprocessing.set_start_method`` without importing it (upstream skips
  that test for every process pool, so the slip never shows there).
* ``FailingInitializerResourcesTest`` runs a named process-pool test class
  itself; the subclass here hands it the duckpool variant instead.

``CASES`` maps each test id, ``"<module>.<Class>.<test_method>"``, to its
``(class, method name)``.  ``UNAVAILABLE`` says why there are none, if so.
Both forms of the suite are read: the package of 3.12+ and the single module
of earlier versions (3.9's, for one).
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import sys
import tempfile
import unittest
from typing import Any, Callable, Optional
from unittest import mock

import duckpool

PACKAGE = "test.test_concurrent_futures"
#: Names of the mixins that make a CPython test class a process-pool test.
PROCESS_MIXINS = ("ProcessPoolForkMixin", "ProcessPoolForkserverMixin", "ProcessPoolSpawnMixin")

CASES: dict[str, tuple[type[unittest.TestCase], str]] = {}
UNAVAILABLE: Optional[str] = None
#: "package" (3.12+: one module per topic) or "module" (up to 3.11: one module).
FORM: Optional[str] = None


def _duckpool_prelude(mark: str) -> str:
    """Source that makes a fresh interpreter's ProcessPoolExecutor duckpool's.

    duckpool is imported only when the script asks ``concurrent.futures`` for
    ``ProcessPoolExecutor`` (the module's lazy ``__getattr__``), so the script's
    own import order, and with it the order of ``atexit`` hooks, is kept.  The
    file ``mark`` is created when duckpool's class is handed out.
    """
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(duckpool.__file__)))
    return (
        "import sys\n"
        f"sys.path.insert(0, {package_parent!r})\n"
        "import multiprocessing\n"
        "import concurrent.futures as _cf_\n"
        "def _cf_getattr_(name, _stdlib_getattr=_cf_.__getattr__, _cf=_cf_):\n"
        "    value = _stdlib_getattr(name)\n"
        "    if name == 'ProcessPoolExecutor':\n"
        "        import duckpool\n"
        "        value = _cf.ProcessPoolExecutor = duckpool.ProcessPoolExecutor\n"
        f"        open({mark!r}, 'w').close()\n"
        "    return value\n"
        "_cf_.__getattr__ = _cf_getattr_\n"
        "del _cf_, _cf_getattr_\n"
    )


def _with_duckpool_prelude(run: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an ``assert_python_*`` helper so ``-c`` scripts run with the prelude.

    Raises AssertionError after the run if the script names
    ``ProcessPoolExecutor`` but was never handed duckpool's.
    """

    def run_with_duckpool(*args: Any, **env_vars: Any) -> Any:
        args_list = list(args)
        if "-c" not in args_list:
            return run(*args_list, **env_vars)
        i = args_list.index("-c") + 1
        script = args_list[i]
        with tempfile.TemporaryDirectory(prefix="duckpool-prelude-") as tmp:
            mark = os.path.join(tmp, "handed-out")
            args_list[i] = _duckpool_prelude(mark) + script
            result = run(*args_list, **env_vars)
            if "ProcessPoolExecutor" in script and not os.path.exists(mark):
                raise AssertionError(
                    "the script names ProcessPoolExecutor but never got duckpool's "
                    f"from concurrent.futures, so the stdlib's ran:\n{script}"
                )
        return result

    return run_with_duckpool


class _DuckpoolCase:
    """Mixed in first: run the inherited tests on duckpool's executor."""

    executor_type = duckpool.ProcessPoolExecutor
    _cpython_module: str = ""

    def setUp(self) -> None:
        module = sys.modules[self._cpython_module]
        for helper in ("assert_python_ok", "assert_python_failure"):
            original = module.__dict__.get(helper)
            if original is not None:
                patcher = mock.patch.object(module, helper, _with_duckpool_prelude(original))
                patcher.start()
                self.addCleanup(patcher.stop)  # type: ignore[attr-defined]
        super().setUp()  # type: ignore[misc]


def _is_process_pool_case(cls: object, mixins: tuple[type, ...]) -> bool:
    return inspect.isclass(cls) and issubclass(cls, unittest.TestCase) and issubclass(cls, mixins)


def _define(name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> type:
    namespace = {"__module__": __name__, "__qualname__": name, **namespace}
    cls = type(name, bases, namespace)
    if name in globals():
        raise RuntimeError(f"two CPython test classes are both named {name}")
    globals()[name] = cls
    return cls


def _collect(modules: list[Any], mixins: tuple[type, ...]) -> None:
    originals: dict[type, type] = {}  # CPython's class -> duckpool's subclass
    loader = unittest.TestLoader()
    for module in modules:
        short = module.__name__.rsplit(".", 1)[-1]
        for name, cls in sorted(vars(module).items()):
            if not _is_process_pool_case(cls, mixins) or cls.__module__ != module.__name__:
                continue
            duck = _define(name, (_DuckpoolCase, cls), {"_cpython_module": module.__name__})
            originals[cls] = duck
            for method in loader.getTestCaseNames(duck):
                CASES[f"{short}.{name}.{method}"] = (duck, method)

    # CPython's FailingInitializerResourcesTest runs a process-pool class by
    # name (looked up in its module); give it duckpool's variant instead.
    for module in modules:
        resources = getattr(module, "FailingInitializerResourcesTest", None)
        if resources is None:
            continue

        def _test(self: Any, test_class: type, _base: type = resources) -> Any:
            return _base._test(self, originals.get(test_class, test_class))

        name = "FailingInitializerResourcesTest"
        duck = _define(name, (resources,), {"_test": _test})
        short = module.__name__.rsplit(".", 1)[-1]
        for method in loader.getTestCaseNames(duck):
            CASES[f"{short}.{name}.{method}"] = (duck, method)


def _load() -> None:
    global UNAVAILABLE, FORM
    try:
        package = importlib.import_module(PACKAGE)
    except unittest.SkipTest as exc:  # the package's __init__ may skip itself
        UNAVAILABLE = f"{PACKAGE} skips itself here: {exc}"
        return
    except ImportError as exc:
        UNAVAILABLE = (
            f"CPython's {PACKAGE} is not installed for Python "
            f"{sys.version_info.major}.{sys.version_info.minor} ({exc}); "
            "run this module under an interpreter that ships it, e.g. python3.13"
        )
        return
    if hasattr(package, "__path__"):
        # 3.12+: a package whose util.py holds the mixins, one module per topic.
        FORM = "package"
        util = importlib.import_module(f"{PACKAGE}.util")
        modules = [
            importlib.import_module(f"{PACKAGE}.{info.name}")
            for info in pkgutil.iter_modules(package.__path__)
            if info.name.startswith("test_")
        ]
    else:
        # Up to 3.11: a single module holding mixins and tests alike.
        FORM = "module"
        util = package
        modules = [package]
    mixins = tuple(getattr(util, name) for name in PROCESS_MIXINS if hasattr(util, name))
    if not mixins:
        UNAVAILABLE = f"{PACKAGE} defines none of {PROCESS_MIXINS}"
        return
    _collect(modules, mixins)


_load()
