"""CPython's own concurrent.futures process-pool tests, run against duckpool.

``duckpool.ProcessPoolExecutor`` is meant to be a drop-in for
``concurrent.futures.ProcessPoolExecutor``; the standard library's test suite
(``test.test_concurrent_futures``, installed with some interpreters) says what
a drop-in must do.  ``_cpython_suite_cases`` imports that suite at run time and
rebinds each process-pool test class (fork, forkserver and spawn variants of the
executor, wait, as_completed, shutdown, deadlock, initializer and process-pool
tests) to duckpool's executor; here every unittest test becomes one pytest test,
so failures show one by one.

Excluded, by the list below (each with its reason): tests that inspect the
standard library's private attributes (``_processes``, ``_executor_manager_thread``,
``_call_queue``, ...) or its internal machinery, and tests of stdlib behaviour
duckpool changes on purpose.  Everything else must pass.

Where the suite is not installed (this machine's 3.11 and 3.12) the module is
skipped; run it explicitly with ``python3.13 -m pytest -m cpython_suite``.  The
single-module suite of older versions (3.9's) is run the same way.
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
import unittest
from pathlib import Path

import pytest

import duckpool

pytestmark = pytest.mark.cpython_suite

pytest.importorskip(
    "test.test_concurrent_futures",
    reason=(
        "CPython's test.test_concurrent_futures is not installed for Python "
        f"{sys.version_info.major}.{sys.version_info.minor}; run this module under an "
        "interpreter that ships its test suite, e.g. python3.13 -m pytest -m cpython_suite"
    ),
)

import _cpython_suite_cases as cases  # noqa: E402 - after the skip above

if cases.UNAVAILABLE is not None:
    pytest.skip(cases.UNAVAILABLE, allow_module_level=True)

_PRIVATE = "inspects the stdlib's private {} (duckpool has its own engine)"
_STARTED_LATER = (
    "counts _processes right after submit(), expecting the workers started by then; duckpool "
    "starts them from its dispatcher thread, so that submit() never waits for a start"
)
_EAGER = (
    "counts _processes after a few tasks, expecting workers started on demand; duckpool "
    "starts every worker with the pool, so that no request pays for a start"
)

#: ``fnmatch`` patterns over ``"<Class>.<test_method>"`` -> why the test is not run.
EXCLUDED: dict[str, str] = {
    # -- test_process_pool ------------------------------------------------------
    "*.test_killed_child": _PRIVATE.format("_processes")
    + "; and by design a killed worker fails only its task, the pool heals",
    "*.test_saturation": _STARTED_LATER,
    "*.test_idle_process_reuse_one": _EAGER,
    "*.test_idle_process_reuse_multiple": _EAGER,
    "ProcessPoolForkProcessPool*.test_max_tasks_per_child": (
        "duckpool supports max_tasks_per_child under fork"
    ),
    "*.test_max_tasks_per_child_defaults_to_spawn_context": _PRIVATE.format("_mp_context")
    + "; duckpool supports max_tasks_per_child under fork, so keeps the default context",
    "*.test_python_finalization_error": "mocks thread creation so the stdlib's second internal "
    "thread (its queue feeder) fails; duckpool starts no such thread, so nothing is injected",
    # -- test_shutdown ----------------------------------------------------------
    "*.test_processes_terminate": _STARTED_LATER + "; and " + _EAGER,
    "*.test_context_manager_shutdown": "builds concurrent.futures.ProcessPoolExecutor by name; "
    + _PRIVATE.format("_processes"),
    "*.test_del_shutdown": "builds concurrent.futures.ProcessPoolExecutor by name; "
    + _PRIVATE.format("_processes, _call_queue and _executor_manager_thread"),
    "*.test_shutdown_no_wait": "builds concurrent.futures.ProcessPoolExecutor by name; "
    + _PRIVATE.format("_processes, _call_queue and _executor_manager_thread"),
    # -- test_deadlock ----------------------------------------------------------
    "*.test_shutdown_deadlock_pickle": _PRIVATE.format("_executor_manager_thread"),
}

#: Further exclusions for the single-module suite of older versions (3.9's).
EXCLUDED_MODULE_FORM: dict[str, str] = {
    "*.test_hang_gh83386": "its script imports the whole single-module suite, which fixes the "
    "start method, so the script's set_start_method() raises (upstream skips it for process pools)",
}
if cases.FORM == "module":
    EXCLUDED.update(EXCLUDED_MODULE_FORM)

#: Tests run in a fresh interpreter (``python -m unittest``), with the reason.
ISOLATED: dict[str, str] = {
    "FailingInitializerResourcesTest.*": "stops the process-wide resource tracker and waits "
    "until every process holding its pipe (any live worker of any pool) has exited",
}
#: Seconds an isolated test may take.
ISOLATED_TIMEOUT = 90


def _matching(test_id: str, patterns: dict[str, str]) -> str | None:
    class_and_method = test_id.split(".", 1)[1]
    for pattern, reason in patterns.items():
        if fnmatch.fnmatchcase(class_and_method, pattern):
            return reason
    return None


def _params() -> list[object]:
    params = []
    for test_id in sorted(cases.CASES):
        reason = _matching(test_id, EXCLUDED)
        marks = [pytest.mark.skip(reason=f"excluded: {reason}")] if reason else []
        params.append(pytest.param(test_id, id=test_id, marks=marks))
    return params


def test_exclusions_match_something() -> None:
    """Every exclusion pattern names at least one collected test (no stale entries)."""
    if cases.FORM != "package":
        pytest.skip("the lists are kept against the 3.12+ package; older suites lack some tests")
    class_and_methods = [test_id.split(".", 1)[1] for test_id in cases.CASES]
    stale = [
        pattern
        for pattern in (*EXCLUDED, *ISOLATED)
        if not any(fnmatch.fnmatchcase(name, pattern) for name in class_and_methods)
    ]
    assert not stale, f"patterns that match no CPython test: {stale}"


def _run_in_this_process(test_id: str) -> None:
    cls, method = cases.CASES[test_id]
    result = unittest.TestResult()
    cls(method).run(result)
    problems = [
        f"{kind} in {test}:\n{text}"
        for kind, outcomes in (("ERROR", result.errors), ("FAIL", result.failures))
        for test, text in outcomes
    ]
    problems += [f"unexpected success: {test}" for test in result.unexpectedSuccesses]
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
    if result.skipped:
        pytest.skip(f"CPython's test skips itself: {result.skipped[0][1]}")
    assert result.testsRun == 1, f"{test_id} did not run"


def _run_in_fresh_interpreter(test_id: str) -> None:
    cls, method = cases.CASES[test_id]
    duckpool_parent = str(Path(duckpool.__file__).resolve().parent.parent)
    tests_dir = str(Path(__file__).resolve().parent)
    path = [tests_dir, duckpool_parent, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    name = f"{cases.__name__}.{cls.__name__}.{method}"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "unittest", "-v", name],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=ISOLATED_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = (exc.output or b"").decode(errors="replace")
        pytest.fail(f"{name} did not finish in {ISOLATED_TIMEOUT} s:\n{output}", pytrace=False)
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        pytest.fail(f"{name} failed (exit code {done.returncode}):\n{output}", pytrace=False)
    if re.search(r"^OK \(skipped=1\)$", output, re.MULTILINE):
        pytest.skip(f"CPython's test skips itself:\n{output}")


@pytest.mark.parametrize("test_id", _params())
def test_cpython(test_id: str) -> None:
    """Run one CPython test against duckpool's executor; it must pass (or skip itself)."""
    if _matching(test_id, ISOLATED):
        _run_in_fresh_interpreter(test_id)
    else:
        _run_in_this_process(test_id)
