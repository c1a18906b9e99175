"""duckpool._protocol: the frames between the parent and a worker, over real pipes."""

from __future__ import annotations

import os
from multiprocessing.connection import Connection
from typing import Any

import _buffer_tasks as tasks
from duckpool import _protocol


def test_frames_are_what_a_connection_reads() -> None:
    read_fd, write_fd = os.pipe()
    reader = Connection(read_fd, writable=False)
    try:
        os.write(write_fd, _protocol.task_frame(7, b"call"))
        os.write(write_fd, _protocol.encode_result(7, _protocol.STATUS_OK, b"result"))
        os.write(write_fd, _protocol.release_frame(3))
        os.write(write_fd, _protocol.wire(b""))
        task = reader.recv_bytes()
        result = reader.recv_bytes()
        release = reader.recv_bytes()
        stop = reader.recv_bytes()
    finally:
        reader.close()
        os.close(write_fd)
    assert task == (7).to_bytes(_protocol.TASK_ID_BYTES, "little") + b"call"
    assert result[: _protocol.TASK_ID_BYTES] == (7).to_bytes(_protocol.TASK_ID_BYTES, "little")
    assert result[_protocol.TASK_ID_BYTES] == _protocol.STATUS_OK
    assert result[_protocol.RESULT_HEADER_BYTES :] == b"result"
    assert release == bytes(_protocol.TASK_ID_BYTES) + (3).to_bytes(8, "little")
    assert stop == b""


def test_a_frame_of_the_long_size_gets_the_long_header() -> None:
    short = _protocol.frame_header(_protocol._LONG_FRAME - 1)
    long = _protocol.frame_header(_protocol._LONG_FRAME)
    assert short == (_protocol._LONG_FRAME - 1).to_bytes(4, "big")
    assert long == _protocol._LONG_FRAME_MARK + _protocol._LONG_FRAME.to_bytes(8, "big")
    assert _protocol._frame_size(long) == (_protocol._LONG_FRAME, len(long))
    assert _protocol._frame_size(long[:11]) == (-1, 12)  # the length is still to come


def test_frame_reader_reads_a_large_frame_in_pieces() -> None:
    read_fd, write_fd = os.pipe()
    try:
        os.set_blocking(read_fd, False)
        reader = _protocol.FrameReader(read_fd)
        small = _protocol.wire(b"abc")
        large_body = tasks.pattern(3 * _protocol._LARGE_FRAME + 1, 1)
        stream = small + _protocol.wire(large_body) + small
        frames: list[Any] = []
        for start in range(0, len(stream), 10_000):  # 10 kB at a time
            os.write(write_fd, stream[start : start + 10_000])
            got, eof = reader.read_available()
            assert not eof
            frames += got
        assert [bytes(frame) for frame in frames] == [b"abc", large_body, b"abc"]
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_a_judged_reader_tells_each_frame_s_head_once_and_reads_large_frames_whole() -> None:
    read_fd, write_fd = os.pipe()
    try:
        os.set_blocking(read_fd, False)
        reader = _protocol.FrameReader(read_fd, judged=True)
        small = _protocol.wire(b"head-of-small")
        large_body = tasks.pattern(3 * _protocol._LARGE_FRAME + 1, 2)
        stream = small + _protocol.wire(large_body) + small
        frames: list[Any] = []
        heads: list[bytes] = []
        for start in range(0, len(stream), 10_000):  # 10 kB at a time
            os.write(write_fd, stream[start : start + 10_000])
            got, eof = reader.read_available()
            assert not eof and reader.failed is None
            frames += got
            head = reader.partial_head(9)
            if head is not None:
                heads.append(head)
        expected = [b"head-of-small", large_body, b"head-of-small"]
        assert [bytes(frame) for frame in frames] == expected
        assert heads == [large_body[:9]]  # (the small frames came whole: no partial head)
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_a_judged_reader_allocates_nothing_for_a_frame_before_its_head_is_told() -> None:
    # A frame announcing 2**60 bytes (what a task writing to its worker's
    # pipe can do): no buffer of that size is asked for until the head has
    # been judged; asked for then, the failure stops the stream.
    read_fd, write_fd = os.pipe()
    try:
        os.set_blocking(read_fd, False)
        reader = _protocol.FrameReader(read_fd, judged=True)
        os.write(write_fd, _protocol._LONG_FRAME_MARK + (2**60).to_bytes(8, "big") + b"x" * 20)
        assert reader.read_available() == ([], False)
        assert reader.failed is None
        assert reader.partial_head(9) == b"x" * 9
        assert reader.partial_head(9) is None  # once per frame
        assert reader.read_available() == ([], False)
        assert isinstance(reader.failed, _protocol.FrameError)
        assert str(2**60) in str(reader.failed)
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_write_parts_writes_more_parts_than_one_writev_takes() -> None:
    parts = [bytes((i % 251,)) * 3 for i in range(2 * _protocol.IOV_MAX + 5)]
    read_fd, write_fd = os.pipe()
    try:
        _protocol.write_all(write_fd, _protocol.buffered_frame(b"head", parts))
        os.set_blocking(read_fd, False)
        frames, eof = _protocol.FrameReader(read_fd).read_available()
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert not eof
    assert [bytes(frame) for frame in frames] == [b"head" + b"".join(parts)]


def test_skip_written_cuts_into_the_first_part_not_written_whole() -> None:
    views = [memoryview(b"abc"), memoryview(b"defg"), memoryview(b"h")]
    rest = _protocol.skip_written(views, 5)
    assert [bytes(view) for view in rest] == [b"fg", b"h"]
    assert _protocol.skip_written(views, 8) == []
