"""Large buffers beside the pickle: exact round trips, the shared area, and failures."""

from __future__ import annotations

import os
import pickle
import signal
from concurrent.futures import wait
from pathlib import Path
from typing import Any, Iterator

import pytest

import _buffer_tasks as tasks
import duckpool
from conftest import needs_memfd, wait_until
from duckpool import _buffers

TIMEOUT = 60
THRESHOLD = _buffers.OUT_OF_BAND_BYTES
SIZES = (0, 1, THRESHOLD - 1, THRESHOLD, THRESHOLD + 1, (1 << 20) + 3)


@pytest.fixture(params=("area", "pipe"))
def transfer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Large buffers through the workers' shared areas, or inline in the pipes."""
    monkeypatch.setattr(_buffers, "SHARED_AREA", request.param == "area")
    return str(request.param)


@pytest.fixture
def executor(ctx: object, transfer: str) -> Iterator[duckpool.ProcessPoolExecutor]:
    pool = duckpool.ProcessPoolExecutor(2, mp_context=ctx)  # type: ignore[arg-type]
    yield pool
    pool.shutdown(cancel_futures=True, timeout=TIMEOUT)


def _mapped_areas() -> int:
    """Mappings of workers' shared areas in this process."""
    with open("/proc/self/maps") as maps:
        return sum("duckpool-buffers" in line for line in maps)


def _named_in_dev_shm() -> set[str]:
    try:
        return {name for name in os.listdir("/dev/shm") if "duckpool" in name}
    except FileNotFoundError:
        return set()


@pytest.mark.parametrize("size", SIZES)
def test_bytes_and_bytearray_round_trip_exactly(
    executor: duckpool.ProcessPoolExecutor, size: int
) -> None:
    data = tasks.pattern(size, size)
    for value in (data, bytearray(data)):
        described = executor.submit(tasks.describe, value).result(TIMEOUT)
        assert described == (
            type(value).__name__,
            size,
            tasks.describe(data)[2],
            isinstance(value, bytes),
        )
        back = executor.submit(tasks.echo, value).result(TIMEOUT)
        assert type(back) is type(value)
        assert back == value


@pytest.mark.parametrize("size", SIZES)
def test_memoryviews_round_trip_with_format_shape_and_mode(
    executor: duckpool.ProcessPoolExecutor, size: int
) -> None:
    data = tasks.pattern(size, 7)
    readonly = memoryview(data)
    writable = memoryview(bytearray(data))
    for view in (readonly, writable):
        back, fmt, shape, was_readonly = executor.submit(tasks.echo_view, view).result(TIMEOUT)
        assert (fmt, shape, was_readonly) == ("B", (size,), view.readonly)
        assert type(back) is memoryview
        assert (back.format, back.shape, back.readonly) == ("B", (size,), view.readonly)
        assert back == view
    rows = size // 8 // 4
    if rows:
        grid = memoryview(bytearray(data[: rows * 4 * 8])).cast("q", (rows, 4))
        back, fmt, shape, _ = executor.submit(tasks.echo_view, grid).result(TIMEOUT)
        assert (fmt, shape) == ("q", (rows, 4))
        assert (back.format, back.shape) == ("q", (rows, 4))
        assert back.tolist() == grid.tolist()


def test_buffers_inside_arguments_and_results(executor: duckpool.ProcessPoolExecutor) -> None:
    size = 3 * THRESHOLD
    expected = tasks.several(size)
    assert executor.submit(tasks.several, size).result(TIMEOUT) == expected
    # The same, as arguments: in a tuple, a list, a dict and a keyword.
    args = (expected, list(expected), {"nested": expected[0]})
    assert executor.submit(tasks.echo, args).result(TIMEOUT) == args
    got = executor.submit(tasks.describe, value=expected[1]).result(TIMEOUT)
    assert got[:2] == ("bytearray", size)


def test_an_unpicklable_argument_beside_buffers_is_named(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    future = executor.submit(tasks.echo, memoryview(b"x" * THRESHOLD), lambda: None)
    with pytest.raises(pickle.PicklingError, match=r"argument 1 \(<function"):
        future.result(TIMEOUT)


def test_map_sends_large_items(executor: duckpool.ProcessPoolExecutor) -> None:
    payloads = [tasks.pattern(THRESHOLD + i, i) for i in range(12)]
    assert list(executor.map(tasks.echo, payloads, timeout=TIMEOUT, chunksize=4)) == payloads


def test_many_payloads_in_flight_each_come_back_as_sent(
    executor: duckpool.ProcessPoolExecutor,
) -> None:
    payloads = [tasks.pattern(THRESHOLD * (1 + i % 5) + i, i) for i in range(60)]
    futures = [executor.submit(tasks.echo, payload) for payload in payloads]
    assert [f.result(TIMEOUT) for f in futures] == payloads
    # Tiny calls with large results: these queue in the workers' pipes, so
    # several results share a worker's area at once.
    futures = [executor.submit(tasks.make_bytes, 2 * THRESHOLD + i, i) for i in range(60)]
    for i, future in enumerate(futures):
        assert future.result(TIMEOUT) == tasks.pattern(2 * THRESHOLD + i, i)


def test_a_bytearray_is_sent_as_it_was_at_submit(ctx: object) -> None:
    with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # type: ignore[arg-type]
        data = bytearray(tasks.pattern(2 * THRESHOLD, 1))
        sent, futures = [], []
        for i in range(4):  # the later ones wait in the parent while data changes
            sent.append(bytes(data))
            futures.append(pool.submit(tasks.echo, data))
            data[:8] = i.to_bytes(8, "little")
        assert [future.result(TIMEOUT) for future in futures] == sent


def test_buffers_larger_than_the_area_go_through_the_pipe(ctx: object) -> None:
    with duckpool.ProcessPoolExecutor(1, mp_context=ctx) as pool:  # type: ignore[arg-type]
        data = tasks.pattern(_buffers.REGION_BYTES + 5, 3)
        assert pool.submit(tasks.echo, data).result(TIMEOUT) == data


@needs_memfd  # (without it, large payloads take the pipe: the tests above)
def test_workers_map_their_shared_area_under_every_start_method(ctx: object) -> None:
    before = _mapped_areas()
    pool = duckpool.ProcessPoolExecutor(2, mp_context=ctx)  # type: ignore[arg-type]
    try:
        futures = [pool.submit(tasks.shared_areas) for _ in range(4)]
        assert [f.result(TIMEOUT) for f in futures] == [1] * 4
        wait_until(lambda: _mapped_areas() - before == 2, TIMEOUT)
        assert pool.submit(tasks.echo, b"x" * 2 * THRESHOLD).result(TIMEOUT) == b"x" * 2 * THRESHOLD
    finally:
        pool.shutdown(timeout=TIMEOUT)
    # The parent's mappings go with the workers; nothing was ever named.
    wait_until(lambda: _mapped_areas() == before, TIMEOUT)
    assert not _named_in_dev_shm()


def test_a_worker_killed_with_payloads_queued_resolves_every_future(
    ctx: object, transfer: str, tmp_path: Path
) -> None:
    before_maps = _mapped_areas()
    before_shm = _named_in_dev_shm()
    gate, started = tmp_path / "gate", tmp_path / "started"
    pool = duckpool.ProcessPoolExecutor(1, mp_context=ctx)  # type: ignore[arg-type]
    try:
        payload = tasks.pattern(3 * THRESHOLD, 5)
        blocked = pool.submit(tasks.block_then_echo, str(gate), str(started), payload)
        wait_until(started.exists, TIMEOUT)
        queued = [pool.submit(tasks.echo, tasks.pattern(THRESHOLD + i, i)) for i in range(8)]
        victim = pool.stats().workers[0].pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(duckpool.WorkerDiedError):
            blocked.result(TIMEOUT)
        # The queued payloads never started: a replacement worker runs them.
        for i, future in enumerate(queued):
            assert future.result(TIMEOUT) == tasks.pattern(THRESHOLD + i, i)
        # Killed holding a large call (whose result it never sent).
        with pytest.raises(duckpool.WorkerDiedError):
            pool.submit(tasks.die_holding, payload).result(TIMEOUT)
        assert pool.submit(tasks.echo, payload).result(TIMEOUT) == payload
    finally:
        gate.touch()
        pool.shutdown(timeout=TIMEOUT)
    wait_until(lambda: _mapped_areas() == before_maps, TIMEOUT)
    assert _named_in_dev_shm() == before_shm


def test_cloudpickle_serializer_sends_large_buffers(ctx: object, transfer: str) -> None:
    pool = duckpool.ProcessPoolExecutor(
        2,
        mp_context=ctx,
        serializer="cloudpickle",  # type: ignore[arg-type]
    )
    try:
        data = tasks.pattern(3 * THRESHOLD, 9)
        suffix = b"!" * THRESHOLD  # a large buffer in a closure: pickled in band
        futures = [
            pool.submit(lambda b: b + suffix, data),
            pool.submit(lambda b: bytearray(b), data),
            pool.submit(lambda b: memoryview(b), bytearray(data)),
        ]
        done, _ = wait(futures, TIMEOUT)
        assert len(done) == 3
        assert futures[0].result() == data + suffix
        assert futures[1].result() == bytearray(data)
        view = futures[2].result()
        assert type(view) is memoryview and not view.readonly and view == data
    finally:
        pool.shutdown(timeout=TIMEOUT)


def test_numpy_arrays_round_trip(executor: duckpool.ProcessPoolExecutor) -> None:
    numpy = pytest.importorskip("numpy")
    arrays = [
        numpy.arange(THRESHOLD, dtype=numpy.float64).reshape(64, -1),
        numpy.asfortranarray(numpy.arange(THRESHOLD, dtype=numpy.int32).reshape(-1, 64)),
        numpy.arange(10, dtype=numpy.int8),
    ]
    readonly = numpy.arange(THRESHOLD, dtype=numpy.int64)
    readonly.flags.writeable = False
    arrays.append(readonly)
    for array in arrays:
        back = executor.submit(tasks.echo, array).result(TIMEOUT)
        assert back.dtype == array.dtype and back.shape == array.shape
        assert back.flags.f_contiguous == array.flags.f_contiguous
        assert numpy.array_equal(back, array)


# --- the pieces -------------------------------------------------------------


@pytest.mark.parametrize("container", [lambda b: b, lambda b: (1, b), lambda b: {"k": [b]}])
def test_large_buffers_leave_the_pickle(container: Any) -> None:
    data = tasks.pattern(THRESHOLD, 1)
    for value in (data, bytearray(data), memoryview(data)):
        wrapped = _buffers.wrap(container(value), depth=2)
        stream, buffers = _buffers.dumps(pickle.dumps, wrapped)
        assert len(stream) < 200
        assert [bytes(buffer.raw()) for buffer in buffers] == [data]
        back = pickle.loads(stream, buffers=[bytes(b.raw()) for b in buffers])
        assert back == container(value)
    small = tasks.pattern(THRESHOLD - 1, 1)
    stream, buffers = _buffers.dumps(pickle.dumps, _buffers.wrap(container(small), depth=2))
    assert not buffers and len(stream) > THRESHOLD


def test_calls_with_nothing_to_wrap_are_left_alone() -> None:
    args, kwargs = (1, "a", [2, 3]), {"k": None}
    assert _buffers.wrap_call(args, kwargs) == (args, kwargs)
    assert _buffers.wrap_call(args, kwargs)[0] is args


def test_region_reuses_space_in_the_order_it_was_taken() -> None:
    import mmap

    shared = mmap.mmap(-1, 1000)
    region = _buffers.Region(shared, memoryview(shared)[:1000], 0)
    assert region.take(400) == 0
    assert region.take(400) == 400
    assert region.take(400) == -1  # full
    region.release()  # [0, 400) is free again: the next span wraps round
    assert region.take(300) == 0
    assert region.take(200) == -1  # between 300 and 400 only 100 are free
    region.release()
    region.release()
    assert region.take(1000) == 0  # empty: from the start
    assert region.take(1) == -1
    region.release()
    assert region.take(1001) == -1


def test_encode_and_decode_agree_inline_and_in_an_area() -> None:
    import mmap

    shared = mmap.mmap(-1, 1 << 20)
    region = _buffers.Region(shared, memoryview(shared), 0)
    big, small = b"a" * THRESHOLD, b"b" * 70
    cases = [
        ([(0, memoryview(big)), (_buffers.WRITABLE, memoryview(small))], region, True),
        ([(0, memoryview(big)), (_buffers.WRITABLE, memoryview(small))], None, False),
        ([(_buffers.WRITABLE, memoryview(small))], region, False),  # too small to be worth it
    ]
    for buffers, target, in_area in cases:
        parts, taken = _buffers.encode(b"PICKLE", buffers, target)
        assert (taken > 0) == in_area
        body = memoryview(b"".join(bytes(part) for part in parts))
        received, used = _buffers.decode(body, None if target is None else region.view)
        assert used == in_area
        assert bytes(received.pickle) == b"PICKLE"
        assert received.buffers == [bytes(view) for _, view in buffers]
        assert [type(b) for b in received.buffers] == [
            bytearray if flags & _buffers.WRITABLE else bytes for flags, _ in buffers
        ]


def test_a_region_gives_back_memory_past_what_it_keeps() -> None:
    area, offer = _buffers.create_area()
    if area is None:
        pytest.skip("no memfd here")
    fd = _buffers._AREA_OFFER.unpack(offer)[0]
    try:
        size = 3 * _buffers._KEEP_BYTES
        offset = area.calls.take(size)
        area.calls.view[offset : offset + size] = b"\1" * size
        assert os.fstat(fd).st_blocks * 512 >= size
        area.calls.release()
        assert os.fstat(fd).st_blocks * 512 <= _buffers._KEEP_BYTES
    finally:
        os.close(fd)
