"""The argument checks: one message style, naming the argument and the value.

Pure functions: no pool is made.  The public calls that use each check have
their own tests (test_executor, test_manager, test_dask, test_shutdown...).
"""

from __future__ import annotations

import multiprocessing
from typing import Any, Callable

import pytest

import duckpool
from duckpool import _validate


@pytest.mark.parametrize(
    ("check", "args", "error", "argument", "value"),
    [
        (_validate.check_positive_int, ("max_workers", 0), ValueError, "max_workers", 0),
        (_validate.check_positive_int, ("max_workers", "2"), TypeError, "max_workers", "2"),
        (_validate.check_positive_int, ("buffersize", True), TypeError, "buffersize", True),
        (_validate.check_timeout, ("task_timeout", -1), ValueError, "task_timeout", -1),
        (_validate.check_timeout, ("task_timeout", "1"), TypeError, "task_timeout", "1"),
        (_validate.check_drain_timeout, (-1,), ValueError, "timeout", -1),
        (
            _validate.check_one_of,
            ("serializer", "json", ("pickle",)),
            ValueError,
            "serializer",
            "json",
        ),
        (_validate.check_callable, ("initializer", 3), TypeError, "initializer", 3),
        (_validate.check_task_callable, (3,), TypeError, "callable", 3),
        (_validate.check_picklable, ("pool_id", lambda: 0), TypeError, "pool_id", None),
        (_validate.check_name_prefix, (7,), TypeError, "process_name_prefix", 7),
        (_validate.check_mp_context, ("fork",), TypeError, "mp_context", "fork"),
        (_validate.check_initargs, (5,), TypeError, "initargs", 5),
        (_validate.check_admission, (-1, "reject", None), ValueError, "max_pending", -1),
        (_validate.check_admission, (1, "drop", None), ValueError, "on_saturated", "drop"),
        (_validate.check_admission, (1, "block", 0), ValueError, "block_timeout", 0),
        (_validate.check_type_limits, ({"a": 0},), ValueError, "type_limits['a']", 0),
        (_validate.check_task_type, (1,), TypeError, "task_type", 1),
        (_validate.check_accepted_task_types, ([],), TypeError, "task_type", []),
        (_validate.check_offered_task_types, ([""],), TypeError, "task_types", ""),
        (_validate.check_backend, ("ray", None, {}), ValueError, "backend", "ray"),
        (_validate.check_chunksize, (0,), ValueError, "chunksize", 0),
    ],
)
def test_a_bad_argument_is_refused_naming_the_argument_and_its_value(
    check: Callable[..., Any], args: tuple[Any, ...], error: type, argument: str, value: Any
) -> None:
    with pytest.raises(error) as info:
        check(*args)
    assert argument in str(info.value)
    if value is not None:
        assert repr(value) in str(info.value)


def test_good_arguments_come_back_as_the_values_to_use() -> None:
    assert _validate.check_positive_int("max_workers", None) is None
    assert _validate.check_timeout("timeout", 2) == 2.0
    assert _validate.check_drain_timeout(0) == 0.0
    assert _validate.check_admission(None, "reject", None) == (None, None)
    assert _validate.check_admission(0, "block", 1) == (0, 1.0)
    assert _validate.check_accepted_task_types("a") == frozenset({"a"})
    assert _validate.check_offered_task_types(["a", "b"]) == ("a", "b")
    assert _validate.check_chunksize(None) is None
    # (None: no arguments, as a configuration defaulting both settings passes them.)
    assert _validate.check_initargs(None) == ()
    assert _validate.check_initargs([1, 2]) == (1, 2)
    context = multiprocessing.get_context()
    assert _validate.check_mp_context(context) is context
    # (The module, as the standard library's executor takes it: its default context.)
    assert _validate.check_mp_context(multiprocessing) is context


def test_a_wrong_type_may_raise_value_error_where_a_call_documents_it() -> None:
    # ProcessPoolManager.start documents ValueError for any bad max_workers.
    with pytest.raises(ValueError, match="max_workers must be an int, got '2'"):
        _validate.check_positive_int("max_workers", "2", wrong_type=ValueError)


def test_the_dask_backend_refuses_every_local_only_option_given_and_names_them() -> None:
    local_only = {
        "process_name_prefix": None,
        "mp_context": None,
        "max_pending": 1,
        "type_limits": {},
    }
    with pytest.raises(ValueError, match=r"^max_pending, type_limits apply to backend='local'"):
        _validate.check_backend("dask", None, local_only)
    assert _validate.check_backend("local", None, local_only) == "local"
    with pytest.raises(ValueError, match="address"):
        _validate.check_backend("local", "tcp://127.0.0.1:8786", {})


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (2.0, TypeError, "buffersize must be an integer or None"),
        ("2", TypeError, "buffersize must be an integer or None"),
        (0, ValueError, "buffersize must be None or > 0"),
        (-1, ValueError, "buffersize must be None or > 0"),
    ],
)
def test_map_buffersize_is_refused_as_python_3_14_refuses_it(
    executor: duckpool.ProcessPoolExecutor, value: object, error: type, message: str
) -> None:
    with pytest.raises(error) as info:
        executor.map(abs, [1, 2], buffersize=value)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_map_buffersize_takes_none_and_positive_ints() -> None:
    assert _validate.check_buffersize(None) is None
    assert _validate.check_buffersize(3) == 3
