"""map(..., progress=...): a tqdm bar that counts items and always closes."""

from __future__ import annotations

import io
import sys
from typing import Any, Iterator

import pytest

import _log_tasks as tasks
import duckpool

TIMEOUT = 30


@pytest.fixture
def executor(ctx: object) -> Iterator[duckpool.ProcessPoolExecutor]:
    pool = duckpool.ProcessPoolExecutor(2, mp_context=ctx)  # type: ignore[arg-type]
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


def bar_options(out: io.StringIO, **extra: Any) -> dict[str, Any]:
    """tqdm options that write every update to ``out``."""
    return {"file": out, "mininterval": 0, "miniters": 1, **extra}


def last_state(out: io.StringIO) -> str:
    """The bar as it was last drawn."""
    return out.getvalue().rstrip("\n").split("\r")[-1]


def closed(out: io.StringIO) -> bool:
    """A closed bar (leave=True) ends its line."""
    return out.getvalue().endswith("\n")


@pytest.mark.parametrize("chunksize", [1, 3])
def test_bar_counts_items_with_any_chunksize(
    executor: duckpool.ProcessPoolExecutor, chunksize: int
) -> None:
    out = io.StringIO()
    results = executor.map(
        tasks.fail_on, range(10), [-1] * 10, chunksize=chunksize, progress=bar_options(out)
    )
    assert list(results) == list(range(10))
    assert "10/10" in last_state(out)
    assert closed(out)


def test_an_unordered_map_has_the_same_bar(executor: duckpool.ProcessPoolExecutor) -> None:
    out = io.StringIO()
    results = executor.map(
        tasks.fail_on, range(10), [-1] * 10, chunksize=3, progress=bar_options(out), ordered=False
    )
    assert sorted(results) == list(range(10))
    assert "10/10" in last_state(out) and closed(out)
    failing = io.StringIO()
    results = executor.map(
        tasks.fail_on,
        range(10),
        [4] * 10,
        chunksize=1,
        progress=bar_options(failing),
        ordered=False,
    )
    with pytest.raises(ValueError):
        list(results)
    assert closed(failing)


def test_bar_counts_each_chunk_as_it_arrives(executor: duckpool.ProcessPoolExecutor) -> None:
    out = io.StringIO()
    results = executor.map(
        tasks.fail_on, range(7), [-1] * 7, chunksize=3, progress=bar_options(out)
    )
    assert next(results) == 0
    assert "3/7" in last_state(out) and not closed(out)
    assert list(results) == list(range(1, 7))
    assert "7/7" in last_state(out) and closed(out)


def test_bar_without_a_length_counts_items(executor: duckpool.ProcessPoolExecutor) -> None:
    out = io.StringIO()
    inputs = (i for i in range(5))
    results = executor.map(
        tasks.fail_on, inputs, [-1] * 5, chunksize=2, buffersize=1, progress=bar_options(out)
    )
    assert list(results) == list(range(5))
    assert last_state(out).startswith("5it")
    assert closed(out)


def test_bar_closes_on_error(executor: duckpool.ProcessPoolExecutor) -> None:
    out = io.StringIO()
    results = executor.map(
        tasks.fail_on, range(10), [5] * 10, chunksize=2, progress=bar_options(out)
    )
    with pytest.raises(ValueError, match="bad value 5"):
        list(results)
    assert "4/10" in last_state(out)
    assert closed(out)


def test_bar_closes_when_the_iterator_is_closed(executor: duckpool.ProcessPoolExecutor) -> None:
    out = io.StringIO()
    results = executor.map(
        tasks.fail_on, range(10), [-1] * 10, chunksize=2, progress=bar_options(out)
    )
    assert next(results) == 0
    assert not closed(out)
    results.close()  # type: ignore[attr-defined]
    assert "2/10" in last_state(out)
    assert closed(out)


def test_description_string_and_options_map(
    executor: duckpool.ProcessPoolExecutor, capsys: pytest.CaptureFixture[str]
) -> None:
    assert list(executor.map(tasks.fail_on, range(3), [-1] * 3, progress="rows")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "rows:" in err and "3/3" in err
    out = io.StringIO()
    results = executor.options(timeout=TIMEOUT).map(
        tasks.fail_on, range(4), [-1] * 4, chunksize=3, progress=bar_options(out, desc="opts")
    )
    assert list(results) == [0, 1, 2, 3]
    assert last_state(out).startswith("opts:") and "4/4" in last_state(out)


def test_no_bar_by_default(
    executor: duckpool.ProcessPoolExecutor, capsys: pytest.CaptureFixture[str]
) -> None:
    assert list(executor.map(tasks.fail_on, range(3), [-1] * 3)) == [0, 1, 2]
    assert "3/3" not in capsys.readouterr().err


def test_missing_tqdm_names_the_extra(
    executor: duckpool.ProcessPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # makes the import fail
    with pytest.raises(ImportError, match=r'pip install "duckpool\[progress\]"'):
        executor.map(tasks.fail_on, range(3), [-1] * 3, progress=True)


def test_bad_progress_argument_is_refused(executor: duckpool.ProcessPoolExecutor) -> None:
    with pytest.raises(TypeError, match="progress must be"):
        executor.map(tasks.fail_on, range(3), [-1] * 3, progress=3)


def test_bar_made_only_when_iterated(executor: duckpool.ProcessPoolExecutor) -> None:
    out = io.StringIO()
    results = executor.map(tasks.fail_on, range(3), [-1] * 3, progress=bar_options(out))
    assert out.getvalue() == ""
    assert list(results) == [0, 1, 2]
    assert closed(out)
